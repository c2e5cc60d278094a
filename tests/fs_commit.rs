//! `commit` through a real mount, QEMU's commit scenarios (qemu-iotests 040
//! and its neighbours): intermediate commits that merge down and reback,
//! active commits that become ready, pivot, or are cancelled, with QEMU's
//! own tools as the oracles.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::mount::*;
use common::*;

/// Every node file of the mount equals `qemu-img convert` of its image.
fn assert_node_files_match_qemu(five: &FiveChain, names: &[&str], views: &[Vec<u8>]) {
    for (name, view) in names.iter().zip(views) {
        assert!(
            convert_to_raw(&five.image(name)) == *view,
            "{name}: qemu-img convert differs from what the mount showed"
        );
    }
}

#[test]
fn intermediate_commit_merges_into_a_middle_base_and_rebacks_the_node_above() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let before = five.views();
    let m = five.mount();
    let hidden = File::open(m.path("file-C.img")).unwrap();
    let departing = File::open(m.path("file-D.img")).unwrap();
    // The kernel may cache a backing node's pages; the base's must go.
    assert!(read_all(&m.path("file-B.img")) == before[1]);
    command(&m, "commit top=file-D.img base=file-B.img id=c1\n").unwrap();
    // The intermediate leaves the mount when the command returns.
    assert!(!names_in(&m).contains(&"file-C.img".to_string()));
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        errno_of(hidden.read_at(&mut buf, 0), "read a hidden node"),
        libc::EIO
    );
    let chain = String::from_utf8(read_all(&m.path("ctl/chain"))).unwrap();
    assert!(
        chain
            .lines()
            .any(|l| l.starts_with("file-C.img:") && l.ends_with(" hidden")),
        "{chain}"
    );
    let job = wait_outcome(&m, "c1");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert_eq!(job["type"], "commit");
    assert_eq!(job["offset"], job["len"]);
    assert_eq!(
        names_in(&m),
        ["active", "ctl", "file-A.img", "file-B.img", "file-E.img"]
    );
    // Base now shows what the top showed: C's and D's data and D's zeros
    // over B's own, with B's own data where neither held anything.
    let base = read_all(&m.path("file-B.img"));
    assert!(
        base == before[3],
        "the base does not show the old top's view"
    );
    assert_eq!(base[30 << 20], 0xb2);
    assert_eq!(base[32 << 20], 0xc2);
    assert_eq!(base[33 << 20], 0xd2);
    assert!(base[3 << 20..4 << 20].iter().all(|&b| b == 0), "D's zeros");
    assert!(read_all(&m.path("file-E.img")) == before[4]);
    assert!(read_all(&m.path("file-A.img")) == before[0]);
    let mut held = vec![0u8; FIVE_SIZE as usize];
    departing.read_exact_at(&mut held, 0).unwrap();
    assert!(
        held == before[3],
        "a handle on the old top reads what it held"
    );
    assert!(event_names(&m).iter().any(|e| e == "CHAIN_CHANGED"));
    drop((hidden, departing));
    m.unmount();
    for name in ["file-B.img", "file-E.img"] {
        common::qemu_img_check(&five.image(name));
    }
    assert_eq!(
        qemu_chain_names(&five.top()),
        ["file-E.img", "file-B.img", "file-A.img"]
    );
    assert_node_files_match_qemu(
        &five,
        &["file-A.img", "file-B.img", "file-E.img"],
        &[before[0].clone(), before[3].clone(), before[4].clone()],
    );
}

