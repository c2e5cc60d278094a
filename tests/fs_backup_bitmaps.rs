//! Backups with dirty bitmaps through a real mount, the scenarios of
//! qemu-iotests 124 and 257: an incremental chain (a full backup anchoring
//! a bitmap, an empty incremental, rounds of writes each followed by an
//! incremental into a qcow2 backed by the previous backup), a failure in
//! the middle of one (the target on a full tmpfs), and what the bitmap
//! holds afterwards for every `bitmap-mode`, outcome and sync, against a
//! model of its granules.

mod common;

use std::collections::BTreeSet;

use common::backup::*;
use common::bitmaps::{dirty_bytes, listed_one};
use common::mirror::assert_good_copy;
use common::mount::*;
use common::*;

/// Writes `ranges` through `file` (a pattern per range) and into `model`.
fn write_ranges(file: &std::fs::File, model: &mut [u8], ranges: &[(u64, u64)], seed: u64) {
    for &(offset, len) in ranges {
        write_model(file, model, offset, &pattern(seed, offset, len as usize));
    }
}

#[test]
fn an_incremental_chain_reads_as_the_disk_at_each_backups_start() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let dir = five.dir.path();
    let m = five.mount();
    let active = open_rw(&m, "active");
    command(&m, "bitmap-add node=active name=b0").unwrap();
    let mut model = read_all(&m.path("active"));
    let mut expected = vec![(dir.join("full.qcow2"), model.clone())];
    let words = "target=full.qcow2 sync=full bitmap=b0 bitmap-mode=on-success";
    assert_eq!(backup_to_end(&m, words, "full")["outcome"], "completed");
    assert_eq!(dirty_bytes(&m.mnt, "file-E.img", "b0"), 0, "anchored");
    let rounds: [&[(u64, u64)]; 4] = [
        &[],
        &[(0, 4096), (5 << 20, 200_000), (40 << 20, 1 << 20)],
        &[(100, 1), (5 << 20, 4096), (33 << 20, 3 << 20)],
        &[(63 << 20, 1 << 20), (12 << 20, 70_000)],
    ];
    let mut carried: Vec<(u64, u64)> = Vec::new();
    for (round, writes) in rounds.iter().enumerate() {
        write_ranges(&active, &mut model, writes, round as u64);
        if round == 3 {
            // Discards and write-zeroes must become zeros over the
            // previous backup's data.
            punch_hole(&active, 40 << 20, 1 << 20).unwrap();
            model[40 << 20..41 << 20].fill(0);
            zero_range(&active, 33 << 20, 4096).unwrap();
            model[33 << 20..(33 << 20) + 4096].fill(0);
        }
        // What the previous incremental's job saw written is dirty too.
        let mut granules_written: Vec<(u64, u64)> = writes.to_vec();
        granules_written.extend_from_slice(&carried);
        if round == 3 {
            granules_written.extend([(40 << 20, 1 << 20), (33 << 20, 4096)]);
        }
        let dirty = granules(&granules_written);
        assert_eq!(dirty_bytes(&m.mnt, "file-E.img", "b0"), count(&dirty));
        let previous = &expected[expected.len() - 1].0;
        let target = dir.join(format!("inc{round}.qcow2"));
        incremental_target(&target, previous, 64);
        let id = format!("inc{round}");
        let words = format!(
            "target={} sync=incremental bitmap=b0 mode=existing speed=2M",
            path_str(&target)
        );
        start_backup(&m, &format!("id={id} {words}"));
        let at_start = model.clone();
        // Written while the incremental runs: for the next one.
        let during = [(5 << 20, 4096), (20 << 20, 100)];
        write_ranges(&active, &mut model, &during, 10 + round as u64);
        // An empty incremental may have ended already.
        let _ = command(&m, &format!("set-speed id={id} speed=0"));
        let job = wait_outcome(&m, &id);
        assert_eq!(job["outcome"], "completed", "{job}");
        assert!(
            job["len"].as_u64().unwrap() <= count(&dirty),
            "copied more than the bitmap: {job}"
        );
        assert_eq!(
            dirty_bytes(&m.mnt, "file-E.img", "b0"),
            count(&granules(&during)),
            "on success the bitmap holds what was written during the job"
        );
        expected.push((target, at_start));
        carried = during.to_vec();
    }
    drop(active);
    m.unmount();
    for (image, content) in &expected {
        assert_good_copy(image, content);
    }
    qemu_img_check(&five.top());
}

