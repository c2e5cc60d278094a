//! Jobs: the owner of the chain while it is mounted, and the place where
//! commands written to `ctl/command` are decided.
//!
//! For now there is no job engine: [`Jobs`] holds the chain, parses
//! commands and refuses every one honestly (SPEC §4 verbs are "not
//! implemented yet"), logging each refusal as a `COMMAND_REJECTED` event.
//! The next step adds stream, commit and snapshot, which replace the chain
//! at run time; callers therefore take a snapshot of it per request with
//! [`Jobs::chain`] and never keep node lists of their own.
//!
//! The layer above (`fs`) reaches the chain only through the re-exports
//! here.

pub mod command;
mod error;
pub mod events;
pub mod report;

pub use crate::chain::{Chain, ChainError, ChainExtent, Node, NodeId};
// The chain layer hands out `format::Allocation` in its extents without
// re-exporting it; until it does, jobs names it here for the layer above.
pub use crate::format::Allocation;
pub use command::Command;
pub use error::JobError;
pub use events::EventLog;

use crate::sync::{lock, read, Arc, Mutex, RwLock};

/// The mounted chain and everything that acts on it.
///
/// Lock order: `chain` and `last_rejection` are never held together, and
/// the event log's own lock is taken last and alone, so no order can
/// deadlock. No lock is held across image I/O.
#[derive(Debug)]
pub struct Jobs {
    /// The chain as it stands now. Jobs swap in a new `Arc` when they change
    /// it; a request keeps the snapshot it took for as long as it needs it.
    chain: RwLock<Arc<Chain>>,
    /// Whether the mount was asked to be read-only (no command may run).
    read_only: bool,
    /// What happened, for `ctl/events`.
    events: EventLog,
    /// The last refusal, rendered as `ctl/status` shows it.
    last_rejection: Mutex<Option<String>>,
}

impl Jobs {
    /// Takes ownership of an open chain. `read_only` refuses every command
    /// with EROFS (and the mount above shows every flat file 0444).
    pub fn new(chain: Chain, read_only: bool) -> Jobs {
        Jobs {
            chain: RwLock::new(Arc::new(chain)),
            read_only,
            events: EventLog::default(),
            last_rejection: Mutex::new(None),
        }
    }

    /// The chain as it stands now: a cheap snapshot that stays valid (and
    /// readable) even after a job replaces the chain.
    pub fn chain(&self) -> Arc<Chain> {
        Arc::clone(&read(&self.chain))
    }

    /// Makes the mount read-only from now on (a mount asked to be
    /// read-only over a chain opened writable).
    pub fn set_read_only(&mut self) {
        self.read_only = true;
    }

    /// Whether the mount is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Runs one command written to `ctl/command`. A refusal is logged as a
    /// `COMMAND_REJECTED` event and becomes the last line of `ctl/status`
    /// before it is returned.
    pub fn command(&self, text: &str) -> Result<(), JobError> {
        let result = self.decide(text);
        if let Err(error) = &result {
            self.reject(text, error);
        }
        result
    }

    /// [`Jobs::command`] for raw bytes written to `ctl/command`: text that
    /// is not UTF-8 is refused (EINVAL) and logged like any other refusal.
    pub fn command_bytes(&self, data: &[u8]) -> Result<(), JobError> {
        match std::str::from_utf8(data) {
            Ok(text) => self.command(text),
            Err(_) => {
                let error = JobError::Syntax {
                    reason: "a command must be UTF-8 text".to_owned(),
                };
                self.reject(&String::from_utf8_lossy(data), &error);
                Err(error)
            }
        }
    }

    /// What `ctl/status` shows now.
    pub fn status_text(&self) -> String {
        report::status_text(lock(&self.last_rejection).as_deref())
    }

    /// What `ctl/status.json` shows now.
    pub fn status_json(&self) -> String {
        report::status_json()
    }

    /// What `ctl/events` shows now.
    pub fn events_text(&self) -> String {
        self.events.render()
    }

    /// What `ctl/chain` shows now.
    pub fn chain_text(&self) -> String {
        report::chain_text(&self.chain())
    }

    /// Flushes and closes every image of the chain. Fails with
    /// [`JobError::ChainInUse`] (after flushing) if a snapshot of the chain
    /// is still held elsewhere.
    pub fn close(self) -> Result<(), JobError> {
        let chain = self
            .chain
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match Arc::try_unwrap(chain) {
            // Closing writes everything back and leaves every image clean.
            Ok(chain) => Ok(chain.close()?),
            Err(shared) => {
                shared.flush()?;
                Err(JobError::ChainInUse {
                    holders: Arc::strong_count(&shared) - 1,
                })
            }
        }
    }

    /// Parses `text` and decides whether it may run.
    fn decide(&self, text: &str) -> Result<(), JobError> {
        let command = Command::parse(text)?;
        if !command.is_known() {
            return Err(JobError::UnknownVerb { verb: command.verb });
        }
        if self.read_only {
            return Err(JobError::ReadOnly);
        }
        Err(JobError::NotImplemented { verb: command.verb })
    }

    /// Records a refusal in the event log and in the status.
    fn reject(&self, text: &str, error: &JobError) {
        let command = excerpt(text.strip_suffix('\n').unwrap_or(text));
        let errno = error.errno_name();
        log::info!("command {command:?} rejected: {error} ({errno})");
        self.events.push(
            events::names::COMMAND_REJECTED,
            serde_json::json!({
                "command": command,
                "errno": errno,
                "reason": error.to_string(),
            }),
        );
        *lock(&self.last_rejection) = Some(format!(
            "Last command rejected: {command:?}: {error} ({errno})"
        ));
    }
}

/// At most the first [`EXCERPT_CHARS`] characters of a refused command: a
/// hostile megabyte-long write must not fill the event log.
fn excerpt(text: &str) -> &str {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// How much of a refused command the log and status keep.
const EXCERPT_CHARS: usize = 256;

#[cfg(test)]
mod tests;
