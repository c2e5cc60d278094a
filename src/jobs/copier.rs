//! The copier that stream, commit (intermediate and active), mirror and
//! backup share: a reader thread reads the next chunks while writer
//! threads write the last ones, with a bounded number of chunks in flight.
//!
//! Why several writers: a chunk's read (the chain below, or the top) and
//! its write (the node receiving it) touch different images, so they
//! overlap; and the writes of disjoint clusters of one image only meet on
//! its metadata lock for allocation and publication, so where the bytes
//! move through the CPU (a kernel copy on tmpfs, a buffer that was read)
//! one writer per core keeps every core copying.
//!
//! What stays as it was with one chunk at a time:
//! * chunks are handed to the writers in the order they were read, and a
//!   chunk overlapping one still being written waits for it, so a later
//!   read of a range (an active commit's re-copy after a guest write)
//!   always lands after an earlier one;
//! * the job's thread calls [`Job::checkpoint`](super::job::Job) before
//!   it hands out each chunk and `advance` after each is written, so
//!   pause, cancel and the speed limit act within the few chunks being
//!   written, and the offset only moves there;
//! * a failed chunk goes to the caller, which may retry it (`stop`, then
//!   `resume`): the retry reads and writes it again on the job's thread;
//! * when the caller stops early, the chunks being written finish, and
//!   every chunk read but not written is handed back ([`Ended::Stopped`]),
//!   so an active commit marks it dirty again.
//!
//! Data that a node keeps as it is in a host file (raw, or uncompressed
//! qcow2 clusters) is not read at all: the writer has the kernel copy it
//! ([`Chain::copy_into`], `copy_file_range`), which moves it once instead
//! of twice through user space, and on XFS or btrfs shares its extents.
//! The mapping is taken without holding the source's clusters: a source
//! below the active node never changes, and an active source's changes
//! are tracked and copied again, so a copy that raced a free is
//! overwritten before the job can be `ready`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

use crate::chain::{Allocation, Chain, ChainError, HostRange, NodeId};
use crate::sync::{lock, Arc, Mutex};

/// Bytes per chunk: QEMU's block-copy uses up to 1 MiB per request.
pub(super) const CHUNK: u64 = 1 << 20;

/// Chunks read ahead of those being written: a few absorb uneven chunk
/// costs without holding much memory (each is at most [`CHUNK`]).
const AHEAD: usize = 4;

/// A failed copy: the operation (`read` or `write`, as QMP reports it)
/// and its error.
pub(super) type CopyFailure = (&'static str, ChainError);

/// What a copy moves, and how it writes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Copier {
    /// The node whose view is copied.
    pub view: NodeId,
    /// Nodes at and below this one are not looked at (`None`: look down to
    /// the bottom of the chain).
    pub base: Option<NodeId>,
    /// The node receiving the data.
    pub dest: NodeId,
    /// `false` (stream): fill only what `dest` lacks, never overwriting
    /// ([`Chain::populate`]), so a guest write always wins. `true`
    /// (commit): make `dest` read as the view does.
    pub overwrite: bool,
}

/// Where a copy reads and where it writes: one chain for stream and
/// commit, whose destination is a node of the chain they copy from; two
/// for a mirror, whose target is not in the mounted chain until its pivot.
#[derive(Clone, Copy, Debug)]
pub(super) struct Chains<'a> {
    /// The chain holding the view.
    pub source: &'a Chain,
    /// The chain holding the destination node.
    pub dest: &'a Chain,
}

impl<'a> Chains<'a> {
    /// The view and the destination in one chain.
    pub(super) fn same(chain: &'a Chain) -> Chains<'a> {
        Chains {
            source: chain,
            dest: chain,
        }
    }
}

/// One run of a chunk, as the view holds it.
#[derive(Clone, Debug)]
struct Segment {
    offset: u64,
    len: u64,
    allocation: Allocation,
    /// For data kept as it is in a host file: where, so that the writer
    /// has the host copy it (its bytes are then not read into the buffer).
    source: Option<HostRange>,
}

impl Segment {
    /// Whether `next` continues this segment as one write (or one copy).
    fn continued_by(&self, next: &Segment) -> bool {
        let adjacent = self.offset + self.len == next.offset && self.allocation == next.allocation;
        adjacent
            && match (&self.source, &next.source) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    Arc::ptr_eq(&a.storage, &b.storage) && a.offset + a.len == b.offset
                }
                _ => false,
            }
    }

    /// Appends `next`, which [`Segment::continued_by`] accepted.
    fn extend(&mut self, next: &Segment) {
        self.len += next.len;
        if let (Some(a), Some(b)) = (&mut self.source, &next.source) {
            a.len += b.len;
        }
    }
}

