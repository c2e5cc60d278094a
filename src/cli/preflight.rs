//! The checks `mount` makes before it opens any image, so that a mount that
//! cannot succeed fails without having touched an image: the mount point
//! (exists, is a directory, is empty, is not already a mount, may be mounted
//! on by this user) and the FUSE device.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::procfs;
use super::CliError;

/// Where the kernel's FUSE device lives.
const FUSE_DEVICE: &str = "/dev/fuse";

/// Checks that `path` can be mounted on and returns its canonical path,
/// which is what the mount table will show.
pub fn check_mount_point(path: &Path) -> Result<PathBuf, CliError> {
    let canonical = std::fs::canonicalize(path).map_err(|e| mount_point_error(path, &e))?;
    let metadata = std::fs::metadata(&canonical).map_err(|e| mount_point_error(path, &e))?;
    if !metadata.is_dir() {
        return Err(CliError::at(path, "not a directory"));
    }
    let mounted = procfs::mount_at(&canonical)
        .map_err(|e| CliError::at(Path::new("/proc/self/mountinfo"), reason(&e)))?;
    if let Some(entry) = mounted {
        return Err(CliError::at(
            path,
            format!("already a mount point ({}); unmount it first", entry.fstype),
        ));
    }
    let mut entries = std::fs::read_dir(&canonical).map_err(|e| mount_point_error(path, &e))?;
    if entries.next().is_some() {
        return Err(CliError::at(path, "not an empty directory"));
    }
    if !may_write(&canonical) {
        return Err(CliError::at(
            path,
            "permission denied (you need write permission on the mount point)",
        ));
    }
    Ok(canonical)
}

/// fusermount3 lets a user mount only on a directory they may write to
/// (root may mount anywhere); say so before trying. access(2) weighs
/// supplementary groups and ACLs as fusermount3 does.
fn may_write(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c_path is a valid NUL-terminated string that outlives the
    // call; access(2) only reads it.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK) == 0 }
}

/// A mount point error, with the common cases said plainly.
fn mount_point_error(path: &Path, error: &io::Error) -> CliError {
    match error.raw_os_error() {
        Some(libc::ENOENT) => CliError::at(path, "no such directory"),
        Some(libc::ENOTDIR) => CliError::at(path, "not a directory"),
        Some(libc::ENOTCONN) => CliError::at(
            path,
            "a dead FUSE mount is still there (Transport endpoint is not connected); \
             remove it with `fusermount3 -u`",
        ),
        _ => CliError::at(path, reason(error)),
    }
}

/// Checks that the FUSE device exists and that this user may open it, as
/// the mount will.
pub fn check_fuse_device() -> Result<(), CliError> {
    let device = Path::new(FUSE_DEVICE);
    let metadata = std::fs::metadata(device).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => CliError::at(
            device,
            "missing: FUSE is not available (load it with `modprobe fuse`)",
        ),
        _ => CliError::at(device, reason(&e)),
    })?;
    if !metadata.file_type().is_char_device() {
        return Err(CliError::at(device, "not a character device"));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(drop)
        .map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => CliError::at(
                device,
                "permission denied (distributions make it mode 0666 so that users \
                 can mount through fusermount3)",
            ),
            _ => CliError::at(device, reason(&e)),
        })
}

/// Where fusermount3 reads which options users may use.
const FUSE_CONF: &str = "/etc/fuse.conf";

/// For an ordinary user, `allow_other` is only allowed when root has put
/// `user_allow_other` in /etc/fuse.conf; say so before fusermount3 does.
pub fn check_allow_other() -> Result<(), CliError> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let conf = std::fs::read_to_string(FUSE_CONF).unwrap_or_default();
    if allows_other(&conf) {
        Ok(())
    } else {
        Err(CliError::at(
            Path::new(FUSE_CONF),
            "--allow-other needs a line `user_allow_other` here (root must add it)",
        ))
    }
}

/// Whether a fuse.conf text enables `user_allow_other` (a line of its own;
/// `#` starts a comment).
fn allows_other(conf: &str) -> bool {
    conf.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .any(|line| line == "user_allow_other")
}

/// An OS error's text without Rust's ` (os error N)` suffix.
pub fn reason(error: &io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_directory_is_accepted_and_canonicalised() {
        let dir = tempfile::tempdir().expect("tempdir");
        let canonical = check_mount_point(dir.path()).expect("empty dir");
        assert_eq!(canonical, std::fs::canonicalize(dir.path()).expect("canon"));
    }

    #[test]
    fn each_bad_mount_point_is_named_with_its_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let cases = [
            (missing, "no such directory"),
            (file.clone(), "not a directory"),
            (dir.path().to_path_buf(), "not an empty directory"),
            (file.join("below"), "not a directory"),
        ];
        for (path, expected) in cases {
            let err = check_mount_point(&path).expect_err("refused");
            assert_eq!(err.to_string(), format!("{}: {expected}", path.display()));
        }
    }

    #[test]
    fn a_mount_point_that_is_already_mounted_is_refused() {
        // /proc is a mount on every Linux system, but not empty either: the
        // mount check comes first, so the message is about the mount.
        let err = check_mount_point(Path::new("/proc")).expect_err("refused");
        assert!(
            err.to_string().contains("already a mount point (proc)"),
            "{err}"
        );
    }

    #[test]
    fn user_allow_other_counts_only_when_not_commented_out() {
        assert!(allows_other("mount_max = 10\nuser_allow_other\n"));
        assert!(allows_other("  user_allow_other  # for chainfs\n"));
        assert!(!allows_other("#user_allow_other\n"));
        assert!(!allows_other(""));
    }

    #[test]
    fn reason_drops_the_os_error_number() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(reason(&e), "No such file or directory");
        assert_eq!(reason(&io::Error::other("plain")), "plain");
    }
}
