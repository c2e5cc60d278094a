//! Persistent bitmaps handed to the chain layer, which runs the `bitmap-*`
//! commands: [`Bitmaps::take`] gives it every bitmap of the image (and from
//! then on it records the writes), `add` and `remove` change the directory
//! on disk at once, and `put` gives the bits back before close stores them.
//!
//! A bitmap is `in_use` on disk from the moment it is taken or added until
//! the close that stores it, so a crash leaves it inconsistent, as QEMU's.

use super::{
    bitmap_bits, cluster_count, mark_in_use, read_table, serialize_directory, set_bits,
    BitmapFlags, Bitmaps, Chunk, DirEntry, Extension, NewClusters, Sizes, State, TableEntry,
    Tracked,
};
use crate::format::error::IoContext;
use crate::format::qcow2::features::Autoclear;
use crate::format::qcow2::meta::Meta;
use crate::format::qcow2::types::HostOffset;
use crate::format::{FormatError, Result};
use crate::storage::Storage;
use crate::sync;

/// One bitmap of the image as the chain layer takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistentBitmap {
    /// Its name (lossily decoded).
    pub name: String,
    /// log2 of bytes per bit.
    pub granularity_bits: u32,
    /// The `auto` flag: it records writes.
    pub enabled: bool,
    /// It was `in_use` when the image was opened: its bits are unknown.
    pub inconsistent: bool,
    /// Bit `n` is bit `n % 8` of byte `n / 8` (empty when inconsistent).
    pub data: Vec<u8>,
}

impl Bitmaps {
    /// Loads every consistent bitmap (disabled ones too), marks them all
    /// `in_use` on disk and stops recording here: the caller records.
    pub(in crate::format::qcow2) fn take(
        &self,
        storage: &dyn Storage,
        meta: &mut Meta,
    ) -> Result<Vec<PersistentBitmap>> {
        let mut state = sync::lock(&self.state);
        let sizes = Sizes {
            cluster: self.cluster_size,
            disk: self.disk,
            file: storage.len().io("measure the image file")?,
        };
        let mut marked = false;
        for index in 0..state.directory.len() {
            let entry = state.directory[index].clone();
            let tracked = state.tracked.iter().any(|t| t.entry == index);
            if tracked || entry.flags.contains(BitmapFlags::IN_USE) {
                continue;
            }
            let table = read_table(storage, &entry, sizes)?;
            let bitmap = Tracked::load(storage, index, &entry, &table, sizes)?;
            state.tracked.push(bitmap);
            state.directory[index].flags.insert(BitmapFlags::IN_USE);
            marked = true;
        }
        if marked {
            mark_in_use(storage, meta, &state.extension, &state.directory)?;
        }
        state.external = true;
        Ok(handed_out(
            &state.directory,
            &state.tracked,
            self.cluster_size,
        ))
    }

    /// Adds an empty bitmap, `in_use` on disk before this returns.
    pub(in crate::format::qcow2) fn add(
        &self,
        storage: &dyn Storage,
        meta: &mut Meta,
        name: &str,
        granularity_bits: u8,
        enabled: bool,
    ) -> Result<()> {
        let mut state = sync::lock(&self.state);
        let cs = self.cluster_size;
        let bits = bitmap_bits(self.disk, granularity_bits);
        let table_size = cluster_count(bits.div_ceil(8), cs).max(1);
        let table_bytes = cluster_count(table_size * 8, cs) * cs;
        let mut new = NewClusters::default();
        let zeros = vec![0u8; table_bytes as usize];
        let written = new.write_run(
            storage,
            &mut meta.allocator,
            &zeros,
            cs,
            "write a bitmap table",
        );
        let table_offset = match written {
            Ok(offset) => offset,
            Err(err) => {
                for host in new.kept.drain(..).chain(new.strays.drain(..)) {
                    meta.allocator.free_later(HostOffset(host));
                }
                return Err(err);
            }
        };
        let mut flags = BitmapFlags::IN_USE;
        if enabled {
            flags.insert(BitmapFlags::AUTO);
        }
        let mut directory = state.directory.clone();
        directory.push(DirEntry {
            table_offset,
            table_size: table_size as u32,
            flags,
            kind: 1,
            granularity_bits,
            name: name.as_bytes().to_vec(),
            extra_data: Vec::new(),
        });
        // The zeroed table must be durable before a directory names it.
        storage.sync().io("sync the image")?;
        self.publish(&mut state, storage, meta, directory)?;
        let entry = state.directory.len() - 1;
        state.tracked.push(Tracked {
            entry,
            granularity_bits: u32::from(granularity_bits),
            bits,
            chunks: (0..table_size).map(|_| Chunk::Zeros).collect(),
            clusters: new.kept,
        });
        Ok(())
    }

