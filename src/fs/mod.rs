//! The mount: the chain shown as a FUSE filesystem (SPEC §3).
//!
//! ```text
//! MNT/  file-A.img … file-E.img   one flat file per node
//!       active                    the active layer
//!       ctl/  command status status.json events chain
//! ```
//!
//! [`ops::FsModel`] decides everything without fuser types; [`ChainFs`] is
//! the thin `fuser::Filesystem` adapter that calls it and replies; [`Mount`]
//! sets up the kernel mount and serves it. `fs` reaches the chain only
//! through [`crate::jobs`].

pub mod attr;
pub mod ctl;
pub mod errno;
pub mod handles;
pub mod inode;
mod mount;
pub mod node_file;
mod notify;
pub mod ops;
pub mod stats;

use std::cell::RefCell;
use std::ffi::OsStr;
use std::path::Path;
use std::time::SystemTime;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

pub use errno::FsError;
pub use mount::{Mount, MountOptions, Unmounter};
pub use stats::{RequestStats, StatsSnapshot};

use crate::sync::Arc;
use attr::{Attr, Kind, TTL};
use ops::{AttrChange, Caching, FsModel};

/// The largest read or write the kernel is asked to send in one request.
pub const MAX_REQUEST: u32 = 1 << 20;

thread_local! {
    /// Each FUSE thread's read buffer, allocated and zeroed once rather
    /// than for every request (at 1 MiB, zeroing was a tenth of a
    /// sequential read's time). At most [`MAX_REQUEST`] bytes per thread.
    static READ_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Generation of every inode: inode numbers are never reused.
const GENERATION: Generation = Generation(0);

/// The `fuser::Filesystem` adapter over [`FsModel`].
#[derive(Debug)]
pub struct ChainFs {
    model: Arc<FsModel>,
    /// The mount's unmounter, settled when the session ends.
    unmounter: Unmounter,
}

impl ChainFs {
    /// Serves `model`; `unmounter` is the mount's own.
    pub fn new(model: Arc<FsModel>, unmounter: Unmounter) -> ChainFs {
        ChainFs { model, unmounter }
    }
}

/// The errno of a failed request, logged when it is a fault.
fn errno(op: &str, error: &FsError) -> Errno {
    Errno::from_i32(errno::report(op, error))
}

/// The model's attributes in fuser's form.
fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: SystemTime::UNIX_EPOCH,
        kind: match attr.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: attr::BLOCK_SIZE,
        flags: 0,
    }
}

/// Open flags for the kernel: direct I/O, with parallel direct writes so
/// writers on one file are not serialised by the kernel; or the page cache.
fn fopen_flags(caching: Caching) -> FopenFlags {
    match caching {
        Caching::Direct => FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        Caching::Cached => FopenFlags::FOPEN_KEEP_CACHE,
    }
}

fn reply_entry(reply: ReplyEntry, op: &str, result: Result<Attr, FsError>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &file_attr(&attr), GENERATION),
        Err(e) => reply.error(errno(op, &e)),
    }
}

fn reply_attr(reply: ReplyAttr, op: &str, result: Result<Attr, FsError>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
        Err(e) => reply.error(errno(op, &e)),
    }
}

fn reply_empty(reply: ReplyEmpty, op: &str, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, &e)),
    }
}

impl Filesystem for ChainFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Whole 1 MiB requests: fuser sizes max_pages from these, and asks
        // for FUSE_MAX_PAGES when the kernel has it.
        if let Err(max) = config.set_max_write(MAX_REQUEST) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(MAX_REQUEST) {
            let _ = config.set_max_readahead(max);
        }
        // Room for the kernel's readahead and async direct I/O to keep
        // every request thread busy.
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        // The session is over; fuser would otherwise unmount once more
        // after this and warn when the kernel had unmounted already.
        self.unmounter.settle();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = match name.to_str() {
            Some(name) => self.model.lookup(parent.0, name),
            None => Err(FsError::NotFound),
        };
        reply_entry(reply, "lookup", result);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.model.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(
            reply,
            "getattr",
            self.model.getattr(ino.0, fh.map(|fh| fh.0)),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange {
            size,
            mode,
            uid,
            gid,
        };
        let result = self.model.setattr(ino.0, fh.map(|fh| fh.0), change);
        reply_attr(reply, "setattr", result);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno("mknod", &FsModel::refuse("mknod")));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno("mkdir", &FsModel::refuse("mkdir")));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno("unlink", &FsModel::refuse("unlink")));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno("rmdir", &FsModel::refuse("rmdir")));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(errno("symlink", &FsModel::refuse("symlink")));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(errno("rename", &FsModel::refuse("rename")));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(errno("link", &FsModel::refuse("link")));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(errno("create", &FsModel::refuse("create")));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.model.open(ino.0, write) {
            Ok(opened) => reply.opened(FileHandle(opened.fh), fopen_flags(opened.caching)),
            Err(e) => reply.error(errno("open", &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        READ_BUFFER.with_borrow_mut(|buf| match self.model.read(fh.0, offset, size, buf) {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(errno("read", &e)),
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // A request is at most MAX_REQUEST bytes, so the count fits a u32.
        match self.model.write(fh.0, offset, data) {
            Ok(written) => reply.written(u32::try_from(written).unwrap_or(u32::MAX)),
            Err(e) => reply.error(errno("write", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, "flush", self.model.flush(fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, "release", self.model.release(fh.0));
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        reply_empty(reply, "fsync", self.model.fsync(fh.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.model.readdir(fh.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno("readdir", &e)),
        };
        for (next, entry) in (offset + 1..).zip(entries) {
            let kind = if entry.is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(entry.ino), next, kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, "releasedir", self.model.release(fh.0));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.model.statfs();
        reply.statfs(
            s.blocks,
            s.free,
            s.free,
            s.files,
            0,
            s.block_size,
            s.name_max,
            s.block_size,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.model.fallocate(fh.0, offset, length, mode);
        reply_empty(reply, "fallocate", result);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.model.lseek(fh.0, offset, whence) {
            Ok(found) => reply.offset(found),
            Err(e) => reply.error(errno("lseek", &e)),
        }
    }
}
