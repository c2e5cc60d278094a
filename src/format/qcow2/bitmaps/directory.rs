//! The on-disk structures of persistent dirty bitmaps: the header
//! extension, the bitmap directory and bitmap table entries, parsed with
//! every check QEMU makes and serialised back (layouts in the parent
//! module's documentation).

use std::ops::RangeInclusive;

use bitflags::bitflags;

use super::super::types::HostOffset;
use crate::format::{FormatError, Result};

/// QEMU's `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// QEMU's `BME_MAX_TABLE_SIZE`: entries in one bitmap table.
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
/// QEMU's `BME_MAX_PHYS_SIZE`: bytes of data clusters one bitmap may span.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// The granularities QEMU supports, as log2 of bytes per bit.
pub const GRANULARITY_BITS: RangeInclusive<u8> = 9..=31;
/// QEMU's `BME_MAX_NAME_SIZE`.
pub const MAX_NAME_SIZE: u16 = 1023;
/// chainfs's bound on the memory that all tracked bitmaps may come to hold
/// (each at most `bitmap_table_size` clusters).
pub const MAX_TRACKED_BYTES: u64 = 1 << 30;

/// Bytes of the bitmaps header extension.
const EXTENSION_SIZE: usize = 24;
/// Bytes of the fixed part of a directory entry.
const ENTRY_HEADER_SIZE: u64 = 24;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap table entry bits 1-8 and 56-63 are reserved.
const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry bits 9-55: the data cluster offset.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

bitflags! {
    /// Flags of a bitmap directory entry; unknown bits are kept.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct BitmapFlags: u32 {
        /// Bit 0: the bitmap was not saved correctly and may be inconsistent.
        const IN_USE = 1 << 0;
        /// Bit 1: enabled; every write to the image must be recorded.
        const AUTO = 1 << 1;
        /// Bit 2: unknown extra data may be ignored.
        const EXTRA_DATA_COMPATIBLE = 1 << 2;
    }
}

impl BitmapFlags {
    /// The flags QEMU (and so chainfs) accepts; QEMU treats bit 2 as
    /// reserved since it accepts no extra data at all.
    pub const SUPPORTED: BitmapFlags = BitmapFlags::IN_USE.union(BitmapFlags::AUTO);
}

/// The bitmaps header extension: where the directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extension {
    /// Entries in the directory.
    pub nb_bitmaps: u32,
    /// Bytes of the directory.
    pub directory_size: u64,
    /// Host offset of the directory.
    pub directory_offset: u64,
}

impl Extension {
    /// No directory (an image without bitmaps).
    pub const NONE: Extension = Extension {
        nb_bitmaps: 0,
        directory_size: 0,
        directory_offset: 0,
    };

    /// Decodes and validates the extension's bytes as QEMU does, and checks
    /// that the directory lies inside the file.
    pub fn parse(data: &[u8], cluster_size: u64, file_len: u64) -> Result<Extension> {
        if data.len() != EXTENSION_SIZE {
            return Err(malformed(format!(
                "the bitmaps extension is {} bytes, not {EXTENSION_SIZE}",
                data.len()
            )));
        }
        if be32(data, 4) != 0 {
            return Err(malformed(
                "the bitmaps extension's reserved field is not zero",
            ));
        }
        let ext = Extension {
            nb_bitmaps: be32(data, 0),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        };
        if !(1..=MAX_BITMAPS).contains(&ext.nb_bitmaps) {
            return Err(malformed(format!(
                "the bitmaps extension counts {} bitmaps (1 to {MAX_BITMAPS})",
                ext.nb_bitmaps
            )));
        }
        if !(1..=MAX_DIRECTORY_SIZE).contains(&ext.directory_size) {
            return Err(malformed(format!(
                "bitmap directory of {} bytes (1 to {MAX_DIRECTORY_SIZE})",
                ext.directory_size
            )));
        }
        let offset = ext.directory_offset;
        if offset == 0 || offset % cluster_size != 0 {
            return Err(malformed(format!(
                "bitmap directory offset {offset:#x} is not a cluster after the header"
            )));
        }
        check_in_file(offset, ext.directory_size, file_len, "the bitmap directory")?;
        Ok(ext)
    }

