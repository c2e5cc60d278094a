//! The jobs of one mount: starting them from commands (after checking
//! their nodes and conflicts), steering them by id, listing them, and
//! replacing the chain when one finishes.
//!
//! Lock order: `jobs` before a job's own lock (a job's verbs may wait for
//! its thread, so `jobs` is released before calling them); the live chain's
//! lock is taken alone.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use serde_json::json;

use super::backup;
use super::command::{Command, OnError};
use super::commit;
use super::content::ContentWatchers;
use super::job::{EventSink, Job, JobInfo, JobSpec, JobType, Outcome};
use super::mirror;
use super::state::Verb;
use super::stream::{self, StreamPlan};
use super::target::{self, MountSpot};
use super::JobError;
use crate::chain::{Chain, ChainError, NodeId};
use crate::sync::{lock, read, write, Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// How many concluded jobs stay listed (oldest dropped first) when nobody
/// dismisses them.
const KEPT_CONCLUDED: usize = 64;

/// Told of every change of the chain: the chain before and after.
pub type ChainWatcher = Box<dyn Fn(&Arc<Chain>, &Arc<Chain>) + Send + Sync>;

/// The chain as it stands now, shared by the mount and the job threads.
pub struct LiveChain {
    chain: RwLock<Arc<Chain>>,
    events: Arc<dyn EventSink>,
    watchers: Mutex<Vec<ChainWatcher>>,
    /// Told when a job changes what a node's file shows in place.
    content: Arc<ContentWatchers>,
    /// Held shared by every guest write for its whole length; a job takes
    /// it alone to drain writes before a pivot (see [`LiveChain::drain`]).
    gate: RwLock<()>,
}

impl LiveChain {
    /// Wraps the mounted chain.
    pub fn new(chain: Chain, events: Arc<dyn EventSink>) -> LiveChain {
        LiveChain {
            chain: RwLock::new(Arc::new(chain)),
            events,
            watchers: Mutex::new(Vec::new()),
            content: Arc::default(),
            gate: RwLock::new(()),
        }
    }

    /// Taken by a guest write before it picks its target node and held
    /// until it returns, so a pivot never happens in the middle of one.
    pub fn write_gate(&self) -> RwLockReadGuard<'_, ()> {
        read(&self.gate)
    }

    /// Waits for the guest writes in progress and holds new ones back
    /// until the guard is dropped (an active commit's last copy and pivot).
    pub fn drain(&self) -> RwLockWriteGuard<'_, ()> {
        write(&self.gate)
    }

    /// Calls `watcher` after every change of the chain (outside the chain's
    /// lock, on the thread that changed it).
    pub fn watch(&self, watcher: ChainWatcher) {
        lock(&self.watchers).push(watcher);
    }

    /// Who is told when a job changes a node file's content in place.
    pub fn content(&self) -> &Arc<ContentWatchers> {
        &self.content
    }

    /// The chain now: a snapshot that stays readable after a change.
    pub fn current(&self) -> Arc<Chain> {
        Arc::clone(&read(&self.chain))
    }

    /// Replaces the chain with what `change` makes of it and reports the
    /// change as a `CHAIN_CHANGED` event.
    pub fn change(
        &self,
        change: &dyn Fn(&Chain) -> Result<Chain, ChainError>,
    ) -> Result<(), ChainError> {
        let mut current = write(&self.chain);
        // Hidden nodes are out of the mount; the names before the change
        // are taken first because hiding a node is seen by every version.
        let names = |chain: &Chain| -> Vec<String> {
            let shown = chain.nodes().iter().filter(|n| !n.hidden());
            shown.map(|n| n.name().to_string()).collect()
        };
        let old = names(&current);
        let next = change(&current)?;
        let new = names(&next);
        let left: Vec<&String> = old.iter().filter(|n| !new.contains(n)).collect();
        let added: Vec<&String> = new.iter().filter(|n| !old.contains(n)).collect();
        self.events.push(
            "CHAIN_CHANGED",
            json!({"chain": new, "left": left, "added": added, "active": next.active().name()}),
        );
        let old = std::mem::replace(&mut *current, Arc::new(next));
        let new = Arc::clone(&current);
        drop(current);
        for watcher in lock(&self.watchers).iter() {
            watcher(&old, &new);
        }
        Ok(())
    }

    /// Takes the chain back for closing, if nothing else holds it.
    pub fn into_chain(self) -> Result<Chain, Arc<Chain>> {
        // A watcher may still hold versions of the chain (a change not yet
        // told to the kernel); dropping it lets it finish and let go.
        drop(self.watchers);
        let chain = self.chain.into_inner().unwrap_or_else(|p| p.into_inner());
        Arc::try_unwrap(chain)
    }
}

