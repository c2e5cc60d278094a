//! Tests of the model without a mount, on a two-node chain made by chainfs
//! itself: a raw base and a qcow2 overlay on top.

use super::*;
use crate::chain::{create_image, ChainOptions};
use crate::format::Format;
use crate::fs::node_file::falloc;

const SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

/// What `read` of `fh` returns, through a fresh buffer.
fn read(model: &FsModel, fh: u64, offset: u64, size: u32) -> Vec<u8> {
    model
        .read(fh, offset, size, &mut Vec::new())
        .unwrap()
        .to_vec()
}

struct Fixture {
    _dir: tempfile::TempDir,
    model: FsModel,
}

fn fixture(read_only: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    // Sparse: data in the first cluster only, so SEEK_HOLE finds the rest.
    std::fs::write(&base, vec![0xb0; CLUSTER as usize]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let top = dir.path().join("top.qcow2");
    create_image(&top, SIZE, CLUSTER, Some(("base.img", Format::Raw))).unwrap();
    let options = ChainOptions {
        writable: !read_only,
        ..ChainOptions::default()
    };
    let chain = crate::jobs::Chain::open(&top, &options).unwrap();
    let jobs = Arc::new(Jobs::new(chain, read_only));
    let model = FsModel::new(jobs, read_only, Arc::default());
    Fixture { _dir: dir, model }
}

impl Fixture {
    fn ino(&self, name: &str) -> u64 {
        match name.strip_prefix("ctl/") {
            Some(file) => self.model.lookup(inode::CTL_DIR, file).unwrap().ino,
            None => self.model.lookup(inode::ROOT, name).unwrap().ino,
        }
    }

    fn open(&self, name: &str, write: bool) -> Result<u64, FsError> {
        self.model.open(self.ino(name), write).map(|o| o.fh)
    }
}

fn errno<T: std::fmt::Debug>(result: Result<T, FsError>) -> i32 {
    result.unwrap_err().errno()
}

#[test]
fn the_root_lists_every_node_then_active_and_ctl() {
    let f = fixture(false);
    let fh = f.model.opendir(inode::ROOT).unwrap();
    let names: Vec<String> = f
        .model
        .readdir(fh, 0)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, [".", "..", "base.img", "top.qcow2", "active", "ctl"]);
    let rest: Vec<String> = f
        .model
        .readdir(fh, 4)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(rest, ["active", "ctl"]);
    f.model.release(fh).unwrap();
    let fh = f.model.opendir(inode::CTL_DIR).unwrap();
    let names: Vec<String> = f
        .model
        .readdir(fh, 2)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        names,
        [
            "command",
            "status",
            "status.json",
            "events",
            "chain",
            "bitmaps",
            "bitmaps.json"
        ]
    );
}

#[test]
fn lookups_find_files_and_refuse_the_rest() {
    let f = fixture(false);
    assert_eq!(errno(f.model.lookup(inode::ROOT, "nope")), libc::ENOENT);
    assert_eq!(
        errno(f.model.lookup(inode::CTL_DIR, "base.img")),
        libc::ENOENT
    );
    let file = f.ino("base.img");
    assert_eq!(errno(f.model.lookup(file, "x")), libc::ENOTDIR);
    assert!(f.model.lookups().is_held(file));
    f.model.forget(file, 1);
    assert!(!f.model.lookups().is_held(file));
    assert_eq!(f.ino("active"), inode::ACTIVE);
}

#[test]
fn modes_show_what_may_be_written() {
    let f = fixture(false);
    let perm = |name: &str| f.model.getattr(f.ino(name), None).unwrap().perm;
    assert_eq!(perm("active"), 0o644);
    assert_eq!(perm("top.qcow2"), 0o644);
    assert_eq!(perm("base.img"), 0o444);
    assert_eq!(perm("ctl/command"), 0o200);
    assert_eq!(perm("ctl/status"), 0o444);
    let attr = f.model.getattr(f.ino("base.img"), None).unwrap();
    assert_eq!(attr.size, SIZE);
    assert_eq!(attr.uid, Owner::current().uid);
    let ro = fixture(true);
    for name in ["active", "top.qcow2", "base.img"] {
        assert_eq!(
            ro.model.getattr(ro.ino(name), None).unwrap().perm,
            0o444,
            "{name}"
        );
    }
    assert_eq!(
        ro.model.getattr(ro.ino("ctl/command"), None).unwrap().perm,
        0o200
    );
}

