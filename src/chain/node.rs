//! One node of the chain: an open image with its name, path and the backing
//! pointer its header holds.

use std::fmt;
use std::path::{Path, PathBuf};

use super::ChainError;
use crate::format::{BackingRef, Format, Image};

/// Identifies a node for as long as it is in the chain. Ids are never
/// reused, so a stale id cannot reach a different node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One image of the chain.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    name: String,
    path: PathBuf,
    canonical: PathBuf,
    image: Image,
    backing: Option<BackingRef>,
    writable: bool,
}

impl Node {
    /// Wraps an open image. `path` is the absolute path by which the chain
    /// reached the image; `canonical` the same with symlinks resolved.
    pub(super) fn new(
        id: NodeId,
        name: String,
        path: PathBuf,
        canonical: PathBuf,
        image: Image,
    ) -> Node {
        let backing = image.backing();
        Node {
            id,
            name,
            path,
            canonical,
            image,
            backing,
            writable: false,
        }
    }

    /// Marks the node as opened for writing.
    pub(super) fn set_writable(&mut self, writable: bool) {
        self.writable = writable;
    }

    /// Whether the node's image is open for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The node's unique file name in the mount (see [`super::naming`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The absolute path of the image, as the chain reached it: the top as
    /// given, a backing file joined to the directory of the image naming it
    /// (`..` kept, as `qemu-img info` shows it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's path with symlinks and `..` resolved.
    pub fn canonical_path(&self) -> &Path {
        &self.canonical
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        self.image.format()
    }

    /// The open image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.image.virtual_size()
    }

    /// The cluster size, for formats that have one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.image.cluster_size()
    }

    /// The backing file name exactly as stored in the image header.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing.as_ref().map(|backing| backing.file.as_str())
    }

    /// The backing format as stored in the header extension; `None` when the
    /// image has no such extension (the format was probed).
    pub fn backing_format(&self) -> Option<Format> {
        self.backing.as_ref().and_then(|backing| backing.format)
    }

    /// Bytes of host storage this node's own image occupies.
    pub fn allocated_bytes(&self) -> Result<u64, ChainError> {
        self.image
            .allocated_bytes()
            .map_err(|source| self.error(source))
    }

    /// Wraps a format error with this node's path.
    pub(super) fn error(&self, source: crate::format::FormatError) -> ChainError {
        ChainError::Image {
            path: self.path.clone(),
            source,
        }
    }
}
