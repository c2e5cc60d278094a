//! The table of open files: monotonic handle numbers, never recycled, each
//! naming what was opened and the state that open keeps.
//!
//! The table is read on every request; it sits behind a read-write lock
//! whose write side is taken only by open and release, so reads and writes
//! on different handles never wait for each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::ctl::CommandWrites;
use super::errno::FsError;
use super::inode::CtlFile;
use crate::jobs::{Chain, NodeId};
use crate::sync::{read, write, Arc, RwLock};

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// File name.
    pub name: String,
}

/// What an open handle refers to.
#[derive(Debug)]
pub enum Handle {
    /// A node's flat file. `chain` is the chain as it stood at open: a node
    /// that later leaves the chain is still read through it.
    Node {
        /// The node.
        node: NodeId,
        /// The chain snapshot taken at open.
        chain: Arc<Chain>,
        /// Whether anything was written through this handle (flush on close).
        wrote: AtomicBool,
    },
    /// `active`: follows whichever node is active at each request.
    Active {
        /// Whether anything was written through this handle.
        wrote: AtomicBool,
    },
    /// A ctl file: the content rendered at open (empty for `command`), so a
    /// reader sees one consistent text however it splits its reads. The
    /// rendering is shared with every other open that saw the same text.
    Ctl {
        /// Which file.
        file: CtlFile,
        /// Its content at open.
        buffer: Arc<[u8]>,
        /// For `command`: what this open's earlier writes were.
        writes: CommandWrites,
    },
    /// A directory: its entries at open, so offsets stay meaningful while a
    /// job changes the chain during a listing.
    Dir {
        /// The entries, `.` and `..` first.
        entries: Vec<DirEntry>,
    },
}

impl Handle {
    /// Notes that a write went through this handle.
    pub fn mark_written(&self) {
        if let Handle::Node { wrote, .. } | Handle::Active { wrote } = self {
            wrote.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a write went through this handle.
    pub fn has_written(&self) -> bool {
        match self {
            Handle::Node { wrote, .. } | Handle::Active { wrote } => wrote.load(Ordering::Relaxed),
            Handle::Ctl { .. } | Handle::Dir { .. } => false,
        }
    }
}

/// Open handles by number.
#[derive(Debug)]
pub struct HandleTable {
    /// The next number to hand out; starts at 1 so 0 is never valid.
    next: AtomicU64,
    open: RwLock<HashMap<u64, Arc<Handle>>>,
}

impl Default for HandleTable {
    fn default() -> Self {
        HandleTable {
            next: AtomicU64::new(1),
            open: RwLock::new(HashMap::new()),
        }
    }
}

impl HandleTable {
    /// Stores `handle` under a fresh number and returns the number.
    pub fn insert(&self, handle: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        write(&self.open).insert(fh, Arc::new(handle));
        fh
    }

    /// The handle `fh`.
    pub fn get(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        read(&self.open)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle { fh })
    }

    /// Forgets `fh`; requests still running on it keep their `Arc`.
    pub fn remove(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        write(&self.open)
            .remove(&fh)
            .ok_or(FsError::BadHandle { fh })
    }

    /// How many handles are open.
    pub fn len(&self) -> usize {
        read(&self.open).len()
    }

    /// Whether no handle is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_numbers_are_never_reused() {
        let table = HandleTable::default();
        let a = table.insert(Handle::Active {
            wrote: AtomicBool::new(false),
        });
        table.remove(a).unwrap();
        let b = table.insert(Handle::Active {
            wrote: AtomicBool::new(false),
        });
        assert_ne!(a, b);
        assert!(matches!(table.get(a), Err(FsError::BadHandle { .. })));
        assert!(table.get(b).is_ok());
        assert_eq!(table.len(), 1);
    }
}
