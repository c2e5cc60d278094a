//! Tests of QEMU-compatible locking against the real `qemu-img` and
//! `qemu-io`, reading the locks back from `/proc/locks`.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

use super::{lock, relock, unlock, LockError, LockMode};
use crate::storage::test_support::require_qemu;

fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {tool}: {err}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Creates a 1 MiB qcow2 image `name` in `dir`, over `backing` if given.
fn qcow2(dir: &Path, name: &str, backing: Option<&Path>) -> PathBuf {
    let path = dir.join(name);
    let path_str = path.to_str().expect("temp paths are UTF-8");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(backing) = backing {
        let backing = backing.to_str().expect("temp paths are UTF-8");
        args.extend(["-b", backing, "-F", "qcow2"]);
        args.extend([path_str]);
    } else {
        args.extend([path_str, "1M"]);
    }
    let out = run("qemu-img", &args);
    assert!(out.status.success(), "qemu-img create: {}", stderr(&out));
    path
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open test image")
}

fn qemu_io_write(path: &Path) -> Output {
    let path = path.to_str().expect("temp paths are UTF-8");
    run("qemu-io", &["-f", "qcow2", "-c", "write 0 512", path])
}

fn qemu_img_info(path: &Path, force_share: bool) -> Output {
    let path = path.to_str().expect("temp paths are UTF-8");
    let mut args = vec!["info"];
    if force_share {
        args.push("-U");
    }
    args.push(path);
    run("qemu-img", &args)
}

/// An interactive `qemu-io` holding an image open read-write, as a running
/// VM would. It exits when its stdin closes, on drop.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl QemuIo {
    fn open(path: &Path) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-io");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        // qemu-io answers a command only once the image is open and locked.
        writeln!(stdin, "length").expect("write to qemu-io");
        let mut answer = String::new();
        BufReader::new(stdout)
            .read_line(&mut answer)
            .expect("read from qemu-io");
        assert!(!answer.is_empty(), "qemu-io failed to open {path:?}");
        QemuIo {
            child,
            stdin: Some(stdin),
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// The bytes of `path` under an OFD lock held by anyone, from `/proc/locks`.
fn locked_bytes(path: &Path) -> BTreeSet<u64> {
    let meta = std::fs::metadata(path).expect("stat test image");
    let dev = meta.dev();
    // The kernel prints MAJOR:MINOR:INO with glibc's dev_t encoding.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    // The kernel lists the table a page at a time, finding its place again
    // by position for each page: while other tests take and drop locks, a
    // line can slip past a page boundary unseen. The locks of `path` do
    // not change during the call, so the union of a few reads is exact.
    let table: String = (0..5).map(|_| read_proc_locks()).collect();
    let mut bytes = BTreeSet::new();
    for line in table.lines().filter(|line| line.contains("OFDLCK")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = fields.iter().position(|field| *field == id) else {
            continue;
        };
        let start: u64 = fields[at + 1].parse().expect("lock start");
        let end: u64 = fields[at + 2].parse().expect("lock end");
        bytes.extend(start..=end);
    }
    bytes
}

/// `/proc/locks` in one `read`: a table read in several calls (as
/// `read_to_string` does) misses more lines when other test threads take
/// or drop locks between two of them.
fn read_proc_locks() -> String {
    use std::io::Read;
    let mut file = File::open("/proc/locks").expect("open /proc/locks");
    let mut buf = vec![0u8; 8 << 20];
    let len = file.read(&mut buf).expect("read /proc/locks");
    assert!(len < buf.len(), "/proc/locks did not fit one read");
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

fn set(bytes: &[u64]) -> BTreeSet<u64> {
    bytes.iter().copied().collect()
}

fn expect_conflict(result: Result<(), LockError>, path: &Path, message: &str) {
    let err = result.expect_err("lock should be refused");
    assert!(
        matches!(&err, LockError::Conflict { path: p, .. } if p == path),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.starts_with(message), "{text}");
    assert!(
        text.contains(&format!(
            "Is another process using the image [{}]?",
            path.display()
        )),
        "{text}"
    );
    assert_eq!(err.errno(), libc::EAGAIN);
}

#[test]
fn write_and_read_locks_take_the_bytes_qemu_takes() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = qcow2(dir.path(), "base.qcow2", None);
    let top = qcow2(dir.path(), "top.qcow2", Some(&base));
    let ours_rw = qcow2(dir.path(), "ours-rw.qcow2", None);
    let ours_ro = qcow2(dir.path(), "ours-ro.qcow2", None);

    let qemu = QemuIo::open(&top);
    let rw = open_rw(&ours_rw);
    lock(&rw, &ours_rw, LockMode::Write).expect("write lock");
    let ro = File::open(&ours_ro).expect("open");
    lock(&ro, &ours_ro, LockMode::Read).expect("read lock");

    assert_eq!(locked_bytes(&top), set(&[100, 101, 103, 201, 203]));
    assert_eq!(locked_bytes(&base), set(&[100, 201, 203]));
    assert_eq!(locked_bytes(&ours_rw), locked_bytes(&top));
    assert_eq!(locked_bytes(&ours_ro), locked_bytes(&base));
    drop(qemu);
}

#[test]
fn qemu_can_neither_write_nor_open_an_image_chainfs_writes() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let img = qcow2(dir.path(), "img.qcow2", None);
    let file = open_rw(&img);
    lock(&file, &img, LockMode::Write).expect("write lock");

    let write = qemu_io_write(&img);
    assert!(!write.status.success());
    assert!(
        stderr(&write).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&write)
    );
    let info = qemu_img_info(&img, false);
    assert!(!info.status.success());
    assert!(stderr(&info).contains("Failed to get"), "{}", stderr(&info));
    let shared_info = qemu_img_info(&img, true);
    assert!(shared_info.status.success(), "{}", stderr(&shared_info));
}

