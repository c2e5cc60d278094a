//! Tests of the in-memory storage: visible semantics, durability across
//! crashes, determinism of the seeded modes, and fault injection.

use std::io;

use proptest::prelude::*;

use super::{CrashMode, MemStorage, MAX_LEN};
use crate::storage::Storage;

fn read(storage: &MemStorage, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xee; len];
    storage.read_at(&mut buf, offset).expect("read");
    buf
}

fn errno(result: io::Result<()>) -> Option<i32> {
    result.err().and_then(|err| err.raw_os_error())
}

/// Every mode, with a spread of seeds for the random ones.
fn all_modes() -> Vec<CrashMode> {
    let mut modes = vec![CrashMode::DropAll, CrashMode::KeepAll];
    for seed in 0..32 {
        modes.push(CrashMode::Subset { seed });
        modes.push(CrashMode::TornSubset { seed });
    }
    modes
}

#[test]
fn reads_past_the_end_are_zeros() {
    let storage = MemStorage::from_bytes(vec![7; 10]);
    assert_eq!(read(&storage, 8, 4), [7, 7, 0, 0]);
    assert_eq!(read(&storage, 100, 2), [0, 0]);
    assert_eq!(read(&storage, u64::MAX, 2), [0, 0]);
}

#[test]
fn writes_are_visible_at_once_and_extend_the_file() {
    let storage = MemStorage::new();
    storage.write_at(b"abc", 4).expect("write");
    assert_eq!(storage.contents(), b"\0\0\0\0abc");
    assert_eq!(storage.len().expect("len"), 7);
}

#[test]
fn set_len_truncates_and_extends_with_zeros() {
    let storage = MemStorage::from_bytes(vec![1; 8]);
    storage.set_len(4).expect("truncate");
    storage.set_len(6).expect("extend");
    assert_eq!(storage.contents(), [1, 1, 1, 1, 0, 0]);
}

#[test]
fn punch_hole_zeroes_the_range_and_keeps_the_size() {
    let storage = MemStorage::from_bytes(vec![1; 8]);
    storage.punch_hole(2, 100).expect("punch");
    assert_eq!(storage.contents(), [1, 1, 0, 0, 0, 0, 0, 0]);
    storage.punch_hole(50, 10).expect("punch past the end");
    assert_eq!(storage.len().expect("len"), 8);
}

#[test]
fn memory_has_no_holes() {
    let storage = MemStorage::from_bytes(vec![1; 8]);
    assert_eq!(storage.seek_data(3).expect("seek"), Some(3));
    assert_eq!(storage.seek_data(8).expect("seek"), None);
    assert_eq!(storage.seek_hole(3).expect("seek"), 8);
    assert_eq!(storage.allocated_bytes().expect("allocated"), 8);
}

#[test]
fn offsets_beyond_the_limit_fail_with_efbig() {
    let storage = MemStorage::new();
    assert_eq!(errno(storage.write_at(b"x", MAX_LEN)), Some(libc::EFBIG));
    assert_eq!(errno(storage.write_at(b"x", u64::MAX)), Some(libc::EFBIG));
    assert_eq!(errno(storage.set_len(MAX_LEN + 1)), Some(libc::EFBIG));
    assert_eq!(errno(storage.punch_hole(u64::MAX, 2)), Some(libc::EFBIG));
    assert_eq!(storage.op_count(), 0);
}

#[test]
fn synced_writes_survive_every_crash_mode() {
    let storage = MemStorage::new();
    storage.write_at(&[0xaa; 1024], 0).expect("write");
    storage.sync().expect("sync");
    storage
        .write_at(&[0xbb; 1024], 4096)
        .expect("unsynced write");
    storage.set_len(8192).expect("unsynced extend");
    for mode in all_modes() {
        let crashed = mode_contents(&storage, mode);
        assert_eq!(&crashed[..1024], &[0xaa; 1024][..], "{mode:?}");
    }
}

fn mode_contents(storage: &MemStorage, mode: CrashMode) -> Vec<u8> {
    storage.crash(mode).contents()
}

#[test]
fn drop_all_loses_every_unsynced_operation() {
    let storage = MemStorage::from_bytes(vec![1; 4096]);
    storage.write_at(&[2; 100], 0).expect("write");
    storage.sync().expect("sync");
    let durable = storage.contents();
    storage.write_at(&[3; 100], 50).expect("write");
    storage.punch_hole(1000, 1000).expect("punch");
    storage.set_len(10).expect("truncate");
    storage.write_at(&[4; 10], 9000).expect("extend");
    assert_eq!(mode_contents(&storage, CrashMode::DropAll), durable);
    assert_eq!(storage.durable_contents(), durable);
}

