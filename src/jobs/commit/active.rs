//! Active commit: the top is the active node, so guest writes keep
//! landing in it while the job copies it down.
//!
//! A tracker is hooked on the top's open image *before* the first scan:
//! every write, write-zeroes and discard marks its blocks dirty once the
//! data is in the image. The initial dirty set is what the top shows above
//! the base, scanned after the hook is in place, so no write made during
//! the scan is missed. The job copies dirty runs (clearing the bits before
//! reading, so a write that lands meanwhile sets them again) and reports
//! `ready` the first time nothing is dirty. `complete` drains guest writes
//! (the mount's write gate), copies what is left, flushes and pivots: the
//! base becomes the active layer and the top stops taking writes. A soft
//! `cancel` does the same without the pivot.
//!
//! Until `ready` the job copies with the shared copier, several chunks in
//! flight: the reader clears a run's bits before reading it, and the job's
//! thread writes the runs in the order they were read, so a run re-read
//! after a guest write always lands after its stale copy. Runs read but not
//! written when the job stops copying (pause is not a stop; `complete`,
//! cancel and errors are) are marked dirty again.
//!
//! `copy-mode=write-blocking`: once ready, a guest write copies its own
//! range to the base before it returns. From then on copies of the job and
//! of writers are serialised, one at a time, by one lock that covers
//! clearing the bits, reading the top and writing the base, so a stale
//! copy can never overwrite a newer one in the base.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::{handle_error, CommitPlan};
use crate::chain::track::{DirtyMap, WriteHook};
use crate::chain::{Allocation, Chain, ChainError, Node};
use crate::jobs::command::CopyMode;
use crate::jobs::copier::{Copier, CopyFailure, Ended, Next, CHUNK};
use crate::jobs::job::{Job, Outcome, Stop};
use crate::jobs::registry::LiveChain;
use crate::jobs::state::JobStatus;
use crate::sync::{lock, Arc, Condvar, Mutex};

/// Granularity of the dirty map: QEMU's default for mirror and commit.
const GRANULARITY: u64 = 64 << 10;

/// How long the job waits for a write when the base is in step, before it
/// looks at its verbs again.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// The job's write tracker, hooked on the top's open image.
struct Tracker {
    dirty: DirtyMap,
    /// The chain as the job started (shares its images with every later
    /// version while the top is in the chain).
    chain: Arc<Chain>,
    plan: CommitPlan,
    copy: Copier,
    /// Writers copy their own range (write-blocking, once ready).
    blocking: AtomicBool,
    /// Held while a run is cleared, read from the top and written into
    /// the base.
    copier: Mutex<()>,
    /// Set by a write; the idle job waits on it.
    kicked: Mutex<bool>,
    kick: Condvar,
}

impl WriteHook for Tracker {
    fn written(&self, offset: u64, len: u64) {
        self.dirty.mark(offset, len);
        *lock(&self.kicked) = true;
        self.kick.notify_all();
        if self.blocking.load(Ordering::Acquire) {
            self.copy_through(offset, len);
        }
    }
}

impl Tracker {
    /// Write-blocking: copies what is still dirty of the blocks holding
    /// `offset..offset + len`. A failed copy stays dirty for the job.
    fn copy_through(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut buf = Vec::new();
        let _copier = lock(&self.copier);
        let mut from = offset;
        while let Some((start, run)) = self.dirty.take_in(from, end, CHUNK) {
            if let Err((_, err)) = self.copy.copy(&self.chain, start, run, &mut buf) {
                log::warn!("commit: a write-blocking copy failed: {err}");
                self.dirty.mark(start, run);
                return;
            }
            from = start + run;
        }
    }

    /// Takes the next dirty run from `cursor` on and copies it; `None`
    /// when nothing is dirty.
    fn copy_next(
        &self,
        cursor: u64,
        buf: &mut Vec<u8>,
    ) -> Option<(u64, u64, Result<u64, CopyFailure>)> {
        let _copier = lock(&self.copier);
        let (offset, len) = self.dirty.take(cursor, CHUNK)?;
        Some((offset, len, self.copy.copy(&self.chain, offset, len, buf)))
    }

