//! Shared pieces of the chainfs fuzz targets: a read-only in-memory
//! [`Storage`] holding the fuzzer's bytes as an image file.

#![warn(missing_docs)]

use std::io;

use chainfs::storage::Storage;

/// An image file held in memory. Reads past the end give zeros, as the host
/// file storage does; writes are refused, since the targets open read-only.
#[derive(Debug)]
pub struct BytesStorage {
    bytes: Vec<u8>,
}

impl BytesStorage {
    /// A file holding `bytes`.
    pub fn new(bytes: &[u8]) -> BytesStorage {
        BytesStorage {
            bytes: bytes.to_vec(),
        }
    }
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc_erofs())
}

/// EROFS on Linux; the fuzz crate avoids a libc dependency for one number.
const fn libc_erofs() -> i32 {
    30
}

impl Storage for BytesStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return Ok(());
        };
        if let Some(tail) = self.bytes.get(start..) {
            let n = tail.len().min(buf.len());
            buf[..n].copy_from_slice(&tail[..n]);
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.bytes.len() as u64).then_some(offset))
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        Ok(offset.max(self.bytes.len() as u64))
    }
}
