//! Disk image formats, one image at a time.
//!
//! An [`Image`] answers *shallowly*: what this image itself holds for a guest
//! range, and which parts fall through to its backing file. It never opens or
//! reads its backing file; the chain layer walks the chain and hands writes a
//! [`BackingReader`] for copy-on-write.

pub mod cache;
pub mod error;
pub(crate) mod qcow2;
pub mod raw;

use std::ffi::OsString;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

pub use cache::MetadataCache;
pub use error::{FormatError, Result};

// The qcow2 engine's internals are private to this layer; these are the
// parts that code outside it uses, on purpose: the chain creates images,
// and the tests, the benchmark and the fuzz targets parse headers and
// repair dirty images without opening a chain.
pub use qcow2::bitmaps::{PersistentBitmap, StoreRefusal};
pub use qcow2::create::{create as create_qcow2, CreateOptions as Qcow2CreateOptions};
pub use qcow2::features::Incompatible as Qcow2Incompatible;
pub use qcow2::header::Header as Qcow2Header;
pub use qcow2::repair::{repair as repair_qcow2, RepairReport};
pub use qcow2::types::Geometry as Qcow2Geometry;
pub use qcow2::Qcow2;

use crate::format::error::IoContext;
use crate::storage::Storage;

/// An on-disk image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A flat file: guest offset = file offset.
    Raw,
    /// QEMU copy-on-write v2 or v3.
    Qcow2,
}

impl Format {
    /// The name QEMU uses for the format (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a QEMU format name, as found in a backing-format extension.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Guesses the format of `storage` as QEMU does without a format name:
/// qcow2 by its magic, anything else raw.
pub fn probe(storage: &dyn Storage) -> Result<Format> {
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .io_at("read the format magic", 0)?;
    Ok(if magic == qcow2::MAGIC.to_be_bytes() {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// How an image holds a guest range, looking at this image only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// The image holds data for the range.
    Data,
    /// The image says the range reads as zeros.
    Zero,
    /// The image holds nothing; reads fall through to the backing file.
    Unallocated,
}

/// A run of guest bytes, starting where the query started, that an image
/// holds in one way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes; never zero for a query inside the image.
    pub len: u64,
    /// How the image holds the run.
    pub allocation: Allocation,
}

/// Guest bytes that an image keeps as they are, in one run of one host
/// file: what a copy can move without reading them
/// ([`Storage::copy_from`]).
#[derive(Clone, Debug)]
pub struct HostRange {
    /// The file holding the bytes (the image's, or its data file).
    pub storage: Arc<dyn Storage>,
    /// Where the run starts in it.
    pub offset: u64,
    /// Its length; never zero.
    pub len: u64,
}

/// Where an image's backing file is, as its header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingRef {
    /// The backing file name as stored in the image; read from an image, a
    /// name that is not UTF-8 has its invalid bytes replaced, for showing
    /// (the exact bytes, to find the file by: [`Image::backing_name`]).
    pub file: String,
    /// The backing format from the header extension, when there is one.
    pub format: Option<Format>,
}

/// What the chain lends a write: the content below this image, for the parts
/// of a cluster that a write does not cover.
pub trait BackingReader {
    /// Fills `buf` with what the backing chain shows at guest `offset`
    /// (zeros past its end, or when there is no backing file).
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Whether there is a backing file at all: without one, unallocated
    /// ranges already read as zeros.
    fn has_backing(&self) -> bool;
}

/// A backing reader for an image without a backing file.
pub struct NoBacking;

impl BackingReader for NoBacking {
    fn read_backing(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn has_backing(&self) -> bool {
        false
    }
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open for writing (repairs a dirty image, clears unknown autoclear bits).
    pub writable: bool,
    /// The metadata cache this image draws from, with the other images of
    /// its mount.
    pub cache: Arc<MetadataCache>,
}

/// The metadata cache budget of a mount when none is given: small enough
/// that a 1 TiB, 100-deep chain read at random stays well under 64 MiB of
/// resident memory (40 MiB measured: the allocator keeps about as much
/// again as the cache holds while entries churn), large enough for the L2
/// tables that map 128 GiB in 64 KiB clusters.
pub const DEFAULT_CACHE_BYTES: u64 = 16 << 20;

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            cache: MetadataCache::new(DEFAULT_CACHE_BYTES),
        }
    }
}

