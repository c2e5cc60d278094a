//! A backup's copies: before a guest write (the hook on the node's open
//! image) and in the background (the job's thread), both through the
//! shared copier, both claiming clusters in the one [`Clusters`] map.
//!
//! A copy before write that fails breaks the point in time: the write goes
//! on, the hook stops copying, and the job fails with the error as soon as
//! its thread sees it. A failed background copy follows `on-error`; its
//! clusters are released first, so a paused job never holds back a guest
//! write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::super::command::OnError;
use super::super::copier::{each_extent, Chains, Copier, CopyFailure, CHUNK};
use super::super::job::{Job, Stop};
use super::super::stream::handle_error;
use super::args::Copy;
use super::cbw::Clusters;
use super::compressed::copy_compressed;
use crate::chain::track::BeforeWrite;
use crate::chain::{Allocation, Chain, ChainError, NodeId};
use crate::sync::{lock, Arc, Mutex};

/// How often an idle `sync=none` job looks at its copies before write
/// (their progress and errors) when no verb wakes it.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// The smallest chunk worth a thread of its own beside another.
const PARALLEL_CHUNK: u64 = CHUNK / 2;

/// One backup's copying state, shared by its hook and its thread.
pub(super) struct Backup {
    /// From the node's view (at and below its `base`) into the target.
    pub copy: Copier,
    /// The mounted chain as the job started (it shares its images).
    pub source: Arc<Chain>,
    /// The target's own chain.
    pub dest: Arc<Chain>,
    /// What is still to copy.
    pub clusters: Clusters,
    /// What the background copies.
    pub kind: Copy,
    /// Before copying, drop the clusters the view does not hold down to
    /// this base (`Some(None)`: the whole chain): they need no copy.
    pub skip_unheld: Option<Option<NodeId>>,
    /// The background's error policy.
    pub on_error: OnError,
    /// The first failed copy before write (the point in time is lost).
    pub broken: Mutex<Option<String>>,
    /// Bytes copied before writes and not yet counted in the progress.
    pub cbw_bytes: AtomicU64,
    /// `compress=on`: the target's cluster size, each written compressed.
    pub compress: Option<u64>,
}

impl BeforeWrite for Backup {
    fn before_write(&self, offset: u64, len: u64) {
        if lock(&self.broken).is_some() {
            return;
        }
        let mut buf = Vec::new();
        let mut failed = false;
        for (start, run) in self.clusters.claim_range(offset, len) {
            let end = start + run;
            let mut at = start;
            while at < end {
                let piece = self.piece().min(end - at);
                if failed {
                    self.clusters.release(at, end - at, false);
                    break;
                }
                match self.copy_range(at, piece, &mut buf) {
                    Ok(_) => {
                        self.clusters.release(at, piece, true);
                        self.cbw_bytes.fetch_add(piece, Ordering::Relaxed);
                        at += piece;
                    }
                    Err((operation, err)) => {
                        log::error!("backup: copy before write at {at}: {operation}: {err}");
                        lock(&self.broken).get_or_insert(err.to_string());
                        failed = true;
                    }
                }
            }
        }
    }
}