#[test]
fn active_commit_becomes_ready_and_complete_pivots_onto_the_base() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let mut model = convert_to_raw(&five.top());
    let m = five.mount();
    let active = open_rw(&m, "active");
    let old_top = open_rw(&m, "file-E.img");
    command(&m, "commit top=active base=file-B.img id=a1").unwrap();
    assert_eq!(
        names_in(&m),
        ["active", "ctl", "file-A.img", "file-B.img", "file-E.img"]
    );
    write_model(&active, &mut model, 5 << 20, &[0x51; 100_000]);
    let job = wait_ready(&m, "a1");
    assert_eq!(job["status"], "ready", "{job}");
    assert_eq!(job["ready"], true);
    assert_eq!(job["remaining"], 0);
    assert!(event_names(&m).iter().any(|e| e == "BLOCK_JOB_READY"));
    // Kept in step after ready.
    write_model(&active, &mut model, 7 << 20, &[0x52; 65536]);
    write_model(&old_top, &mut model, 9 << 20, &[0x53; 4096]);
    command(&m, "complete id=a1").unwrap();
    let job = wait_outcome(&m, "a1");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert_eq!(names_in(&m), ["active", "ctl", "file-A.img", "file-B.img"]);
    let chain = String::from_utf8(read_all(&m.path("ctl/chain"))).unwrap();
    assert!(chain.starts_with("file-A.img <- file-B.img\n"), "{chain}");
    assert!(read_all(&m.path("active")) == model, "a write was lost");
    // The `active` handle opened before the pivot now writes the base.
    write_model(&active, &mut model, 11 << 20, &[0x54; 8192]);
    assert!(read_all(&m.path("file-B.img")) == model);
    assert_eq!(
        errno_of(old_top.write_at(&[1], 0), "write the old top"),
        libc::EROFS
    );
    drop((active, old_top));
    m.unmount();
    common::qemu_img_check(&five.image("file-B.img"));
    common::qemu_img_check(&five.top());
    assert_eq!(
        qemu_chain_names(&five.image("file-B.img")),
        ["file-B.img", "file-A.img"]
    );
    assert!(convert_to_raw(&five.image("file-B.img")) == model);
}

#[test]
fn soft_cancel_after_ready_finishes_the_copy_without_a_pivot() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let mut model = convert_to_raw(&five.top());
    let m = five.mount();
    let active = open_rw(&m, "active");
    command(&m, "commit top=active base=file-C.img id=s1").unwrap();
    wait_ready(&m, "s1");
    write_model(&active, &mut model, 13 << 20, &[0x61; 300_000]);
    command(&m, "cancel id=s1").unwrap();
    let job = wait_outcome(&m, "s1");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert_eq!(
        names_in(&m),
        [
            "active",
            "ctl",
            "file-A.img",
            "file-B.img",
            "file-C.img",
            "file-E.img"
        ],
        "no pivot; the intermediate stays hidden"
    );
    assert!(read_all(&m.path("active")) == model);
    assert!(
        read_all(&m.path("file-C.img")) == model,
        "the base is a copy as of the cancel"
    );
    write_model(&active, &mut model, 0, &[0x62; 4096]);
    drop(active);
    m.unmount();
    common::qemu_img_check(&five.image("file-C.img"));
    common::qemu_img_check(&five.top());
    assert_eq!(
        qemu_chain_names(&five.top()),
        [
            "file-E.img",
            "file-D.img",
            "file-C.img",
            "file-B.img",
            "file-A.img"
        ]
    );
    assert!(convert_to_raw(&five.top()) == model);
}

#[test]
fn force_cancel_after_ready_and_cancel_before_ready_abort() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let mut model = convert_to_raw(&five.top());
    let m = five.mount();
    let active = open_rw(&m, "active");
    command(&m, "commit top=active base=file-B.img id=f1").unwrap();
    wait_ready(&m, "f1");
    write_model(&active, &mut model, 17 << 20, &[0x71; 70_000]);
    command(&m, "cancel id=f1 force=on").unwrap();
    let job = wait_outcome(&m, "f1");
    assert_eq!(job["outcome"], "cancelled", "{job}");
    // Before ready: a slow commit that cannot get there in time.
    command(&m, "commit top=active base=file-B.img id=f2 speed=64k").unwrap();
    let job = wait_job(&m, "f2", |job| job["offset"].as_u64() > Some(0));
    assert_eq!(job["ready"], false, "{job}");
    assert!(job["remaining"].as_u64() > Some(0), "{job}");
    command(&m, "pause id=f2").unwrap();
    let held = status_json(&m)[1]["offset"].clone();
    assert_eq!(status_json(&m)[1]["status"], "paused");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status_json(&m)[1]["offset"], held, "a paused commit moved");
    command(&m, "resume id=f2").unwrap();
    assert_eq!(status_json(&m)[1]["status"], "running");
    assert_eq!(command(&m, "complete id=f2"), Err(libc::EBUSY));
    command(&m, "cancel id=f2").unwrap();
    let job = wait_outcome(&m, "f2");
    assert_eq!(job["outcome"], "cancelled", "{job}");
    assert!(read_all(&m.path("active")) == model);
    drop(active);
    m.unmount();
    common::qemu_img_check(&five.image("file-B.img"));
    common::qemu_img_check(&five.top());
    assert_eq!(
        qemu_chain_names(&five.top()),
        [
            "file-E.img",
            "file-D.img",
            "file-C.img",
            "file-B.img",
            "file-A.img"
        ],
        "every backing pointer as it was"
    );
    assert!(convert_to_raw(&five.top()) == model);
}