/// Opens the files an image names besides itself (a qcow2 external data
/// file), resolved by the caller relative to the image's directory.
pub type FileOpener<'a> = &'a dyn Fn(&str, bool) -> std::io::Result<Arc<dyn Storage>>;

/// One open image of any supported format.
#[derive(Debug)]
pub enum Image {
    /// A raw image.
    Raw(raw::Raw),
    /// A qcow2 image.
    Qcow2(Box<qcow2::Qcow2>),
}

impl Image {
    /// Opens `storage` as an image of `format`.
    pub fn open(
        storage: Arc<dyn Storage>,
        format: Format,
        options: &OpenOptions,
        opener: FileOpener<'_>,
    ) -> Result<Image> {
        Ok(match format {
            Format::Raw => Image::Raw(raw::Raw::open(storage)?),
            Format::Qcow2 => Image::Qcow2(Box::new(qcow2::Qcow2::open(storage, options, opener)?)),
        })
    }

    /// The format of this image.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }

    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        match self {
            Image::Raw(raw) => raw.virtual_size(),
            Image::Qcow2(qcow2) => qcow2.virtual_size(),
        }
    }

    /// The cluster size, for formats that have one.
    pub fn cluster_size(&self) -> Option<u64> {
        match self {
            Image::Raw(_) => None,
            Image::Qcow2(qcow2) => Some(qcow2.cluster_size()),
        }
    }

    /// The backing file the image names, if any.
    pub fn backing(&self) -> Option<BackingRef> {
        match self {
            Image::Raw(_) => None,
            Image::Qcow2(qcow2) => qcow2.backing(),
        }
    }

    /// The backing file name exactly as the image stores it, UTF-8 or not.
    pub fn backing_name(&self) -> Option<OsString> {
        match self {
            Image::Raw(_) => None,
            Image::Qcow2(qcow2) => qcow2.backing_name(),
        }
    }

    /// Bytes of host storage this image occupies (its own files only).
    pub fn allocated_bytes(&self) -> Result<u64> {
        match self {
            Image::Raw(raw) => raw.allocated_bytes(),
            Image::Qcow2(qcow2) => qcow2.allocated_bytes(),
        }
    }

    /// How this image holds the range `offset..offset + len`, from `offset`
    /// up to the first change of [`Allocation`]. `offset` must be inside the
    /// image.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        match self {
            Image::Raw(raw) => raw.block_status(offset, len),
            Image::Qcow2(qcow2) => qcow2.block_status(offset, len),
        }
    }

    /// Reads what this image holds at `offset` into `buf` and returns the
    /// guest ranges (absolute, ascending) that it does not hold; the content
    /// of `buf` there is unspecified and the caller fills it from below.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<Vec<Range<u64>>> {
        match self {
            Image::Raw(raw) => raw.read(offset, buf).map(|()| Vec::new()),
            Image::Qcow2(qcow2) => qcow2.read(offset, buf),
        }
    }

    /// Writes `data` at `offset`; partial clusters are completed from
    /// `backing`. The range must lie inside the image.
    pub fn write(&self, offset: u64, data: &[u8], backing: &dyn BackingReader) -> Result<()> {
        match self {
            Image::Raw(raw) => raw.write(offset, data),
            Image::Qcow2(qcow2) => qcow2.write(offset, data, backing),
        }
    }

    /// Writes the clusters from `offset` compressed (see
    /// [`Qcow2::write_compressed`]): `data` is whole clusters from a
    /// cluster boundary, the last of which may be the image's last, partial
    /// cluster; the run syncs the image once. Only qcow2 images hold
    /// compressed clusters.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Image::Raw(_) => Err(FormatError::Unsupported {
                what: "compressed writes to a raw image (compression needs qcow2)".into(),
            }),
            Image::Qcow2(qcow2) => qcow2.write_compressed(offset, data),
        }
    }

    /// Makes `offset..offset + len` read as zeros, freeing the space of whole
    /// clusters where the format allows it.
    pub fn zero_range(&self, offset: u64, len: u64, backing: &dyn BackingReader) -> Result<()> {
        match self {
            Image::Raw(raw) => raw.zero_range(offset, len),
            Image::Qcow2(qcow2) => qcow2.zero_range(offset, len, backing),
        }
    }

    /// Writes `data` (zeros when `None`) into the parts of `offset..offset +
    /// len` this image does not hold yet, atomically with respect to writes;
    /// returns the bytes written. A raw image holds everything.
    pub fn populate(
        &self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        backing: &dyn BackingReader,
    ) -> Result<u64> {
        match self {
            Image::Raw(_) => Ok(0),
            Image::Qcow2(qcow2) => qcow2.populate(offset, len, data, backing),
        }
    }

    /// Where this image keeps the guest bytes from `offset` (at most `len`)
    /// as they are: `None` when the first of them is not plain data (not
    /// held, zeros, compressed). The run may be shorter than `len`.
    pub fn host_range(&self, offset: u64, len: u64) -> Result<Option<HostRange>> {
        match self {
            Image::Raw(raw) => raw.host_range(offset, len).map(Some),
            Image::Qcow2(qcow2) => qcow2.host_range(offset, len),
        }
    }

    /// Puts the bytes of `source` at guest `offset` (`source.len` of them)
    /// without reading them, where the image can: a qcow2 image fills
    /// whole unallocated clusters from a cluster-aligned `offset`, as
    /// [`Image::populate`] does; a raw image, which holds every byte,
    /// takes them only when `overwrite` asks for what it holds to be
    /// replaced. Returns the bytes placed, from `offset`; the caller
    /// writes the rest another way.
    pub fn place_from(&self, offset: u64, source: &HostRange, overwrite: bool) -> Result<u64> {
        match self {
            Image::Raw(raw) if overwrite => raw.overwrite_from(offset, source).map(|()| source.len),
            Image::Raw(_) => Ok(0),
            Image::Qcow2(qcow2) => qcow2.populate_from(offset, source),
        }
    }

    /// Starts writing what this image holds dirty to the device, without
    /// waiting: a bulk copy that ends in a flush overlaps its writeback
    /// with its copying instead of waiting for all of it at the end.
    pub fn start_writeback(&self) -> Result<()> {
        match self {
            Image::Raw(raw) => raw.start_writeback(),
            Image::Qcow2(qcow2) => qcow2.start_writeback(),
        }
    }

    /// Makes every completed write durable, metadata included.
    pub fn flush(&self) -> Result<()> {
        match self {
            Image::Raw(raw) => raw.flush(),
            Image::Qcow2(qcow2) => qcow2.flush(),
        }
    }

    /// Flushes and leaves the image clean (no leaked reservations, no dirty
    /// bit). The image must not be used afterwards.
    pub fn close(&self) -> Result<()> {
        match self {
            Image::Raw(raw) => raw.flush(),
            Image::Qcow2(qcow2) => qcow2.close(),
        }
    }

    /// Switches the image between read-only and writable in place (see
    /// [`qcow2::Qcow2::set_writable`]); a raw image writes through its file
    /// as it is.
    pub fn set_writable(&self, writable: bool) -> Result<()> {
        match self {
            Image::Raw(_) => Ok(()),
            Image::Qcow2(qcow2) => qcow2.set_writable(writable),
        }
    }

    /// Rewrites the backing file name and format in the header.
    pub fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        match self {
            Image::Raw(_) => Err(FormatError::Unsupported {
                what: "a raw image has no backing file to rewrite".into(),
            }),
            Image::Qcow2(qcow2) => qcow2.set_backing(backing),
        }
    }
}
