//! Concurrent write workloads through `Chain::write` and `Chain::zero_range`
//! on images made by QEMU, checked against an in-memory model: after
//! `close`, `qemu-img check` is clean and `qemu-img convert` of the top
//! equals the model byte for byte.
//!
//! Four threads write at once, each in its own region (region borders are
//! not cluster-aligned, so neighbours share clusters), plus a shared region
//! that every thread writes under a test-side mutex, which keeps the model
//! deterministic while the chain still sees concurrent requests.

mod common;

use std::ops::Range;
use std::sync::Mutex;

use chainfs::chain::{Chain, ChainOptions, NodeId};
use common::{TempChain, MIB};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const THREADS: usize = 4;
const OPS_PER_THREAD: usize = 300;

/// How a workload is shaped for one image.
struct Workload {
    /// Cluster size of the written image, to aim writes at cluster borders.
    cluster: u64,
    /// Seed of every random choice, so a failure can be replayed.
    seed: u64,
}

/// One request, as the model applies it.
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

impl Op {
    fn range(&self) -> Range<u64> {
        match self {
            Op::Write { offset, data } => *offset..offset + data.len() as u64,
            Op::Zero { offset, len } => *offset..offset + len,
        }
    }
}

/// A random request inside `region`: short, cluster-sized or long writes at
/// any byte offset, and zeroings that are sometimes cluster-aligned (to make
/// zero clusters) and sometimes not (to make written zeros).
fn random_op(rng: &mut StdRng, region: &Range<u64>, cluster: u64) -> Op {
    let span = region.end - region.start;
    let max_len = match rng.random_range(0..3) {
        0 => 600,
        1 => 2 * cluster + 1,
        _ => span / 4,
    }
    .clamp(1, span);
    let mut offset = region.start + rng.random_range(0..span);
    let mut len = rng.random_range(1..=max_len);
    let zero = rng.random_bool(0.2);
    if zero && rng.random_bool(0.5) {
        offset = (offset / cluster * cluster).max(region.start);
        len = len.div_ceil(cluster) * cluster;
    }
    len = len.min(region.end - offset).max(1);
    if offset >= region.end {
        offset = region.end - 1;
        len = 1;
    }
    if zero {
        return Op::Zero { offset, len };
    }
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    Op::Write { offset, data }
}

/// Applies `op` to the chain and then to `model`, which holds the bytes of
/// the region starting at guest offset `model_start`; then reads the range
/// back through the chain (read-your-writes while others write).
fn apply(chain: &Chain, node: NodeId, op: &Op, model: &mut [u8], model_start: u64) {
    let range = op.range();
    let at = (range.start - model_start) as usize..(range.end - model_start) as usize;
    match op {
        Op::Write { offset, data } => {
            chain
                .write(node, *offset, data)
                .unwrap_or_else(|e| panic!("write {range:?}: {e}"));
            model[at.clone()].copy_from_slice(data);
        }
        Op::Zero { offset, len } => {
            chain
                .zero_range(node, *offset, *len)
                .unwrap_or_else(|e| panic!("zero_range {range:?}: {e}"));
            model[at.clone()].fill(0);
        }
    }
    let mut back = vec![0u8; at.len()];
    chain
        .read(node, range.start, &mut back)
        .unwrap_or_else(|e| panic!("read back {range:?}: {e}"));
    common::assert_same_bytes(&back, &model[at], &format!("read back {range:?}"));
}

/// Borders of the four private regions and the shared one, deliberately
/// not cluster-aligned.
fn region_borders(size: u64) -> Vec<u64> {
    let step = size / (THREADS as u64 + 1);
    let mut borders: Vec<u64> = (0..=THREADS as u64).map(|i| i * step + i * 777).collect();
    borders.push(size);
    borders
}

/// Splits `model` at `borders` into one mutable slice per region.
fn split_regions<'a>(mut model: &'a mut [u8], borders: &[u64]) -> Vec<&'a mut [u8]> {
    let mut regions = Vec::new();
    for pair in borders.windows(2) {
        let (head, tail) = model.split_at_mut((pair[1] - pair[0]) as usize);
        regions.push(head);
        model = tail;
    }
    regions
}

/// One thread: `OPS_PER_THREAD` requests, about one in five in the shared
/// region under the test's mutex.
fn run_thread(
    chain: &Chain,
    node: NodeId,
    (region, model): (Range<u64>, &mut [u8]),
    shared: &Mutex<(Range<u64>, &mut [u8])>,
    cluster: u64,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..OPS_PER_THREAD {
        if rng.random_bool(0.2) {
            let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
            let (range, shared_model) = &mut *guard;
            let op = random_op(&mut rng, range, cluster);
            apply(chain, node, &op, shared_model, range.start);
        } else {
            let op = random_op(&mut rng, &region, cluster);
            apply(chain, node, &op, model, region.start);
        }
    }
}

/// Runs the workload's threads against `node` of `opened`, updating `model`.
fn run_threads(opened: &Chain, node: NodeId, model: &mut [u8], workload: &Workload) {
    let borders = region_borders(model.len() as u64);
    let mut regions = split_regions(model, &borders);
    let shared_model = regions.pop().unwrap_or_default();
    let shared = Mutex::new((borders[THREADS]..borders[THREADS + 1], shared_model));
    std::thread::scope(|scope| {
        for (i, region_model) in regions.into_iter().enumerate() {
            let shared = &shared;
            let region = borders[i]..borders[i + 1];
            let seed = workload.seed * 1000 + i as u64;
            scope.spawn(move || {
                let mine = (region, region_model);
                run_thread(opened, node, mine, shared, workload.cluster, seed)
            });
        }
    });
}

