//! Writes, write-zeroes and the metadata updates they need.
//!
//! A write to a cluster that this image owns outright (COPIED) goes straight
//! to its host cluster with no exclusive lock. Anything else takes its guest
//! clusters ([`super::inflight`]) and, per cluster: under the metadata lock
//! makes the L2 table writable and picks a cluster owned outright; with no
//! lock, builds what the guest must see (the new data over what the cluster
//! showed before, from this image or its backing chain) and writes it
//! there; under the metadata lock again, points the L2 entry at it. Data is
//! written before the L2 entry that points to it, and the clusters that the
//! old entry held are freed only after a sync.

use std::cell::RefCell;
use std::sync::atomic::Ordering;

use super::l2::{L2Entry, L2Table, ALL_SUBCLUSTERS, L1_COPIED};
use super::types::HostOffset;
use super::{Meta, Qcow2};
use crate::format::error::IoContext;
use crate::format::{BackingReader, Result};
use crate::sync::{self, Arc};

/// Deferred frees that make a write sync and apply them at once, so that
/// the list stays bounded when nobody flushes.
const MAX_PENDING_FREES: usize = 4096;

/// A write of `len` bytes of the request, starting `pos` bytes into it.
struct Chunk {
    guest: u64,
    pos: usize,
    len: usize,
}

