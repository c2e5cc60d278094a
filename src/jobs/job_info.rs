//! What a job is and what the reports show of it: its kind, its outcome
//! and a snapshot of its progress ([`JobInfo`]), plain values that
//! `ctl/status` and `ctl/status.json` are written from.

use std::collections::VecDeque;
use std::time::Instant;

use super::state::JobStatus;

/// The kind of a job, as QEMU's `JobType` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobType {
    /// block-stream.
    Stream,
    /// block-commit.
    Commit,
    /// drive-mirror.
    Mirror,
    /// drive-backup.
    Backup,
}

impl JobType {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            JobType::Stream => "stream",
            JobType::Commit => "commit",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
        }
    }
}

/// How a concluded job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Did all its work and changed the chain.
    Completed,
    /// Cancelled by the user.
    Cancelled,
    /// Stopped by an error (the error text says which).
    Failed,
}

impl Outcome {
    /// The word status reports use.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// What the reports show of a job at one instant.
#[derive(Clone, Debug)]
pub struct JobInfo {
    /// The job id.
    pub id: String,
    /// stream or commit.
    pub kind: JobType,
    /// The node the job writes (QEMU's `device`).
    pub node: String,
    /// The base node, if any.
    pub base: Option<String>,
    /// The image written outside the chain (a mirror's target), if any.
    pub target: Option<String>,
    /// QEMU status.
    pub status: JobStatus,
    /// Bytes the job will have scanned when done.
    pub len: u64,
    /// Bytes scanned so far.
    pub offset: u64,
    /// Speed limit in bytes per second (0: none).
    pub speed: u64,
    /// Measured rate of bytes copied (what the speed limit counts), in
    /// bytes per second over the last seconds.
    pub rate: f64,
    /// Measured rate of bytes scanned (what the progress counts), in bytes
    /// per second over the last seconds.
    pub scan_rate: f64,
    /// Estimated seconds to completion at the measured scan rate.
    pub eta_seconds: Option<f64>,
    /// The error that failed (or paused) the job.
    pub error: Option<String>,
    /// How the job ended, once concluded.
    pub outcome: Option<Outcome>,
    /// Whether the job has been `ready` (QEMU's `ready` field).
    pub ready: bool,
    /// Bytes still to copy, for jobs that track writes (active commit).
    pub remaining: Option<u64>,
}

/// Bytes scanned and bytes copied per second over the samples' span.
pub(super) fn measured_rates(samples: &VecDeque<(Instant, u64, u64)>) -> (f64, f64) {
    match (samples.front(), samples.back()) {
        (Some(&(t0, o0, c0)), Some(&(t1, o1, c1))) if t1 > t0 => {
            let seconds = t1.duration_since(t0).as_secs_f64();
            ((o1 - o0) as f64 / seconds, (c1 - c0) as f64 / seconds)
        }
        _ => (0.0, 0.0),
    }
}
