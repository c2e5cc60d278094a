//! Tests of [`Jobs`] on a small raw chain: commands are refused with the
//! right errno and each refusal is visible in events and status.

use super::*;
use crate::chain::ChainOptions;

fn raw_jobs(read_only: bool) -> (tempfile::TempDir, Jobs) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.img");
    std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
    let options = ChainOptions {
        writable: !read_only,
        ..ChainOptions::default()
    };
    let chain = Chain::open(&path, &options).unwrap();
    (dir, Jobs::new(chain, read_only))
}

fn last_event(jobs: &Jobs) -> serde_json::Value {
    let text = jobs.events_text();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[test]
fn an_unknown_verb_is_einval_and_logged() {
    let (_dir, jobs) = raw_jobs(false);
    let error = jobs.command("frobnicate now=1\n").unwrap_err();
    assert_eq!(error.errno(), libc::EINVAL);
    let event = last_event(&jobs);
    assert_eq!(event["event"], "COMMAND_REJECTED");
    assert_eq!(event["data"]["command"], "frobnicate now=1");
    assert_eq!(event["data"]["errno"], "EINVAL");
    let status = jobs.status_text();
    assert!(status.starts_with("No active jobs\n"));
    assert!(status.lines().last().unwrap().contains("frobnicate"));
}

#[test]
fn a_well_formed_command_that_cannot_run_is_refused_with_its_errno() {
    let (_dir, jobs) = raw_jobs(false);
    for (command, errno) in [
        ("stream node=nowhere.img", libc::ENOENT),
        ("pause", libc::ENOENT),
        ("commit top=base.img", libc::EINVAL),
        ("snapshot file=/etc", libc::EEXIST),
        ("snapshot file=/", libc::EINVAL),
    ] {
        let error = jobs.command(command).unwrap_err();
        assert_eq!(error.errno(), errno, "{command}: {error}");
        assert_eq!(last_event(&jobs)["event"], "COMMAND_REJECTED");
    }
}

#[test]
fn an_accepted_stream_is_listed_when_the_command_returns() {
    let (_dir, jobs) = raw_jobs(false);
    jobs.command("stream id=s1\n").unwrap();
    let status: serde_json::Value = serde_json::from_str(&jobs.status_json()).unwrap();
    assert_eq!(status[0]["id"], "s1");
    assert_eq!(status[0]["type"], "stream");
    assert!(jobs.status_text().starts_with("s1: stream node=base.img"));
    jobs.close().unwrap();
}

#[test]
fn a_read_only_mount_refuses_commands_with_erofs() {
    let (_dir, jobs) = raw_jobs(true);
    let error = jobs.command("stream base=base.img\n").unwrap_err();
    assert_eq!(error.errno(), libc::EROFS);
    assert_eq!(last_event(&jobs)["data"]["errno"], "EROFS");
}

#[test]
fn a_huge_refused_command_is_logged_as_an_excerpt() {
    let (_dir, jobs) = raw_jobs(false);
    let huge = "x".repeat(1 << 20);
    assert!(jobs.command(&huge).is_err());
    assert!(jobs.events_text().len() < 4096);
}

#[test]
fn the_chain_text_lists_nodes_base_first() {
    let (_dir, jobs) = raw_jobs(false);
    let text = jobs.chain_text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("base.img"));
    let node = lines.next().unwrap();
    assert!(node.starts_with("base.img: path="), "{node}");
    assert!(
        node.contains("format=raw virtual-size=65536 backing=none"),
        "{node}"
    );
}

#[test]
fn close_releases_the_chain_unless_a_snapshot_is_held() {
    let (_dir, jobs) = raw_jobs(false);
    jobs.close().unwrap();
    let (_dir, jobs) = raw_jobs(false);
    let held = jobs.chain();
    let error = jobs.close().unwrap_err();
    assert!(matches!(error, JobError::ChainInUse { holders: 1 }));
    drop(held);
}

#[test]
fn a_command_that_is_not_utf8_is_refused_and_logged() {
    let (_dir, jobs) = raw_jobs(false);
    let error = jobs.command_bytes(b"stream base=\xff\n").unwrap_err();
    assert_eq!(error.errno(), libc::EINVAL);
    assert_eq!(last_event(&jobs)["event"], "COMMAND_REJECTED");
}