    /// The extension's bytes.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(EXTENSION_SIZE);
        out.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&self.directory_size.to_be_bytes());
        out.extend_from_slice(&self.directory_offset.to_be_bytes());
        out
    }
}

/// One entry of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// The flags, unknown bits included.
    pub flags: BitmapFlags,
    /// The bitmap type (1: dirty tracking).
    pub kind: u8,
    /// log2 of the guest bytes that one bit covers.
    pub granularity_bits: u8,
    /// The name, as bytes (QEMU does not require UTF-8).
    pub name: Vec<u8>,
    /// Type-specific extra data, kept as found.
    pub extra_data: Vec<u8>,
}

impl DirEntry {
    /// The name, for messages.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// Whether writes must be recorded in this bitmap: enabled, and not
    /// already inconsistent.
    pub fn is_tracked(&self) -> bool {
        self.flags.contains(BitmapFlags::AUTO) && !self.flags.contains(BitmapFlags::IN_USE)
    }

    /// Applies QEMU's checks (`check_dir_entry`, plus its refusal of extra
    /// data) for an image of `virtual_size` bytes.
    pub fn check(&self, cluster_size: u64, virtual_size: u64) -> Result<()> {
        let name = self.display_name();
        let unsupported = |what: String| FormatError::Unsupported {
            what: format!("bitmap {name:?}: {what}"),
        };
        if !self.extra_data.is_empty() {
            return Err(unsupported("extra data".into()));
        }
        let unknown = self.flags.bits() & !BitmapFlags::SUPPORTED.bits();
        if unknown != 0 {
            return Err(unsupported(format!("unknown flags {unknown:#x}")));
        }
        if self.kind != TYPE_DIRTY_TRACKING {
            return Err(unsupported(format!("bitmap type {}", self.kind)));
        }
        if !GRANULARITY_BITS.contains(&self.granularity_bits) {
            return Err(unsupported(format!(
                "granularity_bits {} (QEMU supports {GRANULARITY_BITS:?})",
                self.granularity_bits
            )));
        }
        if self.name.is_empty() || self.name.len() > usize::from(MAX_NAME_SIZE) {
            return Err(unsupported(format!(
                "a name of {} bytes (1 to {MAX_NAME_SIZE})",
                self.name.len()
            )));
        }
        self.check_table_position(cluster_size, virtual_size)
            .map_err(|what| malformed(format!("bitmap {name:?}: {what}")))
    }

    fn check_table_position(&self, cluster_size: u64, virtual_size: u64) -> Result<(), String> {
        let offset = self.table_offset;
        if offset == 0 || offset % cluster_size != 0 {
            return Err(format!("bitmap table offset {offset:#x} is not a cluster"));
        }
        let phys = u64::from(self.table_size) * cluster_size;
        if self.table_size == 0 || self.table_size > MAX_TABLE_ENTRIES || phys > MAX_PHYS_SIZE {
            return Err(format!("bitmap table of {} entries", self.table_size));
        }
        // phys <= 2^29 and granularity_bits <= 31: this cannot overflow.
        let covered = (phys * 8) << self.granularity_bits;
        if !self.flags.contains(BitmapFlags::IN_USE) && virtual_size > covered {
            return Err(format!("its table covers only {covered} guest bytes"));
        }
        Ok(())
    }
}

/// Directory entry size for a name and extra data of these lengths.
pub(super) fn entry_size(name_len: u64, extra_len: u64) -> u64 {
    (ENTRY_HEADER_SIZE + name_len + extra_len).next_multiple_of(8)
}

