//! Counters of the data requests the kernel sends, so tests (and a curious
//! operator) can see that large requests arrive whole: a 1 MiB read must
//! reach chainfs as one 1 MiB request, not as thirty-two 32 KiB ones.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared by every request thread. Relaxed atomics: the
/// counts are statistics, ordered with nothing else.
#[derive(Debug, Default)]
pub struct RequestStats {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    largest_read: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    largest_write: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Read requests on node files and `active`.
    pub reads: u64,
    /// Bytes those requests asked for.
    pub read_bytes: u64,
    /// The largest read request seen.
    pub largest_read: u64,
    /// Write requests on node files and `active`.
    pub writes: u64,
    /// Bytes those requests carried.
    pub write_bytes: u64,
    /// The largest write request seen.
    pub largest_write: u64,
}

impl RequestStats {
    /// Counts a read request of `len` bytes.
    pub fn record_read(&self, len: u64) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(len, Ordering::Relaxed);
        self.largest_read.fetch_max(len, Ordering::Relaxed);
    }

    /// Counts a write request of `len` bytes.
    pub fn record_write(&self, len: u64) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_bytes.fetch_add(len, Ordering::Relaxed);
        self.largest_write.fetch_max(len, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            reads: self.reads.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            largest_read: self.largest_read.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            largest_write: self.largest_write.load(Ordering::Relaxed),
        }
    }
}
