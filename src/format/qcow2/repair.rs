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

use std::collections::HashMap;
use std::fmt;

use super::compress::decode_descriptor;
use super::features::{Autoclear, Incompatible};
use super::header::Header;
use super::l2::{L2Entry, L2Table, L1_COPIED, L1_OFFSET_MASK};
use super::refcount::{reftable_entry, Refblock};
use super::snapshots::{read_snapshot_table, table_range};
use super::types::Geometry;
use crate::format::{FormatError, Result};
use crate::storage::Storage;

/// Header byte offset of `refcount_table_offset` and `refcount_table_clusters`.
const HEADER_REFTABLE_FIELDS: u64 = 48;
/// Header byte offset of `incompatible_features`.
const HEADER_INCOMPATIBLE: u64 = 72;
/// The largest refcount table chainfs (and QEMU) opens.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Refcount blocks are written in batches of about this many bytes.
const WRITE_BATCH: usize = 1 << 20;
/// Bits of a bitmap table entry that hold the data cluster offset.
const BITMAP_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// QEMU's limit on the bitmap directory (1 KiB for each of 65535 bitmaps).
const MAX_BITMAP_DIRECTORY: u64 = 1024 * 65535;
/// Bytes of the fixed part of a bitmap directory entry.
const BITMAP_ENTRY_HEADER: u64 = 24;

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
    let file_len = storage.len()?;
    let mut map = RefcountMap::new(file_len, geometry)?;
    count_references(storage, header, geometry, file_len, &mut map)?;
    map.check_width(geometry)?;
    let (refcounts_fixed, leaks_freed) = compare_with_old(storage, header, geometry, &map)?;
    let layout = plan_layout(&map, geometry)?;
    // Nothing has been written so far: every check that can refuse is done.
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

/// The true refcount of every cluster of the file, counted from references.
#[derive(Debug)]
struct RefcountMap {
    /// Exact below `u16::MAX`; `u16::MAX` means "see `large`".
    counts: Vec<u16>,
    /// Counts of `u16::MAX` and more.
    large: HashMap<u64, u64>,
    cluster_bits: u32,
}

impl RefcountMap {
    fn new(file_len: u64, geometry: &Geometry) -> Result<RefcountMap> {
        let clusters = file_len.div_ceil(geometry.cluster_size());
        let too_large = || FormatError::Unsupported {
            what: format!("repairing the refcounts of {clusters} clusters in memory"),
        };
        let len = usize::try_from(clusters).map_err(|_| too_large())?;
        let mut counts = Vec::new();
        counts.try_reserve_exact(len).map_err(|_| too_large())?;
        counts.resize(len, 0);
        Ok(RefcountMap {
            counts,
            large: HashMap::new(),
            cluster_bits: geometry.cluster_bits,
        })
    }

    /// Clusters of the file (the last one may be partial).
    fn clusters(&self) -> u64 {
        self.counts.len() as u64
    }

    fn get(&self, cluster: u64) -> u64 {
        match self.counts.get(cluster as usize) {
            Some(&u16::MAX) => self.large.get(&cluster).copied().unwrap_or(0),
            Some(&count) => u64::from(count),
            None => 0,
        }
    }

    fn increment(&mut self, cluster: u64) {
        let Some(count) = self.counts.get_mut(cluster as usize) else {
            return;
        };
        if *count < u16::MAX - 1 {
            *count += 1;
        } else if *count == u16::MAX - 1 {
            *count = u16::MAX;
            self.large.insert(cluster, u64::from(u16::MAX));
        } else {
            let large = self.large.entry(cluster).or_insert(0);
            *large = large.saturating_add(1);
        }
    }

    /// Counts one reference to cluster index `cluster`, which `what` makes.
    fn add_cluster(&mut self, cluster: u64, what: &dyn Fn() -> String) -> Result<()> {
        if cluster >= self.clusters() {
            return Err(refuse(format!(
                "{} at {:#x} lies past the end of the file",
                what(),
                cluster << self.cluster_bits
            )));
        }
        self.increment(cluster);
        Ok(())
    }

