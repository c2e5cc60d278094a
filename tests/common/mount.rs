//! Mounting for real: mount a chain in-process, serve it on a thread,
//! unmount and join; the `mounted()` fixture for the usual gate, temporary
//! directory, chain and mount; the five-deep chain of SPEC's example built
//! with QEMU's own tools; and talking to a mount's `ctl/` files.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chainfs::chain::{Chain, ChainOptions};
use chainfs::fs::{FsError, Mount, MountOptions, RequestStats, Unmounter};
use chainfs::jobs::Jobs;

use super::tools::require_all;
use super::tools::{convert_to_raw, create_overlay, in_ci, path_str, qemu_img_in, qemu_io};

/// A chain mounted in this process and served on a thread.
pub struct Mounted {
    /// The mount point.
    pub mnt: PathBuf,
    /// Request counters of the mount.
    pub stats: std::sync::Arc<RequestStats>,
    unmounter: Unmounter,
    thread: Option<JoinHandle<Result<(), FsError>>>,
}

/// Opens `top` (writable unless `options.read_only`) and mounts it at `mnt`.
pub fn mount(top: &Path, mnt: &Path, options: &MountOptions) -> Mounted {
    let chain_options = ChainOptions {
        writable: !options.read_only,
        ..ChainOptions::default()
    };
    let chain = Chain::open(top, &chain_options)
        .unwrap_or_else(|e| panic!("open chain {}: {e}", top.display()));
    let jobs = Jobs::new(chain, options.read_only);
    std::fs::create_dir_all(mnt).unwrap();
    let mount =
        Mount::new(jobs, mnt, options).unwrap_or_else(|e| panic!("mount {}: {e}", mnt.display()));
    let stats = mount.stats();
    let unmounter = mount.unmounter();
    let thread = std::thread::spawn(move || mount.run());
    Mounted {
        mnt: mnt.to_path_buf(),
        stats,
        unmounter,
        thread: Some(thread),
    }
}

/// Mounts `top` at `<dir>/mnt` with default options (4 threads, writable).
pub fn mount_default(top: &Path, dir: &Path) -> Mounted {
    mount(top, &dir.join("mnt"), &MountOptions::default())
}

impl Mounted {
    /// A file in the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// Asks the mount to end, without waiting.
    pub fn request_unmount(&self) {
        self.unmounter.unmount();
    }

    /// Waits until the mount ended by itself (an outside `umount`) and
    /// asserts that it ended cleanly.
    pub fn join(mut self) {
        let thread = self.thread.take().expect("mounted");
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("mount at {} ended with {e}", self.mnt.display()),
            Err(_) => panic!("mount thread at {} panicked", self.mnt.display()),
        }
    }

    /// Unmounts, waits until the images are closed, and asserts that the
    /// mount ended cleanly.
    pub fn unmount(self) {
        self.unmounter.unmount();
        self.join();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A failed test must not leave a mount behind.
        if let Some(thread) = self.thread.take() {
            self.unmounter.unmount();
            let _ = thread.join();
        }
    }
}

/// A test's own chain, mounted: what [`mounted`] returns. Bind it as
/// `Fixture { dir, top, m }` (the mount last), so that the mount ends
/// before the directory holding its images is removed.
pub struct Fixture {
    /// The temporary directory holding the images and the mount point.
    pub dir: tempfile::TempDir,
    /// The chain's active image.
    pub top: PathBuf,
    /// The mount, at `<dir>/mnt`.
    pub m: Mounted,
}

/// The preamble of the mount tests: the gate (FUSE, qemu-img, qemu-io and
/// every tool in `tools`), a temporary directory, the chain `build` makes
/// in it (returning its active image), and that chain mounted at
/// `<dir>/mnt` with default options. `None` when the gate says to skip
/// (it has said so loudly).
pub fn mounted(tools: &[&str], build: impl FnOnce(&Path) -> PathBuf) -> Option<Fixture> {
    if !require_all(tools) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = build(dir.path());
    let m = mount_default(&top, dir.path());
    Some(Fixture { dir, top, m })
}

