//! Backing resolution: opening a chain from its top down, as QEMU does.
//!
//! Every image the chain can make chainfs open goes through this one gate:
//! the backing file name from the header is joined to the directory of the
//! image naming it (absolute names as they are, `file:` stripped, other
//! protocols refused); its format comes from the backing-format extension,
//! else from probing, with a warning. One loop, no recursion, with loop
//! detection on file identity (device and inode) and a depth limit.
//!
//! Nothing is modified before the whole chain has opened: every image is
//! first opened read-only, and only then is the top reopened writable (which
//! may repair it), so a failing open leaves every image as it was.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::naming;
use super::{ChainError, ChainOptions, Node, NodeId};
use crate::format::{self, Format, FormatError, Image, MetadataCache, OpenOptions};
use crate::storage::{lock, FileStorage, LockMode, Storage};

/// The deepest chain chainfs opens, top included.
pub const MAX_DEPTH: usize = 4096;

/// Locks `storage`'s file as `mode` says; the lock is held as long as the
/// file stays open (an OFD lock belongs to the open file description).
fn lock_file(storage: &FileStorage, mode: LockMode) -> Result<(), ChainError> {
    lock::lock(storage.file(), storage.path(), mode).map_err(|source| ChainError::Lock {
        path: storage.path().to_path_buf(),
        source,
    })
}

/// An image the walk is about to open.
struct Target {
    /// Absolute path, as the chain names it (not canonical: relative backing
    /// names are joined to this path's directory, as QEMU does).
    path: PathBuf,
    /// The format from the backing-format extension, if any.
    format: Option<Format>,
    /// The image whose header names this one; `None` for the top.
    pointed_by: Option<PathBuf>,
}

/// An image opened by the walk, before it becomes a node.
struct Opened {
    path: PathBuf,
    canonical: PathBuf,
    storage: Arc<FileStorage>,
    image: Image,
}

/// Opens the chain below and including `top`; returns its nodes base first.
/// Every image draws its metadata cache from `cache`.
pub(super) fn open_nodes(
    top: &Path,
    options: &ChainOptions,
    cache: &Arc<MetadataCache>,
) -> Result<Vec<Node>, ChainError> {
    if options.writable && options.force_share {
        return Err(ChainError::Invalid {
            path: top.to_path_buf(),
            reason: "force-share requires a read-only open".into(),
        });
    }
    let top = std::path::absolute(top).map_err(|source| ChainError::Io {
        path: top.to_path_buf(),
        source,
    })?;
    let mut opened = open_all(top, options, cache)?;
    if options.writable && !opened.is_empty() {
        let top = opened.remove(0);
        opened.insert(0, reopen_writable(top, options, cache)?);
    }
    Ok(into_nodes(opened, options))
}

/// The walk: opens the top, then each backing file in turn, read-only.
/// Returns the images top first.
fn open_all(
    top: PathBuf,
    options: &ChainOptions,
    cache: &Arc<MetadataCache>,
) -> Result<Vec<Opened>, ChainError> {
    let mut opened: Vec<Opened> = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some(Target {
        path: top,
        format: None,
        pointed_by: None,
    });
    while let Some(target) = next.take() {
        if opened.len() >= MAX_DEPTH {
            return Err(ChainError::TooDeep {
                image: target.pointed_by.unwrap_or(target.path),
                limit: MAX_DEPTH,
            });
        }
        let (identity, canonical) = target.locate()?;
        if !seen.insert(identity) {
            return Err(ChainError::Loop {
                image: target.pointed_by.unwrap_or_else(|| target.path.clone()),
                backing: target.path,
            });
        }
        let is_top = opened.is_empty();
        let (storage, image) = target
            .open(is_top, options, cache)
            .map_err(|err| err.out_of_descriptors(opened.len()))?;
        next = backing_target(&image, &target.path)?;
        opened.push(Opened {
            path: target.path,
            canonical,
            storage,
            image,
        });
    }
    Ok(opened)
}

