//! The limits of SPEC §3 on a real mount: what is refused, with which
//! errno, for root too; `--read-only`; `ctl/command`; coherence between
//! `active` and the active node's file; and 1 MiB requests arriving whole.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chainfs::fs::MountOptions;
use common::chain::base_and_overlay;
use common::mount::{errno_of, mount, mounted, read_all, Fixture};
use common::{path_str, require_all, MIB};
use common::{qemu_img_check, run_any};

const SIZE: u64 = 16 * MIB;

/// base.qcow2 (data in its first MiB) <- top.qcow2; returns the top.
fn small_chain(dir: &Path) -> PathBuf {
    base_and_overlay(dir, "base.qcow2", "16M", &["write -P 0x11 0 1M"])
}

fn open_rw(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

fn read_text(path: &Path) -> String {
    String::from_utf8(read_all(path)).unwrap()
}

#[test]
fn writes_beyond_what_a_block_device_allows_are_refused_with_spec_errnos() {
    let Some(Fixture { dir: _dir, top, m }) = mounted(&[], small_chain) else {
        return;
    };
    // A backing node's file: EROFS, root included.
    assert_eq!(
        errno_of(open_rw(&m.path("base.qcow2")), "open base rw"),
        libc::EROFS
    );
    let active = open_rw(&m.path("active")).unwrap();
    assert_eq!(
        errno_of(active.write_at(b"x", SIZE), "write at end"),
        libc::ENOSPC
    );
    assert_eq!(
        errno_of(active.write_at(b"x", SIZE + 4096), "write past end"),
        libc::ENOSPC
    );
    assert_eq!(
        active.write_at(&[7; 8192], SIZE - 4096).unwrap(),
        4096,
        "short at end"
    );
    let mut tail = [0; 8];
    assert_eq!(active.read_at(&mut tail, SIZE - 4).unwrap(), 4);
    assert_eq!(active.read_at(&mut tail, SIZE).unwrap(), 0);
    // Namespace and size changes: EPERM.
    assert_eq!(errno_of(active.set_len(0), "ftruncate"), libc::EPERM);
    assert_eq!(
        errno_of(std::fs::remove_file(m.path("active")), "rm"),
        libc::EPERM
    );
    let renamed = std::fs::rename(m.path("top.qcow2"), m.path("x.img"));
    assert_eq!(errno_of(renamed, "mv"), libc::EPERM);
    assert_eq!(
        errno_of(File::create(m.path("new-file")), "create"),
        libc::EPERM
    );
    assert_eq!(
        errno_of(std::fs::create_dir(m.path("d")), "mkdir"),
        libc::EPERM
    );
    let touch = run_any("touch", &[path_str(&m.path("another"))]);
    assert!(!touch.status.success());
    let truncate = run_any("truncate", &["-s", "1M", path_str(&m.path("top.qcow2"))]);
    assert!(String::from_utf8_lossy(&truncate.stderr).contains("not permitted"));
    drop(active);
    m.unmount();
    qemu_img_check(&top);
}

#[test]
fn a_read_only_mount_refuses_every_write_and_logs_refused_commands() {
    if !require_all(&["sh"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = small_chain(dir.path());
    let options = MountOptions {
        read_only: true,
        ..MountOptions::default()
    };
    let m = mount(&top, &dir.path().join("mnt"), &options);
    for name in ["active", "top.qcow2", "base.qcow2"] {
        let meta = std::fs::metadata(m.path(name)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o444
        );
        assert_eq!(errno_of(open_rw(&m.path(name)), name), libc::EROFS);
    }
    let command = m.path("ctl/command");
    // The shell's echo fails (dash words every write error as "I/O
    // error", so the errno is checked with a plain write).
    let echo = run_any(
        "sh",
        &["-c", &format!("echo stream > {}", path_str(&command))],
    );
    assert!(!echo.status.success());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&command)
        .unwrap();
    assert_eq!(
        errno_of(file.write(b"stream\n"), "command on a read-only mount"),
        libc::EROFS
    );
    drop(file);
    let events = read_text(&m.path("ctl/events"));
    let last: serde_json::Value = serde_json::from_str(events.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "COMMAND_REJECTED");
    assert_eq!(last["data"]["errno"], "EROFS");
    m.unmount();
}

#[test]
fn an_unknown_command_is_einval_and_shows_in_events_and_status() {
    let Some(Fixture { dir: _dir, m, .. }) = mounted(&[], small_chain) else {
        return;
    };
    let mut command = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("ctl/command"))
        .unwrap();
    assert_eq!(
        errno_of(command.write(b"frobnicate now=1\n"), "command"),
        libc::EINVAL
    );
    assert!(read_text(&m.path("ctl/events")).contains("\"COMMAND_REJECTED\""));
    let status = read_text(&m.path("ctl/status"));
    assert!(status.starts_with("No active jobs"), "{status}");
    assert!(
        status.lines().last().unwrap().contains("frobnicate"),
        "{status}"
    );
    assert_eq!(read_text(&m.path("ctl/status.json")), "[]\n");
    let chain = read_text(&m.path("ctl/chain"));
    assert!(chain.starts_with("base.qcow2 <- top.qcow2\n"), "{chain}");
    let mut names: Vec<String> = std::fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["active", "base.qcow2", "ctl", "top.qcow2"]);
    drop(command);
    m.unmount();
}

