//! Helpers shared by the chain tests (`tests/chain_*.rs` include this file
//! with `#[path]`): building images with `qemu-img` and `qemu-io`, and
//! reading nodes back.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use chainfs::chain::{Chain, ChainOptions, NodeId};

/// Whether `qemu-img` and `qemu-io` can be run. Without them a test is
/// skipped, except under CI (`CI` set), where that is a failure.
pub fn have_qemu() -> bool {
    let found = ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found && std::env::var_os("CI").is_some() {
        panic!("qemu-img and qemu-io are required under CI");
    }
    if !found {
        eprintln!("skipped: qemu-img or qemu-io not found");
    }
    found
}

/// Runs `program` with `args` in `dir`; panics with its stderr on failure.
pub fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `qemu-img ARGS` in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    run(dir, "qemu-img", args)
}

/// Creates a qcow2 overlay `name` in `dir` of `size` on `backing`
/// (`None`: no backing) with an explicit backing format.
pub fn overlay(dir: &Path, name: &str, backing: Option<(&str, &str)>, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some((file, format)) = backing {
        args.extend(["-u", "-b", file, "-F", format]);
    }
    args.extend([name, size]);
    qemu_img(dir, &args);
}

/// Runs one `qemu-io` command on `image` (whose chain qemu-io opens).
pub fn qemu_io(dir: &Path, image: &str, format: &str, command: &str) {
    run(dir, "qemu-io", &["-f", format, "-c", command, image]);
}

/// Runs one `qemu-io` command on the qcow2 image `image` alone, without
/// opening its backing file (for deep chains).
pub fn qemu_io_alone(dir: &Path, image: &str, command: &str) {
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{image}"}}}}"#
    );
    run(dir, "qemu-io", &["-c", command, &spec]);
}

/// `qemu-img convert -O raw` of `image`: what a guest of it sees.
pub fn convert_raw(dir: &Path, image: &str) -> Vec<u8> {
    let out = dir.join(format!("{}.converted", image.replace('/', "_")));
    qemu_img(dir, &["convert", "-O", "raw", image, out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
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

/// `dir/name` as a string.
pub fn path_str(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

/// `dir/name`.
pub fn at(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Asserts that two byte strings are equal, reporting the first difference
/// instead of dumping megabytes.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#x}, want {:#x}",
            got[i], want[i]
        );
    }
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
