//! Tests of compressed clusters: descriptors, QEMU-written clusters of both
//! compression types, hostile streams, and round trips.

use std::path::Path;
use std::process::Command;

use proptest::prelude::*;

use super::encode::{compress, encode_descriptor};
use super::*;
use crate::storage::test_support::require_tool;

/// A deterministic generator, so a failure can be reproduced.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Guest data with every kind of cluster: compressible text, low-entropy
/// noise, long-range repeats, zeros, and incompressible noise.
fn source_data(clusters: usize, cluster_size: usize) -> Vec<u8> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut data = Vec::with_capacity(clusters * cluster_size);
    for index in 0..clusters {
        let start = data.len();
        match index % 5 {
            0 => {
                let text = format!("cluster {index} of chainfs test data; ");
                data.extend(text.bytes().cycle().take(cluster_size));
            }
            1 => data.extend((0..cluster_size).map(|_| b'a' + (rng.next() % 4) as u8)),
            2 => {
                // A 5000-byte period: the best matches reach beyond a 4 KiB
                // window, the small alphabet still compresses within one.
                let period: Vec<u8> = (0..5000).map(|_| b'0' + (rng.next() % 8) as u8).collect();
                data.extend(period.iter().cycle().take(cluster_size));
            }
            3 => data.resize(start + cluster_size, 0),
            _ => data.extend((0..cluster_size).map(|_| rng.next() as u8)),
        }
        assert_eq!(data.len(), start + cluster_size);
    }
    data
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().unwrap())
}

fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().unwrap())
}