impl Backup {
    fn chains(&self) -> Chains<'_> {
        Chains {
            source: &self.source,
            dest: &self.dest,
        }
    }

    /// Copies `offset..offset + len` of the view into the target (with
    /// the shared copier, or compressed).
    fn copy_range(&self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<u64, CopyFailure> {
        match self.compress {
            None => self.copy.copy_between(self.chains(), offset, len, buf),
            Some(cluster) => copy_compressed(&self.copy, self.chains(), cluster, offset, len, buf),
        }
    }

    /// The most one copy moves: a chunk, or one cluster if larger.
    fn piece(&self) -> u64 {
        CHUNK.max(self.clusters.granularity())
    }

    /// Fails the job if a copy before write failed.
    fn check_broken(&self, job: &Job) -> Result<(), Stop> {
        match lock(&self.broken).clone() {
            None => Ok(()),
            Some(error) => {
                job.report_error("write", "report");
                job.record_error(error);
                Err(Stop::Failed)
            }
        }
    }

    /// Counts the copies before write in the progress.
    fn report_writes(&self, job: &Job) {
        let bytes = self.cbw_bytes.swap(0, Ordering::Relaxed);
        if bytes > 0 {
            job.set_remaining(bytes, self.clusters.remaining());
            job.advance(bytes, 0);
        }
    }

    /// Drops the clusters the view does not hold (down to the base).
    fn skip_unheld(&self, job: &Job) -> Result<(), ChainError> {
        let Some(base) = self.skip_unheld else {
            return Ok(());
        };
        each_extent(
            &self.source,
            self.copy.view,
            base,
            |offset, len, allocation| {
                if allocation == Allocation::Unallocated {
                    self.clusters.skip(offset, len);
                }
            },
        )?;
        job.set_remaining(0, self.clusters.remaining());
        Ok(())
    }

    /// The job's thread: copies every cluster still todo (for `sync=none`,
    /// waits for a cancel), until done or stopped.
    pub(super) fn run(&self, job: &Job) -> Result<(), Stop> {
        job.set_remaining(0, self.clusters.remaining());
        if let Err(err) = self.skip_unheld(job) {
            job.record_error(err.to_string());
            return Err(Stop::Failed);
        }
        let mut cursor = 0;
        let mut buffers = (Vec::new(), Vec::new());
        loop {
            if let Err(stop) = job.checkpoint() {
                self.report_writes(job);
                return Err(stop);
            }
            self.check_broken(job)?;
            self.report_writes(job);
            if self.kind == Copy::None {
                job.idle(IDLE_POLL);
                continue;
            }
            let Some((offset, len)) = self.clusters.claim_next(cursor, self.piece()) else {
                // Copies before write still in flight may fail.
                self.clusters.wait_idle();
                self.check_broken(job)?;
                if self.clusters.remaining() == 0 {
                    self.report_writes(job);
                    return Ok(());
                }
                continue;
            };
            // A second chunk beside it: where the host copies the data,
            // each copy is a kernel memcpy that keeps one core busy.
            let second = self.clusters.claim_next(offset + len, self.piece());
            let results = self.copy_pair((offset, len), second, &mut buffers);
            // Released first: a job paused for an error, or sleeping for
            // the speed limit, holds back no guest write.
            for &((offset, len), ref result) in &results {
                self.clusters.release(offset, len, result.is_ok());
            }
            let mut retry = None;
            for ((offset, len), result) in results {
                cursor = offset + len;
                match result {
                    Ok(copied) => {
                        job.set_remaining(len, self.clusters.remaining());
                        job.advance(len, copied);
                    }
                    // One pause for the pair: the chunk beside a retried
                    // one is retried with it.
                    Err(_) if retry.is_some() => {}
                    Err((operation, err)) => {
                        if handle_error(job, self.on_error, operation, &err)? {
                            // `ignore`: left out; the job will end failed.
                            self.clusters.skip(offset, len);
                        } else {
                            retry.get_or_insert(offset);
                        }
                    }
                }
            }
            cursor = retry.unwrap_or(cursor);
        }
    }

    /// Copies `first`, and `second` if there is one: on a thread of its own
    /// meanwhile when both are large, else after it (a thread costs more
    /// than it saves on a few clusters, as an incremental backup's scattered
    /// ones often are). Returns each with its result, `first` first.
    fn copy_pair(
        &self,
        first: (u64, u64),
        second: Option<(u64, u64)>,
        buffers: &mut (Vec<u8>, Vec<u8>),
    ) -> Vec<((u64, u64), Result<u64, CopyFailure>)> {
        let (buf, other_buf) = buffers;
        let large = |(_, len): (u64, u64)| len >= PARALLEL_CHUNK;
        if !(large(first) && second.is_some_and(large)) {
            let mut results = vec![(first, self.copy_range(first.0, first.1, buf))];
            if let Some((offset, len)) = second {
                results.push(((offset, len), self.copy_range(offset, len, other_buf)));
            }
            return results;
        }
        std::thread::scope(|scope| {
            let other = second.map(|(offset, len)| {
                scope.spawn(move || ((offset, len), self.copy_range(offset, len, other_buf)))
            });
            let mut results = vec![(first, self.copy_range(first.0, first.1, buf))];
            if let Some(other) = other {
                results.push(
                    other
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                );
            }
            results
        })
    }
}
