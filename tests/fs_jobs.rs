//! Live jobs through a real mount: commands written to `ctl/command`,
//! watched in `ctl/status`, `status.json`, `events` and `chain`, while
//! `active` keeps being read and written; QEMU's tools check the result.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::mount::*;
use common::*;

/// Writes `count` 64 KiB patterns through `file` while a job runs;
/// records them in `model`.
fn write_during(file: &File, model: &mut [u8], count: u64) {
    for i in 0..count {
        let offset = (i * 7_340_033) % (FIVE_SIZE - 65536);
        write_model(file, model, offset, &[0x70 + (i % 16) as u8; 65536]);
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stream_to_the_base_while_active_is_written_keeps_every_write() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let mut model = convert_to_raw(&five.top());
    let d_before = convert_to_raw(&five.image("file-D.img"));
    let m = five.mount();
    command(&m, "stream base=file-A.img speed=16M\n").unwrap();
    let listed = status_json(&m);
    assert_eq!(
        listed[0]["type"], "stream",
        "the job shows when write returns: {listed}"
    );
    assert!(read_all(&m.path("ctl/status"))
        .starts_with(b"stream0: stream node=file-E.img base=file-A.img"));
    let active = open_rw(&m, "active");
    let reader = File::open(m.path("file-D.img")).unwrap();
    write_during(&active, &mut model, 60);
    let jobs = wait_jobs(&m);
    assert_eq!(jobs[0]["outcome"], "completed", "{jobs:?}");
    assert_eq!(jobs[0]["offset"], jobs[0]["len"]);
    assert_eq!(names_in(&m), ["active", "ctl", "file-A.img", "file-E.img"]);
    assert_eq!(
        errno_of(
            std::fs::metadata(m.path("file-C.img")),
            "stat departed node"
        ),
        libc::ENOENT
    );
    let mut held = vec![0u8; FIVE_SIZE as usize];
    reader.read_exact_at(&mut held, 0).unwrap();
    assert!(
        held == d_before,
        "an open handle on a departed node reads what it held"
    );
    let chain = String::from_utf8(read_all(&m.path("ctl/chain"))).unwrap();
    assert!(chain.starts_with("file-A.img <- file-E.img\n"), "{chain}");
    let seen = event_names(&m);
    for event in ["JOB_STATUS_CHANGE", "CHAIN_CHANGED", "BLOCK_JOB_COMPLETED"] {
        assert!(
            seen.iter().any(|e| e == event),
            "{event} missing from {seen:?}"
        );
    }
    assert!(
        read_all(&m.path("active")) == model,
        "a write made during the stream was lost"
    );
    assert!(read_all(&m.path("file-E.img")) == model);
    drop((active, reader));
    m.unmount();
    common::qemu_img_check(&five.top());
    let info = common::qemu_img(&["info", "--backing-chain", path_str(&five.top())]);
    assert!(
        !info.contains("file-B.img") && !info.contains("file-D.img"),
        "{info}"
    );
    assert!(convert_to_raw(&five.top()) == model);
}

#[test]
fn stream_into_an_intermediate_node_leaves_what_every_node_shows() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let before = five.views();
    let m = five.mount();
    command(&m, "stream node=file-D.img base=file-B.img id=mid").unwrap();
    let mut model = before[4].clone();
    let active = open_rw(&m, "active");
    write_during(&active, &mut model, 20);
    let jobs = wait_jobs(&m);
    assert_eq!(jobs[0]["outcome"], "completed", "{jobs:?}");
    assert_eq!(
        names_in(&m),
        [
            "active",
            "ctl",
            "file-A.img",
            "file-B.img",
            "file-D.img",
            "file-E.img"
        ]
    );
    assert!(
        read_all(&m.path("file-D.img")) == before[3],
        "file-D.img changed"
    );
    assert!(read_all(&m.path("active")) == model);
    let mode = std::fs::metadata(m.path("file-D.img"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o444
    );
    drop(active);
    m.unmount();
    for name in ["file-D.img", "file-E.img"] {
        common::qemu_img_check(&five.image(name));
    }
    let info = common::qemu_img(&["info", "--output=json", path_str(&five.image("file-D.img"))]);
    assert!(
        info.contains("\"backing-filename\": \"file-B.img\""),
        "{info}"
    );
    assert!(convert_to_raw(&five.image("file-D.img")) == before[3]);
    assert!(convert_to_raw(&five.top()) == model);
}

#[test]
fn malformed_and_impossible_commands_are_refused_with_their_errno_and_logged() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let m = five.mount();
    let existing = five.image("file-A.img");
    let snapshot_existing = format!("snapshot file={}", existing.display());
    let cases = [
        ("frobnicate", libc::EINVAL),
        ("stream colour=blue", libc::EINVAL),
        ("stream speed=fast", libc::EINVAL),
        ("stream base=nothing.img", libc::ENOENT),
        ("stream node=file-B.img base=file-D.img", libc::EINVAL),
        (snapshot_existing.as_str(), libc::EEXIST),
        ("cancel id=ghost", libc::ENOENT),
    ];
    for (text, errno) in cases {
        assert_eq!(command(&m, text), Err(errno), "{text}");
        let last = events(&m).pop().unwrap();
        assert_eq!(last["event"], "COMMAND_REJECTED", "{text}");
        let status = String::from_utf8(read_all(&m.path("ctl/status"))).unwrap();
        assert!(
            status.lines().last().unwrap().contains("rejected"),
            "{status}"
        );
    }
    command(&m, "stream speed=1M id=slow").unwrap();
    assert_eq!(
        command(&m, "stream node=file-C.img"),
        Err(libc::EBUSY),
        "overlapping stream"
    );
    assert_eq!(
        command(&m, "complete id=slow"),
        Err(libc::EBUSY),
        "a stream is never ready"
    );
    command(&m, "cancel id=slow").unwrap();
    let jobs = wait_jobs(&m);
    assert_eq!(jobs[0]["outcome"], "cancelled");
    assert_eq!(names_in(&m).len(), 7, "a cancelled stream changes nothing");
    m.unmount();
}

