//! A commit whose base fills its disk: the base lives on a small tmpfs,
//! and each `on-error` policy does what QEMU's does. A failed commit leaves
//! every backing pointer as it was and the top's view unchanged; `stop`
//! then `resume` finishes once there is room.

mod common;

use std::path::PathBuf;

use common::mount::*;
use common::*;

const SIZE: u64 = 64 * MIB;

/// base.qcow2 (empty, on a tmpfs of 80 MiB that a 60 MiB filler leaves
/// too little room in) <- mid.qcow2 (64 MiB of data) <- top.qcow2 (active).
struct FullBase(FullTmpfs);

impl FullBase {
    /// The gate, then the chain on its full tmpfs; `None` when the gate
    /// or the tmpfs says to skip.
    fn build() -> Option<FullBase> {
        if !require_all(&[]) {
            return None;
        }
        let room = FullTmpfs::new()?;
        let base = room.small().join("base.qcow2");
        let mid = room.dir.path().join("mid.qcow2");
        let top = room.dir.path().join("top.qcow2");
        create_qcow2(path_str(&base), "64M", "");
        for (image, backing) in [(&mid, &base), (&top, &mid)] {
            create_overlay(image, (path_str(backing), "qcow2"), None, "");
        }
        qemu_io(&mid, "qcow2", &["write -P 0x4c 0 64M"]);
        room.fill();
        Some(FullBase(room))
    }

    /// Mounts the chain and starts `commit ARGS`.
    fn start(&self, args: &str) -> Mounted {
        let m = mount_default(&self.image("top.qcow2"), self.0.dir.path());
        command(&m, &format!("commit {args}")).unwrap();
        m
    }

    fn image(&self, name: &str) -> PathBuf {
        if name == "base.qcow2" {
            self.0.dir.path().join("small").join(name)
        } else {
            self.0.dir.path().join(name)
        }
    }

    /// After unmount: every image is consistent, the top shows what it
    /// showed, and its chain is `chain` (top first).
    fn check(&self, chain: &[&str]) {
        for name in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            common::qemu_img_check(&self.image(name));
        }
        let seen = qemu_chain_names(&self.image("top.qcow2"));
        assert_eq!(seen, chain);
        assert!(
            convert_to_raw(&self.image("top.qcow2")) == vec![0x4c; SIZE as usize],
            "the top's view changed"
        );
    }
}

fn actions(m: &Mounted) -> Vec<String> {
    events(m)
        .iter()
        .filter(|e| e["event"] == "BLOCK_JOB_ERROR")
        .map(|e| e["data"]["action"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn on_error_report_and_ignore_fail_the_commit_and_keep_every_backing_pointer() {
    for policy in ["report", "ignore"] {
        let Some(disk) = FullBase::build() else {
            return;
        };
        let m = disk.start(&format!("top=mid.qcow2 base=base.qcow2 on-error={policy}"));
        let job = wait_for(&m, "commit ends", |j| j.get("outcome").is_some());
        assert_eq!(job["outcome"], "failed", "{policy}: {job}");
        assert!(
            job["error"].as_str().unwrap().contains("No space left"),
            "{job}"
        );
        if policy == "ignore" {
            assert_eq!(job["offset"], job["len"], "ignore goes on to the end");
        }
        let seen = actions(&m);
        assert!(
            !seen.is_empty() && seen.iter().all(|a| a == policy),
            "{seen:?}"
        );
        m.unmount();
        disk.check(&["top.qcow2", "mid.qcow2", "base.qcow2"]);
    }
}

#[test]
fn on_error_stop_and_enospc_pause_and_resume_finishes_once_space_is_freed() {
    for policy in ["stop", "enospc"] {
        let Some(disk) = FullBase::build() else {
            return;
        };
        let m = disk.start(&format!("top=mid.qcow2 base=base.qcow2 on-error={policy}"));
        let job = wait_for(&m, "commit pauses", |j| j["status"] == "paused");
        assert!(
            job["error"].as_str().unwrap().contains("No space left"),
            "{job}"
        );
        assert_eq!(actions(&m)[0], "stop");
        std::fs::remove_file(&disk.0.filler).unwrap();
        command(&m, "resume").unwrap();
        let job = wait_for(&m, "commit completes", |j| j.get("outcome").is_some());
        assert_eq!(job["outcome"], "completed", "{policy}: {job}");
        m.unmount();
        disk.check(&["top.qcow2", "base.qcow2"]);
    }
}

#[test]
fn an_active_commit_stopped_by_a_full_base_resumes_to_ready_and_pivots() {
    let Some(disk) = FullBase::build() else {
        return;
    };
    let m = disk.start("top=active base=base.qcow2 on-error=stop");
    let job = wait_for(&m, "commit pauses", |j| j["status"] == "paused");
    assert!(
        job["error"].as_str().unwrap().contains("No space left"),
        "{job}"
    );
    std::fs::remove_file(&disk.0.filler).unwrap();
    command(&m, "resume").unwrap();
    wait_for(&m, "commit ready", |j| j["status"] == "ready");
    command(&m, "complete").unwrap();
    let job = wait_for(&m, "commit completes", |j| j.get("outcome").is_some());
    assert_eq!(job["outcome"], "completed", "{job}");
    assert!(read_all(&m.path("active")) == vec![0x4c; SIZE as usize]);
    m.unmount();
    common::qemu_img_check(&disk.image("base.qcow2"));
    assert!(convert_to_raw(&disk.image("base.qcow2")) == vec![0x4c; SIZE as usize]);
}
