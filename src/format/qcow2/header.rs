//! The qcow2 header (cluster 0): fixed fields, header extensions and the
//! backing file name, as `docs/interop/qcow2.txt` lays them out.
//!
//! All integers are big-endian. Version 2 headers end at byte 72; version 3
//! headers give their own length (at least 104 bytes, a multiple of 8).
//! Header extensions follow the header; the backing file name, if any, sits
//! after them, still inside cluster 0.
//!
//! [`Header::parse`] decodes cluster 0 and refuses what cannot be decoded
//! (bad magic, unknown version, an extension running out of cluster 0...);
//! [`Header::validate`] then checks the decoded fields against each other and
//! against the file, as QEMU's `qcow2_do_open` does, before any table is read.

mod serialize;
mod validate;

#[cfg(test)]
mod tests;

use super::features::{describe_bits, Autoclear, Compatible, FeatureKind, Incompatible};
use super::types::Geometry;
use super::MAGIC;
use crate::format::error::IoContext;
use crate::format::{FormatError, Result};
use crate::storage::Storage;

/// Length of a version 2 header, and of the part common to both versions.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest valid version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Length of the version 3 header chainfs writes (with compression type).
const V3_HEADER_LEN: u32 = 112;
/// Offset of the `compression_type` byte (present when header_length > 104).
const COMPRESSION_TYPE_OFFSET: usize = 104;
/// Smallest cluster_bits: 512-byte clusters.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU opens: 2 MiB clusters.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the backing file name (`docs/interop/qcow2.txt`).
pub const MAX_BACKING_FILE_NAME: usize = 1023;
/// QEMU's limit on the backing format name: it must fit, NUL included, in
/// `BlockDriverState::backing_format[16]`.
pub const MAX_BACKING_FORMAT_NAME: usize = 15;
/// Bytes per entry of the feature name table extension.
const FEATURE_NAME_ENTRY_LEN: usize = 48;
/// Bytes of the name inside a feature name table entry.
const FEATURE_NAME_LEN: usize = FEATURE_NAME_ENTRY_LEN - 2;

/// Header extension types.
mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;

    /// The name of an extension type, for messages.
    pub fn name(kind: u32) -> &'static str {
        match kind {
            END => "end of extensions",
            BACKING_FORMAT => "backing format",
            FEATURE_NAMES => "feature name table",
            BITMAPS => "bitmaps",
            FULL_DISK_ENCRYPTION => "full disk encryption header",
            DATA_FILE => "external data file name",
            _ => "unknown",
        }
    }
}

/// How compressed clusters are compressed (header byte 104).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951) with a 4 KiB window.
    Deflate,
    /// A zstd frame.
    Zstd,
}

/// One entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0: incompatible, 1: compatible, 2: autoclear.
    pub kind: u8,
    /// Bit number in that field.
    pub bit: u8,
    /// Human-readable name (at most 46 bytes on disk).
    pub name: String,
}

/// The decoded header of a qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0: none, 1: AES, 2: LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots in the snapshot table.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible: Incompatible,
    /// Incompatible bits chainfs does not know, kept apart for the error.
    pub unknown_incompatible: u64,
    /// Compatible feature bits (v3), unknown ones included.
    pub compatible: Compatible,
    /// Autoclear feature bits (v3), unknown ones included.
    pub autoclear: Autoclear,
    /// log2 of the refcount width in bits (4 for version 2).
    pub refcount_order: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Header bytes from 112 up to `header_length` that chainfs does not
    /// know; the spec asks a writer to preserve them.
    pub unknown_header_fields: Vec<u8>,
    /// Backing file name, if any, as stored: bytes, not necessarily UTF-8
    /// (QEMU takes any bytes but NUL, and so does the host filesystem).
    pub backing_file: Option<Vec<u8>>,
    /// Backing format from the backing format extension.
    pub backing_format: Option<String>,
    /// External data file name from the data file extension.
    pub data_file: Option<String>,
    /// The feature name table, as found.
    pub feature_names: Vec<FeatureName>,
    /// Raw content of the bitmaps extension, kept as found.
    pub bitmaps_extension: Option<Vec<u8>>,
    /// Extensions chainfs does not interpret, kept to be written back.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

/// Big-endian u32 at `at`; `buf` must hold it (callers check lengths first).
fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Big-endian u64 at `at`; `buf` must hold it.
fn be64(buf: &[u8], at: usize) -> u64 {
    (u64::from(be32(buf, at)) << 32) | u64::from(be32(buf, at + 4))
}

/// A string stored without terminator. QEMU reads these into C strings, so
/// the name ends at the first NUL, as QEMU sees it.
fn stored_string(bytes: &[u8], what: &str) -> Result<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec())
        .map_err(|_| FormatError::malformed("header", format!("the {what} is not valid UTF-8")))
}