#[test]
fn impossible_commits_are_refused_with_their_errno() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let m = five.mount();
    for (text, errno) in [
        ("commit top=file-B.img base=file-D.img", libc::EINVAL),
        ("commit top=file-C.img base=file-C.img", libc::EINVAL),
        (
            "commit top=active base=file-B.img backing-file=x.img",
            libc::EINVAL,
        ),
        ("commit top=file-D.img", libc::EINVAL),
        ("commit top=nope.img base=file-B.img", libc::ENOENT),
        ("commit top=active base=nope.img", libc::ENOENT),
        (
            "commit top=active base=file-B.img copy-mode=eager",
            libc::EINVAL,
        ),
    ] {
        assert_eq!(command(&m, text), Err(errno), "{text}");
        let last = events(&m).last().cloned().unwrap();
        assert_eq!(last["event"], "COMMAND_REJECTED", "{text}");
    }
    command(&m, "stream node=file-D.img base=file-B.img id=st speed=64k").unwrap();
    assert_eq!(command(&m, "complete id=st"), Err(libc::EBUSY));
    assert_eq!(
        command(&m, "commit top=active base=file-C.img"),
        Err(libc::EBUSY),
        "the commit would touch the stream's node"
    );
    command(&m, "cancel id=st").unwrap();
    wait_outcome(&m, "st");
    m.unmount();
    let read_only = mount(
        &five.top(),
        &five.dir.path().join("ro"),
        &chainfs::fs::MountOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert_eq!(
        command(&read_only, "commit top=active base=file-B.img"),
        Err(libc::EROFS)
    );
    read_only.unmount();
}

