//! Creating an empty qcow2 version 3 image, as `qemu-img create -f qcow2`
//! does (`qcow2_co_create` in QEMU's `block/qcow2.c`).
//!
//! The layout, in host clusters:
//!
//! ```text
//! 0                      header, header extensions, backing file name
//! 1 ..                   refcount table (reftable)
//! .. ..                  refcount blocks (refblocks) covering every cluster here
//! .. end                 the active L1 table, all zeros (no L2 tables yet)
//! ```
//!
//! QEMU reaches an equivalent image in steps (a minimal header, then a
//! resize that grows the L1 table and, for large tables, the reftable); here
//! the final layout is computed up front and written once. Every cluster in
//! the file has refcount 1 and nothing else is allocated, so `qemu-img check`
//! finds neither leaks nor errors.

use super::features::{Autoclear, Compatible, Incompatible};
use super::header::{CompressionType, FeatureName, Header, MAX_BACKING_FILE_NAME};
use super::types::Geometry;
use crate::format::error::IoContext;
use crate::format::{FormatError, Result};
use crate::storage::Storage;

/// QEMU's `QCOW_MAX_L1_SIZE`: the L1 table may hold at most 32 MiB.
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// Image sizes are whole 512-byte sectors (`BDRV_SECTOR_SIZE`).
const SECTOR_SIZE: u64 = 512;

/// Extended L2 entries split a cluster in 32 subclusters of at least 512
/// bytes, so clusters must be at least 16 KiB.
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;

/// Bytes per reftable entry and per L1 entry.
const TABLE_ENTRY_SIZE: u64 = 8;

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; rounded up to a multiple of 512 as `qemu-img
    /// create` does.
    pub size: u64,
    /// log2 of the cluster size, 9 (512 B) to 21 (2 MiB); QEMU's default is
    /// 16.
    pub cluster_bits: u32,
    /// The backing file name as it is stored in the header (relative names
    /// are relative to the new image's directory), and its format for the
    /// backing format extension.
    pub backing: Option<(String, Option<String>)>,
    /// Whether L2 entries carry subcluster bitmaps (needs clusters of at
    /// least 16 KiB).
    pub extended_l2: bool,
    /// log2 of the refcount width in bits, 0 (1 bit) to 6 (64 bits); QEMU's
    /// default is 4.
    pub refcount_order: u32,
}

/// Where each structure of the new image goes, in clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    /// Clusters of the reftable; it starts at cluster 1.
    reftable_clusters: u64,
    /// Refblocks, right after the reftable.
    refblocks: u64,
    /// Entries of the L1 table.
    l1_entries: u64,
    /// Clusters of the L1 table, right after the refblocks.
    l1_clusters: u64,
}

impl Layout {
    /// Computes the smallest layout whose refblocks count every cluster of
    /// the image, themselves and the reftable included.
    ///
    /// Refblocks must cover the reftable and themselves, and a larger
    /// reftable may need another refblock, so this iterates to the fixed
    /// point; both counts only grow, so it ends.
    fn plan(geometry: &Geometry, l1_entries: u64) -> Layout {
        let cluster_size = geometry.cluster_size();
        let mut layout = Layout {
            reftable_clusters: 1,
            refblocks: 1,
            l1_entries,
            l1_clusters: (l1_entries * TABLE_ENTRY_SIZE).div_ceil(cluster_size),
        };
        loop {
            let refblocks = layout
                .total_clusters()
                .div_ceil(geometry.refblock_entries());
            let reftable_clusters = (refblocks * TABLE_ENTRY_SIZE).div_ceil(cluster_size);
            if refblocks <= layout.refblocks && reftable_clusters <= layout.reftable_clusters {
                return layout;
            }
            layout.refblocks = layout.refblocks.max(refblocks);
            layout.reftable_clusters = layout.reftable_clusters.max(reftable_clusters);
        }
    }

    /// First cluster of the refblocks.
    fn first_refblock(&self) -> u64 {
        1 + self.reftable_clusters
    }

    /// First cluster of the L1 table.
    fn first_l1_cluster(&self) -> u64 {
        self.first_refblock() + self.refblocks
    }

