//! One block job: its identity, QEMU status, progress and speed limit, and
//! the control a user exerts on it (pause, resume, cancel, set-speed),
//! shared between the job's own thread and the commands that steer it.
//!
//! The job thread calls [`Job::checkpoint`] between chunks: that is where a
//! pause takes hold and a cancel is noticed. `pause` waits until the thread
//! has parked, so once the command returns the offset stands still.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::json;

use super::ratelimit::RateLimit;
use super::state::{JobStatus, Verb};
use crate::chain::NodeId;
use crate::sync::{lock, Condvar, Mutex, MutexGuard};

/// Where a job reports what happened (the mount's event log).
pub trait EventSink: Send + Sync {
    /// Records `event` with `data`.
    fn push(&self, event: &str, data: serde_json::Value);
}

/// The kind of a job, as QEMU's `JobType` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobType {
    /// block-stream.
    Stream,
    /// block-commit.
    Commit,
}

impl JobType {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            JobType::Stream => "stream",
            JobType::Commit => "commit",
        }
    }
}

/// How a concluded job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Did all its work and changed the chain.
    Completed,
    /// Cancelled by the user.
    Cancelled,
    /// Stopped by an error (the error text says which).
    Failed,
}

impl Outcome {
    /// The word status reports use.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// Why a verb was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct VerbRefused {
    /// The verb.
    pub verb: Verb,
    /// The job's status when it was refused.
    pub status: JobStatus,
}

/// Why the job thread must stop working.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The user cancelled the job.
    Cancelled,
    /// An error ended the job (it is recorded on the job).
    Failed,
}

/// What the reports show of a job at one instant.
#[derive(Clone, Debug)]
pub struct JobInfo {
    /// The job id.
    pub id: String,
    /// stream or commit.
    pub kind: JobType,
    /// The node the job writes (QEMU's `device`).
    pub node: String,
    /// The base node, if any.
    pub base: Option<String>,
    /// QEMU status.
    pub status: JobStatus,
    /// Bytes the job will have scanned when done.
    pub len: u64,
    /// Bytes scanned so far.
    pub offset: u64,
    /// Speed limit in bytes per second (0: none).
    pub speed: u64,
    /// Measured copy rate in bytes per second over the last seconds.
    pub rate: f64,
    /// Estimated seconds to completion at the measured rate.
    pub eta_seconds: Option<f64>,
    /// The error that failed (or paused) the job.
    pub error: Option<String>,
    /// How the job ended, once concluded.
    pub outcome: Option<Outcome>,
    /// Whether the job has been `ready` (QEMU's `ready` field).
    pub ready: bool,
    /// Bytes still to copy, for jobs that track writes (active commit).
    pub remaining: Option<u64>,
}

/// How many seconds of progress the measured rate looks back over.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// The mutable part of a job.
#[derive(Debug)]
struct State {
    status: JobStatus,
    len: u64,
    offset: u64,
    limit: RateLimit,
    pause_requested: bool,
    cancel_requested: bool,
    /// The job thread is parked at a checkpoint.
    parked: bool,
    error: Option<String>,
    outcome: Option<Outcome>,
    /// (instant, offset) samples for the measured rate.
    samples: VecDeque<(Instant, u64)>,
    /// Reached `ready` once.
    ready: bool,
    /// Bytes still to copy (jobs that track writes).
    remaining: Option<u64>,
    /// `complete` was accepted.
    complete_requested: bool,
    /// `cancel force=on`: abort even a ready job.
    cancel_forced: bool,
}

