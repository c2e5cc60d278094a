//! The image a mirror or a backup writes outside the chain: refused when
//! it is an image of the chain, created (`absolute-paths`: EEXIST if it
//! exists; qcow2 unless `format=raw`, backed by the node the job's `sync`
//! names, by its absolute path) or taken as it is (`existing`: ENOENT if
//! missing), then opened for writing under QEMU's write lock and checked
//! against the node (same size; a backing file needs qcow2). A target
//! created here and refused afterwards is removed again: a refused command
//! leaves nothing behind.

use std::path::{Path, PathBuf};

use super::command::TargetMode;
use super::JobError;
use crate::chain::{create_image, create_raw_image, Chain, ChainError, Format, Node, NodeId};

/// Cluster size of a qcow2 target chainfs creates (QEMU's default).
const NEW_TARGET_CLUSTER_SIZE: u64 = 64 << 10;

/// What a job asks of its target.
#[derive(Clone, Debug)]
pub(super) struct TargetSpec {
    /// Where it is (placed by [`super::target::place`]).
    pub path: PathBuf,
    /// Created or existing.
    pub mode: TargetMode,
    /// The format asked for (default: qcow2 when created, probed when
    /// existing).
    pub format: Option<Format>,
    /// The node a created target is backed by (`None`: no backing file).
    pub backing: Option<NodeId>,
    /// The job relies on the target's backing file (a `top` or `none`
    /// copy), which a raw image cannot have.
    pub needs_backing: bool,
    /// The node's size, which the target's must equal.
    pub size: u64,
}

/// How a job opens its target's chain once the file exists.
pub(super) type Opener<'a> = &'a dyn Fn(&Chain, &TargetSpec) -> Result<Chain, ChainError>;

/// Checks, creates or finds, and opens the target of `spec` with `open`;
/// returns its chain, whose active node is the target.
pub(super) fn prepare(
    chain: &Chain,
    spec: &TargetSpec,
    open: Opener<'_>,
) -> Result<Chain, JobError> {
    if let Some(clash) = chain_image(chain, &spec.path) {
        return Err(JobError::Invalid(format!(
            "{} is {clash}, an image of the chain",
            spec.path.display()
        )));
    }
    let exists = std::fs::symlink_metadata(&spec.path).is_ok();
    let created = spec.mode == TargetMode::AbsolutePaths;
    match spec.mode {
        TargetMode::AbsolutePaths if exists => {
            return Err(JobError::Exists(format!("{} exists", spec.path.display())))
        }
        TargetMode::AbsolutePaths => {
            if spec.format == Some(Format::Raw) && spec.needs_backing {
                return Err(no_raw_backing());
            }
            create(chain, spec)?;
        }
        TargetMode::Existing if !exists => {
            return Err(JobError::NotFound(format!(
                "{} does not exist",
                spec.path.display()
            )))
        }
        TargetMode::Existing => {}
    }
    open_checked(chain, spec, open).inspect_err(|_| {
        if created {
            // Ours since a moment ago, and not worth keeping half made.
            let _ = std::fs::remove_file(&spec.path);
        }
    })
}

/// Removes a target [`prepare`] created for a command that was refused
/// after all.
pub(super) fn discard_created(spec: &TargetSpec) {
    if spec.mode == TargetMode::AbsolutePaths {
        let _ = std::fs::remove_file(&spec.path);
    }
}

/// Why a raw target cannot serve a copy that relies on a backing file.
fn no_raw_backing() -> JobError {
    JobError::Invalid("a raw target has no backing file: sync=top and sync=none need qcow2".into())
}

/// The name of the node whose image is the file at `path`, if any (hidden
/// nodes included): the same file by any path.
pub(super) fn chain_image(chain: &Chain, path: &Path) -> Option<String> {
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

/// Creates the target: raw and empty, or qcow2 backed by `spec.backing`
/// named by its absolute path.
fn create(chain: &Chain, spec: &TargetSpec) -> Result<(), JobError> {
    if spec.format == Some(Format::Raw) {
        return Ok(create_raw_image(&spec.path, spec.size)?);
    }
    let backing = spec.backing.and_then(|id| chain.node(id));
    let name = backing.map(|n| n.path().to_string_lossy().into_owned());
    let backing = name.as_deref().zip(backing.map(Node::format));
    Ok(create_image(
        &spec.path,
        spec.size,
        NEW_TARGET_CLUSTER_SIZE,
        backing,
    )?)
}

/// Opens the target's chain and checks it against the node.
fn open_checked(chain: &Chain, spec: &TargetSpec, open: Opener<'_>) -> Result<Chain, JobError> {
    let target = open(chain, spec).map_err(|err| {
        // Another job's target, or an image another process writes.
        if err.errno() == libc::EAGAIN {
            JobError::Busy(err.to_string())
        } else {
            JobError::Chain(err)
        }
    })?;
    let image = target.active();
    if image.format() == Format::Raw && spec.needs_backing {
        return Err(no_raw_backing());
    }
    if image.virtual_size() != spec.size {
        return Err(JobError::Invalid(format!(
            "{} is {} bytes; the node is {}",
            spec.path.display(),
            image.virtual_size(),
            spec.size
        )));
    }
    Ok(target)
}
