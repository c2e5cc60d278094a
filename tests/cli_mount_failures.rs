//! Every way `chainfs mount` can fail (SPEC §2) prints one line naming the
//! file and the reason, exits non-zero, leaves nothing mounted and leaves
//! every image byte-identical, in the background and with `-f`.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::chain::small_chain;
use common::cli::{chainfs, is_mounted, snapshot, MountGuard};
use common::{create_overlay, path_str, qemu_img, require_fuse, require_tool};

/// A test directory holding a chain and an empty mount point.
struct Setup {
    dir: tempfile::TempDir,
    images: Vec<PathBuf>,
    mnt: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = small_chain(dir.path()).to_vec();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        Setup { dir, images, mnt }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn top(&self) -> &Path {
        &self.images[1]
    }
}

/// Mounts `image` on `mnt` in each mode, expects the failure to mention
/// every one of `expected`, and checks nothing changed.
fn assert_mount_fails(setup: &Setup, image: &Path, mnt: &Path, expected: &[&str]) {
    let _guard = MountGuard(mnt.to_path_buf());
    let before = snapshot(&setup.images);
    for foreground in [false, true] {
        let mut args = vec!["mount"];
        if foreground {
            args.push("-f");
        }
        args.extend([path_str(image), path_str(mnt)]);
        let outcome = chainfs(&args);
        let line = outcome.one_line_failure();
        for fragment in expected {
            assert!(line.contains(fragment), "{line:?} lacks {fragment:?}");
        }
        assert!(!is_mounted(mnt), "{} was left mounted", mnt.display());
        assert!(snapshot(&setup.images) == before, "an image changed");
    }
}

#[test]
fn a_missing_image_is_named() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    let missing = setup.path("nope.qcow2");
    assert_mount_fails(
        &setup,
        &missing,
        &setup.mnt,
        &["nope.qcow2", "No such file"],
    );
}

#[test]
fn a_missing_backing_file_names_it_and_the_image_that_points_to_it() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    let orphan = setup.path("orphan.qcow2");
    create_overlay(&orphan, ("gone.qcow2", "qcow2"), Some("16M"), "");
    assert_mount_fails(&setup, &orphan, &setup.mnt, &["gone.qcow2", "orphan.qcow2"]);
}

#[test]
fn a_backing_loop_is_refused() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    // base now names top as its backing file: top → base → top.
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        path_str(&setup.images[0]),
    ]);
    assert_mount_fails(&setup, setup.top(), &setup.mnt, &["loop", "qcow2"]);
}

#[test]
fn a_hostile_header_is_refused() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    let top = setup.top().to_path_buf();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&top)
        .expect("open");
    // Header bytes 4..8: the version; 99 is no qcow2 version.
    file.write_all_at(&99u32.to_be_bytes(), 4)
        .expect("patch version");
    drop(file);
    assert_mount_fails(&setup, &top, &setup.mnt, &["top.qcow2", "version"]);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&top)
        .expect("open");
    // Back to version 3, but with 2^99-byte clusters (bytes 20..24).
    file.write_all_at(&3u32.to_be_bytes(), 4)
        .expect("patch version");
    file.write_all_at(&99u32.to_be_bytes(), 20)
        .expect("patch cluster_bits");
    drop(file);
    assert_mount_fails(&setup, &top, &setup.mnt, &["top.qcow2"]);
}

#[test]
fn a_non_empty_mount_point_is_refused() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    std::fs::write(setup.mnt.join("file"), b"x").expect("write");
    let expected = format!("{}: not an empty directory", setup.mnt.display());
    assert_mount_fails(&setup, setup.top(), &setup.mnt, &[&expected]);
}

#[test]
fn a_missing_mount_point_is_refused() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    let missing = setup.path("no-such-dir");
    let expected = format!("{}: no such directory", missing.display());
    assert_mount_fails(&setup, setup.top(), &missing, &[&expected]);
}

