//! In-memory storage that models a disk with a volatile write cache, for
//! crash and error-path tests (SPEC §6).
//!
//! Every mutation (`write_at`, `set_len`, `punch_hole`) is applied to the
//! view readers see at once and appended to a log; `sync` appends a barrier.
//! Whatever precedes the last barrier is durable; whatever follows it sits in
//! the "cache" and may be lost by [`MemStorage::crash`]. A crash can lose
//! every unsynced operation, keep all of them, or keep a seeded random
//! subset — a disk may write its cache back in any order — optionally
//! tearing writes at 512-byte sector granularity.
//!
//! Because the whole log is kept, [`MemStorage::crash_at`] can also replay a
//! run up to any earlier operation, so one workload yields a crash image for
//! every point in it.
//!
//! Faults make mutations, syncs or reads fail with a chosen errno (ENOSPC,
//! EIO) after a budget of operations or bytes, to test that errors reach the
//! writer unchanged. A failed operation changes nothing.

use std::fmt;
use std::io;

use super::Storage;
use crate::sync::{lock, Mutex};

/// The largest file a [`MemStorage`] holds; anything beyond fails with
/// `EFBIG`, so a hostile offset cannot make a test allocate without bound.
pub const MAX_LEN: u64 = 1 << 32;

/// The unit a torn write is split into: the disk's atomic sector.
const SECTOR: usize = 512;

/// Which unsynced operations survive a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// None: the disk loses its whole write cache.
    DropAll,
    /// All: the cache happened to be written back just before power failed.
    KeepAll,
    /// Each unsynced operation independently kept or dropped, chosen by a
    /// PRNG seeded with `seed`; kept ones apply in their original order.
    Subset {
        /// Seed of the choice; the same seed gives the same crash image.
        seed: u64,
    },
    /// As [`CrashMode::Subset`], and a kept write may also be torn: only a
    /// random selection of its 512-byte sectors (aligned on the disk) lands.
    TornSubset {
        /// Seed of the choice; the same seed gives the same crash image.
        seed: u64,
    },
}

/// A logged operation, with ranges already validated against [`MAX_LEN`].
#[derive(Clone, Debug)]
enum Op {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
    PunchHole { start: usize, end: usize },
    Sync,
}

/// When injected failures start, counted from their injection.
#[derive(Clone, Copy, Debug)]
enum Budget {
    /// After this many more operations succeed.
    Ops(u64),
    /// Once an operation would take the bytes written past this many.
    Bytes(u64),
}

/// An injected failure for one kind of operation.
#[derive(Clone, Copy, Debug)]
struct Fault {
    budget: Budget,
    errno: i32,
}

impl Fault {
    /// Charges an operation moving `bytes` to the budget, or fails it once
    /// the budget is spent. Failures persist, as a full disk stays full.
    fn charge(&mut self, bytes: u64) -> io::Result<()> {
        let spent = match &mut self.budget {
            Budget::Ops(left) => left.checked_sub(1).map(|rest| *left = rest),
            Budget::Bytes(left) => left.checked_sub(bytes).map(|rest| *left = rest),
        };
        spent.ok_or_else(|| io::Error::from_raw_os_error(self.errno))
    }
}

/// Charges `bytes` to `fault`, if one is set.
fn charge(fault: &mut Option<Fault>, bytes: u64) -> io::Result<()> {
    fault.as_mut().map_or(Ok(()), |fault| fault.charge(bytes))
}

#[derive(Debug, Default)]
struct Faults {
    writes: Option<Fault>,
    syncs: Option<Fault>,
    reads: Option<Fault>,
}

#[derive(Default)]
struct State {
    /// The contents the storage was created with; the log replays from here.
    initial: Vec<u8>,
    /// What a reader sees now.
    visible: Vec<u8>,
    /// Every successful mutation and sync, in order.
    log: Vec<Op>,
    faults: Faults,
    writes: u64,
    syncs: u64,
}

impl State {
    /// Applies `op` to the visible view and logs it.
    fn record(&mut self, op: Op) {
        apply(&mut self.visible, &op);
        self.log.push(op);
    }
}