/// Runs the workload on the top of `chain`, closes it, and checks with QEMU
/// that the top equals the model, the images are clean and the nodes below
/// did not change.
fn run_workload(chain: &TempChain, workload: &Workload) {
    let below: Vec<Vec<u8>> = chain.layers()[..chain.layers().len() - 1]
        .iter()
        .map(|layer| common::convert_to_raw(&layer.path))
        .collect();
    let mut model = common::convert_to_raw(chain.top());
    let options = ChainOptions {
        writable: true,
        force_share: false,
        cache_bytes: 1 << 20,
    };
    let opened = Chain::open(chain.top(), &options)
        .unwrap_or_else(|e| panic!("open {}: {e}", chain.top().display()));
    run_threads(&opened, opened.active().id(), &mut model, workload);
    // Close writes back every cached table; only then may QEMU look.
    opened.close().unwrap_or_else(|e| panic!("close: {e}"));
    common::qemu_img_check(chain.top());
    let top = common::convert_to_raw(chain.top());
    common::assert_same_bytes(&top, &model, "top after close");
    for (layer, before) in chain.layers().iter().zip(&below) {
        let after = common::convert_to_raw(&layer.path);
        common::assert_same_bytes(&after, before, "a backing node changed");
    }
}

/// A qcow2 base full of QEMU-written data under an empty overlay, both
/// created with `options`: the workload writes partial clusters over backing
/// data.
fn over_backing(cluster: u64, options: &str) -> TempChain {
    let size = common::cases::size_for(cluster);
    TempChain::new()
        .qcow2_base("base.qcow2", size, options)
        .write(&[format!("write -P 0x5a 0 {size}")])
        .write(&common::cases::layer_writes(0, cluster, size))
        .overlay("top.qcow2", None, options)
}

fn check_over_backing(cluster: u64, options: &str, seed: u64) {
    if common::require_qemu() {
        run_workload(&over_backing(cluster, options), &Workload { cluster, seed });
    }
}

#[test]
fn concurrent_writes_with_512_byte_clusters_match_the_model() {
    check_over_backing(512, "cluster_size=512", 1);
}

#[test]
fn concurrent_writes_with_2m_clusters_match_the_model() {
    check_over_backing(2 * MIB, "cluster_size=2097152", 2);
}

#[test]
fn concurrent_writes_with_subclusters_match_the_model() {
    check_over_backing(64 << 10, "extended_l2=on", 3);
}

#[test]
fn concurrent_writes_with_1_bit_refcounts_match_the_model() {
    check_over_backing(64 << 10, "refcount_bits=1", 4);
}

#[test]
fn concurrent_writes_grow_the_refcount_table_with_64_bit_refcounts() {
    if !common::require_qemu() {
        return;
    }
    let cluster = 512;
    let chain = over_backing(cluster, "cluster_size=512,refcount_bits=64");
    run_workload(&chain, &Workload { cluster, seed: 5 });
    // One reftable cluster of 64 entries, each refblock covering 64
    // clusters, describes 2 MiB of host file; past that it had to grow.
    let host = std::fs::metadata(chain.top()).map_or(0, |m| m.len());
    assert!(host > 64 * 64 * cluster, "host file only {host} bytes");
}

/// Writes into an image holding internal snapshot `s1` copy the clusters
/// the snapshot shares before changing them: the snapshot reads as before.
fn assert_snapshot_survives_writes(chain: &TempChain, cluster: u64, seed: u64) {
    let snapshot = common::convert_snapshot_to_raw(chain.top(), "s1");
    run_workload(chain, &Workload { cluster, seed });
    let after = common::convert_snapshot_to_raw(chain.top(), "s1");
    common::assert_same_bytes(&after, &snapshot, "snapshot s1 after writes");
}

#[test]
fn writes_into_an_image_with_an_internal_snapshot_keep_the_snapshot() {
    if common::require_qemu() {
        let chain = common::cases::internal_snapshot();
        assert_snapshot_survives_writes(&chain, 64 << 10, 6);
    }
}

#[test]
fn writes_into_a_compressed_image_keep_its_snapshot() {
    if !common::require_qemu() {
        return;
    }
    let size = common::cases::size_for(64 << 10);
    let chain = TempChain::new()
        .qcow2_base("source.qcow2", size, "")
        .write(&[format!("write -P 0x33 0 {size}")])
        .write(&common::cases::layer_writes(0, 64 << 10, size))
        .convert_compressed("compressed.qcow2", "zstd", "")
        .snapshot("s1");
    assert_snapshot_survives_writes(&chain, 64 << 10, 7);
}

#[test]
fn writes_into_a_compressed_image_match_the_model() {
    if !common::require_qemu() {
        return;
    }
    let size = common::cases::size_for(64 << 10);
    let chain = TempChain::new()
        .qcow2_base("source.qcow2", size, "")
        .write(&common::cases::layer_writes(0, 64 << 10, size))
        .convert_compressed("compressed.qcow2", "zlib", "");
    run_workload(
        &chain,
        &Workload {
            cluster: 64 << 10,
            seed: 8,
        },
    );
}
