//! The copier that stream, commit (intermediate and active) and mirror
//! share: it reads the next chunks on a reader thread while the job's own
//! thread writes the last one, with a bounded number of chunks in flight.
//!
//! Why a reader and a writer: a chunk's read (the chain below, or the top)
//! and its write (the node receiving it) touch different images, so on two
//! cores they overlap; the writes into one image serialise on its metadata
//! lock anyway, so more writers would only queue.
//!
//! What stays as it was with one chunk at a time:
//! * chunks are written in the order they were read, by one thread, so a
//!   later read of a range (an active commit's re-copy after a guest write)
//!   always lands after an earlier one;
//! * the job's thread calls [`Job::checkpoint`](super::job::Job) before
//!   each chunk it writes and `advance` after it, so pause, cancel and the
//!   speed limit act within one chunk, and the offset only moves there;
//! * a failed chunk goes to the caller, which may retry it (`stop`, then
//!   `resume`): the retry reads and writes it again on the job's thread;
//! * when the caller stops early, every chunk read but not written is
//!   handed back ([`Ended::Stopped`]), so an active commit marks it dirty
//!   again.
//!
//! Data that a node keeps as it is in a host file (raw, or uncompressed
//! qcow2 clusters) is not read at all: the writer has the kernel copy it
//! ([`Chain::copy_into`], `copy_file_range`), which moves it once instead
//! of twice through user space, and on XFS or btrfs shares its extents.
//! The mapping is taken without holding the source's clusters: a source
//! below the active node never changes, and an active source's changes
//! are tracked and copied again, so a copy that raced a free is
//! overwritten before the job can be `ready`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use crate::chain::{Allocation, Chain, ChainError, HostRange, NodeId};

/// Bytes per chunk: QEMU's block-copy uses up to 1 MiB per request.
pub(super) const CHUNK: u64 = 1 << 20;

/// Chunks read ahead of the one being written. Two cores gain from one
/// read overlapping one write; a few more absorb uneven chunk costs
/// without holding much memory (each is at most [`CHUNK`]).
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
        mut before: B,
        mut after: A,
    ) -> Result<Ended, E>
    where
        T: FnMut() -> Option<(u64, u64)> + Send,
        B: FnMut() -> Result<bool, E>,
        A: FnMut(u64, u64, Result<u64, CopyFailure>) -> Result<Next, E>,
    {
        let stop = AtomicBool::new(false);
        let (to_writer, chunks) = sync_channel::<Chunk>(AHEAD);
        let (to_reader, spare) = sync_channel::<Vec<u8>>(AHEAD + 2);
        std::thread::scope(|scope| {
            let stop = &stop;
            scope.spawn(move || {
                let mut take = take;
                while !stop.load(Ordering::Acquire) {
                    let Some((offset, len)) = take() else { break };
                    let len = len.min(CHUNK);
                    // Buffers come back from the writer: each is allocated
                    // and zeroed once per run, not once per chunk.
                    let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0; CHUNK as usize]);
                    let read = self.read(chains.source, offset, len, &mut buf);
                    let chunk = Chunk {
                        offset,
                        len,
                        read,
                        buf,
                    };
                    if to_writer.send(chunk).is_err() {
                        break;
                    }
                }
            });
            let mut unwritten = Vec::new();
            let ended = 'chunks: loop {
                let Ok(chunk) = chunks.recv() else {
                    break Ok(Ended::Drained);
                };
                match before() {
                    Ok(true) => {}
                    Ok(false) => {
                        unwritten.push((chunk.offset, chunk.len));
                        break Ok(Ended::Stopped(Vec::new()));
                    }
                    Err(err) => break Err(err),
                }
                let Chunk {
                    offset,
                    len,
                    read,
                    mut buf,
                } = chunk;
                let mut result = read.and_then(|s| self.write(chains, offset, &s, &mut buf));
                loop {
                    match after(offset, len, result) {
                        Ok(Next::Go) => break,
                        Ok(Next::Retry) => {
                            result = self.copy_between(chains, offset, len, &mut buf)
                        }
                        Err(err) => break 'chunks Err(err),
                    }
                }
                // A full pool means the reader has enough buffers.
                let _ = to_reader.try_send(buf);
            };
            stop.store(true, Ordering::Release);
            // Receiving unblocks a reader waiting to send; it then sees
            // `stop` and leaves, which ends this loop.
            unwritten.extend(chunks.iter().map(|c| (c.offset, c.len)));
            match ended {
                Ok(Ended::Stopped(_)) => Ok(Ended::Stopped(unwritten)),
                other => other,
            }
        })
    }
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
