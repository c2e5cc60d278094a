//! One block job: its identity, QEMU status, progress and speed limit, and
//! the control a user exerts on it (pause, resume, cancel, set-speed),
//! shared between the job's own thread and the commands that steer it.
//!
//! The job thread calls [`Job::checkpoint`] between chunks: that is where a
//! pause takes hold and a cancel is noticed, as at QEMU's `job_pause_point`.
//! `pause` waits until the thread has parked, so once the command returns
//! the offset stands still — or until the job has no pause point left
//! ([`Job::work_done`], [`Job::conclude`]): a pause never waits on a job
//! that can no longer park. Every wait here ends: a parked thread on
//! `resume` or `cancel` (which shutdown sends), the speed-limit sleep at its
//! deadline or on cancel, pause or a new limit, and `pause` as just said.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::json;

use super::job_info::measured_rates;
pub use super::job_info::{JobInfo, JobType, Outcome};
use super::ratelimit::RateLimit;
use super::state::{JobStatus, Verb};
use crate::chain::NodeId;
use crate::sync::{lock, Condvar, Mutex, MutexGuard};

/// Where a job reports what happened (the mount's event log).
pub trait EventSink: Send + Sync {
    /// Records `event` with `data`.
    fn push(&self, event: &str, data: serde_json::Value);
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

/// How many seconds of progress the measured rate looks back over.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// The mutable part of a job.
#[derive(Debug)]
struct State {
    status: JobStatus,
    len: u64,
    offset: u64,
    /// Bytes copied so far (what the speed limit counts).
    copied: u64,
    limit: RateLimit,
    pause_requested: bool,
    cancel_requested: bool,
    /// The job thread is parked at a checkpoint.
    parked: bool,
    /// The job thread has passed its last pause point: it will conclude
    /// without parking again.
    work_done: bool,
    error: Option<String>,
    outcome: Option<Outcome>,
    /// (instant, offset, copied) samples for the measured rates.
    samples: VecDeque<(Instant, u64, u64)>,
    /// Reached `ready` once.
    ready: bool,
    /// Bytes still to copy (jobs that track writes).
    remaining: Option<u64>,
    /// `complete` was accepted.
    complete_requested: bool,
    /// `cancel force=on`: abort even a ready job.
    cancel_forced: bool,
}

impl State {
    /// Whether a requested pause can still take hold: the thread has a
    /// pause point ahead and nothing will make it skip it.
    fn can_park(&self) -> bool {
        !self.work_done && !self.cancel_requested && !self.status.is_finished()
    }
}

/// A block job.
pub struct Job {
    id: String,
    kind: JobType,
    node: String,
    base: Option<String>,
    target: Option<String>,
    touched: Vec<NodeId>,
    shared: Vec<NodeId>,
    kept: Vec<NodeId>,
    state: Mutex<State>,
    wake: Condvar,
    /// Told of every verb, for a job thread that waits on something else
    /// than [`Job::wait`] (a live copy waiting for guest writes).
    wakers: Mutex<Vec<Waker>>,
    events: std::sync::Arc<dyn EventSink>,
}

/// See [`Job::on_verb`].
pub type Waker = Box<dyn Fn() + Send + Sync>;

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
    /// The image written outside the chain (a mirror's target), if any.
    pub target: Option<String>,
    /// Every node the job writes, reads or removes (not its base): no
    /// other job may touch them.
    pub touched: Vec<NodeId>,
    /// Nodes the job only reads (a backup's node): any other job may use
    /// them, except one that removes them from the chain.
    pub shared: Vec<NodeId>,
    /// Of `touched`, the nodes that stay in the chain whatever the job
    /// does (a stream's node, a commit's base); the others may leave it.
    pub kept: Vec<NodeId>,
    /// Bytes the job will scan.
    pub len: u64,
    /// Initial speed limit (0: none).
    pub speed: u64,
}

