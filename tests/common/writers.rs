//! Threads that keep writing a file of the mount while a job changes the
//! chain, each in its own region and each write recognisable, and what
//! every region must then hold.
//!
//! Writer `t` owns region `t` (see [`region_start`]), cut into [`SLOTS`]
//! slots of [`SLOT`] bytes; its write `k` fills slot `k % SLOTS` with
//! [`write_data`]`(t, k)`. A slot is not cluster-aligned, so writes cover
//! partial clusters (copy-on-write from below) and neighbouring writers
//! share clusters at their regions' edges.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::cli::wait_until;
use super::pattern;

/// Bytes one write covers: 20.5 KiB, aligned to no cluster size.
pub const SLOT: u64 = 20 * 1024 + 512;
/// Slots in a writer's region; its writes go round them in turn.
pub const SLOTS: u64 = 8;
/// Bytes of one writer's region.
pub const REGION: u64 = SLOT * SLOTS;

/// Where region `index` starts when the regions begin at `first`.
pub fn region_start(first: u64, index: u64) -> u64 {
    first + index * REGION
}

/// What writer `thread` writes as its write `k`: the pattern of a seed
/// only that write uses.
pub fn write_data(thread: u64, k: u64) -> Vec<u8> {
    pattern((thread << 32) | k, 0, SLOT as usize)
}

/// What one writer did: each write in order, and its errno if refused.
#[derive(Debug)]
pub struct Log {
    /// Where its region starts.
    pub start: u64,
    /// The writer's number (its seed).
    pub thread: u64,
    /// Write `k`'s result.
    pub results: Vec<Result<(), i32>>,
}

impl Log {
    fn offset(&self, k: u64) -> usize {
        (self.start + (k % SLOTS) * SLOT) as usize
    }

    /// The accepted writes, in order, each with its offset and bytes.
    fn accepted_writes(&self) -> impl Iterator<Item = (usize, Vec<u8>)> + '_ {
        let accepted = self.results.iter().enumerate().filter(|(_, r)| r.is_ok());
        accepted.map(|(k, _)| (self.offset(k as u64), write_data(self.thread, k as u64)))
    }

    /// Applies every accepted write to `image`, a whole guest view.
    pub fn apply(&self, image: &mut [u8]) {
        for (at, data) in self.accepted_writes() {
            image[at..at + data.len()].copy_from_slice(&data);
        }
    }

    /// How many writes were accepted.
    pub fn accepted(&self) -> usize {
        self.results.iter().filter(|r| r.is_ok()).count()
    }

    /// Whether the region of `image` holds `before` with the first writes
    /// of this writer applied, some number of them: what a node frozen at
    /// a pivot must hold, since the writer writes one write at a time.
    pub fn holds_a_prefix(&self, before: &[u8], image: &[u8]) -> bool {
        let start = self.start as usize;
        let region = start..start + REGION as usize;
        let held = &image[region.clone()];
        let mut model = before[region].to_vec();
        if model == held {
            return true;
        }
        for (at, data) in self.accepted_writes() {
            model[at - start..at - start + data.len()].copy_from_slice(&data);
            if model == held {
                return true;
            }
        }
        false
    }
}

struct Writer {
    count: Arc<AtomicU64>,
    thread: JoinHandle<Log>,
}

/// Writers on one file, running until [`RegionWriters::stop`].
pub struct RegionWriters {
    stop: Arc<AtomicBool>,
    writers: Vec<Writer>,
}

impl RegionWriters {
    /// Opens `path` read-write once per writer (before returning, so every
    /// handle predates what the caller does next) and starts `threads`
    /// writers numbered from `first_thread`, whose regions start at
    /// [`region_start`]`(first, thread)`.
    pub fn start(path: &Path, first: u64, first_thread: u64, threads: u64) -> RegionWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let writers = (first_thread..first_thread + threads)
            .map(|thread| {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                let count = Arc::new(AtomicU64::new(0));
                let log = Log {
                    start: region_start(first, thread),
                    thread,
                    results: Vec::new(),
                };
                let (stop, counter) = (Arc::clone(&stop), Arc::clone(&count));
                let thread = std::thread::spawn(move || write_until(&file, log, &stop, &counter));
                Writer { count, thread }
            })
            .collect();
        RegionWriters { stop, writers }
    }

    /// How many writes each writer has finished so far.
    pub fn counts(&self) -> Vec<u64> {
        let count = |w: &Writer| w.count.load(Ordering::Acquire);
        self.writers.iter().map(count).collect()
    }

    /// Waits until every writer has finished `more` writes past where it is
    /// now; panics after a minute.
    pub fn wait_for_more(&self, more: u64) {
        let now = self.counts();
        let done = || self.counts().iter().zip(&now).all(|(c, n)| *c >= n + more);
        assert!(
            wait_until(std::time::Duration::from_secs(60), done),
            "the writers stalled: {now:?} then {:?}",
            self.counts()
        );
    }

    /// Stops the writers and returns what each did, in writer order.
    pub fn stop(mut self) -> Vec<Log> {
        self.stop.store(true, Ordering::Release);
        let join = |w: Writer| {
            w.thread
                .join()
                .unwrap_or_else(|_| panic!("a writer panicked"))
        };
        let writers = std::mem::take(&mut self.writers);
        writers.into_iter().map(join).collect()
    }
}

impl Drop for RegionWriters {
    fn drop(&mut self) {
        // A failed test must not leave threads writing to a mount that is
        // going away.
        self.stop.store(true, Ordering::Release);
    }
}

/// The writer's loop: one `pwrite` a write, round its slots, until told to
/// stop. A short write counts as a refusal with errno 0.
fn write_until(file: &File, mut log: Log, stop: &AtomicBool, count: &AtomicU64) -> Log {
    while !stop.load(Ordering::Acquire) {
        let k = log.results.len() as u64;
        let data = write_data(log.thread, k);
        let result = match file.write_at(&data, log.offset(k) as u64) {
            Ok(n) if n == data.len() => Ok(()),
            Ok(_) => Err(0),
            Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
        };
        log.results.push(result);
        count.fetch_add(1, Ordering::Release);
    }
    log
}
