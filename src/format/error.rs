//! Errors of the format layer.

use std::fmt;
use std::io;

/// Result of a format operation.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// Why an image could not be opened, read or written.
///
/// Variants name the structure and the offset at fault; the chain layer adds
/// the path of the image.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The image file (or its data file) failed while chainfs did
    /// `operation` at `offset` in it; the OS error is kept whole, so its
    /// errno (ENOSPC, EIO, ...) reaches the writer.
    #[error("cannot {operation}{}: {source}", At(*offset))]
    Io {
        /// What was being done: `read guest data`, `write an L2 table`,
        /// `sync the image`, ...
        operation: &'static str,
        /// Where in the file, when the operation has one place.
        offset: Option<u64>,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The external data file the image names could not be opened; the
    /// OS error is kept whole, so its errno reaches the writer.
    #[error("cannot open external data file {name:?}: {source}")]
    DataFile {
        /// The data file name as the image stores it.
        name: String,
        /// What the OS (or the opener) said.
        #[source]
        source: io::Error,
    },
    /// The image breaks its format's rules: `structure` (at `offset` in the
    /// image file, when it has a place of its own) is wrong as `problem`
    /// says.
    #[error("malformed image: {structure}{}: {problem}", At(*offset))]
    Malformed {
        /// What is at fault: `header`, `L2 table`, `refcount block`,
        /// `compressed cluster`, `snapshot table`, `bitmaps`, ...
        structure: &'static str,
        /// Where the structure lies in the image file, if it has a place
        /// of its own (a header field is named in `problem` instead).
        offset: Option<u64>,
        /// What is wrong, with the values at fault.
        problem: String,
    },
    /// The image uses something chainfs does not implement.
    #[error("unsupported image: {what}")]
    Unsupported {
        /// The feature, by name.
        what: String,
    },
    /// The image is encrypted; chainfs has no keys.
    #[error("encrypted images are not supported")]
    Encrypted,
    /// The header has incompatible feature bits chainfs does not know.
    #[error("unknown incompatible feature bits: {features}")]
    UnknownIncompatibleFeatures {
        /// Each unknown bit, with its name from the image's feature table
        /// where the image has one.
        features: String,
    },
    /// The image carries the corrupt bit; it may be read but not written.
    #[error("the image is marked corrupt; it can be read but not written")]
    Corrupt,
    /// A write to an image opened read-only.
    #[error("the image is open read-only")]
    ReadOnly,
    /// A write or read outside the image.
    #[error("offset {offset} length {len} is outside the image of {size} bytes")]
    OutOfBounds {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the image.
        size: u64,
    },
}

impl FormatError {
    /// A [`FormatError::Malformed`] of a structure without a place of its
    /// own (the header's fields, a table's entry by index).
    pub fn malformed(structure: &'static str, problem: impl Into<String>) -> FormatError {
        FormatError::Malformed {
            structure,
            offset: None,
            problem: problem.into(),
        }
    }

    /// A [`FormatError::Malformed`] of the structure at `offset` in the
    /// image file.
    pub fn malformed_at(
        structure: &'static str,
        offset: u64,
        problem: impl Into<String>,
    ) -> FormatError {
        FormatError::Malformed {
            structure,
            offset: Some(offset),
            problem: problem.into(),
        }
    }

    /// The errno that a filesystem request failing with this error returns.
    pub fn errno(&self) -> i32 {
        match self {
            FormatError::Io { source: err, .. } | FormatError::DataFile { source: err, .. } => {
                err.raw_os_error().unwrap_or(libc::EIO)
            }
            FormatError::Malformed { .. } | FormatError::Corrupt => libc::EIO,
            FormatError::Unsupported { .. }
            | FormatError::Encrypted
            | FormatError::UnknownIncompatibleFeatures { .. } => libc::EOPNOTSUPP,
            FormatError::ReadOnly => libc::EROFS,
            FormatError::OutOfBounds { .. } => libc::ENOSPC,
        }
    }
}

/// Names what a storage call was doing when it failed, making a
/// [`FormatError::Io`] of its `io::Error`.
pub(crate) trait IoContext<T> {
    /// The call was `operation` at `offset` in the file.
    fn io_at(self, operation: &'static str, offset: u64) -> Result<T>;
    /// The call was `operation` on the file as a whole (sync, length).
    fn io(self, operation: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn io_at(self, operation: &'static str, offset: u64) -> Result<T> {
        self.map_err(|source| FormatError::Io {
            operation,
            offset: Some(offset),
            source,
        })
    }

    fn io(self, operation: &'static str) -> Result<T> {
        self.map_err(|source| FormatError::Io {
            operation,
            offset: None,
            source,
        })
    }
}

/// Renders an optional file offset as ` at 0x…`, or nothing.
struct At(Option<u64>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(offset) => write!(f, " at {offset:#x}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_file_that_cannot_be_opened_keeps_its_errno() {
        for errno in [libc::ENOENT, libc::EACCES] {
            let error = FormatError::DataFile {
                name: "data.raw".into(),
                source: io::Error::from_raw_os_error(errno),
            };
            assert_eq!(error.errno(), errno);
            assert!(error.to_string().contains("\"data.raw\""), "{error}");
        }
    }

    #[test]
    fn an_io_error_names_the_operation_and_offset_and_keeps_its_errno() {
        for errno in [libc::ENOSPC, libc::EIO] {
            let failed: io::Result<()> = Err(io::Error::from_raw_os_error(errno));
            let error = failed.io_at("write guest data", 0x5_0000).unwrap_err();
            assert_eq!(error.errno(), errno);
            let text = error.to_string();
            assert!(
                text.starts_with("cannot write guest data at 0x50000: "),
                "{text}"
            );
        }
        let failed: io::Result<()> = Err(io::Error::from_raw_os_error(libc::EIO));
        let error = failed.io("sync the image").unwrap_err();
        assert!(
            error.to_string().starts_with("cannot sync the image: "),
            "{error}"
        );
    }

    #[test]
    fn a_malformed_structure_is_named_with_its_offset() {
        let error = FormatError::malformed_at("L2 table", 0x30000, "lies past the end of the file");
        assert_eq!(
            error.to_string(),
            "malformed image: L2 table at 0x30000: lies past the end of the file"
        );
        assert_eq!(error.errno(), libc::EIO);
        let error = FormatError::malformed("header", "l1_size 7 is too small");
        assert_eq!(
            error.to_string(),
            "malformed image: header: l1_size 7 is too small"
        );
    }
}
