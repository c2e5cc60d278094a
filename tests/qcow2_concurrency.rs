//! Writers that run at once on one qcow2 image: allocating writes do their
//! data I/O outside the metadata lock, serialised only per guest cluster.
//! A guest write must still always win over a job's copy of the same
//! range, and concurrent allocating writes must end in exactly the bytes a
//! model predicts, with every cluster referenced once (`qemu-img check`
//! clean: no leak, no double allocation).

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;

use chainfs::format::{BackingReader, HostRange, Qcow2};
use chainfs::storage::{FileStorage, MemStorage, Storage};

mod common;
use common::engine::HeldWrites;
use common::{create_qcow2, path_str, pattern, pattern_byte, qemu_img_check, require_qemu};

/// What the backing chain shows: a pattern, so that a copy-on-write that
/// lost a race would show the wrong bytes.
struct PatternBacking;

const BACKING_SEED: u64 = 7;

impl BackingReader for PatternBacking {
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> chainfs::format::Result<()> {
        buf.copy_from_slice(&pattern(BACKING_SEED, offset, buf.len()));
        Ok(())
    }

    fn has_backing(&self) -> bool {
        true
    }
}

/// A fresh image of `size` bytes with `options`, opened for writing on a
/// file, as the daemon opens it.
fn open_fresh(dir: &Path, options: &str, size: u64) -> (std::path::PathBuf, Qcow2) {
    let path = dir.join("top.qcow2");
    create_qcow2(path_str(&path), &size.to_string(), options);
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, true).unwrap());
    (path, common::engine::open_qcow2(storage, true, 1 << 20))
}

/// [`open_fresh`] on a storage that can hold back one write.
fn open_held(dir: &Path, options: &str, size: u64) -> (std::path::PathBuf, Arc<HeldWrites>, Qcow2) {
    let path = dir.join("top.qcow2");
    create_qcow2(path_str(&path), &size.to_string(), options);
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, true).unwrap());
    let held = Arc::new(HeldWrites::new(file));
    let storage = Arc::clone(&held) as Arc<dyn Storage>;
    (
        path,
        held,
        common::engine::open_qcow2(storage, true, 1 << 20),
    )
}

/// Closes the last handle on `image` and has QEMU check the file.
fn close_and_check(image: Arc<Qcow2>, path: &Path) {
    image.close().unwrap();
    drop(image);
    qemu_img_check(path);
}

fn read_guest(image: &Qcow2, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for hole in image.read(offset, &mut buf).unwrap() {
        let (start, end) = ((hole.start - offset) as usize, (hole.end - offset) as usize);
        PatternBacking
            .read_backing(hole.start, &mut buf[start..end])
            .unwrap();
    }
    buf
}

/// How the job copies a cluster in one round of the race.
#[derive(Clone, Copy)]
enum JobCopy {
    /// `populate` with the bytes the backing chain shows.
    Populate,
    /// `populate_from` a host file holding those bytes (`copy_into`).
    PlaceFrom,
}

/// Races a guest write (a part of a cluster, the whole cluster, or zeros)
/// against a job's copy of the cluster's backing bytes, once per cluster
/// of the image, and checks that the guest's bytes are what it reads
/// afterwards, whichever ran first.
fn race_guest_against_job(options: &str, cluster: u64, rounds: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = cluster * rounds;
    let (path, image) = open_fresh(dir.path(), options, size);
    let image = Arc::new(image);
    // The backing bytes as a host file, for the copy that the host does.
    let source: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(pattern(
        BACKING_SEED,
        0,
        size as usize,
    )));
    let barrier = Arc::new(Barrier::new(2));
    let job = {
        let (image, barrier, source) = (Arc::clone(&image), Arc::clone(&barrier), source);
        thread::spawn(move || {
            for round in 0..rounds {
                let at = round * cluster;
                let copy = if round % 2 == 0 {
                    JobCopy::Populate
                } else {
                    JobCopy::PlaceFrom
                };
                barrier.wait();
                match copy {
                    JobCopy::Populate => {
                        let data = pattern(BACKING_SEED, at, cluster as usize);
                        image
                            .populate(at, cluster, Some(&data), &PatternBacking)
                            .unwrap();
                    }
                    JobCopy::PlaceFrom => {
                        let range = HostRange {
                            storage: Arc::clone(&source),
                            offset: at,
                            len: cluster,
                        };
                        image.populate_from(at, &range).unwrap();
                    }
                }
            }
        })
    };
    let mut expected = Vec::with_capacity(rounds as usize);
    for round in 0..rounds {
        let at = round * cluster;
        // A quarter cluster in the middle, the whole cluster, or zeros
        // over a half: every way a guest write changes an entry.
        let (start, len) = match round % 3 {
            0 => (cluster / 4, cluster / 4),
            1 => (0, cluster),
            _ => (cluster / 2, cluster / 2),
        };
        let guest = pattern(round + 100, at + start, len as usize);
        let mut view = pattern(BACKING_SEED, at, cluster as usize);
        barrier.wait();
        if round % 3 == 2 {
            image.zero_range(at + start, len, &PatternBacking).unwrap();
            view[start as usize..(start + len) as usize].fill(0);
        } else {
            image.write(at + start, &guest, &PatternBacking).unwrap();
            view[start as usize..(start + len) as usize].copy_from_slice(&guest);
        }
        expected.push(view);
    }
    job.join().unwrap();
    for (round, view) in expected.iter().enumerate() {
        let at = round as u64 * cluster;
        let got = read_guest(&image, at, cluster as usize);
        common::assert_same_bytes(&got, view, &format!("{options}: cluster {round}"));
    }
    close_and_check(image, &path);
}

