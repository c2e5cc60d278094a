//! Populate: fill the parts of a range that this image does not hold yet,
//! leaving everything it holds untouched. This is how a stream job copies
//! data up: with the range's guest clusters held ([`super::inflight`]), so
//! that a guest write to the same cluster and the copy are serialised and
//! the guest write always wins (it either comes first, and the copy finds
//! the cluster allocated and leaves it, or waits and writes over the copy).
//! The metadata lock is taken only to allocate and to publish.

use super::l2::{L2Entry, Piece};
use super::types::HostOffset;
use super::{Meta, Qcow2};
use crate::format::error::IoContext;
use crate::format::{BackingReader, HostRange, Result};
use crate::sync::{self, Arc};

/// What the fast path fills clusters with.
enum Fill<'a> {
    /// Bytes in memory.
    Bytes(&'a [u8]),
    /// Bytes of a host file, which the host copies.
    Copy(&'a HostRange),
}

impl Fill<'_> {
    fn len(&self) -> u64 {
        match self {
            Fill::Bytes(data) => data.len() as u64,
            Fill::Copy(source) => source.len,
        }
    }
}

impl Qcow2 {
    /// Writes `data` (zeros when `None`) into every part of
    /// `offset..offset + len` that is unallocated in this image; returns the
    /// bytes written. `data`, when given, is what the backing chain shows for
    /// the range, so completing partial clusters from `backing` agrees.
    pub fn populate(
        &self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        backing: &dyn BackingReader,
    ) -> Result<u64> {
        self.check_writable()?;
        self.check_bounds(offset, len)?;
        let clusters = self.lock_clusters(offset, len);
        let mut written = 0;
        let mut pos = offset;
        while pos < offset + len {
            if let Some(data) = data {
                let slice = Fill::Bytes(&data[(pos - offset) as usize..]);
                // One cluster goes the general way, which is as fast.
                let batched = self.populate_whole_clusters(pos, slice, 2)?;
                if batched > 0 {
                    written += batched;
                    pos += batched;
                    continue;
                }
            }
            let entry = self.current_entry(pos)?;
            let (piece, run) = entry.run_at(&self.geometry, pos, offset + len - pos);
            if piece == Piece::Unallocated {
                let slice =
                    data.map(|d| &d[(pos - offset) as usize..(pos - offset + run) as usize]);
                self.populate_run(pos, run, slice, backing)?;
                written += run;
            }
            pos += run;
        }
        // Before the sync that bounding the frees may take.
        drop(clusters);
        self.bound_pending_frees()?;
        Ok(written)
    }

    /// [`Qcow2::populate`] with the bytes of `source`, moved by the host
    /// ([`Storage::copy_from`](crate::storage::Storage::copy_from)) into
    /// whole unallocated clusters from a cluster-aligned `offset`; stops at
    /// the first cluster that is not one. Returns the bytes filled.
    pub fn populate_from(&self, offset: u64, source: &HostRange) -> Result<u64> {
        self.check_writable()?;
        self.check_bounds(offset, source.len)?;
        let mut filled = 0;
        {
            let _clusters = self.lock_clusters(offset, source.len);
            while filled < source.len {
                let rest = HostRange {
                    storage: Arc::clone(&source.storage),
                    offset: source.offset + filled,
                    len: source.len - filled,
                };
                let batched =
                    self.populate_whole_clusters(offset + filled, Fill::Copy(&rest), 1)?;
                if batched == 0 {
                    break;
                }
                filled += batched;
            }
        }
        self.bound_pending_frees()?;
        Ok(filled)
    }

