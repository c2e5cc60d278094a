//! The `ctl/` directory: writes to `command` go to the jobs layer; the other
//! files show text rendered by it. Every ctl file is opened with direct I/O,
//! so a reader always gets what was rendered at its own open.

use super::errno::FsError;
use super::inode::CtlFile;
use crate::jobs::Jobs;

/// The content a new open of `file` shows (empty for `command`).
pub fn render(jobs: &Jobs, file: CtlFile) -> Vec<u8> {
    let text = match file {
        CtlFile::Command => String::new(),
        CtlFile::Status => jobs.status_text(),
        CtlFile::StatusJson => jobs.status_json(),
        CtlFile::Events => jobs.events_text(),
        CtlFile::Chain => jobs.chain_text(),
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

/// One write to `ctl/command`: the whole write is one command, wherever the
/// file offset stands (a shell reusing the descriptor writes at a later
/// offset). Accepted: the full length; refused: the jobs layer's errno.
pub fn command(jobs: &Jobs, data: &[u8]) -> Result<usize, FsError> {
    jobs.command_bytes(data)?;
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
