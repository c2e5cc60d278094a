//! `chainfs status [--wait] [--json] MOUNTPOINT`: the mount's jobs.
//!
//! It reads only the mount's own files (`ctl/status`, `ctl/status.json`),
//! so a script reading them and this command always agree. `--wait` polls
//! `ctl/status.json`, draws a progress bar per job (on stderr, and only on a
//! terminal), and when every listed job has concluded prints the status as
//! plain `status` would; it exits 0 only if every listed job completed.

use std::collections::BTreeMap;
use std::path::Path;
use std::thread;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::{CliError, StatusArgs};

/// How often `--wait` re-reads `ctl/status.json`.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// One job as `ctl/status.json` lists it (SPEC §5); only the fields
/// `--wait` needs, each optional so that a newer daemon's additions and a
/// job that has not started counting yet do not break an older client.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct JobView {
    /// The job's id.
    pub id: String,
    /// `stream`, `commit`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Total work, in bytes.
    pub len: u64,
    /// Work done, in bytes.
    pub offset: u64,
    /// QEMU's job state (`running`, `ready`, `concluded`, …).
    pub status: String,
    /// `completed`, `cancelled` or `failed`, once concluded.
    pub outcome: Option<String>,
    /// The error text of a failed job.
    pub error: Option<String>,
    /// The daemon's measured rate, bytes per second.
    pub rate: Option<u64>,
    /// The daemon's estimate of the seconds left.
    pub eta_seconds: Option<u64>,
}

impl JobView {
    /// Whether the job will not change any more by itself.
    pub fn finished(&self) -> bool {
        self.outcome.is_some() || matches!(self.status.as_str(), "concluded" | "null")
    }

    /// Whether the job finished and did its work.
    pub fn completed(&self) -> bool {
        match self.outcome.as_deref() {
            Some(outcome) => outcome == "completed",
            None => self.finished() && self.error.is_none(),
        }
    }

    /// The bar's message: the state, and while it runs the daemon's own
    /// rate and ETA (steadier than one measured between two polls).
    fn progress_message(&self) -> String {
        if let Some(outcome) = &self.outcome {
            return outcome.clone();
        }
        let mut message = self.status.clone();
        if let Some(rate) = self.rate {
            message.push_str(&format!(", {}/s", indicatif::BinaryBytes(rate)));
        }
        if let Some(eta) = self.eta_seconds {
            message.push_str(&format!(", ETA {eta} s"));
        }
        message
    }

    /// `ID failed: ERROR` and the like, for the exit message.
    fn summary(&self) -> String {
        let outcome = self.outcome.as_deref().unwrap_or(&self.status);
        match &self.error {
            Some(error) => format!("{} {outcome} ({error})", self.id),
            None => format!("{} {outcome}", self.id),
        }
    }
}

/// Runs `chainfs status`.
pub fn run(args: &StatusArgs) -> Result<(), CliError> {
    let ctl = args.mountpoint.join("ctl");
    if args.wait {
        let jobs = wait(&ctl.join("status.json"))?;
        print_status(&ctl, args.json)?;
        return verdict(&args.mountpoint, &jobs);
    }
    print_status(&ctl, args.json)
}

