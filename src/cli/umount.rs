//! `chainfs umount MOUNTPOINT`: unmount, then wait until the daemon has
//! written everything and released the images.
//!
//! The order matters. The daemon is found *before* the unmount (afterwards
//! the mount, which is how it is found, is gone); then the mount is taken
//! down, which ends the daemon's request loop; the daemon flushes and closes
//! every image and exits; its exit is what this command waits for, since a
//! process that has exited has closed its images and so dropped their locks.
//!
//! A busy mount (a file open in it, a shell's working directory) is not
//! detached lazily: like `umount` and `fusermount3 -u`, the command fails
//! with "busy" and the mount stays as it was. A lazy detach would leave the
//! daemon serving the open files for as long as they stay open, so "return
//! once the images are released" could not be promised.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::procfs::{self, Process};
use super::{CliError, UmountArgs};

/// How long the daemon may take to flush and exit after the unmount.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often to look whether the daemon has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Runs `chainfs umount`.
pub fn run(args: &UmountArgs) -> Result<(), CliError> {
    let mount_point = mount_point_path(&args.mountpoint)?;
    let daemons = find_daemons(&mount_point)?;
    if daemons.is_empty() {
        log::warn!(
            "{}: no daemon serves this mount (was it killed?); unmounting only",
            mount_point.display()
        );
    }
    unmount(&mount_point)?;
    wait_for_exit(&mount_point, &daemons, EXIT_TIMEOUT)
}

/// The absolute, symlink-free path of the mount point, found without
/// touching the mount itself: the daemon may be dead (every access then
/// fails with ENOTCONN) or stuck, and unmounting must still work.
pub fn mount_point_path(path: &Path) -> Result<PathBuf, CliError> {
    let absolute = std::path::absolute(path).map_err(|e| CliError::at(path, e))?;
    let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return std::fs::canonicalize(&absolute).map_err(|e| CliError::at(path, e));
    };
    let parent = std::fs::canonicalize(parent).map_err(|e| CliError::at(path, e))?;
    let joined = parent.join(name);
    // A symlink as the last component still has to be followed; it lives in
    // the parent directory, so reading it does not touch the mount.
    match std::fs::read_link(&joined) {
        Ok(_) => std::fs::canonicalize(&joined).map_err(|e| CliError::at(path, e)),
        Err(_) => Ok(joined),
    }
}

/// The daemon(s) serving the FUSE mount at `mount_point`.
fn find_daemons(mount_point: &Path) -> Result<Vec<Process>, CliError> {
    let entry = procfs::mount_at(mount_point)
        .map_err(|e| CliError::at(Path::new("/proc/self/mountinfo"), e))?
        .ok_or_else(|| CliError::at(mount_point, "not mounted"))?;
    if !entry.is_chainfs() {
        return Err(CliError::at(
            mount_point,
            format!(
                "not a chainfs mount (type {}, source {})",
                entry.fstype, entry.source
            ),
        ));
    }
    Ok(procfs::fuse_daemons(&entry))
}

/// Unmounts `mount_point` as `umount` would, or, for a user who may not
/// (EPERM), through the setuid helper `fusermount3 -u`, as libfuse does.
fn unmount(mount_point: &Path) -> Result<(), CliError> {
    match umount2(mount_point) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fusermount_unmount(mount_point),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(busy(mount_point)),
        Err(e) => Err(CliError::at(mount_point, format!("cannot unmount: {e}"))),
    }
}

/// umount2(2) without flags: fails with EBUSY when the mount is in use.
fn umount2(mount_point: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(mount_point.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call;
    // umount2 reads it and keeps no reference.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fusermount3 -u MOUNTPOINT`; its complaint becomes our one-line message.
fn fusermount_unmount(mount_point: &Path) -> Result<(), CliError> {
    let output = Command::new("fusermount3")
        .arg("-u")
        .arg("--")
        .arg(mount_point)
        .output()
        .map_err(|e| CliError::at(mount_point, format!("cannot run fusermount3: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("Device or resource busy") {
        return Err(busy(mount_point));
    }
    let reason = stderr.lines().last().unwrap_or("").trim();
    Err(CliError::at(
        mount_point,
        format!(
            "cannot unmount: {}",
            reason.trim_start_matches("fusermount3: ")
        ),
    ))
}

/// The message for a mount in use, with the way out.
fn busy(mount_point: &Path) -> CliError {
    CliError::at(
        mount_point,
        format!(
            "busy: a file in it is open or a process works in it; close it and retry, \
             or detach lazily with `fusermount3 -uz {}`",
            mount_point.display()
        ),
    )
}

/// Waits until every daemon has exited, or fails after `timeout`.
fn wait_for_exit(
    mount_point: &Path,
    daemons: &[Process],
    timeout: Duration,
) -> Result<(), CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(running) = daemons.iter().find(|d| d.is_alive()) else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(CliError::at(
                mount_point,
                format!(
                    "unmounted, but its daemon (pid {}) is still running after {} s; \
                     its images may not be released yet",
                    running.pid,
                    timeout.as_secs()
                ),
            ));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_point_path_resolves_the_parent_without_touching_the_leaf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = std::fs::canonicalize(dir.path()).expect("canonical");
        let missing = dir.path().join("sub/../not-there");
        // The leaf need not exist (nor answer): only its parent is resolved.
        let resolved = mount_point_path(&dir.path().join("not-there")).expect("resolves");
        assert_eq!(resolved, real.join("not-there"));
        assert!(mount_point_path(&missing).is_err(), "sub does not exist");
    }

    #[test]
    fn a_symlinked_mount_point_resolves_to_its_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir(real.join("target")).expect("mkdir");
        std::os::unix::fs::symlink(real.join("target"), real.join("link")).expect("symlink");
        let resolved = mount_point_path(&real.join("link")).expect("resolves");
        assert_eq!(resolved, real.join("target"));
    }

    #[test]
    fn unmounting_what_is_not_mounted_names_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = run(&UmountArgs {
            mountpoint: dir.path().to_path_buf(),
        })
        .expect_err("not mounted");
        assert!(err.to_string().ends_with(": not mounted"), "{err}");
    }

    #[test]
    fn waiting_for_no_daemon_returns_at_once() {
        let start = Instant::now();
        wait_for_exit(Path::new("/x"), &[], Duration::from_secs(5)).expect("nothing to wait for");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn waiting_for_a_live_process_times_out_with_its_pid() {
        let me = Process::get(std::process::id()).expect("self");
        let err = wait_for_exit(Path::new("/x"), &[me], Duration::from_millis(50))
            .expect_err("this process does not exit");
        assert!(
            err.to_string().contains(&format!("pid {}", me.pid)),
            "{err}"
        );
    }
}
