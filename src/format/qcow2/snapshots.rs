//! The internal snapshot table (`docs/interop/qcow2.txt`, "Snapshots"),
//! read and validated as QEMU's `qcow2_do_read_snapshots` does.
//!
//! The table starts at the cluster-aligned `snapshots_offset` of the header
//! and holds `nb_snapshots` entries, each 8-byte aligned:
//!
//! ```text
//!  0 ..  7  l1_table_offset   cluster-aligned offset of the snapshot's L1 table
//!  8 .. 11  l1_size           entries in that L1 table
//! 12 .. 13  id_str_size       bytes of the unique ID string
//! 14 .. 15  name_size         bytes of the name
//! 16 .. 19  date_sec          when it was taken, seconds since the Epoch
//! 20 .. 23  date_nsec         and the nanoseconds
//! 24 .. 31  vm_clock_nsec     guest run time at the snapshot
//! 32 .. 35  vm_state_size     VM state bytes (32-bit; see the extra data)
//! 36 .. 39  extra_data_size   bytes of extra data that follow
//! 40 ..     extra data        optional 64-bit fields: vm_state_size_large,
//!                             disk_size, icount; unknown ones kept as they are
//!           id string, name   not NUL-terminated
//!           padding           to a multiple of 8
//! ```
//!
//! chainfs shows only the active L1 table, but it must know the snapshots'
//! L1 tables (their clusters are shared, refcount > 1) and the table's own
//! clusters, to copy before writing and to rebuild refcounts.

use std::ops::Range;

use crate::format::error::IoContext;
use crate::format::{FormatError, Result};
use crate::storage::Storage;

/// QEMU's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`: the whole table, IDs and names
/// included, may hold at most 64 MiB.
pub const MAX_TABLE_SIZE: u64 = 1024 * MAX_SNAPSHOTS as u64;

