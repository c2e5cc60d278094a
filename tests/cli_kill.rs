//! `kill -9` of the daemon in the middle of a stream while `active` is
//! written: every image passes `qemu-img check` (leaked clusters allowed),
//! every acknowledged write reads back after a remount, and the same stream
//! then completes.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cli::{chainfs, chainfs_processes, wait_until, MountGuard};
use common::{path_str, qemu_img, require_fuse};

const SIZE: usize = 64 << 20;

/// `qemu-img check`: no errors; leaked clusters (exit 3) are allowed.
fn check_no_errors(image: &Path) {
    let output = Command::new("qemu-img")
        .args(["check", path_str(image)])
        .output()
        .unwrap();
    let code = output.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn command(mnt: &Path, text: &str) {
    let mut file = OpenOptions::new()
        .write(true)
        .open(mnt.join("ctl/command"))
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn status_json(mnt: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(mnt.join("ctl/status.json")).unwrap()).unwrap()
}

#[test]
fn a_killed_daemon_leaves_consistent_images_and_the_stream_can_run_again() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", path_str(&base), "64M"]);
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&base, &pattern).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.img",
        "-F",
        "raw",
        path_str(&top),
        "64M",
    ]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = MountGuard(mnt.clone());
    chainfs(["mount", path_str(&top), path_str(&mnt)]).ok();
    let mut model = pattern.clone();
    command(&mnt, "stream speed=8M");
    let active = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("active"))
        .unwrap();
    for i in 0..40usize {
        let at = i * 1_572_869 % (SIZE - 8192);
        active
            .write_all_at(&[0xd0 + (i % 16) as u8; 8192], at as u64)
            .unwrap();
        model[at..at + 8192].fill(0xd0 + (i % 16) as u8);
    }
    assert!(
        wait_until(Duration::from_secs(20), || {
            status_json(&mnt)[0]["offset"].as_u64().unwrap_or(0) > (8 << 20)
        }),
        "the stream made no progress"
    );
    let running = status_json(&mnt);
    assert!(
        running[0].get("outcome").is_none(),
        "the stream ended before the kill: {running}"
    );
    drop(active);
    let daemons = chainfs_processes(dir.path());
    assert_eq!(daemons.len(), 1, "one daemon: {daemons:?}");
    // SAFETY: kill has no memory-safety preconditions; the pid is our daemon's.
    assert_eq!(unsafe { libc::kill(daemons[0] as i32, libc::SIGKILL) }, 0);
    assert!(wait_until(Duration::from_secs(10), || chainfs_processes(
        dir.path()
    )
    .is_empty()));
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&mnt)
        .output();
    check_no_errors(&top);

    chainfs(["mount", path_str(&top), path_str(&mnt)]).ok();
    assert!(
        std::fs::read(mnt.join("active")).unwrap() == model,
        "an acknowledged write was lost"
    );
    command(&mnt, "stream");
    assert!(
        wait_until(Duration::from_secs(60), || status_json(&mnt)[0]
            .get("outcome")
            .is_some()),
        "the second stream never finished"
    );
    assert_eq!(status_json(&mnt)[0]["outcome"], "completed");
    chainfs(["umount", path_str(&mnt)]).ok();
    check_no_errors(&top);
    let info = qemu_img(&["info", "--output=json", path_str(&top)]);
    assert!(!info.contains("backing-filename"), "{info}");
    let raw = dir.path().join("top.raw");
    qemu_img(&["convert", "-O", "raw", path_str(&top), path_str(&raw)]);
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "the image differs after the second stream"
    );
}
