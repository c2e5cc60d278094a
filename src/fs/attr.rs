//! File attributes as the mount shows them, without fuser types: size,
//! mode, owner, `st_blocks` and times. The adapter converts them.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use crate::jobs::Node;

/// How long the kernel may trust attributes and entries. Short, because a
/// node file's mode (0644 while active, 0444 after a pivot) and the set of
/// node files change when a job changes the chain; `active`'s size never
/// changes, and data coherence does not rest on this (data is not cached
/// where it can change).
pub const TTL: Duration = Duration::from_secs(1);

/// Mode bits of a writable flat file.
pub const MODE_WRITABLE: u16 = 0o644;
/// Mode bits of a read-only flat file and of the status files.
pub const MODE_READ_ONLY: u16 = 0o444;
/// Mode bits of `ctl/command`: the owner may write commands (`echo … >`),
/// nobody reads it; other users cannot steer the mount's jobs even with
/// `--allow-other`.
pub const MODE_COMMAND: u16 = 0o200;
/// Mode bits of the directories.
pub const MODE_DIR: u16 = 0o755;

/// `st_blksize`: the preferred I/O size. Large, so tools like `cp` use
/// large requests.
pub const BLOCK_SIZE: u32 = 1 << 20;

/// Directory or regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
}

/// The attributes of one inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Directory or file.
    pub kind: Kind,
    /// Size in bytes (a node's virtual size).
    pub size: u64,
    /// 512-byte blocks allocated (a node's own image file).
    pub blocks: u64,
    /// Permission bits.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner: the user who mounted.
    pub uid: u32,
    /// Group of the user who mounted.
    pub gid: u32,
    /// Modification time (an image file's mtime; the mount time otherwise).
    pub mtime: SystemTime,
}

/// The user who mounted: the owner of every file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl Owner {
    /// The real user and group of this process.
    pub fn current() -> Owner {
        // SAFETY: getuid and getgid take no arguments, touch no memory of
        // ours and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Owner { uid, gid }
    }
}

/// Attributes of a directory.
pub fn dir(ino: u64, owner: Owner, mtime: SystemTime) -> Attr {
    Attr {
        ino,
        kind: Kind::Dir,
        size: 0,
        blocks: 0,
        perm: MODE_DIR,
        nlink: 2,
        uid: owner.uid,
        gid: owner.gid,
        mtime,
    }
}

/// Attributes of a ctl file: size 0 like a /proc file (reads are served
/// with direct I/O, so the kernel does not stop at the size).
pub fn ctl(ino: u64, perm: u16, owner: Owner, mtime: SystemTime) -> Attr {
    Attr {
        kind: Kind::File,
        perm,
        nlink: 1,
        ..dir(ino, owner, mtime)
    }
}

/// Attributes of a node's flat file (or of `active`, showing the active
/// node). `writable` decides 0644 or 0444, then the image file's own mode
/// takes away what it does not grant group and others (SPEC §3: an image
/// that is 0600 on disk is 0400 in the mount, or 0600 while active), so an
/// `--allow-other` mount never shows other users an image they could not
/// read on disk. A failure to measure the image's allocation shows as 0
/// blocks rather than failing `stat`.
pub fn node(ino: u64, node: &Node, writable: bool, owner: Owner, fallback: SystemTime) -> Attr {
    let blocks = match node.allocated_bytes() {
        Ok(bytes) => bytes.div_ceil(512),
        Err(error) => {
            log::warn!("{}: cannot measure allocation: {error}", node.name());
            0
        }
    };
    let on_disk = std::fs::metadata(node.path()).ok();
    let base = if writable {
        MODE_WRITABLE
    } else {
        MODE_READ_ONLY
    };
    Attr {
        ino,
        kind: Kind::File,
        size: node.virtual_size(),
        blocks,
        perm: node_perm(base, on_disk.as_ref().map(|m| m.permissions().mode())),
        nlink: 1,
        uid: owner.uid,
        gid: owner.gid,
        mtime: on_disk.and_then(|m| m.modified().ok()).unwrap_or(fallback),
    }
}

/// `base` without the group and other bits the image file's mode lacks;
/// owner-only when the image cannot be looked at (fail closed).
fn node_perm(base: u16, image_mode: Option<u32>) -> u16 {
    let shared = image_mode.map_or(0, |mode| mode & 0o077);
    // `shared` fits in 9 bits, so the cast loses nothing.
    base & (0o700 | shared as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_never_grants_group_or_others_what_its_image_does_not() {
        assert_eq!(node_perm(MODE_WRITABLE, Some(0o100600)), 0o600);
        assert_eq!(node_perm(MODE_READ_ONLY, Some(0o100600)), 0o400);
        assert_eq!(node_perm(MODE_READ_ONLY, Some(0o100640)), 0o440);
        assert_eq!(node_perm(MODE_WRITABLE, Some(0o100604)), 0o604);
        assert_eq!(node_perm(MODE_WRITABLE, Some(0o100666)), 0o644);
        assert_eq!(node_perm(MODE_READ_ONLY, Some(0o100777)), 0o444);
        assert_eq!(node_perm(MODE_WRITABLE, None), 0o600);
    }
}