    /// Counts one reference to each cluster that `len` bytes at `offset` touch.
    fn add_bytes(&mut self, offset: u64, len: u64, what: &dyn Fn() -> String) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let last = offset.checked_add(len - 1).ok_or_else(|| {
            refuse(format!(
                "{} at {offset:#x} overflows the offset range",
                what()
            ))
        })?;
        if last >> self.cluster_bits >= self.clusters() {
            return Err(refuse(format!(
                "{} ({len} bytes at {offset:#x}) runs past the end of the file",
                what()
            )));
        }
        for cluster in offset >> self.cluster_bits..=last >> self.cluster_bits {
            self.increment(cluster);
        }
        Ok(())
    }

    /// Refuses counts that the image's refcount width cannot hold.
    fn check_width(&self, geometry: &Geometry) -> Result<()> {
        let max = geometry.max_refcount();
        let over = (0..self.clusters()).find(|&c| self.get(c) > max);
        match over {
            Some(cluster) => Err(refuse(format!(
                "cluster {:#x} has {} references, more than a {}-bit refcount holds",
                cluster << self.cluster_bits,
                self.get(cluster),
                geometry.refcount_bits()
            ))),
            None => Ok(()),
        }
    }
}

/// The error that refuses a repair (and so every write).
fn refuse(what: String) -> FormatError {
    FormatError::malformed(format!("cannot repair the dirty image: {what}"))
}

fn check_aligned(offset: u64, geometry: &Geometry, what: &dyn Fn() -> String) -> Result<()> {
    if geometry.offset_in_cluster(offset) != 0 {
        return Err(refuse(format!(
            "{} at {offset:#x} is not cluster aligned",
            what()
        )));
    }
    Ok(())
}

fn be16(bytes: &[u8], at: usize) -> u64 {
    u64::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]))
}

fn be32(bytes: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([
        bytes[at],
        bytes[at + 1],
        bytes[at + 2],
        bytes[at + 3],
    ]))
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    (be32(bytes, at) << 32) | be32(bytes, at + 4)
}

/// Reads `entries` big-endian 64-bit words at `offset`. Callers have checked
/// that they lie inside the file, which bounds the allocation.
fn read_table(storage: &dyn Storage, offset: u64, entries: u64) -> Result<Vec<u64>> {
    let mut bytes = vec![0u8; entries as usize * 8];
    storage.read_at(&mut bytes, offset)?;
    Ok(bytes.chunks_exact(8).map(|w| be64(w, 0)).collect())
}

fn read_l2(storage: &dyn Storage, geometry: &Geometry, offset: u64) -> Result<L2Table> {
    let mut bytes = vec![0u8; geometry.cluster_size() as usize];
    storage.read_at(&mut bytes, offset)?;
    Ok(L2Table::from_bytes(&bytes, geometry.extended_l2))
}

/// Counts every reference the image holds into `map`.
fn count_references(
    storage: &dyn Storage,
    header: &Header,
    geometry: &Geometry,
    file_len: u64,
    map: &mut RefcountMap,
) -> Result<()> {
    map.add_cluster(0, &|| "the header cluster".into())?;
    let active = L1Ref {
        offset: header.l1_table_offset,
        entries: u64::from(header.l1_size),
        name: "the active L1 table".into(),
    };
    count_l1(storage, geometry, map, &active)?;
    let snapshots = read_snapshot_table(
        storage,
        header.snapshots_offset,
        header.nb_snapshots,
        geometry.cluster_bits,
        file_len,
    )?;
    let table = table_range(header.snapshots_offset, &snapshots);
    map.add_bytes(table.start, table.end - table.start, &|| {
        "the snapshot table".into()
    })?;
    for snapshot in &snapshots {
        let l1 = L1Ref {
            offset: snapshot.l1_table_offset,
            entries: u64::from(snapshot.l1_size),
            name: format!("the L1 table of snapshot {:?}", snapshot.id),
        };
        count_l1(storage, geometry, map, &l1)?;
    }
    match &header.bitmaps_extension {
        // Without the autoclear bit the bitmaps are stale: QEMU ignores them
        // and a writer drops them, so their clusters hold no reference.
        Some(ext) if header.autoclear.contains(Autoclear::BITMAPS) => {
            count_bitmaps(storage, geometry, map, ext)
        }
        _ => Ok(()),
    }
}

/// One L1 table to walk.
struct L1Ref {
    offset: u64,
    entries: u64,
    name: String,
}