#[test]
fn writes_through_active_and_the_active_node_file_are_seen_at_once_both_ways() {
    let Some(Fixture { dir: _dir, top, m }) = mounted(&[], small_chain) else {
        return;
    };
    let active = open_rw(&m.path("active")).unwrap();
    let node = open_rw(&m.path("top.qcow2")).unwrap();
    let mut buf = vec![0; 4096];
    for offset in [0, 8 * MIB] {
        active.read_exact_at(&mut buf, offset).unwrap();
        node.read_exact_at(&mut buf, offset).unwrap();
    }
    active.write_all_at(&[0xaa; 4096], 0).unwrap();
    node.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xaa; 4096], "node file sees a write through active");
    node.write_all_at(&[0xbb; 4096], 8 * MIB).unwrap();
    active.read_exact_at(&mut buf, 8 * MIB).unwrap();
    assert_eq!(
        buf, [0xbb; 4096],
        "active sees a write through the node file"
    );
    let mut fresh = File::open(m.path("top.qcow2")).unwrap();
    let mut head = [0; 4];
    fresh.read_exact(&mut head).unwrap();
    assert_eq!(head, [0xaa; 4]);
    drop((active, node, fresh));
    m.unmount();
    qemu_img_check(&top);
}

/// A buffer of `len` bytes aligned for O_DIRECT.
fn aligned(len: usize, fill: u8) -> (Vec<u8>, usize) {
    let buf = vec![fill; len + 4096];
    let start = buf.as_ptr().align_offset(4096);
    (buf, start)
}

#[test]
fn one_mib_reads_and_writes_arrive_as_one_mib_requests() {
    let Some(Fixture { dir: _dir, m, .. }) = mounted(&[], small_chain) else {
        return;
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("active"))
        .unwrap();
    let before = m.stats.snapshot();
    let (mut buf, start) = aligned(MIB as usize, 0x3c);
    for i in 0..4 {
        file.write_all_at(&buf[start..start + MIB as usize], i * MIB)
            .unwrap();
    }
    for i in 0..4 {
        file.read_exact_at(&mut buf[start..start + MIB as usize], i * MIB)
            .unwrap();
    }
    let after = m.stats.snapshot();
    assert_eq!(after.writes - before.writes, 4, "{after:?}");
    assert_eq!(after.write_bytes - before.write_bytes, 4 * MIB);
    assert_eq!(after.largest_write, MIB);
    assert_eq!(after.reads - before.reads, 4, "{after:?}");
    assert_eq!(after.largest_read, MIB);
    drop(file);
    m.unmount();
}
