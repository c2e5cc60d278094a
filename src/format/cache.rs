//! The metadata cache of a whole mount: one bounded LRU under one byte
//! budget (`--cache-size`) that every image of the chain draws from (L2
//! tables, decompressed clusters, the chain's memo of which level answers a
//! range), whatever the depth of the chain and however many images join it
//! later. Caches that must stay private to an image (the refcount blocks of
//! a writable image, changed in place under its metadata lock) take a
//! [`Hold`] on the same budget instead, and the LRU shrinks by what they hold.
//!
//! The LRU is split into shards, each with an equal slice of what the holds
//! leave, so the bytes cached never exceed the budget and threads touching
//! different entries do not contend. A shard's lock is held only to look an
//! entry up, insert it or evict, never across I/O: a miss loads outside it.
//! A writer that publishes a newer version of an entry ([`Region::insert`],
//! [`Region::remove`]) bumps the shard's generation, and a load that saw an
//! older generation hands its copy back without caching it, so a load that
//! raced a writer can never put an older copy back over the newer one.
//!
//! Lock order: a shard lock is a leaf; nothing else is locked while one is
//! held, and no two shard locks are held at once.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;

use crate::sync::{lock, Arc, Mutex};

/// The smallest slice of the budget a shard gets: enough for a few L2
/// tables of 2 MiB clusters, QEMU's largest.
const MIN_SHARD_BYTES: u64 = 4 << 20;
/// More shards than request threads buy nothing.
const MAX_SHARDS: u64 = 16;
/// What an entry costs besides its value: the LRU's node and index slot and
/// the value's `Arc` header, so that many small entries count too.
pub const ENTRY_OVERHEAD: u64 = 128;

type Value = Arc<dyn Any + Send + Sync>;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    region: u64,
    index: u64,
}

struct Entry {
    value: Value,
    cost: u64,
}

struct Shard {
    lru: LruCache<Key, Entry>,
    bytes: u64,
    /// Bumped by every insert and removal a writer makes.
    generation: u64,
}

impl Shard {
    fn get<T: Any + Send + Sync>(&mut self, key: &Key) -> Option<Arc<T>> {
        let entry = self.lru.get(key)?;
        Arc::clone(&entry.value).downcast::<T>().ok()
    }

    fn forget(&mut self, key: &Key) {
        if let Some(old) = self.lru.pop(key) {
            self.bytes -= old.cost;
        }
    }

    /// Evicts least recently used entries until `room` more bytes fit in
    /// `slice`; false when they cannot fit at all.
    fn make_room(&mut self, room: u64, slice: u64) -> bool {
        while self.bytes + room > slice {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= old.cost,
                None => return false,
            }
        }
        true
    }

    fn put(&mut self, key: Key, value: Value, cost: u64, slice: u64) {
        self.forget(&key);
        if self.make_room(cost, slice) {
            self.lru.put(key, Entry { value, cost });
            self.bytes += cost;
        }
    }
}

/// The cache shared by every image of a mount.
pub struct MetadataCache {
    shards: Box<[Mutex<Shard>]>,
    budget: u64,
    /// Bytes that [`Hold`]s keep outside the LRU.
    held: AtomicU64,
    next_region: AtomicU64,
}

