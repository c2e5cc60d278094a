//! Writing whole clusters compressed, as QEMU's
//! `qcow2_co_pwritev_compressed_task` does for `qemu-img convert -c` and a
//! backup job with `compress=on`.
//!
//! A write may cover a run of consecutive clusters; it costs one sync
//! however long the run. Order, so that a crash leaves at worst a leak: the
//! refcounts of the bytes claimed for every compressed cluster of the run
//! and their compressed data are written, then synced once, then the L2
//! entries point to them; the space of the entries they replaced is freed
//! only after a later sync, as every write frees.

use super::super::l2::{L2Entry, L2Table};
use super::super::{Meta, Qcow2};
use super::encode::{compress, encode_descriptor};
use super::pack::Claim;
use crate::format::error::IoContext;
use crate::format::{FormatError, NoBacking, Result};
use crate::sync::{self, Arc};

/// The compressed flag of a standard L2 entry (qcow2.txt, bit 62).
const COMPRESSED_FLAG: u64 = 1 << 62;

/// A guest cluster of a run, compressed.
struct Packed {
    /// Guest offset of the cluster.
    guest: u64,
    /// Its compressed data.
    stream: Vec<u8>,
}

/// The consecutive entries of one L2 table that a run replaces.
struct TableRun {
    /// The table's L1 index.
    l1: u64,
    /// Host offset of the table, writable.
    l2_offset: u64,
    table: Arc<L2Table>,
    /// Index of the first entry replaced.
    first: u64,
    /// The entries replaced, from `first`.
    old: Vec<L2Entry>,
}

