//! Unit tests of header parsing, serialising and validation, on hand-built
//! headers shaped like the ones `qemu-img create -f qcow2 img 1M` writes.

use proptest::prelude::*;

use super::validate::MAX_L1_ENTRIES;
use super::*;

/// Length of the file `qemu-img create -f qcow2 img 1M` makes: header,
/// refcount table and refcount block clusters, then an 8-byte L1 table.
const FILE_LEN: u64 = 0x30008;

/// The header of that image.
fn qemu_like() -> Header {
    let mut header = Header::new_v3(16, 1 << 20);
    header.l1_size = 1;
    header.l1_table_offset = 0x30000;
    header.refcount_table_offset = 0x10000;
    header.refcount_table_clusters = 1;
    header
}

/// The message of the error `result` holds; panics on `Ok`.
fn message<T: std::fmt::Debug>(result: Result<T>) -> String {
    result.expect_err("expected an error").to_string()
}

fn validate_message(header: &Header) -> String {
    message(header.validate(FILE_LEN))
}

/// Cluster 0 of `header`, then `patch` applied to it.
fn bytes_with(header: &Header, patch: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = header.serialize().expect("serializable header");
    patch(&mut bytes);
    bytes
}

fn put32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

#[test]
fn a_qemu_like_header_validates_and_round_trips() {
    let header = qemu_like();
    header.validate(FILE_LEN).unwrap();
    let parsed = Header::parse(&header.serialize().unwrap()).unwrap();
    assert_eq!(parsed, header);
}

#[test]
fn a_v2_header_round_trips() {
    let mut header = qemu_like();
    header.version = 2;
    header.backing_file = Some("base.img".into());
    let bytes = header.serialize().unwrap();
    assert_eq!(Header::parse(&bytes).unwrap(), header);
    header.validate(FILE_LEN).unwrap();
}

#[test]
fn bad_magic_is_refused() {
    let bytes = bytes_with(&qemu_like(), |b| b[0] = b'X');
    assert!(message(Header::parse(&bytes)).contains("magic"));
}

#[test]
fn version_4_is_unsupported() {
    let bytes = bytes_with(&qemu_like(), |b| put32(b, 4, 4));
    assert!(message(Header::parse(&bytes)).contains("version 4"));
    let header = Header {
        version: 4,
        ..qemu_like()
    };
    assert!(validate_message(&header).contains("version 4"));
}

#[test]
fn cluster_bits_outside_9_to_21_are_refused() {
    for bits in [0, 8, 22, 63, u32::MAX] {
        let header = Header {
            cluster_bits: bits,
            ..qemu_like()
        };
        assert!(validate_message(&header).contains(&format!("cluster_bits {bits}")));
        let bytes = bytes_with(&qemu_like(), |b| put32(b, 20, bits));
        assert!(message(Header::parse(&bytes)).contains("cluster_bits"));
    }
}

#[test]
fn a_short_cluster_0_is_refused() {
    let bytes = qemu_like().serialize().unwrap();
    assert!(message(Header::parse(&bytes[..4096])).contains("truncated"));
}

#[test]
fn encrypted_images_are_refused_as_encrypted() {
    for method in [1, 2] {
        let header = Header {
            crypt_method: method,
            ..qemu_like()
        };
        assert!(matches!(
            header.validate(FILE_LEN),
            Err(FormatError::Encrypted)
        ));
    }
    let header = Header {
        crypt_method: 7,
        ..qemu_like()
    };
    assert!(validate_message(&header).contains("crypt_method 7"));
}

#[test]
fn an_encryption_extension_without_luks_is_malformed() {
    let mut header = qemu_like();
    header.unknown_extensions.push((0x0537_be77, vec![0; 16]));
    let bytes = header.serialize().unwrap();
    assert!(message(Header::parse(&bytes)).contains("crypt_method is 0"));
    let luks = bytes_with(&header, |b| put32(b, 32, 2));
    assert!(matches!(Header::parse(&luks), Err(FormatError::Encrypted)));
}

