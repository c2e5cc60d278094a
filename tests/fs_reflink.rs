//! Jobs on XFS: data kept as it is in a host file is moved by the kernel
//! (`copy_file_range`), which on XFS shares the source's extents instead
//! of writing a copy. A stream and a commit of 96 MiB then take almost no
//! new space on the filesystem, and the images stay what QEMU reads.

mod common;

use std::path::{Path, PathBuf};

use common::mount::*;
use common::*;

/// Size of every image of the chain.
const SIZE: u64 = 128 * MIB;

/// An XFS filesystem with reflink in a loop file, mounted at `<dir>/xfs`
/// until dropped.
struct Xfs {
    mountpoint: PathBuf,
}

impl Xfs {
    fn new(dir: &Path) -> Xfs {
        let file = dir.join("xfs.img");
        // mkfs.xfs wants at least 300 MiB; the file stays sparse.
        std::fs::File::create(&file)
            .unwrap()
            .set_len(512 * MIB)
            .unwrap();
        run_ok("mkfs.xfs", &["-q", "-m", "reflink=1", path_str(&file)]);
        let mountpoint = dir.join("xfs");
        std::fs::create_dir(&mountpoint).unwrap();
        run_ok(
            "mount",
            &["-o", "loop", path_str(&file), path_str(&mountpoint)],
        );
        Xfs { mountpoint }
    }

    /// Bytes in use on the filesystem.
    fn used(&self) -> u64 {
        let out = run_ok("df", &["-B1", "--output=used", path_str(&self.mountpoint)]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = run_any("umount", &[path_str(&self.mountpoint)]);
    }
}

/// `base <- mid <- top` on XFS: base 0x11 over its first 32 MiB, mid 0x22
/// over the next 96 MiB, top empty. Returns the top.
fn chain_on(xfs: &Xfs) -> PathBuf {
    let dir = &xfs.mountpoint;
    let size = SIZE.to_string();
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", &size]);
    qemu_io(&dir.join("base.qcow2"), "qcow2", &["write -P 0x11 0 32M"]);
    chain::overlay(dir, "mid.qcow2", Some(("base.qcow2", "qcow2")), &size);
    qemu_io(&dir.join("mid.qcow2"), "qcow2", &["write -P 0x22 32M 96M"]);
    chain::overlay(dir, "top.qcow2", Some(("mid.qcow2", "qcow2")), &size);
    // What the kernel still holds dirty would blur the space figures.
    run_ok("sync", &[]);
    dir.join("top.qcow2")
}

/// Runs `command` on a chain on XFS and checks that the 96 MiB it moves
/// took less than an eighth of that in new space, that `changed` (the
/// image it wrote) passes `qemu-img check`, and that the top shows what it
/// showed before.
fn moves_by_sharing(command_text: &str, changed: &str) {
    if !require_all(&["mkfs.xfs", "mount", "df", "sync"]) || !require_fuse() || !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let xfs = Xfs::new(dir.path());
    let top = chain_on(&xfs);
    let before = convert_to_raw(&top);
    let m = mount_default(&top, dir.path());
    let used = xfs.used();
    command(&m, command_text).unwrap();
    let job = wait_for(&m, command_text, |job| job.get("outcome").is_some());
    assert_eq!(job["outcome"], "completed", "{job}");
    m.unmount();
    run_ok("sync", &[]);
    let grown = xfs.used().saturating_sub(used);
    assert!(
        grown < 96 * MIB / 8,
        "{command_text}: 96 MiB moved took {grown} new bytes: the extents were copied, not shared"
    );
    qemu_img_check(&xfs.mountpoint.join(changed));
    chain::assert_same("the top after the job", &convert_to_raw(&top), &before);
    drop(xfs);
}

#[test]
fn a_stream_on_xfs_shares_the_extents_it_copies() {
    moves_by_sharing("stream base=base.qcow2", "top.qcow2");
}

#[test]
fn a_commit_on_xfs_shares_the_extents_it_merges() {
    moves_by_sharing("commit top=mid.qcow2 base=base.qcow2", "base.qcow2");
}