impl Qcow2 {
    /// Writes the guest clusters from `offset` (cluster aligned) compressed
    /// with the image's compression type. `data` is one or more whole
    /// clusters; its last cluster may instead be the last cluster of an
    /// image whose size is not a multiple of the cluster size, of which
    /// `data` holds the part inside the image (padded with zeros, as QEMU
    /// pads it). A cluster that does not compress to less than a cluster
    /// is written as it is, as QEMU does.
    ///
    /// However many clusters `data` covers, the write syncs the image once.
    /// Whatever the clusters held before is replaced and its space freed.
    /// Images with an external data file are refused, as QEMU refuses them.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        if self.data_file.is_some() {
            return Err(FormatError::Unsupported {
                what: "compressed writes to an image with an external data file".into(),
            });
        }
        self.check_bounds(offset, data.len() as u64)?;
        let cluster_size = self.geometry.cluster_size();
        let len = data.len() as u64;
        let whole = len % cluster_size == 0 || offset + len == self.size;
        let aligned = self.geometry.offset_in_cluster(offset) == 0;
        if !aligned || len == 0 || !whole {
            return Err(FormatError::Unsupported {
                what: format!(
                    "a compressed write of {len} bytes at guest offset {offset:#x}: it must \
                     be whole clusters ({cluster_size} bytes each) from a cluster boundary, \
                     the last of which may be the image's last, partial cluster"
                ),
            });
        }
        // Compression is the costly part: it runs before any lock is taken.
        let streams: Vec<(u64, Option<Vec<u8>>)> = (offset..)
            .step_by(cluster_size as usize)
            .zip(data.chunks(cluster_size as usize))
            .map(|(guest, cluster)| (guest, self.compress_cluster(cluster)))
            .collect();
        self.record_dirty(offset, len);
        // Clusters that do not shrink are written as they are, a run of
        // them at a time, before the compressed ones: a plain write needs no
        // sync before its L2 entries, so the call still syncs once. They
        // cover everything the guest sees of them, so nothing is read from
        // below.
        let write_plain = |from: u64, to: u64| {
            let bytes = &data[(from - offset) as usize..(to - offset) as usize];
            self.write(from, bytes, &NoBacking)
        };
        let mut packed = Vec::with_capacity(streams.len());
        let mut plain_from = None;
        for (guest, stream) in streams {
            match stream {
                None => {
                    plain_from.get_or_insert(guest);
                }
                Some(stream) => {
                    if let Some(from) = plain_from.take() {
                        write_plain(from, guest)?;
                    }
                    packed.push(Packed { guest, stream });
                }
            }
        }
        if let Some(from) = plain_from {
            write_plain(from, offset + len)?;
        }
        if let (Some(first), Some(last)) = (packed.first(), packed.last()) {
            // The clusters are held, as by every change of an L2 entry, from
            // before their entries are read until the new ones are
            // published, so a write or a populate of them waits; the
            // metadata lock covers the rest (a compressed write syncs before
            // it publishes, so it gains nothing from leaving it).
            let _clusters = self.lock_clusters(first.guest, last.guest - first.guest + 1);
            let mut meta = sync::lock(&self.meta);
            self.store_compressed(&mut meta, &packed)?;
        }
        self.bound_pending_frees()
    }

    /// The compressed data of one guest cluster (the image's last, partial
    /// one padded with zeros), or `None` if it does not shrink.
    fn compress_cluster(&self, cluster: &[u8]) -> Option<Vec<u8>> {
        let cluster_size = self.geometry.cluster_size() as usize;
        if cluster.len() == cluster_size {
            return compress(self.compression, cluster);
        }
        let mut padded = cluster.to_vec();
        padded.resize(cluster_size, 0);
        compress(self.compression, &padded)
    }

    /// Puts the streams of `packed` (in guest order) into claimed bytes,
    /// syncs once, and points the clusters' L2 entries at them. On failure
    /// the bytes of every entry not published are given back; the entries
    /// published point to synced data and stay.
    fn store_compressed(&self, meta: &mut Meta, packed: &[Packed]) -> Result<()> {
        let tables = self.replaced_entries(meta, packed)?;
        let mut claims = Vec::with_capacity(packed.len());
        let words = match self.write_streams(meta, packed, &mut claims) {
            Ok(words) => words,
            Err(err) => {
                self.undo_claims(meta, claims);
                return Err(err);
            }
        };
        let mut published = 0;
        let mut failure = None;
        for run in &tables {
            let words = &words[published..published + run.old.len()];
            // A compressed cluster freed earlier may have had the very same
            // descriptor: its decompressed copy must not be served.
            for &word in words {
                self.decompressed.remove(word);
            }
            // No COPIED flag and no subcluster bits: a compressed entry has
            // neither (qcow2.txt), and QEMU clears the extended bitmap too.
            let entries: Vec<L2Entry> = words.iter().map(|&w| L2Entry::Compressed(w)).collect();
            if let Err(err) =
                self.publish_l2_entries(run.l2_offset, &run.table, run.first, &entries)
            {
                failure = Some(err);
                break;
            }
            published += entries.len();
        }
        for old in tables.iter().flat_map(|run| &run.old).take(published) {
            self.free_entry(meta, old);
        }
        self.undo_claims(meta, claims.split_off(published));
        failure.map_or(Ok(()), Err)
    }

    /// The L2 tables of the clusters of `packed`, made writable, and the
    /// entries the clusters have now, in runs of consecutive entries.
    fn replaced_entries(&self, meta: &mut Meta, packed: &[Packed]) -> Result<Vec<TableRun>> {
        let mut runs: Vec<TableRun> = Vec::new();
        for cluster in packed {
            let l1 = self.geometry.l1_index(cluster.guest);
            let index = self.geometry.l2_index(cluster.guest);
            match runs.last_mut() {
                Some(run) if run.l1 == l1 && run.first + run.old.len() as u64 == index => {
                    let old = run.table.entry(&self.geometry, index)?;
                    run.old.push(old);
                }
                last => {
                    // A cluster written plain in between splits the run,
                    // not the table.
                    let (l2_offset, table) = match last {
                        Some(run) if run.l1 == l1 => (run.l2_offset, Arc::clone(&run.table)),
                        _ => self.writable_l2(meta, cluster.guest)?,
                    };
                    let old = table.entry(&self.geometry, index)?;
                    runs.push(TableRun {
                        l1,
                        l2_offset,
                        table,
                        first: index,
                        old: vec![old],
                    });
                }
            }
        }
        Ok(runs)
    }

    /// Claims bytes for each stream of `packed` (pushed on `claims` as they
    /// are made, for the caller to undo on failure), writes the streams
    /// and syncs; returns the compressed L2 entry of each cluster.
    fn write_streams(
        &self,
        meta: &mut Meta,
        packed: &[Packed],
        claims: &mut Vec<Claim>,
    ) -> Result<Vec<u64>> {
        let mut words = Vec::with_capacity(packed.len());
        // Streams packed one after the other go out in one write.
        let mut pending: Vec<u8> = Vec::new();
        let mut pending_at = 0;
        for cluster in packed {
            let len = cluster.stream.len() as u64;
            let claim = self.claim_bytes(meta, len)?;
            let at = claim.offset;
            claims.push(claim);
            let Some(descriptor) = encode_descriptor(at, len, self.geometry.cluster_bits) else {
                return Err(FormatError::Unsupported {
                    what: format!(
                        "compressed data at host offset {at:#x}, beyond what an L2 entry can \
                         address"
                    ),
                });
            };
            words.push(descriptor | COMPRESSED_FLAG);
            if pending_at + pending.len() as u64 != at {
                self.write_stream(&pending, pending_at)?;
                pending.clear();
                pending_at = at;
            }
            pending.extend_from_slice(&cluster.stream);
        }
        self.write_stream(&pending, pending_at)?;
        // The refcounts and the data must be on disk before the entries
        // that point to them: an entry whose stream is not there yet is a
        // cluster that cannot be read.
        self.storage.sync().io("sync the image")?;
        Ok(words)
    }

    /// Writes compressed data at host offset `at` (nothing if empty).
    fn write_stream(&self, data: &[u8], at: u64) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.storage
            .write_at(data, at)
            .io_at("write a compressed cluster", at)
    }
}

#[cfg(test)]
mod tests;