    /// Clusters in the image: the header and everything after it.
    fn total_clusters(&self) -> u64 {
        self.first_l1_cluster() + self.l1_clusters
    }
}

/// Creates an empty qcow2 image in `storage`, discarding whatever it held
/// (as `qemu-img create` truncates an existing file), and syncs it.
pub fn create(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
    let size = validate(options)?;
    let geometry = Geometry {
        cluster_bits: options.cluster_bits,
        extended_l2: options.extended_l2,
        refcount_order: options.refcount_order,
        external_data: false,
    };
    let layout = Layout::plan(&geometry, geometry.l1_entries_for(size));
    // Serialise first: a header that does not fit in cluster 0 (a long
    // backing name with small clusters) must fail before the file changes.
    let cluster0 = header(options, size, &geometry, &layout).serialize()?;
    let cluster_size = geometry.cluster_size();

    storage.set_len(0).io_at("empty the new image", 0)?;
    storage
        .write_at(&reftable(&geometry, &layout), cluster_size)
        .io_at("write the refcount table", cluster_size)?;
    let refblocks_at = layout.first_refblock() * cluster_size;
    storage
        .write_at(&refblocks(&geometry, &layout), refblocks_at)
        .io_at("write the refcount blocks", refblocks_at)?;
    // The L1 table is all zeros: extending the emptied file provides them.
    storage
        .set_len(layout.total_clusters() * cluster_size)
        .io_at("size the new image", layout.total_clusters() * cluster_size)?;
    // The header goes last, after the rest is durable: a crash before it
    // leaves a file without the qcow2 magic, never a qcow2 image that points
    // at tables that are not there.
    storage.sync().io("sync the new image")?;
    storage
        .write_at(&cluster0, 0)
        .io_at("write the header", 0)?;
    storage.sync().io("sync the new image")?;
    Ok(())
}

/// Checks `options` as `qcow2_co_create` and `qemu-img create` do; returns
/// the virtual size rounded up to whole sectors.
fn validate(options: &CreateOptions) -> Result<u64> {
    let invalid = |what: String| Err(FormatError::Unsupported { what });
    if !(9..=21).contains(&options.cluster_bits) {
        return invalid(format!(
            "cluster_bits {}: the cluster size must be a power of two between 512 and 2048k",
            options.cluster_bits
        ));
    }
    if options.extended_l2 && options.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
        return invalid(format!(
            "extended L2 entries with {}-byte clusters: they need clusters of at least 16384 bytes",
            1u64 << options.cluster_bits
        ));
    }
    if options.refcount_order > 6 {
        return invalid(format!(
            "refcount_order {}: refcounts are at most 64 bits wide (order 6)",
            options.refcount_order
        ));
    }
    if let Some((name, format)) = &options.backing {
        validate_backing(name, format.as_deref())?;
    }
    let size = options
        .size
        .checked_next_multiple_of(SECTOR_SIZE)
        .ok_or_else(|| too_large(options))?;
    let l2_span = Geometry {
        cluster_bits: options.cluster_bits,
        extended_l2: options.extended_l2,
        refcount_order: options.refcount_order,
        external_data: false,
    }
    .l2_span();
    if size.div_ceil(l2_span) > MAX_L1_ENTRIES {
        return Err(too_large(options));
    }
    Ok(size)
}

fn too_large(options: &CreateOptions) -> FormatError {
    FormatError::Unsupported {
        what: format!(
            "a virtual size of {} bytes with {}-byte clusters: the L1 table would exceed \
             QEMU's 32 MiB limit (try a larger cluster size)",
            options.size,
            1u64 << options.cluster_bits
        ),
    }
}

/// The header stores the name and format as C strings of bounded length.
fn validate_backing(name: &str, format: Option<&str>) -> Result<()> {
    let invalid = |what: String| Err(FormatError::Unsupported { what });
    if name.is_empty() || name.contains('\0') {
        return invalid(format!(
            "backing file name {name:?}: empty or holding a NUL byte"
        ));
    }
    if name.len() > MAX_BACKING_FILE_NAME {
        return invalid(format!(
            "a backing file name of {} bytes (at most {MAX_BACKING_FILE_NAME})",
            name.len()
        ));
    }
    match format {
        Some(format) if format.is_empty() || format.contains('\0') => invalid(format!(
            "backing format {format:?}: empty or holding a NUL byte"
        )),
        _ => Ok(()),
    }
}

