//! Tests of one [`Job`]'s states, driven by a stand-in job thread: every
//! verb returns, every job reaches `concluded`, and the events follow
//! QEMU's (`created` first, `null` on dismiss).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// Longer than any of these steps takes; a verb still waiting then hangs.
const HANG: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, serde_json::Value)>>);

impl EventSink for Recorder {
    fn push(&self, event: &str, data: serde_json::Value) {
        lock(&self.0).push((event.to_string(), data));
    }
}

impl Recorder {
    fn statuses(&self) -> Vec<String> {
        lock(&self.0)
            .iter()
            .filter(|(event, _)| event == "JOB_STATUS_CHANGE")
            .map(|(_, data)| data["status"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

fn job() -> (Arc<Job>, Arc<Recorder>) {
    let events = Arc::new(Recorder::default());
    let job = Job::new(
        JobSpec {
            id: "j".into(),
            kind: JobType::Stream,
            node: "top.qcow2".into(),
            base: None,
            target: None,
            touched: Vec::new(),
            shared: Vec::new(),
            kept: Vec::new(),
            len: 4 << 20,
            speed: 0,
        },
        events.clone(),
    );
    (Arc::new(job), events)
}

/// Runs `verb` on a thread; fails the test if it does not return in time.
fn returns<T: Send + 'static>(what: &str, verb: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(verb());
    });
    receiver
        .recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("{what} never returned"))
}

/// A stand-in job thread: runs chunks (checkpoints) until stopped or
/// `chunks` are done, then concludes as a stream would.
fn run_chunks(job: Arc<Job>, chunks: u64) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        job.start();
        let mut result = Ok(());
        for _ in 0..chunks {
            result = job.checkpoint();
            if result.is_err() {
                break;
            }
            job.advance(1 << 20, 0);
            std::thread::sleep(Duration::from_millis(1));
        }
        let result = result.and_then(|()| job.work_done());
        match result {
            Ok(()) => job.conclude(Outcome::Completed, None),
            Err(Stop::Cancelled) => job.conclude(Outcome::Cancelled, None),
            Err(Stop::Failed) => job.conclude(Outcome::Failed, job.error()),
        }
    })
}

fn joined(what: &str, thread: std::thread::JoinHandle<()>) {
    returns(what, move || thread.join().is_ok());
}

#[test]
fn a_pause_asked_while_the_job_finishes_returns_and_the_job_concludes() {
    let (job, _) = job();
    job.start();
    let pausing = {
        let job = Arc::clone(&job);
        std::thread::spawn(move || job.pause())
    };
    // The job thread has no pause point left: it concludes. The pause
    // must then return rather than wait for a park that never comes.
    std::thread::sleep(Duration::from_millis(50));
    job.conclude(Outcome::Completed, None);
    returns("pause", move || pausing.join().is_ok_and(|r| r.is_ok()));
    assert_eq!(job.status(), JobStatus::Concluded);
    assert_eq!(job.info().outcome, Some(Outcome::Completed));
    assert_eq!(job.info().offset, job.info().len, "done equals total");
}

#[test]
fn a_pause_after_the_work_is_done_returns_at_once() {
    let (job, _) = job();
    job.start();
    assert_eq!(job.work_done(), Ok(()));
    let paused = Arc::clone(&job);
    returns("pause", move || paused.pause()).unwrap();
    assert_eq!(job.status(), JobStatus::Running, "nothing parked");
    job.conclude(Outcome::Completed, None);
    assert_eq!(job.status(), JobStatus::Concluded);
}

#[test]
fn cancel_concludes_a_job_from_created_running_and_paused() {
    for state in ["created", "running", "paused", "paused by an error"] {
        let (job, events) = job();
        let thread = match state {
            "created" => {
                job.cancel().unwrap();
                run_chunks(Arc::clone(&job), 1000)
            }
            "paused by an error" => {
                let job = Arc::clone(&job);
                std::thread::spawn(move || {
                    job.start();
                    let result = job.pause_for_error("No space left on device".into());
                    assert_eq!(result, Err(Stop::Cancelled));
                    job.conclude(Outcome::Cancelled, None);
                })
            }
            _ => run_chunks(Arc::clone(&job), 1000),
        };
        if state.starts_with("paused") {
            if state == "paused" {
                let paused = Arc::clone(&job);
                returns("pause", move || paused.pause()).unwrap();
            }
            while job.status() != JobStatus::Paused {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if state != "created" {
            job.cancel().unwrap();
        }
        joined(state, thread);
        assert_eq!(job.status(), JobStatus::Concluded, "{state}");
        assert_eq!(job.info().outcome, Some(Outcome::Cancelled), "{state}");
        assert_eq!(job.check_dismiss(), Ok(()), "{state}");
        let statuses = events.statuses();
        assert_eq!(
            statuses[statuses.len() - 2..],
            ["aborting", "concluded"],
            "{state}"
        );
    }
}

#[test]
fn resume_is_only_for_a_paused_job() {
    let (job, _) = job();
    let thread = run_chunks(Arc::clone(&job), 1000);
    while job.status() != JobStatus::Running {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        job.resume(),
        Err(VerbRefused {
            verb: Verb::Resume,
            status: JobStatus::Running
        })
    );
    let paused = Arc::clone(&job);
    returns("pause", move || paused.pause()).unwrap();
    assert_eq!(job.status(), JobStatus::Paused);
    job.resume().unwrap();
    assert_eq!(job.status(), JobStatus::Running);
    job.cancel().unwrap();
    joined("cancelled job", thread);
}

#[test]
fn the_first_status_is_created_and_dismiss_reports_null() {
    let (job, events) = job();
    joined("job", run_chunks(Arc::clone(&job), 2));
    job.check_dismiss().unwrap();
    job.dismiss();
    assert_eq!(
        events.statuses(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "concluded",
            "null"
        ]
    );
}

#[test]
fn the_rate_counts_what_the_speed_limit_counts() {
    let (job, _) = job();
    job.start();
    std::thread::sleep(Duration::from_millis(20));
    job.advance(2 << 20, 0);
    let info = job.info();
    assert!(info.scan_rate > 0.0, "{info:?}");
    assert_eq!(info.rate, 0.0, "nothing was copied: {info:?}");
    job.conclude(Outcome::Completed, None);
}

#[test]
fn every_verb_wakes_what_waits_on_it() {
    let (job, _) = job();
    let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&heard);
    job.on_verb(Box::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    job.start();
    job.set_speed(1 << 20).unwrap();
    job.set_ready();
    job.complete().unwrap();
    job.cancel().unwrap();
    assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 3);
}