#[test]
fn a_live_snapshot_then_a_stream_makes_a_standalone_copy_and_old_handles_follow() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let mut model = convert_to_raw(&five.top());
    let m = five.mount();
    let active = open_rw(&m, "active");
    let copy = five.dir.path().join("copy.qcow2");
    command(&m, &format!("snapshot file={}", copy.display())).unwrap();
    assert!(names_in(&m).contains(&"copy.qcow2".to_string()));
    let old_top = std::fs::metadata(m.path("file-E.img"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&old_top) & 0o777,
        0o444
    );
    active.write_all_at(&[0x5e; 4096], 8192).unwrap();
    model[8192..12288].fill(0x5e);
    command(&m, "stream").unwrap();
    wait_jobs(&m);
    assert_eq!(names_in(&m), ["active", "copy.qcow2", "ctl"]);
    assert!(read_all(&m.path("active")) == model);
    drop(active);
    m.unmount();
    common::qemu_img_check(&copy);
    let info = common::qemu_img(&["info", "--output=json", path_str(&copy)]);
    assert!(!info.contains("backing-filename"), "{info}");
    assert!(convert_to_raw(&copy) == model);
}

/// base.img (64 MiB of data) <- top.qcow2 (empty): a stream copies every
/// byte it scans, so progress is the copy rate.
fn full_copy_chain(dir: &std::path::Path) -> std::path::PathBuf {
    common::chain::base_and_overlay(dir, "base.img", "64M", &["write -P 0x2c 0 64M"])
}

/// Bytes per second of progress over `window`.
fn measured_rate(m: &Mounted, window: Duration) -> f64 {
    let start = status_json(m)[0]["offset"].as_u64().unwrap();
    std::thread::sleep(window);
    let end = status_json(m)[0]["offset"].as_u64().unwrap();
    (end - start) as f64 / window.as_secs_f64()
}

