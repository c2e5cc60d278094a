//! QEMU-compatible image locking with OFD byte-range locks.
//!
//! QEMU's file driver (`block/file-posix.c`) expresses its block-layer
//! permissions as shared (read) locks on single bytes of the image file:
//!
//! * byte `100 + bit` for every permission the opener *holds*;
//! * byte `200 + bit` for every permission the opener does *not share*.
//!
//! with the permission bits of `include/block/block-common.h`: consistent
//! read = 0, write = 1, write unchanged = 2, resize = 3. Because every lock is
//! a read lock, lockers never block each other when taking them; conflicts are
//! found by asking `F_OFD_GETLK` whether an exclusive lock *could* be placed on
//! the byte that matters, which reports only other open file descriptions.
//!
//! An opener is refused when it wants a permission that someone does not
//! share (byte `200 + bit` is locked by another: `Failed to get "write"
//! lock`), or does not share a permission that someone holds (byte
//! `100 + bit` is locked by another: `Failed to get shared "write" lock`).
//!
//! The bytes that QEMU 10.0.2 holds, read from `/proc/locks`:
//!
//! | opener                                  | bytes              |
//! |-----------------------------------------|--------------------|
//! | writable active image (`qemu-io img`)   | 100 101 103 201 203 |
//! | its read-only backing image             | 100 201 203        |
//!
//! [`LockMode::Write`] and [`LockMode::Read`] take exactly those bytes, so
//! QEMU and chainfs refuse each other just as two QEMUs would.
//!
//! OFD locks belong to the open file description: they last until every
//! descriptor that shares it is closed, and two separate `open`s of the same
//! file in one process conflict with each other.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// How chainfs locks an image, in QEMU's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// The writable active image: holds consistent read, write and resize;
    /// shares consistent read and write-unchanged, as QEMU does for the
    /// image a VM or `qemu-io` has open read-write.
    Write,
    /// A read-only image, such as a backing file: holds consistent read and
    /// shares everything but write and resize ("shared reading, nobody
    /// writing"), as QEMU locks a backing image.
    Read,
    /// No locks and no checks (`--force-share`, as `qemu-img -U`).
    None,
}

/// A lock could not be taken. The messages are QEMU's own.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds or refuses to share a permission this mode
    /// needs.
    #[error(
        "Failed to get {kind}\"{perm}\" lock\nIs another process using the image [{path}]?",
        kind = if *shared { "shared " } else { "" },
        path = path.display()
    )]
    Conflict {
        /// The image.
        path: PathBuf,
        /// QEMU's name of the permission: "consistent read", "write",
        /// "write unchanged" or "resize".
        perm: &'static str,
        /// `false` when we want `perm` and someone does not share it; `true`
        /// when we do not share `perm` and someone holds it.
        shared: bool,
    },
    /// Placing a lock on a byte failed.
    #[error("Failed to lock byte {byte} of {path}", path = path.display())]
    LockByte {
        /// The image.
        path: PathBuf,
        /// The byte offset of the lock.
        byte: u64,
        /// What `fcntl(F_OFD_SETLK)` returned.
        #[source]
        source: io::Error,
    },
    /// Testing a byte for a conflicting lock failed.
    #[error("Failed to test lock byte {byte} of {path}", path = path.display())]
    TestByte {
        /// The image.
        path: PathBuf,
        /// The byte offset of the lock.
        byte: u64,
        /// What `fcntl(F_OFD_GETLK)` returned.
        #[source]
        source: io::Error,
    },
}

impl LockError {
    /// The image the lock was for.
    pub fn path(&self) -> &Path {
        match self {
            LockError::Conflict { path, .. }
            | LockError::LockByte { path, .. }
            | LockError::TestByte { path, .. } => path,
        }
    }

