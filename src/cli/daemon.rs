//! Detaching the mount daemon from the command that started it, as sshfs
//! (libfuse's `fuse_daemonize`) does: the command returns once the mount is
//! ready, with the daemon's own error if it failed, and the daemon lives on
//! in its own session.
//!
//! Why fork, and why first: a process that has threads cannot safely fork
//! (only the forking thread survives, possibly holding a lock another thread
//! took), and opening the chain, mounting and serving all start threads. So
//! `mount` forks while still single-threaded, before it opens any image; the
//! child opens the chain (so the image locks are its own), mounts, and then
//! reports over a pipe. Re-executing ourselves with a hidden flag would work
//! as well but puts a second, undocumented command line in the contract.
//!
//! ```text
//! parent                          child
//! pipe, fork ───────────────────▶ setsid, close inherited descriptors,
//!                                 stderr → log file (if any)
//! read pipe (blocks)              open chain, mount
//!                                 stdio → /dev/null (stderr → log file)
//!         ◀──────── "ok" ──────── or "error MESSAGE", then exit 1
//! exit 0 (or print MESSAGE, 1)    serve until unmounted
//! ```

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::CliError;

/// What [`detach`] returns in each process.
pub enum Detached {
    /// In the command the user ran: how the daemon's start went.
    Parent(Result<(), CliError>),
    /// In the daemon: the channel to report readiness on.
    Child(Readiness),
}

/// The daemon's end of the readiness pipe.
pub struct Readiness {
    pipe: Option<File>,
}

impl Readiness {
    /// The mount is ready: detach stdio from the terminal (stderr goes to
    /// `log` if given) and let the parent exit 0.
    ///
    /// Stdio is redirected *before* the parent is told, so that when the
    /// parent exits nothing of the daemon still holds its terminal or the
    /// pipes of a caller that waits for end-of-file on them
    /// (`$(chainfs mount …)`, a test's `Command::output`).
    pub fn ready(&mut self, log: Option<&File>) -> io::Result<()> {
        redirect_stdio(log)?;
        // Keep nothing of the caller's busy: its directory may be unmounted.
        std::env::set_current_dir("/")?;
        self.send("ok")
    }

    /// The mount failed: hand the one-line message to the parent to print.
    /// Returns false if the parent was already told the mount is ready (or
    /// is gone), so the message has nobody to go to but the log.
    pub fn fail(&mut self, error: &CliError) -> bool {
        self.pipe.is_some() && self.send(&format!("error {error}")).is_ok()
    }

    fn send(&mut self, message: &str) -> io::Result<()> {
        match self.pipe.take() {
            // Dropping the file closes the pipe: end-of-file for the parent.
            Some(mut pipe) => pipe.write_all(message.as_bytes()),
            None => Ok(()),
        }
    }
}

/// Forks the daemon. `mount_point` only names the mount in messages; `log`
/// is `--log-file`, the daemon's stderr from its first instruction on.
///
/// Must be called while the process has a single thread; it checks.
pub fn detach(mount_point: &Path, log: Option<&File>) -> Result<Detached, CliError> {
    ensure_single_threaded()?;
    let (read_end, write_end) = cloexec_pipe().map_err(|e| internal("pipe", &e))?;
    // SAFETY: the process has one thread (checked above), so the child
    // starts with every lock free and may do anything a program may.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(internal("fork", &io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions; in a fresh
            // child (never a group leader) it cannot fail.
            unsafe { libc::setsid() };
            // Before anything else is opened: the daemon outlives the
            // command, so whatever else the caller left open (a pipe it
            // waits on, a lock, a deleted file) would stay open with it.
            let own = [Some(write_end.as_raw_fd()), log.map(AsRawFd::as_raw_fd)];
            close_inherited(&own.into_iter().flatten().collect::<Vec<_>>());
            if let Some(log) = log {
                // Everything the daemon logs goes to the file from the
                // start, none of it to the caller's terminal.
                redirect(log, libc::STDERR_FILENO).map_err(|e| internal("stderr", &e))?;
            }
            Ok(Detached::Child(Readiness {
                pipe: Some(File::from(write_end)),
            }))
        }
        child => {
            drop(write_end);
            Ok(Detached::Parent(await_child(
                File::from(read_end),
                child,
                mount_point,
            )))
        }
    }
}

