//! Image chains for the tests, built by QEMU's own tools: [`TempChain`], a
//! builder that starts with a base and adds overlays; [`small_chain`], the
//! base plus overlay most mount tests start from; and the helpers of the
//! chain tests that name images relative to a test directory.

use std::path::{Path, PathBuf};

use chainfs::chain::{Chain, ChainOptions, NodeId};

use super::assert_same_bytes;
use super::tools::run_ok_in;
use super::tools::{create_overlay, create_qcow2, path_str, qemu_img, qemu_img_in, qemu_io};

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
        qemu_img_in(self.dir(), args);
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
        let size = size.map(|s| s.to_string());
        let backing = (backing_name.as_str(), backing.format);
        create_overlay(&path, backing, size.as_deref(), options);
        self.layers.push(Layer {
            path,
            format: "qcow2",
        });
        self
    }

    /// Runs `qemu-io` commands on the current top.
    pub fn write<S: AsRef<str>>(self, commands: &[S]) -> Self {
        let top = self.top_layer();
        qemu_io(&top.path, top.format, commands);
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

/// Base plus overlay, the chain most mount tests start from: base image
/// `base` in `dir` (raw when its name ends in `.img` or `.raw`, else
/// qcow2) of `size`, filled by `writes` through qemu-io, under
/// `top.qcow2` of the same size, which names its backing file relatively.
/// Returns the top.
pub fn base_and_overlay(dir: &Path, base: &str, size: &str, writes: &[&str]) -> PathBuf {
    let format = if base.ends_with(".img") || base.ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    };
    qemu_img_in(dir, &["create", "-q", "-f", format, base, size]);
    if !writes.is_empty() {
        qemu_io(&dir.join(base), format, writes);
    }
    overlay(dir, "top.qcow2", Some((base, format)), size);
    dir.join("top.qcow2")
}

/// The small base plus overlay of the command-line tests, in `dir`:
/// `base.qcow2` (0xaa at 0..1M) under `top.qcow2` (0xbb at 512K..1.5M),
/// 16 MiB each. Returns both, base first.
pub fn small_chain(dir: &Path) -> [PathBuf; 2] {
    let top = base_and_overlay(dir, "base.qcow2", "16M", &["write -P 0xaa 0 1M"]);
    qemu_io(&top, "qcow2", &["write -P 0xbb 512K 1M"]);
    [dir.join("base.qcow2"), top]
}

/// Creates a qcow2 overlay `name` in `dir` of `size` on `backing`
/// (`None`: no backing) with an explicit backing format.
pub fn overlay(dir: &Path, name: &str, backing: Option<(&str, &str)>, size: &str) {
    overlay_with(dir, name, backing, size, "");
}

/// [`overlay`] with `-o options` (none when empty), e.g.
/// `cluster_size=4096`.
pub fn overlay_with(
    dir: &Path,
    name: &str,
    backing: Option<(&str, &str)>,
    size: &str,
    options: &str,
) {
    match backing {
        Some(backing) => create_overlay(&dir.join(name), backing, Some(size), options),
        None => create_qcow2(path_str(&dir.join(name)), size, options),
    }
}

/// Runs one `qemu-io` command on the qcow2 image `image` alone, without
/// opening its backing file (for deep chains).
pub fn qemu_io_alone(dir: &Path, image: &str, command: &str) {
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{image}"}}}}"#
    );
    run_ok_in(Some(dir), "qemu-io", &["-c", command, &spec]);
}

/// Writes a raw image of `size` bytes filled with `byte` over `range`.
pub fn raw_image(path: &Path, size: usize, fill: Option<(std::ops::Range<usize>, u8)>) {
    let mut bytes = vec![0u8; size];
    if let Some((range, byte)) = fill {
        bytes[range].fill(byte);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Opens `top` read-only.
pub fn open(top: &Path) -> Chain {
    Chain::open(top, &ChainOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", top.display()))
}

/// Opens `top` writable.
pub fn open_writable(top: &Path) -> Chain {
    let options = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    Chain::open(top, &options).unwrap_or_else(|e| panic!("open {}: {e}", top.display()))
}

/// The whole content of `node` as the chain reads it.
pub fn read_node(chain: &Chain, node: NodeId) -> Vec<u8> {
    let size = chain.node(node).unwrap().virtual_size();
    let mut buf = vec![0xa5u8; size as usize];
    chain.read(node, 0, &mut buf).unwrap();
    buf
}

/// A fresh directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// `dir/name`.
pub fn at(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// [`assert_same_bytes`] with the description first, as the chain tests
/// call it.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_same_bytes(got, want, what);
}

/// Removes the backing-format header extension from the qcow2 image at
/// `path` by turning it into an unknown extension, which readers skip, so
/// the backing format must be probed (qemu-img no longer writes such
/// images itself).
pub fn drop_backing_format(path: &Path) {
    const BACKING_FORMAT: [u8; 4] = 0xe279_2acau32.to_be_bytes();
    const UNKNOWN: [u8; 4] = 0x1234_5678u32.to_be_bytes();
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == BACKING_FORMAT)
        .expect("a backing-format extension");
    bytes[at..at + 4].copy_from_slice(&UNKNOWN);
    std::fs::write(path, bytes).unwrap();
}

/// Closes the chain a test's [`LiveChain`] holds, once nothing else does
/// (the registry shut down and dropped).
pub fn close_live(live: std::sync::Arc<chainfs::jobs::registry::LiveChain>) {
    let Ok(live) = std::sync::Arc::try_unwrap(live) else {
        panic!("the live chain is still shared");
    };
    let Ok(chain) = live.into_chain() else {
        panic!("the chain is still shared");
    };
    chain.close().unwrap();
}
