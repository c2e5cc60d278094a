//! block-commit: the data of a top node and of every node between it and
//! a base, written down into the base.
//!
//! ```text
//! A <- B <- C <- D <- E      commit top=D base=B: what C and D hold goes
//! A <- B <- E                into B; E is rebacked onto B
//! ```
//!
//! When the job starts, the base takes QEMU's write lock and the nodes
//! strictly between base and top leave the mount (their flag is set in the
//! shared open image, so handles open on them read EIO from then on: the
//! base may soon hold data they do not). The copy walks what the top shows
//! above the base: data is read through the top and written into the base,
//! ranges that read as zeros become zeros there, and what nothing above
//! the base holds is left alone.
//!
//! With the top below the active node (an *intermediate* commit), the node
//! above the top is rebacked onto the base at the end. With the top active
//! (an *active* commit) the engine it shares with mirror
//! ([`live_copy`](super::live_copy)) tracks guest writes from before the
//! first scan, reports `ready` when the base is in step, and on `complete`
//! pivots: the base becomes the active layer.
//!
//! A cancelled or failed commit changes no backing pointer; the hidden
//! nodes stay hidden, since the base may hold part of the merge.

use std::sync::Arc;

use super::command::{CopyMode, OnError};
use super::content::ContentHook;
use super::copier::Copier;
use super::job::{Job, JobSpec, JobType, Outcome, Stop};
use super::live_copy::{self, mark_allocated, LiveCopy};
use super::registry::{resolve, LiveChain, Registry};
use super::stream::scan_all;
use super::JobError;
use crate::chain::{Chain, ChainError, Node, NodeId};

/// A `commit` command's own words, as parsed.
#[derive(Clone, Debug)]
pub struct Request {
    /// The topmost node whose data is committed.
    pub top: String,
    /// The node receiving the data (default: the bottom of the chain).
    pub base: Option<String>,
    /// The backing string to write instead of the base's name.
    pub backing_file: Option<String>,
    /// Error policy.
    pub on_error: OnError,
    /// How an active commit keeps up with writes once ready.
    pub copy_mode: CopyMode,
}

/// What a commit does, decided when the command was accepted.
#[derive(Clone, Debug)]
struct CommitPlan {
    top: NodeId,
    base: NodeId,
    /// The node right above the top; `None` for an active commit.
    above: Option<NodeId>,
    /// The nodes strictly between base and top.
    between: Vec<NodeId>,
    backing_file: Option<String>,
    on_error: OnError,
    copy_mode: CopyMode,
}

impl CommitPlan {
    /// The copy: what the top shows above the base, written into the base.
    fn copy(&self) -> Copier {
        Copier {
            view: self.top,
            base: Some(self.base),
            dest: self.base,
            overwrite: true,
        }
    }
}

/// Checks a `commit` against the chain and starts it.
pub(super) fn start(
    registry: &Registry,
    request: Request,
    speed: u64,
    id: Option<String>,
) -> Result<(), JobError> {
    let chain = registry.chain();
    let nodes = chain.nodes();
    let shown = |name: &str| -> Result<usize, JobError> {
        let id = resolve(&chain, name)?;
        match nodes.iter().position(|n| n.id() == id) {
            Some(level) if !nodes[level].hidden() => Ok(level),
            _ => Err(JobError::NotFound(format!(
                "node {name:?} is not in the mount"
            ))),
        }
    };
    let top = shown(&request.top)?;
    let base = match &request.base {
        Some(name) => shown(name)?,
        None => 0,
    };
    if base >= top {
        return Err(JobError::Invalid("top must be above base".into()));
    }
    let is_active = top + 1 == nodes.len();
    if is_active && request.backing_file.is_some() {
        return Err(JobError::Invalid(
            "backing-file needs a top below the active node".into(),
        ));
    }
    if nodes[base].virtual_size() < nodes[top].virtual_size() {
        // QEMU grows the base; chainfs cannot resize an image, and a
        // smaller base would lose what lies past its end.
        return Err(JobError::Invalid(format!(
            "base {} is smaller than top {}",
            nodes[base].name(),
            nodes[top].name()
        )));
    }
    let plan = CommitPlan {
        top: nodes[top].id(),
        base: nodes[base].id(),
        above: nodes.get(top + 1).map(|n| n.id()),
        between: nodes[base + 1..top].iter().map(|n| n.id()).collect(),
        backing_file: request.backing_file,
        on_error: request.on_error,
        copy_mode: request.copy_mode,
    };
    let spec = JobSpec {
        id: String::new(),
        kind: JobType::Commit,
        node: nodes[top].name().to_string(),
        base: Some(nodes[base].name().to_string()),
        target: None,
        // The base is written, so it is touched too.
        touched: nodes[base..=top].iter().map(|n| n.id()).collect(),
        shared: Vec::new(),
        kept: vec![nodes[base].id()],
        len: nodes[top].virtual_size(),
        speed,
    };
    let base_node = nodes[base].clone();
    let job_plan = plan.clone();
    let job_chain = Arc::clone(&chain);
    registry.spawn(
        spec,
        id,
        move |live| prepare(&base_node, &plan, live),
        move |job, live, prepared| run(job, &job_chain, &job_plan, live, prepared),
    )
}

/// What [`prepare`] leaves the job: whether the base had to be made
/// writable, and the hook that tells the mount of every write into the
/// base for as long as the job runs.
struct Prepared {
    made_writable: bool,
    base_notices: ContentHook,
}

