//! Persistent dirty bitmaps through a real mount: `bitmap-add … persistent=on`
//! stores the bitmap in the qcow2 image, where QEMU's tools find it after
//! the unmount; bitmaps QEMU made are listed and kept recording; after a
//! `kill -9` a persistent bitmap is inconsistent and can only be removed.

mod common;

use std::path::Path;

use common::bitmaps::*;
use common::chain::small_chain;
use common::cli::{kill_daemon, ChainDir};
use common::mount::*;
use common::*;

const K64: u64 = 64 << 10;

/// Writes one byte at each of `offsets` through `active` of the mount at
/// `mnt`.
fn poke(mnt: &Path, offsets: &[u64]) {
    let active = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("active"))
        .unwrap();
    for &offset in offsets {
        pwrite(&active, b"x", offset).unwrap();
    }
}

/// The one bitmap `qemu-img info` lists for `image`, named `name`.
fn qemu_bitmap(image: &Path, name: &str) -> serde_json::Value {
    let list = qemu_bitmaps(image);
    list.iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("qemu-img info lists no bitmap {name}: {list:?}"))
}

#[test]
fn a_persistent_bitmap_is_stored_where_qemu_reads_it() {
    let Some(Fixture { dir, top, m }) = mounted(&[], |dir| small_chain(dir)[1].clone()) else {
        return;
    };
    command(
        &m,
        "bitmap-add node=top.qcow2 name=p granularity=128K persistent=on\n",
    )
    .unwrap();
    command(
        &m,
        "bitmap-add node=top.qcow2 name=off persistent=on disabled=on\n",
    )
    .unwrap();
    // In the image at once, in use while mounted.
    assert_eq!(
        qemu_bitmap(&top, "p")["flags"],
        serde_json::json!(["in-use", "auto"])
    );
    poke(&m.mnt, &[0, 300 << 10, (5 << 20) + 7]);
    let listed = listed_one(&m.mnt, "top.qcow2", "p");
    assert_eq!(listed["persistent"], true);
    assert_eq!(listed["count"], 3 * 2 * K64);
    assert_eq!(
        command(&m, "bitmap-add node=top.qcow2 name=p\n"),
        Err(libc::EEXIST)
    );
    let long = format!(
        "bitmap-add node=top.qcow2 name={} persistent=on\n",
        "n".repeat(1024)
    );
    assert_eq!(
        command(&m, &long),
        Err(libc::EINVAL),
        "QEMU stores 1023 bytes"
    );
    assert_eq!(
        command(&m, "bitmap-add node=base.qcow2 name=q persistent=on\n"),
        Err(libc::EINVAL),
        "a read-only node takes no persistent bitmap"
    );
    m.unmount();
    qemu_img_check(&top);
    let stored = qemu_bitmap(&top, "p");
    assert_eq!(stored["granularity"], 2 * K64);
    assert_eq!(stored["flags"], serde_json::json!(["auto"]));
    assert_eq!(qemu_bitmap(&top, "off")["flags"], serde_json::json!([]));
    assert_eq!(qemu_bitmap(&top, "off")["granularity"], K64);
    // QEMU reads the bits: dirty exactly where written, at 128 KiB.
    let g = 2 * K64;
    assert_eq!(
        qemu_dirty_ranges(&top, "p", dir.path()),
        [(0, g), (2 * g, g), (5 << 20, g)]
    );
    // And merges them into a bitmap of another image.
    let scratch = dir.path().join("scratch.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&scratch), "16M"]);
    qemu_img(&["bitmap", "--add", path_str(&scratch), "copy"]);
    qemu_img(&[
        "bitmap",
        "--merge",
        "p",
        "-b",
        path_str(&top),
        "-F",
        "qcow2",
        path_str(&scratch),
        "copy",
    ]);
    qemu_img_check(&scratch);
    // And a mount finds it again, with its bits.
    let m = mount_default(&top, dir.path());
    assert_eq!(dirty_bytes(&m.mnt, "top.qcow2", "p"), 3 * 2 * K64);
    assert_eq!(listed_one(&m.mnt, "top.qcow2", "off")["recording"], false);
    poke(&m.mnt, &[8 << 20]);
    assert_eq!(dirty_bytes(&m.mnt, "top.qcow2", "p"), 4 * 2 * K64);
    command(&m, "bitmap-remove node=top.qcow2 name=off\n").unwrap();
    // Disabled and merged into, it is stored so.
    command(&m, "bitmap-disable node=top.qcow2 name=p\n").unwrap();
    command(&m, "bitmap-add node=top.qcow2 name=t granularity=64K\n").unwrap();
    poke(&m.mnt, &[12 << 20]);
    command(&m, "bitmap-merge node=top.qcow2 target=p bitmaps=t\n").unwrap();
    m.unmount();
    qemu_img_check(&top);
    let names: Vec<_> = qemu_bitmaps(&top)
        .iter()
        .map(|b| b["name"].clone())
        .collect();
    assert_eq!(names, ["p"], "a transient bitmap is not stored");
    assert_eq!(qemu_bitmap(&top, "p")["flags"], serde_json::json!([]));
    let g = 2 * K64;
    assert_eq!(
        qemu_dirty_ranges(&top, "p", dir.path()),
        [
            (0, g),
            (2 * g, g),
            (5 << 20, g),
            (8 << 20, g),
            (12 << 20, g)
        ]
    );
}

#[test]
fn a_bitmap_qemu_made_is_listed_and_kept_recording() {
    let Some(Fixture { dir, top, m }) = mounted(&[], |dir| {
        let top = small_chain(dir)[1].clone();
        qemu_img(&["bitmap", "--add", "-g", "64K", path_str(&top), "q"]);
        top
    }) else {
        return;
    };
    let listed = listed_one(&m.mnt, "top.qcow2", "q");
    assert_eq!(listed["persistent"], true);
    assert_eq!(listed["recording"], true);
    assert_eq!(listed["count"], 0);
    poke(&m.mnt, &[K64, 3 * K64]);
    command(&m, "bitmap-clear node=top.qcow2 name=q\n").unwrap();
    poke(&m.mnt, &[2 * K64]);
    assert_eq!(dirty_bytes(&m.mnt, "top.qcow2", "q"), K64);
    m.unmount();
    qemu_img_check(&top);
    let m = mount_default(&top, dir.path());
    assert_eq!(dirty_bytes(&m.mnt, "top.qcow2", "q"), K64);
    command(&m, "bitmap-remove node=top.qcow2 name=q\n").unwrap();
    m.unmount();
    qemu_img_check(&top);
    assert!(qemu_bitmaps(&top).is_empty());
}

#[test]
fn after_kill_9_a_persistent_bitmap_is_inconsistent_and_can_only_be_removed() {
    if !tools::require_all(&[]) {
        return;
    }
    let d = ChainDir::new();
    let guard = d.mount(&[]);
    command_at(&d.mnt, "bitmap-add node=top.qcow2 name=p persistent=on\n").unwrap();
    poke(&d.mnt, &[0]);
    kill_daemon(d.dir.path(), &d.mnt);
    drop(guard);
    assert_eq!(
        qemu_bitmap(&d.top, "p")["flags"],
        serde_json::json!(["in-use", "auto"])
    );
    let m = mount_default(&d.top, d.dir.path());
    let listed = listed_one(&m.mnt, "top.qcow2", "p");
    assert_eq!(listed["inconsistent"], true);
    assert_eq!(listed["persistent"], true);
    assert_eq!(listed["recording"], false);
    let text = String::from_utf8(read_all(&m.path("ctl/bitmaps"))).unwrap();
    assert!(text.contains("persistent inconsistent"), "{text}");
    command(&m, "bitmap-add node=top.qcow2 name=other granularity=64K\n").unwrap();
    for refused in [
        "bitmap-clear node=top.qcow2 name=p",
        "bitmap-enable node=top.qcow2 name=p",
        "bitmap-disable node=top.qcow2 name=p",
        "bitmap-merge node=top.qcow2 target=p bitmaps=other",
        "bitmap-merge node=top.qcow2 target=other bitmaps=p",
    ] {
        assert_eq!(
            command(&m, &format!("{refused}\n")),
            Err(libc::EINVAL),
            "{refused}"
        );
    }
    assert_eq!(
        command(&m, "bitmap-add node=top.qcow2 name=p\n"),
        Err(libc::EEXIST)
    );
    command(&m, "bitmap-remove node=top.qcow2 name=p\n").unwrap();
    m.unmount();
    assert!(qemu_bitmaps(&d.top).is_empty());
    qemu_img_check_allowing_leaks(&d.top);
}

#[test]
fn a_snapshot_stores_the_old_tops_persistent_bitmap_with_its_bits() {
    let Some(Fixture { dir, top, m }) = mounted(&[], |dir| small_chain(dir)[1].clone()) else {
        return;
    };
    command(
        &m,
        "bitmap-add node=top.qcow2 name=p granularity=64K persistent=on\n",
    )
    .unwrap();
    poke(&m.mnt, &[0, 2 * K64]);
    let snap = dir.path().join("snap.qcow2");
    command(&m, &format!("snapshot file={}\n", snap.display())).unwrap();
    poke(&m.mnt, &[5 * K64]);
    assert_eq!(listed_one(&m.mnt, "top.qcow2", "p")["recording"], false);
    assert_eq!(dirty_bytes(&m.mnt, "top.qcow2", "p"), 2 * K64);
    m.unmount();
    qemu_img_check(&top);
    assert_eq!(qemu_bitmap(&top, "p")["flags"], serde_json::json!(["auto"]));
    // The old top alone, mounted: the bits written before the snapshot.
    let m = mount(&top, &dir.path().join("mnt2"), &Default::default());
    assert_eq!(dirty_bytes(&m.mnt, "top.qcow2", "p"), 2 * K64);
    m.unmount();
}

#[test]
fn a_chain_still_shared_at_close_stores_the_recorded_bits_when_dropped() {
    if !tools::require_all(&["qemu-storage-daemon"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = small_chain(dir.path())[1].clone();
    let jobs = chainfs::jobs::Jobs::new(common::chain::open_writable(&top), false);
    jobs.command("bitmap-add node=top.qcow2 name=p granularity=64K persistent=on\n")
        .unwrap();
    let chain = jobs.chain();
    chain.write(chain.active().id(), 3 * K64, b"x").unwrap();
    assert!(jobs.close().is_err(), "the chain is still held");
    drop(chain);
    assert_eq!(qemu_bitmap(&top, "p")["flags"], serde_json::json!(["auto"]));
    assert_eq!(qemu_dirty_ranges(&top, "p", dir.path()), [(3 * K64, K64)]);
}

#[test]
fn a_persistent_bitmap_qemu_could_not_store_is_refused_with_its_reason() {
    let Some(Fixture { dir, top, m }) = mounted(&[], |dir| {
        let top = dir.join("big.qcow2");
        create_qcow2(path_str(&top), "4T", "");
        top
    }) else {
        return;
    };
    let reason = |m: &Mounted| {
        let last = events(m).last().cloned().unwrap();
        assert_eq!(last["event"], "COMMAND_REJECTED", "{last}");
        last["data"]["reason"].as_str().unwrap_or("").to_owned()
    };
    // 4 TiB at 512 bytes a bit is 1 GiB of bits: more than QEMU stores.
    assert_eq!(
        command(
            &m,
            "bitmap-add node=active name=fine granularity=512 persistent=on\n"
        ),
        Err(libc::EINVAL)
    );
    assert!(reason(&m).contains("larger granularity"), "{}", reason(&m));
    command(
        &m,
        "bitmap-add node=active name=coarse granularity=1K persistent=on\n",
    )
    .unwrap();
    m.unmount();
    qemu_img_check(&top);
    assert_eq!(qemu_bitmap(&top, "coarse")["granularity"], 1024);

    let old = dir.path().join("v2.qcow2");
    create_qcow2(path_str(&old), "16M", "compat=0.10");
    let m = mount_default(&old, dir.path());
    assert_eq!(
        command(&m, "bitmap-add node=active name=p persistent=on\n"),
        Err(libc::EINVAL)
    );
    assert!(reason(&m).contains("version 2"), "{}", reason(&m));
    m.unmount();
    qemu_img_check(&old);
    assert!(qemu_bitmaps(&old).is_empty());
}
