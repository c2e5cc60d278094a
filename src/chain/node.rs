//! One node of the chain: an open image with its name, path and the backing
//! pointer its header holds.
//!
//! A [`Node`] is one chain's view of an image; the open image itself (file,
//! lock, caches) is shared, so that when a job changes the chain, the new
//! chain and the old one that open handles still read through use the same
//! image.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::bitmap::{Bits, Kind, Loaded, NodeBitmaps};
use super::track::{BeforeWrite, Hooks, WriteHook};
use super::ChainError;
use crate::format::{BackingRef, Format, Image, StoreRefusal};
use crate::storage::lock::relock;
use crate::storage::{FileStorage, LockMode, Storage};
use crate::sync::{self, Arc, Mutex};

/// Identifies a node for as long as it is in the chain. Ids are never
/// reused, so a stale id cannot reach a different node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One image of the chain.
#[derive(Clone, Debug)]
pub struct Node {
    id: NodeId,
    name: String,
    path: PathBuf,
    canonical: PathBuf,
    /// The backing pointer as this chain knows it.
    backing: Option<BackingRef>,
    open: Arc<OpenImage>,
}

/// An open image, shared by every chain that shows it.
#[derive(Debug)]
struct OpenImage {
    image: Image,
    /// The image file, whose descriptor holds the node's lock.
    file: Arc<FileStorage>,
    /// The lock the descriptor holds now.
    lock: Mutex<LockMode>,
    writable: AtomicBool,
    /// Hidden from the mount (an intermediate of a commit): reads of the
    /// node itself fail, through every chain version.
    hidden: AtomicBool,
    /// Told of every write to the image, once it landed.
    hooks: Hooks<dyn WriteHook>,
    /// Told of every write to the image, before it lands.
    before: Hooks<dyn BeforeWrite>,
    /// The image's dirty bitmaps, which record its writes.
    bitmaps: NodeBitmaps,
}

impl Node {
    /// Wraps an open image. `path` is the absolute path by which the chain
    /// reached the image; `canonical` the same with symlinks resolved.
    pub(super) fn new(
        id: NodeId,
        name: String,
        path: PathBuf,
        canonical: PathBuf,
        image: Image,
        file: Arc<FileStorage>,
        lock: LockMode,
    ) -> Node {
        let backing = image.backing();
        let open = OpenImage {
            image,
            file,
            writable: AtomicBool::new(lock == LockMode::Write),
            lock: Mutex::new(lock),
            hidden: AtomicBool::new(false),
            hooks: Hooks::default(),
            before: Hooks::default(),
            bitmaps: NodeBitmaps::default(),
        };
        Node {
            id,
            name,
            path,
            canonical,
            backing,
            open: Arc::new(open),
        }
    }

    /// The same node after its header was given a new backing pointer.
    pub(super) fn with_backing(&self, backing: Option<BackingRef>) -> Node {
        Node {
            backing,
            ..self.clone()
        }
    }

    /// The same open image as another node of a chain: a mirror's target
    /// joining the mounted chain at its pivot.
    pub(super) fn with_identity(&self, id: NodeId, name: String) -> Node {
        Node {
            id,
            name,
            ..self.clone()
        }
    }

    /// Whether the node's image takes writes now.
    pub fn writable(&self) -> bool {
        self.open.writable.load(Ordering::Acquire)
    }

    /// Lets the node take writes, or stops it: relocks its descriptor as
    /// QEMU's file driver would (write, or shared reading) and switches the
    /// image in place. Refused when another process holds the image, when
    /// the chain takes no locks (`--force-share`), or when the file could
    /// only be opened read-only.
    pub fn set_writable(&self, writable: bool) -> Result<(), ChainError> {
        let mut lock = sync::lock(&self.open.lock);
        let switched = self.writable() != writable;
        if *lock == LockMode::None || !self.open.file.is_writable() {
            return Err(ChainError::ReadOnly {
                node: self.name.clone(),
            });
        }
        let wanted = if writable {
            LockMode::Write
        } else {
            LockMode::Read
        };
        if writable {
            self.relock(&mut lock, wanted)?;
            if let Err(source) = self.open.image.set_writable(true) {
                // Give the write lock back: the node stays as it was.
                self.relock(&mut lock, LockMode::Read)?;
                return Err(self.error(source));
            }
        } else {
            // Going read-only stores the image's bitmaps: with the bits
            // recorded here, not those the engine had when they were taken.
            self.put_persistent_bitmaps();
            self.open
                .image
                .set_writable(false)
                .map_err(|e| self.error(e))?;
            self.relock(&mut lock, wanted)?;
        }
        self.open.writable.store(writable, Ordering::Release);
        drop(lock);
        if switched {
            self.reload_persistent_bitmaps(writable);
        }
        Ok(())
    }