/// Reads the child's report; end-of-file without one means it died.
fn await_child(mut pipe: File, child: libc::pid_t, mount_point: &Path) -> Result<(), CliError> {
    let mut message = String::new();
    let read = pipe.read_to_string(&mut message);
    if read.is_ok() && message == "ok" {
        return Ok(());
    }
    let status = reap(child);
    match message.strip_prefix("error ") {
        Some(error) => Err(CliError::Failed(error.to_owned())),
        None => Err(CliError::at(
            mount_point,
            format!("the mount daemon died before the mount was ready ({status})"),
        )),
    }
}

/// Waits for a child that failed, so that it leaves no zombie, and says
/// how it ended.
fn reap(child: libc::pid_t) -> String {
    if child <= 0 {
        // Not a real child (waitpid would wait for *any* child).
        return "its status is unknown".to_owned();
    }
    let mut status = 0;
    // SAFETY: status is a valid place for waitpid to write; the pid is our
    // own child.
    let rc = unsafe { libc::waitpid(child, &mut status, 0) };
    if rc != child {
        return "its status is unknown".to_owned();
    }
    if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit status {}", libc::WEXITSTATUS(status))
    }
}

/// A pipe whose ends are not inherited by programs the daemon runs
/// (`fusermount3`), which would otherwise keep it open and the parent
/// waiting.
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Points stdin and stdout at /dev/null and stderr at `log` (or /dev/null),
/// so the daemon holds no terminal and its log and panics land in the file.
fn redirect_stdio(log: Option<&File>) -> io::Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let err_target = log.unwrap_or(&null);
    for (from, to) in [(&null, 0), (&null, 1), (err_target, 2)] {
        redirect(from, to)?;
    }
    Ok(())
}

/// Makes descriptor `to` another name for `from`.
fn redirect(from: &File, to: RawFd) -> io::Result<()> {
    // SAFETY: both are open descriptors; dup2 replaces `to` atomically and
    // the std handles for 0, 1 and 2 keep using the new files.
    if unsafe { libc::dup2(from.as_raw_fd(), to) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every descriptor above stderr except `keep`. Listed first and
/// closed after, so that the listing's own descriptor is gone by then.
fn close_inherited(keep: &[RawFd]) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let open: Vec<RawFd> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd > libc::STDERR_FILENO && !keep.contains(&fd) {
            // SAFETY: nothing in this fresh child owns these descriptors:
            // they are the caller's, inherited across fork, and no Rust
            // object refers to them. A failure (the listing's own, already
            // closed descriptor) is harmless.
            unsafe { libc::close(fd) };
        }
    }
}

/// Refuses to fork a multi-threaded process (see the module doc).
fn ensure_single_threaded() -> Result<(), CliError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|e| internal("/proc/self/task", &e))?
        .count();
    if threads == 1 {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "internal error: cannot detach a process with {threads} threads"
        )))
    }
}

fn internal(what: &str, error: &io::Error) -> CliError {
    CliError::Failed(format!("internal error: {what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_harness_is_multi_threaded_so_detach_refuses() {
        // Unit tests run on worker threads beside the harness's main thread;
        // forking here would be exactly the hazard the check exists for.
        let err = detach(Path::new("/mnt"), None).err().expect("refused");
        assert!(err.to_string().contains("threads"), "{err}");
    }

    #[test]
    fn a_child_that_dies_silently_is_reported_with_its_status() {
        let (read_end, write_end) = cloexec_pipe().expect("pipe");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("spawn");
        drop(write_end);
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        let err = await_child(File::from(read_end), pid, Path::new("/mnt")).expect_err("died");
        // await_child reaped it already; this only satisfies the type.
        let _ = child.wait();
        assert_eq!(
            err.to_string(),
            "/mnt: the mount daemon died before the mount was ready (exit status 3)"
        );
    }

    #[test]
    fn a_reported_error_is_passed_on_verbatim() {
        let (read_end, write_end) = cloexec_pipe().expect("pipe");
        let mut readiness = Readiness {
            pipe: Some(File::from(write_end)),
        };
        assert!(readiness.fail(&CliError::Failed("img: locked".into())));
        assert!(
            !readiness.fail(&CliError::Failed("again".into())),
            "told once"
        );
        let err = await_child(File::from(read_end), -1, Path::new("/mnt")).expect_err("failed");
        assert_eq!(err.to_string(), "img: locked");
    }
}
