//! Setting up the kernel mount, serving it, and taking it down so that the
//! images are closed cleanly whichever way the unmount came (`umount`,
//! `fusermount3 -u`, or an [`Unmounter`] from a signal handler).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};

use super::errno::FsError;
use super::notify;
use super::ops::FsModel;
use super::stats::RequestStats;
use super::ChainFs;
use crate::jobs::target::MountSpot;
use crate::jobs::Jobs;
use crate::sync::{lock, Arc, Mutex};

/// How to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Every flat file 0444 and every write to one EROFS; `ctl/command`
    /// stays writable so commands are refused (EROFS) and logged.
    pub read_only: bool,
    /// Let other users in (`allow_other`); modes are still enforced
    /// (`default_permissions`).
    pub allow_other: bool,
    /// How many threads serve FUSE requests (at least one).
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            allow_other: false,
            threads: DEFAULT_THREADS,
        }
    }
}

/// Request threads when not told otherwise: enough to overlap I/O on a
/// small machine without idling a large one's queue.
pub const DEFAULT_THREADS: usize = 4;

/// A live mount of a chain.
pub struct Mount {
    session: Session<ChainFs>,
    jobs: Arc<Jobs>,
    mountpoint: PathBuf,
    unmounter: Unmounter,
    stats: Arc<RequestStats>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl Mount {
    /// Mounts `jobs`' chain at `mountpoint` (an existing empty directory;
    /// anything else fails with an [`FsError`] naming it) and returns once
    /// the kernel mount is live: the FUSE handshake is done, so the mount
    /// shows in the mount table, and requests are answered as soon as
    /// [`Mount::run`] starts. On failure the chain is closed again and
    /// nothing stays mounted.
    pub fn new(
        mut jobs: Jobs,
        mountpoint: &Path,
        options: &MountOptions,
    ) -> Result<Mount, FsError> {
        if options.read_only {
            jobs.set_read_only();
        }
        let mountpoint = match checked_mountpoint(mountpoint) {
            Ok(path) => path,
            Err(error) => {
                // Release the images (and their locks) before reporting.
                let _ = jobs.close();
                return Err(error);
            }
        };
        let jobs = Arc::new(jobs);
        let stats = Arc::new(RequestStats::default());
        let model = Arc::new(FsModel::new(
            Arc::clone(&jobs),
            options.read_only,
            Arc::clone(&stats),
        ));
        let weak_model = Arc::downgrade(&model);
        // Filled in once the session exists: the file system needs it to
        // settle the unmount when the session ends (see Unmounter::settle).
        let unmounter = Unmounter {
            session: Arc::new(Mutex::new(None)),
            mountpoint: mountpoint.clone(),
        };
        let fs = ChainFs::new(model, unmounter.clone());
        let mut session = match Session::new(fs, &mountpoint, &session_config(options)) {
            Ok(session) => session,
            Err(source) => {
                // The failed session dropped the file system and its
                // reference to the jobs; release the images now.
                if let Ok(jobs) = Arc::try_unwrap(jobs) {
                    let _ = jobs.close();
                }
                return Err(FsError::Session {
                    path: mountpoint,
                    source,
                });
            }
        };
        jobs.watch_content(notify::content_watcher(
            session.notifier(),
            weak_model.clone(),
        ));
        jobs.watch_chain(notify::spawn(session.notifier(), weak_model));
        jobs.set_mount(MountSpot {
            point: mountpoint.clone(),
            device: mount_device(&mountpoint),
        });
        *lock(&unmounter.session) = Some(session.unmount_callable());
        log::info!("mounted at {}", mountpoint.display());
        Ok(Mount {
            session,
            jobs,
            mountpoint,
            unmounter,
            stats,
        })
    }

    /// Something another thread (a signal handler thread) can use to end
    /// the mount.
    pub fn unmounter(&self) -> Unmounter {
        self.unmounter.clone()
    }

    /// Counters of the data requests served (request sizes included).
    pub fn stats(&self) -> Arc<RequestStats> {
        Arc::clone(&self.stats)
    }

    /// The mount point, canonical.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Serves requests until the file system is unmounted (by `umount`,
    /// `fusermount3 -u`, or an [`Unmounter`]), then flushes and closes every
    /// image; returns only once the images are released.
    pub fn run(self) -> Result<(), FsError> {
        let Mount {
            session,
            jobs,
            mountpoint,
            ..
        } = self;
        // `run` returns after the kernel ended the session and every
        // request thread stopped; the file system, and with it every open
        // handle's chain snapshot, is dropped by then.
        let served = connection_gone_is_the_end(session.run()).map_err(|source| FsError::Session {
            path: mountpoint.clone(),
            source,
        });
        let closed = match Arc::try_unwrap(jobs) {
            Ok(jobs) => jobs.close().map_err(FsError::from),
            Err(jobs) => {
                log::error!("chain still referenced after unmount; flushing only");
                jobs.chain().flush().map_err(FsError::from)
            }
        };
        log::info!("unmounted {}; images closed", mountpoint.display());
        served.and(closed)
    }
}

/// Ends a mount from any thread. Cloning is cheap; the first call does the
/// work and later calls do nothing.
#[derive(Clone)]
pub struct Unmounter {
    session: Arc<Mutex<Option<SessionUnmounter>>>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for Unmounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unmounter")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl Unmounter {
    /// Unmounts. If the mount is busy (a process holds a file open), it is
    /// detached lazily instead: it leaves the namespace at once, and
    /// [`Mount::run`] returns (closing the images) when the last file is
    /// closed, so nothing written is lost.
    pub fn unmount(&self) {
        let Some(mut session) = lock(&self.session).take() else {
            return;
        };
        if let Err(error) = session.unmount() {
            log::warn!(
                "unmount {}: {error}; detaching lazily",
                self.mountpoint.display()
            );
            detach_lazily(&self.mountpoint);
        }
    }

