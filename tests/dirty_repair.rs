//! Dirty-bit repair against QEMU: images that QEMU itself leaves dirty
//! (lazy refcounts, `qemu-io` killed before it closes) are repaired when the
//! engine opens them writable, and afterwards `qemu-img check` is clean, the
//! dirty bit is clear and every byte — active image and snapshots — is what
//! QEMU wrote plus what the engine wrote. Also: read-only opens leave a dirty
//! image untouched, the corrupt bit refuses writes, and a crash at any
//! instant of the repair leaves an image QEMU reads and repairs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use chainfs::format::{
    repair_qcow2 as repair, FormatError, NoBacking, OpenOptions, Qcow2, Qcow2Geometry as Geometry,
    Qcow2Header as Header, Qcow2Incompatible as Incompatible,
};
use chainfs::storage::{CrashMode, FileStorage, MemStorage, Storage};
use common::{
    assert_same_bytes, convert_snapshot_to_raw, convert_to_raw, create_qcow2, path_str, pattern,
    qemu_img, qemu_img_check, require_qemu,
};

/// Header byte holding the low incompatible feature bits (byte 79 of the
/// big-endian field at 72).
const INCOMPATIBLE_LOW_BYTE: usize = 79;
const DIRTY: u8 = 1;
const CORRUPT: u8 = 2;

/// The writes `qemu-io` makes before it is killed.
const DIRTY_WRITES: &[&str] = &[
    "write -P 1 0 4M",
    "write -P 2 6M 512k",
    "write -P 3 9000 3000",
    "write -P 4 15M 1M",
];

/// What the engine writes after the repair: (offset, length, seed).
const ENGINE_WRITES: &[(u64, usize, u64)] = &[
    (100_000, 200_000, 11),
    (5 << 20, 1 << 20, 12),
    (12 << 20, 4096, 13),
];

fn no_data_file(name: &str, _: bool) -> std::io::Result<Arc<dyn Storage>> {
    Err(std::io::Error::other(format!(
        "unexpected data file {name}"
    )))
}

fn open_storage(storage: Arc<dyn Storage>, writable: bool) -> chainfs::format::Result<Qcow2> {
    let options = OpenOptions {
        writable,
        cache: chainfs::format::MetadataCache::new(1 << 20),
    };
    Qcow2::open(storage, &options, &no_data_file)
}

fn open_file(image: &Path, writable: bool) -> Qcow2 {
    let storage = Arc::new(FileStorage::open(image, writable).unwrap());
    open_storage(storage, writable).unwrap_or_else(|e| panic!("open {}: {e}", image.display()))
}

fn read_all(image: &Qcow2) -> Vec<u8> {
    let mut out = vec![0u8; image.virtual_size() as usize];
    for chunk in out.chunks_mut(1 << 20).enumerate() {
        let (index, buf) = chunk;
        let start = (index << 20) as u64;
        for hole in image.read(start, buf).unwrap() {
            buf[(hole.start - start) as usize..(hole.end - start) as usize].fill(0);
        }
    }
    out
}

fn incompatible_low(image: &Path) -> u8 {
    std::fs::read(image).unwrap()[INCOMPATIBLE_LOW_BYTE]
}

/// Runs `commands` in one `qemu-io` that then SIGKILLs itself, as a crashed
/// QEMU would leave the image: dirty, refcounts stale.
fn qemu_io_then_kill(image: &Path, commands: &[&str]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for command in commands.iter().chain(&["sigraise 9"]) {
        args.extend(["-c", command]);
    }
    args.push(path_str(image));
    let status = Command::new("qemu-io").args(&args).output().unwrap().status;
    assert!(!status.success(), "qemu-io should have been killed");
    assert_ne!(
        incompatible_low(image) & DIRTY,
        0,
        "the dirty bit is not set"
    );
    let check = Command::new("qemu-img")
        .args(["check", "-U", path_str(image)])
        .output()
        .unwrap();
    assert!(
        !check.status.success(),
        "qemu-img check finds nothing wrong with the dirty image"
    );
}

/// A dirty image made by QEMU; `prepare` runs on the clean image first.
struct Dirty {
    _dir: tempfile::TempDir,
    image: PathBuf,
    snapshot: Option<Vec<u8>>,
}

fn make_dirty(create_options: &str, prepare: impl FnOnce(&Path) -> bool) -> Dirty {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("dirty.qcow2");
    let options = format!("lazy_refcounts=on{create_options}");
    create_qcow2(path_str(&image), "16M", &options);
    let has_snapshot = prepare(&image);
    let snapshot = has_snapshot.then(|| convert_snapshot_to_raw(&image, "s1"));
    qemu_io_then_kill(&image, DIRTY_WRITES);
    Dirty {
        _dir: dir,
        image,
        snapshot,
    }
}