/// A one-image disk of 8 MiB with data in 0..2M and 5M..6M, mounted.
struct Disk {
    dir: tempfile::TempDir,
    m: Mounted,
}

impl Disk {
    /// The disk, and a tmpfs of 1 MiB in `tiny/` to fill up.
    fn with_tiny() -> Option<(Disk, Tmpfs)> {
        if !require_all(&[]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let tiny = Tmpfs::mount(&dir.path().join("tiny"), 1)?;
        let writes = ["write -P 0x11 0 2M", "write -P 0x12 5M 1M"];
        let top = disk(dir.path(), 8, &writes);
        let m = mount_default(&top, dir.path());
        Some((Disk { dir, m }, tiny))
    }
}

#[test]
fn a_failed_incremental_keeps_the_bits_and_the_next_one_is_still_right() {
    let Some((d, tiny)) = Disk::with_tiny() else {
        return;
    };
    let m = &d.m;
    let active = open_rw(m, "active");
    command(m, "bitmap-add node=active name=b0").unwrap();
    let full = d.dir.path().join("full.qcow2");
    let words = format!(
        "target={} sync=full bitmap=b0 bitmap-mode=on-success",
        path_str(&full)
    );
    assert_eq!(backup_to_end(m, &words, "full")["outcome"], "completed");
    let mut model = read_all(&m.path("active"));
    let w1 = [(0, 3 << 20)];
    write_ranges(&active, &mut model, &w1, 1);
    let bad = d.dir.path().join("tiny/inc.qcow2");
    incremental_target(&bad, &full, 8);
    fill_up(tiny.path());
    let words = format!(
        "target={} sync=incremental bitmap=b0 mode=existing on-error=stop",
        path_str(&bad)
    );
    command(m, &format!("backup id=bad {words}")).unwrap();
    let job = wait_job(m, "bad", |job| job["status"] == "paused");
    assert!(job["error"].as_str().unwrap().contains("space"), "{job}");
    assert_eq!(listed_one(&m.mnt, "disk.qcow2", "b0")["busy"], true);
    // Its copy before write fails: the write goes on, the job fails.
    let w2 = [(2 << 20, 65536), (7 << 20, 100)];
    write_ranges(&active, &mut model, &w2, 2);
    command(m, "resume id=bad").unwrap();
    let job = wait_outcome(m, "bad");
    assert_eq!(job["outcome"], "failed", "{job}");
    let errors = events_named(m, "BLOCK_JOB_ERROR");
    assert!(errors.len() >= 2, "{errors:?}");
    let kept: BTreeSet<u64> = granules(&w1).union(&granules(&w2)).copied().collect();
    assert_eq!(dirty_bytes(&m.mnt, "disk.qcow2", "b0"), count(&kept));
    assert_eq!(listed_one(&m.mnt, "disk.qcow2", "b0")["busy"], false);
    let good = d.dir.path().join("inc.qcow2");
    incremental_target(&good, &full, 8);
    let words = format!(
        "target={} sync=incremental bitmap=b0 mode=existing",
        path_str(&good)
    );
    assert_eq!(backup_to_end(m, &words, "good")["outcome"], "completed");
    drop(active);
    d.m.unmount();
    assert_good_copy(&good, &model);
    qemu_img_check(&d.dir.path().join("disk.qcow2"));
    // Cut short by ENOSPC, it may leak clusters, never lose consistency.
    qemu_img_check_allowing_leaks(&bad);
    drop(tiny);
}

/// How a case of the bitmap matrix ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    Success,
    Cancel,
    Error,
}