impl fmt::Debug for MetadataCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataCache")
            .field("budget", &self.budget)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl MetadataCache {
    /// A cache of at most `budget` bytes.
    pub fn new(budget: u64) -> Arc<MetadataCache> {
        let count = (budget / MIN_SHARD_BYTES).clamp(1, MAX_SHARDS);
        let shards = (0..count)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruCache::unbounded(),
                    bytes: 0,
                    generation: 0,
                })
            })
            .collect();
        Arc::new(MetadataCache {
            shards,
            budget,
            held: AtomicU64::new(0),
            next_region: AtomicU64::new(0),
        })
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes cached now, holds included.
    pub fn bytes(&self) -> u64 {
        let cached: u64 = self.shards.iter().map(|s| lock(s).bytes).sum();
        cached + self.held.load(Ordering::Acquire)
    }

    /// Entries in the LRU now.
    pub fn entries(&self) -> usize {
        self.shards.iter().map(|s| lock(s).lru.len()).sum()
    }

    /// A new part of the cache for one user, whose keys meet no other's.
    pub fn region(self: &Arc<Self>) -> Region {
        Region {
            cache: Arc::clone(self),
            id: self.next_region.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A hold on the budget, of no bytes yet.
    pub fn hold(self: &Arc<Self>) -> Hold {
        Hold {
            cache: Arc::clone(self),
            bytes: 0,
        }
    }

    /// What each shard may cache: an equal part of what the holds leave.
    fn slice(&self) -> u64 {
        let free = self
            .budget
            .saturating_sub(self.held.load(Ordering::Acquire));
        free / self.shards.len() as u64
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        // Keys are often cluster-aligned offsets: mix the bits so that
        // neighbours spread out.
        let mixed = (key.index ^ key.region.rotate_left(40)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        &self.shards[(mixed >> 40) as usize % self.shards.len()]
    }

    /// Evicts until every shard fits its slice again (a hold grew).
    fn trim(&self) {
        let slice = self.slice();
        for shard in self.shards.iter() {
            lock(shard).make_room(0, slice);
        }
    }
}

/// One user's part of a [`MetadataCache`] (one image's L2 tables, one
/// chain's memo): entries keyed by a `u64` of the user's choosing, each
/// costing what its user says it does, plus [`ENTRY_OVERHEAD`].
#[derive(Clone, Debug)]
pub struct Region {
    cache: Arc<MetadataCache>,
    id: u64,
}

impl Region {
    fn key(&self, index: u64) -> Key {
        Key {
            region: self.id,
            index,
        }
    }

    /// The cache this region is part of.
    pub fn cache(&self) -> &Arc<MetadataCache> {
        &self.cache
    }

    /// The entry at `index`, if it is cached.
    pub fn get<T: Any + Send + Sync>(&self, index: u64) -> Option<Arc<T>> {
        let key = self.key(index);
        lock(self.cache.shard(&key)).get(&key)
    }

    /// The entry at `index`, loading it with `load` on a miss; `cost` is
    /// what the loaded value weighs, in bytes. The load runs without any
    /// lock held.
    pub fn get_or_load<T: Any + Send + Sync, E>(
        &self,
        index: u64,
        cost: u64,
        load: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let key = self.key(index);
        let shard = self.cache.shard(&key);
        let generation = {
            let mut shard = lock(shard);
            if let Some(value) = shard.get(&key) {
                return Ok(value);
            }
            shard.generation
        };
        let value = Arc::new(load()?);
        let slice = self.cache.slice();
        let mut shard = lock(shard);
        if let Some(cached) = shard.get(&key) {
            // Another load got there first: share one copy.
            return Ok(cached);
        }
        if shard.generation == generation {
            shard.put(key, value.clone(), cost + ENTRY_OVERHEAD, slice);
        }
        Ok(value)
    }

    /// Caches `value` at `index` as a load would: a value no newer than
    /// any other version its user may have put there (a memo's answer,
    /// which carries its own validity).
    pub fn put<T: Any + Send + Sync>(&self, index: u64, value: Arc<T>, cost: u64) {
        let key = self.key(index);
        let slice = self.cache.slice();
        lock(self.cache.shard(&key)).put(key, value, cost + ENTRY_OVERHEAD, slice);
    }

    /// Puts a newer version of the entry at `index` (already written
    /// through to disk), replacing the one cached.
    pub fn insert<T: Any + Send + Sync>(&self, index: u64, value: Arc<T>, cost: u64) {
        let key = self.key(index);
        let slice = self.cache.slice();
        let mut shard = lock(self.cache.shard(&key));
        shard.generation += 1;
        shard.put(key, value, cost + ENTRY_OVERHEAD, slice);
    }

    /// Forgets the entry at `index`.
    pub fn remove(&self, index: u64) {
        let key = self.key(index);
        let mut shard = lock(self.cache.shard(&key));
        shard.generation += 1;
        shard.forget(&key);
    }
}

/// Bytes a private cache keeps against the budget of a [`MetadataCache`];
/// given back when the hold is dropped.
#[derive(Debug)]
pub struct Hold {
    cache: Arc<MetadataCache>,
    bytes: u64,
}

impl Hold {
    /// The bytes the private cache keeps now.
    pub fn set(&mut self, bytes: u64) {
        if bytes > self.bytes {
            self.cache
                .held
                .fetch_add(bytes - self.bytes, Ordering::AcqRel);
            self.bytes = bytes;
            self.cache.trim();
        } else {
            self.cache
                .held
                .fetch_sub(self.bytes - bytes, Ordering::AcqRel);
            self.bytes = bytes;
        }
    }

    /// The most a private cache should keep: an eighth of the budget, so
    /// that a few writable images leave most of it to the shared LRU.
    pub fn fair_share(&self) -> u64 {
        self.cache.budget / 8
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_of_one_cache_share_its_budget() {
        let cache = MetadataCache::new(64 << 10);
        let regions: Vec<Region> = (0..10).map(|_| cache.region()).collect();
        for (i, region) in regions.iter().enumerate() {
            for index in 0..100u64 {
                let value = region
                    .get_or_load(index, 4096, || Ok::<_, ()>(vec![i as u8; 4096]))
                    .unwrap();
                assert_eq!(value[0], i as u8);
            }
        }
        assert!(cache.bytes() <= 64 << 10, "{} bytes", cache.bytes());
        assert!(cache.entries() > 0);
    }

    #[test]
    fn a_load_that_raced_a_writer_never_replaces_what_the_writer_put() {
        let cache = MetadataCache::new(1 << 20);
        let region = cache.region();
        let loaded = region
            .get_or_load(7, 8, || {
                // A writer publishes a newer version while this load reads.
                region.insert(7, Arc::new(2u64), 8);
                Ok::<_, ()>(1u64)
            })
            .unwrap();
        assert_eq!(*loaded, 2);
        assert_eq!(region.get::<u64>(7).as_deref(), Some(&2));
        region
            .get_or_load(8, 8, || {
                // A writer forgets the entry (its cluster was freed).
                region.remove(8);
                Ok::<_, ()>(1u64)
            })
            .unwrap();
        assert_eq!(region.get::<u64>(8), None);
    }

    #[test]
    fn holds_shrink_the_lru_and_come_back_when_dropped() {
        let cache = MetadataCache::new(1 << 20);
        let region = cache.region();
        for index in 0..64u64 {
            region
                .get_or_load(index, 16 << 10, || Ok::<_, ()>(index))
                .unwrap();
        }
        let mut hold = cache.hold();
        hold.set(768 << 10);
        assert!(cache.bytes() <= 1 << 20, "{} bytes", cache.bytes());
        drop(hold);
        assert!(cache.bytes() <= 256 << 10, "{} bytes", cache.bytes());
    }

    #[test]
    fn an_entry_larger_than_a_shard_is_served_uncached() {
        let cache = MetadataCache::new(1024);
        let region = cache.region();
        let value = region.get_or_load(1, 4096, || Ok::<_, ()>(5u8)).unwrap();
        assert_eq!(*value, 5);
        assert_eq!(cache.entries(), 0);
    }
}