/// Repairs through the engine, writes, closes, and checks against QEMU.
fn repair_write_and_verify(dirty: &Dirty) {
    let mut expected = convert_to_raw(&dirty.image);
    let image = open_file(&dirty.image, true);
    assert_eq!(
        incompatible_low(&dirty.image) & DIRTY,
        0,
        "still dirty after open"
    );
    assert_same_bytes(&read_all(&image), &expected, "read after repair");
    for &(offset, len, seed) in ENGINE_WRITES {
        let data = pattern(seed, offset, len);
        image.write(offset, &data, &NoBacking).unwrap();
        expected[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    image.close().unwrap();
    drop(image);
    qemu_img_check(&dirty.image);
    assert_eq!(incompatible_low(&dirty.image) & DIRTY, 0);
    assert_same_bytes(&convert_to_raw(&dirty.image), &expected, "active image");
    if let Some(snapshot) = &dirty.snapshot {
        let now = convert_snapshot_to_raw(&dirty.image, "s1");
        assert_same_bytes(&now, snapshot, "snapshot s1");
    }
}

fn no_preparation(_: &Path) -> bool {
    false
}

#[test]
fn a_plain_dirty_image_is_repaired_and_written() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty("", no_preparation));
    }
}

#[test]
fn a_dirty_image_with_extended_l2_entries_is_repaired() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty(",extended_l2=on", no_preparation));
    }
}

#[test]
fn one_bit_refcounts_are_rebuilt() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty(",refcount_bits=1", no_preparation));
    }
}

#[test]
fn sixty_four_bit_refcounts_are_rebuilt() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty(",refcount_bits=64", no_preparation));
    }
}

#[test]
fn small_clusters_rebuild_a_larger_refcount_table() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty(",cluster_size=512", no_preparation));
    }
}

#[test]
fn small_clusters_with_one_bit_refcounts_are_rebuilt() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty(
            ",cluster_size=512,refcount_bits=1",
            no_preparation,
        ));
    }
}

/// Writes data, then takes internal snapshot `s1` of it.
fn snapshot_first(image: &Path) -> bool {
    common::qemu_io(
        image,
        "qcow2",
        &[
            "write -P 7 0 8M".to_string(),
            "write -P 8 14M 2M".to_string(),
        ],
    );
    qemu_img(&["snapshot", "-c", "s1", path_str(image)]);
    true
}

#[test]
fn an_internal_snapshot_taken_before_the_crash_stays_intact() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty("", snapshot_first));
    }
}

#[test]
fn an_internal_snapshot_with_small_clusters_stays_intact() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty(",cluster_size=4096", snapshot_first));
    }
}

