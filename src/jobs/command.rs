//! The `ctl/command` language: one command per write, `VERB key=value …`,
//! parsed into a typed [`Command`] with no side effects.
//!
//! Words are separated by spaces; a value in double quotes may hold spaces
//! (`\"` and `\\` escape inside quotes); a trailing newline is ignored.
//! A command is at most [`MAX_COMMAND_BYTES`] long and a job id at most
//! [`MAX_ID_BYTES`] (SPEC §4): ids are repeated in every event and status
//! line, so their size is bounded; a longer one is refused as a whole.

use std::collections::HashMap;
use std::fmt;

/// The longest command accepted, in bytes, its trailing newline included.
pub const MAX_COMMAND_BYTES: usize = 4096;

/// The longest job id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// What `stream` does when an I/O error stops a chunk (QEMU's
/// `BlockdevOnError`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job at the first error.
    #[default]
    Report,
    /// Go on; the job ends failed and changes no backing pointer.
    Ignore,
    /// Pause; `resume` retries the same chunk.
    Stop,
    /// Pause on ENOSPC, report anything else.
    Enospc,
}

/// How an active commit keeps the base in step once `ready` (QEMU's
/// `MirrorCopyMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// Copy behind the writer.
    #[default]
    Background,
    /// A guest write returns only once it reached the base too.
    WriteBlocking,
}

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// QEMU's block-stream.
    Stream {
        /// The node receiving the data (default: the active node).
        node: Option<String>,
        /// The node that becomes the new backing file (default: none).
        base: Option<String>,
        /// The backing string to write instead of the base's name.
        backing_file: Option<String>,
        /// Bytes per second copied; 0 is unlimited.
        speed: u64,
        /// Job id (default: generated).
        id: Option<String>,
        /// Error policy.
        on_error: OnError,
    },
    /// A live external snapshot onto a new qcow2 file.
    Snapshot {
        /// The new image, which must not exist.
        file: String,
    },
    /// QEMU's block-commit.
    Commit {
        /// The topmost node whose data is committed.
        top: String,
        /// The node receiving the data (default: the bottom of the chain).
        base: Option<String>,
        /// The backing string to write instead of the base's name.
        backing_file: Option<String>,
        /// Bytes per second copied; 0 is unlimited.
        speed: u64,
        /// Job id (default: generated).
        id: Option<String>,
        /// Error policy.
        on_error: OnError,
        /// How an active commit keeps up with writes once ready.
        copy_mode: CopyMode,
    },
    /// `cancel force=on`: aborts even a ready job.
    ForceCancel {
        /// The job (may be left out when only one exists).
        id: Option<String>,
    },
    /// A verb on an existing job (`cancel`, `pause`, `resume`, `complete`,
    /// `dismiss`).
    Control {
        /// The verb.
        verb: super::state::Verb,
        /// The job (may be left out when only one exists).
        id: Option<String>,
    },
    /// `set-speed`.
    SetSpeed {
        /// The job (may be left out when only one exists).
        id: Option<String>,
        /// The new limit; 0 is unlimited.
        speed: u64,
    },
}

/// Why a command was refused before anything happened (always EINVAL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn error(message: impl Into<String>) -> ParseError {
    ParseError(message.into())
}

/// Parses one command.
pub fn parse(text: &str) -> Result<Command, ParseError> {
    if text.len() > MAX_COMMAND_BYTES {
        return Err(error(format!(
            "a command is at most {MAX_COMMAND_BYTES} bytes; this one is {}",
            text.len()
        )));
    }
    let text = text.strip_suffix('\n').unwrap_or(text);
    let words = split_words(text)?;
    let Some((verb, args)) = words.split_first() else {
        return Err(error("empty command"));
    };
    let mut args = Args::new(verb, args)?;
    let command = match verb.as_str() {
        "stream" => Command::Stream {
            node: args.take("node"),
            base: args.take("base"),
            backing_file: args.take("backing-file"),
            speed: args.rate("speed")?,
            id: args.id()?,
            on_error: args.on_error()?,
        },
        "snapshot" => {
            let file = args.required("file")?;
            if let Some(format) = args.take("format") {
                if format != "qcow2" {
                    return Err(error(format!(
                        "snapshot format {format:?}: only qcow2 is supported"
                    )));
                }
            }
            Command::Snapshot { file }
        }
        "commit" => Command::Commit {
            top: args.required("top")?,
            base: args.take("base"),
            backing_file: args.take("backing-file"),
            speed: args.rate("speed")?,
            id: args.id()?,
            on_error: args.on_error()?,
            copy_mode: match args.take("copy-mode").as_deref() {
                None | Some("background") => CopyMode::Background,
                Some("write-blocking") => CopyMode::WriteBlocking,
                Some(other) => {
                    return Err(error(format!(
                        "copy-mode={other:?}: expected background or write-blocking"
                    )))
                }
            },
        },
        "cancel" => match args.take("force").as_deref() {
            None | Some("off") => Command::Control {
                verb: super::state::Verb::Cancel,
                id: args.id()?,
            },
            Some("on") => Command::ForceCancel { id: args.id()? },
            Some(other) => return Err(error(format!("force={other:?}: expected on or off"))),
        },
        "set-speed" => Command::SetSpeed {
            id: args.id()?,
            speed: match args.take("speed") {
                Some(rate) => parse_rate(&rate)?,
                None => return Err(error("set-speed needs speed=RATE")),
            },
        },
        other => Command::Control {
            verb: control_verb(other)?,
            id: args.id()?,
        },
    };
    args.finish()?;
    Ok(command)
}