#[test]
fn keep_all_keeps_what_readers_see() {
    let storage = MemStorage::from_bytes(vec![1; 4096]);
    storage.write_at(&[2; 100], 0).expect("write");
    storage.sync().expect("sync");
    storage.punch_hole(10, 20).expect("punch");
    storage.write_at(&[3; 100], 5000).expect("write");
    assert_eq!(
        mode_contents(&storage, CrashMode::KeepAll),
        storage.contents()
    );
}

/// Sixteen unsynced one-sector writes over zeros, each of its own byte.
fn sixteen_unsynced_writes() -> MemStorage {
    let storage = MemStorage::from_bytes(vec![0; 16 * 512]);
    storage.sync().expect("sync");
    for i in 0..16u8 {
        storage
            .write_at(&[i + 1; 512], u64::from(i) * 512)
            .expect("write");
    }
    storage
}

#[test]
fn subset_is_deterministic_per_seed_and_varies_across_seeds() {
    let storage = sixteen_unsynced_writes();
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let mode = CrashMode::Subset { seed };
        let first = mode_contents(&storage, mode);
        assert_eq!(first, mode_contents(&storage, mode), "seed {seed}");
        for (i, sector) in first.chunks(512).enumerate() {
            let kept = sector.iter().all(|&b| usize::from(b) == i + 1);
            let dropped = sector.iter().all(|&b| b == 0);
            assert!(kept || dropped, "seed {seed}: write {i} torn");
        }
        outcomes.insert(first);
    }
    assert!(outcomes.len() > 32, "only {} outcomes", outcomes.len());
}

#[test]
fn torn_subset_tears_writes_only_at_sector_boundaries() {
    let storage = MemStorage::from_bytes(vec![0; 8192]);
    storage.sync().expect("sync");
    // Unaligned: the first and last pieces are partial sectors.
    storage.write_at(&[0xab; 4096], 256).expect("write");
    let mut torn = 0;
    for seed in 0..64 {
        let mode = CrashMode::TornSubset { seed };
        let crashed = mode_contents(&storage, mode);
        assert_eq!(crashed, mode_contents(&storage, mode), "seed {seed}");
        for sector in crashed.chunks(512) {
            let first = sector[0];
            let uniform = sector.iter().all(|&b| b == first);
            // The partial sectors mix old zeros and new bytes at 256.
            let partial = sector[..256].iter().all(|&b| b == sector[0])
                && sector[256..].iter().all(|&b| b == sector[256]);
            assert!(uniform || partial, "seed {seed}: torn inside a sector");
        }
        let written = crashed.iter().filter(|&&b| b == 0xab).count();
        if written != 0 && written != 4096 {
            torn += 1;
        }
    }
    assert!(torn > 0, "no seed tore the write");
}

#[test]
fn crash_at_each_sync_point_holds_exactly_what_was_synced() {
    let storage = MemStorage::new();
    let mut synced = vec![Vec::new()];
    for round in 0..4u8 {
        storage
            .write_at(&[round; 300], u64::from(round) * 200)
            .expect("write");
        storage.sync().expect("sync");
        synced.push(storage.contents());
    }
    let points = storage.sync_points();
    assert_eq!(points, [2, 4, 6, 8]);
    for (i, point) in points.iter().enumerate() {
        let crashed = storage.crash_at(*point, CrashMode::DropAll);
        assert_eq!(crashed.contents(), synced[i + 1]);
        // Just before the sync, its write is still in the cache.
        let before = storage.crash_at(point - 1, CrashMode::DropAll);
        assert_eq!(before.contents(), synced[i]);
    }
}

#[test]
fn a_crashed_storage_starts_with_everything_durable() {
    let storage = MemStorage::new();
    storage.write_at(b"hello", 0).expect("write");
    let crashed = storage.crash(CrashMode::KeepAll);
    assert_eq!(crashed.op_count(), 0);
    assert_eq!(crashed.durable_contents(), b"hello");
}

#[test]
fn counters_count_successful_operations() {
    let storage = MemStorage::new();
    storage.write_at(b"a", 0).expect("write");
    storage.write_at(b"b", 1).expect("write");
    storage.set_len(10).expect("set_len");
    storage.sync().expect("sync");
    storage.fail_writes_after(0, libc::EIO);
    assert!(storage.write_at(b"c", 2).is_err());
    assert_eq!(storage.write_count(), 2);
    assert_eq!(storage.sync_count(), 1);
    assert_eq!(storage.op_count(), 4);
}

