//! The inode table: a stable inode number for every fixed file and for every
//! node, and the kernel's lookup counts.
//!
//! ```text
//! 1 /            2 ctl/         3..=7 ctl/command … ctl/chain
//! 8 active       9, 10 ctl/bitmaps, ctl/bitmaps.json
//! NODE_BASE + NodeId   one per node, for as long as it lives
//! ```
//!
//! A node's inode is computed from its [`NodeId`], which the chain never
//! reuses, so inode numbers are never recycled and the generation is always
//! 0. Nodes may appear and disappear as jobs change the chain; an inode of
//! a departed node still decodes, and callers find out it is gone when the
//! current chain no longer holds its id. The lookup counts say which inodes
//! the kernel holds, so that a later notifier invalidates only those.

use std::collections::HashMap;

use crate::jobs::NodeId;
use crate::sync::{lock, Mutex};

/// The root directory.
pub const ROOT: u64 = 1;
/// `ctl/`.
pub const CTL_DIR: u64 = 2;
/// `active`.
pub const ACTIVE: u64 = 8;
/// Node inodes are `NODE_BASE + NodeId`: clear of every fixed inode.
pub const NODE_BASE: u64 = 1 << 10;

/// The files of `ctl/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtlFile {
    /// `ctl/command`: write a command here.
    Command,
    /// `ctl/status`: jobs, for people.
    Status,
    /// `ctl/status.json`: jobs, for scripts.
    StatusJson,
    /// `ctl/events`: one JSON object a line.
    Events,
    /// `ctl/chain`: the chain as it stands now.
    Chain,
    /// `ctl/bitmaps`: dirty bitmaps, for people.
    Bitmaps,
    /// `ctl/bitmaps.json`: dirty bitmaps, for scripts.
    BitmapsJson,
}

impl CtlFile {
    /// Every ctl file, in directory order.
    pub const ALL: [CtlFile; 7] = [
        CtlFile::Command,
        CtlFile::Status,
        CtlFile::StatusJson,
        CtlFile::Events,
        CtlFile::Chain,
        CtlFile::Bitmaps,
        CtlFile::BitmapsJson,
    ];

    /// The file's name in `ctl/`.
    pub fn name(self) -> &'static str {
        match self {
            CtlFile::Command => "command",
            CtlFile::Status => "status",
            CtlFile::StatusJson => "status.json",
            CtlFile::Events => "events",
            CtlFile::Chain => "chain",
            CtlFile::Bitmaps => "bitmaps",
            CtlFile::BitmapsJson => "bitmaps.json",
        }
    }

    /// The ctl file called `name`.
    pub fn from_name(name: &str) -> Option<CtlFile> {
        CtlFile::ALL.into_iter().find(|file| file.name() == name)
    }

    fn ino(self) -> u64 {
        let position = CtlFile::ALL.iter().position(|f| *f == self).unwrap_or(0) as u64;
        // The files added after `active` took inode 8 go after it, so that
        // the older inode numbers stay what they were.
        if position < 5 {
            3 + position
        } else {
            4 + position
        }
    }
}

/// What an inode number stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Inode {
    /// The mount's root directory.
    Root,
    /// `ctl/`.
    CtlDir,
    /// A file of `ctl/`.
    Ctl(CtlFile),
    /// `active`: whichever node is active at each request.
    Active,
    /// The flat file of one node.
    Node(NodeId),
}

impl Inode {
    /// The inode number (see the module table).
    pub fn ino(self) -> u64 {
        match self {
            Inode::Root => ROOT,
            Inode::CtlDir => CTL_DIR,
            Inode::Ctl(file) => file.ino(),
            Inode::Active => ACTIVE,
            // Node ids are small counters; saturating keeps a hostile id
            // from wrapping onto a fixed inode.
            Inode::Node(id) => NODE_BASE.saturating_add(id.0),
        }
    }

    /// Decodes an inode number; `None` for a number never handed out.
    pub fn from_ino(ino: u64) -> Option<Inode> {
        match ino {
            ROOT => Some(Inode::Root),
            CTL_DIR => Some(Inode::CtlDir),
            ACTIVE => Some(Inode::Active),
            n if n >= NODE_BASE => Some(Inode::Node(NodeId(n - NODE_BASE))),
            n => CtlFile::ALL
                .into_iter()
                .find(|f| f.ino() == n)
                .map(Inode::Ctl),
        }
    }

    /// Whether the inode is a directory.
    pub fn is_dir(self) -> bool {
        matches!(self, Inode::Root | Inode::CtlDir)
    }
}

/// How many lookups the kernel holds on each inode (FUSE's `nlookup`).
#[derive(Debug, Default)]
pub struct LookupCounts {
    counts: Mutex<HashMap<u64, u64>>,
}

impl LookupCounts {
    /// Records one lookup of `ino` answered to the kernel.
    pub fn remember(&self, ino: u64) {
        *lock(&self.counts).entry(ino).or_insert(0) += 1;
    }

    /// The kernel forgot `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&ino) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                counts.remove(&ino);
            }
        }
    }

    /// Whether the kernel holds `ino` (so an invalidation would matter).
    pub fn is_held(&self, ino: u64) -> bool {
        ino == ROOT || lock(&self.counts).contains_key(&ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_inode_number_decodes_to_what_encoded_it() {
        let mut inodes = vec![Inode::Root, Inode::CtlDir, Inode::Active];
        inodes.extend(CtlFile::ALL.map(Inode::Ctl));
        inodes.extend([0, 1, 99].map(|id| Inode::Node(NodeId(id))));
        for inode in inodes {
            assert_eq!(Inode::from_ino(inode.ino()), Some(inode), "{inode:?}");
        }
        assert_eq!(Inode::from_ino(0), None);
        assert_eq!(Inode::from_ino(11), None);
    }

    #[test]
    fn lookup_counts_follow_forgets() {
        let counts = LookupCounts::default();
        counts.remember(2000);
        counts.remember(2000);
        counts.forget(2000, 1);
        assert!(counts.is_held(2000));
        counts.forget(2000, 1);
        assert!(!counts.is_held(2000));
        assert!(counts.is_held(ROOT));
    }
}