/// Reads the whole file at `path`.
pub fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The errno of `result`'s error, panicking if it succeeded.
pub fn errno_of<T: std::fmt::Debug>(result: std::io::Result<T>, what: &str) -> i32 {
    match result {
        Ok(value) => panic!("{what}: succeeded ({value:?}) but should have failed"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: {e} has no errno")),
    }
}

/// Writes `data` at `offset` with one `pwrite`.
pub fn pwrite(file: &File, data: &[u8], offset: u64) -> std::io::Result<usize> {
    file.write_at(data, offset)
}

/// The five-deep chain of SPEC's example, built by QEMU's tools, base first:
///
/// * `file-A.img` raw, 48 MiB (shorter than the rest: reads past it are zeros)
/// * `file-B.img` qcow2, 4 KiB clusters, zero clusters over A's data
/// * `file-C.img` qcow2, 64 KiB clusters, every cluster compressed: made
///   standalone with `qemu-img convert -c`, then `rebase -u` onto B
/// * `file-D.img` qcow2, 1 MiB clusters: partial-cluster writes and a zero
///   cluster
/// * `file-E.img` qcow2, 64 KiB clusters, the active image
///
/// Each layer writes its own pattern in its own regions and over others'.
pub struct FiveChain {
    /// The temporary directory holding the images (and room for a mount).
    pub dir: tempfile::TempDir,
}

/// Virtual size of the qcow2 layers.
pub const FIVE_SIZE: u64 = 64 * super::MIB;

impl FiveChain {
    /// Builds the chain.
    pub fn build() -> FiveChain {
        let dir = tempfile::Builder::new()
            .prefix("chainfs-fs-")
            .tempdir()
            .unwrap();
        let chain = FiveChain { dir };
        chain.build_a_b();
        chain.build_c();
        chain.build_d_e();
        chain
    }

    /// The image called `name` (e.g. `file-C.img`).
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The node names, base first.
    pub fn names() -> [&'static str; 5] {
        [
            "file-A.img",
            "file-B.img",
            "file-C.img",
            "file-D.img",
            "file-E.img",
        ]
    }

    /// The format of node `name`.
    pub fn format(name: &str) -> &'static str {
        if name == "file-A.img" {
            "raw"
        } else {
            "qcow2"
        }
    }

    fn qemu_img(&self, args: &[&str]) {
        qemu_img_in(self.dir.path(), args);
    }

    fn qemu_io(&self, image: &str, format: &str, commands: &[&str]) {
        qemu_io(&self.image(image), format, commands);
    }

    fn build_a_b(&self) {
        self.qemu_img(&["create", "-q", "-f", "raw", "file-A.img", "48M"]);
        self.qemu_io(
            "file-A.img",
            "raw",
            &[
                "write -P 0xa1 0 4M",
                "write -P 0xa2 20M 2M",
                "write -P 0xa3 40M 8M",
            ],
        );
        let b = self.image("file-B.img");
        create_overlay(&b, ("file-A.img", "raw"), Some("64M"), "cluster_size=4096");
        self.qemu_io(
            "file-B.img",
            "qcow2",
            &[
                "write -P 0xb1 2M 4M",
                "write -P 0xb2 30M 1M",
                "write -z 21M 512k",
                "write -P 0xb3 47M 2M",
                "write -P 0xb4 12345 777",
            ],
        );
    }

    fn build_c(&self) {
        self.qemu_img(&["create", "-q", "-f", "qcow2", "c-src.qcow2", "64M"]);
        self.qemu_io(
            "c-src.qcow2",
            "qcow2",
            &[
                "write -P 0xc1 1M 2M",
                "write -P 0xc2 32M 3M",
                "write -P 0xc3 50M 64k",
            ],
        );
        self.qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "c-src.qcow2",
            "file-C.img",
        ]);
        self.qemu_img(&[
            "rebase",
            "-u",
            "-b",
            "file-B.img",
            "-F",
            "qcow2",
            "file-C.img",
        ]);
    }

    fn build_d_e(&self) {
        let d = self.image("file-D.img");
        create_overlay(&d, ("file-C.img", "qcow2"), None, "cluster_size=1048576");
        self.qemu_io(
            "file-D.img",
            "qcow2",
            &[
                "write -P 0xd1 1536k 100k",
                "write -z 3M 1M",
                "write -P 0xd2 33M 4k",
                "write -P 0xd3 60M 3M",
            ],
        );
        create_overlay(&self.top(), ("file-D.img", "qcow2"), None, "");
        self.qemu_io(
            "file-E.img",
            "qcow2",
            &[
                "write -P 0xe1 3584k 1M",
                "write -z 2560k 64k",
                "write -P 0xe2 40M 64k",
                "write -P 0xe3 63M 1M",
            ],
        );
    }

    /// The active image.
    pub fn top(&self) -> PathBuf {
        self.image("file-E.img")
    }

    /// The gate (FUSE, qemu-img, qemu-io and every tool in `tools`), then
    /// [`FiveChain::build`]: how every test on SPEC's chain starts. `None`
    /// when the gate says to skip.
    pub fn gated(tools: &[&str]) -> Option<FiveChain> {
        require_all(tools).then(FiveChain::build)
    }

    /// Every node's guest content as QEMU reads it, base first.
    pub fn views(&self) -> Vec<Vec<u8>> {
        FiveChain::names()
            .iter()
            .map(|n| convert_to_raw(&self.image(n)))
            .collect()
    }

    /// Mounts the active image at `<dir>/mnt` with default options.
    pub fn mount(&self) -> Mounted {
        mount_default(&self.top(), self.dir.path())
    }
}

