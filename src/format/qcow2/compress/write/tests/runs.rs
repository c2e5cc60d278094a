//! Compressed writes of several clusters at once: one sync for the run,
//! across L2 tables, mixed with clusters that do not compress, and failing
//! part way without losing what was synced.

use super::*;
use crate::storage::CrashMode;

/// Clusters that compress, each different: `count` from `seed`.
fn compressible(seed: u64, count: usize, cluster_size: usize) -> Vec<u8> {
    (0..count as u64)
        .flat_map(|i| cluster_with_noise(seed + i, cluster_size / 5, cluster_size))
        .collect()
}

/// Where the cluster of `data` at `guest` (the run starting at `start`)
/// lies in it.
fn cluster_of(data: &[u8], start: u64, guest: u64, cluster_size: u64) -> &[u8] {
    let at = (guest - start) as usize;
    &data[at..at + cluster_size as usize]
}

/// Reads `data` back at `start`, closes the image, which `qemu-img check`
/// must find clean, and reads it back again from the image reopened.
fn assert_reads_back_after_close(storage: Arc<MemStorage>, image: Qcow2, start: u64, data: &[u8]) {
    assert_eq!(read(&image, start, data.len()), data);
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_check_clean(&storage);
    }
    let reopened = open(storage, false);
    assert_eq!(read(&reopened, start, data.len()), data, "reopened");
}

#[test]
fn a_run_of_clusters_syncs_once_and_reads_back() {
    for zstd in [false, true] {
        let (storage, image) = new_image(&Layout {
            zstd,
            ..Layout::default()
        });
        // The L2 table and the allocator's reserve exist already, so the
        // run's sync is the only one.
        image
            .write_compressed(0, &compressible(1, 1, CS as usize))
            .unwrap();
        let data = compressible(10, 8, CS as usize);
        let syncs = storage.sync_count();
        image.write_compressed(4 * CS, &data).unwrap();
        assert_eq!(storage.sync_count() - syncs, 1, "zstd {zstd}");
        // The first stream shares a host cluster with the run's.
        let guests: Vec<u64> = [0].into_iter().chain(4..12).map(|i| i * CS).collect();
        assert_refcounts_count_compressed(&image, &guests);
        assert_reads_back_after_close(storage, image, 4 * CS, &data);
    }
}

#[test]
fn a_run_across_l2_tables_syncs_once_and_replaces_what_both_held() {
    // 512-byte clusters: 64 entries, 32 KiB of guest, per L2 table.
    let cs = 512;
    let (storage, image) = new_image(&Layout {
        size: 256 * cs,
        cluster_bits: 9,
        ..Layout::default()
    });
    let span = image.geometry.l2_span();
    assert_eq!(span, 64 * cs);
    // Both tables exist; what the run replaces is plain and compressed.
    image.write(span - 4 * cs, &[7; 512], &NoBacking).unwrap();
    image
        .write_compressed(span + 2 * cs, &compressible(1, 1, cs as usize))
        .unwrap();
    let start = span - 10 * cs;
    let data = compressible(20, 20, cs as usize);
    let syncs = storage.sync_count();
    image.write_compressed(start, &data).unwrap();
    assert_eq!(storage.sync_count() - syncs, 1);
    // The replaced stream's reference goes with the next sync.
    image.flush().unwrap();
    let guests: Vec<u64> = (0..20).map(|i| start + i * cs).collect();
    assert_refcounts_count_compressed(&image, &guests);
    assert_reads_back_after_close(storage, image, start, &data);
}