#[test]
fn a_guest_write_always_wins_over_a_job_copying_the_same_cluster() {
    if !require_qemu() {
        return;
    }
    race_guest_against_job("cluster_size=4096", 4096, 3000);
}

#[test]
fn a_guest_write_always_wins_with_subclusters_too() {
    if !require_qemu() {
        return;
    }
    race_guest_against_job("cluster_size=16384,extended_l2=on", 16384, 1500);
}

/// One writer's share of the work: its own clusters, and a slice of each
/// shared cluster that the other writers fill at the same time.
fn writer(image: &Qcow2, id: u64, writers: u64, cluster: u64, own: u64, shared: u64) {
    let slice = cluster / writers;
    for i in 0..own.max(shared) {
        if i < own {
            // Its own cluster: an allocating write of three quarters, and
            // every fourth cluster zeroed over its last half afterwards.
            let at = (shared + id * own + i) * cluster;
            image
                .write(
                    at,
                    &pattern(id, at, (cluster * 3 / 4) as usize),
                    &PatternBacking,
                )
                .unwrap();
            if i % 4 == 3 {
                image
                    .zero_range(at + cluster / 2, cluster / 2, &PatternBacking)
                    .unwrap();
            }
        }
        if i < shared {
            // Its slice of a cluster every writer allocates at once: each
            // copy-on-write must keep the others' slices.
            let at = i * cluster + id * slice;
            image
                .write(at, &pattern(id, at, slice as usize), &PatternBacking)
                .unwrap();
        }
    }
}

/// What [`writer`]s leave, byte by byte.
fn model(writers: u64, cluster: u64, own: u64, shared: u64) -> Vec<u8> {
    let size = (shared + writers * own) * cluster;
    let mut bytes = pattern(BACKING_SEED, 0, size as usize);
    let slice = cluster / writers;
    for id in 0..writers {
        for i in 0..shared {
            let at = i * cluster + id * slice;
            for o in at..at + slice {
                bytes[o as usize] = pattern_byte(id, o);
            }
        }
        for i in 0..own {
            let at = (shared + id * own + i) * cluster;
            for o in at..at + cluster * 3 / 4 {
                bytes[o as usize] = pattern_byte(id, o);
            }
            if i % 4 == 3 {
                let half = (at + cluster / 2) as usize..(at + cluster) as usize;
                bytes[half].fill(0);
            }
        }
    }
    bytes
}

fn concurrent_writers(options: &str, cluster: u64) {
    let (writers, own, shared) = (6, 400, 400);
    let dir = tempfile::tempdir().unwrap();
    let size = (shared + writers * own) * cluster;
    let (path, image) = open_fresh(dir.path(), options, size);
    let image = Arc::new(image);
    let threads: Vec<_> = (0..writers)
        .map(|id| {
            let image = Arc::clone(&image);
            thread::spawn(move || writer(&image, id, writers, cluster, own, shared))
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let expected = model(writers, cluster, own, shared);
    let got = read_guest(&image, 0, size as usize);
    common::assert_same_bytes(&got, &expected, &format!("{options}: while open"));
    close_and_check(image, &path);
    // And as the file holds it, reopened.
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&path, false).unwrap());
    let reopened = common::engine::open_qcow2(storage, false, 1 << 20);
    let got = read_guest(&reopened, 0, size as usize);
    common::assert_same_bytes(&got, &expected, &format!("{options}: reopened"));
}