impl Job {
    /// A job in status `created`, reported as QEMU reports a new job: a
    /// first `JOB_STATUS_CHANGE` to `created`.
    pub fn new(spec: JobSpec, events: std::sync::Arc<dyn EventSink>) -> Job {
        let now = Instant::now();
        let job = Job {
            id: spec.id,
            kind: spec.kind,
            node: spec.node,
            base: spec.base,
            target: spec.target,
            touched: spec.touched,
            shared: spec.shared,
            kept: spec.kept,
            state: Mutex::new(State {
                status: JobStatus::Created,
                len: spec.len,
                offset: 0,
                copied: 0,
                limit: RateLimit::new(spec.speed),
                pause_requested: false,
                cancel_requested: false,
                parked: false,
                work_done: false,
                error: None,
                outcome: None,
                samples: VecDeque::from([(now, 0, 0)]),
                ready: false,
                remaining: None,
                complete_requested: false,
                cancel_forced: false,
            }),
            wake: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
            events,
        };
        job.report_status(JobStatus::Created);
        job
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The nodes the job touches (for conflict checks).
    pub fn touched(&self) -> &[NodeId] {
        &self.touched
    }

    /// The nodes the job only reads (see [`JobSpec::shared`]).
    pub fn shared(&self) -> &[NodeId] {
        &self.shared
    }

    /// The touched nodes that stay in the chain (see [`JobSpec::kept`]).
    pub fn kept(&self) -> &[NodeId] {
        &self.kept
    }

    /// The job's status now.
    pub fn status(&self) -> JobStatus {
        lock(&self.state).status
    }

    /// What the reports show now.
    pub fn info(&self) -> JobInfo {
        let state = lock(&self.state);
        let (scan_rate, rate) = measured_rates(&state.samples);
        let remaining = state.len.saturating_sub(state.offset);
        let eta_seconds =
            (scan_rate > 0.0 && state.outcome.is_none()).then(|| remaining as f64 / scan_rate);
        JobInfo {
            id: self.id.clone(),
            kind: self.kind,
            node: self.node.clone(),
            base: self.base.clone(),
            target: self.target.clone(),
            status: state.status,
            len: state.len,
            offset: state.offset,
            speed: state.limit.speed(),
            rate,
            scan_rate,
            eta_seconds,
            error: state.error.clone(),
            outcome: state.outcome,
            ready: state.ready,
            remaining: state.remaining,
        }
    }

    /// Moves to `status` (QEMU's transition table permitting) and reports it.
    fn transition(&self, state: &mut State, status: JobStatus) {
        if state.status == status {
            return;
        }
        if !state.status.can_become(status) {
            // Every caller moves only along the table; a refusal here is a
            // bug, and staying put is safer than an impossible state.
            log::error!(
                "job {}: refused transition {} -> {status}",
                self.id,
                state.status
            );
            return;
        }
        state.status = status;
        self.report_status(status);
        self.wake.notify_all();
    }

    fn report_status(&self, status: JobStatus) {
        self.events.push(
            "JOB_STATUS_CHANGE",
            json!({"id": self.id, "status": status.name()}),
        );
    }

    /// Leaves `paused` (or `standby`) for the state it paused from: the
    /// thread runs again (after `resume`, or to stop after `cancel`).
    fn unpause(&self, state: &mut State) {
        let running = match state.status {
            JobStatus::Standby => JobStatus::Ready,
            JobStatus::Paused => JobStatus::Running,
            _ => return,
        };
        self.transition(state, running);
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

    /// Pauses the job. As in QEMU the job moves to `paused` (`standby`
    /// when ready) only at its next pause point; this returns once its
    /// thread has parked there, or at once when it has none left (its work
    /// is done and it is concluding, or it is cancelled), so the offset
    /// stands still when it returns.
    pub fn pause(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Pause)?;
        state.pause_requested = true;
        self.verb_heard();
        while !state.parked && state.can_park() {
            state = self.wait(state, None);
        }
        Ok(())
    }

    /// Resumes a paused job. Only `paused` and `standby` accept it: QEMU's
    /// verb table admits `resume` in every live state, but its
    /// `job_user_resume` then refuses a job that is not paused.
    pub fn resume(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Resume)?;
        if !matches!(state.status, JobStatus::Paused | JobStatus::Standby) {
            return Err(VerbRefused {
                verb: Verb::Resume,
                status: state.status,
            });
        }
        state.pause_requested = false;
        self.unpause(&mut state);
        self.verb_heard();
        Ok(())
    }

