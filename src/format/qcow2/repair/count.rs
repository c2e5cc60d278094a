//! Counting the references an image holds, cluster by cluster, as QEMU's
//! `calculate_refcounts` does; see the parent module for what counts.
//!
//! Every table is checked to lie inside the file (and to be cluster
//! aligned) before it is read, so a header or entry claiming a huge table
//! costs nothing: the repair is refused instead.

use std::collections::HashMap;

use crate::format::error::IoContext;
use crate::format::qcow2::compress::decode_descriptor;
use crate::format::qcow2::features::Autoclear;
use crate::format::qcow2::header::Header;
use crate::format::qcow2::l2::{L2Entry, L2Table, L1_OFFSET_MASK};
use crate::format::qcow2::snapshots::{read_snapshot_table, table_range};
use crate::format::qcow2::types::Geometry;
use crate::format::{FormatError, Result};
use crate::storage::Storage;

/// Bits of a bitmap table entry that hold the data cluster offset.
const BITMAP_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// QEMU's limit on the bitmap directory (1 KiB for each of 65535 bitmaps).
const MAX_BITMAP_DIRECTORY: u64 = 1024 * 65535;
/// Bytes of the fixed part of a bitmap directory entry.
const BITMAP_ENTRY_HEADER: u64 = 24;

/// The true refcount of every cluster of the file, counted from references.
#[derive(Debug)]
pub(super) struct RefcountMap {
    /// Exact below `u16::MAX`; `u16::MAX` means "see `large`".
    counts: Vec<u16>,
    /// Counts of `u16::MAX` and more.
    large: HashMap<u64, u64>,
    cluster_bits: u32,
}

impl RefcountMap {
    /// A map of zero counts for every cluster of a file of `file_len` bytes.
    pub(super) fn new(file_len: u64, geometry: &Geometry) -> Result<RefcountMap> {
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
    pub(super) fn clusters(&self) -> u64 {
        self.counts.len() as u64
    }

    /// The references counted so far to cluster index `cluster`.
    pub(super) fn get(&self, cluster: u64) -> u64 {
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
    pub(super) fn add_cluster(&mut self, cluster: u64, what: &dyn Fn() -> String) -> Result<()> {
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
    pub(super) fn add_bytes(
        &mut self,
        offset: u64,
        len: u64,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
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
    pub(super) fn check_width(&self, geometry: &Geometry) -> Result<()> {
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
    FormatError::malformed("image", format!("cannot repair the dirty image: {what}"))
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
pub(super) fn read_table(storage: &dyn Storage, offset: u64, entries: u64) -> Result<Vec<u64>> {
    let mut bytes = vec![0u8; entries as usize * 8];
    storage
        .read_at(&mut bytes, offset)
        .io_at("read a table", offset)?;
    Ok(bytes.chunks_exact(8).map(|w| be64(w, 0)).collect())
}

pub(super) fn read_l2(storage: &dyn Storage, geometry: &Geometry, offset: u64) -> Result<L2Table> {
    let mut bytes = vec![0u8; geometry.cluster_size() as usize];
    storage
        .read_at(&mut bytes, offset)
        .io_at("read an L2 table", offset)?;
    Ok(L2Table::from_bytes(&bytes, geometry.extended_l2))
}

/// Counts every reference the image holds into `map`.
pub(super) fn count_references(
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
    storage
        .read_at(&mut dir, dir_offset)
        .io_at("read the bitmap directory", dir_offset)?;
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
