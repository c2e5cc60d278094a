//! `kill -9` of the daemon during a mirror of the active node, while
//! `active` is written: before `ready`, after it, and right after
//! `complete` (wherever the pivot then is). The source chain passes
//! `qemu-img check`, every acknowledged write reads back after a remount,
//! and the target passes `qemu-img check` (leaks allowed).

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::cli::{
    chainfs, kill_daemon, mount_patterned_chain, wait_until, PATTERNED_SIZE as SIZE,
};
use common::mount::{command_at, status_json_at};
use common::{path_str, qemu_img_check_allowing_leaks, require_fuse};

/// When the daemon is killed.
#[derive(Clone, Copy, Debug)]
enum Moment {
    BeforeReady,
    AfterReady,
    DuringComplete,
}

/// Whether the mirror of `mnt` is ready.
fn ready(mnt: &Path) -> bool {
    status_json_at(mnt)[0]["status"] == "ready"
}

fn kill_during_a_mirror(moment: Moment) {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (top, mnt, pattern, _guard) = mount_patterned_chain(dir.path());
    let speed = match moment {
        Moment::BeforeReady => "8M",
        Moment::AfterReady | Moment::DuringComplete => "0",
    };
    command_at(&mnt, &format!("mirror target=copy.qcow2 speed={speed}")).unwrap();
    let active = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("active"))
        .unwrap();
    let mut model = pattern.clone();
    for i in 0..40usize {
        let at = i * 1_572_869 % (SIZE - 8192);
        let byte = 0xd0 + (i % 16) as u8;
        active.write_all_at(&[byte; 8192], at as u64).unwrap();
        model[at..at + 8192].fill(byte);
    }
    match moment {
        Moment::BeforeReady => {
            assert!(
                wait_until(Duration::from_secs(20), || {
                    status_json_at(&mnt)[0]["offset"].as_u64().unwrap_or(0) > (8 << 20)
                }),
                "the mirror made no progress"
            );
            assert!(!ready(&mnt), "ready before the kill");
        }
        Moment::AfterReady => {
            assert!(wait_until(Duration::from_secs(60), || ready(&mnt)));
            active.write_all_at(&[0xee; 4096], 4096).unwrap();
            model[4096..8192].fill(0xee);
        }
        Moment::DuringComplete => {
            assert!(wait_until(Duration::from_secs(60), || ready(&mnt)));
            command_at(&mnt, "complete").unwrap();
        }
    }
    drop(active);
    kill_daemon(dir.path(), &mnt);
    let target = dir.path().join("copy.qcow2");
    qemu_img_check_allowing_leaks(&top);
    qemu_img_check_allowing_leaks(&target);
    // Like QEMU, the pivot rewrites no header of the old top: it still
    // holds every write made before the pivot, and all were.
    chainfs(["mount", path_str(&top), path_str(&mnt)]).ok();
    assert!(
        std::fs::read(mnt.join("active")).unwrap() == model,
        "{moment:?}: an acknowledged write was lost"
    );
    chainfs(["umount", path_str(&mnt)]).ok();
    qemu_img_check_allowing_leaks(&top);
}

#[test]
fn a_kill_before_ready_loses_nothing() {
    kill_during_a_mirror(Moment::BeforeReady);
}

#[test]
fn a_kill_after_ready_loses_nothing() {
    kill_during_a_mirror(Moment::AfterReady);
}

#[test]
fn a_kill_during_complete_loses_nothing() {
    kill_during_a_mirror(Moment::DuringComplete);
}