#[test]
fn a_file_as_mount_point_is_refused() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    let file = setup.path("a-file");
    std::fs::write(&file, b"x").expect("write");
    let expected = format!("{}: not a directory", file.display());
    assert_mount_fails(&setup, setup.top(), &file, &[&expected]);
}

#[test]
fn a_mount_point_that_is_already_a_chainfs_mount_is_refused() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    let _guard = MountGuard(setup.mnt.clone());
    chainfs([
        "mount",
        "--read-only",
        path_str(setup.top()),
        path_str(&setup.mnt),
    ])
    .ok();
    let again = chainfs([
        "mount",
        "--force-share",
        path_str(setup.top()),
        path_str(&setup.mnt),
    ]);
    assert!(again.one_line_failure().contains("already a mount point"));
    chainfs(["umount", path_str(&setup.mnt)]).ok();
}

/// Spawns `qemu-io` on `image`, writable, kept running by an open stdin,
/// and returns once it holds the image: it has answered a first read.
///
/// Probing with `qemu-img info` instead would race: while the probe runs it
/// holds a lock that makes a starting writer fail.
fn qemu_io_writer(image: &Path) -> Child {
    let log = File::create(image.with_extension("qemu-io.log")).expect("log");
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn qemu-io");
    let stdin = child.stdin.as_mut().expect("stdin");
    stdin.write_all(b"read 0 512\n").expect("send a read");
    stdin.flush().expect("flush");
    let stdout = child.stdout.take().expect("stdout");
    let answered = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("read 512/512 bytes"));
    let said = std::fs::read_to_string(image.with_extension("qemu-io.log")).unwrap_or_default();
    assert!(answered, "qemu-io did not open {}: {said}", image.display());
    child
}

/// Asserts that `image` is locked by a writer: `qemu-img info` (which
/// wants to share reading) is refused.
fn assert_locked(image: &Path) {
    let output = Command::new("qemu-img")
        .args(["info", path_str(image)])
        .output()
        .expect("qemu-img info");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("lock"),
        "{} is not locked: {stderr}",
        image.display()
    );
}

/// Kills a helper process when dropped, so that a failed test leaves no
/// QEMU holding its images.
struct Killer(Child);

impl Drop for Killer {
    fn drop(&mut self) {
        // Closing stdin ends qemu-io; qemu-storage-daemon needs a signal.
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_image_a_qemu_io_writer_holds_is_refused_and_force_share_mounts_it_read_only() {
    if !require_fuse() {
        return;
    }
    let setup = Setup::new();
    let _writer = Killer(qemu_io_writer(setup.top()));
    assert_locked(setup.top());
    assert_mount_fails(&setup, setup.top(), &setup.mnt, &["top.qcow2", "lock"]);

    let _guard = MountGuard(setup.mnt.clone());
    chainfs([
        "mount",
        "--force-share",
        path_str(setup.top()),
        path_str(&setup.mnt),
    ])
    .ok();
    let active = setup.mnt.join("active");
    let mode = std::fs::metadata(&active)
        .expect("stat active")
        .permissions();
    assert!(mode.readonly(), "--force-share implies --read-only");
    chainfs(["umount", path_str(&setup.mnt)]).ok();
}

#[test]
fn an_image_a_qemu_storage_daemon_exports_writable_is_refused() {
    if !require_fuse() || !require_tool("qemu-storage-daemon") {
        return;
    }
    let setup = Setup::new();
    let socket = setup.path("nbd.sock");
    let top = path_str(setup.top());
    let _daemon = Killer(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,filename={top},node-name=f"))
            .args(["--blockdev", "driver=qcow2,file=f,node-name=q"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", path_str(&socket)))
            .args(["--export", "type=nbd,id=e,node-name=q,writable=on"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon"),
    );
    // The daemon opens its block devices before it makes the NBD socket.
    assert!(
        common::cli::wait_until(Duration::from_secs(20), || socket.exists()),
        "qemu-storage-daemon never listened"
    );
    assert_locked(setup.top());
    assert_mount_fails(&setup, setup.top(), &setup.mnt, &["top.qcow2", "lock"]);
}