/// The header of the new image: version 3, 112-byte header, nothing dirty,
/// no lazy refcounts, deflate compression.
fn header(options: &CreateOptions, size: u64, geometry: &Geometry, layout: &Layout) -> Header {
    let cluster_size = geometry.cluster_size();
    let mut incompatible = Incompatible::empty();
    if options.extended_l2 {
        incompatible |= Incompatible::EXTENDED_L2;
    }
    let (backing_file, backing_format) = match &options.backing {
        Some((name, format)) => (Some(name.clone().into_bytes()), format.clone()),
        None => (None, None),
    };
    Header {
        version: 3,
        cluster_bits: options.cluster_bits,
        size,
        crypt_method: 0,
        // Both fit in 32 bits: validate() bounds l1_entries by MAX_L1_ENTRIES,
        // and the reftable needs 8 bytes per refblock of far fewer clusters.
        l1_size: layout.l1_entries as u32,
        // Like QEMU, an image without L1 entries has no L1 table.
        l1_table_offset: match layout.l1_entries {
            0 => 0,
            _ => layout.first_l1_cluster() * cluster_size,
        },
        refcount_table_offset: cluster_size,
        refcount_table_clusters: layout.reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        unknown_incompatible: 0,
        compatible: Compatible::empty(),
        autoclear: Autoclear::empty(),
        refcount_order: options.refcount_order,
        compression_type: CompressionType::Deflate,
        backing_file,
        backing_format,
        data_file: None,
        unknown_header_fields: Vec::new(),
        feature_names: feature_names(cluster_size),
        bitmaps_extension: None,
        unknown_extensions: Vec::new(),
    }
}

/// The feature name table QEMU writes: omitted for clusters of 4 KiB and
/// less, where its 392 bytes would crowd out the backing file name.
fn feature_names(cluster_size: u64) -> Vec<FeatureName> {
    const NAMES: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    if cluster_size <= 4096 {
        return Vec::new();
    }
    NAMES
        .iter()
        .map(|&(kind, bit, name)| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        })
        .collect()
}

/// The reftable: one entry per refblock, the rest zero.
fn reftable(geometry: &Geometry, layout: &Layout) -> Vec<u8> {
    let cluster_size = geometry.cluster_size();
    let mut table = vec![0u8; (layout.reftable_clusters * cluster_size) as usize];
    for (index, entry) in table
        .chunks_exact_mut(TABLE_ENTRY_SIZE as usize)
        .take(layout.refblocks as usize)
        .enumerate()
    {
        let refblock_offset = (layout.first_refblock() + index as u64) * cluster_size;
        entry.copy_from_slice(&refblock_offset.to_be_bytes());
    }
    table
}

/// The refblocks, back to back: refcount 1 for every cluster of the image.
///
/// A refblock holds exactly `cluster_size * 8` bits of refcounts, so the
/// refblocks laid end to end are one array indexed by cluster number.
fn refblocks(geometry: &Geometry, layout: &Layout) -> Vec<u8> {
    let mut blocks = vec![0u8; (layout.refblocks * geometry.cluster_size()) as usize];
    for cluster in 0..layout.total_clusters() {
        set_refcount_to_one(&mut blocks, cluster, geometry.refcount_order);
    }
    blocks
}

/// Stores refcount 1 for entry `index` of a refcount array of width
/// `2^order` bits: entries narrower than a byte fill each byte from its
/// least significant bit (QEMU's `set_refcount_ro0..2`), wider ones are
/// big-endian.
fn set_refcount_to_one(array: &mut [u8], index: u64, order: u32) {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = index * bits;
        array[(bit / 8) as usize] |= 1 << (bit % 8);
    } else {
        let bytes = bits / 8;
        array[((index + 1) * bytes - 1) as usize] = 1;
    }
}

#[cfg(test)]
mod tests;
