//! Running the `chainfs` binary with a timeout, telling whether something
//! is mounted, finding a mount's daemon, and cleaning up a mount a failed
//! test left behind.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use super::chain::small_chain;
use super::tools::{path_str, qemu_img_check};

/// How long any one command may take before the test gives up on it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The binary under test, copied once per test process to a world-readable
/// place: a rebuild during the run then cannot swap it under the tests, and
/// the unprivileged users of `cli_user` can run it. Copies left by test
/// processes that have exited are removed.
pub fn chainfs_bin() -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-bin");
        std::fs::create_dir_all(&dir).expect("bin dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        remove_stale_copies(&dir);
        let copy = dir.join(format!("chainfs-{}", std::process::id()));
        std::fs::copy(env!("CARGO_BIN_EXE_chainfs"), &copy).expect("copy chainfs");
        copy
    })
}

/// Removes `chainfs-PID` copies whose test process is gone.
fn remove_stale_copies(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("chainfs-")
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// What a finished command did.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    /// Everything it wrote to stdout (lossily decoded).
    pub stdout: String,
    /// The same, as bytes.
    pub stdout_bytes: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Outcome {
    /// Panics with everything it printed unless it exited 0.
    pub fn ok(self) -> Outcome {
        assert_eq!(self.code, Some(0), "command failed: {self:#?}");
        self
    }

    /// Asserts a failure that printed exactly one line, `chainfs: …`, and
    /// returns that line.
    pub fn one_line_failure(&self) -> &str {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "expected a failure: {self:#?}"
        );
        let line = self.stderr.trim_end_matches('\n');
        assert!(!line.contains('\n'), "more than one line: {self:#?}");
        assert!(line.starts_with("chainfs: "), "not `chainfs: …`: {self:#?}");
        line
    }
}

/// `chainfs ARGS`.
pub fn chainfs<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(chainfs_bin());
    command.args(args);
    run(&mut command)
}

/// Runs `command` to completion (output through files, so that a daemon
/// that wrongly kept them could not hang the test), with a timeout.
pub fn run(command: &mut Command) -> Outcome {
    let out = tempfile::tempfile().expect("stdout file");
    let err = tempfile::tempfile().expect("stderr file");
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    let mut child = spawn(command);
    let code = wait_child(&mut child, COMMAND_TIMEOUT)
        .unwrap_or_else(|| panic!("{command:?} did not finish in {COMMAND_TIMEOUT:?}"));
    let stdout_bytes = read_all(out);
    Outcome {
        code,
        stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
        stdout_bytes,
        stderr: String::from_utf8_lossy(&read_all(err)).into_owned(),
    }
}

/// Starts `command`. Retries while the program is "text file busy": the
/// copy of the binary was just written, and a child another test thread
/// forked meanwhile holds the writer's descriptor until it execs.
fn spawn(command: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match command.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{command:?}: {e}"),
        }
    }
}

fn read_all(mut file: File) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.read_to_end(&mut bytes).expect("read output");
    bytes
}

/// Waits for `child` up to `timeout`; kills it and returns `None` on
/// timeout, else its exit code (`Some(None)` when a signal ended it).
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<Option<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status.code());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The mount points in this namespace's mount table.
pub fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .collect()
}

/// Whether anything is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let path = canonical_parent(path);
    mount_points().contains(&path)
}

/// `path` with its parent resolved, without touching `path` itself (which
/// may be a dead mount).
fn canonical_parent(path: &Path) -> PathBuf {
    let parent = path.parent().expect("has a parent");
    std::fs::canonicalize(parent)
        .expect("parent exists")
        .join(path.file_name().expect("has a name"))
}

/// Polls `condition` every 20 ms for up to `timeout`.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Live (non-zombie) chainfs processes whose command line mentions
/// `marker` (a test's unique temporary directory).
pub fn chainfs_processes(marker: &Path) -> Vec<u32> {
    processes_of(chainfs_bin(), marker)
}

/// Live (non-zombie) processes of program `bin` whose command line
/// mentions `marker`.
pub fn processes_of(bin: &Path, marker: &Path) -> Vec<u32> {
    let marker = marker.to_string_lossy().into_owned();
    let bin = bin.to_string_lossy().into_owned();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.first() == Some(&bin) && args.iter().any(|a| a.contains(&marker))
        })
        .filter(|pid| !is_zombie(*pid))
        .collect()
}

fn is_zombie(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// Takes a mount down lazily when dropped, so that a failing test leaves
/// nothing mounted behind it.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z", "--"])
                .arg(&self.0)
                .output();
        }
    }
}

