//! drive-backup: a copy of a node *as it was when the job started*, while
//! the guest keeps writing, into an image outside the chain.
//!
//! ```text
//! A <- B <- C       backup node=C sync=full        T (no backing)
//! A <- B <- C       backup node=C sync=top         B <- T
//! A <- B <- C       backup node=C sync=none        C <- T  (fleecing)
//! A <- B <- C       backup node=C sync=incremental P <- T  (P: previous backup)
//! ```
//!
//! When the command is accepted, with guest writes drained, the job's
//! bitmap is frozen (a successor records the writes from now on) and a
//! before-write hook is put on the node's open image: from then on every
//! write, write-zeroes, discard or job copy into the node first copies the
//! old data of the clusters it touches that are still to copy
//! ([`run::Backup`]). The job's thread copies the rest with the shared
//! copier (`full`: every cluster; `top`: what the node holds; `bitmap`:
//! what the frozen bitmap marks; `none`: nothing, it waits for `cancel`,
//! after which the target's view ends and the job ends `cancelled`, as
//! QEMU's fleecing jobs do). The target is created or opened by the code
//! mirror uses ([`target_image`]); an existing target backed by an image
//! outside the chain (the previous backup) is opened with its own chain,
//! so that zeros written to it hide what its backing holds.
//!
//! At the end the bitmap is settled as QEMU's
//! `backup_cleanup_sync_bitmap` does ([`settle_bitmap`]).

mod args;
mod cbw;
mod compressed;
mod run;

use std::path::Path;
use std::sync::atomic::AtomicU64;

use super::command::TargetMode;
use super::copier::Copier;
use super::job::{Job, JobSpec, JobType, Outcome, Stop};
use super::registry::{shown_node, LiveChain, Registry};
use super::target;
use super::target_image::{self, TargetSpec};
use super::JobError;
use crate::chain::bitmap::{BitmapError, Kind};
use crate::chain::track::BeforeWrite;
use crate::chain::{Chain, ChainError, ChainOptions, Format, Node};
use crate::sync::{Arc, Mutex};
pub(super) use args::parse;
pub use args::{BackupArgs, BackupSync, BitmapMode};
use args::{BitmapUse, Copy};
use cbw::Clusters;
use run::Backup;

/// The smallest cluster a backup copies (QEMU's block-copy default).
const MIN_GRANULARITY: u64 = 64 << 10;

/// The hook on the node, removed when dropped however the job ends.
struct Hooked {
    node: Node,
    hook: Arc<dyn BeforeWrite>,
}

impl Drop for Hooked {
    fn drop(&mut self) {
        // Waits for copies before write in progress.
        self.node.remove_before_write_hook(&self.hook);
    }
}

