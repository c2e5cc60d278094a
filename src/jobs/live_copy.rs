//! The engine that active commit and mirror share: a copy of a node that
//! guest writes keep changing, kept in step until `complete` pivots onto
//! it (or a soft cancel leaves it as a consistent copy).
//!
//! ```text
//! track → scan → copy dirty runs → ready → keep in step → drain → pivot
//! ```
//!
//! A tracker is hooked on the watched node's open image *before* the
//! first scan (by a mirror, before its command returns): every write,
//! write-zeroes and discard marks its blocks dirty once the data is in
//! the image. The initial dirty set is scanned after the hook is in place
//! (what each job must copy: what the top shows above the base for a
//! commit, what the mirror's `sync` selects), so no write made during the
//! scan is missed. The job copies dirty runs
//! (clearing the bits before reading, so a write that lands meanwhile sets
//! them again) and reports `ready` the first time nothing is dirty.
//! `complete` drains guest writes (the mount's write gate), copies what is
//! left, flushes the destination and pivots under the gate. A soft `cancel`
//! of a ready job does the same without the pivot.
//!
//! Until `ready` the job copies with the shared copier, several chunks in
//! flight: the reader clears a run's bits before reading it, and the job's
//! thread writes the runs in the order they were read, so a run re-read
//! after a guest write always lands after its stale copy. Runs read but not
//! written when the job stops copying (pause is not a stop; `complete`,
//! cancel and errors are) are marked dirty again.
//!
//! `copy-mode=write-blocking`: once ready, a guest write copies its own
//! range to the destination before it returns. From then on copies of the
//! job and of writers are serialised, one at a time, by one lock that
//! covers clearing the bits, reading the source and writing the
//! destination, so a stale copy can never overwrite a newer one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::command::{CopyMode, OnError};
use super::copier::{each_extent, Chains, Copier, CopyFailure, Ended, Next, CHUNK};
use super::job::{Job, Outcome, Stop};
use super::registry::LiveChain;
use super::state::JobStatus;
use super::stream::handle_error;
use crate::chain::track::{DirtyMap, WriteHook};
use crate::chain::{Allocation, Chain, ChainError, Node, NodeId};
use crate::sync::{lock, Arc, Condvar, Mutex};

/// How long the job waits for a write when the copy is in step, before it
/// looks at its verbs again.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// What a job keeps in step, and how.
pub(super) struct LiveCopy {
    /// What is copied where: the view is the watched node.
    pub copy: Copier,
    /// The chain the view is read from (the mounted chain as the job
    /// started; it shares its images with every later version).
    pub source: Arc<Chain>,
    /// The chain the destination is written in: the source itself for a
    /// commit, the target's own chain for a mirror.
    pub dest: Arc<Chain>,
    /// Error policy.
    pub on_error: OnError,
    /// How the copy keeps up with writes once ready.
    pub copy_mode: CopyMode,
    /// Bytes per block of the dirty map (at most [`CHUNK`] are used).
    pub granularity: u64,
}

/// The job's write tracker, hooked on the watched node's open image.
struct Tracker {
    dirty: DirtyMap,
    live: LiveCopy,
    /// Writers copy their own range (write-blocking, once ready).
    blocking: AtomicBool,
    /// Held while a run is cleared, read from the source and written into
    /// the destination.
    copier: Mutex<()>,
    /// Set by a write; the idle job waits on it.
    kicked: Mutex<bool>,
    kick: Condvar,
}

impl WriteHook for Tracker {
    fn written(&self, offset: u64, len: u64) {
        self.dirty.mark(offset, len);
        self.kick();
        if self.blocking.load(Ordering::Acquire) {
            self.copy_through(offset, len);
        }
    }
}

impl Tracker {
    fn chains(&self) -> Chains<'_> {
        Chains {
            source: &self.live.source,
            dest: &self.live.dest,
        }
    }

    /// Write-blocking: copies what is still dirty of the blocks holding
    /// `offset..offset + len`. A failed copy stays dirty for the job.
    fn copy_through(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut buf = Vec::new();
        let _copier = lock(&self.copier);
        let mut from = offset;
        while let Some((start, run)) = self.dirty.take_in(from, end, CHUNK) {
            if let Err((_, err)) = self
                .live
                .copy
                .copy_between(self.chains(), start, run, &mut buf)
            {
                log::warn!("a write-blocking copy failed: {err}");
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
        let copied = self.live.copy.copy_between(self.chains(), offset, len, buf);
        Some((offset, len, copied))
    }

    /// Wakes the job where it waits for a write.
    fn kick(&self) {
        *lock(&self.kicked) = true;
        self.kick.notify_all();
    }

    /// Waits until a write marked something or a verb came, at most
    /// `timeout`.
    fn wait_for_write(&self, timeout: Duration) {
        let kicked = lock(&self.kicked);
        let (mut kicked, _) = self
            .kick
            .wait_timeout_while(kicked, timeout, |kicked| !*kicked)
            .unwrap_or_else(|p| p.into_inner());
        *kicked = false;
    }
}

/// A copy whose write tracking is in place: made by [`track`], run by
/// [`run`]. Dropping it removes the hook however the job ends (the hook
/// holds the chains, which hold the image that holds the hook).
pub(super) struct Tracking {
    tracker: Arc<Tracker>,
    node: Node,
    hook: Arc<dyn WriteHook>,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.node.remove_write_hook(&self.hook);
    }
}