#[test]
fn unknown_incompatible_bits_are_named_from_the_image_table() {
    let mut header = qemu_like();
    header.unknown_incompatible = 1 << 5 | 1 << 40;
    header.feature_names.push(FeatureName {
        kind: 0,
        bit: 5,
        name: "foo".into(),
    });
    // A compatible feature of the same bit number must not lend its name.
    header.feature_names.push(FeatureName {
        kind: 1,
        bit: 40,
        name: "not me".into(),
    });
    let parsed = Header::parse(&header.serialize().unwrap()).unwrap();
    match parsed.validate(FILE_LEN) {
        Err(FormatError::UnknownIncompatibleFeatures { features }) => {
            assert_eq!(features, "bit 5 (\"foo\"), bit 40");
        }
        other => panic!("expected unknown features, got {other:?}"),
    }
}

#[test]
fn unknown_incompatible_bits_win_over_later_garbage() {
    // A future feature may reshape what follows the header: the refusal
    // must name the bit even when the rest makes no sense.
    let header = Header {
        unknown_incompatible: 1 << 9,
        backing_file: Some("b".into()),
        ..qemu_like()
    };
    let bytes = bytes_with(&header, |b| put32(b, 16, 4000));
    let parsed = Header::parse(&bytes).unwrap();
    assert!(validate_message(&parsed).contains("bit 9"));
}

#[test]
fn refcount_order_above_6_is_refused() {
    let header = Header {
        refcount_order: 7,
        ..qemu_like()
    };
    assert!(validate_message(&header).contains("refcount_order 7"));
    for order in 0..=6 {
        Header {
            refcount_order: order,
            ..qemu_like()
        }
        .validate(FILE_LEN)
        .unwrap();
    }
}

#[test]
fn v2_headers_with_v3_fields_are_refused() {
    let v2 = Header {
        version: 2,
        ..qemu_like()
    };
    let cases = [
        Header {
            incompatible: Incompatible::EXTENDED_L2,
            ..v2.clone()
        },
        Header {
            compatible: Compatible::LAZY_REFCOUNTS,
            ..v2.clone()
        },
        Header {
            refcount_order: 5,
            ..v2.clone()
        },
    ];
    for header in cases {
        assert!(validate_message(&header).contains("version 2"));
        assert!(header.serialize().is_err());
    }
}

#[test]
fn a_v3_header_relabelled_v2_is_refused() {
    let header = Header {
        incompatible: Incompatible::EXTENDED_L2,
        cluster_bits: 16,
        ..qemu_like()
    };
    let bytes = bytes_with(&header, |b| put32(b, 4, 2));
    let text = message(Header::parse(&bytes));
    assert!(
        text.contains("version 2") && text.contains("bit 4"),
        "{text}"
    );
}

#[test]
fn l1_size_must_cover_the_virtual_size() {
    // 64 KiB clusters: one L2 table maps 512 MiB.
    let header = Header {
        size: (512 << 20) + 1,
        ..qemu_like()
    };
    assert!(validate_message(&header).contains("l1_size 1 is too small"));
    let extended = Header {
        size: 512 << 20,
        incompatible: Incompatible::EXTENDED_L2,
        ..qemu_like()
    };
    assert!(validate_message(&extended).contains("needs 2 L1 entries"));
}

#[test]
fn a_huge_size_is_refused() {
    let header = Header {
        size: u64::MAX,
        ..qemu_like()
    };
    assert!(validate_message(&header).contains("too big"));
}

#[test]
fn l1_size_above_qemu_limit_is_refused() {
    let header = Header {
        l1_size: (MAX_L1_ENTRIES + 1) as u32,
        ..qemu_like()
    };
    assert!(validate_message(&header).contains("l1_size 4194305"));
}

