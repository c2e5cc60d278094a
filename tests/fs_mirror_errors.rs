//! `mirror` refused, and a mirror whose target fills its disk: every
//! refusal of SPEC §4 with its errno, and a target on a small tmpfs under
//! `on-error=report` (the job fails, the chain stays as it was) and
//! `on-error=stop` (it pauses; `resume` after freeing space completes).

mod common;

use common::chain::overlay;
use common::mount::*;
use common::*;

#[test]
fn impossible_mirrors_are_refused_with_their_errno() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let dir = five.dir.path();
    let m = five.mount();
    let small = dir.join("small.qcow2");
    create_qcow2(path_str(&small), "1M", "");
    let raw = std::fs::File::create(dir.join("raw-existing.img")).unwrap();
    raw.set_len(FIVE_SIZE).unwrap();
    let refusals = [
        // An image of the chain, by name or path: EINVAL before EEXIST.
        ("mirror target=file-C.img", libc::EINVAL),
        (
            &*format!("mirror target={}", path_str(&five.image("file-A.img"))),
            libc::EINVAL,
        ),
        ("mirror target=small.qcow2", libc::EEXIST),
        ("mirror target=nothing.qcow2 mode=existing", libc::ENOENT),
        ("mirror target=small.qcow2 mode=existing", libc::EINVAL),
        ("mirror target=raw.img format=raw sync=top", libc::EINVAL),
        ("mirror target=raw.img format=raw sync=none", libc::EINVAL),
        (
            "mirror target=raw-existing.img mode=existing sync=top",
            libc::EINVAL,
        ),
        ("mirror target=x.qcow2 node=nowhere.img", libc::ENOENT),
        ("mirror target=x.qcow2 granularity=1000", libc::EINVAL),
        ("mirror target=x.qcow2 sync=bitmap", libc::EINVAL),
        (
            &*format!("mirror target={}", path_str(&m.path("inside.qcow2"))),
            libc::EINVAL,
        ),
    ];
    for (text, errno) in refusals {
        assert_eq!(command(&m, text), Err(errno), "{text}");
    }
    // A refused command creates nothing, and removes nothing it did not.
    assert!(dir.join("raw-existing.img").exists());
    assert!(small.exists());
    for name in ["nothing.qcow2", "raw.img", "x.qcow2"] {
        assert!(!dir.join(name).exists(), "{name} was created");
    }
    // A job touching the node: EBUSY, and the target is not left behind.
    command(&m, "stream node=file-D.img base=file-B.img speed=64K id=s").unwrap();
    assert_eq!(
        command(&m, "mirror node=file-D.img target=busy.qcow2"),
        Err(libc::EBUSY)
    );
    assert!(!dir.join("busy.qcow2").exists());
    command(&m, "cancel id=s").unwrap();
    wait_outcome(&m, "s");
    // Two jobs never share a target: its write lock is the first one's.
    overlay(dir, "shared.qcow2", Some(("file-D.img", "qcow2")), "64M");
    command(
        &m,
        "mirror target=shared.qcow2 mode=existing sync=top id=first",
    )
    .unwrap();
    assert_eq!(
        command(
            &m,
            "mirror target=shared.qcow2 mode=existing sync=none node=file-A.img"
        ),
        Err(libc::EBUSY)
    );
    command(&m, "cancel id=first force=on").unwrap();
    wait_outcome(&m, "first");
    m.unmount();
    let read_only = mount(
        &five.top(),
        &dir.join("ro"),
        &chainfs::fs::MountOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert_eq!(
        command(&read_only, "mirror target=ro.qcow2"),
        Err(libc::EROFS)
    );
    assert!(!dir.join("ro.qcow2").exists());
    read_only.unmount();
}

/// Mounts SPEC's chain with the mirror target on a full tmpfs and starts
/// a full mirror under `on_error`.
fn mirror_onto_a_full_disk(on_error: &str) -> Option<(FullTmpfs, FiveChain, Mounted)> {
    let five = FiveChain::gated(&[])?;
    let room = FullTmpfs::new()?;
    room.fill();
    let m = five.mount();
    let target = room.small().join("copy.qcow2");
    command(
        &m,
        &format!(
            "mirror target={} id=m on-error={on_error}",
            path_str(&target)
        ),
    )
    .unwrap();
    Some((room, five, m))
}

/// Under `report` the mirror fails at the first error; under `ignore` it
/// skips every failed run, gets in step, and fails at `complete`. Either
/// way BLOCK_JOB_ERROR names the policy and nothing pivots.
fn fails_without_a_pivot(on_error: &str) {
    let Some((_room, five, m)) = mirror_onto_a_full_disk(on_error) else {
        return;
    };
    let before = names_in(&m);
    if on_error == "ignore" {
        assert_eq!(wait_ready(&m, "m")["status"], "ready");
        command(&m, "complete id=m").unwrap();
    }
    let job = wait_outcome(&m, "m");
    assert_eq!(job["outcome"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("No space left"),
        "{job}"
    );
    let errors = events_named(&m, "BLOCK_JOB_ERROR");
    assert_eq!(errors[0]["data"]["action"], on_error, "{errors:?}");
    assert_eq!(names_in(&m), before);
    assert!(read_all(&m.path("active")) == five.views()[4]);
    m.unmount();
    qemu_img_check(&five.top());
}

#[test]
fn on_error_report_fails_the_mirror_and_keeps_the_chain() {
    fails_without_a_pivot("report");
}

#[test]
fn on_error_ignore_goes_on_but_the_mirror_ends_failed_without_a_pivot() {
    fails_without_a_pivot("ignore");
}

/// Under `stop` (any error) and `enospc` (ENOSPC) the mirror pauses with
/// the error; once the space is freed, `resume` retries and it completes.
fn pauses_then_completes(on_error: &str) {
    let Some((room, five, m)) = mirror_onto_a_full_disk(on_error) else {
        return;
    };
    let job = wait_for(&m, "mirror pauses", |j| j["status"] == "paused");
    assert!(
        job["error"].as_str().unwrap().contains("No space left"),
        "{job}"
    );
    std::fs::remove_file(&room.filler).unwrap();
    command(&m, "resume id=m").unwrap();
    wait_ready(&m, "m");
    command(&m, "complete id=m").unwrap();
    assert_eq!(wait_outcome(&m, "m")["outcome"], "completed");
    assert_eq!(names_in(&m), ["active", "copy.qcow2", "ctl"]);
    let shown = read_all(&m.path("active"));
    m.unmount();
    let target = room.small().join("copy.qcow2");
    qemu_img_check_allowing_leaks(&target);
    assert!(convert_to_raw(&target) == shown);
    drop(five);
}

#[test]
fn on_error_stop_pauses_and_resume_completes_once_space_is_freed() {
    pauses_then_completes("stop");
}

#[test]
fn on_error_enospc_pauses_on_a_full_disk_and_resume_completes() {
    pauses_then_completes("enospc");
}
