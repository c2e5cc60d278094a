//! The read matrix: a chain for every image kind SPEC §1 names, made and
//! filled by QEMU. `read_matrix.rs` reads them through chainfs and `info.rs`
//! compares `chainfs info` with `qemu-img info` on the same images.

use super::{TempChain, MIB};

/// Calls `$m!(case)` for every case of the matrix, so that each test
/// file gets one test per case and none is forgotten.
// Unused in the test files that do not iterate over the matrix.
#[allow(unused_macros)]
macro_rules! for_each_case {
    ($m:ident) => {
        $m!(compat_0_10);
        $m!(compat_1_1);
        $m!(cluster_512);
        $m!(cluster_4k);
        $m!(cluster_64k);
        $m!(cluster_2m);
        $m!(extended_l2);
        $m!(refcount_bits_1);
        $m!(refcount_bits_16);
        $m!(refcount_bits_64);
        $m!(compressed_zlib);
        $m!(compressed_zstd);
        $m!(zero_clusters);
        $m!(data_file);
        $m!(data_file_raw);
        $m!(raw_base);
        $m!(internal_snapshot);
        $m!(small_backing);
    };
}
#[allow(unused_imports)]
pub(crate) use for_each_case;

const K64: u64 = 64 << 10;

/// An image size that holds every write of [`layer_writes`].
pub fn size_for(cluster: u64) -> u64 {
    (8 * MIB).max(16 * cluster)
}

/// `qemu-io` writes for layer `layer` (0 = base) of a chain with
/// `cluster`-byte clusters and `size`-byte images: a whole cluster, a
/// short unaligned write, writes that start and end mid-cluster and span
/// cluster boundaries, an aligned multi-cluster write, and one that ends
/// at the last byte. Each layer shifts the offsets, so layers overlap in
/// part and every node reads differently.
pub fn layer_writes(layer: u64, cluster: u64, size: u64) -> Vec<String> {
    let shift = layer * (cluster / 3 + 17);
    let byte = 0x10 * (layer + 1);
    let w = |n: u64, offset: u64, len: u64| format!("write -P {:#x} {offset} {len}", byte + n);
    vec![
        w(0, shift, cluster),
        w(1, 3 + shift, 100),
        w(2, 2 * cluster - 777 + shift, 2 * cluster + 1555),
        w(3, 6 * cluster + 123 + shift, cluster / 2 + 7),
        w(4, (9 + 2 * layer) * cluster, 3 * cluster),
        w(5, size - 4097 - shift, 4097 + shift),
    ]
}

/// A qcow2 base and a qcow2 overlay, both created with `options`.
fn two_layers(cluster: u64, options: &str) -> TempChain {
    let size = size_for(cluster);
    TempChain::new()
        .qcow2_base("base.qcow2", size, options)
        .write(&layer_writes(0, cluster, size))
        .overlay("top.qcow2", None, options)
        .write(&layer_writes(1, cluster, size))
}

/// qcow2 version 2.
pub fn compat_0_10() -> TempChain {
    two_layers(K64, "compat=0.10")
}

/// qcow2 version 3.
pub fn compat_1_1() -> TempChain {
    two_layers(K64, "compat=1.1")
}

/// The smallest cluster size.
pub fn cluster_512() -> TempChain {
    two_layers(512, "cluster_size=512")
}

/// 4 KiB clusters.
pub fn cluster_4k() -> TempChain {
    two_layers(4096, "cluster_size=4096")
}

/// The default cluster size.
pub fn cluster_64k() -> TempChain {
    two_layers(K64, "cluster_size=65536")
}

/// The largest cluster size.
pub fn cluster_2m() -> TempChain {
    two_layers(2 * MIB, "cluster_size=2097152")
}

/// Extended L2 entries: an overlay whose writes cover parts of clusters,
/// so that allocated, zero and unallocated subclusters (reading the
/// backing file's data) sit side by side in one cluster.
pub fn extended_l2() -> TempChain {
    let size = size_for(K64);
    let options = "cluster_size=65536,extended_l2=on";
    let mut top = layer_writes(1, K64, size);
    top.extend(
        [
            "write -P 0x61 2048 2048",
            "write -P 0x62 10000 3000",
            "write -P 0x63 65000 1000",
            "write -z 135168 4096",
            "write -z -u 200704 8192",
            "write -P 0x64 300000 70000",
            "write -z 400000 5000",
        ]
        .map(String::from),
    );
    TempChain::new()
        .qcow2_base("base.qcow2", size, options)
        .write(&["write -P 0x5a 0 1M"])
        .write(&layer_writes(0, K64, size))
        .overlay("top.qcow2", None, options)
        .write(&top)
}