    /// After the node switched: a writable image has loaded its bitmaps
    /// afresh, so the node takes them over again (a disabled bitmap changed
    /// from now on is stored at close); a read-only one keeps them as
    /// stored, unchanged from now on.
    fn reload_persistent_bitmaps(&self, writable: bool) {
        {
            let mut loaded = sync::lock(&self.open.bitmaps.loaded);
            if *loaded == Loaded::Taken || writable {
                *loaded = Loaded::ReadOnly;
            }
        }
        if writable {
            if let Err(err) = self.take_persistent_bitmaps() {
                // The engine keeps recording the enabled ones itself.
                log::warn!("persistent bitmaps of {}: {err}", self.name);
            }
        }
    }

    /// Whether the node is hidden from the mount (see [`Node::set_hidden`]).
    pub fn hidden(&self) -> bool {
        self.open.hidden.load(Ordering::Acquire)
    }

    /// Hides the node: its own content stops being readable (EIO) through
    /// every version of the chain, while nodes above still read through it.
    pub fn set_hidden(&self) {
        self.open.hidden.store(true, Ordering::Release);
    }

    /// Calls `hook` after every write to this node's image, from now on.
    pub fn add_write_hook(&self, hook: Arc<dyn WriteHook>) {
        self.open.hooks.add(hook);
    }

    /// Stops calling `hook`.
    pub fn remove_write_hook(&self, hook: &Arc<dyn WriteHook>) {
        self.open.hooks.remove(hook);
    }

    /// Calls `hook` before every write to this node's image, from now on.
    pub fn add_before_write_hook(&self, hook: Arc<dyn BeforeWrite>) {
        self.open.before.add(hook);
    }

    /// Stops calling `hook`.
    pub fn remove_before_write_hook(&self, hook: &Arc<dyn BeforeWrite>) {
        self.open.before.remove(hook);
    }

    /// Tells the before-write hooks that `offset..offset + len` is about
    /// to be written.
    pub(super) fn before_write(&self, offset: u64, len: u64) {
        self.open.before.each(|hook| hook.before_write(offset, len));
    }

    /// Tells the hooks that `offset..offset + len` was written.
    pub(super) fn written(&self, offset: u64, len: u64) {
        self.open.bitmaps.record(offset, len);
        self.open.hooks.each(|hook| hook.written(offset, len));
    }

    /// The dirty bitmaps of the node's image.
    pub fn bitmaps(&self) -> &NodeBitmaps {
        &self.open.bitmaps
    }

    fn relock(&self, lock: &mut LockMode, to: LockMode) -> Result<(), ChainError> {
        relock(self.open.file.file(), &self.path, *lock, to).map_err(|source| {
            ChainError::Lock {
                path: self.path.clone(),
                source,
            }
        })?;
        *lock = to;
        Ok(())
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The node's unique file name in the mount (see [`super::naming`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The absolute path of the image, as the chain reached it: the top as
    /// given, a backing file joined to the directory of the image naming it
    /// (`..` kept, as `qemu-img info` shows it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's path with symlinks and `..` resolved.
    pub fn canonical_path(&self) -> &Path {
        &self.canonical
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        self.open.image.format()
    }

    /// The open image.
    pub fn image(&self) -> &Image {
        &self.open.image
    }

    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.open.image.virtual_size()
    }

    /// The cluster size, for formats that have one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.open.image.cluster_size()
    }

    /// The backing file name exactly as stored in the image header.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing.as_ref().map(|backing| backing.file.as_str())
    }

    /// The backing format as stored in the header extension; `None` when the
    /// image has no such extension (the format was probed).
    pub fn backing_format(&self) -> Option<Format> {
        self.backing.as_ref().and_then(|backing| backing.format)
    }

    /// Bytes of host storage this node's own image occupies.
    pub fn allocated_bytes(&self) -> Result<u64, ChainError> {
        self.open
            .image
            .allocated_bytes()
            .map_err(|source| self.error(source))
    }

    /// Wraps a format error with this node's path.
    pub(super) fn error(&self, source: crate::format::FormatError) -> ChainError {
        ChainError::Image {
            path: self.path.clone(),
            source,
        }
    }
}

