//! Dirty-bit repair: the refcount structure rebuilt from the references the
//! image holds, for an image that a writer with lazy refcounts left dirty.
//!
//! What holds a reference, as QEMU's `calculate_refcounts` counts it
//! (`block/qcow2-refcount.c`): the header cluster (extensions and backing
//! name live in it); the active L1 table, every L2 table an L1 entry names
//! and every host cluster an L2 entry names (a compressed cluster counts each
//! host cluster its data touches); the snapshot table; for each internal
//! snapshot its L1 table, its L2 tables and their clusters (an L2 table named
//! by two L1 tables counts twice, and so does each cluster it names); the
//! bitmap directory, bitmap tables and bitmap data clusters when the bitmaps
//! autoclear bit says they are valid; and the new refcount table and
//! refcount blocks themselves. With an external data file, data clusters are
//! not refcounted. A reference outside the file or unaligned refuses the
//! repair before anything is written: guessing would destroy data.
//!
//! Then, as QEMU's `check_oflag_copied` does, the COPIED flags of the active
//! L1 and L2 entries are made to say "refcount is exactly 1".
//!
//! Ordering (why a crash at any instant leaves an image that QEMU and
//! chainfs open and repair again): the new refcount blocks and table go past
//! the end of the file, so the old structure, which the header names until
//! the switch, is never overwritten. They are synced before the header names
//! them; the header switch is synced before the dirty bit is cleared. Until
//! that last write the image stays dirty, so whichever table the header
//! names, a reader rebuilds the refcounts from the references.
//!
//! Memory: one 16-bit counter per cluster of the file (rarer larger counts
//! in a side map), sized by the file's length, never by a header field;
//! every table is checked to lie inside the file before it is read.

mod count;
#[cfg(test)]
mod tests;

use std::fmt;

use self::count::{count_references, read_l2, read_table, RefcountMap};
use super::features::Incompatible;
use super::header::{write_reftable_fields, Header};
use super::l2::{L1_COPIED, L1_OFFSET_MASK};
use super::refcount::{reftable_entry, Refblock};
use super::types::Geometry;
use crate::format::error::IoContext;
use crate::format::{FormatError, Result};
use crate::storage::Storage;

/// Header byte offset of `incompatible_features`.
const HEADER_INCOMPATIBLE: u64 = 72;
/// The largest refcount table chainfs (and QEMU) opens.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Refcount blocks are written in batches of about this many bytes.
const WRITE_BATCH: usize = 1 << 20;

/// What a repair changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Host clusters whose refcount on disk differed from the references.
    pub refcounts_fixed: u64,
    /// Of those, clusters that had a refcount but no reference: now free.
    /// The old refcount table and blocks are among them.
    pub leaks_freed: u64,
    /// Active L1 and L2 entries whose COPIED flag was corrected.
    pub copied_fixed: u64,
    /// Host offset of the rebuilt refcount table.
    pub reftable_offset: u64,
    /// Refcount blocks written.
    pub refblocks: u64,
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} refcounts fixed ({} leaked clusters freed), {} COPIED flags fixed, \
             {} refcount blocks and the refcount table rebuilt at {:#x}",
            self.refcounts_fixed,
            self.leaks_freed,
            self.copied_fixed,
            self.refblocks,
            self.reftable_offset
        )
    }
}

/// Rebuilds the refcounts of the dirty image in `storage`, fixes the COPIED
/// flags of the active tables, points the header at the new refcount table
/// and clears the dirty bit. `header` is updated to match what is on disk.
///
/// Must run before anything reads refcounts (the allocator), and only on an
/// image opened for writing.
pub fn repair(
    storage: &dyn Storage,
    header: &mut Header,
    geometry: &Geometry,
) -> Result<RepairReport> {
    let file_len = storage.len().io("measure the image file")?;
    let mut map = RefcountMap::new(file_len, geometry)?;
    count_references(storage, header, geometry, file_len, &mut map)?;
    map.check_width(geometry)?;
    let (refcounts_fixed, leaks_freed) = compare_with_old(storage, header, geometry, &map)?;
    let layout = plan_layout(&map, geometry)?;
    // Nothing has been written so far: every check that can refuse is done.
    // The COPIED fixes need no sync of their own: like the new structure,
    // nobody trusts them until the dirty bit is cleared, after two syncs.
    let copied_fixed = fix_copied_flags(storage, header, geometry, &map)?;
    write_structure(storage, geometry, &map, &layout)?;
    publish(storage, header, geometry, &layout)?;
    let report = RepairReport {
        refcounts_fixed,
        leaks_freed,
        copied_fixed,
        reftable_offset: layout.table_start() << geometry.cluster_bits,
        refblocks: layout.slots.len() as u64,
    };
    log::info!("repaired the refcounts of a dirty qcow2 image: {report}");
    Ok(report)
}

