//! drive-mirror: a live block copy of a node to an image outside the
//! chain, in one job that ends with the target in the node's place.
//!
//! ```text
//! A <- B <- C               mirror target=T sync=full    T (no backing)
//! A <- B <- C               mirror target=T sync=top     B <- T
//! A <- B <- C               mirror target=T sync=none    C <- T
//! ```
//!
//! The target is created (`absolute-paths`: its backing file named by the
//! absolute path of the node its `sync` says) or taken as it is
//! (`existing`), and opened for writing under QEMU's write lock before
//! the command returns; it stays out of the mount until the pivot. It is
//! written through a chain of its own: the target on top of the mounted
//! chain's nodes its backing file names, so copy-on-write of a partial
//! cluster reads what it will be backed by.
//!
//! The copy is the engine active commit uses ([`live_copy`](super::live_copy)),
//! with the target as destination: writes to the node are tracked from
//! before the first scan, `ready` comes the first time the target is in
//! step, and `complete` pivots under the drained write gate: the target
//! replaces the node ([`Chain::replaced_by`]), the node above is rebacked
//! onto it or it becomes the active layer (then the old node stops taking
//! writes, and `active` follows the chain). A soft cancel of a ready job
//! leaves the target a consistent copy and the chain as it was; any other
//! cancel or a failure leaves the target partial. Either way the target's
//! image is closed and its lock released when the job ends.

use std::path::Path;
use std::sync::Arc;

use super::command::{MirrorArgs, SyncMode, TargetMode};
use super::copier::Copier;
use super::job::{Job, JobSpec, JobType, Outcome};
use super::live_copy::{self, mark_allocated, LiveCopy, Tracking};
use super::registry::{shown_node, LiveChain, Registry};
use super::target_image::{self, TargetSpec};
use super::{target, JobError};
use crate::chain::track::DirtyMap;
use crate::chain::{Chain, ChainError, Node, NodeId};

/// The default granularity is the target's cluster size, within these
/// bounds (QEMU's `bdrv_get_default_bitmap_granularity`); 64 KiB for an
/// image without clusters.
const DEFAULT_GRANULARITY: std::ops::RangeInclusive<u64> = (4 << 10)..=(64 << 10);

/// The nodes of the chain a mirror reads, decided when the command was
/// accepted.
#[derive(Clone, Copy, Debug)]
struct Nodes {
    /// The node copied.
    node: NodeId,
    /// The node right below it, if any.
    below: Option<NodeId>,
    /// The node the target is backed by: none (`full`), the node's backing
    /// node (`top`), the node itself (`none`).
    backing: Option<NodeId>,
}

/// What a mirror does, decided when the command was accepted.
struct MirrorPlan {
    nodes: Nodes,
    /// The target's chain, its active node the target.
    target: Arc<Chain>,
    args: MirrorArgs,
}

/// Checks a `mirror` against the chain, creates or opens its target and
/// starts it.
pub(super) fn start(registry: &Registry, args: MirrorArgs) -> Result<(), JobError> {
    let chain = registry.chain();
    let (level, node) = shown_node(&chain, args.node.as_deref().unwrap_or("active"))?;
    let (id, all) = (node.id(), chain.nodes());
    let path = target::place(Path::new(&args.target), &chain, registry.mount().as_ref())?;
    let below = level.checked_sub(1).map(|l| all[l].id());
    let backing = match args.sync {
        SyncMode::Full => None,
        SyncMode::Top => below,
        SyncMode::None => Some(id),
    };
    let nodes = Nodes {
        node: id,
        below,
        backing,
    };
    let target = TargetSpec {
        path: path.clone(),
        mode: args.mode,
        format: args.format,
        backing,
        needs_backing: args.sync != SyncMode::Full,
        size: node.virtual_size(),
    };
    let opened = target_image::prepare(&chain, &target, &|chain, spec| {
        chain.target_chain(&spec.path, spec.format, spec.backing)
    })?;
    let plan = MirrorPlan {
        nodes,
        target: Arc::new(opened),
        args,
    };
    let spec = JobSpec {
        id: String::new(),
        kind: JobType::Mirror,
        node: node.name().to_string(),
        base: None,
        target: Some(path.display().to_string()),
        touched: touched(all, level, plan.args.sync),
        shared: Vec::new(),
        // The node under the target stays: `top` keeps the node below,
        // `none` the node itself.
        kept: backing.into_iter().collect(),
        len: node.virtual_size(),
        speed: plan.args.speed,
    };
    let job_id = plan.args.id.clone();
    let copy = live_copy_of(&chain, &plan);
    // Tracked before the command returns: every write of the job's time
    // reaches the target, even where no scan looks (`sync=none`).
    let track = move |_: &LiveChain| live_copy::track(copy, &node);
    let body = move |job: &Job, live: &LiveChain, tracking: Tracking| {
        job.start();
        let (outcome, error) = run(job, &chain, &plan, live, &tracking);
        // The hook holds the target's chain too.
        drop(tracking);
        let target = plan.target.active();
        let pivoted = live
            .current()
            .nodes()
            .iter()
            .any(|n| n.canonical_path() == target.canonical_path());
        if !pivoted {
            // The target leaves with the job, written back.
            if let Err(err) = target.image().close() {
                log::error!("mirror {}: closing {}: {err}", job.id(), target.name());
            }
        }
        // The job's chain of the target is the last reference to its
        // descriptor unless it pivoted: its lock goes before the job is
        // seen to end.
        drop(plan);
        job.conclude(outcome, error);
    };
    let started = registry.spawn(spec, job_id, track, body);
    if started.is_err() {
        // A refused command leaves nothing.
        target_image::discard_created(&target);
    }
    started
}

