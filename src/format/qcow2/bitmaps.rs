//! Persistent dirty bitmaps (`docs/interop/qcow2.txt`, "Bitmaps"), kept in
//! step with guest writes as QEMU keeps them, so that incremental backups
//! taken from them stay correct.
//!
//! The bitmaps header extension (24 bytes) points to the bitmap directory:
//!
//! ```text
//!  0 ..  3  nb_bitmaps               1 ..= 65535
//!  4 ..  7  reserved                 zero
//!  8 .. 15  bitmap_directory_size    bytes, at most 64 MiB (QEMU's limit)
//! 16 .. 23  bitmap_directory_offset  cluster aligned
//! ```
//!
//! The directory is a contiguous run of entries, each 8-byte aligned:
//!
//! ```text
//!  0 ..  7  bitmap_table_offset  cluster aligned
//!  8 .. 11  bitmap_table_size    entries in the bitmap table
//! 12 .. 15  flags                bit 0 in_use, bit 1 auto (enabled),
//!                                bit 2 extra_data_compatible; others reserved
//!      16   type                 1: dirty tracking bitmap
//!      17   granularity_bits     QEMU accepts 9 ..= 31
//! 18 .. 19  name_size            1 ..= 1023
//! 20 .. 23  extra_data_size      QEMU refuses any extra data
//!           extra data, name, zero padding to a multiple of 8
//! ```
//!
//! A bitmap table (contiguous) maps each cluster of bitmap data: `0` reads
//! as all zeros, `1` as all ones, anything else is the offset of a data
//! cluster. Bit `n` of the bitmap (guest bytes `n << granularity_bits` and
//! on) is bit `n % 8` of byte `n / 8` of the data.
//!
//! # Life cycle on a writable open (QEMU's `qcow2_load_dirty_bitmaps` and
//! `qcow2_store_persistent_dirty_bitmaps`)
//!
//! * [`Bitmaps::load`]: each enabled (`auto`) bitmap that is not `in_use`
//!   is read into memory and marked `in_use` on disk before the first guest
//!   write, so a crash leaves it inconsistent, never wrong.
//! * [`Bitmaps::record`]: every write and write-zeroes sets its granules.
//! * [`Bitmaps::store`] on close: the bits go to new clusters, a new
//!   directory with `in_use` cleared is published by one header write, and
//!   the old clusters are freed after that is durable.
//!
//! A bitmap already `in_use` at open is inconsistent (QEMU refuses to use
//! it) and a disabled one records nothing: both are left exactly as found.
//!
//! Lock order: the image's `meta` lock, then its `bitmaps` lock, then
//! [`Bitmaps`]' own lock, which is a leaf: nothing else is taken while it
//! is held.

use std::collections::BTreeSet;
use std::fmt;

use super::alloc::Allocator;
use super::features::Autoclear;
use super::meta::Meta;
use super::types::{Geometry, HostOffset};
use super::Qcow2;
use crate::format::error::IoContext;
use crate::format::{FormatError, Result};
use crate::storage::Storage;
use crate::sync::{self, Mutex};

mod admit;
mod directory;
mod runtime;
mod stored;

pub use admit::StoreRefusal;
pub use directory::*;
use directory::{be64, check_in_file, malformed};
pub use runtime::PersistentBitmap;

/// One cluster's worth of bitmap data in memory.
enum Chunk {
    Zeros,
    Ones,
    /// A cluster of bitmap data; bits past the end of the bitmap are zero.
    Bits(Box<[u8]>),
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Chunk::Zeros => "Zeros",
            Chunk::Ones => "Ones",
            Chunk::Bits(_) => "Bits",
        })
    }
}

/// An enabled bitmap held in memory while the image is open.
#[derive(Debug)]
struct Tracked {
    /// Its index in the directory.
    entry: usize,
    granularity_bits: u32,
    /// Bits of the whole bitmap: one per granule of the virtual disk.
    bits: u64,
    /// One per bitmap table entry.
    chunks: Vec<Chunk>,
    /// Clusters of its table and data on disk now, freed when replaced.
    clusters: Vec<u64>,
}

