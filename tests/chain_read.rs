//! Reading, writing and querying qcow2 chains built by qemu-img and
//! qemu-io; every node must read as `qemu-img convert -O raw` shows it.

mod common;

use chainfs::chain::{Chain, ChainOptions};
use chainfs::format::Allocation;
use common::chain::*;
use common::*;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Builds the five-node chain of SPEC.md in `d`: raw `A` and qcow2 `B`–`E`,
/// each layer writing its own regions and regions overlapping the others,
/// unaligned writes and zero writes included.
fn five_node_chain(d: &std::path::Path) {
    raw_image(&at(d, "A.img"), 4 << 20, Some((0..(4 << 20), 0x41)));
    overlay(d, "B.qcow2", Some(("A.img", "raw")), "4M");
    overlay(d, "C.qcow2", Some(("B.qcow2", "qcow2")), "4M");
    overlay(d, "D.qcow2", Some(("C.qcow2", "qcow2")), "4M");
    overlay(d, "E.qcow2", Some(("D.qcow2", "qcow2")), "4M");
    qemu_io(&at(d, "B.qcow2"), "qcow2", &["write -P 0x42 0 1M"]);
    qemu_io(&at(d, "C.qcow2"), "qcow2", &["write -P 0x43 512k 1M"]);
    qemu_io(&at(d, "C.qcow2"), "qcow2", &["write -P 0x63 3000 5000"]);
    qemu_io(&at(d, "D.qcow2"), "qcow2", &["write -z 1M 128k"]);
    qemu_io(&at(d, "D.qcow2"), "qcow2", &["write -P 0x44 2M 64k"]);
    qemu_io(&at(d, "E.qcow2"), "qcow2", &["write -P 0x45 100k 1000"]);
    qemu_io(&at(d, "E.qcow2"), "qcow2", &["write -P 0x65 4032k 64k"]);
    qemu_io(&at(d, "E.qcow2"), "qcow2", &["discard 2M 64k"]);
}

#[test]
fn every_node_reads_as_qemu_img_convert_shows_it() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    five_node_chain(d);
    let chain = open(&at(d, "E.qcow2"));
    let names: Vec<_> = chain.nodes().iter().map(|n| n.name().to_owned()).collect();
    assert_eq!(names, ["A.img", "B.qcow2", "C.qcow2", "D.qcow2", "E.qcow2"]);
    for node in chain.nodes() {
        let want = convert_to_raw(&at(d, node.name()));
        assert_same(node.name(), &read_node(&chain, node.id()), &want);
    }
    chain.close().unwrap();
}

#[test]
fn unaligned_reads_match_whole_node_reads() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    five_node_chain(d);
    let chain = open(&at(d, "E.qcow2"));
    let id = chain.active().id();
    let whole = read_node(&chain, id);
    for (offset, len) in [
        (1, 1),
        (2999, 5002),
        (100 * K - 7, 1100),
        (M - 3, 64 * K + 5),
        (4 * M - 1, 1),
    ] {
        let mut buf = vec![0xeeu8; len as usize];
        chain.read(id, offset, &mut buf).unwrap();
        let range = offset as usize..(offset + len) as usize;
        assert_same(&format!("read {offset}+{len}"), &buf, &whole[range]);
    }
}

#[test]
fn a_backing_file_shorter_than_its_overlay_reads_as_zeros_past_its_end() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    raw_image(&at(d, "A.img"), 2 << 20, Some((0..(2 << 20), 0x11)));
    overlay(d, "B.qcow2", Some(("A.img", "raw")), "512k");
    overlay(d, "C.qcow2", Some(("B.qcow2", "qcow2")), "2M");
    qemu_io(&at(d, "C.qcow2"), "qcow2", &["write -P 0x33 1536k 4k"]);
    let chain = open(&at(d, "C.qcow2"));
    let got = read_node(&chain, chain.active().id());
    assert!(got[..512 * 1024].iter().all(|&b| b == 0x11));
    assert!(got[512 * 1024..1536 * 1024].iter().all(|&b| b == 0));
    assert_same("short middle", &got, &convert_to_raw(&at(d, "C.qcow2")));
}

