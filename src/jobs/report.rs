//! What `ctl/status`, `ctl/status.json` and `ctl/chain` show (SPEC §5):
//! jobs for people (QEMU's progress words, then percentage, measured rates
//! and ETA) and for scripts (QEMU's `query-block-jobs` field names plus
//! chainfs's own). Pure rendering: the caller passes the state to render.
//!
//! The text formats are one record a line, so every name and message
//! shown in them goes through [`escape`]: a node name, job id or error
//! with a newline in it must not start a line of its own.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::{json, Value};

use super::job::JobInfo;
use super::Chain;

/// `ctl/status` for people: one line per job (`No active jobs` when there
/// are none), then, when a command was refused, the refusal as the last line.
pub fn status_text(jobs: &[JobInfo], last_rejection: Option<&str>) -> String {
    let mut text = if jobs.is_empty() {
        "No active jobs\n".to_string()
    } else {
        jobs.iter().map(|job| job_line(job) + "\n").collect()
    };
    if let Some(line) = last_rejection {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// `ctl/status.json` for scripts: the jobs as a JSON array.
pub fn status_json(jobs: &[JobInfo]) -> String {
    let array: Vec<Value> = jobs.iter().map(job_json).collect();
    // unwrap: a Vec of JSON values always serialises.
    serde_json::to_string_pretty(&array).unwrap() + "\n"
}

/// `ctl/chain`: the chain base first on one line, then one line per node
/// with its path, format, virtual size and backing string, and `hidden`
/// for a node a commit took out of the mount.
///
/// ```text
/// file-A.img <- file-B.img
/// file-A.img: path="/img/file-A.img" format=raw virtual-size=67108864 backing=none
/// file-B.img: path="/img/file-B.img" format=qcow2 virtual-size=67108864 backing="file-A.img" backing-format=raw
/// ```
pub fn chain_text(chain: &Chain) -> String {
    let names: Vec<Cow<str>> = chain
        .nodes()
        .iter()
        .map(|node| escape(node.name()))
        .collect();
    let mut text = names.join(" <- ");
    text.push('\n');
    for node in chain.nodes() {
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "{}: path={:?} format={} virtual-size={}",
            escape(node.name()),
            node.path().display().to_string(),
            node.format().name(),
            node.virtual_size()
        );
        match node.backing_file() {
            Some(backing) => {
                let _ = write!(text, " backing={backing:?}");
                if let Some(format) = node.backing_format() {
                    let _ = write!(text, " backing-format={}", format.name());
                }
            }
            None => text.push_str(" backing=none"),
        }
        if node.hidden() {
            text.push_str(" hidden");
        }
        text.push('\n');
    }
    text
}

/// The line shown for one job.
pub fn job_line(job: &JobInfo) -> String {
    let base = job
        .base
        .as_deref()
        .map_or(String::new(), |b| format!(" base={}", escape(b)));
    let target = job
        .target
        .as_deref()
        .map_or(String::new(), |t| format!(" target={}", escape(t)));
    let error = job.error.as_deref().map(escape);
    let state = match (job.outcome, &error) {
        (Some(outcome), Some(error)) if outcome.name() != "completed" => {
            format!("{} ({}: {error})", job.status, outcome.name())
        }
        (Some(outcome), _) => format!("{} ({})", job.status, outcome.name()),
        (None, Some(error)) => format!("{} (error: {error})", job.status),
        (None, None) => job.status.to_string(),
    };
    let percent = if job.len == 0 {
        100.0
    } else {
        job.offset as f64 * 100.0 / job.len as f64
    };
    let mut extra = format!("{percent:.1}%");
    if job.outcome.is_none() {
        // The speed limit counts bytes copied, the progress bytes scanned:
        // both rates, each named, so neither passes for the other.
        extra.push_str(&format!(
            ", copied {}, scanned {}",
            human_rate(job.rate),
            human_rate(job.scan_rate)
        ));
        if let Some(eta) = job.eta_seconds {
            extra.push_str(&format!(", ETA {}", human_duration(eta)));
        }
    }
    format!(
        "{}: {} node={}{base}{target} {state}: Completed {} of {} bytes, speed limit {} bytes/s ({extra})",
        escape(&job.id),
        job.kind.name(),
        escape(&job.node),
        job.offset,
        job.len,
        job.speed,
    )
}

/// One job as `ctl/status.json` shows it.
pub fn job_json(job: &JobInfo) -> Value {
    let mut value = json!({
        "id": job.id,
        "type": job.kind.name(),
        "device": job.node,
        "node": job.node,
        "base": job.base,
        "target": job.target,
        "len": job.len,
        "offset": job.offset,
        "speed": job.speed,
        "status": job.status.name(),
        "rate": job.rate.round() as u64,
        "scan_rate": job.scan_rate.round() as u64,
        "eta_seconds": job.eta_seconds.map(|s| s.ceil() as u64),
        "ready": job.ready,
    });
    if let Some(remaining) = job.remaining {
        value["remaining"] = json!(remaining);
    }
    if let Some(error) = &job.error {
        value["error"] = json!(error);
    }
    if let Some(outcome) = job.outcome {
        value["outcome"] = json!(outcome.name());
    }
    value
}

/// `text` made safe for a one-record-a-line format: a backslash becomes
/// `\\`, a newline `\n`, a carriage return `\r`, a tab `\t`, and any other
/// control character `\u{XX}` (its code point in hex), so the text can be
/// read back unambiguously. Text without any of these is returned as is.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c == '\\' || c.is_control()) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(escaped, "\\u{{{:x}}}", u32::from(c));
            }
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

