//! The backup tests' own helpers: write-zeroes through the mount, a
//! one-image disk with known data, incremental targets made by
//! `qemu-img create -b`, and the model of a dirty bitmap's granules.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::mount::{command, read_all, wait_outcome, Mounted};
use super::tools::{path_str, qemu_img, qemu_io};

/// Bytes per granule of the bitmaps the tests add (and per cluster of
/// what a backup copies).
pub const GRANULE: u64 = 64 << 10;

/// `fallocate(ZERO_RANGE | KEEP_SIZE)` of `len` bytes at `offset`: a
/// write-zeroes.
pub fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    super::mount::fallocate(file, mode, offset, len)
}

/// `dir/disk.qcow2` of `mib` MiB, no backing file, with `writes` (qemu-io
/// commands) done by QEMU.
pub fn disk(dir: &Path, mib: u64, writes: &[&str]) -> PathBuf {
    let path = dir.join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path_str(&path),
        &format!("{mib}M"),
    ]);
    qemu_io(&path, "qcow2", writes);
    path
}

/// Creates `path`, a qcow2 of `mib` MiB backed by the qcow2 `backing`: an
/// incremental backup's target.
pub fn incremental_target(path: &Path, backing: &Path, mib: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        path_str(backing),
        "-F",
        "qcow2",
        path_str(path),
        &format!("{mib}M"),
    ]);
}

/// Runs `backup … id=ID` to its end; returns the job as `ctl/status.json`
/// shows it then.
pub fn backup_to_end(m: &Mounted, words: &str, id: &str) -> serde_json::Value {
    start_backup(m, &format!("id={id} {words}"));
    wait_outcome(m, id)
}

/// Starts `backup WORDS`; a refusal panics with the reason `ctl/status`
/// gives.
pub fn start_backup(m: &Mounted, words: &str) {
    if let Err(errno) = command(m, &format!("backup {words}")) {
        let status = read_all(&m.path("ctl/status"));
        panic!(
            "backup {words}: errno {errno}: {}",
            String::from_utf8_lossy(&status)
        );
    }
}

/// Fills the file system holding `dir` to its last page with
/// `dir/filler`, so that the next write there fails with ENOSPC.
pub fn fill_up(dir: &Path) {
    use std::io::Write;
    let mut filler = File::create(dir.join("filler")).unwrap();
    for size in [1 << 16, 4096, 512] {
        while filler.write_all(&vec![0xf1; size]).is_ok() {}
    }
}

/// Gives back the room [`fill_up`] took.
pub fn free_up(dir: &Path) {
    std::fs::remove_file(dir.join("filler")).unwrap();
}

/// The granules `ranges` (offset, length) touch: a model of a bitmap.
pub fn granules(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|&(offset, len)| offset / GRANULE..(offset + len).div_ceil(GRANULE))
        .collect()
}

/// The dirty bytes a bitmap of the granules `model` counts.
pub fn count(model: &BTreeSet<u64>) -> u64 {
    model.len() as u64 * GRANULE
}
