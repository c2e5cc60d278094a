//! Dirty bitmaps through a real mount: the `bitmap-*` commands written to
//! `ctl/command`, their refusals, and what `ctl/bitmaps` and
//! `ctl/bitmaps.json` show as the guest writes.

mod common;

use std::path::Path;

use common::bitmaps::*;
use common::chain::overlay_with;
use common::mount::*;
use common::*;

const K64: u64 = 64 << 10;

/// `base.img` (raw) <- `mid.qcow2` (512 B clusters) <- `top.qcow2` (2 MiB
/// clusters), 16 MiB each.
fn three_nodes(dir: &Path) -> std::path::PathBuf {
    qemu_img_in(dir, &["create", "-q", "-f", "raw", "base.img", "16M"]);
    overlay_with(
        dir,
        "mid.qcow2",
        Some(("base.img", "raw")),
        "16M",
        "cluster_size=512",
    );
    overlay_with(
        dir,
        "top.qcow2",
        Some(("mid.qcow2", "qcow2")),
        "16M",
        "cluster_size=2M",
    );
    dir.join("top.qcow2")
}

fn bitmaps(m: &Mounted) -> Vec<serde_json::Value> {
    listed(&m.mnt)
}

fn bitmap(m: &Mounted, node: &str, name: &str) -> serde_json::Value {
    listed_one(&m.mnt, node, name)
}

fn count(m: &Mounted, node: &str, name: &str) -> u64 {
    dirty_bytes(&m.mnt, node, name)
}

/// Writes one byte at each of `offsets` through `active`.
fn poke(m: &Mounted, offsets: &[u64]) {
    let active = open_rw(m, "active");
    for &offset in offsets {
        pwrite(&active, b"x", offset).unwrap();
    }
}

#[test]
fn writes_are_counted_at_the_granularity_and_listed() {
    let Some(f) = mounted(&[], three_nodes) else {
        return;
    };
    let m = f.m;
    assert_eq!(read_all(&m.path("ctl/bitmaps")), b"No dirty bitmaps\n");
    command(&m, "bitmap-add node=top.qcow2 name=b0 granularity=64K\n").unwrap();
    poke(&m, &[0, 5, 200 << 10, (1 << 20) + 3]);
    assert_eq!(count(&m, "top.qcow2", "b0"), 3 * K64);
    let listed = bitmap(&m, "top.qcow2", "b0");
    assert_eq!(listed["granularity"], K64);
    assert_eq!(listed["recording"], true);
    assert_eq!(listed["busy"], false);
    assert_eq!(listed["persistent"], false);
    assert_eq!(listed["inconsistent"], false);
    let text = String::from_utf8(read_all(&m.path("ctl/bitmaps"))).unwrap();
    assert_eq!(
        text,
        "top.qcow2 b0: granularity 65536, 196608 dirty bytes, recording\n"
    );
    // Write-zeroes and discards are writes too.
    let active = open_rw(&m, "active");
    punch_hole(&active, 4 << 20, 1).unwrap();
    assert_eq!(count(&m, "top.qcow2", "b0"), 4 * K64);
    // Only the node that is written records: a bitmap of a backing node
    // stays clean.
    command(&m, "bitmap-add node=mid.qcow2 name=below\n").unwrap();
    poke(&m, &[8 << 20]);
    assert_eq!(count(&m, "mid.qcow2", "below"), 0);
    assert_eq!(bitmap(&m, "mid.qcow2", "below")["recording"], false);
    assert_eq!(count(&m, "top.qcow2", "b0"), 5 * K64);
}

#[test]
fn the_default_granularity_is_the_cluster_size_within_4k_to_64k() {
    let Some(f) = mounted(&[], three_nodes) else {
        return;
    };
    let m = f.m;
    for node in ["base.img", "mid.qcow2", "top.qcow2"] {
        command(&m, &format!("bitmap-add node={node} name=d\n")).unwrap();
    }
    assert_eq!(bitmap(&m, "base.img", "d")["granularity"], K64);
    assert_eq!(bitmap(&m, "mid.qcow2", "d")["granularity"], 4096);
    assert_eq!(bitmap(&m, "top.qcow2", "d")["granularity"], K64);
    command(&m, "bitmap-add node=top.qcow2 name=fine granularity=512\n").unwrap();
    command(&m, "bitmap-add node=top.qcow2 name=coarse granularity=2G\n").unwrap();
    poke(&m, &[1000]);
    assert_eq!(count(&m, "top.qcow2", "fine"), 512);
    assert_eq!(count(&m, "top.qcow2", "coarse"), 2 << 30);
}

