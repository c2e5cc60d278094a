//! The qcow2 engine opened directly on a storage, for the tests that drive
//! it without a chain: images with no external data file.

use std::sync::Arc;

use chainfs::format::Qcow2;
use chainfs::format::{MetadataCache, OpenOptions};
use chainfs::storage::Storage;

/// Opens `storage` as qcow2 with a metadata cache of `cache_bytes`; an
/// image that asks for an external data file fails the test.
pub fn open_qcow2(storage: Arc<dyn Storage>, writable: bool, cache_bytes: u64) -> Qcow2 {
    let no_files = |name: &str, _: bool| -> std::io::Result<Arc<dyn Storage>> {
        panic!("unexpected data file {name}")
    };
    let options = OpenOptions {
        writable,
        cache: MetadataCache::new(cache_bytes),
    };
    Qcow2::open(storage, &options, &no_files).unwrap()
}