/// 1-bit refcounts.
pub fn refcount_bits_1() -> TempChain {
    two_layers(K64, "refcount_bits=1")
}

/// The default 16-bit refcounts.
pub fn refcount_bits_16() -> TempChain {
    two_layers(K64, "refcount_bits=16")
}

/// 64-bit refcounts.
pub fn refcount_bits_64() -> TempChain {
    two_layers(K64, "refcount_bits=64")
}

/// A compressed image (every cluster compressed by `qemu-img convert
/// -c`) under an uncompressed overlay.
fn compressed(compression_type: &str) -> TempChain {
    let size = size_for(K64);
    TempChain::new()
        .qcow2_base("source.qcow2", size, "")
        .write(&layer_writes(0, K64, size))
        .convert_compressed("compressed.qcow2", compression_type, "")
        .overlay("top.qcow2", None, "")
        .write(&layer_writes(1, K64, size))
}

/// Deflate-compressed clusters.
pub fn compressed_zlib() -> TempChain {
    compressed("zlib")
}

/// zstd-compressed clusters.
pub fn compressed_zstd() -> TempChain {
    compressed("zstd")
}

/// Zero clusters over data in the backing file, written with and
/// without unmap, whole and partial; and a zeroed range in the base.
pub fn zero_clusters() -> TempChain {
    TempChain::new()
        .qcow2_base("base.qcow2", 8 * MIB, "")
        .write(&["write -P 0x11 0 4M", "write -z -u 3M 64k"])
        .overlay("top.qcow2", None, "")
        .write(&[
            "write -z 64k 128k",
            "write -z -u 512k 192k",
            "write -z 1000 3000",
            "write -z -u 2097252 200000",
            "write -P 0x22 6M 64k",
            "write -z 6M 64k",
        ])
}

/// `data_file=PATH` for a data file `name` in the chain's directory.
/// The path is absolute because QEMU resolves a relative data file name
/// against its working directory, not the image's.
fn data_file_option(chain: &TempChain, name: &str) -> String {
    format!("data_file={}", chain.dir().join(name).display())
}

/// An overlay keeping its guest data in an external data file.
pub fn data_file() -> TempChain {
    let size = size_for(K64);
    let chain = TempChain::new();
    let option = data_file_option(&chain, "top.data");
    chain
        .qcow2_base("base.qcow2", size, "")
        .write(&layer_writes(0, K64, size))
        .overlay("top.qcow2", None, &option)
        .write(&layer_writes(1, K64, size))
}

/// A base whose external data file is itself a valid raw image
/// (`data_file_raw`, which QEMU allows only without a backing file),
/// under an ordinary overlay.
pub fn data_file_raw() -> TempChain {
    let size = size_for(K64);
    let chain = TempChain::new();
    let option = format!("{},data_file_raw=on", data_file_option(&chain, "base.data"));
    chain
        .qcow2_base("base.qcow2", size, &option)
        .write(&layer_writes(0, K64, size))
        .overlay("top.qcow2", None, "")
        .write(&layer_writes(1, K64, size))
}

/// A raw base under two qcow2 overlays.
pub fn raw_base() -> TempChain {
    let size = size_for(K64);
    TempChain::new()
        .raw_base("base.raw", size)
        .write(&layer_writes(0, K64, size))
        .overlay("mid.qcow2", None, "")
        .write(&layer_writes(1, K64, size))
        .overlay("top.qcow2", None, "cluster_size=4096")
        .write(&layer_writes(2, 4096, size))
}

/// An image holding internal snapshot `s1`, written to after it, so that
/// the active L1 table differs from the snapshot's and some clusters are
/// shared (refcount 2).
pub fn internal_snapshot() -> TempChain {
    let size = size_for(K64);
    TempChain::new()
        .qcow2_base("image.qcow2", size, "")
        .write(&layer_writes(0, K64, size))
        .snapshot("s1")
        .write(&layer_writes(1, K64, size))
}

/// A 1 MiB backing file under a 4 MiB overlay: past the backing file's
/// end the overlay reads zeros where it holds nothing.
pub fn small_backing() -> TempChain {
    TempChain::new()
        .qcow2_base("base.qcow2", MIB, "")
        .write(&["write -P 0x31 0 1M"])
        .overlay("top.qcow2", Some(4 * MIB), "")
        .write(&[
            "write -P 0x41 1047576 3000",
            "write -P 0x42 2M 70000",
            "write -P 0x43 4190000 4304",
        ])
}
