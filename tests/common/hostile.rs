//! Builders of hostile qcow2 images for `hostile_images.rs` and
//! `hostile_tables.rs`: each takes an image made by `qemu-img create` (and
//! `qemu-io` where data is needed) and patches bytes of it with std::fs.
//!
//! Offsets below are those of `qemu-img create -f qcow2 img 1M` (64 KiB
//! clusters): header in cluster 0, refcount table at 0x10000, refcount
//! block at 0x20000, L1 table (one entry) at 0x30000.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chainfs::format::Qcow2Header as Header;
use chainfs::format::{Format, FormatError, Image, OpenOptions as ImageOptions};
use chainfs::storage::{FileStorage, Storage};

use super::tools::{path_str, qemu_img, qemu_io, require_tool};

/// A hostile image in its own temporary directory.
pub struct Fixture {
    _dir: tempfile::TempDir,
    /// The image file.
    pub path: PathBuf,
}

/// A fresh 1 MiB qcow2 image made with `qemu-img create` and `options`
/// (`-o` values), or `None` when qemu-img is missing.
pub fn qemu_image(options: &str) -> Option<Fixture> {
    if !require_tool("qemu-img") {
        return None;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hostile.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path_str(&path), "1M"]);
    qemu_img(&args);
    Some(Fixture { _dir: dir, path })
}

/// Runs `qemu-io -c COMMAND` on the fixture; false (after the gate's
/// verdict) when qemu-io is missing.
pub fn fill(fixture: &Fixture, command: &str) -> bool {
    if !require_tool("qemu-io") {
        return false;
    }
    qemu_io(&fixture.path, "qcow2", &[command]);
    true
}

/// Writes `bytes` at `offset` of the image.
pub fn patch(fixture: &Fixture, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new()
        .write(true)
        .open(&fixture.path)
        .expect("image opens for patching");
    file.write_all_at(bytes, offset).expect("patch written");
}

/// Writes a big-endian u32 at `offset`.
pub fn put32(fixture: &Fixture, offset: u64, value: u32) {
    patch(fixture, offset, &value.to_be_bytes());
}

/// Writes a big-endian u64 at `offset`.
pub fn put64(fixture: &Fixture, offset: u64, value: u64) {
    patch(fixture, offset, &value.to_be_bytes());
}

/// Reads a big-endian u64 at `offset`.
pub fn get64(fixture: &Fixture, offset: u64) -> u64 {
    let file = fs::File::open(&fixture.path).expect("image opens");
    let mut bytes = [0u8; 8];
    file.read_exact_at(&mut bytes, offset).expect("u64 read");
    u64::from_be_bytes(bytes)
}

/// Header field offsets (`docs/interop/qcow2.txt`).
pub mod field {
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
    /// The first header extension of a qemu-img image (its feature name
    /// table) starts right after the 112-byte header.
    pub const FIRST_EXTENSION: u64 = 112;
}

/// The default image with one u32 header field replaced.
pub fn with32(offset: u64, value: u32) -> Option<Fixture> {
    let fixture = qemu_image("")?;
    put32(&fixture, offset, value);
    Some(fixture)
}

/// The default image with one u64 header field replaced.
pub fn with64(offset: u64, value: u64) -> Option<Fixture> {
    let fixture = qemu_image("")?;
    put64(&fixture, offset, value);
    Some(fixture)
}

/// The default image cut to `len` bytes.
pub fn truncated(len: u64) -> Option<Fixture> {
    let fixture = qemu_image("")?;
    let file = OpenOptions::new().write(true).open(&fixture.path).unwrap();
    file.set_len(len).unwrap();
    Some(fixture)
}

/// A LUKS-encrypted image made by qemu-img itself.
pub fn encrypted() -> Option<Fixture> {
    if !require_tool("qemu-img") {
        return None;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("encrypted.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=x",
        "-o",
        // A short key-derivation time keeps the test fast.
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        path_str(&path),
        "1M",
    ]);
    Some(Fixture { _dir: dir, path })
}

