//! Why a filesystem request failed, and the one place that turns a failure
//! into the errno the caller sees. Errors from below keep their own errno
//! policy: this delegates to [`JobError::errno`], which delegates to
//! [`ChainError::errno`], so a host ENOSPC or EIO reaches the writer unchanged.

use std::io;
use std::path::PathBuf;

use crate::jobs::{ChainError, JobError};

/// A failed filesystem request, or a mount that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such file in the mount (or a node that left the chain).
    #[error("no such file")]
    NotFound,
    /// A path component that is a file was used as a directory.
    #[error("not a directory")]
    NotDir,
    /// A file operation on a directory.
    #[error("is a directory")]
    IsDir,
    /// A write to a file that is not writable now (a backing node, a
    /// read-only mount, a status file), root included.
    #[error("{what} is read-only")]
    ReadOnly {
        /// What was to be written.
        what: &'static str,
    },
    /// An operation the mount never allows: truncate, rename, unlink,
    /// create, mkdir, chmod, …
    #[error("{op} is not permitted in a chainfs mount")]
    NotPermitted {
        /// The refused operation.
        op: &'static str,
    },
    /// A write or allocation that starts at or past the end of a node.
    #[error("offset {offset} is at or past the end ({size} bytes)")]
    NoSpace {
        /// Where the request started.
        offset: u64,
        /// The file's size.
        size: u64,
    },
    /// SEEK_DATA/SEEK_HOLE at or past the end, or no data after the offset.
    #[error("no data at or after offset {offset}")]
    NoData {
        /// The offset asked for.
        offset: i64,
    },
    /// A mode or request the mount does not support.
    #[error("{what} is not supported")]
    Unsupported {
        /// What was asked.
        what: &'static str,
    },
    /// A request with bad arguments.
    #[error("invalid request: {reason}")]
    Invalid {
        /// What is wrong.
        reason: &'static str,
    },
    /// A file handle the kernel sent that was never opened or already released.
    #[error("no open file handle {fh}")]
    BadHandle {
        /// The handle.
        fh: u64,
    },
    /// The mount point is missing, not a directory, or not empty.
    #[error("mount point {}: {reason}", path.display())]
    Mountpoint {
        /// The mount point.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// The errno that describes it (ENOENT, ENOTDIR, ENOTEMPTY, …).
        errno: i32,
    },
    /// The kernel mount or the FUSE session failed.
    #[error("FUSE session at {}: {source}", path.display())]
    Session {
        /// The mount point.
        path: PathBuf,
        /// What the OS or fuser said.
        #[source]
        source: io::Error,
    },
    /// A command, the job layer or the chain below it failed (I/O on an
    /// image, bounds): one path, so one errno policy, for all of them.
    #[error(transparent)]
    Job(#[from] JobError),
}

/// A chain error reaches the mount through the jobs layer's error, whose
/// errno delegates to the chain's.
impl From<ChainError> for FsError {
    fn from(error: ChainError) -> FsError {
        FsError::Job(JobError::Chain(error))
    }
}

impl FsError {
    /// The errno a request failing with this error returns.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly { .. } => libc::EROFS,
            FsError::NotPermitted { .. } => libc::EPERM,
            FsError::NoSpace { .. } => libc::ENOSPC,
            FsError::NoData { .. } => libc::ENXIO,
            FsError::Unsupported { .. } => libc::EOPNOTSUPP,
            FsError::Invalid { .. } => libc::EINVAL,
            FsError::BadHandle { .. } => libc::EBADF,
            FsError::Mountpoint { errno, .. } => *errno,
            FsError::Session { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::Job(error) => error.errno(),
        }
    }

    /// Whether the failure is worth a line in the log: image and host I/O
    /// failures are; a caller's mistake (ENOENT, EROFS, EPERM, …) is not.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            FsError::Session { .. } | FsError::Job(JobError::Chain(_))
        )
    }
}

/// Logs `error` from request `op` when it is a fault, and gives its errno.
pub fn report(op: &str, error: &FsError) -> i32 {
    if error.is_fault() {
        log::error!("{op}: {error}");
    } else {
        log::debug!("{op}: {error}");
    }
    error.errno()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_from_below_keep_their_errno() {
        let chain = ChainError::OutOfBounds {
            node: "a".into(),
            offset: 1,
            len: 1,
            size: 1,
        };
        assert_eq!(FsError::from(chain).errno(), libc::ENOSPC);
        assert_eq!(FsError::from(JobError::ReadOnly).errno(), libc::EROFS);
        let host = ChainError::Io {
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        let error = FsError::from(host);
        assert_eq!(error.errno(), libc::EIO);
        assert!(error.is_fault());
    }

    #[test]
    fn refusals_are_not_faults() {
        assert!(!FsError::ReadOnly { what: "x" }.is_fault());
        assert_eq!(FsError::NotPermitted { op: "rename" }.errno(), libc::EPERM);
    }
}
