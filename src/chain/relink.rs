//! Changing the shape of the chain: a node rebacked onto a node further
//! down (the end of a stream or commit), and a new active image on top (a
//! live snapshot). Each change writes the image headers first and then
//! returns a new [`Chain`] that shares its open images with this one, so
//! that readers still holding the old chain keep reading what it showed.

use std::path::{Component, Path, PathBuf};

use super::naming::{file_name, unique_name};
use super::open::resolve_name;
use super::{create_image, Chain, ChainError, Node, NodeId};
use crate::format::BackingRef;

/// Cluster size of images chainfs creates (QEMU's default).
const NEW_IMAGE_CLUSTER_SIZE: u64 = 64 << 10;

impl Chain {
    /// Rebacks `node` onto `base` (`None`: no backing file) and drops every
    /// node strictly between them. The header gets `backing_file` if given,
    /// else the base's name in the style the chain used: relative to the
    /// node's directory if the base was named by a relative path, absolute
    /// otherwise.
    pub fn rebacked(
        &self,
        node: NodeId,
        base: Option<NodeId>,
        backing_file: Option<String>,
    ) -> Result<Chain, ChainError> {
        let top = self.level(node)?;
        let bottom = match base {
            Some(id) => Some(self.level(id)?),
            None => None,
        };
        if bottom.is_some_and(|b| b >= top) {
            return Err(ChainError::Invalid {
                path: self.nodes[top].path().to_path_buf(),
                reason: "the new backing node is not below the node".into(),
            });
        }
        let backing = bottom.map(|b| BackingRef {
            file: backing_file.unwrap_or_else(|| self.backing_string(top, b)),
            format: Some(self.nodes[b].format()),
        });
        let target = &self.nodes[top];
        target
            .image()
            .set_backing(backing.as_ref())
            .map_err(|e| target.error(e))?;
        let keep_below = bottom.map_or(0, |b| b + 1);
        let mut nodes = self.nodes[..keep_below].to_vec();
        nodes.push(target.with_backing(backing));
        nodes.extend_from_slice(&self.nodes[top + 1..]);
        Ok(self.with_nodes(nodes, self.next_id))
    }

    /// The string naming the node at level `base` from the node at level
    /// `node`, in the style of the string that named it so far.
    fn backing_string(&self, node: usize, base: usize) -> String {
        self.name_in_style(base + 1, &self.nodes[node], &self.nodes[base])
    }

    /// The string naming `target` from the image of `from`, in the style of
    /// the backing string of the node at level `named_by`: relative to
    /// `from`'s directory if that string was relative, else absolute.
    pub(super) fn name_in_style(&self, named_by: usize, from: &Node, target: &Node) -> String {
        let named_relative = self.nodes[named_by]
            .backing_file()
            .is_some_and(|name| !Path::new(name).is_absolute() && !name.starts_with("file:"));
        if named_relative {
            if let Some(dir) = from.canonical_path().parent() {
                return relative_path(target.canonical_path(), dir)
                    .to_string_lossy()
                    .into_owned();
            }
        }
        target.path().to_string_lossy().into_owned()
    }

    /// Creates a qcow2 image at `path` (which must not exist) backed by the
    /// active image, and returns the chain with it as the new active node.
    /// The old active node stops taking writes; its data is flushed first.
    pub fn with_new_top(&self, path: &Path) -> Result<Chain, ChainError> {
        let path = std::path::absolute(path).map_err(|source| ChainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let active = self.active();
        let backing_name = self.snapshot_backing_string(&path);
        create_image(
            &path,
            active.virtual_size(),
            NEW_IMAGE_CLUSTER_SIZE,
            Some((&backing_name, active.format())),
        )?;
        let taken = |name: &str| self.nodes.iter().any(|n| n.name() == name);
        let name = unique_name(&file_name(&path), taken);
        let node = super::open::open_new_top(
            &path,
            NodeId(self.next_id),
            name,
            &self.options,
            &self.cache,
        )?;
        if let Err(err) = active.set_writable(false) {
            // Leave things as they were: the old top keeps the writes.
            drop(node);
            let _ = std::fs::remove_file(&path);
            return Err(err);
        }
        let mut nodes = self.nodes.clone();
        nodes.push(node);
        Ok(self.with_nodes(nodes, self.next_id + 1))
    }

    /// The backing string a new image at `path` stores for the active
    /// image: its bare file name beside it, its absolute path elsewhere.
    fn snapshot_backing_string(&self, path: &Path) -> String {
        let active = self.active();
        let same_dir = path.parent().map(Path::to_path_buf)
            == active.canonical_path().parent().map(Path::to_path_buf)
            || path.parent() == active.path().parent();
        let resolves = |name: &str| {
            resolve_name(name, path)
                .is_ok_and(|p| std::fs::canonicalize(p).is_ok_and(|p| p == active.canonical_path()))
        };
        let bare = file_name(active.path());
        if same_dir && resolves(&bare) {
            bare
        } else {
            active.canonical_path().to_string_lossy().into_owned()
        }
    }
}

/// `target` relative to the directory `dir` (both absolute).
fn relative_path(target: &Path, dir: &Path) -> PathBuf {
    let target: Vec<Component> = target.components().collect();
    let dir: Vec<Component> = dir.components().collect();
    let common = target.iter().zip(&dir).take_while(|(a, b)| a == b).count();
    let mut relative = PathBuf::new();
    for _ in common..dir.len() {
        relative.push("..");
    }
    for part in &target[common..] {
        relative.push(part);
    }
    relative
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_out_of_the_directory() {
        let cases = [
            ("/a/b/base.img", "/a/b", "base.img"),
            ("/a/base/x.img", "/a/top", "../base/x.img"),
            ("/x.img", "/a/b", "../../x.img"),
            ("/a/b/c/d.img", "/a", "b/c/d.img"),
        ];
        for (target, dir, want) in cases {
            assert_eq!(
                relative_path(Path::new(target), Path::new(dir)),
                Path::new(want)
            );
        }
    }
}
