//! The refcount table grows and moves while an image is open, and then the
//! header is rewritten whole (rebacking, bitmaps stored at close or marked in
//! use again, autoclear bits cleared): every such rewrite must name the new
//! table, never the old one, whose clusters are freed and reused for data
//! (issue 13, item 1). With 512-byte clusters the table first covers 8 MiB
//! of host file, so a dozen MiB of writes moves it.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use chainfs::format::Qcow2;
use chainfs::format::{BackingRef, Format, NoBacking};
use chainfs::storage::{FileStorage, Storage};
use common::mount::{command, mounted, open_rw, wait_jobs, Fixture};
use common::{
    assert_same_bytes, convert_to_raw, create_overlay, create_qcow2, path_str, pattern, qemu_img,
    qemu_img_check, require_qemu, MIB,
};

const SIZE: u64 = 32 * MIB;

/// An image of [`SIZE`] with 512-byte clusters, made by qemu-img, with the
/// persistent bitmap `b0` when `bitmap` is set.
fn create(dir: &Path, bitmap: bool) -> std::path::PathBuf {
    let image = dir.join("img.qcow2");
    let size = SIZE.to_string();
    create_qcow2(path_str(&image), &size, "cluster_size=512");
    if bitmap {
        qemu_img(&["bitmap", "--add", path_str(&image), "b0"]);
    }
    image
}

fn open(image: &Path, writable: bool) -> Qcow2 {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(image, true).unwrap());
    common::engine::open_qcow2(storage, writable, 1 << 20)
}

/// `refcount_table_offset` as the file's header says now.
fn reftable_offset(image: &Path) -> u64 {
    let bytes = std::fs::read(image).unwrap();
    u64::from_be_bytes(bytes[48..56].try_into().unwrap())
}

/// Writes `len` bytes of pattern `seed` at `at` in 1 MiB pieces, into the
/// image and the model.
fn fill(image: &Qcow2, model: &mut [u8], seed: u64, at: u64, len: u64) {
    let mut pos = at;
    while pos < at + len {
        let n = MIB.min(at + len - pos) as usize;
        let data = pattern(seed, pos, n);
        image.write(pos, &data, &NoBacking).unwrap();
        model[pos as usize..pos as usize + n].copy_from_slice(&data);
        pos += n as u64;
    }
}

/// Writes enough to move the refcount table, and checks that it moved.
fn grow(image: &Qcow2, path: &Path, model: &mut [u8], seed: u64, at: u64) {
    let before = reftable_offset(path);
    fill(image, model, seed, at, 12 * MIB);
    image.flush().unwrap();
    assert_ne!(
        reftable_offset(path),
        before,
        "the refcount table did not move: the test checks nothing"
    );
}

fn check_against(image: &Path, model: &[u8], what: &str) {
    qemu_img_check(image);
    assert_same_bytes(model, &convert_to_raw(image), what);
}

#[test]
fn rebacking_after_the_refcount_table_moved_names_the_new_table() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), false);
    std::fs::write(dir.path().join("base.raw"), vec![0u8; SIZE as usize]).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let image = open(&path, true);
    grow(&image, &path, &mut model, 1, 0);
    let base = BackingRef {
        file: "base.raw".into(),
        format: Some(Format::Raw),
    };
    image.set_backing(Some(&base)).unwrap();
    // Writes after the rewrite land in the clusters the old table held.
    fill(&image, &mut model, 2, 14 * MIB, 4 * MIB);
    image.set_backing(None).unwrap();
    image.close().unwrap();
    drop(image);
    check_against(&path, &model, "after set_backing");
}

#[test]
fn bitmaps_stored_at_close_after_the_refcount_table_moved_name_the_new_table() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), true);
    let mut model = vec![0u8; SIZE as usize];
    let image = open(&path, true);
    grow(&image, &path, &mut model, 3, MIB);
    image.close().unwrap();
    drop(image);
    check_against(&path, &model, "after storing bitmaps");
    let info = qemu_img(&["info", "--output=json", path_str(&path)]);
    assert!(
        info.contains("\"b0\"") && !info.contains("in-use"),
        "bitmap b0 not stored cleanly: {info}"
    );
}

#[test]
fn switching_writable_off_and_on_after_moves_keeps_the_new_table() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), true);
    // An autoclear bit chainfs does not know (bit 40): the writable open
    // clears it with a whole-header write.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[88 + 2] |= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let image = open(&path, true);
    grow(&image, &path, &mut model, 4, 0);
    // Off: bitmaps stored (a whole-header write). On: marked in use again
    // (two more).
    image.set_writable(false).unwrap();
    image.set_writable(true).unwrap();
    grow(&image, &path, &mut model, 5, 12 * MIB);
    image.set_writable(false).unwrap();
    image.set_writable(true).unwrap();
    fill(&image, &mut model, 6, 24 * MIB, 4 * MIB);
    image.close().unwrap();
    drop(image);
    check_against(&path, &model, "after writable toggles");
    assert_eq!(
        std::fs::read(&path).unwrap()[88 + 2] & 0x01,
        0,
        "the unknown autoclear bit was kept"
    );
}

/// The first reproduction of issue 13, smaller: 12 MiB written through the
/// mount into an overlay with 512-byte clusters, then a stream, whose last
/// step rewrites the header without a backing file.
#[test]
fn a_stream_after_writes_moved_the_refcount_table_leaves_a_clean_image() {
    // What QEMU sees before the mount opens the chain.
    let (mut model, mut before) = (Vec::new(), 0);
    let Some(Fixture { dir: _dir, top, m }) = mounted(&[], |dir| {
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        create_qcow2(path_str(&base), "32M", "");
        common::qemu_io(&base, "qcow2", &["write -P 0x99 20M 1M"]);
        create_overlay(&top, ("base.qcow2", "qcow2"), None, "cluster_size=512");
        model = convert_to_raw(&top);
        before = reftable_offset(&top);
        top
    }) else {
        return;
    };
    let active = open_rw(&m, "active");
    for at in (0..12 * MIB).step_by(MIB as usize) {
        let data = pattern(7, at, MIB as usize);
        active.write_all_at(&data, at).unwrap();
        model[at as usize..(at + MIB) as usize].copy_from_slice(&data);
    }
    active.sync_all().unwrap();
    drop(active);
    assert_ne!(
        reftable_offset(&top),
        before,
        "the refcount table did not move"
    );
    command(&m, "stream\n").unwrap();
    let jobs = wait_jobs(&m);
    assert!(jobs[0]["outcome"] == "completed", "{jobs:?}");
    m.unmount();
    let info = qemu_img(&["info", "--output=json", path_str(&top)]);
    assert!(!info.contains("backing-filename"), "still backed: {info}");
    check_against(&top, &model, "after the stream");
}