/// A chunk read and waiting to be written.
struct Chunk {
    offset: u64,
    len: u64,
    read: Result<Vec<Segment>, CopyFailure>,
    /// [`CHUNK`] bytes, allocated once per buffer; the data of segment `s`
    /// sits at `s.offset - offset`.
    buf: Vec<u8>,
}

/// How a [`Copier::run`] ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ended {
    /// The work source ran dry and every chunk taken was written.
    Drained,
    /// The caller stopped; these (offset, len) ranges were taken and
    /// possibly read but never written.
    Stopped(Vec<(u64, u64)>),
}

/// What the caller says after a chunk was written or failed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Go on with the next chunk.
    Go,
    /// Copy the same chunk again (after a pause for its error).
    Retry,
}

impl Copier {
    /// Reads `offset..offset + len` of the view into `buf` (at least `len`
    /// bytes), run by run.
    fn read(
        &self,
        chain: &Chain,
        offset: u64,
        len: u64,
        buf: &mut [u8],
    ) -> Result<Vec<Segment>, CopyFailure> {
        let mut segments: Vec<Segment> = Vec::new();
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let extent = chain
                .block_status(self.view, self.base, at, len - done)
                .map_err(|e| ("read", e))?;
            let mut run = extent.len.max(1).min(len - done);
            let mut source = None;
            if extent.allocation == Allocation::Data {
                source = match extent.node {
                    Some(holder) => chain.host_range(holder, at, run).map_err(|e| ("read", e))?,
                    None => None,
                };
                match &source {
                    // The host copies it when it is written.
                    Some(range) => run = range.len,
                    None => {
                        // done + run <= len <= CHUNK: fits in usize.
                        let slice = &mut buf[done as usize..(done + run) as usize];
                        chain.read(self.view, at, slice).map_err(|e| ("read", e))?;
                    }
                }
            }
            let segment = Segment {
                offset: at,
                len: run,
                allocation: extent.allocation,
                source,
            };
            // Neighbouring runs of the same kind go out as one write.
            match segments.last_mut() {
                Some(last) if last.continued_by(&segment) => last.extend(&segment),
                _ => segments.push(segment),
            }
            done += run;
        }
        Ok(segments)
    }

    /// Writes what [`Copier::read`] found into the destination in
    /// `chains.dest`; returns the bytes copied (what the speed limit
    /// counts).
    fn write(
        &self,
        chains: Chains<'_>,
        offset: u64,
        segments: &[Segment],
        buf: &mut [u8],
    ) -> Result<u64, CopyFailure> {
        let chain = chains.dest;
        let mut copied = 0;
        for segment in segments {
            let mut segment = segment.clone();
            if let Some(source) = segment.source.take() {
                let placed = chain
                    .copy_into(self.dest, segment.offset, &source, self.overwrite)
                    .map_err(|e| ("write", e))?;
                copied += placed;
                if placed == segment.len {
                    continue;
                }
                // What the host could not place (the destination holds part
                // of it, a partial cluster) is read and written as bytes.
                segment.offset += placed;
                segment.len -= placed;
                let start = (segment.offset - offset) as usize;
                let slice = &mut buf[start..start + segment.len as usize];
                chains
                    .source
                    .read(self.view, segment.offset, slice)
                    .map_err(|e| ("read", e))?;
            }
            let start = (segment.offset - offset) as usize;
            let data = &buf[start..start + segment.len as usize];
            // With no base, a run nothing in the view's chain holds reads
            // as zeros; a destination that does not share that chain (a
            // mirror's target) must be made to read so too.
            let allocation = match segment.allocation {
                Allocation::Unallocated if self.overwrite && self.base.is_none() => {
                    Allocation::Zero
                }
                other => other,
            };
            copied += match (allocation, self.overwrite) {
                (Allocation::Unallocated, _) => 0,
                (Allocation::Zero, false) => {
                    chain
                        .populate(self.dest, segment.offset, segment.len, None)
                        .map_err(|e| ("write", e))?;
                    0
                }
                (Allocation::Zero, true) => {
                    chain
                        .zero_range(self.dest, segment.offset, segment.len)
                        .map_err(|e| ("write", e))?;
                    0
                }
                (Allocation::Data, false) => chain
                    .populate(self.dest, segment.offset, segment.len, Some(data))
                    .map_err(|e| ("write", e))?,
                (Allocation::Data, true) => {
                    // Where the destination holds nothing yet, populate
                    // allocates whole runs at once; only a run it already
                    // holds part of needs the overwriting write.
                    let filled = chain
                        .populate(self.dest, segment.offset, segment.len, Some(data))
                        .map_err(|e| ("write", e))?;
                    if filled < segment.len {
                        chain
                            .write(self.dest, segment.offset, data)
                            .map_err(|e| ("write", e))?;
                    }
                    segment.len
                }
            };
        }
        if copied > 0 {
            // Every job makes its destination durable before it ends: the
            // device writes this chunk while the next ones are copied.
            chain.start_writeback(self.dest).map_err(|e| ("write", e))?;
        }
        Ok(copied)
    }

    /// Copies `offset..offset + len` (at most [`CHUNK`] bytes) on the
    /// calling thread, from the view in `chains.source` into the
    /// destination in `chains.dest`; returns the bytes copied.
    pub(super) fn copy_between(
        &self,
        chains: Chains<'_>,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<u64, CopyFailure> {
        if buf.len() < len as usize {
            buf.resize(len as usize, 0);
        }
        let segments = self.read(chains.source, offset, len, buf)?;
        self.write(chains, offset, &segments, buf)
    }

    /// Copies the ranges `take` hands out (each at most [`CHUNK`] bytes;
    /// `None` when there is nothing left) until it runs dry or `before`
    /// (called on this thread before each chunk is written) says stop
    /// (`Ok(false)`) or fails. `after` hears each chunk's (offset, len,
    /// result) and says whether to copy it again; its error stops the run.
    pub(super) fn run<E, T, B, A>(
        &self,
        chain: &Chain,
        take: T,
        before: B,
        after: A,
    ) -> Result<Ended, E>
    where
        T: FnMut() -> Option<(u64, u64)> + Send,
        B: FnMut() -> Result<bool, E>,
        A: FnMut(u64, u64, Result<u64, CopyFailure>) -> Result<Next, E>,
    {
        self.run_between(Chains::same(chain), take, before, after)
    }

    /// [`Copier::run`] from the view in `chains.source` into the
    /// destination in `chains.dest`.
    pub(super) fn run_between<E, T, B, A>(
        &self,
        chains: Chains<'_>,
        take: T,
        before: B,
        after: A,
    ) -> Result<Ended, E>
    where
        T: FnMut() -> Option<(u64, u64)> + Send,
        B: FnMut() -> Result<bool, E>,
        A: FnMut(u64, u64, Result<u64, CopyFailure>) -> Result<Next, E>,
    {
        let writers = writer_count();
        let stop = AtomicBool::new(false);
        let (events, inbox) = channel::<Event>();
        let (to_writers, work) = channel::<Chunk>();
        let work = Mutex::new(work);
        // Buffers bound the chunks in flight: the reader takes one for
        // each chunk and blocks when all are out.
        let (to_reader, spare) = sync_channel::<Vec<u8>>(AHEAD + writers);
        for _ in 0..AHEAD + writers {
            let _ = to_reader.try_send(Vec::new());
        }
        std::thread::scope(|scope| {
            let (stop, work) = (&stop, &work);
            let reader_events = events.clone();
            scope.spawn(move || self.read_ahead(chains.source, take, stop, spare, reader_events));
            let spawn_writer = || {
                let events = events.clone();
                scope.spawn(move || self.write_queued(chains, work, events));
            };
            let mut dispatch = Dispatch {
                copier: self,
                chains,
                writers,
                spawned: 0,
                spawn_writer,
                to_writers,
                to_reader,
                waiting: VecDeque::new(),
                in_flight: Vec::new(),
                errors_heard: 0,
                read_all: false,
                before,
                after,
            };
            let ended = dispatch.drive(&inbox);
            stop.store(true, Ordering::Release);
            let Dispatch {
                to_writers,
                to_reader,
                mut waiting,
                ..
            } = dispatch;
            // Closing both ends the writers (no more work) and a reader
            // waiting for a buffer; every chunk still queued was not written.
            drop((events, to_writers, to_reader));
            for event in inbox.iter() {
                if let Event::Read(chunk) = event {
                    waiting.push_back(chunk);
                }
            }
            match ended {
                Ok(Ended::Stopped(_)) => Ok(Ended::Stopped(
                    waiting.iter().map(|c| (c.offset, c.len)).collect(),
                )),
                other => other,
            }
        })
    }

    /// The reader thread: reads each range `take` hands out into a spare
    /// buffer until it runs dry or `stop` is set.
    fn read_ahead<T>(
        &self,
        source: &Chain,
        mut take: T,
        stop: &AtomicBool,
        spare: Receiver<Vec<u8>>,
        events: Sender<Event>,
    ) where
        T: FnMut() -> Option<(u64, u64)>,
    {
        while !stop.load(Ordering::Acquire) {
            let Ok(mut buf) = spare.recv() else { break };
            if stop.load(Ordering::Acquire) {
                break;
            }
            let Some((offset, len)) = take() else { break };
            let len = len.min(CHUNK);
            // Each buffer is allocated and zeroed once per run.
            buf.resize(CHUNK as usize, 0);
            let read = self.read(source, offset, len, &mut buf);
            let chunk = Chunk {
                offset,
                len,
                read,
                buf,
            };
            if events.send(Event::Read(chunk)).is_err() {
                return;
            }
        }
        let _ = events.send(Event::ReadAll);
    }

    /// A writer thread: writes the chunks the dispatcher hands it until
    /// the work queue closes.
    fn write_queued(
        &self,
        chains: Chains<'_>,
        work: &Mutex<Receiver<Chunk>>,
        events: Sender<Event>,
    ) {
        loop {
            // The guard is dropped before the write: writers wait on the
            // queue one at a time but write together.
            let next = lock(work).recv();
            let Ok(mut chunk) = next else { return };
            let result = std::mem::replace(&mut chunk.read, Ok(Vec::new()))
                .and_then(|segments| self.write(chains, chunk.offset, &segments, &mut chunk.buf));
            if events.send(Event::Written(chunk, result)).is_err() {
                return;
            }
        }
    }
}

