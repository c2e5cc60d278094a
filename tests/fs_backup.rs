//! `backup` through a real mount, the scenarios of qemu-iotests 055 and
//! 056: a full backup is the disk as it was when the job started whatever
//! is written meanwhile (writes, write-zeroes and discards, through
//! `active` and the node's own file), `top` and `none` (fleecing), and
//! the refusals. Bitmaps and incremental chains are in
//! `fs_backup_bitmaps.rs`.

mod common;

use std::os::unix::fs::FileExt;

use common::backup::*;
use common::mirror::{assert_good_copy, own_data};
use common::mount::*;
use common::*;

#[test]
fn full_backup_is_the_disk_at_its_start_whatever_is_written_meanwhile() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let target = five.image("full.qcow2");
    let m = five.mount();
    let active = open_rw(&m, "active");
    let node_file = open_rw(&m, "file-E.img");
    let before = read_all(&m.path("active"));
    let mut model = before.clone();
    command(&m, "backup target=full.qcow2 sync=full speed=1M id=b").unwrap();
    assert!(target.exists(), "created when the write returns");
    assert!(
        !qemu_may_write(&target, "qcow2"),
        "the target is not locked"
    );
    // Paused, the job copies nothing; every write below must first copy
    // what it overwrites.
    command(&m, "pause id=b").unwrap();
    write_model(&active, &mut model, 0, &[0x61; 300_000]);
    write_model(&active, &mut model, (3 << 20) + 17, &[0x62; 2 << 20]);
    write_model(&node_file, &mut model, 40 << 20, &[0x63; 70_000]);
    write_model(&active, &mut model, (3 << 20) + 4096, &[0x64; 4096]);
    punch_hole(&active, 1 << 20, 3 << 20).unwrap();
    model[1 << 20..4 << 20].fill(0);
    zero_range(&node_file, 20 << 20, (2 << 20) + 5).unwrap();
    model[20 << 20..(22 << 20) + 5].fill(0);
    assert_eq!(job(&m)["status"], "paused");
    command(&m, "resume id=b").unwrap();
    write_model(&active, &mut model, 63 << 20, &[0x65; 1 << 20]);
    command(&m, "set-speed id=b speed=0").unwrap();
    let job = wait_outcome(&m, "b");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert_eq!(job["type"], "backup");
    assert_eq!(job["target"], path_str(&target));
    assert_eq!(job["offset"], job["len"]);
    assert!(
        job["len"].as_u64().unwrap() <= FIVE_SIZE,
        "a cluster was copied twice: {job}"
    );
    let done = events_named(&m, "BLOCK_JOB_COMPLETED");
    assert_eq!(done[0]["data"]["type"], "backup", "{done:?}");
    assert!(
        read_all(&m.path("active")) == model,
        "a guest write was lost"
    );
    assert!(qemu_may_write(&target, "qcow2"), "the target stays locked");
    drop((active, node_file));
    m.unmount();
    assert_good_copy(&target, &before);
    qemu_img_check(&five.top());
}

#[test]
fn a_snapshot_during_a_backup_leaves_it_its_point_in_time() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let target = five.image("snap-full.qcow2");
    let m = five.mount();
    let active = open_rw(&m, "active");
    let before = read_all(&m.path("active"));
    command(&m, "backup target=snap-full.qcow2 sync=full speed=1M id=b").unwrap();
    active.write_all_at(&[0xa1; 100_000], 30 << 20).unwrap();
    // From the pivot on, the backed-up node takes no writes.
    command(&m, "snapshot file=new-top.qcow2").unwrap();
    active.write_all_at(&[0xa2; 1 << 20], 0).unwrap();
    command(&m, "set-speed id=b speed=0").unwrap();
    let job = wait_outcome(&m, "b");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert_eq!(job["node"], "file-E.img");
    drop(active);
    m.unmount();
    assert_good_copy(&target, &before);
    qemu_img_check(&five.image("new-top.qcow2"));
}

#[test]
fn a_commit_into_the_backed_up_node_copies_before_it_writes_too() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let target = five.image("b-full.qcow2");
    let m = five.mount();
    let before = read_all(&m.path("file-B.img"));
    command(
        &m,
        "backup node=file-B.img target=b-full.qcow2 sync=full speed=64K id=b",
    )
    .unwrap();
    // A backup only reads its node: a commit into it may run beside it,
    // and each of its copies into B first saves what B showed.
    command(&m, "commit top=file-D.img base=file-B.img id=c").unwrap();
    assert_eq!(wait_outcome(&m, "c")["outcome"], "completed");
    assert!(
        read_all(&m.path("file-B.img")) != before,
        "the commit changed nothing"
    );
    command(&m, "set-speed id=b speed=0").unwrap();
    assert_eq!(wait_outcome(&m, "b")["outcome"], "completed");
    m.unmount();
    assert_good_copy(&target, &before);
    qemu_img_check(&five.image("file-B.img"));
}

