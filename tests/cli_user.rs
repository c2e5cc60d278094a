//! An ordinary user mounts, reads, writes and unmounts through
//! `fusermount3`, without root; another user (and root) cannot see into the
//! mount unless it was made with `--allow-other`.
//!
//! Needs root to set the stage, as CI has: it creates the users
//! `chainfs-test` and `chainfs-test2` if missing, and makes the host look
//! like a stock distribution where it does not: `/dev/fuse` mode 0666 (what
//! udev sets everywhere; fuser opens the device itself) and
//! `user_allow_other` in `/etc/fuse.conf` (which `--allow-other` needs for
//! an ordinary user, as for sshfs).
//!
//! The checkout may be where no ordinary user can reach (under `/root`, in
//! a `mktemp -d` directory): everything the users run or open (the binary,
//! the images) is copied to a directory of its own under `/tmp`, removed
//! when the test ends.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::chain::small_chain;
use common::cli::{chainfs_bin, is_mounted, processes_of, run, MountGuard, Outcome};
use common::{path_str, qemu_img_check, qemu_io, require_fuse};

const USER: &str = "chainfs-test";
const OTHER: &str = "chainfs-test2";

/// Root sets the stage; without root the test cannot run (under CI that
/// is a failure).
fn prepare_host() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        if common::in_ci() {
            panic!("cli_user needs root under CI");
        }
        eprintln!("!!!!!!!! SKIPPED: cli_user needs root to create its users !!!!!!!!");
        return false;
    }
    for user in [USER, OTHER] {
        let exists = Command::new("id")
            .arg(user)
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            run(Command::new("useradd").args(["-M", user])).ok();
        }
    }
    let device = Path::new("/dev/fuse");
    let mode = std::fs::metadata(device)
        .expect("/dev/fuse")
        .permissions()
        .mode();
    if mode & 0o666 != 0o666 {
        std::fs::set_permissions(device, std::fs::Permissions::from_mode(0o666))
            .expect("chmod /dev/fuse");
    }
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if !conf.lines().any(|line| line.trim() == "user_allow_other") {
        std::fs::write("/etc/fuse.conf", format!("{conf}\nuser_allow_other\n"))
            .expect("edit /etc/fuse.conf");
    }
    true
}

/// Runs `program ARGS` as `user`, from `/` (the test's own directory may
/// be closed to it).
fn as_user(user: &str, program: &str, args: &[&str]) -> Outcome {
    run(Command::new("runuser")
        .current_dir("/")
        .args(["-u", user, "--", program])
        .args(args))
}

/// A chain, a mount point and a copy of the binary, owned by USER in a
/// directory under `/tmp` that every user may enter.
struct Setup {
    // Dropped first: the guard looks at the mount point, in `dir`.
    _guard: MountGuard,
    dir: tempfile::TempDir,
    bin: PathBuf,
    images: [PathBuf; 2],
    mnt: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        // Not TMPDIR: only /tmp is sure to be open to every user.
        let dir = tempfile::Builder::new()
            .prefix("chainfs-user-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let bin = dir.path().join("chainfs");
        std::fs::copy(chainfs_bin(), &bin).expect("copy chainfs");
        let images = small_chain(dir.path());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        std::fs::write(dir.path().join("pattern"), [0x6du8; 65536]).expect("pattern");
        run(Command::new("chown").args(["-R", USER, path_str(dir.path())])).ok();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Setup {
            _guard: MountGuard(mnt.clone()),
            dir,
            bin,
            images,
            mnt,
        }
    }

    fn node(&self, name: &str) -> String {
        path_str(&self.mnt.join(name)).to_owned()
    }

    /// `chainfs ARGS` as `user`, from the copy the users can reach.
    fn chainfs_as(&self, user: &str, args: &[&str]) -> Outcome {
        as_user(user, path_str(&self.bin), args)
    }

    /// The daemons of this setup still running.
    fn daemons(&self) -> Vec<u32> {
        processes_of(&self.bin, self.dir.path())
    }
}

