//! The `ctl/` directory: writes to `command` go to the jobs layer; the other
//! files show text rendered by it. Every ctl file is opened with direct I/O,
//! so a reader always gets what was rendered at its own open.
//!
//! What one open costs is bounded: an open keeps a reference to a shared
//! rendering, not a copy of its own. Every open that finds the text as the
//! previous open of that file left it shares that open's rendering, so a
//! thousand opens of `ctl/events` between two events hold one copy of the
//! log, not a thousand (another user of an `--allow-other` mount could
//! otherwise grow the daemon by the log's size per descriptor it holds).

use std::collections::HashMap;

use super::errno::FsError;
use super::inode::CtlFile;
use crate::jobs::Jobs;
use crate::sync::{lock, Arc, Mutex};

/// The latest rendering of each ctl file, shared by the opens that saw it.
#[derive(Debug, Default)]
pub struct Renderings {
    latest: Mutex<HashMap<CtlFile, Arc<[u8]>>>,
}

impl Renderings {
    /// The content a new open of `file` shows (empty for `command`): the
    /// rendering kept from an earlier open when the text is unchanged, else
    /// a new one that later opens will share.
    pub fn open(&self, jobs: &Jobs, file: CtlFile) -> Arc<[u8]> {
        // Rendered outside the lock: the fresh text is only compared and,
        // if unchanged, dropped again at once.
        let fresh = render(jobs, file);
        let mut latest = lock(&self.latest);
        match latest.get(&file) {
            Some(kept) if **kept == *fresh => Arc::clone(kept),
            _ => {
                let shared: Arc<[u8]> = Arc::from(fresh);
                latest.insert(file, Arc::clone(&shared));
                shared
            }
        }
    }
}

/// What a new open of `file` shows now (empty for `command`).
fn render(jobs: &Jobs, file: CtlFile) -> Vec<u8> {
    let text = match file {
        CtlFile::Command => String::new(),
        CtlFile::Status => jobs.status_text(),
        CtlFile::StatusJson => jobs.status_json(),
        CtlFile::Events => jobs.events_text(),
        CtlFile::Chain => jobs.chain_text(),
        CtlFile::Bitmaps => crate::jobs::bitmaps::bitmaps_text(&jobs.chain()),
        CtlFile::BitmapsJson => crate::jobs::bitmaps::bitmaps_json(&jobs.chain()),
    };
    text.into_bytes()
}

/// Serves a read of `len` bytes at `offset` from a rendered `buffer`.
pub fn read(buffer: &[u8], offset: u64, len: u32) -> &[u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(buffer.len());
    let end = start.saturating_add(len as usize).min(buffer.len());
    &buffer[start..end]
}

/// What one open of `ctl/command` remembers between its writes.
#[derive(Debug, Default)]
pub struct CommandWrites {
    /// Where the last write this open had refused ended: a write starting
    /// there is the kernel's next piece of the same `write(2)`.
    refused_end: Mutex<Option<u64>>,
}

/// One write to `ctl/command`: the whole write is one command, wherever the
/// file offset stands (a shell reusing the descriptor, `exec 3>command;
/// echo a >&3; echo b >&3`, writes the second command at a later offset).
///
/// The kernel splits a `write(2)` longer than a FUSE request into pieces at
/// growing offsets. The first is longer than a command may be, so the jobs
/// layer refuses it (EINVAL, logged as any refusal); every piece that
/// starts where a refused write ended is refused here without reaching the
/// jobs layer, so no part of such a write runs. A refused write leaves the
/// file offset where it was, so the next command on the descriptor starts
/// there, not at the refused write's end. Accepted: the full length;
/// refused: the errno of this rule or of the jobs layer.
pub fn command(
    jobs: &Jobs,
    writes: &CommandWrites,
    offset: u64,
    data: &[u8],
) -> Result<usize, FsError> {
    let end = offset.saturating_add(data.len() as u64);
    let continues_refused = offset != 0 && *lock(&writes.refused_end) == Some(offset);
    if continues_refused {
        *lock(&writes.refused_end) = Some(end);
        log::info!(
            "ctl/command: {} bytes at offset {offset} refused: the rest of a refused write",
            data.len()
        );
        return Err(FsError::Invalid {
            reason: "the rest of a refused command",
        });
    }
    let result = jobs.command_bytes(data);
    *lock(&writes.refused_end) = result.is_err().then_some(end);
    result?;
    Ok(data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_of_a_buffer_stop_at_its_end() {
        let buffer = b"hello\n";
        assert_eq!(read(buffer, 0, 100), b"hello\n");
        assert_eq!(read(buffer, 4, 100), b"o\n");
        assert_eq!(read(buffer, 6, 100), b"");
        assert_eq!(read(buffer, u64::MAX, 100), b"");
        assert_eq!(read(buffer, 1, 2), b"el");
    }
}
