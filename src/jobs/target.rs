//! Where a file a command names goes (the `snapshot` image and the
//! `mirror` target; the `backup` target will come through here too).
//!
//! Two rules, decided before any lock is taken:
//!
//! * A relative path is relative to the active image's directory, as a
//!   relative backing name is relative to its image: never to the daemon's
//!   working directory, which is `/` once it has detached.
//! * No target may be inside the mount itself (EINVAL): opening a file in
//!   its own mount while it holds the chain's lock would make the daemon
//!   wait for itself. The parent directory is resolved symlink by symlink
//!   without ever looking inside any place the mount's file system is
//!   reachable at (a look there is a request to this daemon): its mount
//!   point, and every bind mount of it or of a directory in it, which the
//!   mount table lists with the mount's device.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

use super::JobError;
use crate::chain::Chain;

/// How many symlinks one resolution follows before giving up (Linux's
/// limit).
const MAX_SYMLINKS: usize = 40;

/// Where the chain is mounted, as the jobs layer needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpot {
    /// The mount point, canonical.
    pub point: PathBuf,
    /// The `st_dev` of files in the mount, when the mount table told it.
    pub device: Option<u64>,
}

/// The file a command names as `file`, made absolute and checked: relative
/// to the active image's directory, its parent directory with every
/// symlink resolved, and refused if it lies inside `mount`.
pub fn place(file: &Path, chain: &Chain, mount: Option<&MountSpot>) -> Result<PathBuf, JobError> {
    let absolute = resolve_relative(file, &active_dir(chain));
    let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        return Err(JobError::Invalid(format!(
            "{} does not name a file",
            file.display()
        )));
    };
    let parent = match mount {
        Some(mount) => outside_mount(parent, mount)?,
        None => canonical_or_lexical(parent, &[]).map_err(|e| invalid(parent, &e))?,
    };
    Ok(parent.join(name))
}

/// The directory relative target paths are taken from: the active image's,
/// by the path the chain opened it with (as its backing names are read).
pub fn active_dir(chain: &Chain) -> PathBuf {
    let active = chain.active();
    let path = if active.path().is_absolute() {
        active.path()
    } else {
        active.canonical_path()
    };
    path.parent().unwrap_or(Path::new("/")).to_path_buf()
}

/// `file` if absolute, else `file` under `dir`.
pub fn resolve_relative(file: &Path, dir: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        dir.join(file)
    }
}

/// `dir` canonical, or EINVAL if it is the mount or inside it.
pub fn outside_mount(dir: &Path, mount: &MountSpot) -> Result<PathBuf, JobError> {
    let inside = || {
        JobError::Invalid(format!(
            "{} is inside the mount at {}: a target must be outside it",
            dir.display(),
            mount.point.display()
        ))
    };
    let mut points = vec![mount.point.clone()];
    if let (Some(device), Ok(table)) = (
        mount.device,
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) {
        points.extend(points_on_device(&table, device));
    }
    match canonical_or_lexical(dir, &points) {
        Ok(canonical) => Ok(canonical),
        Err(Walk::Inside) => Err(inside()),
        Err(error) => Err(invalid(dir, &error)),
    }
}

/// The mount points in `table` (`/proc/self/mountinfo`) of file systems on
/// `device`: where the mount's files are reachable, by its own mount point
/// or by bind mounts.
fn points_on_device(table: &str, device: u64) -> Vec<PathBuf> {
    let on_device = |line: &str| -> Option<PathBuf> {
        // Fields: mount id, parent id, major:minor, root, mount point, …
        let mut fields = line.split(' ');
        let (major, minor) = fields.nth(2)?.split_once(':')?;
        let point = fields.nth(1)?;
        let found = libc::makedev(major.parse().ok()?, minor.parse().ok()?);
        (found == device).then(|| PathBuf::from(OsString::from_vec(unescape(point))))
    };
    table.lines().filter_map(on_device).collect()
}

/// A mount table field with its octal escapes (`\040` for a space)
/// decoded.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// Why a walk stopped.
#[derive(Debug)]
enum Walk {
    /// It reached the mount point.
    Inside,
    /// A symlink loop, or a component that could not be read.
    Failed(io::Error),
}

fn invalid(path: &Path, error: &Walk) -> JobError {
    match error {
        Walk::Inside => JobError::Invalid(format!("{} is inside the mount", path.display())),
        Walk::Failed(error) => JobError::Invalid(format!("{}: {error}", path.display())),
    }
}

