//! Raw images: guest offset = file offset; the file's holes are the
//! unallocated ranges, but a raw image has no backing, so they read as zeros.
//!
//! The virtual size is the file size rounded up to whole 512-byte sectors,
//! as QEMU's block layer counts it: the bytes of the last sector past the
//! end of the file read as zeros, and a write there extends the file as
//! QEMU's file driver does.

use std::sync::Arc;

use super::{Allocation, Extent, FormatError, HostRange, Result};
use crate::format::error::IoContext;
use crate::storage::{file::write_zeros, Storage};

/// The sector QEMU rounds a raw file's size up to.
const SECTOR: u64 = 512;

/// An open raw image. Its virtual size is the file size at open time,
/// rounded up to a whole sector.
#[derive(Debug)]
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl Raw {
    /// Opens a raw image on `storage`.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Raw> {
        let len = storage.len().io("measure the image file")?;
        // A file length fits in an off_t: rounding it up cannot overflow.
        let size = len.div_ceil(SECTOR) * SECTOR;
        Ok(Raw { storage, size })
    }

    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// Bytes of host storage the file occupies.
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.storage.allocated_bytes().io("measure the image file")
    }

    fn check_bounds(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(FormatError::OutOfBounds {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Holes in the file are reported as zero ranges; everything else as data.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check_bounds(offset, len)?;
        let end = offset + len;
        let data = self
            .storage
            .seek_data(offset)
            .io_at("look for data", offset)?
            .unwrap_or(end);
        if data > offset {
            return Ok(Extent {
                len: data.min(end) - offset,
                allocation: Allocation::Zero,
            });
        }
        let hole = self
            .storage
            .seek_hole(offset)
            .io_at("look for a hole", offset)?;
        Ok(Extent {
            len: hole.clamp(offset + 1, end) - offset,
            allocation: Allocation::Data,
        })
    }

    /// Reads guest bytes; a raw image holds every byte of its range.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_bounds(offset, buf.len() as u64)?;
        self.storage
            .read_at(buf, offset)
            .io_at("read guest data", offset)
    }

    /// Writes guest bytes in place.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_bounds(offset, data.len() as u64)?;
        self.storage
            .write_at(data, offset)
            .io_at("write guest data", offset)
    }

    /// Guest bytes are host bytes: the range is the file's own, cut at the
    /// end of the image.
    pub fn host_range(&self, offset: u64, len: u64) -> Result<HostRange> {
        self.check_bounds(offset, 1)?;
        Ok(HostRange {
            storage: Arc::clone(&self.storage),
            offset,
            len: len.min(self.size - offset),
        })
    }

    /// Writes the bytes of `source` in place at guest `offset`.
    pub fn overwrite_from(&self, offset: u64, source: &HostRange) -> Result<()> {
        self.check_bounds(offset, source.len)?;
        let from = source.storage.as_ref();
        self.storage
            .copy_from(from, source.offset, source.len, offset)
            .io_at("copy guest data", offset)
    }

    /// Punches a hole, which reads as zeros. Past the end of the file
    /// everything already reads as zeros: nothing is written there.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.check_bounds(offset, len)?;
        let len = len.min(
            self.storage
                .len()
                .io("measure the image file")?
                .saturating_sub(offset),
        );
        if len == 0 {
            return Ok(());
        }
        match self.storage.punch_hole(offset, len) {
            Ok(()) => Ok(()),
            Err(_) => write_zeros(self.storage.as_ref(), offset, len).io_at("write zeros", offset),
        }
    }

    /// Starts the writeback of what was written (see
    /// [`Image::start_writeback`](super::Image::start_writeback)).
    pub fn start_writeback(&self) -> Result<()> {
        self.storage.start_writeback().io("start the writeback")
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<()> {
        self.storage.sync().io("sync the image")
    }
}
