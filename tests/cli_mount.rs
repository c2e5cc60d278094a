//! `chainfs mount`, `umount` and `status` on real mounts: the command
//! returns with the mount ready; `umount` returns only once the daemon has
//! exited (images flushed and released), refuses a busy mount; SIGTERM and
//! SIGINT to a foreground mount and to the daemon unmount cleanly; plain
//! `fusermount3 -u` and `umount` end the daemon on their own.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cli::{chainfs, chainfs_bin, is_mounted, wait_child, wait_until, ChainDir, MountGuard};
use common::{path_str, qemu_io, require_fuse};

/// Writes `byte` × 64 KiB at 4 MiB through `active`.
fn write_through_active(mnt: &Path, byte: u8) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("active"))
        .expect("open active");
    file.seek(SeekFrom::Start(4 << 20)).expect("seek");
    file.write_all(&[byte; 64 << 10]).expect("write");
}

/// Asserts that the top image holds what `write_through_active` wrote.
fn assert_written(top: &Path, byte: u8) {
    qemu_io(top, "qcow2", &[format!("read -P {byte:#x} 4M 64K")]);
}

#[test]
fn the_mount_is_ready_when_the_command_returns_and_umount_waits_for_the_daemon() {
    if !require_fuse() {
        return;
    }
    let setup = ChainDir::new();
    let _guard = setup.mount(&[]);
    // No waiting: the very next look must see the node files.
    let mut names: Vec<String> = std::fs::read_dir(&setup.mnt)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["active", "base.qcow2", "ctl", "top.qcow2"]);
    let mut head = [0u8; 2];
    let mut file = std::fs::File::open(setup.mnt.join("top.qcow2")).expect("open node");
    file.read_exact(&mut head).expect("read");
    assert_eq!(head, [0xaa, 0xaa]);
    drop(file);
    write_through_active(&setup.mnt, 0x5c);
    assert_eq!(setup.daemons().len(), 1, "one daemon");

    chainfs(["umount", path_str(&setup.mnt)]).ok();
    // No waiting here either: umount returned, so the daemon is gone.
    setup.assert_released();
    assert_written(&setup.top, 0x5c);
}

#[test]
fn umount_refuses_a_busy_mount_and_succeeds_once_the_file_is_closed() {
    if !require_fuse() {
        return;
    }
    let setup = ChainDir::new();
    let _guard = setup.mount(&[]);
    let mut reader = std::fs::File::open(setup.mnt.join("base.qcow2")).expect("open node");
    write_through_active(&setup.mnt, 0x3e);

    // As umount(8) and fusermount3 -u do: a busy mount stays mounted.
    let busy = chainfs(["umount", path_str(&setup.mnt)]);
    assert!(busy.one_line_failure().contains("busy"), "{busy:?}");
    assert!(is_mounted(&setup.mnt));
    assert_eq!(setup.daemons().len(), 1);
    let mut byte = [0u8; 1];
    reader
        .read_exact(&mut byte)
        .expect("the reader still reads");
    assert_eq!(byte, [0xaa]);

    drop(reader);
    chainfs(["umount", path_str(&setup.mnt)]).ok();
    setup.assert_released();
    assert_written(&setup.top, 0x3e);
}

#[test]
fn sigterm_and_sigint_to_a_foreground_mount_unmount_cleanly() {
    if !require_fuse() {
        return;
    }
    for (signal, byte) in [(libc::SIGTERM, 0x11), (libc::SIGINT, 0x22)] {
        let setup = ChainDir::new();
        let _guard = MountGuard(setup.mnt.clone());
        let mut child = Command::new(chainfs_bin())
            .args(["mount", "-f", path_str(&setup.top), path_str(&setup.mnt)])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn chainfs -f");
        assert!(
            wait_until(Duration::from_secs(20), || is_mounted(&setup.mnt)),
            "never mounted"
        );
        write_through_active(&setup.mnt, byte);
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) with our own child's pid and a valid signal.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let code = wait_child(&mut child, Duration::from_secs(30)).expect("exits");
        assert_eq!(code, Some(0), "signal {signal}: clean exit");
        setup.assert_released();
        assert_written(&setup.top, byte);
    }
}