/// Replaces the read-only image of the top with a writable one on the same
/// file, and so under the same lock.
fn reopen_writable(
    top: Opened,
    options: &ChainOptions,
    cache: &Arc<MetadataCache>,
) -> Result<Opened, ChainError> {
    let Opened {
        path,
        canonical,
        storage,
        image,
    } = top;
    let format = image.format();
    // The read-only image was only read from, so dropping it writes nothing;
    // it must go first, because it holds its external data file open under
    // a read lock that the writable open's write lock would conflict with.
    drop(image);
    let image =
        open_image(storage.clone(), format, &path, true, options, cache).map_err(|source| {
            ChainError::Image {
                path: path.clone(),
                source,
            }
        })?;
    Ok(Opened {
        path,
        canonical,
        storage,
        image,
    })
}

/// Opens a freshly created qcow2 image at `path` as the new writable top
/// of a chain, locked for writing.
pub(super) fn open_new_top(
    path: &Path,
    id: NodeId,
    name: String,
    options: &ChainOptions,
    cache: &Arc<MetadataCache>,
) -> Result<Node, ChainError> {
    open_writable(path, Some(Format::Qcow2), id, name, options, cache)
}

/// Opens the image at `path` for writing, locked as QEMU's file driver
/// locks an image it writes (a new top, a mirror's target); its format is
/// `format`, else probed.
pub(super) fn open_writable(
    path: &Path,
    format: Option<Format>,
    id: NodeId,
    name: String,
    options: &ChainOptions,
    cache: &Arc<MetadataCache>,
) -> Result<Node, ChainError> {
    let io_error = |source| ChainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let storage = FileStorage::open(path, true).map_err(io_error)?;
    lock_file(&storage, LockMode::Write)?;
    let canonical = std::fs::canonicalize(path).map_err(io_error)?;
    let image_error = |source| ChainError::Image {
        path: path.to_path_buf(),
        source,
    };
    let format = match format {
        Some(format) => format,
        None => format::probe(&storage).map_err(image_error)?,
    };
    let storage = Arc::new(storage);
    let writable = ChainOptions {
        writable: true,
        ..options.clone()
    };
    let image =
        open_image(storage.clone(), format, path, true, &writable, cache).map_err(image_error)?;
    let path = path.to_path_buf();
    Ok(Node::new(
        id,
        name,
        path,
        canonical,
        image,
        storage,
        LockMode::Write,
    ))
}

/// Names the opened images (top first) and turns them into nodes, base
/// first, with ids counting up from the base.
fn into_nodes(opened: Vec<Opened>, options: &ChainOptions) -> Vec<Node> {
    let names = naming::name_nodes(opened.iter().map(|o| o.path.as_path()));
    let count = opened.len();
    let mut nodes: Vec<Node> = opened
        .into_iter()
        .zip(names)
        .rev()
        .enumerate()
        .map(|(i, (o, name))| {
            let lock = lock_mode(i + 1 == count, options);
            let id = NodeId(i as u64);
            Node::new(id, name, o.path, o.canonical, o.image, o.storage, lock)
        })
        .collect();
    nodes.shrink_to_fit();
    nodes
}

