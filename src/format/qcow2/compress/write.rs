//! Writing whole clusters compressed, as QEMU's
//! `qcow2_co_pwritev_compressed_task` does for `qemu-img convert -c` and a
//! backup job with `compress=on`.
//!
//! Order, so that a crash leaves at worst a leak: the refcounts of the
//! claimed bytes and the compressed data are written and synced, then the
//! L2 entry points to them; the space of the entry it replaced is freed
//! only after a later sync, as every write frees.

use super::super::l2::L2Entry;
use super::super::{Meta, Qcow2};
use super::encode::{compress, encode_descriptor};
use crate::format::error::IoContext;
use crate::format::{FormatError, NoBacking, Result};
use crate::sync;

/// The compressed flag of a standard L2 entry (qcow2.txt, bit 62).
const COMPRESSED_FLAG: u64 = 1 << 62;

impl Qcow2 {
    /// Writes the guest cluster at `offset` (cluster aligned) compressed
    /// with the image's compression type. `data` is one whole cluster, or,
    /// for the last cluster of an image whose size is not a multiple of the
    /// cluster size, the part of it inside the image (padded with zeros, as
    /// QEMU pads it). A cluster that does not compress to less than a
    /// cluster is written as it is, as QEMU does.
    ///
    /// Whatever the cluster held before is replaced and its space freed.
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
        let last_partial = len < cluster_size && offset + len == self.size;
        let aligned = self.geometry.offset_in_cluster(offset) == 0;
        if !aligned || len == 0 || !(len == cluster_size || last_partial) {
            return Err(FormatError::Unsupported {
                what: format!(
                    "a compressed write of {len} bytes at guest offset {offset:#x}: it must \
                     be one whole cluster ({cluster_size} bytes) from a cluster boundary, \
                     or the image's last, partial cluster"
                ),
            });
        }
        let mut cluster = data.to_vec();
        cluster.resize(cluster_size as usize, 0);
        let Some(compressed) = compress(self.compression, &cluster) else {
            // The cluster covers everything the guest sees of it, so
            // nothing is read from below.
            return self.write(offset, data, &NoBacking);
        };
        self.record_dirty(offset, len);
        {
            // The cluster is held, as by every change of an L2 entry, so a
            // write or a populate of it waits; the metadata lock covers the
            // rest (a compressed write syncs before it publishes, so it
            // gains nothing from leaving it).
            let _cluster = self.lock_clusters(offset, len);
            let mut meta = sync::lock(&self.meta);
            self.store_compressed(&mut meta, offset, &compressed)?;
        }
        self.bound_pending_frees()
    }

    /// Puts `compressed` (the stream of the guest cluster at `guest`) into
    /// claimed bytes and points the cluster's L2 entry at it.
    fn store_compressed(&self, meta: &mut Meta, guest: u64, compressed: &[u8]) -> Result<()> {
        let (l2_offset, table) = self.writable_l2(meta, guest)?;
        let index = self.geometry.l2_index(guest);
        let old = table.entry(&self.geometry, index)?;
        let len = compressed.len() as u64;
        let claim = self.claim_bytes(meta, len)?;
        let Some(descriptor) = encode_descriptor(claim.offset, len, self.geometry.cluster_bits)
        else {
            let at = claim.offset;
            self.undo_claim(meta, claim);
            return Err(FormatError::Unsupported {
                what: format!(
                    "compressed data at host offset {at:#x}, beyond what an L2 entry can address"
                ),
            });
        };
        let word = descriptor | COMPRESSED_FLAG;
        let stored = self
            .storage
            .write_at(compressed, claim.offset)
            .io_at("write a compressed cluster", claim.offset)
            // The refcounts and the data must be on disk before the entry
            // that points to them: an entry whose stream is not there yet
            // is a cluster that cannot be read.
            .and_then(|()| self.storage.sync().io("sync the image"))
            .and_then(|()| {
                // A compressed cluster freed earlier may have had the very
                // same descriptor: its decompressed copy must not be served.
                self.decompressed.remove(word);
                self.set_l2_entry(l2_offset, &table, index, &L2Entry::Compressed(word))
            });
        if let Err(err) = stored {
            self.undo_claim(meta, claim);
            return Err(err);
        }
        // No COPIED flag and no subcluster bits: a compressed entry has
        // neither (qcow2.txt), and QEMU clears the extended bitmap too.
        self.free_entry(meta, &old);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