#[test]
fn sigterm_to_the_daemon_unmounts_cleanly() {
    if !require_fuse() {
        return;
    }
    let setup = ChainDir::new();
    let _guard = setup.mount(&[]);
    write_through_active(&setup.mnt, 0x77);
    let daemons = setup.daemons();
    assert_eq!(daemons.len(), 1);
    let pid = libc::pid_t::try_from(daemons[0]).expect("pid");
    // SAFETY: kill(2) with a valid signal; the pid is the daemon we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(
        wait_until(Duration::from_secs(30), || setup.daemons().is_empty()),
        "daemon did not exit"
    );
    setup.assert_released();
    assert_written(&setup.top, 0x77);
}

#[test]
fn plain_fusermount3_and_umount_end_the_daemon_on_its_own() {
    if !require_fuse() {
        return;
    }
    for tool in [["fusermount3", "-u"], ["umount", "--"]] {
        let setup = ChainDir::new();
        let _guard = setup.mount(&[]);
        write_through_active(&setup.mnt, 0x42);
        // A child that another test thread forks holds copies of our
        // descriptors until its exec, and the unmount is refused as busy
        // meanwhile: try again for a moment.
        let unmounted = wait_until(Duration::from_secs(10), || {
            Command::new(tool[0])
                .arg(tool[1])
                .arg(&setup.mnt)
                .status()
                .expect("run")
                .success()
        });
        assert!(unmounted, "{tool:?}");
        assert!(
            wait_until(Duration::from_secs(30), || setup.daemons().is_empty()),
            "{tool:?}: daemon did not exit"
        );
        setup.assert_released();
        assert_written(&setup.top, 0x42);
    }
}

#[test]
fn read_only_mounts_refuse_writes_and_share_the_images() {
    if !require_fuse() {
        return;
    }
    let setup = ChainDir::new();
    let _guard = setup.mount(&["--read-only", "--threads", "2", "--cache-size", "4M"]);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(setup.mnt.join("active"))
        .map(|mut f| f.write_all(b"x"))
        .and_then(|r| r)
        .expect_err("read-only");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{err}"
    );
    // Read-only, chainfs holds shared read locks, as QEMU's readers do.
    common::qemu_img(&["info", path_str(&setup.top)]);
    chainfs(["umount", path_str(&setup.mnt)]).ok();
    setup.assert_released();
}

#[test]
fn the_daemon_logs_to_the_log_file() {
    if !require_fuse() {
        return;
    }
    let setup = ChainDir::new();
    let log = setup.dir.path().join("chainfs.log");
    let _guard = setup.mount(&["--log-file", path_str(&log)]);
    chainfs(["umount", path_str(&setup.mnt)]).ok();
    let text = std::fs::read_to_string(&log).expect("log written");
    assert!(text.contains("mounted"), "{text}");
    assert!(text.contains("unmounted"), "{text}");
}

#[test]
fn status_prints_the_ctl_files_and_wait_returns_without_jobs() {
    if !require_fuse() {
        return;
    }
    let setup = ChainDir::new();
    let _guard = setup.mount(&[]);
    let text = chainfs(["status", path_str(&setup.mnt)]).ok().stdout;
    let expected = std::fs::read_to_string(setup.mnt.join("ctl/status")).expect("ctl/status");
    assert_eq!(text.trim_end(), expected.trim_end());
    let json = chainfs(["status", "--json", path_str(&setup.mnt)])
        .ok()
        .stdout;
    assert_eq!(json.trim(), "[]");
    let waited = chainfs(["status", "--wait", path_str(&setup.mnt)])
        .ok()
        .stdout;
    assert_eq!(waited.trim_end(), expected.trim_end());
    chainfs(["umount", path_str(&setup.mnt)]).ok();
    setup.assert_released();
}

#[test]
fn umount_of_what_is_not_a_chainfs_mount_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outcome = chainfs(["umount", path_str(dir.path())]);
    assert!(outcome.one_line_failure().ends_with(": not mounted"));
    let outcome = chainfs(["umount", "/proc"]);
    assert!(outcome.one_line_failure().contains("not a chainfs mount"));
}