/// Persistent dirty bitmaps: the node's [`NodeBitmaps`] takes them over
/// from the qcow2 engine and gives their bits back before close; a node that
/// takes no writes only reads them, to list them.
impl Node {
    /// Takes the image's persistent bitmaps into the node's bitmaps: taken
    /// over from the engine (which stops recording them) when the node takes
    /// writes, once per time it became writable; read as stored otherwise,
    /// once. Nothing for a raw image.
    pub fn take_persistent_bitmaps(&self) -> Result<(), ChainError> {
        let Image::Qcow2(qcow2) = self.image() else {
            return Ok(());
        };
        let mut loaded = sync::lock(&self.open.bitmaps.loaded);
        let (stored, now) = match (*loaded, self.writable()) {
            (Loaded::Taken, true) | (Loaded::ReadOnly, false) => return Ok(()),
            (_, true) => (qcow2.take_bitmaps(), Loaded::Taken),
            (_, false) => (qcow2.peek_bitmaps(), Loaded::ReadOnly),
        };
        let size = self.virtual_size() & !511;
        for stored in stored.map_err(|e| self.error(e))? {
            let granularity = 1u64 << stored.granularity_bits;
            let bits = Bits::from_bytes(granularity, size, &stored.data);
            let kind = if stored.inconsistent {
                Kind::Inconsistent
            } else {
                Kind::Persistent
            };
            self.open
                .bitmaps
                .load_stored(&stored.name, bits, stored.enabled, kind);
        }
        *loaded = now;
        Ok(())
    }

    /// Whether a persistent bitmap `name` of `granularity` could be stored
    /// in the image, by QEMU's rules (a raw image stores none).
    pub fn can_store_bitmap(&self, name: &str, granularity: u64) -> Result<(), StoreRefusal> {
        match self.image() {
            Image::Qcow2(qcow2) => qcow2.can_store_bitmap(name, granularity.trailing_zeros()),
            Image::Raw(_) => Err(StoreRefusal::Invalid(
                "a raw image stores no bitmaps".into(),
            )),
        }
    }

    /// Adds a persistent bitmap: in the image at once, `in_use` until close.
    pub fn add_persistent_bitmap(
        &self,
        name: &str,
        granularity: u64,
        enabled: bool,
    ) -> Result<(), ChainError> {
        self.take_persistent_bitmaps()?;
        let Image::Qcow2(qcow2) = self.image() else {
            return Err(ChainError::ReadOnly {
                node: self.name.clone(),
            });
        };
        let bits = granularity.trailing_zeros() as u8;
        qcow2
            .add_bitmap(name, bits, enabled)
            .map_err(|e| self.error(e))?;
        let bits = Bits::new(granularity, self.virtual_size() & !511);
        // The name was checked free under the command's serialisation.
        let _ = self.open.bitmaps.add(name, bits, enabled, Kind::Persistent);
        Ok(())
    }

    /// Removes a bitmap stored in the image from the image.
    pub fn remove_persistent_bitmap(&self, name: &str) -> Result<(), ChainError> {
        if let Image::Qcow2(qcow2) = self.image() {
            qcow2.remove_bitmap(name).map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    /// Gives the bits of the persistent bitmaps back to the image, for its
    /// close to store.
    pub(super) fn put_persistent_bitmaps(&self) {
        self.open.put_persistent_bitmaps();
    }
}

impl OpenImage {
    fn put_persistent_bitmaps(&self) {
        if let Image::Qcow2(qcow2) = &self.image {
            for (name, data, enabled) in self.bitmaps.persistent() {
                qcow2.put_bitmap(&name, &data, enabled);
            }
        }
    }
}

impl Drop for OpenImage {
    /// An image dropped without a close (a chain still shared at unmount)
    /// closes itself and stores its bitmaps: with the bits recorded here.
    fn drop(&mut self) {
        self.put_persistent_bitmaps();
    }
}
