//! Encoding a [`Header`] back into cluster 0, laid out as QEMU's
//! `qcow2_update_header` lays it out: fixed fields, unknown header fields,
//! extensions (data file, backing format, feature names, bitmaps, unknown
//! ones), the end marker, then the backing file name.

use super::{
    cluster_bits_in_range, ext, version_supported, CompressionType, FeatureName, Header,
    FEATURE_NAME_ENTRY_LEN, FEATURE_NAME_LEN, MAX_BACKING_FILE_NAME, V3_HEADER_LEN,
};
use crate::format::qcow2::MAGIC;
use crate::format::{FormatError, Result};

impl Header {
    /// Encodes the header, its extensions and the backing file name into one
    /// cluster, as QEMU lays them out.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        version_supported(self.version)?;
        cluster_bits_in_range(self.cluster_bits)?;
        self.check_v2_fields()?;
        let cluster_size = 1usize << self.cluster_bits;
        let mut out = Vec::with_capacity(cluster_size);
        self.serialize_fixed(&mut out)?;
        self.serialize_extensions(&mut out)?;
        self.serialize_backing_file_name(&mut out)?;
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

    fn serialize_fixed(&self, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset, patched later
        out.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size, patched later
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 2 {
            return Ok(());
        }
        if self.unknown_header_fields.len() % 8 != 0 {
            return Err(FormatError::Unsupported {
                what: "unknown header fields whose length is not a multiple of 8".into(),
            });
        }
        let header_length = u32::try_from(self.unknown_header_fields.len())
            .ok()
            .and_then(|extra| V3_HEADER_LEN.checked_add(extra))
            .ok_or_else(|| FormatError::Unsupported {
                what: "a header longer than 4 GiB".into(),
            })?;
        let incompatible = self.incompatible.bits() | self.unknown_incompatible;
        out.extend_from_slice(&incompatible.to_be_bytes());
        out.extend_from_slice(&self.compatible.bits().to_be_bytes());
        out.extend_from_slice(&self.autoclear.bits().to_be_bytes());
        out.extend_from_slice(&self.refcount_order.to_be_bytes());
        out.extend_from_slice(&header_length.to_be_bytes());
        out.push(match self.compression_type {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        });
        out.resize(V3_HEADER_LEN as usize, 0); // zeroed padding, as the spec asks
        out.extend_from_slice(&self.unknown_header_fields);
        Ok(())
    }

    fn serialize_extensions(&self, out: &mut Vec<u8>) -> Result<()> {
        if let Some(data_file) = &self.data_file {
            push_extension(out, ext::DATA_FILE, data_file.as_bytes())?;
        }
        if let Some(format) = &self.backing_format {
            push_extension(out, ext::BACKING_FORMAT, format.as_bytes())?;
        }
        if !self.feature_names.is_empty() {
            push_extension(
                out,
                ext::FEATURE_NAMES,
                &encode_feature_names(&self.feature_names),
            )?;
        }
        if let Some(bitmaps) = &self.bitmaps_extension {
            push_extension(out, ext::BITMAPS, bitmaps)?;
        }
        for (kind, data) in &self.unknown_extensions {
            push_extension(out, *kind, data)?;
        }
        push_extension(out, ext::END, &[])
    }

    fn serialize_backing_file_name(&self, out: &mut Vec<u8>) -> Result<()> {
        let Some(backing) = &self.backing_file else {
            return Ok(());
        };
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
        // The length fits: it is at most 1023.
        out[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
        out.extend_from_slice(backing);
        Ok(())
    }
}

fn encode_feature_names(names: &[FeatureName]) -> Vec<u8> {
    let mut table = Vec::with_capacity(names.len() * FEATURE_NAME_ENTRY_LEN);
    for feature in names {
        let mut entry = [0u8; FEATURE_NAME_ENTRY_LEN];
        entry[0] = feature.kind;
        entry[1] = feature.bit;
        let name = truncate_at_char(&feature.name, FEATURE_NAME_LEN).as_bytes();
        entry[2..2 + name.len()].copy_from_slice(name);
        table.extend_from_slice(&entry);
    }
    table
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
fn truncate_at_char(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn push_extension(out: &mut Vec<u8>, kind: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| FormatError::Unsupported {
        what: format!("a header extension of {} bytes", data.len()),
    })?;
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
    Ok(())
}