#[test]
fn an_ordinary_user_mounts_writes_and_unmounts_and_others_stay_out() {
    if !require_fuse() || !prepare_host() {
        return;
    }
    let setup = Setup::new();
    setup
        .chainfs_as(
            USER,
            &["mount", path_str(&setup.images[1]), path_str(&setup.mnt)],
        )
        .ok();
    assert!(is_mounted(&setup.mnt));

    // The owner reads a node file and writes through `active`.
    let head = as_user(USER, "head", &["-c", "4", &setup.node("base.qcow2")]).ok();
    assert_eq!(head.stdout_bytes, [0xaa; 4]);
    let pattern = setup.dir.path().join("pattern");
    let of = format!("of={}", setup.node("active"));
    let input = format!("if={}", path_str(&pattern));
    as_user(
        USER,
        "dd",
        &[&input, &of, "bs=64k", "seek=64", "conv=notrunc"],
    )
    .ok();

    // Nobody else gets in, root included: the mount has no allow_other.
    let denied = as_user(OTHER, "ls", &[path_str(&setup.mnt)]);
    assert!(denied.stderr.contains("Permission denied"), "{denied:?}");
    let root = std::fs::read_dir(&setup.mnt)
        .map(drop)
        .expect_err("root is kept out");
    assert_eq!(root.raw_os_error(), Some(libc::EACCES));

    // umount as the user goes through fusermount3 and waits for the daemon.
    setup
        .chainfs_as(USER, &["umount", path_str(&setup.mnt)])
        .ok();
    assert!(!is_mounted(&setup.mnt));
    assert!(setup.daemons().is_empty(), "daemon gone");
    for image in &setup.images {
        qemu_img_check(image);
    }
    qemu_io(&setup.images[1], "qcow2", &["read -P 0x6d 4M 64K"]);
}

#[test]
fn allow_other_lets_another_user_read_but_not_write() {
    if !require_fuse() || !prepare_host() {
        return;
    }
    let setup = Setup::new();
    setup
        .chainfs_as(
            USER,
            &[
                "mount",
                "--allow-other",
                path_str(&setup.images[1]),
                path_str(&setup.mnt),
            ],
        )
        .ok();
    as_user(OTHER, "ls", &[path_str(&setup.mnt)]).ok();
    let head = as_user(OTHER, "head", &["-c", "2", &setup.node("top.qcow2")]).ok();
    assert_eq!(head.stdout_bytes, [0xaa; 2]);
    // `active` is 0644 and owned by the user who mounted.
    let write = as_user(
        OTHER,
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", setup.node("active")),
            "bs=4k",
            "count=1",
            "conv=notrunc",
        ],
    );
    assert!(write.stderr.contains("Permission denied"), "{write:?}");
    setup
        .chainfs_as(USER, &["umount", path_str(&setup.mnt)])
        .ok();
    assert!(setup.daemons().is_empty(), "daemon gone");
    for image in &setup.images {
        qemu_img_check(image);
    }
}

#[test]
fn allow_other_shows_no_one_an_image_that_is_private_on_disk() {
    if !require_fuse() || !prepare_host() {
        return;
    }
    let setup = Setup::new();
    for image in &setup.images {
        std::fs::set_permissions(image, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    setup
        .chainfs_as(
            USER,
            &[
                "mount",
                "--allow-other",
                path_str(&setup.images[1]),
                path_str(&setup.mnt),
            ],
        )
        .ok();
    as_user(OTHER, "ls", &[path_str(&setup.mnt)]).ok();
    for name in ["base.qcow2", "top.qcow2", "active"] {
        let read = as_user(OTHER, "head", &["-c", "2", &setup.node(name)]);
        assert!(
            read.stderr.contains("Permission denied"),
            "{name}: {read:?}"
        );
    }
    // The owner still reads them.
    let head = as_user(USER, "head", &["-c", "2", &setup.node("base.qcow2")]).ok();
    assert_eq!(head.stdout_bytes, [0xaa; 2]);
    setup
        .chainfs_as(USER, &["umount", path_str(&setup.mnt)])
        .ok();
    assert!(setup.daemons().is_empty(), "daemon gone");
}