#[test]
fn concurrent_allocating_writes_to_distinct_and_shared_clusters_match_a_model() {
    if !require_qemu() {
        return;
    }
    // 400 * 6 + 400 clusters of 4 KiB: several L2 tables, each new one
    // made while other writers wait to publish into it.
    concurrent_writers("cluster_size=4096", 4096);
}

#[test]
fn concurrent_allocating_writes_with_subclusters_match_a_model() {
    if !require_qemu() {
        return;
    }
    concurrent_writers("cluster_size=16384,extended_l2=on", 16384);
}

#[test]
fn reads_and_other_writers_go_on_while_an_allocating_write_is_in_its_data_io() {
    if !require_qemu() {
        return;
    }
    let cluster = 65536u64;
    let dir = tempfile::tempdir().unwrap();
    let (path, held, image) = open_held(dir.path(), "cluster_size=65536", 16 << 20);
    let image = Arc::new(image);
    // Cluster 1 is allocated first, to be read and overwritten in place.
    let first = pattern(1, cluster, cluster as usize);
    image.write(cluster, &first, &PatternBacking).unwrap();
    // The next whole-cluster write is the data of the write to cluster 0.
    held.hold_next_write_of(cluster as usize);
    let stuck = {
        let image = Arc::clone(&image);
        thread::spawn(move || {
            let data = pattern(2, 0, cluster as usize);
            image.write(0, &data, &PatternBacking).unwrap();
        })
    };
    held.wait_until_held();
    let (done, finished) = std::sync::mpsc::channel();
    let others = {
        let (image, first) = (Arc::clone(&image), first.clone());
        thread::spawn(move || {
            assert_eq!(read_guest(&image, cluster, cluster as usize), first);
            // An allocating write with copy-on-write, an overwrite in place,
            // a write-zeroes that changes an entry, and a flush.
            let partial = pattern(3, 2 * cluster + 512, 4096);
            image
                .write(2 * cluster + 512, &partial, &PatternBacking)
                .unwrap();
            image
                .write(cluster + 100, &[9; 100], &PatternBacking)
                .unwrap();
            image
                .zero_range(3 * cluster, cluster, &PatternBacking)
                .unwrap();
            image.flush().unwrap();
            done.send(()).unwrap();
        })
    };
    // Not a timing assertion: before the data I/O left the metadata lock,
    // these waited for the held write forever.
    let went_on = finished.recv_timeout(std::time::Duration::from_secs(300));
    held.release();
    assert!(
        went_on.is_ok(),
        "reads or other writes waited for a write's data I/O"
    );
    stuck.join().unwrap();
    others.join().unwrap();
    let mut expected = pattern(BACKING_SEED, 0, 4 * cluster as usize);
    expected[..cluster as usize].copy_from_slice(&pattern(2, 0, cluster as usize));
    expected[cluster as usize..2 * cluster as usize].copy_from_slice(&first);
    expected[cluster as usize + 100..cluster as usize + 200].fill(9);
    let at = 2 * cluster as usize + 512;
    expected[at..at + 4096].copy_from_slice(&pattern(3, at as u64, 4096));
    expected[3 * cluster as usize..].fill(0);
    common::assert_same_bytes(
        &read_guest(&image, 0, 4 * cluster as usize),
        &expected,
        "after the held write",
    );
    close_and_check(image, &path);
}

#[test]
fn a_write_that_fills_subclusters_keeps_an_in_place_write_beside_it() {
    if !require_qemu() {
        return;
    }
    // 2 KiB subclusters. Subcluster 0 is allocated; a write over its second
    // half and the first half of subcluster 1 (not allocated) takes the
    // slow path, while an in-place write changes the first bytes of
    // subcluster 0 and must survive it.
    let dir = tempfile::tempdir().unwrap();
    let options = "cluster_size=65536,extended_l2=on";
    let (path, held, image) = open_held(dir.path(), options, 4 << 20);
    let image = Arc::new(image);
    image.write(0, &[1; 2048], &PatternBacking).unwrap();
    // The slow write's first data write (the in-place write is smaller).
    held.hold_next_write_of(1024);
    let slow = {
        let image = Arc::clone(&image);
        thread::spawn(move || image.write(1024, &[2; 2048], &PatternBacking).unwrap())
    };
    held.wait_until_held();
    image.write(0, &[3; 512], &PatternBacking).unwrap();
    held.release();
    slow.join().unwrap();
    let mut expected = pattern(BACKING_SEED, 0, 4096);
    expected[..1024].fill(1);
    expected[..512].fill(3);
    expected[1024..3072].fill(2);
    common::assert_same_bytes(&read_guest(&image, 0, 4096), &expected, "subclusters 0-1");
    close_and_check(image, &path);
}