#[test]
fn reads_stop_at_the_end() {
    let f = fixture(false);
    let fh = f.open("base.img", false).unwrap();
    assert_eq!(read(&f.model, fh, 0, 16), [0xb0; 16]);
    assert_eq!(read(&f.model, fh, SIZE - 10, 100).len(), 10);
    assert!(read(&f.model, fh, SIZE, 100).is_empty());
    assert!(read(&f.model, fh, u64::MAX, 100).is_empty());
}

#[test]
fn writes_go_only_to_the_active_node_and_stop_at_the_end() {
    let f = fixture(false);
    assert_eq!(errno(f.open("base.img", true)), libc::EROFS);
    let reader = f.open("base.img", false).unwrap();
    assert_eq!(errno(f.model.write(reader, 0, b"x")), libc::EROFS);
    let fh = f.open("active", true).unwrap();
    assert_eq!(f.model.write(fh, 4096, &[1; 4096]).unwrap(), 4096);
    assert_eq!(errno(f.model.write(fh, SIZE, b"x")), libc::ENOSPC);
    assert_eq!(f.model.write(fh, SIZE - 3, b"abcdef").unwrap(), 3);
    assert_eq!(read(&f.model, fh, SIZE - 3, 3), b"abc");
    assert_eq!(errno(f.model.write(9999, 0, b"x")), libc::EBADF);
}

#[test]
fn a_write_through_active_is_seen_through_the_node_file_and_back() {
    let f = fixture(false);
    let active = f.open("active", true).unwrap();
    let node = f.open("top.qcow2", true).unwrap();
    assert_eq!(read(&f.model, node, 0, 4), [0xb0; 4]);
    f.model.write(active, 0, b"live").unwrap();
    assert_eq!(read(&f.model, node, 0, 4), b"live");
    f.model.write(node, 8, b"back").unwrap();
    assert_eq!(read(&f.model, active, 8, 4), b"back");
    let base = f.open("base.img", false).unwrap();
    assert_eq!(read(&f.model, base, 0, 4), [0xb0; 4]);
}

#[test]
fn a_read_only_mount_refuses_every_flat_file_write() {
    let f = fixture(true);
    for name in ["active", "top.qcow2", "base.img"] {
        assert_eq!(errno(f.open(name, true)), libc::EROFS, "{name}");
    }
    let command = f.open("ctl/command", true).unwrap();
    assert_eq!(errno(f.model.write(command, 0, b"stream\n")), libc::EROFS);
    let events = f.open("ctl/events", false).unwrap();
    let text = String::from_utf8(read(&f.model, events, 0, 65536)).unwrap();
    assert!(text.contains("COMMAND_REJECTED"), "{text}");
}

#[test]
fn truncate_chmod_and_chown_are_not_permitted() {
    let f = fixture(false);
    let active = f.ino("active");
    let size = |size| AttrChange {
        size: Some(size),
        ..AttrChange::default()
    };
    assert_eq!(errno(f.model.setattr(active, None, size(0))), libc::EPERM);
    assert_eq!(
        errno(f.model.setattr(f.ino("base.img"), None, size(1))),
        libc::EPERM
    );
    assert!(f.model.setattr(active, None, size(SIZE)).is_ok());
    assert!(f.model.setattr(f.ino("ctl/command"), None, size(0)).is_ok());
    let chmod = AttrChange {
        mode: Some(0o100777),
        ..AttrChange::default()
    };
    assert_eq!(errno(f.model.setattr(active, None, chmod)), libc::EPERM);
    let chown = AttrChange {
        uid: Some(12345),
        ..AttrChange::default()
    };
    assert_eq!(errno(f.model.setattr(active, None, chown)), libc::EPERM);
    assert_eq!(FsModel::refuse("rename").errno(), libc::EPERM);
}