/// What [`Bitmaps`] guards with its lock.
#[derive(Debug)]
struct State {
    extension: Extension,
    /// The directory as on disk now.
    directory: Vec<DirEntry>,
    tracked: Vec<Tracked>,
    /// The bits are kept by the chain layer ([`Bitmaps::take`]): writes
    /// are recorded there, not here.
    external: bool,
}

/// The persistent bitmaps of an image open for writing; see the module doc.
#[derive(Debug)]
pub struct Bitmaps {
    cluster_size: u64,
    /// The virtual disk size bitmaps cover (whole sectors, as QEMU).
    disk: u64,
    state: Mutex<State>,
}

impl Bitmaps {
    /// On a writable open: validates the bitmaps, loads the enabled,
    /// consistent ones and marks them `in_use` on disk (synced). `None` when
    /// there is nothing to record: no bitmaps, none enabled and consistent,
    /// or the autoclear bit says a writer without bitmap support has
    /// invalidated them all (QEMU then ignores the extension too).
    pub(super) fn load(
        storage: &dyn Storage,
        meta: &mut Meta,
        geometry: &Geometry,
    ) -> Result<Option<Bitmaps>> {
        let bitmaps = Bitmaps::load_directory(storage, meta, geometry)?;
        let tracking = !sync::lock(&bitmaps.state).tracked.is_empty();
        Ok(tracking.then_some(bitmaps))
    }

    /// [`Bitmaps::load`], but also when nothing is tracked (no extension:
    /// an empty directory).
    pub(super) fn load_directory(
        storage: &dyn Storage,
        meta: &mut Meta,
        geometry: &Geometry,
    ) -> Result<Bitmaps> {
        let (sizes, stored) = stored::read_directory(storage, meta, geometry)?;
        let empty = Bitmaps {
            cluster_size: sizes.cluster,
            disk: sizes.disk,
            state: Mutex::new(State {
                extension: Extension::NONE,
                directory: Vec::new(),
                tracked: Vec::new(),
                external: false,
            }),
        };
        let Some((extension, mut directory)) = stored else {
            return Ok(empty);
        };
        let tracked = load_tracked(storage, &directory, sizes, DirEntry::is_tracked)?;
        if !tracked.is_empty() {
            for bitmap in &tracked {
                directory[bitmap.entry].flags.insert(BitmapFlags::IN_USE);
            }
            mark_in_use(storage, meta, &extension, &directory)?;
        }
        *sync::lock(&empty.state) = State {
            extension,
            directory,
            tracked,
            external: false,
        };
        Ok(empty)
    }

    /// Marks guest `offset..offset + len` dirty in every tracked bitmap.
    pub fn record(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut state = sync::lock(&self.state);
        if state.external {
            return;
        }
        for bitmap in &mut state.tracked {
            bitmap.set_range(offset, len, self.cluster_size);
        }
    }

    /// On close: writes every tracked bitmap to new clusters, publishes a
    /// directory with `in_use` cleared through one header write, and hands
    /// the replaced clusters to `allocator` to free after the next sync.
    pub(super) fn store(&self, storage: &dyn Storage, meta: &mut Meta) -> Result<()> {
        let mut state = sync::lock(&self.state);
        if state.directory.is_empty() {
            // Every bitmap was removed: the header names no directory.
            return Ok(());
        }
        let mut new = NewClusters::default();
        let result = self.write_new(&state, storage, &mut meta.allocator, &mut new);
        for host in new.strays.drain(..) {
            meta.allocator.free_later(HostOffset(host));
        }
        let stored = match result {
            Ok(stored) => stored,
            Err(err) => {
                // The header still names the old directory: nothing on disk
                // references the new clusters.
                for host in new.kept {
                    meta.allocator.free_later(HostOffset(host));
                }
                return Err(err);
            }
        };
        // After every allocation above, which may have moved the refcount
        // table: the header written is the current one. It is durable before
        // the clusters it no longer references are freed (the allocator's
        // contract for free_later). If it fails, whether the disk has it is
        // unknown, so the new clusters are left allocated (a leak at worst).
        let extension = stored.extension.to_bytes();
        meta.write_header(storage, |header| {
            header.bitmaps_extension = Some(extension);
            header.autoclear.insert(Autoclear::BITMAPS);
        })?;
        for host in state.replaced_clusters(self.cluster_size) {
            meta.allocator.free_later(HostOffset(host));
        }
        // What is on disk now is what a later store replaces.
        for (bitmap, clusters) in state.tracked.iter_mut().zip(stored.clusters) {
            bitmap.clusters = clusters;
        }
        state.directory = stored.directory;
        state.extension = stored.extension;
        Ok(())
    }

