//! Write-zeroes: whole clusters become zero clusters (or zero subclusters)
//! and give their space back; partial clusters get written zeros.

use super::l2::{L2Entry, ALL_SUBCLUSTERS};
use super::Qcow2;
use crate::format::error::IoContext;
use crate::format::{BackingReader, Result};
use crate::sync;

impl Qcow2 {
    /// Makes guest `offset..offset + len` read as zeros.
    pub fn zero_range(&self, offset: u64, len: u64, backing: &dyn BackingReader) -> Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, len)?;
        self.record_dirty(offset, len);
        {
            let _clusters = self.lock_clusters(offset, len);
            let cluster_size = self.geometry.cluster_size();
            let end = offset + len;
            let mut pos = offset;
            while pos < end {
                let chunk = (cluster_size - self.geometry.offset_in_cluster(pos)).min(end - pos);
                if chunk == cluster_size {
                    self.zero_cluster(pos, backing)?;
                } else if self.geometry.extended_l2 {
                    self.zero_subclusters(pos, chunk, backing)?;
                } else {
                    self.write_zeros(pos, chunk, backing)?;
                }
                pos += chunk;
            }
        }
        self.bound_pending_frees()
    }

    fn write_zeros(&self, guest: u64, len: u64, backing: &dyn BackingReader) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; len as usize];
        self.write_cluster(guest, &zeros, backing)
    }

    /// The entry that makes a whole cluster read as zeros with no space,
    /// or `None` when the format cannot say so (version 2 over a backing
    /// file) and zeros must be written.
    fn zero_entry(&self, backing: &dyn BackingReader) -> Option<L2Entry> {
        let has_backing = backing.has_backing();
        if self.geometry.extended_l2 {
            let zero = if has_backing { ALL_SUBCLUSTERS } else { 0 };
            return Some(L2Entry::Subclusters {
                host: None,
                copied: false,
                allocated: 0,
                zero,
            });
        }
        if !has_backing {
            return Some(L2Entry::Unallocated);
        }
        (self.version >= 3).then_some(L2Entry::Zero {
            host: None,
            copied: false,
        })
    }

    /// Makes the cluster holding `guest` read as zeros. The caller holds
    /// the cluster ([`Qcow2::lock_clusters`]), not the metadata lock.
    pub(super) fn zero_cluster(&self, guest: u64, backing: &dyn BackingReader) -> Result<()> {
        let cluster_size = self.geometry.cluster_size();
        let Some(new) = self.zero_entry(backing) else {
            return self.write_zeros(guest, cluster_size, backing);
        };
        let old = self.current_entry(guest)?;
        if old != new {
            let mut meta = sync::lock(&self.meta);
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            self.set_l2_entry(l2_offset, &table, self.geometry.l2_index(guest), &new)?;
            self.free_entry(&mut meta, &old);
        }
        if let Some(data_file) = &self.data_file {
            // A raw data file must itself read as the guest sees it.
            data_file
                .punch_hole(guest, cluster_size)
                .io_at("free a cluster of the data file", guest)?;
        }
        Ok(())
    }

    /// Zeros part of one cluster with extended L2 entries: whole subclusters
    /// by their zero bits, the rest by writing zeros.
    fn zero_subclusters(&self, guest: u64, len: u64, backing: &dyn BackingReader) -> Result<()> {
        let sc_size = self.geometry.subcluster_size();
        let first_whole = guest.next_multiple_of(sc_size);
        let end = guest + len;
        let last_whole = end - end % sc_size;
        if first_whole >= last_whole {
            return self.write_zeros(guest, len, backing);
        }
        self.write_zeros(guest, first_whole - guest, backing)?;
        self.write_zeros(last_whole, end - last_whole, backing)?;
        let mask = self.subcluster_mask(first_whole, last_whole - first_whole);
        let old = self.current_entry(guest)?;
        let L2Entry::Subclusters {
            host,
            copied,
            allocated,
            zero,
        } = old
        else {
            // A compressed cluster has no subcluster bits: write the zeros.
            return self.write_zeros(first_whole, last_whole - first_whole, backing);
        };
        let new = L2Entry::Subclusters {
            host,
            copied,
            allocated: allocated & !mask,
            zero: zero | mask,
        };
        if new != old {
            let mut meta = sync::lock(&self.meta);
            let (l2_offset, table) = self.writable_l2(&mut meta, guest)?;
            self.set_l2_entry(l2_offset, &table, self.geometry.l2_index(guest), &new)?;
        }
        if let Some(data_file) = &self.data_file {
            data_file
                .punch_hole(first_whole, last_whole - first_whole)
                .io_at("free clusters of the data file", first_whole)?;
        }
        Ok(())
    }
}