#[test]
fn fallocate_discards_with_the_supported_modes_only() {
    let f = fixture(false);
    let fh = f.open("active", true).unwrap();
    let punch = falloc::PUNCH_HOLE | falloc::KEEP_SIZE;
    f.model.fallocate(fh, 0, CLUSTER, punch).unwrap();
    assert_eq!(read(&f.model, fh, 0, 8), [0; 8]);
    f.model.write(fh, 0, &[5; 8]).unwrap();
    f.model.fallocate(fh, 2, 4, falloc::ZERO_RANGE).unwrap();
    assert_eq!(read(&f.model, fh, 0, 8), [5, 5, 0, 0, 0, 0, 5, 5]);
    assert_eq!(errno(f.model.fallocate(fh, 0, 4096, 0)), libc::EOPNOTSUPP);
    assert_eq!(
        errno(f.model.fallocate(fh, SIZE - 1, 2, falloc::ZERO_RANGE)),
        libc::ENOSPC
    );
    f.model.fallocate(fh, SIZE - 1, 2, punch).unwrap();
    let base = f.open("base.img", false).unwrap();
    assert_eq!(errno(f.model.fallocate(base, 0, 1, punch)), libc::EROFS);
}

#[test]
fn seek_data_and_hole_follow_the_chain_allocation() {
    let f = fixture(false);
    let base = f.open("base.img", false).unwrap();
    let seek = |fh, offset, whence| f.model.lseek(fh, offset, whence);
    assert_eq!(seek(base, 0, whence::DATA).unwrap(), 0);
    assert_eq!(seek(base, 0, whence::HOLE).unwrap() as u64, CLUSTER);
    assert_eq!(errno(seek(base, SIZE as i64, whence::DATA)), libc::ENXIO);
    assert_eq!(errno(seek(base, -1, whence::HOLE)), libc::ENXIO);
    let active = f.open("active", true).unwrap();
    let far = SIZE - CLUSTER;
    f.model.write(active, far, &[1; 512]).unwrap();
    f.model
        .fallocate(active, 0, CLUSTER, falloc::PUNCH_HOLE | falloc::KEEP_SIZE)
        .unwrap();
    assert_eq!(seek(active, 0, whence::DATA).unwrap() as u64, far);
    assert_eq!(seek(active, far as i64, whence::HOLE).unwrap() as u64, SIZE);
    assert_eq!(errno(seek(active, 0, libc::SEEK_SET)), libc::EINVAL);
}

#[test]
fn an_unknown_command_is_einval_and_shows_in_events_and_status() {
    let f = fixture(false);
    let command = f.open("ctl/command", true).unwrap();
    assert_eq!(
        errno(f.model.write(command, 0, b"frobnicate x=1\n")),
        libc::EINVAL
    );
    let read_all = |name: &str| {
        let fh = f.open(name, false).unwrap();
        String::from_utf8(read(&f.model, fh, 0, 1 << 20)).unwrap()
    };
    let status = read_all("ctl/status");
    assert!(
        status.lines().last().unwrap().contains("frobnicate"),
        "{status}"
    );
    assert!(read_all("ctl/events").contains("\"COMMAND_REJECTED\""));
    assert_eq!(read_all("ctl/status.json"), "[]\n");
    assert!(read_all("ctl/chain").starts_with("base.img <- top.qcow2\n"));
    assert_eq!(errno(f.open("ctl/status", true)), libc::EROFS);
}

#[test]
fn released_handles_are_gone_for_good() {
    let f = fixture(false);
    let fh = f.open("active", false).unwrap();
    assert_eq!(f.model.open_handles(), 1);
    f.model.release(fh).unwrap();
    assert_eq!(errno(f.model.read(fh, 0, 1, &mut Vec::new())), libc::EBADF);
    assert_eq!(errno(f.model.release(fh)), libc::EBADF);
    assert_eq!(errno(f.model.open(inode::ROOT, false)), libc::EISDIR);
    assert_eq!(errno(f.model.getattr(5000, None)), libc::ENOENT);
}

