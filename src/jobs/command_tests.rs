//! Tests of the command parser (`ctl/command`).

use super::super::state::Verb;
use super::*;

#[test]
fn stream_takes_every_option_and_a_trailing_newline() {
    let command =
        parse("stream node=file-D.img base=file-B.img speed=10M id=s1 on-error=stop\n").unwrap();
    assert_eq!(
        command,
        Command::Stream {
            node: Some("file-D.img".into()),
            base: Some("file-B.img".into()),
            backing_file: None,
            speed: 10 << 20,
            id: Some("s1".into()),
            on_error: OnError::Stop,
        }
    );
}

#[test]
fn quoted_values_hold_spaces_and_escapes() {
    let command = parse(r#"snapshot file="/tmp/my \"new\" disk.qcow2""#).unwrap();
    assert_eq!(
        command,
        Command::Snapshot {
            file: r#"/tmp/my "new" disk.qcow2"#.into()
        }
    );
}

#[test]
fn control_verbs_take_an_optional_id() {
    assert_eq!(
        parse("pause").unwrap(),
        Command::Control {
            verb: Verb::Pause,
            id: None
        }
    );
    assert_eq!(
        parse("set-speed id=j speed=0").unwrap(),
        Command::SetSpeed {
            id: Some("j".into()),
            speed: 0
        }
    );
}

#[test]
fn malformed_commands_say_what_is_wrong() {
    for (text, needle) in [
        ("", "empty"),
        ("frobnicate", "unknown command"),
        ("stream bogus=1", "unknown key \"bogus\""),
        ("stream base", "not key=value"),
        ("stream speed=fast", "bad rate"),
        ("stream speed=99999999999999999999", "bad rate"),
        ("stream speed=-1", "bad rate"),
        ("stream on-error=explode", "on-error"),
        ("stream id=a id=b", "given twice"),
        ("snapshot", "needs file"),
        ("snapshot file=x format=raw", "only qcow2"),
        ("commit", "needs top"),
        ("commit top=a copy-mode=fast", "copy-mode"),
        ("cancel force=yes", "force"),
        ("set-speed", "needs speed"),
        ("stream base=\"open", "unterminated"),
        ("stream\nstream", "one line"),
    ] {
        let err = parse(text).unwrap_err();
        assert!(err.0.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn commit_takes_every_option_and_cancel_may_force() {
    assert_eq!(
        parse("commit top=active base=file-B.img speed=1M id=c on-error=enospc copy-mode=write-blocking")
            .unwrap(),
        Command::Commit {
            top: "active".into(),
            base: Some("file-B.img".into()),
            backing_file: None,
            speed: 1 << 20,
            id: Some("c".into()),
            on_error: OnError::Enospc,
            copy_mode: CopyMode::WriteBlocking,
        }
    );
    assert_eq!(
        parse("cancel id=c force=on").unwrap(),
        Command::ForceCancel {
            id: Some("c".into())
        }
    );
    assert_eq!(
        parse("cancel force=off").unwrap(),
        Command::Control {
            verb: Verb::Cancel,
            id: None
        }
    );
}

#[test]
fn mirror_takes_every_option_with_qemus_defaults() {
    assert_eq!(
        parse("mirror target=/x.qcow2").unwrap(),
        Command::Mirror(MirrorArgs {
            target: "/x.qcow2".into(),
            node: None,
            sync: SyncMode::Full,
            mode: TargetMode::AbsolutePaths,
            format: None,
            copy_mode: CopyMode::Background,
            granularity: None,
            speed: 0,
            id: None,
            on_error: OnError::Report,
        })
    );
    assert_eq!(
        parse(
            "mirror target=t.img node=file-D.img sync=none mode=existing format=raw \
             copy-mode=write-blocking granularity=4K speed=2M id=m on-error=stop"
        )
        .unwrap(),
        Command::Mirror(MirrorArgs {
            target: "t.img".into(),
            node: Some("file-D.img".into()),
            sync: SyncMode::None,
            mode: TargetMode::Existing,
            format: Some(crate::jobs::Format::Raw),
            copy_mode: CopyMode::WriteBlocking,
            granularity: Some(4096),
            speed: 2 << 20,
            id: Some("m".into()),
            on_error: OnError::Stop,
        })
    );
    assert!(matches!(
        parse("mirror target=t sync=top granularity=64M").unwrap(),
        Command::Mirror(MirrorArgs { sync: SyncMode::Top, granularity: Some(g), .. }) if g == 64 << 20
    ));
    for (text, needle) in [
        ("mirror", "needs target"),
        ("mirror target=t sync=incremental", "sync="),
        ("mirror target=t mode=relative", "mode="),
        ("mirror target=t format=vmdk", "format="),
        ("mirror target=t copy-mode=x", "copy-mode"),
        ("mirror target=t granularity=256", "power of two"),
        ("mirror target=t granularity=128M", "power of two"),
        ("mirror target=t granularity=3K", "power of two"),
        ("mirror target=t granularity=big", "bad granularity"),
        ("mirror target=t base=x", "unknown key"),
    ] {
        let err = parse(text).unwrap_err();
        assert!(err.0.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn ids_over_128_bytes_and_commands_over_4_kib_are_refused_whole() {
    let longest = "i".repeat(MAX_ID_BYTES);
    for verb in [
        "stream",
        "pause",
        "cancel",
        "set-speed speed=1",
        "commit top=a",
    ] {
        let text = format!("{verb} id={longest}");
        assert!(parse(&text).is_ok(), "{text}");
        let err = parse(&format!("{text}i")).unwrap_err();
        assert!(err.0.contains("at most 128 bytes"), "{verb}: {err}");
    }
    let path = "p".repeat(MAX_COMMAND_BYTES - "snapshot file=\n".len());
    assert!(parse(&format!("snapshot file={path}\n")).is_ok());
    let err = parse(&format!("snapshot file={path}p\n")).unwrap_err();
    assert!(err.0.contains("at most 4096 bytes"), "{err}");
}

#[test]
fn rates_use_powers_of_1024() {
    assert_eq!(parse_rate("0").unwrap(), 0);
    assert_eq!(parse_rate("512").unwrap(), 512);
    assert_eq!(parse_rate("4k").unwrap(), 4096);
    assert_eq!(parse_rate("3M").unwrap(), 3 << 20);
    assert_eq!(parse_rate("2G").unwrap(), 2 << 30);
    assert!(parse_rate("G").is_err());
    assert!(parse_rate("1.5M").is_err());
}