#[test]
fn qemu_can_read_but_not_write_a_backing_image_chainfs_reads() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let base = qcow2(dir.path(), "base.qcow2", None);
    let file = File::open(&base).expect("open");
    lock(&file, &base, LockMode::Read).expect("read lock");

    let info = qemu_img_info(&base, false);
    assert!(info.status.success(), "{}", stderr(&info));
    let write = qemu_io_write(&base);
    assert!(!write.status.success());
    assert!(
        stderr(&write).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&write)
    );
}

#[test]
fn chainfs_refuses_an_image_a_qemu_process_is_writing() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let img = qcow2(dir.path(), "img.qcow2", None);
    let _qemu = QemuIo::open(&img);
    let before = locked_bytes(&img);

    let file = open_rw(&img);
    let refused = lock(&file, &img, LockMode::Write);
    expect_conflict(refused, &img, "Failed to get \"write\" lock");
    let refused = lock(&file, &img, LockMode::Read);
    expect_conflict(refused, &img, "Failed to get shared \"write\" lock");
    lock(&file, &img, LockMode::None).expect("force-share takes no lock");
    assert_eq!(locked_bytes(&img), before, "a refused lock leaves no bytes");
}

#[test]
fn two_readers_share_an_image() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("img");
    std::fs::write(&img, [0u8; 512]).expect("create image");
    let first = File::open(&img).expect("open");
    let second = File::open(&img).expect("open");
    lock(&first, &img, LockMode::Read).expect("first reader");
    lock(&second, &img, LockMode::Read).expect("second reader");
}

#[test]
fn a_reader_and_a_writer_refuse_each_other() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("img");
    std::fs::write(&img, [0u8; 512]).expect("create image");
    let reader = File::open(&img).expect("open");
    let writer = open_rw(&img);

    lock(&reader, &img, LockMode::Read).expect("reader");
    let refused = lock(&writer, &img, LockMode::Write);
    expect_conflict(refused, &img, "Failed to get \"write\" lock");
    drop(reader);
    assert!(locked_bytes(&img).is_empty(), "refused writer kept bytes");

    lock(&writer, &img, LockMode::Write).expect("writer");
    let reader = File::open(&img).expect("open");
    let refused = lock(&reader, &img, LockMode::Read);
    expect_conflict(refused, &img, "Failed to get shared \"write\" lock");
}

#[test]
fn a_refused_relock_keeps_the_old_locks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("img");
    std::fs::write(&img, [0u8; 512]).expect("create image");
    let ours = open_rw(&img);
    let other = File::open(&img).expect("open");
    lock(&ours, &img, LockMode::Read).expect("our read lock");
    lock(&other, &img, LockMode::Read).expect("other read lock");

    let refused = relock(&ours, &img, LockMode::Read, LockMode::Write);
    expect_conflict(refused, &img, "Failed to get \"write\" lock");
    drop(other);
    assert_eq!(locked_bytes(&img), set(&[100, 201, 203]));
}

#[test]
fn relocking_a_writer_as_a_reader_drops_the_write_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("img");
    std::fs::write(&img, [0u8; 512]).expect("create image");
    let ours = open_rw(&img);
    lock(&ours, &img, LockMode::Write).expect("write lock");
    assert_eq!(locked_bytes(&img), set(&[100, 101, 103, 201, 203]));

    relock(&ours, &img, LockMode::Write, LockMode::Read).expect("relock");
    assert_eq!(locked_bytes(&img), set(&[100, 201, 203]));
    let other = File::open(&img).expect("open");
    lock(&other, &img, LockMode::Read).expect("a second reader fits now");
}

#[test]
fn unlock_drops_every_byte() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("img");
    std::fs::write(&img, [0u8; 512]).expect("create image");
    let ours = open_rw(&img);
    lock(&ours, &img, LockMode::Write).expect("write lock");
    unlock(&ours).expect("unlock");
    assert!(locked_bytes(&img).is_empty());
}

#[test]
fn force_share_takes_nothing_and_ignores_writers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("img");
    std::fs::write(&img, [0u8; 512]).expect("create image");
    let writer = open_rw(&img);
    lock(&writer, &img, LockMode::Write).expect("write lock");
    let before = locked_bytes(&img);
    let forced = File::open(&img).expect("open");
    lock(&forced, &img, LockMode::None).expect("force-share");
    assert_eq!(locked_bytes(&img), before);
}
