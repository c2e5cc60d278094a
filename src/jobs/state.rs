//! QEMU's job state machine (`job.c`: the state transition table and the
//! verb table), so that chainfs jobs move through the same states and
//! accept the same verbs as `query-jobs` shows for QEMU's.

use std::fmt;

/// A job's status, as QEMU names it (`JobStatus` in `qapi/job.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Accepted, not yet started.
    Created,
    /// Working.
    Running,
    /// Paused by `pause` or by an error under `on-error=stop|enospc`.
    Paused,
    /// An active commit has caught up and waits for `complete`.
    Ready,
    /// Ready, but paused.
    Standby,
    /// Finished its work, waiting for its transaction.
    Waiting,
    /// About to finalize (pivot, rewrite backing pointers).
    Pending,
    /// Cancelled or failed, cleaning up.
    Aborting,
    /// Finished; stays listed until `dismiss`.
    Concluded,
    /// Dismissed; about to disappear.
    Null,
}

/// Things a user can ask of a job (`JobVerb` in `qapi/job.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `cancel`.
    Cancel,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `set-speed`.
    SetSpeed,
    /// `complete`.
    Complete,
    /// `dismiss`.
    Dismiss,
}

impl JobStatus {
    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether QEMU's state transition table allows moving to `next`.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// Whether QEMU's verb table allows `verb` in this status.
    pub fn allows(self, verb: Verb) -> bool {
        use JobStatus::*;
        let live = matches!(self, Created | Running | Paused | Ready | Standby);
        match verb {
            Verb::Cancel => live || matches!(self, Waiting | Pending),
            Verb::Pause | Verb::Resume | Verb::SetSpeed => live,
            Verb::Complete => matches!(self, Ready | Standby),
            Verb::Dismiss => self == Concluded,
        }
    }

    /// Whether the job has finished for good (its outcome is known).
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Concluded | JobStatus::Null)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Verb {
    /// The command word for the verb.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Dismiss => "dismiss",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JobStatus::*;
    use super::*;

    const ALL: [JobStatus; 10] = [
        Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting, Concluded, Null,
    ];

    /// QEMU's JobVerbTable, columns C R P Y S W D X E N (undefined left out).
    const VERB_TABLE: [(Verb, [u8; 10]); 6] = [
        (Verb::Cancel, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
        (Verb::Pause, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
        (Verb::Resume, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
        (Verb::SetSpeed, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
        (Verb::Complete, [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]),
        (Verb::Dismiss, [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
    ];

    /// QEMU's JobSTT, rows and columns C R P Y S W D X E N.
    const STT: [[u8; 10]; 10] = [
        [0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
        [0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ];

    #[test]
    fn verbs_follow_qemus_verb_table() {
        for (verb, row) in VERB_TABLE {
            for (status, allowed) in ALL.iter().zip(row) {
                assert_eq!(status.allows(verb), allowed == 1, "{verb:?} in {status}");
            }
        }
    }

    #[test]
    fn transitions_follow_qemus_state_table() {
        for (from, row) in ALL.iter().zip(STT) {
            for (to, allowed) in ALL.iter().zip(row) {
                assert_eq!(from.can_become(*to), allowed == 1, "{from} -> {to}");
            }
        }
    }
}