#[test]
fn write_faults_surface_as_the_errno_and_change_nothing() {
    let storage = MemStorage::new();
    storage.fail_writes_after(2, libc::ENOSPC);
    storage.write_at(b"one", 0).expect("first write");
    storage.write_at(b"two", 3).expect("second write");
    let before = storage.contents();
    assert_eq!(errno(storage.write_at(b"three", 6)), Some(libc::ENOSPC));
    assert_eq!(errno(storage.set_len(100)), Some(libc::ENOSPC));
    assert_eq!(errno(storage.punch_hole(0, 1)), Some(libc::ENOSPC));
    assert_eq!(storage.contents(), before);
    storage.clear_faults();
    storage.write_at(b"three", 6).expect("write after clearing");
}

#[test]
fn a_byte_budget_fails_the_write_that_would_exceed_it() {
    let storage = MemStorage::new();
    storage.fail_writes_after_bytes(1000, libc::ENOSPC);
    storage.write_at(&[1; 512], 0).expect("fits");
    assert_eq!(errno(storage.write_at(&[1; 512], 512)), Some(libc::ENOSPC));
    storage.write_at(&[1; 488], 512).expect("fits exactly");
    assert_eq!(errno(storage.write_at(&[1], 1000)), Some(libc::ENOSPC));
    storage.set_len(4096).expect("set_len allocates nothing");
}

#[test]
fn a_failed_sync_makes_nothing_durable() {
    let storage = MemStorage::new();
    storage.fail_syncs_after(1, libc::EIO);
    storage.write_at(b"kept", 0).expect("write");
    storage.sync().expect("first sync");
    storage.write_at(b"lost", 4).expect("write");
    assert_eq!(errno(storage.sync()), Some(libc::EIO));
    assert_eq!(storage.durable_contents(), b"kept");
    assert_eq!(storage.sync_count(), 1);
}

#[test]
fn read_faults_surface_as_the_errno() {
    let storage = MemStorage::from_bytes(vec![1; 8]);
    storage.fail_reads_after(1, libc::EIO);
    let mut buf = [0; 4];
    storage.read_at(&mut buf, 0).expect("first read");
    assert_eq!(errno(storage.read_at(&mut buf, 0)), Some(libc::EIO));
}

#[test]
fn threads_writing_disjoint_ranges_all_land() {
    let storage = MemStorage::new();
    std::thread::scope(|scope| {
        for i in 0..8u8 {
            let storage = &storage;
            scope.spawn(move || {
                for j in 0..64u64 {
                    let offset = (u64::from(i) * 64 + j) * 16;
                    storage.write_at(&[i; 16], offset).expect("write");
                }
            });
        }
    });
    let contents = storage.contents();
    for (n, chunk) in contents.chunks(16).enumerate() {
        assert!(chunk.iter().all(|&b| usize::from(b) == n / 64));
    }
}

/// An operation of the reference model below.
#[derive(Clone, Debug)]
enum ModelOp {
    Write(u64, usize, u8),
    SetLen(u64),
    Punch(u64, u64),
    Sync,
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        4 => (0u64..4096, 1usize..1200, any::<u8>()).prop_map(|(o, n, b)| ModelOp::Write(o, n, b)),
        1 => (0u64..6000).prop_map(ModelOp::SetLen),
        1 => (0u64..4096, 0u64..2048).prop_map(|(o, n)| ModelOp::Punch(o, n)),
        2 => Just(ModelOp::Sync),
    ]
}

fn run(storage: &MemStorage, op: &ModelOp) {
    match *op {
        ModelOp::Write(offset, len, byte) => storage.write_at(&vec![byte; len], offset),
        ModelOp::SetLen(len) => storage.set_len(len),
        ModelOp::Punch(offset, len) => storage.punch_hole(offset, len),
        ModelOp::Sync => storage.sync(),
    }
    .expect("operation");
}

proptest! {
    /// After any prefix of a run, a crash loses exactly the unsynced tail in
    /// `DropAll` and nothing in `KeepAll`.
    #[test]
    fn crash_at_matches_the_snapshots_of_a_run(ops in prop::collection::vec(model_op(), 0..40)) {
        let storage = MemStorage::from_bytes(vec![0x5a; 1000]);
        let mut visible = vec![storage.contents()];
        let mut durable = vec![storage.contents()];
        for op in &ops {
            run(&storage, op);
            visible.push(storage.contents());
            let last = if matches!(op, ModelOp::Sync) {
                storage.contents()
            } else {
                durable[durable.len() - 1].clone()
            };
            durable.push(last);
        }
        for k in 0..=ops.len() {
            prop_assert_eq!(&storage.crash_at(k, CrashMode::DropAll).contents(), &durable[k]);
            prop_assert_eq!(&storage.crash_at(k, CrashMode::KeepAll).contents(), &visible[k]);
        }
    }
}