/// Every job of the mount, oldest first.
pub struct Registry {
    live: Arc<LiveChain>,
    events: Arc<dyn EventSink>,
    jobs: Mutex<Vec<Arc<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    /// Where the chain is mounted, once it is (targets must be outside).
    mount: Mutex<Option<MountSpot>>,
}

impl Registry {
    /// No jobs yet, over `live`.
    pub fn new(live: Arc<LiveChain>, events: Arc<dyn EventSink>) -> Registry {
        Registry {
            live,
            events,
            jobs: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            mount: Mutex::new(None),
        }
    }

    /// Tells the registry where the chain is mounted: no command may put a
    /// file there.
    pub fn set_mount(&self, mount: MountSpot) {
        *lock(&self.mount) = Some(mount);
    }

    /// Where the chain is mounted, if it is yet.
    pub(super) fn mount(&self) -> Option<MountSpot> {
        lock(&self.mount).clone()
    }

    /// The chain now.
    pub fn chain(&self) -> Arc<Chain> {
        self.live.current()
    }

    /// What the reports show of every listed job.
    pub fn infos(&self) -> Vec<JobInfo> {
        lock(&self.jobs).iter().map(|job| job.info()).collect()
    }

    /// Runs one parsed command. When it returns `Ok`, a started job is
    /// already listed.
    pub fn execute(&self, command: Command) -> Result<(), JobError> {
        match command {
            Command::Stream {
                node,
                base,
                backing_file,
                speed,
                id,
                on_error,
            } => self.start_stream(node, base, backing_file, speed, id, on_error),
            Command::Snapshot { file } => self.snapshot(Path::new(&file)),
            Command::Commit {
                top,
                base,
                backing_file,
                speed,
                id,
                on_error,
                copy_mode,
            } => {
                let request = commit::Request {
                    top,
                    base,
                    backing_file,
                    on_error,
                    copy_mode,
                };
                commit::start(self, request, speed, id)
            }
            Command::Mirror(args) => mirror::start(self, args),
            Command::Backup(args) => backup::start(self, args),
            Command::ForceCancel { id } => Ok(self.find_job(id.as_deref())?.force_cancel()?),
            Command::SetSpeed { id, speed } => {
                Ok(self.find_job(id.as_deref())?.set_speed(speed)?)
            }
            Command::Control { verb, id } => self.control(verb, id.as_deref()),
            Command::Bitmap(command) => super::bitmaps::execute(&self.chain(), command),
        }
    }

    fn control(&self, verb: Verb, id: Option<&str>) -> Result<(), JobError> {
        let job = self.find_job(id)?;
        match verb {
            Verb::Cancel => job.cancel()?,
            Verb::Pause => job.pause()?,
            Verb::Resume => job.resume()?,
            Verb::SetSpeed => return Err(JobError::Invalid("set-speed needs speed=RATE".into())),
            Verb::Complete => job.complete()?,
            Verb::Dismiss => {
                job.check_dismiss()?;
                job.dismiss();
                lock(&self.jobs).retain(|j| !Arc::ptr_eq(j, &job));
            }
        }
        Ok(())
    }

    /// The job `id`, or the only job when no id is given.
    fn find_job(&self, id: Option<&str>) -> Result<Arc<Job>, JobError> {
        let jobs = lock(&self.jobs);
        match id {
            Some(id) => jobs
                .iter()
                .find(|job| job.id() == id)
                .cloned()
                .ok_or_else(|| JobError::NotFound(format!("no job with id {id:?}"))),
            None => match jobs.as_slice() {
                [job] => Ok(Arc::clone(job)),
                [] => Err(JobError::NotFound("there is no job".into())),
                _ => Err(JobError::Invalid(
                    "several jobs exist: say which with id=".into(),
                )),
            },
        }
    }

