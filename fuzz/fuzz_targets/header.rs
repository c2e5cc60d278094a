//! Fuzzes the qcow2 header parser: arbitrary bytes as an image file go
//! through `Header::read` and `validate`, as `Qcow2::open` uses them. A
//! header that decodes must also survive a serialise/parse round trip.

#![no_main]

use chainfs::format::Qcow2Header as Header;
use chainfs::storage::Storage;
use chainfs_fuzz::BytesStorage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let storage = BytesStorage::new(data);
    let Ok(header) = Header::read(&storage) else {
        return;
    };
    let file_len = storage.len().unwrap_or(0);
    let _ = header.validate(file_len);
    // Tables anywhere: reach the checks that follow "inside the file".
    let _ = header.validate(i64::MAX as u64);
    let _ = header.unknown_incompatible_names();
    round_trip(&header);
});

/// Serialising normalises a header (one copy of each extension, the
/// backing name after them); after that, parse and serialise must agree.
fn round_trip(header: &Header) {
    let Ok(bytes) = header.serialize() else {
        return;
    };
    let again = Header::parse(&bytes).expect("a serialised header parses");
    let bytes_again = again.serialize().expect("a parsed header serialises");
    assert!(
        bytes == bytes_again,
        "serialise(parse(serialise(h))) differs"
    );
}