/// Counts the clusters whose refcount in the old structure differs from the
/// true one, and those among them that are leaks (no reference). The old
/// structure may be damaged: what cannot be read counts as refcount 0.
fn compare_with_old(
    storage: &dyn Storage,
    header: &Header,
    geometry: &Geometry,
    map: &RefcountMap,
) -> Result<(u64, u64)> {
    let old = OldRefcounts::load(storage, header, geometry, map.clusters())?;
    let per_block = geometry.refblock_entries();
    let (mut fixed, mut leaks) = (0, 0);
    for slot in 0..map.clusters().div_ceil(per_block) {
        let block = old.refblock(storage, geometry, slot)?;
        let first = slot * per_block;
        for cluster in first..(first + per_block).min(map.clusters()) {
            let was = block.as_ref().map_or(0, |b| b.get(cluster - first));
            let now = map.get(cluster);
            if was != now {
                fixed += 1;
                leaks += u64::from(now == 0);
            }
        }
    }
    Ok((fixed, leaks))
}

/// The refcount table the header names now, as far as it is usable.
struct OldRefcounts {
    reftable: Vec<u64>,
    file_clusters: u64,
}

impl OldRefcounts {
    fn load(
        storage: &dyn Storage,
        header: &Header,
        geometry: &Geometry,
        file_clusters: u64,
    ) -> Result<OldRefcounts> {
        let offset = header.refcount_table_offset;
        let entries = u64::from(header.refcount_table_clusters) * geometry.cluster_size() / 8;
        let inside = offset
            .checked_add(entries * 8)
            .is_some_and(|end| end <= file_clusters << geometry.cluster_bits);
        let usable = inside && geometry.offset_in_cluster(offset) == 0;
        if !usable {
            log::warn!("the old refcount table at {offset:#x} is unusable; rebuilding anyway");
        }
        let reftable = match usable {
            true => read_table(storage, offset, entries)?,
            false => Vec::new(),
        };
        Ok(OldRefcounts {
            reftable,
            file_clusters,
        })
    }

    /// The old refcount block for reftable slot `slot`, if it is usable.
    fn refblock(
        &self,
        storage: &dyn Storage,
        geometry: &Geometry,
        slot: u64,
    ) -> Result<Option<Refblock>> {
        let Some(&entry) = self.reftable.get(slot as usize) else {
            return Ok(None);
        };
        let offset = match reftable_entry(geometry, slot, entry) {
            Ok(offset) if offset != 0 => offset,
            _ => return Ok(None),
        };
        if offset >> geometry.cluster_bits >= self.file_clusters {
            return Ok(None);
        }
        let mut bytes = vec![0u8; geometry.cluster_size() as usize];
        storage
            .read_at(&mut bytes, offset)
            .io_at("read a table", offset)?;
        Ok(Some(Refblock::from_bytes(bytes, geometry)))
    }
}

/// Sets the COPIED flag of every active L1 and L2 entry to "refcount is
/// exactly 1", writing back only the tables that change. Returns how many
/// entries changed.
fn fix_copied_flags(
    storage: &dyn Storage,
    header: &Header,
    geometry: &Geometry,
    map: &RefcountMap,
) -> Result<u64> {
    let entries = u64::from(header.l1_size);
    if entries == 0 {
        return Ok(0);
    }
    let mut l1 = read_table(storage, header.l1_table_offset, entries)?;
    let (mut fixed, mut l1_fixed) = (0, 0);
    for entry in l1.iter_mut() {
        let l2 = *entry & L1_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let want = map.get(l2 >> geometry.cluster_bits) == 1;
        if (*entry & L1_COPIED != 0) != want {
            *entry ^= L1_COPIED;
            l1_fixed += 1;
        }
        fixed += fix_copied_l2(storage, geometry, map, l2)?;
    }
    if l1_fixed > 0 {
        let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        storage
            .write_at(&bytes, header.l1_table_offset)
            .io_at("write the L1 table", header.l1_table_offset)?;
    }
    Ok(fixed + l1_fixed)
}

fn fix_copied_l2(
    storage: &dyn Storage,
    geometry: &Geometry,
    map: &RefcountMap,
    offset: u64,
) -> Result<u64> {
    let mut table = read_l2(storage, geometry, offset)?;
    let mut fixed = 0;
    for index in 0..geometry.l2_entries() {
        let entry = table.entry(geometry, index)?;
        let Some(host) = entry.host_cluster() else {
            continue;
        };
        // External data clusters have no refcount; QEMU treats them as 1.
        let want = geometry.external_data || map.get(host.0 >> geometry.cluster_bits) == 1;
        if entry.is_copied() != want {
            table.set(index, &entry.with_copied(want));
            fixed += 1;
        }
    }
    if fixed > 0 {
        storage
            .write_at(&table.to_bytes(), offset)
            .io_at("write an L2 table", offset)?;
    }
    Ok(fixed)
}

/// Where the new refcount structure goes: refcount blocks for `slots`, in
/// that order, from cluster `start`, then the refcount table.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    start: u64,
    slots: Vec<u64>,
    table_clusters: u64,
}

