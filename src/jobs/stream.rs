//! block-stream: copy into a node everything the nodes between it and the
//! base hold and it lacks, then reback it onto the base.
//!
//! Progress counts every byte scanned; the speed limit counts only bytes
//! copied. Copies go through [`Chain::populate`], which never overwrites
//! what the node holds and is serialised with guest writes, so a write
//! made during the job always wins. The chain shape changes only at the
//! end, on the chain as it stands then (another job may have changed parts
//! of it this one does not touch).

use std::sync::Arc;

use super::command::OnError;
use super::copier::{linear, Copier, CopyFailure, Next};
use super::job::{Job, Outcome, Stop};
use crate::chain::{Chain, ChainError, NodeId};

/// What a stream does, decided when the command was accepted.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    /// The node receiving the data.
    pub node: NodeId,
    /// The node right below it, whose view is copied (`None`: nothing below).
    pub below: Option<NodeId>,
    /// The new backing node (`None`: none).
    pub base: Option<NodeId>,
    /// The backing string to write instead of the base's name.
    pub backing_file: Option<String>,
    /// What to do when a chunk fails.
    pub on_error: OnError,
}

/// Replaces the chain with what `change` makes of the current one.
pub type ChainChange<'a> =
    &'a dyn Fn(&dyn Fn(&Chain) -> Result<Chain, ChainError>) -> Result<(), ChainError>;

/// Runs the stream on the job's thread until it concludes.
pub fn run(job: &Job, chain: Arc<Chain>, plan: &StreamPlan, change_chain: ChainChange<'_>) {
    job.start();
    let made_writable = match enable_writes(&chain, plan.node) {
        Ok(made) => made,
        Err(err) => return job.conclude(Outcome::Failed, Some(err.to_string())),
    };
    // Past the last chunk there is no pause point left: a pause asked for
    // from here on returns at once, and a cancel still stops the pivot.
    let copied = copy_all(job, &chain, plan).and_then(|()| job.work_done());
    let finished = match copied {
        Err(Stop::Cancelled) => (Outcome::Cancelled, None),
        Err(Stop::Failed) => (Outcome::Failed, job.error()),
        Ok(()) => match job.error() {
            // on-error=ignore went on past errors: the node is valid but
            // does not hold everything, so the chain stays as it was.
            Some(error) => (Outcome::Failed, Some(error)),
            None => finalize(&chain, plan, change_chain),
        },
    };
    if made_writable {
        if let Some(node) = chain.node(plan.node) {
            if let Err(err) = node.set_writable(false) {
                log::error!(
                    "stream {}: cannot make {} read-only again: {err}",
                    job.id(),
                    node.name()
                );
            }
        }
    }
    job.conclude(finished.0, finished.1);
}

/// Lets a node below the top take writes for the job; says whether it had
/// to.
fn enable_writes(chain: &Chain, node: NodeId) -> Result<bool, ChainError> {
    let target = chain
        .node(node)
        .ok_or(ChainError::NoSuchNode { id: node.0 })?;
    if target.writable() {
        return Ok(false);
    }
    target.set_writable(true)?;
    Ok(true)
}

fn finalize(
    chain: &Chain,
    plan: &StreamPlan,
    change_chain: ChainChange<'_>,
) -> (Outcome, Option<String>) {
    // What was copied must be on disk before the backing pointer stops
    // pointing at the nodes it came from.
    if let Err(err) = chain.flush() {
        return (Outcome::Failed, Some(err.to_string()));
    }
    let rebacked =
        |current: &Chain| current.rebacked(plan.node, plan.base, plan.backing_file.clone());
    match change_chain(&rebacked) {
        Ok(()) => (Outcome::Completed, None),
        Err(err) => (Outcome::Failed, Some(err.to_string())),
    }
}

/// Walks the whole node, chunk by chunk, applying `on-error`.
fn copy_all(job: &Job, chain: &Chain, plan: &StreamPlan) -> Result<(), Stop> {
    let Some(below) = plan.below else {
        return Ok(());
    };
    let size = chain.node(plan.node).map_or(0, |n| n.virtual_size());
    let copy = Copier {
        view: below,
        base: plan.base,
        dest: plan.node,
        overwrite: false,
    };
    scan_all(job, chain, &copy, size, plan.on_error)
}

/// Runs `copy` over the whole of a node of `size` bytes, chunk by chunk,
/// pausing and stopping at the job's checkpoints and applying `on_error`
/// (stream, intermediate commit).
pub(super) fn scan_all(
    job: &Job,
    chain: &Chain,
    copy: &Copier,
    size: u64,
    on_error: OnError,
) -> Result<(), Stop> {
    copy.run(
        chain,
        linear(size),
        || job.checkpoint().map(|()| true),
        |_, len, result| progress(job, on_error, len, result),
    )?;
    Ok(())
}

/// Accounts for a chunk of a scan that visits every byte once (stream,
/// intermediate commit), applying `on-error` to a failed one.
pub(super) fn progress(
    job: &Job,
    policy: OnError,
    len: u64,
    result: Result<u64, CopyFailure>,
) -> Result<Next, Stop> {
    match result {
        Ok(copied) => {
            job.advance(len, copied);
            Ok(Next::Go)
        }
        Err((operation, err)) => {
            if handle_error(job, policy, operation, &err)? {
                // Skip the chunk (`ignore`); the job will end failed.
                job.advance(len, 0);
                Ok(Next::Go)
            } else {
                Ok(Next::Retry)
            }
        }
    }
}

/// Applies `on-error` to a failed chunk: `Ok(true)` to skip it, `Ok(false)`
/// to retry it (after a pause), `Err` when the job must stop.
pub(super) fn handle_error(
    job: &Job,
    policy: OnError,
    operation: &str,
    err: &ChainError,
) -> Result<bool, Stop> {
    let enospc = err.errno() == libc::ENOSPC;
    let message = err.to_string();
    match policy {
        OnError::Ignore => {
            job.report_error(operation, "ignore");
            job.record_error(message);
            Ok(true)
        }
        OnError::Stop => {
            job.report_error(operation, "stop");
            job.pause_for_error(message).map(|()| false)
        }
        OnError::Enospc if enospc => {
            job.report_error(operation, "stop");
            job.pause_for_error(message).map(|()| false)
        }
        OnError::Report | OnError::Enospc => {
            job.report_error(operation, "report");
            job.record_error(message);
            Err(Stop::Failed)
        }
    }
}