    /// The errno this error maps to: `EAGAIN` for a conflict (what QEMU
    /// itself returns), the OS error otherwise.
    pub fn errno(&self) -> i32 {
        match self {
            LockError::Conflict { .. } => libc::EAGAIN,
            LockError::LockByte { source, .. } | LockError::TestByte { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

/// Locks a freshly opened `file` (whose description holds no locks yet) as
/// `mode` requires, after checking that no other process conflicts. On
/// failure no lock is left behind.
pub fn lock(file: &File, path: &Path, mode: LockMode) -> Result<(), LockError> {
    relock(file, path, LockMode::None, mode)
}

/// Changes the locks of `file` from `from` (which it must hold now) to `to`,
/// as QEMU does on a permission change: first add the bytes of `to` while
/// keeping those of `from`, then check for conflicts, and only then drop the
/// bytes `to` does not need. On a conflict the locks of `from` are restored,
/// so a refused change (say, making a backing image writable for a commit)
/// leaves the image locked as before.
pub fn relock(file: &File, path: &Path, from: LockMode, to: LockMode) -> Result<(), LockError> {
    let fd = file.as_raw_fd();
    let old = LockBytes::of(from);
    let new = LockBytes::of(to);
    let result = apply(fd, path, old.union(new)).and_then(|()| check(fd, path, new));
    let keep = if result.is_ok() { new } else { old };
    // Only unlocks follow; they cannot conflict. Should one fail anyway the
    // byte stays locked, which errs on the side of refusing other writers.
    if let Err(err) = release_except(fd, keep) {
        log::warn!("{}: failed to drop image lock bytes: {err}", path.display());
    }
    result
}

/// Drops every lock byte QEMU uses from `file`'s open file description.
pub fn unlock(file: &File) -> io::Result<()> {
    release_except(file.as_raw_fd(), LockBytes::NONE)
}

/// One block-layer permission, by its bit number in QEMU's `BLK_PERM_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Perm {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Perm {
    /// Every permission QEMU 6.2 and later maps to a lock byte
    /// (`BLK_PERM_ALL`). The retired graph-mod bit 4 is never locked.
    const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// The name QEMU's `bdrv_perm_names` gives the permission.
    fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    /// The byte locked while this permission is held.
    fn held_byte(self) -> u64 {
        PERM_BASE + self as u64
    }

    /// The byte locked while this permission is not shared.
    fn unshared_byte(self) -> u64 {
        SHARED_BASE + self as u64
    }
}

/// `RAW_LOCK_PERM_BASE` in `block/file-posix.c`.
const PERM_BASE: u64 = 100;
/// `RAW_LOCK_SHARED_BASE` in `block/file-posix.c`.
const SHARED_BASE: u64 = 200;

/// A set of [`Perm`]s as a bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PermSet(u8);

impl PermSet {
    const EMPTY: PermSet = PermSet(0);

    fn of(perms: &[Perm]) -> PermSet {
        PermSet(perms.iter().fold(0, |mask, perm| mask | perm.bit()))
    }

    fn contains(self, perm: Perm) -> bool {
        self.0 & perm.bit() != 0
    }

    fn union(self, other: PermSet) -> PermSet {
        PermSet(self.0 | other.0)
    }

    fn iter(self) -> impl Iterator<Item = Perm> {
        Perm::ALL
            .into_iter()
            .filter(move |perm| self.contains(*perm))
    }
}

/// The permissions a mode holds and those it refuses to share: together
/// they name the bytes it locks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LockBytes {
    held: PermSet,
    unshared: PermSet,
}

impl LockBytes {
    const NONE: LockBytes = LockBytes {
        held: PermSet::EMPTY,
        unshared: PermSet::EMPTY,
    };

    fn of(mode: LockMode) -> LockBytes {
        // Both writers and readers refuse to share write and resize: QEMU
        // never lets anyone change an image under a reader that wants a
        // consistent view, nor a second writer beside the first.
        let unshared = PermSet::of(&[Perm::Write, Perm::Resize]);
        match mode {
            LockMode::Write => LockBytes {
                held: PermSet::of(&[Perm::ConsistentRead, Perm::Write, Perm::Resize]),
                unshared,
            },
            LockMode::Read => LockBytes {
                held: PermSet::of(&[Perm::ConsistentRead]),
                unshared,
            },
            LockMode::None => LockBytes::NONE,
        }
    }

    fn union(self, other: LockBytes) -> LockBytes {
        LockBytes {
            held: self.held.union(other.held),
            unshared: self.unshared.union(other.unshared),
        }
    }

    /// Every byte locked, in QEMU's order (held bytes first).
    fn bytes(self) -> impl Iterator<Item = u64> {
        let held = self.held.iter().map(Perm::held_byte);
        held.chain(self.unshared.iter().map(Perm::unshared_byte))
    }
}

/// Takes a shared lock on every byte of `bytes` (`raw_apply_lock_bytes`).
fn apply(fd: RawFd, path: &Path, bytes: LockBytes) -> Result<(), LockError> {
    for byte in bytes.bytes() {
        set_lock(fd, byte, libc::F_RDLCK).map_err(|source| LockError::LockByte {
            path: path.to_path_buf(),
            byte,
            source,
        })?;
    }
    Ok(())
}

/// Unlocks every QEMU lock byte that is not in `keep`.
fn release_except(fd: RawFd, keep: LockBytes) -> io::Result<()> {
    for perm in Perm::ALL {
        if !keep.held.contains(perm) {
            set_lock(fd, perm.held_byte(), libc::F_UNLCK)?;
        }
        if !keep.unshared.contains(perm) {
            set_lock(fd, perm.unshared_byte(), libc::F_UNLCK)?;
        }
    }
    Ok(())
}

/// Refuses `bytes` if another open file description holds a lock that
/// conflicts with it (`raw_check_lock_bytes`).
fn check(fd: RawFd, path: &Path, bytes: LockBytes) -> Result<(), LockError> {
    // Permissions we want, against others that do not share them.
    for perm in bytes.held.iter() {
        check_byte(fd, path, perm.unshared_byte(), perm, false)?;
    }
    // Permissions we do not share, against others that hold them.
    for perm in bytes.unshared.iter() {
        check_byte(fd, path, perm.held_byte(), perm, true)?;
    }
    Ok(())
}

fn check_byte(
    fd: RawFd,
    path: &Path,
    byte: u64,
    perm: Perm,
    shared: bool,
) -> Result<(), LockError> {
    match locked_by_other(fd, byte) {
        Ok(false) => Ok(()),
        Ok(true) => Err(LockError::Conflict {
            path: path.to_path_buf(),
            perm: perm.name(),
            shared,
        }),
        Err(source) => Err(LockError::TestByte {
            path: path.to_path_buf(),
            byte,
            source,
        }),
    }
}

/// A one-byte `flock` record at `byte`.
fn one_byte(byte: u64, kind: libc::c_int) -> libc::flock {
    libc::flock {
        // The lock types are tiny constants (0..=2); the casts cannot truncate.
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        // Lock bytes are at most 203; they fit any off_t.
        l_start: byte as libc::off_t,
        l_len: 1,
        // F_OFD_* require l_pid to be zero.
        l_pid: 0,
    }
}

/// Places (`F_RDLCK`) or removes (`F_UNLCK`) a lock on one byte.
fn set_lock(fd: RawFd, byte: u64, kind: libc::c_int) -> io::Result<()> {
    let record = one_byte(byte, kind);
    // SAFETY: `record` is a valid flock that outlives the call; fcntl does
    // not keep the pointer.
    let result = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &record) };
    if result == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`, i.e.
/// whether an exclusive lock there would be refused (`qemu_lock_fd_test`).
fn locked_by_other(fd: RawFd, byte: u64) -> io::Result<bool> {
    let mut record = one_byte(byte, libc::F_WRLCK);
    // SAFETY: `record` is a valid, writable flock that outlives the call;
    // fcntl fills it in and does not keep the pointer.
    let result = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut record) };
    if result == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(record.l_type) != libc::F_UNLCK)
}

#[cfg(test)]
mod tests;
