//! Power loss at any instant: a qcow2 image written through the engine on a
//! storage double that drops (a random subset of) every write not yet
//! synced. After each simulated crash `qemu-img check` finds no errors
//! (leaks allowed) and everything that a flush acknowledged reads back.

use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use chainfs::format::Qcow2;
use chainfs::format::{BackingRef, Format, NoBacking};
use chainfs::storage::{CrashMode, MemStorage};
use rand::{Rng, SeedableRng};

mod common;
use common::require_tool;

const SIZE: usize = 8 << 20;

fn open(storage: Arc<MemStorage>, writable: bool) -> Qcow2 {
    common::engine::open_qcow2(storage, writable, 256 << 10)
}

/// What the workload did, in the storage's operation count.
struct Journal {
    /// (operations logged when the flush returned, content then).
    flushes: Vec<(usize, Vec<u8>)>,
    /// (operations logged when the write started, its range).
    writes: Vec<(usize, Range<usize>)>,
}

impl Journal {
    /// A journal that starts from the all-zero image a workload opens.
    fn new(storage: &MemStorage) -> Journal {
        Journal {
            flushes: vec![(storage.op_count(), vec![0u8; SIZE])],
            writes: Vec::new(),
        }
    }

    /// Everything up to now is durable, and the image holds `model`.
    fn flushed(&mut self, storage: &MemStorage, model: &[u8]) {
        self.flushes.push((storage.op_count(), model.to_vec()));
    }

    /// A write of `range` starts now.
    fn writing(&mut self, storage: &MemStorage, range: Range<usize>) {
        self.writes.push((storage.op_count(), range));
    }
}

/// A workload in progress: the image it writes, the model of what the
/// image holds, and the journal of what it did. Each change is journaled
/// as it starts and applied to the model once the image returned.
struct Workload<'s> {
    storage: &'s Arc<MemStorage>,
    image: Qcow2,
    model: Vec<u8>,
    journal: Journal,
}