    /// Removes bitmap `name` from the directory on disk and frees its
    /// clusters (those an inconsistent bitmap's table names, as far as it
    /// can be read).
    pub(in crate::format::qcow2) fn remove(
        &self,
        storage: &dyn Storage,
        meta: &mut Meta,
        name: &str,
    ) -> Result<()> {
        let mut state = sync::lock(&self.state);
        let Some(index) = state.index_of(name) else {
            return Err(FormatError::Unsupported {
                what: format!("no persistent bitmap {name:?}"),
            });
        };
        let mut directory = state.directory.clone();
        let removed = directory.remove(index);
        self.publish(&mut state, storage, meta, directory)?;
        let clusters = match state.tracked.iter().position(|t| t.entry == index) {
            Some(at) => state.tracked.remove(at).clusters,
            None => self.stale_clusters(storage, &removed),
        };
        for host in clusters {
            meta.allocator.free_later(HostOffset(host));
        }
        for bitmap in state.tracked.iter_mut().filter(|t| t.entry > index) {
            bitmap.entry -= 1;
        }
        Ok(())
    }

    /// Replaces the bits of bitmap `name` and its `auto` flag, for the
    /// next store.
    pub(in crate::format::qcow2) fn put(&self, name: &str, data: &[u8], enabled: bool) {
        let mut state = sync::lock(&self.state);
        let Some(index) = state.index_of(name) else {
            return;
        };
        state.directory[index].flags.set(BitmapFlags::AUTO, enabled);
        let cs = self.cluster_size;
        if let Some(bitmap) = state.tracked.iter_mut().find(|t| t.entry == index) {
            bitmap.set_bytes(data, cs);
        }
    }

    /// Writes `directory` to new clusters and publishes it with one header
    /// write (no directory at all when it is empty); the old directory's
    /// clusters are freed after the next sync.
    fn publish(
        &self,
        state: &mut State,
        storage: &dyn Storage,
        meta: &mut Meta,
        directory: Vec<DirEntry>,
    ) -> Result<()> {
        let cs = self.cluster_size;
        let old = state.extension;
        let extension = if directory.is_empty() {
            meta.write_header(storage, |header| {
                header.bitmaps_extension = None;
                header.autoclear.remove(Autoclear::BITMAPS);
            })?;
            Extension::NONE
        } else {
            let bytes = serialize_directory(&directory);
            let mut new = NewClusters::default();
            let placed = new
                .write_run(
                    storage,
                    &mut meta.allocator,
                    &bytes,
                    cs,
                    "write the bitmap directory",
                )
                .and_then(|offset| {
                    storage.sync().io("sync the image")?;
                    Ok(offset)
                });
            for host in new.strays.drain(..) {
                meta.allocator.free_later(HostOffset(host));
            }
            let offset = match placed {
                Ok(offset) => offset,
                Err(err) => {
                    for host in new.kept {
                        meta.allocator.free_later(HostOffset(host));
                    }
                    return Err(err);
                }
            };
            let extension = Extension {
                nb_bitmaps: directory.len() as u32,
                directory_size: bytes.len() as u64,
                directory_offset: offset,
            };
            let raw = extension.to_bytes();
            meta.write_header(storage, |header| {
                header.bitmaps_extension = Some(raw);
                header.autoclear.insert(Autoclear::BITMAPS);
            })?;
            extension
        };
        for i in 0..cluster_count(old.directory_size, cs) {
            meta.allocator
                .free_later(HostOffset(old.directory_offset + i * cs));
        }
        state.directory = directory;
        state.extension = extension;
        Ok(())
    }

    /// The table and data clusters an untracked entry names, skipping what
    /// cannot be read or decoded (an inconsistent bitmap may be garbage).
    fn stale_clusters(&self, storage: &dyn Storage, entry: &DirEntry) -> Vec<u64> {
        let cs = self.cluster_size;
        let file = storage.len().unwrap_or(0);
        let len = u64::from(entry.table_size) * 8;
        if entry.table_offset == 0 || entry.table_offset.saturating_add(len) > file {
            return Vec::new();
        }
        let mut clusters = super::table_clusters(entry, cs);
        let mut bytes = vec![0u8; len as usize];
        if storage.read_at(&mut bytes, entry.table_offset).is_err() {
            return clusters;
        }
        for raw in bytes.chunks_exact(8) {
            let word = u64::from_be_bytes(raw.try_into().unwrap_or([0; 8]));
            if let Ok(TableEntry::Data(host)) = TableEntry::decode(word, cs) {
                if host.0.saturating_add(cs) <= file {
                    clusters.push(host.0);
                }
            }
        }
        clusters
    }
}