/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`: extra data per entry.
pub const MAX_EXTRA_DATA: u32 = 1024;

/// QEMU's `QCOW_MAX_L1_SIZE` in entries: an L1 table holds at most 32 MiB.
pub const MAX_L1_ENTRIES: u32 = (32 << 20) / 8;

/// Bytes of the fixed part of an entry.
const ENTRY_HEADER_SIZE: u64 = 40;

/// Entries start on 8-byte boundaries.
const ENTRY_ALIGNMENT: u64 = 8;

/// One internal snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table (cluster aligned).
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// The unique ID string (bytes that are not UTF-8 are replaced).
    pub id: String,
    /// The name (bytes that are not UTF-8 are replaced).
    pub name: String,
    /// When the snapshot was taken, in seconds since the Epoch.
    pub date_sec: u32,
    /// Nanoseconds part of `date_sec`.
    pub date_nsec: u32,
    /// Guest run time at the snapshot, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state: the 64-bit size from the extra data when
    /// present, else the 32-bit field.
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken, if the extra data
    /// records it (version 3 images must; QEMU assumes the current size
    /// otherwise).
    pub disk_size: Option<u64>,
    /// Guest instruction count at the snapshot, if recorded.
    pub icount: Option<u64>,
    /// The whole extra data as found, unknown fields included, to be copied
    /// unchanged if the table is ever rewritten.
    pub extra_data: Vec<u8>,
    /// Bytes the entry occupies in the table, without its trailing padding.
    pub entry_len: u64,
}

/// Reads and validates the snapshot table of `count` entries at `offset` in
/// an image of `file_len` bytes with clusters of `2^cluster_bits` bytes.
///
/// Everything QEMU checks when it opens an image is checked (entry count,
/// table alignment and size, extra data size), and beyond that everything
/// QEMU checks before it uses a snapshot (L1 alignment and size), plus that
/// the table and every L1 table lie inside the file.
pub fn read_snapshot_table(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
    cluster_bits: u32,
    file_len: u64,
) -> Result<Vec<Snapshot>> {
    let cluster_size = 1u64 << cluster_bits.clamp(9, 21);
    validate_table_position(offset, count, cluster_size)?;
    let mut reader = TableReader {
        storage,
        start: offset,
        pos: offset,
        file_len,
    };
    let mut snapshots = Vec::new();
    for index in 0..count {
        let snapshot = read_entry(&mut reader, index)?;
        validate_l1(&snapshot, index, cluster_size, file_len)?;
        snapshots.push(snapshot);
    }
    Ok(snapshots)
}

/// Bytes the table occupies from its offset, as QEMU counts them
/// (`snapshots_size`): entries with the padding between them, none after
/// the last.
pub fn table_size(snapshots: &[Snapshot]) -> u64 {
    snapshots.iter().fold(0, |size, snapshot| {
        size.next_multiple_of(ENTRY_ALIGNMENT) + snapshot.entry_len
    })
}

/// The host bytes of the table at `offset`; empty without snapshots.
pub fn table_range(offset: u64, snapshots: &[Snapshot]) -> Range<u64> {
    offset..offset + table_size(snapshots)
}

/// QEMU's open-time checks of the header fields (`qcow2_validate_table`).
fn validate_table_position(offset: u64, count: u32, cluster_size: u64) -> Result<()> {
    if count > MAX_SNAPSHOTS {
        return Err(FormatError::malformed(
            "snapshot table",
            format!("{count} snapshots (at most {MAX_SNAPSHOTS})"),
        ));
    }
    // QEMU checks the offset even when there are no snapshots.
    let minimum_end = offset.checked_add(u64::from(count) * ENTRY_HEADER_SIZE);
    let fits = matches!(minimum_end, Some(end) if end <= i64::MAX as u64);
    if offset % cluster_size != 0 || !fits {
        return Err(FormatError::malformed_at(
            "snapshot table",
            offset,
            "is invalid (not cluster aligned or too large)",
        ));
    }
    if count > 0 && offset == 0 {
        return Err(FormatError::malformed_at(
            "snapshot table",
            0,
            "overlaps the image header",
        ));
    }
    Ok(())
}

/// Reads the table in order, refusing anything past the end of the file.
struct TableReader<'a> {
    storage: &'a dyn Storage,
    start: u64,
    pos: u64,
    file_len: u64,
}

impl TableReader<'_> {
    /// Reads the next `len` bytes (at most 64 KiB: every field length in an
    /// entry is 16 bits, or bounded by [`MAX_EXTRA_DATA`]).
    fn read(&mut self, len: u64, what: &str, index: u32) -> Result<Vec<u8>> {
        let end = self.pos + len;
        if end > self.file_len {
            return Err(FormatError::malformed(
                "snapshot table",
                format!(
                    "entry {index}: {what} ({len} bytes at {:#x}) runs past the end of the \
                     file ({:#x})",
                    self.pos, self.file_len
                ),
            ));
        }
        if end - self.start > MAX_TABLE_SIZE {
            return Err(FormatError::malformed(
                "snapshot table",
                format!("entry {index}: the table exceeds {MAX_TABLE_SIZE} bytes"),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        self.storage
            .read_at(&mut buf, self.pos)
            .io_at("read the snapshot table", self.pos)?;
        self.pos = end;
        Ok(buf)
    }

    /// Moves to the next 8-byte boundary, where every entry starts.
    fn align(&mut self) {
        self.pos = self.pos.next_multiple_of(ENTRY_ALIGNMENT);
    }
}

fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn be64(buf: &[u8], at: usize) -> u64 {
    (u64::from(be32(buf, at)) << 32) | u64::from(be32(buf, at + 4))
}

/// The 64-bit field at `at` of the extra data, if the extra data reaches
/// that far.
fn extra_field(extra: &[u8], at: usize) -> Option<u64> {
    (extra.len() >= at + 8).then(|| be64(extra, at))
}

/// Reads entry `index`, which starts at the reader's next 8-byte boundary.
fn read_entry(reader: &mut TableReader<'_>, index: u32) -> Result<Snapshot> {
    reader.align();
    let entry_start = reader.pos;
    let fixed = reader.read(ENTRY_HEADER_SIZE, "the entry header", index)?;
    let extra_data_size = be32(&fixed, 36);
    if extra_data_size > MAX_EXTRA_DATA {
        return Err(FormatError::malformed(
            "snapshot table",
            format!(
                "entry {index}: {extra_data_size} bytes of extra data (at most {MAX_EXTRA_DATA})"
            ),
        ));
    }
    let extra_data = reader.read(u64::from(extra_data_size), "the extra data", index)?;
    let id = reader.read(u64::from(be16(&fixed, 12)), "the ID string", index)?;
    let name = reader.read(u64::from(be16(&fixed, 14)), "the name", index)?;
    Ok(Snapshot {
        l1_table_offset: be64(&fixed, 0),
        l1_size: be32(&fixed, 8),
        id: String::from_utf8_lossy(&id).into_owned(),
        name: String::from_utf8_lossy(&name).into_owned(),
        date_sec: be32(&fixed, 16),
        date_nsec: be32(&fixed, 20),
        vm_clock_nsec: be64(&fixed, 24),
        vm_state_size: extra_field(&extra_data, 0).unwrap_or(u64::from(be32(&fixed, 32))),
        disk_size: extra_field(&extra_data, 8),
        icount: extra_field(&extra_data, 16),
        extra_data,
        entry_len: reader.pos - entry_start,
    })
}

/// The checks QEMU makes before it uses a snapshot's L1 table
/// (`qcow2_validate_table` with `QCOW_MAX_L1_SIZE`), and that the table is
/// in the file.
fn validate_l1(snapshot: &Snapshot, index: u32, cluster_size: u64, file_len: u64) -> Result<()> {
    let offset = snapshot.l1_table_offset;
    let what = |problem: String| {
        Err(FormatError::malformed(
            "snapshot table",
            format!("snapshot {index} (id {:?}): {problem}", snapshot.id),
        ))
    };
    if snapshot.l1_size > MAX_L1_ENTRIES {
        return what(format!(
            "an L1 table of {} entries (at most {MAX_L1_ENTRIES})",
            snapshot.l1_size
        ));
    }
    if offset % cluster_size != 0 {
        return what(format!(
            "L1 table offset {offset:#x} is not cluster aligned"
        ));
    }
    // An empty L1 table occupies nothing; QEMU writes offset 0 for it.
    let end = offset + u64::from(snapshot.l1_size) * 8;
    if snapshot.l1_size > 0 && (offset == 0 || end > file_len) {
        return what(format!(
            "L1 table at {offset:#x} of {} entries lies outside the image (file of {file_len:#x} bytes)",
            snapshot.l1_size
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