impl Layout {
    fn table_start(&self) -> u64 {
        self.start + self.slots.len() as u64
    }

    /// One past the last cluster of the new structure.
    fn end(&self) -> u64 {
        self.table_start() + self.table_clusters
    }

    /// The refcount of `cluster` in the rebuilt image.
    fn refcount(&self, map: &RefcountMap, cluster: u64) -> u64 {
        if cluster < map.clusters() {
            map.get(cluster)
        } else {
            u64::from((self.start..self.end()).contains(&cluster))
        }
    }
}

/// Places the new structure at the end of the file and sizes it so that it
/// also describes itself (QEMU's `rebuild_refcount_structure` solves the
/// same fixed point).
fn plan_layout(map: &RefcountMap, geometry: &Geometry) -> Result<Layout> {
    let per_block = geometry.refblock_entries();
    let mut used: Vec<u64> = Vec::new();
    for cluster in (0..map.clusters()).filter(|&c| map.get(c) != 0) {
        if used.last() != Some(&(cluster / per_block)) {
            used.push(cluster / per_block);
        }
    }
    let start = map.clusters();
    let mut total = 0u64;
    loop {
        let mut slots = used.clone();
        if total > 0 {
            for slot in start / per_block..=(start + total - 1) / per_block {
                if slots.last() != Some(&slot) {
                    slots.push(slot);
                }
            }
        }
        let table_bytes = slots.last().map_or(8, |s| (s + 1) * 8);
        if table_bytes > MAX_REFTABLE_BYTES {
            return Err(FormatError::Unsupported {
                what: format!("a rebuilt refcount table of {table_bytes} bytes"),
            });
        }
        let table_clusters = table_bytes.div_ceil(geometry.cluster_size());
        let needed = slots.len() as u64 + table_clusters;
        if needed == total {
            return Ok(Layout {
                start,
                slots,
                table_clusters,
            });
        }
        total = needed;
    }
}

/// Writes the new refcount blocks and table (not yet named by the header).
fn write_structure(
    storage: &dyn Storage,
    geometry: &Geometry,
    map: &RefcountMap,
    layout: &Layout,
) -> Result<()> {
    let cluster_size = geometry.cluster_size();
    let mut batch: Vec<u8> = Vec::new();
    let mut batch_at = layout.start * cluster_size;
    for &slot in &layout.slots {
        batch.extend_from_slice(build_refblock(geometry, map, layout, slot).bytes());
        if batch.len() >= WRITE_BATCH {
            storage
                .write_at(&batch, batch_at)
                .io_at("write refcount blocks", batch_at)?;
            batch_at += batch.len() as u64;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        storage
            .write_at(&batch, batch_at)
            .io_at("write refcount blocks", batch_at)?;
    }
    let mut table = vec![0u64; (layout.table_clusters * cluster_size / 8) as usize];
    for (index, &slot) in layout.slots.iter().enumerate() {
        table[slot as usize] = (layout.start + index as u64) * cluster_size;
    }
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    storage
        .write_at(&bytes, layout.table_start() * cluster_size)
        .io_at(
            "write the refcount table",
            layout.table_start() * cluster_size,
        )?;
    Ok(())
}

fn build_refblock(geometry: &Geometry, map: &RefcountMap, layout: &Layout, slot: u64) -> Refblock {
    let per_block = geometry.refblock_entries();
    let first = slot * per_block;
    let mut block = Refblock::empty(geometry);
    for cluster in first..(first + per_block).min(layout.end()) {
        let count = layout.refcount(map, cluster);
        if count != 0 {
            block.set(cluster - first, count);
        }
    }
    block
}

/// Points the header at the new refcount table, then clears the dirty bit.
fn publish(
    storage: &dyn Storage,
    header: &mut Header,
    geometry: &Geometry,
    layout: &Layout,
) -> Result<()> {
    // The new blocks and table (and the COPIED fixes) must be durable before
    // the header names them: a header naming half-written blocks would be
    // read by QEMU's repair as a damaged structure.
    storage.sync().io("sync the image")?;
    let offset = layout.table_start() << geometry.cluster_bits;
    let clusters = layout.table_clusters as u32;
    write_reftable_fields(storage, offset, clusters)?;
    // The switch must be durable before the image claims to be clean: a
    // clean image naming the old, stale table would be trusted as it is.
    storage.sync().io("sync the image")?;
    header.refcount_table_offset = offset;
    header.refcount_table_clusters = clusters;
    header.incompatible.remove(Incompatible::DIRTY);
    let bits = header.incompatible.bits() | header.unknown_incompatible;
    storage
        .write_at(&bits.to_be_bytes(), HEADER_INCOMPATIBLE)
        .io_at("clear the dirty bit", HEADER_INCOMPATIBLE)?;
    // Writes that follow rely on the refcounts being trusted by QEMU too.
    storage.sync().io("sync the image")?;
    Ok(())
}