/// Storage in memory with a volatile write cache; see the module doc.
pub struct MemStorage {
    state: Mutex<State>,
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("MemStorage")
            .field("len", &state.visible.len())
            .field("ops", &state.log.len())
            .finish()
    }
}

impl Default for MemStorage {
    fn default() -> Self {
        MemStorage::new()
    }
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> MemStorage {
        MemStorage::from_bytes(Vec::new())
    }

    /// A storage whose durable contents are `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        let state = State {
            visible: bytes.clone(),
            initial: bytes,
            ..State::default()
        };
        MemStorage {
            state: Mutex::new(state),
        }
    }

    /// What a reader sees now, synced or not.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.state).visible.clone()
    }

    /// What would survive if power failed now and the cache were lost.
    pub fn durable_contents(&self) -> Vec<u8> {
        self.crash(CrashMode::DropAll).contents()
    }

    /// Number of operations logged so far: successful writes, `set_len`s,
    /// hole punches and syncs. Valid crash points are `0..=op_count()`.
    pub fn op_count(&self) -> usize {
        lock(&self.state).log.len()
    }

    /// Number of successful `write_at` calls.
    pub fn write_count(&self) -> u64 {
        lock(&self.state).writes
    }

    /// Number of successful `sync` calls.
    pub fn sync_count(&self) -> u64 {
        lock(&self.state).syncs
    }

    /// The crash point right after each sync, in order: the instants at
    /// which the durable state changes.
    pub fn sync_points(&self) -> Vec<usize> {
        let state = lock(&self.state);
        let syncs = state.log.iter().enumerate();
        let syncs = syncs.filter(|(_, op)| matches!(op, Op::Sync));
        syncs.map(|(index, _)| index + 1).collect()
    }

    /// The storage a reboot would find if power failed now.
    pub fn crash(&self, mode: CrashMode) -> MemStorage {
        self.crash_at(usize::MAX, mode)
    }

    /// The storage a reboot would find if power had failed right after the
    /// first `ops` logged operations (clamped to [`op_count`](Self::op_count)):
    /// everything up to the last sync among them, plus the unsynced ones
    /// after it that `mode` keeps.
    pub fn crash_at(&self, ops: usize, mode: CrashMode) -> MemStorage {
        let state = lock(&self.state);
        let log = &state.log[..ops.min(state.log.len())];
        let synced = log
            .iter()
            .rposition(|op| matches!(op, Op::Sync))
            .map_or(0, |last| last + 1);
        let mut image = state.initial.clone();
        for op in &log[..synced] {
            apply(&mut image, op);
        }
        replay_cache(&mut image, &log[synced..], mode);
        MemStorage::from_bytes(image)
    }

    /// Makes every mutation after the next `ops` successful ones fail with
    /// `errno`, until [`clear_faults`](Self::clear_faults).
    pub fn fail_writes_after(&self, ops: u64, errno: i32) {
        lock(&self.state).faults.writes = Some(Fault {
            budget: Budget::Ops(ops),
            errno,
        });
    }

    /// Makes any write that would take the bytes written from now on past
    /// `bytes` fail whole with `errno` (a disk with `bytes` left free).
    /// `set_len` and `punch_hole` allocate nothing and still succeed.
    pub fn fail_writes_after_bytes(&self, bytes: u64, errno: i32) {
        lock(&self.state).faults.writes = Some(Fault {
            budget: Budget::Bytes(bytes),
            errno,
        });
    }

    /// Makes every sync after the next `syncs` successful ones fail with
    /// `errno`. A failed sync makes nothing durable.
    pub fn fail_syncs_after(&self, syncs: u64, errno: i32) {
        lock(&self.state).faults.syncs = Some(Fault {
            budget: Budget::Ops(syncs),
            errno,
        });
    }

    /// Makes every read after the next `reads` successful ones fail with
    /// `errno`.
    pub fn fail_reads_after(&self, reads: u64, errno: i32) {
        lock(&self.state).faults.reads = Some(Fault {
            budget: Budget::Ops(reads),
            errno,
        });
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        lock(&self.state).faults = Faults::default();
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut state = lock(&self.state);
        charge(&mut state.faults.reads, buf.len() as u64)?;
        let visible = &state.visible;
        let start = usize::try_from(offset).map_or(visible.len(), |o| o.min(visible.len()));
        let present = &visible[start..];
        let n = present.len().min(buf.len());
        buf[..n].copy_from_slice(&present[..n]);
        // Past the end reads as zeros, as the file driver returns it.
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (start, _) = range(offset, buf.len() as u64)?;
        let mut state = lock(&self.state);
        charge(&mut state.faults.writes, buf.len() as u64)?;
        state.record(Op::Write {
            offset: start,
            data: buf.to_vec(),
        });
        state.writes += 1;
        Ok(())
    }

    fn is_writable(&self) -> bool {
        true
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.state).visible.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let (_, end) = range(len, 0)?;
        let mut state = lock(&self.state);
        charge(&mut state.faults.writes, 0)?;
        state.record(Op::SetLen(end));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = lock(&self.state);
        charge(&mut state.faults.syncs, 0)?;
        state.log.push(Op::Sync);
        state.syncs += 1;
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (start, end) = range(offset, len)?;
        let mut state = lock(&self.state);
        charge(&mut state.faults.writes, 0)?;
        state.record(Op::PunchHole { start, end });
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        // Memory has no holes: everything before the end is data.
        Ok((offset < self.len()?).then_some(offset))
    }

    fn seek_hole(&self, _offset: u64) -> io::Result<u64> {
        // The only hole is the implicit one at the end, as FileStorage
        // reports past the last data.
        self.len()
    }
}

