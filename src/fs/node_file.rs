//! I/O on node files and `active`: reads that stop at the end, writes that
//! stop there as a block device does, discard through `fallocate`, and
//! SEEK_DATA/SEEK_HOLE over what the node's chain holds.

use super::errno::FsError;
use crate::jobs::{Allocation, Chain, NodeId};
use crate::sync::Arc;

/// `fallocate` mode bits (linux/falloc.h).
pub mod falloc {
    /// Do not change the file size.
    pub const KEEP_SIZE: i32 = 0x01;
    /// Deallocate the range (must come with KEEP_SIZE).
    pub const PUNCH_HOLE: i32 = 0x02;
    /// Make the range read as zeros.
    pub const ZERO_RANGE: i32 = 0x10;
}

/// The node a request acts on and the chain it is reached through.
#[derive(Clone, Debug)]
pub struct Target {
    /// The chain snapshot for this request.
    pub chain: Arc<Chain>,
    /// The node.
    pub node: NodeId,
}

impl Target {
    /// The node's virtual size; a node missing from the snapshot is gone.
    pub fn size(&self) -> Result<u64, FsError> {
        self.chain
            .node(self.node)
            .map(|node| node.virtual_size())
            .ok_or(FsError::NotFound)
    }

    /// Whether the node may be written now: it is the active node of a
    /// writable chain and the mount is not read-only.
    pub fn writable(&self, read_only: bool) -> bool {
        is_writable(&self.chain, self.node, read_only)
    }
}

/// Whether `node` may be written through `chain` in a mount that is
/// `read_only` or not.
pub fn is_writable(chain: &Chain, node: NodeId, read_only: bool) -> bool {
    let active = chain.active();
    !read_only && active.id() == node && active.writable()
}

/// Reads up to `size` bytes at `offset` into `buf` (grown as needed, never
/// cleared: the chain fills every byte it returns); returns them, empty at
/// or past the end, short at the end.
pub fn read<'b>(
    target: &Target,
    offset: u64,
    size: u32,
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8], FsError> {
    let end = target.size()?;
    if offset >= end {
        return Ok(&[]);
    }
    // len <= size, a u32: it fits in usize.
    let len = u64::from(size).min(end - offset) as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let data = &mut buf[..len];
    target.chain.read(target.node, offset, data)?;
    Ok(data)
}

/// Writes `data` at `offset` of a writable target: ENOSPC if it starts at
/// or past the end, cut short where it crosses it. Returns bytes written.
pub fn write(target: &Target, offset: u64, data: &[u8]) -> Result<usize, FsError> {
    let size = target.size()?;
    if offset >= size {
        return Err(FsError::NoSpace { offset, size });
    }
    let room = size - offset;
    let len = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
    target.chain.write(target.node, offset, &data[..len])?;
    Ok(len)
}

/// Makes `offset..offset + len` read as zeros, for `fallocate` with
/// PUNCH_HOLE|KEEP_SIZE or ZERO_RANGE (with or without KEEP_SIZE). Other
/// modes (plain preallocation, collapse, insert) are EOPNOTSUPP: the file's
/// size never changes and qcow2 has nothing to preallocate. The range is
/// clipped at the end; a ZERO_RANGE that would grow the file is ENOSPC.
pub fn discard(target: &Target, offset: u64, len: u64, mode: i32) -> Result<(), FsError> {
    use falloc::{KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE};
    let keeps_size = match mode {
        m if m == PUNCH_HOLE | KEEP_SIZE => true,
        m if m == ZERO_RANGE | KEEP_SIZE => true,
        ZERO_RANGE => false,
        _ => {
            return Err(FsError::Unsupported {
                what: "this fallocate mode",
            })
        }
    };
    let size = target.size()?;
    let end = offset.checked_add(len).ok_or(FsError::Invalid {
        reason: "fallocate range overflows",
    })?;
    if end > size && !keeps_size {
        return Err(FsError::NoSpace { offset, size });
    }
    let end = end.min(size);
    if offset >= end {
        return Ok(());
    }
    target.chain.zero_range(target.node, offset, end - offset)?;
    Ok(())
}

/// What `lseek` looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    /// SEEK_DATA: the first data at or after the offset.
    Data,
    /// SEEK_HOLE: the first hole at or after the offset (the end counts as one).
    Hole,
}

/// SEEK_DATA/SEEK_HOLE. Only clusters holding data somewhere in the node's
/// chain count as data; zero clusters and ranges no node holds read as
/// zeros and count as holes, so `cp --sparse` and `qemu-img convert` copy
/// only data. ENXIO at or past the end, and for SEEK_DATA with no data left.
pub fn seek(target: &Target, offset: i64, what: Seek) -> Result<u64, FsError> {
    let size = target.size()?;
    let start = u64::try_from(offset).map_err(|_| FsError::NoData { offset })?;
    let mut pos = start;
    while pos < size {
        let extent = target
            .chain
            .block_status(target.node, None, pos, size - pos)?;
        let is_data = extent.allocation == Allocation::Data;
        if is_data == (what == Seek::Data) {
            return Ok(pos);
        }
        // The chain promises non-empty extents; a zero length would loop.
        if extent.len == 0 {
            return Err(FsError::Invalid {
                reason: "empty block status extent",
            });
        }
        pos += extent.len;
    }
    match what {
        Seek::Hole if start < size => Ok(size),
        _ => Err(FsError::NoData { offset }),
    }
}
