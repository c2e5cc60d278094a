//! qcow2 images, versions 2 and 3, as `docs/interop/qcow2.txt` in QEMU
//! describes them.
//!
//! # Concurrency
//!
//! Reads take no exclusive lock: they look up the mapping (L1 under a
//! shared lock, the L2 table from the sharded [`cache::TableCache`]) and do
//! the data I/O with only a shared `inflight` guard held. In-place writes
//! of clusters owned outright do the same with a shared `overwrites` guard.
//! A change of L2 entries first takes the guest clusters it changes in
//! `clusters` ([`inflight::ClusterLocks`]), then `meta` only to look up,
//! allocate and publish: its data I/O (copy-on-write reads, the data write)
//! runs with no lock but its clusters held.
//!
//! Lock order: `clusters` → `meta` → `inflight` or `overwrites` → `l1` →
//! cache shards. Neither guard is held while waiting for `meta` or
//! `clusters`. Applying deferred frees takes `inflight`, then
//! `overwrites`, exclusively for an instant each, to wait until no request
//! still uses a mapping read before the frees' entries changed, and frees
//! (refcounts, hole punches) without them: a reader waits at most for
//! other reads in flight, never for a write or a free.

pub(super) mod alloc;
pub(super) mod bitmaps;
pub(super) mod cache;
pub(super) mod compress;
pub(super) mod create;
pub(super) mod features;
pub(super) mod header;
pub(super) mod l2;
pub(super) mod refcount;
pub(super) mod repair;
pub(super) mod snapshots;
pub(super) mod types;

mod inflight;
mod meta;
mod populate;
mod read;
mod write;
mod zero;

use std::ffi::OsString;
use std::ops::Range;
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use self::alloc::Allocator;
use self::bitmaps::Bitmaps;
use self::cache::TableCache;
use self::features::{Autoclear, Incompatible};
use self::header::{CompressionType, Header};
use self::inflight::{ClusterGuard, ClusterLocks};
use self::l2::{L2Entry, L2Table, L1_COPIED, L1_OFFSET_MASK};
use self::meta::Meta;
use self::types::Geometry;
use super::{BackingRef, FileOpener, Format, FormatError, OpenOptions, Result};
use crate::format::error::IoContext;
use crate::storage::Storage;
use crate::sync::{self, Arc, Mutex, RwLock};

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    storage: Arc<dyn Storage>,
    /// The external data file, when guest data lives outside the image.
    data_file: Option<Arc<dyn Storage>>,
    geometry: Geometry,
    version: u32,
    size: u64,
    compression: CompressionType,
    writable: AtomicBool,
    corrupt: bool,
    l1_offset: u64,
    l1: RwLock<Vec<u64>>,
    /// L2 tables by host offset, in the mount's shared cache.
    l2_cache: TableCache<L2Table>,
    /// Decompressed clusters by compressed descriptor, in the same cache:
    /// sequential reads of a compressed image read each cluster once.
    decompressed: TableCache<Vec<u8>>,
    /// One past the highest host byte that may hold metadata or data.
    host_end: AtomicU64,
    /// Guest clusters whose L2 entries are being changed.
    clusters: ClusterLocks,
    meta: Mutex<Meta>,
    /// Held shared by reads across their lookup and data I/O.
    inflight: RwLock<()>,
    /// Held shared by in-place writes across their lookup and data I/O.
    overwrites: RwLock<()>,
    closed: AtomicBool,
    /// Persistent dirty bitmaps that writes must keep up to date; loaded
    /// whenever the image becomes writable.
    bitmaps: RwLock<Option<Bitmaps>>,
}