    /// Waits until a write marked something, at most `timeout`.
    fn wait_for_write(&self, timeout: Duration) {
        let kicked = lock(&self.kicked);
        let (mut kicked, _) = self
            .kick
            .wait_timeout_while(kicked, timeout, |kicked| !*kicked)
            .unwrap_or_else(|p| p.into_inner());
        *kicked = false;
    }
}

/// Removes the hook however the job ends (the hook holds the chain, which
/// holds the image that holds the hook).
struct Installed<'a> {
    node: &'a Node,
    hook: Arc<dyn WriteHook>,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        self.node.remove_write_hook(&self.hook);
    }
}

/// Runs an active commit; returns how it ended.
pub(super) fn run(
    job: &Job,
    chain: &Arc<Chain>,
    plan: &CommitPlan,
    live: &LiveChain,
) -> (Outcome, Option<String>) {
    let Some(top) = chain.node(plan.top) else {
        let error = ChainError::NoSuchNode { id: plan.top.0 };
        return (Outcome::Failed, Some(error.to_string()));
    };
    let tracker = Arc::new(Tracker {
        dirty: DirtyMap::new(top.virtual_size(), GRANULARITY),
        chain: Arc::clone(chain),
        plan: plan.clone(),
        copy: plan.copy(),
        blocking: AtomicBool::new(false),
        copier: Mutex::new(()),
        kicked: Mutex::new(false),
        kick: Condvar::new(),
    });
    let hook: Arc<dyn WriteHook> = tracker.clone();
    top.add_write_hook(Arc::clone(&hook));
    let _installed = Installed { node: top, hook };
    // Only now: a write landing during the scan is marked by the hook.
    if let Err(err) = scan(chain, plan, &tracker.dirty) {
        return (Outcome::Failed, Some(err.to_string()));
    }
    job.set_remaining(0, tracker.dirty.dirty_bytes());
    match copy_loop(job, &tracker, plan) {
        Ok(pivot) => finish(job, &tracker, live, top, pivot),
        Err(Stop::Cancelled) => (Outcome::Cancelled, None),
        Err(Stop::Failed) => (Outcome::Failed, job.error()),
    }
}

/// Marks dirty everything the top shows above the base.
fn scan(chain: &Chain, plan: &CommitPlan, dirty: &DirtyMap) -> Result<(), ChainError> {
    let size = chain.node(plan.top).map_or(0, |n| n.virtual_size());
    let mut offset = 0;
    while offset < size {
        let extent = chain.block_status(plan.top, Some(plan.base), offset, size - offset)?;
        let run = extent.len.max(1).min(size - offset);
        if extent.allocation != Allocation::Unallocated {
            dirty.mark(offset, run);
        }
        offset += run;
    }
    Ok(())
}

/// Copies until `complete` (returns `true`: pivot) or a soft cancel of a
/// ready job (`false`: no pivot).
fn copy_loop(job: &Job, tracker: &Tracker, plan: &CommitPlan) -> Result<bool, Stop> {
    let mut cursor = 0;
    let mut buf = Vec::new();
    loop {
        if let Err(stop) = job.checkpoint() {
            let ready = matches!(job.status(), JobStatus::Ready | JobStatus::Standby);
            return match stop {
                Stop::Cancelled if ready && !job.cancel_forced() => Ok(false),
                stop => Err(stop),
            };
        }
        if job.completion_requested() {
            return Ok(true);
        }
        if tracker.dirty.dirty_bytes() > 0 && !tracker.blocking.load(Ordering::Acquire) {
            // Nobody else copies yet: the copier may keep runs in flight.
            cursor = pipelined(job, tracker, plan, cursor)?;
            continue;
        }
        match tracker.copy_next(cursor, &mut buf) {
            None => {
                job.set_remaining(0, 0);
                job.set_ready();
                if plan.copy_mode == CopyMode::WriteBlocking {
                    tracker.blocking.store(true, Ordering::Release);
                }
                tracker.wait_for_write(IDLE_POLL);
            }
            Some((offset, len, result)) => {
                cursor = offset + len;
                account(job, tracker, plan, offset, len, 0, result)?;
            }
        }
    }
}