    fn start_stream(
        &self,
        node: Option<String>,
        base: Option<String>,
        backing_file: Option<String>,
        speed: u64,
        id: Option<String>,
        on_error: OnError,
    ) -> Result<(), JobError> {
        let chain = self.chain();
        let node = resolve(&chain, node.as_deref().unwrap_or("active"))?;
        let base = base.as_deref().map(|b| resolve(&chain, b)).transpose()?;
        let level = |id: NodeId| chain.nodes().iter().position(|n| n.id() == id);
        let node_level = level(node).unwrap_or(0);
        let base_level = base.and_then(level);
        if base_level.is_some_and(|b| b >= node_level) {
            return Err(JobError::Invalid("base is not below node".into()));
        }
        if backing_file.is_some() && base.is_none() {
            return Err(JobError::Invalid("backing-file needs base".into()));
        }
        let first_kept = base_level.map_or(0, |b| b + 1);
        // The node written and every node it reads and removes; not the base.
        let touched: Vec<NodeId> = chain.nodes()[first_kept..=node_level]
            .iter()
            .map(|n| n.id())
            .collect();
        let target = &chain.nodes()[node_level];
        let plan = StreamPlan {
            node,
            below: node_level.checked_sub(1).map(|l| chain.nodes()[l].id()),
            base,
            backing_file,
            on_error,
        };
        let spec = JobSpec {
            id: String::new(),
            kind: JobType::Stream,
            node: target.name().to_string(),
            base: base_level.map(|b| chain.nodes()[b].name().to_string()),
            target: None,
            touched,
            shared: Vec::new(),
            // The node streamed into stays; the nodes between leave.
            kept: vec![node],
            len: target.virtual_size(),
            speed,
        };
        self.spawn(
            spec,
            id,
            |_| (),
            move |job, live, ()| {
                let change = |f: &dyn Fn(&Chain) -> Result<Chain, ChainError>| live.change(f);
                stream::run(job, chain, &plan, &change);
            },
        )
    }

