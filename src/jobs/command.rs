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

/// What a mirror copies (QEMU's `MirrorSyncMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Everything the node shows; the target has no backing file.
    #[default]
    Full,
    /// What the node itself holds; the target is backed by the node's
    /// backing node.
    Top,
    /// Only what is written from now on; the target is backed by the node.
    None,
}

/// Whether a mirror creates its target (QEMU's `NewImageMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TargetMode {
    /// Create it (it must not exist), naming its backing file by an
    /// absolute path.
    #[default]
    AbsolutePaths,
    /// Use it as it is.
    Existing,
}

/// A `mirror` command's words, as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorArgs {
    /// The target image.
    pub target: String,
    /// The node copied (default: the active node).
    pub node: Option<String>,
    /// What is copied.
    pub sync: SyncMode,
    /// Whether the target is created.
    pub mode: TargetMode,
    /// The target's format (default: qcow2 when created, probed when
    /// existing).
    pub format: Option<super::Format>,
    /// How the job keeps up with writes once ready.
    pub copy_mode: CopyMode,
    /// Bytes per block of the dirty map (default: the target's cluster
    /// size clamped to [4 KiB, 64 KiB]).
    pub granularity: Option<u64>,
    /// Bytes per second copied; 0 is unlimited.
    pub speed: u64,
    /// Job id (default: generated).
    pub id: Option<String>,
    /// Error policy.
    pub on_error: OnError,
}

/// The granularities a mirror accepts, as QEMU: powers of two from 512 B
/// to 64 MiB.
const GRANULARITIES: std::ops::RangeInclusive<u64> = 512..=(64 << 20);

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
    /// QEMU's drive-mirror.
    Mirror(MirrorArgs),
    /// QEMU's drive-backup.
    Backup(super::backup::BackupArgs),
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
    /// A `bitmap-*` command, run synchronously.
    Bitmap(super::bitmaps::BitmapCommand),
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

pub(super) fn error(message: impl Into<String>) -> ParseError {
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
            copy_mode: args.copy_mode()?,
        },
        "mirror" => Command::Mirror(MirrorArgs {
            target: args.required("target")?,
            node: args.take("node"),
            sync: match args.take("sync").as_deref() {
                None | Some("full") => SyncMode::Full,
                Some("top") => SyncMode::Top,
                Some("none") => SyncMode::None,
                Some(other) => {
                    return Err(error(format!("sync={other:?}: expected full, top or none")))
                }
            },
            mode: args.target_mode()?,
            format: args.format()?,
            copy_mode: args.copy_mode()?,
            granularity: args
                .take("granularity")
                .map(|g| granularity(&g))
                .transpose()?,
            speed: args.rate("speed")?,
            id: args.id()?,
            on_error: args.on_error()?,
        }),
        "backup" => Command::Backup(super::backup::parse(&mut args)?),
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
        other if other.starts_with("bitmap-") => {
            Command::Bitmap(super::bitmaps::parse(other, &mut args)?)
        }
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
pub(super) struct Args {
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

    pub(super) fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    /// The optional `id=`, at most [`MAX_ID_BYTES`] long.
    pub(super) fn id(&mut self) -> Result<Option<String>, ParseError> {
        match self.take("id") {
            Some(id) if id.len() > MAX_ID_BYTES => Err(error(format!(
                "{}: a job id is at most {MAX_ID_BYTES} bytes; this one is {}",
                self.verb,
                id.len()
            ))),
            id => Ok(id),
        }
    }

    pub(super) fn required(&mut self, key: &str) -> Result<String, ParseError> {
        self.take(key)
            .ok_or_else(|| error(format!("{} needs {key}=…", self.verb)))
    }

    pub(super) fn rate(&mut self, key: &str) -> Result<u64, ParseError> {
        self.take(key).map_or(Ok(0), |rate| parse_rate(&rate))
    }

    pub(super) fn on_error(&mut self) -> Result<OnError, ParseError> {
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

    fn copy_mode(&mut self) -> Result<CopyMode, ParseError> {
        Ok(match self.take("copy-mode").as_deref() {
            None | Some("background") => CopyMode::Background,
            Some("write-blocking") => CopyMode::WriteBlocking,
            Some(other) => {
                return Err(error(format!(
                    "copy-mode={other:?}: expected background or write-blocking"
                )))
            }
        })
    }

    /// A target's `mode=` (default: absolute-paths).
    pub(super) fn target_mode(&mut self) -> Result<TargetMode, ParseError> {
        Ok(match self.take("mode").as_deref() {
            None | Some("absolute-paths") => TargetMode::AbsolutePaths,
            Some("existing") => TargetMode::Existing,
            Some(other) => {
                return Err(error(format!(
                    "mode={other:?}: expected absolute-paths or existing"
                )))
            }
        })
    }

    /// A target's `format=` (default: none given).
    pub(super) fn format(&mut self) -> Result<Option<super::Format>, ParseError> {
        Ok(match self.take("format").as_deref() {
            None => None,
            Some("qcow2") => Some(super::Format::Qcow2),
            Some("raw") => Some(super::Format::Raw),
            Some(other) => return Err(error(format!("format={other:?}: expected qcow2 or raw"))),
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

/// Parses a mirror's `granularity=SIZE` (K, M, G suffixes as for RATE): a
/// power of two from 512 B to 64 MiB.
fn granularity(text: &str) -> Result<u64, ParseError> {
    let size = parse_rate(text).map_err(|_| {
        error(format!(
            "bad granularity {text:?}: expected a size, e.g. 64K"
        ))
    })?;
    if !size.is_power_of_two() || !GRANULARITIES.contains(&size) {
        return Err(error(format!(
            "granularity {size}: expected a power of two from 512 to 64M"
        )));
    }
    Ok(size)
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
#[path = "command_tests.rs"]
mod tests;
