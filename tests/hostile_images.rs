//! Hand-made malformed qcow2 images (qemu-img images with patched bytes):
//! each must be refused with an error naming what is wrong, never a panic.
//!
//! `header` checks `Header::read` then `validate`, as `Qcow2::open` does;
//! `open` goes through `Image::open` for the cases that `Header::read`
//! already refuses. The other `Image::open` cases, which need the engine to
//! call `validate`, and the table-level cases live in `hostile_tables.rs`.

mod common;

use common::hostile::field::*;
use common::hostile::*;

fn refused_by_header(fixture: &Fixture, expected: &str) {
    assert_refused(header_result(fixture), expected);
}

fn refused_by_open(fixture: &Fixture, expected: &str) {
    assert_refused(open_image(fixture, false), expected);
}

mod header {
    use super::*;

    hostile_cases! { refused_by_header;
        truncated_header_of_50_bytes => truncated(50), "50 bytes, shorter than a qcow2 header";
        zero_length_file => truncated(0), "0 bytes, shorter than a qcow2 header";
        bad_magic => with32(0, 0x5146_4900), "no qcow2 magic";
        version_4 => with32(VERSION, 4), "qcow2 version 4";
        cluster_bits_8 => with32(CLUSTER_BITS, 8), "cluster_bits 8 is outside 9..=21";
        cluster_bits_22 => with32(CLUSTER_BITS, 22), "cluster_bits 22 is outside 9..=21";
        huge_l1_size => with32(L1_SIZE, 0x1000_0000), "l1_size 268435456 exceeds the limit";
        l1_table_past_eof => with64(L1_TABLE_OFFSET, 0x10_0000), "active L1 table at l1_table_offset 0x100000";
        l1_table_unaligned => with64(L1_TABLE_OFFSET, 0x3_0200), "l1_table_offset 0x30200 is not aligned";
        l1_table_in_the_header => with64(L1_TABLE_OFFSET, 0), "overlaps the header";
        l1_too_small_for_the_size => with64(SIZE, 1 << 40), "l1_size 1 is too small for size 1099511627776";
        huge_size => with64(SIZE, u64::MAX), "too big";
        refcount_table_at_offset_0 => with64(REFCOUNT_TABLE_OFFSET, 0), "refcount table at refcount_table_offset 0x0 overlaps the header";
        refcount_table_past_eof => with64(REFCOUNT_TABLE_OFFSET, 0x10_0000), "refcount table at refcount_table_offset 0x100000";
        refcount_table_unaligned => with64(REFCOUNT_TABLE_OFFSET, 0x1_0008), "refcount_table_offset 0x10008 is not aligned";
        huge_refcount_table_clusters => with32(REFCOUNT_TABLE_CLUSTERS, u32::MAX), "refcount_table_clusters 4294967295 exceeds";
        no_refcount_table => with32(REFCOUNT_TABLE_CLUSTERS, 0), "refcount_table_clusters is 0";
        snapshot_table_past_eof => snapshot_past_eof(), "snapshot table at snapshots_offset 0x100000";
        snapshot_table_unaligned => with64(SNAPSHOTS_OFFSET, 0x2_0001), "snapshots_offset 0x20001 is not aligned";
        huge_nb_snapshots => with32(NB_SNAPSHOTS, u32::MAX), "nb_snapshots 4294967295 exceeds";
        unknown_incompatible_bit => unknown_feature(40, None), "unknown incompatible feature bits: bit 40";
        unknown_incompatible_bit_named_by_the_image => unknown_feature(5, Some("foo")), "bit 5 (\"foo\")";
        overlong_backing_name => crate::common::hostile::overlong_backing_name(), "backing_file_size 2000";
        backing_name_offset_outside_cluster_0 => with64(BACKING_FILE_OFFSET, 0x1_0001), "backing_file_offset 65537 is outside cluster 0";
        backing_name_offset_inside_the_header => backing_inside_header(), "backing_file_offset 16 lies inside";
        extension_past_cluster_0 => with32(FIRST_EXTENSION + 4, 0x10_0000), "runs past byte 65536";
        header_length_below_104 => with32(HEADER_LENGTH, 100), "header_length 100";
        header_length_not_a_multiple_of_8 => with32(HEADER_LENGTH, 108), "header_length 108";
        extended_l2_on_v2 => crate::common::hostile::extended_l2_on_v2(), "version 2 header carries version 3 feature bits";
        compression_type_7 => compression_type(7), "compression_type 7";
        zstd_without_its_feature_bit => compression_type(1), "compression_type is 1 (zstd), but incompatible feature bit 3";
        refcount_order_7 => with32(REFCOUNT_ORDER, 7), "refcount_order 7";
        external_data_file_without_name => with64(INCOMPATIBLE_FEATURES, 1 << 2), "no external data file name";
        raw_data_file_without_data_file => with64(AUTOCLEAR_FEATURES, 1 << 1), "raw external data";
    }

    #[test]
    fn encrypted_luks_image() {
        let Some(fixture) = encrypted() else { return };
        let result = header_result(&fixture);
        assert!(
            matches!(result, Err(chainfs::format::FormatError::Encrypted)),
            "{:?} was not refused as encrypted: {result:?}",
            path(&fixture)
        );
    }
}

/// `Image::open` refuses, through `Header::read`, every case it can reach
/// before the engine validates.
mod open {
    use super::*;

    hostile_cases! { refused_by_open;
        truncated_header_of_50_bytes => truncated(50), "shorter than a qcow2 header";
        zero_length_file => truncated(0), "0 bytes";
        bad_magic => with32(0, 0x5146_4900), "no qcow2 magic";
        version_4 => with32(VERSION, 4), "qcow2 version 4";
        cluster_bits_8 => with32(CLUSTER_BITS, 8), "cluster_bits 8";
        cluster_bits_22 => with32(CLUSTER_BITS, 22), "cluster_bits 22";
        overlong_backing_name => crate::common::hostile::overlong_backing_name(), "backing_file_size 2000";
        backing_name_offset_outside_cluster_0 => with64(BACKING_FILE_OFFSET, 0x1_0001), "outside cluster 0";
        backing_name_offset_inside_the_header => backing_inside_header(), "inside the 112-byte header";
        extension_past_cluster_0 => with32(FIRST_EXTENSION + 4, 0x10_0000), "runs past";
        header_length_below_104 => with32(HEADER_LENGTH, 100), "header_length 100";
        header_length_not_a_multiple_of_8 => with32(HEADER_LENGTH, 108), "header_length 108";
        extended_l2_on_v2 => crate::common::hostile::extended_l2_on_v2(), "version 2 header";
        compression_type_7 => compression_type(7), "compression_type 7";
    }

    #[test]
    fn encrypted_luks_image() {
        let Some(fixture) = encrypted() else { return };
        assert_refused(open_image(&fixture, false), "encrypted");
    }
}

fn snapshot_past_eof() -> Option<Fixture> {
    let fixture = with32(NB_SNAPSHOTS, 1)?;
    put64(&fixture, SNAPSHOTS_OFFSET, 0x10_0000);
    Some(fixture)
}

fn backing_inside_header() -> Option<Fixture> {
    let fixture = with64(BACKING_FILE_OFFSET, 16)?;
    put32(&fixture, BACKING_FILE_SIZE, 8);
    Some(fixture)
}

fn compression_type(value: u8) -> Option<Fixture> {
    let fixture = qemu_image("")?;
    patch(&fixture, COMPRESSION_TYPE, &[value]);
    Some(fixture)
}
