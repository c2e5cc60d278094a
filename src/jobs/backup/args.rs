//! The `backup` command's words and QEMU's rules for which of them go
//! together (`do_backup_common` in QEMU's blockdev.c, the table
//! qemu-iotests 257 checks), in QEMU's order, so that a command wrong in
//! two ways is refused for the same reason QEMU gives.

use super::super::command::{error, Args, OnError, ParseError, TargetMode};
use super::super::{Format, JobError};

/// What a backup copies (QEMU's `MirrorSyncMode` for backup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupSync {
    /// Every cluster of the node's view.
    Full,
    /// What the node itself holds.
    Top,
    /// Only what is about to be overwritten (image fleecing).
    None,
    /// The clusters a dirty bitmap marks.
    Bitmap,
    /// `bitmap` with `bitmap-mode=on-success`.
    Incremental,
}

/// What the bitmap holds after the job (QEMU's `BitmapSyncMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapMode {
    /// On success only the writes made since the start; else as before
    /// plus those writes.
    OnSuccess,
    /// As before plus the writes made since the start.
    Never,
    /// The writes made since the start, plus what was not copied.
    Always,
}

/// A `backup` command's words, as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupArgs {
    /// The target image.
    pub target: String,
    /// The node backed up (default: the active node).
    pub node: Option<String>,
    /// What is copied.
    pub sync: BackupSync,
    /// The dirty bitmap used or kept.
    pub bitmap: Option<String>,
    /// What the bitmap holds afterwards.
    pub bitmap_mode: Option<BitmapMode>,
    /// Whether the target is created.
    pub mode: TargetMode,
    /// The target's format.
    pub format: Option<Format>,
    /// Write compressed clusters.
    pub compress: bool,
    /// Bytes per second copied; 0 is unlimited.
    pub speed: u64,
    /// Job id (default: generated).
    pub id: Option<String>,
    /// Error policy.
    pub on_error: OnError,
}

/// Parses the words of `backup`.
pub(in crate::jobs) fn parse(args: &mut Args) -> Result<BackupArgs, ParseError> {
    Ok(BackupArgs {
        target: args.required("target")?,
        node: args.take("node"),
        sync: match args.required("sync")?.as_str() {
            "full" => BackupSync::Full,
            "top" => BackupSync::Top,
            "none" => BackupSync::None,
            "bitmap" => BackupSync::Bitmap,
            "incremental" => BackupSync::Incremental,
            other => {
                return Err(error(format!(
                    "sync={other:?}: expected full, top, none, bitmap or incremental"
                )))
            }
        },
        bitmap: args.take("bitmap"),
        bitmap_mode: match args.take("bitmap-mode").as_deref() {
            None => None,
            Some("on-success") => Some(BitmapMode::OnSuccess),
            Some("never") => Some(BitmapMode::Never),
            Some("always") => Some(BitmapMode::Always),
            Some(other) => {
                return Err(error(format!(
                    "bitmap-mode={other:?}: expected on-success, never or always"
                )))
            }
        },
        mode: args.target_mode()?,
        format: args.format()?,
        compress: match args.take("compress").as_deref() {
            None | Some("off") => false,
            Some("on") => true,
            Some(other) => return Err(error(format!("compress={other:?}: expected on or off"))),
        },
        speed: args.rate("speed")?,
        id: args.id()?,
        on_error: args.on_error()?,
    })
}

/// What the job copies, once `incremental` is read as `bitmap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Copy {
    /// Every cluster.
    Full,
    /// What the node holds.
    Top,
    /// Nothing but what guest writes are about to overwrite.
    None,
    /// The bitmap's clusters.
    Bitmap,
}

/// The bitmap a backup uses, with what it holds afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct BitmapUse {
    /// Its name, on the node backed up.
    pub name: String,
    /// Its mode.
    pub mode: BitmapMode,
}