/// Before the command returns: the base takes the write lock and the
/// intermediates leave the mount, their cached pages dropped.
fn prepare(base: &Node, plan: &CommitPlan, live: &LiveChain) -> Result<Prepared, ChainError> {
    let made_writable = !base.writable();
    if made_writable {
        base.set_writable(true)?;
    }
    // Also tells the mount that the base's file is about to change.
    if let Err(err) = live.change(&|current| current.hiding(&plan.between)) {
        if made_writable {
            let _ = base.set_writable(false);
        }
        return Err(err);
    }
    // A handle opened on an intermediate before the job may hold its pages:
    // they go before the command returns, so its reads fail from now on.
    for &node in &plan.between {
        live.content().changed(node, 0, 0);
    }
    Ok(Prepared {
        made_writable,
        base_notices: ContentHook::new(base, live.content()),
    })
}

/// Runs the commit on the job's thread until it concludes.
fn run(
    job: &Job,
    chain: &Arc<Chain>,
    plan: &CommitPlan,
    live: &LiveChain,
    prepared: Result<Prepared, ChainError>,
) {
    job.start();
    // Dropped when the job concludes: the base's notices end with it.
    let (made_writable, _notices) = match prepared {
        Ok(prepared) => (prepared.made_writable, prepared.base_notices),
        Err(err) => return job.conclude(Outcome::Failed, Some(err.to_string())),
    };
    let Some(base) = chain.node(plan.base).cloned() else {
        let error = ChainError::NoSuchNode { id: plan.base.0 };
        return job.conclude(Outcome::Failed, Some(error.to_string()));
    };
    let (outcome, error) = match plan.above {
        Some(above) => intermediate(job, chain, plan, above, live),
        None => active(job, chain, plan, live),
    };
    let pivoted = live.current().active().id() == plan.base;
    if made_writable && !pivoted {
        if let Err(err) = base.set_writable(false) {
            log::error!(
                "commit {}: cannot give back the write lock of {}: {err}",
                job.id(),
                base.name()
            );
        }
    }
    job.conclude(outcome, error);
}

/// Granularity of an active commit's dirty map: QEMU's default for
/// commit.
const GRANULARITY: u64 = 64 << 10;

/// An active commit: the shared engine keeps the base in step with the
/// top; its pivot makes the base the active layer.
fn active(
    job: &Job,
    chain: &Arc<Chain>,
    plan: &CommitPlan,
    live: &LiveChain,
) -> (Outcome, Option<String>) {
    let Some(top) = chain.node(plan.top) else {
        let error = ChainError::NoSuchNode { id: plan.top.0 };
        return (Outcome::Failed, Some(error.to_string()));
    };
    let copy = LiveCopy {
        copy: plan.copy(),
        source: Arc::clone(chain),
        dest: Arc::clone(chain),
        on_error: plan.on_error,
        copy_mode: plan.copy_mode,
        granularity: GRANULARITY,
    };
    let scan = |chain: &Chain, dirty: &_| mark_allocated(chain, plan.top, Some(plan.base), dirty);
    let pivot = || {
        live.change(&|current| current.pivoted_to(plan.base))?;
        // Under the drained gate: no write reaches the old top from now.
        if let Err(err) = top.set_writable(false) {
            log::error!("commit {}: the old top stays writable: {err}", job.id());
        }
        Ok(())
    };
    live_copy::run(job, live, &live_copy::track(copy, top), &scan, &pivot)
}

/// An intermediate commit: copy, then reback the node above the top.
fn intermediate(
    job: &Job,
    chain: &Chain,
    plan: &CommitPlan,
    above: NodeId,
    live: &LiveChain,
) -> (Outcome, Option<String>) {
    match copy_all(job, chain, plan) {
        Err(Stop::Cancelled) => (Outcome::Cancelled, None),
        Err(Stop::Failed) => (Outcome::Failed, job.error()),
        // on-error=ignore went past errors: the base lacks some data, so
        // the chain stays as it was.
        Ok(()) if job.error().is_some() => (Outcome::Failed, job.error()),
        Ok(()) => match reback_above(chain, plan, above, live) {
            Ok(()) => (Outcome::Completed, None),
            Err(err) => (Outcome::Failed, Some(err.to_string())),
        },
    }
}

/// Walks the whole top, chunk by chunk, applying `on-error`.
fn copy_all(job: &Job, chain: &Chain, plan: &CommitPlan) -> Result<(), Stop> {
    let size = chain.node(plan.top).map_or(0, |n| n.virtual_size());
    scan_all(job, chain, &plan.copy(), size, plan.on_error)
}

/// The end of an intermediate commit: the merge is made durable, then the
/// node above the top is rebacked onto the base (the top and the nodes
/// between leave the chain).
fn reback_above(
    chain: &Chain,
    plan: &CommitPlan,
    above: NodeId,
    live: &LiveChain,
) -> Result<(), ChainError> {
    // The base must hold the merge on disk before anything stops pointing
    // at the nodes it came from.
    chain.flush()?;
    let current = live.current();
    let node = current
        .node(above)
        .ok_or(ChainError::NoSuchNode { id: above.0 })?
        .clone();
    let made_writable = !node.writable();
    if made_writable {
        node.set_writable(true)?;
    }
    let rebacked =
        |current: &Chain| current.rebacked(above, Some(plan.base), plan.backing_file.clone());
    let result = live.change(&rebacked);
    if made_writable {
        node.set_writable(false)?;
    }
    result
}