impl Qcow2 {
    /// Opens a qcow2 image on `storage`; `opener` opens its external data
    /// file, if it names one.
    pub fn open(
        storage: Arc<dyn Storage>,
        options: &OpenOptions,
        opener: FileOpener<'_>,
    ) -> Result<Qcow2> {
        let file_len = storage.len().io("measure the image file")?;
        let mut header = Header::read(storage.as_ref())?;
        header.validate(file_len)?;
        let geometry = header.geometry();
        // The data file can take writes whenever the image file can, so that
        // writes can be enabled in place later.
        let data_file = open_data_file(&header, storage.is_writable(), opener)?;
        let corrupt = header.incompatible.contains(Incompatible::CORRUPT);
        if options.writable && !corrupt && header.incompatible.contains(Incompatible::DIRTY) {
            // Before the L1 table and the allocator are loaded: the repair
            // may fix COPIED flags and moves the refcount table.
            repair::repair(storage.as_ref(), &mut header, &geometry)?;
        }
        // The repair may have grown the file.
        let file_len = storage.len().io("measure the image file")?;
        let l1 = read_l1(storage.as_ref(), &header)?;
        let allocator = Allocator::open(
            storage.as_ref(),
            geometry,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            options.cache.hold(),
        )?;
        let cluster_size = geometry.cluster_size();
        let image = Qcow2 {
            data_file,
            geometry,
            version: header.version,
            // QEMU shows whole sectors only: a size of 1000 bytes reads as 512.
            size: header.size & !511,
            compression: header.compression_type,
            writable: AtomicBool::new(options.writable),
            corrupt,
            l1_offset: header.l1_table_offset,
            l1: RwLock::new(l1),
            l2_cache: TableCache::new(options.cache.region(), cluster_size),
            decompressed: TableCache::new(options.cache.region(), cluster_size),
            host_end: AtomicU64::new(file_len),
            clusters: ClusterLocks::default(),
            meta: Mutex::new(Meta::new(header, allocator)),
            inflight: RwLock::new(()),
            overwrites: RwLock::new(()),
            closed: AtomicBool::new(!options.writable),
            bitmaps: RwLock::new(None),
            storage,
        };
        if options.writable && !corrupt {
            image.prepare_for_writing(&mut sync::lock(&image.meta))?;
        }
        Ok(image)
    }