#[test]
fn the_speed_limit_holds_the_rate_and_set_speed_changes_it_mid_job() {
    let Some(Fixture { dir: _dir, top, m }) = mounted(&[], full_copy_chain) else {
        return;
    };
    command(&m, "stream speed=4M").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let rate = measured_rate(&m, Duration::from_secs(5));
    let limit = 4.0 * MIB as f64;
    assert!(
        (rate - limit).abs() <= limit * 0.2,
        "{rate:.0} B/s against {limit} B/s"
    );
    command(&m, "set-speed speed=8M").unwrap();
    assert_eq!(status_json(&m)[0]["speed"], 8 * MIB);
    std::thread::sleep(Duration::from_millis(300));
    let rate = measured_rate(&m, Duration::from_secs(3));
    let limit = 8.0 * MIB as f64;
    assert!(
        (rate - limit).abs() <= limit * 0.2,
        "{rate:.0} B/s against {limit} B/s after set-speed"
    );
    command(&m, "pause").unwrap();
    let held = status_json(&m)[0]["offset"].as_u64().unwrap();
    assert_eq!(status_json(&m)[0]["status"], "paused");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status_json(&m)[0]["offset"], held, "a paused stream moved");
    command(&m, "resume").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        status_json(&m)[0]["offset"].as_u64().unwrap() > held,
        "resume did not resume"
    );
    let before = read_all(&m.path("active"));
    command(&m, "cancel").unwrap();
    assert_eq!(wait_jobs(&m)[0]["outcome"], "cancelled");
    assert_eq!(names_in(&m), ["active", "base.img", "ctl", "top.qcow2"]);
    assert!(
        read_all(&m.path("top.qcow2")) == before,
        "a cancelled stream changed what top shows"
    );
    command(&m, "dismiss").unwrap();
    command(&m, "stream").unwrap();
    assert_eq!(
        wait_jobs(&m)[0]["outcome"],
        "completed",
        "the second stream"
    );
    assert_eq!(names_in(&m), ["active", "ctl", "top.qcow2"]);
    m.unmount();
    common::qemu_img_check(&top);
    assert!(convert_to_raw(&top) == before);
}

#[test]
fn streams_on_disjoint_parts_of_the_chain_run_together_and_an_overlapping_one_is_busy() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let before = five.views();
    let m = five.mount();
    command(
        &m,
        "stream node=file-C.img base=file-A.img id=low speed=32M",
    )
    .unwrap();
    command(
        &m,
        "stream node=file-E.img base=file-C.img id=high speed=32M",
    )
    .unwrap();
    assert_eq!(
        command(&m, "stream node=file-D.img id=third"),
        Err(libc::EBUSY)
    );
    let jobs = wait_jobs(&m);
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j["outcome"] == "completed"), "{jobs:?}");
    assert_eq!(
        names_in(&m),
        ["active", "ctl", "file-A.img", "file-C.img", "file-E.img"]
    );
    assert!(read_all(&m.path("file-C.img")) == before[2]);
    assert!(read_all(&m.path("file-E.img")) == before[4]);
    m.unmount();
    for (i, name) in [(2, "file-C.img"), (4, "file-E.img")] {
        common::qemu_img_check(&five.image(name));
        assert!(convert_to_raw(&five.image(name)) == before[i], "{name}");
    }
    let chain = common::qemu_img(&["info", "--backing-chain", path_str(&five.top())]);
    assert!(
        !chain.contains("file-B.img") && !chain.contains("file-D.img"),
        "{chain}"
    );
}

#[test]
fn fio_verifies_while_a_stream_runs_and_qemu_agrees_after_unmount() {
    let Some(Fixture { dir: _dir, top, m }) = mounted(&["fio"], full_copy_chain) else {
        return;
    };
    command(&m, "stream speed=16M").unwrap();
    let active = m.path("active");
    let output = common::fio_verify(&active, &["--offset_increment=16M", "--direct=1"]);
    assert!(
        output.status.success(),
        "fio failed during the stream:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        status_json(&m)[0].get("outcome").is_none(),
        "the stream ended before fio: the test raced nothing"
    );
    let jobs = wait_jobs(&m);
    assert_eq!(jobs[0]["outcome"], "completed", "{jobs:?}");
    let shown = read_all(&active);
    m.unmount();
    common::qemu_img_check(&top);
    assert!(
        convert_to_raw(&top) == shown,
        "the top image differs from what active showed"
    );
}
