//! Which level of the chain answers a range: for each 64 KiB cell of the
//! guest, the highest level that holds anything there, so that a read of
//! data sitting deep in the chain starts its walk at that level instead of
//! asking every empty level above it.
//!
//! The answer is found once, by asking each level from the top down whether
//! it holds anything in the whole cell (an allocation query, which touches
//! only metadata), and kept in the mount's shared metadata cache, where it
//! counts against `--cache-size` like an L2 table.
//!
//! # Never stale
//!
//! * Levels only gain data through writes, and every write (guest write,
//!   populate, copy, zeroing, to any node of any version of the chain) goes
//!   through [`Chain`](super::Chain), which calls [`Changes::changed`] once
//!   the write is done. That bumps a generation counter of each cell it
//!   touched (counters are per bucket of cells, shared by every version of
//!   the chain: a collision only costs a fresh probe). An answer records the
//!   counter as it was *before* its probe began, and is used only while the
//!   counter still has that value: a write that the probe may have missed
//!   finished its bump after the probe began, so it makes the answer void.
//! * A level that loses data (zeroing the base of a chain) keeps the
//!   answer right: the walk from the answering level goes on down.
//! * Every change of the chain's shape (snapshot, rebacking at the end of a
//!   stream or commit, hiding a commit's intermediates) makes a new version
//!   of the chain with a memo of its own, empty, since levels move; the
//!   answers of older versions stay right for the readers still using them.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::open::MAX_DEPTH;
use super::resolve::LevelError;
use super::Node;
use crate::format::cache::{MetadataCache, Region};
use crate::format::Allocation;
use crate::sync::Arc;

/// A cell is 64 KiB of guest space, QEMU's default cluster size.
const CELL_BITS: u32 = 16;
/// Bits of a memo key that hold the top level the answer is for.
const LEVEL_BITS: u32 = 12;
const _: () = assert!(MAX_DEPTH <= 1 << LEVEL_BITS);
/// Generation counters: a write touches at most this many, however large.
const BUCKETS: u64 = 4096;

/// The generation counters of the cells, shared by every version of a chain.
#[derive(Debug)]
pub(super) struct Changes {
    buckets: Box<[AtomicU64]>,
}

impl Changes {
    pub(super) fn new() -> Changes {
        Changes {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn bucket(&self, cell: u64) -> &AtomicU64 {
        &self.buckets[(cell % BUCKETS) as usize]
    }

    /// Voids every answer about guest `offset..offset + len`: some level
    /// was written there. Called after the write is done.
    pub(super) fn changed(&self, offset: u64, len: u64) {
        let first = offset >> CELL_BITS;
        let last = offset.saturating_add(len.max(1) - 1) >> CELL_BITS;
        for cell in first..=last.min(first + BUCKETS - 1) {
            self.bucket(cell).fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The level that answered a cell, as of a generation of its bucket.
struct Answer {
    generation: u64,
    /// `None`: no level holds anything there; it reads as zeros.
    level: Option<usize>,
}

/// One version of the chain's answers.
#[derive(Debug)]
pub(super) struct Memo {
    region: Region,
    changes: Arc<Changes>,
}

impl Memo {
    /// An empty memo in `cache`, voided by `changes`.
    pub(super) fn new(cache: &Arc<MetadataCache>, changes: Arc<Changes>) -> Memo {
        Memo {
            region: cache.region(),
            changes,
        }
    }

    /// An empty memo for a new version of the chain, sharing the cache and
    /// the generation counters.
    pub(super) fn renewed(&self) -> Memo {
        Memo::new(self.region.cache(), Arc::clone(&self.changes))
    }

    /// The counters that writes bump.
    pub(super) fn changes(&self) -> &Changes {
        &self.changes
    }

    /// The highest level at or below `top` that holds anything in the cells
    /// of `range` (`None`: none does). Costs one cache lookup per cell once
    /// the cell is known; the first time, one allocation query per level
    /// from `top` down to the answer.
    pub(super) fn first_level(
        &self,
        nodes: &[Node],
        top: usize,
        range: Range<u64>,
    ) -> Result<Option<usize>, LevelError> {
        let size = nodes[top].virtual_size();
        let mut first = None;
        let mut cell = range.start >> CELL_BITS;
        while cell << CELL_BITS < range.end {
            let start = cell << CELL_BITS;
            let cell_range = start..start.saturating_add(1 << CELL_BITS).min(size);
            let level = self.answer(nodes, top, cell, cell_range)?;
            first = first.max(level);
            if first == Some(top) {
                break;
            }
            cell += 1;
        }
        Ok(first)
    }

    fn answer(
        &self,
        nodes: &[Node],
        top: usize,
        cell: u64,
        range: Range<u64>,
    ) -> Result<Option<usize>, LevelError> {
        let bucket = self.changes.bucket(cell);
        let key = (cell << LEVEL_BITS) | top as u64;
        if let Some(answer) = self.region.get::<Answer>(key) {
            if answer.generation == bucket.load(Ordering::SeqCst) {
                return Ok(answer.level);
            }
        }
        let generation = bucket.load(Ordering::SeqCst);
        let level = probe(nodes, top, range)?;
        // When the top answers, the probe cost one query and the walk starts
        // there anyway: keeping that answer would only take room.
        if level != Some(top) {
            let answer = Arc::new(Answer { generation, level });
            self.region
                .put(key, answer, std::mem::size_of::<Answer>() as u64);
        }
        Ok(level)
    }
}

/// Asks each level from `top` down whether it holds anything in `range`;
/// returns the first that does. A level shorter than the range holds its
/// tail: it reads as zeros there.
fn probe(nodes: &[Node], top: usize, range: Range<u64>) -> Result<Option<usize>, LevelError> {
    let len = range.end - range.start;
    for (level, node) in nodes.iter().enumerate().take(top + 1).rev() {
        if range.end > node.virtual_size() {
            return Ok(Some(level));
        }
        let extent = node
            .image()
            .block_status(range.start, len)
            .map_err(|source| LevelError { level, source })?;
        if extent.allocation != Allocation::Unallocated || extent.len < len {
            return Ok(Some(level));
        }
    }
    Ok(None)
}
