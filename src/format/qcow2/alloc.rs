//! The cluster allocator: refcount reads and writes, reserved clusters, and
//! frees deferred until the references to them are gone from disk.
//!
//! Ordering (why the image survives a crash at any instant with leaks at
//! worst):
//!
//! * Clusters are *reserved* in batches: their refcounts are set to 1 and
//!   synced before any L2 entry may point to them. A crash leaks reserved
//!   clusters that were never used; it never leaves an L2 entry pointing to a
//!   cluster with refcount 0. Each sync also writes back every dirty data
//!   page of the file, so batches double while an image keeps allocating
//!   (a stream or commit filling it): the syncs, and the data they wait
//!   for, grow with the log of what is written, not with its size. A crash
//!   leaks at most one batch, as holes past the data.
//! * A cluster is *freed* only after the L2 or L1 entry that referenced it has
//!   been rewritten and synced ([`Allocator::free_later`], then
//!   [`Allocator::apply_frees`] after a sync).
//! * A new refcount block is written and synced before the refcount table
//!   entry that points to it; a new refcount table is written and synced
//!   before the header points to it.
//!
//! Every update is written through to the image file at once, so a killed
//! process loses nothing that the kernel had been given.

use std::collections::VecDeque;
use std::num::NonZeroUsize;

use lru::LruCache;

use super::header::write_reftable_fields;
use super::refcount::{locate, reftable_entry, Refblock};
use super::types::{Geometry, HostOffset};
use crate::format::cache::Hold;
use crate::format::error::IoContext;
use crate::format::{FormatError, Result};
use crate::storage::Storage;

/// Refcount state of one image. Only ever used under the image's metadata
/// lock.
#[derive(Debug)]
pub struct Allocator {
    geometry: Geometry,
    reftable: Vec<u64>,
    reftable_offset: u64,
    /// Clusters the table occupies on disk.
    reftable_clusters: u32,
    /// Refcount blocks, changed in place and written through; private to
    /// the image (only its own inserts evict, under its metadata lock), so
    /// they are held against the mount's cache budget rather than kept in
    /// its shared LRU.
    refblocks: LruCache<u64, Refblock>,
    hold: Hold,
    reserve: VecDeque<u64>,
    /// Frees waiting for a sync, oldest first.
    pending_frees: VecDeque<u64>,
    /// Frees ever recorded and ever applied: a sync that started when
    /// `frees_recorded` was `n` covers the first `n`.
    frees_recorded: u64,
    frees_applied: u64,
    /// Cluster index below which no free cluster is known.
    free_hint: u64,
    /// Clusters the next refill reserves.
    batch: u64,
}

/// Bytes the first refill reserves, and the most a refill grows to.
const FIRST_BATCH: u64 = 8 << 20;
const LARGEST_BATCH: u64 = 128 << 20;

/// The clusters of `bytes`, at least two, at most `limit` (the reserve
/// holds eight bytes a cluster, and a refill reads every refcount it
/// reserves).
fn clusters_of(geometry: &Geometry, bytes: u64, limit: u64) -> u64 {
    (bytes / geometry.cluster_size()).clamp(2, limit)
}