impl<'s> Workload<'s> {
    /// A workload on the all-zero image in `storage`, opened for writing.
    fn new(storage: &'s Arc<MemStorage>) -> Workload<'s> {
        Workload {
            storage,
            image: open(Arc::clone(storage), true),
            model: vec![0u8; SIZE],
            journal: Journal::new(storage),
        }
    }

    fn write(&mut self, at: usize, data: &[u8]) {
        self.journal.writing(self.storage, at..at + data.len());
        self.image.write(at as u64, data, &NoBacking).unwrap();
        self.model[at..at + data.len()].copy_from_slice(data);
    }

    fn write_compressed(&mut self, at: usize, data: &[u8]) {
        self.journal.writing(self.storage, at..at + data.len());
        self.image.write_compressed(at as u64, data).unwrap();
        self.model[at..at + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, at: usize, len: usize) {
        self.journal.writing(self.storage, at..at + len);
        self.image
            .zero_range(at as u64, len as u64, &NoBacking)
            .unwrap();
        self.model[at..at + len].fill(0);
    }

    /// Everything written so far is durable now (a flush, or another path
    /// that syncs).
    fn durable(&mut self) {
        self.journal.flushed(self.storage, &self.model);
    }

    fn flush(&mut self) {
        self.image.flush().unwrap();
        self.durable();
    }

    /// Closes the image, which makes everything durable.
    fn close(mut self) -> Journal {
        self.image.close().unwrap();
        self.durable();
        self.journal
    }
}

fn run_workload(storage: &Arc<MemStorage>, seed: u64) -> Journal {
    let mut work = Workload::new(storage);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for step in 0..120 {
        let len = rng.random_range(1..150_000usize);
        let at = rng.random_range(0..SIZE - len);
        if step % 6 == 5 {
            work.zero(at, len);
        } else {
            work.write(at, &vec![rng.random::<u8>() | 1; len]);
        }
        if step % 10 == 9 {
            work.flush();
        }
    }
    work.close()
}

/// Runs `qemu-img check` on `bytes`; panics on any error (leaks allowed
/// unless `allow_leaks` is false).
fn check(bytes: &[u8], dir: &Path, allow_leaks: bool, what: &str) {
    let path = dir.join("crashed.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", path.to_str().unwrap()])
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let report = String::from_utf8_lossy(&out.stdout);
    let ok = code == 0 || (allow_leaks && code == 3);
    assert!(
        ok && !report.contains("corruptions"),
        "{what}: qemu-img check exit {code}: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_all(storage: MemStorage) -> Vec<u8> {
    let image = open(Arc::new(storage), false);
    let mut out = vec![0u8; SIZE];
    for r in image.read(0, &mut out).unwrap() {
        out[r.start as usize..r.end as usize].fill(0);
    }
    out
}

fn crash_and_verify(storage: &MemStorage, journal: &Journal, point: usize, mode: CrashMode) {
    let dir = tempfile::tempdir().unwrap();
    let crashed = storage.crash_at(point, mode);
    let what = format!("crash at op {point} ({mode:?})");
    check(&crashed.contents(), dir.path(), true, &what);
    let (_, durable) = journal
        .flushes
        .iter()
        .rev()
        .find(|(ops, _)| *ops <= point)
        .unwrap();
    let flushed_at = journal
        .flushes
        .iter()
        .rev()
        .find(|(ops, _)| *ops <= point)
        .unwrap()
        .0;
    let content = read_all(crashed);
    let mut maybe_changed = vec![false; SIZE];
    for (started, range) in &journal.writes {
        if *started >= flushed_at && *started < point {
            maybe_changed[range.clone()].fill(true);
        }
    }
    let lost = (0..SIZE).find(|&i| !maybe_changed[i] && content[i] != durable[i]);
    assert!(
        lost.is_none(),
        "{what}: flushed byte {lost:?} did not survive"
    );
}

/// A new image of `SIZE` bytes made by `qemu-img create -o opts` in `dir`,
/// loaded into a storage double.
fn qemu_image(dir: &Path, opts: &str) -> Arc<MemStorage> {
    let path = dir.join("made.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", opts])
        .arg(&path)
        .arg(SIZE.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    Arc::new(MemStorage::from_bytes(std::fs::read(&path).unwrap()))
}

/// Crashes at each of `points` in turn, cycling through the crash modes
/// (seeded from `rng`), and verifies each crash image. Returns how many.
fn crash_at_each(
    storage: &MemStorage,
    journal: &Journal,
    points: Vec<usize>,
    rng: &mut rand::rngs::StdRng,
) -> usize {
    let count = points.len();
    for (i, point) in points.into_iter().enumerate() {
        let seed = rng.random::<u64>();
        let mode = match i % 4 {
            0 => CrashMode::DropAll,
            1 => CrashMode::KeepAll,
            2 => CrashMode::Subset { seed },
            _ => CrashMode::TornSubset { seed },
        };
        crash_and_verify(storage, journal, point, mode);
    }
    count
}

#[test]
fn every_crash_point_leaves_a_consistent_image_and_keeps_flushed_writes() {
    if !require_tool("qemu-img") {
        return;
    }
    let mut crashes = 0;
    for (layout, opts) in [
        "cluster_size=65536",
        "cluster_size=512,refcount_bits=64",
        "extended_l2=on,cluster_size=16k",
        "cluster_size=4096,refcount_bits=1",
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let storage = qemu_image(dir.path(), opts);
        let journal = run_workload(&storage, layout as u64);
        check(
            &storage.contents(),
            dir.path(),
            false,
            &format!("{opts}: clean close"),
        );
        let total = storage.op_count();
        let mut rng = rand::rngs::StdRng::seed_from_u64(99 + layout as u64);
        let mut points: Vec<usize> = storage.sync_points();
        points.extend((0..60).map(|_| rng.random_range(0..=total)));
        crashes += crash_at_each(&storage, &journal, points, &mut rng);
    }
    assert!(crashes >= 200, "only {crashes} crashes simulated");
}

#[test]
fn a_full_disk_fails_writes_with_enospc_and_loses_nothing_acknowledged() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let storage = qemu_image(dir.path(), "cluster_size=65536");
    let image = open(Arc::clone(&storage), true);
    let mut model = vec![0u8; SIZE];
    let mut failures = 0;
    for round in 0..2 {
        storage.fail_writes_after_bytes(1 << 20, libc::ENOSPC);
        for i in 0..64usize {
            let at = (i * 123_457 + round * 4096) % (SIZE - 70_000);
            let data = vec![(i + round) as u8 | 1; 70_000];
            match image.write(at as u64, &data, &NoBacking) {
                Ok(()) => model[at..at + 70_000].copy_from_slice(&data),
                Err(err) => {
                    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
                    failures += 1;
                    // A failed write may have landed in part: what it
                    // covered is unknown, so take it from the image.
                    let mut now = vec![0u8; 70_000];
                    for r in image.read(at as u64, &mut now).unwrap() {
                        let s = (r.start - at as u64) as usize;
                        now[s..s + (r.end - r.start) as usize].fill(0);
                    }
                    model[at..at + 70_000].copy_from_slice(&now);
                }
            }
        }
        storage.clear_faults();
        image.flush().unwrap();
    }
    assert!(failures > 0, "the disk never filled");
    image.write(0, &[0x42; 65536], &NoBacking).unwrap();
    model[..65536].fill(0x42);
    image.close().unwrap();
    check(&storage.contents(), dir.path(), false, "after a full disk");
    assert!(read_all(MemStorage::from_bytes(storage.contents())) == model);
}

/// `refcount_table_offset` in the header of `bytes`.
fn reftable_offset(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[48..56].try_into().unwrap())
}