/// Every compressed L2 entry of a qcow2 file (standard L2 entries), with the
/// guest offset it maps; parsed by hand, independently of the engine.
fn compressed_entries(image: &[u8]) -> (u32, CompressionType, Vec<(u64, u64)>) {
    let cluster_bits = be32(image, 20);
    let l1_size = be32(image, 36) as usize;
    let l1_offset = be64(image, 40) as usize;
    let header_length = be32(image, 100);
    let kind = match (header_length > 104).then(|| image[104]) {
        Some(1) => CompressionType::Zstd,
        _ => CompressionType::Deflate,
    };
    let cluster_size = 1usize << cluster_bits;
    let l2_entries = cluster_size / 8;
    let mut found = Vec::new();
    for l1_index in 0..l1_size {
        let l2_offset = (be64(image, l1_offset + 8 * l1_index) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2_offset == 0 {
            continue;
        }
        for l2_index in 0..l2_entries {
            let entry = be64(image, l2_offset + 8 * l2_index);
            if entry & (1 << 62) != 0 {
                let guest = ((l1_index * l2_entries + l2_index) * cluster_size) as u64;
                found.push((guest, entry));
            }
        }
    }
    (cluster_bits, kind, found)
}

/// Converts `raw` with `qemu-img convert -c` and checks every compressed
/// cluster against the source.
fn check_qemu_compressed(compression: &str, cluster_size: usize, clusters: usize) {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("source.raw");
    let qcow2_path = dir.path().join("compressed.qcow2");
    let source = source_data(clusters, cluster_size);
    std::fs::write(&raw_path, &source).unwrap();
    qemu_convert(&raw_path, &qcow2_path, compression, cluster_size);
    let image = std::fs::read(&qcow2_path).unwrap();
    let (cluster_bits, kind, entries) = compressed_entries(&image);
    assert_eq!(1usize << cluster_bits, cluster_size);
    let expected_kind = match compression {
        "zstd" => CompressionType::Zstd,
        _ => CompressionType::Deflate,
    };
    assert_eq!(kind, expected_kind);
    // At least the text and low-entropy clusters compress; zeros are left
    // unallocated and noise is stored as it is.
    assert!(
        entries.len() >= clusters * 2 / 5,
        "only {} compressed clusters",
        entries.len()
    );
    for (guest, entry) in entries {
        let descriptor = decode_descriptor(entry, cluster_bits);
        let start = descriptor.host_offset as usize;
        // The last descriptor may reach past the end of the file, which
        // reads as zeros.
        let mut input = vec![0u8; descriptor.compressed_len as usize];
        let available = image.len().saturating_sub(start).min(input.len());
        input[..available].copy_from_slice(&image[start..start + available]);
        let mut output = vec![0u8; cluster_size];
        decompress(kind, &input, &mut output)
            .unwrap_or_else(|err| panic!("cluster at guest {guest:#x}: {err}"));
        let guest = guest as usize;
        assert!(
            output == source[guest..guest + cluster_size],
            "cluster at guest {guest:#x} differs"
        );
    }
}

fn qemu_convert(raw: &Path, qcow2: &Path, compression: &str, cluster_size: usize) {
    let options = format!("compression_type={compression},cluster_size={cluster_size}");
    let status = Command::new("qemu-img")
        .args([
            "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &options,
        ])
        .arg(raw)
        .arg(qcow2)
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img convert failed");
}

#[test]
fn qemu_deflate_clusters_decompress_to_the_source() {
    for cluster_size in [512, 4096, 65536] {
        check_qemu_compressed("zlib", cluster_size, 40);
    }
}

#[test]
fn qemu_deflate_clusters_of_2_mib_decompress_to_the_source() {
    check_qemu_compressed("zlib", 2 << 20, 5);
}

#[test]
fn qemu_zstd_clusters_decompress_to_the_source() {
    for cluster_size in [512, 4096, 65536] {
        check_qemu_compressed("zstd", cluster_size, 40);
    }
}

#[test]
fn qemu_zstd_clusters_of_2_mib_decompress_to_the_source() {
    check_qemu_compressed("zstd", 2 << 20, 5);
}

#[test]
fn descriptor_follows_qemu_arithmetic() {
    // 64 KiB clusters: x = 54; offset 0x50203, 2 additional sectors.
    let entry = (1u64 << 62) | (2u64 << 54) | 0x50203;
    let descriptor = decode_descriptor(entry, 16);
    assert_eq!(descriptor.host_offset, 0x50203);
    assert_eq!(descriptor.compressed_len, 3 * 512 - 0x003);
    assert_eq!(descriptor.host_clusters(16), 5..=5);
}

#[test]
fn descriptor_ignores_the_flag_bits() {
    let plain = decode_descriptor(0x1234_5600, 16);
    let flagged = decode_descriptor((3 << 62) | 0x1234_5600, 16);
    assert_eq!(plain, flagged);
}

#[test]
fn descriptor_spanning_a_cluster_boundary_touches_both_clusters() {
    // 4 KiB clusters (x = 58): data starts 100 bytes before cluster 3.
    let offset = 3 * 4096 - 100;
    let entry = (1u64 << 62) | (1u64 << 58) | offset;
    let descriptor = decode_descriptor(entry, 12);
    assert_eq!(descriptor.compressed_len, 1024 - (offset & 511));
    assert_eq!(descriptor.host_clusters(12), 2..=3);
}

#[test]
fn descriptor_of_largest_sector_count_is_twice_a_cluster() {
    for cluster_bits in 9..=21u32 {
        let shift = 62 - (cluster_bits - 8);
        let all_sectors = ((1u64 << (cluster_bits - 8)) - 1) << shift;
        let descriptor = decode_descriptor(all_sectors, cluster_bits);
        assert_eq!(descriptor.host_offset, 0);
        assert_eq!(descriptor.compressed_len, 2 << cluster_bits);
        assert_eq!(descriptor.host_clusters(cluster_bits), 0..=1);
    }
}

#[test]
fn encode_descriptor_inverts_decode() {
    for cluster_bits in [9, 12, 16, 21] {
        for (offset, len) in [
            (0x10000, 1),
            (0x10001, 511),
            (0x101ff, 700),
            (7 << 30, 4000),
        ] {
            let len = len.min(1 << cluster_bits);
            let bits = encode_descriptor(offset, len, cluster_bits).unwrap();
            let descriptor = decode_descriptor(bits, cluster_bits);
            assert_eq!(descriptor.host_offset, offset);
            // Decoding rounds the length up to the end of the last sector.
            assert!(descriptor.compressed_len >= len);
            assert_eq!((offset + descriptor.compressed_len) % 512, 0);
        }
    }
}

#[test]
fn encode_descriptor_refuses_what_does_not_fit() {
    assert_eq!(encode_descriptor(1 << 54, 100, 16), None);
    assert_eq!(encode_descriptor(0, (2 << 16) + 1, 16), None);
    assert_eq!(encode_descriptor(0, 0, 16), None);
}

fn compressed_cluster(kind: CompressionType, cluster_size: usize) -> (Vec<u8>, Vec<u8>) {
    let data = source_data(1, cluster_size);
    let compressed = compress(kind, &data).unwrap();
    (data, compressed)
}

fn decompress_to_vec(kind: CompressionType, input: &[u8], len: usize) -> Result<Vec<u8>> {
    let mut output = vec![0u8; len];
    decompress(kind, input, &mut output).map(|()| output)
}

/// The message of a [`FormatError::Malformed`]; any other outcome fails the
/// test without printing a cluster of data.
fn malformed(result: Result<Vec<u8>>) -> String {
    match result {
        Err(err @ FormatError::Malformed { .. }) => err.to_string(),
        Err(err) => panic!("expected a malformed stream, got {err}"),
        Ok(_) => panic!("a bad stream was accepted"),
    }
}

const KINDS: [CompressionType; 2] = [CompressionType::Deflate, CompressionType::Zstd];

#[test]
fn trailing_bytes_after_the_stream_are_ignored() {
    for kind in KINDS {
        let (data, mut compressed) = compressed_cluster(kind, 65536);
        compressed.extend_from_slice(&[0xa5; 700]);
        assert_eq!(decompress_to_vec(kind, &compressed, 65536).unwrap(), data);
    }
}

#[test]
fn truncated_streams_are_malformed() {
    for kind in KINDS {
        let (_, compressed) = compressed_cluster(kind, 65536);
        let mut lengths = vec![0, 1, 5, compressed.len() / 2];
        // The last byte of a deflate stream may hold only the end-of-stream
        // code, which QEMU (and chainfs) do not need once the cluster is
        // full; a zstd frame needs all of its last block.
        if kind == CompressionType::Zstd {
            lengths.push(compressed.len() - 1);
        }
        for len in lengths {
            malformed(decompress_to_vec(kind, &compressed[..len], 65536));
        }
    }
}

#[test]
fn flipped_stream_headers_are_malformed() {
    // zstd: a damaged frame magic. deflate: block type 3, which is reserved.
    let (_, mut zstd_frame) = compressed_cluster(CompressionType::Zstd, 65536);
    zstd_frame[0] ^= 0xff;
    malformed(decompress_to_vec(CompressionType::Zstd, &zstd_frame, 65536));
    let (_, mut deflate_stream) = compressed_cluster(CompressionType::Deflate, 65536);
    deflate_stream[0] |= 0b110;
    malformed(decompress_to_vec(
        CompressionType::Deflate,
        &deflate_stream,
        65536,
    ));
}

#[test]
fn streams_shorter_than_a_cluster_are_malformed() {
    for kind in KINDS {
        let (_, compressed) = compressed_cluster(kind, 4096);
        let what = malformed(decompress_to_vec(kind, &compressed, 65536));
        assert!(what.contains("4096 of 65536"), "{what}");
    }
}

/// A zstd frame of `data` that declares a window of `2^window_log` bytes.
fn zstd_frame_with_window(data: &[u8], window_log: u32) -> Vec<u8> {
    let mut encoder = zstd::stream::raw::Encoder::new(3).unwrap();
    encoder
        .set_parameter(zstd::stream::raw::CParameter::WindowLog(window_log))
        .unwrap();
    let mut frame = Vec::new();
    let mut writer = zstd::stream::zio::Writer::new(&mut frame, encoder);
    std::io::Write::write_all(&mut writer, data).unwrap();
    writer.finish().unwrap();
    drop(writer);
    frame
}

#[test]
fn zstd_streams_longer_than_a_cluster_are_malformed() {
    // A small window, so that only the length gives the overflow away.
    let frame = zstd_frame_with_window(&source_data(2, 4096), 10);
    let what = malformed(decompress_to_vec(CompressionType::Zstd, &frame, 4096));
    assert!(what.contains("more than"), "{what}");
}

#[test]
fn deflate_streams_longer_than_a_cluster_are_cut_as_qemu_reads_them() {
    let (data, compressed) = compressed_cluster(CompressionType::Deflate, 65536);
    let output = decompress_to_vec(CompressionType::Deflate, &compressed, 4096).unwrap();
    assert_eq!(output, data[..4096]);
}

#[test]
fn zstd_frames_with_a_window_beyond_the_cluster_are_refused() {
    // A frame declaring a 128 KiB window for a 4 KiB cluster must not make
    // the decoder allocate for it.
    let frame = zstd_frame_with_window(&[7u8; 4096], 17);
    let what = malformed(decompress_to_vec(CompressionType::Zstd, &frame, 4096));
    assert!(what.contains("memory"), "{what}");
}

#[test]
fn zstd_stream_of_two_frames_fills_the_cluster() {
    let data = source_data(2, 2048);
    let mut frames = zstd::bulk::compress(&data[..2048], 3).unwrap();
    frames.extend(zstd::bulk::compress(&data[2048..], 3).unwrap());
    assert_eq!(
        decompress_to_vec(CompressionType::Zstd, &frames, 4096).unwrap(),
        data
    );
}

#[test]
fn incompressible_clusters_are_not_compressed() {
    let noise = source_data(5, 4096).split_off(4 * 4096);
    for kind in KINDS {
        assert_eq!(compress(kind, &noise), None);
    }
}

/// QEMU inflates with a 4 KiB window; python's zlib does the same with
/// `wbits=-12`, which rejects any reference further back.
#[test]
fn deflate_output_is_readable_with_a_4_kib_window() {
    let data = source_data(5, 65536);
    let cluster = &data[2 * 65536..3 * 65536];
    let compressed = compress(CompressionType::Deflate, cluster).unwrap();
    let Ok(child) = Command::new("python3")
        .args([
            "-c",
            "import sys, zlib; sys.stdout.buffer.write(zlib.decompressobj(-12).decompress(sys.stdin.buffer.read()))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        return;
    };
    let mut child = child;
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &compressed).unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "python zlib refused the stream");
    assert!(output.stdout == cluster, "python zlib read different data");
}

