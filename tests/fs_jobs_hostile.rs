//! Jobs driven through a real mount the way a hostile or careless user
//! would (issue 13): a `pause` as a stream finishes, a `cancel` of a paused
//! stream, a snapshot target inside the mount (directly, through a symlink,
//! relative, through a bind mount), a relative snapshot target. Every
//! command that could hang runs on its own thread with a bound: a test that
//! would hang fails instead, after detaching the mount.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use common::mount::*;
use common::*;

/// How long a command may take before the test calls it hung.
const HANG: Duration = Duration::from_secs(30);

/// Writes `text` to `ctl/command` on a thread and waits at most [`HANG`].
/// On a hang the FUSE connection is aborted (so the blocked writer returns
/// and the test process can exit), the mount detached and leaked (its
/// serving thread is stuck and could never be joined), and the test fails.
fn bounded_command(m: Mounted, text: &str) -> (Mounted, Result<(), i32>) {
    // Taken before the command: a hung daemon may not answer a stat.
    let device = std::fs::metadata(&m.mnt).unwrap().dev();
    let (sender, receiver) = mpsc::channel();
    let (mnt, owned) = (m.mnt.clone(), text.to_string());
    std::thread::spawn(move || {
        let _ = sender.send(command_at(&mnt, &owned));
    });
    match receiver.recv_timeout(HANG) {
        Ok(result) => (m, result),
        Err(_) => {
            abort_connection(device);
            let _ = std::process::Command::new("umount")
                .args(["-l", path_str(&m.mnt)])
                .status();
            std::mem::forget(m);
            panic!("{text:?} did not return within {HANG:?}: the daemon hangs");
        }
    }
}

/// Aborts the FUSE connection of the mount whose files have `device`
/// through the fusectl file system (mounted if it is not).
fn abort_connection(device: u64) {
    let connections = Path::new("/sys/fs/fuse/connections");
    let abort = connections.join(format!("{}/abort", libc::minor(device)));
    if !abort.exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none", path_str(connections)])
            .status();
    }
    if let Err(error) = std::fs::write(&abort, "1") {
        eprintln!("cannot abort the hung mount ({}): {error}", abort.display());
    }
}

/// base.qcow2 (64 MiB, `write` applied) <- top.qcow2, in `dir`.
fn chain(dir: &Path, write: &str) -> PathBuf {
    common::chain::base_and_overlay(dir, "base.qcow2", "64M", &[write])
}

fn last_event(m: &Mounted) -> serde_json::Value {
    events(m).pop().unwrap()
}

#[test]
fn a_pause_after_the_last_checkpoint_returns_and_the_stream_completes() {
    // Only the last MiB holds data: the scan reaches the end at once, then
    // the speed limit holds the job after its last pause point.
    let Some(Fixture { dir: _dir, top, m }) = mounted(&[], |d| chain(d, "write -P 0x99 63M 1M"))
    else {
        return;
    };
    command(&m, "stream speed=64K").unwrap();
    wait_for(&m, "the scan reaches the end", |job| {
        job["offset"] == job["len"]
    });
    let (m, paused) = bounded_command(m, "pause");
    assert_eq!(paused, Ok(()));
    let job = wait_for(&m, "the stream concludes", |job| {
        job.get("outcome").is_some()
    });
    assert_eq!(job["outcome"], "completed", "{job}");
    assert_eq!(job["status"], "concluded", "{job}");
    let (m, dismissed) = bounded_command(m, "dismiss");
    assert_eq!(dismissed, Ok(()));
    m.unmount();
    common::qemu_img_check(&top);
    assert_eq!(common::convert_to_raw(&top)[63 << 20], 0x99);
}

#[test]
fn cancel_of_a_paused_stream_concludes_it_and_frees_its_nodes() {
    let Some(Fixture { dir, top, m }) = mounted(&[], |d| chain(d, "write -P 0x11 0 64M")) else {
        return;
    };
    command(&m, "stream speed=1M").unwrap();
    wait_for(&m, "the stream runs", |job| job["status"] == "running");
    // Issue 8: resume only in paused and standby.
    assert_eq!(command(&m, "resume"), Err(libc::EBUSY));
    assert_eq!(last_event(&m)["event"], "COMMAND_REJECTED");
    let (m, paused) = bounded_command(m, "pause");
    assert_eq!(paused, Ok(()));
    assert_eq!(status_json(&m)[0]["status"], "paused");
    let (m, cancelled) = bounded_command(m, "cancel");
    assert_eq!(cancelled, Ok(()));
    let job = wait_for(&m, "the cancelled stream concludes", |job| {
        job["status"] == "concluded"
    });
    assert_eq!(job["outcome"], "cancelled", "{job}");
    let statuses: Vec<serde_json::Value> = events(&m)
        .into_iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE")
        .map(|e| e["data"]["status"].clone())
        .collect();
    assert_eq!(statuses[0], "created", "{statuses:?}");
    assert_eq!(
        statuses[statuses.len() - 3..],
        ["running", "aborting", "concluded"],
        "a cancelled paused job resumes, aborts and concludes: {statuses:?}"
    );
    command(&m, "dismiss").unwrap();
    let snapshot = dir.path().join("snap.qcow2");
    command(&m, &format!("snapshot file={}", path_str(&snapshot))).unwrap();
    command(&m, "stream node=snap.qcow2 base=top.qcow2").unwrap();
    wait_for(&m, "the second stream", |job| job.get("outcome").is_some());
    m.unmount();
    common::qemu_img_check(&top);
    common::qemu_img_check(&snapshot);
}

