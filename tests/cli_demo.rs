//! `chainfs demo DIR` on a fresh directory builds and mounts the five-image
//! chain, and every command it prints runs as it says, the stream included.

mod common;

use std::path::Path;
use std::process::Command;

use common::cli::{chainfs, chainfs_bin, chainfs_processes, is_mounted, run, MountGuard};
use common::{path_str, qemu_img, qemu_img_check, require_fuse, require_tool};

/// The printed commands: the indented lines that are not `# comments`.
fn printed_commands(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("  "))
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.trim_end().to_owned())
        .collect()
}

/// Runs a printed command in `bash` (dash reports every failed `echo` as an
/// "I/O error", bash names the errno), with `chainfs` meaning the binary
/// under test.
fn shell(command: &str) -> common::cli::Outcome {
    let command = match command.strip_prefix("chainfs ") {
        Some(rest) => format!("{} {rest}", path_str(chainfs_bin())),
        None => command.to_owned(),
    };
    run(Command::new("bash").args(["-c", &command]))
}

#[test]
fn demo_builds_the_chain_mounts_it_and_its_commands_run() {
    if !require_fuse() || !require_tool("qemu-img") {
        return;
    }
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("fresh/demo");
    let mnt = dir.join("mnt");
    let _guard = MountGuard(mnt.clone());
    let stdout = chainfs(["demo", path_str(&dir)]).ok().stdout;
    assert!(is_mounted(&mnt), "demo mounts at DIR/mnt");
    assert_chain_is_the_spec_example(&dir);
    let hexdump = shell(&format!(
        "hexdump -C {} | head -1",
        path_str(&mnt.join("file-C.img"))
    ));
    assert!(hexdump.stdout.contains("|layer C was here|"), "{hexdump:?}");
    let top_before = std::fs::read(mnt.join("file-E.img")).expect("read file-E.img");

    let commands = printed_commands(&stdout);
    assert!(commands.len() >= 8, "{stdout}");
    let (umount, rest) = commands.split_last().expect("commands");
    assert!(umount.starts_with("chainfs umount"), "{umount}");
    for command in rest {
        let outcome = shell(command);
        assert_eq!(outcome.code, Some(0), "{command}: {outcome:#?}");
    }
    // The stream ran to completion (status --wait exited 0): E now rests
    // on A, in the mount and in the image.
    let chain = std::fs::read_to_string(mnt.join("ctl/chain")).expect("ctl/chain");
    assert!(chain.starts_with("file-A.img <- file-E.img\n"), "{chain}");
    let top_after = std::fs::read(mnt.join("file-E.img")).expect("read file-E.img");
    assert!(
        top_after == top_before,
        "file-E.img reads differently after the stream"
    );

    shell(umount).ok();
    assert!(!is_mounted(&mnt));
    assert!(chainfs_processes(parent.path()).is_empty(), "daemon gone");
    for layer in ['A', 'B', 'C', 'D', 'E'] {
        qemu_img_check(&dir.join(format!("file-{layer}.img")));
    }
    let info = qemu_img(&["info", "--output=json", path_str(&dir.join("file-E.img"))]);
    assert!(
        info.contains("\"backing-filename\": \"file-A.img\""),
        "{info}"
    );
}

/// file-E.img ← … ← file-A.img, relative names, backing format qcow2.
fn assert_chain_is_the_spec_example(dir: &Path) {
    let info = qemu_img(&[
        "info",
        "-U",
        "--backing-chain",
        "--output=json",
        path_str(&dir.join("file-E.img")),
    ]);
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&info).expect("json");
    let backing: Vec<Option<&str>> = nodes
        .iter()
        .map(|n| n.get("backing-filename").and_then(|v| v.as_str()))
        .collect();
    assert_eq!(
        backing,
        [
            Some("file-D.img"),
            Some("file-C.img"),
            Some("file-B.img"),
            Some("file-A.img"),
            None
        ]
    );
    for node in &nodes[..4] {
        assert_eq!(node["backing-filename-format"], "qcow2");
        assert_eq!(node["format"], "qcow2");
    }
}

#[test]
fn demo_refuses_a_non_empty_directory_and_touches_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("keep"), b"mine").expect("write");
    let outcome = chainfs(["demo", path_str(dir.path())]);
    let line = outcome.one_line_failure();
    assert!(line.ends_with(": not an empty directory"), "{line}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
    assert_eq!(names.len(), 1);
}
