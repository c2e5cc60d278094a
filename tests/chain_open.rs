//! Opening chains: backing resolution, formats, names, and the errors that
//! name the image at fault and the image pointing to it.

mod common;

use chainfs::chain::{Chain, ChainError, ChainOptions};
use chainfs::format::Format;
use common::chain::*;
use common::*;

#[test]
fn a_raw_image_is_a_chain_of_one_node() {
    let dir = tempdir();
    let path = at(dir.path(), "base.img");
    raw_image(&path, 1 << 20, Some((4096..8192, 0x5a)));
    let chain = open(&path);
    assert_eq!(chain.nodes().len(), 1);
    let node = chain.active();
    assert_eq!(node.name(), "base.img");
    assert_eq!(node.path(), path);
    assert_eq!(node.format(), Format::Raw);
    assert_eq!(node.virtual_size(), 1 << 20);
    assert_eq!(node.cluster_size(), None);
    assert_eq!(node.backing_file(), None);
    assert_eq!(node.backing_format(), None);
    assert!(node.allocated_bytes().unwrap() > 0);
    assert_same(
        "raw node",
        &read_node(&chain, node.id()),
        &std::fs::read(&path).unwrap(),
    );
    chain.close().unwrap();
}

#[test]
fn reads_outside_a_node_are_refused_with_enospc() {
    let dir = tempdir();
    let path = at(dir.path(), "base.img");
    raw_image(&path, 65536, None);
    let chain = open(&path);
    let id = chain.active().id();
    let mut buf = [0u8; 2];
    let err = chain.read(id, 65535, &mut buf).unwrap_err();
    assert!(
        matches!(err, ChainError::OutOfBounds { size: 65536, .. }),
        "{err}"
    );
    assert_eq!(err.errno(), libc::ENOSPC);
    assert!(chain.read(id, u64::MAX, &mut buf).is_err());
    chain.read(id, 65534, &mut buf).unwrap();
}

#[test]
fn a_read_only_chain_refuses_writes_with_erofs() {
    let dir = tempdir();
    let path = at(dir.path(), "base.img");
    raw_image(&path, 65536, None);
    let chain = open(&path);
    let err = chain.write(chain.active().id(), 0, b"x").unwrap_err();
    assert!(
        matches!(err, ChainError::ReadOnly { ref node } if node == "base.img"),
        "{err}"
    );
    assert_eq!(err.errno(), libc::EROFS);
    assert!(chain.zero_range(chain.active().id(), 0, 512).is_err());
}