fn count_l1(
    storage: &dyn Storage,
    geometry: &Geometry,
    map: &mut RefcountMap,
    l1: &L1Ref,
) -> Result<()> {
    if l1.entries == 0 {
        return Ok(());
    }
    check_aligned(l1.offset, geometry, &|| l1.name.clone())?;
    map.add_bytes(l1.offset, l1.entries * 8, &|| l1.name.clone())?;
    for (index, entry) in read_table(storage, l1.offset, l1.entries)?
        .into_iter()
        .enumerate()
    {
        let l2 = entry & L1_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let what = || format!("the L2 table of {} entry {index}", l1.name);
        check_aligned(l2, geometry, &what)?;
        map.add_bytes(l2, geometry.cluster_size(), &what)?;
        count_l2(geometry, map, &read_l2(storage, geometry, l2)?, l2)?;
    }
    Ok(())
}

fn count_l2(
    geometry: &Geometry,
    map: &mut RefcountMap,
    table: &L2Table,
    table_offset: u64,
) -> Result<()> {
    for index in 0..geometry.l2_entries() {
        let what = || format!("L2 entry {index} of the table at {table_offset:#x}");
        match table.entry(geometry, index)? {
            L2Entry::Compressed(_) if geometry.external_data => {
                return Err(refuse(format!(
                    "{} is compressed in an image with an external data file",
                    what()
                )));
            }
            L2Entry::Compressed(word) => {
                let clusters = decode_descriptor(word, geometry.cluster_bits)
                    .host_clusters(geometry.cluster_bits);
                for cluster in clusters {
                    map.add_cluster(cluster, &what)?;
                }
            }
            // Data in an external data file is not refcounted.
            _ if geometry.external_data => {}
            entry => {
                if let Some(host) = entry.host_cluster() {
                    map.add_bytes(host.0, geometry.cluster_size(), &what)?;
                }
            }
        }
    }
    Ok(())
}

/// Counts the bitmap directory, tables and data clusters (qcow2.txt
/// "Bitmaps extension", "Bitmap directory", "Bitmap table").
fn count_bitmaps(
    storage: &dyn Storage,
    geometry: &Geometry,
    map: &mut RefcountMap,
    ext: &[u8],
) -> Result<()> {
    if ext.len() < 24 {
        return Err(refuse(
            "the bitmaps extension is shorter than 24 bytes".into(),
        ));
    }
    let (count, dir_size, dir_offset) = (be32(ext, 0), be64(ext, 8), be64(ext, 16));
    let what = || "the bitmap directory".to_string();
    if dir_size > MAX_BITMAP_DIRECTORY {
        return Err(refuse(format!(
            "{} of {dir_size} bytes is too large",
            what()
        )));
    }
    check_aligned(dir_offset, geometry, &what)?;
    map.add_bytes(dir_offset, dir_size, &what)?;
    let mut dir = vec![0u8; dir_size as usize];
    storage.read_at(&mut dir, dir_offset)?;
    let mut at = 0u64;
    for index in 0..count {
        if at + BITMAP_ENTRY_HEADER > dir_size {
            return Err(refuse(format!("bitmap {index} runs past {}", what())));
        }
        let entry = &dir[at as usize..];
        let (table_offset, table_size) = (be64(entry, 0), be32(entry, 8));
        let entry_len = BITMAP_ENTRY_HEADER + be32(entry, 20) + be16(entry, 18);
        at += entry_len.next_multiple_of(8);
        count_bitmap_table(storage, geometry, map, table_offset, table_size)?;
    }
    Ok(())
}

fn count_bitmap_table(
    storage: &dyn Storage,
    geometry: &Geometry,
    map: &mut RefcountMap,
    offset: u64,
    entries: u64,
) -> Result<()> {
    if entries == 0 {
        return Ok(());
    }
    let what = || format!("the bitmap table at {offset:#x}");
    check_aligned(offset, geometry, &what)?;
    map.add_bytes(offset, entries * 8, &what)?;
    for entry in read_table(storage, offset, entries)? {
        let data = entry & BITMAP_OFFSET_MASK;
        if data != 0 {
            let what = || format!("a data cluster of the bitmap table at {offset:#x}");
            check_aligned(data, geometry, &what)?;
            map.add_bytes(data, geometry.cluster_size(), &what)?;
        }
    }
    Ok(())
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
        storage.read_at(&mut bytes, offset)?;
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
        storage.write_at(&bytes, header.l1_table_offset)?;
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
        storage.write_at(&table.to_bytes(), offset)?;
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
            storage.write_at(&batch, batch_at)?;
            batch_at += batch.len() as u64;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        storage.write_at(&batch, batch_at)?;
    }
    let mut table = vec![0u64; (layout.table_clusters * cluster_size / 8) as usize];
    for (index, &slot) in layout.slots.iter().enumerate() {
        table[slot as usize] = (layout.start + index as u64) * cluster_size;
    }
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    storage.write_at(&bytes, layout.table_start() * cluster_size)?;
    Ok(())
}

