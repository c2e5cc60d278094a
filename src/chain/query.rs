//! Allocation queries over the chain: which node decides what a range
//! reads as, for SEEK_DATA/SEEK_HOLE and for jobs' "allocated above base".

use super::resolve::LevelError;
use super::{Node, NodeId};
use crate::format::{Allocation, FormatError};

/// How a run of guest bytes of a node reads, looking down the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainExtent {
    /// Length of the run, from the queried offset; never zero.
    pub len: u64,
    /// `Data` or `Zero` if a node consulted decides the run;
    /// `Unallocated` if none does (it then reads from below the base, or as
    /// zeros without one).
    pub allocation: Allocation,
    /// The node that decides the run, when one does. A run past the end of
    /// a node shorter than the one above it reads as zeros, decided by the
    /// short node.
    pub node: Option<NodeId>,
    /// How many levels below the queried node the deciding node is (0: the
    /// node itself); for an unallocated run, how many levels were consulted.
    pub depth: usize,
}

/// Walks from `nodes[top]` down to `nodes[bottom]` (inclusive): the first
/// level that holds data or zeros decides, and the run is as long as every
/// level consulted agrees. `offset` must be inside `nodes[top]` and `len`
/// no longer than what remains of it.
pub(super) fn status_chain(
    nodes: &[Node],
    top: usize,
    bottom: usize,
    offset: u64,
    mut len: u64,
) -> Result<ChainExtent, LevelError> {
    let mut consulted = 0;
    for (level, node) in nodes
        .iter()
        .enumerate()
        .take(top.saturating_add(1))
        .skip(bottom)
        .rev()
    {
        let size = node.virtual_size();
        if offset >= size {
            // Everything past a shorter node's end reads as zeros.
            return Ok(decided(node, top - level, len, Allocation::Zero));
        }
        let extent = node
            .image()
            .block_status(offset, len.min(size - offset))
            .map_err(|source| LevelError { level, source })?;
        if extent.len == 0 {
            return Err(LevelError {
                level,
                source: FormatError::malformed(
                    "block status",
                    format!("empty extent at guest offset {offset}"),
                ),
            });
        }
        len = len.min(extent.len);
        consulted += 1;
        match extent.allocation {
            Allocation::Data | Allocation::Zero => {
                return Ok(decided(node, top - level, len, extent.allocation))
            }
            Allocation::Unallocated => {}
        }
    }
    Ok(ChainExtent {
        len,
        allocation: Allocation::Unallocated,
        node: None,
        depth: consulted,
    })
}

/// A run of `len` bytes decided by `node`, `depth` levels below the query.
fn decided(node: &Node, depth: usize, len: u64, allocation: Allocation) -> ChainExtent {
    ChainExtent {
        len,
        allocation,
        node: Some(node.id()),
        depth,
    }
}