#[test]
fn l1_table_must_be_aligned_outside_cluster_0_and_inside_the_file() {
    let unaligned = Header {
        l1_table_offset: 0x30008,
        ..qemu_like()
    };
    assert!(validate_message(&unaligned).contains("l1_table_offset 0x30008 is not aligned"));
    let in_header = Header {
        l1_table_offset: 0,
        ..qemu_like()
    };
    assert!(validate_message(&in_header).contains("cluster 0"));
    let past_eof = Header {
        l1_table_offset: 0x40000,
        ..qemu_like()
    };
    assert!(validate_message(&past_eof).contains("past the end of the file"));
    let overflowing = Header {
        l1_table_offset: u64::MAX - 0xffff,
        ..qemu_like()
    };
    assert!(validate_message(&overflowing).contains("is beyond the largest file offset"));
    let ending_past_2_pow_63 = Header {
        l1_table_offset: i64::MAX as u64 & !0xffff,
        l1_size: 1 << 14,
        ..qemu_like()
    };
    assert!(validate_message(&ending_past_2_pow_63).contains("past the end"));
}

#[test]
fn table_offsets_past_2_pow_63_are_refused_even_for_empty_tables() {
    let header = Header {
        nb_snapshots: 0,
        snapshots_offset: 1 << 63,
        ..qemu_like()
    };
    assert!(validate_message(&header).contains("snapshots_offset 0x8000000000000000 is beyond"));
}

#[test]
fn the_first_feature_name_for_a_bit_is_used() {
    let mut header = Header {
        unknown_incompatible: 1 << 6,
        ..qemu_like()
    };
    for name in ["first", "second"] {
        header.feature_names.push(FeatureName {
            kind: 0,
            bit: 6,
            name: name.into(),
        });
    }
    assert_eq!(header.unknown_incompatible_names(), "bit 6 (\"first\")");
}

#[test]
fn geometry_follows_the_header() {
    let header = Header {
        incompatible: Incompatible::EXTENDED_L2,
        refcount_order: 6,
        ..qemu_like()
    };
    let geometry = header.geometry();
    assert_eq!(geometry.cluster_bits, 16);
    assert!(geometry.extended_l2);
    assert_eq!(geometry.refcount_order, 6);
}

#[test]
fn an_empty_image_needs_no_l1_table() {
    let header = Header {
        size: 0,
        l1_size: 0,
        l1_table_offset: 0,
        ..qemu_like()
    };
    header.validate(FILE_LEN).unwrap();
}

#[test]
fn refcount_table_is_checked_like_qemu() {
    let cases = [
        (0x10000, 0, "refcount_table_clusters is 0"),
        (0x10000, 129, "refcount_table_clusters 129 exceeds"),
        (0x10200, 1, "refcount_table_offset 0x10200 is not aligned"),
        (0, 1, "overlaps the header"),
        (0x30000, 1, "past the end of the file"),
    ];
    for (offset, clusters, expected) in cases {
        let header = Header {
            refcount_table_offset: offset,
            refcount_table_clusters: clusters,
            ..qemu_like()
        };
        let text = validate_message(&header);
        assert!(text.contains(expected), "{text}");
    }
}

#[test]
fn snapshot_table_is_checked_like_qemu() {
    let cases = [
        (0x20000, 65537, "nb_snapshots 65537 exceeds"),
        (0x20100, 0, "snapshots_offset 0x20100 is not aligned"),
        (0x30000, 1, "past the end of the file"),
        (0, 1, "overlaps the header"),
    ];
    for (offset, count, expected) in cases {
        let header = Header {
            snapshots_offset: offset,
            nb_snapshots: count,
            ..qemu_like()
        };
        let text = validate_message(&header);
        assert!(text.contains(expected), "{text}");
    }
}

