//! Tests of the snapshot table: tables written by `qemu-img snapshot`, and
//! hostile variants of them.

use std::path::Path;
use std::process::Command;

use proptest::prelude::*;

use super::*;
use crate::format::qcow2::header::Header;
use crate::storage::test_support::require_qemu;
use crate::storage::MemStorage;

fn qemu(tool: &str, args: &[&str], path: &Path) -> String {
    let output = Command::new(tool).args(args).arg(path).output().unwrap();
    assert!(
        output.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A 4 MiB image with data written before each snapshot of `names`.
fn image_with_snapshots(dir: &Path, names: &[&str]) -> std::path::PathBuf {
    let path = dir.join("snap.qcow2");
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("4M")
        .status()
        .unwrap();
    assert!(created.success());
    for (index, name) in names.iter().enumerate() {
        let write = format!("write -P {} {}k 64k", index + 1, index * 64);
        qemu("qemu-io", &["-f", "qcow2", "-c", &write], &path);
        qemu("qemu-img", &["snapshot", "-c", name], &path);
    }
    path
}

/// The header and file bytes of an image.
fn load(path: &Path) -> (Header, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let header = Header::read(&MemStorage::from_bytes(bytes.clone())).unwrap();
    (header, bytes)
}

fn read_table(header: &Header, bytes: Vec<u8>) -> Result<Vec<Snapshot>> {
    let len = bytes.len() as u64;
    read_snapshot_table(
        &MemStorage::from_bytes(bytes),
        header.snapshots_offset,
        header.nb_snapshots,
        header.cluster_bits,
        len,
    )
}

fn reason(result: Result<Vec<Snapshot>>) -> String {
    match result {
        Err(err @ FormatError::Malformed { .. }) => err.to_string(),
        Err(err) => panic!("expected a malformed table, got {err}"),
        Ok(table) => panic!("a bad table was accepted: {table:?}"),
    }
}

#[test]
fn one_qemu_snapshot_reads_back() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (header, bytes) = load(&image_with_snapshots(dir.path(), &["s1"]));
    let table = read_table(&header, bytes.clone()).unwrap();
    assert_eq!(table.len(), 1);
    let snapshot = &table[0];
    assert_eq!((snapshot.id.as_str(), snapshot.name.as_str()), ("1", "s1"));
    assert_eq!(snapshot.l1_size, header.l1_size);
    assert_ne!(snapshot.l1_table_offset, header.l1_table_offset);
    assert_eq!(snapshot.disk_size, Some(4 << 20));
    assert_eq!(snapshot.vm_state_size, 0);
    // QEMU writes 24 bytes of extra data: VM state size, disk size, icount.
    assert_eq!(snapshot.extra_data.len(), 24);
    assert_eq!(snapshot.entry_len, 40 + 24 + 1 + 2);
    let range = table_range(header.snapshots_offset, &table);
    assert_eq!(range.end - range.start, 67);
    assert!(range.end <= bytes.len() as u64);
}

#[test]
fn several_qemu_snapshots_agree_with_qemu_img_info() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "first",
        "a",
        "third snapshot",
        "x".repeat(200).leak(),
        "last",
    ];
    let path = image_with_snapshots(dir.path(), &names);
    let (header, bytes) = load(&path);
    let table = read_table(&header, bytes).unwrap();
    let info = qemu("qemu-img", &["info", "--output=json"], &path);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let listed = info["snapshots"].as_array().unwrap();
    assert_eq!(table.len(), listed.len());
    for (snapshot, listed) in table.iter().zip(listed) {
        assert_eq!(listed["id"], snapshot.id.as_str());
        assert_eq!(listed["name"], snapshot.name.as_str());
        assert_eq!(listed["date-sec"], snapshot.date_sec);
        assert_eq!(listed["date-nsec"], snapshot.date_nsec);
        assert_eq!(listed["vm-state-size"], snapshot.vm_state_size);
        assert_eq!(snapshot.l1_table_offset % (1 << header.cluster_bits), 0);
    }
    // Entries are 8-byte aligned; the table ends right after the last one.
    let expected = names.iter().enumerate().fold(0u64, |size, (index, name)| {
        let id_len = (index + 1).to_string().len() as u64;
        size.next_multiple_of(8) + 40 + 24 + id_len + name.len() as u64
    });
    assert_eq!(table_size(&table), expected);
}

#[test]
fn no_snapshots_is_an_empty_table() {
    let bytes = vec![0u8; 4096];
    let table = read_snapshot_table(&MemStorage::from_bytes(bytes), 0, 0, 9, 4096).unwrap();
    assert!(table.is_empty());
    assert_eq!(table_range(0, &table), 0..0);
}