    /// Called when the session has ended: if nothing unmounted through this
    /// unmounter, the kernel ended it (`umount`, `fusermount3 -u`) and the
    /// mount point is no longer a mount; taking the unmount here keeps
    /// fuser from trying it again as the session is dropped, which fails
    /// with EINVAL and logs a warning on every clean unmount. A session
    /// that ended with the mount still in place is unmounted here.
    pub fn settle(&self) {
        let Some(mut session) = lock(&self.session).take() else {
            return;
        };
        match session.unmount() {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!("{} was already unmounted", self.mountpoint.display());
            }
            Err(error) => log::warn!("unmount {}: {error}", self.mountpoint.display()),
        }
    }
}

/// The end of a session's serving: fuser ends it cleanly when the kernel
/// says the connection is gone with ENODEV. The kernel also says it with
/// ECONNABORTED (its answer after an abort, for servers that ask for
/// FUSE_ABORT_ERROR; fuser does not ask). It has been seen, rarely, at a
/// clean unmount under load on Linux 6.18, where no abort was made: an
/// abort through fusectl ends a chainfs session with ENODEV. Either way
/// no request can come any more and the images are closed as after any
/// unmount, so it ends the session, with a warning.
fn connection_gone_is_the_end(served: std::io::Result<()>) -> std::io::Result<()> {
    match served {
        Err(error) if error.raw_os_error() == Some(libc::ECONNABORTED) => {
            log::warn!("the kernel ended the FUSE connection with {error}");
            Ok(())
        }
        other => other,
    }
}

/// `umount -l`: as root through umount2(MNT_DETACH), else through
/// `fusermount3 -u -z`.
fn detach_lazily(mountpoint: &Path) {
    if let Ok(path) = CString::new(mountpoint.as_os_str().as_bytes()) {
        // SAFETY: `path` is a valid NUL-terminated string that outlives the
        // call; umount2 reads it and keeps no pointer.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {
            return;
        }
    }
    let status = Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .status();
    if !status.is_ok_and(|s| s.success()) {
        log::error!("cannot detach {}", mountpoint.display());
    }
}

/// The fuser session settings for `options`.
fn session_config(options: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("chainfs".to_owned()),
        MountOption::Subtype("chainfs".to_owned()),
        // The kernel enforces the modes (0444, 0644, 0200) for every user
        // but root; the model refuses writes to read-only files for root.
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        // Not `ro` even with --read-only: ctl/command must stay writable.
        // Not auto_unmount: the daemon itself must close the images.
    ];
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(options.threads.max(1));
    // Each thread reads its own /dev/fuse clone, so threads do not contend
    // on one descriptor.
    config.clone_fd = true;
    config
}

/// The device number (`st_dev`) of the mount at `point`, from the mount
/// table: a `stat` of the mount point would be a request to this daemon,
/// which is not serving yet.
fn mount_device(point: &Path) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = mountinfo_escaped(point);
    // The topmost mount at the point is listed last.
    table.lines().rev().find_map(|line| {
        // Fields: mount id, parent id, major:minor, root, mount point, …
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        if fields.nth(1)?.as_bytes() != wanted {
            return None;
        }
        let (major, minor) = device.split_once(':')?;
        Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
    })
}

/// `path` as the mount table writes it: space, tab, newline and backslash
/// in octal escapes.
fn mountinfo_escaped(path: &Path) -> Vec<u8> {
    let mut text = Vec::new();
    for &byte in path.as_os_str().as_bytes() {
        match byte {
            b' ' | b'\t' | b'\n' | b'\\' => text.extend(format!("\\{byte:03o}").bytes()),
            _ => text.push(byte),
        }
    }
    text
}

/// The mount point, canonical, if it exists, is a directory, and is empty.
fn checked_mountpoint(path: &Path) -> Result<PathBuf, FsError> {
    let metadata = std::fs::metadata(path)
        .map_err(|e| mountpoint_error(path, format!("cannot use it: {e}"), e.raw_os_error()))?;
    if !metadata.is_dir() {
        return Err(mountpoint_error(
            path,
            "is not a directory".into(),
            Some(libc::ENOTDIR),
        ));
    }
    let mut entries = std::fs::read_dir(path)
        .map_err(|e| mountpoint_error(path, format!("cannot list it: {e}"), e.raw_os_error()))?;
    if entries.next().is_some() {
        return Err(mountpoint_error(
            path,
            "is not empty".into(),
            Some(libc::ENOTEMPTY),
        ));
    }
    path.canonicalize()
        .map_err(|e| mountpoint_error(path, format!("cannot resolve it: {e}"), e.raw_os_error()))
}

fn mountpoint_error(path: &Path, reason: String, errno: Option<i32>) -> FsError {
    FsError::Mountpoint {
        path: path.to_path_buf(),
        reason,
        errno: errno.unwrap_or(libc::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_the_kernel_reports_aborted_ends_the_session_like_one_gone() {
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert!(connection_gone_is_the_end(Err(aborted)).is_ok());
        let failed = std::io::Error::from_raw_os_error(libc::EIO);
        let kept = connection_gone_is_the_end(Err(failed)).unwrap_err();
        assert_eq!(kept.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn mount_points_are_escaped_as_the_mount_table_writes_them() {
        assert_eq!(
            mountinfo_escaped(Path::new("/a b\tc\nd\\é")),
            b"/a\\040b\\011c\\012d\\134\xc3\xa9"
        );
    }
}
