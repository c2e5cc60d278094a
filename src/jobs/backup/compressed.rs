//! `compress=on`: a backup's copy that writes each target cluster
//! compressed ([`Chain::write_compressed`]), as QEMU's backup with
//! `compress` does. A range the view does not hold (below `top`'s base) is
//! left to the target's backing file; one that reads as zeros becomes
//! zeros, which a compressed cluster would only waste space on. The
//! clusters between those go to the target as one compressed write per
//! run, which syncs the target once, not once per cluster.
//!
//! [`Chain::write_compressed`]: crate::chain::Chain::write_compressed

use super::super::copier::{Chains, Copier, CopyFailure};
use crate::chain::Allocation;

/// Copies `offset..offset + len` (whole target clusters, or the disk's
/// last partial one) of the view into the target, compressed; returns the
/// bytes written.
pub(super) fn copy_compressed(
    copy: &Copier,
    chains: Chains<'_>,
    cluster: u64,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, CopyFailure> {
    let end = offset + len;
    let mut copied = 0;
    // `buf` holds the run of clusters read so far that are to be written
    // compressed: `run..at`. The run is at most `len`, which the caller
    // chose to hold in memory.
    let mut run = offset;
    buf.clear();
    let mut at = offset;
    while at < end {
        let n = cluster.min(end - at);
        let extent = chains
            .source
            .block_status(copy.view, copy.base, at, n)
            .map_err(|e| ("read", e))?;
        let unheld = extent.allocation == Allocation::Unallocated && extent.len >= n;
        let left_to_backing = unheld && copy.base.is_some();
        if !left_to_backing {
            let from = buf.len();
            buf.resize(from + n as usize, 0);
            chains
                .source
                .read(copy.view, at, &mut buf[from..])
                .map_err(|e| ("read", e))?;
            if buf[from..].iter().any(|&b| b != 0) {
                at += n;
                continue;
            }
            buf.truncate(from);
        }
        // The run ends before this cluster, which is not written compressed.
        copied += write_run(copy, &chains, run, buf)?;
        if !left_to_backing {
            chains
                .dest
                .zero_range(copy.dest, at, n)
                .map_err(|e| ("write", e))?;
        }
        at += n;
        run = at;
    }
    copied += write_run(copy, &chains, run, buf)?;
    Ok(copied)
}

/// Writes the run of clusters in `buf` at `offset` of the target, in one
/// compressed write, and empties `buf`; returns the bytes written.
fn write_run(
    copy: &Copier,
    chains: &Chains<'_>,
    offset: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, CopyFailure> {
    if buf.is_empty() {
        return Ok(0);
    }
    chains
        .dest
        .write_compressed(copy.dest, offset, buf)
        .map_err(|e| ("write", e))?;
    let written = buf.len() as u64;
    buf.clear();
    Ok(written)
}
