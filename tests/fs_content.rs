//! A real mount of a five-deep chain shows every node as QEMU reads it, and
//! reports allocation so that `du` and `cp --sparse` see what each node
//! holds.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::mount::{mounted, read_all, FiveChain, Fixture};
use common::{assert_same_bytes, create_qcow2, qemu_io, run_any, run_ok};
use common::{convert_to_raw, path_str, MIB};

#[test]
fn every_node_file_equals_qemu_img_convert_of_its_node() {
    let Some(chain) = FiveChain::gated(&[]) else {
        return;
    };
    let mounted = chain.mount();
    for name in FiveChain::names() {
        let image = chain.image(name);
        let expected = convert_to_raw(&image);
        let shown = read_all(&mounted.path(name));
        assert_same_bytes(&shown, &expected, name);
        let output = run_any(
            "qemu-img",
            &[
                "compare",
                "-U",
                "-f",
                "raw",
                "-F",
                FiveChain::format(name),
                path_str(&mounted.path(name)),
                path_str(&image),
            ],
        );
        assert!(
            output.status.success(),
            "qemu-img compare {name}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let active = read_all(&mounted.path("active"));
    assert_same_bytes(&active, &convert_to_raw(&chain.top()), "active");
    mounted.unmount();
}

#[test]
fn du_on_the_mount_shows_what_each_node_image_holds() {
    let Some(chain) = FiveChain::gated(&[]) else {
        return;
    };
    let mounted = chain.mount();
    for name in FiveChain::names() {
        let shown = std::fs::metadata(mounted.path(name)).unwrap();
        let image = std::fs::metadata(chain.image(name)).unwrap();
        assert_eq!(
            shown.len(),
            if name == "file-A.img" {
                48 * MIB
            } else {
                64 * MIB
            }
        );
        assert_eq!(
            shown.blocks(),
            image.blocks(),
            "{name}: st_blocks on the mount vs the image file"
        );
    }
    mounted.unmount();
}

/// `sparse.qcow2`, 1 GiB holding 1 MiB and 64 KiB of data far apart.
fn sparse_node(dir: &Path) -> PathBuf {
    let top = dir.join("sparse.qcow2");
    create_qcow2(path_str(&top), "1G", "");
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x5a 100M 1M", "write -P 0x6b 900M 64k"],
    );
    top
}

#[test]
fn cp_sparse_copies_only_the_data_of_a_mostly_empty_node() {
    let Some(Fixture {
        dir,
        top,
        m: mounted,
    }) = mounted(&["cp", "du"], sparse_node)
    else {
        return;
    };
    let copy = dir.path().join("copy.raw");
    run_ok(
        "cp",
        &[
            "--sparse=always",
            path_str(&mounted.path("sparse.qcow2")),
            path_str(&copy),
        ],
    );
    let du = run_ok("du", &["-k", path_str(&copy)]);
    let kib: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du prints a number");
    assert!(
        kib < 8 * 1024,
        "the copy of a 1 GiB node holding 1 MiB takes {kib} KiB"
    );
    assert_same_bytes(&read_all(&copy), &convert_to_raw(&top), "sparse copy");
    mounted.unmount();
}
