//! `kill -9` of the daemon in the middle of a stream while `active` is
//! written: every image passes `qemu-img check` (leaked clusters allowed),
//! every acknowledged write reads back after a remount, and the same stream
//! then completes.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::cli::{
    chainfs, kill_daemon, mount_patterned_chain, wait_until, PATTERNED_SIZE as SIZE,
};
use common::mount::{command_at, status_json_at};
use common::{path_str, qemu_img, qemu_img_check_allowing_leaks, require_fuse};

#[test]
fn a_killed_daemon_leaves_consistent_images_and_the_stream_can_run_again() {
    if !require_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (top, mnt, pattern, _guard) = mount_patterned_chain(dir.path());
    let mut model = pattern.clone();
    command_at(&mnt, "stream speed=8M").unwrap();
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
            status_json_at(&mnt)[0]["offset"].as_u64().unwrap_or(0) > (8 << 20)
        }),
        "the stream made no progress"
    );
    let running = status_json_at(&mnt);
    assert!(
        running[0].get("outcome").is_none(),
        "the stream ended before the kill: {running}"
    );
    drop(active);
    kill_daemon(dir.path(), &mnt);
    qemu_img_check_allowing_leaks(&top);

    chainfs(["mount", path_str(&top), path_str(&mnt)]).ok();
    assert!(
        std::fs::read(mnt.join("active")).unwrap() == model,
        "an acknowledged write was lost"
    );
    command_at(&mnt, "stream").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || status_json_at(&mnt)[0]
            .get("outcome")
            .is_some()),
        "the second stream never finished"
    );
    assert_eq!(status_json_at(&mnt)[0]["outcome"], "completed");
    chainfs(["umount", path_str(&mnt)]).ok();
    qemu_img_check_allowing_leaks(&top);
    let info = qemu_img(&["info", "--output=json", path_str(&top)]);
    assert!(!info.contains("backing-filename"), "{info}");
    let raw = dir.path().join("top.raw");
    qemu_img(&["convert", "-O", "raw", path_str(&top), path_str(&raw)]);
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "the image differs after the second stream"
    );
}
