//! Populate: fill the parts of a range that this image does not hold yet,
//! leaving everything it holds untouched. This is how a stream job copies
//! data up: under the metadata lock, so that a guest write to the same
//! cluster and the copy are serialised and the guest write always wins.

use super::l2::Piece;
use super::{Meta, Qcow2};
use crate::format::{BackingReader, Result};
use crate::sync;

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
