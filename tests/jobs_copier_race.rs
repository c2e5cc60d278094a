//! Guest writes raced against the job copier's copies of the same ranges,
//! thousands of times, without a mount: a stream (which must never
//! overwrite what the node holds) and an active commit (whose dirty map
//! must bring every write down to the base, with several chunks in
//! flight). Every byte the guest wrote must read back at the end.
//!
//! The writes aim at the range just ahead of the job's offset, where the
//! copier has chunks read and not yet written; the speed limit keeps the
//! job running long enough for many of them, and lets the reader run
//! ahead of the writer while the writer sleeps.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chainfs::chain::{Chain, ChainError, NodeId};
use chainfs::jobs::command::{parse, OnError};
use chainfs::jobs::job::{EventSink, Job, JobSpec, JobType, Outcome};
use chainfs::jobs::registry::{LiveChain, Registry};
use chainfs::jobs::stream::{self, StreamPlan};
use common::chain::{assert_same, at, close_live, open_writable, overlay, read_node, tempdir};
use common::{convert_to_raw, qemu_img_in, require_qemu};

const SIZE: u64 = 32 << 20;
/// At least this many writes race each job.
const WRITES: usize = 3000;

#[derive(Default)]
struct Events(Mutex<Vec<(String, serde_json::Value)>>);

impl EventSink for Events {
    fn push(&self, event: &str, data: serde_json::Value) {
        self.0.lock().unwrap().push((event.to_string(), data));
    }
}

/// xorshift64: reproducible offsets and lengths without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// base.qcow2 (data everywhere) <- mid.qcow2 (data in every other MiB)
/// <- top.qcow2 (a few clusters), so every chunk has something to copy.
fn build(d: &std::path::Path) {
    overlay(d, "base.qcow2", None, "32M");
    common::qemu_io(&at(d, "base.qcow2"), "qcow2", &["write -P 0x11 0 32M"]);
    overlay(d, "mid.qcow2", Some(("base.qcow2", "qcow2")), "32M");
    for mib in (0..32).step_by(2) {
        common::qemu_io(
            &at(d, "mid.qcow2"),
            "qcow2",
            &[&format!("write -P 0x22 {mib}M 1M")],
        );
    }
    overlay(d, "top.qcow2", Some(("mid.qcow2", "qcow2")), "32M");
    common::qemu_io(&at(d, "top.qcow2"), "qcow2", &["write -P 0x33 3M 192k"]);
}