/// The nodes a mirror of `nodes[level]` touches.
fn touched(nodes: &[Node], level: usize, sync: SyncMode) -> Vec<NodeId> {
    let first = match sync {
        // Everything it reads leaves at the pivot.
        SyncMode::Full => 0,
        // The target is backed by the node below, which must stay.
        SyncMode::Top => level.saturating_sub(1),
        SyncMode::None => level,
    };
    nodes[first..=level].iter().map(|n| n.id()).collect()
}

/// What the shared engine copies where: the node's view (all of it for
/// `full`; for `top` and `none` only what the node itself holds, the rest
/// the target reads from its backing) into the target.
fn live_copy_of(chain: &Arc<Chain>, plan: &MirrorPlan) -> LiveCopy {
    let target = plan.target.active();
    LiveCopy {
        copy: Copier {
            view: plan.nodes.node,
            base: match plan.args.sync {
                SyncMode::Full => None,
                SyncMode::Top | SyncMode::None => plan.nodes.below,
            },
            dest: target.id(),
            overwrite: true,
        },
        source: Arc::clone(chain),
        dest: Arc::clone(&plan.target),
        on_error: plan.args.on_error,
        copy_mode: plan.args.copy_mode,
        granularity: plan.args.granularity.unwrap_or_else(|| {
            let cluster = target.cluster_size().unwrap_or(*DEFAULT_GRANULARITY.end());
            cluster.clamp(*DEFAULT_GRANULARITY.start(), *DEFAULT_GRANULARITY.end())
        }),
    }
}

/// The copy, until `complete` pivots or the job stops.
fn run(
    job: &Job,
    chain: &Arc<Chain>,
    plan: &MirrorPlan,
    live: &LiveChain,
    tracking: &Tracking,
) -> (Outcome, Option<String>) {
    let nodes = plan.nodes;
    let Some(node) = chain.node(nodes.node) else {
        let error = ChainError::NoSuchNode { id: nodes.node.0 };
        return (Outcome::Failed, Some(error.to_string()));
    };
    let size = node.virtual_size();
    let scan = |chain: &Chain, dirty: &DirtyMap| match (plan.args.sync, plan.args.mode) {
        // An existing target may hold anything: every byte is written.
        (SyncMode::Full, TargetMode::Existing) => {
            dirty.mark(0, size);
            Ok(())
        }
        (SyncMode::Full, TargetMode::AbsolutePaths) => {
            mark_allocated(chain, nodes.node, None, dirty)
        }
        (SyncMode::Top, _) => mark_allocated(chain, nodes.node, nodes.below, dirty),
        (SyncMode::None, _) => Ok(()),
    };
    let pivot = || pivot(job, live, plan, node, plan.target.active());
    live_copy::run(job, live, tracking, &scan, &pivot)
}

/// Puts the target in the node's place (under the drained write gate).
fn pivot(
    job: &Job,
    live: &LiveChain,
    plan: &MirrorPlan,
    node: &Node,
    target: &Node,
) -> Result<(), ChainError> {
    let current = live.current();
    let level = current
        .nodes()
        .iter()
        .position(|n| n.id() == plan.nodes.node)
        .ok_or(ChainError::NoSuchNode {
            id: plan.nodes.node.0,
        })?;
    let replace =
        |current: &Chain| current.replaced_by(plan.nodes.node, target, plan.nodes.backing);
    let Some(above) = current.nodes().get(level + 1).cloned() else {
        // The node was the active layer: the target takes its place, and
        // from now on no write reaches the node.
        live.change(&replace)?;
        if let Err(err) = node.set_writable(false) {
            log::error!("mirror {}: the old node stays writable: {err}", job.id());
        }
        return Ok(());
    };
    // The node above gets a new backing pointer in its header.
    let made_writable = !above.writable();
    if made_writable {
        above.set_writable(true)?;
    }
    let changed = live.change(&replace);
    if made_writable {
        above.set_writable(false)?;
    }
    changed?;
    // Below the active layer the target is read like any backing node.
    target.set_writable(false)
}
