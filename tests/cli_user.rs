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

#[path = "cli_support.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::{
    chainfs_bin, chainfs_processes, check_clean, is_mounted, qemu_io, require_fuse, run, s,
    small_chain, MountGuard, Outcome,
};

const USER: &str = "chainfs-test";
const OTHER: &str = "chainfs-test2";

/// Root sets the stage; without root the test cannot run (under CI that
/// is a failure).
fn prepare_host() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
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

/// Runs `program ARGS` as `user`.
fn as_user(user: &str, program: &str, args: &[&str]) -> Outcome {
    run(Command::new("runuser")
        .args(["-u", user, "--", program])
        .args(args))
}

/// `chainfs ARGS` as `user`.
fn chainfs_as(user: &str, args: &[&str]) -> Outcome {
    as_user(user, s(chainfs_bin()), args)
}

/// A chain and mount point owned by USER in a directory others may enter.
struct Setup {
    dir: tempfile::TempDir,
    images: [PathBuf; 2],
    mnt: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = small_chain(dir.path());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        std::fs::write(dir.path().join("pattern"), [0x6du8; 65536]).expect("pattern");
        run(Command::new("chown").args(["-R", USER, s(dir.path())])).ok();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Setup { dir, images, mnt }
    }

    fn node(&self, name: &str) -> String {
        s(&self.mnt.join(name)).to_owned()
    }
}

#[test]
fn an_ordinary_user_mounts_writes_and_unmounts_and_others_stay_out() {
    if !require_fuse() || !prepare_host() {
        return;
    }
    let setup = Setup::new();
    let _guard = MountGuard(setup.mnt.clone());
    chainfs_as(USER, &["mount", s(&setup.images[1]), s(&setup.mnt)]).ok();
    assert!(is_mounted(&setup.mnt));

    // The owner reads a node file and writes through `active`.
    let head = as_user(USER, "head", &["-c", "4", &setup.node("base.qcow2")]).ok();
    assert_eq!(head.stdout_bytes, [0xaa; 4]);
    let pattern = setup.dir.path().join("pattern");
    let of = format!("of={}", setup.node("active"));
    let input = format!("if={}", s(&pattern));
    as_user(
        USER,
        "dd",
        &[&input, &of, "bs=64k", "seek=64", "conv=notrunc"],
    )
    .ok();

    // Nobody else gets in, root included: the mount has no allow_other.
    let denied = as_user(OTHER, "ls", &[s(&setup.mnt)]);
    assert!(denied.stderr.contains("Permission denied"), "{denied:?}");
    let root = std::fs::read_dir(&setup.mnt)
        .map(drop)
        .expect_err("root is kept out");
    assert_eq!(root.raw_os_error(), Some(libc::EACCES));

    // umount as the user goes through fusermount3 and waits for the daemon.
    chainfs_as(USER, &["umount", s(&setup.mnt)]).ok();
    assert!(!is_mounted(&setup.mnt));
    assert!(
        chainfs_processes(setup.dir.path()).is_empty(),
        "daemon gone"
    );
    for image in &setup.images {
        check_clean(image);
    }
    qemu_io(&setup.images[1], "read -P 0x6d 4M 64K");
}

#[test]
fn allow_other_lets_another_user_read_but_not_write() {
    if !require_fuse() || !prepare_host() {
        return;
    }
    let setup = Setup::new();
    let _guard = MountGuard(setup.mnt.clone());
    chainfs_as(
        USER,
        &["mount", "--allow-other", s(&setup.images[1]), s(&setup.mnt)],
    )
    .ok();
    as_user(OTHER, "ls", &[s(&setup.mnt)]).ok();
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
    chainfs_as(USER, &["umount", s(&setup.mnt)]).ok();
    assert!(
        chainfs_processes(setup.dir.path()).is_empty(),
        "daemon gone"
    );
    for image in &setup.images {
        check_clean(image);
    }
}
