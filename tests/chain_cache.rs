//! One metadata cache per chain (`--cache-size` is a budget for the whole
//! mount): what every image caches, those that join later included, stays
//! within the budget, and reads stay right when the budget is so small that
//! entries are evicted all the time. QEMU's `qemu-img convert` is the oracle.

mod common;

use std::path::Path;

use chainfs::chain::{Chain, ChainOptions};
use common::chain::{assert_same, read_node};
use common::{convert_to_raw, require_qemu, TempChain, MIB};

/// Layers of a chain whose L2 tables are many: 4 KiB clusters (an L2
/// table covers 2 MiB), `writes` 4 KiB writes per layer each in its own
/// table's range, a different pattern and offset per layer.
fn scattered_chain(size: u64, layers: usize, writes: u64) -> TempChain {
    let tables = size / (2 * MIB);
    let mut chain = TempChain::new().qcow2_base("base.qcow2", size, "cluster_size=4096");
    for layer in 0..layers {
        if layer > 0 {
            chain = chain.overlay(&format!("l{layer}.qcow2"), None, "cluster_size=4096");
        }
        let commands: Vec<String> = (0..writes)
            .map(|i| {
                let table = (i * 7 + layer as u64 * 3) % tables;
                let offset = table * 2 * MIB + (layer as u64 % 64) * 4096;
                format!("write -P {} {offset} 4k", layer + 1)
            })
            .collect();
        chain = chain.write(&commands);
    }
    chain
}

fn open_with_budget(top: &Path, writable: bool, cache_bytes: u64) -> Chain {
    let options = ChainOptions {
        writable,
        cache_bytes,
        ..ChainOptions::default()
    };
    Chain::open(top, &options).unwrap_or_else(|e| panic!("open {}: {e}", top.display()))
}

/// Reads 4 KiB at every 256 KiB of every node.
fn read_everywhere(chain: &Chain) {
    let mut buf = vec![0u8; 4096];
    for node in chain.nodes() {
        for offset in (0..node.virtual_size()).step_by(256 << 10) {
            chain.read(node.id(), offset, &mut buf).unwrap();
        }
    }
}

#[test]
fn every_image_of_a_chain_caches_within_one_budget() {
    if !require_qemu() {
        return;
    }
    const BUDGET: u64 = 256 << 10;
    let images = scattered_chain(256 * MIB, 6, 64);
    let chain = open_with_budget(images.top(), true, BUDGET);
    read_everywhere(&chain);
    let cache = chain.cache();
    assert!(cache.bytes() <= BUDGET, "{} bytes cached", cache.bytes());
    assert!(cache.entries() > 0, "nothing was cached");

    // An image that joins later (a snapshot) draws on the same budget.
    let snapshot = images.dir().join("snap.qcow2");
    let chain = chain.with_new_top(&snapshot).unwrap();
    let active = chain.active().id();
    for table in 0..64u64 {
        chain
            .write(active, table * 2 * MIB + 512, &[0x77; 4096])
            .unwrap();
    }
    read_everywhere(&chain);
    let cache = chain.cache();
    assert!(cache.bytes() <= BUDGET, "{} bytes cached", cache.bytes());
    chain.close().unwrap();
}

#[test]
fn reads_stay_right_when_the_cache_evicts_all_the_time() {
    if !require_qemu() {
        return;
    }
    // A compressed base (decompressed clusters are cached too) under
    // overlays with scattered data.
    let images = scattered_chain(32 * MIB, 1, 16)
        .convert_compressed("packed.qcow2", "zlib", "cluster_size=4096")
        .overlay("o1.qcow2", None, "cluster_size=4096")
        .write(&["write -P 0x41 1M 3M", "write -P 0x42 20M 12k"])
        .overlay("o2.qcow2", None, "cluster_size=65536")
        .write(&["write -P 0x43 2M 64k", "write -P 0x44 30M 1M"]);
    // Room for about two 4 KiB tables: nearly every lookup loads.
    let chain = open_with_budget(images.top(), false, 10 << 10);
    let chain = &chain;
    std::thread::scope(|scope| {
        for (node, layer) in chain.nodes().iter().zip(images.layers()) {
            scope.spawn(move || {
                let want = convert_to_raw(&layer.path);
                assert_same(node.name(), &read_node(chain, node.id()), &want);
            });
        }
    });
    assert!(chain.cache().bytes() <= 10 << 10);
}