#[test]
fn top_backup_backed_by_the_nodes_backing_equals_the_node() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let created = five.image("top.qcow2");
    let existing = five.image("top-existing.qcow2");
    let d = five.image("file-D.img");
    create_overlay(&existing, (path_str(&d), "qcow2"), None, "");
    let m = five.mount();
    let active = open_rw(&m, "active");
    let before = read_all(&m.path("active"));
    let mut model = before.clone();
    command(&m, "backup target=top.qcow2 sync=top speed=64K id=t").unwrap();
    command(
        &m,
        "backup target=top-existing.qcow2 sync=top mode=existing id=e",
    )
    .unwrap();
    // Over what E holds, what it does not, and its zero cluster.
    write_model(&active, &mut model, 3584 << 10, &[0x71; 1 << 20]);
    write_model(&active, &mut model, 10 << 20, &[0x72; 4096]);
    write_model(&active, &mut model, 2560 << 10, &[0x73; 4096]);
    command(&m, "set-speed id=t speed=0").unwrap();
    for id in ["t", "e"] {
        let job = wait_outcome(&m, id);
        assert_eq!(job["outcome"], "completed", "{job}");
    }
    drop(active);
    m.unmount();
    for target in [&created, &existing] {
        let chain = qemu_img_info_chain(target);
        assert_eq!(chain[1]["filename"], path_str(&d), "{chain:?}");
        assert_good_copy(target, &before);
        // Only what E held, never what its backing already shows.
        let held: Vec<_> = own_data(target).collect();
        let e_held = [
            3584 << 10..4608 << 10,
            40 << 20..(40 << 20) + 65536,
            63 << 20..64 << 20,
        ];
        assert_eq!(held, e_held);
    }
}

#[test]
fn none_backup_keeps_the_old_data_of_what_the_guest_overwrites() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let fleece = five.image("fleece.qcow2");
    let m = five.mount();
    let active = open_rw(&m, "active");
    let before = read_all(&m.path("active"));
    command(&m, "backup target=fleece.qcow2 sync=none id=f").unwrap();
    active.write_all_at(&[0x81; 1 << 20], 40 << 20).unwrap();
    active.write_all_at(&[0x82; 5000], 100).unwrap();
    punch_hole(&active, 2 << 20, 2 << 20).unwrap();
    zero_range(&active, 63 << 20, 1 << 20).unwrap();
    // The job waits for a cancel (QEMU's fleecing job does too).
    wait_job(&m, "f", |job| job["status"] == "running");
    command(&m, "cancel id=f").unwrap();
    let job = wait_outcome(&m, "f");
    assert_eq!(job["outcome"], "cancelled", "{job}");
    assert_eq!(events_named(&m, "BLOCK_JOB_CANCELLED").len(), 1);
    assert!(job["offset"].as_u64().unwrap() >= 4 << 20, "{job}");
    drop(active);
    m.unmount();
    let chain = qemu_img_info_chain(&fleece);
    assert_eq!(chain[1]["filename"], path_str(&five.top()), "{chain:?}");
    assert_good_copy(&fleece, &before);
}

