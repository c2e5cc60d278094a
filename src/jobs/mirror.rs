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
use super::registry::{resolve, LiveChain, Registry};
use super::{target, JobError};
use crate::chain::track::DirtyMap;
use crate::chain::{create_image, create_raw_image, Chain, ChainError, Format, Node, NodeId};

/// Cluster size of a qcow2 target chainfs creates (QEMU's default).
const NEW_TARGET_CLUSTER_SIZE: u64 = 64 << 10;

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
    let node_name = args.node.as_deref().unwrap_or("active");
    let id = resolve(&chain, node_name)?;
    let all = chain.nodes();
    let Some(level) = all.iter().position(|n| n.id() == id && !n.hidden()) else {
        return Err(JobError::NotFound(format!(
            "node {node_name:?} is not in the mount"
        )));
    };
    let node = all[level].clone();
    let path = target::place(Path::new(&args.target), &chain, registry.mount().as_ref())?;
    if let Some(clash) = chain_image(&chain, &path) {
        return Err(JobError::Invalid(format!(
            "{} is {clash}, an image of the chain",
            path.display()
        )));
    }
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
    let created = args.mode == TargetMode::AbsolutePaths;
    let plan = prepare_target(&chain, &path, args, nodes)?;
    let spec = JobSpec {
        id: String::new(),
        kind: JobType::Mirror,
        node: node.name().to_string(),
        base: None,
        target: Some(path.display().to_string()),
        touched: touched(all, level, plan.args.sync),
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
    if started.is_err() && created {
        // Ours since a moment ago: a refused command leaves nothing.
        let _ = std::fs::remove_file(&path);
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

/// Creates the target (`absolute-paths`) or checks it exists
/// (`existing`), then opens it; a target created here is removed again if
/// that fails.
fn prepare_target(
    chain: &Chain,
    path: &Path,
    args: MirrorArgs,
    nodes: Nodes,
) -> Result<MirrorPlan, JobError> {
    let size = chain.node(nodes.node).map_or(0, Node::virtual_size);
    let exists = std::fs::symlink_metadata(path).is_ok();
    let created = args.mode == TargetMode::AbsolutePaths;
    match args.mode {
        TargetMode::AbsolutePaths if exists => {
            return Err(JobError::Exists(format!("{} exists", path.display())))
        }
        TargetMode::AbsolutePaths => {
            if args.format == Some(Format::Raw) && args.sync != SyncMode::Full {
                return Err(no_raw_backing());
            }
            create_target(path, chain, nodes.backing, args.format, size)?;
        }
        TargetMode::Existing if !exists => {
            return Err(JobError::NotFound(format!(
                "{} does not exist",
                path.display()
            )))
        }
        TargetMode::Existing => {}
    }
    open_target(chain, path, args, size, nodes).inspect_err(|_| {
        if created {
            // Ours since a moment ago, and not worth keeping half made.
            let _ = std::fs::remove_file(path);
        }
    })
}

/// Why a raw target cannot serve `sync=top` or `sync=none`.
fn no_raw_backing() -> JobError {
    JobError::Invalid("a raw target has no backing file: sync=top and sync=none need qcow2".into())
}

/// The name of the node whose image is the file at `path`, if any (hidden
/// nodes included): the same file by any path.
fn chain_image(chain: &Chain, path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::metadata(path).ok()?;
    chain
        .nodes()
        .iter()
        .find(|node| {
            std::fs::metadata(node.canonical_path())
                .is_ok_and(|m| m.dev() == file.dev() && m.ino() == file.ino())
        })
        .map(|node| node.name().to_string())
}

/// Creates the target at `path`: raw and empty, or qcow2 backed by
/// `backing` named by its absolute path.
fn create_target(
    path: &Path,
    chain: &Chain,
    backing: Option<NodeId>,
    format: Option<Format>,
    size: u64,
) -> Result<(), JobError> {
    if format == Some(Format::Raw) {
        return Ok(create_raw_image(path, size)?);
    }
    let backing = backing.and_then(|id| chain.node(id));
    let name = backing.map(|n| n.path().to_string_lossy().into_owned());
    let backing = name.as_deref().zip(backing.map(Node::format));
    Ok(create_image(path, size, NEW_TARGET_CLUSTER_SIZE, backing)?)
}

/// Opens the target's chain and checks it against the node: its size
/// must be the node's, and only a qcow2 target can have the backing file
/// `top` and `none` need.
fn open_target(
    chain: &Chain,
    path: &Path,
    args: MirrorArgs,
    size: u64,
    nodes: Nodes,
) -> Result<MirrorPlan, JobError> {
    let target = chain
        .target_chain(path, args.format, nodes.backing)
        .map_err(|err| {
            // Another job's target, or an image another process writes.
            if err.errno() == libc::EAGAIN {
                JobError::Busy(err.to_string())
            } else {
                JobError::Chain(err)
            }
        })?;
    let image = target.active();
    if image.format() == Format::Raw && args.sync != SyncMode::Full {
        return Err(no_raw_backing());
    }
    if image.virtual_size() != size {
        return Err(JobError::Invalid(format!(
            "{} is {} bytes; the node is {size}",
            path.display(),
            image.virtual_size()
        )));
    }
    Ok(MirrorPlan {
        nodes,
        target: Arc::new(target),
        args,
    })
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
