//! An ordinary user mounts through `fusermount3`, reads, writes and
//! unmounts; root is never required. The test re-runs itself as `nobody`
//! (through `setpriv`) when started as root.
//!
//! A host whose `/dev/fuse` is not open to other users (mode 0600) has
//! forbidden FUSE to ordinary users: `fusermount3` opens the device with
//! the caller's rights. There the test says so and checks nothing, even
//! under CI, since no program could pass it.
//!
//! The re-run is a copy of this test binary in a directory of its own
//! under `/tmp`, so that it works wherever root put the checkout.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::mount::mount_default;
use common::qemu_img_check;
use common::{create_qcow2, path_str, require_all, MIB};

/// Set in the re-run child: do the work instead of spawning.
const AS_USER: &str = "CHAINFS_TEST_AS_USER";
const NOBODY: &str = "65534";

fn mount_read_write_unmount(dir: &Path) {
    let top = dir.join("user.qcow2");
    create_qcow2(path_str(&top), "8M", "");
    let m = mount_default(&top, dir);
    let active = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("active"))
        .unwrap();
    active.write_all_at(&[0x77; 8192], MIB).unwrap();
    let mut back = [0; 8192];
    active.read_exact_at(&mut back, MIB).unwrap();
    assert_eq!(back, [0x77; 8192]);
    drop(active);
    m.unmount();
    qemu_img_check(&top);
}

/// Whether other users may read and write /dev/fuse.
fn fuse_open_to_users() -> bool {
    std::fs::metadata("/dev/fuse").is_ok_and(|m| m.permissions().mode() & 0o006 == 0o006)
}

#[test]
fn an_ordinary_user_mounts_reads_writes_and_unmounts_through_fusermount3() {
    if !require_all(&["fusermount3", "setpriv"]) {
        return;
    }
    if std::env::var_os(AS_USER).is_some() {
        let dir = tempfile::Builder::new()
            .prefix("chainfs-user-")
            .tempdir()
            .unwrap();
        return mount_read_write_unmount(dir.path());
    }
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        let dir = tempfile::tempdir().unwrap();
        return mount_read_write_unmount(dir.path());
    }
    if !fuse_open_to_users() {
        eprintln!(
            "!!!!!!!! SKIPPED: /dev/fuse is not open to ordinary users on this host !!!!!!!!"
        );
        return;
    }
    // The checkout may be where nobody cannot reach (under /root, in a
    // `mktemp -d` directory): run a copy of this test from a directory of
    // its own under /tmp, removed when the test ends.
    let reachable = tempfile::Builder::new()
        .prefix("chainfs-user-bin-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(reachable.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = reachable.path().join("fs_user");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let output = Command::new("setpriv")
        .current_dir("/")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "an_ordinary_user_mounts_reads_writes_and_unmounts_through_fusermount3",
        ])
        .args(["--nocapture", "--test-threads=1"])
        .env(AS_USER, "1")
        .env("TMPDIR", "/tmp")
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "as nobody:\n{text}");
    assert!(text.contains("1 passed"), "the child ran the test:\n{text}");
}