    /// Brings the header into the state a writer must leave it in: dirty
    /// refcounts repaired, autoclear bits that chainfs does not maintain
    /// cleared (qcow2.txt: a writer that does not understand them must).
    fn prepare_for_writing(&self, meta: &mut Meta) -> Result<()> {
        // A writable open repaired the dirty bit before the allocator read
        // any refcount; an image switched to writable later was not, and
        // must not be written on stale refcounts.
        if meta.header().incompatible.contains(Incompatible::DIRTY) {
            return Err(FormatError::Unsupported {
                what: "taking writes in place on an image with the dirty bit set \
                       (open it as the active image to repair it)"
                    .into(),
            });
        }
        *sync::write(&self.bitmaps) = Bitmaps::load(self.storage.as_ref(), meta, &self.geometry)?;
        // Bitmaps that load accepted are kept true: enabled ones record
        // every write, the others are left untouched.
        let autoclear = meta.header().autoclear;
        let kept = autoclear & (Autoclear::MAINTAINED | Autoclear::BITMAPS);
        if kept != autoclear {
            meta.write_header(self.storage.as_ref(), |header| header.autoclear = kept)?;
        }
        Ok(())
    }

    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }

    /// The cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The backing file named in the header, if any, its name shown with
    /// any bytes that are not UTF-8 replaced.
    pub fn backing(&self) -> Option<BackingRef> {
        let mut meta = sync::lock(&self.meta);
        let header = meta.header();
        let file = String::from_utf8_lossy(header.backing_file.as_deref()?).into_owned();
        let format = header.backing_format.as_deref().and_then(Format::from_name);
        Some(BackingRef { file, format })
    }

    /// The backing file name exactly as the header stores it, UTF-8 or
    /// not, to find the file by.
    pub fn backing_name(&self) -> Option<OsString> {
        let name = sync::lock(&self.meta).header().backing_file.clone()?;
        Some(OsString::from_vec(name))
    }

    /// Bytes of host storage used by the image file and its data file.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let data = match &self.data_file {
            Some(file) => file.allocated_bytes().io("measure the data file")?,
            None => 0,
        };
        Ok(self
            .storage
            .allocated_bytes()
            .io("measure the image file")?
            + data)
    }

    /// Where guest data lives: the external data file or the image itself.
    fn data(&self) -> &dyn Storage {
        self.data_file.as_deref().unwrap_or(self.storage.as_ref())
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(FormatError::OutOfBounds {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// The L2 table holding the entry for guest `offset`, if one is allocated,
    /// with its host offset.
    fn l2_table_for(&self, guest: u64) -> Result<Option<(u64, Arc<L2Table>)>> {
        let index = self.geometry.l1_index(guest) as usize;
        let entry = sync::read(&self.l1).get(index).copied().unwrap_or(0);
        let offset = entry & L1_OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        Ok(Some((offset, self.load_l2(offset)?)))
    }

    fn load_l2(&self, offset: u64) -> Result<Arc<L2Table>> {
        let cluster_size = self.geometry.cluster_size();
        if offset & (cluster_size - 1) != 0 {
            return Err(FormatError::malformed_at(
                "L2 table",
                offset,
                "is not cluster aligned (an L1 entry points to it)",
            ));
        }
        if offset + cluster_size > self.host_end.load(Ordering::Acquire) {
            return Err(FormatError::malformed_at(
                "L2 table",
                offset,
                "lies past the end of the image file",
            ));
        }
        self.l2_cache.get_or_load(offset, || {
            let mut bytes = vec![0u8; cluster_size as usize];
            self.storage
                .read_at(&mut bytes, offset)
                .io_at("read an L2 table", offset)?;
            Ok(L2Table::from_bytes(&bytes, self.geometry.extended_l2))
        })
    }

    /// The decoded L2 entry for the cluster holding guest `offset`.
    fn l2_entry(&self, guest: u64) -> Result<L2Entry> {
        match self.l2_table_for(guest)? {
            None => Ok(L2Entry::Unallocated),
            Some((_, table)) => table.entry(&self.geometry, self.geometry.l2_index(guest)),
        }
    }

    /// Starts the writeback of what was written, data file included (see
    /// [`Image::start_writeback`](crate::format::Image::start_writeback)).
    pub fn start_writeback(&self) -> Result<()> {
        if let Some(data_file) = &self.data_file {
            data_file
                .start_writeback()
                .io("start the writeback of the data file")?;
        }
        self.storage
            .start_writeback()
            .io("start the writeback of the image")
    }

    /// Makes every completed write durable, then applies deferred frees.
    pub fn flush(&self) -> Result<()> {
        if !self.writable.load(Ordering::Acquire) {
            return Ok(());
        }
        self.sync_then_free()
    }

    /// Syncs data and metadata, then drops the references that the synced
    /// metadata no longer holds. The sync runs without the metadata lock,
    /// so writers go on allocating meanwhile: only the frees recorded
    /// before it started are applied, as only their entries' rewrites are
    /// known to be covered by it (a free is recorded after the rewrite).
    fn sync_then_free(&self) -> Result<()> {
        let covered = sync::lock(&self.meta).allocator.frees_recorded();
        self.sync_files()?;
        self.apply_frees(&mut sync::lock(&self.meta), covered)
    }

    /// [`Qcow2::sync_then_free`] for a caller that holds the metadata
    /// lock: every free recorded so far is covered.
    fn sync_and_free(&self, meta: &mut Meta) -> Result<()> {
        let covered = meta.allocator.frees_recorded();
        self.sync_files()?;
        self.apply_frees(meta, covered)
    }

    fn sync_files(&self) -> Result<()> {
        if let Some(data_file) = &self.data_file {
            data_file.sync().io("sync the data file")?;
        }
        self.storage.sync().io("sync the image")
    }

    /// Applies the deferred frees recorded before `covered`, which a sync
    /// has made safe.
    fn apply_frees(&self, meta: &mut Meta, covered: u64) -> Result<()> {
        if !meta.allocator.has_frees_before(covered) {
            return Ok(());
        }
        // Wait until no request still uses a mapping read before the
        // entries changed; later ones cannot reach these clusters. Readers
        // wait only for that instant (and only for reads), not for the
        // writes or the frees below.
        drop(sync::write(&self.inflight));
        drop(sync::write(&self.overwrites));
        let freed = meta.allocator.apply_frees(self.storage.as_ref(), covered);
        meta.packing
            .forget_freed(freed.as_deref().ok(), self.geometry.cluster_size());
        let freed = freed?;
        for &host in &freed {
            self.l2_cache.remove(host);
            // The space is free: give it back to the host filesystem.
            self.storage
                .punch_hole(host, self.geometry.cluster_size())
                .io_at("free a cluster", host)?;
        }
        Ok(())
    }

    /// Takes the guest clusters that `offset..offset + len` touches, for a
    /// change of their L2 entries (see [`inflight`]).
    fn lock_clusters(&self, offset: u64, len: u64) -> ClusterGuard<'_> {
        self.clusters.lock(self.cluster_span(offset, len))
    }

    /// The indexes of the guest clusters that `offset..offset + len` touches.
    fn cluster_span(&self, offset: u64, len: u64) -> Range<u64> {
        let bits = self.geometry.cluster_bits;
        let end = offset + len.max(1);
        (offset >> bits)..((end - 1) >> bits) + 1
    }

    /// Flushes and returns reserved clusters, leaving no leaks. Idempotent.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.sync_then_free()?;
        let mut meta = sync::lock(&self.meta);
        self.store_bitmaps(&mut meta)?;
        let released = meta.allocator.release_reserve(self.storage.as_ref())?;
        self.storage.sync().io("sync the image")?;
        self.trim_released_tail(&released)
    }

    /// Shortens the file by the reserved clusters just released at its end,
    /// so a clean close leaves no unused tail. Their refcounts are zero on
    /// disk already: a crash before the truncation leaves a longer file, not
    /// a wrong one. With an external data file, host offsets point into
    /// that file: this one is left as it is.
    fn trim_released_tail(&self, released: &[u64]) -> Result<()> {
        if self.data_file.is_some() {
            return Ok(());
        }
        let len = self.storage.len().io("read the image's length")?;
        let mut end = len;
        for &host in released.iter().rev() {
            if host + self.geometry.cluster_size() != end {
                break;
            }
            end = host;
        }
        if end < len {
            self.storage
                .set_len(end)
                .io_at("trim the unused end of the image", end)?;
            self.storage.sync().io("sync the image")?;
        }
        Ok(())
    }

    /// Opens the image for writing, or back to read-only, in place: the same
    /// file, the same caches, so every reader keeps seeing one image (a
    /// commit's base shows the merge as it happens). Enabling does what a
    /// writable open does to the header; disabling first flushes and
    /// returns reserved clusters, as a close does. The caller makes sure no
    /// write is in flight while writes are disabled.
    pub fn set_writable(&self, writable: bool) -> Result<()> {
        if writable == self.writable.load(Ordering::Acquire) {
            return Ok(());
        }
        if !writable {
            self.close()?;
            self.writable.store(false, Ordering::Release);
            return Ok(());
        }
        let files_writable = self.storage.is_writable()
            && self
                .data_file
                .as_ref()
                .is_none_or(|file| file.is_writable());
        if !files_writable {
            return Err(FormatError::ReadOnly);
        }
        if self.corrupt {
            return Err(FormatError::Corrupt);
        }
        self.prepare_for_writing(&mut sync::lock(&self.meta))?;
        self.closed.store(false, Ordering::Release);
        self.writable.store(true, Ordering::Release);
        Ok(())
    }

    /// Rewrites the backing file name and format in the header.
    pub fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        self.check_writable()?;
        sync::lock(&self.meta).write_header(self.storage.as_ref(), |header| {
            header.backing_file = backing.map(|b| b.file.clone().into_bytes());
            header.backing_format = backing.and_then(|b| b.format).map(|f| f.name().to_string());
        })
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable.load(Ordering::Acquire) {
            return Err(FormatError::ReadOnly);
        }
        if self.corrupt {
            return Err(FormatError::Corrupt);
        }
        Ok(())
    }

    /// Writes L1 entry `index`, through to disk first.
    fn set_l1_entry(&self, index: u64, value: u64) -> Result<()> {
        let at = self.l1_offset + index * 8;
        self.storage
            .write_at(&value.to_be_bytes(), at)
            .io_at("write an L1 entry", at)?;
        sync::write(&self.l1)[index as usize] = value;
        Ok(())
    }

    /// The L1 entry for guest `offset`, with its COPIED flag.
    fn l1_entry(&self, guest: u64) -> Result<(u64, u64, bool)> {
        let index = self.geometry.l1_index(guest);
        let entry = sync::read(&self.l1)
            .get(index as usize)
            .copied()
            .ok_or_else(|| {
                FormatError::malformed(
                    "L1 table",
                    format!("guest offset {guest:#x} lies beyond it"),
                )
            })?;
        Ok((index, entry & L1_OFFSET_MASK, entry & L1_COPIED != 0))
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Err(err) = self.close() {
            log::error!("closing a qcow2 image failed: {err}");
        }
    }
}

fn open_data_file(
    header: &Header,
    writable: bool,
    opener: FileOpener<'_>,
) -> Result<Option<Arc<dyn Storage>>> {
    if !header
        .incompatible
        .contains(Incompatible::EXTERNAL_DATA_FILE)
    {
        return Ok(None);
    }
    let name = header.data_file.as_deref().ok_or_else(|| {
        FormatError::malformed(
            "header",
            "the external data file bit is set but no data file is named",
        )
    })?;
    let storage = opener(name, writable).map_err(|source| FormatError::DataFile {
        name: name.to_string(),
        source,
    })?;
    Ok(Some(storage))
}

fn read_l1(storage: &dyn Storage, header: &Header) -> Result<Vec<u64>> {
    let mut bytes = vec![0u8; header.l1_size as usize * 8];
    storage
        .read_at(&mut bytes, header.l1_table_offset)
        .io_at("read the L1 table", header.l1_table_offset)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|w| u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .collect())
}
