//! qcow2 feature bits (header fields `incompatible_features`,
//! `compatible_features`, `autoclear_features`, version 3 only).

use bitflags::bitflags;

bitflags! {
    /// Features an implementation must understand to open the image at all.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Incompatible: u64 {
        /// Bit 0: refcounts may be stale (lazy refcounts); repair before
        /// writing.
        const DIRTY = 1 << 0;
        /// Bit 1: the image is corrupt; it may be read but not written.
        const CORRUPT = 1 << 1;
        /// Bit 2: guest data lives in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// Bit 3: the `compression_type` header field is valid.
        const COMPRESSION_TYPE = 1 << 3;
        /// Bit 4: L2 entries are 128 bits wide with subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }
}

impl Incompatible {
    /// Every incompatible bit chainfs implements.
    pub const SUPPORTED: Incompatible = Incompatible::all();
}

bitflags! {
    /// Features that may be ignored safely.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Compatible: u64 {
        /// Bit 0: refcount updates may be delayed (the dirty bit then says so).
        const LAZY_REFCOUNTS = 1 << 0;
    }
}

bitflags! {
    /// Features whose bit must be cleared by a writer that does not maintain
    /// them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Autoclear: u64 {
        /// Bit 0: the bitmaps extension is consistent with the data.
        const BITMAPS = 1 << 0;
        /// Bit 1: the external data file is a valid raw image of the guest.
        const DATA_FILE_RAW = 1 << 1;
    }
}

impl Autoclear {
    /// Autoclear bits chainfs keeps true when it writes: the raw data file
    /// stays raw because chainfs writes guest data at guest offsets there.
    pub const MAINTAINED: Autoclear = Autoclear::DATA_FILE_RAW;
}