/// fio (4 jobs, crc32c) writes `active` while an active commit in
/// `copy_mode` becomes ready and completes; fio then verifies what it wrote
/// through the pivot, and after unmount the new top equals what `active`
/// showed.
fn fio_through_ready_and_complete(copy_mode: &str) {
    let Some(five) = FiveChain::gated(&["fio"]) else {
        return;
    };
    let m = five.mount();
    command(
        &m,
        &format!("commit top=active base=file-B.img id=f copy-mode={copy_mode}"),
    )
    .unwrap();
    let fio = fio_verify_live(&m.path("active"));
    let job = wait_ready(&m, "f");
    assert_eq!(job["status"], "ready", "{job}");
    command(&m, "complete id=f").unwrap();
    let job = wait_outcome(&m, "f");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert!(
        !fio.is_finished(),
        "fio ended before the pivot: the test raced nothing"
    );
    let output = fio.join().unwrap();
    assert!(
        output.status.success(),
        "fio failed across the commit:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(names_in(&m), ["active", "ctl", "file-A.img", "file-B.img"]);
    let shown = read_all(&m.path("active"));
    m.unmount();
    common::qemu_img_check(&five.image("file-B.img"));
    assert!(
        convert_to_raw(&five.image("file-B.img")) == shown,
        "the new top differs from what active showed"
    );
}

#[test]
fn fio_verifies_across_an_active_commit_in_the_background() {
    fio_through_ready_and_complete("background");
}

#[test]
fn fio_verifies_across_an_active_commit_with_blocking_writes() {
    fio_through_ready_and_complete("write-blocking");
}

/// qemu-iotests 040's layout, base <- mid <- top (4 MiB, qcow2): base and
/// mid write at different offsets, and mid discards some of base's data.
fn qemu_iotests_040_chain(dir: &std::path::Path) -> std::path::PathBuf {
    let at = |name: &str| dir.join(name);
    create_qcow2(path_str(&at("base.qcow2")), "4M", "");
    create_overlay(&at("mid.qcow2"), ("base.qcow2", "qcow2"), None, "");
    create_overlay(&at("top.qcow2"), ("mid.qcow2", "qcow2"), None, "");
    let base_writes = ["write -P 0xab 0 512k", "write -P 0xcd 2M 1M"];
    qemu_io(&at("base.qcow2"), "qcow2", &base_writes);
    qemu_io(
        &at("mid.qcow2"),
        "qcow2",
        &["write -P 0xef 512k 512k", "discard 2M 1M"],
    );
    at("top.qcow2")
}

#[test]
fn patterns_of_base_and_mid_both_land_in_the_base_and_a_discard_in_mid_zeroes_it() {
    let Some(Fixture { dir, top, m }) = mounted(&[], qemu_iotests_040_chain) else {
        return;
    };
    let at = |name: &str| dir.path().join(name);
    // Read while mounted (-U): chainfs has written nothing yet.
    let top_before = convert_to_raw(&top);
    command(&m, "commit top=mid.qcow2 base=base.qcow2 id=c").unwrap();
    let job = wait_outcome(&m, "c");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert!(
        read_all(&m.path("top.qcow2")) == top_before,
        "the top's view changed"
    );
    let base = read_all(&m.path("base.qcow2"));
    assert!(
        base[..512 << 10].iter().all(|&b| b == 0xab),
        "base's own pattern"
    );
    assert!(
        base[512 << 10..1 << 20].iter().all(|&b| b == 0xef),
        "mid's pattern"
    );
    assert!(
        base[2 << 20..3 << 20].iter().all(|&b| b == 0),
        "mid's discard"
    );
    m.unmount();
    common::qemu_img_check(&at("base.qcow2"));
    common::qemu_img_check(&at("top.qcow2"));
    let chain = qemu_chain_names(&at("top.qcow2"));
    assert_eq!(chain, ["top.qcow2", "base.qcow2"]);
    // Whole clusters became zeros in the base, not written zero bytes.
    let map = common::qemu_img(&[
        "map",
        "-U",
        "--output=json",
        common::path_str(&at("base.qcow2")),
    ]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let at_2m = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap();
            start <= 2 << 20 && 2 << 20 < start + e["length"].as_u64().unwrap()
        })
        .cloned()
        .unwrap();
    assert_eq!(at_2m["zero"], true, "{map}");
    assert_eq!(at_2m["data"], false, "{map}");
    let qemu_base = convert_to_raw(&at("base.qcow2"));
    assert!(qemu_base == base, "qemu-img convert of the base differs");
    assert!(convert_to_raw(&at("top.qcow2")) == top_before);
}

#[test]
fn complete_is_accepted_in_standby_and_pivots_on_resume() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let model = convert_to_raw(&five.top());
    let m = five.mount();
    command(&m, "commit top=active base=file-D.img id=sb").unwrap();
    wait_ready(&m, "sb");
    command(&m, "pause id=sb").unwrap();
    assert_eq!(status_json(&m)[0]["status"], "standby");
    command(&m, "complete id=sb").unwrap();
    assert_eq!(
        status_json(&m)[0]["status"],
        "standby",
        "parked until resumed"
    );
    command(&m, "resume id=sb").unwrap();
    let job = wait_outcome(&m, "sb");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert_eq!(
        names_in(&m),
        [
            "active",
            "ctl",
            "file-A.img",
            "file-B.img",
            "file-C.img",
            "file-D.img"
        ]
    );
    assert!(read_all(&m.path("active")) == model);
    m.unmount();
    common::qemu_img_check(&five.image("file-D.img"));
    assert!(convert_to_raw(&five.image("file-D.img")) == model);
}