/// Fills the whole disk with 512-byte clusters, which moves the refcount
/// table (it first covers 8 MiB of host file), then rewrites the header by
/// every path that does: rebacking, bitmaps stored when writes are turned
/// off, marked in use when they are turned on again, stored at close. In
/// between, writes reuse the clusters the old table held. Returns the
/// journal and the operation windows of the table move and of each header
/// rewrite.
fn run_growth_workload(storage: &Arc<MemStorage>, base: &Path) -> (Journal, Vec<Range<usize>>) {
    let mut work = Workload::new(storage);
    let mut windows = Vec::new();
    for (i, at) in (0..SIZE).step_by(256 << 10).enumerate() {
        let (ops, table) = (storage.op_count(), reftable_offset(&storage.contents()));
        work.write(at, &vec![i as u8 | 1; 256 << 10]);
        if reftable_offset(&storage.contents()) != table {
            windows.push(ops..storage.op_count());
        }
        if i % 8 == 7 {
            work.flush();
        }
    }
    assert!(
        !windows.is_empty(),
        "the refcount table did not move: the test checks nothing"
    );
    // Absolute: the crash images are checked in other directories.
    let base = BackingRef {
        file: base.to_str().unwrap().into(),
        format: Some(Format::Raw),
    };
    let ops = storage.op_count();
    work.image.set_backing(Some(&base)).unwrap();
    work.image.set_backing(None).unwrap();
    windows.push(ops..storage.op_count());
    work.zero(2 << 20, 1 << 20);
    work.write(2 << 20, &vec![0x5b; 1 << 20]);
    let ops = storage.op_count();
    work.image.set_writable(false).unwrap();
    work.durable();
    work.image.set_writable(true).unwrap();
    windows.push(ops..storage.op_count());
    work.write(5 << 20, &vec![0x6d; 300_000]);
    let ops = storage.op_count();
    let journal = work.close();
    windows.push(ops..storage.op_count());
    (journal, windows)
}

#[test]
fn crashes_around_a_refcount_table_move_and_header_rewrites_stay_consistent() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
        .arg(&path)
        .arg(SIZE.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&path)
        .arg("b0")
        .status()
        .unwrap();
    assert!(status.success());
    let storage = Arc::new(MemStorage::from_bytes(std::fs::read(&path).unwrap()));
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; SIZE]).unwrap();
    let (journal, windows) = run_growth_workload(&storage, &base);
    check(&storage.contents(), dir.path(), false, "clean close");
    let last = &journal.flushes[journal.flushes.len() - 1].1;
    assert!(read_all(MemStorage::from_bytes(storage.contents())) == *last);
    // Every sync point inside (or just after) a window, where the ordering
    // of table, header and frees matters; a sample of the rest.
    let syncs = storage.sync_points();
    let mut points: Vec<usize> = syncs
        .iter()
        .copied()
        .filter(|&p| windows.iter().any(|w| w.start <= p && p <= w.end + 1))
        .collect();
    points.extend(syncs.iter().step_by(syncs.len().div_ceil(30)).copied());
    let total = storage.op_count();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for window in &windows {
        points.extend((0..4).map(|_| rng.random_range(window.start..=window.end)));
    }
    points.extend((0..20).map(|_| rng.random_range(0..=total)));
    // Before the journal starts, the open itself was running.
    points.retain(|&p| p >= journal.flushes[0].0);
    points.sort_unstable();
    points.dedup();
    crash_at_each(&storage, &journal, points, &mut rng);
}

/// How the compressed workload writes plain data over its clusters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PlainWrites {
    /// Whole clusters: nothing of the old cluster is kept.
    Whole,
    /// Part of a cluster: the rest is copied from the old one.
    Partial,
}