/// Checks `offset..offset + len` against [`MAX_LEN`] and converts it to
/// indices.
fn range(offset: u64, len: u64) -> io::Result<(usize, usize)> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let end = offset.checked_add(len).ok_or_else(too_big)?;
    if end > MAX_LEN {
        return Err(too_big());
    }
    let start = usize::try_from(offset).map_err(|_| too_big())?;
    let end = usize::try_from(end).map_err(|_| too_big())?;
    Ok((start, end))
}

/// Applies one logged operation to `image`.
fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => write(image, *offset, data),
        Op::SetLen(len) => image.resize(*len, 0),
        Op::PunchHole { start, end } => {
            // Punching keeps the size: nothing past the end is touched.
            let end = (*end).min(image.len());
            if *start < end {
                image[*start..end].fill(0);
            }
        }
        Op::Sync => {}
    }
}

/// Writes `data` at `offset`, extending `image` with zeros as needed.
fn write(image: &mut Vec<u8>, offset: usize, data: &[u8]) {
    let end = offset + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[offset..end].copy_from_slice(data);
}

/// Applies to `image` the unsynced operations `cache` that `mode` lets
/// survive.
fn replay_cache(image: &mut Vec<u8>, cache: &[Op], mode: CrashMode) {
    let (seed, tear) = match mode {
        CrashMode::DropAll => return,
        CrashMode::KeepAll => {
            cache.iter().for_each(|op| apply(image, op));
            return;
        }
        CrashMode::Subset { seed } => (seed, false),
        CrashMode::TornSubset { seed } => (seed, true),
    };
    let mut rng = SplitMix64(seed);
    for op in cache {
        if !rng.coin() {
            continue;
        }
        match op {
            Op::Write { offset, data } if tear && rng.coin() => {
                write_torn(image, *offset, data, &mut rng);
            }
            _ => apply(image, op),
        }
    }
}

/// Writes a random selection of the disk sectors `data` covers.
fn write_torn(image: &mut Vec<u8>, offset: usize, data: &[u8], rng: &mut SplitMix64) {
    let mut done = 0;
    while done < data.len() {
        let at = offset + done;
        // Sectors are aligned on the disk, not on the write.
        let n = (SECTOR - at % SECTOR).min(data.len() - done);
        if rng.coin() {
            write(image, at, &data[done..done + n]);
        }
        done += n;
    }
}

/// splitmix64: a tiny, well-mixed PRNG, so crash images are reproducible
/// from a seed without a library dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn coin(&mut self) -> bool {
        self.next() >> 63 == 1
    }
}

#[cfg(test)]
mod tests;