    /// Writes data clusters, tables and the directory to new clusters and
    /// syncs them; returns what the header write then publishes.
    fn write_new(
        &self,
        state: &State,
        storage: &dyn Storage,
        allocator: &mut Allocator,
        new: &mut NewClusters,
    ) -> Result<Stored> {
        let cs = self.cluster_size;
        let mut directory = state.directory.clone();
        let mut clusters = Vec::new();
        for bitmap in &state.tracked {
            let first = new.kept.len();
            directory[bitmap.entry] = bitmap.write(storage, allocator, &directory, cs, new)?;
            clusters.push(new.kept[first..].to_vec());
        }
        let bytes = serialize_directory(&directory);
        let offset = new.write_run(storage, allocator, &bytes, cs, "write the bitmap directory")?;
        // Data, tables and directory must be on disk before the header
        // names them, or a crash would publish garbage as a clean bitmap.
        storage.sync().io("sync the image")?;
        let extension = Extension {
            nb_bitmaps: directory.len() as u32,
            directory_size: bytes.len() as u64,
            directory_offset: offset,
        };
        Ok(Stored {
            directory,
            extension,
            clusters,
        })
    }
}

/// What [`Bitmaps::write_new`] wrote, for the header write to publish.
struct Stored {
    directory: Vec<DirEntry>,
    extension: Extension,
    /// Per tracked bitmap, the clusters of its new table and data.
    clusters: Vec<Vec<u64>>,
}

/// Clusters allocated while storing.
#[derive(Default)]
struct NewClusters {
    /// Referenced by the new directory once it is published.
    kept: Vec<u64>,
    /// Allocated but not used (they did not continue a contiguous run).
    strays: Vec<u64>,
}

impl NewClusters {
    fn allocate(&mut self, storage: &dyn Storage, allocator: &mut Allocator) -> Result<u64> {
        let host = allocator.allocate(storage)?.0;
        self.kept.push(host);
        Ok(host)
    }

    /// Writes `bytes` to new contiguous clusters; returns where.
    fn write_run(
        &mut self,
        storage: &dyn Storage,
        allocator: &mut Allocator,
        bytes: &[u8],
        cluster_size: u64,
        what: &'static str,
    ) -> Result<u64> {
        let offset = self.allocate_run(storage, allocator, bytes.len() as u64, cluster_size)?;
        storage.write_at(bytes, offset).io_at(what, offset)?;
        Ok(offset)
    }

    /// Contiguous clusters for `bytes` bytes (tables and the directory must
    /// be contiguous); clusters that break the run become strays.
    fn allocate_run(
        &mut self,
        storage: &dyn Storage,
        allocator: &mut Allocator,
        bytes: u64,
        cluster_size: u64,
    ) -> Result<u64> {
        let count = cluster_count(bytes, cluster_size).max(1) as usize;
        let mut run: Vec<u64> = Vec::with_capacity(count);
        while run.len() < count {
            let next = allocator.allocate(storage);
            let breaks = |host: u64| run.last().is_some_and(|&last| host != last + cluster_size);
            match next {
                Ok(host) if breaks(host.0) => {
                    self.strays.append(&mut run);
                    run.push(host.0);
                }
                Ok(host) => run.push(host.0),
                Err(err) => {
                    self.strays.append(&mut run);
                    return Err(err);
                }
            }
        }
        // The loop ran at least once: `count` is at least 1.
        let start = run[0];
        self.kept.append(&mut run);
        Ok(start)
    }
}

