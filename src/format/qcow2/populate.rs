//! Populate: fill the parts of a range that this image does not hold yet,
//! leaving everything it holds untouched. This is how a stream job copies
//! data up: under the metadata lock, so that a guest write to the same
//! cluster and the copy are serialised and the guest write always wins.

use super::l2::{L2Entry, L2Table, Piece};
use super::types::HostOffset;
use super::{Meta, Qcow2};
use crate::format::error::IoContext;
use crate::format::{BackingReader, Result};
use crate::sync::{self, Arc};

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
        let mut meta = sync::lock(&self.meta);
        let mut written = 0;
        let mut pos = offset;
        while pos < offset + len {
            if let Some(data) = data {
                let slice = &data[(pos - offset) as usize..];
                let batched = self.populate_whole_clusters(&mut meta, pos, slice)?;
                if batched > 0 {
                    written += batched;
                    pos += batched;
                    continue;
                }
            }
            let entry = self.l2_entry(pos)?;
            let (piece, run) = entry.run_at(&self.geometry, pos, offset + len - pos);
            if piece == Piece::Unallocated {
                let slice =
                    data.map(|d| &d[(pos - offset) as usize..(pos - offset + run) as usize]);
                self.populate_run(&mut meta, pos, run, slice, backing)?;
                written += run;
            }
            pos += run;
        }
        self.bound_pending_frees(&mut meta)?;
        Ok(written)
    }

    /// The fast path for the common case of a stream: consecutive whole
    /// clusters that are unallocated, in one L2 table, no subclusters, no
    /// external data file. Their data goes out in one write per run of
    /// contiguous host clusters and their L2 entries in one write, data
    /// first. Returns the bytes filled (0: the fast path does not apply).
    fn populate_whole_clusters(&self, meta: &mut Meta, guest: u64, data: &[u8]) -> Result<u64> {
        let cluster_size = self.geometry.cluster_size();
        let eligible = !self.geometry.extended_l2
            && self.data_file.is_none()
            && self.geometry.offset_in_cluster(guest) == 0;
        if !eligible {
            return Ok(0);
        }
        let table_room = self.geometry.l2_entries() - self.geometry.l2_index(guest);
        let mut count = 0;
        while count < table_room && (count + 1) * cluster_size <= data.len() as u64 {
            if self.l2_entry(guest + count * cluster_size)? != L2Entry::Unallocated {
                break;
            }
            count += 1;
        }
        if count < 2 {
            return Ok(0);
        }
        let (l2_offset, table) = self.writable_l2(meta, guest)?;
        let mut hosts = Vec::with_capacity(count as usize);
        let published = self
            .allocate_clusters(meta, count, &mut hosts)
            .and_then(|()| self.write_host_runs(&hosts, data))
            .and_then(|()| self.set_l2_entries(l2_offset, &table, guest, &hosts));
        if let Err(err) = published {
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

    /// Writes cluster `i` of `data` to `hosts[i]`, one write per run of
    /// contiguous host clusters.
    fn write_host_runs(&self, hosts: &[HostOffset], data: &[u8]) -> Result<()> {
        let cluster_size = self.geometry.cluster_size() as usize;
        let mut first = 0;
        while first < hosts.len() {
            let mut last = first;
            while last + 1 < hosts.len() && hosts[last + 1].0 == hosts[last].0 + cluster_size as u64
            {
                last += 1;
            }
            let bytes = &data[first * cluster_size..(last + 1) * cluster_size];
            self.storage
                .write_at(bytes, hosts[first].0)
                .io_at("write copied data", hosts[first].0)?;
            first = last + 1;
        }
        Ok(())
    }

    /// Points consecutive L2 entries from guest `first` at `hosts`, in one
    /// write of the table's bytes.
    fn set_l2_entries(
        &self,
        l2_offset: u64,
        table: &Arc<L2Table>,
        first: u64,
        hosts: &[HostOffset],
    ) -> Result<()> {
        let mut updated = (**table).clone();
        let index = self.geometry.l2_index(first);
        let mut bytes = Vec::with_capacity(hosts.len() * self.geometry.l2_entry_size() as usize);
        let mut start = None;
        for (i, &host) in hosts.iter().enumerate() {
            let (at, entry) = updated.set(index + i as u64, &L2Entry::Data { host, copied: true });
            start.get_or_insert(at);
            bytes.extend_from_slice(&entry);
        }
        let start = start.unwrap_or(0);
        self.storage
            .write_at(&bytes, l2_offset + start)
            .io_at("write an L2 table", l2_offset + start)?;
        self.l2_cache.insert(l2_offset, Arc::new(updated));
        Ok(())
    }

    /// Fills one unallocated run inside one cluster.
    fn populate_run(
        &self,
        meta: &mut Meta,
        guest: u64,
        len: u64,
        data: Option<&[u8]>,
        backing: &dyn BackingReader,
    ) -> Result<()> {
        match data {
            Some(bytes) => self.write_cluster(meta, guest, bytes, backing),
            None if len == self.geometry.cluster_size() => self.zero_cluster(meta, guest, backing),
            None => self.write_cluster(meta, guest, &vec![0u8; len as usize], backing),
        }
    }
}