/// Writes small patterns near `cursor()` (up to 4 MiB ahead of it) until
/// `done` and at least [`WRITES`] writes; applies each to `want`. Each
/// write's byte is new, so a lost or stale one shows.
fn hammer(
    write: impl Fn(u64, &[u8]),
    cursor: impl Fn() -> u64,
    done: &AtomicBool,
    want: &mut [u8],
    seed: u64,
) -> usize {
    let mut rng = Rng(seed);
    let mut count = 0;
    while count < WRITES || !done.load(Ordering::Acquire) {
        let len = 512 * (1 + rng.next() % 16);
        let near = cursor().min(SIZE - 1) + rng.next() % (4 << 20);
        let offset = (near % (SIZE - len)) & !511;
        let byte = 0x40 + (count % 0xbf) as u8;
        let data = vec![byte; len as usize];
        write(offset, &data);
        want[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        count += 1;
    }
    count
}

#[test]
fn guest_writes_racing_a_stream_all_read_back() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d);
    let mut want = convert_to_raw(&at(d, "top.qcow2"));
    let chain = Arc::new(open_writable(&at(d, "top.qcow2")));
    let top = chain.active().id();
    let plan = StreamPlan {
        node: top,
        below: Some(chain.nodes()[1].id()),
        base: None,
        backing_file: None,
        on_error: OnError::Report,
    };
    let job = Arc::new(Job::new(
        JobSpec {
            id: "s0".into(),
            kind: JobType::Stream,
            node: "top.qcow2".into(),
            base: None,
            target: None,
            touched: Vec::<NodeId>::new(),
            shared: Vec::new(),
            kept: Vec::new(),
            len: SIZE,
            speed: 16 << 20,
        },
        Arc::new(Events::default()),
    ));
    let live = Arc::new(RwLock::new(Arc::clone(&chain)));
    let done = AtomicBool::new(false);
    let writes = std::thread::scope(|scope| {
        let (job, live, done) = (&job, &live, &done);
        let writer = Arc::clone(&chain);
        let chain = Arc::clone(&chain);
        scope.spawn(move || {
            let change = |f: &dyn Fn(&Chain) -> Result<Chain, ChainError>| {
                let mut current = live.write().unwrap();
                let next = f(&current)?;
                *current = Arc::new(next);
                Ok(())
            };
            stream::run(job, chain, &plan, &change);
            done.store(true, Ordering::Release);
        });
        hammer(
            |offset, data| writer.write(top, offset, data).unwrap(),
            || job.info().offset,
            done,
            &mut want,
            0x9e37_79b9_7f4a_7c15,
        )
    });
    assert!(writes >= WRITES);
    let info = job.info();
    assert_eq!(info.outcome, Some(Outcome::Completed), "{:?}", info.error);
    drop(chain);
    let chain = live.read().unwrap().clone();
    assert_eq!(chain.nodes().len(), 1, "streamed without a base");
    assert_same("top after the stream", &read_node(&chain, top), &want);
    drop(live);
    Arc::try_unwrap(chain).ok().unwrap().close().unwrap();
    qemu_img_in(d, &["check", "top.qcow2"]);
    assert_same("qemu", &convert_to_raw(&at(d, "top.qcow2")), &want);
}

fn command(registry: &Registry, text: &str) {
    registry
        .execute(parse(text).unwrap())
        .unwrap_or_else(|refusal| panic!("{text}: errno {}", refusal.errno()));
}

/// Waits (at most a minute) until the only job says `done`.
fn wait_for(registry: &Registry, what: &str, done: impl Fn(&chainfs::jobs::job::JobInfo) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !registry.infos().first().is_some_and(&done) {
        assert!(Instant::now() < deadline, "the commit never got {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn guest_writes_racing_an_active_commit_all_reach_the_base() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d);
    let mut want = convert_to_raw(&at(d, "top.qcow2"));
    let events = Arc::new(Events::default());
    let live = Arc::new(LiveChain::new(
        open_writable(&at(d, "top.qcow2")),
        events.clone(),
    ));
    let registry = Registry::new(Arc::clone(&live), events);
    let top = live.current().active().id();
    let base = live.current().nodes()[0].id();
    command(&registry, "commit top=top.qcow2 base=base.qcow2 speed=16M");
    let write = |offset: u64, data: &[u8]| {
        // As the mount writes: under the gate that `complete` drains.
        let _gate = live.write_gate();
        live.current().write(top, offset, data).unwrap();
    };
    let cursor = || {
        registry
            .infos()
            .first()
            .map_or(0, |info| info.offset % SIZE)
    };
    // A fixed number of writes (the job cannot become ready while they
    // keep coming): first against the first pass, then once ready.
    let no_wait = AtomicBool::new(true);
    hammer(write, cursor, &no_wait, &mut want, 0x2545_f491_4f6c_dd1d);
    wait_for(&registry, "ready", |info| info.ready);
    hammer(write, cursor, &no_wait, &mut want, 0x1234_5678_9abc_def1);
    command(&registry, "complete");
    wait_for(&registry, "concluded", |info| info.outcome.is_some());
    let info = registry.infos().remove(0);
    assert_eq!(info.outcome, Some(Outcome::Completed), "{:?}", info.error);
    let chain = live.current();
    assert_eq!(chain.active().id(), base, "complete pivots onto the base");
    assert_same("base after the commit", &read_node(&chain, base), &want);
    drop(chain);
    registry.shutdown();
    drop(registry);
    close_live(live);
    qemu_img_in(d, &["check", "base.qcow2"]);
    assert_same("qemu", &convert_to_raw(&at(d, "base.qcow2")), &want);
}
