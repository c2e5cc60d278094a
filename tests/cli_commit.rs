//! The daemon's side of `commit`: `chainfs status --wait` waits through
//! `ready` for `complete`, and `kill -9` of the daemon during an active commit — before `ready`, after
//! `ready`, and right after `complete` — while `active` is written: every
//! image passes `qemu-img check` (leaked clusters allowed), every
//! acknowledged write reads back from the top after a remount, and the
//! commit then runs again to the end.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cli::{chainfs, chainfs_bin, chainfs_processes, wait_child, wait_until, MountGuard};
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

fn job(mnt: &Path) -> serde_json::Value {
    let jobs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mnt.join("ctl/status.json")).unwrap()).unwrap();
    jobs[0].clone()
}

/// When the daemon is killed.
#[derive(Clone, Copy, Debug)]
enum Phase {
    BeforeReady,
    AfterReady,
    DuringComplete,
}

/// base.qcow2 (64 MiB pattern) <- mid.qcow2 (every other MiB) <- top.qcow2.
fn build(dir: &Path) -> Vec<u8> {
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&base), "64M"]);
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 4096 % 251) as u8).collect();
    let raw = dir.join("pattern.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&raw),
        path_str(&base),
    ]);
    for (image, backing) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "qcow2",
            path_str(&dir.join(image)),
        ]);
    }
    let mut io = Command::new("qemu-io");
    io.args(["-f", "qcow2"]);
    for mib in (0..64).step_by(2) {
        io.args(["-c", &format!("write -P 0x6d {mib}M 1M")]);
        model[mib << 20..(mib + 1) << 20].fill(0x6d);
    }
    let output = io.arg(dir.join("mid.qcow2")).output().unwrap();
    assert!(output.status.success(), "qemu-io: {output:?}");
    model
}

fn kill_during_an_active_commit(phase: Phase) {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut model = build(dir.path());
    let top = dir.path().join("top.qcow2");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = MountGuard(mnt.clone());
    chainfs(["mount", path_str(&top), path_str(&mnt)]).ok();
    let speed = match phase {
        Phase::BeforeReady => " speed=4M",
        _ => "",
    };
    command(&mnt, &format!("commit top=active base=base.qcow2{speed}"));
    let active = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("active"))
        .unwrap();
    let mut write = |i: usize| {
        let at = i * 1_572_869 % (SIZE - 8192);
        let byte = 0xd0 + (i % 16) as u8;
        active.write_all_at(&[byte; 8192], at as u64).unwrap();
        model[at..at + 8192].fill(byte);
    };
    (0..20).for_each(&mut write);
    match phase {
        Phase::BeforeReady => assert!(
            wait_until(Duration::from_secs(20), || {
                job(&mnt)["offset"].as_u64().unwrap_or(0) > (4 << 20)
            }),
            "the commit made no progress"
        ),
        Phase::AfterReady | Phase::DuringComplete => assert!(
            wait_until(Duration::from_secs(30), || job(&mnt)["status"] == "ready"),
            "the commit never became ready"
        ),
    }
    (20..40).for_each(&mut write);
    match phase {
        Phase::BeforeReady => assert_eq!(job(&mnt)["ready"], false, "{}", job(&mnt)),
        Phase::AfterReady => assert_eq!(job(&mnt)["status"], "ready"),
        Phase::DuringComplete => command(&mnt, "complete"),
    }

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
    for name in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        check_no_errors(&dir.path().join(name));
    }

    chainfs(["mount", path_str(&top), path_str(&mnt)]).ok();
    assert!(
        std::fs::read(mnt.join("active")).unwrap() == model,
        "{phase:?}: an acknowledged write was lost"
    );
    command(&mnt, "commit top=active base=base.qcow2");
    assert!(
        wait_until(Duration::from_secs(60), || job(&mnt)["status"] == "ready"),
        "the second commit never became ready: {}",
        job(&mnt)
    );
    command(&mnt, "complete");
    assert!(wait_until(Duration::from_secs(60), || job(&mnt)
        .get("outcome")
        .is_some()));
    assert_eq!(job(&mnt)["outcome"], "completed", "{}", job(&mnt));
    chainfs(["umount", path_str(&mnt)]).ok();
    let base = dir.path().join("base.qcow2");
    check_no_errors(&base);
    let raw = dir.path().join("base.raw");
    qemu_img(&["convert", "-O", "raw", path_str(&base), path_str(&raw)]);
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "{phase:?}: the base differs after the second commit"
    );
}

#[test]
fn a_daemon_killed_before_ready_leaves_consistent_images() {
    kill_during_an_active_commit(Phase::BeforeReady);
}

#[test]
fn a_daemon_killed_after_ready_leaves_consistent_images() {
    kill_during_an_active_commit(Phase::AfterReady);
}

#[test]
fn a_daemon_killed_during_complete_leaves_consistent_images() {
    kill_during_an_active_commit(Phase::DuringComplete);
}

#[test]
fn status_wait_waits_through_ready_until_complete() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let top = dir.path().join("top.qcow2");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = MountGuard(mnt.clone());
    chainfs(["mount", path_str(&top), path_str(&mnt)]).ok();
    command(&mnt, "commit top=active base=base.qcow2");
    assert!(
        wait_until(Duration::from_secs(30), || job(&mnt)["status"] == "ready"),
        "the commit never became ready"
    );
    let mut waiting = Command::new(chainfs_bin())
        .args(["status", "--wait", path_str(&mnt)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Still waiting while the job is ready (a second is ample for a poll).
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "--wait returned while ready"
    );
    command(&mnt, "complete");
    assert_eq!(
        wait_child(&mut waiting, Duration::from_secs(30)),
        Some(Some(0)),
        "--wait exits 0 once the commit completed"
    );
    chainfs(["umount", path_str(&mnt)]).ok();
}