/// The default image with incompatible feature `bit` set and, when `name`
/// is given, the feature name table entry of extended L2 (type 0, bit 4)
/// renamed to describe `bit` instead.
pub fn unknown_feature(bit: u8, name: Option<&str>) -> Option<Fixture> {
    let fixture = qemu_image("")?;
    put64(&fixture, field::INCOMPATIBLE_FEATURES, 1 << bit);
    if let Some(name) = name {
        let entry = find_feature_entry(&fixture, 0, 4).expect("qemu-img names bit 4");
        let mut bytes = [0u8; 48];
        bytes[1] = bit;
        bytes[2..2 + name.len()].copy_from_slice(name.as_bytes());
        patch(&fixture, entry, &bytes);
    }
    Some(fixture)
}

/// The offset of the feature name table entry for (`kind`, `bit`).
fn find_feature_entry(fixture: &Fixture, kind: u8, bit: u8) -> Option<u64> {
    let bytes = fs::read(&fixture.path).ok()?;
    let at = field::FIRST_EXTENSION as usize;
    let magic = u32::from_be_bytes(bytes[at..at + 4].try_into().ok()?);
    let len = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().ok()?) as usize;
    assert_eq!(
        magic, 0x6803_f857,
        "qemu-img writes the feature table first"
    );
    (0..len / 48)
        .map(|i| at + 8 + i * 48)
        .find(|&entry| bytes[entry] == kind && bytes[entry + 1] == bit)
        .map(|entry| entry as u64)
}

/// A version 3 image with extended L2 entries, relabelled version 2.
pub fn extended_l2_on_v2() -> Option<Fixture> {
    let fixture = qemu_image("extended_l2=on")?;
    put32(&fixture, field::VERSION, 2);
    Some(fixture)
}

/// The default image claiming a backing file name of 2000 bytes.
pub fn overlong_backing_name() -> Option<Fixture> {
    let fixture = qemu_image("")?;
    put64(&fixture, field::BACKING_FILE_OFFSET, 0x1000);
    patch(&fixture, 0x1000, &[b'b'; 2000]);
    put32(&fixture, field::BACKING_FILE_SIZE, 2000);
    Some(fixture)
}

/// Runs `Header::read` and `validate` on the image, as `Qcow2::open` will.
pub fn header_result(fixture: &Fixture) -> Result<Header, FormatError> {
    let storage = FileStorage::open(&fixture.path, false).map_err(io_error("open"))?;
    let header = Header::read(&storage)?;
    header.validate(storage.len().map_err(io_error("measure"))?)?;
    Ok(header)
}

/// A failed `operation` on the fixture's file, as the format layer says it.
fn io_error(operation: &'static str) -> impl Fn(io::Error) -> FormatError {
    move |source| FormatError::Io {
        operation,
        offset: None,
        source,
    }
}

/// Opens the image through the format layer, read-only unless `writable`.
pub fn open_image(fixture: &Fixture, writable: bool) -> Result<Image, FormatError> {
    let file = FileStorage::open(&fixture.path, writable).map_err(io_error("open"))?;
    let storage: Arc<dyn Storage> = Arc::new(file);
    let options = ImageOptions {
        writable,
        ..ImageOptions::default()
    };
    Image::open(storage, Format::Qcow2, &options, &|_, _| {
        Err(io::Error::from(io::ErrorKind::NotFound))
    })
}

/// Asserts that `result` is an error whose message contains `expected`.
pub fn assert_refused<T>(result: Result<T, FormatError>, expected: &str) {
    match result {
        Ok(_) => panic!("a hostile image was accepted (expected: {expected})"),
        Err(err) => {
            let text = err.to_string();
            assert!(
                text.contains(expected),
                "error {text:?} does not say {expected:?}"
            );
        }
    }
}

/// Whether `text` names `offset`, in hex or decimal.
pub fn names_offset(text: &str, offset: u64) -> bool {
    text.contains(&format!("{offset:#x}")) || text.contains(&offset.to_string())
}

/// Declares, for each `name => builder, "expected text"`, a test that the
/// image is refused with that text by `$check`.
// Unused in the test files that build no hostile images.
#[allow(unused_macros)]
macro_rules! hostile_cases {
    ($check:path; $($name:ident => $build:expr, $expected:expr;)*) => {
        $(
            #[test]
            fn $name() {
                let Some(fixture) = $build else { return };
                $check(&fixture, $expected);
            }
        )*
    };
}

#[allow(unused_imports)]
pub(crate) use hostile_cases;

/// Path of the image, for messages.
pub fn path(fixture: &Fixture) -> &Path {
    &fixture.path
}