impl Allocator {
    /// Loads the refcount table at `offset` (`clusters` long); the refcount
    /// blocks it caches count against `hold`.
    pub fn open(
        storage: &dyn Storage,
        geometry: Geometry,
        offset: u64,
        clusters: u32,
        hold: Hold,
    ) -> Result<Allocator> {
        let mut bytes = vec![0u8; clusters as usize * geometry.cluster_size() as usize];
        storage
            .read_at(&mut bytes, offset)
            .io_at("read the refcount table", offset)?;
        let reftable = bytes
            .chunks_exact(8)
            .map(|w| u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        let capacity = (hold.fair_share() / geometry.cluster_size()).max(4) as usize;
        Ok(Allocator {
            geometry,
            reftable,
            reftable_offset: offset,
            reftable_clusters: clusters,
            refblocks: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            hold,
            reserve: VecDeque::new(),
            pending_frees: VecDeque::new(),
            frees_recorded: 0,
            frees_applied: 0,
            free_hint: 0,
            batch: clusters_of(&geometry, FIRST_BATCH, 512),
        })
    }

    /// Where the refcount table is now, and its size in clusters: the
    /// values every header write must carry (the allocator alone moves the
    /// table).
    pub fn reftable_location(&self) -> (u64, u32) {
        (self.reftable_offset, self.reftable_clusters)
    }

    fn cluster_index(&self, host: u64) -> u64 {
        host >> self.geometry.cluster_bits
    }

    /// Offset of the refcount block for reftable slot `slot`, or 0 if none.
    fn refblock_offset(&self, slot: u64) -> Result<u64> {
        match self.reftable.get(slot as usize) {
            Some(&entry) => reftable_entry(&self.geometry, slot, entry),
            None => Ok(0),
        }
    }

    fn load_refblock(&mut self, storage: &dyn Storage, offset: u64) -> Result<&mut Refblock> {
        if !self.refblocks.contains(&offset) {
            let cluster_size = self.geometry.cluster_size();
            if offset + cluster_size > storage.len().io("measure the image file")? {
                return Err(FormatError::malformed_at(
                    "refcount block",
                    offset,
                    "lies past the end of the image file",
                ));
            }
            let mut bytes = vec![0u8; cluster_size as usize];
            storage
                .read_at(&mut bytes, offset)
                .io_at("read a refcount block", offset)?;
            self.cache_refblock(offset, Refblock::from_bytes(bytes, &self.geometry));
        }
        // unwrap: the block was inserted just above if it was missing.
        Ok(self.refblocks.get_mut(&offset).unwrap())
    }

    /// Keeps `refblock` (already on disk) in the cache, and the budget
    /// hold in step with what the cache keeps.
    fn cache_refblock(&mut self, offset: u64, refblock: Refblock) {
        self.refblocks.put(offset, refblock);
        let bytes = self.refblocks.len() as u64 * self.geometry.cluster_size();
        self.hold.set(bytes);
    }

    /// The refcount of the host cluster at `host`.
    pub fn refcount(&mut self, storage: &dyn Storage, host: u64) -> Result<u64> {
        let (slot, index) = locate(&self.geometry, self.cluster_index(host));
        let block = self.refblock_offset(slot)?;
        if block == 0 {
            return Ok(0);
        }
        Ok(self.load_refblock(storage, block)?.get(index))
    }

    /// Sets the refcount of the cluster at `host`, creating its refcount
    /// block (and growing the refcount table) when needed.
    pub fn set_refcount(&mut self, storage: &dyn Storage, host: u64, value: u64) -> Result<()> {
        if value > self.geometry.max_refcount() {
            return Err(FormatError::Unsupported {
                what: format!(
                    "a refcount of {value} for cluster {host:#x} exceeds the {}-bit width",
                    self.geometry.refcount_bits()
                ),
            });
        }
        let block = self.ensure_refblock(storage, host)?;
        let (_, index) = locate(&self.geometry, self.cluster_index(host));
        let refblock = self.load_refblock(storage, block)?;
        let changed = refblock.set(index, value);
        let bytes = refblock.bytes()[changed.clone()].to_vec();
        storage
            .write_at(&bytes, block + changed.start as u64)
            .io_at("write refcounts", block + changed.start as u64)?;
        Ok(())
    }

    /// The refcount block covering `host`, created if it does not exist.
    fn ensure_refblock(&mut self, storage: &dyn Storage, host: u64) -> Result<u64> {
        let (slot, _) = locate(&self.geometry, self.cluster_index(host));
        if slot >= self.reftable.len() as u64 {
            self.grow_reftable(storage, slot)?;
        }
        let block = self.refblock_offset(slot)?;
        if block != 0 {
            return Ok(block);
        }
        if slot == 0 {
            return Err(FormatError::malformed(
                "refcount table",
                "entry 0 is empty: the header cluster has no refcount",
            ));
        }
        // No cluster in this block's range has a refcount, so none is in use:
        // put the block at the start of its own range, describing itself.
        let per_block = self.geometry.refblock_entries();
        let offset = slot * per_block * self.geometry.cluster_size();
        let mut refblock = Refblock::empty(&self.geometry);
        refblock.set(0, 1);
        storage
            .write_at(refblock.bytes(), offset)
            .io_at("write a refcount block", offset)?;
        // The block must be on disk before the table points to it.
        storage.sync().io("sync the image")?;
        self.write_reftable_entry(storage, slot, offset)?;
        self.cache_refblock(offset, refblock);
        Ok(offset)
    }

    fn write_reftable_entry(&mut self, storage: &dyn Storage, slot: u64, value: u64) -> Result<()> {
        self.reftable[slot as usize] = value;
        storage
            .write_at(&value.to_be_bytes(), self.reftable_offset + slot * 8)
            .io_at(
                "write a refcount table entry",
                self.reftable_offset + slot * 8,
            )?;
        Ok(())
    }

    /// Replaces the refcount table by a larger one holding slot `needed`.
    ///
    /// The new table and the refcount blocks that describe it go into the
    /// first clusters no existing block covers, which are free by definition.
    fn grow_reftable(&mut self, storage: &dyn Storage, needed: u64) -> Result<()> {
        let geometry = self.geometry;
        let cluster_size = geometry.cluster_size();
        let per_block = geometry.refblock_entries();
        let old_slots = self.reftable.len() as u64;
        let first_free_cluster = old_slots * per_block;
        let entries_per_cluster = cluster_size / 8;
        let mut slots = (needed + 1).max(old_slots + old_slots / 2 + 1);
        let (table_clusters, new_blocks) = loop {
            let table_clusters = slots.div_ceil(entries_per_cluster);
            let mut blocks = 1;
            while blocks * per_block < table_clusters + blocks {
                blocks += 1;
            }
            if old_slots + blocks <= slots {
                break (table_clusters, blocks);
            }
            slots = old_slots + blocks;
        };
        slots = table_clusters * entries_per_cluster;
        let Ok(table_clusters_u32) = u32::try_from(table_clusters) else {
            return Err(FormatError::Unsupported {
                what: "a refcount table beyond 2^32 clusters".into(),
            });
        };
        let table_start = first_free_cluster + new_blocks;
        for block in 0..new_blocks {
            let mut refblock = Refblock::empty(&geometry);
            let range = (old_slots + block) * per_block..(old_slots + block + 1) * per_block;
            let used = first_free_cluster..table_start + table_clusters;
            for cluster in range.start.max(used.start)..range.end.min(used.end) {
                refblock.set(cluster - range.start, 1);
            }
            let offset = (first_free_cluster + block) * cluster_size;
            storage
                .write_at(refblock.bytes(), offset)
                .io_at("write a refcount block", offset)?;
            self.cache_refblock(offset, refblock);
        }
        let mut table = self.reftable.clone();
        table.resize(slots as usize, 0);
        for block in 0..new_blocks {
            table[(old_slots + block) as usize] = (first_free_cluster + block) * cluster_size;
        }
        let table_offset = table_start * cluster_size;
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        storage
            .write_at(&bytes, table_offset)
            .io_at("write the refcount table", table_offset)?;
        // The new blocks and table must be on disk before the header names them.
        storage.sync().io("sync the image")?;
        // Only the two fields the allocator owns; whole-header writes take
        // them from reftable_location() (see meta.rs), never from a copy.
        write_reftable_fields(storage, table_offset, table_clusters_u32)?;
        // Durable before the old table's clusters can be freed and reused.
        storage.sync().io("sync the image")?;
        let old_offset = self.reftable_offset;
        let old_clusters = u64::from(self.reftable_clusters);
        self.reftable = table;
        self.reftable_offset = table_offset;
        self.reftable_clusters = table_clusters_u32;
        for cluster in 0..old_clusters {
            self.free_later(HostOffset(old_offset + cluster * cluster_size));
        }
        Ok(())
    }

    /// Hands out a cluster whose refcount is already 1 on disk.
    pub fn allocate(&mut self, storage: &dyn Storage) -> Result<HostOffset> {
        if self.reserve.is_empty() {
            self.refill(storage, 1)?;
        }
        // unwrap: refill put at least one cluster in the reserve.
        Ok(HostOffset(self.reserve.pop_front().unwrap()))
    }

    /// Takes back a cluster from [`Allocator::allocate`] that nothing came to
    /// point to (the write that wanted it failed); it is reserved again.
    pub fn give_back(&mut self, host: HostOffset) {
        self.reserve.push_front(host.0);
    }

    /// The offset one past the last cluster the allocator has handed out
    /// or reserved, for bounds checks of reads.
    pub fn reserved_end(&self) -> u64 {
        self.reserve
            .back()
            .map_or(0, |&c| c + self.geometry.cluster_size())
    }

    /// Reserves at least `want` free clusters: refcount 1, synced.
    fn refill(&mut self, storage: &dyn Storage, want: u64) -> Result<()> {
        let cluster_size = self.geometry.cluster_size();
        let batch = want.max(self.batch);
        self.batch = (self.batch * 2).min(clusters_of(&self.geometry, LARGEST_BATCH, 8192));
        let mut found = 0;
        let mut cluster = self.free_hint.max(1);
        // Refcount changes go to disk once per refcount block, not once per
        // cluster; the block being filled is written before the scan moves
        // to another, so a cache eviction can never lose a change.
        let mut pending: Option<(u64, std::ops::Range<usize>)> = None;
        while found < batch {
            let host = cluster * cluster_size;
            let (slot, index) = locate(&self.geometry, cluster);
            if pending.as_ref().is_some_and(|(s, _)| *s != slot) {
                self.write_pending(storage, pending.take())?;
            }
            if self.refcount(storage, host)? == 0 {
                if self.refblock_offset(slot)? == 0 {
                    // Creating a block (or a table) loads and writes others:
                    // nothing may wait in memory meanwhile.
                    self.write_pending(storage, pending.take())?;
                }
                // Creating the block may use this very cluster: look again.
                let block = self.ensure_refblock(storage, host)?;
                if self.refcount(storage, host)? == 0 {
                    let changed = self.load_refblock(storage, block)?.set(index, 1);
                    pending = Some(match pending.take() {
                        Some((s, range)) => (
                            s,
                            range.start.min(changed.start)..range.end.max(changed.end),
                        ),
                        None => (slot, changed),
                    });
                    self.reserve.push_back(host);
                    found += 1;
                }
            }
            cluster += 1;
        }
        self.write_pending(storage, pending)?;
        self.free_hint = cluster;
        // The file must cover every reserved cluster before an L2 entry can
        // point there: an entry past the end of the file is corruption to
        // QEMU even if the data write that would have extended it was lost.
        let end = self.reserved_end();
        if end > storage.len().io("measure the image file")? {
            storage.set_len(end).io_at("extend the image file", end)?;
        }
        // Refcounts must be on disk before any L2 entry points to these clusters.
        storage.sync().io("sync the image")?;
        Ok(())
    }

    /// Writes the changed bytes of the refcount block in reftable slot
    /// `slot`, if any.
    fn write_pending(
        &mut self,
        storage: &dyn Storage,
        pending: Option<(u64, std::ops::Range<usize>)>,
    ) -> Result<()> {
        let Some((slot, range)) = pending else {
            return Ok(());
        };
        let block = self.refblock_offset(slot)?;
        let bytes = self.load_refblock(storage, block)?.bytes()[range.clone()].to_vec();
        storage
            .write_at(&bytes, block + range.start as u64)
            .io_at("write refcounts", block + range.start as u64)?;
        Ok(())
    }

    /// Drops one reference to `host` once the entry that held it is synced.
    pub fn free_later(&mut self, host: HostOffset) {
        self.pending_frees.push_back(host.0);
        self.frees_recorded += 1;
    }

    /// Number of frees waiting for a sync.
    pub fn pending_frees(&self) -> usize {
        self.pending_frees.len()
    }

    /// How many frees were ever recorded: what a sync that starts now
    /// covers, for [`Allocator::apply_frees`].
    pub fn frees_recorded(&self) -> u64 {
        self.frees_recorded
    }

    /// Whether any free recorded before the first `covered` waits.
    pub fn has_frees_before(&self, covered: u64) -> bool {
        self.frees_applied < covered && !self.pending_frees.is_empty()
    }

    /// Applies the deferred frees among the first `covered` ever recorded.
    /// The caller has synced the image since [`Allocator::frees_recorded`]
    /// returned `covered`, and no request still uses the old mappings.
    /// Returns the clusters whose refcount reached zero.
    pub fn apply_frees(&mut self, storage: &dyn Storage, covered: u64) -> Result<Vec<u64>> {
        let mut freed = Vec::new();
        while self.frees_applied < covered {
            let Some(host) = self.pending_frees.pop_front() else {
                break;
            };
            self.frees_applied += 1;
            let count = self.refcount(storage, host)?;
            if count == 0 {
                return Err(FormatError::malformed_at(
                    "refcount of the cluster",
                    host,
                    "would drop below zero",
                ));
            }
            self.set_refcount(storage, host, count - 1)?;
            if count == 1 {
                freed.push(host);
                self.free_hint = self.free_hint.min(self.cluster_index(host));
            }
        }
        Ok(freed)
    }

    /// Returns every reserved, unused cluster (on close: no leaks), and
    /// the offsets it returned. Batches start small again.
    pub fn release_reserve(&mut self, storage: &dyn Storage) -> Result<Vec<u64>> {
        let released: Vec<u64> = self.reserve.drain(..).collect();
        for &host in &released {
            self.set_refcount(storage, host, 0)?;
            self.free_hint = self.free_hint.min(self.cluster_index(host));
        }
        self.batch = clusters_of(&self.geometry, FIRST_BATCH, 512);
        Ok(released)
    }
}