fn build_refblock(geometry: &Geometry, map: &RefcountMap, layout: &Layout, slot: u64) -> Refblock {
    let per_block = geometry.refblock_entries();
    let first = slot * per_block;
    let mut block = Refblock::empty(geometry);
    for cluster in first..(first + per_block).min(layout.end().max(map.clusters())) {
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
    storage.sync()?;
    let offset = layout.table_start() << geometry.cluster_bits;
    let clusters = layout.table_clusters as u32;
    let mut fields = offset.to_be_bytes().to_vec();
    fields.extend_from_slice(&clusters.to_be_bytes());
    storage.write_at(&fields, HEADER_REFTABLE_FIELDS)?;
    // The switch must be durable before the image claims to be clean: a
    // clean image naming the old, stale table would be trusted as it is.
    storage.sync()?;
    header.refcount_table_offset = offset;
    header.refcount_table_clusters = clusters;
    header.incompatible.remove(Incompatible::DIRTY);
    let bits = header.incompatible.bits() | header.unknown_incompatible;
    storage.write_at(&bits.to_be_bytes(), HEADER_INCOMPATIBLE)?;
    // Writes that follow rely on the refcounts being trusted by QEMU too.
    storage.sync()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(cluster_bits: u32, refcount_order: u32) -> Geometry {
        Geometry {
            cluster_bits,
            extended_l2: false,
            refcount_order,
            external_data: false,
        }
    }

    #[test]
    fn counts_beyond_sixteen_bits_stay_exact() {
        let g = geometry(9, 6);
        let mut map = RefcountMap::new(4 * 512, &g).unwrap();
        for _ in 0..70_000 {
            map.add_cluster(1, &|| "x".into()).unwrap();
        }
        assert_eq!(map.get(1), 70_000);
        assert_eq!(map.get(2), 0);
        assert!(map.check_width(&geometry(9, 4)).is_err());
        assert!(map.check_width(&g).is_ok());
    }

    #[test]
    fn references_past_the_end_of_the_file_refuse_the_repair() {
        let g = geometry(9, 4);
        let mut map = RefcountMap::new(1000, &g).unwrap();
        assert!(map.add_bytes(512, 512, &|| "x".into()).is_ok());
        assert!(map.add_bytes(1024, 1, &|| "x".into()).is_err());
        assert!(map.add_bytes(u64::MAX, 2, &|| "x".into()).is_err());
    }

    #[test]
    fn the_new_structure_describes_itself() {
        // 512-byte clusters, 16-bit refcounts: 256 clusters per block.
        let g = geometry(9, 4);
        let mut map = RefcountMap::new(255 * 512, &g).unwrap();
        map.add_cluster(0, &|| "x".into()).unwrap();
        let layout = plan_layout(&map, &g).unwrap();
        // Clusters 255 (block 0's last), 256 (block 1) and the table.
        assert_eq!(layout.start, 255);
        assert_eq!(layout.slots, vec![0, 1]);
        assert_eq!(layout.table_clusters, 1);
        for cluster in 255..258 {
            assert_eq!(layout.refcount(&map, cluster), 1);
        }
        let block = build_refblock(&g, &map, &layout, 1);
        assert_eq!(block.get(0), 1);
        assert_eq!(block.get(1), 1);
        assert_eq!(block.get(2), 0);
    }

    #[test]
    fn gaps_without_references_get_no_refcount_block() {
        let g = geometry(9, 4);
        let mut map = RefcountMap::new(1024 * 512, &g).unwrap();
        map.add_cluster(0, &|| "x".into()).unwrap();
        let layout = plan_layout(&map, &g).unwrap();
        assert_eq!(layout.slots, vec![0, 4]);
    }
}