fn cluster_bits_in_range(cluster_bits: u32) -> Result<()> {
    if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Ok(());
    }
    Err(FormatError::malformed(
        "header",
        format!(
            "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} \
         (cluster sizes 512 B to 2 MiB)"
        ),
    ))
}

fn version_supported(version: u32) -> Result<()> {
    if version == 2 || version == 3 {
        return Ok(());
    }
    Err(FormatError::Unsupported {
        what: format!("qcow2 version {version} (only versions 2 and 3 exist)"),
    })
}

impl Header {
    /// A version 3 header for an empty image of `size` bytes: no tables yet,
    /// no features, 16-bit refcounts, deflate compression.
    pub fn new_v3(cluster_bits: u32, size: u64) -> Header {
        Header {
            version: 3,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: Incompatible::empty(),
            unknown_incompatible: 0,
            compatible: Compatible::empty(),
            autoclear: Autoclear::empty(),
            refcount_order: 4,
            compression_type: CompressionType::Deflate,
            unknown_header_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps_extension: None,
            unknown_extensions: Vec::new(),
        }
    }

    /// Bytes per cluster. `cluster_bits` must have been checked (by
    /// [`Header::parse`] or [`Header::validate`]); out of range it saturates.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }

    /// The cluster layout this header describes. Meaningful once
    /// [`Header::validate`] has passed.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.incompatible.contains(Incompatible::EXTENDED_L2),
            refcount_order: self.refcount_order,
            external_data: self.incompatible.contains(Incompatible::EXTERNAL_DATA_FILE),
        }
    }

    /// Reads and decodes the header of the image in `storage`. The caller
    /// then calls [`Header::validate`] with the file length.
    pub fn read(storage: &dyn Storage) -> Result<Header> {
        let file_len = storage.len().io("measure the image file")?;
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(FormatError::malformed(
                "header",
                format!(
                "the file is {file_len} bytes, shorter than a qcow2 header ({V2_HEADER_LEN} bytes)"
            ),
            ));
        }
        let mut fixed = [0u8; V2_HEADER_LEN as usize];
        storage.read_at(&mut fixed, 0).io_at("read the header", 0)?;
        if be32(&fixed, 0) != MAGIC {
            return Err(FormatError::malformed(
                "header",
                "no qcow2 magic at offset 0",
            ));
        }
        version_supported(be32(&fixed, 4))?;
        let cluster_bits = be32(&fixed, 20);
        cluster_bits_in_range(cluster_bits)?;
        // Everything the header refers to by name lives in cluster 0, at
        // most 2 MiB; bytes past the end of a short file read as zeros, as
        // QEMU reads them.
        let mut cluster0 = vec![0u8; 1 << cluster_bits];
        storage
            .read_at(&mut cluster0, 0)
            .io_at("read the header cluster", 0)?;
        Header::parse(&cluster0)
    }

    /// Decodes a header from the bytes of cluster 0 (at least one cluster).
    pub fn parse(cluster0: &[u8]) -> Result<Header> {
        if cluster0.len() < V2_HEADER_LEN as usize || be32(cluster0, 0) != MAGIC {
            return Err(FormatError::malformed(
                "header",
                "no qcow2 magic at offset 0",
            ));
        }
        let mut header = Header::parse_v2_fields(cluster0)?;
        let cluster_size = 1usize << header.cluster_bits;
        let Some(cluster0) = cluster0.get(..cluster_size) else {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "cluster 0 is truncated: {} bytes of a {cluster_size}-byte cluster",
                    cluster0.len()
                ),
            ));
        };
        let header_length = header.parse_v3_fields(cluster0)?;
        let ext_end = extension_area_end(cluster0, header_length)?;
        if header.unknown_incompatible != 0 {
            // An unknown feature may change what follows the fixed fields.
            // Like QEMU, look there only for the feature name table, so that
            // validate() can name the bits, and ignore anything odd.
            let _ = header.parse_extensions(cluster0, header_length, ext_end);
            let _ = header.parse_backing_file_name(cluster0, header_length);
            return Ok(header);
        }
        header.parse_extensions(cluster0, header_length, ext_end)?;
        header.parse_backing_file_name(cluster0, header_length)?;
        Ok(header)
    }

    /// The fields common to both versions (bytes 0 to 71).
    fn parse_v2_fields(cluster0: &[u8]) -> Result<Header> {
        let version = be32(cluster0, 4);
        version_supported(version)?;
        let cluster_bits = be32(cluster0, 20);
        cluster_bits_in_range(cluster_bits)?;
        let mut header = Header::new_v3(cluster_bits, be64(cluster0, 24));
        header.version = version;
        header.crypt_method = be32(cluster0, 32);
        header.l1_size = be32(cluster0, 36);
        header.l1_table_offset = be64(cluster0, 40);
        header.refcount_table_offset = be64(cluster0, 48);
        header.refcount_table_clusters = be32(cluster0, 56);
        header.nb_snapshots = be32(cluster0, 60);
        header.snapshots_offset = be64(cluster0, 64);
        Ok(header)
    }

    /// The version 3 fields; returns `header_length` (72 for version 2).
    fn parse_v3_fields(&mut self, cluster0: &[u8]) -> Result<usize> {
        if self.version == 2 {
            return Ok(V2_HEADER_LEN as usize);
        }
        let header_length = be32(cluster0, 100);
        if header_length < V3_MIN_HEADER_LEN || header_length % 8 != 0 {
            return Err(FormatError::malformed(
                "header",
                format!(
                "header_length {header_length} is below {V3_MIN_HEADER_LEN} or not a multiple of 8"
            ),
            ));
        }
        let header_length = header_length as usize;
        if header_length > cluster0.len() {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "header_length {header_length} exceeds the cluster size {}",
                    cluster0.len()
                ),
            ));
        }
        let incompatible = be64(cluster0, 72);
        self.incompatible = Incompatible::from_bits_truncate(incompatible);
        self.unknown_incompatible = incompatible & !Incompatible::SUPPORTED.bits();
        self.compatible = Compatible::from_bits_retain(be64(cluster0, 80));
        self.autoclear = Autoclear::from_bits_retain(be64(cluster0, 88));
        self.refcount_order = be32(cluster0, 96);
        if header_length > COMPRESSION_TYPE_OFFSET {
            self.compression_type = match cluster0[COMPRESSION_TYPE_OFFSET] {
                0 => CompressionType::Deflate,
                1 => CompressionType::Zstd,
                other => {
                    return Err(FormatError::Unsupported {
                        what: format!("compression_type {other} (known: 0 deflate, 1 zstd)"),
                    })
                }
            };
        }
        if header_length > V3_HEADER_LEN as usize {
            self.unknown_header_fields = cluster0[V3_HEADER_LEN as usize..header_length].to_vec();
        }
        Ok(header_length)
    }

    /// Walks the header extensions from `at` to `end` (the backing file name
    /// or the end of cluster 0), as QEMU's `qcow2_read_extensions` does.
    fn parse_extensions(&mut self, cluster0: &[u8], mut at: usize, end: usize) -> Result<()> {
        while at < end {
            if end - at < 8 {
                return Err(FormatError::malformed(
                    "header",
                    format!(
                        "header extension at byte {at} runs past byte {end}, \
                     the end of the header extension area"
                    ),
                ));
            }
            let kind = be32(cluster0, at);
            let len = be32(cluster0, at + 4) as usize;
            let data_at = at + 8;
            if kind == ext::END {
                return self.check_end_marker(at, len);
            }
            if len > end - data_at {
                return Err(FormatError::malformed(
                    "header",
                    format!(
                        "header extension {kind:#010x} ({}) at byte {at} is {len} bytes long \
                     and runs past byte {end}, the end of the header extension area",
                        ext::name(kind)
                    ),
                ));
            }
            self.parse_extension(kind, &cluster0[data_at..data_at + len])?;
            at = data_at + len.next_multiple_of(8);
        }
        Ok(())
    }

    /// A version 2 header has no feature fields: bytes 72 to 79 are the
    /// first extension. An end marker there with a non-zero length is what a
    /// version 3 header (with incompatible feature bits) relabelled as
    /// version 2 looks like; QEMU would silently drop those features, so the
    /// image is refused instead. QEMU never writes such a marker.
    fn check_end_marker(&self, at: usize, len: usize) -> Result<()> {
        if self.version == 2 && at == V2_HEADER_LEN as usize && len != 0 {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "version 2 header carries version 3 feature bits: incompatible feature \
                 bits {} at byte 72 (version 2 has no feature fields)",
                    describe_bits(len as u64, |_| None)
                ),
            ));
        }
        Ok(())
    }

    fn parse_extension(&mut self, kind: u32, data: &[u8]) -> Result<()> {
        match kind {
            ext::BACKING_FORMAT => {
                if data.len() > MAX_BACKING_FORMAT_NAME {
                    return Err(FormatError::malformed(
                        "header",
                        format!(
                        "backing format extension of {} bytes exceeds {MAX_BACKING_FORMAT_NAME}",
                        data.len()
                    ),
                    ));
                }
                self.backing_format = Some(stored_string(data, "backing format name")?);
            }
            ext::DATA_FILE => self.data_file = Some(stored_string(data, "data file name")?),
            ext::FEATURE_NAMES => self.feature_names = parse_feature_names(data),
            ext::BITMAPS => self.bitmaps_extension = Some(data.to_vec()),
            ext::FULL_DISK_ENCRYPTION => return Err(self.encryption_extension_error()),
            _ => self.unknown_extensions.push((kind, data.to_vec())),
        }
        Ok(())
    }

    /// Only LUKS-encrypted images carry the encryption header extension.
    fn encryption_extension_error(&self) -> FormatError {
        match self.crypt_method {
            2 => FormatError::Encrypted,
            method => FormatError::malformed(
                "header",
                format!(
                    "full disk encryption header extension present, but crypt_method is \
                 {method} (only LUKS, 2, has one)"
                ),
            ),
        }
    }

    /// Reads the backing file name, which QEMU requires to lie after the
    /// header and inside cluster 0, and to be at most 1023 bytes.
    fn parse_backing_file_name(&mut self, cluster0: &[u8], header_length: usize) -> Result<()> {
        let offset = be64(cluster0, 8);
        let len = be32(cluster0, 16) as usize;
        if offset == 0 {
            return Ok(());
        }
        // extension_area_end() already refused offsets past cluster 0.
        let start = offset as usize;
        if start < header_length {
            return Err(FormatError::malformed(
                "header",
                format!("backing_file_offset {offset} lies inside the {header_length}-byte header"),
            ));
        }
        if len > MAX_BACKING_FILE_NAME || len > cluster0.len() - start {
            return Err(FormatError::malformed(
                "header",
                format!(
                    "backing_file_size {len} at backing_file_offset {offset} is too long \
                 (at most {MAX_BACKING_FILE_NAME} bytes, ending inside cluster 0 of {} bytes)",
                    cluster0.len()
                ),
            ));
        }
        // As QEMU reads it into a C string: up to the first NUL, any bytes.
        let stored = &cluster0[start..start + len];
        let name = &stored[..stored.iter().position(|&b| b == 0).unwrap_or(len)];
        // An empty name means no backing file to QEMU's block layer too.
        self.backing_file = (!name.is_empty()).then(|| name.to_vec());
        Ok(())
    }

    /// Names the unknown incompatible bits, with the names the image's own
    /// feature name table gives them: `bit 5 ("foo"), bit 9`.
    pub fn unknown_incompatible_names(&self) -> String {
        describe_bits(self.unknown_incompatible, |bit| {
            // The first entry for a bit wins, as in the error QEMU prints.
            self.feature_names
                .iter()
                .find(|entry| {
                    FeatureKind::from_byte(entry.kind) == Some(FeatureKind::Incompatible)
                        && u32::from(entry.bit) == bit
                })
                .map(|entry| entry.name.as_str())
        })
    }
}

