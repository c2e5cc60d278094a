//! Commands to the job registry, without a mount: each refusal has its
//! errno; streams on disjoint parts of a chain run together; a live
//! snapshot pivots the active node; verbs follow QEMU's verb table.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chainfs::jobs::command::parse;
use chainfs::jobs::job::{EventSink, Outcome};
use chainfs::jobs::registry::{LiveChain, Registry};
use common::chain::*;
use common::*;

#[derive(Default)]
struct Events(Mutex<Vec<(String, serde_json::Value)>>);

impl EventSink for Events {
    fn push(&self, event: &str, data: serde_json::Value) {
        self.0.lock().unwrap().push((event.to_string(), data));
    }
}

/// n0.img (raw) <- n1 <- … <- n{count-1}, each layer writing its own MiB.
fn build(d: &std::path::Path, count: usize) {
    raw_image(&at(d, "n0.img"), 8 << 20, Some((0..1 << 20, 0x10)));
    for i in 1..count {
        let backing = format!("n{}.{}", i - 1, if i == 1 { "img" } else { "qcow2" });
        let format = if i == 1 { "raw" } else { "qcow2" };
        let name = format!("n{i}.qcow2");
        overlay(d, &name, Some((&backing, format)), "8M");
        qemu_io(
            &at(d, &name),
            "qcow2",
            &[format!("write -P {} {}M 1M", 0x10 + i, i % 8)],
        );
    }
}

fn registry(d: &std::path::Path, top: &str) -> (Registry, Arc<Events>) {
    let events = Arc::new(Events::default());
    let live = Arc::new(LiveChain::new(open_writable(&at(d, top)), events.clone()));
    (Registry::new(live, events.clone()), events)
}

fn run(registry: &Registry, command: &str) -> Result<(), i32> {
    registry
        .execute(parse(command).map_err(|_| libc::EINVAL)?)
        .map_err(|refusal| refusal.errno())
}

fn wait_all(registry: &Registry) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry.infos().iter().any(|j| j.outcome.is_none()) {
        assert!(Instant::now() < deadline, "jobs did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn refusals_carry_their_errno() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d, 4);
    let (registry, _) = registry(d, "n3.qcow2");
    assert_eq!(run(&registry, "stream node=nope.img"), Err(libc::ENOENT));
    assert_eq!(run(&registry, "stream base=nope.img"), Err(libc::ENOENT));
    assert_eq!(
        run(&registry, "stream node=n1.qcow2 base=n2.qcow2"),
        Err(libc::EINVAL)
    );
    assert_eq!(
        run(&registry, "stream node=n1.qcow2 base=n1.qcow2"),
        Err(libc::EINVAL)
    );
    assert_eq!(run(&registry, "pause"), Err(libc::ENOENT));
    assert_eq!(run(&registry, "cancel id=ghost"), Err(libc::ENOENT));
    let existing = at(d, "n0.img");
    let command = format!("snapshot file={}", existing.display());
    assert_eq!(run(&registry, &command), Err(libc::EEXIST));
    assert_eq!(run(&registry, "commit top=n0.img"), Err(libc::EINVAL));
    registry.shutdown();
}

#[test]
fn streams_on_disjoint_parts_run_together_and_an_overlapping_one_is_busy() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d, 7);
    let before: Vec<Vec<u8>> = (0..7)
        .map(|i| {
            convert_to_raw(&at(
                d,
                &if i == 0 {
                    "n0.img".to_string()
                } else {
                    format!("n{i}.qcow2")
                },
            ))
        })
        .collect();
    let (registry, events) = registry(d, "n6.qcow2");
    run(
        &registry,
        "stream node=n2.qcow2 base=n0.img id=low speed=2M",
    )
    .unwrap();
    run(
        &registry,
        "stream node=n4.qcow2 base=n2.qcow2 id=mid speed=2M",
    )
    .unwrap();
    assert_eq!(
        run(&registry, "stream node=n3.qcow2 id=clash"),
        Err(libc::EBUSY)
    );
    assert_eq!(
        run(&registry, "stream id=low"),
        Err(libc::EINVAL),
        "duplicate id"
    );
    assert_eq!(
        run(&registry, "pause"),
        Err(libc::EINVAL),
        "two jobs and no id"
    );
    run(&registry, "stream node=n6.qcow2 base=n4.qcow2 id=top").unwrap();
    wait_all(&registry);
    for job in registry.infos() {
        assert_eq!(
            job.outcome,
            Some(Outcome::Completed),
            "{}: {:?}",
            job.id,
            job.error
        );
        assert_eq!(job.offset, job.len);
    }
    let chain = registry.chain();
    let names: Vec<&str> = chain.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(names, ["n0.img", "n2.qcow2", "n4.qcow2", "n6.qcow2"]);
    for (i, want) in before
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0 && *i > 0)
    {
        let node = chain.find(&format!("n{i}.qcow2")).unwrap();
        assert_same(&format!("n{i}"), &read_node(&chain, node.id()), want);
    }
    let changes = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n == "CHAIN_CHANGED")
        .count();
    assert_eq!(changes, 3);
    assert_eq!(
        run(&registry, "pause id=low"),
        Err(libc::EBUSY),
        "concluded jobs take no pause"
    );
    run(&registry, "dismiss id=low").unwrap();
    assert_eq!(registry.infos().len(), 2);
    registry.shutdown();
    drop(chain);
    drop(registry);
    for i in [2, 4, 6] {
        qemu_img_in(d, &["check", &format!("n{i}.qcow2")]);
    }
    assert_same("qemu n6", &convert_to_raw(&at(d, "n6.qcow2")), &before[6]);
}

#[test]
fn a_snapshot_pivots_the_active_node_and_a_stream_then_makes_a_live_copy() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d, 3);
    let before = convert_to_raw(&at(d, "n2.qcow2"));
    let (registry, _) = registry(d, "n2.qcow2");
    let copy = at(d, "copy.qcow2");
    run(&registry, &format!("snapshot file={}", copy.display())).unwrap();
    assert_eq!(registry.chain().active().name(), "copy.qcow2");
    run(&registry, "stream").unwrap();
    wait_all(&registry);
    let chain = registry.chain();
    assert_eq!(chain.nodes().len(), 1);
    assert_same(
        "live copy",
        &read_node(&chain, chain.active().id()),
        &before,
    );
    registry.shutdown();
    drop(chain);
    drop(registry);
    qemu_img_in(d, &["check", "copy.qcow2"]);
    let info = qemu_img_in(d, &["info", "--output=json", "copy.qcow2"]);
    assert!(!info.contains("backing-filename"), "{info}");
    assert_same("qemu copy", &convert_to_raw(&at(d, "copy.qcow2")), &before);
}
