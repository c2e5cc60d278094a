//! A stream that fills the disk: the top image lives on a small tmpfs, and
//! each `on-error` policy does what QEMU's does. No acknowledged write is
//! lost, and a failed stream leaves the backing pointer as it was.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use common::mount::*;
use common::*;

const SIZE: u64 = 64 * MIB;

/// base.img (64 MiB of data, on the real disk) <- top.qcow2 on a tmpfs of
/// 80 MiB that a 60 MiB filler leaves too little room in.
struct FullDisk(FullTmpfs);

impl FullDisk {
    /// The gate, then the chain with its top on a full tmpfs; `None` when
    /// the gate or the tmpfs says to skip.
    fn build() -> Option<FullDisk> {
        if !require_all(&[]) {
            return None;
        }
        let room = FullTmpfs::new()?;
        let base = room.dir.path().join("base.img");
        qemu_img(&["create", "-q", "-f", "raw", path_str(&base), "64M"]);
        qemu_io(&base, "raw", &["write -P 0x3b 0 64M"]);
        let top = room.small().join("top.qcow2");
        create_overlay(&top, (path_str(&base), "raw"), Some("64M"), "");
        room.fill();
        Some(FullDisk(room))
    }

    fn top(&self) -> PathBuf {
        self.0.dir.path().join("small/top.qcow2")
    }

    fn mount(&self) -> Mounted {
        mount_default(&self.top(), self.0.dir.path())
    }

    /// Mounts, writes 4 KiB through `active` (acknowledged before the disk
    /// fills), and starts the stream.
    fn start(&self, policy: &str) -> Mounted {
        let m = self.mount();
        let active = OpenOptions::new()
            .write(true)
            .open(m.path("active"))
            .unwrap();
        active.write_all_at(&[0x99; 4096], 1 << 20).unwrap();
        command(&m, &format!("stream on-error={policy}")).unwrap();
        m
    }

    /// After unmount: the image is consistent and shows what it showed,
    /// with the acknowledged write.
    fn check(&self, streamed: bool) {
        common::qemu_img_check(&self.top());
        let info = common::qemu_img(&["info", "-U", "--output=json", path_str(&self.top())]);
        assert_eq!(!info.contains("backing-filename"), streamed, "{info}");
        let mut want = vec![0x3b; SIZE as usize];
        want[1 << 20..(1 << 20) + 4096].fill(0x99);
        assert!(convert_to_raw(&self.top()) == want, "content changed");
    }
}

#[test]
fn on_error_report_fails_the_job_with_enospc_and_keeps_the_backing_pointer() {
    let Some(disk) = FullDisk::build() else {
        return;
    };
    let m = disk.start("report");
    let job = wait_for(&m, "stream fails", |j| j.get("outcome").is_some());
    assert_eq!(job["outcome"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("No space left"), "{job}");
    // The message names the image, what chainfs was doing there and where.
    assert!(
        error.contains("top.qcow2: cannot ") && error.contains(" at 0x"),
        "{job}"
    );
    let errors = events_named(&m, "BLOCK_JOB_ERROR");
    assert_eq!(errors[0]["data"]["action"], "report", "{errors:?}");
    let completed = events_named(&m, "BLOCK_JOB_COMPLETED");
    assert!(completed[0]["data"]["error"]
        .as_str()
        .unwrap()
        .contains("No space"));
    m.unmount();
    disk.check(false);
}

#[test]
fn on_error_stop_and_enospc_pause_and_resume_finishes_once_space_is_freed() {
    for policy in ["stop", "enospc"] {
        let Some(disk) = FullDisk::build() else {
            return;
        };
        let m = disk.start(policy);
        let job = wait_for(&m, "stream pauses", |j| j["status"] == "paused");
        assert!(
            job["error"].as_str().unwrap().contains("No space left"),
            "{policy}: {job}"
        );
        assert_eq!(
            events_named(&m, "BLOCK_JOB_ERROR")[0]["data"]["action"],
            "stop"
        );
        std::fs::remove_file(&disk.0.filler).unwrap();
        command(&m, "resume").unwrap();
        let job = wait_for(&m, "stream completes", |j| j.get("outcome").is_some());
        assert_eq!(job["outcome"], "completed", "{policy}: {job}");
        assert_eq!(job["offset"], job["len"]);
        m.unmount();
        disk.check(true);
    }
}

#[test]
fn on_error_ignore_runs_to_the_end_and_ends_failed_with_the_backing_unchanged() {
    let Some(disk) = FullDisk::build() else {
        return;
    };
    let m = disk.start("ignore");
    let job = wait_for(&m, "stream ends", |j| j.get("outcome").is_some());
    assert_eq!(job["outcome"], "failed", "{job}");
    assert_eq!(job["offset"], job["len"], "ignore goes on to the end");
    assert!(events_named(&m, "BLOCK_JOB_ERROR")
        .iter()
        .all(|e| e["data"]["action"] == "ignore"));
    m.unmount();
    disk.check(false);
}
