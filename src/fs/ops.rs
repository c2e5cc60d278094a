//! The filesystem model: every request the mount serves, as plain methods
//! returning `Result<T, FsError>`, with no fuser types, so it is tested
//! without a mount. The adapter in `mod.rs` only translates.
//!
//! The model reaches the chain only through [`Jobs::chain`], once per
//! request, and keeps no node list of its own beyond what an open handle or
//! directory listing snapshots.

use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use super::attr::{self, Attr, Owner, MODE_COMMAND, MODE_READ_ONLY};
use super::ctl::{self, CommandWrites, Renderings};
use super::errno::FsError;
use super::handles::{DirEntry, Handle, HandleTable};
use super::inode::{self, CtlFile, Inode, LookupCounts};
use super::node_file::{self, is_writable, Seek, Target};
use super::stats::RequestStats;
use crate::jobs::{Chain, Jobs, NodeId};
use crate::sync::Arc;

/// How an open file is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    /// No page cache: every read and write reaches the model
    /// (`FOPEN_DIRECT_IO`). For everything that can change.
    Direct,
    /// The kernel may cache pages across opens (`FOPEN_KEEP_CACHE`). Only
    /// for node files that cannot change while open.
    Cached,
}

/// The answer to an open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The new handle.
    pub fh: u64,
    /// How the kernel should serve it.
    pub caching: Caching,
}

/// The attribute changes a `setattr` asks for (times are accepted and
/// ignored: an image's mtime is the host's business).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttrChange {
    /// New size (truncate).
    pub size: Option<u64>,
    /// New mode bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
}

/// `statfs` figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsStats {
    /// Total blocks of `block_size`: the images' allocation.
    pub blocks: u64,
    /// Free blocks: none; the mount cannot grow.
    pub free: u64,
    /// Number of files.
    pub files: u64,
    /// Block size.
    pub block_size: u32,
    /// Longest name.
    pub name_max: u32,
}

/// `lseek` whence values the kernel forwards.
pub mod whence {
    /// SEEK_DATA.
    pub const DATA: i32 = libc::SEEK_DATA;
    /// SEEK_HOLE.
    pub const HOLE: i32 = libc::SEEK_HOLE;
}

/// The filesystem, without the FUSE transport.
#[derive(Debug)]
pub struct FsModel {
    jobs: Arc<Jobs>,
    /// `--read-only`: every flat file 0444, every flat-file write EROFS.
    read_only: bool,
    owner: Owner,
    /// Mount time: the times of directories and ctl files.
    started: SystemTime,
    lookups: LookupCounts,
    handles: HandleTable,
    /// The ctl files' latest renderings, shared by their opens.
    renderings: Renderings,
    stats: Arc<RequestStats>,
}

impl FsModel {
    /// A model serving `jobs`' chain, owned by the current user.
    pub fn new(jobs: Arc<Jobs>, read_only: bool, stats: Arc<RequestStats>) -> FsModel {
        let read_only = read_only || jobs.read_only();
        FsModel {
            jobs,
            read_only,
            owner: Owner::current(),
            started: SystemTime::now(),
            lookups: LookupCounts::default(),
            handles: HandleTable::default(),
            renderings: Renderings::default(),
            stats,
        }
    }

    /// The request counters.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// The kernel's lookup counts (for invalidating only what it holds).
    pub fn lookups(&self) -> &LookupCounts {
        &self.lookups
    }