/// Header byte offset of `refcount_table_offset`, followed by
/// `refcount_table_clusters`.
const REFTABLE_FIELDS_OFFSET: u64 = 48;

/// Rewrites only `refcount_table_offset` and `refcount_table_clusters` on
/// disk, in one 12-byte write inside the first sector, not synced. For the
/// two writers that move the refcount table: the allocator, whose location
/// every later whole-header write then takes, and the dirty-image repair,
/// which runs before the image's cached header exists.
pub fn write_reftable_fields(storage: &dyn Storage, offset: u64, clusters: u32) -> Result<()> {
    let mut fields = offset.to_be_bytes().to_vec();
    fields.extend_from_slice(&clusters.to_be_bytes());
    storage
        .write_at(&fields, REFTABLE_FIELDS_OFFSET)
        .io_at("write the header", REFTABLE_FIELDS_OFFSET)?;
    Ok(())
}

/// Where the header extension area ends: at the backing file name when
/// there is one, else at the end of cluster 0. QEMU refuses a backing file
/// offset past cluster 0 ("Invalid backing file offset").
fn extension_area_end(cluster0: &[u8], header_length: usize) -> Result<usize> {
    let backing_offset = be64(cluster0, 8);
    if backing_offset == 0 {
        return Ok(cluster0.len());
    }
    match usize::try_from(backing_offset) {
        Ok(end) if end <= cluster0.len() => Ok(end.max(header_length)),
        _ => Err(FormatError::malformed(
            "header",
            format!(
                "backing_file_offset {backing_offset} is outside cluster 0 ({} bytes)",
                cluster0.len()
            ),
        )),
    }
}

fn parse_feature_names(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(FEATURE_NAME_ENTRY_LEN)
        .map(|entry| {
            let name = &entry[2..];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            FeatureName {
                kind: entry[0],
                bit: entry[1],
                name: String::from_utf8_lossy(&name[..end]).into_owned(),
            }
        })
        .collect()
}