/// Chunk writes in flight at most. The format layer writes disjoint
/// clusters of one image in parallel (only allocation and publication take
/// its metadata lock), and where the host copies the data (tmpfs, or any
/// file system without shared extents) that copy is a kernel `memcpy` that
/// keeps one core busy: one writer per core keeps them all busy.
fn writer_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// What the job's thread hears from the reader and the writers.
enum Event {
    /// A chunk was read and waits to be written.
    Read(Chunk),
    /// The reader handed out its last chunk.
    ReadAll,
    /// A chunk was written (or failed); its buffer comes back.
    Written(Chunk, Result<u64, CopyFailure>),
}

/// The job's side of a run: hands chunks to the writers in the order they
/// were read, never two overlapping ones at once, so a range read again
/// (an active commit's re-copy after a guest write) always lands after
/// its earlier copy; calls `before` on each chunk it hands out and `after`
/// on each that comes back.
struct Dispatch<'c, 'a, B, A, S> {
    copier: &'c Copier,
    chains: Chains<'a>,
    /// At most this many writer threads.
    writers: usize,
    /// Writer threads started so far: one more only when every one is
    /// busy, so a run of a chunk or two (a live copy catching up with a
    /// guest write) starts one thread, not one per core.
    spawned: usize,
    spawn_writer: S,
    to_writers: Sender<Chunk>,
    to_reader: SyncSender<Vec<u8>>,
    /// Read, not yet handed out, oldest first.
    waiting: VecDeque<Chunk>,
    /// Handed out and not yet back: (offset, len, `errors_heard` when it
    /// was handed out).
    in_flight: Vec<(u64, u64, u64)>,
    /// Failed chunks `after` dealt with and went on from (its `on-error`
    /// paused the job until a resume, or let the failure go).
    errors_heard: u64,
    read_all: bool,
    before: B,
    after: A,
}