    /// Looks `name` up in directory `parent`; counts the lookup.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let inode = match decode(parent)? {
            Inode::Root => self.root_child(name)?,
            Inode::CtlDir => CtlFile::from_name(name)
                .map(Inode::Ctl)
                .ok_or(FsError::NotFound)?,
            _ => return Err(FsError::NotDir),
        };
        let attr = self.getattr(inode.ino(), None)?;
        self.lookups.remember(attr.ino);
        Ok(attr)
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.lookups.forget(ino, n);
    }

    /// The attributes of `ino`; with `fh`, a node that left the chain is
    /// still described through the handle's snapshot.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr, FsError> {
        let (owner, started) = (self.owner, self.started);
        match decode(ino)? {
            Inode::Root | Inode::CtlDir => Ok(attr::dir(ino, owner, started)),
            Inode::Ctl(file) => Ok(attr::ctl(ino, ctl_mode(file), owner, started)),
            Inode::Active => {
                let chain = self.jobs.chain();
                let active = chain.active();
                let writable = is_writable(&chain, active.id(), self.read_only);
                Ok(attr::node(ino, active, writable, owner, started))
            }
            Inode::Node(id) => {
                let chain = self.chain_holding(id, fh)?;
                let writable = is_writable(&self.jobs.chain(), id, self.read_only);
                let node = chain.node(id).ok_or(FsError::NotFound)?;
                // A node a commit hid is only described to open handles.
                if node.hidden() && fh.is_none() {
                    return Err(FsError::NotFound);
                }
                Ok(attr::node(ino, node, writable, owner, started))
            }
        }
    }

    /// `setattr`: truncate is EPERM (a same-size truncate is a no-op), as
    /// are chmod and chown to other values; times are accepted and ignored.
    /// Truncating `ctl/command` (a shell's `>`) is a no-op.
    pub fn setattr(&self, ino: u64, fh: Option<u64>, change: AttrChange) -> Result<Attr, FsError> {
        let current = self.getattr(ino, fh)?;
        let inode = decode(ino)?;
        if let Some(size) = change.size {
            let command = inode == Inode::Ctl(CtlFile::Command);
            if inode.is_dir() {
                return Err(FsError::IsDir);
            }
            if size != current.size && !command {
                return Err(FsError::NotPermitted { op: "truncate" });
            }
        }
        let mode_changes = change
            .mode
            .is_some_and(|mode| mode & 0o7777 != u32::from(current.perm));
        if mode_changes {
            return Err(FsError::NotPermitted { op: "chmod" });
        }
        if change.uid.is_some_and(|uid| uid != current.uid)
            || change.gid.is_some_and(|gid| gid != current.gid)
        {
            return Err(FsError::NotPermitted { op: "chown" });
        }
        Ok(current)
    }

    /// Opens directory `ino`, snapshotting its entries.
    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let entries = match decode(ino)? {
            Inode::Root => self.root_entries(),
            Inode::CtlDir => ctl_entries(),
            _ => return Err(FsError::NotDir),
        };
        Ok(self.handles.insert(Handle::Dir { entries }))
    }

    /// The entries of an open directory from position `offset` on; the
    /// entry at index `i` has offset `i + 1`.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirEntry>, FsError> {
        match &*self.handles.get(fh)? {
            Handle::Dir { entries } => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                Ok(entries.iter().skip(start).cloned().collect())
            }
            _ => Err(FsError::NotDir),
        }
    }

    /// Opens file `ino`, for writing if `write`. Opening for writing a file
    /// that is not writable now is EROFS, root included.
    pub fn open(&self, ino: u64, write: bool) -> Result<Opened, FsError> {
        let (handle, caching) = match decode(ino)? {
            Inode::Root | Inode::CtlDir => return Err(FsError::IsDir),
            Inode::Ctl(file) => self.open_ctl(file, write)?,
            Inode::Active => {
                let chain = self.jobs.chain();
                if write && !is_writable(&chain, chain.active().id(), self.read_only) {
                    return Err(FsError::ReadOnly { what: "active" });
                }
                let wrote = AtomicBool::new(false);
                (Handle::Active { wrote }, Caching::Direct)
            }
            Inode::Node(id) => self.open_node(id, write)?,
        };
        let fh = self.handles.insert(handle);
        Ok(Opened { fh, caching })
    }

    /// Reads up to `size` bytes at `offset` of open file `fh`, into `buf`
    /// (the caller's, kept from one request to the next so that a 1 MiB
    /// read does not allocate and zero 1 MiB first); returns them.
    pub fn read<'b>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], FsError> {
        let handle = self.handles.get(fh)?;
        if let Handle::Ctl { buffer, .. } = &*handle {
            buf.clear();
            buf.extend_from_slice(ctl::read(buffer, offset, size));
            return Ok(buf);
        }
        self.stats.record_read(u64::from(size));
        node_file::read(&self.read_target(&handle)?, offset, size, buf)
    }

    /// Writes `data` at `offset` of open file `fh`; returns bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<usize, FsError> {
        let handle = self.handles.get(fh)?;
        if let Handle::Ctl { file, writes, .. } = &*handle {
            return match file {
                CtlFile::Command => ctl::command(&self.jobs, writes, offset, data),
                _ => Err(FsError::ReadOnly {
                    what: "this ctl file",
                }),
            };
        }
        self.stats.record_write(data.len() as u64);
        // Held until the write returns: a pivot waits for it, and a write
        // that waited for a pivot picks the new active node.
        let _gate = self.jobs.write_gate();
        let target = self.write_target(&handle)?;
        let written = node_file::write(&target, offset, data)?;
        handle.mark_written();
        Ok(written)
    }

    /// `fallocate` on open file `fh` (see [`node_file::discard`]).
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<(), FsError> {
        let handle = self.handles.get(fh)?;
        let _gate = self.jobs.write_gate();
        let target = self.write_target(&handle)?;
        node_file::discard(&target, offset, len, mode)?;
        handle.mark_written();
        Ok(())
    }

    /// `lseek` with SEEK_DATA or SEEK_HOLE (the kernel handles the others).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64, FsError> {
        let what = match whence {
            whence::DATA => Seek::Data,
            whence::HOLE => Seek::Hole,
            _ => return Err(FsError::Invalid { reason: "whence" }),
        };
        let handle = self.handles.get(fh)?;
        let found = match &*handle {
            Handle::Ctl { buffer, .. } => seek_buffer(buffer.len() as u64, offset, what)?,
            _ => node_file::seek(&self.read_target(&handle)?, offset, what)?,
        };
        i64::try_from(found).map_err(|_| FsError::NoData { offset })
    }

    /// `fsync`: makes every completed write to the chain durable.
    pub fn fsync(&self, fh: u64) -> Result<(), FsError> {
        match &*self.handles.get(fh)? {
            Handle::Node { .. } | Handle::Active { .. } => Ok(self.jobs.chain().flush()?),
            Handle::Ctl { .. } | Handle::Dir { .. } => Ok(()),
        }
    }

    /// `flush` (each close of a descriptor): a handle that wrote flushes
    /// the chain, so data written and closed is on disk; a reader's close
    /// costs nothing.
    pub fn flush(&self, fh: u64) -> Result<(), FsError> {
        if self.handles.get(fh)?.has_written() {
            self.jobs.chain().flush()?;
        }
        Ok(())
    }

    /// Releases file or directory handle `fh`.
    pub fn release(&self, fh: u64) -> Result<(), FsError> {
        self.handles.remove(fh).map(drop)
    }

    /// How many handles are open (for tests and diagnostics).
    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// `statfs` figures.
    pub fn statfs(&self) -> FsStats {
        let chain = self.jobs.chain();
        let allocated: u64 = chain
            .nodes()
            .iter()
            .map(|node| node.allocated_bytes().unwrap_or(0))
            .sum();
        let block_size = 4096;
        FsStats {
            blocks: allocated.div_ceil(u64::from(block_size)),
            free: 0,
            files: chain.nodes().len() as u64 + 8,
            block_size,
            name_max: 255,
        }
    }

    /// The answer to every request that would change the namespace.
    pub fn refuse(op: &'static str) -> FsError {
        FsError::NotPermitted { op }
    }

    fn root_child(&self, name: &str) -> Result<Inode, FsError> {
        match name {
            "active" => Ok(Inode::Active),
            "ctl" => Ok(Inode::CtlDir),
            _ => {
                let chain = self.jobs.chain();
                let node = chain.nodes().iter().find(|node| node.name() == name);
                let node = node.filter(|node| !node.hidden());
                node.map(|node| Inode::Node(node.id()))
                    .ok_or(FsError::NotFound)
            }
        }
    }

    fn root_entries(&self) -> Vec<DirEntry> {
        let chain = self.jobs.chain();
        let mut entries = dots(inode::ROOT);
        let shown = chain.nodes().iter().filter(|node| !node.hidden());
        entries.extend(shown.map(|node| DirEntry {
            ino: Inode::Node(node.id()).ino(),
            is_dir: false,
            name: node.name().to_owned(),
        }));
        entries.push(entry(Inode::Active, "active"));
        entries.push(entry(Inode::CtlDir, "ctl"));
        entries
    }

    fn open_ctl(&self, file: CtlFile, write: bool) -> Result<(Handle, Caching), FsError> {
        if write && file != CtlFile::Command {
            return Err(FsError::ReadOnly {
                what: "this ctl file",
            });
        }
        let buffer = self.renderings.open(&self.jobs, file);
        let writes = CommandWrites::default();
        Ok((
            Handle::Ctl {
                file,
                buffer,
                writes,
            },
            Caching::Direct,
        ))
    }

    fn open_node(&self, id: NodeId, write: bool) -> Result<(Handle, Caching), FsError> {
        let chain = self.jobs.chain();
        if chain.node(id).is_none_or(|node| node.hidden()) {
            return Err(FsError::NotFound);
        }
        let writable = is_writable(&chain, id, self.read_only);
        if write && !writable {
            return Err(FsError::ReadOnly {
                what: "a backing node",
            });
        }
        // The active node's file changes under other writers (`active`),
        // a commit's base under the job; another backing node's file only
        // changes when a job changes the chain, which will invalidate it.
        let job_writes = chain.node(id).is_some_and(|node| node.writable());
        let caching = if writable || job_writes {
            Caching::Direct
        } else {
            Caching::Cached
        };
        let wrote = AtomicBool::new(false);
        Ok((
            Handle::Node {
                node: id,
                chain,
                wrote,
            },
            caching,
        ))
    }

    /// The chain to read `id` through: the current one while it holds the
    /// node, else the snapshot of open handle `fh`.
    fn chain_holding(&self, id: NodeId, fh: Option<u64>) -> Result<Arc<Chain>, FsError> {
        let current = self.jobs.chain();
        if current.node(id).is_some() {
            return Ok(current);
        }
        let handle = fh.map(|fh| self.handles.get(fh)).transpose()?;
        match handle.as_deref() {
            Some(Handle::Node { node, chain, .. }) if *node == id => Ok(Arc::clone(chain)),
            _ => Err(FsError::NotFound),
        }
    }

    /// Where a read on `handle` goes. A node handle reads through the
    /// current chain while it holds the node, else through its snapshot.
    fn read_target(&self, handle: &Handle) -> Result<Target, FsError> {
        match handle {
            Handle::Node { node, chain, .. } => {
                let current = self.jobs.chain();
                let chain = if current.node(*node).is_some() {
                    current
                } else {
                    Arc::clone(chain)
                };
                Ok(Target { chain, node: *node })
            }
            Handle::Active { .. } => {
                let chain = self.jobs.chain();
                let node = chain.active().id();
                Ok(Target { chain, node })
            }
            Handle::Ctl { .. } => Err(FsError::Unsupported { what: "I/O on ctl" }),
            Handle::Dir { .. } => Err(FsError::IsDir),
        }
    }

    /// Where a write on `handle` goes: always the current chain, and only
    /// if the node is writable there now (a node that stopped being active
    /// refuses writes through older handles).
    fn write_target(&self, handle: &Handle) -> Result<Target, FsError> {
        let chain = self.jobs.chain();
        let node = match handle {
            Handle::Node { node, .. } => *node,
            Handle::Active { .. } => chain.active().id(),
            Handle::Ctl { .. } => {
                return Err(FsError::ReadOnly {
                    what: "this ctl file",
                })
            }
            Handle::Dir { .. } => return Err(FsError::IsDir),
        };
        let target = Target { chain, node };
        if !target.writable(self.read_only) {
            return Err(FsError::ReadOnly { what: "this file" });
        }
        Ok(target)
    }
}

