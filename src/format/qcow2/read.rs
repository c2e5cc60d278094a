//! Reads and allocation queries: one lookup per cluster, data I/O coalesced
//! across clusters that are contiguous on the host, no exclusive lock.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::compress::{decode_descriptor, decompress};
use super::l2::{L2Entry, Piece};
use super::Qcow2;
use crate::format::error::IoContext;
use crate::format::{Allocation, BackingReader, Extent, FormatError, HostRange, Result};
use crate::sync::{self, Arc};

/// Largest compressed stream accepted for one cluster: QEMU never writes
/// one longer than the cluster itself plus a sector of rounding.
fn max_compressed_len(cluster_size: u64) -> u64 {
    cluster_size * 2 + 512
}

/// A pending host read that later pieces may extend.
struct HostRun {
    host: u64,
    buf_start: usize,
    len: usize,
}

impl Qcow2 {
    /// Reads what this image holds at guest `offset`; returns the ranges it
    /// does not hold.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<Range<u64>>> {
        self.check_bounds(offset, buf.len() as u64)?;
        let _inflight = sync::read(&self.inflight);
        let mut unheld: Vec<Range<u64>> = Vec::new();
        let mut run: Option<HostRun> = None;
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let entry = self.l2_entry(guest)?;
            let (piece, len) = entry.run_at(&self.geometry, guest, (buf.len() - pos) as u64);
            let len = len as usize;
            match piece {
                Piece::Data(host) => match &mut run {
                    Some(r) if r.host + r.len as u64 == host.0 && r.buf_start + r.len == pos => {
                        r.len += len;
                    }
                    _ => {
                        if let Some(r) = run.take() {
                            self.read_host(r, buf)?;
                        }
                        run = Some(HostRun {
                            host: host.0,
                            buf_start: pos,
                            len,
                        });
                    }
                },
                Piece::Zero => buf[pos..pos + len].fill(0),
                Piece::Compressed(word) => {
                    self.read_compressed(word, guest, &mut buf[pos..pos + len])?
                }
                Piece::Unallocated => push_range(&mut unheld, guest..guest + len as u64),
            }
            pos += len;
        }
        if let Some(r) = run {
            self.read_host(r, buf)?;
        }
        Ok(unheld)
    }

    fn read_host(&self, run: HostRun, buf: &mut [u8]) -> Result<()> {
        self.check_host_run(run.host, run.len as u64)?;
        let out = &mut buf[run.buf_start..run.buf_start + run.len];
        self.data()
            .read_at(out, run.host)
            .io_at("read guest data", run.host)?;
        Ok(())
    }

    /// Refuses a data run that a hostile L2 entry puts past the end of the
    /// image file.
    fn check_host_run(&self, host: u64, len: u64) -> Result<()> {
        if self.data_file.is_none() && host + len > self.host_end.load(Ordering::Acquire) {
            return Err(FormatError::malformed_at(
                "data cluster",
                host,
                "lies past the end of the image file",
            ));
        }
        Ok(())
    }

    /// The longest run of plain data (uncompressed, contiguous on the
    /// host) from guest `offset`, at most `len` bytes; `None` when the
    /// first byte is not plain data. The mapping is not held: a copy of it
    /// races frees of the clusters as a read that drops its barrier would,
    /// so it serves only copies whose source cannot change (nodes below
    /// the active one) or whose changes are tracked and copied again.
    pub fn host_range(&self, offset: u64, len: u64) -> Result<Option<HostRange>> {
        self.check_bounds(offset, len)?;
        let _inflight = sync::read(&self.inflight);
        let mut start: Option<u64> = None;
        let mut run = 0;
        while run < len {
            let guest = offset + run;
            let entry = self.l2_entry(guest)?;
            let (piece, piece_len) = entry.run_at(&self.geometry, guest, len - run);
            match (piece, start) {
                (Piece::Data(host), None) => start = Some(host.0),
                (Piece::Data(host), Some(first)) if host.0 == first + run => {}
                _ => break,
            }
            run += piece_len;
        }
        let Some(host) = start else {
            return Ok(None);
        };
        self.check_host_run(host, run)?;
        let storage = Arc::clone(self.data_file.as_ref().unwrap_or(&self.storage));
        Ok(Some(HostRange {
            storage,
            offset: host,
            len: run,
        }))
    }

    /// Copies the part of a compressed cluster at guest `offset` into `out`.
    pub(super) fn read_compressed(&self, word: u64, guest: u64, out: &mut [u8]) -> Result<()> {
        let cluster = self.decompressed_cluster(word)?;
        let start = self.geometry.offset_in_cluster(guest) as usize;
        out.copy_from_slice(&cluster[start..start + out.len()]);
        Ok(())
    }

    fn decompressed_cluster(&self, word: u64) -> Result<Arc<Vec<u8>>> {
        self.decompressed.get_or_load(word, || {
            let cluster_size = self.geometry.cluster_size();
            let descriptor = decode_descriptor(word, self.geometry.cluster_bits);
            let host_end = self.host_end.load(Ordering::Acquire);
            if descriptor.host_offset >= host_end
                || descriptor.compressed_len > max_compressed_len(cluster_size)
            {
                return Err(FormatError::malformed_at(
                    "compressed cluster",
                    descriptor.host_offset,
                    format!(
                        "({} bytes) lies outside the image file",
                        descriptor.compressed_len
                    ),
                ));
            }
            let mut input = vec![0u8; descriptor.compressed_len as usize];
            self.storage
                .read_at(&mut input, descriptor.host_offset)
                .io_at("read a compressed cluster", descriptor.host_offset)?;
            let mut cluster = vec![0u8; cluster_size as usize];
            decompress(self.compression, &input, &mut cluster)?;
            Ok(cluster)
        })
    }

    /// How this image holds guest `offset..offset + len`, from `offset` to
    /// the first change of allocation.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check_bounds(offset, len)?;
        let mut done = 0;
        let mut kind = None;
        while done < len {
            let guest = offset + done;
            let entry = self.l2_entry(guest)?;
            let (piece, run) = entry.run_at(&self.geometry, guest, len - done);
            let allocation = match piece {
                Piece::Data(_) | Piece::Compressed(_) => Allocation::Data,
                Piece::Zero => Allocation::Zero,
                Piece::Unallocated => Allocation::Unallocated,
            };
            match kind {
                None => kind = Some(allocation),
                Some(k) if k != allocation => break,
                Some(_) => {}
            }
            done += run;
        }
        Ok(Extent {
            len: done,
            allocation: kind.unwrap_or(Allocation::Unallocated),
        })
    }

    /// Fills `out` with what the guest sees at `guest` inside one cluster
    /// described by `entry`, taking unallocated parts from `backing`.
    pub(super) fn read_view(
        &self,
        entry: &L2Entry,
        guest: u64,
        out: &mut [u8],
        backing: &dyn BackingReader,
    ) -> Result<()> {
        let mut pos = 0usize;
        while pos < out.len() {
            let at = guest + pos as u64;
            let (piece, len) = entry.run_at(&self.geometry, at, (out.len() - pos) as u64);
            let slice = &mut out[pos..pos + len as usize];
            match piece {
                Piece::Data(host) => self
                    .data()
                    .read_at(slice, host.0)
                    .io_at("read guest data", host.0)?,
                Piece::Zero => slice.fill(0),
                Piece::Unallocated => backing.read_backing(at, slice)?,
                Piece::Compressed(word) => self.read_compressed(word, at, slice)?,
            }
            pos += len as usize;
        }
        Ok(())
    }
}

/// Appends `range`, merging it with the last one when they touch.
fn push_range(ranges: &mut Vec<Range<u64>>, range: Range<u64>) {
    match ranges.last_mut() {
        Some(last) if last.end == range.start => last.end = range.end,
        _ => ranges.push(range),
    }
}