/// The bitmaps of `directory` as the chain layer takes them: those in
/// `loaded` with their bits, the others (found `in_use`) inconsistent.
pub(super) fn handed_out(
    directory: &[DirEntry],
    loaded: &[Tracked],
    cluster_size: u64,
) -> Vec<PersistentBitmap> {
    directory
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let bits = loaded.iter().find(|t| t.entry == index);
            PersistentBitmap {
                name: entry.display_name(),
                granularity_bits: u32::from(entry.granularity_bits),
                enabled: entry.flags.contains(BitmapFlags::AUTO),
                inconsistent: bits.is_none(),
                data: bits.map_or_else(Vec::new, |t| t.to_bytes(cluster_size)),
            }
        })
        .collect()
}

impl State {
    /// The directory index of bitmap `name`.
    fn index_of(&self, name: &str) -> Option<usize> {
        self.directory
            .iter()
            .position(|e| e.name == name.as_bytes())
    }
}

impl Tracked {
    /// The whole bitmap, bit `n` in bit `n % 8` of byte `n / 8`.
    fn to_bytes(&self, cluster_size: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity((self.chunks.len() as u64 * cluster_size) as usize);
        for (index, chunk) in self.chunks.iter().enumerate() {
            let start = out.len();
            out.resize(start + cluster_size as usize, 0);
            match chunk {
                Chunk::Zeros => {}
                Chunk::Ones => set_bits(&mut out[start..], 0, self.chunk_bits(index, cluster_size)),
                Chunk::Bits(bits) => out[start..].copy_from_slice(bits),
            }
        }
        out.truncate(self.bits.div_ceil(8) as usize);
        out
    }

    /// Takes the bits from `data` (as [`Tracked::to_bytes`] lays them out).
    fn set_bytes(&mut self, data: &[u8], cluster_size: u64) {
        let cs = cluster_size as usize;
        for (index, chunk) in self.chunks.iter_mut().enumerate() {
            let from = (index * cs).min(data.len());
            let part = &data[from..(from + cs).min(data.len())];
            *chunk = if part.iter().all(|&b| b == 0) {
                Chunk::Zeros
            } else {
                let mut bits = vec![0u8; cs].into_boxed_slice();
                bits[..part.len()].copy_from_slice(part);
                Chunk::Bits(bits)
            };
        }
    }
}

/// The engine's side of the `bitmap-*` commands.
impl crate::format::qcow2::Qcow2 {
    /// Hands every persistent bitmap to the caller, which records writes
    /// from now on (see [`Bitmaps::take`]). The image must be writable.
    pub fn take_bitmaps(&self) -> Result<Vec<PersistentBitmap>> {
        let mut meta = sync::lock(&self.meta);
        let mut slot = sync::write(&self.bitmaps);
        if slot.is_none() {
            *slot = Some(Bitmaps::load_directory(
                self.storage.as_ref(),
                &mut meta,
                &self.geometry,
            )?);
        }
        match slot.as_ref() {
            Some(bitmaps) => bitmaps.take(self.storage.as_ref(), &mut meta),
            None => Ok(Vec::new()),
        }
    }

    /// Adds an empty persistent bitmap, `in_use` on disk at once.
    pub fn add_bitmap(&self, name: &str, granularity_bits: u8, enabled: bool) -> Result<()> {
        let mut meta = sync::lock(&self.meta);
        match sync::read(&self.bitmaps).as_ref() {
            Some(bitmaps) => bitmaps.add(
                self.storage.as_ref(),
                &mut meta,
                name,
                granularity_bits,
                enabled,
            ),
            None => Err(not_taken()),
        }
    }

    /// Removes a persistent bitmap from the image.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        let mut meta = sync::lock(&self.meta);
        match sync::read(&self.bitmaps).as_ref() {
            Some(bitmaps) => bitmaps.remove(self.storage.as_ref(), &mut meta, name),
            None => Err(not_taken()),
        }
    }

    /// Gives a taken bitmap's bits back, for close to store.
    pub fn put_bitmap(&self, name: &str, data: &[u8], enabled: bool) {
        if let Some(bitmaps) = sync::read(&self.bitmaps).as_ref() {
            bitmaps.put(name, data, enabled);
        }
    }
}

fn not_taken() -> FormatError {
    FormatError::Unsupported {
        what: "persistent bitmaps of an image whose bitmaps were not taken".into(),
    }
}