#[test]
fn a_writable_raw_chain_writes_and_zeroes_through_to_the_file() {
    let dir = tempdir();
    let path = at(dir.path(), "base.img");
    raw_image(&path, 65536, Some((0..65536, 0xff)));
    let chain = open_writable(&path);
    let id = chain.active().id();
    chain.write(id, 100, b"hello").unwrap();
    chain.zero_range(id, 4096, 4096).unwrap();
    chain.flush().unwrap();
    let mut buf = [0u8; 5];
    chain.read(id, 100, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    chain.close().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[100..105], b"hello");
    assert!(bytes[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(bytes[8192], 0xff);
}

#[test]
fn force_share_cannot_be_combined_with_writing() {
    let dir = tempdir();
    let path = at(dir.path(), "base.img");
    raw_image(&path, 4096, None);
    let options = ChainOptions {
        writable: true,
        force_share: true,
        ..ChainOptions::default()
    };
    let err = Chain::open(&path, &options).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL, "{err}");
}

#[test]
fn a_missing_top_image_is_named_with_the_os_reason() {
    let dir = tempdir();
    let path = at(dir.path(), "nope.qcow2");
    let err = Chain::open(&path, &ChainOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains(path.to_str().unwrap()), "{text}");
    assert!(text.contains("No such file"), "{text}");
    assert_eq!(err.errno(), libc::ENOENT);
}

#[test]
fn nodes_are_found_by_name_active_or_path() {
    let dir = tempdir();
    let path = at(dir.path(), "base.img");
    raw_image(&path, 4096, None);
    let link = at(dir.path(), "link.img");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let chain = open(&path);
    let id = chain.active().id();
    assert_eq!(chain.find("base.img").map(|n| n.id()), Some(id));
    assert_eq!(chain.find("active").map(|n| n.id()), Some(id));
    assert_eq!(chain.find(path.to_str().unwrap()).map(|n| n.id()), Some(id));
    assert_eq!(chain.find(link.to_str().unwrap()).map(|n| n.id()), Some(id));
    assert!(chain.find("ctl").is_none());
    assert!(chain.find("other.img").is_none());
    assert!(chain.node(chainfs::chain::NodeId(99)).is_none());
}

#[test]
fn relative_backing_names_resolve_against_the_naming_images_directory() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let root = dir.path();
    for sub in ["base", "mid", "top"] {
        std::fs::create_dir(root.join(sub)).unwrap();
    }
    raw_image(&root.join("base/a.img"), 1 << 20, Some((0..4096, 1)));
    overlay(
        &root.join("mid"),
        "b.qcow2",
        Some(("../base/a.img", "raw")),
        "1M",
    );
    overlay(
        &root.join("top"),
        "c.qcow2",
        Some(("../mid/b.qcow2", "qcow2")),
        "1M",
    );
    let chain = open(&root.join("top/c.qcow2"));
    let names: Vec<_> = chain.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(names, ["a.img", "b.qcow2", "c.qcow2"]);
    let base = &chain.nodes()[0];
    assert_eq!(base.path(), root.join("top/../mid/../base/a.img"));
    assert_eq!(
        base.canonical_path(),
        root.join("base/a.img").canonicalize().unwrap()
    );
    let mid = &chain.nodes()[1];
    assert_eq!(mid.backing_file(), Some("../base/a.img"));
    assert_eq!(mid.backing_format(), Some(Format::Raw));
    assert_eq!(chain.active().backing_format(), Some(Format::Qcow2));
}

#[test]
fn a_missing_backing_file_names_it_and_the_image_pointing_to_it() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    overlay(dir.path(), "top.qcow2", Some(("gone.img", "raw")), "1M");
    let err = Chain::open(&at(dir.path(), "top.qcow2"), &ChainOptions::default()).unwrap_err();
    assert!(matches!(err, ChainError::MissingBacking { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(path_str(&at(dir.path(), "gone.img"))),
        "{text}"
    );
    assert!(
        text.contains(path_str(&at(dir.path(), "top.qcow2"))),
        "{text}"
    );
    assert!(text.contains("No such file"), "{text}");
    assert_eq!(err.errno(), libc::ENOENT);
}

#[test]
fn a_backing_file_of_the_wrong_format_names_both_images() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    raw_image(&at(dir.path(), "base.img"), 1 << 20, None);
    overlay(dir.path(), "top.qcow2", Some(("base.img", "qcow2")), "1M");
    let err = Chain::open(&at(dir.path(), "top.qcow2"), &ChainOptions::default()).unwrap_err();
    assert!(matches!(err, ChainError::BackingImage { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(path_str(&at(dir.path(), "base.img"))),
        "{text}"
    );
    assert!(
        text.contains(path_str(&at(dir.path(), "top.qcow2"))),
        "{text}"
    );
}

#[test]
fn a_backing_loop_is_refused_naming_both_images() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    overlay(d, "a.qcow2", None, "1M");
    overlay(d, "b.qcow2", Some(("a.qcow2", "qcow2")), "1M");
    qemu_img_in(
        d,
        &[
            "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
        ],
    );
    let err = Chain::open(&at(d, "a.qcow2"), &ChainOptions::default()).unwrap_err();
    assert!(matches!(err, ChainError::Loop { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(path_str(&at(d, "a.qcow2"))), "{text}");
    assert!(text.contains(path_str(&at(d, "b.qcow2"))), "{text}");
    assert_eq!(err.errno(), libc::ELOOP);
}

#[test]
fn an_image_backed_by_itself_is_a_loop() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    overlay(dir.path(), "a.qcow2", None, "1M");
    qemu_img_in(
        dir.path(),
        &[
            "rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2",
        ],
    );
    let err = Chain::open(&at(dir.path(), "a.qcow2"), &ChainOptions::default()).unwrap_err();
    assert!(matches!(err, ChainError::Loop { .. }), "{err:?}");
}

#[test]
fn a_loop_through_a_hard_link_is_caught() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    overlay(d, "a.qcow2", Some(("b.qcow2", "qcow2")), "1M");
    std::fs::hard_link(at(d, "a.qcow2"), at(d, "b.qcow2")).unwrap();
    let err = Chain::open(&at(d, "a.qcow2"), &ChainOptions::default()).unwrap_err();
    assert!(matches!(err, ChainError::Loop { .. }), "{err:?}");
}

#[test]
fn without_a_backing_format_the_backing_file_is_probed() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    raw_image(&at(d, "a.img"), 1 << 20, Some((0..65536, 7)));
    overlay(d, "b.qcow2", Some(("a.img", "raw")), "1M");
    overlay(d, "c.qcow2", Some(("b.qcow2", "qcow2")), "1M");
    // Drop the backing-format extensions: both formats must be probed.
    drop_backing_format(&at(d, "b.qcow2"));
    drop_backing_format(&at(d, "c.qcow2"));
    let chain = open(&at(d, "c.qcow2"));
    let formats: Vec<_> = chain.nodes().iter().map(|n| n.format()).collect();
    assert_eq!(formats, [Format::Raw, Format::Qcow2, Format::Qcow2]);
    assert_eq!(chain.active().backing_format(), None);
    assert_same(
        "probed chain",
        &read_node(&chain, chain.active().id()),
        &convert_to_raw(&at(d, "c.qcow2")),
    );
}

