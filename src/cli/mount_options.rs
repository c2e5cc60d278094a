//! `-o OPTIONS`: the mount's own options by the names mount(8), fstab and
//! sshfs users expect (`ro`, `allow_other`, `threads=N`, …), and the
//! generic options mount(8), `mount.fuse3` and systemd pass along, which
//! chainfs accepts and ignores.
//!
//! `mount -t fuse.chainfs IMAGE MNT -o ro` and an fstab line reach chainfs
//! through fuse3's `mount.fuse3`, which runs `chainfs IMAGE MNT -o OPTIONS`
//! and always adds `dev` and `suid` unless `nodev`/`nosuid` were given
//! (chainfs mounts `nodev,nosuid` regardless: an image holds no devices or
//! programs to trust). An unknown option is a usage error naming it, caught
//! while the command line is parsed, so nothing is mounted.

use std::path::PathBuf;

use super::{size, MountArgs};

/// One option of an `-o` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOption {
    /// `ro`: as `--read-only`.
    ReadOnly,
    /// `rw`: read-write, the default; cancels an earlier `ro` in the lists.
    ReadWrite,
    /// `allow_other`: as `--allow-other`.
    AllowOther,
    /// `force_share`: as `--force-share`.
    ForceShare,
    /// `threads=N`: as `--threads N`.
    Threads(u16),
    /// `cache_size=SIZE`: as `--cache-size SIZE`.
    CacheSize(u64),
    /// `log_file=PATH`: as `--log-file PATH`.
    LogFile(PathBuf),
    /// An option mount(8), `mount.fuse3` or systemd passes along that means
    /// nothing to chainfs.
    Generic,
}

/// One `-o` argument: options separated by commas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionList(pub Vec<MountOption>);

/// Generic options accepted and ignored: fstab's and mount(8)'s
/// (`defaults`, `nofail`, `noauto`, `auto`, `user`, `users`, `nouser`,
/// `_netdev`) and the per-mount flags `mount.fuse3` adds or passes on
/// (`dev`, `suid`, `exec` and their `no` forms).
const GENERIC: &[&str] = &[
    "defaults", "nofail", "noauto", "auto", "user", "users", "nouser", "_netdev", "dev", "nodev",
    "suid", "nosuid", "exec", "noexec",
];

/// Parses one `-o` argument, `opt[,opt…]`; the error names the option
/// that is not understood.
pub fn parse_list(text: &str) -> Result<OptionList, String> {
    text.split(',')
        // `mount.fuse3` itself skips empty entries (`ro,,rw`).
        .filter(|option| !option.is_empty())
        .map(parse_option)
        .collect::<Result<_, _>>()
        .map(OptionList)
}

fn parse_option(option: &str) -> Result<MountOption, String> {
    // systemd's own options (x-systemd.automount, x-systemd.requires=…)
    // reach the helper when a unit is made from an fstab line.
    if option.starts_with("x-systemd.") || GENERIC.contains(&option) {
        return Ok(MountOption::Generic);
    }
    let (name, value) = match option.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (option, None),
    };
    match (name, value) {
        ("ro", None) => Ok(MountOption::ReadOnly),
        ("rw", None) => Ok(MountOption::ReadWrite),
        ("allow_other", None) => Ok(MountOption::AllowOther),
        ("force_share", None) => Ok(MountOption::ForceShare),
        ("threads", Some(n)) => parse_threads(n).map(MountOption::Threads),
        ("cache_size", Some(bytes)) => size::parse_size(bytes).map(MountOption::CacheSize),
        ("log_file", Some(path)) if !path.is_empty() => {
            Ok(MountOption::LogFile(PathBuf::from(path)))
        }
        ("ro" | "rw" | "allow_other" | "force_share", Some(_)) => {
            Err(format!("mount option `{name}` takes no value"))
        }
        ("threads" | "cache_size" | "log_file", _) => {
            Err(format!("mount option `{name}` needs a value: `{name}=…`"))
        }
        _ => Err(format!("unknown mount option `{option}`")),
    }
}

/// `threads=N`, with the bounds of `--threads`.
fn parse_threads(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!("threads={text}: not a number from 1 to 1024")),
    }
}

/// Folds the `-o` lists into the flags they stand for. An option overrides
/// the flag of the same meaning, and a later option an earlier one, as
/// mount(8) reads `-o`; only `rw` cannot undo `--read-only` given as a flag.
pub fn apply(mut args: MountArgs) -> MountArgs {
    let mut read_only = None;
    for option in args.options.iter().flat_map(|list| &list.0) {
        match option {
            MountOption::ReadOnly => read_only = Some(true),
            MountOption::ReadWrite => read_only = Some(false),
            MountOption::AllowOther => args.allow_other = true,
            MountOption::ForceShare => args.force_share = true,
            MountOption::Threads(n) => args.threads = Some(*n),
            MountOption::CacheSize(bytes) => args.cache_size = Some(*bytes),
            MountOption::LogFile(path) => args.log_file = Some(path.clone()),
            MountOption::Generic => {}
        }
    }
    args.read_only |= read_only.unwrap_or(false);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<MountOption> {
        match parse_list(text) {
            Ok(list) => list.0,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    #[test]
    fn the_mounts_own_options_map_to_their_flags() {
        assert_eq!(
            parse("ro,allow_other,force_share,threads=4,cache_size=64M,log_file=/var/log/c.log"),
            [
                MountOption::ReadOnly,
                MountOption::AllowOther,
                MountOption::ForceShare,
                MountOption::Threads(4),
                MountOption::CacheSize(64 << 20),
                MountOption::LogFile(PathBuf::from("/var/log/c.log")),
            ]
        );
    }

    #[test]
    fn generic_options_are_accepted_and_ignored() {
        let text = "defaults,nofail,noauto,auto,user,users,nouser,_netdev,dev,nodev,suid,nosuid,\
                    exec,noexec,x-systemd.automount,x-systemd.requires=/images";
        assert!(parse(text).iter().all(|o| *o == MountOption::Generic));
    }

    #[test]
    fn an_unknown_option_is_refused_by_name() {
        let err = parse_list("ro,bogus,dev").expect_err("bogus");
        assert_eq!(err, "unknown mount option `bogus`");
        let err = parse_list("noatime").expect_err("noatime");
        assert!(err.contains("`noatime`"), "{err}");
    }

    #[test]
    fn values_are_checked() {
        assert!(parse_list("threads=0").is_err());
        assert!(parse_list("threads")
            .expect_err("no value")
            .contains("needs a value"));
        assert!(parse_list("cache_size=12Q").is_err());
        assert!(parse_list("log_file=").is_err());
        assert!(parse_list("ro=1")
            .expect_err("value")
            .contains("takes no value"));
    }

    #[test]
    fn empty_entries_are_skipped() {
        assert_eq!(parse(",ro,,"), [MountOption::ReadOnly]);
    }
}
