//! Tests of the bitmap structures: hostile extensions, directories and
//! tables (QEMU's checks, and no panic or unbounded allocation on any
//! input), and the bit arithmetic of recording writes.

use std::process::Command;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::format::qcow2::header::Header;
use crate::format::qcow2::Qcow2;
use crate::format::OpenOptions;
use crate::storage::test_support::require_tool;
use crate::storage::MemStorage;

const CS: u64 = 65536;

fn ext_bytes(nb: u32, reserved: u32, size: u64, offset: u64) -> Vec<u8> {
    let mut out = nb.to_be_bytes().to_vec();
    out.extend_from_slice(&reserved.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

fn entry(name: &str, flags: BitmapFlags) -> DirEntry {
    DirEntry {
        table_offset: 3 * CS,
        table_size: 1,
        flags,
        kind: 1,
        granularity_bits: 16,
        name: name.as_bytes().to_vec(),
        extra_data: Vec::new(),
    }
}

fn is_malformed<T: fmt::Debug>(result: Result<T>) -> bool {
    matches!(result, Err(FormatError::Malformed { .. }))
}

fn is_unsupported<T: fmt::Debug>(result: Result<T>) -> bool {
    matches!(result, Err(FormatError::Unsupported { .. }))
}

#[test]
fn extension_round_trips() {
    let ext = Extension::parse(&ext_bytes(2, 0, 80, 4 * CS), CS, 5 * CS).unwrap();
    assert_eq!(ext.nb_bitmaps, 2);
    assert_eq!(ext.to_bytes(), ext_bytes(2, 0, 80, 4 * CS));
}

#[test]
fn extension_refuses_what_qemu_refuses_and_directories_outside_the_file() {
    let file = 8 * CS;
    let bad = [
        ext_bytes(1, 0, 8, CS)[..20].to_vec(),
        ext_bytes(1, 1, 32, CS),
        ext_bytes(0, 0, 32, CS),
        ext_bytes(MAX_BITMAPS + 1, 0, 32, CS),
        ext_bytes(1, 0, 0, CS),
        ext_bytes(1, 0, MAX_DIRECTORY_SIZE + 1, CS),
        ext_bytes(1, 0, 32, CS + 8),
        ext_bytes(1, 0, 32, 0),
        ext_bytes(1, 0, 32, file),
        ext_bytes(1, 0, 32, u64::MAX - CS + 1),
    ];
    for data in bad {
        assert!(is_malformed(Extension::parse(&data, CS, file)), "{data:x?}");
    }
}

#[test]
fn directory_round_trips_with_padding() {
    let entries = vec![
        entry("b0", BitmapFlags::AUTO),
        entry("a-longer-name", BitmapFlags::empty()),
    ];
    let bytes = serialize_directory(&entries);
    assert_eq!(bytes.len(), 32 + 40);
    assert_eq!(parse_directory(&bytes, 2).unwrap(), entries);
}

#[test]
fn directory_must_hold_exactly_the_counted_entries() {
    let bytes = serialize_directory(&[
        entry("b0", BitmapFlags::AUTO),
        entry("b1", BitmapFlags::AUTO),
    ]);
    assert!(is_malformed(parse_directory(&bytes, 1)));
    assert!(is_malformed(parse_directory(&bytes, 3)));
    assert!(is_malformed(parse_directory(&bytes[..40], 2)));
    assert!(is_malformed(parse_directory(&bytes[..16], 1)));
}

#[test]
fn huge_name_and_extra_sizes_are_refused_without_overflow() {
    let mut bytes = serialize_directory(&[entry("b0", BitmapFlags::AUTO)]);
    bytes[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(is_malformed(parse_directory(&bytes, 1)));
    let mut bytes = serialize_directory(&[entry("b0", BitmapFlags::AUTO)]);
    bytes[18..20].copy_from_slice(&u16::MAX.to_be_bytes());
    assert!(is_malformed(parse_directory(&bytes, 1)));
}

/// A change to a directory entry.
type Damage = fn(&mut DirEntry);

#[test]
fn entry_check_follows_qemu() {
    let size = 64 << 20;
    assert!(entry("b0", BitmapFlags::AUTO).check(CS, size).is_ok());
    let unsupported: [Damage; 8] = [
        |e| e.extra_data = vec![0; 8],
        |e| e.flags = BitmapFlags::AUTO | BitmapFlags::EXTRA_DATA_COMPATIBLE,
        |e| e.flags = BitmapFlags::from_bits_retain(1 << 31),
        |e| e.kind = 2,
        |e| e.granularity_bits = 8,
        |e| e.granularity_bits = 32,
        |e| e.name.clear(),
        |e| e.name = vec![b'x'; 1024],
    ];
    for (i, damage) in unsupported.iter().enumerate() {
        let mut e = entry("b0", BitmapFlags::AUTO);
        damage(&mut e);
        assert!(is_unsupported(e.check(CS, size)), "case {i}");
    }
    let malformed: [Damage; 6] = [
        |e| e.table_offset = 0,
        |e| e.table_offset = CS + 512,
        |e| e.table_size = 0,
        |e| e.table_size = MAX_TABLE_ENTRIES + 1,
        |e| e.table_size = (MAX_PHYS_SIZE / CS) as u32 + 1,
        // One cluster of bits at 512-byte granules covers only 256 MiB.
        |e| e.granularity_bits = 9,
    ];
    for (i, damage) in malformed.iter().enumerate() {
        let mut e = entry("b0", BitmapFlags::AUTO);
        damage(&mut e);
        assert!(is_malformed(e.check(CS, 1 << 40)), "case {i}");
    }
}

#[test]
fn an_in_use_bitmap_may_be_too_small_for_the_disk() {
    let mut e = entry("b0", BitmapFlags::AUTO | BitmapFlags::IN_USE);
    e.granularity_bits = 9;
    assert!(e.check(CS, 1 << 40).is_ok());
}

#[test]
fn table_entries_decode_as_qemu_checks_them() {
    assert_eq!(TableEntry::decode(0, CS).unwrap(), TableEntry::Zeros);
    assert_eq!(TableEntry::decode(1, CS).unwrap(), TableEntry::Ones);
    let data = TableEntry::decode(5 * CS, CS).unwrap();
    assert_eq!(data, TableEntry::Data(HostOffset(5 * CS)));
    assert_eq!(data.encode(), 5 * CS);
    for raw in [2, 1 << 8, 1 << 56, (5 * CS) | 1, 5 * CS + 512] {
        assert!(is_malformed(TableEntry::decode(raw, CS)), "{raw:#x}");
    }
}

fn naive_set(buf: &mut [u8], from: usize, to: usize) {
    for bit in from..to {
        buf[bit / 8] |= 1 << (bit % 8);
    }
}

/// A tracked bitmap of `bits` bits over 512-byte clusters, all zero.
fn tracked(bits: u64, granularity_bits: u32) -> Tracked {
    let chunks = bits.div_ceil(512 * 8) as usize;
    Tracked {
        entry: 0,
        granularity_bits,
        bits,
        chunks: (0..chunks).map(|_| Chunk::Zeros).collect(),
        clusters: Vec::new(),
    }
}

/// The bitmap as one flat byte vector.
fn flatten(t: &Tracked) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in &t.chunks {
        match chunk {
            Chunk::Zeros => out.extend_from_slice(&[0u8; 512]),
            Chunk::Ones => out.extend_from_slice(&[0xffu8; 512]),
            Chunk::Bits(bits) => out.extend_from_slice(bits),
        }
    }
    out
}

#[test]
fn record_sets_every_touched_granule_across_chunks() {
    // 10,000 granules of 512 bytes: three chunks, the last one partial.
    let mut t = tracked(10_000, 9);
    t.set_range(4095 * 512 + 511, 2, 512);
    t.set_range(9_999 * 512, 512, 512);
    t.set_range(9_999 * 512 + 100, u64::MAX / 2, 512);
    let mut expected = vec![0u8; 3 * 512];
    naive_set(&mut expected, 4095, 4097);
    naive_set(&mut expected, 9_999, 10_000);
    assert_eq!(flatten(&t), expected);
}

#[test]
fn clear_bits_from_keeps_only_the_bits_before() {
    let mut buf = [0xffu8; 4];
    clear_bits_from(&mut buf, 11);
    assert_eq!(buf, [0xff, 0x07, 0, 0]);
    clear_bits_from(&mut buf, 32);
    assert_eq!(buf, [0xff, 0x07, 0, 0]);
}

proptest! {
    #[test]
    fn set_bits_matches_a_naive_model(from in 0usize..256, len in 0usize..256) {
        let to = (from + len).min(256);
        let mut fast = [0u8; 32];
        let mut slow = [0u8; 32];
        set_bits(&mut fast, from, to);
        naive_set(&mut slow, from, to);
        prop_assert_eq!(fast, slow);
    }

    #[test]
    fn record_matches_a_naive_model(
        writes in proptest::collection::vec((0u64..(5_000 << 9), 1u64..(3_000 << 9)), 1..8),
    ) {
        let mut t = tracked(5_000, 9);
        let mut model = vec![0u8; 2 * 512];
        for (at, len) in writes {
            t.set_range(at, len, 512);
            let end = ((at + len - 1) >> 9).min(4_999) + 1;
            naive_set(&mut model, (at >> 9) as usize, end as usize);
        }
        prop_assert_eq!(flatten(&t), model);
    }

    #[test]
    fn any_directory_bytes_parse_or_fail_cleanly(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        nb in 0u32..4,
    ) {
        if let Ok(entries) = parse_directory(&bytes, nb) {
            prop_assert_eq!(entries.len(), nb as usize);
            for e in &entries {
                let _ = e.check(CS, 1 << 30);
            }
        }
    }
}

/// A 64 MiB image with enabled bitmap `b0`, as file bytes.
fn image_with_bitmap() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.qcow2");
    let path = path.to_str().unwrap();
    for args in [
        &["create", "-q", "-f", "qcow2", path, "64M"][..],
        &["bitmap", "--add", path, "b0"][..],
    ] {
        assert!(Command::new("qemu-img")
            .args(args)
            .status()
            .unwrap()
            .success());
    }
    std::fs::read(path).unwrap()
}

fn open(bytes: Vec<u8>, writable: bool) -> Result<Qcow2> {
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    let no_files = |_: &str, _: bool| -> std::io::Result<Arc<dyn Storage>> {
        Err(std::io::Error::from_raw_os_error(libc::ENOENT))
    };
    let options = OpenOptions {
        writable,
        cache: crate::format::MetadataCache::new(1 << 20),
    };
    Qcow2::open(storage, &options, &no_files)
}

/// Where the directory of `bytes` is, by the engine's own header parser.
fn directory_offset(bytes: &[u8]) -> usize {
    let header = Header::parse(&bytes[..CS as usize]).unwrap();
    let ext = header.bitmaps_extension.unwrap();
    be64(&ext, 16) as usize
}

/// A change to image bytes, given the directory and bitmap table offsets.
type FileDamage = fn(&mut [u8], usize, usize);

#[test]
fn damaged_bitmaps_refuse_writing_but_not_reading() {
    if !require_tool("qemu-img") {
        return;
    }
    let clean = image_with_bitmap();
    let dir = directory_offset(&clean);
    let table_offset = be64(&clean, dir) as usize;
    let damages: [(&str, FileDamage); 6] = [
        ("unknown flag", |b, dir, _| b[dir + 15] |= 4),
        ("granularity 32", |b, dir, _| b[dir + 17] = 32),
        ("table past the file", |b, dir, _| b[dir + 3] = 0x40),
        ("table too long", |b, dir, _| b[dir + 11] = 2),
        ("reserved table bits", |b, _, table| b[table + 7] = 2),
        ("data past the file", |b, _, table| b[table + 2] = 0x10),
    ];
    for (what, damage) in damages {
        let mut bytes = clean.clone();
        damage(&mut bytes, dir, table_offset);
        assert!(
            open(bytes.clone(), true).is_err(),
            "{what}: writable open succeeded"
        );
        assert!(open(bytes, false).is_ok(), "{what}: read-only open failed");
    }
    assert!(open(clean, true).is_ok());
}

#[test]
fn a_cleared_autoclear_bit_means_no_bitmaps_to_keep() {
    if !require_tool("qemu-img") {
        return;
    }
    let mut bytes = image_with_bitmap();
    bytes[95] &= !1;
    let image = open(bytes, true).unwrap();
    assert!(sync::read(&image.bitmaps).is_none());
}