#[test]
fn network_protocols_are_refused_naming_the_image() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    overlay(
        dir.path(),
        "top.qcow2",
        Some(("nbd:localhost:10809", "raw")),
        "1M",
    );
    let err = Chain::open(&at(dir.path(), "top.qcow2"), &ChainOptions::default()).unwrap_err();
    assert!(
        matches!(err, ChainError::UnsupportedBacking { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("nbd"), "{text}");
    assert!(
        text.contains(path_str(&at(dir.path(), "top.qcow2"))),
        "{text}"
    );
}

#[test]
fn a_file_protocol_prefix_is_followed() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let base = at(dir.path(), "a.img");
    raw_image(&base, 1 << 20, None);
    let name = format!("file:{}", base.display());
    overlay(dir.path(), "top.qcow2", Some((&name, "raw")), "1M");
    let chain = open(&at(dir.path(), "top.qcow2"));
    assert_eq!(chain.nodes()[0].path(), base);
    assert_eq!(chain.active().backing_file(), Some(name.as_str()));
}

#[test]
fn duplicate_file_names_get_suffixes_below_the_top() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let root = dir.path();
    for sub in ["x", "y", "z"] {
        std::fs::create_dir(root.join(sub)).unwrap();
    }
    raw_image(&root.join("x/disk.img"), 1 << 20, None);
    overlay(
        &root.join("y"),
        "disk.img",
        Some(("../x/disk.img", "raw")),
        "1M",
    );
    overlay(
        &root.join("z"),
        "disk.img",
        Some(("../y/disk.img", "qcow2")),
        "1M",
    );
    let chain = open(&root.join("z/disk.img"));
    let names: Vec<_> = chain.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(names, ["disk.img~3", "disk.img~2", "disk.img"]);
    assert_eq!(
        chain.find("disk.img~3").map(|n| n.id()),
        Some(chain.nodes()[0].id())
    );
}

#[test]
fn create_image_refuses_bad_cluster_sizes_and_existing_files() {
    let dir = tempdir();
    let path = at(dir.path(), "new.qcow2");
    for cluster in [0, 256, 3000, 4 << 20] {
        let err = chainfs::chain::create_image(&path, 1 << 20, cluster, None).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{cluster}: {err}");
        assert!(!path.exists(), "nothing is created for a bad request");
    }
    raw_image(&path, 512, None);
    let err = chainfs::chain::create_image(&path, 1 << 20, 65536, None).unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST, "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap().len(),
        512,
        "an existing file is left alone"
    );
}