#[test]
fn a_snapshot_inside_the_mount_is_einval_however_it_is_named() {
    let Some(Fixture { dir, m, .. }) = mounted(&[], |d| chain(d, "write -P 0x22 0 1M")) else {
        return;
    };
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&m.mnt, &link).unwrap();
    let mut m = m;
    for target in [
        m.path("in.qcow2"),
        m.path("ctl/in.qcow2"),
        link.join("in.qcow2"),
        // Relative to the active image's directory, which holds `mnt`.
        PathBuf::from("mnt/in.qcow2"),
    ] {
        let (back, result) = bounded_command(m, &format!("snapshot file={}", path_str(&target)));
        m = back;
        assert_eq!(result, Err(libc::EINVAL), "{}", target.display());
        assert_eq!(last_event(&m)["data"]["errno"], "EINVAL");
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        // Another path to the same mount: only its device tells.
        let bind = dir.path().join("bind");
        std::fs::create_dir(&bind).unwrap();
        let bound = std::process::Command::new("mount")
            .args(["--bind", path_str(&m.mnt), path_str(&bind)])
            .status()
            .unwrap();
        assert!(bound.success(), "mount --bind");
        let (back, result) = bounded_command(
            m,
            &format!("snapshot file={}", path_str(&bind.join("in.qcow2"))),
        );
        m = back;
        let _ = std::process::Command::new("umount").arg(&bind).status();
        assert_eq!(result, Err(libc::EINVAL), "through a bind mount");
    }
    assert!(!m.path("in.qcow2").exists());
    assert_eq!(m.path("active").metadata().unwrap().len(), 64 << 20);
    command(
        &m,
        &format!("snapshot file={}", path_str(&dir.path().join("out.qcow2"))),
    )
    .unwrap();
    m.unmount();
    common::qemu_img_check(&dir.path().join("out.qcow2"));
}

/// A bind mount of a directory inside the mount, with a single thread
/// serving requests: deciding that the target is inside must not look at
/// the bind mount, or the one thread would wait for itself.
#[test]
fn a_bind_mount_of_the_mount_is_refused_without_asking_the_mount() {
    if !require_all(&[]) {
        return;
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: a bind mount needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path(), "write -P 0x22 0 1M");
    let options = chainfs::fs::MountOptions {
        threads: 1,
        ..Default::default()
    };
    let mut m = mount(&top, &dir.path().join("mnt"), &options);
    let bind = dir.path().join("bind");
    std::fs::create_dir(&bind).unwrap();
    let bound = std::process::Command::new("mount")
        .args(["--bind", path_str(&m.path("ctl")), path_str(&bind)])
        .status()
        .unwrap();
    assert!(bound.success(), "mount --bind");
    for target in [bind.join("in.qcow2"), bind.join("sub/../in.qcow2")] {
        let (back, result) = bounded_command(m, &format!("snapshot file={}", path_str(&target)));
        m = back;
        assert_eq!(result, Err(libc::EINVAL), "{}", target.display());
    }
    let _ = std::process::Command::new("umount").arg(&bind).status();
    m.unmount();
}

#[test]
fn a_relative_snapshot_target_is_relative_to_the_active_image() {
    let Some(Fixture { dir, top: _, m }) = mounted(&[], |dir| {
        let images = dir.join("images");
        std::fs::create_dir_all(images.join("sub")).unwrap();
        chain(&images, "write -P 0x33 0 1M")
    }) else {
        return;
    };
    let images = dir.path().join("images");
    // `sub` exists only beside the image: resolved anywhere else, the
    // command fails (ENOENT) and creates nothing.
    command(&m, "snapshot file=sub/snap.qcow2").unwrap();
    // The active image is now in `sub`: the next one is relative to it.
    command(&m, "snapshot file=../up.qcow2").unwrap();
    let chain = String::from_utf8(read_all(&m.path("ctl/chain"))).unwrap();
    let canonical = std::fs::canonicalize(&images).unwrap();
    for file in ["sub/snap.qcow2", "up.qcow2"] {
        let path = canonical.join(file);
        assert!(path.exists(), "{} was not created", path.display());
        assert!(
            chain.contains(&format!("path={:?}", path_str(&path))),
            "{chain}"
        );
    }
    m.unmount();
    common::qemu_img_check(&canonical.join("up.qcow2"));
}
