//! Byte-addressed storage under an image: a host file, or a test double.
//!
//! Every format reads and writes through [`Storage`], so the crash tests can
//! put [`mem::MemStorage`] under a real qcow2 image and drop whatever was not
//! yet synced.

pub mod copy;
pub mod file;
pub mod lock;
pub mod mem;
// In the lowest layer so that the unit tests of every layer may use it.
#[cfg(test)]
pub(crate) mod test_support;

use std::fmt;
use std::io;

pub use file::FileStorage;
pub use lock::{LockError, LockMode};
pub use mem::{CrashMode, MemStorage};

/// Positional I/O on one file. All methods take `&self`: implementations are
/// shared by many threads and must not serialise independent requests.
// A file's length is an I/O query that can fail, not a container size.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Fills `buf` from `offset`. Bytes at or past the end of the file read
    /// as zeros, as QEMU's file driver returns them.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Whether the file was opened for writing.
    fn is_writable(&self) -> bool;

    /// Current length of the file in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;

    /// Deallocates `len` bytes at `offset`; they then read as zeros. Storage
    /// that cannot deallocate writes zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Bytes of host storage the file occupies (`st_blocks * 512`).
    fn allocated_bytes(&self) -> io::Result<u64>;

    /// The first offset at or after `offset` that holds data, or `None` past
    /// the last data (`lseek(SEEK_DATA)`); storage without holes reports
    /// everything before the end as data.
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>>;

    /// The first offset at or after `offset` that is a hole, or the end of
    /// the file (`lseek(SEEK_HOLE)`).
    fn seek_hole(&self, offset: u64) -> io::Result<u64>;

    /// Starts writing every dirty byte to the device without waiting for
    /// it, so that a later [`Storage::sync`] finds less to wait for; no
    /// promise of durability. Storage without a device does nothing.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }

    /// The host file behind this storage, if it is one, so that a copy
    /// between two of them can happen in the kernel.
    fn host_file(&self) -> Option<&std::fs::File> {
        None
    }

    /// Writes the `len` bytes that `source` holds at `source_offset` to
    /// `offset`, as `read_at` then `write_at` would. Between two host files
    /// the kernel moves them ([`copy::copy_in_kernel`]).
    fn copy_from(
        &self,
        source: &dyn Storage,
        source_offset: u64,
        len: u64,
        offset: u64,
    ) -> io::Result<()> {
        copy::copy_through_buffer(source, source_offset, len, self, offset)
    }
}