/// A block job.
pub struct Job {
    id: String,
    kind: JobType,
    node: String,
    base: Option<String>,
    touched: Vec<NodeId>,
    state: Mutex<State>,
    wake: Condvar,
    events: std::sync::Arc<dyn EventSink>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What a new job is.
pub struct JobSpec {
    /// The job id.
    pub id: String,
    /// stream or commit.
    pub kind: JobType,
    /// The node the job writes.
    pub node: String,
    /// The base node, if any.
    pub base: Option<String>,
    /// Every node the job writes, reads or removes (not its base).
    pub touched: Vec<NodeId>,
    /// Bytes the job will scan.
    pub len: u64,
    /// Initial speed limit (0: none).
    pub speed: u64,
}

impl Job {
    /// A job in status `created`.
    pub fn new(spec: JobSpec, events: std::sync::Arc<dyn EventSink>) -> Job {
        let now = Instant::now();
        Job {
            id: spec.id,
            kind: spec.kind,
            node: spec.node,
            base: spec.base,
            touched: spec.touched,
            state: Mutex::new(State {
                status: JobStatus::Created,
                len: spec.len,
                offset: 0,
                limit: RateLimit::new(spec.speed),
                pause_requested: false,
                cancel_requested: false,
                parked: false,
                error: None,
                outcome: None,
                samples: VecDeque::from([(now, 0)]),
                ready: false,
                remaining: None,
                complete_requested: false,
                cancel_forced: false,
            }),
            wake: Condvar::new(),
            events,
        }
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The nodes the job touches (for conflict checks).
    pub fn touched(&self) -> &[NodeId] {
        &self.touched
    }

    /// The job's status now.
    pub fn status(&self) -> JobStatus {
        lock(&self.state).status
    }

    /// What the reports show now.
    pub fn info(&self) -> JobInfo {
        let state = lock(&self.state);
        let rate = measured_rate(&state.samples);
        let remaining = state.len.saturating_sub(state.offset);
        let eta_seconds = (rate > 0.0 && state.outcome.is_none()).then(|| remaining as f64 / rate);
        JobInfo {
            id: self.id.clone(),
            kind: self.kind,
            node: self.node.clone(),
            base: self.base.clone(),
            status: state.status,
            len: state.len,
            offset: state.offset,
            speed: state.limit.speed(),
            rate,
            eta_seconds,
            error: state.error.clone(),
            outcome: state.outcome,
            ready: state.ready,
            remaining: state.remaining,
        }
    }

    /// Moves to `status` (QEMU's transition table permitting) and reports it.
    fn transition(&self, state: &mut State, status: JobStatus) {
        if state.status == status || !state.status.can_become(status) {
            return;
        }
        state.status = status;
        self.events.push(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": status.name()}),
        );
        self.wake.notify_all();
    }

    fn check_verb(&self, state: &State, verb: Verb) -> Result<(), VerbRefused> {
        if state.status.allows(verb) {
            Ok(())
        } else {
            Err(VerbRefused {
                verb,
                status: state.status,
            })
        }
    }

    /// Pauses the job; returns once its thread has stopped between chunks.
    pub fn pause(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Pause)?;
        state.pause_requested = true;
        let paused = match state.status {
            JobStatus::Ready => JobStatus::Standby,
            _ => JobStatus::Paused,
        };
        self.transition(&mut state, paused);
        self.wake.notify_all();
        while !state.parked && !state.status.is_finished() && state.pause_requested {
            state = self.wait(state, None);
        }
        Ok(())
    }

    /// Resumes a paused job.
    pub fn resume(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Resume)?;
        state.pause_requested = false;
        let running = match state.status {
            JobStatus::Standby => JobStatus::Ready,
            JobStatus::Paused => JobStatus::Running,
            other => other,
        };
        self.transition(&mut state, running);
        self.wake.notify_all();
        Ok(())
    }