impl<B, A, S, E> Dispatch<'_, '_, B, A, S>
where
    B: FnMut() -> Result<bool, E>,
    A: FnMut(u64, u64, Result<u64, CopyFailure>) -> Result<Next, E>,
    S: FnMut(),
{
    /// Runs until every chunk is written, or the job stops: then waits for
    /// the chunks in flight (their `after` is still heard, and an error it
    /// returns wins over a plain stop).
    fn drive(&mut self, inbox: &Receiver<Event>) -> Result<Ended, E> {
        let mut ended = None;
        loop {
            if ended.is_none() {
                ended = self.hand_out();
            }
            if self.in_flight.is_empty() {
                match ended {
                    Some(ended) => return ended,
                    None if self.read_all && self.waiting.is_empty() => return Ok(Ended::Drained),
                    None => {}
                }
            }
            // Senders live as long as this loop needs them: the reader
            // until `ReadAll`, the writers until `to_writers` closes.
            let Ok(event) = inbox.recv() else {
                return ended.unwrap_or(Ok(Ended::Drained));
            };
            match event {
                Event::Read(chunk) => self.waiting.push_back(chunk),
                Event::ReadAll => self.read_all = true,
                Event::Written(chunk, result) => {
                    if let Err(err) = self.written(chunk, result) {
                        ended = Some(Err(err));
                    }
                }
            }
        }
    }

    /// Hands out the oldest chunks while a writer is free and they do not
    /// overlap a write in flight; `Some` once `before` says stop.
    fn hand_out(&mut self) -> Option<Result<Ended, E>> {
        while self.in_flight.len() < self.writers {
            let chunk = self.waiting.front()?;
            let (start, end) = (chunk.offset, chunk.offset + chunk.len);
            if self
                .in_flight
                .iter()
                .any(|&(offset, len, _)| offset < end && start < offset + len)
            {
                return None;
            }
            match (self.before)() {
                Ok(true) => {}
                Ok(false) => return Some(Ok(Ended::Stopped(Vec::new()))),
                Err(err) => return Some(Err(err)),
            }
            let chunk = self.waiting.pop_front()?;
            self.in_flight
                .push((chunk.offset, chunk.len, self.errors_heard));
            if self.in_flight.len() > self.spawned {
                (self.spawn_writer)();
                self.spawned += 1;
            }
            // The writers outlive this loop.
            let _ = self.to_writers.send(chunk);
        }
        None
    }

    /// Hears a chunk back: tells `after`, copies it again on this thread
    /// while `after` asks for it, and returns its buffer to the reader. A
    /// chunk that failed while `after` dealt with another one's failure
    /// (the job paused for it and was resumed) is first copied again
    /// without a word: its error is as stale as the other's, and must not
    /// pause the job a second time.
    fn written(&mut self, mut chunk: Chunk, mut result: Result<u64, CopyFailure>) -> Result<(), E> {
        let at = self
            .in_flight
            .iter()
            .position(|&(offset, len, _)| (offset, len) == (chunk.offset, chunk.len));
        let handed_out = at.map(|at| self.in_flight.swap_remove(at).2);
        if result.is_err() && handed_out.is_some_and(|heard| heard < self.errors_heard) {
            result = self
                .copier
                .copy_between(self.chains, chunk.offset, chunk.len, &mut chunk.buf);
        }
        let heard = loop {
            let failed = result.is_err();
            let next = (self.after)(chunk.offset, chunk.len, result);
            if failed && next.is_ok() {
                self.errors_heard += 1;
            }
            match next {
                Ok(Next::Go) => break Ok(()),
                Ok(Next::Retry) => {
                    // Nothing overlapping is in flight: this chunk was, so
                    // no later copy of its range was handed out.
                    result = self.copier.copy_between(
                        self.chains,
                        chunk.offset,
                        chunk.len,
                        &mut chunk.buf,
                    )
                }
                Err(err) => break Err(err),
            }
        };
        // A full pool means the reader has enough buffers.
        let _ = self.to_reader.try_send(chunk.buf);
        heard
    }
}

/// Walks the whole of `view` as its chain holds it above `base` (`None`:
/// down to the bottom), calling `f` on each run with its allocation: how
/// a job finds, before it copies, what it must copy or may skip.
pub(super) fn each_extent(
    chain: &Chain,
    view: NodeId,
    base: Option<NodeId>,
    mut f: impl FnMut(u64, u64, Allocation),
) -> Result<(), ChainError> {
    let size = chain.node(view).map_or(0, |n| n.virtual_size());
    let mut offset = 0;
    while offset < size {
        let extent = chain.block_status(view, base, offset, size - offset)?;
        let run = extent.len.max(1).min(size - offset);
        f(offset, run, extent.allocation);
        offset += run;
    }
    Ok(())
}

/// A linear walk over `0..size` in chunks, for [`Copier::run`]'s `take`.
pub(super) fn linear(size: u64) -> impl FnMut() -> Option<(u64, u64)> + Send {
    let mut next = 0;
    move || {
        (next < size).then(|| {
            let chunk = (next, CHUNK.min(size - next));
            next += chunk.1;
            chunk
        })
    }
}

#[cfg(test)]
mod tests;