fn decode(ino: u64) -> Result<Inode, FsError> {
    Inode::from_ino(ino).ok_or(FsError::NotFound)
}

fn ctl_mode(file: CtlFile) -> u16 {
    match file {
        CtlFile::Command => MODE_COMMAND,
        _ => MODE_READ_ONLY,
    }
}

fn entry(inode: Inode, name: &str) -> DirEntry {
    DirEntry {
        ino: inode.ino(),
        is_dir: inode.is_dir(),
        name: name.to_owned(),
    }
}

fn dots(parent: u64) -> Vec<DirEntry> {
    let dot = |ino, name: &str| DirEntry {
        ino,
        is_dir: true,
        name: name.to_owned(),
    };
    vec![dot(parent, "."), dot(inode::ROOT, "..")]
}

fn ctl_entries() -> Vec<DirEntry> {
    let mut entries = dots(inode::CTL_DIR);
    entries.extend(CtlFile::ALL.map(|file| entry(Inode::Ctl(file), file.name())));
    entries
}

/// SEEK_DATA/SEEK_HOLE in a rendered ctl buffer: all data, then EOF.
fn seek_buffer(len: u64, offset: i64, what: Seek) -> Result<u64, FsError> {
    match u64::try_from(offset) {
        Ok(pos) if pos < len => Ok(if what == Seek::Data { pos } else { len }),
        _ => Err(FsError::NoData { offset }),
    }
}

#[cfg(test)]
mod tests;