/// `dir` (absolute) with every symlink resolved and `.`/`..` folded, as
/// `realpath` makes it, except that a part that does not exist is kept as
/// written (creating the target will then say so), and that the walk stops
/// with [`Walk::Inside`] on reaching one of `mount_points` instead of
/// looking in (so a path that passes through one is refused even if it
/// climbs back out with `..`).
fn canonical_or_lexical(dir: &Path, mount_points: &[PathBuf]) -> Result<PathBuf, Walk> {
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    let mut resolved = PathBuf::from("/");
    let mut symlinks = 0;
    let mut missing = false;
    // `pending` holds paths still to walk, innermost last: a symlink's
    // target is walked before the rest of the path that led to it.
    while let Some(path) = pending.pop() {
        let owned: Vec<Component> = path.components().collect();
        for (index, component) in owned.iter().enumerate() {
            match component {
                Component::RootDir | Component::Prefix(_) => {
                    resolved = PathBuf::from("/");
                    if mount_points.contains(&resolved) {
                        return Err(Walk::Inside);
                    }
                }
                Component::CurDir => {}
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => {
                    let next = resolved.join(name);
                    if mount_points.contains(&next) {
                        return Err(Walk::Inside);
                    }
                    if missing {
                        resolved = next;
                        continue;
                    }
                    match std::fs::symlink_metadata(&next) {
                        Ok(metadata) if metadata.file_type().is_symlink() => {
                            symlinks += 1;
                            if symlinks > MAX_SYMLINKS {
                                return Err(Walk::Failed(io::Error::from_raw_os_error(
                                    libc::ELOOP,
                                )));
                            }
                            let link = std::fs::read_link(&next).map_err(Walk::Failed)?;
                            let rest: PathBuf = owned[index + 1..].iter().collect();
                            pending.push(rest);
                            pending.push(link);
                            break;
                        }
                        Ok(_) => resolved = next,
                        Err(error) if error.kind() == io::ErrorKind::NotFound => {
                            missing = true;
                            resolved = next;
                        }
                        Err(error) => return Err(Walk::Failed(error)),
                    }
                }
            }
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spot(point: &Path) -> MountSpot {
        MountSpot {
            point: point.to_path_buf(),
            device: None,
        }
    }

    #[test]
    fn relative_targets_are_under_the_given_directory() {
        assert_eq!(
            resolve_relative(Path::new("../x.qcow2"), Path::new("/img/top")),
            Path::new("/img/top/../x.qcow2")
        );
        assert_eq!(
            resolve_relative(Path::new("/abs/x.qcow2"), Path::new("/img")),
            Path::new("/abs/x.qcow2")
        );
    }

    #[test]
    fn the_mount_point_is_never_looked_into_even_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let mnt = root.join("mnt");
        std::fs::create_dir_all(mnt.join("sub")).unwrap();
        std::os::unix::fs::symlink(&mnt, root.join("link")).unwrap();
        std::os::unix::fs::symlink("mnt/sub", root.join("relative-link")).unwrap();
        let mount = spot(&mnt);
        for inside in [
            mnt.clone(),
            mnt.join("sub"),
            root.join("link"),
            root.join("link/sub"),
            root.join("relative-link"),
            root.join("mnt/../mnt/sub"),
        ] {
            let refused = outside_mount(&inside, &mount).unwrap_err();
            assert!(
                matches!(refused, JobError::Invalid(ref why) if why.contains("inside the mount")),
                "{}: {refused}",
                inside.display()
            );
        }
        assert_eq!(outside_mount(&root, &mount).unwrap(), root);
        assert_eq!(
            outside_mount(&root.join("link/.."), &mount)
                .unwrap_err()
                .errno(),
            libc::EINVAL,
            "a path through the mount point is refused even if it climbs out"
        );
        assert_eq!(
            outside_mount(&root.join("nowhere/deeper"), &mount).unwrap(),
            root.join("nowhere/deeper")
        );
    }

    #[test]
    fn the_mount_table_gives_every_mount_point_of_the_device() {
        let table = "\
36 1 0:59 / /mnt/chain rw,nosuid - fuse chainfs rw
37 1 8:1 / /data rw - ext4 /dev/sda1 rw
38 1 0:59 /ctl /srv/bind\\040here rw - fuse chainfs rw
bad line
";
        assert_eq!(
            points_on_device(table, libc::makedev(0, 59)),
            [PathBuf::from("/mnt/chain"), PathBuf::from("/srv/bind here")]
        );
        assert!(points_on_device(table, libc::makedev(9, 9)).is_empty());
        assert_eq!(unescape("a\\134b\\011"), b"a\\b\t");
        assert_eq!(unescape("trailing\\04"), b"trailing\\04");
    }

    #[test]
    fn the_mount_device_catches_another_path_to_the_mount() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let device = std::fs::metadata(&root).unwrap().dev();
        let mount = MountSpot {
            point: PathBuf::from("/nonexistent-mount-point"),
            device: Some(device),
        };
        assert_eq!(
            outside_mount(&root, &mount).unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn a_symlink_loop_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::os::unix::fs::symlink("b", root.join("a")).unwrap();
        std::os::unix::fs::symlink("a", root.join("b")).unwrap();
        let refused = outside_mount(&root.join("a"), &spot(Path::new("/mnt-x"))).unwrap_err();
        assert_eq!(refused.errno(), libc::EINVAL);
    }
}
