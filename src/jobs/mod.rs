//! Jobs: the owner of the chain while it is mounted, and the place where
//! commands written to `ctl/command` are decided and block jobs run.
//!
//! A command is parsed ([`command`]), checked against the chain and the
//! jobs running ([`registry`]), and either refused — with one errno, a
//! `COMMAND_REJECTED` event and a last line in `ctl/status` — or accepted,
//! in which case a started job is listed before the write returns. Jobs run
//! on their own threads ([`job`], [`stream`], `commit`, `mirror`) and
//! replace the chain when they change its shape; callers therefore take a
//! snapshot of it per request with [`Jobs::chain`] and never keep node
//! lists of their own.
//!
//! The layer above (`fs`) reaches the chain only through the re-exports
//! here.

pub mod backup;
pub mod bitmaps;
pub mod command;
mod commit;
pub mod content;
mod copier;
mod error;
pub mod events;
pub mod job;
mod job_info;
mod live_copy;
mod mirror;
pub mod ratelimit;
pub mod registry;
pub mod report;
pub mod state;
pub mod stream;
pub mod target;
mod target_image;

pub use crate::chain::Format;
pub use crate::chain::{Allocation, Chain, ChainError, ChainExtent, Node, NodeId};
pub use error::JobError;
pub use events::EventLog;

use self::job::EventSink;
use self::registry::{LiveChain, Registry};
use crate::sync::{lock, Arc, Mutex};

/// The mounted chain and everything that acts on it.
///
/// Lock order: the registry's locks, then a job's; the write gate before
/// the live chain's lock (a pivot drains guest writes, then changes the
/// chain); the event log's lock alone. Image I/O happens under no lock
/// of this layer, with one exception: a change of the chain's shape (a
/// snapshot creating and syncing its image, a stream or commit writing a
/// header at its end) holds the live chain's write lock, so requests that
/// take the chain meanwhile wait for that one change.
pub struct Jobs {
    /// The chain as it stands now, shared with the job threads.
    live: Arc<LiveChain>,
    /// The jobs, running and concluded.
    registry: Registry,
    /// Whether the mount was asked to be read-only (no command may run).
    read_only: bool,
    /// What happened, for `ctl/events`.
    events: Arc<EventLog>,
    /// The last refusal, rendered as `ctl/status` shows it.
    last_rejection: Mutex<Option<String>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl EventSink for EventLog {
    fn push(&self, event: &str, data: serde_json::Value) {
        EventLog::push(self, event, data);
    }
}

impl Jobs {
    /// Takes ownership of an open chain. `read_only` refuses every command
    /// with EROFS (and the mount above shows every flat file 0444).
    pub fn new(chain: Chain, read_only: bool) -> Jobs {
        let events = Arc::new(EventLog::default());
        let sink: Arc<dyn EventSink> = events.clone();
        // Every node's stored bitmaps are listed from the start, and the
        // writable node's are recorded by the mount; if they cannot be
        // taken, the engine keeps recording them itself.
        for node in chain.nodes() {
            if let Err(err) = node.take_persistent_bitmaps() {
                log::warn!("persistent bitmaps of {}: {err}", node.name());
            }
        }
        let live = Arc::new(LiveChain::new(chain, Arc::clone(&sink)));
        Jobs {
            registry: Registry::new(Arc::clone(&live), sink),
            live,
            read_only,
            events,
            last_rejection: Mutex::new(None),
        }
    }

    /// The chain as it stands now: a cheap snapshot that stays valid (and
    /// readable) even after a job replaces the chain.
    pub fn chain(&self) -> Arc<Chain> {
        self.live.current()
    }

    /// Calls `watcher` with the chain before and after every change a job
    /// or command makes (the mount uses it to invalidate kernel caches).
    pub fn watch_chain(&self, watcher: registry::ChainWatcher) {
        self.live.watch(watcher);
    }

    /// Calls `watcher` whenever a job changes what a node's file shows
    /// without changing the chain (a commit writing into its base), on the
    /// thread that made the change.
    pub fn watch_content(&self, watcher: content::ContentWatcher) {
        self.live.content().watch(watcher);
    }

    /// Held by every guest write for its whole length, so that a pivot
    /// never happens in the middle of one (see [`LiveChain::drain`]).
    pub fn write_gate(&self) -> crate::sync::RwLockReadGuard<'_, ()> {
        self.live.write_gate()
    }

    /// Tells the jobs where the chain is mounted (its canonical mount point
    /// and device), so that no command creates a file inside it.
    pub fn set_mount(&self, mount: target::MountSpot) {
        self.registry.set_mount(mount);
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
    /// before it is returned; an accepted job is already listed.
    pub fn command(&self, text: &str) -> Result<(), JobError> {
        let result = self.decide(text);
        match &result {
            Err(error) => self.reject(text, error),
            Ok(()) => *lock(&self.last_rejection) = None,
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
        report::status_text(
            &self.registry.infos(),
            lock(&self.last_rejection).as_deref(),
        )
    }

    /// What `ctl/status.json` shows now.
    pub fn status_json(&self) -> String {
        report::status_json(&self.registry.infos())
    }

    /// What `ctl/events` shows now.
    pub fn events_text(&self) -> String {
        self.events.render()
    }

    /// What `ctl/chain` shows now.
    pub fn chain_text(&self) -> String {
        report::chain_text(&self.chain())
    }

    /// Cancels and waits for every running job, then flushes and closes
    /// every image of the chain. Fails with [`JobError::ChainInUse`] (after
    /// flushing) if a snapshot of the chain is still held elsewhere.
    pub fn close(self) -> Result<(), JobError> {
        self.registry.shutdown();
        drop(self.registry);
        let live = Arc::try_unwrap(self.live).map_err(|_| JobError::ChainInUse { holders: 1 })?;
        match live.into_chain() {
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

    /// Parses `text` and runs it, or says why not.
    fn decide(&self, text: &str) -> Result<(), JobError> {
        let command = command::parse(text).map_err(|error| JobError::Syntax { reason: error.0 })?;
        if self.read_only {
            return Err(JobError::ReadOnly);
        }
        self.registry.execute(command)
    }

    /// Records a refusal in the event log and in the status.
    fn reject(&self, text: &str, error: &JobError) {
        let command = excerpt(text.strip_suffix('\n').unwrap_or(text));
        let errno = error.errno_name();
        // The reason may quote the command: it is cut short the same way.
        let full_reason = error.to_string();
        let reason = excerpt(&full_reason);
        log::info!("command {command:?} rejected: {reason} ({errno})");
        self.events.push(
            events::names::COMMAND_REJECTED,
            serde_json::json!({
                "command": command,
                "errno": errno,
                "reason": reason,
            }),
        );
        // The reason may hold a path or name with a newline: escaped, it
        // stays one line.
        *lock(&self.last_rejection) = Some(format!(
            "Last command rejected: {command:?}: {} ({errno})",
            report::escape(reason)
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