#[test]
fn fsync_and_flush_succeed_on_every_kind_of_handle() {
    let f = fixture(false);
    let fh = f.open("active", true).unwrap();
    f.model.write(fh, 0, b"durable").unwrap();
    f.model.flush(fh).unwrap();
    f.model.fsync(fh).unwrap();
    let status = f.open("ctl/status", false).unwrap();
    f.model.fsync(status).unwrap();
    f.model.flush(status).unwrap();
}

#[test]
fn opens_that_see_the_same_text_share_one_rendering() {
    let f = fixture(false);
    let command = f.open("ctl/command", true).unwrap();
    let _ = f.model.write(command, 0, b"frobnicate\n");
    let buffer = |fh| match &*f.model.handles.get(fh).unwrap() {
        Handle::Ctl { buffer, .. } => Arc::clone(buffer),
        _ => panic!("not a ctl handle"),
    };
    let first = buffer(f.open("ctl/events", false).unwrap());
    let second = buffer(f.open("ctl/events", false).unwrap());
    assert!(Arc::ptr_eq(&first, &second), "one copy between two events");
    let _ = f.model.write(command, 0, b"frobnicate again\n");
    let third = buffer(f.open("ctl/events", false).unwrap());
    assert!(!Arc::ptr_eq(&first, &third), "a new event, a new rendering");
    assert!(third.starts_with(&first), "the old opens keep their text");
}

#[test]
fn a_command_write_that_is_not_a_whole_command_is_refused_whole() {
    let f = fixture(false);
    let command = f.open("ctl/command", true).unwrap();
    let long = format!(
        "stream id={}\n",
        "j".repeat(crate::jobs::command::MAX_COMMAND_BYTES)
    );
    assert_eq!(
        errno(f.model.write(command, 0, long.as_bytes())),
        libc::EINVAL
    );
    // The kernel's next piece of the same write(2) starts where it ended.
    let end = long.len() as u64;
    let tail = b"stream id=tail\n";
    assert_eq!(errno(f.model.write(command, end, tail)), libc::EINVAL);
    let after_tail = end + tail.len() as u64;
    assert_eq!(
        errno(f.model.write(command, after_tail, tail)),
        libc::EINVAL
    );
    let status = f.open("ctl/status.json", false).unwrap();
    assert_eq!(read(&f.model, status, 0, 4096), b"[]\n", "no job");
    // The jobs layer refused the first piece, so it is logged as refused.
    let events = f.open("ctl/events", false).unwrap();
    let events = read(&f.model, events, 0, 1 << 20);
    let rejected = String::from_utf8_lossy(&events)
        .matches("COMMAND_REJECTED")
        .count();
    assert_eq!(rejected, 1, "the first piece, and only it, is logged");

    // A shell reusing the descriptor writes each command at a later offset.
    let first = b"stream id=a speed=64K\n";
    assert_eq!(f.model.write(command, 0, first).unwrap(), first.len());
    let second = b"set-speed id=a speed=128K\n";
    let offset = first.len() as u64;
    assert_eq!(
        f.model.write(command, offset, second).unwrap(),
        second.len()
    );
    let offset = offset + second.len() as u64;
    assert!(f.model.write(command, offset, b"cancel id=a\n").is_ok());
}

#[test]
fn a_read_buffer_reused_across_requests_never_shows_an_earlier_reads_bytes() {
    let f = fixture(false);
    let fh = f.open("top.qcow2", false).unwrap();
    let mut buf = Vec::new();
    assert_eq!(f.model.read(fh, 0, 64, &mut buf).unwrap(), [0xb0; 64]);
    // A hole past the base's data, read into the same, now dirty, buffer.
    assert_eq!(
        f.model.read(fh, 4 * CLUSTER, 64, &mut buf).unwrap(),
        [0; 64]
    );
    // A shorter read at the end of the file returns only its own bytes.
    assert_eq!(f.model.read(fh, SIZE - 8, 64, &mut buf).unwrap(), [0; 8]);
}
