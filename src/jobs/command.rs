//! The `ctl/command` syntax of SPEC §4: `VERB key=value …`, words separated
//! by spaces, a value in double quotes may hold spaces, a trailing newline
//! is ignored. Parsing has no side effects; [`super::Jobs::command`] decides
//! what a parsed command does.

use super::JobError;

/// The verbs SPEC §4 defines.
pub const VERBS: &[&str] = &[
    "stream",
    "snapshot",
    "commit",
    "cancel",
    "pause",
    "resume",
    "complete",
    "dismiss",
    "set-speed",
];

/// Longest command accepted: far more than any real one, small enough that a
/// hostile write cannot make the event log hold megabytes.
pub const MAX_COMMAND_BYTES: usize = 4096;

/// A command split into its verb and arguments, in the order written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The first word.
    pub verb: String,
    /// Every `key=value` after it; quotes removed from values.
    pub args: Vec<(String, String)>,
}

impl Command {
    /// Parses one command. An empty command, a word without `=`, an empty
    /// key, a repeated key or an unterminated quote is a syntax error.
    pub fn parse(text: &str) -> Result<Command, JobError> {
        if text.len() > MAX_COMMAND_BYTES {
            return Err(syntax(format!("longer than {MAX_COMMAND_BYTES} bytes")));
        }
        let text = text.strip_suffix('\n').unwrap_or(text);
        let mut words = split_words(text)?.into_iter();
        let verb = match words.next() {
            Some(Word {
                text,
                quoted: false,
            }) => text,
            Some(Word { quoted: true, .. }) => return Err(syntax("the verb cannot be quoted")),
            None => return Err(syntax("empty command")),
        };
        let mut args: Vec<(String, String)> = Vec::new();
        for word in words {
            let (key, value) = word.key_value()?;
            if args.iter().any(|(k, _)| *k == key) {
                return Err(syntax(format!("key {key:?} given twice")));
            }
            args.push((key, value));
        }
        Ok(Command { verb, args })
    }

    /// Whether the verb is one SPEC §4 defines.
    pub fn is_known(&self) -> bool {
        VERBS.contains(&self.verb.as_str())
    }
}

/// One word as split: its text and whether a quote was opened after `=`.
struct Word {
    text: String,
    quoted: bool,
}

impl Word {
    /// Splits `key=value`; the key must be bare and non-empty.
    fn key_value(self) -> Result<(String, String), JobError> {
        match self.text.split_once('=') {
            Some(("", _)) => Err(syntax("an argument has an empty key")),
            Some((key, value)) if key.chars().all(is_key_char) => {
                Ok((key.to_owned(), value.to_owned()))
            }
            Some((key, _)) => Err(syntax(format!("bad key {key:?}"))),
            None => Err(syntax(format!("{:?} is not key=value", self.text))),
        }
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// Splits on spaces; `"…"` groups spaces into a word and is removed, `\"`
/// and `\\` inside quotes stand for `"` and `\`.
fn split_words(text: &str) -> Result<Vec<Word>, JobError> {
    let mut words = Vec::new();
    let mut chars = text.chars();
    let mut current: Option<Word> = None;
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => words.extend(current.take()),
            '"' => {
                let word = current.get_or_insert_with(|| Word {
                    text: String::new(),
                    quoted: false,
                });
                word.quoted = true;
                read_quoted(&mut chars, &mut word.text)?;
            }
            c if c.is_control() => return Err(syntax("control character in command")),
            c => current
                .get_or_insert_with(|| Word {
                    text: String::new(),
                    quoted: false,
                })
                .text
                .push(c),
        }
    }
    words.extend(current);
    Ok(words)
}

/// Appends the inside of a quoted run to `out`, consuming the closing quote.
fn read_quoted(chars: &mut std::str::Chars<'_>, out: &mut String) -> Result<(), JobError> {
    loop {
        match chars.next() {
            Some('"') => return Ok(()),
            Some('\\') => match chars.next() {
                Some(c @ ('"' | '\\')) => out.push(c),
                Some(c) => {
                    out.push('\\');
                    out.push(c);
                }
                None => return Err(syntax("unterminated quote")),
            },
            Some(c) => out.push(c),
            None => return Err(syntax("unterminated quote")),
        }
    }
}

fn syntax(reason: impl Into<String>) -> JobError {
    JobError::Syntax {
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(command: &Command) -> Vec<(&str, &str)> {
        command
            .args
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn a_command_splits_into_verb_and_key_values() {
        let command = Command::parse("stream node=file-E.img base=file-A.img\n").unwrap();
        assert_eq!(command.verb, "stream");
        assert_eq!(
            args(&command),
            [("node", "file-E.img"), ("base", "file-A.img")]
        );
        assert!(command.is_known());
    }

    #[test]
    fn quoted_values_may_hold_spaces_and_escaped_quotes() {
        let command = Command::parse(r#"snapshot file="/tmp/my dir/new \"x\".qcow2""#).unwrap();
        assert_eq!(args(&command), [("file", r#"/tmp/my dir/new "x".qcow2"#)]);
    }

    #[test]
    fn extra_spaces_are_ignored() {
        let command = Command::parse("  cancel   id=job0  ").unwrap();
        assert_eq!(command.verb, "cancel");
        assert_eq!(args(&command), [("id", "job0")]);
    }

    #[test]
    fn malformed_commands_are_syntax_errors() {
        for bad in [
            "",
            "\n",
            "stream base",
            "stream =x",
            "stream base=\"a",
            "stream a=1 a=2",
            "stream b@d=1",
            "\"stream\"",
            "stream a=\u{7}",
        ] {
            let error = Command::parse(bad).unwrap_err();
            assert!(matches!(error, JobError::Syntax { .. }), "{bad:?}: {error}");
            assert_eq!(error.errno(), libc::EINVAL);
        }
    }

    #[test]
    fn an_overlong_command_is_refused() {
        let long = format!("stream id={}", "x".repeat(MAX_COMMAND_BYTES));
        assert!(Command::parse(&long).is_err());
    }

    #[test]
    fn unknown_verbs_parse_but_are_not_known() {
        let command = Command::parse("frobnicate").unwrap();
        assert!(!command.is_known());
    }
}