    /// Asks the job to stop; it concludes as cancelled.
    pub fn cancel(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Cancel)?;
        state.cancel_requested = true;
        self.wake.notify_all();
        Ok(())
    }

    /// Asks the job to stop even if it is ready (`cancel force=on`): it
    /// concludes as cancelled, without finishing its copy.
    pub fn force_cancel(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Cancel)?;
        state.cancel_requested = true;
        state.cancel_forced = true;
        self.wake.notify_all();
        Ok(())
    }

    /// Whether the cancel asked for is `force=on`.
    pub fn cancel_forced(&self) -> bool {
        lock(&self.state).cancel_forced
    }

    /// Asks a ready (or standby) job to complete: the job thread finishes
    /// its work and changes the chain.
    pub fn complete(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Complete)?;
        state.complete_requested = true;
        self.wake.notify_all();
        Ok(())
    }

    /// Whether `complete` was accepted.
    pub fn completion_requested(&self) -> bool {
        lock(&self.state).complete_requested
    }

    /// Job thread: the copy is in step for the first time; the job moves to
    /// `ready` and reports `BLOCK_JOB_READY`.
    pub fn set_ready(&self) {
        let mut state = lock(&self.state);
        if state.ready {
            return;
        }
        state.ready = true;
        self.transition(&mut state, JobStatus::Ready);
        let data = json!({
            "type": self.kind.name(),
            "device": self.node,
            "id": self.id,
            "len": state.len,
            "offset": state.offset,
            "speed": state.limit.speed(),
        });
        self.events.push("BLOCK_JOB_READY", data);
    }

    /// Job thread, for jobs that track writes: `pending` bytes are about
    /// to be reported done by [`Job::advance`] and `remaining` more are
    /// dirty, so `len` grows to cover both, as QEMU's mirror reports it.
    pub fn set_remaining(&self, pending: u64, remaining: u64) {
        let mut state = lock(&self.state);
        state.remaining = Some(remaining);
        state.len = state.offset + pending + remaining;
    }

    /// Changes the speed limit.
    pub fn set_speed(&self, speed: u64) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::SetSpeed)?;
        state.limit.set_speed(speed);
        self.wake.notify_all();
        Ok(())
    }

    /// Whether `dismiss` may remove the job now.
    pub fn check_dismiss(&self) -> Result<(), VerbRefused> {
        let state = lock(&self.state);
        self.check_verb(&state, Verb::Dismiss)
    }

    /// Marks the job dismissed.
    pub fn dismiss(&self) {
        let mut state = lock(&self.state);
        self.transition(&mut state, JobStatus::Null);
    }

    fn wait<'a>(
        &self,
        state: MutexGuard<'a, State>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        match timeout {
            None => self.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            Some(timeout) => {
                self.wake
                    .wait_timeout(state, timeout)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        }
    }

    /// Job thread: the job starts running.
    pub fn start(&self) {
        let mut state = lock(&self.state);
        self.transition(&mut state, JobStatus::Running);
    }

    /// Job thread, between chunks: parks while paused; says whether the
    /// job must stop because it was cancelled.
    pub fn checkpoint(&self) -> Result<(), Stop> {
        let mut state = lock(&self.state);
        while state.pause_requested && !state.cancel_requested {
            state.parked = true;
            self.wake.notify_all();
            state = self.wait(state, None);
        }
        state.parked = false;
        if state.cancel_requested {
            return Err(Stop::Cancelled);
        }
        Ok(())
    }

    /// Job thread: `scanned` more bytes are done, `copied` of them written.
    /// Sleeps as the speed limit demands (waking early for a cancel, a
    /// pause or a new limit).
    pub fn advance(&self, scanned: u64, copied: u64) {
        let mut state = lock(&self.state);
        state.offset = (state.offset + scanned).min(state.len);
        let now = Instant::now();
        let offset = state.offset;
        state.samples.push_back((now, offset));
        while state.samples.len() > 2 && now.duration_since(state.samples[0].0) > RATE_WINDOW {
            state.samples.pop_front();
        }
        let delay = state.limit.account(copied, now);
        let deadline = now + delay;
        while !state.cancel_requested && !state.pause_requested {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let speed = state.limit.speed();
            state = self.wait(state, Some(left));
            if state.limit.speed() != speed {
                break;
            }
        }
    }

    /// Job thread: an error hit a chunk and `on-error` says to pause. The
    /// job parks until resumed (then retries) or cancelled.
    pub fn pause_for_error(&self, error: String) -> Result<(), Stop> {
        {
            let mut state = lock(&self.state);
            state.error = Some(error);
            state.pause_requested = true;
            self.transition(&mut state, JobStatus::Paused);
        }
        let result = self.checkpoint();
        lock(&self.state).error = None;
        result
    }

    /// Job thread: records an error that does not stop the job
    /// (`on-error=ignore`); the job will end failed.
    pub fn record_error(&self, error: String) {
        lock(&self.state).error = Some(error);
    }

    /// The error recorded so far, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.state).error.clone()
    }

    /// Job thread: the work is done (or stopped); moves through QEMU's
    /// closing states to `concluded` with `outcome`, and reports it.
    pub fn conclude(&self, outcome: Outcome, error: Option<String>) {
        let mut state = lock(&self.state);
        // A job that ends while paused (cancelled, or soft-cancelled in
        // standby) first resumes, as QEMU's does.
        match state.status {
            JobStatus::Paused => self.transition(&mut state, JobStatus::Running),
            JobStatus::Standby => self.transition(&mut state, JobStatus::Ready),
            _ => {}
        }
        if outcome == Outcome::Completed {
            self.transition(&mut state, JobStatus::Waiting);
            self.transition(&mut state, JobStatus::Pending);
        } else {
            self.transition(&mut state, JobStatus::Aborting);
        }
        state.error = error.clone().or(state.error.take());
        state.outcome = Some(outcome);
        let event = match outcome {
            Outcome::Cancelled => "BLOCK_JOB_CANCELLED",
            _ => "BLOCK_JOB_COMPLETED",
        };
        let mut data = json!({
            "type": self.kind.name(),
            "device": self.node,
            "id": self.id,
            "len": state.len,
            "offset": state.offset,
            "speed": state.limit.speed(),
        });
        if let (Some(error), Outcome::Failed) = (&state.error, outcome) {
            data["error"] = json!(error);
        }
        self.events.push(event, data);
        self.transition(&mut state, JobStatus::Concluded);
    }

    /// Reports an I/O error the job met, as QMP's `BLOCK_JOB_ERROR`.
    pub fn report_error(&self, operation: &str, action: &str) {
        self.events.push(
            "BLOCK_JOB_ERROR",
            json!({"device": self.node, "id": self.id, "operation": operation, "action": action}),
        );
    }
}

/// Bytes per second over the samples' span.
fn measured_rate(samples: &VecDeque<(Instant, u64)>) -> f64 {
    match (samples.front(), samples.back()) {
        (Some(&(t0, o0)), Some(&(t1, o1))) if t1 > t0 => {
            (o1 - o0) as f64 / t1.duration_since(t0).as_secs_f64()
        }
        _ => 0.0,
    }
}
