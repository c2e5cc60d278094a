//! Changing the chain's shape: a node rebacked onto a lower node after its
//! data was copied up (what a stream does), and a new top (a live
//! snapshot). The images stay valid for QEMU, every node shows what it
//! showed, and the old chain keeps reading through the images it shared.

mod common;

use chainfs::chain::{Chain, NodeId};
use chainfs::format::Allocation;
use common::chain::*;
use common::*;

const SIZE: u64 = 4 << 20;

/// base.img (raw) <- b.qcow2 <- c.qcow2 <- d.qcow2, each layer writing its
/// own region and one shared with the others; c zeroes part of base.
fn build(d: &std::path::Path) {
    raw_image(
        &at(d, "base.img"),
        SIZE as usize,
        Some((0..SIZE as usize, 0x11)),
    );
    overlay(d, "b.qcow2", Some(("base.img", "raw")), "4M");
    qemu_io(&at(d, "b.qcow2"), "qcow2", &["write -P 0x22 1M 512k"]);
    qemu_io(&at(d, "b.qcow2"), "qcow2", &["write -P 0x22 3M 100k"]);
    overlay(d, "c.qcow2", Some(("b.qcow2", "qcow2")), "4M");
    qemu_io(&at(d, "c.qcow2"), "qcow2", &["write -P 0x33 2M 300k"]);
    qemu_io(&at(d, "c.qcow2"), "qcow2", &["write -z 3M 64k"]);
    overlay(d, "d.qcow2", Some(("c.qcow2", "qcow2")), "4M");
    qemu_io(&at(d, "d.qcow2"), "qcow2", &["write -P 0x44 3M 4k"]);
}

/// Copies into `node` everything the nodes between it and `base` hold, as
/// a stream does, in 256 KiB steps.
fn copy_up(chain: &Chain, node: NodeId, below: NodeId, base: Option<NodeId>) {
    let mut offset = 0;
    while offset < SIZE {
        let extent = chain
            .block_status(below, base, offset, (256 << 10).min(SIZE - offset))
            .unwrap();
        match extent.allocation {
            Allocation::Data => {
                let mut data = vec![0u8; extent.len as usize];
                chain.read(below, offset, &mut data).unwrap();
                chain
                    .populate(node, offset, extent.len, Some(&data))
                    .unwrap();
            }
            Allocation::Zero => {
                chain.populate(node, offset, extent.len, None).unwrap();
            }
            Allocation::Unallocated => {}
        }
        offset += extent.len;
    }
}

#[test]
fn a_streamed_node_is_rebacked_onto_the_base_and_shows_the_same() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d);
    let before: Vec<Vec<u8>> = ["base.img", "b.qcow2", "c.qcow2", "d.qcow2"]
        .iter()
        .map(|name| convert_to_raw(&at(d, name)))
        .collect();
    let chain = open_writable(&at(d, "d.qcow2"));
    let id = |name: &str| chain.find(name).unwrap().id();
    let (top, below, base) = (id("d.qcow2"), id("c.qcow2"), id("base.img"));
    copy_up(&chain, top, below, Some(base));
    let streamed = chain.rebacked(top, Some(base), None).unwrap();
    let names: Vec<&str> = streamed.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(names, ["base.img", "d.qcow2"]);
    assert_eq!(streamed.active().backing_file(), Some("base.img"));
    assert_same("after stream", &read_node(&streamed, top), &before[3]);
    // The old chain still reads through c and b as before.
    assert_same("old chain, c", &read_node(&chain, below), &before[2]);
    drop(chain);
    streamed.close().unwrap();
    qemu_img_in(d, &["check", "d.qcow2"]);
    let info = qemu_img_in(d, &["info", "--output=json", "d.qcow2"]);
    assert!(
        info.contains("\"backing-filename\": \"base.img\""),
        "{info}"
    );
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    assert_same("qemu sees", &convert_to_raw(&at(d, "d.qcow2")), &before[3]);
}

#[test]
fn a_node_below_the_top_can_be_streamed_into_and_keeps_relative_names() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d);
    let c_before = convert_to_raw(&at(d, "c.qcow2"));
    let d_before = convert_to_raw(&at(d, "d.qcow2"));
    let chain = open_writable(&at(d, "d.qcow2"));
    let c = chain.find("c.qcow2").unwrap();
    let (c_id, b_id) = (c.id(), chain.find("b.qcow2").unwrap().id());
    c.set_writable(true).unwrap();
    copy_up(&chain, c_id, b_id, None);
    let streamed = chain.rebacked(c_id, None, None).unwrap();
    streamed.node(c_id).unwrap().set_writable(false).unwrap();
    assert_eq!(streamed.nodes().len(), 2);
    assert_eq!(streamed.node(c_id).unwrap().backing_file(), None);
    assert_same("c", &read_node(&streamed, c_id), &c_before);
    assert_same(
        "d",
        &read_node(&streamed, streamed.active().id()),
        &d_before,
    );
    drop(chain);
    streamed.close().unwrap();
    qemu_img_in(d, &["check", "c.qcow2"]);
    let chain_info = qemu_img_in(d, &["info", "--backing-chain", "d.qcow2"]);
    assert!(
        !chain_info.contains("b.qcow2") && !chain_info.contains("base.img"),
        "{chain_info}"
    );
    assert_same("qemu sees c", &convert_to_raw(&at(d, "c.qcow2")), &c_before);
}

#[test]
fn a_snapshot_becomes_the_active_node_and_the_old_top_stops_taking_writes() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d);
    let chain = open_writable(&at(d, "d.qcow2"));
    let old_top = chain.active().id();
    let snapped = chain.with_new_top(&at(d, "e.qcow2")).unwrap();
    assert!(
        chain.with_new_top(&at(d, "e.qcow2")).is_err(),
        "the file exists now"
    );
    let new_top = snapped.active();
    assert_eq!(new_top.name(), "e.qcow2");
    assert_eq!(new_top.backing_file(), Some("d.qcow2"));
    assert!(new_top.id() != old_top);
    assert!(
        snapped.write(old_top, 0, &[1]).is_err(),
        "the old top is read-only now"
    );
    let before = read_node(&snapped, old_top);
    snapped.write(new_top.id(), 3 << 20, &[0x55; 8192]).unwrap();
    let mut want = before.clone();
    want[3 << 20..(3 << 20) + 8192].fill(0x55);
    assert_same("new top", &read_node(&snapped, new_top.id()), &want);
    assert_same("old top unchanged", &read_node(&snapped, old_top), &before);
    drop(chain);
    snapped.close().unwrap();
    qemu_img_in(d, &["check", "e.qcow2"]);
    qemu_img_in(d, &["check", "d.qcow2"]);
    assert_same("qemu sees e", &convert_to_raw(&at(d, "e.qcow2")), &want);
}