#[test]
fn extended_l2_needs_16k_clusters() {
    let small = Header {
        cluster_bits: 13,
        incompatible: Incompatible::EXTENDED_L2,
        l1_table_offset: 0x6000,
        refcount_table_offset: 0x2000,
        ..qemu_like()
    };
    assert!(validate_message(&small).contains("cluster_bits is 13"));
    let enough = Header {
        cluster_bits: 14,
        l1_size: 2,
        l1_table_offset: 0xc000,
        refcount_table_offset: 0x4000,
        ..small
    };
    enough.validate(FILE_LEN).unwrap();
}

#[test]
fn compression_type_and_its_bit_must_agree() {
    let zstd_without_bit = Header {
        compression_type: CompressionType::Zstd,
        ..qemu_like()
    };
    assert!(validate_message(&zstd_without_bit).contains("bit 3"));
    let bit_without_zstd = Header {
        incompatible: Incompatible::COMPRESSION_TYPE,
        ..qemu_like()
    };
    assert!(validate_message(&bit_without_zstd).contains("compression_type is 0"));
    Header {
        incompatible: Incompatible::COMPRESSION_TYPE,
        ..zstd_without_bit
    }
    .validate(FILE_LEN)
    .unwrap();
}

#[test]
fn an_unknown_compression_type_is_refused() {
    let bytes = bytes_with(&qemu_like(), |b| b[104] = 7);
    assert!(message(Header::parse(&bytes)).contains("compression_type 7"));
}

#[test]
fn external_data_file_rules() {
    let no_name = Header {
        incompatible: Incompatible::EXTERNAL_DATA_FILE,
        ..qemu_like()
    };
    assert!(validate_message(&no_name).contains("no external data file name"));
    let raw_without_file = Header {
        autoclear: Autoclear::DATA_FILE_RAW,
        ..qemu_like()
    };
    assert!(validate_message(&raw_without_file).contains("raw external data"));
    Header {
        autoclear: Autoclear::DATA_FILE_RAW,
        data_file: Some("data.raw".into()),
        ..no_name
    }
    .validate(FILE_LEN)
    .unwrap();
}

#[test]
fn header_length_must_be_104_or_more_a_multiple_of_8_and_within_the_cluster() {
    for (length, expected) in [
        (72, "header_length 72"),
        (108, "header_length 108"),
        (0x20000, "exceeds the cluster size"),
    ] {
        let bytes = bytes_with(&qemu_like(), |b| put32(b, 100, length));
        let text = message(Header::parse(&bytes));
        assert!(text.contains(expected), "{text}");
    }
}

#[test]
fn a_104_byte_header_means_deflate() {
    let bytes = bytes_with(&qemu_like(), |b| {
        put32(b, 100, 104);
        b[104..112].fill(0);
    });
    let header = Header::parse(&bytes).unwrap();
    assert_eq!(header.compression_type, CompressionType::Deflate);
}

#[test]
fn unknown_header_fields_are_kept() {
    let header = Header {
        unknown_header_fields: vec![1, 2, 3, 4, 5, 6, 7, 8],
        ..qemu_like()
    };
    let bytes = header.serialize().unwrap();
    assert_eq!(be32(&bytes, 100), 120);
    assert_eq!(Header::parse(&bytes).unwrap(), header);
}

/// An edit of cluster 0 bytes.
type Patch = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn backing_file_name_rules() {
    let header = Header {
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..qemu_like()
    };
    let good = header.serialize().unwrap();
    let offset = be64(&good, 8) as usize;
    let cases: [(Patch, &str); 4] = [
        (Box::new(|b| put32(b, 16, 2000)), "backing_file_size 2000"),
        (Box::new(|b| put64(b, 8, 0x10001)), "outside cluster 0"),
        (Box::new(|b| put64(b, 8, 16)), "inside the 112-byte header"),
        (
            Box::new(move |b| put64(b, 8, (offset - 4) as u64)),
            "runs past byte",
        ),
    ];
    for (patch, expected) in cases {
        let mut bytes = good.clone();
        patch(&mut bytes);
        let text = message(Header::parse(&bytes));
        assert!(text.contains(expected), "{expected}: {text}");
    }
    let too_long = Header {
        backing_file: Some(vec![b'x'; 1024]),
        ..qemu_like()
    };
    assert!(validate_message(&too_long).contains("1024"));
    assert!(too_long.serialize().is_err());
}

