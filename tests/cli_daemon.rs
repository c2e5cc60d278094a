//! The mount daemon keeps nothing of the command that started it: with
//! `--log-file` not one line reaches the caller's stderr, it holds none of
//! the caller's other descriptors, and a clean unmount logs no warning.

mod common;

use std::path::Path;
use std::process::Command;

use common::chain::small_chain;
use common::cli::{chainfs, chainfs_bin, chainfs_processes, run, MountGuard};
use common::{path_str, require_fuse};

/// What each descriptor of process `pid` points at.
fn descriptors(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("daemon fds")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_daemon_with_a_log_file_keeps_nothing_of_its_caller_and_logs_no_warning() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let [_, top] = small_chain(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let log = dir.path().join("chainfs.log");
    let held = dir.path().join("held-by-the-caller");
    std::fs::write(&held, "").expect("marker");
    let _guard = MountGuard(mnt.clone());

    // The caller holds an extra descriptor (9, not close-on-exec) when it
    // runs `chainfs mount`.
    let script = "exec 9<\"$1\"; shift; exec \"$@\"";
    let mount = run(Command::new("sh").args([
        "-c",
        script,
        "sh",
        path_str(&held),
        path_str(chainfs_bin()),
        "mount",
        "--log-file",
        path_str(&log),
        path_str(&top),
        path_str(&mnt),
    ]))
    .ok();
    assert_eq!(mount.stderr, "", "the daemon wrote to the caller's stderr");

    let daemons = chainfs_processes(dir.path());
    assert_eq!(daemons.len(), 1, "one daemon");
    let open = descriptors(daemons[0]);
    assert!(
        !open.iter().any(|target| Path::new(target) == held),
        "the daemon kept the caller's descriptor: {open:?}"
    );

    chainfs(["umount", path_str(&mnt)]).ok();
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("unmounted"), "{text}");
    assert!(
        !text.lines().any(|line| line.contains("WARN")),
        "a clean unmount logged a warning:\n{text}"
    );
}
