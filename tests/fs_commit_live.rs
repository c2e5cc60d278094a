//! An intermediate commit watched while it runs: the base's file shows the
//! merge as it happens even through a handle whose pages the kernel cached
//! before the job, a hidden node's cached pages are gone when the command
//! returns, and the speed limit holds the copy rate.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mount::*;
use common::*;

/// Size of every image of the chain.
const SIZE: u64 = 32 * MIB;

/// `base <- mid1 <- mid2 <- top`: base all 0x11, mid1 all 0x22, mid2 all
/// 0x33, top empty. Returns the paths, base first.
fn four_chain(dir: &Path) -> [PathBuf; 4] {
    let names = ["base.qcow2", "mid1.qcow2", "mid2.qcow2", "top.qcow2"];
    let paths = names.map(|n| dir.join(n));
    let size = SIZE.to_string();
    for (level, path) in paths.iter().enumerate() {
        match level.checked_sub(1) {
            None => create_qcow2(path_str(path), &size, ""),
            Some(below) => create_overlay(path, (names[below], "qcow2"), Some(&size), ""),
        }
        if level < 3 {
            let pattern = 0x11 * (level as u64 + 1);
            common::qemu_io(path, "qcow2", &[format!("write -P {pattern} 0 {SIZE}")]);
        }
    }
    paths
}

/// The job's offset now.
fn offset(m: &Mounted) -> u64 {
    status_json(m)[0]["offset"].as_u64().unwrap()
}

/// Waits until the job's offset reaches `at`.
fn wait_offset(m: &Mounted, at: u64) {
    let reached = |job: &serde_json::Value| job["offset"].as_u64() >= Some(at);
    wait_for(m, &format!("the commit never reached {at}"), reached);
}

/// Waits until the job has an outcome and returns it.
fn outcome(m: &Mounted) -> String {
    let job = &wait_jobs(m)[0];
    job["outcome"].as_str().unwrap_or_default().to_string()
}

/// Reads `len` bytes at `at` through `file`.
fn read_at(file: &File, at: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, at).unwrap();
    buf
}

#[test]
fn a_cached_handle_on_the_base_sees_the_merge_as_it_happens() {
    let Some(Fixture { dir, m, .. }) = mounted(&[], |d| four_chain(d)[3].clone()) else {
        return;
    };
    let base = dir.path().join("base.qcow2");
    // Opened before the job, as a backing node: the kernel caches its pages.
    let cached = File::open(m.path("base.qcow2")).unwrap();
    assert!(read_at(&cached, 0, SIZE).iter().all(|&b| b == 0x11));
    command(&m, "commit top=mid2.qcow2 base=base.qcow2 speed=4M").unwrap();
    wait_offset(&m, 2 * MIB);
    // Fill the cache again while most of the base is still to be merged.
    assert_eq!(read_at(&cached, SIZE - MIB, MIB), vec![0x11; MIB as usize]);
    let _ = read_at(&cached, 0, SIZE);
    wait_offset(&m, 8 * MIB);
    command(&m, "pause").unwrap();
    let merged = offset(&m);
    assert!(
        read_at(&cached, 0, merged).iter().all(|&b| b == 0x33),
        "the base's file served pages cached before the merge"
    );
    command(&m, "set-speed speed=0").unwrap();
    command(&m, "resume").unwrap();
    assert_eq!(outcome(&m), "completed");
    assert!(
        read_at(&cached, 0, SIZE).iter().all(|&b| b == 0x33),
        "the base's file does not show the whole merge"
    );
    drop(cached);
    m.unmount();
    common::qemu_img_check(&base);
    assert!(convert_to_raw(&base).iter().all(|&b| b == 0x33));
}

#[test]
fn a_hidden_node_read_through_its_cache_fails_once_the_command_returns() {
    let Some(Fixture { dir: _dir, m, .. }) = mounted(&[], |d| four_chain(d)[3].clone()) else {
        return;
    };
    let hidden = File::open(m.path("mid1.qcow2")).unwrap();
    assert!(read_at(&hidden, 0, SIZE).iter().all(|&b| b == 0x22));
    command(&m, "commit top=mid2.qcow2 base=base.qcow2 speed=1M").unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for at in [0, SIZE / 2, SIZE - MIB] {
        assert_eq!(
            errno_of(hidden.read_at(&mut buf, at), "read a hidden node"),
            libc::EIO,
            "at {at}"
        );
    }
    command(&m, "cancel").unwrap();
    assert_eq!(outcome(&m), "cancelled");
    drop(hidden);
    m.unmount();
}

#[test]
fn the_speed_limit_holds_a_commit_to_its_rate() {
    let Some(Fixture { dir: _dir, m, .. }) = mounted(&[], |d| four_chain(d)[3].clone()) else {
        return;
    };
    command(&m, "commit top=mid2.qcow2 base=base.qcow2 speed=4M").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let window = Duration::from_secs(5);
    let start = offset(&m);
    std::thread::sleep(window);
    let rate = (offset(&m) - start) as f64 / window.as_secs_f64();
    let limit = 4.0 * MIB as f64;
    assert!(
        (rate - limit).abs() <= limit * 0.2,
        "{rate:.0} B/s against {limit} B/s"
    );
    command(&m, "cancel").unwrap();
    assert_eq!(outcome(&m), "cancelled");
    m.unmount();
}
