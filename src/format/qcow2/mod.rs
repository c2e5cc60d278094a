//! qcow2 images (engine under construction).

pub mod compress;
pub mod create;
pub mod features;
pub mod header;
pub mod snapshots;
pub mod types;

use std::ops::Range;
use std::sync::Arc;

use super::{BackingReader, BackingRef, Extent, FileOpener, FormatError, OpenOptions, Result};
use crate::storage::Storage;

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    storage: Arc<dyn Storage>,
}

impl Qcow2 {
    /// Opens a qcow2 image.
    pub fn open(storage: Arc<dyn Storage>, _o: &OpenOptions, _f: FileOpener<'_>) -> Result<Qcow2> {
        header::Header::read(storage.as_ref())?;
        Ok(Qcow2 { storage })
    }
    /// Virtual size.
    pub fn virtual_size(&self) -> u64 { 0 }
    /// Cluster size.
    pub fn cluster_size(&self) -> u64 { 0 }
    /// Backing.
    pub fn backing(&self) -> Option<BackingRef> { None }
    /// Allocated bytes.
    pub fn allocated_bytes(&self) -> Result<u64> { Ok(self.storage.allocated_bytes()?) }
    /// Block status.
    pub fn block_status(&self, _o: u64, _l: u64) -> Result<Extent> { Err(FormatError::ReadOnly) }
    /// Read.
    pub fn read(&self, _o: u64, _b: &mut [u8]) -> Result<Vec<Range<u64>>> { Err(FormatError::ReadOnly) }
    /// Write.
    pub fn write(&self, _o: u64, _d: &[u8], _b: &dyn BackingReader) -> Result<()> { Err(FormatError::ReadOnly) }
    /// Zero.
    pub fn zero_range(&self, _o: u64, _l: u64, _b: &dyn BackingReader) -> Result<()> { Err(FormatError::ReadOnly) }
    /// Flush.
    pub fn flush(&self) -> Result<()> { Ok(()) }
    /// Close.
    pub fn close(&self) -> Result<()> { Ok(()) }
    /// Set backing.
    pub fn set_backing(&self, _b: Option<&BackingRef>) -> Result<()> { Err(FormatError::ReadOnly) }
}
