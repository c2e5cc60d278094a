//! Hostile images that only the qcow2 engine can refuse. These tests fail
//! until `Qcow2::open` calls `Header::validate` and the engine checks table
//! entries against the file; they are not ignored, so that they say so.
//!
//! `needs_validate`: header-level cases of `hostile_images.rs`, through
//! `Image::open`. `tables`: images whose header is sound but whose L1, L2 or
//! reftable entries point outside the file or off a cluster boundary;
//! reading (or, for refcounts, writing) the affected range must fail with an
//! error naming the table and the offset, never panic or read zeros past the
//! end of the file.

mod common;

use chainfs::format::{Image, NoBacking};

use common::hostile::field::*;
use common::hostile::*;

fn refused_by_open(fixture: &Fixture, expected: &str) {
    assert_refused(open_image(fixture, false), expected);
}

mod needs_validate {
    use super::*;

    hostile_cases! { refused_by_open;
        huge_l1_size => with32(L1_SIZE, 0x1000_0000), "l1_size 268435456";
        l1_table_past_eof => with64(L1_TABLE_OFFSET, 0x10_0000), "l1_table_offset 0x100000";
        l1_table_unaligned => with64(L1_TABLE_OFFSET, 0x3_0200), "l1_table_offset 0x30200";
        l1_too_small_for_the_size => with64(SIZE, 1 << 40), "l1_size 1 is too small";
        refcount_table_at_offset_0 => with64(REFCOUNT_TABLE_OFFSET, 0), "overlaps the header";
        refcount_table_past_eof => with64(REFCOUNT_TABLE_OFFSET, 0x10_0000), "refcount_table_offset 0x100000";
        huge_refcount_table_clusters => with32(REFCOUNT_TABLE_CLUSTERS, u32::MAX), "refcount_table_clusters 4294967295";
        snapshot_table_past_eof => snapshot_past_eof(), "snapshots_offset 0x100000";
        huge_nb_snapshots => with32(NB_SNAPSHOTS, u32::MAX), "nb_snapshots 4294967295";
        unknown_incompatible_bit => unknown_feature(40, None), "bit 40";
        unknown_incompatible_bit_named_by_the_image => unknown_feature(5, Some("foo")), "bit 5 (\"foo\")";
        refcount_order_7 => with32(REFCOUNT_ORDER, 7), "refcount_order 7";
        zstd_without_its_feature_bit => zstd_without_bit(), "compression_type is 1 (zstd)";
        external_data_file_without_name => with64(INCOMPATIBLE_FEATURES, 1 << 2), "no external data file name";
    }

    fn snapshot_past_eof() -> Option<Fixture> {
        let fixture = with32(NB_SNAPSHOTS, 1)?;
        put64(&fixture, SNAPSHOTS_OFFSET, 0x10_0000);
        Some(fixture)
    }

    fn zstd_without_bit() -> Option<Fixture> {
        let fixture = qemu_image("")?;
        patch(&fixture, COMPRESSION_TYPE, &[1]);
        Some(fixture)
    }
}

mod tables {
    use super::*;

    /// Far past the end of every test image, and cluster-aligned.
    const PAST_EOF: u64 = 0x1000_0000;
    /// L1 and standard L2 entries: bit 63 says the refcount is exactly one.
    const COPIED: u64 = 1 << 63;
    /// Host offset bits of L1 entries and standard L2 entries.
    const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    const GUEST_CLUSTER: usize = 64 << 10;

    /// An image whose first guest cluster holds data written by qemu-io
    /// (`compressed`: written compressed), with the file offsets where its
    /// L1 entry 0 and its L2 entry 0 are stored.
    fn image_with_data(compressed: bool) -> Option<(Fixture, u64, u64)> {
        let fixture = qemu_image("")?;
        let write = if compressed {
            "write -c -P 1 0 64k"
        } else {
            "write -P 1 0 64k"
        };
        if !fill(&fixture, write) {
            return None;
        }
        let l1_entry_at = get64(&fixture, L1_TABLE_OFFSET);
        let l2_entry_at = get64(&fixture, l1_entry_at) & OFFSET_MASK;
        Some((fixture, l1_entry_at, l2_entry_at))
    }

    /// Reads the first guest cluster and returns the error text; panics if
    /// the read succeeds.
    fn read_error(fixture: &Fixture) -> String {
        let image = match open_image(fixture, false) {
            Ok(image) => image,
            // Refusing at open, with a clear message, is also fine.
            Err(err) => return err.to_string(),
        };
        let mut buf = vec![0u8; GUEST_CLUSTER];
        match image.read(0, &mut buf) {
            Ok(_) => panic!("reading through a hostile table succeeded"),
            Err(err) => err.to_string(),
        }
    }

    fn assert_names(text: &str, table: &str, offset: u64) {
        assert!(
            text.to_lowercase().contains(&table.to_lowercase()) && names_offset(text, offset),
            "error {text:?} does not name the {table} and offset {offset:#x}"
        );
    }

    #[test]
    fn l2_table_past_eof() {
        let Some((fixture, l1_entry, _)) = image_with_data(false) else {
            return;
        };
        put64(&fixture, l1_entry, COPIED | PAST_EOF);
        assert_names(&read_error(&fixture), "L2", PAST_EOF);
    }

    #[test]
    fn l2_table_unaligned() {
        let Some((fixture, l1_entry, l2_table)) = image_with_data(false) else {
            return;
        };
        let unaligned = l2_table + 0x200;
        put64(&fixture, l1_entry, COPIED | unaligned);
        assert_names(&read_error(&fixture), "L2", unaligned);
    }

    #[test]
    fn data_cluster_past_eof() {
        let Some((fixture, _, l2_offset)) = image_with_data(false) else {
            return;
        };
        put64(&fixture, l2_offset, COPIED | PAST_EOF);
        let text = read_error(&fixture);
        assert!(
            names_offset(&text, PAST_EOF),
            "{text:?} does not name {PAST_EOF:#x}"
        );
    }

    #[test]
    fn compressed_descriptor_past_eof() {
        let Some((fixture, _, l2_offset)) = image_with_data(true) else {
            return;
        };
        let entry = get64(&fixture, l2_offset);
        assert!(entry & (1 << 62) != 0, "qemu-io wrote a compressed cluster");
        // With 64 KiB clusters the host offset takes the low 62 - (16 - 8)
        // bits of a compressed descriptor; the sector count sits above.
        let offset_bits = (1u64 << 54) - 1;
        put64(&fixture, l2_offset, (entry & !offset_bits) | PAST_EOF);
        assert_names(&read_error(&fixture), "compressed", PAST_EOF);
    }

    #[test]
    fn refcount_block_past_eof() {
        let Some((fixture, _, _)) = image_with_data(false) else {
            return;
        };
        let reftable = get64(&fixture, REFCOUNT_TABLE_OFFSET);
        put64(&fixture, reftable, PAST_EOF);
        // Refcounts matter when clusters are allocated: open for writing
        // and write to an unallocated cluster. Either step may refuse.
        let text = match open_image(&fixture, true) {
            Err(err) => err.to_string(),
            Ok(image) => write_new_cluster(&image),
        };
        assert_names(&text, "refcount", PAST_EOF);
    }

    fn write_new_cluster(image: &Image) -> String {
        let data = vec![7u8; 4096];
        match image.write(8 * GUEST_CLUSTER as u64, &data, &NoBacking) {
            Ok(()) => panic!("allocating through a hostile refcount table succeeded"),
            Err(err) => err.to_string(),
        }
    }
}
