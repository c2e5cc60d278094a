//! Errors of the chain layer: each names the image at fault and, for a
//! backing file, the image that points to it.

use std::io;
use std::path::PathBuf;

use crate::format::FormatError;
use crate::storage::LockError;

/// Why a chain could not be opened, read or written.
///
/// Every variant names the file concerned; errors from the layers below are
/// kept as the source, so [`ChainError::errno`] can pass a host ENOSPC or EIO
/// through unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A host file (the top image, a new image) could not be opened or created.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// An image of the chain failed: opening it, or an I/O on it.
    #[error("{}: {source}", path.display())]
    Image {
        /// The image.
        path: PathBuf,
        /// What the format layer said.
        #[source]
        source: FormatError,
    },
    /// A backing file is missing or the OS refused to open it.
    #[error("could not open backing file {} of {}: {source}", backing.display(), image.display())]
    MissingBacking {
        /// The backing file, resolved as QEMU resolves it.
        backing: PathBuf,
        /// The image whose header names it.
        image: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A backing file exists but cannot be opened as an image.
    #[error("backing file {} of {}: {source}", backing.display(), image.display())]
    BackingImage {
        /// The backing file.
        backing: PathBuf,
        /// The image whose header names it.
        image: PathBuf,
        /// What the format layer said.
        #[source]
        source: FormatError,
    },
    /// A backing file name that chainfs cannot follow (a network protocol,
    /// an empty name).
    #[error("unsupported backing file {backing:?} of {}: {reason}", image.display())]
    UnsupportedBacking {
        /// The backing file name as stored in the header.
        backing: String,
        /// The image whose header names it.
        image: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// The chain comes back to an image already in it.
    #[error("backing file loop: {} names {} as its backing file, which is already in the chain", image.display(), backing.display())]
    Loop {
        /// The image whose header closes the loop.
        image: PathBuf,
        /// The backing file it names, already opened higher in the chain.
        backing: PathBuf,
    },
    /// The chain is deeper than chainfs accepts.
    #[error("backing chain deeper than {limit} images at {}", image.display())]
    TooDeep {
        /// The image whose backing file would exceed the limit.
        image: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// The process ran out of file descriptors while opening the chain:
    /// each node holds its image open, and the open-file limit is for the
    /// process to raise (the `chainfs` command raises it to the hard limit).
    #[error(
        "{}: out of file descriptors after opening {opened} images of the chain \
         (each image stays open; raise the open-file limit, `ulimit -n`): {source}",
        path.display()
    )]
    Descriptors {
        /// The image that could not be opened.
        path: PathBuf,
        /// How many images of the chain were open already.
        opened: usize,
        /// EMFILE or ENFILE.
        #[source]
        source: io::Error,
    },
    /// An image is locked by another process (e.g. a QEMU writing it).
    #[error("{}: {source}", path.display())]
    Lock {
        /// The locked file.
        path: PathBuf,
        /// The lock conflict.
        #[source]
        source: LockError,
    },
    /// A write to a node that is not writable (not the active node, or a
    /// chain opened read-only).
    #[error("node {node} is read-only")]
    ReadOnly {
        /// The node's name.
        node: String,
    },
    /// A read of a node hidden from the mount (an intermediate of a commit,
    /// whose data may already be merged into the base).
    #[error("node {node} left the mount for a commit")]
    Hidden {
        /// The node's name.
        node: String,
    },
    /// A request that does not fit inside the node.
    #[error("node {node}: offset {offset} length {len} is outside its {size} bytes")]
    OutOfBounds {
        /// The node's name.
        node: String,
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the node.
        size: u64,
    },
    /// A node id that is not (or no longer) in the chain.
    #[error("no node {id} in the chain")]
    NoSuchNode {
        /// The id asked for.
        id: u64,
    },
    /// Bad parameters: for a new image, or options that contradict each
    /// other.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The image concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ChainError {
    /// The errno that a filesystem request failing with this error returns.
    ///
    /// Errors from below delegate to [`FormatError::errno`] and the OS
    /// error, so ENOSPC and EIO of the host reach the writer unchanged.
    pub fn errno(&self) -> i32 {
        match self {
            ChainError::Io { source, .. }
            | ChainError::MissingBacking { source, .. }
            | ChainError::Descriptors { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ChainError::Image { source, .. } | ChainError::BackingImage { source, .. } => {
                source.errno()
            }
            ChainError::UnsupportedBacking { .. } => libc::EOPNOTSUPP,
            ChainError::Loop { .. } | ChainError::TooDeep { .. } => libc::ELOOP,
            ChainError::Lock { source, .. } => source.errno(),
            ChainError::ReadOnly { .. } => libc::EROFS,
            ChainError::Hidden { .. } => libc::EIO,
            // As on a block device: writing past the end is "no space".
            ChainError::OutOfBounds { .. } => libc::ENOSPC,
            ChainError::NoSuchNode { .. } => libc::ENOENT,
            ChainError::Invalid { .. } => libc::EINVAL,
        }
    }

    /// This error, as [`ChainError::Descriptors`] if it is the OS refusing
    /// an open for want of descriptors after `opened` images of the chain.
    pub(super) fn out_of_descriptors(self, opened: usize) -> ChainError {
        match self {
            ChainError::Io { path, source }
            | ChainError::MissingBacking {
                backing: path,
                source,
                ..
            } if matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                ChainError::Descriptors {
                    path,
                    opened,
                    source,
                }
            }
            other => other,
        }
    }
}