/// Copies dirty runs with several in flight until none is left or the job
/// must look at its verbs (a cancel, `complete`); returns the cursor.
fn pipelined(job: &Job, tracker: &Tracker, plan: &CommitPlan, cursor: u64) -> Result<u64, Stop> {
    let cursor = AtomicU64::new(cursor);
    // Bytes taken from the map and not yet written: still to copy.
    let in_flight = AtomicU64::new(0);
    let take = || {
        let (offset, len) = tracker.dirty.take(cursor.load(Ordering::Relaxed), CHUNK)?;
        cursor.store(offset + len, Ordering::Relaxed);
        in_flight.fetch_add(len, Ordering::Relaxed);
        Some((offset, len))
    };
    let ended = tracker.copy.run(
        &tracker.chain,
        take,
        || Ok(!job.completion_requested() && job.checkpoint().is_ok()),
        |offset, len, result| {
            let pending = in_flight.fetch_sub(len, Ordering::Relaxed) - len;
            account(job, tracker, plan, offset, len, pending, result)?;
            Ok(Next::Go)
        },
    )?;
    if let Ended::Stopped(unwritten) = ended {
        // Their bits were cleared when they were taken.
        for (offset, len) in unwritten {
            tracker.dirty.mark(offset, len);
        }
    }
    Ok(cursor.load(Ordering::Relaxed))
}

/// Accounts for a copied run (`pending` more bytes are taken and not yet
/// written), or applies `on-error` to a failed one.
fn account(
    job: &Job,
    tracker: &Tracker,
    plan: &CommitPlan,
    offset: u64,
    len: u64,
    pending: u64,
    result: Result<u64, CopyFailure>,
) -> Result<(), Stop> {
    match result {
        Ok(copied) => {
            job.set_remaining(len, tracker.dirty.dirty_bytes() + pending);
            job.advance(len, copied);
        }
        Err((operation, err)) => {
            // `ignore` leaves the run out (the job will end failed); a
            // retry after `stop` needs it dirty again.
            if !handle_error(job, plan.on_error, operation, &err)? {
                tracker.dirty.mark(offset, len);
            }
        }
    }
    Ok(())
}

/// Drains guest writes, copies what is left, flushes and, for `complete`,
/// pivots onto the base.
fn finish(
    job: &Job,
    tracker: &Tracker,
    live: &LiveChain,
    top: &Node,
    pivot: bool,
) -> (Outcome, Option<String>) {
    let plan = &tracker.plan;
    let mut buf = Vec::new();
    loop {
        let gate = live.drain();
        let failed = loop {
            match tracker.copy_next(0, &mut buf) {
                None => break None,
                Some((_, _, Ok(_))) => {}
                Some((offset, len, Err(err))) => break Some((offset, len, err)),
            }
        };
        if let Some((offset, len, (operation, err))) = failed {
            // Writers go on while the job waits out its error.
            drop(gate);
            match handle_error(job, plan.on_error, operation, &err) {
                Ok(false) => {
                    tracker.dirty.mark(offset, len);
                }
                Ok(true) => {}
                Err(Stop::Cancelled) => return (Outcome::Cancelled, None),
                Err(Stop::Failed) => return (Outcome::Failed, job.error()),
            }
            continue;
        }
        if let Some(error) = job.error() {
            return (Outcome::Failed, Some(error));
        }
        // The base must hold everything on disk before it replaces the top.
        if let Err(err) = tracker.chain.flush() {
            return (Outcome::Failed, Some(err.to_string()));
        }
        job.set_remaining(0, 0);
        if pivot {
            if let Err(err) = live.change(&|current| current.pivoted_to(plan.base)) {
                return (Outcome::Failed, Some(err.to_string()));
            }
            // Still under the gate: no write reaches the old top from now.
            if let Err(err) = top.set_writable(false) {
                log::error!("commit {}: the old top stays writable: {err}", job.id());
            }
        }
        drop(gate);
        return (Outcome::Completed, None);
    }
}