#[test]
fn a_backing_name_that_is_not_utf8_keeps_its_bytes() {
    let name = b"base\xff\xfe.raw".to_vec();
    let header = Header {
        backing_file: Some(name.clone()),
        ..qemu_like()
    };
    let parsed = Header::parse(&header.serialize().unwrap()).unwrap();
    assert_eq!(parsed.backing_file, Some(name));
    assert_eq!(parsed.serialize().unwrap(), header.serialize().unwrap());
}

#[test]
fn an_empty_or_nul_terminated_backing_name_reads_as_qemu_reads_it() {
    let header = Header {
        backing_file: Some("base".into()),
        ..qemu_like()
    };
    let empty = bytes_with(&header, |b| put32(b, 16, 0));
    assert_eq!(Header::parse(&empty).unwrap().backing_file, None);
    let offset = be64(&header.serialize().unwrap(), 8) as usize;
    let nul = bytes_with(&header, |b| b[offset + 2] = 0);
    assert_eq!(
        Header::parse(&nul).unwrap().backing_file.as_deref(),
        Some(&b"ba"[..])
    );
}

#[test]
fn an_extension_past_cluster_0_is_refused() {
    let header = Header {
        unknown_extensions: vec![(0x1234_5678, vec![1; 8])],
        ..qemu_like()
    };
    let bytes = bytes_with(&header, |b| put32(b, 116, 0x10000));
    let text = message(Header::parse(&bytes));
    assert!(
        text.contains("0x12345678") && text.contains("runs past"),
        "{text}"
    );
}

#[test]
fn an_extension_header_cut_by_the_backing_name_is_refused() {
    let bytes = bytes_with(&qemu_like(), |b| put64(b, 8, 116));
    let text = message(Header::parse(&bytes));
    assert!(text.contains("byte 112 runs past byte 116"), "{text}");
}

#[test]
fn an_over_long_backing_format_is_refused() {
    let header = Header {
        backing_format: Some("x".repeat(16)),
        ..qemu_like()
    };
    assert!(validate_message(&header).contains("16 bytes"));
    let bytes = header.serialize().unwrap();
    assert!(message(Header::parse(&bytes)).contains("backing format"));
}

#[test]
fn bitmaps_extension_is_checked_when_its_bit_is_set() {
    let mut ext = vec![0u8; 24];
    put32(&mut ext, 0, 1);
    put64(&mut ext, 8, 16);
    put64(&mut ext, 16, 0x20000);
    let header = Header {
        autoclear: Autoclear::BITMAPS,
        bitmaps_extension: Some(ext.clone()),
        ..qemu_like()
    };
    header.validate(FILE_LEN).unwrap();
    let mut cases = Vec::new();
    cases.push((ext[..16].to_vec(), "16 bytes long"));
    let mut zero = ext.clone();
    put32(&mut zero, 0, 0);
    cases.push((zero, "nb_bitmaps 0"));
    let mut reserved = ext.clone();
    put32(&mut reserved, 4, 1);
    cases.push((reserved, "reserved"));
    let mut unaligned = ext.clone();
    put64(&mut unaligned, 16, 0x20010);
    cases.push((unaligned, "bitmap_directory_offset 0x20010"));
    let mut huge = ext.clone();
    put64(&mut huge, 8, u64::MAX);
    cases.push((huge, "bitmap_directory_size"));
    for (data, expected) in cases {
        let bad = Header {
            bitmaps_extension: Some(data.clone()),
            ..header.clone()
        };
        let text = validate_message(&bad);
        assert!(text.contains(expected), "{text}");
        // Without the autoclear bit QEMU ignores the extension.
        Header {
            autoclear: Autoclear::empty(),
            ..bad
        }
        .validate(FILE_LEN)
        .unwrap();
    }
}