#[test]
fn compressed_backup_writes_compressed_clusters_qemu_reads() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let target = five.image("compressed.qcow2");
    let m = five.mount();
    let active = open_rw(&m, "active");
    let before = read_all(&m.path("active"));
    command(
        &m,
        "backup target=compressed.qcow2 sync=full compress=on speed=1M id=c",
    )
    .unwrap();
    command(&m, "pause id=c").unwrap();
    active.write_all_at(&[0x91; 1 << 20], 40 << 20).unwrap();
    punch_hole(&active, 0, 1 << 20).unwrap();
    command(&m, "resume id=c").unwrap();
    command(&m, "set-speed id=c speed=0").unwrap();
    assert_eq!(wait_outcome(&m, "c")["outcome"], "completed");
    drop(active);
    m.unmount();
    assert_good_copy(&target, &before);
    let map = qemu_img(&["map", "-U", "--output=json", path_str(&target)]);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let compressed: u64 = extents
        .iter()
        .filter(|e| e["compressed"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(compressed >= 4 << 20, "{map}");
}

#[test]
fn refusals_say_why_with_qemus_errnos() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let small = five.image("small.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&small), "1M"]);
    std::fs::write(five.image("exists.qcow2"), b"x").unwrap();
    let d = five.image("file-D.img");
    qemu_img(&["bitmap", "--add", path_str(&d), "stored"]);
    let m = five.mount();
    command(&m, "bitmap-add node=active name=b0").unwrap();
    for (words, errno) in [
        ("target=small.qcow2 sync=full mode=existing", libc::EINVAL),
        ("target=file-C.img sync=full mode=existing", libc::EINVAL),
        ("target=file-C.img sync=full", libc::EINVAL),
        ("target=missing.qcow2 sync=full mode=existing", libc::ENOENT),
        ("target=exists.qcow2 sync=full", libc::EEXIST),
        (
            "target=x.qcow2 sync=full bitmap=nope bitmap-mode=always",
            libc::ENOENT,
        ),
        ("target=x.qcow2 sync=full node=nope", libc::ENOENT),
        ("target=x.qcow2 sync=bitmap", libc::EINVAL),
        ("target=x.qcow2 sync=bitmap bitmap=b0", libc::EINVAL),
        ("target=x.qcow2 sync=full bitmap=b0", libc::EINVAL),
        (
            "target=x.qcow2 sync=full bitmap=b0 bitmap-mode=never",
            libc::EINVAL,
        ),
        (
            "target=x.qcow2 sync=none bitmap=b0 bitmap-mode=always",
            libc::EINVAL,
        ),
        (
            "target=x.qcow2 sync=incremental bitmap=b0 bitmap-mode=always",
            libc::EINVAL,
        ),
        ("target=x.qcow2 sync=full bitmap-mode=always", libc::EINVAL),
        ("target=x.qcow2 sync=top format=raw", libc::EINVAL),
        ("target=x.qcow2 sync=full speed=fast", libc::EINVAL),
        (
            "target=x.qcow2 sync=full compress=on format=raw",
            libc::EINVAL,
        ),
    ] {
        assert_eq!(
            command(&m, &format!("backup {words}")),
            Err(errno),
            "{words}"
        );
    }
    assert!(
        !five.image("x.qcow2").exists(),
        "a refused command left its target"
    );
    // A bitmap stored in a read-only node can be read, never changed.
    let on_d = "node=file-D.img target=d.qcow2 bitmap=stored";
    assert_eq!(
        command(
            &m,
            &format!("backup {on_d} sync=full bitmap-mode=on-success")
        ),
        Err(libc::EINVAL)
    );
    let job = backup_to_end(&m, &format!("{on_d} sync=bitmap bitmap-mode=never"), "d");
    assert_eq!(job["outcome"], "completed", "{job}");
    // A bitmap in use is busy for every change and for another backup.
    open_rw(&m, "active")
        .write_all_at(&[1; 3 << 20], 0)
        .unwrap();
    command(
        &m,
        "backup target=inc.qcow2 sync=incremental bitmap=b0 speed=1 id=i",
    )
    .unwrap();
    command(&m, "bitmap-add node=active name=b1").unwrap();
    for words in [
        "bitmap-remove node=active name=b0",
        "bitmap-clear node=active name=b0",
        "bitmap-merge node=active target=b0 bitmaps=b1",
        "backup target=y.qcow2 sync=incremental bitmap=b0",
    ] {
        assert_eq!(command(&m, words), Err(libc::EBUSY), "{words}");
    }
    command(&m, "bitmap-merge node=active target=b1 bitmaps=b0").unwrap();
    // Only a job that removes the node conflicts with a backup of it.
    assert_eq!(
        command(&m, "commit top=active base=file-D.img"),
        Err(libc::EBUSY)
    );
    assert_eq!(
        command(&m, "backup target=inc.qcow2 sync=full"),
        Err(libc::EEXIST)
    );
    command(&m, "backup target=second.qcow2 sync=full speed=1 id=s").unwrap();
    command(&m, "stream node=active base=file-C.img speed=1 id=st").unwrap();
    for id in ["i", "s", "st"] {
        command(&m, &format!("cancel id={id}")).unwrap();
        assert_eq!(wait_outcome(&m, id)["outcome"], "cancelled");
    }
    assert_eq!(
        bitmaps::listed_one(&m.mnt, "file-E.img", "b0")["busy"],
        false
    );
    m.unmount();
    for name in ["inc.qcow2", "second.qcow2", "d.qcow2"] {
        qemu_img_check(&five.image(name));
    }
}