impl Qcow2 {
    /// Writes `data` at guest `offset`.
    pub fn write(&self, offset: u64, data: &[u8], backing: &dyn BackingReader) -> Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, data.len() as u64)?;
        self.record_dirty(offset, data.len() as u64);
        let slow = self.write_in_place(offset, data)?;
        let (Some(first), Some(last)) = (slow.first(), slow.last()) else {
            return Ok(());
        };
        {
            let _clusters =
                self.lock_clusters(first.guest, last.guest + last.len as u64 - first.guest);
            for chunk in &slow {
                let bytes = &data[chunk.pos..chunk.pos + chunk.len];
                self.write_cluster(chunk.guest, bytes, backing)?;
            }
        }
        self.bound_pending_frees()
    }

    /// Writes the parts of the request that land in clusters owned outright
    /// and returns the rest, one chunk per cluster.
    fn write_in_place(&self, offset: u64, data: &[u8]) -> Result<Vec<Chunk>> {
        // Not `inflight`: a free's barrier must not make reads wait for
        // this data I/O.
        let _overwrites = sync::read(&self.overwrites);
        let mut slow = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let guest = offset + pos as u64;
            let room = self.geometry.cluster_size() - self.geometry.offset_in_cluster(guest);
            let len = room.min((data.len() - pos) as u64) as usize;
            let entry = self.l2_entry(guest)?;
            match self.in_place_target(&entry, guest, len as u64) {
                Some(host) => self
                    .data()
                    .write_at(&data[pos..pos + len], host.0)
                    .io_at("write guest data", host.0)?,
                None => slow.push(Chunk { guest, pos, len }),
            }
            pos += len;
        }
        Ok(slow)
    }

    /// Where guest `guest..guest + len` (inside one cluster) may be written
    /// in place, if it may.
    fn in_place_target(&self, entry: &L2Entry, guest: u64, len: u64) -> Option<HostOffset> {
        let in_cluster = self.geometry.offset_in_cluster(guest);
        match *entry {
            L2Entry::Data { host, copied: true } => Some(host + in_cluster),
            L2Entry::Subclusters {
                host: Some(host),
                copied: true,
                allocated,
                ..
            } => {
                let mask = self.subcluster_mask(guest, len);
                (allocated & mask == mask).then_some(host + in_cluster)
            }
            _ => None,
        }
    }

    /// Bits of the subclusters that `guest..guest + len` touches.
    pub(super) fn subcluster_mask(&self, guest: u64, len: u64) -> u32 {
        let first = self.geometry.subcluster_index(guest);
        let last = self.geometry.subcluster_index(guest + len - 1);
        let upper = if last == 31 {
            u32::MAX
        } else {
            (1u32 << (last + 1)) - 1
        };
        upper & !((1u32 << first) - 1)
    }

    /// Writes `data` (inside one cluster). The caller holds the cluster
    /// ([`Qcow2::lock_clusters`]) and not the metadata lock: the data I/O
    /// runs outside it.
    pub(super) fn write_cluster(
        &self,
        guest: u64,
        data: &[u8],
        backing: &dyn BackingReader,
    ) -> Result<()> {
        // Only a holder of the cluster changes its entry: it stays as read.
        let old = self.current_entry(guest)?;
        if let Some(host) = self.in_place_target(&old, guest, data.len() as u64) {
            return self
                .data()
                .write_at(data, host.0)
                .io_at("write guest data", host.0);
        }
        let reuse = old.is_copied() && old.host_cluster().is_some();
        let target = {
            let mut meta = sync::lock(&self.meta);
            // A new L2 table is made before the data goes anywhere, so
            // that a full disk fails the write before it did any I/O.
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            if let Some(entry) = self.claim_sole_owner(&mut meta, &old)? {
                let index = self.geometry.l2_index(guest);
                self.set_l2_entry(l2_offset, &table, index, &entry)?;
                drop(meta);
                return self.write_cluster(guest, data, backing);
            }
            match (reuse, old.host_cluster()) {
                (true, Some(host)) => host,
                _ => self.allocate_data_cluster(&mut meta, guest)?,
            }
        };
        // The copy-on-write reads and the data write, with no lock held.
        let written = if self.geometry.extended_l2 {
            self.write_subclusters(&old, target, reuse, guest, data, backing)
        } else {
            self.write_whole_cluster(&old, target, guest, data, backing)
        };
        let mut meta = sync::lock(&self.meta);
        let published = written.and_then(|new| {
            // The table as it is now: another cluster's writer may have
            // moved it (a copy of a table shared with a snapshot).
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            self.set_l2_entry(l2_offset, &table, self.geometry.l2_index(guest), &new)
        });
        if let Err(err) = published {
            // Nothing points to a fresh cluster yet: keep it for later
            // rather than leak it (a full disk fails writes here).
            if !reuse && self.data_file.is_none() {
                meta.allocator.give_back(target);
            }
            return Err(err);
        }
        if !reuse {
            self.free_entry(&mut meta, &old);
        }
        Ok(())
    }

    /// The entry for guest `guest` as it is now, looked up under the
    /// `inflight` guard (the table it lies in may be freed meanwhile).
    pub(super) fn current_entry(&self, guest: u64) -> Result<L2Entry> {
        let _inflight = sync::read(&self.inflight);
        self.l2_entry(guest)
    }

    /// For a data cluster without COPIED whose refcount is in fact 1, the
    /// same entry with COPIED set.
    fn claim_sole_owner(&self, meta: &mut Meta, old: &L2Entry) -> Result<Option<L2Entry>> {
        let Some(host) = old.host_cluster() else {
            return Ok(None);
        };
        if old.is_copied() || matches!(old, L2Entry::Zero { .. }) {
            return Ok(None);
        }
        let sole = self.data_file.is_some()
            || meta.allocator.refcount(self.storage.as_ref(), host.0)? == 1;
        Ok(sole.then_some(old.with_copied(true)))
    }

    /// A host cluster for the guest cluster holding `guest`: allocated in the
    /// image, or in an external data file the guest offset itself.
    fn allocate_data_cluster(&self, meta: &mut Meta, guest: u64) -> Result<HostOffset> {
        if self.data_file.is_some() {
            return Ok(HostOffset(self.geometry.cluster_start(guest)));
        }
        self.allocate_cluster(meta)
    }

    /// A cluster of the image file whose refcount 1 is on disk; reads may
    /// reach it from now on.
    pub(super) fn allocate_cluster(&self, meta: &mut Meta) -> Result<HostOffset> {
        let host = meta.allocator.allocate(self.storage.as_ref())?;
        self.host_end
            .fetch_max(host.0 + self.geometry.cluster_size(), Ordering::AcqRel);
        Ok(host)
    }

    /// Writes a whole cluster at `target`: the old view with `data` over it.
    fn write_whole_cluster(
        &self,
        old: &L2Entry,
        target: HostOffset,
        guest: u64,
        data: &[u8],
        backing: &dyn BackingReader,
    ) -> Result<L2Entry> {
        let cluster_size = self.geometry.cluster_size() as usize;
        if data.len() == cluster_size {
            // The guest's bytes are the whole cluster: nothing to merge.
            self.data()
                .write_at(data, target.0)
                .io_at("write guest data", target.0)?;
        } else {
            let start = self.geometry.cluster_start(guest);
            let in_cluster = (guest - start) as usize;
            with_cluster_buffer(cluster_size, |cluster| {
                self.read_view(old, start, cluster, backing)?;
                let copies_data = !is_zero(&cluster[..in_cluster])
                    || !is_zero(&cluster[in_cluster + data.len()..]);
                if !copies_data && self.zero_new_cluster(target) {
                    let at = target.0 + in_cluster as u64;
                    return self.data().write_at(data, at).io_at("write guest data", at);
                }
                cluster[in_cluster..in_cluster + data.len()].copy_from_slice(data);
                self.data()
                    .write_at(cluster, target.0)
                    .io_at("write guest data", target.0)?;
                self.sync_copied_data(copies_data)
            })?;
        }
        Ok(L2Entry::Data {
            host: target,
            copied: true,
        })
    }

    /// Makes the new cluster at `target` read as zeros by deallocating it,
    /// so that a write into it whose copy-on-write would copy only zeros
    /// writes the guest's bytes alone (QEMU's `is_zero_cow`, where it
    /// writes zeroes to the cluster without falling back to writing them):
    /// a 4 KiB write into a fresh overlay then allocates 4 KiB of host
    /// memory or disk, not a cluster's worth. The cluster may have held
    /// data before it was freed (QEMU does not always discard what it
    /// frees), so it is deallocated whatever it held. An external data
    /// file is left to the plain copy; so is any failure, which the plain
    /// copy then meets or overwrites. Returns whether the cluster is zeros.
    fn zero_new_cluster(&self, target: HostOffset) -> bool {
        self.data_file.is_none()
            && self
                .storage
                .punch_hole(target.0, self.geometry.cluster_size())
                .is_ok()
    }

    /// Writes the subclusters that `data` touches (and, when the cluster
    /// moves, every subcluster the old one held) at `target`.
    fn write_subclusters(
        &self,
        old: &L2Entry,
        target: HostOffset,
        reuse: bool,
        guest: u64,
        data: &[u8],
        backing: &dyn BackingReader,
    ) -> Result<L2Entry> {
        let (old_allocated, old_zero) = match *old {
            L2Entry::Subclusters {
                allocated, zero, ..
            } => (allocated, zero),
            L2Entry::Compressed(_) => (ALL_SUBCLUSTERS, 0),
            _ => (0, 0),
        };
        let touched = self.subcluster_mask(guest, data.len() as u64);
        // Subclusters the cluster holds already take only the guest's
        // bytes: a read-modify-write of them could undo an in-place write
        // that lands there meanwhile (in-place writes hold no cluster).
        let (kept, rebuilt) = if reuse {
            (touched & old_allocated, touched & !old_allocated)
        } else {
            (0, touched | old_allocated)
        };
        let start = self.geometry.cluster_start(guest);
        let sc_size = self.geometry.subcluster_size();
        let end = guest + data.len() as u64;
        for (first, last) in bit_runs(kept) {
            let from = (start + u64::from(first) * sc_size).max(guest);
            let to = (start + u64::from(last + 1) * sc_size).min(end);
            let at = target.0 + (from - start);
            self.data()
                .write_at(&data[(from - guest) as usize..(to - guest) as usize], at)
                .io_at("write guest data", at)?;
        }
        let mut copies_data = false;
        for (first, last) in bit_runs(rebuilt) {
            let run_start = start + u64::from(first) * sc_size;
            let run_len = u64::from(last - first + 1) * sc_size;
            let mut buf = vec![0u8; run_len as usize];
            self.read_view(old, run_start, &mut buf, backing)?;
            copies_data |= !is_zero(&buf);
            overlay(&mut buf, run_start, data, guest);
            self.data()
                .write_at(&buf, target.0 + (run_start - start))
                .io_at("write guest data", target.0 + (run_start - start))?;
        }
        self.sync_copied_data(copies_data)?;
        let written = kept | rebuilt;
        Ok(L2Entry::Subclusters {
            host: Some(target),
            copied: true,
            allocated: old_allocated | written,
            zero: old_zero & !written,
        })
    }

    /// After a copy-on-write that moved bytes the guest did not write (a
    /// backing file's, a compressed or shared cluster's): makes them
    /// durable before the L2 entry that points to their new place, since
    /// they were durable where they were, and a power cut must not lose
    /// them with a write nobody flushed. QEMU orders it the same way (the
    /// L2 cache depends on a flush after a COW); copied zeros need nothing,
    /// as QEMU skips the COW of zeros.
    fn sync_copied_data(&self, copies_data: bool) -> Result<()> {
        if copies_data {
            self.data()
                .sync()
                .io("make copied data durable before its L2 entry")?;
        }
        Ok(())
    }

    /// The L2 table for guest `offset`, made writable: allocated if missing,
    /// copied if shared with a snapshot.
    pub(super) fn writable_l2(&self, meta: &mut Meta, guest: u64) -> Result<(u64, Arc<L2Table>)> {
        let (l1_index, l2_offset, copied) = self.l1_entry(guest)?;
        let storage = self.storage.as_ref();
        if l2_offset != 0 && (copied || meta.allocator.refcount(storage, l2_offset)? == 1) {
            if !copied {
                self.set_l1_entry(l1_index, l2_offset | L1_COPIED)?;
            }
            return Ok((l2_offset, self.load_l2(l2_offset)?));
        }
        let cluster_size = self.geometry.cluster_size();
        let new = self.allocate_cluster(meta)?;
        let table = if l2_offset == 0 {
            L2Table::from_bytes(&vec![0u8; cluster_size as usize], self.geometry.extended_l2)
        } else {
            (*self.load_l2(l2_offset)?).clone()
        };
        // The table must be on disk before the L1 entry points to it.
        let written = storage
            .write_at(&table.to_bytes(), new.0)
            .io_at("write an L2 table", new.0)
            .and_then(|()| storage.sync().io("sync the image"))
            .and_then(|()| self.set_l1_entry(l1_index, new.0 | L1_COPIED));
        if let Err(err) = written {
            meta.allocator.give_back(new);
            return Err(err);
        }
        let table = Arc::new(table);
        self.l2_cache.insert(new.0, Arc::clone(&table));
        if l2_offset != 0 {
            meta.allocator.free_later(HostOffset(l2_offset));
        }
        Ok((new.0, table))
    }

    /// Replaces entry `index` of the L2 table at `l2_offset`, on disk first.
    pub(super) fn set_l2_entry(
        &self,
        l2_offset: u64,
        table: &Arc<L2Table>,
        index: u64,
        entry: &L2Entry,
    ) -> Result<()> {
        self.publish_l2_entries(l2_offset, table, index, std::slice::from_ref(entry))
    }

    /// Replaces the consecutive entries from `first` of the L2 table at
    /// `l2_offset`: their bytes go to disk in one write, then readers see
    /// them, in place (no copy of the table per allocating write). The
    /// caller holds the metadata lock, so no other writer changes the table
    /// meanwhile; the table goes back into the cache in case a miss
    /// replaced it there while the data was written.
    pub(super) fn publish_l2_entries(
        &self,
        l2_offset: u64,
        table: &Arc<L2Table>,
        first: u64,
        entries: &[L2Entry],
    ) -> Result<()> {
        let mut bytes = Vec::with_capacity(entries.len() * self.geometry.l2_entry_size() as usize);
        let mut start = None;
        for (i, entry) in (first..).zip(entries) {
            let (at, encoded) = table.encoded(i, entry);
            start.get_or_insert(at);
            bytes.extend_from_slice(&encoded);
        }
        let at = l2_offset + start.unwrap_or(0);
        self.storage
            .write_at(&bytes, at)
            .io_at("write an L2 entry", at)?;
        for (i, entry) in (first..).zip(entries) {
            table.store(i, entry);
        }
        self.l2_cache.insert(l2_offset, Arc::clone(table));
        Ok(())
    }

    /// Drops the references an entry that was just replaced held.
    pub(super) fn free_entry(&self, meta: &mut Meta, old: &L2Entry) {
        if self.data_file.is_some() {
            return;
        }
        if let L2Entry::Compressed(word) = *old {
            let bits = self.geometry.cluster_bits;
            let descriptor = super::compress::decode_descriptor(word, bits);
            for cluster in descriptor.host_clusters(bits) {
                meta.allocator.free_later(HostOffset(cluster << bits));
            }
        } else if let Some(host) = old.host_cluster() {
            meta.allocator.free_later(host);
        }
    }

    /// Applies the deferred frees when too many wait. The caller holds
    /// no lock: the sync runs without any.
    pub(super) fn bound_pending_frees(&self) -> Result<()> {
        let pending = sync::lock(&self.meta).allocator.pending_frees();
        if pending > MAX_PENDING_FREES {
            self.sync_then_free()?;
        }
        Ok(())
    }
}

