//! A mirror's target and the chain: the target's own chain while the job
//! copies into it (the target on top of the nodes its backing file names),
//! and the pivot that puts the target in place of the node it copied.
//!
//! ```text
//! A <- B <- C <- D          mirror node=C target=T sync=top
//! A <- B <- T               T's chain while the job runs (B, A shared)
//! A <- B <- T <- D          after the pivot: D rebacked onto T, C gone
//! ```

use std::path::Path;

use super::naming::{file_name, unique_name};
use super::open::open_writable;
use super::{Chain, ChainError, Format, Node, NodeId};
use crate::format::BackingRef;

impl Chain {
    /// Opens the image at `path` (format `format`, else probed) for
    /// writing, as QEMU's file driver locks an image it writes, on top of
    /// this chain's nodes up to `backing` (`None`: alone). Returns that
    /// chain, whose active node is the target; it shares its other images
    /// with this chain.
    pub fn target_chain(
        &self,
        path: &Path,
        format: Option<Format>,
        backing: Option<NodeId>,
    ) -> Result<Chain, ChainError> {
        let keep = match backing {
            Some(id) => self.level(id)? + 1,
            None => 0,
        };
        let name = file_name(path);
        let id = NodeId(self.next_id);
        let target = open_writable(path, format, id, name, &self.options, &self.cache)?;
        let mut nodes = self.nodes[..keep].to_vec();
        nodes.push(target);
        Ok(self.with_nodes(nodes, self.next_id + 1))
    }

    /// The chain with `target` (the active node of a [`Chain::target_chain`])
    /// in place of `node`, on top of this chain's nodes up to `backing`
    /// (`None`: alone; `node` itself: it stays, below the target). The node
    /// above `node` is rebacked onto the target (it must take writes); with
    /// `node` active, the target becomes the active layer (it must take
    /// writes). Every node below `backing`'s successor up to `node` leaves.
    pub fn replaced_by(
        &self,
        node: NodeId,
        target: &Node,
        backing: Option<NodeId>,
    ) -> Result<Chain, ChainError> {
        let level = self.level(node)?;
        let keep = match backing {
            Some(id) => self.level(id)? + 1,
            None => 0,
        };
        if keep > level + 1 {
            return Err(ChainError::Invalid {
                path: target.path().to_path_buf(),
                reason: "the target's backing node is above the node it replaces".into(),
            });
        }
        let above = self.nodes.get(level + 1);
        if above.is_none() && !target.writable() {
            return Err(ChainError::ReadOnly {
                node: target.name().to_owned(),
            });
        }
        let mut nodes = self.nodes[..keep].to_vec();
        let rest = self.nodes.get(level + 2..).unwrap_or_default();
        let taken = |name: &str| {
            nodes
                .iter()
                .chain(above)
                .chain(rest)
                .any(|n| n.name() == name)
        };
        let name = unique_name(&file_name(target.path()), taken);
        let target = target.with_identity(NodeId(self.next_id), name);
        if let Some(above) = above {
            let backing = BackingRef {
                file: self.name_in_style(level + 1, above, &target),
                format: Some(target.format()),
            };
            above
                .image()
                .set_backing(Some(&backing))
                .map_err(|e| above.error(e))?;
            nodes.push(target);
            nodes.push(above.with_backing(Some(backing)));
            nodes.extend_from_slice(rest);
        } else {
            nodes.push(target);
        }
        Ok(self.with_nodes(nodes, self.next_id + 1))
    }
}