impl State {
    /// The clusters of the directory and of the tracked bitmaps on disk now.
    fn replaced_clusters(&self, cluster_size: u64) -> BTreeSet<u64> {
        let dir = &self.extension;
        let dir_clusters = cluster_count(dir.directory_size, cluster_size);
        let mut replaced: BTreeSet<u64> = (0..dir_clusters)
            .map(|i| dir.directory_offset + i * cluster_size)
            .collect();
        for bitmap in &self.tracked {
            replaced.extend(bitmap.clusters.iter().copied());
        }
        replaced
    }
}

/// The sizes that loading checks against.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    cluster: u64,
    /// Virtual disk size: every bitmap has one bit per granule of it.
    disk: u64,
    /// Length of the image file: nothing may be read from past it.
    file: u64,
}

/// Checks every consistent bitmap's table as QEMU does on open and loads
/// the `wanted` ones, within [`MAX_TRACKED_BYTES`].
fn load_tracked(
    storage: &dyn Storage,
    directory: &[DirEntry],
    sizes: Sizes,
    wanted: impl Fn(&DirEntry) -> bool,
) -> Result<Vec<Tracked>> {
    let mut tracked = Vec::new();
    let mut budget = 0u64;
    for (index, entry) in directory.iter().enumerate() {
        entry.check(sizes.cluster, sizes.disk)?;
        if entry.flags.contains(BitmapFlags::IN_USE) {
            continue;
        }
        let table = read_table(storage, entry, sizes)?;
        if !wanted(entry) {
            continue;
        }
        budget += u64::from(entry.table_size) * sizes.cluster;
        if budget > MAX_TRACKED_BYTES {
            return Err(FormatError::Unsupported {
                what: format!("enabled bitmaps of more than {MAX_TRACKED_BYTES} bytes in all"),
            });
        }
        tracked.push(Tracked::load(storage, index, entry, &table, sizes)?);
    }
    Ok(tracked)
}

/// Reads and decodes a bitmap table, which must have exactly the size a
/// bitmap of the virtual disk needs (QEMU's `load_bitmap_data`).
fn read_table(storage: &dyn Storage, entry: &DirEntry, sizes: Sizes) -> Result<Vec<TableEntry>> {
    let name = entry.display_name();
    let bits = bitmap_bits(sizes.disk, entry.granularity_bits);
    let needed = cluster_count(bits.div_ceil(8), sizes.cluster);
    if u64::from(entry.table_size) != needed {
        return Err(malformed(format!(
            "bitmap {name:?} has a table of {} entries, its size needs {needed}",
            entry.table_size
        )));
    }
    let len = u64::from(entry.table_size) * 8;
    check_in_file(entry.table_offset, len, sizes.file, "a bitmap table")?;
    let mut bytes = vec![0u8; len as usize];
    storage
        .read_at(&mut bytes, entry.table_offset)
        .io_at("read a bitmap table", entry.table_offset)?;
    bytes
        .chunks_exact(8)
        .map(|raw| TableEntry::decode(be64(raw, 0), sizes.cluster))
        .collect::<Result<Vec<_>>>()
        .map_err(|err| malformed(format!("bitmap {name:?}: {err}")))
}

impl Tracked {
    /// Loads the bitmap at `index` of the directory from its decoded table.
    fn load(
        storage: &dyn Storage,
        index: usize,
        entry: &DirEntry,
        table: &[TableEntry],
        sizes: Sizes,
    ) -> Result<Tracked> {
        let mut tracked = Tracked {
            entry: index,
            granularity_bits: u32::from(entry.granularity_bits),
            bits: bitmap_bits(sizes.disk, entry.granularity_bits),
            chunks: Vec::with_capacity(table.len()),
            clusters: table_clusters(entry, sizes.cluster),
        };
        for (i, &raw) in table.iter().enumerate() {
            let chunk = tracked.load_chunk(storage, i, raw, sizes)?;
            tracked.chunks.push(chunk);
        }
        Ok(tracked)
    }