#[test]
fn bitmap_modes_leave_the_bits_qemu_leaves_for_every_outcome_and_sync() {
    let Some((d, tiny)) = Disk::with_tiny() else {
        return;
    };
    let m = &d.m;
    let active = open_rw(m, "active");
    let mut model = read_all(&m.path("active"));
    // Three separate runs of clusters: a backup copies two at once, so
    // the speed limit always holds the third back (see below).
    let w0 = [(1 << 20, 100_000), (6 << 20, 4096), (7 << 20, 65536)];
    let w1 = [(3 << 20, 4096), ((5 << 20) + 10, 1)];
    let mut case = 0;
    for sync in ["bitmap", "full"] {
        for mode in ["on-success", "always", "never"] {
            if sync == "full" && mode == "never" {
                continue;
            }
            for end in [End::Success, End::Cancel, End::Error] {
                case += 1;
                let name = format!("b{case}");
                command(m, &format!("bitmap-add node=active name={name}")).unwrap();
                write_ranges(&active, &mut model, &w0, case);
                // A failing target: existing, on a full tmpfs.
                let (target, existing) = match end {
                    End::Success => (d.dir.path().join(format!("t{case}.qcow2")), ""),
                    _ => {
                        let target = tiny.path().join("t.qcow2");
                        qemu_img(&["create", "-q", "-f", "qcow2", path_str(&target), "8M"]);
                        fill_up(tiny.path());
                        (target, "mode=existing")
                    }
                };
                let on_error = if end == End::Cancel { "stop" } else { "report" };
                let words = format!(
                    "target={} sync={sync} bitmap={name} bitmap-mode={mode} \
                     on-error={on_error} {existing}",
                    path_str(&target)
                );
                let id = format!("j{case}");
                // Slow enough that the pause of a successful case always
                // finds it running: the first two runs copied (a pair)
                // buy seconds before the third.
                command(m, &format!("backup id={id} speed=64K {words}")).unwrap();
                let outcome = run_case(m, &id, end, || {
                    write_ranges(&active, &mut model, &w1, 100 + case)
                });
                let what = format!("sync={sync} bitmap-mode={mode} {end:?}");
                assert_eq!(outcome, expected_outcome(end), "{what}");
                let (w0g, w1g) = (granules(&w0), granules(&w1));
                // Nothing was copied: an existing target of a full backup
                // gets every cluster, zeros included.
                let uncopied = if sync == "full" {
                    granules(&[(0, 8 << 20)])
                } else {
                    w0g.clone()
                };
                let want: BTreeSet<u64> = match (mode, end) {
                    ("never", _) | ("on-success", End::Cancel | End::Error) => {
                        w0g.union(&w1g).copied().collect()
                    }
                    (_, End::Success) => w1g,
                    _ => uncopied.union(&w1g).copied().collect(),
                };
                assert_eq!(
                    dirty_bytes(&m.mnt, "disk.qcow2", &name),
                    count(&want),
                    "{what}"
                );
                command(m, &format!("bitmap-remove node=active name={name}")).unwrap();
                if end == End::Success {
                    qemu_img_check(&target);
                } else {
                    qemu_img_check_allowing_leaks(&target);
                    std::fs::remove_file(&target).unwrap();
                    free_up(tiny.path());
                }
            }
        }
    }
    drop(active);
    d.m.unmount();
    qemu_img_check(&d.dir.path().join("disk.qcow2"));
}

fn expected_outcome(end: End) -> &'static str {
    match end {
        End::Success => "completed",
        End::Cancel => "cancelled",
        End::Error => "failed",
    }
}

/// Drives job `id` to `end`, calling `write` while it runs (success and
/// cancel) or after it failed (error); returns its outcome.
fn run_case(m: &Mounted, id: &str, end: End, write: impl FnOnce()) -> String {
    match end {
        End::Success => {
            command(m, &format!("pause id={id}")).unwrap();
            write();
            command(m, &format!("resume id={id}")).unwrap();
            command(m, &format!("set-speed id={id} speed=0")).unwrap();
        }
        End::Cancel => {
            // Paused by its first failed copy: nothing was copied.
            wait_job(m, id, |job| job["status"] == "paused");
            write();
            command(m, &format!("cancel id={id}")).unwrap();
        }
        End::Error => {
            wait_outcome(m, id);
            write();
        }
    }
    wait_outcome(m, id)["outcome"].as_str().unwrap().to_string()
}
