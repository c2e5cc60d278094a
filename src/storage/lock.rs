//! QEMU-compatible image locking (placeholder; see the lock helper).

/// How an image is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// No locks at all (`--force-share`).
    None,
}

/// A lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("lock conflict")]
pub struct LockError;