proptest! {
    #[test]
    fn compressed_clusters_round_trip(
        seed in any::<u64>(),
        cluster_bits in 9u32..=16,
        alphabet in 1u8..=255,
        zstd in any::<bool>(),
    ) {
        let kind = if zstd { CompressionType::Zstd } else { CompressionType::Deflate };
        let mut rng = XorShift(seed | 1);
        let data: Vec<u8> = (0..1usize << cluster_bits)
            .map(|_| (rng.next() % u64::from(alphabet)) as u8)
            .collect();
        if let Some(compressed) = compress(kind, &data) {
            prop_assert!(compressed.len() < data.len());
            prop_assert_eq!(decompress_to_vec(kind, &compressed, data.len()).unwrap(), data);
        }
    }

    #[test]
    fn damaged_streams_never_panic(
        seed in any::<u64>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        zstd in any::<bool>(),
    ) {
        let kind = if zstd { CompressionType::Zstd } else { CompressionType::Deflate };
        let mut rng = XorShift(seed | 1);
        let data: Vec<u8> = (0..4096).map(|_| (rng.next() % 6) as u8).collect();
        let mut compressed = compress(kind, &data).unwrap();
        for (at, xor) in flips {
            let len = compressed.len();
            compressed[at % len] ^= xor.max(1);
        }
        // Either an error or a full cluster; never a panic.
        let _ = decompress_to_vec(kind, &compressed, 4096);
    }
}