fn control_verb(word: &str) -> Result<super::state::Verb, ParseError> {
    use super::state::Verb;
    Ok(match word {
        "cancel" => Verb::Cancel,
        "pause" => Verb::Pause,
        "resume" => Verb::Resume,
        "complete" => Verb::Complete,
        "dismiss" => Verb::Dismiss,
        other => return Err(error(format!("unknown command {other:?}"))),
    })
}

/// The `key=value` words of one command, consumed as they are recognised.
struct Args {
    verb: String,
    values: HashMap<String, String>,
}

impl Args {
    fn new(verb: &str, words: &[String]) -> Result<Args, ParseError> {
        let mut values = HashMap::new();
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return Err(error(format!("{verb}: {word:?} is not key=value")));
            };
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(error(format!("{verb}: {key} given twice")));
            }
        }
        Ok(Args {
            verb: verb.to_string(),
            values,
        })
    }

    fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// The optional `id=`, at most [`MAX_ID_BYTES`] long.
    fn id(&mut self) -> Result<Option<String>, ParseError> {
        match self.take("id") {
            Some(id) if id.len() > MAX_ID_BYTES => Err(error(format!(
                "{}: a job id is at most {MAX_ID_BYTES} bytes; this one is {}",
                self.verb,
                id.len()
            ))),
            id => Ok(id),
        }
    }

    fn required(&mut self, key: &str) -> Result<String, ParseError> {
        self.take(key)
            .ok_or_else(|| error(format!("{} needs {key}=…", self.verb)))
    }

    fn rate(&mut self, key: &str) -> Result<u64, ParseError> {
        self.take(key).map_or(Ok(0), |rate| parse_rate(&rate))
    }

    fn on_error(&mut self) -> Result<OnError, ParseError> {
        Ok(match self.take("on-error").as_deref() {
            None | Some("report") => OnError::Report,
            Some("ignore") => OnError::Ignore,
            Some("stop") => OnError::Stop,
            Some("enospc") => OnError::Enospc,
            Some(other) => {
                return Err(error(format!(
                    "on-error={other:?}: expected report, ignore, stop or enospc"
                )))
            }
        })
    }

    /// Refuses any key nobody took.
    fn finish(self) -> Result<(), ParseError> {
        let mut unknown: Vec<&String> = self.values.keys().collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(key) => Err(error(format!("{}: unknown key {key:?}", self.verb))),
        }
    }
}

/// Parses RATE: bytes per second with an optional K, M or G suffix
/// (powers of 1024).
pub fn parse_rate(text: &str) -> Result<u64, ParseError> {
    let bad = || {
        error(format!(
            "bad rate {text:?}: expected bytes per second, e.g. 10M"
        ))
    };
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1 << shift).ok_or_else(bad)
}

/// Splits on spaces, keeping double-quoted parts of a word together.
fn split_words(text: &str) -> Result<Vec<String>, ParseError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '"' => {
                in_word = true;
                read_quoted(&mut chars, &mut word)?;
            }
            '\n' | '\r' | '\0' => return Err(error("a command is one line")),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

fn read_quoted(chars: &mut std::str::Chars<'_>, word: &mut String) -> Result<(), ParseError> {
    loop {
        match chars.next() {
            None => return Err(error("unterminated double quote")),
            Some('"') => return Ok(()),
            Some('\\') => match chars.next() {
                Some(c @ ('"' | '\\')) => word.push(c),
                _ => return Err(error("only \\\" and \\\\ may follow a backslash in quotes")),
            },
            Some(c) => word.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::Verb;
    use super::*;

    #[test]
    fn stream_takes_every_option_and_a_trailing_newline() {
        let command =
            parse("stream node=file-D.img base=file-B.img speed=10M id=s1 on-error=stop\n")
                .unwrap();
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
}
