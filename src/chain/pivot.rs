//! The chain shapes a commit goes through: its intermediates hidden from
//! the mount when it starts, and, at the end of an active commit, the base
//! made the active layer (the pivot).
//!
//! Both return a new [`Chain`] sharing its open images with this one, as
//! every change of shape does (see `relink.rs`).

use super::{Chain, ChainError, NodeId};

impl Chain {
    /// The same chain, with the nodes `hidden` hidden from the mount. The
    /// flag lives in the shared open image, so older versions of the chain
    /// that open handles read through stop showing those nodes too.
    pub fn hiding(&self, hidden: &[NodeId]) -> Result<Chain, ChainError> {
        for id in hidden {
            self.nodes[self.level(*id)?].set_hidden();
        }
        Ok(self.with_nodes(self.nodes.clone(), self.next_id))
    }

    /// The chain cut just above `base`, which becomes the active layer:
    /// every node above it leaves. `base` must already take writes.
    pub fn pivoted_to(&self, base: NodeId) -> Result<Chain, ChainError> {
        let level = self.level(base)?;
        let node = &self.nodes[level];
        if !node.writable() {
            return Err(ChainError::ReadOnly {
                node: node.name().to_owned(),
            });
        }
        Ok(self.with_nodes(self.nodes[..=level].to_vec(), self.next_id))
    }
}
