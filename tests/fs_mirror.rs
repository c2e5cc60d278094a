//! `mirror` through a real mount, the scenarios of qemu-iotests 041, 151
//! and 218: full, top and none into a new or an existing target, ready,
//! complete and its pivot, soft and forced cancel, pause and resume. The
//! writers racing a mirror are in `fs_mirror_writes.rs`.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::chain::base_and_overlay;
use common::mirror::*;
use common::mount::*;
use common::*;

#[test]
fn full_mirror_becomes_ready_and_complete_makes_the_target_the_active_layer() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let target = five.image("copy.img");
    let mut model = convert_to_raw(&five.top());
    let m = five.mount();
    let active = open_rw(&m, "active");
    let old_top = open_rw(&m, "file-E.img");
    command(&m, "mirror target=copy.img id=m").unwrap();
    // Created when the write returns, locked for writing, not yet shown.
    assert!(target.exists());
    assert!(
        !qemu_may_write(&target, "qcow2"),
        "the target is not locked"
    );
    assert!(!names_in(&m).contains(&"copy.img".to_string()));
    write_model(&active, &mut model, 5 << 20, &[0x51; 100_000]);
    let job = wait_ready(&m, "m");
    assert_eq!(job["status"], "ready", "{job}");
    assert_eq!(job["type"], "mirror");
    assert_eq!(job["target"], path_str(&target));
    assert_eq!(job["remaining"], 0);
    assert!(!events_named(&m, "BLOCK_JOB_READY").is_empty());
    write_model(&active, &mut model, (7 << 20) + 3, &[0x52; 65536]);
    write_model(&old_top, &mut model, 9 << 20, &[0x53; 4096]);
    command(&m, "complete id=m").unwrap();
    let job = wait_outcome(&m, "m");
    assert_eq!(job["outcome"], "completed", "{job}");
    // Nothing else is in the target's chain: every old node leaves.
    assert_eq!(names_in(&m), ["active", "copy.img", "ctl"]);
    assert!(read_all(&m.path("active")) == model, "a write was lost");
    // `active` handles follow the pivot; the old node takes no writes.
    write_model(&active, &mut model, 11 << 20, &[0x54; 8192]);
    assert!(read_all(&m.path("copy.img")) == model);
    assert_eq!(
        errno_of(old_top.write_at(&[1], 0), "write the old node"),
        libc::EROFS
    );
    assert!(
        !qemu_may_write(&target, "qcow2"),
        "the new node is not locked"
    );
    drop((active, old_top));
    m.unmount();
    qemu_img_check(&target);
    qemu_img_check(&five.top());
    assert_eq!(qemu_chain_names(&target), ["copy.img"]);
    assert_compare(&target, "qcow2", &model);
}

#[test]
fn an_odd_sized_node_is_mirrored_to_its_last_byte() {
    let Some(fixture) = mounted(&[], |dir| {
        let top = base_and_overlay(dir, "base.qcow2", "1025K", &["write -P 0x61 0 1025K"]);
        qemu_io(&top, "qcow2", &["write -P 0x62 1020K 5K", "write -z 4K 8K"]);
        top
    }) else {
        return;
    };
    let Fixture { dir, top, m } = fixture;
    let mut model = convert_to_raw(&top);
    assert_eq!(model.len(), 1025 << 10);
    let active = open_rw(&m, "active");
    command(&m, "mirror target=odd.qcow2 id=m").unwrap();
    wait_ready(&m, "m");
    write_model(&active, &mut model, (1025 << 10) - 1, &[0x63]);
    complete_and_compare(m, active, &model, &dir.path().join("odd.qcow2"));
}

#[test]
fn soft_cancel_after_ready_leaves_a_consistent_copy_and_the_chain_as_it_was() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let target = five.image("copy.img");
    let mut model = convert_to_raw(&five.top());
    let m = five.mount();
    let before = names_in(&m);
    let active = open_rw(&m, "active");
    command(&m, "mirror target=copy.img id=m").unwrap();
    wait_ready(&m, "m");
    write_model(&active, &mut model, 3 << 20, &[0x71; 70_000]);
    command(&m, "cancel id=m").unwrap();
    let job = wait_outcome(&m, "m");
    assert_eq!(
        job["outcome"], "completed",
        "a soft cancel completes: {job}"
    );
    assert_eq!(names_in(&m), before);
    assert!(read_all(&m.path("file-E.img")) == model);
    // Released when the job ended, not at unmount.
    assert!(qemu_may_write(&target, "qcow2"), "the target stays locked");
    assert_good_copy(&target, &model);
    drop(active);
    m.unmount();
    qemu_img_check(&five.top());
}

