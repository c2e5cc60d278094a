//! The chain of images, base to top: backing resolution, the one walk down
//! the chain that reads and lends copy-on-write data, and allocation
//! queries.
//!
//! ```text
//! [A] <- [B] <- [C] <- [D] <- [E]     nodes() = [A, B, C, D, E]; E is active
//! ```
//!
//! Every image is shown as a node; a node reads as a guest would see it if
//! that node were the active image. Only the active node is written, and
//! only in a chain opened writable.

pub mod bitmap;
mod create;
mod error;
mod memo;
mod mirror;
pub mod naming;
mod node;
pub mod open;
mod pivot;
mod query;
mod relink;
mod resolve;
pub mod track;
mod write;

use std::collections::HashMap;
use std::path::Path;

use crate::format::MetadataCache;
use crate::sync::Arc;

/// How a range is held (re-exported for the layers above).
pub use crate::format::{Allocation, Format, HostRange, StoreRefusal};
pub use create::{create_image, create_raw_image};
pub use error::ChainError;
pub use node::{Node, NodeId};
pub use query::ChainExtent;

/// How to open a chain.
#[derive(Clone, Debug)]
pub struct ChainOptions {
    /// Open the top image for writing. Backing images are always read-only.
    pub writable: bool,
    /// Take no locks, as `qemu-img -U`; requires `writable == false`.
    pub force_share: bool,
    /// Metadata cache budget of the whole chain, in bytes: every image,
    /// including those that join it later, draws from it.
    pub cache_bytes: u64,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            writable: false,
            force_share: false,
            cache_bytes: crate::format::DEFAULT_CACHE_BYTES,
        }
    }
}

/// An open chain of images.
#[derive(Debug)]
pub struct Chain {
    /// Base first, active last; never empty.
    nodes: Vec<Node>,
    /// Where each node is in `nodes`.
    index: HashMap<NodeId, usize>,
    /// The id the next new node gets: ids are never reused, even for nodes
    /// that left the chain.
    next_id: u64,
    /// How the chain was opened; new nodes are opened the same way.
    options: ChainOptions,
    /// The metadata cache every image of the chain draws from, shared by
    /// every version of the chain.
    cache: Arc<MetadataCache>,
    /// Which level answers each range, for this version of the chain.
    memo: memo::Memo,
}

impl Chain {
    /// Opens `top` and its whole backing chain (see [`open`] for the rules).
    pub fn open(top: &Path, options: &ChainOptions) -> Result<Chain, ChainError> {
        let cache = MetadataCache::new(options.cache_bytes);
        let nodes = open::open_nodes(top, options, &cache)?;
        let next_id = nodes.len() as u64;
        let memo = memo::Memo::new(&cache, Arc::new(memo::Changes::new()));
        Ok(Chain::from_nodes(
            nodes,
            next_id,
            options.clone(),
            cache,
            memo,
        ))
    }

