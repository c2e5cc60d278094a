//! Tests of compressed writes: round trips through the reader with both
//! compression types, the uncompressed fallback, byte packing and its
//! refcounts, replaced entries, and failures that must not leak.

use std::collections::BTreeMap;
use std::process::Command;

use super::super::decode_descriptor;
use super::*;
use crate::format::qcow2::create::{create, CreateOptions};
use crate::format::qcow2::features::Incompatible;
use crate::format::qcow2::header::{CompressionType, Header};
use crate::format::{MetadataCache, OpenOptions};
use crate::storage::test_support::require_tool;
use crate::storage::{MemStorage, Storage};
use crate::sync::Arc;

const CS: u64 = 65536;

/// How the test image is laid out.
struct Layout {
    size: u64,
    cluster_bits: u32,
    extended_l2: bool,
    refcount_order: u32,
    zstd: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            size: 64 * CS,
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
            zstd: false,
        }
    }
}

fn new_image(layout: &Layout) -> (Arc<MemStorage>, Qcow2) {
    let storage = Arc::new(MemStorage::new());
    let options = CreateOptions {
        size: layout.size,
        cluster_bits: layout.cluster_bits,
        backing: None,
        extended_l2: layout.extended_l2,
        refcount_order: layout.refcount_order,
    };
    create(storage.as_ref(), &options).unwrap();
    if layout.zstd {
        let mut header = Header::read(storage.as_ref()).unwrap();
        header.compression_type = CompressionType::Zstd;
        header.incompatible |= Incompatible::COMPRESSION_TYPE;
        storage.write_at(&header.serialize().unwrap(), 0).unwrap();
    }
    let image = open(Arc::clone(&storage), true);
    (storage, image)
}

fn open(storage: Arc<MemStorage>, writable: bool) -> Qcow2 {
    let no_files = |_: &str, _: bool| -> std::io::Result<Arc<dyn Storage>> {
        Err(std::io::Error::from_raw_os_error(libc::ENOENT))
    };
    let options = OpenOptions {
        writable,
        cache: MetadataCache::new(1 << 20),
    };
    Qcow2::open(storage, &options, &no_files).unwrap()
}

/// A cluster whose first `noisy` bytes are noise and the rest zeros: it
/// compresses to a little more than `noisy` bytes.
fn cluster_with_noise(seed: u64, noisy: usize, cluster_size: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = vec![0u8; cluster_size];
    for byte in &mut data[..noisy] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    data
}

fn read(image: &Qcow2, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for hole in image.read(offset, &mut buf).unwrap() {
        buf[(hole.start - offset) as usize..(hole.end - offset) as usize].fill(0);
    }
    buf
}

fn compressed_word(image: &Qcow2, guest: u64) -> Option<u64> {
    match image.l2_entry(guest).unwrap() {
        L2Entry::Compressed(word) => Some(word),
        _ => None,
    }
}

/// Checks that each host cluster holding compressed data of `guests` has
/// the refcount QEMU gives it: one per compressed cluster touching it.
fn assert_refcounts_count_compressed(image: &Qcow2, guests: &[u64]) -> BTreeMap<u64, u64> {
    let bits = image.geometry.cluster_bits;
    let mut expected = BTreeMap::new();
    for &guest in guests {
        let word = compressed_word(image, guest).expect("a compressed cluster");
        for cluster in decode_descriptor(word, bits).host_clusters(bits) {
            *expected.entry(cluster << bits).or_insert(0u64) += 1;
        }
    }
    let mut meta = sync::lock(&image.meta);
    for (&host, &count) in &expected {
        let actual = meta
            .allocator
            .refcount(image.storage.as_ref(), host)
            .unwrap();
        assert_eq!(actual, count, "refcount of host cluster {host:#x}");
    }
    expected
}

/// `qemu-img check` of the image's bytes: no errors, and no leaks.
fn assert_qemu_check_clean(storage: &MemStorage) {
    assert_qemu_check(storage, false);
}