/// Checks a `backup` against the chain, creates or opens its target and
/// starts it.
pub(super) fn start(registry: &Registry, args: BackupArgs) -> Result<(), JobError> {
    let chain = registry.chain();
    let (level, node) = shown_node(&chain, args.node.as_deref().unwrap_or("active"))?;
    let (id, all) = (node.id(), chain.nodes());
    // The image's own bitmaps are known before any name is looked up.
    node.take_persistent_bitmaps()?;
    let (mut copy, bitmap) = args::resolve(&args, &|name| check_bitmap(&node, name))?;
    if let Some(bitmap) = bitmap.as_ref().filter(|b| b.mode != BitmapMode::Never) {
        // A bitmap the job will change must be one that can be stored.
        super::bitmaps::check_changeable(&node, &bitmap.name)?;
    }
    let below = level.checked_sub(1).map(|l| all[l].id());
    if copy == Copy::Top && below.is_none() {
        // Nothing below: what the node holds is all it shows (QEMU).
        copy = Copy::Full;
    }
    if args.compress && args.format == Some(Format::Raw) {
        return Err(no_raw_compression());
    }
    let path = target::place(Path::new(&args.target), &chain, registry.mount().as_ref())?;
    let target = TargetSpec {
        path: path.clone(),
        mode: args.mode,
        format: args.format,
        backing: match copy {
            Copy::Full | Copy::Bitmap => None,
            Copy::Top => below,
            Copy::None => Some(id),
        },
        needs_backing: matches!(copy, Copy::Top | Copy::None),
        size: node.virtual_size(),
    };
    let dest = Arc::new(target_image::prepare(&chain, &target, &open_target)?);
    if args.compress && dest.active().format() != Format::Qcow2 {
        drop(dest);
        target_image::discard_created(&target);
        return Err(no_raw_compression());
    }
    let fresh = args.mode == TargetMode::AbsolutePaths && target.backing.is_none();
    let backup = Arc::new(plan(&chain, &dest, &node, copy, below, fresh, &args));
    let spec = JobSpec {
        id: String::new(),
        kind: JobType::Backup,
        node: node.name().to_string(),
        base: None,
        target: Some(path.display().to_string()),
        touched: Vec::new(),
        // Only read: any job but one that removes the node may run beside.
        shared: vec![id],
        kept: Vec::new(),
        len: node.virtual_size(),
        speed: args.speed,
    };
    let hooked_node = node.clone();
    let hook_backup = Arc::clone(&backup);
    let hook_bitmap = bitmap.clone();
    let setup = move |live: &LiveChain| install(live, &hooked_node, hook_backup, hook_bitmap);
    let body = move |job: &Job, _: &LiveChain, hooked: Result<Hooked, String>| {
        job.start();
        let result = match hooked {
            Ok(hooked) => {
                let result = backup.run(job).and_then(|()| job.work_done());
                drop(hooked);
                result
            }
            Err(error) => {
                job.record_error(error);
                Err(Stop::Failed)
            }
        };
        let (outcome, error) = conclusion(job, &backup, result);
        if let Some(bitmap) = &bitmap {
            settle_bitmap(&node, bitmap, outcome, &backup.clusters);
        }
        // The target leaves with the job, written back; its lock goes with
        // the last reference, before the job is seen to end.
        if let Err(err) = backup.dest.active().image().close() {
            log::error!("backup {}: closing the target: {err}", job.id());
        }
        drop(backup);
        job.conclude(outcome, error);
    };
    let started = registry.spawn(spec, args.id.clone(), setup, body);
    if started.is_err() {
        target_image::discard_created(&target);
    }
    started
}

/// Why `compress=on` is refused.
fn no_raw_compression() -> JobError {
    JobError::Invalid("compress=on needs a qcow2 target".into())
}

/// QEMU's checks of the bitmap a backup names: ENOENT when missing, EBUSY
/// when a job uses it, EINVAL when inconsistent.
fn check_bitmap(node: &Node, name: &str) -> Result<(), JobError> {
    let refusal = |e: BitmapError| {
        let text = format!("{}: {e}", node.name());
        match e {
            BitmapError::NotFound(_) => JobError::NotFound(text),
            BitmapError::Busy(_) => JobError::Busy(text),
            _ => JobError::Invalid(text),
        }
    };
    let infos = node.bitmaps().infos();
    match infos.iter().find(|b| b.name == name) {
        None => Err(refusal(BitmapError::NotFound(name.into()))),
        Some(b) if b.kind == Kind::Inconsistent => Err(refusal(BitmapError::Invalid(format!(
            "bitmap {name:?} is inconsistent: it can only be removed"
        )))),
        Some(b) if b.busy => Err(refusal(BitmapError::Busy(name.into()))),
        Some(_) => Ok(()),
    }
}

/// Opens the target's chain: a created one on top of the chain's node it
/// is backed by; an existing one on top of the chain's node its backing
/// file names, or with a chain of its own when it names an image outside
/// the chain (an incremental's previous backup), or alone.
fn open_target(chain: &Chain, spec: &TargetSpec) -> Result<Chain, ChainError> {
    if spec.mode == TargetMode::AbsolutePaths {
        return chain.target_chain(&spec.path, spec.format, spec.backing);
    }
    // Where its backing chain leads, looked at without taking a lock (as
    // `qemu-img -U`): a second descriptor holding the write lock could
    // outlive its close and refuse the real open.
    let peek = ChainOptions {
        force_share: true,
        ..ChainOptions::default()
    };
    let backing = {
        let peeked = Chain::open(&spec.path, &peek)?;
        let nodes = peeked.nodes();
        nodes
            .len()
            .checked_sub(2)
            .map(|below| nodes[below].canonical_path().to_path_buf())
    };
    let Some(backing) = backing else {
        return chain.target_chain(&spec.path, spec.format, None);
    };
    if let Some(node) = chain.find(&backing.to_string_lossy()) {
        return chain.target_chain(&spec.path, spec.format, Some(node.id()));
    }
    let options = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let own = Chain::open(&spec.path, &options)?;
    match spec.format {
        Some(format) if format != own.active().format() => Err(ChainError::Invalid {
            path: spec.path.clone(),
            reason: format!(
                "the target is {}, not {}",
                own.active().format().name(),
                format.name()
            ),
        }),
        _ => Ok(own),
    }
}

