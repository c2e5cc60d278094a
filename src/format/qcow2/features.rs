//! qcow2 feature bits (header fields `incompatible_features`,
//! `compatible_features`, `autoclear_features`, version 3 only), and the
//! wording of the refusal when an image sets incompatible bits chainfs does
//! not know.
//!
//! `docs/interop/qcow2.txt`: "An implementation must fail to open an image if
//! an unknown bit is set" (incompatible); unknown compatible bits may be
//! ignored; unknown autoclear bits must be cleared by a writer.

use std::fmt::Write as _;

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

/// The feature bitmap a feature name table entry refers to (its type byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureKind {
    /// Type 0: `incompatible_features`.
    Incompatible,
    /// Type 1: `compatible_features`.
    Compatible,
    /// Type 2: `autoclear_features`.
    Autoclear,
}

impl FeatureKind {
    /// Decodes the type byte of a feature name table entry; other values are
    /// reserved.
    pub fn from_byte(byte: u8) -> Option<FeatureKind> {
        match byte {
            0 => Some(FeatureKind::Incompatible),
            1 => Some(FeatureKind::Compatible),
            2 => Some(FeatureKind::Autoclear),
            _ => None,
        }
    }
}

/// Names every set bit of `unknown`, lowest first, separated by commas:
/// `bit 5 ("foo")` when `name_of` knows a name for the bit, else `bit 5`.
///
/// Names come from the image (its feature name table), so they are printed
/// escaped and quoted: a hostile name cannot forge terminal output.
pub fn describe_bits<'a>(unknown: u64, name_of: impl Fn(u32) -> Option<&'a str>) -> String {
    let mut text = String::new();
    for bit in (0..64).filter(|bit| unknown & (1u64 << bit) != 0) {
        if !text.is_empty() {
            text.push_str(", ");
        }
        // Writing into a String cannot fail.
        let _ = match name_of(bit).filter(|name| !name.is_empty()) {
            Some(name) => write!(text, "bit {bit} ({name:?})"),
            None => write!(text, "bit {bit}"),
        };
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_bits_uses_names_where_known() {
        let names = |bit| (bit == 5).then_some("foo");
        assert_eq!(
            describe_bits(1 << 5 | 1 << 63, names),
            "bit 5 (\"foo\"), bit 63"
        );
    }

    #[test]
    fn describe_bits_escapes_hostile_names() {
        let names = |_| Some("a\"\n");
        assert_eq!(describe_bits(1 << 7, names), "bit 7 (\"a\\\"\\n\")");
    }

    #[test]
    fn describe_bits_of_nothing_is_empty() {
        assert_eq!(describe_bits(0, |_| None), "");
    }

    #[test]
    fn feature_kind_decodes_the_three_types_only() {
        assert_eq!(FeatureKind::from_byte(0), Some(FeatureKind::Incompatible));
        assert_eq!(FeatureKind::from_byte(2), Some(FeatureKind::Autoclear));
        assert_eq!(FeatureKind::from_byte(3), None);
    }
}
