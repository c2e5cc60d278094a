//! Checks on a decoded header before any table it points to is trusted: the
//! checks QEMU's `qcow2_do_open` makes (with `qcow2_validate_table`,
//! `validate_compression_type` and the bitmaps part of
//! `qcow2_read_extensions`), plus, since chainfs never reads past the end of
//! an image, that each table lies inside the file.
//!
//! Each error names the header field and its value.

use super::{cluster_bits_in_range, version_supported, CompressionType, Header};
use super::{MAX_BACKING_FILE_NAME, MAX_BACKING_FORMAT_NAME};
use crate::format::qcow2::features::{Autoclear, Incompatible};
use crate::format::{FormatError, Result};

/// QEMU's `QCOW_MAX_L1_SIZE`: an active L1 table of at most 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Entries in an L1 table of [`MAX_L1_BYTES`].
pub const MAX_L1_ENTRIES: u64 = MAX_L1_BYTES / L1_ENTRY_LEN;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE`: a refcount table of at most 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Bytes of the fixed part of a snapshot table entry (`QCowSnapshotHeader`);
/// every entry is at least this long.
pub const MIN_SNAPSHOT_ENTRY_LEN: u64 = 40;
/// QEMU's `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;

const L1_ENTRY_LEN: u64 = 8;
/// Length of the bitmaps header extension.
const BITMAPS_EXTENSION_LEN: usize = 24;
/// With extended L2 entries a cluster has 32 subclusters, which QEMU wants
/// to be at least 512 bytes: clusters of at least 16 KiB.
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// The highest refcount_order: 64-bit refcounts.
const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU keeps L1 indexes in an `int`.
const MAX_L1_INDEX: u64 = i32::MAX as u64;

/// A table the header points to, for [`Header::check_table`].
struct Table {
    /// What the table is called in messages.
    name: &'static str,
    /// The header field holding its offset.
    offset_field: &'static str,
    offset: u64,
    /// Bytes the table occupies (at least).
    len: u64,
}