/// Writes one command to `ctl/command`; returns the errno of a refusal.
pub fn command(m: &Mounted, text: &str) -> Result<(), i32> {
    command_at(&m.mnt, text)
}

/// [`command`] by mount point, for a thread that cannot borrow the mount.
pub fn command_at(mnt: &Path, text: &str) -> Result<(), i32> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("ctl/command"))
        .unwrap();
    file.write_all(text.as_bytes())
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// `ctl/status.json`, parsed.
pub fn status_json(m: &Mounted) -> serde_json::Value {
    status_json_at(&m.mnt)
}

/// [`status_json`] by mount point, for a mount of the binary.
pub fn status_json_at(mnt: &Path) -> serde_json::Value {
    serde_json::from_slice(&read_all(&mnt.join("ctl/status.json"))).unwrap()
}

/// Every event in `ctl/events`, oldest first.
pub fn events(m: &Mounted) -> Vec<serde_json::Value> {
    String::from_utf8(read_all(&m.path("ctl/events")))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// A tmpfs of a given size mounted for a test (to fill a disk), unmounted
/// when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Mounts a tmpfs of `megabytes` at `dir`; `None` (after saying so)
    /// when not root, which mounting needs.
    pub fn mount(dir: &Path, megabytes: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            assert!(!in_ci(), "the full-disk tests need root under CI");
            eprintln!("!!!!!!!! SKIPPED: mounting a tmpfs needs root; this test checked NOTHING");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let size = format!("size={megabytes}M");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs", path_str(dir)])
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs");
        Some(Tmpfs(dir.to_path_buf()))
    }
}

/// A temporary directory whose `small/` is a tmpfs of 80 MiB that a
/// 60 MiB filler leaves too little room in: where the full-disk tests put
/// the image that fills up.
pub struct FullTmpfs {
    /// The temporary directory.
    pub dir: tempfile::TempDir,
    _tmpfs: Tmpfs,
    /// The filler; removing it frees the room.
    pub filler: PathBuf,
}

