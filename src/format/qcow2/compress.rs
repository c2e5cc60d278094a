//! Compressed clusters: the L2 descriptor that locates them, the deflate
//! and zstd codecs that QEMU uses for their contents, and writing them.
//!
//! `docs/interop/qcow2.txt`, "Compressed Clusters Descriptor": with
//! `x = 62 - (cluster_bits - 8)`, bits `0..x` of a compressed L2 entry hold the
//! host offset of the compressed data (byte-granular, not cluster aligned) and
//! bits `x..62` the number of *additional* 512-byte sectors the data runs
//! into, beyond the sector holding the offset. The length is therefore known
//! only to sector precision; the codecs must stop by themselves at the end of
//! the stream and ignore whatever follows.
//!
//! The data of one compressed cluster always decompresses to exactly one full
//! cluster (`qcow2_co_preadv_compressed` in QEMU decompresses into a
//! cluster-sized buffer and fails otherwise).

use std::ops::RangeInclusive;

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use super::header::CompressionType;
use crate::format::{FormatError, Result};

/// Unit of the sector count in a compressed descriptor.
const SECTOR_SIZE: u64 = 512;

/// zstd's smallest window (`ZSTD_WINDOWLOG_ABSOLUTEMIN`); every frame may
/// declare at least this much.
const ZSTD_MIN_WINDOW_LOG: u32 = 10;

/// Where the compressed data of one cluster lies in the image file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host offset of the first compressed byte (not cluster aligned).
    pub host_offset: u64,
    /// Bytes to read from `host_offset`: up to the end of the last sector
    /// the descriptor names. The stream may end before that.
    pub compressed_len: u64,
}

impl CompressedDescriptor {
    /// The host clusters the compressed data touches, by index; their
    /// refcounts drop when the compressed cluster is freed, as in QEMU's
    /// `qcow2_free_any_cluster`.
    pub fn host_clusters(&self, cluster_bits: u32) -> RangeInclusive<u64> {
        // compressed_len is at least 1 (one sector minus at most 511 bytes),
        // so the last byte is well defined.
        let last_byte = self.host_offset + self.compressed_len.max(1) - 1;
        (self.host_offset >> cluster_bits)..=(last_byte >> cluster_bits)
    }
}

/// Bit position of the sector count: `x` in qcow2.txt.
fn sector_count_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits.clamp(9, 21) - 8)
}

/// Decodes the descriptor of a standard L2 entry whose compressed flag
/// (bit 62) is set. Bits 62 and 63 are ignored; the caller has already
/// classified the entry.
///
/// `cluster_bits` comes from a validated header (9 to 21); values outside
/// that range are clamped rather than trusted.
pub fn decode_descriptor(entry: u64, cluster_bits: u32) -> CompressedDescriptor {
    let shift = sector_count_shift(cluster_bits);
    let offset_mask = (1u64 << shift) - 1;
    let count_mask = (1u64 << (62 - shift)) - 1;
    let host_offset = entry & offset_mask;
    let sectors = ((entry >> shift) & count_mask) + 1;
    // As QEMU computes it: the sectors run from the one holding the offset,
    // so the part of the first sector before the offset is not ours.
    let compressed_len = sectors * SECTOR_SIZE - (host_offset & (SECTOR_SIZE - 1));
    CompressedDescriptor {
        host_offset,
        compressed_len,
    }
}

/// Decompresses the data of one compressed cluster into `output`, which must
/// be the size of a cluster and is filled completely.
///
/// `input` is the `compressed_len` bytes of the descriptor; it may hold
/// padding or unrelated bytes after the stream, which are ignored. Memory
/// use is bounded by the size of `output`, whatever the stream declares.
pub fn decompress(kind: CompressionType, input: &[u8], output: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Deflate => inflate(input, output),
        CompressionType::Zstd => zstd_decompress(input, output),
    }
}

/// Raw deflate (no zlib header), as QEMU's `qcow2_zlib_decompress`.
///
/// QEMU accepts the stream once the output is full, whether or not the
/// stream has ended there: the compressed length is only known to the
/// sector, so zlib may stop short of the end-of-stream marker. A stream that
/// would produce more than a cluster is therefore cut at the cluster, as QEMU
/// reads it.
fn inflate(input: &[u8], output: &mut [u8]) -> Result<()> {
    let mut inflater = Decompress::new(false);
    let status = inflater
        .decompress(input, output, FlushDecompress::Finish)
        .map_err(|err| {
            FormatError::malformed(
                "compressed cluster",
                format!("corrupt deflate stream: {err}"),
            )
        })?;
    let produced = inflater.total_out();
    if produced == output.len() as u64 {
        return Ok(());
    }
    let why = match status {
        Status::StreamEnd => "the deflate stream ended",
        Status::Ok | Status::BufError => "the compressed data ran out",
    };
    Err(FormatError::malformed(
        "compressed cluster",
        format!(
            "{why} after {produced} of {} bytes of a compressed cluster",
            output.len()
        ),
    ))
}

/// A zstd stream of one or more frames, as QEMU's `qcow2_zstd_decompress`:
/// decode until the output is full; the last frame must end exactly there,
/// and any bytes after it are ignored.
fn zstd_decompress(input: &[u8], output: &mut [u8]) -> Result<()> {
    let corrupt = |err: std::io::Error| {
        FormatError::malformed("compressed cluster", format!("corrupt zstd stream: {err}"))
    };
    let mut decoder = Decoder::new().map_err(corrupt)?;
    // Bound the window (and so the decoder's buffers) by the cluster: one
    // cluster of data never needs more history than itself, and QEMU's
    // writer declares the exact content size, which keeps its window there.
    decoder
        .set_parameter(DParameter::WindowLogMax(window_log_for(output.len())))
        .map_err(corrupt)?;
    let capacity = output.len();
    let mut input = InBuffer::around(input);
    let mut output = OutBuffer::around(output);
    let mut remaining_hint = 0;
    while output.pos() < capacity {
        let progress_before = input.pos + output.pos();
        remaining_hint = decoder.run(&mut input, &mut output).map_err(corrupt)?;
        if input.pos + output.pos() == progress_before {
            return Err(FormatError::malformed(
                "compressed cluster",
                format!(
                    "the zstd stream ended after {} of {capacity} bytes of a compressed cluster",
                    output.pos()
                ),
            ));
        }
    }
    if remaining_hint != 0 {
        return Err(FormatError::malformed(
            "compressed cluster",
            format!("the zstd stream holds more than the {capacity} bytes of a cluster"),
        ));
    }
    Ok(())
}

/// log2 of the largest zstd window accepted for an output of `len` bytes.
fn window_log_for(len: usize) -> u32 {
    let bits = usize::BITS - len.saturating_sub(1).leading_zeros();
    bits.max(ZSTD_MIN_WINDOW_LOG)
}

mod encode;
mod pack;
#[cfg(test)]
mod tests;
mod write;

pub(super) use pack::Packing;