impl Target {
    /// An I/O error on this target, naming what points to it.
    fn io_error(&self, source: io::Error) -> ChainError {
        match &self.pointed_by {
            Some(image) => ChainError::MissingBacking {
                backing: self.path.clone(),
                image: image.clone(),
                source,
            },
            None => ChainError::Io {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// The file's identity (device and inode, so that a loop through a
    /// hard link or another path to the same file is caught too) and its
    /// canonical path.
    fn locate(&self) -> Result<((u64, u64), PathBuf), ChainError> {
        let metadata = std::fs::metadata(&self.path).map_err(|e| self.io_error(e))?;
        let canonical = std::fs::canonicalize(&self.path).map_err(|e| self.io_error(e))?;
        Ok(((metadata.dev(), metadata.ino()), canonical))
    }

    /// A format error on this target, naming what points to it.
    fn format_error(&self, source: FormatError) -> ChainError {
        match &self.pointed_by {
            Some(image) => ChainError::BackingImage {
                backing: self.path.clone(),
                image: image.clone(),
                source,
            },
            None => ChainError::Image {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// Opens and locks the file, finds its format and opens it read-only.
    /// In a writable chain every file is opened for writing when it can be,
    /// so that a job can later let a node below the top take writes by
    /// relocking the same descriptor (a second descriptor's write lock would
    /// conflict with this one's read lock); the locks are what say who
    /// writes, and backing files are locked for reading only.
    fn open(
        &self,
        is_top: bool,
        options: &ChainOptions,
        cache: &Arc<MetadataCache>,
    ) -> Result<(Arc<FileStorage>, Image), ChainError> {
        let storage = self.open_file(is_top, options)?;
        lock_file(&storage, lock_mode(is_top, options))?;
        let storage = Arc::new(storage);
        let format = self.format(storage.as_ref())?;
        let image = open_image(storage.clone(), format, &self.path, false, options, cache)
            .map_err(|e| self.format_error(e))?;
        Ok((storage, image))
    }

    /// Opens the file, for writing in a writable chain; a backing file that
    /// may not be written (permissions, read-only filesystem) is opened
    /// read-only instead, and jobs then cannot write to it.
    fn open_file(&self, is_top: bool, options: &ChainOptions) -> Result<FileStorage, ChainError> {
        if !options.writable {
            return FileStorage::open(&self.path, false).map_err(|e| self.io_error(e));
        }
        match FileStorage::open(&self.path, true) {
            Err(err) if !is_top && refuses_writing(&err) => {
                FileStorage::open(&self.path, false).map_err(|e| self.io_error(e))
            }
            result => result.map_err(|e| self.io_error(e)),
        }
    }

    /// The format the header extension names, else the probed one.
    fn format(&self, storage: &FileStorage) -> Result<Format, ChainError> {
        if let Some(format) = self.format {
            return Ok(format);
        }
        let probed = format::probe(storage).map_err(|e| self.format_error(e))?;
        match &self.pointed_by {
            Some(image) => log::warn!(
                "Backing file format not specified for {} (backing file of {}); probed {probed}{}",
                self.path.display(),
                image.display(),
                if probed == Format::Raw {
                    ", which is unsafe if the guest can write a qcow2 header there"
                } else {
                    ""
                }
            ),
            None if probed == Format::Raw => log::warn!(
                "Image format was not specified for {} and probing guessed raw",
                self.path.display()
            ),
            None => {}
        }
        Ok(probed)
    }
}

/// The lock an image takes, as QEMU's file driver would: the writable top
/// writes; everything else reads (shared reading, nobody writing);
/// `force_share` takes none, as `qemu-img -U`.
fn lock_mode(is_top: bool, options: &ChainOptions) -> LockMode {
    if options.force_share {
        LockMode::None
    } else if is_top && options.writable {
        LockMode::Write
    } else {
        LockMode::Read
    }
}

/// Opens `storage` as an image; the files it names (an external data file)
/// are resolved against `path`'s directory, opened writable iff the image
/// is, and locked like it.
fn open_image(
    storage: Arc<dyn Storage>,
    format: Format,
    path: &Path,
    writable: bool,
    options: &ChainOptions,
    cache: &Arc<MetadataCache>,
) -> Result<Image, FormatError> {
    let fd_writable = storage.is_writable();
    let opener = |name: &str, wants_write: bool| -> io::Result<Arc<dyn Storage>> {
        let file = resolve_name(name, path).map_err(|reason| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?}: {reason}"))
        })?;
        // The data file follows its image's descriptor, so that it can take
        // writes whenever the image can. The OS error goes up as it is (the
        // format layer names the file, the chain the image): rewrapping it
        // would lose its errno.
        let storage = FileStorage::open(&file, fd_writable && wants_write)?;
        lock_file(&storage, lock_mode(writable, options)).map_err(|e| {
            let describe = format!("file {} named by {}: {e}", file.display(), path.display());
            io::Error::new(io::ErrorKind::WouldBlock, describe)
        })?;
        Ok(Arc::new(storage))
    };
    let open_options = OpenOptions {
        writable,
        cache: Arc::clone(cache),
    };
    Image::open(storage, format, &open_options, &opener)
}

/// Whether opening for writing failed only because writing is not allowed.
fn refuses_writing(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY)
    )
}

/// Where the backing file of `image` (at `path`) is, if it has one. The
/// name is resolved from its exact bytes, UTF-8 or not, as QEMU does.
fn backing_target(image: &Image, path: &Path) -> Result<Option<Target>, ChainError> {
    let (Some(name), Some(backing)) = (image.backing_name(), image.backing()) else {
        return Ok(None);
    };
    let resolved = resolve_name(&name, path).map_err(|reason| ChainError::UnsupportedBacking {
        backing: backing.file.clone(),
        image: path.to_path_buf(),
        reason,
    })?;
    Ok(Some(Target {
        path: resolved,
        format: backing.format,
        pointed_by: Some(path.to_path_buf()),
    }))
}

/// Resolves a file name stored in the image at `image` as QEMU does: an
/// absolute name as it is, a relative one against `image`'s directory. A
/// `file:` prefix is the local-file protocol; QEMU takes what follows as is,
/// so a relative name after it is relative to the current directory. Any
/// other protocol (`nbd:`, `json:`, …) is refused.
pub fn resolve_name(name: impl AsRef<OsStr>, image: &Path) -> Result<PathBuf, String> {
    let name = name.as_ref().as_bytes();
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if let Some(protocol) = protocol_of(name) {
        return match name.strip_prefix(b"file:") {
            Some(rest) if !rest.is_empty() => {
                std::path::absolute(OsStr::from_bytes(rest)).map_err(|e| e.to_string())
            }
            Some(_) => Err("the name is empty".into()),
            None => Err(format!(
                "protocol {:?} is not supported; only local files are",
                String::from_utf8_lossy(protocol)
            )),
        };
    }
    let name = Path::new(OsStr::from_bytes(name));
    if name.is_absolute() {
        return Ok(name.to_path_buf());
    }
    let dir = image.parent().unwrap_or(Path::new("/"));
    Ok(dir.join(name))
}

/// The protocol prefix of `name`, as QEMU sees one: a `:` before any `/`.
fn protocol_of(name: &[u8]) -> Option<&[u8]> {
    let end = name.iter().position(|&b| b == b':' || b == b'/')?;
    (name[end] == b':').then(|| &name[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_join_the_directory_of_the_image_naming_them() {
        let image = Path::new("/vm/top/e.qcow2");
        assert_eq!(
            resolve_name("d.qcow2", image).unwrap(),
            Path::new("/vm/top/d.qcow2")
        );
        assert_eq!(
            resolve_name("../base/a.img", image).unwrap(),
            Path::new("/vm/top/../base/a.img")
        );
        assert_eq!(
            resolve_name("/abs/a.img", image).unwrap(),
            Path::new("/abs/a.img")
        );
    }

    #[test]
    fn the_file_protocol_is_stripped() {
        let image = Path::new("/vm/e.qcow2");
        assert_eq!(
            resolve_name("file:/abs/a.img", image).unwrap(),
            Path::new("/abs/a.img")
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            resolve_name("file:a.img", image).unwrap(),
            cwd.join("a.img")
        );
    }

    #[test]
    fn other_protocols_and_empty_names_are_refused() {
        let image = Path::new("/vm/e.qcow2");
        let err = resolve_name("nbd:localhost:10809", image).unwrap_err();
        assert!(err.contains("\"nbd\""), "{err}");
        assert!(resolve_name("json:{}", image).is_err());
        assert!(resolve_name("", image).is_err());
        assert!(resolve_name("file:", image).is_err());
    }

    #[test]
    fn a_colon_after_a_slash_is_part_of_the_file_name() {
        let image = Path::new("/vm/e.qcow2");
        assert_eq!(
            resolve_name("./a:b.img", image).unwrap(),
            Path::new("/vm/./a:b.img")
        );
    }
}