/// Waits (bounded) until every listed job has an outcome.
fn wait_concluded(jobs: &Jobs) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status: serde_json::Value = serde_json::from_str(&jobs.status_json()).unwrap();
        if status
            .as_array()
            .unwrap()
            .iter()
            .all(|job| job.get("outcome").is_some())
        {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_stream_with_nothing_below_ends_with_done_equal_to_total() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alone.qcow2");
    crate::chain::create_image(&path, 1 << 20, 64 << 10, None).unwrap();
    let options = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let jobs = Jobs::new(Chain::open(&path, &options).unwrap(), false);
    jobs.command("stream id=s1\n").unwrap();
    let status = wait_concluded(&jobs);
    assert_eq!(status[0]["outcome"], "completed", "{status}");
    assert_eq!(status[0]["offset"], status[0]["len"], "{status}");
    assert!(
        jobs.status_text().contains("(100.0%)"),
        "{}",
        jobs.status_text()
    );
    jobs.close().unwrap();
}

#[test]
fn the_first_status_change_is_created_and_dismiss_reports_null() {
    let (_dir, jobs) = raw_jobs(false);
    jobs.command("stream id=s1\n").unwrap();
    wait_concluded(&jobs);
    jobs.command("dismiss\n").unwrap();
    let statuses: Vec<String> = jobs
        .events_text()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|event| event["event"] == "JOB_STATUS_CHANGE")
        .map(|event| event["data"]["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses.first().map(String::as_str), Some("created"));
    assert_eq!(statuses.last().map(String::as_str), Some("null"));
    jobs.close().unwrap();
}

#[test]
fn a_long_id_or_command_is_einval_and_starts_nothing() {
    let (_dir, jobs) = raw_jobs(false);
    let long_id = format!("stream id={}\n", "i".repeat(129));
    assert_eq!(jobs.command(&long_id).unwrap_err().errno(), libc::EINVAL);
    let long = format!("stream id=s {}\n", "x".repeat(4096));
    assert_eq!(jobs.command(&long).unwrap_err().errno(), libc::EINVAL);
    assert!(jobs.status_text().starts_with("No active jobs\n"));
}

#[test]
fn a_relative_snapshot_goes_beside_the_active_image() {
    let (dir, jobs) = raw_jobs(false);
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    // `sub` exists only beside the image: from any other directory the
    // command would fail with ENOENT instead.
    jobs.command("snapshot file=sub/../snap.qcow2\n").unwrap();
    let created = std::fs::canonicalize(dir.path())
        .unwrap()
        .join("snap.qcow2");
    assert!(created.exists());
    assert_eq!(jobs.chain().active().path(), created);
    jobs.close().unwrap();
}

#[test]
fn a_newline_in_a_refusal_or_a_node_name_stays_on_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two\nlines.img");
    std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
    let chain = Chain::open(&path, &ChainOptions::default()).unwrap();
    let jobs = Jobs::new(chain, false);
    let text = jobs.chain_text();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.starts_with("two\\nlines.img\n"), "{text}");
    let exists = format!("snapshot file=\"{}\"\n", path.display());
    assert_eq!(jobs.command(&exists).unwrap_err().errno(), libc::EEXIST);
    let status = jobs.status_text();
    assert_eq!(status.lines().count(), 2, "{status}");
    jobs.close().unwrap();
}

#[test]
fn a_snapshot_waits_for_a_guest_write_in_flight_on_the_old_top() {
    let (dir, jobs) = raw_jobs(false);
    // A guest write that picked its target before the snapshot: it holds
    // the write gate and the chain as it was, with the old top active.
    let gate = jobs.write_gate();
    let chain = jobs.chain();
    let old_top = chain.active().id();
    let file = dir.path().join("snap.qcow2");
    let command = format!("snapshot file={}\n", file.display());
    std::thread::scope(|scope| {
        let snapshot = scope.spawn(|| jobs.command(&command));
        // Give a snapshot that does not wait time to finish, so that the
        // write below would meet a read-only old top (a bounded wait, no
        // assertion on time).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !snapshot.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        chain
            .write(old_top, 0, b"in flight")
            .expect("the old top takes the write in flight");
        drop(gate);
        snapshot.join().unwrap().unwrap();
    });
    let now = jobs.chain();
    assert_ne!(now.active().id(), old_top);
    let mut head = [0u8; 9];
    now.read(now.active().id(), 0, &mut head).unwrap();
    assert_eq!(&head, b"in flight");
    drop((chain, now));
    jobs.close().unwrap();
}