#[test]
fn clusters_that_do_not_compress_are_written_plain_within_the_run() {
    let size = 16 * CS + 4096;
    let (storage, image) = new_image(&Layout {
        size,
        ..Layout::default()
    });
    image
        .write_compressed(0, &compressible(1, 1, CS as usize))
        .unwrap();
    // c: compresses, n: noise that does not; the image's partial last
    // cluster ends the run.
    let kinds = "ccnncnccnc";
    let start = size - (kinds.len() as u64 - 1) * CS - 4096;
    let mut data = Vec::new();
    for (i, kind) in kinds.bytes().enumerate() {
        let noisy = if kind == b'c' { 5000 } else { CS as usize };
        data.extend(cluster_with_noise(30 + i as u64, noisy, CS as usize));
    }
    data.truncate((size - start) as usize);
    let syncs = storage.sync_count();
    image.write_compressed(start, &data).unwrap();
    assert_eq!(storage.sync_count() - syncs, 1);
    for (i, kind) in kinds.bytes().enumerate() {
        let guest = start + i as u64 * CS;
        let entry = image.l2_entry(guest).unwrap();
        match kind {
            b'c' => assert!(matches!(entry, L2Entry::Compressed(_)), "{i}: {entry:?}"),
            _ => assert!(matches!(entry, L2Entry::Data { .. }), "{i}: {entry:?}"),
        }
    }
    assert_reads_back_after_close(storage, image, start, &data);
}

/// Each cluster of the run reads as what it held before or as what the
/// failed write brought; a compressed one only as the latter. Returns
/// which clusters read as new.
fn old_or_new(image: &Qcow2, start: u64, old: &[u8], new: &[u8], what: &str) -> Vec<bool> {
    let cs = image.geometry.cluster_size();
    let now = read(image, start, new.len());
    (start..start + new.len() as u64)
        .step_by(cs as usize)
        .map(|guest| {
            let found = cluster_of(&now, start, guest, cs);
            let is_new = found == cluster_of(new, start, guest, cs);
            let compressed = compressed_word(image, guest).is_some();
            assert!(
                is_new || (found == cluster_of(old, start, guest, cs) && !compressed),
                "{what}: cluster {guest:#x} is neither old nor new"
            );
            is_new
        })
        .collect()
}

#[test]
fn a_run_failing_part_way_keeps_what_was_synced_and_leaves_a_consistent_image() {
    let cs = 512;
    let layout = Layout {
        size: 256 * cs,
        cluster_bits: 9,
        ..Layout::default()
    };
    // Across an L2 table, with a cluster that does not compress inside.
    let start = 64 * cs - 6 * cs;
    let old = vec![0x33; 12 * cs as usize];
    let mut new = compressible(40, 12, cs as usize);
    new[7 * cs as usize..8 * cs as usize].copy_from_slice(&cluster_with_noise(
        99,
        cs as usize,
        cs as usize,
    ));
    let mut published_in_part = false;
    let mut failures = 0;
    let mut succeeded = false;
    // Far more than the run's writes: each injection point in turn, until
    // the write gets through.
    for fails_after in 0..200 {
        let (storage, image) = new_image(&layout);
        image.write(start, &old, &NoBacking).unwrap();
        image.flush().unwrap();
        if fails_after == 0 {
            storage.fail_syncs_after(0, libc::EIO);
        } else {
            storage.fail_writes_after(fails_after - 1, libc::ENOSPC);
        }
        let result = image.write_compressed(start, &new);
        storage.clear_faults();
        let what = format!("failing after {fails_after}");
        if result.is_ok() {
            assert_eq!(read(&image, start, new.len()), new, "{what}");
            succeeded = true;
            break;
        }
        failures += 1;
        let fresh = old_or_new(&image, start, &old, &new, &what);
        published_in_part |= fresh.iter().any(|&n| n) && fresh.iter().any(|&n| !n);
        // A power cut now: the old data was flushed, whatever of the new
        // was published was synced first.
        let crashed = Arc::new(storage.crash(CrashMode::DropAll));
        let rebooted = open(Arc::clone(&crashed), false);
        old_or_new(&rebooted, start, &old, &new, &format!("{what}, crashed"));
        image.close().unwrap();
        let after = old_or_new(&open(Arc::clone(&storage), false), start, &old, &new, &what);
        assert_eq!(after, fresh, "{what}: closed");
        if require_tool("qemu-img") {
            // The undo of a claim may fail with the writes (a full disk):
            // a leak, nothing worse.
            assert_qemu_check(&storage, true);
            assert_qemu_check(&crashed, true);
        }
    }
    assert!(succeeded, "the write never got through");
    assert!(failures > 3, "only {failures} failures");
    assert!(
        published_in_part,
        "no failure came between the two L2 tables' entries"
    );
}
