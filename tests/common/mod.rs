//! Helpers shared by the integration tests: driving `qemu-img` and `qemu-io`,
//! temporary image chains built by QEMU itself, byte patterns, and the read
//! matrix of image kinds that several test files check against QEMU.
//!
//! QEMU is the reference: images are made and filled by QEMU's own tools, and
//! whatever chainfs reads or writes is compared with what `qemu-img` says.

// Each test crate includes this module and uses a different part of it.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Whether we run under CI, where a missing tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Checks that `tool` can be run. Without it a test cannot check anything:
/// under CI that is a failure (panic); on a developer's machine the test says
/// so loudly and the caller returns early (false).
pub fn require_tool(tool: &str) -> bool {
    // Not `TOOL --version`: sh (dash) and e2fsprogs have no such option.
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if found {
        return true;
    }
    if in_ci() {
        panic!("{tool} is required but not installed (.ci/run installs it)");
    }
    eprintln!();
    eprintln!("!!!!!!!! SKIPPED: {tool} is not installed; this test checked NOTHING !!!!!!!!");
    eprintln!("!!!!!!!! install it (see .ci/run) to run the test                      !!!!!!!!");
    eprintln!();
    false
}

/// `require_tool` for both QEMU tools the tests drive.
pub fn require_qemu() -> bool {
    require_tool("qemu-img") && require_tool("qemu-io")
}

/// Runs `program` with `args`, panicking with its stderr unless it succeeds.
pub fn run_ok(program: &str, args: &[&str]) -> Output {
    run_ok_in(None, program, args)
}

/// `run_ok` in directory `cwd` (QEMU creates a relative `data_file` there).
pub fn run_ok_in(cwd: Option<&Path>, program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run {program}: {e}"),
    };
    if !output.status.success() {
        panic!(
            "{program} {} failed ({}):\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Runs `program` with `args` and returns whatever it did.
pub fn run_any(program: &str, args: &[&str]) -> Output {
    match Command::new(program).args(args).output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// Runs `qemu-img` and returns its stdout; panics if it fails.
pub fn qemu_img(args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok("qemu-img", args).stdout).into_owned()
}

/// Runs each of `commands` (e.g. `write -P 0x11 0 4k`) through one `qemu-io`
/// on `image`, which is opened with its backing chain.
pub fn qemu_io(image: &Path, format: &str, commands: &[String]) {
    let mut args: Vec<&str> = vec!["-f", format];
    for command in commands {
        args.push("-c");
        args.push(command);
    }
    let image = path_str(image);
    args.push(image);
    // qemu-io exits non-zero when any command fails.
    run_ok("qemu-io", &args);
}

/// A path as `&str`; test paths are always UTF-8.
pub fn path_str(path: &Path) -> &str {
    match path.to_str() {
        Some(s) => s,
        None => panic!("non-UTF-8 test path {}", path.display()),
    }
}

/// The guest content of `image` (with its backing chain) as QEMU reads it.
/// `-U` so that it also works while chainfs holds the image.
pub fn convert_to_raw(image: &Path) -> Vec<u8> {
    convert_with(image, &[])
}

/// The guest content of internal snapshot `snapshot` of `image`.
pub fn convert_snapshot_to_raw(image: &Path, snapshot: &str) -> Vec<u8> {
    let selector = format!("snapshot.name={snapshot}");
    convert_with(image, &["-l", &selector])
}

fn convert_with(image: &Path, extra: &[&str]) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("temp file: {e}"));
    let out_path = path_str(out.path());
    let mut args = vec!["convert", "-U", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[path_str(image), out_path]);
    qemu_img(&args);
    std::fs::read(out.path()).unwrap_or_else(|e| panic!("read {out_path}: {e}"))
}

/// Asserts that `qemu-img check` finds no errors, no corruptions and no
/// leaked clusters in `image`, which must be qcow2 (QEMU cannot check raw).
pub fn qemu_img_check(image: &Path) {
    let output = run_any(
        "qemu-img",
        &["check", "-U", "--output=json", path_str(image)],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {}: no JSON ({e}): {stdout}\n{}",
            image.display(),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let count = |key: &str| report.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(
        output.status.success()
            && count("check-errors") == 0
            && count("corruptions") == 0
            && count("leaks") == 0,
        "qemu-img check {} is not clean ({}):\n{stdout}\n{}",
        image.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `qemu-img info --backing-chain --output=json -U` of `image`, top first.
pub fn qemu_img_info_chain(image: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&[
        "info",
        "-U",
        "--backing-chain",
        "--output=json",
        path_str(image),
    ]);
    match serde_json::from_str(&out) {
        Ok(serde_json::Value::Array(nodes)) => nodes,
        other => panic!("qemu-img info: not a JSON array: {other:?}\n{out}"),
    }
}

/// A deterministic byte for guest `offset` under `seed`: different seeds give
/// different contents, and any slice can be regenerated from its offset.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    // A cheap mix (splitmix64's finaliser) so that neighbouring offsets and
    // seeds differ and no run of bytes repeats at a cluster stride.
    let mut x = offset ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) as u8
}

/// `len` bytes of the pattern of `seed` starting at guest `offset`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|o| pattern_byte(seed, o))
        .collect()
}