/// `qemu-img check` of the image's bytes: no errors, and no leaks unless
/// `allow_leaks`.
fn assert_qemu_check(storage: &MemStorage, allow_leaks: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checked.qcow2");
    std::fs::write(&path, storage.contents()).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(&path)
        .output()
        .unwrap();
    // Exit status 3: leaks, and nothing worse.
    let leaked = allow_leaks && out.status.code() == Some(3);
    assert!(
        out.status.success() || leaked,
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compressed_clusters_read_back_with_both_compression_types() {
    for zstd in [false, true] {
        let (_, image) = new_image(&Layout {
            zstd,
            ..Layout::default()
        });
        let clusters: Vec<Vec<u8>> = (0..6)
            .map(|i| cluster_with_noise(i, 1000 * (i as usize + 1), CS as usize))
            .collect();
        for (i, data) in clusters.iter().enumerate() {
            image.write_compressed(i as u64 * CS, data).unwrap();
        }
        for (i, data) in clusters.iter().enumerate() {
            let guest = i as u64 * CS;
            assert!(compressed_word(&image, guest).is_some(), "zstd {zstd}");
            assert_eq!(&read(&image, guest, CS as usize), data, "zstd {zstd}");
        }
        image.close().unwrap();
    }
}

#[test]
fn an_incompressible_cluster_is_written_as_it_is() {
    let (_, image) = new_image(&Layout::default());
    let noise = cluster_with_noise(7, CS as usize, CS as usize);
    image.write_compressed(3 * CS, &noise).unwrap();
    assert!(matches!(
        image.l2_entry(3 * CS).unwrap(),
        L2Entry::Data { copied: true, .. }
    ));
    assert_eq!(read(&image, 3 * CS, CS as usize), noise);
}

#[test]
fn small_compressed_clusters_share_one_host_cluster() {
    let (storage, image) = new_image(&Layout::default());
    let guests: Vec<u64> = (0..8).map(|i| i * CS).collect();
    for &guest in &guests {
        let data = cluster_with_noise(guest, 200, CS as usize);
        image.write_compressed(guest, &data).unwrap();
    }
    let hosts = assert_refcounts_count_compressed(&image, &guests);
    assert_eq!(
        hosts.len(),
        1,
        "eight small streams in one cluster: {hosts:x?}"
    );
    assert_eq!(hosts.values().next(), Some(&8));
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_check_clean(&storage);
    }
}

#[test]
fn a_stream_runs_on_into_the_next_host_cluster_and_both_count_it() {
    let (storage, image) = new_image(&Layout::default());
    // Streams of about 40 % of a cluster: the third starts near the end of
    // the first host cluster and runs into the next.
    let guests: Vec<u64> = (0..7).map(|i| i * CS).collect();
    let clusters: Vec<Vec<u8>> = guests
        .iter()
        .map(|&g| cluster_with_noise(g + 1, 26_000, CS as usize))
        .collect();
    for (&guest, data) in guests.iter().zip(&clusters) {
        image.write_compressed(guest, data).unwrap();
    }
    let bits = image.geometry.cluster_bits;
    let spanning = guests.iter().any(|&g| {
        let word = compressed_word(&image, g).unwrap();
        decode_descriptor(word, bits).host_clusters(bits).count() == 2
    });
    assert!(spanning, "no stream spans two host clusters");
    let hosts = assert_refcounts_count_compressed(&image, &guests);
    assert!(hosts.values().any(|&count| count >= 2), "{hosts:x?}");
    for (&guest, data) in guests.iter().zip(&clusters) {
        assert_eq!(&read(&image, guest, CS as usize), data);
    }
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_check_clean(&storage);
    }
    let reopened = open(storage, false);
    for (&guest, data) in guests.iter().zip(&clusters) {
        assert_eq!(&read(&reopened, guest, CS as usize), data);
    }
}

#[test]
fn one_bit_refcounts_give_each_stream_its_own_host_cluster() {
    let (storage, image) = new_image(&Layout {
        refcount_order: 0,
        ..Layout::default()
    });
    let guests: Vec<u64> = (0..4).map(|i| i * CS).collect();
    for &guest in &guests {
        image
            .write_compressed(guest, &cluster_with_noise(guest, 100, CS as usize))
            .unwrap();
    }
    let hosts = assert_refcounts_count_compressed(&image, &guests);
    assert_eq!(hosts.len(), 4, "{hosts:x?}");
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_check_clean(&storage);
    }
}

#[test]
fn a_compressed_write_replaces_what_the_cluster_held_and_frees_it() {
    let (storage, image) = new_image(&Layout::default());
    let plain = cluster_with_noise(1, CS as usize, CS as usize);
    image.write(0, &plain, &NoBacking).unwrap();
    image
        .write_compressed(CS, &cluster_with_noise(2, 300, CS as usize))
        .unwrap();
    // Over a plain cluster, then over a compressed one.
    let first = cluster_with_noise(3, 500, CS as usize);
    image.write_compressed(0, &first).unwrap();
    let second = cluster_with_noise(4, 700, CS as usize);
    image.write_compressed(CS, &second).unwrap();
    image.flush().unwrap();
    assert_eq!(read(&image, 0, CS as usize), first);
    assert_eq!(read(&image, CS, CS as usize), second);
    // A plain write over a compressed cluster takes it back out.
    image.write(0, &plain, &NoBacking).unwrap();
    assert_eq!(read(&image, 0, CS as usize), plain);
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_check_clean(&storage);
    }
}