#[test]
fn every_refusal_has_its_errno() {
    let Some(f) = mounted(&[], three_nodes) else {
        return;
    };
    let m = f.m;
    command(&m, "bitmap-add node=top.qcow2 name=a\n").unwrap();
    let refused = [
        ("bitmap-add node=top.qcow2 name=a", libc::EEXIST),
        ("bitmap-add node=nowhere.qcow2 name=a", libc::ENOENT),
        (
            "bitmap-add node=top.qcow2 name=g granularity=256",
            libc::EINVAL,
        ),
        (
            "bitmap-add node=top.qcow2 name=g granularity=3000",
            libc::EINVAL,
        ),
        (
            "bitmap-add node=top.qcow2 name=g granularity=4G",
            libc::EINVAL,
        ),
        (
            "bitmap-add node=top.qcow2 name=g disabled=maybe",
            libc::EINVAL,
        ),
        (
            "bitmap-add node=base.img name=p persistent=on",
            libc::EINVAL,
        ),
        (
            "bitmap-add node=mid.qcow2 name=p persistent=on",
            libc::EINVAL,
        ),
        ("bitmap-add node=top.qcow2 name=", libc::EINVAL),
        ("bitmap-remove node=top.qcow2 name=b", libc::ENOENT),
        ("bitmap-clear node=top.qcow2 name=b", libc::ENOENT),
        ("bitmap-enable node=top.qcow2 name=b", libc::ENOENT),
        ("bitmap-disable node=top.qcow2 name=b", libc::ENOENT),
        ("bitmap-disable node=mid.qcow2 name=a", libc::ENOENT),
        (
            "bitmap-merge node=top.qcow2 target=b bitmaps=a",
            libc::ENOENT,
        ),
        (
            "bitmap-merge node=top.qcow2 target=a bitmaps=a,b",
            libc::ENOENT,
        ),
        ("bitmap-merge node=top.qcow2 target=a", libc::EINVAL),
        ("bitmap-frob node=top.qcow2 name=a", libc::EINVAL),
    ];
    for (text, errno) in refused {
        assert_eq!(command(&m, &format!("{text}\n")), Err(errno), "{text}");
    }
    assert_eq!(bitmaps(&m).len(), 1, "nothing refused was added");
}

