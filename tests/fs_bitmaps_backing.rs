//! Persistent bitmaps of the nodes below the active one, through a real
//! mount: listed from the start (read as stored, not recording), left
//! untouched while their node takes no writes, and, once a commit has made
//! their node the writable active one, changed and stored so that QEMU's
//! tools see the change after the unmount.

mod common;

use std::path::{Path, PathBuf};

use common::bitmaps::*;
use common::mount::*;
use common::*;

const K64: u64 = 64 << 10;

/// `base.qcow2` (16 MiB) with three bitmaps QEMU made: `b` enabled, dirty
/// at 0 and 1 MiB (written by qemu-io), `d` disabled with the same bits,
/// `m` disabled and empty; under an empty `top.qcow2`. Returns the top.
fn backing_with_bitmaps(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let base_path = path_str(&base);
    create_qcow2(base_path, "16M", "");
    qemu_img(&["bitmap", "--add", base_path, "b"]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x11 0 4k", "write -P 0x22 1M 4k"],
    );
    qemu_img(&["bitmap", "--add", "--disable", base_path, "d"]);
    qemu_img(&["bitmap", "--merge", "b", base_path, "d"]);
    qemu_img(&["bitmap", "--add", "--disable", base_path, "m"]);
    let top = dir.join("top.qcow2");
    create_overlay(&top, ("base.qcow2", "qcow2"), None, "");
    top
}

/// Writes one byte at each of `offsets` through `active`.
fn poke(m: &Mounted, offsets: &[u64]) {
    let active = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("active"))
        .unwrap();
    for &offset in offsets {
        pwrite(&active, b"x", offset).unwrap();
    }
}

/// What QEMU sees of the bitmaps of `image`: name and flags.
fn qemu_flags(image: &Path) -> Vec<(String, serde_json::Value)> {
    qemu_bitmaps(image)
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_owned(),
                b["flags"].clone(),
            )
        })
        .collect()
}

#[test]
fn bitmaps_stored_in_a_backing_image_are_listed_and_left_alone() {
    let Some(Fixture { dir, top: _, m }) = mounted(&[], backing_with_bitmaps) else {
        return;
    };
    let base = dir.path().join("base.qcow2");
    let b = listed_one(&m.mnt, "base.qcow2", "b");
    assert_eq!(b["count"], 2 * K64, "{b}");
    assert_eq!(b["granularity"], K64);
    assert_eq!(b["persistent"], true);
    assert_eq!(b["inconsistent"], false);
    assert_eq!(b["recording"], false, "a backing node is not written");
    assert_eq!(dirty_bytes(&m.mnt, "base.qcow2", "d"), 2 * K64);
    assert_eq!(dirty_bytes(&m.mnt, "base.qcow2", "m"), 0);
    let text = String::from_utf8(read_all(&m.path("ctl/bitmaps"))).unwrap();
    assert!(
        text.contains("base.qcow2 b: granularity 65536, 131072 dirty bytes, persistent\n"),
        "{text}"
    );
    poke(&m, &[3 << 20]);
    assert_eq!(dirty_bytes(&m.mnt, "base.qcow2", "b"), 2 * K64);
    // Read-only bitmaps take no change, as in QEMU; reading them is fine.
    for text in [
        "bitmap-clear node=base.qcow2 name=b",
        "bitmap-disable node=base.qcow2 name=b",
        "bitmap-enable node=base.qcow2 name=m",
        "bitmap-remove node=base.qcow2 name=d",
        "bitmap-merge node=base.qcow2 target=m bitmaps=b",
    ] {
        assert_eq!(
            command(&m, &format!("{text}\n")),
            Err(libc::EINVAL),
            "{text}"
        );
    }
    command(&m, "bitmap-add node=base.qcow2 name=t\n").unwrap();
    command(&m, "bitmap-merge node=base.qcow2 target=t bitmaps=b,d\n").unwrap();
    assert_eq!(dirty_bytes(&m.mnt, "base.qcow2", "t"), 2 * K64);
    m.unmount();
    qemu_img_check(&base);
    let flags = qemu_flags(&base);
    assert_eq!(
        flags,
        [
            ("b".to_owned(), serde_json::json!(["auto"])),
            ("d".to_owned(), serde_json::json!([])),
            ("m".to_owned(), serde_json::json!([])),
        ]
    );
    for name in ["b", "d"] {
        assert_eq!(
            qemu_dirty_ranges(&base, name, dir.path()),
            [(0, K64), (1 << 20, K64)],
            "{name}"
        );
    }
}

#[test]
fn disabled_bitmaps_changed_after_a_commit_made_their_node_writable_are_stored() {
    let Some(Fixture { dir, top: _, m }) = mounted(&[], backing_with_bitmaps) else {
        return;
    };
    let base = dir.path().join("base.qcow2");
    command(&m, "commit top=active base=base.qcow2 id=c\n").unwrap();
    assert_eq!(wait_ready(&m, "c")["status"], "ready");
    command(&m, "complete id=c\n").unwrap();
    assert_eq!(wait_outcome(&m, "c")["outcome"], "completed");
    // The base is the active node now: its enabled bitmap records.
    assert_eq!(listed_one(&m.mnt, "base.qcow2", "b")["recording"], true);
    command(&m, "bitmap-clear node=base.qcow2 name=d\n").unwrap();
    command(&m, "bitmap-add node=base.qcow2 name=t\n").unwrap();
    poke(&m, &[5 << 20]);
    command(&m, "bitmap-merge node=base.qcow2 target=m bitmaps=t\n").unwrap();
    assert_eq!(dirty_bytes(&m.mnt, "base.qcow2", "d"), 0);
    assert_eq!(dirty_bytes(&m.mnt, "base.qcow2", "m"), K64);
    m.unmount();
    qemu_img_check(&base);
    assert_eq!(
        qemu_flags(&base),
        [
            ("b".to_owned(), serde_json::json!(["auto"])),
            ("d".to_owned(), serde_json::json!([])),
            ("m".to_owned(), serde_json::json!([])),
        ]
    );
    assert_eq!(qemu_dirty_ranges(&base, "d", dir.path()), []);
    assert_eq!(qemu_dirty_ranges(&base, "m", dir.path()), [(5 << 20, K64)]);
    assert_eq!(
        qemu_dirty_ranges(&base, "b", dir.path()),
        [(0, K64), (1 << 20, K64), (5 << 20, K64)]
    );
}
