//! The qcow2 header (cluster 0): fixed fields, header extensions and the
//! backing file name, as `docs/interop/qcow2.txt` lays them out.
//!
//! All integers are big-endian. Version 2 headers end at byte 72; version 3
//! headers give their own length (at least 104 bytes).

use super::features::{Autoclear, Compatible, Incompatible};
use super::MAGIC;
use crate::format::{FormatError, Result};
use crate::storage::Storage;

/// Length of a version 2 header, and of the part common to both versions.
const V2_HEADER_LEN: u32 = 72;
/// Smallest valid version 3 header.
const V3_MIN_HEADER_LEN: u32 = 104;
/// Length of the version 3 header chainfs writes (with compression type).
const V3_HEADER_LEN: u32 = 112;
/// QEMU's limit on the backing file name.
pub const MAX_BACKING_FILE_NAME: usize = 1023;

/// Header extension types.
mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
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
    /// Human-readable name.
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
    /// Backing file name, if any.
    pub backing_file: Option<String>,
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

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn be64(buf: &[u8], at: usize) -> u64 {
    (u64::from(be32(buf, at)) << 32) | u64::from(be32(buf, at + 4))
}

impl Header {
    /// Reads and validates the header of the image in `storage`.
    pub fn read(storage: &dyn Storage) -> Result<Header> {
        let file_len = storage.len()?;
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(FormatError::malformed(format!(
                "the file is {file_len} bytes, shorter than a qcow2 header"
            )));
        }
        let mut fixed = vec![0u8; V2_HEADER_LEN as usize];
        storage.read_at(&mut fixed, 0)?;
        if be32(&fixed, 0) != MAGIC {
            return Err(FormatError::malformed("no qcow2 magic at offset 0"));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(FormatError::malformed(format!(
                "cluster_bits {cluster_bits} is outside 9..=21"
            )));
        }
        // Everything the header refers to by name lives in cluster 0.
        let mut cluster0 = vec![0u8; 1 << cluster_bits];
        storage.read_at(&mut cluster0, 0)?;
        Header::parse(&cluster0)
    }

    /// Decodes a header from the bytes of cluster 0.
    pub fn parse(cluster0: &[u8]) -> Result<Header> {
        if cluster0.len() < V2_HEADER_LEN as usize || be32(cluster0, 0) != MAGIC {
            return Err(FormatError::malformed("no qcow2 magic at offset 0"));
        }
        let version = be32(cluster0, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::Unsupported {
                what: format!("qcow2 version {version} (only 2 and 3 exist)"),
            });
        }
        let mut header = Header {
            version,
            cluster_bits: be32(cluster0, 20),
            size: be64(cluster0, 24),
            crypt_method: be32(cluster0, 32),
            l1_size: be32(cluster0, 36),
            l1_table_offset: be64(cluster0, 40),
            refcount_table_offset: be64(cluster0, 48),
            refcount_table_clusters: be32(cluster0, 56),
            nb_snapshots: be32(cluster0, 60),
            snapshots_offset: be64(cluster0, 64),
            incompatible: Incompatible::empty(),
            unknown_incompatible: 0,
            compatible: Compatible::empty(),
            autoclear: Autoclear::empty(),
            refcount_order: 4,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps_extension: None,
            unknown_extensions: Vec::new(),
        };
        let cluster_size = 1usize << header.cluster_bits.clamp(9, 21);
        if cluster0.len() < cluster_size {
            return Err(FormatError::malformed("header cluster is truncated"));
        }
        let mut header_length = V2_HEADER_LEN;
        if version == 3 {
            header_length = be32(cluster0, 100);
            if header_length < V3_MIN_HEADER_LEN || header_length % 8 != 0 {
                return Err(FormatError::malformed(format!(
                    "header_length {header_length} is below 104 or not a multiple of 8"
                )));
            }
            if header_length as usize > cluster_size {
                return Err(FormatError::malformed(format!(
                    "header_length {header_length} exceeds the cluster size {cluster_size}"
                )));
            }
            let incompatible = be64(cluster0, 72);
            header.incompatible = Incompatible::from_bits_truncate(incompatible);
            header.unknown_incompatible = incompatible & !Incompatible::SUPPORTED.bits();
            header.compatible = Compatible::from_bits_retain(be64(cluster0, 80));
            header.autoclear = Autoclear::from_bits_retain(be64(cluster0, 88));
            header.refcount_order = be32(cluster0, 96);
            if header_length > 104 {
                header.compression_type = match cluster0[104] {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(FormatError::Unsupported {
                            what: format!("compression type {other}"),
                        })
                    }
                };
            }
        }
        header.parse_extensions(&cluster0[..cluster_size], header_length as usize)?;
        header.parse_backing_file_name(cluster0, cluster_size)?;
        Ok(header)
    }

    fn parse_extensions(&mut self, cluster0: &[u8], mut at: usize) -> Result<()> {
        loop {
            if at + 8 > cluster0.len() {
                return Err(FormatError::malformed(
                    "header extensions run past the end of cluster 0",
                ));
            }
            let kind = be32(cluster0, at);
            let len = be32(cluster0, at + 4) as usize;
            at += 8;
            if kind == ext::END {
                return Ok(());
            }
            if len > cluster0.len() - at {
                return Err(FormatError::malformed(format!(
                    "header extension {kind:#x} of {len} bytes runs past the end of cluster 0"
                )));
            }
            let data = &cluster0[at..at + len];
            self.parse_extension(kind, data)?;
            at += len.next_multiple_of(8);
        }
    }

    fn parse_extension(&mut self, kind: u32, data: &[u8]) -> Result<()> {
        let text = |what: &str| {
            String::from_utf8(data.to_vec())
                .map_err(|_| FormatError::malformed(format!("{what} is not UTF-8")))
        };
        match kind {
            ext::BACKING_FORMAT => self.backing_format = Some(text("backing format")?),
            ext::DATA_FILE => self.data_file = Some(text("data file name")?),
            ext::FEATURE_NAMES => {
                self.feature_names = data
                    .chunks_exact(48)
                    .map(|entry| FeatureName {
                        kind: entry[0],
                        bit: entry[1],
                        name: String::from_utf8_lossy(&entry[2..])
                            .trim_end_matches('\0')
                            .to_string(),
                    })
                    .collect();
            }
            ext::BITMAPS => self.bitmaps_extension = Some(data.to_vec()),
            ext::FULL_DISK_ENCRYPTION => return Err(FormatError::Encrypted),
            _ => self.unknown_extensions.push((kind, data.to_vec())),
        }
        Ok(())
    }

    fn parse_backing_file_name(&mut self, cluster0: &[u8], cluster_size: usize) -> Result<()> {
        let offset = be64(cluster0, 8);
        let len = be32(cluster0, 16) as usize;
        if offset == 0 {
            return Ok(());
        }
        if len > MAX_BACKING_FILE_NAME {
            return Err(FormatError::malformed(format!(
                "backing file name of {len} bytes exceeds {MAX_BACKING_FILE_NAME}"
            )));
        }
        let fits = usize::try_from(offset)
            .ok()
            .and_then(|start| start.checked_add(len))
            .is_some_and(|end| end <= cluster_size);
        if !fits {
            return Err(FormatError::malformed(format!(
                "backing file name at offset {offset} is outside cluster 0"
            )));
        }
        let start = offset as usize;
        let name = String::from_utf8(cluster0[start..start + len].to_vec())
            .map_err(|_| FormatError::malformed("backing file name is not UTF-8"))?;
        self.backing_file = Some(name);
        Ok(())
    }

    /// Encodes the header, its extensions and the backing file name into one
    /// cluster, as QEMU lays them out.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let cluster_size = 1usize << self.cluster_bits;
        let mut out = Vec::with_capacity(cluster_size);
        let header_length = if self.version == 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        };
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, patched below
        out.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size, patched below
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            let incompatible = self.incompatible.bits() | self.unknown_incompatible;
            out.extend_from_slice(&incompatible.to_be_bytes());
            out.extend_from_slice(&self.compatible.bits().to_be_bytes());
            out.extend_from_slice(&self.autoclear.bits().to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            out.extend_from_slice(&header_length.to_be_bytes());
            let compression = match self.compression_type {
                CompressionType::Deflate => 0u8,
                CompressionType::Zstd => 1u8,
            };
            out.push(compression);
            out.resize(V3_HEADER_LEN as usize, 0);
        }
        let push_ext = |out: &mut Vec<u8>, kind: u32, data: &[u8]| {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        };
        if let Some(data_file) = &self.data_file {
            push_ext(&mut out, ext::DATA_FILE, data_file.as_bytes());
        }
        if let Some(format) = &self.backing_format {
            push_ext(&mut out, ext::BACKING_FORMAT, format.as_bytes());
        }
        if !self.feature_names.is_empty() {
            let mut table = Vec::with_capacity(self.feature_names.len() * 48);
            for feature in &self.feature_names {
                let mut entry = [0u8; 48];
                entry[0] = feature.kind;
                entry[1] = feature.bit;
                let name = feature.name.as_bytes();
                let len = name.len().min(46);
                entry[2..2 + len].copy_from_slice(&name[..len]);
                table.extend_from_slice(&entry);
            }
            push_ext(&mut out, ext::FEATURE_NAMES, &table);
        }
        if let Some(bitmaps) = &self.bitmaps_extension {
            push_ext(&mut out, ext::BITMAPS, bitmaps);
        }
        for (kind, data) in &self.unknown_extensions {
            push_ext(&mut out, *kind, data);
        }
        push_ext(&mut out, ext::END, &[]);
        if let Some(backing) = &self.backing_file {
            if backing.len() > MAX_BACKING_FILE_NAME {
                return Err(FormatError::Unsupported {
                    what: format!(
                        "a backing file name of {} bytes (at most {MAX_BACKING_FILE_NAME})",
                        backing.len()
                    ),
                });
            }
            let offset = out.len() as u64;
            out[8..16].copy_from_slice(&offset.to_be_bytes());
            out[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
            out.extend_from_slice(backing.as_bytes());
        }
        if out.len() > cluster_size {
            return Err(FormatError::Unsupported {
                what: format!(
                    "a header of {} bytes does not fit in a cluster of {cluster_size}",
                    out.len()
                ),
            });
        }
        out.resize(cluster_size, 0);
        Ok(out)
    }
}

impl Header {
    /// Checks the fields that the engine trusts (minimal; hardened on the
    /// header branch).
    pub fn validate(&self, file_len: u64) -> Result<()> {
        if self.crypt_method != 0 {
            return Err(FormatError::Encrypted);
        }
        if self.unknown_incompatible != 0 {
            return Err(FormatError::UnknownIncompatibleFeatures {
                features: format!("{:#x}", self.unknown_incompatible),
            });
        }
        let l1_end = self.l1_table_offset + u64::from(self.l1_size) * 8;
        if l1_end > file_len || u64::from(self.l1_size) > (32 << 20) / 8 {
            return Err(FormatError::malformed("L1 table out of the file"));
        }
        if u64::from(self.refcount_table_clusters) << self.cluster_bits > (8 << 20) {
            return Err(FormatError::malformed("refcount table too large"));
        }
        Ok(())
    }
}
