//! The stream job on a real chain, without a mount: it copies only what
//! the node lacks, keeps every guest write, reports QEMU's states and
//! events, obeys pause, cancel and the speed limit, and leaves images that
//! qemu-img accepts with the new backing chain.

mod common;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chainfs::chain::{Chain, ChainError, NodeId};
use chainfs::jobs::command::OnError;
use chainfs::jobs::job::{EventSink, Job, JobSpec, JobType, Outcome};
use chainfs::jobs::state::JobStatus;
use chainfs::jobs::stream::{self, StreamPlan};
use common::chain::*;
use common::*;

const SIZE: u64 = 8 << 20;

#[derive(Default)]
struct Events(Mutex<Vec<(String, serde_json::Value)>>);

impl EventSink for Events {
    fn push(&self, event: &str, data: serde_json::Value) {
        self.0.lock().unwrap().push((event.to_string(), data));
    }
}

impl Events {
    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// base.img (raw) <- b <- c <- d (active); c zeroes a range over data.
fn build(d: &std::path::Path) {
    raw_image(
        &at(d, "base.img"),
        SIZE as usize,
        Some((0..SIZE as usize, 0x11)),
    );
    overlay(d, "b.qcow2", Some(("base.img", "raw")), "8M");
    qemu_io(&at(d, "b.qcow2"), "qcow2", &["write -P 0x22 1M 2M"]);
    overlay(d, "c.qcow2", Some(("b.qcow2", "qcow2")), "8M");
    qemu_io(&at(d, "c.qcow2"), "qcow2", &["write -P 0x33 2M 1M"]);
    qemu_io(&at(d, "c.qcow2"), "qcow2", &["write -z 5M 1M"]);
    overlay(d, "d.qcow2", Some(("c.qcow2", "qcow2")), "8M");
    qemu_io(&at(d, "d.qcow2"), "qcow2", &["write -P 0x44 2500k 8k"]);
}

struct Running {
    live: Arc<RwLock<Arc<Chain>>>,
    job: Arc<Job>,
    events: Arc<Events>,
    thread: std::thread::JoinHandle<()>,
}

fn start(chain: Chain, node: &str, base: Option<&str>, speed: u64) -> Running {
    let chain = Arc::new(chain);
    let id = |name: &str| chain.find(name).unwrap().id();
    let node_id = id(node);
    let level = chain
        .nodes()
        .iter()
        .position(|n| n.id() == node_id)
        .unwrap();
    let below = level.checked_sub(1).map(|l| chain.nodes()[l].id());
    let plan = StreamPlan {
        node: node_id,
        below,
        base: base.map(id),
        backing_file: None,
        on_error: OnError::Report,
    };
    let events = Arc::new(Events::default());
    let job = Arc::new(Job::new(
        JobSpec {
            id: "s0".into(),
            kind: JobType::Stream,
            node: node.into(),
            base: base.map(String::from),
            target: None,
            touched: Vec::<NodeId>::new(),
            shared: Vec::new(),
            kept: Vec::new(),
            len: SIZE,
            speed,
        },
        events.clone(),
    ));
    let live = Arc::new(RwLock::new(Arc::clone(&chain)));
    let thread = {
        let (job, live) = (Arc::clone(&job), Arc::clone(&live));
        std::thread::spawn(move || {
            let change = |f: &dyn Fn(&Chain) -> Result<Chain, ChainError>| {
                let mut current = live.write().unwrap();
                let next = f(&current)?;
                *current = Arc::new(next);
                Ok(())
            };
            stream::run(&job, chain, &plan, &change);
        })
    };
    Running {
        live,
        job,
        events,
        thread,
    }
}

fn finish(running: Running) -> (Arc<Chain>, Arc<Job>, Arc<Events>) {
    running.thread.join().unwrap();
    let chain = running.live.read().unwrap().clone();
    (chain, running.job, running.events)
}

#[test]
fn streaming_the_whole_chain_leaves_the_active_node_alone_and_unchanged() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d);
    let before = convert_to_raw(&at(d, "d.qcow2"));
    let (chain, job, events) = finish(start(open_writable(&at(d, "d.qcow2")), "d.qcow2", None, 0));
    let info = job.info();
    assert_eq!(info.outcome, Some(Outcome::Completed), "{:?}", info.error);
    assert_eq!((info.offset, info.len), (SIZE, SIZE));
    assert_eq!(info.status, JobStatus::Concluded);
    assert_eq!(chain.nodes().len(), 1);
    let names = events.names();
    assert!(
        names.contains(&"BLOCK_JOB_COMPLETED".to_string()),
        "{names:?}"
    );
    assert_same("active", &read_node(&chain, chain.active().id()), &before);
    Arc::try_unwrap(chain).unwrap().close().unwrap();
    qemu_img_in(d, &["check", "d.qcow2"]);
    let info = qemu_img_in(d, &["info", "--output=json", "d.qcow2"]);
    assert!(!info.contains("backing-filename"), "{info}");
    assert_same("qemu", &convert_to_raw(&at(d, "d.qcow2")), &before);
}

