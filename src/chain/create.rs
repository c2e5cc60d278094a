//! Creating a new image: a qcow2 image, optionally backed by another (the
//! first step of an external snapshot or a mirror, and of tests and the
//! demo), or an empty raw one (a mirror's raw target).

use std::path::{Path, PathBuf};

use super::ChainError;
use crate::format::{create_qcow2, Format, FormatError, Qcow2CreateOptions};
use crate::storage::{FileStorage, Storage};

/// The smallest and largest cluster sizes qcow2 allows.
const CLUSTER_SIZES: std::ops::RangeInclusive<u64> = 512..=(2 << 20);

/// Creates a qcow2 image at `path`, which must not exist, of `size` guest
/// bytes and `cluster_size` byte clusters, backed by `backing` (the backing
/// file name exactly as it is to be stored, and its format).
///
/// If creation fails after the file was made, the file is removed again.
pub fn create_image(
    path: &Path,
    size: u64,
    cluster_size: u64,
    backing: Option<(&str, Format)>,
) -> Result<(), ChainError> {
    let invalid = |reason: String| ChainError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if !cluster_size.is_power_of_two() || !CLUSTER_SIZES.contains(&cluster_size) {
        return Err(invalid(format!(
            "cluster size {cluster_size} is not a power of two from 512 to 2 MiB"
        )));
    }
    let storage = FileStorage::create_new(path).map_err(|source| ChainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let result = write_new(&storage, size, cluster_size.trailing_zeros(), backing);
    drop(storage);
    result.map_err(|source| {
        // The file is ours: we made it a moment ago, and half an image is
        // worse than none.
        let _ = std::fs::remove_file(path);
        ChainError::Image {
            path: PathBuf::from(path),
            source,
        }
    })
}

/// Creates a raw image at `path`, which must not exist: `size` bytes, all
/// a hole, so it reads as zeros and holds no space.
pub fn create_raw_image(path: &Path, size: u64) -> Result<(), ChainError> {
    let io_error = |source| ChainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let storage = FileStorage::create_new(path).map_err(io_error)?;
    if let Err(source) = storage.file().set_len(size) {
        drop(storage);
        // The file is ours, made a moment ago.
        let _ = std::fs::remove_file(path);
        return Err(io_error(source));
    }
    Ok(())
}

/// Writes a fresh qcow2 image (QEMU's defaults: 16-bit refcounts, standard
/// L2 entries) onto empty `storage`.
fn write_new(
    storage: &dyn Storage,
    size: u64,
    cluster_bits: u32,
    backing: Option<(&str, Format)>,
) -> Result<(), FormatError> {
    let options = Qcow2CreateOptions {
        size,
        cluster_bits,
        backing: backing.map(|(file, format)| (file.to_owned(), Some(format.name().to_owned()))),
        extended_l2: false,
        refcount_order: 4,
    };
    create_qcow2(storage, &options)
}