    /// The fast path for the common case of a stream: consecutive whole
    /// clusters that are unallocated, in one L2 table, no subclusters, no
    /// external data file; at least `fewest` of them. Their data goes out
    /// in one write (or copy) per run of contiguous host clusters and their
    /// L2 entries in one write, data first. Returns the bytes filled (0: the
    /// fast path does not apply). The caller holds the clusters; the data
    /// goes out without the metadata lock.
    fn populate_whole_clusters(&self, guest: u64, fill: Fill, fewest: u64) -> Result<u64> {
        let cluster_size = self.geometry.cluster_size();
        let eligible = !self.geometry.extended_l2
            && self.data_file.is_none()
            && self.geometry.offset_in_cluster(guest) == 0;
        if !eligible {
            return Ok(0);
        }
        let table_room = self.geometry.l2_entries() - self.geometry.l2_index(guest);
        let mut count = 0;
        while count < table_room && (count + 1) * cluster_size <= fill.len() {
            if self.current_entry(guest + count * cluster_size)? != L2Entry::Unallocated {
                break;
            }
            count += 1;
        }
        if count < fewest.max(1) {
            return Ok(0);
        }
        let mut hosts = Vec::with_capacity(count as usize);
        let allocated = {
            let mut meta = sync::lock(&self.meta);
            self.writable_l2(&mut meta, guest)
                .and_then(|_| self.allocate_clusters(&mut meta, count, &mut hosts))
        };
        // The data goes out with no lock held, before any entry names it.
        let published = allocated
            .and_then(|()| self.write_host_runs(&hosts, &fill))
            .and_then(|()| {
                let mut meta = sync::lock(&self.meta);
                self.set_l2_entries(&mut meta, guest, &hosts)
            });
        if let Err(err) = published {
            let mut meta = sync::lock(&self.meta);
            for host in hosts.into_iter().rev() {
                meta.allocator.give_back(host);
            }
            return Err(err);
        }
        Ok(count * cluster_size)
    }

    /// Allocates `count` clusters into `hosts`; on failure `hosts` holds the
    /// ones taken so far, for the caller to give back.
    fn allocate_clusters(
        &self,
        meta: &mut Meta,
        count: u64,
        hosts: &mut Vec<HostOffset>,
    ) -> Result<()> {
        for _ in 0..count {
            hosts.push(self.allocate_cluster(meta)?);
        }
        Ok(())
    }

    /// Writes cluster `i` of `fill` to `hosts[i]`, one write per run of
    /// contiguous host clusters.
    fn write_host_runs(&self, hosts: &[HostOffset], fill: &Fill) -> Result<()> {
        let cluster_size = self.geometry.cluster_size() as usize;
        let mut first = 0;
        while first < hosts.len() {
            let mut last = first;
            while last + 1 < hosts.len() && hosts[last + 1].0 == hosts[last].0 + cluster_size as u64
            {
                last += 1;
            }
            let (start, end) = (first * cluster_size, (last + 1) * cluster_size);
            match fill {
                Fill::Bytes(data) => self.storage.write_at(&data[start..end], hosts[first].0),
                Fill::Copy(source) => self.storage.copy_from(
                    source.storage.as_ref(),
                    source.offset + start as u64,
                    (end - start) as u64,
                    hosts[first].0,
                ),
            }
            .io_at("write copied data", hosts[first].0)?;
            first = last + 1;
        }
        Ok(())
    }

    /// Points consecutive L2 entries from guest `first` at `hosts`, in one
    /// write of the table's bytes, in the table as it is now.
    fn set_l2_entries(&self, meta: &mut Meta, first: u64, hosts: &[HostOffset]) -> Result<()> {
        let (l2_offset, table) = self.writable_l2(meta, first)?;
        let entries: Vec<L2Entry> = hosts
            .iter()
            .map(|&host| L2Entry::Data { host, copied: true })
            .collect();
        let index = self.geometry.l2_index(first);
        self.publish_l2_entries(l2_offset, &table, index, &entries)
    }

    /// Fills one unallocated run inside one cluster.
    fn populate_run(
        &self,
        guest: u64,
        len: u64,
        data: Option<&[u8]>,
        backing: &dyn BackingReader,
    ) -> Result<()> {
        match data {
            Some(bytes) => self.write_cluster(guest, bytes, backing),
            None if len == self.geometry.cluster_size() => self.zero_cluster(guest, backing),
            None => self.write_cluster(guest, &vec![0u8; len as usize], backing),
        }
    }
}