/// What the job copies where.
fn plan(
    chain: &Arc<Chain>,
    dest: &Arc<Chain>,
    node: &Node,
    kind: Copy,
    below: Option<crate::chain::NodeId>,
    fresh: bool,
    args: &BackupArgs,
) -> Backup {
    let target = dest.active();
    let granularity = target
        .cluster_size()
        .unwrap_or(MIN_GRANULARITY)
        .max(MIN_GRANULARITY);
    Backup {
        copy: Copier {
            view: node.id(),
            // `top` copies only what the node holds: the target reads the
            // rest from the same backing node. Every other copy makes the
            // target read exactly as the node did, zeros included.
            base: if kind == Copy::Top { below } else { None },
            dest: target.id(),
            overwrite: true,
        },
        source: Arc::clone(chain),
        dest: Arc::clone(dest),
        clusters: Clusters::new(node.virtual_size(), granularity),
        kind,
        skip_unheld: match kind {
            Copy::Top => Some(below),
            // A new image with no backing file reads as zeros already.
            Copy::Full if fresh => Some(None),
            _ => None,
        },
        on_error: args.on_error,
        broken: Mutex::new(None),
        cbw_bytes: AtomicU64::new(0),
        // Each of the target's clusters is compressed on its own.
        compress: args
            .compress
            .then(|| target.cluster_size().unwrap_or(granularity)),
    }
}

/// Before the command returns, with guest writes drained (so the point in
/// time falls between two writes): freezes the bitmap, marks what is to
/// copy, and hooks the node.
fn install(
    live: &LiveChain,
    node: &Node,
    backup: Arc<Backup>,
    bitmap: Option<BitmapUse>,
) -> Result<Hooked, String> {
    let _drained = live.drain();
    let frozen = match &bitmap {
        Some(bitmap) => Some(
            node.bitmaps()
                .freeze(&bitmap.name)
                .map_err(|e| format!("{}: {e}", node.name()))?,
        ),
        None => None,
    };
    match (backup.kind, frozen) {
        (Copy::Bitmap, Some(bits)) => backup.clusters.add_bits(&bits),
        _ => backup.clusters.add(0, node.virtual_size()),
    }
    let hook: Arc<dyn BeforeWrite> = backup;
    node.add_before_write_hook(Arc::clone(&hook));
    Ok(Hooked {
        node: node.clone(),
        hook,
    })
}

/// How the job ended: a finished copy still fails on an error `ignore`
/// passed over, or when the target cannot be made durable.
fn conclusion(job: &Job, backup: &Backup, result: Result<(), Stop>) -> (Outcome, Option<String>) {
    match result {
        Err(Stop::Cancelled) => (Outcome::Cancelled, None),
        Err(Stop::Failed) => (Outcome::Failed, job.error()),
        Ok(()) => match job.error() {
            Some(error) => (Outcome::Failed, Some(error)),
            None => match backup.dest.flush() {
                Ok(()) => (Outcome::Completed, None),
                Err(err) => (Outcome::Failed, Some(err.to_string())),
            },
        },
    }
}

/// QEMU's `backup_cleanup_sync_bitmap`: the bitmap becomes its successor
/// (the writes since the start) when the job succeeded or the mode is
/// `always`, unless it is `never`; else the successor is merged back. A
/// failed `always` job also gives back the clusters it did not copy.
fn settle_bitmap(node: &Node, bitmap: &BitmapUse, outcome: Outcome, clusters: &Clusters) {
    let success = outcome == Outcome::Completed;
    let sync = (success || bitmap.mode == BitmapMode::Always) && bitmap.mode != BitmapMode::Never;
    let bitmaps = node.bitmaps();
    let mut result = bitmaps.thaw(&bitmap.name, sync);
    if !success && bitmap.mode == BitmapMode::Always {
        let uncopied = clusters.uncopied(clusters.granularity(), node.virtual_size());
        result = result.and_then(|()| bitmaps.merge_bits(&bitmap.name, &uncopied));
    }
    if let Err(err) = result {
        log::error!("backup: settling bitmap {:?}: {err}", bitmap.name);
    }
}
