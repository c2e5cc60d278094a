//! Watching what is written to a node, for jobs that must keep a copy of
//! it in step (an active commit): hooks registered on a node's open image,
//! called after every write, write-zeroes and discard has landed, and a
//! dirty map of fixed-size blocks that such a hook fills. A backup's
//! hooks run before instead ([`BeforeWrite`]), to copy old data out.
//!
//! The hooks live on the open image, which every version of the chain
//! shares, so a write through any chain snapshot is seen. A hook runs only
//! once the data is in the image: a copier that cleared a block's bit
//! before reading it either reads the new data or sees the bit set again,
//! so no write is ever lost.

use crate::sync::{lock, read, write, Arc, Mutex, RwLock};

/// Told of every range written to a node, after the write landed.
pub trait WriteHook: Send + Sync {
    /// `offset..offset + len` of the node now holds new data (or zeros).
    fn written(&self, offset: u64, len: u64);
}

/// Told of every range about to be written to a node (a write,
/// write-zeroes, discard, or a job's copy into it), before anything of it
/// lands, on the writer's thread: a backup copies the old data out first.
/// The write waits for the hook and then proceeds whatever happened in it.
pub trait BeforeWrite: Send + Sync {
    /// `offset..offset + len` of the node is about to change.
    fn before_write(&self, offset: u64, len: u64);
}

/// The hooks of one kind on one open image.
pub(super) struct Hooks<H: ?Sized> {
    hooks: RwLock<Vec<Arc<H>>>,
}

impl<H: ?Sized> Default for Hooks<H> {
    fn default() -> Self {
        Hooks {
            hooks: RwLock::new(Vec::new()),
        }
    }
}

impl<H: ?Sized> std::fmt::Debug for Hooks<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("count", &read(&self.hooks).len())
            .finish()
    }
}

impl<H: ?Sized> Hooks<H> {
    pub(super) fn add(&self, hook: Arc<H>) {
        write(&self.hooks).push(hook);
    }

    pub(super) fn remove(&self, hook: &Arc<H>) {
        write(&self.hooks).retain(|h| !Arc::ptr_eq(h, hook));
    }

    /// Calls `call` on every hook, in the order they were added.
    pub(super) fn each(&self, call: impl Fn(&H)) {
        for hook in read(&self.hooks).iter() {
            call(hook);
        }
    }
}

/// Which blocks of a node are dirty (written and not yet copied), at a
/// fixed power-of-two granularity.
#[derive(Debug)]
pub struct DirtyMap {
    shift: u32,
    size: u64,
    state: Mutex<DirtyBits>,
}

#[derive(Debug)]
struct DirtyBits {
    words: Vec<u64>,
    count: u64,
}

impl DirtyMap {
    /// A clean map of `size` bytes in blocks of `granularity` bytes (a
    /// power of two).
    pub fn new(size: u64, granularity: u64) -> DirtyMap {
        let shift = granularity.max(1).next_power_of_two().trailing_zeros();
        let blocks = size.div_ceil(1 << shift);
        DirtyMap {
            shift,
            size,
            state: Mutex::new(DirtyBits {
                words: vec![0; blocks.div_ceil(64) as usize],
                count: 0,
            }),
        }
    }

    /// The block size in bytes.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Marks every block touching `offset..offset + len` dirty; returns
    /// how many bytes became dirty that were clean.
    pub fn mark(&self, offset: u64, len: u64) -> u64 {
        if len == 0 || offset >= self.size {
            return 0;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        let mut bits = lock(&self.state);
        let mut newly = 0;
        for block in first..=last {
            let (word, bit) = ((block / 64) as usize, block % 64);
            if bits.words[word] & (1 << bit) == 0 {
                bits.words[word] |= 1 << bit;
                newly += 1;
            }
        }
        bits.count += newly;
        newly << self.shift
    }

    /// Clears and returns the first dirty run at or after `from` (wrapping
    /// to the start), at most `max` bytes long and clipped to the map's
    /// size; `None` when nothing is dirty.
    pub fn take(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let from = from.min(self.size);
        self.take_in(from, self.size, max)
            .or_else(|| self.take_in(0, from, max))
    }

    /// Clears and returns the first dirty run that starts in the blocks
    /// holding `start..end`, at most `max` bytes long, in whole blocks
    /// (clipped to the map's size).
    pub fn take_in(&self, start: u64, end: u64, max: u64) -> Option<(u64, u64)> {
        let end = end.min(self.size);
        if start >= end {
            return None;
        }
        let mut bits = lock(&self.state);
        if bits.count == 0 {
            return None;
        }
        let last = (end - 1) >> self.shift;
        let first = find_set(&bits.words, start >> self.shift, last + 1)?;
        let max_blocks = (max >> self.shift).max(1);
        let mut block = first;
        while block <= last && block - first < max_blocks {
            let (word, bit) = ((block / 64) as usize, block % 64);
            if bits.words[word] & (1 << bit) == 0 {
                break;
            }
            bits.words[word] &= !(1 << bit);
            bits.count -= 1;
            block += 1;
        }
        let offset = first << self.shift;
        let run_end = (block << self.shift).min(self.size);
        Some((offset, run_end - offset))
    }

    /// Bytes dirty now.
    pub fn dirty_bytes(&self) -> u64 {
        (lock(&self.state).count << self.shift).min(self.size)
    }
}

/// The first set bit in `start..end`.
fn find_set(words: &[u64], start: u64, end: u64) -> Option<u64> {
    let mut block = start;
    while block < end {
        let word = words[(block / 64) as usize] >> (block % 64);
        if word == 0 {
            block = (block / 64 + 1) * 64;
            continue;
        }
        let found = block + u64::from(word.trailing_zeros());
        return (found < end).then_some(found);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_range_comes_back_in_runs_no_longer_than_asked() {
        let map = DirtyMap::new(10 << 20, 64 << 10);
        assert_eq!(map.mark(100, 200 << 10), 4 * (64 << 10));
        assert_eq!(map.mark(0, 1), 0, "already dirty");
        assert_eq!(map.dirty_bytes(), 4 * (64 << 10));
        assert_eq!(map.take(0, 128 << 10), Some((0, 128 << 10)));
        assert_eq!(map.take(0, 1 << 20), Some((128 << 10, 128 << 10)));
        assert_eq!(map.take(0, 1 << 20), None);
        assert_eq!(map.dirty_bytes(), 0);
    }

    #[test]
    fn take_wraps_around_and_clips_the_last_block() {
        let map = DirtyMap::new((1 << 20) + 4096, 64 << 10);
        map.mark(1 << 20, 10);
        map.mark(0, 10);
        assert_eq!(map.take(512 << 10, 1 << 20), Some((1 << 20, 4096)));
        assert_eq!(map.take(512 << 10, 1 << 20), Some((0, 64 << 10)));
        assert_eq!(map.mark(5 << 20, 1), 0, "past the end");
    }
}