    /// Lists a new job, runs `setup` for it before the command returns,
    /// then `body` with what `setup` gave on a thread of its own.
    pub(super) fn spawn<T: Send + 'static>(
        &self,
        spec: JobSpec,
        id: Option<String>,
        setup: impl FnOnce(&LiveChain) -> T,
        body: impl FnOnce(&Job, &LiveChain, T) + Send + 'static,
    ) -> Result<(), JobError> {
        let job = self.register(spec, id)?;
        let live = Arc::clone(&self.live);
        let prepared = setup(&live);
        let runner = Arc::clone(&job);
        let thread = std::thread::Builder::new()
            .name(format!("job-{}", job.id()))
            .spawn(move || {
                let run = || body(&runner, &live, prepared);
                // A job whose thread died must still conclude, or `pause`
                // and unmount would wait for it for ever.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).is_err() {
                    runner.conclude(Outcome::Failed, Some("the job thread panicked".into()));
                }
            })
            .map_err(|err| {
                let reason = format!("cannot start a job thread: {err}");
                // A job no thread runs must not stay live for ever: verbs
                // on it would wait for a thread that never comes.
                job.conclude(Outcome::Failed, Some(reason.clone()));
                JobError::Busy(reason)
            })?;
        lock(&self.threads).push(thread);
        Ok(())
    }

    /// Lists a new job under `id` (or a generated one) if it conflicts with
    /// no live job.
    fn register(&self, mut spec: JobSpec, id: Option<String>) -> Result<Arc<Job>, JobError> {
        let mut jobs = lock(&self.jobs);
        spec.id = match id {
            Some(id) if id.is_empty() => return Err(JobError::Invalid("an empty job id".into())),
            Some(id) if jobs.iter().any(|job| job.id() == id) => {
                return Err(JobError::Invalid(format!("a job with id {id:?} exists")))
            }
            Some(id) => id,
            None => loop {
                let n = self.next_id.fetch_add(1, Ordering::Relaxed);
                let candidate = format!("{}{n}", spec.kind.name());
                if !jobs.iter().any(|job| job.id() == candidate) {
                    break candidate;
                }
            },
        };
        if let Some(other) = jobs
            .iter()
            .find(|job| !job.status().is_finished() && conflict(job, &spec))
        {
            return Err(JobError::Busy(format!(
                "job {} uses some of the same nodes",
                other.id()
            )));
        }
        let job = Arc::new(Job::new(spec, Arc::clone(&self.events)));
        jobs.push(Arc::clone(&job));
        drop_old_concluded(&mut jobs);
        Ok(job)
    }

    /// A live external snapshot onto a new file.
    fn snapshot(&self, file: &Path) -> Result<(), JobError> {
        if file.as_os_str().is_empty() {
            return Err(JobError::Invalid("snapshot needs a file name".into()));
        }
        // Placed before any lock is taken: a target in the mount would
        // have the daemon wait for itself.
        let file = &target::place(file, &self.chain(), self.mount().as_ref())?;
        if std::fs::symlink_metadata(file).is_ok() {
            return Err(JobError::Exists(format!("{} exists", file.display())));
        }
        let active = self.chain().active().id();
        let busy = lock(&self.jobs)
            .iter()
            .find(|job| !job.status().is_finished() && job.touched().contains(&active))
            .map(|job| job.id().to_string());
        if let Some(job) = busy {
            return Err(JobError::Busy(format!("job {job} uses the active node")));
        }
        // A guest write in flight picked the old top before the pivot; the
        // old top must take it before it stops taking writes, or the write
        // fails with EROFS through `active` (or lands in a read-only
        // backing file). Later writes wait, then pick the new top.
        let _drained = self.live.drain();
        Ok(self.live.change(&|chain| chain.with_new_top(file))?)
    }

    /// Cancels every live job and waits for their threads (at unmount).
    pub fn shutdown(&self) {
        for job in lock(&self.jobs).iter() {
            // Cancel wakes a parked thread and ends a speed-limit sleep;
            // a job it refuses (aborting, concluded) is already ending.
            let _ = job.cancel();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a job thread panicked");
            }
        }
    }
}

/// The node a command names.
pub(super) fn resolve(chain: &Chain, name: &str) -> Result<NodeId, JobError> {
    chain
        .find(name)
        .map(|node| node.id())
        .ok_or_else(|| JobError::NotFound(format!("no node {name:?} in the chain")))
}

/// Whether a live `job` and a new job `spec` may not run at once: they
/// touch a node in common, or one removes a node the other only reads.
fn conflict(job: &Job, spec: &JobSpec) -> bool {
    let removes = |touched: &[NodeId], kept: &[NodeId], node: &NodeId| {
        touched.contains(node) && !kept.contains(node)
    };
    job.touched().iter().any(|n| spec.touched.contains(n))
        || job
            .shared()
            .iter()
            .any(|n| removes(&spec.touched, &spec.kept, n))
        || spec
            .shared
            .iter()
            .any(|n| removes(job.touched(), job.kept(), n))
}

/// The node a command names and its level in `chain`; ENOENT when it is
/// hidden from the mount (a commit's intermediate).
pub(super) fn shown_node(
    chain: &Chain,
    name: &str,
) -> Result<(usize, crate::chain::Node), JobError> {
    let id = resolve(chain, name)?;
    chain
        .nodes()
        .iter()
        .position(|n| n.id() == id && !n.hidden())
        .map(|level| (level, chain.nodes()[level].clone()))
        .ok_or_else(|| JobError::NotFound(format!("node {name:?} is not in the mount")))
}

/// Keeps the listing bounded: the oldest concluded jobs beyond
/// [`KEPT_CONCLUDED`] go.
fn drop_old_concluded(jobs: &mut Vec<Arc<Job>>) {
    let concluded = jobs.iter().filter(|j| j.status().is_finished()).count();
    let mut excess = concluded.saturating_sub(KEPT_CONCLUDED);
    jobs.retain(|job| {
        if excess > 0 && job.status().is_finished() {
            excess -= 1;
            return false;
        }
        true
    });
}