/// Clusters written compressed (packed several to a host cluster, some
/// running on into the next), up to `max_run` of them in one write, with
/// whole-cluster writes and write-zeroes over them, and flushes: a
/// compressed L2 entry must never reach the disk before its stream and its
/// refcounts.
fn run_compressed_workload(
    storage: &Arc<MemStorage>,
    seed: u64,
    cluster: usize,
    plain: PlainWrites,
    max_run: usize,
) -> Journal {
    let mut work = Workload::new(storage);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let clusters = SIZE / cluster;
    for step in 0..150 {
        let at = rng.random_range(0..clusters) * cluster;
        if step % 7 == 6 && plain == PlainWrites::Partial {
            // Inside one cluster: the rest of it is copied from what the
            // cluster held (compressed data, flushed), to a new place.
            let from = at + rng.random_range(0..cluster);
            let len = rng.random_range(1..=at + cluster - from);
            work.write(from, &vec![rng.random::<u8>() | 1; len]);
        } else if step % 7 == 6 {
            let len = (rng.random_range(1..4) * cluster).min(SIZE - at);
            work.write(at, &vec![rng.random::<u8>() | 1; len]);
        } else if step % 11 == 10 {
            work.zero(at, cluster);
        } else {
            let count = if max_run > 1 {
                rng.random_range(1..=max_run).min((SIZE - at) / cluster)
            } else {
                1
            };
            let mut data = Vec::with_capacity(count * cluster);
            for _ in 0..count {
                // Noise then a fill: streams of every length up to a
                // cluster. In a run, some clusters are all noise, which
                // does not compress: they are written plain.
                let noisy = if max_run > 1 && rng.random_bool(0.2) {
                    cluster
                } else {
                    rng.random_range(0..cluster)
                };
                let start = data.len();
                data.extend((0..noisy).map(|_| rng.random::<u8>()));
                data.resize(start + cluster, step as u8);
            }
            work.write_compressed(at, &data);
        }
        if step % 10 == 9 {
            work.flush();
        }
    }
    work.close()
}

/// Layouts of the compressed workloads: (`qemu-img create` options, the
/// cluster size they give).
const COMPRESSED_LAYOUTS: [(&str, usize); 3] = [
    ("cluster_size=65536", 65536),
    ("cluster_size=4096,compression_type=zstd", 4096),
    ("extended_l2=on,cluster_size=16k", 16384),
];

#[test]
fn every_crash_point_of_compressed_writes_leaves_readable_clusters() {
    crash_compressed_workloads(PlainWrites::Whole, 1, &COMPRESSED_LAYOUTS, (40, 7));
}

/// A partial write over a compressed cluster moves the rest of it: those
/// bytes were flushed, and a crash must not lose them with the write.
#[test]
fn a_crash_after_a_partial_write_over_a_compressed_cluster_keeps_its_flushed_bytes() {
    crash_compressed_workloads(PlainWrites::Partial, 1, &COMPRESSED_LAYOUTS, (40, 7));
}

/// Runs of clusters written compressed in one write, which syncs once:
/// every stream and refcount of the run must be durable before any of its
/// L2 entries, also when the run crosses L2 tables (64 entries a table with
/// 512-byte clusters) or mixes in clusters written plain.
#[test]
fn every_crash_point_of_compressed_runs_leaves_readable_clusters() {
    let layouts = [
        ("cluster_size=512", 512),
        ("cluster_size=65536", 65536),
        ("cluster_size=4096,compression_type=zstd", 4096),
    ];
    crash_compressed_workloads(PlainWrites::Whole, 16, &layouts, (60, 17));
}

/// Runs the compressed workload (compressed writes of up to `max_run`
/// clusters) on each of `layouts` and crashes it at a sample of instants;
/// `seeds` seed the workload and the choice of crashes.
fn crash_compressed_workloads(
    plain: PlainWrites,
    max_run: usize,
    layouts: &[(&str, usize)],
    seeds: (u64, u64),
) {
    if !require_tool("qemu-img") {
        return;
    }
    for (layout, &(opts, cluster)) in (0..).zip(layouts) {
        let dir = tempfile::tempdir().unwrap();
        let storage = qemu_image(dir.path(), opts);
        let journal = run_compressed_workload(&storage, seeds.0 + layout, cluster, plain, max_run);
        let what = format!("{opts}: clean close");
        check(&storage.contents(), dir.path(), false, &what);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seeds.1 + layout);
        let total = storage.op_count();
        // Every compressed write syncs: a sample of the sync points. With
        // runs, also the instant before each: were the sync after the
        // run's entries, they would be in the disk cache with the data
        // they point to.
        let syncs = storage.sync_points();
        let step = syncs.len().div_ceil(50);
        let before = usize::from(max_run > 1);
        let mut points: Vec<usize> = syncs
            .iter()
            .step_by(step)
            .flat_map(|&p| p - before..=p)
            .collect();
        points.extend((0..80).map(|_| rng.random_range(0..=total)));
        // Between every two writes: right after a write whose L2 entry is
        // not synced yet, the instant an ordering bug shows. Random
        // instants hit it only by luck (they stopped hitting the partial
        // writes' window once the compressed writes changed their ops).
        points.extend(journal.writes.iter().map(|&(start, _)| start));
        // Before the journal starts, the open itself was running.
        points.retain(|&p| p >= journal.flushes[0].0);
        crash_at_each(&storage, &journal, points, &mut rng);
    }
}