    /// Bits that chunk `index` holds (the last one may be partial).
    fn chunk_bits(&self, index: usize, cluster_size: u64) -> usize {
        let per_chunk = cluster_size * 8;
        (self.bits - index as u64 * per_chunk).min(per_chunk) as usize
    }

    fn load_chunk(
        &mut self,
        storage: &dyn Storage,
        index: usize,
        raw: TableEntry,
        sizes: Sizes,
    ) -> Result<Chunk> {
        let valid = self.chunk_bits(index, sizes.cluster);
        let full = valid as u64 == sizes.cluster * 8;
        let mut bits = vec![0u8; sizes.cluster as usize].into_boxed_slice();
        match raw {
            TableEntry::Zeros => return Ok(Chunk::Zeros),
            TableEntry::Ones if full => return Ok(Chunk::Ones),
            // QEMU sets only the bits the bitmap has; tail bits stay zero.
            TableEntry::Ones => set_bits(&mut bits, 0, valid),
            TableEntry::Data(host) => {
                check_in_file(host.0, sizes.cluster, sizes.file, "a bitmap data cluster")?;
                storage
                    .read_at(&mut bits, host.0)
                    .io_at("read bitmap data", host.0)?;
                clear_bits_from(&mut bits, valid);
                self.clusters.push(host.0);
            }
        }
        Ok(Chunk::Bits(bits))
    }

    /// Sets the bits of the granules that guest `offset..offset + len`
    /// touches.
    fn set_range(&mut self, offset: u64, len: u64, cluster_size: u64) {
        let first = offset >> self.granularity_bits;
        let end = (offset.saturating_add(len - 1) >> self.granularity_bits)
            .saturating_add(1)
            .min(self.bits);
        let per_chunk = cluster_size * 8;
        let mut bit = first;
        while bit < end {
            let index = (bit / per_chunk) as usize;
            let chunk_start = index as u64 * per_chunk;
            let stop = end.min(chunk_start + per_chunk);
            let (from, to) = ((bit - chunk_start) as usize, (stop - chunk_start) as usize);
            let chunk = &mut self.chunks[index];
            if let Chunk::Zeros = chunk {
                *chunk = Chunk::Bits(vec![0u8; cluster_size as usize].into_boxed_slice());
            }
            if let Chunk::Bits(bits) = chunk {
                set_bits(bits, from, to);
            }
            bit = stop;
        }
    }

    /// Writes the data clusters and the table; returns the new directory
    /// entry (in_use cleared).
    fn write(
        &self,
        storage: &dyn Storage,
        allocator: &mut Allocator,
        directory: &[DirEntry],
        cluster_size: u64,
        new: &mut NewClusters,
    ) -> Result<DirEntry> {
        let mut table = Vec::with_capacity(self.chunks.len() * 8);
        for (index, chunk) in self.chunks.iter().enumerate() {
            let full = self.chunk_bits(index, cluster_size) as u64 == cluster_size * 8;
            let entry = match chunk {
                Chunk::Zeros => TableEntry::Zeros,
                Chunk::Ones => TableEntry::Ones,
                Chunk::Bits(bits) if bits.iter().all(|&b| b == 0) => TableEntry::Zeros,
                Chunk::Bits(bits) if full && bits.iter().all(|&b| b == 0xff) => TableEntry::Ones,
                Chunk::Bits(bits) => {
                    let host = new.allocate(storage, allocator)?;
                    storage
                        .write_at(bits, host)
                        .io_at("write bitmap data", host)?;
                    TableEntry::Data(HostOffset(host))
                }
            };
            table.extend_from_slice(&entry.encode().to_be_bytes());
        }
        let offset = new.write_run(
            storage,
            allocator,
            &table,
            cluster_size,
            "write a bitmap table",
        )?;
        let mut entry = directory[self.entry].clone();
        entry.table_offset = offset;
        entry.table_size = self.chunks.len() as u32;
        entry.flags.remove(BitmapFlags::IN_USE);
        Ok(entry)
    }
}