/// A qemu-made image with one snapshot, and the offset of its entry.
fn one_snapshot() -> Option<(Header, Vec<u8>, usize)> {
    if !require_qemu() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (header, bytes) = load(&image_with_snapshots(dir.path(), &["s1"]));
    let entry = header.snapshots_offset as usize;
    Some((header, bytes, entry))
}

#[test]
fn truncated_table_is_refused() {
    let Some((header, mut bytes, entry)) = one_snapshot() else {
        return;
    };
    for cut in [10, 40, 50, 65] {
        bytes.truncate(entry + cut);
        let what = reason(read_table(&header, bytes.clone()));
        assert!(what.contains("past the end of the file"), "{what}");
    }
}

#[test]
fn huge_id_size_is_refused() {
    let Some((header, mut bytes, entry)) = one_snapshot() else {
        return;
    };
    bytes[entry + 12..entry + 14].copy_from_slice(&0xffffu16.to_be_bytes());
    let what = reason(read_table(&header, bytes));
    assert!(what.contains("ID string (65535 bytes"), "{what}");
}

#[test]
fn unaligned_l1_offset_is_refused() {
    let Some((header, mut bytes, entry)) = one_snapshot() else {
        return;
    };
    let l1 = u64::from_be_bytes(bytes[entry..entry + 8].try_into().unwrap());
    bytes[entry..entry + 8].copy_from_slice(&(l1 + 512).to_be_bytes());
    let what = reason(read_table(&header, bytes));
    assert!(what.contains("not cluster aligned"), "{what}");
}

#[test]
fn l1_outside_the_file_is_refused() {
    let Some((header, mut bytes, entry)) = one_snapshot() else {
        return;
    };
    bytes[entry..entry + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let what = reason(read_table(&header, bytes.clone()));
    assert!(what.contains("outside the image"), "{what}");
    bytes[entry + 8..entry + 12].copy_from_slice(&(MAX_L1_ENTRIES + 1).to_be_bytes());
    let what = reason(read_table(&header, bytes));
    assert!(what.contains("at most"), "{what}");
}

#[test]
fn too_much_extra_data_is_refused() {
    let Some((header, mut bytes, entry)) = one_snapshot() else {
        return;
    };
    bytes[entry + 36..entry + 40].copy_from_slice(&(MAX_EXTRA_DATA + 1).to_be_bytes());
    let what = reason(read_table(&header, bytes));
    assert!(what.contains("extra data"), "{what}");
}

#[test]
fn bad_table_position_is_refused() {
    let Some((mut header, bytes, _)) = one_snapshot() else {
        return;
    };
    let good = header.clone();
    header.snapshots_offset += 8;
    assert!(reason(read_table(&header, bytes.clone())).contains("not cluster aligned"));
    header = good.clone();
    header.nb_snapshots = MAX_SNAPSHOTS + 1;
    assert!(reason(read_table(&header, bytes.clone())).contains("at most 65536"));
    header = good.clone();
    header.snapshots_offset = 0;
    assert!(reason(read_table(&header, bytes.clone())).contains("overlaps"));
    // More entries than the table holds: the next "entry" is whatever
    // follows, which must fail cleanly.
    header = good;
    header.nb_snapshots = 1000;
    reason(read_table(&header, bytes));
}

#[test]
fn entries_without_disk_size_fall_back_to_the_32_bit_fields() {
    // A version 2 style entry: no extra data.
    let mut bytes = vec![0u8; 2048];
    let entry = 1024;
    bytes[entry..entry + 8].copy_from_slice(&1536u64.to_be_bytes());
    bytes[entry + 8..entry + 12].copy_from_slice(&1u32.to_be_bytes());
    bytes[entry + 12..entry + 14].copy_from_slice(&1u16.to_be_bytes());
    bytes[entry + 32..entry + 36].copy_from_slice(&4096u32.to_be_bytes());
    bytes[entry + 40] = b'7';
    let table = read_snapshot_table(&MemStorage::from_bytes(bytes), 1024, 1, 9, 2048).unwrap();
    assert_eq!(table[0].id, "7");
    assert_eq!(table[0].vm_state_size, 4096);
    assert_eq!(table[0].disk_size, None);
    assert_eq!(table[0].entry_len, 41);
}

proptest! {
    #[test]
    fn random_tables_never_panic(
        table in proptest::collection::vec(any::<u8>(), 0..2048),
        count in 0u32..70000,
    ) {
        let mut bytes = vec![0u8; 512];
        bytes.extend_from_slice(&table);
        let len = bytes.len() as u64;
        let _ = read_snapshot_table(&MemStorage::from_bytes(bytes), 512, count, 9, len);
    }
}
