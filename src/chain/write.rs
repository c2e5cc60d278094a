//! Writes to a writable node, with copy-on-write from the chain below it.
//!
//! The image does the copy-on-write itself; the chain lends it a
//! [`BackingReader`] that reads the levels below the node through the same
//! walk as every read.

use std::cell::Cell;

use super::memo::Memo;
use super::resolve::{read_chain, LevelError};
use super::{ChainError, Node};
use crate::format::{self, BackingReader, FormatError};

/// What lies below `nodes[level]`, as a backing reader for that node.
pub(super) struct Below<'a> {
    nodes: &'a [Node],
    level: usize,
    memo: &'a Memo,
    /// The level whose read failed, so the error can name that image rather
    /// than the one being written.
    failed: Cell<Option<usize>>,
}

impl<'a> Below<'a> {
    /// The chain below `nodes[level]`, whose memo is `memo`.
    pub(super) fn new(nodes: &'a [Node], level: usize, memo: &'a Memo) -> Below<'a> {
        Below {
            nodes,
            level,
            memo,
            failed: Cell::new(None),
        }
    }

    /// Names the image at fault for an error of an operation on
    /// `nodes[level]` that used this reader.
    pub(super) fn error(&self, source: FormatError) -> ChainError {
        let level = self.failed.get().unwrap_or(self.level);
        match self.nodes.get(level) {
            Some(node) => node.error(source),
            None => ChainError::NoSuchNode { id: level as u64 },
        }
    }
}

impl BackingReader for Below<'_> {
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> format::Result<()> {
        let Some(below) = self.level.checked_sub(1) else {
            buf.fill(0);
            return Ok(());
        };
        read_chain(self.nodes, below, offset, buf, self.memo).map_err(
            |LevelError { level, source }| {
                self.failed.set(Some(level));
                source
            },
        )
    }

    fn has_backing(&self) -> bool {
        self.level > 0
    }
}
