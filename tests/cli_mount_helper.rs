//! chainfs as a mount helper (issue 12): `mount -t fuse.chainfs` and fstab
//! lines through fuse3's `mount.fuse3`, which runs `chainfs IMAGE MNT -o
//! OPTIONS`; the `-o` options, generic ones accepted, unknown ones refused;
//! plain `umount` leaving the images clean and the daemon gone.

mod common;

use common::cli::{chainfs, is_mounted, run_installed, ChainDir, MountGuard, Outcome};
use common::{path_str, qemu_io, require_all};

/// `run_installed` for `chain`, with its paths substituted for `TOP`, `MNT`
/// and `DIR` in `script`.
fn run_installed_on(chain: &ChainDir, script: &str) -> Outcome {
    let script = script
        .replace("TOP", path_str(&chain.top))
        .replace("MNT", path_str(&chain.mnt))
        .replace("DIR", path_str(chain.dir.path()));
    run_installed(chain.dir.path(), &chain.mnt, &script)
}

/// FUSE, QEMU's tools, and what `mount -t fuse.chainfs` goes through.
fn require_helper_tools() -> bool {
    require_all(&["mount.fuse3", "mount", "umount", "unshare"])
}

#[test]
fn mount_t_fuse_chainfs_runs_chainfs_read_only_and_plain_umount_ends_the_daemon() {
    if !require_helper_tools() {
        return;
    }
    let setup = ChainDir::new();
    let out = run_installed_on(
        &setup,
        "mount -t fuse.chainfs TOP MNT -o ro\n\
             ls MNT\n\
             if echo x 2>/dev/null > MNT/active; then echo WROTE; fi\n\
             head -c 2 MNT/base.qcow2 | od -An -tx1\n\
             umount MNT\n",
    )
    .ok();
    assert!(
        out.stdout
            .starts_with("active\nbase.qcow2\nctl\ntop.qcow2\n"),
        "{out:#?}"
    );
    assert!(
        !out.stdout.contains("WROTE"),
        "ro mount took a write: {out:#?}"
    );
    assert!(out.stdout.contains(" aa aa"), "{out:#?}");
    setup.wait_released();
}

#[test]
fn an_fstab_line_mounts_with_generic_options_and_umount_flushes_the_writes() {
    if !require_helper_tools() {
        return;
    }
    let setup = ChainDir::new();
    // The line as a user would write it, with what systemd and mount(8)
    // pass along; `mount -T` reads it instead of /etc/fstab.
    let out = run_installed_on(
        &setup,
        "echo 'TOP MNT fuse.chainfs defaults,nofail,_netdev,x-systemd.automount,threads=2,\
             log_file=DIR/chainfs.log 0 0' > DIR/fstab\n\
             mount -T DIR/fstab MNT\n\
             dd if=/dev/zero bs=64k count=1 2>/dev/null | tr '\\0' '\\147' \
             | dd of=MNT/active bs=64k seek=64 conv=notrunc 2>/dev/null\n\
             umount MNT\n",
    )
    .ok();
    setup.wait_released();
    qemu_io(&setup.top, "qcow2", &["read -P 0x67 4M 64K"]);
    let log = std::fs::read_to_string(setup.dir.path().join("chainfs.log")).expect("log_file");
    assert!(log.contains("unmounted"), "{log}\n{out:#?}");
}

#[test]
fn an_unknown_option_is_refused_by_name_and_nothing_is_mounted() {
    if !require_all(&[]) {
        return;
    }
    let setup = ChainDir::new();
    let _guard = MountGuard(setup.mnt.clone());
    let forms: [&[&str]; 2] = [
        &[
            path_str(&setup.top),
            path_str(&setup.mnt),
            "-o",
            "ro,bogus,dev",
        ],
        &[
            "mount",
            "-o",
            "bogus",
            path_str(&setup.top),
            path_str(&setup.mnt),
        ],
    ];
    for args in forms {
        let out = chainfs(args);
        assert_eq!(out.code, Some(2), "a usage error: {out:#?}");
        assert!(out.stderr.contains("`bogus`"), "names it: {out:#?}");
        assert!(!is_mounted(&setup.mnt), "{args:?} mounted");
        assert!(setup.daemons().is_empty(), "{args:?} left a daemon");
    }
}

#[test]
fn the_helper_form_takes_every_generic_option_and_maps_the_mounts_own() {
    if !require_all(&[]) {
        return;
    }
    let setup = ChainDir::new();
    let _guard = MountGuard(setup.mnt.clone());
    let log = setup.dir.path().join("helper.log");
    let options = format!(
        "defaults,nofail,noauto,auto,user,users,_netdev,x-systemd.requires=/,dev,nodev,suid,\
         nosuid,exec,noexec,ro,threads=2,cache_size=4M,log_file={}",
        log.display()
    );
    let (top, mnt) = (path_str(&setup.top), path_str(&setup.mnt));
    // As mount.fuse3 runs it (source, mount point, then -o), and as
    // `chainfs mount -o` takes the same.
    let forms: [&[&str]; 2] = [
        &[top, mnt, "-o", &options],
        &["mount", "-o", "ro", "-o", "threads=2", top, mnt],
    ];
    for args in forms {
        chainfs(args).ok();
        let err = std::fs::OpenOptions::new()
            .write(true)
            .open(setup.mnt.join("active"))
            .expect_err("ro");
        assert!(
            matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
            "{args:?}: {err}"
        );
        chainfs(["umount", mnt]).ok();
        setup.wait_released();
    }
    let text = std::fs::read_to_string(&log).expect("log_file=");
    assert!(text.contains("mounted"), "{text}");
}

#[test]
fn a_mistyped_subcommand_is_not_taken_for_an_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = chainfs(["stauts", path_str(dir.path())]);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(
        out.stderr.contains("unrecognized subcommand 'stauts'"),
        "{out:#?}"
    );
}