    /// A chain of `nodes`, base first.
    fn from_nodes(
        nodes: Vec<Node>,
        next_id: u64,
        options: ChainOptions,
        cache: Arc<MetadataCache>,
        memo: memo::Memo,
    ) -> Chain {
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| (node.id(), i))
            .collect();
        Chain {
            nodes,
            index,
            next_id,
            options,
            cache,
            memo,
        }
    }

    /// A later version of this chain, made of `nodes`: same cache, a memo
    /// of its own (levels may have moved).
    fn with_nodes(&self, nodes: Vec<Node>, next_id: u64) -> Chain {
        Chain::from_nodes(
            nodes,
            next_id,
            self.options.clone(),
            Arc::clone(&self.cache),
            self.memo.renewed(),
        )
    }

    /// The metadata cache the chain's images share.
    pub fn cache(&self) -> &MetadataCache {
        &self.cache
    }

    /// The nodes, base first, active last.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The active node: the top of the chain.
    pub fn active(&self) -> &Node {
        // The open walk always yields at least the top, and nothing removes it.
        &self.nodes[self.nodes.len() - 1]
    }

    /// The node with `id`, if it is in the chain.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.index.get(&id).map(|&i| &self.nodes[i])
    }

    /// The node called `name`: a node file name, `active`, or the absolute
    /// path of its image (as the chain reached it, or any path to the same
    /// file).
    pub fn find(&self, name: &str) -> Option<&Node> {
        if name == "active" {
            return Some(self.active());
        }
        if let Some(node) = self.nodes.iter().find(|node| node.name() == name) {
            return Some(node);
        }
        let path = Path::new(name);
        if !path.is_absolute() {
            return None;
        }
        let canonical = std::fs::canonicalize(path).ok();
        self.nodes
            .iter()
            .find(|node| node.path() == path || canonical.as_deref() == Some(node.canonical_path()))
    }

    /// Fills `buf` with what a guest of `node` sees at `offset`. The range
    /// must lie inside the node.
    pub fn read(&self, node: NodeId, offset: u64, buf: &mut [u8]) -> Result<(), ChainError> {
        let level = self.level(node)?;
        self.check_bounds(level, offset, buf.len() as u64)?;
        if self.nodes[level].hidden() {
            return Err(ChainError::Hidden {
                node: self.nodes[level].name().to_owned(),
            });
        }
        resolve::read_chain(&self.nodes, level, offset, buf, &self.memo)
            .map_err(|e| self.level_error(e))
    }

    /// Writes `data` at `offset` of `node`, which must be the active node of
    /// a writable chain; partial clusters are completed from the chain below.
    pub fn write(&self, node: NodeId, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        let level = self.writable_level(node, offset, data.len() as u64)?;
        self.nodes[level].before_write(offset, data.len() as u64);
        let below = write::Below::new(&self.nodes, level, &self.memo);
        let result = self.nodes[level].image().write(offset, data, &below);
        // Even a failed write may have changed part of the range.
        self.memo.changes().changed(offset, data.len() as u64);
        result.map_err(|e| below.error(e))?;
        self.nodes[level].written(offset, data.len() as u64);
        Ok(())
    }

    /// Writes the clusters from `offset` of `node` compressed, as
    /// [`crate::format::Image::write_compressed`] (a qcow2 node without an
    /// external data file; whole clusters, the last of which may be the
    /// last partial one; one sync for the run), under the same rules as
    /// [`Chain::write`]; the node's write hooks and bitmaps hear of it as
    /// of any write.
    pub fn write_compressed(
        &self,
        node: NodeId,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ChainError> {
        let level = self.writable_level(node, offset, data.len() as u64)?;
        let target = &self.nodes[level];
        target.before_write(offset, data.len() as u64);
        let result = target.image().write_compressed(offset, data);
        // Even a failed write may have changed part of the range.
        self.memo.changes().changed(offset, data.len() as u64);
        result.map_err(|e| target.error(e))?;
        target.written(offset, data.len() as u64);
        Ok(())
    }

    /// Fills the parts of `offset..offset + len` that `node` does not hold
    /// with `data` (zeros when `None`): what a stream copies up. Never
    /// overwrites what the node holds, and is serialised with writes to the
    /// node. The node must take writes. Returns the bytes filled; the
    /// node's write hooks hear of the range when anything was.
    pub fn populate(
        &self,
        node: NodeId,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<u64, ChainError> {
        let level = self.writable_level(node, offset, len)?;
        // What the node lacks reads from below; filled with other data (a
        // commit into its base), the node's view changes.
        self.nodes[level].before_write(offset, len);
        let below = write::Below::new(&self.nodes, level, &self.memo);
        let result = self.nodes[level]
            .image()
            .populate(offset, len, data, &below);
        self.memo.changes().changed(offset, len);
        let filled = result.map_err(|e| below.error(e))?;
        if filled > 0 {
            self.nodes[level].written(offset, len);
        }
        Ok(filled)
    }

    /// Where `node` itself keeps its guest bytes from `offset` (at most
    /// `len`) as they are, for [`Chain::copy_into`]: `None` when the first
    /// of them is not plain data in `node`.
    pub fn host_range(
        &self,
        node: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<Option<HostRange>, ChainError> {
        let level = self.level(node)?;
        let node = &self.nodes[level];
        node.image()
            .host_range(offset, len)
            .map_err(|e| node.error(e))
    }

    /// Puts the bytes of `source` at guest `offset` of `dest` without
    /// reading them, where `dest`'s format allows: into what it does not
    /// hold (as [`Chain::populate`]), and with `overwrite` over what a raw
    /// `dest` holds too. Returns the bytes placed, from `offset`; the caller
    /// writes the rest with [`Chain::populate`] or [`Chain::write`].
    pub fn copy_into(
        &self,
        dest: NodeId,
        offset: u64,
        source: &HostRange,
        overwrite: bool,
    ) -> Result<u64, ChainError> {
        let level = self.writable_level(dest, offset, source.len)?;
        let node = &self.nodes[level];
        node.before_write(offset, source.len);
        let result = node.image().place_from(offset, source, overwrite);
        self.memo.changes().changed(offset, source.len);
        let placed = result.map_err(|e| node.error(e))?;
        if placed > 0 {
            node.written(offset, placed);
        }
        Ok(placed)
    }

    /// Makes `offset..offset + len` of `node` read as zeros (same rules as
    /// [`Chain::write`]).
    pub fn zero_range(&self, node: NodeId, offset: u64, len: u64) -> Result<(), ChainError> {
        let level = self.writable_level(node, offset, len)?;
        self.nodes[level].before_write(offset, len);
        let below = write::Below::new(&self.nodes, level, &self.memo);
        let result = self.nodes[level].image().zero_range(offset, len, &below);
        self.memo.changes().changed(offset, len);
        result.map_err(|e| below.error(e))?;
        self.nodes[level].written(offset, len);
        Ok(())
    }

    /// How `node` holds the run starting at `offset` (at most `len` bytes),
    /// looking at `node` and every node below it down to `base`, exclusive
    /// (`None`: to the bottom of the chain). `base` must be below `node`.
    pub fn block_status(
        &self,
        node: NodeId,
        base: Option<NodeId>,
        offset: u64,
        len: u64,
    ) -> Result<ChainExtent, ChainError> {
        let level = self.level(node)?;
        let bottom = match base {
            Some(base) => self.level(base)? + 1,
            None => 0,
        };
        let size = self.nodes[level].virtual_size();
        if offset >= size || len == 0 {
            return Err(self.out_of_bounds(level, offset, len));
        }
        let len = len.min(size - offset);
        if bottom > level {
            // Nothing is consulted: the whole run comes from the base.
            return Ok(ChainExtent {
                len,
                allocation: crate::format::Allocation::Unallocated,
                node: None,
                depth: 0,
            });
        }
        query::status_chain(&self.nodes, level, bottom, offset, len)
            .map_err(|e| self.level_error(e))
    }

    /// Starts writing what `node` holds dirty to the device, without
    /// waiting (see [`crate::format::Image::start_writeback`]).
    pub fn start_writeback(&self, node: NodeId) -> Result<(), ChainError> {
        let node = &self.nodes[self.level(node)?];
        node.image().start_writeback().map_err(|e| node.error(e))
    }

    /// Makes every completed write durable, metadata included.
    pub fn flush(&self) -> Result<(), ChainError> {
        for node in self.nodes.iter().rev().filter(|node| node.writable()) {
            node.image().flush().map_err(|e| node.error(e))?;
        }
        Ok(())
    }

    /// Closes every image, top first, and reports the first error; every
    /// image is closed even after one fails.
    pub fn close(self) -> Result<(), ChainError> {
        let mut first = None;
        for node in self.nodes.iter().rev() {
            node.put_persistent_bitmaps();
            if let Err(e) = node.image().close() {
                first.get_or_insert(node.error(e));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Where `id` is in `nodes`.
    fn level(&self, id: NodeId) -> Result<usize, ChainError> {
        self.index
            .get(&id)
            .copied()
            .ok_or(ChainError::NoSuchNode { id: id.0 })
    }

    /// The level of `node` if it may be written at `offset..offset + len`.
    fn writable_level(&self, node: NodeId, offset: u64, len: u64) -> Result<usize, ChainError> {
        let level = self.level(node)?;
        let target = &self.nodes[level];
        if !target.writable() {
            return Err(ChainError::ReadOnly {
                node: target.name().to_owned(),
            });
        }
        self.check_bounds(level, offset, len)?;
        Ok(level)
    }

    fn check_bounds(&self, level: usize, offset: u64, len: u64) -> Result<(), ChainError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.nodes[level].virtual_size() => Ok(()),
            _ => Err(self.out_of_bounds(level, offset, len)),
        }
    }

    fn out_of_bounds(&self, level: usize, offset: u64, len: u64) -> ChainError {
        let node = &self.nodes[level];
        ChainError::OutOfBounds {
            node: node.name().to_owned(),
            offset,
            len,
            size: node.virtual_size(),
        }
    }

    /// Names the image a walk failed at.
    fn level_error(&self, error: resolve::LevelError) -> ChainError {
        match self.nodes.get(error.level) {
            Some(node) => node.error(error.source),
            None => ChainError::Image {
                path: self.active().path().to_path_buf(),
                source: error.source,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_can_be_shared_between_request_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Chain>();
        shared::<ChainError>();
    }
}