    /// Asks the job to stop; it concludes as cancelled. A paused job is
    /// resumed first, as QEMU's `job_cancel` does, so that it leaves
    /// `paused` through `running` and reaches `aborting` and `concluded`.
    pub fn cancel(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Cancel)?;
        state.cancel_requested = true;
        state.pause_requested = false;
        self.unpause(&mut state);
        self.verb_heard();
        Ok(())
    }

    /// Asks the job to stop even if it is ready (`cancel force=on`): it
    /// concludes as cancelled, without finishing its copy.
    pub fn force_cancel(&self) -> Result<(), VerbRefused> {
        let mut state = lock(&self.state);
        self.check_verb(&state, Verb::Cancel)?;
        state.cancel_requested = true;
        state.cancel_forced = true;
        state.pause_requested = false;
        self.unpause(&mut state);
        self.verb_heard();
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
        self.verb_heard();
        Ok(())
    }

    /// Has `waker` called at every verb from now on, besides waking the
    /// job's thread where it waits in [`Job::checkpoint`] or `advance`.
    pub fn on_verb(&self, waker: Waker) {
        lock(&self.wakers).push(waker);
    }

    /// Wakes whatever waits for a verb.
    fn verb_heard(&self) {
        self.wake.notify_all();
        for waker in lock(&self.wakers).iter() {
            waker();
        }
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
        self.events
            .push("BLOCK_JOB_READY", self.block_job_data(&state));
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
        self.verb_heard();
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

    /// Job thread, between chunks (a pause point): parks while a pause is
    /// requested, showing `paused` (or `standby`); says whether the job
    /// must stop because it was cancelled. A parked thread wakes on
    /// `resume` or `cancel`.
    pub fn checkpoint(&self) -> Result<(), Stop> {
        let mut state = lock(&self.state);
        if state.pause_requested && !state.cancel_requested {
            let paused = match state.status {
                JobStatus::Ready => JobStatus::Standby,
                _ => JobStatus::Paused,
            };
            self.transition(&mut state, paused);
            state.parked = true;
            self.wake.notify_all();
            while state.pause_requested && !state.cancel_requested {
                state = self.wait(state, None);
            }
            state.parked = false;
            // `resume` and `cancel` already left `paused`; this is only a
            // guard so the thread never runs on in a paused state.
            self.unpause(&mut state);
        }
        if state.cancel_requested {
            return Err(Stop::Cancelled);
        }
        Ok(())
    }

    /// Job thread, with nothing to do until a verb comes (a `sync=none`
    /// backup): waits until a pause or cancel is asked for, at most
    /// `timeout`.
    pub fn idle(&self, timeout: Duration) {
        let state = lock(&self.state);
        let _ = self
            .wake
            .wait_timeout_while(state, timeout, |s| {
                !s.pause_requested && !s.cancel_requested
            })
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Job thread: the work is done and no pause point follows (QEMU's job
    /// leaves its run function). A pause requested from now on finds
    /// nothing to park and returns; says whether the job was cancelled
    /// meanwhile, in which case it must not change the chain.
    pub fn work_done(&self) -> Result<(), Stop> {
        let mut state = lock(&self.state);
        state.work_done = true;
        self.wake.notify_all();
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
        state.copied += copied;
        let now = Instant::now();
        let sample = (now, state.offset, state.copied);
        state.samples.push_back(sample);
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
    /// job parks (showing `paused` with the error) until resumed (then
    /// retries) or cancelled.
    pub fn pause_for_error(&self, error: String) -> Result<(), Stop> {
        {
            let mut state = lock(&self.state);
            state.error = Some(error);
            state.pause_requested = true;
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
    /// closing states to `concluded` with `outcome`, and reports it. The
    /// job always gets there: the thread is running, so the job is in
    /// `created`, `running` or `ready` (a pause still requested found no
    /// pause point and is dropped), and each of those leads to `waiting`
    /// and to `aborting` in QEMU's table.
    pub fn conclude(&self, outcome: Outcome, error: Option<String>) {
        let mut state = lock(&self.state);
        state.work_done = true;
        state.pause_requested = false;
        self.unpause(&mut state);
        if outcome == Outcome::Completed {
            // Progress counts every byte scanned, so done equals total on
            // success, even for a job that had nothing to scan.
            state.offset = state.len;
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
        let mut data = self.block_job_data(&state);
        if let (Some(error), Outcome::Failed) = (&state.error, outcome) {
            data["error"] = json!(error);
        }
        self.events.push(event, data);
        self.transition(&mut state, JobStatus::Concluded);
    }

    /// The fields QMP's `BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED` and
    /// `BLOCK_JOB_CANCELLED` share.
    fn block_job_data(&self, state: &State) -> serde_json::Value {
        json!({
            "type": self.kind.name(),
            "device": self.node,
            "id": self.id,
            "len": state.len,
            "offset": state.offset,
            "speed": state.limit.speed(),
        })
    }

    /// Reports an I/O error the job met, as QMP's `BLOCK_JOB_ERROR`.
    pub fn report_error(&self, operation: &str, action: &str) {
        self.events.push(
            "BLOCK_JOB_ERROR",
            json!({"device": self.node, "id": self.id, "operation": operation, "action": action}),
        );
    }
}

#[cfg(test)]
#[path = "job_tests.rs"]
mod tests;
