//! One image's metadata tables in the mount's shared cache
//! ([`crate::format::cache`]): a region of it, in which every table of the
//! image weighs the same.
//!
//! A cached table (`Arc<T>`) changes only as its type allows: L2 entries
//! are stored in place (see `L2Table`), other tables are replaced whole.
//! Either way the writer writes through to disk first and then
//! [`TableCache::insert`]s the table, so that a load racing
//! with it cannot put an older copy back after the newer one (the shared
//! cache refuses such a load's copy).

use crate::format::cache::Region;
use crate::format::Result;
use crate::sync::Arc;

/// The tables of one kind of one image, keyed by a `u64` (a host offset).
#[derive(Debug)]
pub struct TableCache<T> {
    region: Region,
    /// What one table weighs, in bytes.
    table_bytes: u64,
    kind: std::marker::PhantomData<fn() -> T>,
}

impl<T: Send + Sync + 'static> TableCache<T> {
    /// Tables of `table_bytes` each, in `region`.
    pub fn new(region: Region, table_bytes: u64) -> TableCache<T> {
        TableCache {
            region,
            table_bytes,
            kind: std::marker::PhantomData,
        }
    }

    /// The table at `key`, loading it with `load` on a miss.
    pub fn get_or_load(&self, key: u64, load: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        self.region.get_or_load(key, self.table_bytes, load)
    }

    /// Puts a new version of the table at `key`, already written to disk.
    pub fn insert(&self, key: u64, table: Arc<T>) {
        self.region.insert(key, table, self.table_bytes);
    }

    /// Forgets the table at `key` (its cluster was freed).
    pub fn remove(&self, key: u64) {
        self.region.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::cache::{MetadataCache, ENTRY_OVERHEAD};

    #[test]
    fn holds_at_most_its_budget() {
        let cache = MetadataCache::new(4 * (4096 + ENTRY_OVERHEAD));
        let tables = TableCache::new(cache.region(), 4096);
        for key in 0..100u64 {
            tables.get_or_load(key * 4096, || Ok(key)).unwrap();
        }
        assert!(cache.entries() <= 4, "{} tables held", cache.entries());
    }

    #[test]
    fn insert_replaces_what_a_load_put_there() {
        let cache = MetadataCache::new(1 << 20);
        let tables = TableCache::new(cache.region(), 4096);
        tables.get_or_load(65536, || Ok(1)).unwrap();
        tables.insert(65536, Arc::new(2));
        assert_eq!(*tables.get_or_load(65536, || Ok(3)).unwrap(), 2);
    }
}