#[test]
fn force_cancel_after_ready_and_any_cancel_before_ready_abort() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let m = five.mount();
    let before = names_in(&m);
    command(&m, "mirror target=forced.img id=f").unwrap();
    wait_ready(&m, "f");
    command(&m, "cancel id=f force=on").unwrap();
    assert_eq!(wait_outcome(&m, "f")["outcome"], "cancelled");
    // Slow enough never to be ready before the cancel.
    command(&m, "mirror target=early.img id=e speed=64K").unwrap();
    assert_ne!(job(&m)["status"], "ready");
    command(&m, "cancel id=e").unwrap();
    let job = wait_outcome(&m, "e");
    assert_eq!(job["outcome"], "cancelled", "{job}");
    assert_eq!(job["ready"], false);
    assert!(!events_named(&m, "BLOCK_JOB_CANCELLED").is_empty());
    assert_eq!(names_in(&m), before);
    for name in ["forced.img", "early.img"] {
        let target = five.image(name);
        assert!(qemu_may_write(&target, "qcow2"), "{name} stays locked");
        qemu_img_check(&target);
    }
    m.unmount();
}

#[test]
fn pause_holds_the_offset_and_resume_completes() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let m = five.mount();
    command(&m, "mirror target=copy.img id=m speed=8M").unwrap();
    wait_job(&m, "m", |j| j["offset"].as_u64().unwrap() > 0);
    command(&m, "pause id=m").unwrap();
    let held = job(&m);
    assert_eq!(held["status"], "paused", "{held}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        job(&m)["offset"],
        held["offset"],
        "the offset moved while paused"
    );
    command(&m, "resume id=m").unwrap();
    command(&m, "set-speed id=m speed=0").unwrap();
    wait_ready(&m, "m");
    command(&m, "complete id=m").unwrap();
    assert_eq!(wait_outcome(&m, "m")["outcome"], "completed");
    let shown = read_all(&m.path("active"));
    m.unmount();
    qemu_img_check(&five.image("copy.img"));
    assert_compare(&five.image("copy.img"), "qcow2", &shown);
}

#[test]
fn sync_top_backs_the_target_by_the_nodes_backing_image() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let (m, model) = mirror_and_complete(&five, "sync=top");
    let mut names = FiveChain::names()[..4].to_vec();
    names.extend(["active", "copy.img", "ctl"]);
    names.sort();
    assert_eq!(names_in(&m), names);
    m.unmount();
    let target = five.image("copy.img");
    qemu_img_check(&target);
    let info = qemu_img_info_chain(&target);
    assert_eq!(
        info[0]["backing-filename"],
        path_str(&five.image("file-D.img"))
    );
    assert_eq!(
        qemu_chain_names(&target),
        [
            "copy.img",
            "file-D.img",
            "file-C.img",
            "file-B.img",
            "file-A.img"
        ]
    );
    assert_compare(&target, "qcow2", &model);
}

#[test]
fn sync_none_copies_only_new_writes_and_the_node_stays_below_the_target() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let (m, model) = mirror_and_complete(&five, "sync=none");
    let mut names = FiveChain::names().to_vec();
    names.extend(["active", "copy.img", "ctl"]);
    names.sort();
    assert_eq!(names_in(&m), names);
    let chain = String::from_utf8(read_all(&m.path("ctl/chain"))).unwrap();
    assert!(
        chain.starts_with(
            "file-A.img <- file-B.img <- file-C.img <- file-D.img <- file-E.img <- copy.img\n"
        ),
        "{chain}"
    );
    m.unmount();
    let target = five.image("copy.img");
    qemu_img_check(&target);
    qemu_img_check(&five.top());
    assert_eq!(qemu_chain_names(&target)[..2], ["copy.img", "file-E.img"]);
    assert_compare(&target, "qcow2", &model);
    // Only what was written during the job is in the target itself.
    let own_bytes: u64 = own_data(&target).map(|range| range.end - range.start).sum();
    assert!(
        own_bytes <= 4 << 20,
        "the target holds {own_bytes} bytes of its own"
    );
}

