//! Copies between two storages: in the kernel when both are host files
//! (`copy_file_range`: the bytes never pass through user space, and on
//! XFS or btrfs the destination shares the source's extents instead of
//! holding a copy), through a bounded buffer otherwise.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::Storage;

/// Bytes a buffered copy moves at a time.
const BUFFER: u64 = 1 << 20;

/// Copies `len` bytes of `source` at `source_offset` to `dest` at
/// `offset`, through a buffer of at most [`BUFFER`] bytes. Bytes past the
/// end of `source` arrive as zeros, as [`Storage::read_at`] reads them.
pub fn copy_through_buffer<D: Storage + ?Sized>(
    source: &dyn Storage,
    source_offset: u64,
    len: u64,
    dest: &D,
    offset: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = BUFFER.min(len - done) as usize;
        source.read_at(&mut buf[..n], source_offset + done)?;
        dest.write_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Copies up to `len` bytes from `source` at `source_offset` to `dest` at
/// `offset` with `copy_file_range`; returns the bytes copied. Fewer than
/// `len` means the kernel cannot copy the rest between these two files
/// (another filesystem that refuses, an old kernel) or `source` ended: the
/// caller copies the rest another way. Any other error is the copy's.
pub fn copy_in_kernel(
    source: &File,
    source_offset: u64,
    len: u64,
    dest: &File,
    offset: u64,
) -> io::Result<u64> {
    let (Ok(mut from), Ok(mut to)) = (
        libc::loff_t::try_from(source_offset),
        libc::loff_t::try_from(offset),
    ) else {
        return Ok(0);
    };
    let mut done = 0;
    while done < len {
        // At most 1 GiB a call: the kernel moves less anyway, and the length
        // must fit in a size_t on every target.
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are open files we own for the duration
        // of the call; the kernel reads and updates only the two offsets,
        // which are live locals.
        let copied = unsafe {
            libc::copy_file_range(
                source.as_raw_fd(),
                &mut from,
                dest.as_raw_fd(),
                &mut to,
                want,
                0,
            )
        };
        match copied {
            0 => break,
            n if n > 0 => done += n as u64,
            _ => {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Not between these files: the caller's fallback.
                    Some(
                        libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF,
                    ) => break,
                    _ => return Err(err),
                }
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{FileStorage, MemStorage};

    fn file_with(dir: &std::path::Path, name: &str, bytes: &[u8]) -> FileStorage {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        FileStorage::open(&path, true).unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_copy_between_files_lands_at_the_offsets_asked() {
        let dir = tempfile::tempdir().unwrap();
        let source = file_with(dir.path(), "source", &pattern(3 << 20));
        let dest = file_with(dir.path(), "dest", &[0xee; 4096]);
        dest.copy_from(&source, 12345, (2 << 20) + 7, 100).unwrap();
        let mut out = vec![0u8; (2 << 20) + 7];
        dest.read_at(&mut out, 100).unwrap();
        assert_eq!(out, pattern(3 << 20)[12345..12345 + out.len()]);
        let mut head = [0u8; 100];
        dest.read_at(&mut head, 0).unwrap();
        assert_eq!(head, [0xee; 100], "bytes before the copy changed");
    }

    #[test]
    fn bytes_past_the_end_of_the_source_arrive_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let source = file_with(dir.path(), "source", &pattern(1000));
        let dest = file_with(dir.path(), "dest", &[0xee; 3000]);
        dest.copy_from(&source, 500, 2000, 0).unwrap();
        let mut out = vec![0xffu8; 2000];
        dest.read_at(&mut out, 0).unwrap();
        assert_eq!(out[..500], pattern(1000)[500..]);
        assert!(out[500..].iter().all(|&b| b == 0), "tail not zeros");
    }

    #[test]
    fn a_copy_from_storage_that_is_not_a_file_goes_through_a_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let source = MemStorage::from_bytes(pattern(BUFFER as usize * 2 + 3));
        let dest = file_with(dir.path(), "dest", &[]);
        dest.copy_from(&source, 1, BUFFER * 2 + 2, 0).unwrap();
        let mut out = vec![0u8; BUFFER as usize * 2 + 2];
        dest.read_at(&mut out, 0).unwrap();
        assert_eq!(out, pattern(BUFFER as usize * 2 + 3)[1..]);
    }
}