/// Hooks the tracking of `copy` on `watched` (the view's node): every
/// write from now on is marked dirty. A job calls it before its command
/// returns, so a write made at any moment of the job is seen even where
/// no scan would find it (a mirror's `sync=none`).
pub(super) fn track(copy: LiveCopy, watched: &Node) -> Tracking {
    let tracker = Arc::new(Tracker {
        // The copier moves at most one chunk per run: a coarser block
        // would be cut short there and its rest lost. Finer tracking only
        // copies less.
        dirty: DirtyMap::new(watched.virtual_size(), copy.granularity.min(CHUNK)),
        live: copy,
        blocking: AtomicBool::new(false),
        copier: Mutex::new(()),
        kicked: Mutex::new(false),
        kick: Condvar::new(),
    });
    let hook: Arc<dyn WriteHook> = tracker.clone();
    watched.add_write_hook(Arc::clone(&hook));
    Tracking {
        tracker,
        node: watched.clone(),
        hook,
    }
}

/// Runs the engine on the job's thread: lets `scan` mark what must be
/// copied first (after the hook is in place, so a write landing during the
/// scan is marked by the hook), copies until `complete` or a cancel, and
/// on `complete` calls `pivot` with guest writes drained and the
/// destination flushed. Returns how the job ended.
pub(super) fn run(
    job: &Job,
    live: &LiveChain,
    tracking: &Tracking,
    scan: &dyn Fn(&Chain, &DirtyMap) -> Result<(), ChainError>,
    pivot: &dyn Fn() -> Result<(), ChainError>,
) -> (Outcome, Option<String>) {
    let tracker = &tracking.tracker;
    // A `complete` or a cancel must not wait out the idle poll.
    let weak = Arc::downgrade(tracker);
    job.on_verb(Box::new(move || {
        if let Some(tracker) = weak.upgrade() {
            tracker.kick();
        }
    }));
    if let Err(err) = scan(&tracker.live.source, &tracker.dirty) {
        return (Outcome::Failed, Some(err.to_string()));
    }
    job.set_remaining(0, tracker.dirty.dirty_bytes());
    match copy_loop(job, tracker) {
        Ok(complete) => finish(job, tracker, live, complete.then_some(pivot)),
        Err(Stop::Cancelled) => (Outcome::Cancelled, None),
        Err(Stop::Failed) => (Outcome::Failed, job.error()),
    }
}

/// A scan for [`run`]: marks dirty every run `view` shows above `base`
/// (`None`: anywhere in its chain).
pub(super) fn mark_allocated(
    chain: &Chain,
    view: NodeId,
    base: Option<NodeId>,
    dirty: &DirtyMap,
) -> Result<(), ChainError> {
    each_extent(chain, view, base, |offset, len, allocation| {
        if allocation != Allocation::Unallocated {
            dirty.mark(offset, len);
        }
    })
}

/// Copies until `complete` (returns `true`: pivot) or a soft cancel of a
/// ready job (`false`: no pivot).
fn copy_loop(job: &Job, tracker: &Tracker) -> Result<bool, Stop> {
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
            cursor = pipelined(job, tracker, cursor)?;
            continue;
        }
        match tracker.copy_next(cursor, &mut buf) {
            None => {
                job.set_remaining(0, 0);
                // Blocking first: a write that sees the job ready has
                // reached the destination when it returns.
                if tracker.live.copy_mode == CopyMode::WriteBlocking {
                    tracker.blocking.store(true, Ordering::Release);
                }
                job.set_ready();
                tracker.wait_for_write(IDLE_POLL);
            }
            Some((offset, len, result)) => {
                cursor = offset + len;
                account(job, tracker, offset, len, 0, result)?;
            }
        }
    }
}

/// Copies dirty runs with several in flight until none is left or the job
/// must look at its verbs (a cancel, `complete`); returns the cursor.
fn pipelined(job: &Job, tracker: &Tracker, cursor: u64) -> Result<u64, Stop> {
    let cursor = AtomicU64::new(cursor);
    // Bytes taken from the map and not yet written: still to copy.
    let in_flight = AtomicU64::new(0);
    let take = || {
        let (offset, len) = tracker.dirty.take(cursor.load(Ordering::Relaxed), CHUNK)?;
        cursor.store(offset + len, Ordering::Relaxed);
        in_flight.fetch_add(len, Ordering::Relaxed);
        Some((offset, len))
    };
    let ended = tracker.live.copy.run_between(
        tracker.chains(),
        take,
        || Ok(!job.completion_requested() && job.checkpoint().is_ok()),
        |offset, len, result| {
            let pending = in_flight.fetch_sub(len, Ordering::Relaxed) - len;
            account(job, tracker, offset, len, pending, result)?;
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
            if !handle_error(job, tracker.live.on_error, operation, &err)? {
                tracker.dirty.mark(offset, len);
            }
        }
    }
    Ok(())
}

/// Drains guest writes, copies what is left, flushes the destination and,
/// for `complete`, pivots.
fn finish(
    job: &Job,
    tracker: &Tracker,
    live: &LiveChain,
    pivot: Option<&dyn Fn() -> Result<(), ChainError>>,
) -> (Outcome, Option<String>) {
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
            match handle_error(job, tracker.live.on_error, operation, &err) {
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
        // The destination must hold everything on disk before it replaces
        // the node it copies.
        if let Err(err) = tracker.live.dest.flush() {
            return (Outcome::Failed, Some(err.to_string()));
        }
        job.set_remaining(0, 0);
        if let Some(pivot) = pivot {
            // Still under the gate: no write reaches the old node from now.
            if let Err(err) = pivot() {
                return (Outcome::Failed, Some(err.to_string()));
            }
        }
        drop(gate);
        return (Outcome::Completed, None);
    }
}
