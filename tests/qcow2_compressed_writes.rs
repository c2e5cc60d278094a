//! Compressed writes (what a backup with `compress=on` does) judged by
//! QEMU: clusters written compressed through the chain, over data the
//! backing file holds and over clusters the image held before, leave an
//! image that `qemu-img check` finds clean and that `qemu-img convert`
//! reads as what was written, with both compression types and the
//! layouts that change the arithmetic.

use chainfs::chain::bitmap::{Bits, Kind};
use chainfs::chain::{Chain, ChainOptions};

mod common;
use common::{convert_to_raw, pattern, qemu_img, qemu_img_check, require_qemu, TempChain};

/// Not a multiple of any cluster size: the last cluster is partial.
const SIZE: u64 = (3 << 20) + 1536;

/// One guest cluster's new content, by its kind (`index % 4`):
/// compressible text, zeros, noise that does not compress, half noise.
fn cluster_content(index: u64, len: usize) -> Vec<u8> {
    match index % 4 {
        0 => format!("cluster {index} of a compressed backup; ")
            .bytes()
            .cycle()
            .take(len)
            .collect(),
        1 => vec![0; len],
        2 => pattern(index, 0, len),
        _ => {
            let mut data = pattern(index, 0, len / 2);
            data.resize(len, 0x5a);
            data
        }
    }
}

/// Which ranges of the image are written compressed, each in one call.
#[derive(Clone, Copy, Debug)]
enum Spans {
    /// Every third cluster, one at a time, and the last.
    EveryThird,
    /// Runs of 1, 2, 3... clusters (many L2 tables' worth with small
    /// clusters) one cluster apart, up to the last.
    Runs,
}

impl Spans {
    /// The (offset, length) of each compressed write, for `cluster`.
    fn of(self, cluster: u64) -> Vec<(u64, u64)> {
        let mut spans = Vec::new();
        let mut at = 0;
        let mut run = 1;
        while at < SIZE {
            let clusters = match self {
                Spans::EveryThird => 1,
                Spans::Runs => run,
            };
            let len = (clusters * cluster).min(SIZE - at);
            spans.push((at, len));
            let gap = match self {
                Spans::EveryThird => 2 * cluster,
                Spans::Runs => cluster,
            };
            at += len + gap;
            run = run % 150 + 1;
            if at >= SIZE && at - gap < SIZE {
                // The last cluster was skipped: it is partial, and written.
                at = (SIZE - 1) / cluster * cluster;
            }
        }
        spans
    }
}

/// Writes the `spans` of the top image compressed (and, before, some of
/// them plain, so the compressed write replaces them), then checks the
/// image with QEMU's tools.
fn compressed_writes_are_what_qemu_reads(options: &str, spans: Spans) {
    let chain = TempChain::new()
        .raw_base("base.raw", SIZE)
        .write(&[format!("write -P 0x11 0 {SIZE}")])
        .overlay("top.qcow2", None, options)
        .write(&["write -P 0x22 0 256k"]);
    let mut expected = convert_to_raw(chain.top());
    let opened = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let image = Chain::open(chain.top(), &opened).unwrap();
    let top = image.active();
    let cluster = top.cluster_size().unwrap();
    top.bitmaps()
        .add("b0", Bits::new(65536, SIZE), true, Kind::Transient)
        .unwrap();
    let mut written = 0;
    for (offset, len) in spans.of(cluster) {
        let data: Vec<u8> = (offset..offset + len)
            .step_by(cluster as usize)
            .flat_map(|at| cluster_content(at / cluster / 3, cluster.min(SIZE - at) as usize))
            .collect();
        image.write_compressed(top.id(), offset, &data).unwrap();
        expected[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        written += len.div_ceil(cluster);
    }
    assert!(
        written >= 2,
        "{options}, {spans:?}: only {written} clusters written"
    );
    let recorded = top.bitmaps().infos()[0].count;
    assert!(
        recorded > 0,
        "{options}, {spans:?}: the bitmap recorded nothing"
    );
    image.close().unwrap();

    qemu_img_check(chain.top());
    let report: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "check",
        "--output=json",
        chain.top().to_str().unwrap(),
    ]))
    .unwrap();
    assert!(
        report["compressed-clusters"].as_u64().unwrap_or(0) > 0,
        "{options}, {spans:?}: no compressed cluster: {report}"
    );
    common::assert_same_bytes(&convert_to_raw(chain.top()), &expected, options);
}

#[test]
fn deflate_compressed_writes_pass_qemu_img_check_and_convert() {
    if !require_qemu() {
        return;
    }
    for options in [
        "",
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=16k,extended_l2=on",
    ] {
        for spans in [Spans::EveryThird, Spans::Runs] {
            compressed_writes_are_what_qemu_reads(options, spans);
        }
    }
}

#[test]
fn zstd_compressed_writes_pass_qemu_img_check_and_convert() {
    if !require_qemu() {
        return;
    }
    for options in [
        "compression_type=zstd",
        "compression_type=zstd,cluster_size=4096,refcount_bits=64",
        "compression_type=zstd,cluster_size=64k,extended_l2=on",
    ] {
        for spans in [Spans::EveryThird, Spans::Runs] {
            compressed_writes_are_what_qemu_reads(options, spans);
        }
    }
}

#[test]
fn a_raw_node_refuses_compressed_writes() {
    if !require_qemu() {
        return;
    }
    let chain = TempChain::new().raw_base("base.raw", 1 << 20);
    let opened = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let image = Chain::open(chain.top(), &opened).unwrap();
    let err = image
        .write_compressed(image.active().id(), 0, &[0; 65536])
        .unwrap_err();
    assert!(err.to_string().contains("qcow2"), "{err}");
}