#[test]
fn extended_l2_entries_of_compressed_clusters_have_no_subcluster_bits() {
    let (storage, image) = new_image(&Layout {
        extended_l2: true,
        ..Layout::default()
    });
    // A cluster with some subclusters allocated first: the compressed
    // entry replaces the bitmap too.
    image.write(CS + 4096, &[7u8; 4096], &NoBacking).unwrap();
    let data = cluster_with_noise(5, 3000, CS as usize);
    for guest in [0, CS] {
        image.write_compressed(guest, &data).unwrap();
        let (_, table) = image.l2_table_for(guest).unwrap().unwrap();
        let index = image.geometry.l2_index(guest);
        let (at, bytes) = table.encoded(index, &table.entry(&image.geometry, index).unwrap());
        assert_eq!(at, index * 16);
        assert_eq!(&bytes[8..], &[0u8; 8], "the subcluster bitmap is zero");
        assert_eq!(read(&image, guest, CS as usize), data);
    }
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_check_clean(&storage);
    }
}

#[test]
fn the_last_partial_cluster_is_padded_with_zeros() {
    let size = 3 * CS + 4096;
    let (storage, image) = new_image(&Layout {
        size,
        ..Layout::default()
    });
    let tail = cluster_with_noise(9, 1024, 4096);
    image.write_compressed(3 * CS, &tail).unwrap();
    assert!(compressed_word(&image, 3 * CS).is_some());
    assert_eq!(read(&image, 3 * CS, 4096), tail);
    image.close().unwrap();
    let reopened = open(storage, false);
    let mut cluster = vec![1u8; CS as usize];
    let word = compressed_word(&reopened, 3 * CS).unwrap();
    reopened
        .read_compressed(word, 3 * CS, &mut cluster)
        .unwrap();
    assert_eq!(&cluster[..4096], &tail[..]);
    assert!(cluster[4096..].iter().all(|&b| b == 0), "padding is zeros");
}

#[test]
fn anything_but_aligned_whole_clusters_is_refused() {
    let (_, image) = new_image(&Layout {
        size: 3 * CS + 4096,
        ..Layout::default()
    });
    let data = vec![0u8; CS as usize];
    for (offset, len) in [
        (512, CS),
        (0, CS - 512),
        (0, 2 * CS - 512),
        (CS, CS + 4096),
        (3 * CS, 2048),
        (0, 0),
    ] {
        let result = image.write_compressed(offset, &data.repeat(2)[..len as usize]);
        assert!(
            matches!(result, Err(FormatError::Unsupported { .. })),
            "{offset:#x}+{len}: {result:?}"
        );
    }
    assert!(matches!(
        image.write_compressed(3 * CS, &data),
        Err(FormatError::OutOfBounds { .. })
    ));
}

#[test]
fn a_failed_compressed_write_leaks_nothing() {
    let (storage, image) = new_image(&Layout::default());
    // Most of a host cluster used: a small stream fits in it, a large one
    // runs on into a fresh cluster.
    image
        .write_compressed(0, &cluster_with_noise(0, 40_000, CS as usize))
        .unwrap();
    // The first write fails (the raised refcount), or the sync before the
    // L2 entry does: either way the claimed bytes are given back.
    let faults: [&dyn Fn(); 2] = [&|| storage.fail_writes_after(0, libc::ENOSPC), &|| {
        storage.fail_syncs_after(0, libc::EIO)
    }];
    for (i, fault) in faults.iter().enumerate() {
        for noisy in [400, 30_000] {
            fault();
            let guest = (1 + i as u64) * CS;
            let result = image.write_compressed(guest, &cluster_with_noise(9, noisy, CS as usize));
            storage.clear_faults();
            assert!(result.is_err(), "fault {i}, {noisy} noisy bytes");
            assert_eq!(compressed_word(&image, guest), None);
        }
    }
    let last = cluster_with_noise(8, 400, CS as usize);
    image.write_compressed(8 * CS, &last).unwrap();
    assert_eq!(read(&image, 8 * CS, CS as usize), last);
    image.close().unwrap();
    if require_tool("qemu-img") {
        assert_qemu_check_clean(&storage);
    }
}

mod runs;