#[test]
fn block_status_names_the_node_that_decides_each_run() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    // A sparse raw base: data in its first 64 KiB only.
    let base = std::fs::File::create(at(d, "A.img")).unwrap();
    base.set_len(M).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&base, &[1u8; 65536], 0).unwrap();
    drop(base);
    overlay(d, "B.qcow2", Some(("A.img", "raw")), "1M");
    overlay(d, "C.qcow2", Some(("B.qcow2", "qcow2")), "1M");
    qemu_io(&at(d, "B.qcow2"), "qcow2", &["write -P 2 64k 64k"]);
    qemu_io(&at(d, "C.qcow2"), "qcow2", &["write -z 128k 64k"]);
    let chain = open(&at(d, "C.qcow2"));
    let [a, b, c] = [0, 1, 2].map(|i| chain.nodes()[i].id());

    let status = |offset, base| chain.block_status(c, base, offset, M).unwrap();
    let s = status(0, None);
    assert_eq!(
        (s.allocation, s.node, s.depth, s.len),
        (Allocation::Data, Some(a), 2, 64 * K)
    );
    let s = status(64 * K, None);
    assert_eq!(
        (s.allocation, s.node, s.depth, s.len),
        (Allocation::Data, Some(b), 1, 64 * K)
    );
    let s = status(128 * K, None);
    assert_eq!(
        (s.allocation, s.node, s.depth, s.len),
        (Allocation::Zero, Some(c), 0, 64 * K)
    );
    let s = status(192 * K, None);
    assert_eq!(
        (s.allocation, s.node),
        (Allocation::Zero, Some(a)),
        "a hole in the raw base"
    );
    // Above A only: A's data no longer counts.
    let s = status(0, Some(a));
    assert_eq!(
        (s.allocation, s.node, s.len),
        (Allocation::Unallocated, None, 64 * K)
    );
    let s = status(64 * K, Some(a));
    assert_eq!((s.allocation, s.node), (Allocation::Data, Some(b)));
    // Above B: nothing below C is consulted.
    let s = status(64 * K, Some(b));
    assert_eq!((s.allocation, s.node), (Allocation::Unallocated, None));
    // A query is cut to the node.
    assert_eq!(chain.block_status(c, None, M - 512, M).unwrap().len, 512);
    assert!(chain.block_status(c, None, M, 1).is_err());
}

#[test]
fn past_the_end_of_a_shorter_node_block_status_is_zero() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    raw_image(&at(d, "A.img"), 2 << 20, Some((0..(2 << 20), 0x11)));
    overlay(d, "B.qcow2", Some(("A.img", "raw")), "1M");
    overlay(d, "C.qcow2", Some(("B.qcow2", "qcow2")), "2M");
    let chain = open(&at(d, "C.qcow2"));
    let b = chain.nodes()[1].id();
    let s = chain
        .block_status(chain.active().id(), None, M + 4096, M)
        .unwrap();
    assert_eq!(
        (s.allocation, s.node, s.len),
        (Allocation::Zero, Some(b), M - 4096)
    );
}

#[test]
fn writes_to_the_active_node_copy_on_write_from_the_chain_below() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    five_node_chain(d);
    let mut want = convert_to_raw(&at(d, "E.qcow2"));
    let chain = open_writable(&at(d, "E.qcow2"));
    let top = chain.active().id();
    let lower = chain.nodes()[2].id();
    assert!(
        chain.write(lower, 0, b"x").is_err(),
        "only the active node is writable"
    );
    // Across a cluster boundary, over data from B, C and D.
    let data = vec![0x77u8; 3000];
    chain.write(top, 64 * K - 1000, &data).unwrap();
    want[(64 * K - 1000) as usize..(64 * K + 2000) as usize].fill(0x77);
    chain.zero_range(top, 512 * K, 128 * K).unwrap();
    want[(512 * K) as usize..(640 * K) as usize].fill(0);
    assert_same("after write", &read_node(&chain, top), &want);
    chain.flush().unwrap();
    chain.close().unwrap();
    qemu_img_in(d, &["check", "E.qcow2"]);
    assert_same("qemu's view", &convert_to_raw(&at(d, "E.qcow2")), &want);
}

#[test]
fn an_empty_chain_of_qcow2_without_backing_reads_zeros() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    overlay(dir.path(), "a.qcow2", None, "1M");
    let chain = Chain::open(&at(dir.path(), "a.qcow2"), &ChainOptions::default()).unwrap();
    assert!(read_node(&chain, chain.active().id())
        .iter()
        .all(|&b| b == 0));
    let s = chain.block_status(chain.active().id(), None, 0, M).unwrap();
    assert_eq!(
        (s.allocation, s.node, s.len),
        (Allocation::Unallocated, None, M)
    );
}

#[test]
fn an_external_data_file_is_found_beside_its_image_and_written_through() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir(at(d, "vm")).unwrap();
    let vm = at(d, "vm");
    raw_image(
        &at(&vm, "base.img"),
        M as usize,
        Some((0..M as usize, 0x11)),
    );
    // The data file's name is relative: qemu-img makes it beside the image.
    let top = at(&vm, "top.qcow2");
    create_overlay(&top, ("base.img", "raw"), Some("1M"), "data_file=data.raw");
    qemu_io(&at(&vm, "top.qcow2"), "qcow2", &["write -P 0x22 64k 64k"]);
    let want = convert_to_raw(&at(&vm, "top.qcow2"));
    // Opened from elsewhere: the data file name is relative to the image.
    let chain = open_writable(&at(&vm, "top.qcow2"));
    let top = chain.active().id();
    assert_same("data file", &read_node(&chain, top), &want);
    chain.write(top, 200 * K, &[0x33; 4096]).unwrap();
    chain.close().unwrap();
    qemu_img_in(&vm, &["check", "top.qcow2"]);
    let got = convert_to_raw(&at(&vm, "top.qcow2"));
    assert!(got[(200 * K) as usize..(204 * K) as usize]
        .iter()
        .all(|&b| b == 0x33));
    assert!(got[(64 * K) as usize..(128 * K) as usize]
        .iter()
        .all(|&b| b == 0x22));
}
