//! Storage on a host file, with positional I/O so that threads never share a
//! file cursor.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::copy::{copy_in_kernel, copy_through_buffer};
use super::Storage;

/// A host file opened for chainfs.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
}

impl FileStorage {
    /// Opens `path`, for writing when `writable`. Only a regular file or a
    /// block device can hold an image: anything else is refused, and the
    /// open never blocks on it (a FIFO's open waits for a writer, so a
    /// backing file naming one would hang the caller for ever).
    pub fn open(path: &Path, writable: bool) -> io::Result<FileStorage> {
        // Non-blocking for the open only; the type is checked on the open
        // descriptor, so a file swapped in after a stat cannot slip past.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let file_type = file.metadata()?.file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                // The callers name the file (and the image naming it).
                format!(
                    "{}, not a regular file or a block device",
                    describe_type(&file_type)
                ),
            ));
        }
        clear_nonblocking(&file)?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable,
        })
    }

    /// Creates `path`, which must not exist yet, for reading and writing.
    pub fn create_new(path: &Path) -> io::Result<FileStorage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            writable: true,
        })
    }

    /// The path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for locking.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn lseek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek on a descriptor we own; it touches no memory of ours.
        let result = unsafe { libc::lseek(self.file.as_raw_fd(), offset, whence) };
        if result >= 0 {
            return Ok(Some(result as u64));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(start), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor we own; it touches no memory of ours.
        let result = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                length,
            )
        };
        if result == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // The host filesystem cannot punch holes: write the zeros instead.
            Some(libc::EOPNOTSUPP) => write_zeros(self, offset, len),
            _ => Err(err),
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.lseek(offset, libc::SEEK_DATA)
    }

    fn seek_hole(&self, offset: u64) -> io::Result<u64> {
        match self.lseek(offset, libc::SEEK_HOLE)? {
            Some(hole) => Ok(hole),
            None => self.len(),
        }
    }

    fn start_writeback(&self) -> io::Result<()> {
        // SAFETY: sync_file_range on a descriptor we own; it touches no
        // memory of ours. Length 0 means through the end of the file.
        let result = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if result == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Not on this kind of file: the later sync does it all.
            Some(libc::EINVAL | libc::ESPIPE | libc::EOPNOTSUPP) => Ok(()),
            _ => Err(err),
        }
    }

    fn host_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn copy_from(
        &self,
        source: &dyn Storage,
        source_offset: u64,
        len: u64,
        offset: u64,
    ) -> io::Result<()> {
        let in_kernel = match source.host_file() {
            Some(file) => copy_in_kernel(file, source_offset, len, &self.file, offset)?,
            None => 0,
        };
        if in_kernel == len {
            return Ok(());
        }
        copy_through_buffer(
            source,
            source_offset + in_kernel,
            len - in_kernel,
            self,
            offset + in_kernel,
        )
    }
}

/// What kind of file `file_type` is, for the refusal of a non-image.
fn describe_type(file_type: &std::fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    }
}

/// Turns `O_NONBLOCK` off again: an image's I/O must block as usual.
fn clear_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL and F_SETFL touch no
    // memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `len` zero bytes at `offset` in bounded chunks.
pub fn write_zeros(storage: &dyn Storage, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        storage.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}