/// The bytes of every file in `paths`, to show that a failure left the
/// images byte-identical.
pub fn snapshot(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// Kills the one daemon whose command line mentions `marker` (a test's
/// temporary directory) with SIGKILL, waits until it is gone, and takes its
/// dead mount at `mnt` down lazily: a crash, for the tests of what it
/// leaves behind.
pub fn kill_daemon(marker: &Path, mnt: &Path) {
    let daemons = chainfs_processes(marker);
    assert_eq!(daemons.len(), 1, "one daemon: {daemons:?}");
    // SAFETY: kill has no memory-safety preconditions; the pid is our daemon's.
    assert_eq!(unsafe { libc::kill(daemons[0] as i32, libc::SIGKILL) }, 0);
    assert!(wait_until(Duration::from_secs(10), || chainfs_processes(
        marker
    )
    .is_empty()));
    let _ = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(mnt)
        .output();
}

/// The directories `/bin/sh` searches when it has no PATH, first first:
/// mount(8) runs its helpers with PATH removed from the environment, so
/// `mount.fuse3` finds `chainfs` only in one of these.
pub const SH_DEFAULT_PATH_FIRST: &str = "/usr/local/sbin";

/// Runs `script` with `sh -eu` in a private mount namespace (`unshare -m`)
/// in which `chainfs` at the head of sh's default PATH is the binary under
/// test, as if it were installed, so that `mount -t fuse.chainfs` and fstab
/// lines run it through `mount.fuse3`. Nothing it mounts is seen outside
/// the namespace; if the script fails, `mnt` is unmounted lazily so the
/// daemon exits. Daemons it starts are `processes_of(Path::new("chainfs"),
/// marker)`: sh runs the helper by that name.
pub fn run_installed(dir: &Path, mnt: &Path, script: &str) -> Outcome {
    let bin = dir.join("installed-bin");
    std::fs::create_dir_all(&bin).expect("mkdir installed-bin");
    // A symlink, not a copy: a file just written cannot be executed while
    // a child another test thread forks still holds the writer's descriptor.
    let link = bin.join("chainfs");
    if !link.exists() {
        std::os::unix::fs::symlink(chainfs_bin(), &link).expect("symlink chainfs");
    }
    let prologue = format!(
        "trap 'umount -l {mnt} 2>/dev/null || true' EXIT\n\
         mount --bind {bin} {first}\n\
         found=$(env -i /bin/sh -c 'command -v chainfs')\n\
         [ \"$found\" = {first}/chainfs ] || {{ echo \"sh without PATH runs $found\" >&2; exit 1; }}\n",
        mnt = mnt.display(),
        bin = bin.display(),
        first = SH_DEFAULT_PATH_FIRST,
    );
    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "sh", "-euc"])
        .arg(prologue + script);
    run(&mut command)
}

/// A small chain (`small_chain`: base.qcow2 <- top.qcow2) and an empty
/// mount point in a fresh directory: what the tests of the binary mount.
pub struct ChainDir {
    /// The directory; its path marks the daemons started for it.
    pub dir: tempfile::TempDir,
    /// The base image.
    pub base: PathBuf,
    /// The top (active) image.
    pub top: PathBuf,
    /// The empty mount point.
    pub mnt: PathBuf,
}

impl ChainDir {
    /// Creates the chain and the mount point.
    pub fn new() -> ChainDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let [base, top] = small_chain(dir.path());
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        ChainDir {
            dir,
            base,
            top,
            mnt,
        }
    }

    /// The daemons started for this chain: by the test's copy of the
    /// binary, or by the name `chainfs`, as `mount.fuse3` runs it.
    pub fn daemons(&self) -> Vec<u32> {
        let mut pids = chainfs_processes(self.dir.path());
        pids.extend(processes_of(Path::new("chainfs"), self.dir.path()));
        pids
    }

    /// `chainfs mount EXTRA… TOP MNT`, in the background.
    pub fn mount(&self, extra: &[&str]) -> MountGuard {
        let guard = MountGuard(self.mnt.clone());
        let mut args = vec!["mount"];
        args.extend_from_slice(extra);
        args.extend([path_str(&self.top), path_str(&self.mnt)]);
        chainfs(&args).ok();
        guard
    }

    /// After the mount went away: the daemon is gone, nothing is mounted,
    /// and both images are clean and unlocked (qemu-img check without -U).
    pub fn assert_released(&self) {
        assert!(self.daemons().is_empty(), "daemon still running");
        assert!(!is_mounted(&self.mnt), "still mounted");
        qemu_img_check(&self.top);
        qemu_img_check(&self.base);
    }

    /// After a plain unmount, which the daemon learns of and finishes on
    /// its own: waits for it to exit, then `assert_released`.
    pub fn wait_released(&self) {
        assert!(
            wait_until(Duration::from_secs(30), || self.daemons().is_empty()),
            "the daemon did not exit after the unmount"
        );
        self.assert_released();
    }
}

/// Bytes in the kill tests' chain.
pub const PATTERNED_SIZE: usize = 64 << 20;

/// The kill tests' chain, mounted by the binary at `<dir>/mnt`:
/// `base.img` (raw, [`PATTERNED_SIZE`] bytes of a pattern that changes
/// every 4 KiB) under `top.qcow2`. Returns the top, the mount point, the
/// pattern, and the guard that takes the mount down if the test fails.
pub fn mount_patterned_chain(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>, MountGuard) {
    let top = super::chain::base_and_overlay(dir, "base.img", "64M", &[]);
    let pattern: Vec<u8> = (0..PATTERNED_SIZE)
        .map(|i| (i / 4096 % 251) as u8)
        .collect();
    std::fs::write(dir.join("base.img"), &pattern).expect("write the base");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).expect("make the mount point");
    let guard = MountGuard(mnt.clone());
    chainfs(["mount", super::path_str(&top), super::path_str(&mnt)]).ok();
    (top, mnt, pattern, guard)
}
