//! Locks as QEMU takes them: the writable top is the writer's, backing
//! files are shared for reading with nobody writing, `force_share` takes
//! none; and a failed open leaves every image as it was.

mod common;

use std::process::Command;

use chainfs::chain::{Chain, ChainError, ChainOptions};
use common::chain::*;
use common::*;

/// Builds `base.img` <- `top.qcow2` in `d`.
fn two_node_chain(d: &std::path::Path) {
    raw_image(&at(d, "base.img"), 1 << 20, Some((0..4096, 1)));
    overlay(d, "top.qcow2", Some(("base.img", "raw")), "1M");
}

/// Runs qemu-io with `args` in `d`; returns whether it succeeded and its
/// stderr.
fn try_qemu_io(d: &std::path::Path, args: &[&str]) -> (bool, String) {
    let output = Command::new("qemu-io")
        .args(args)
        .current_dir(d)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn qemu_cannot_write_an_image_a_writable_chain_holds() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    two_node_chain(d);
    let chain = open_writable(&at(d, "top.qcow2"));
    let (ok, stderr) = try_qemu_io(d, &["-f", "qcow2", "-c", "write 0 512", "top.qcow2"]);
    assert!(!ok && stderr.contains("Failed to get"), "{stderr}");
    let (ok, stderr) = try_qemu_io(d, &["-f", "raw", "-c", "write 0 512", "base.img"]);
    assert!(
        !ok && stderr.contains("Failed to get"),
        "backing files are not writable: {stderr}"
    );
    // Reading with -U is always allowed, as with QEMU.
    let (ok, stderr) = try_qemu_io(
        d,
        &["-U", "-r", "-f", "raw", "-c", "read 0 512", "base.img"],
    );
    assert!(ok, "{stderr}");
    chain.close().unwrap();
    let (ok, stderr) = try_qemu_io(d, &["-f", "qcow2", "-c", "write 0 512", "top.qcow2"]);
    assert!(ok, "locks are released on close: {stderr}");
}

#[test]
fn a_chain_cannot_open_an_image_qemu_is_writing_unless_force_shared() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    two_node_chain(d);
    let writer = open_writable(&at(d, "top.qcow2"));
    let err = Chain::open(&at(d, "top.qcow2"), &ChainOptions::default()).unwrap_err();
    assert!(matches!(err, ChainError::Lock { .. }), "{err:?}");
    assert_eq!(err.errno(), libc::EAGAIN);
    assert!(
        err.to_string().contains(path_str(&at(d, "top.qcow2"))),
        "{err}"
    );
    let options = ChainOptions {
        force_share: true,
        ..ChainOptions::default()
    };
    let shared = Chain::open(&at(d, "top.qcow2"), &options).unwrap();
    assert_eq!(shared.nodes().len(), 2);
    shared.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn read_only_chains_share_their_images() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    two_node_chain(d);
    let first = open(&at(d, "top.qcow2"));
    let second = open(&at(d, "top.qcow2"));
    let err = Chain::open(
        &at(d, "base.img"),
        &ChainOptions {
            writable: true,
            ..ChainOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, ChainError::Lock { .. }),
        "a shared backing file is not writable: {err:?}"
    );
    first.close().unwrap();
    second.close().unwrap();
}

#[test]
fn a_failed_writable_open_leaves_the_top_untouched() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    overlay(d, "top.qcow2", Some(("gone.img", "raw")), "1M");
    let before = std::fs::read(at(d, "top.qcow2")).unwrap();
    let options = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let err = Chain::open(&at(d, "top.qcow2"), &options).unwrap_err();
    assert!(matches!(err, ChainError::MissingBacking { .. }), "{err:?}");
    assert_eq!(std::fs::read(at(d, "top.qcow2")).unwrap(), before);
    // Nothing is left locked: once the backing file exists, it opens.
    raw_image(&at(d, "gone.img"), 1 << 20, None);
    open_writable(&at(d, "top.qcow2")).close().unwrap();
}

#[test]
fn a_backing_node_takes_writes_only_while_a_job_lets_it_and_locks_follow() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    raw_image(&at(d, "base.img"), 1 << 20, Some((0..4096, 1)));
    overlay(d, "mid.qcow2", Some(("base.img", "raw")), "1M");
    overlay(d, "top.qcow2", Some(("mid.qcow2", "qcow2")), "1M");
    let chain = open_writable(&at(d, "top.qcow2"));
    let mid = chain.find("mid.qcow2").unwrap();
    assert!(!mid.writable());
    assert!(matches!(
        chain.write(mid.id(), 0, &[7; 512]),
        Err(ChainError::ReadOnly { .. })
    ));
    mid.set_writable(true).unwrap();
    chain.write(mid.id(), 65536, &[7; 512]).unwrap();
    // Now nobody else may even read it without -U, as with a QEMU writer.
    let (ok, stderr) = try_qemu_io(d, &["-r", "-f", "qcow2", "-c", "read 0 512", "mid.qcow2"]);
    assert!(!ok && stderr.contains("Failed to get"), "{stderr}");
    mid.set_writable(false).unwrap();
    assert!(chain.write(mid.id(), 0, &[7; 512]).is_err());
    let (ok, stderr) = try_qemu_io(
        d,
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 7 65536 512",
            "mid.qcow2",
        ],
    );
    assert!(ok, "shared reading again, and the write is there: {stderr}");
    chain.close().unwrap();
    qemu_img_in(d, &["check", "mid.qcow2"]);

    let chain = Chain::open(
        &at(d, "top.qcow2"),
        &ChainOptions {
            force_share: true,
            ..ChainOptions::default()
        },
    )
    .unwrap();
    let mid = chain.find("mid.qcow2").unwrap();
    assert!(
        mid.set_writable(true).is_err(),
        "force-share takes no locks, so no writes"
    );
    chain.close().unwrap();
}