thread_local! {
    /// The buffer in which a thread builds a cluster for copy-on-write, kept
    /// between writes so that a partial write allocates and zeroes nothing
    /// (every byte of it is read from the old view before it is written).
    static CLUSTER_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` bytes of this thread's cluster buffer (a fresh one if
/// the thread's is in use), whose content is unspecified.
fn with_cluster_buffer<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    CLUSTER_BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0);
            }
            f(&mut buffer[..len])
        }
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// Whether `bytes` are all zeros (64 bytes at a time, which vectorises).
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(64)
        .all(|chunk| chunk.iter().fold(0, |acc, &b| acc | b) == 0)
}

/// Copies the part of `data` (at guest `data_at`) that overlaps `buf` (at
/// guest `buf_at`) into `buf`.
fn overlay(buf: &mut [u8], buf_at: u64, data: &[u8], data_at: u64) {
    let start = buf_at.max(data_at);
    let end = (buf_at + buf.len() as u64).min(data_at + data.len() as u64);
    if start < end {
        let dst = (start - buf_at) as usize..(end - buf_at) as usize;
        let src = (start - data_at) as usize..(end - data_at) as usize;
        buf[dst].copy_from_slice(&data[src]);
    }
}

/// Runs of consecutive set bits in `mask`, as inclusive (first, last) pairs.
fn bit_runs(mask: u32) -> Vec<(u32, u32)> {
    let mut runs = Vec::new();
    let mut bit = 0;
    while bit < 32 {
        if mask & (1 << bit) == 0 {
            bit += 1;
            continue;
        }
        let first = bit;
        while bit < 32 && mask & (1 << bit) != 0 {
            bit += 1;
        }
        runs.push((first, bit - 1));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_runs_finds_each_run() {
        assert_eq!(bit_runs(0), vec![]);
        assert_eq!(bit_runs(0b1101), vec![(0, 0), (2, 3)]);
        assert_eq!(bit_runs(u32::MAX), vec![(0, 31)]);
    }

    #[test]
    fn overlay_copies_only_the_overlap() {
        let mut buf = [0u8; 4];
        overlay(&mut buf, 10, &[1, 2, 3, 4], 12);
        assert_eq!(buf, [0, 0, 1, 2]);
    }
}
