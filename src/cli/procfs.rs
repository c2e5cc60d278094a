//! What the command line learns from `/proc`: the mount table, which process
//! serves a FUSE mount, and whether that process is still alive.
//!
//! `chainfs umount` must wait for the daemon of a mount, so it has to find
//! it. Two ways, best first:
//!
//! 1. Since Linux 6.16 the `fdinfo` of a `/dev/fuse` descriptor names its
//!    connection (`fuse_connection:`), which is the mount's device number:
//!    the process holding that descriptor is the daemon, exactly.
//! 2. On older kernels, a chainfs daemon keeps a descriptor open on the
//!    directory it mounted over (see `cli::mount`), so the process that holds
//!    `/dev/fuse` *and* a descriptor whose link reads as the mount point is
//!    the daemon. That descriptor pins nothing the mount does not already pin.
//!
//! Only processes whose `/proc/PID/fd` we may read are seen: the caller's
//! own, or every process for root. That is enough, since only the user who
//! mounted (or root) may unmount.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`, the fields chainfs needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// The `st_dev` of files on the mount, as (major, minor).
    pub device: (u32, u32),
    /// Where it is mounted, unescaped.
    pub mount_point: PathBuf,
    /// The filesystem type (`fuse`, `fuse.chainfs`, `ext4`, …).
    pub fstype: String,
    /// The mount source (`fsname` for FUSE).
    pub source: String,
}

impl MountEntry {
    /// Whether this is a chainfs mount: type `fuse.chainfs` when mounted
    /// through fusermount3, which records the subtype; type `fuse` with
    /// source (`fsname`) `chainfs` when mounted directly by root.
    pub fn is_chainfs(&self) -> bool {
        self.fstype == "fuse.chainfs" || (self.fstype == "fuse" && self.source == "chainfs")
    }

    /// The device number as the kernel writes it in `fuse_connection:`
    /// (its internal `MKDEV`, major in the high 12 bits of 32).
    fn kernel_device(&self) -> u64 {
        (u64::from(self.device.0) << 20) | u64::from(self.device.1)
    }
}

/// The mount table of this process's mount namespace.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The topmost mount at `mount_point` (an absolute path without symlinks),
/// if anything is mounted there.
pub fn mount_at(mount_point: &Path) -> io::Result<Option<MountEntry>> {
    Ok(mounts()?
        .into_iter()
        .rev()
        .find(|entry| entry.mount_point == mount_point))
}

/// Parses `/proc/PID/mountinfo` (see proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_mountinfo_line).collect()
}

/// `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL…] - TYPE SOURCE SUPER_OPTIONS`
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let (major, minor) = fields.nth(2)?.split_once(':')?;
    let mount_point = fields.nth(1)?;
    let mut tail = after.split(' ');
    let fstype = tail.next()?;
    let source = tail.next().unwrap_or("");
    Some(MountEntry {
        device: (major.parse().ok()?, minor.parse().ok()?),
        mount_point: PathBuf::from(unescape(mount_point)),
        fstype: unescape(fstype),
        source: unescape(source),
    })
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\134` for a
/// backslash, …) in a mountinfo field.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A process, identified so that a recycled pid is not mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Process {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22).
    start_time: u64,
}

impl Process {
    /// The process with `pid`, if it exists and is not a zombie.
    pub fn get(pid: u32) -> Option<Process> {
        let stat = read_stat(pid)?;
        (!stat.exited).then_some(Process {
            pid,
            start_time: stat.start_time,
        })
    }

    /// Whether the process is still running. A zombie counts as gone: it
    /// has closed every descriptor, so its image locks are released.
    pub fn is_alive(&self) -> bool {
        Process::get(self.pid).is_some_and(|now| now == *self)
    }
}

/// What `/proc/PID/stat` says about liveness and identity.
struct Stat {
    exited: bool,
    start_time: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses the fields after the command name, which is in parentheses and
/// may itself hold spaces and parentheses.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    let state = *fields.first()?;
    Some(Stat {
        exited: state == "Z" || state == "X" || state == "x",
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The processes serving the FUSE mount `entry` (normally exactly one).
pub fn fuse_daemons(entry: &MountEntry) -> Vec<Process> {
    let Ok(proc_dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    proc_dir
        .filter_map(|dirent| dirent.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|&pid| serves(pid, entry))
        .filter_map(Process::get)
        .collect()
}

/// Whether `pid` holds a `/dev/fuse` descriptor for `entry`'s connection.
fn serves(pid: u32, entry: &MountEntry) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let mut unnamed_fuse = false;
    let mut holds_mount_point = false;
    for fd in fds.filter_map(Result::ok) {
        let Ok(target) = fs::read_link(fd.path()) else {
            continue;
        };
        if target == Path::new("/dev/fuse") {
            match fuse_connection(pid, &fd.file_name().to_string_lossy()) {
                Some(conn) if conn == entry.kernel_device() => return true,
                Some(_) => {}
                None => unnamed_fuse = true,
            }
        } else if target == entry.mount_point {
            holds_mount_point = true;
        }
    }
    unnamed_fuse && holds_mount_point
}

/// The `fuse_connection:` of descriptor `fd` of `pid`, on kernels that
/// show it.
fn fuse_connection(pid: u32, fd: &str) -> Option<u64> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("fuse_connection:"))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
42 22 0:39 / /tmp/a\\040b rw,nosuid,nodev,relatime shared:7 - fuse.chainfs /img/top\\040x.qcow2 rw,user_id=0,group_id=0
43 22 0:40 / /tmp/plain rw - fuse chainfs rw
garbage line
";

    #[test]
    fn mountinfo_lines_give_device_point_type_and_source() {
        let entries = parse_mountinfo(MOUNTINFO);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].device, (0, 39));
        assert_eq!(entries[1].mount_point, Path::new("/tmp/a b"));
        assert_eq!(entries[1].fstype, "fuse.chainfs");
        assert_eq!(entries[1].source, "/img/top x.qcow2");
        assert!(entries[1].is_chainfs() && entries[2].is_chainfs());
        assert!(!entries[0].is_chainfs());
    }

    #[test]
    fn kernel_device_packs_major_above_minor() {
        let mut entries = parse_mountinfo(MOUNTINFO);
        assert_eq!(entries[1].kernel_device(), 39);
        entries[1].device = (1, 2);
        assert_eq!(entries[1].kernel_device(), (1 << 20) | 2);
    }

    #[test]
    fn unescape_handles_backslashes_and_leaves_bad_escapes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("tab\\011x"), "tab\tx");
        assert_eq!(unescape("bad\\09"), "bad\\09");
        assert_eq!(unescape("end\\"), "end\\");
    }

    #[test]
    fn stat_parsing_survives_parentheses_in_the_command_name() {
        let text = "123 (a) b)) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        let stat = parse_stat(text).expect("parses");
        assert!(!stat.exited);
        assert_eq!(stat.start_time, 98765);
        let zombie = text.replace(") S ", ") Z ");
        assert!(parse_stat(&zombie).is_some_and(|s| s.exited));
        assert!(parse_stat("1 (x) S 1").is_none());
    }

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        let me = Process::get(std::process::id()).expect("self");
        assert!(me.is_alive());
        let impostor = Process {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!impostor.is_alive());
    }
}
