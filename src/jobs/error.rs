//! Errors of the jobs layer: why a command was rejected, or why the chain
//! could not be flushed and closed. Each has one errno.

use super::job::VerbRefused;
use super::ChainError;

/// Why a command was refused or a chain operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The command text does not parse as `VERB key=value …`.
    #[error("bad command syntax: {reason}")]
    Syntax {
        /// What is wrong with it.
        reason: String,
    },
    /// The mount is read-only: no command may change anything.
    #[error("the mount is read-only")]
    ReadOnly,
    /// A value is wrong: a node that cannot play the part it is given, a
    /// duplicate job id, a target inside the mount (EINVAL).
    #[error("{0}")]
    Invalid(String),
    /// A named node or job does not exist (ENOENT).
    #[error("{0}")]
    NotFound(String),
    /// It conflicts with a job, or the job's state does not allow it (EBUSY).
    #[error("{0}")]
    Busy(String),
    /// The file to create exists (EEXIST).
    #[error("{0}")]
    Exists(String),
    /// The image has no room for what the command adds (ENOSPC).
    #[error("{0}")]
    NoSpace(String),
    /// The chain could not be closed because something still holds it.
    #[error("the chain is still in use by {holders} holder(s); it was flushed but not closed")]
    ChainInUse {
        /// How many other references remain.
        holders: usize,
    },
    /// The chain below failed.
    #[error(transparent)]
    Chain(#[from] ChainError),
}

impl JobError {
    /// The errno a write to `ctl/command` (or another request) failing with
    /// this error returns; chain errors delegate to [`ChainError::errno`].
    pub fn errno(&self) -> i32 {
        match self {
            JobError::Syntax { .. } => libc::EINVAL,
            JobError::Invalid(_) => libc::EINVAL,
            JobError::NotFound(_) => libc::ENOENT,
            JobError::Busy(_) => libc::EBUSY,
            JobError::Exists(_) => libc::EEXIST,
            JobError::NoSpace(_) => libc::ENOSPC,
            JobError::ReadOnly => libc::EROFS,
            JobError::ChainInUse { .. } => libc::EBUSY,
            JobError::Chain(e) => e.errno(),
        }
    }

    /// The errno's symbolic name, for events and status lines.
    pub fn errno_name(&self) -> String {
        let name = match self.errno() {
            libc::EINVAL => "EINVAL",
            libc::EROFS => "EROFS",
            libc::EBUSY => "EBUSY",
            libc::ENOENT => "ENOENT",
            libc::EEXIST => "EEXIST",
            libc::ENOSPC => "ENOSPC",
            libc::EIO => "EIO",
            other => return format!("errno {other}"),
        };
        name.to_owned()
    }
}

impl From<VerbRefused> for JobError {
    fn from(refused: VerbRefused) -> JobError {
        JobError::Busy(format!(
            "a job in state {} cannot accept {}",
            refused.status,
            refused.verb.name()
        ))
    }
}
