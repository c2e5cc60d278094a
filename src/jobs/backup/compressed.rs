//! `compress=on`: a backup's copy that writes each target cluster
//! compressed ([`Chain::write_compressed`]), as QEMU's backup with
//! `compress` does. A range the view does not hold (below `top`'s base) is
//! left to the target's backing file; one that reads as zeros becomes
//! zeros, which a compressed cluster would only waste space on.

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
    let mut at = offset;
    while at < end {
        let n = cluster.min(end - at);
        let extent = chains
            .source
            .block_status(copy.view, copy.base, at, n)
            .map_err(|e| ("read", e))?;
        let unheld = extent.allocation == Allocation::Unallocated && extent.len >= n;
        if !(unheld && copy.base.is_some()) {
            // n <= cluster, which the image could hold in memory.
            buf.resize(n as usize, 0);
            chains
                .source
                .read(copy.view, at, buf)
                .map_err(|e| ("read", e))?;
            if buf.iter().all(|&b| b == 0) {
                chains
                    .dest
                    .zero_range(copy.dest, at, n)
                    .map_err(|e| ("write", e))?;
            } else {
                chains
                    .dest
                    .write_compressed(copy.dest, at, buf)
                    .map_err(|e| ("write", e))?;
                copied += n;
            }
        }
        at += n;
    }
    Ok(copied)
}