#[test]
fn create_image_makes_an_overlay_that_qemu_accepts_and_the_chain_reads_through() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let base = at(dir.path(), "base.img");
    raw_image(&base, 3 << 20, Some((100_000..300_000, 0x3c)));
    let top = at(dir.path(), "top.qcow2");
    chainfs::chain::create_image(&top, 3 << 20, 65536, Some(("base.img", Format::Raw))).unwrap();
    let info = qemu_img_in(dir.path(), &["info", "--output=json", "top.qcow2"]);
    assert!(
        info.contains("\"backing-filename\": \"base.img\""),
        "{info}"
    );
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    qemu_img_in(dir.path(), &["check", "top.qcow2"]);
    let chain = open_writable(&top);
    assert_eq!(chain.nodes().len(), 2);
    chain
        .write(chain.active().id(), 200_000, &[0x77; 4096])
        .unwrap();
    let mut want = std::fs::read(&base).unwrap();
    want[200_000..204_096].fill(0x77);
    assert_same(
        "new overlay",
        &read_node(&chain, chain.active().id()),
        &want,
    );
    chain.close().unwrap();
    qemu_img_in(dir.path(), &["check", "top.qcow2"]);
    assert_same(
        "after close",
        &convert_to_raw(&at(dir.path(), "top.qcow2")),
        &want,
    );
}

#[test]
fn a_missing_external_data_file_keeps_its_errno_and_is_named() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    qemu_img_in(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw",
            "top.qcow2",
            "1M",
        ],
    );
    std::fs::remove_file(at(dir.path(), "data.raw")).unwrap();
    let err = Chain::open(&at(dir.path(), "top.qcow2"), &ChainOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("\"data.raw\""), "{text}");
    assert!(
        text.contains(path_str(&at(dir.path(), "top.qcow2"))),
        "{text}"
    );
    assert_eq!(err.errno(), libc::ENOENT, "{text}");
}

#[test]
fn a_backing_name_that_is_not_utf8_is_followed_and_shown_with_replacements() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let name = OsStr::from_bytes(b"base\xff.raw");
    let base = dir.path().join(name);
    raw_image(&base, 1 << 20, Some((4096..8192, 0x5c)));
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(name)
        .arg(dir.path().join("top.qcow2"))
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let chain = open(&at(dir.path(), "top.qcow2"));
    assert_eq!(chain.nodes().len(), 2);
    assert_eq!(chain.nodes()[0].path(), base);
    // Shown (ctl/chain, info) with the invalid byte replaced.
    assert_eq!(chain.active().backing_file(), Some("base\u{fffd}.raw"));
    assert_same(
        "read through a non-UTF-8 backing name",
        &read_node(&chain, chain.active().id()),
        &std::fs::read(&base).unwrap(),
    );
}

#[test]
fn a_raw_image_of_odd_length_is_rounded_up_to_a_sector_as_in_qemu() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let path = at(dir.path(), "odd.raw");
    raw_image(&path, 1000, Some((0..1000, 0x3a)));
    let info = qemu_img_in(dir.path(), &["info", "--output=json", "odd.raw"]);
    assert!(info.contains("\"virtual-size\": 1024"), "{info}");
    let converted = convert_to_raw(&at(dir.path(), "odd.raw"));
    let chain = open_writable(&path);
    let id = chain.active().id();
    assert_eq!(chain.active().virtual_size(), 1024);
    assert_same("odd raw", &read_node(&chain, id), &converted);
    // A write into the tail sector extends the file, as QEMU's does.
    chain.write(id, 1010, b"tail").unwrap();
    chain.zero_range(id, 1016, 8).unwrap();
    chain.flush().unwrap();
    let mut tail = [0u8; 24];
    chain.read(id, 1000, &mut tail).unwrap();
    assert_eq!(&tail[10..14], b"tail");
    chain.close().unwrap();
    let mut expected = vec![0x3a; 1000];
    expected.extend_from_slice(&tail);
    assert_same(
        "after a tail write",
        &expected,
        &convert_to_raw(&at(dir.path(), "odd.raw")),
    );
}