/// Applies QEMU's rules to `args`; `check` looks the bitmap up (ENOENT
/// when missing, EBUSY when a job uses it, EINVAL when inconsistent).
pub(super) fn resolve(
    args: &BackupArgs,
    check: &dyn Fn(&str) -> Result<(), JobError>,
) -> Result<(Copy, Option<BitmapUse>), JobError> {
    let invalid = |text: String| Err(JobError::Invalid(text));
    let mut mode = args.bitmap_mode;
    let copy = match args.sync {
        BackupSync::Bitmap | BackupSync::Incremental if args.bitmap.is_none() => {
            return invalid("sync=bitmap and sync=incremental need bitmap=NAME".into())
        }
        BackupSync::Incremental => {
            if mode.is_some_and(|m| m != BitmapMode::OnSuccess) {
                return invalid("sync=incremental takes only bitmap-mode=on-success".into());
            }
            mode = Some(BitmapMode::OnSuccess);
            Copy::Bitmap
        }
        BackupSync::Bitmap => Copy::Bitmap,
        BackupSync::Full => Copy::Full,
        BackupSync::Top => Copy::Top,
        BackupSync::None => Copy::None,
    };
    let Some(name) = &args.bitmap else {
        if mode.is_some() {
            return invalid("bitmap-mode needs bitmap=NAME".into());
        }
        return Ok((copy, None));
    };
    check(name)?;
    let Some(mode) = mode else {
        return invalid("a bitmap needs bitmap-mode=on-success|never|always".into());
    };
    if copy == Copy::None {
        return invalid("sync=none leaves nothing meaningful in a bitmap".into());
    }
    if mode == BitmapMode::Never && copy != Copy::Bitmap {
        return invalid("bitmap-mode=never only makes sense with sync=bitmap".into());
    }
    Ok((
        copy,
        Some(BitmapUse {
            name: name.clone(),
            mode,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::super::command::{parse as parse_command, Command};
    use super::*;

    fn args(text: &str) -> BackupArgs {
        match parse_command(text) {
            Ok(Command::Backup(args)) => args,
            other => panic!("{text}: {other:?}"),
        }
    }

    /// The errno QEMU's rules give `words`, with bitmap `b0` present,
    /// `busy` used by a job and any other missing.
    fn errno(words: &str) -> Option<i32> {
        let check = |name: &str| match name {
            "b0" => Ok(()),
            "busy" => Err(JobError::Busy("busy".into())),
            _ => Err(JobError::NotFound("missing".into())),
        };
        resolve(&args(&format!("backup target=t {words}")), &check)
            .err()
            .map(|e| e.errno())
    }

    #[test]
    fn every_option_parses() {
        assert_eq!(
            args(
                "backup target=/t node=file-D.img sync=incremental bitmap=b0 \
                 bitmap-mode=on-success mode=existing format=qcow2 compress=on speed=1M \
                 id=b on-error=stop"
            ),
            BackupArgs {
                target: "/t".into(),
                node: Some("file-D.img".into()),
                sync: BackupSync::Incremental,
                bitmap: Some("b0".into()),
                bitmap_mode: Some(BitmapMode::OnSuccess),
                mode: TargetMode::Existing,
                format: Some(Format::Qcow2),
                compress: true,
                speed: 1 << 20,
                id: Some("b".into()),
                on_error: OnError::Stop,
            }
        );
        for (text, needle) in [
            ("backup target=t", "needs sync"),
            ("backup sync=full", "needs target"),
            ("backup target=t sync=differential", "sync="),
            (
                "backup target=t sync=full bitmap-mode=sometimes",
                "bitmap-mode=",
            ),
            ("backup target=t sync=full compress=yes", "compress="),
            (
                "backup target=t sync=full copy-mode=background",
                "unknown key",
            ),
        ] {
            let err = parse_command(text).unwrap_err();
            assert!(err.0.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn bitmap_options_follow_qemus_table() {
        const EINVAL: Option<i32> = Some(libc::EINVAL);
        for (words, want) in [
            ("sync=full", None),
            ("sync=top", None),
            ("sync=none", None),
            ("sync=bitmap", EINVAL),
            ("sync=incremental", EINVAL),
            ("sync=full bitmap-mode=always", EINVAL),
            ("sync=incremental bitmap=b0", None),
            ("sync=incremental bitmap=b0 bitmap-mode=on-success", None),
            ("sync=incremental bitmap=b0 bitmap-mode=always", EINVAL),
            ("sync=incremental bitmap=b0 bitmap-mode=never", EINVAL),
            ("sync=bitmap bitmap=b0", EINVAL),
            ("sync=bitmap bitmap=b0 bitmap-mode=never", None),
            ("sync=bitmap bitmap=b0 bitmap-mode=always", None),
            ("sync=full bitmap=b0", EINVAL),
            ("sync=full bitmap=b0 bitmap-mode=on-success", None),
            ("sync=full bitmap=b0 bitmap-mode=always", None),
            ("sync=full bitmap=b0 bitmap-mode=never", EINVAL),
            ("sync=top bitmap=b0 bitmap-mode=always", None),
            ("sync=top bitmap=b0 bitmap-mode=never", EINVAL),
            ("sync=none bitmap=b0 bitmap-mode=on-success", EINVAL),
            (
                "sync=full bitmap=b404 bitmap-mode=on-success",
                Some(libc::ENOENT),
            ),
            // The lookup comes before the mode rules, as in QEMU.
            (
                "sync=none bitmap=b404 bitmap-mode=never",
                Some(libc::ENOENT),
            ),
            (
                "sync=bitmap bitmap=busy bitmap-mode=never",
                Some(libc::EBUSY),
            ),
        ] {
            assert_eq!(errno(words), want, "{words}");
        }
        let check = |_: &str| Ok(());
        let (copy, bitmap) =
            resolve(&args("backup target=t sync=incremental bitmap=b0"), &check).unwrap();
        assert_eq!(copy, Copy::Bitmap);
        assert_eq!(bitmap.unwrap().mode, BitmapMode::OnSuccess);
    }
}