/// Replaces the image by a compressed copy of a filled raw image.
fn compressed_copy(image: &Path) -> bool {
    let raw = image.with_extension("raw");
    let mut data = vec![0u8; 16 << 20];
    for (index, chunk) in data.chunks_mut(4096).enumerate() {
        if index % 3 != 2 {
            chunk.copy_from_slice(&pattern(index as u64 % 5, 0, 4096));
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let (src, dst) = (path_str(&raw), path_str(image));
    let options = "lazy_refcounts=on";
    qemu_img(&[
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, src, dst,
    ]);
    false
}

#[test]
fn compressed_clusters_are_counted_once_per_reference() {
    if require_qemu() {
        repair_write_and_verify(&make_dirty("", compressed_copy));
    }
}

#[test]
fn persistent_bitmap_clusters_are_counted() {
    if !require_qemu() {
        return;
    }
    let dirty = make_dirty("", |image| {
        qemu_img(&["bitmap", "--add", path_str(image), "b0"]);
        common::qemu_io(image, "qcow2", &["write -P 9 1M 1M".to_string()]);
        false
    });
    let storage = Arc::new(FileStorage::open(&dirty.image, true).unwrap());
    // The engine does not maintain bitmaps yet and refuses to write them;
    // the repair, which comes first, must still count their clusters.
    match open_storage(storage, true) {
        Ok(image) => image.close().unwrap(),
        Err(FormatError::Unsupported { .. }) => {}
        Err(other) => panic!("unexpected error {other}"),
    }
    assert_eq!(incompatible_low(&dirty.image) & DIRTY, 0);
    qemu_img_check(&dirty.image);
}

#[test]
fn a_dirty_image_opened_read_only_is_readable_and_untouched() {
    if !require_qemu() {
        return;
    }
    let dirty = make_dirty("", no_preparation);
    let before = std::fs::read(&dirty.image).unwrap();
    let image = open_file(&dirty.image, false);
    assert_same_bytes(
        &read_all(&image),
        &convert_to_raw(&dirty.image),
        "read-only",
    );
    assert!(matches!(
        image.write(0, &[1], &NoBacking),
        Err(FormatError::ReadOnly)
    ));
    image.close().unwrap();
    drop(image);
    assert!(
        std::fs::read(&dirty.image).unwrap() == before,
        "the file changed"
    );
}

fn set_incompatible_bits(image: &Path, bits: u8) {
    let mut bytes = std::fs::read(image).unwrap();
    bytes[INCOMPATIBLE_LOW_BYTE] |= bits;
    std::fs::write(image, bytes).unwrap();
}

fn assert_corrupt_refuses_writes(image: &Path) {
    let before = std::fs::read(image).unwrap();
    let expected = convert_to_raw(image);
    let opened = open_file(image, true);
    assert_same_bytes(&read_all(&opened), &expected, "corrupt image read");
    let err = opened.write(0, &[1; 512], &NoBacking).unwrap_err();
    assert!(matches!(err, FormatError::Corrupt), "{err}");
    let err = opened.zero_range(0, 65536, &NoBacking).unwrap_err();
    assert!(matches!(err, FormatError::Corrupt), "{err}");
    opened.close().unwrap();
    drop(opened);
    assert!(std::fs::read(image).unwrap() == before, "the file changed");
}

#[test]
fn the_corrupt_bit_allows_reads_and_refuses_every_write() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("corrupt.qcow2");
    create_qcow2(path_str(&image), "4M", "");
    common::qemu_io(&image, "qcow2", &["write -P 5 0 1M".to_string()]);
    set_incompatible_bits(&image, CORRUPT);
    assert_corrupt_refuses_writes(&image);
}

#[test]
fn a_corrupt_dirty_image_is_neither_repaired_nor_written() {
    if !require_qemu() {
        return;
    }
    let dirty = make_dirty("", no_preparation);
    set_incompatible_bits(&dirty.image, CORRUPT);
    assert_corrupt_refuses_writes(&dirty.image);
}

/// Checks one crash image of a repair: QEMU reads the same data from it,
/// and it is clean, or still dirty and `qemu-img check -r all` cleans it.
fn verify_crash_image(bytes: &[u8], dir: &Path, expected: &[u8], what: &str) {
    let path = dir.join("crashed.qcow2");
    std::fs::write(&path, bytes).unwrap();
    assert_same_bytes(&convert_to_raw(&path), expected, what);
    let engine = open_storage(Arc::new(MemStorage::from_bytes(bytes.to_vec())), false);
    let engine = engine.unwrap_or_else(|e| panic!("{what}: engine cannot open: {e}"));
    assert_same_bytes(&read_all(&engine), expected, what);
    if bytes[INCOMPATIBLE_LOW_BYTE] & DIRTY != 0 {
        let out = Command::new("qemu-img")
            .args(["check", "-r", "all", path_str(&path)])
            .output()
            .unwrap();
        let code = out.status.code();
        assert!(
            code == Some(0),
            "{what}: qemu-img check -r all exit {code:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same_bytes(&convert_to_raw(&path), expected, what);
    }
    qemu_img_check(&path);
}

fn crash_during_repair(
    create_options: &str,
    prepare: impl FnOnce(&Path) -> bool,
    damage: impl FnOnce(&Path),
) {
    let dirty = make_dirty(create_options, prepare);
    damage(&dirty.image);
    let expected = convert_to_raw(&dirty.image);
    let storage = Arc::new(MemStorage::from_bytes(std::fs::read(&dirty.image).unwrap()));
    let image = open_storage(Arc::clone(&storage) as Arc<dyn Storage>, true).unwrap();
    let repair_ops = storage.op_count();
    drop(image);
    assert!(
        repair_ops > 3,
        "the repair logged only {repair_ops} operations"
    );
    eprintln!("the repair logged {repair_ops} operations");
    let dir = tempfile::tempdir().unwrap();
    for point in 0..=repair_ops {
        for mode in [
            CrashMode::DropAll,
            CrashMode::KeepAll,
            CrashMode::Subset { seed: point as u64 },
            CrashMode::TornSubset {
                seed: 1000 + point as u64,
            },
        ] {
            let crashed = storage.crash_at(point, mode).contents();
            let what = format!("crash at op {point} of {repair_ops} ({mode:?})");
            verify_crash_image(&crashed, dir.path(), &expected, &what);
        }
    }
}

#[test]
fn a_crash_at_any_instant_of_the_repair_leaves_a_repairable_image() {
    if require_qemu() {
        crash_during_repair("", no_preparation, |_| {});
    }
}

#[test]
fn a_crash_during_the_repair_of_a_snapshotted_image_is_repairable() {
    if require_qemu() {
        // A wrong COPIED flag makes the repair rewrite an L2 table too.
        crash_during_repair("", snapshot_first, |image| {
            patch_first_l2(image, |e| e, 80, |e| e | COPIED)
        });
    }
}

#[test]
fn the_report_counts_what_the_repair_fixed() {
    if !require_qemu() {
        return;
    }
    let dirty = make_dirty("", no_preparation);
    let storage = FileStorage::open(&dirty.image, true).unwrap();
    let mut header = Header::read(&storage).unwrap();
    let geometry = Geometry {
        cluster_bits: header.cluster_bits,
        extended_l2: false,
        refcount_order: header.refcount_order,
        external_data: false,
    };
    let report = repair(&storage, &mut header, &geometry).unwrap();
    // 4 MiB + 512 KiB + 1 + 1 MiB of 64 KiB clusters had no refcount.
    assert!(report.refcounts_fixed >= 64 + 8 + 1 + 16, "{report}");
    // The only clusters freed are the old refcount table and block.
    assert_eq!(report.leaks_freed, 2, "{report}");
    assert_eq!(report.refblocks, 1, "{report}");
    assert!(!header.incompatible.contains(Incompatible::DIRTY));
    assert_eq!(Header::read(&storage).unwrap(), header);
    qemu_img_check(&dirty.image);
}

fn be64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn a_reference_past_the_end_of_the_file_refuses_the_repair_and_changes_nothing() {
    if !require_qemu() {
        return;
    }
    let dirty = make_dirty("", no_preparation);
    let mut bytes = std::fs::read(&dirty.image).unwrap();
    let l1 = be64_at(&bytes, 40) as usize;
    let l2 = (be64_at(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let beyond = (bytes.len() as u64 + (1 << 30)) & !0xffff;
    bytes[l2 + 8..l2 + 16].copy_from_slice(&(beyond | 1 << 63).to_be_bytes());
    std::fs::write(&dirty.image, &bytes).unwrap();
    let storage = Arc::new(FileStorage::open(&dirty.image, true).unwrap());
    match open_storage(storage, true) {
        Err(err @ FormatError::Malformed { .. }) => {
            assert!(err.to_string().contains("past the end"), "{err}")
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a hostile dirty image was opened writable"),
    }
    assert!(
        std::fs::read(&dirty.image).unwrap() == bytes,
        "the file changed"
    );
}

const COPIED: u64 = 1 << 63;

/// Rewrites active L1 entry 0 and entry `index` of the L2 table it names
/// (standard 64-bit entries).
fn patch_first_l2(image: &Path, l1_patch: fn(u64) -> u64, index: usize, patch: fn(u64) -> u64) {
    let mut bytes = std::fs::read(image).unwrap();
    let l1 = be64_at(&bytes, 40) as usize;
    let l1_entry = be64_at(&bytes, l1);
    bytes[l1..l1 + 8].copy_from_slice(&l1_patch(l1_entry).to_be_bytes());
    let at = (l1_entry & 0x00ff_ffff_ffff_fe00) as usize + index * 8;
    let entry = be64_at(&bytes, at);
    assert_ne!(
        entry & 0x00ff_ffff_ffff_fe00,
        0,
        "L2 entry {index} is unallocated"
    );
    bytes[at..at + 8].copy_from_slice(&patch(entry).to_be_bytes());
    std::fs::write(image, bytes).unwrap();
}

#[test]
fn missing_copied_flags_are_set() {
    if require_qemu() {
        let dirty = make_dirty("", no_preparation);
        patch_first_l2(&dirty.image, |e| e & !COPIED, 0, |e| e & !COPIED);
        repair_write_and_verify(&dirty);
    }
}

#[test]
fn a_copied_flag_on_a_cluster_shared_with_a_snapshot_is_cleared_before_writing() {
    if require_qemu() {
        let dirty = make_dirty("", snapshot_first);
        // Guest 5 MiB (cluster 80) is still shared with s1, and the engine
        // writes there: written in place, s1 would change.
        patch_first_l2(&dirty.image, |e| e, 80, |e| e | COPIED);
        repair_write_and_verify(&dirty);
    }
}

#[test]
fn small_clusters_with_wide_refcounts_grow_the_refcount_table() {
    if !require_qemu() {
        return;
    }
    let dirty = make_dirty(",cluster_size=512,refcount_bits=64", no_preparation);
    repair_write_and_verify(&dirty);
    let header = std::fs::read(&dirty.image).unwrap();
    // 64 refcounts per block, 64 blocks per table cluster: 2 MiB per
    // table cluster, and the image is larger.
    assert!(u32::from_be_bytes(header[56..60].try_into().unwrap()) > 1);
}