/// Decodes a bitmap directory of `nb_bitmaps` entries that fills `bytes`
/// exactly, as QEMU's `bitmap_list_load` does (entries are checked apart,
/// by [`DirEntry::check`]).
pub fn parse_directory(bytes: &[u8], nb_bitmaps: u32) -> Result<Vec<DirEntry>> {
    let len = bytes.len() as u64;
    let mut entries = Vec::new();
    let mut at = 0u64;
    while at < len {
        if at + ENTRY_HEADER_SIZE > len {
            return Err(malformed("bitmap directory entry runs past the directory"));
        }
        if entries.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(malformed(format!(
                "more bitmaps in the directory than the {nb_bitmaps} the extension counts"
            )));
        }
        let head = &bytes[at as usize..(at + ENTRY_HEADER_SIZE) as usize];
        let name_len = u64::from(u16::from_be_bytes([head[18], head[19]]));
        let extra_len = u64::from(be32(head, 20));
        let size = entry_size(name_len, extra_len);
        if at + size > len {
            return Err(malformed("bitmap directory entry runs past the directory"));
        }
        let extra_at = (at + ENTRY_HEADER_SIZE) as usize;
        let name_at = extra_at + extra_len as usize;
        entries.push(DirEntry {
            table_offset: be64(head, 0),
            table_size: be32(head, 8),
            flags: BitmapFlags::from_bits_retain(be32(head, 12)),
            kind: head[16],
            granularity_bits: head[17],
            extra_data: bytes[extra_at..name_at].to_vec(),
            name: bytes[name_at..name_at + name_len as usize].to_vec(),
        });
        at += size;
    }
    if entries.len() as u64 != u64::from(nb_bitmaps) {
        return Err(malformed(format!(
            "the bitmap directory holds {} bitmaps, the extension counts {nb_bitmaps}",
            entries.len()
        )));
    }
    Ok(entries)
}

/// Encodes a bitmap directory, zero padding included.
pub fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        out.extend_from_slice(&entry.table_offset.to_be_bytes());
        out.extend_from_slice(&entry.table_size.to_be_bytes());
        out.extend_from_slice(&entry.flags.bits().to_be_bytes());
        out.push(entry.kind);
        out.push(entry.granularity_bits);
        out.extend_from_slice(&(entry.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(entry.extra_data.len() as u32).to_be_bytes());
        out.extend_from_slice(&entry.extra_data);
        out.extend_from_slice(&entry.name);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// A decoded bitmap table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    /// The cluster of bitmap data reads as all zeros.
    Zeros,
    /// The cluster of bitmap data reads as all ones.
    Ones,
    /// The cluster of bitmap data is stored here.
    Data(HostOffset),
}

impl TableEntry {
    /// Decodes an entry, refusing what QEMU's `check_table_entry` refuses.
    pub fn decode(raw: u64, cluster_size: u64) -> Result<TableEntry> {
        let offset = raw & TABLE_OFFSET_MASK;
        let bad = raw & TABLE_RESERVED_MASK != 0
            || (offset != 0 && (raw & 1 != 0 || offset % cluster_size != 0));
        if bad {
            return Err(malformed(format!("invalid bitmap table entry {raw:#x}")));
        }
        Ok(match (offset, raw & 1) {
            (0, 0) => TableEntry::Zeros,
            (0, _) => TableEntry::Ones,
            (host, _) => TableEntry::Data(HostOffset(host)),
        })
    }

    /// The entry's on-disk value.
    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => 1,
            TableEntry::Data(host) => host.0,
        }
    }
}

pub(super) fn check_in_file(offset: u64, len: u64, file_len: u64, what: &str) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(malformed(format!(
            "{what} at {offset:#x} ({len} bytes) lies past the end of the file ({file_len})"
        ))),
    }
}

pub(super) fn malformed(what: impl Into<String>) -> FormatError {
    FormatError::malformed("bitmaps", what)
}

pub(super) fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

pub(super) fn be64(buf: &[u8], at: usize) -> u64 {
    (u64::from(be32(buf, at)) << 32) | u64::from(be32(buf, at + 4))
}