#[test]
fn streaming_to_a_base_keeps_zero_clusters_zero_and_every_guest_write() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d);
    let mut want = convert_to_raw(&at(d, "d.qcow2"));
    let running = start(
        open_writable(&at(d, "d.qcow2")),
        "d.qcow2",
        Some("base.img"),
        4 << 20,
    );
    let writer = running.live.read().unwrap().clone();
    let top = writer.active().id();
    for i in 0..64u64 {
        let at_offset = (i * 131_071) % (SIZE - 5000);
        writer.write(top, at_offset, &[0x99; 5000]).unwrap();
        want[at_offset as usize..at_offset as usize + 5000].fill(0x99);
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(writer);
    let (chain, job, _) = finish(running);
    assert_eq!(job.info().outcome, Some(Outcome::Completed));
    let names: Vec<&str> = chain.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(names, ["base.img", "d.qcow2"]);
    assert_same("active", &read_node(&chain, top), &want);
    Arc::try_unwrap(chain).unwrap().close().unwrap();
    qemu_img_in(d, &["check", "d.qcow2"]);
    assert_same("qemu", &convert_to_raw(&at(d, "d.qcow2")), &want);
}

#[test]
fn pause_holds_the_offset_cancel_changes_nothing_and_a_second_stream_finishes() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d);
    let before = convert_to_raw(&at(d, "d.qcow2"));
    let running = start(open_writable(&at(d, "d.qcow2")), "d.qcow2", None, 1 << 20);
    std::thread::sleep(Duration::from_millis(1500));
    running.job.pause().unwrap();
    assert_eq!(running.job.status(), JobStatus::Paused);
    let held = running.job.info().offset;
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(running.job.info().offset, held, "a paused job moved");
    assert!(held > 0 && held < SIZE, "offset {held}");
    running.job.resume().unwrap();
    running.job.cancel().unwrap();
    let (chain, job, events) = finish(running);
    assert_eq!(job.info().outcome, Some(Outcome::Cancelled));
    assert!(events.names().contains(&"BLOCK_JOB_CANCELLED".to_string()));
    assert_eq!(
        chain.nodes().len(),
        4,
        "a cancelled stream changes no backing pointer"
    );
    assert_same("active", &read_node(&chain, chain.active().id()), &before);
    let (again, job, _) = finish(start(Arc::try_unwrap(chain).unwrap(), "d.qcow2", None, 0));
    assert_eq!(job.info().outcome, Some(Outcome::Completed));
    assert_eq!(again.nodes().len(), 1);
    Arc::try_unwrap(again).unwrap().close().unwrap();
    qemu_img_in(d, &["check", "d.qcow2"]);
    assert_same("qemu", &convert_to_raw(&at(d, "d.qcow2")), &before);
}

#[test]
fn the_speed_limit_holds_the_copy_rate() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    raw_image(
        &at(d, "base.img"),
        SIZE as usize,
        Some((0..SIZE as usize, 0x11)),
    );
    overlay(d, "top.qcow2", Some(("base.img", "raw")), "8M");
    let started = Instant::now();
    let (_, job, _) = finish(start(
        open_writable(&at(d, "top.qcow2")),
        "top.qcow2",
        None,
        4 << 20,
    ));
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(job.info().outcome, Some(Outcome::Completed));
    // 8 MiB at 4 MiB/s: about 2 s (the first slice's budget is free).
    assert!((1.5..=3.0).contains(&secs), "took {secs} s");
}