/// The clusters a bitmap table occupies.
fn table_clusters(entry: &DirEntry, cluster_size: u64) -> Vec<u64> {
    let count = cluster_count(u64::from(entry.table_size) * 8, cluster_size);
    (0..count)
        .map(|i| entry.table_offset + i * cluster_size)
        .collect()
}

/// Rewrites the directory in place with the new `in_use` flags, as QEMU's
/// `update_ext_header_and_dir_in_place` does.
fn mark_in_use(
    storage: &dyn Storage,
    meta: &mut Meta,
    extension: &Extension,
    directory: &[DirEntry],
) -> Result<()> {
    // Each header write is synced: while the bit is clear every reader
    // ignores the bitmaps, so a crash that tears the in-place directory
    // write below loses them (leaking their clusters) instead of publishing
    // a half-written directory.
    meta.write_header(storage, |header| {
        header.autoclear.remove(Autoclear::BITMAPS)
    })?;
    storage
        .write_at(&serialize_directory(directory), extension.directory_offset)
        .io_at("write the bitmap directory", extension.directory_offset)?;
    // The directory must be whole on disk before the bit vouches for it.
    storage.sync().io("sync the image")?;
    // in_use must be durable (write_header syncs) before the first guest
    // write that the bitmaps on disk do not show.
    meta.write_header(storage, |header| {
        header.autoclear.insert(Autoclear::BITMAPS)
    })
}

/// Bits of a bitmap of a virtual disk: one per granule.
fn bitmap_bits(virtual_size: u64, granularity_bits: u8) -> u64 {
    virtual_size.div_ceil(1 << granularity_bits)
}

/// Clusters needed for `bytes` bytes.
fn cluster_count(bytes: u64, cluster_size: u64) -> u64 {
    bytes.div_ceil(cluster_size)
}

/// Sets bits `from..to` (bit `n` is bit `n % 8` of byte `n / 8`).
fn set_bits(buf: &mut [u8], from: usize, to: usize) {
    let mut bit = from;
    while bit < to && bit % 8 != 0 {
        buf[bit / 8] |= 1 << (bit % 8);
        bit += 1;
    }
    let whole_end = bit + (to.saturating_sub(bit)) / 8 * 8;
    if bit < whole_end {
        buf[bit / 8..whole_end / 8].fill(0xff);
        bit = whole_end;
    }
    while bit < to {
        buf[bit / 8] |= 1 << (bit % 8);
        bit += 1;
    }
}

/// Clears every bit from `from` to the end of `buf`.
fn clear_bits_from(buf: &mut [u8], from: usize) {
    let byte = from / 8;
    if byte >= buf.len() {
        return;
    }
    buf[byte] &= (1u8 << (from % 8)).wrapping_sub(1);
    buf[byte + 1..].fill(0);
}

/// Fails unless `offset..offset + len` lies inside a file of `file_len`.
/// The engine's side: what `open`, `close`, `write` and `zero_range` call.
impl Qcow2 {
    /// Records a guest write of `len` bytes at `offset` in the bitmaps.
    pub(super) fn record_dirty(&self, offset: u64, len: u64) {
        if let Some(bitmaps) = sync::read(&self.bitmaps).as_ref() {
            bitmaps.record(offset, len);
        }
    }

    /// On close, after data and metadata are synced: stores the bitmaps and
    /// applies the frees of the clusters they replaced.
    pub(super) fn store_bitmaps(&self, meta: &mut Meta) -> Result<()> {
        if let Some(bitmaps) = sync::read(&self.bitmaps).as_ref() {
            bitmaps.store(self.storage.as_ref(), meta)?;
        }
        self.sync_and_free(meta)
    }
}

#[cfg(test)]
mod tests;
