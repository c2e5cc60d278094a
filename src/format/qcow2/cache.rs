//! A bounded cache of metadata tables shared by many threads.
//!
//! A cached table (`Arc<T>`) changes only as its type allows: refcount
//! blocks and extended L2 tables are replaced whole, standard L2 entries
//! are single words stored in place (see `L2Table`). The cache is split into shards so that threads looking up
//! different tables do not contend on one lock.
//!
//! Lock order: a shard lock is a leaf — nothing else is locked while one is
//! held. A miss loads the table *under* its shard lock, so that a load racing
//! with a writer's [`TableCache::insert`] cannot put an older copy back after
//! the newer one: writers write the table through to disk before inserting.

use std::num::NonZeroUsize;

use lru::LruCache;

use crate::format::Result;
use crate::sync::{lock, Arc, Mutex};

const MAX_SHARDS: usize = 16;

/// A sharded LRU of tables keyed by their host offset.
#[derive(Debug)]
pub struct TableCache<T> {
    shards: Vec<Mutex<LruCache<u64, Arc<T>>>>,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` tables (at least one per shard).
    pub fn new(capacity: usize) -> TableCache<T> {
        let shard_count = capacity.clamp(1, MAX_SHARDS);
        let per_shard =
            NonZeroUsize::new(capacity.div_ceil(shard_count).max(1)).unwrap_or(NonZeroUsize::MIN);
        let shards = (0..shard_count)
            .map(|_| Mutex::new(LruCache::new(per_shard)))
            .collect();
        TableCache { shards }
    }

    fn shard(&self, key: u64) -> &Mutex<LruCache<u64, Arc<T>>> {
        // Tables are cluster-aligned: mix the bits so neighbours spread out.
        let hash = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        &self.shards[hash as usize % self.shards.len()]
    }

    /// The table at `key`, loading it with `load` on a miss.
    pub fn get_or_load(&self, key: u64, load: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        let mut shard = lock(self.shard(key));
        if let Some(table) = shard.get(&key) {
            return Ok(Arc::clone(table));
        }
        let table = Arc::new(load()?);
        shard.put(key, Arc::clone(&table));
        Ok(table)
    }

    /// Puts a new version of the table at `key`, already written to disk.
    pub fn insert(&self, key: u64, table: Arc<T>) {
        lock(self.shard(key)).put(key, table);
    }

    /// Forgets the table at `key` (its cluster was freed).
    pub fn remove(&self, key: u64) {
        lock(self.shard(key)).pop(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_its_capacity() {
        let cache = TableCache::new(4);
        for key in 0..100u64 {
            cache.get_or_load(key * 4096, || Ok(key)).unwrap();
        }
        let held: usize = cache.shards.iter().map(|s| lock(s).len()).sum();
        assert!(held <= 4, "{held} tables held");
    }

    #[test]
    fn insert_replaces_what_a_load_put_there() {
        let cache = TableCache::new(8);
        cache.get_or_load(65536, || Ok(1)).unwrap();
        cache.insert(65536, Arc::new(2));
        assert_eq!(*cache.get_or_load(65536, || Ok(3)).unwrap(), 2);
    }
}