#[test]
fn a_node_below_the_active_one_is_replaced_and_the_node_above_is_rebacked() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let views = five.views();
    let m = five.mount();
    command(&m, "mirror node=file-D.img target=copy.img id=m").unwrap();
    wait_ready(&m, "m");
    command(&m, "complete id=m").unwrap();
    assert_eq!(wait_outcome(&m, "m")["outcome"], "completed");
    assert_eq!(names_in(&m), ["active", "copy.img", "ctl", "file-E.img"]);
    // A backing node now: shared for reading, nobody writing.
    assert!(!qemu_may_write(&five.image("copy.img"), "qcow2"));
    assert!(read_all(&m.path("copy.img")) == views[3]);
    assert!(read_all(&m.path("active")) == views[4]);
    m.unmount();
    let target = five.image("copy.img");
    qemu_img_check(&target);
    qemu_img_check(&five.top());
    assert_eq!(qemu_chain_names(&five.top()), ["file-E.img", "copy.img"]);
    assert!(convert_to_raw(&five.top()) == views[4]);
}

#[test]
fn an_existing_target_full_of_garbage_is_overwritten_whole() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let target = five.image("copy.img");
    create_qcow2(path_str(&target), "64M", "");
    qemu_io(&target, "qcow2", &["write -P 0xee 0 64M"]);
    let (m, model) = mirror_and_complete(&five, "mode=existing");
    m.unmount();
    assert_good_copy(&target, &model);
}

#[test]
fn garbage_where_no_node_holds_anything_becomes_zeros() {
    let Some(fixture) = mounted(&[], |dir| {
        let top = base_and_overlay(dir, "base.qcow2", "8M", &["write -P 0x41 1M 64K"]);
        qemu_io(&top, "qcow2", &["write -P 0x42 3M 64K"]);
        let target = dir.join("garbage.qcow2");
        create_qcow2(path_str(&target), "8M", "");
        qemu_io(&target, "qcow2", &["write -P 0xee 0 8M"]);
        top
    }) else {
        return;
    };
    let Fixture { dir, top, m } = fixture;
    let mut model = convert_to_raw(&top);
    let active = open_rw(&m, "active");
    command(&m, "mirror target=garbage.qcow2 mode=existing id=m").unwrap();
    wait_ready(&m, "m");
    // A discard after ready: the range reads as the base again, which
    // holds nothing there, so the target must hold zeros too.
    punch_hole(&active, 3 << 20, 64 << 10).unwrap();
    model[3 << 20..(3 << 20) + (64 << 10)].fill(0);
    active.write_all_at(&[0x43; 4096], 5 << 20).unwrap();
    model[5 << 20..(5 << 20) + 4096].fill(0x43);
    complete_and_compare(m, active, &model, &dir.path().join("garbage.qcow2"));
}

#[test]
fn existing_targets_for_top_and_none_keep_their_backing_file() {
    for (sync, backing) in [("top", "file-D.img"), ("none", "file-E.img")] {
        let Some(five) = FiveChain::gated(&[]) else {
            return;
        };
        let target = five.image("copy.img");
        qemu_img_in(
            five.dir.path(),
            &[
                "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", "copy.img",
            ],
        );
        let (m, model) = mirror_and_complete(&five, &format!("mode=existing sync={sync}"));
        m.unmount();
        qemu_img_check(&target);
        assert_eq!(qemu_chain_names(&target)[..2], ["copy.img", backing]);
        assert_compare(&target, "qcow2", &model);
    }
}

#[test]
fn a_raw_target_is_created_sparse_and_filled() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let (m, model) = mirror_and_complete(&five, "format=raw");
    m.unmount();
    let target = five.image("copy.img");
    assert!(std::fs::read(&target).unwrap() == model);
}

#[test]
fn a_granularity_above_the_copy_chunk_still_copies_every_byte() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let (m, model) = mirror_and_complete(&five, "granularity=8M");
    m.unmount();
    let target = five.image("copy.img");
    assert_good_copy(&target, &model);
}