impl FullTmpfs {
    /// Mounts and fills the tmpfs; `None` (after saying so) when not root.
    pub fn new() -> Option<FullTmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let tmpfs = Tmpfs::mount(&dir.path().join("small"), 80)?;
        let filler = dir.path().join("small/filler");
        Some(FullTmpfs {
            dir,
            _tmpfs: tmpfs,
            filler,
        })
    }

    /// Writes the filler; call it once the images are in place.
    pub fn fill(&self) {
        std::fs::write(&self.filler, vec![1u8; 60 << 20]).unwrap();
    }

    /// `<dir>/small`, the tmpfs.
    pub fn small(&self) -> PathBuf {
        self.dir.path().join("small")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", path_str(&self.0)])
            .status();
    }
}

/// The first job in `ctl/status.json`.
pub fn job(m: &Mounted) -> serde_json::Value {
    job_at(&m.mnt)
}

/// [`job`] by mount point, for a mount of the binary.
pub fn job_at(mnt: &Path) -> serde_json::Value {
    status_json_at(mnt)[0].clone()
}

/// Polls `ctl/status.json` until `found` picks something out of it;
/// panics with `what` and the last status after `timeout`.
fn poll_status<T>(
    m: &Mounted,
    timeout: Duration,
    what: &str,
    found: impl Fn(&serde_json::Value) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status_json(m);
        if let Some(value) = found(&status) {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first job, once `done` holds for it; panics naming `what` if that
/// takes more than a minute.
pub fn wait_for(
    m: &Mounted,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let first = |status: &serde_json::Value| Some(status[0].clone()).filter(|job| done(job));
    poll_status(m, Duration::from_secs(60), what, first)
}

/// Job `id` in `ctl/status.json`, once `done` holds for it; panics naming
/// the job if that takes more than two minutes.
pub fn wait_job(
    m: &Mounted,
    id: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let what = format!("job {id} never got there");
    poll_status(m, Duration::from_secs(120), &what, |status| {
        let job = status
            .as_array()
            .and_then(|jobs| jobs.iter().find(|job| job["id"] == id))
            .unwrap_or_else(|| panic!("no job {id}: {status}"));
        Some(job.clone()).filter(|job| done(job))
    })
}

/// Job `id` once it has an outcome.
pub fn wait_outcome(m: &Mounted, id: &str) -> serde_json::Value {
    wait_job(m, id, |job| job.get("outcome").is_some())
}

/// Job `id` once it is ready (or ended without getting there).
pub fn wait_ready(m: &Mounted, id: &str) -> serde_json::Value {
    wait_job(m, id, |job| {
        job["status"] == "ready" || job.get("outcome").is_some()
    })
}

/// Every listed job, once each has an outcome; panics after two minutes.
pub fn wait_jobs(m: &Mounted) -> Vec<serde_json::Value> {
    poll_status(
        m,
        Duration::from_secs(120),
        "jobs never finished",
        |status| {
            let jobs = status.as_array().cloned().unwrap_or_default();
            let done = jobs.iter().all(|job| job.get("outcome").is_some());
            done.then_some(jobs)
        },
    )
}

/// The names of the events logged so far, oldest first.
pub fn event_names(m: &Mounted) -> Vec<String> {
    let name = |e: &serde_json::Value| e["event"].as_str().unwrap_or_default().to_string();
    events(m).iter().map(name).collect()
}

/// File `name` of the mount opened for reading and writing.
pub fn open_rw(m: &Mounted, name: &str) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path(name))
        .unwrap_or_else(|e| panic!("open {name} read-write: {e}"))
}

/// Writes `data` at `offset` through `file` and into `model`.
pub fn write_model(file: &File, model: &mut [u8], offset: u64, data: &[u8]) {
    file.write_all_at(data, offset).unwrap();
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

/// The events in `ctl/events` called `name`, oldest first.
pub fn events_named(m: &Mounted, name: &str) -> Vec<serde_json::Value> {
    events(m)
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

/// The names in the mount's root, sorted.
pub fn names_in(m: &Mounted) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` of `len` bytes at `offset` of
/// `file`: a discard.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fallocate(file, mode, offset, len)
}

/// `fallocate(mode)` of `len` bytes at `offset` of `file`.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate only reads its integer arguments; the descriptor
    // is open for as long as `file` is borrowed.
    let done = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