#[test]
fn a_read_only_mount_refuses_every_bitmap_command() {
    if !tools::require_all(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = three_nodes(dir.path());
    let options = chainfs::fs::MountOptions {
        read_only: true,
        ..Default::default()
    };
    let m = mount(&top, &dir.path().join("mnt"), &options);
    for text in [
        "bitmap-add node=top.qcow2 name=a",
        "bitmap-remove node=top.qcow2 name=a",
        "bitmap-clear node=top.qcow2 name=a",
        "bitmap-enable node=top.qcow2 name=a",
        "bitmap-disable node=top.qcow2 name=a",
        "bitmap-merge node=top.qcow2 target=a bitmaps=b",
    ] {
        assert_eq!(
            command(&m, &format!("{text}\n")),
            Err(libc::EROFS),
            "{text}"
        );
    }
    m.unmount();
}

#[test]
fn enable_disable_clear_merge_and_remove() {
    let Some(f) = mounted(&[], three_nodes) else {
        return;
    };
    let m = f.m;
    command(
        &m,
        "bitmap-add node=top.qcow2 name=off granularity=64K disabled=on\n",
    )
    .unwrap();
    command(&m, "bitmap-add node=top.qcow2 name=on granularity=64K\n").unwrap();
    poke(&m, &[0]);
    assert_eq!(count(&m, "top.qcow2", "off"), 0);
    assert_eq!(bitmap(&m, "top.qcow2", "off")["recording"], false);
    command(&m, "bitmap-enable node=top.qcow2 name=off\n").unwrap();
    command(&m, "bitmap-disable node=top.qcow2 name=on\n").unwrap();
    poke(&m, &[K64]);
    assert_eq!(count(&m, "top.qcow2", "off"), K64);
    assert_eq!(count(&m, "top.qcow2", "on"), K64);
    // Merge: the union, the sources unchanged.
    command(
        &m,
        "bitmap-add node=top.qcow2 name=all granularity=4K disabled=on\n",
    )
    .unwrap();
    command(
        &m,
        "bitmap-merge node=top.qcow2 target=all bitmaps=off,on\n",
    )
    .unwrap();
    assert_eq!(count(&m, "top.qcow2", "all"), 2 * K64);
    assert_eq!(count(&m, "top.qcow2", "on"), K64);
    command(&m, "bitmap-clear node=top.qcow2 name=all\n").unwrap();
    assert_eq!(count(&m, "top.qcow2", "all"), 0);
    command(&m, "bitmap-remove node=top.qcow2 name=all\n").unwrap();
    assert_eq!(
        command(&m, "bitmap-remove node=top.qcow2 name=all\n"),
        Err(libc::ENOENT)
    );
    assert_eq!(bitmaps(&m).len(), 2);
}

#[test]
fn after_a_snapshot_the_old_nodes_bitmaps_stop_recording() {
    let Some(f) = mounted(&[], three_nodes) else {
        return;
    };
    let m = f.m;
    command(&m, "bitmap-add node=top.qcow2 name=old granularity=64K\n").unwrap();
    poke(&m, &[0]);
    let file = f.dir.path().join("snap.qcow2");
    command(&m, &format!("snapshot file={}\n", file.display())).unwrap();
    command(&m, "bitmap-add node=snap.qcow2 name=new granularity=64K\n").unwrap();
    poke(&m, &[K64, 2 * K64]);
    assert_eq!(count(&m, "top.qcow2", "old"), K64);
    assert_eq!(bitmap(&m, "top.qcow2", "old")["recording"], false);
    assert_eq!(count(&m, "snap.qcow2", "new"), 2 * K64);
    assert_eq!(bitmap(&m, "snap.qcow2", "new")["recording"], true);
}

/// QEMU's bitmaps belong to their node: one on the active node records
/// every guest write while jobs run beside it, and goes on recording after
/// them while the node stays active (a stream; a mirror soft-cancelled,
/// which leaves the node where it was).
#[test]
fn a_bitmap_on_the_active_node_records_across_a_mirror_and_a_stream() {
    let Some(f) = mounted(&[], three_nodes) else {
        return;
    };
    let m = f.m;
    command(&m, "bitmap-add node=active name=b granularity=64K\n").unwrap();
    let target = f.dir.path().join("copy.qcow2");
    let mirror = format!("mirror target={} id=mi\n", target.display());
    command(&m, &mirror).unwrap();
    poke(&m, &[0]);
    wait_ready(&m, "mi");
    poke(&m, &[K64]);
    command(&m, "cancel id=mi\n").unwrap();
    assert_eq!(wait_outcome(&m, "mi")["outcome"], "completed");
    // The mirror read the node and wrote elsewhere: only the guest's two
    // writes are dirty.
    assert_eq!(count(&m, "top.qcow2", "b"), 2 * K64);
    command(&m, "bitmap-clear node=active name=b\n").unwrap();
    // Nothing below the top holds data: the stream copies nothing, so
    // the guest's writes are all the bitmap may see.
    command(&m, "stream base=base.img id=st\n").unwrap();
    poke(&m, &[4 * K64]);
    assert_eq!(wait_outcome(&m, "st")["outcome"], "completed");
    poke(&m, &[8 * K64]);
    let b = bitmap(&m, "top.qcow2", "b");
    assert_eq!(b["recording"], true, "{b}");
    assert_eq!(count(&m, "top.qcow2", "b"), 2 * K64, "{b}");
}
