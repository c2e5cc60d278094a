//! Placeholder for the compression helper's module.

use super::header::CompressionType;
use crate::format::{FormatError, Result};

/// A compressed cluster descriptor (placeholder).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host offset of the compressed bytes.
    pub host_offset: u64,
    /// Length of the compressed bytes.
    pub compressed_len: u64,
}

/// Decodes a compressed descriptor (placeholder).
pub fn decode_descriptor(entry: u64, cluster_bits: u32) -> CompressedDescriptor {
    let x = 62 - (cluster_bits - 8);
    let host_offset = entry & ((1u64 << x) - 1);
    let sectors = ((entry & ((1u64 << 62) - 1)) >> x) + 1;
    CompressedDescriptor {
        host_offset,
        compressed_len: sectors * 512 - (host_offset & 511),
    }
}

/// Decompresses (placeholder).
pub fn decompress(_kind: CompressionType, _input: &[u8], _output: &mut [u8]) -> Result<()> {
    Err(FormatError::Unsupported {
        what: "compressed clusters".into(),
    })
}