#[test]
fn the_live_block_copy_by_snapshot_and_stream_and_by_mirror_ends_with_the_same_bytes() {
    let Some(by_stream) = FiveChain::gated(&[]) else {
        return;
    };
    let m = by_stream.mount();
    command(&m, "snapshot file=new.qcow2").unwrap();
    command(&m, "stream id=s").unwrap();
    assert_eq!(wait_outcome(&m, "s")["outcome"], "completed");
    assert_eq!(names_in(&m), ["active", "ctl", "new.qcow2"]);
    m.unmount();
    let by_mirror = FiveChain::build();
    let m = by_mirror.mount();
    command(&m, "mirror target=new.qcow2 id=m").unwrap();
    wait_ready(&m, "m");
    command(&m, "complete id=m").unwrap();
    assert_eq!(wait_outcome(&m, "m")["outcome"], "completed");
    assert_eq!(names_in(&m), ["active", "ctl", "new.qcow2"]);
    m.unmount();
    let (streamed, mirrored) = (by_stream.image("new.qcow2"), by_mirror.image("new.qcow2"));
    qemu_img_check(&streamed);
    qemu_img_check(&mirrored);
    assert_eq!(qemu_chain_names(&mirrored), ["new.qcow2"]);
    assert!(convert_to_raw(&streamed) == convert_to_raw(&mirrored));
    qemu_img(&["compare", path_str(&streamed), path_str(&mirrored)]);
}

#[test]
fn below_the_active_node_top_and_none_keep_the_chain_under_the_target() {
    for (sync, chain) in [
        (
            "top",
            &[
                "file-E.img",
                "copy.img",
                "file-C.img",
                "file-B.img",
                "file-A.img",
            ][..],
        ),
        (
            "none",
            &[
                "file-E.img",
                "copy.img",
                "file-D.img",
                "file-C.img",
                "file-B.img",
                "file-A.img",
            ][..],
        ),
    ] {
        let Some(five) = FiveChain::gated(&[]) else {
            return;
        };
        let views = five.views();
        let m = five.mount();
        command(
            &m,
            &format!("mirror node=file-D.img target=copy.img sync={sync} id=m"),
        )
        .unwrap();
        wait_ready(&m, "m");
        command(&m, "complete id=m").unwrap();
        assert_eq!(wait_outcome(&m, "m")["outcome"], "completed");
        let mut names: Vec<&str> = chain.to_vec();
        names.extend(["active", "ctl"]);
        names.sort();
        assert_eq!(names_in(&m), names, "sync={sync}");
        assert!(read_all(&m.path("copy.img")) == views[3], "sync={sync}");
        assert!(read_all(&m.path("active")) == views[4], "sync={sync}");
        m.unmount();
        qemu_img_check(&five.image("copy.img"));
        qemu_img_check(&five.top());
        assert_eq!(qemu_chain_names(&five.top()), chain, "sync={sync}");
        assert!(convert_to_raw(&five.top()) == views[4], "sync={sync}");
    }
}

#[test]
fn a_target_named_like_a_node_that_stays_gets_a_unique_name() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    std::fs::create_dir(five.dir.path().join("new")).unwrap();
    let m = five.mount();
    command(&m, "mirror target=new/file-E.img sync=none id=m").unwrap();
    wait_ready(&m, "m");
    command(&m, "complete id=m").unwrap();
    assert_eq!(wait_outcome(&m, "m")["outcome"], "completed");
    let names = names_in(&m);
    assert!(names.contains(&"file-E.img".to_string()), "{names:?}");
    assert!(names.contains(&"file-E.img~2".to_string()), "{names:?}");
    let chain = String::from_utf8(read_all(&m.path("ctl/chain"))).unwrap();
    assert!(
        chain.starts_with(
            "file-A.img <- file-B.img <- file-C.img <- file-D.img <- file-E.img <- file-E.img~2\n"
        ),
        "{chain}"
    );
    let shown = read_all(&m.path("active"));
    assert!(read_all(&m.path("file-E.img~2")) == shown);
    m.unmount();
    let target = five.dir.path().join("new/file-E.img");
    assert_good_copy(&target, &shown);
}