fn human_rate(bytes_per_second: f64) -> String {
    const UNITS: [&str; 4] = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
    let mut value = bytes_per_second;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn human_duration(seconds: f64) -> String {
    let total = seconds.ceil() as u64;
    match (total / 3600, total / 60 % 60, total % 60) {
        (0, m, s) => format!("{m}:{s:02}"),
        (h, m, s) => format!("{h}:{m:02}:{s:02}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::job::{JobType, Outcome};
    use super::super::state::JobStatus;
    use super::*;

    fn info() -> JobInfo {
        JobInfo {
            id: "s0".into(),
            kind: JobType::Stream,
            node: "file-E.img".into(),
            base: Some("file-A.img".into()),
            target: None,
            status: JobStatus::Running,
            len: 8 << 20,
            offset: 2 << 20,
            speed: 1 << 20,
            rate: 1048576.0,
            scan_rate: 2097152.0,
            eta_seconds: Some(6.0),
            error: None,
            outcome: None,
            ready: false,
            remaining: None,
        }
    }

    #[test]
    fn a_running_job_shows_qemus_progress_words_then_percent_rate_and_eta() {
        assert_eq!(
            job_line(&info()),
            "s0: stream node=file-E.img base=file-A.img running: Completed 2097152 of 8388608 \
             bytes, speed limit 1048576 bytes/s (25.0%, copied 1.0 MiB/s, scanned 2.0 MiB/s, \
             ETA 0:06)"
        );
        let value = job_json(&info());
        assert_eq!(value["rate"], 1048576, "rate is what the limit counts");
        assert_eq!(value["scan_rate"], 2097152);
    }

    #[test]
    fn control_characters_and_backslashes_are_escaped() {
        assert!(matches!(escape("file-A.img"), Cow::Borrowed(_)));
        assert_eq!(escape("a\nb\r\tc\\d\u{1b}e"), "a\\nb\\r\\tc\\\\d\\u{1b}e");
    }

    #[test]
    fn a_newline_in_an_id_node_base_or_error_stays_on_the_job_line() {
        let mut job = info();
        job.id = "evil\nid".into();
        job.node = "no\nde".into();
        job.base = Some("ba\nse".into());
        job.error = Some("bad\nthing".into());
        let text = status_text(&[job], None);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.starts_with("evil\\nid: stream node=no\\nde base=ba\\nse"),
            "{text}"
        );
        assert!(text.contains("error: bad\\nthing"), "{text}");
    }

    #[test]
    fn a_failed_job_shows_its_outcome_and_error() {
        let mut job = info();
        job.status = JobStatus::Concluded;
        job.outcome = Some(Outcome::Failed);
        job.error = Some("No space left on device".into());
        let line = job_line(&job);
        assert!(
            line.contains("concluded (failed: No space left on device)"),
            "{line}"
        );
        let value = job_json(&job);
        assert_eq!(value["outcome"], "failed");
        assert_eq!(value["error"], "No space left on device");
        assert_eq!(value["device"], "file-E.img");
    }

    #[test]
    fn a_mirror_shows_its_target_escaped_on_its_line_and_in_json() {
        let mut job = info();
        job.kind = JobType::Mirror;
        job.base = None;
        job.target = Some("/new/dis\nk.qcow2".into());
        let line = job_line(&job);
        assert!(
            line.starts_with("s0: mirror node=file-E.img target=/new/dis\\nk.qcow2 running:"),
            "{line}"
        );
        let value = job_json(&job);
        assert_eq!(value["type"], "mirror");
        assert_eq!(value["target"], "/new/dis\nk.qcow2");
        assert_eq!(job_json(&info())["target"], serde_json::Value::Null);
    }

    #[test]
    fn no_jobs_says_so_and_the_last_rejection_comes_last() {
        assert_eq!(status_text(&[], None), "No active jobs\n");
        assert_eq!(status_json(&[]), "[]\n");
        let text = status_text(&[info()], Some("rejected: frob: EINVAL"));
        assert_eq!(text.lines().count(), 2);
        assert_eq!(text.lines().last(), Some("rejected: frob: EINVAL"));
    }
}
