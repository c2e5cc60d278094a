//! Which clusters of a backup are still to copy, and which are being
//! copied: the one map that the job's background copy and the guests'
//! copies before write share (QEMU's block-copy bitmap and in-flight
//! tasks).
//!
//! A cluster is *todo* (its point-in-time data is not yet in the target),
//! *busy* (someone is copying it), or done. Whoever copies a cluster first
//! claims it: todo becomes busy under the map's lock, so each cluster is
//! copied at most once. A guest write waits while any cluster of its range
//! is busy — the background copy reading it, or an earlier write's copy
//! before write — then claims the todo clusters of its range at once and
//! copies them before it lands; a claimer never waits while holding a
//! claim, so no two claimers can wait for each other. A failed copy puts
//! its clusters back to todo.

use crate::chain::bitmap::Bits;
use crate::sync::{lock, Condvar, Mutex};

/// The clusters of one backup.
#[derive(Debug)]
pub(super) struct Clusters {
    shift: u32,
    size: u64,
    state: Mutex<State>,
    /// Signalled whenever a claim is released.
    released: Condvar,
}

#[derive(Debug)]
struct State {
    todo: Vec<u64>,
    busy: Vec<u64>,
    todo_count: u64,
    busy_count: u64,
}

fn get(words: &[u64], bit: u64) -> bool {
    words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
}

fn put(words: &mut [u64], bit: u64, value: bool) {
    let word = &mut words[(bit / 64) as usize];
    if value {
        *word |= 1 << (bit % 64);
    } else {
        *word &= !(1 << (bit % 64));
    }
}

impl State {
    fn set_todo(&mut self, bit: u64, value: bool) {
        if get(&self.todo, bit) != value {
            put(&mut self.todo, bit, value);
            if value {
                self.todo_count += 1;
            } else {
                self.todo_count -= 1;
            }
        }
    }

    fn set_busy(&mut self, bit: u64, value: bool) {
        if get(&self.busy, bit) != value {
            put(&mut self.busy, bit, value);
            if value {
                self.busy_count += 1;
            } else {
                self.busy_count -= 1;
            }
        }
    }

    /// Makes todo cluster `bit` busy.
    fn claim(&mut self, bit: u64) {
        self.set_todo(bit, false);
        self.set_busy(bit, true);
    }
}

impl Clusters {
    /// `size` bytes in clusters of `granularity` (a power of two), none
    /// todo.
    pub(super) fn new(size: u64, granularity: u64) -> Clusters {
        let shift = granularity.max(1).next_power_of_two().trailing_zeros();
        let words = size.div_ceil(1 << shift).div_ceil(64) as usize;
        Clusters {
            shift,
            size,
            state: Mutex::new(State {
                todo: vec![0; words],
                busy: vec![0; words],
                todo_count: 0,
                busy_count: 0,
            }),
            released: Condvar::new(),
        }
    }

