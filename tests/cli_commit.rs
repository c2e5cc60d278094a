//! The daemon's side of `commit`: `chainfs status --wait` waits through
//! `ready` for `complete`, and `kill -9` of the daemon during an active commit — before `ready`, after
//! `ready`, and right after `complete` — while `active` is written: every
//! image passes `qemu-img check` (leaked clusters allowed), every
//! acknowledged write reads back from the top after a remount, and the
//! commit then runs again to the end.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cli::{chainfs, chainfs_bin, kill_daemon, wait_child, wait_until, MountGuard};
use common::mount::{command_at, job_at};
use common::{create_overlay, create_qcow2, path_str, qemu_img};
use common::{qemu_img_check_allowing_leaks, require_fuse};

const SIZE: usize = 64 << 20;

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
    create_qcow2(path_str(&base), "64M", "");
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
        create_overlay(&dir.join(image), (backing, "qcow2"), None, "");
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
    command_at(&mnt, &format!("commit top=active base=base.qcow2{speed}")).unwrap();
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
                job_at(&mnt)["offset"].as_u64().unwrap_or(0) > (4 << 20)
            }),
            "the commit made no progress"
        ),
        Phase::AfterReady | Phase::DuringComplete => assert!(
            wait_until(Duration::from_secs(30), || job_at(&mnt)["status"]
                == "ready"),
            "the commit never became ready"
        ),
    }
    (20..40).for_each(&mut write);
    match phase {
        Phase::BeforeReady => assert_eq!(job_at(&mnt)["ready"], false, "{}", job_at(&mnt)),
        Phase::AfterReady => assert_eq!(job_at(&mnt)["status"], "ready"),
        Phase::DuringComplete => command_at(&mnt, "complete").unwrap(),
    }

    drop(active);
    kill_daemon(dir.path(), &mnt);
    for name in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        qemu_img_check_allowing_leaks(&dir.path().join(name));
    }

    chainfs(["mount", path_str(&top), path_str(&mnt)]).ok();
    assert!(
        std::fs::read(mnt.join("active")).unwrap() == model,
        "{phase:?}: an acknowledged write was lost"
    );
    command_at(&mnt, "commit top=active base=base.qcow2").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || job_at(&mnt)["status"]
            == "ready"),
        "the second commit never became ready: {}",
        job_at(&mnt)
    );
    command_at(&mnt, "complete").unwrap();
    assert!(wait_until(Duration::from_secs(60), || job_at(&mnt)
        .get("outcome")
        .is_some()));
    assert_eq!(job_at(&mnt)["outcome"], "completed", "{}", job_at(&mnt));
    chainfs(["umount", path_str(&mnt)]).ok();
    let base = dir.path().join("base.qcow2");
    qemu_img_check_allowing_leaks(&base);
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
    command_at(&mnt, "commit top=active base=base.qcow2").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || job_at(&mnt)["status"]
            == "ready"),
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
    command_at(&mnt, "complete").unwrap();
    assert_eq!(
        wait_child(&mut waiting, Duration::from_secs(30)),
        Some(Some(0)),
        "--wait exits 0 once the commit completed"
    );
    chainfs(["umount", path_str(&mnt)]).ok();
}