impl Header {
    /// Checks the header as QEMU does when it opens an image, and checks
    /// that the tables it points to lie inside a file of `file_len` bytes.
    ///
    /// Call it before reading any table: after it, offsets and sizes of the
    /// L1, refcount and snapshot tables are safe to allocate and read.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        version_supported(self.version)?;
        cluster_bits_in_range(self.cluster_bits)?;
        self.check_v2_fields()?;
        self.check_compression_type()?;
        self.check_incompatible_features()?;
        self.check_extended_l2()?;
        self.check_refcount_order()?;
        self.check_encryption()?;
        self.check_refcount_table(file_len)?;
        self.check_snapshot_table(file_len)?;
        self.check_l1_table(file_len)?;
        self.check_bitmaps_extension(file_len)?;
        self.check_data_file()?;
        self.check_backing_names()
    }

    /// Version 2 has none of the version 3 fields; a header that claims
    /// version 2 while carrying them would lose them when written.
    pub(super) fn check_v2_fields(&self) -> Result<()> {
        if self.version != 2 {
            return Ok(());
        }
        let v3_only = [
            (
                "incompatible_features",
                self.incompatible.bits() | self.unknown_incompatible,
            ),
            ("compatible_features", self.compatible.bits()),
            ("autoclear_features", self.autoclear.bits()),
        ];
        for (field, bits) in v3_only {
            if bits != 0 {
                return Err(FormatError::malformed(
                    "header",
                    format!(
                        "version 2 header has {field} {bits:#x}; only version 3 has that field"
                    ),
                ));
            }
        }
        if self.refcount_order != 4 {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "version 2 header has refcount_order {}; version 2 refcounts are 16 bits",
                    self.refcount_order
                ),
            ));
        }
        if self.compression_type != CompressionType::Deflate
            || !self.unknown_header_fields.is_empty()
        {
            return Err(FormatError::malformed("header", "version 2 header has version 3 fields (compression_type or header fields past byte 112)"));
        }
        Ok(())
    }

    /// QEMU's `validate_compression_type`: the compression type bit is set
    /// exactly when the type is not deflate.
    fn check_compression_type(&self) -> Result<()> {
        let bit = self.incompatible.contains(Incompatible::COMPRESSION_TYPE);
        match (self.compression_type, bit) {
            (CompressionType::Deflate, true) => Err(FormatError::malformed(
                "header",
                "incompatible feature bit 3 (compression type) is set, but compression_type \
                 is 0 (deflate); the bit must be clear for deflate",
            )),
            (CompressionType::Zstd, false) => Err(FormatError::malformed(
                "header",
                "compression_type is 1 (zstd), but incompatible feature bit 3 \
                 (compression type) is clear",
            )),
            _ => Ok(()),
        }
    }

    fn check_incompatible_features(&self) -> Result<()> {
        if self.unknown_incompatible == 0 {
            return Ok(());
        }
        Err(FormatError::UnknownIncompatibleFeatures {
            features: self.unknown_incompatible_names(),
        })
    }

    fn check_extended_l2(&self) -> Result<()> {
        if !self.incompatible.contains(Incompatible::EXTENDED_L2) {
            return Ok(());
        }
        if self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "extended L2 entries need cluster_bits >= {MIN_EXTENDED_L2_CLUSTER_BITS} \
                 (subclusters of at least 512 bytes), but cluster_bits is {}",
                    self.cluster_bits
                ),
            ));
        }
        Ok(())
    }

    fn check_refcount_order(&self) -> Result<()> {
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(FormatError::malformed(
                "header",
                format!(
                "refcount_order {} is above {MAX_REFCOUNT_ORDER} (refcounts of at most 64 bits)",
                self.refcount_order
            ),
            ));
        }
        Ok(())
    }

    fn check_encryption(&self) -> Result<()> {
        match self.crypt_method {
            0 => Ok(()),
            1 | 2 => Err(FormatError::Encrypted),
            method => Err(FormatError::Unsupported {
                what: format!("crypt_method {method} (unknown encryption method)"),
            }),
        }
    }

    fn check_refcount_table(&self, file_len: u64) -> Result<()> {
        let clusters = u64::from(self.refcount_table_clusters);
        if clusters == 0 {
            return Err(FormatError::malformed(
                "header",
                "refcount_table_clusters is 0: the image has no refcount table",
            ));
        }
        let max = MAX_REFTABLE_BYTES / self.cluster_size();
        if clusters > max {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "refcount_table_clusters {clusters} exceeds the limit of {max} clusters \
                 (an 8 MiB refcount table)"
                ),
            ));
        }
        self.check_table(
            &Table {
                name: "refcount table",
                offset_field: "refcount_table_offset",
                offset: self.refcount_table_offset,
                len: clusters * self.cluster_size(),
            },
            file_len,
        )
    }

    fn check_snapshot_table(&self, file_len: u64) -> Result<()> {
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "nb_snapshots {} exceeds the limit of {MAX_SNAPSHOTS}",
                    self.nb_snapshots
                ),
            ));
        }
        // Entries have variable length; the snapshot table reader checks
        // the full length. Here: the fixed part of every entry.
        self.check_table(
            &Table {
                name: "snapshot table",
                offset_field: "snapshots_offset",
                offset: self.snapshots_offset,
                len: u64::from(self.nb_snapshots) * MIN_SNAPSHOT_ENTRY_LEN,
            },
            file_len,
        )
    }

    fn check_l1_table(&self, file_len: u64) -> Result<()> {
        let entries = u64::from(self.l1_size);
        if entries > MAX_L1_ENTRIES {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "l1_size {entries} exceeds the limit of {MAX_L1_ENTRIES} entries \
                 (a 32 MiB L1 table)"
                ),
            ));
        }
        self.check_table(
            &Table {
                name: "active L1 table",
                offset_field: "l1_table_offset",
                offset: self.l1_table_offset,
                len: entries * L1_ENTRY_LEN,
            },
            file_len,
        )?;
        let needed = self.l1_entries_needed();
        if needed > MAX_L1_INDEX {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "size {} is too big: it needs {needed} L1 entries",
                    self.size
                ),
            ));
        }
        if entries < needed {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "l1_size {entries} is too small for size {}, which needs {needed} L1 entries",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// L1 entries needed to map `size` bytes: each L2 table maps one
    /// cluster's worth of entries, each a cluster.
    pub fn l1_entries_needed(&self) -> u64 {
        let l2_entry_len: u32 = if self.incompatible.contains(Incompatible::EXTENDED_L2) {
            16
        } else {
            8
        };
        let cluster_bits = self.cluster_bits.min(MAX_CLUSTER_BITS_FOR_MATH);
        // log2 of the bytes one L2 table maps: 2 * 21 - 3 = 39 at most for
        // a checked header.
        let l2_bits = (2 * cluster_bits).saturating_sub(l2_entry_len.trailing_zeros());
        self.size.div_ceil(1u64 << l2_bits)
    }

    /// Common checks on a table the header points to, as QEMU's
    /// `qcow2_validate_table` (offset and end below 2^63, cluster-aligned
    /// offset, even for an empty table), and
    /// further: a non-empty table is outside cluster 0 and inside the file.
    fn check_table(&self, table: &Table, file_len: u64) -> Result<()> {
        let Table {
            name,
            offset_field,
            offset,
            len,
        } = *table;
        // QEMU passes offsets on as signed 64-bit values.
        if offset > i64::MAX as u64 {
            return Err(FormatError::malformed(
                "header",
                format!("{offset_field} {offset:#x} is beyond the largest file offset"),
            ));
        }
        if offset % self.cluster_size() != 0 {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "{offset_field} {offset:#x} is not aligned to the cluster size {}",
                    self.cluster_size()
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        if offset < self.cluster_size() {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "the {name} at {offset_field} {offset:#x} overlaps the header in cluster 0"
                ),
            ));
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= i64::MAX as u64);
        match end {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(FormatError::malformed(
                "header",
                format!(
                    "the {name} at {offset_field} {offset:#x} ({len} bytes) runs past the end \
                 of the file ({file_len} bytes)"
                ),
            )),
        }
    }

    /// The bitmaps extension counts only when the autoclear bit says it is
    /// consistent; QEMU then checks it as below.
    fn check_bitmaps_extension(&self, file_len: u64) -> Result<()> {
        let Some(data) = &self.bitmaps_extension else {
            return Ok(());
        };
        if !self.autoclear.contains(Autoclear::BITMAPS) {
            return Ok(());
        }
        if data.len() != BITMAPS_EXTENSION_LEN {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "bitmaps extension is {} bytes long, not {BITMAPS_EXTENSION_LEN}",
                    data.len()
                ),
            ));
        }
        let field32 =
            |at: usize| u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let field64 = |at: usize| (u64::from(field32(at)) << 32) | u64::from(field32(at + 4));
        let (nb_bitmaps, reserved) = (field32(0), field32(4));
        let (directory_size, directory_offset) = (field64(8), field64(16));
        if reserved != 0 {
            return Err(FormatError::malformed(
                "header",
                format!("bitmaps extension: reserved field is {reserved:#x}, not zero"),
            ));
        }
        if nb_bitmaps == 0 || nb_bitmaps > MAX_BITMAPS {
            return Err(FormatError::malformed(
                "header",
                format!("bitmaps extension: nb_bitmaps {nb_bitmaps} is outside 1..={MAX_BITMAPS}"),
            ));
        }
        if directory_size > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "bitmaps extension: bitmap_directory_size {directory_size} exceeds \
                 {MAX_BITMAP_DIRECTORY_BYTES}"
                ),
            ));
        }
        self.check_table(
            &Table {
                name: "bitmap directory",
                offset_field: "bitmap_directory_offset",
                offset: directory_offset,
                len: directory_size,
            },
            file_len,
        )
    }

    /// An external data file needs its name (chainfs has no option to give
    /// it otherwise); the raw-data-file bit needs an external data file.
    fn check_data_file(&self) -> Result<()> {
        let external = self.incompatible.contains(Incompatible::EXTERNAL_DATA_FILE);
        match &self.data_file {
            None if external => Err(FormatError::malformed(
                "header",
                "incompatible feature bit 2 (external data file) is set, but the header has \
                 no external data file name extension",
            )),
            Some(name) if external && name.is_empty() => Err(FormatError::malformed(
                "header",
                "the external data file name extension is empty",
            )),
            _ if !external && self.autoclear.contains(Autoclear::DATA_FILE_RAW) => {
                Err(FormatError::malformed(
                    "header",
                    "autoclear feature bit 1 (raw external data) is set without incompatible \
                     feature bit 2 (external data file)",
                ))
            }
            _ => Ok(()),
        }
    }

    fn check_backing_names(&self) -> Result<()> {
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_FILE_NAME {
                return Err(FormatError::malformed(
                    "header",
                    format!(
                        "backing_file_size {} exceeds {MAX_BACKING_FILE_NAME}",
                        name.len()
                    ),
                ));
            }
        }
        if let Some(format) = &self.backing_format {
            if format.len() > MAX_BACKING_FORMAT_NAME {
                return Err(FormatError::malformed(
                    "header",
                    format!(
                        "backing format name of {} bytes exceeds {MAX_BACKING_FORMAT_NAME}",
                        format.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Caps cluster_bits in size arithmetic so that a header not yet checked
/// cannot overflow a shift.
const MAX_CLUSTER_BITS_FOR_MATH: u32 = 31;