/// Compares two images' bytes, naming the first difference instead of
/// printing megabytes.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length {} but QEMU says {}",
        actual.len(),
        expected.len()
    );
    if let Some(first) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        let differing = actual.iter().zip(expected).filter(|(a, e)| a != e).count();
        let end = (first + 16).min(actual.len());
        panic!(
            "{what}: {differing} bytes differ, the first at offset {first:#x}: \
             got {:02x?}, QEMU has {:02x?}",
            &actual[first..end],
            &expected[first..end]
        );
    }
}

/// One image of a [`TempChain`].
#[derive(Clone, Debug)]
pub struct Layer {
    /// Absolute path of the image file.
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: &'static str,
}

/// A chain of images in a temporary directory, built base first by
/// `qemu-img create` and filled by `qemu-io`. Overlays name their backing
/// file relatively, as people usually do.
pub struct TempChain {
    dir: tempfile::TempDir,
    layers: Vec<Layer>,
}

impl Default for TempChain {
    fn default() -> Self {
        Self::new()
    }
}

impl TempChain {
    /// An empty chain in a fresh temporary directory.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("chainfs-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        TempChain {
            dir,
            layers: Vec::new(),
        }
    }

    /// The directory holding the images.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The images, base first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The top (active) image.
    pub fn top(&self) -> &Path {
        match self.layers.last() {
            Some(layer) => &layer.path,
            None => panic!("TempChain has no image yet"),
        }
    }

    fn top_layer(&self) -> &Layer {
        match self.layers.last() {
            Some(layer) => layer,
            None => panic!("TempChain has no image yet"),
        }
    }

    /// Runs `qemu-img` in the chain's directory, so that a relative name
    /// given by a test lands beside the images.
    fn qemu_img_here(&self, args: &[&str]) {
        run_ok_in(Some(self.dir()), "qemu-img", args);
    }

    /// Starts the chain with a sparse raw image of `size` bytes.
    pub fn raw_base(mut self, name: &str, size: u64) -> Self {
        let path = self.dir().join(name);
        let size = size.to_string();
        self.qemu_img_here(&["create", "-q", "-f", "raw", path_str(&path), &size]);
        self.layers.push(Layer {
            path,
            format: "raw",
        });
        self
    }

    /// Starts the chain with a qcow2 image; `options` go to `-o` (may be
    /// empty), e.g. `cluster_size=512,refcount_bits=1`.
    pub fn qcow2_base(mut self, name: &str, size: u64, options: &str) -> Self {
        let path = self.dir().join(name);
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !options.is_empty() {
            args.extend_from_slice(&["-o", options]);
        }
        args.extend_from_slice(&[path_str(&path), &size]);
        self.qemu_img_here(&args);
        self.layers.push(Layer {
            path,
            format: "qcow2",
        });
        self
    }

    /// Adds a qcow2 overlay backed by the current top (named by its file
    /// name, with its format). `size` None takes the backing file's size.
    pub fn overlay(mut self, name: &str, size: Option<u64>, options: &str) -> Self {
        let backing = self.top_layer().clone();
        let backing_name = file_name(&backing.path);
        let path = self.dir().join(name);
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", &backing_name];
        args.extend_from_slice(&["-F", backing.format]);
        if !options.is_empty() {
            args.extend_from_slice(&["-o", options]);
        }
        args.push(path_str(&path));
        let size = size.map(|s| s.to_string());
        if let Some(size) = &size {
            args.push(size);
        }
        self.qemu_img_here(&args);
        self.layers.push(Layer {
            path,
            format: "qcow2",
        });
        self
    }

    /// Runs `qemu-io` commands on the current top.
    pub fn write<S: AsRef<str>>(self, commands: &[S]) -> Self {
        let commands: Vec<String> = commands.iter().map(|c| c.as_ref().to_string()).collect();
        let top = self.top_layer();
        qemu_io(&top.path, top.format, &commands);
        self
    }

    /// Takes internal snapshot `name` of the current top.
    pub fn snapshot(self, name: &str) -> Self {
        qemu_img(&["snapshot", "-c", name, path_str(self.top())]);
        self
    }

    /// Replaces the chain by one standalone qcow2 image `name` holding the
    /// chain's content, every cluster compressed with `compression_type`
    /// (`zlib` or `zstd`). The old images stay in the directory.
    pub fn convert_compressed(mut self, name: &str, compression_type: &str, options: &str) -> Self {
        let path = self.dir().join(name);
        let mut opts = format!("compression_type={compression_type}");
        if !options.is_empty() {
            opts = format!("{opts},{options}");
        }
        self.qemu_img_here(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &opts,
            path_str(self.top()),
            path_str(&path),
        ]);
        self.layers = vec![Layer {
            path,
            format: "qcow2",
        }];
        self
    }
}

/// The file name of `path`, as an overlay names its backing file.
pub fn file_name(path: &Path) -> String {
    match path.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => panic!("{} has no file name", path.display()),
    }
}

/// The read matrix: a chain for every image kind SPEC §1 names, made and
/// filled by QEMU. `read_matrix.rs` reads them through chainfs and `info.rs`
/// compares `chainfs info` with `qemu-img info` on the same images.
pub mod cases {
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
}