/// Prints `ctl/status` or `ctl/status.json` as they are.
fn print_status(ctl: &Path, json: bool) -> Result<(), CliError> {
    let path = ctl.join(if json { "status.json" } else { "status" });
    let text = std::fs::read_to_string(&path).map_err(|e| CliError::at(&path, e))?;
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// Polls `status_json` until every job has finished; returns the jobs as
/// they ended.
fn wait(status_json: &Path) -> Result<Vec<JobView>, CliError> {
    let mut bars = Bars::new();
    loop {
        let jobs = read_jobs(status_json)?;
        bars.show(&jobs);
        if jobs.iter().all(JobView::finished) {
            bars.clear();
            return Ok(jobs);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Reads and parses `ctl/status.json`.
fn read_jobs(status_json: &Path) -> Result<Vec<JobView>, CliError> {
    let text = std::fs::read_to_string(status_json).map_err(|e| CliError::at(status_json, e))?;
    parse_jobs(&text).map_err(|e| CliError::at(status_json, e))
}

/// Parses the JSON array of `ctl/status.json`.
pub fn parse_jobs(text: &str) -> Result<Vec<JobView>, String> {
    serde_json::from_str(text).map_err(|e| format!("not a job list: {e}"))
}

/// Exit 0 if every job completed; otherwise one line naming the others.
fn verdict(mount_point: &Path, jobs: &[JobView]) -> Result<(), CliError> {
    let failed: Vec<String> = jobs
        .iter()
        .filter(|job| !job.completed())
        .map(JobView::summary)
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    Err(CliError::at(
        mount_point,
        format!("not every job completed: {}", failed.join(", ")),
    ))
}

/// One progress bar per job, keyed by job id.
struct Bars {
    multi: MultiProgress,
    bars: BTreeMap<String, ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            multi: MultiProgress::new(),
            bars: BTreeMap::new(),
        }
    }

    /// Brings the bars in line with `jobs`: new jobs get a bar, dismissed
    /// ones lose theirs.
    fn show(&mut self, jobs: &[JobView]) {
        self.bars.retain(|id, bar| {
            let listed = jobs.iter().any(|job| &job.id == id);
            if !listed {
                bar.finish_and_clear();
            }
            listed
        });
        for job in jobs {
            let bar = self
                .bars
                .entry(job.id.clone())
                .or_insert_with(|| self.multi.add(new_bar(job)));
            bar.set_length(job.len);
            bar.set_position(job.offset);
            bar.set_message(job.progress_message());
        }
    }

    /// Removes every bar, so that the final status prints on a clean screen.
    fn clear(&mut self) {
        for bar in self.bars.values() {
            bar.finish_and_clear();
        }
        // Nothing to do if the terminal is gone; the bars are cosmetic.
        let _ = self.multi.clear();
    }
}

/// A bar labelled `ID (TYPE)`, counting bytes.
fn new_bar(job: &JobView) -> ProgressBar {
    let style =
        ProgressStyle::with_template("{prefix:>16} [{bar:40}] {bytes:>10}/{total_bytes:10} {msg}")
            // unwrap: the template is a constant that the unit tests parse.
            .unwrap()
            .progress_chars("=> ");
    ProgressBar::new(job.len)
        .with_style(style)
        .with_prefix(format!("{} ({})", job.id, job.kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: &str, outcome: Option<&str>) -> JobView {
        JobView {
            id: "job0".into(),
            kind: "stream".into(),
            len: 100,
            offset: 40,
            status: status.into(),
            outcome: outcome.map(str::to_owned),
            error: None,
            rate: Some(2 << 20),
            eta_seconds: Some(3),
        }
    }

    #[test]
    fn status_json_with_qemu_field_names_parses() {
        let text = r#"[{"id":"s1","type":"stream","device":"s1","len":1048576,
            "offset":524288,"speed":0,"status":"running","node":"file-E.img",
            "base":"file-A.img","rate":1000,"eta_seconds":3}]"#;
        let jobs = parse_jobs(text).expect("parses");
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].kind, "stream");
        assert_eq!((jobs[0].len, jobs[0].offset), (1 << 20, 1 << 19));
        assert!(!jobs[0].finished());
        assert_eq!(parse_jobs("[]"), Ok(Vec::new()));
        assert!(parse_jobs("No active jobs").is_err());
    }

    #[test]
    fn running_paused_and_ready_jobs_are_not_finished() {
        for status in [
            "created", "running", "paused", "ready", "standby", "pending",
        ] {
            assert!(!job(status, None).finished(), "{status}");
        }
        assert!(job("concluded", Some("completed")).finished());
        assert!(job("null", None).finished());
    }

    #[test]
    fn only_completed_jobs_make_the_wait_succeed() {
        let done = job("concluded", Some("completed"));
        let mut failed = job("concluded", Some("failed"));
        failed.error = Some("Input/output error".into());
        assert!(verdict(Path::new("/m"), std::slice::from_ref(&done)).is_ok());
        assert!(verdict(Path::new("/m"), &[]).is_ok());
        let err = verdict(Path::new("/m"), &[done, failed]).expect_err("one failed");
        assert_eq!(
            err.to_string(),
            "/m: not every job completed: job0 failed (Input/output error)"
        );
    }

    #[test]
    fn a_running_bar_shows_the_daemons_rate_and_eta() {
        assert_eq!(
            job("running", None).progress_message(),
            "running, 2.00 MiB/s, ETA 3 s"
        );
        assert_eq!(
            job("concluded", Some("failed")).progress_message(),
            "failed"
        );
    }

    #[test]
    fn bars_follow_jobs_and_drop_dismissed_ones() {
        let mut bars = Bars::new();
        bars.multi
            .set_draw_target(indicatif::ProgressDrawTarget::hidden());
        bars.show(&[job("running", None)]);
        assert_eq!(bars.bars["job0"].position(), 40);
        bars.show(&[]);
        assert!(bars.bars.is_empty());
    }

    #[test]
    fn wait_on_an_empty_job_list_returns_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.json");
        std::fs::write(&path, "[]\n").expect("write");
        assert!(wait(&path).expect("no jobs").is_empty());
        assert!(wait(&dir.path().join("missing")).is_err());
    }
}
