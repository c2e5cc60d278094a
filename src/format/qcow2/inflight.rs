//! Guest clusters whose L2 entries are being changed: a range lock keyed by
//! guest cluster index.
//!
//! Every path that changes an L2 entry (an allocating or copy-on-write
//! write, write-zeroes, a job's populate) takes the guest clusters it may
//! change here *before* the metadata lock, and keeps them while it reads
//! the old view, writes the data and publishes the new entry. The metadata
//! lock is then held only to look up, allocate and publish, never across
//! data I/O, so writers to different clusters overlap their I/O; two
//! changes of one cluster are serialised, so a job's copy that finds the
//! cluster unallocated cannot overwrite a guest write that lands meanwhile
//! (the guest write waits here, then sees the copy's entry and writes over
//! it). Readers never take it.
//!
//! A request takes all its clusters as one range and holds one range at a
//! time, so two requests never wait for each other in a cycle.
//!
//! A new path that changes L2 entries (`write_cluster` is the model):
//! 1. `let clusters = self.lock_clusters(offset, len)` before anything else,
//!    held until every entry it changes is published;
//! 2. the old entry from `current_entry` (it cannot change meanwhile);
//! 3. under `meta`: `writable_l2`, then allocate; release `meta`;
//! 4. with no lock: copy-on-write reads and the data write;
//! 5. under `meta` again: `writable_l2` once more (the table may have been
//!    replaced), `set_l2_entry`/`publish_l2_entries`, then `free_entry` of
//!    the old entry, or `give_back` of the new clusters on failure;
//! 6. drop the clusters, then `bound_pending_frees()` (it may sync).

use std::ops::Range;

use crate::sync::{self, Condvar, Mutex};

/// The guest cluster ranges being changed, and a condition to wait for one
/// to be released.
#[derive(Debug, Default)]
pub(super) struct ClusterLocks {
    held: Mutex<Vec<Range<u64>>>,
    released: Condvar,
}

/// Clusters held until dropped.
#[derive(Debug)]
pub(super) struct ClusterGuard<'a> {
    locks: &'a ClusterLocks,
    clusters: Range<u64>,
}

impl ClusterLocks {
    /// Takes guest clusters `clusters` (indexes), waiting while any of them
    /// is held by another request.
    pub(super) fn lock(&self, clusters: Range<u64>) -> ClusterGuard<'_> {
        let mut held = sync::lock(&self.held);
        while held.iter().any(|r| overlaps(r, &clusters)) {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        held.push(clusters.clone());
        ClusterGuard {
            locks: self,
            clusters,
        }
    }
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        let mut held = sync::lock(&self.locks.held);
        if let Some(at) = held.iter().position(|r| *r == self.clusters) {
            held.swap_remove(at);
        }
        drop(held);
        // Waiters for different ranges share the condition: wake them all
        // to look again (there are at most as many as request threads).
        self.locks.released.notify_all();
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn disjoint_ranges_are_held_at_once() {
        let locks = ClusterLocks::default();
        let _a = locks.lock(0..4);
        let _b = locks.lock(4..8);
    }

    #[test]
    fn an_overlapping_range_waits_for_the_holder() {
        let locks = Arc::new(ClusterLocks::default());
        let inside = Arc::new(AtomicBool::new(false));
        let guard = locks.lock(2..6);
        let waiter = {
            let (locks, inside) = (Arc::clone(&locks), Arc::clone(&inside));
            std::thread::spawn(move || {
                let _g = locks.lock(5..7);
                inside.store(true, Ordering::SeqCst);
            })
        };
        // The waiter cannot get in while the guard is held, whatever the
        // scheduling; it gets in once the guard is gone.
        for _ in 0..1000 {
            std::thread::yield_now();
            assert!(!inside.load(Ordering::SeqCst));
        }
        drop(guard);
        waiter.join().unwrap();
        assert!(inside.load(Ordering::SeqCst));
    }
}