fn arb_name(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::char::range('!', '~'), 1..=max)
        .prop_map(|chars| chars.into_iter().collect())
}

fn arb_extension() -> impl Strategy<Value = (u32, Vec<u8>)> {
    let known = [
        0,
        0xe279_2aca,
        0x6803_f857,
        0x2385_2875,
        0x0537_be77,
        0x4441_5441,
    ];
    (
        any::<u32>().prop_filter("unknown kind", move |k| !known.contains(k)),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
}

fn arb_feature_name() -> impl Strategy<Value = FeatureName> {
    (any::<u8>(), any::<u8>(), arb_name(46)).prop_map(|(kind, bit, name)| FeatureName {
        kind,
        bit,
        name,
    })
}

prop_compose! {
    fn arb_v3_fields()(
        incompatible in 0u64..32,
        unknown in any::<u64>().prop_map(|bits| bits & !0x1f),
        compatible in any::<u64>(),
        autoclear in any::<u64>(),
        refcount_order in 0u32..=6,
        zstd in any::<bool>(),
        extra in proptest::collection::vec(any::<[u8; 8]>(), 0..3),
    ) -> (Incompatible, u64, Compatible, Autoclear, u32, CompressionType, Vec<u8>) {
        let compression = if zstd { CompressionType::Zstd } else { CompressionType::Deflate };
        (Incompatible::from_bits_truncate(incompatible), unknown,
         Compatible::from_bits_retain(compatible), Autoclear::from_bits_retain(autoclear),
         refcount_order, compression, extra.concat())
    }
}

prop_compose! {
    fn arb_header()(
        v3 in proptest::option::of(arb_v3_fields()),
        cluster_bits in 9u32..=21,
        numbers in any::<(u64, u32, u32, u64, u64, u32, u32, u64)>(),
        backing_file in proptest::option::of(arb_name(1023)),
        backing_format in proptest::option::of(arb_name(15)),
        data_file in proptest::option::of(arb_name(200)),
        feature_names in proptest::collection::vec(arb_feature_name(), 0..4),
        bitmaps_extension in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..30)),
        unknown_extensions in proptest::collection::vec(arb_extension(), 0..3),
    ) -> Header {
        let (size, crypt_method, l1_size, l1_table_offset, refcount_table_offset,
             refcount_table_clusters, nb_snapshots, snapshots_offset) = numbers;
        let mut header = Header {
            version: 2,
            cluster_bits,
            size,
            // Not LUKS: an encryption extension is not generated anyway.
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            backing_file: backing_file.map(String::into_bytes),
            backing_format,
            data_file,
            feature_names,
            bitmaps_extension,
            unknown_extensions,
            ..Header::new_v3(cluster_bits, size)
        };
        if let Some((incompatible, unknown, compatible, autoclear, order, compression, extra)) = v3 {
            header.version = 3;
            header.incompatible = incompatible;
            header.unknown_incompatible = unknown;
            header.compatible = compatible;
            header.autoclear = autoclear;
            header.refcount_order = order;
            header.compression_type = compression;
            header.unknown_header_fields = extra;
        }
        header
    }
}

proptest! {
    #[test]
    fn serialize_then_parse_gives_the_same_header(header in arb_header()) {
        let Ok(bytes) = header.serialize() else {
            // Only a header too big for its cluster may fail.
            prop_assert!(header.cluster_bits < 11);
            return Ok(());
        };
        prop_assert_eq!(bytes.len() as u64, header.cluster_size());
        prop_assert_eq!(Header::parse(&bytes).unwrap(), header);
    }

    #[test]
    fn validate_never_panics_on_any_header(header in arb_header(), file_len in any::<u64>()) {
        let _ = header.validate(file_len);
        let _ = header.unknown_incompatible_names();
    }
}
