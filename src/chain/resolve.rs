//! The one iterative walk down the chain that reads: each level fills what
//! it holds and hands the ranges it does not hold to the level below.
//!
//! A level answers shallowly ([`crate::format::Image::read`]); only this
//! walk knows there is a chain. It is a loop over levels, never recursion,
//! so 1,000-deep chains cost no stack.
//!
//! Cost: the walk starts at the highest level that holds anything in the
//! read's 64 KiB cells, which the chain's [`Memo`] knows after the first
//! touch (one cache lookup per cell), and reads each level from there down
//! that still has ranges to fill. So a read whose data sits in one level
//! costs one image read at any depth, whether that level is the top or the
//! base. The first touch of a cell costs one allocation query per level
//! above the answering one.

use std::ops::Range;

use super::memo::Memo;
use super::Node;
use crate::format::FormatError;

/// The lowest top level whose reads ask the memo where to start.
const MEMO_FROM_LEVEL: usize = 2;

/// A failure at one level of the walk, so the caller can name the image.
#[derive(Debug)]
pub(super) struct LevelError {
    /// Index in the base-first node list of the image that failed.
    pub level: usize,
    /// What it said.
    pub source: FormatError,
}

/// Fills `buf` with what a guest sees at `offset` if `nodes[top]` were the
/// active image. Bytes past a level's virtual size read as zeros, as QEMU
/// reads a backing file shorter than its overlay; so do bytes no level
/// holds. `nodes` is base first; `memo` is the chain's.
pub(super) fn read_chain(
    nodes: &[Node],
    top: usize,
    offset: u64,
    buf: &mut [u8],
    memo: &Memo,
) -> Result<(), LevelError> {
    let end = offset.saturating_add(buf.len() as u64);
    let mut pending = Vec::with_capacity(1);
    pending.push(offset..end);
    let mut below = Vec::new();
    let first = if buf.is_empty() {
        None
    } else if top < MEMO_FROM_LEVEL {
        // So shallow that walking every level costs less than asking.
        Some(top)
    } else {
        memo.first_level(nodes, top, offset..end)?
    };
    // Levels above `first` hold nothing here: start below them (with no
    // level that holds anything, nothing is read and all reads as zeros).
    let levels = first.map_or(0, |level| level + 1);
    for (level, node) in nodes.iter().enumerate().take(levels).rev() {
        if pending.is_empty() {
            return Ok(());
        }
        for range in pending.drain(..) {
            read_level(node, range, offset, buf, &mut below)
                .map_err(|source| LevelError { level, source })?;
        }
        // The unheld ranges become the next level's pending ones; swapping
        // reuses both allocations.
        std::mem::swap(&mut pending, &mut below);
    }
    for range in pending {
        slice(buf, offset, range).fill(0);
    }
    Ok(())
}

/// Reads `range` from one level into `buf` (which starts at guest offset
/// `base`); pushes what the level does not hold onto `below`, and zero-fills
/// the part past the level's end.
fn read_level(
    node: &Node,
    range: Range<u64>,
    base: u64,
    buf: &mut [u8],
    below: &mut Vec<Range<u64>>,
) -> Result<(), FormatError> {
    let held_end = range.end.min(node.virtual_size());
    if range.start < held_end {
        let inside = range.start..held_end;
        let unheld = node
            .image()
            .read(range.start, slice(buf, base, inside.clone()))?;
        // Keep the walk inside the request even if a level answered with
        // ranges outside it.
        below.extend(
            unheld
                .into_iter()
                .map(|r| r.start.max(inside.start)..r.end.min(inside.end))
                .filter(|r| r.start < r.end),
        );
    }
    let past_end = range.start.max(held_end)..range.end;
    if past_end.start < past_end.end {
        slice(buf, base, past_end).fill(0);
    }
    Ok(())
}

/// The part of `buf` (starting at guest offset `base`) that holds guest
/// `range`, which the caller keeps inside `buf`.
fn slice(buf: &mut [u8], base: u64, range: Range<u64>) -> &mut [u8] {
    let start = (range.start - base) as usize;
    let end = (range.end - base) as usize;
    &mut buf[start..end]
}
