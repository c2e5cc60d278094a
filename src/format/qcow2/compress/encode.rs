//! The encoder side of compressed clusters: the codecs and the descriptor
//! as QEMU writes them (`qcow2_co_compress`,
//! `qcow2_alloc_compressed_cluster_offset`), for compressed writes and for
//! the tests that check the decoder against its inverse.

use flate2::{Compress, Compression, FlushCompress, Status};

use super::{sector_count_shift, CompressionType, SECTOR_SIZE};

/// Bytes of history that QEMU's deflate stream may refer back to: QEMU
/// inflates with `windowBits = -12`, so a stream that reaches further back
/// than 4 KiB is one that QEMU cannot read.
const DEFLATE_WINDOW: usize = 1 << 12;

/// Encodes the descriptor bits (without the compressed flag) of
/// `compressed_len` bytes at `host_offset`, as QEMU's
/// `qcow2_alloc_compressed_cluster_offset` does; `None` if the offset or the
/// length does not fit the fields.
pub(super) fn encode_descriptor(
    host_offset: u64,
    compressed_len: u64,
    cluster_bits: u32,
) -> Option<u64> {
    let shift = sector_count_shift(cluster_bits);
    if compressed_len == 0 || host_offset >= 1u64 << shift {
        return None;
    }
    let last_sector = host_offset.checked_add(compressed_len - 1)? / SECTOR_SIZE;
    let additional = last_sector - host_offset / SECTOR_SIZE;
    if additional >= 1u64 << (62 - shift) {
        return None;
    }
    Some(host_offset | (additional << shift))
}

/// Compresses one cluster as QEMU would store it; `None` if the result would
/// not be smaller than the input (QEMU gives its compressor a buffer one
/// byte short of a cluster, and writes the cluster uncompressed when that
/// does not suffice).
pub(super) fn compress(kind: CompressionType, input: &[u8]) -> Option<Vec<u8>> {
    let compressed = match kind {
        CompressionType::Deflate => deflate(input)?,
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (compressed.len() < input.len()).then_some(compressed)
}

/// Raw deflate that QEMU's 4 KiB-window inflater can read.
///
/// The deflate backend offers no window size, so the input is fed in 4 KiB
/// pieces with a full flush after each: a full flush resets the compressor's
/// history, so no match reaches back further than the current piece.
fn deflate(input: &[u8]) -> Option<Vec<u8>> {
    // Output that reaches the input's size does not shrink; stop there.
    let mut out = vec![0u8; input.len()];
    let mut deflater = Compress::new(Compression::default(), false);
    let pieces = input.len().div_ceil(DEFLATE_WINDOW);
    for (index, piece) in input.chunks(DEFLATE_WINDOW).enumerate() {
        let flush = if index + 1 == pieces {
            FlushCompress::Finish
        } else {
            FlushCompress::Full
        };
        deflate_piece(&mut deflater, piece, &mut out, flush)?;
    }
    out.truncate(usize::try_from(deflater.total_out()).ok()?);
    Some(out)
}

/// Feeds all of `piece` to `deflater` and completes `flush`; `None` if `out`
/// fills up first.
fn deflate_piece(
    deflater: &mut Compress,
    piece: &[u8],
    out: &mut [u8],
    flush: FlushCompress,
) -> Option<()> {
    let start_in = deflater.total_in();
    loop {
        let consumed = usize::try_from(deflater.total_in() - start_in).ok()?;
        let produced = usize::try_from(deflater.total_out()).ok()?;
        if produced >= out.len() {
            return None;
        }
        let progress_before = deflater.total_in() + deflater.total_out();
        let status = deflater
            .compress(&piece[consumed..], &mut out[produced..], flush)
            .ok()?;
        if deflater.total_in() + deflater.total_out() == progress_before {
            // Neither input taken nor output made: the flush cannot finish.
            return None;
        }
        let all_in = deflater.total_in() - start_in == piece.len() as u64;
        let room_left = deflater.total_out() < out.len() as u64;
        match status {
            Status::StreamEnd => return Some(()),
            // A flush is complete once it consumed everything and did not
            // run out of room.
            _ if flush != FlushCompress::Finish && all_in && room_left => return Some(()),
            _ => {}
        }
    }
}