    /// Bytes per cluster.
    pub(super) fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// The clusters `offset..offset + len` touches (`None`: none).
    fn span(&self, offset: u64, len: u64) -> Option<std::ops::RangeInclusive<u64>> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.shift)..=((end - 1) >> self.shift))
    }

    /// The bytes of clusters `first..end`, clipped to the size.
    fn bytes(&self, first: u64, end: u64) -> (u64, u64) {
        let offset = first << self.shift;
        (offset, (end << self.shift).min(self.size) - offset)
    }

    /// Marks the clusters `offset..offset + len` touches todo.
    pub(super) fn add(&self, offset: u64, len: u64) {
        let Some(span) = self.span(offset, len) else {
            return;
        };
        let mut state = lock(&self.state);
        for bit in span {
            if !get(&state.busy, bit) {
                state.set_todo(bit, true);
            }
        }
    }

    /// Marks every cluster todo that `bits` marks dirty.
    pub(super) fn add_bits(&self, bits: &Bits) {
        let granularity = bits.granularity();
        let mut offset = 0;
        while offset < self.size {
            if bits.get(offset) {
                self.add(offset, granularity);
            }
            offset += granularity;
        }
    }

    /// Drops the clusters wholly inside `offset..offset + len` that are
    /// still todo: nothing there needs copying.
    pub(super) fn skip(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        let first = offset.div_ceil(self.granularity());
        // A last partial cluster at the end of the disk counts as whole.
        let last = if end == self.size {
            self.size.div_ceil(self.granularity())
        } else {
            end >> self.shift
        };
        let mut state = lock(&self.state);
        for bit in first..last {
            state.set_todo(bit, false);
        }
    }

    /// For a write to `offset..offset + len`: waits until no cluster of
    /// the range is busy, then claims its todo clusters; returns them as
    /// runs of bytes, which the caller copies and releases.
    pub(super) fn claim_range(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let Some(span) = self.span(offset, len) else {
            return Vec::new();
        };
        let mut state = lock(&self.state);
        while span.clone().any(|bit| get(&state.busy, bit)) {
            state = self.released.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        let mut runs = Vec::new();
        let mut start = None;
        for bit in span.clone() {
            let todo = get(&state.todo, bit);
            if todo {
                state.claim(bit);
                start.get_or_insert(bit);
            }
            if let (false, Some(first)) = (todo, start) {
                runs.push(self.bytes(first, bit));
                start = None;
            }
        }
        if let Some(first) = start {
            runs.push(self.bytes(first, span.end() + 1));
        }
        runs
    }

    /// For the background copy: claims the first run of todo clusters at
    /// or after `from` (wrapping to the start), at most `max` bytes (at
    /// least one cluster); `None` when nothing is todo.
    pub(super) fn claim_next(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut state = lock(&self.state);
        if state.todo_count == 0 {
            return None;
        }
        let clusters = self.size.div_ceil(self.granularity());
        let start = (from >> self.shift).min(clusters);
        let first = (start..clusters)
            .chain(0..start)
            .find(|&bit| get(&state.todo, bit))?;
        let most = (max >> self.shift).max(1);
        let mut end = first;
        while end < clusters && end - first < most && get(&state.todo, end) {
            state.claim(end);
            end += 1;
        }
        Some(self.bytes(first, end))
    }

    /// Ends a claim on `offset..offset + len`: done when `copied`, todo
    /// again when not.
    pub(super) fn release(&self, offset: u64, len: u64, copied: bool) {
        if let Some(span) = self.span(offset, len) {
            let mut state = lock(&self.state);
            for bit in span {
                state.set_busy(bit, false);
                if !copied {
                    state.set_todo(bit, true);
                }
            }
        }
        self.released.notify_all();
    }

    /// Waits until no cluster is busy.
    pub(super) fn wait_idle(&self) {
        let mut state = lock(&self.state);
        while state.busy_count > 0 {
            state = self.released.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Bytes todo or busy: still to copy.
    pub(super) fn remaining(&self) -> u64 {
        let state = lock(&self.state);
        let bytes = (state.todo_count + state.busy_count) << self.shift;
        // The last cluster may be cut short by the end of the disk.
        let clusters = self.size.div_ceil(self.granularity());
        let last = clusters.saturating_sub(1);
        let short = (clusters << self.shift) - self.size;
        if clusters > 0 && (get(&state.todo, last) || get(&state.busy, last)) {
            bytes - short
        } else {
            bytes
        }
    }

    /// The clusters not copied (todo or busy) as bits of `granularity`.
    pub(super) fn uncopied(&self, granularity: u64, size: u64) -> Bits {
        let mut bits = Bits::new(granularity, size);
        let state = lock(&self.state);
        let clusters = self.size.div_ceil(self.granularity());
        for bit in 0..clusters {
            if get(&state.todo, bit) || get(&state.busy, bit) {
                let (offset, len) = self.bytes(bit, bit + 1);
                bits.set_range(offset, len);
            }
        }
        bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const K64: u64 = 64 << 10;

    #[test]
    fn a_write_claims_only_the_todo_clusters_of_its_range_once() {
        let map = Clusters::new(10 * K64 + 100, K64);
        map.add(0, 10 * K64 + 100);
        map.skip(K64 * 2, K64);
        assert_eq!(map.remaining(), 9 * K64 + 100);
        assert_eq!(
            map.claim_range(K64 + 5, 3 * K64),
            vec![(K64, K64), (3 * K64, 2 * K64)]
        );
        map.release(K64, K64, true);
        map.release(3 * K64, 2 * K64, true);
        assert!(map.claim_range(K64, 4 * K64).is_empty(), "copied once");
        assert_eq!(map.claim_next(9 * K64, 1 << 20), Some((9 * K64, K64 + 100)));
        map.release(9 * K64, K64 + 100, false);
        assert_eq!(map.claim_next(0, 2 * K64), Some((0, K64)));
        assert_eq!(map.claim_next(0, 2 * K64), Some((5 * K64, 2 * K64)));
        map.release(5 * K64, 2 * K64, true);
        let uncopied = map.uncopied(K64, 10 * K64 + 100);
        assert!(uncopied.get(0) && uncopied.get(7 * K64) && uncopied.get(10 * K64));
        assert!(!uncopied.get(K64) && !uncopied.get(5 * K64));
    }

    #[test]
    fn a_write_waits_for_a_copy_of_its_clusters_in_flight() {
        for _ in 0..200 {
            let map = Arc::new(Clusters::new(4 * K64, K64));
            map.add(0, 4 * K64);
            let (offset, len) = map.claim_next(K64, K64).unwrap();
            let copied = Arc::new(AtomicBool::new(false));
            let writer = {
                let (map, copied) = (Arc::clone(&map), Arc::clone(&copied));
                std::thread::spawn(move || {
                    let runs = map.claim_range(0, 3 * K64);
                    // The background copy of cluster 1 ended before.
                    assert!(copied.load(Ordering::SeqCst));
                    runs
                })
            };
            copied.store(true, Ordering::SeqCst);
            map.release(offset, len, true);
            let runs = writer.join().unwrap();
            assert_eq!(runs, vec![(0, K64), (2 * K64, K64)]);
            map.release(0, K64, true);
            map.release(2 * K64, K64, true);
            map.wait_idle();
            assert_eq!(map.remaining(), K64);
        }
    }
}
