//! Pivots under load: a live snapshot, and a stream's final pivot, while
//! four threads keep writing `active` through the mount, each its own
//! region with recognisable writes. No write is lost, none through
//! `active` is refused, and a handle opened on the old top's own file is
//! refused (EROFS) once that node stopped being active; QEMU's tools agree.

mod common;

use common::mount::*;
use common::writers::{Log, RegionWriters, REGION, SLOTS};
use common::*;

/// Where the writers' regions begin: over C's compressed data and D's
/// partial cluster, so writes copy on write from several levels below.
const FIRST: u64 = MIB;

/// Writers through `active`, numbered 0 to 3; the fifth region is for the
/// writer on the top's own file.
const ACTIVE_WRITERS: u64 = 4;

/// SPEC's five-deep chain mounted, with every writer past its first round
/// of slots. Bound in field order, the writers stop (when dropped) before
/// the mount ends, and the mount ends before the images go.
struct Busy {
    five: FiveChain,
    /// The top's content before any writer started, as QEMU reads it.
    before: Vec<u8>,
    m: Mounted,
    /// Writers 0 to 3, on `active`.
    writers: RegionWriters,
    /// Writer 4, on the top's own file (`file-E.img`).
    own: RegionWriters,
}

impl Busy {
    fn start() -> Option<Busy> {
        let five = FiveChain::gated(&[])?;
        let before = convert_to_raw(&five.top());
        let m = five.mount();
        let writers = RegionWriters::start(&m.path("active"), FIRST, 0, ACTIVE_WRITERS);
        let own = RegionWriters::start(&m.path("file-E.img"), FIRST, ACTIVE_WRITERS, 1);
        writers.wait_for_more(SLOTS);
        own.wait_for_more(SLOTS);
        Some(Busy {
            five,
            before,
            m,
            writers,
            own,
        })
    }
}

/// `before` with every accepted write of `logs` applied.
fn model(before: &[u8], logs: &[Log]) -> Vec<u8> {
    let mut image = before.to_vec();
    for log in logs {
        log.apply(&mut image);
    }
    image
}

fn assert_all_accepted(logs: &[Log], what: &str) {
    for log in logs {
        let refused: Vec<_> = log.results.iter().filter(|r| r.is_err()).collect();
        assert!(
            refused.is_empty(),
            "{what}: writer {} had {} of {} writes refused: {:?}",
            log.thread,
            refused.len(),
            log.results.len(),
            &refused[..refused.len().min(4)]
        );
    }
}

#[test]
fn a_snapshot_while_four_threads_write_active_loses_no_write_and_refuses_the_old_tops_handle() {
    let Some(Busy {
        five,
        before,
        m,
        writers,
        own: old,
    }) = Busy::start()
    else {
        return;
    };
    let copy = five.dir.path().join("copy.qcow2");

    command(&m, &format!("snapshot file={}", copy.display())).unwrap();
    // Writes the old-top writer starts from here on begin after the pivot;
    // the one it may have in flight now began before it.
    let old_done_at_pivot = old.counts()[0] as usize;
    let frozen = convert_to_raw(&five.image("file-E.img"));
    writers.wait_for_more(SLOTS);
    old.wait_for_more(SLOTS);
    let logs = writers.stop();
    let old_log = old.stop().remove(0);

    assert_all_accepted(&logs, "through active");
    let first_refused = old_log.results.iter().position(|r| r.is_err());
    let first_refused = first_refused.expect("the old top's handle was never refused");
    assert!(
        old_log.results[first_refused..]
            .iter()
            .all(|r| *r == Err(libc::EROFS)),
        "after the first refusal the old top's handle must only see EROFS: {:?}",
        &old_log.results[first_refused..]
    );
    assert!(
        first_refused <= old_done_at_pivot + 1,
        "a write through the old top's handle begun after the snapshot \
         returned was accepted ({first_refused} accepted, {old_done_at_pivot} done at the pivot)"
    );
    assert!(old_log.accepted() >= SLOTS as usize);

    // What the old top holds once it is read-only: each active writer's
    // first writes, some number of them, and every accepted old-handle
    // write; and it holds still while the writers go on.
    for log in &logs {
        assert!(
            log.holds_a_prefix(&before, &frozen),
            "the old top does not hold a prefix of writer {}'s writes",
            log.thread
        );
    }
    let mut with_old_writes = before.clone();
    old_log.apply(&mut with_old_writes);
    let region = old_log.start as usize..(old_log.start + REGION) as usize;
    assert_same_bytes(
        &frozen[region.clone()],
        &with_old_writes[region],
        "the old top's handle's region: every accepted write, no refused one",
    );
    assert_same_bytes(
        &convert_to_raw(&five.image("file-E.img")),
        &frozen,
        "the old top after the writers stopped, against when the snapshot returned",
    );

    let mut all = logs;
    all.push(old_log);
    let expected = model(&before, &all);
    assert_same_bytes(&read_all(&m.path("active")), &expected, "active");
    assert_same_bytes(&read_all(&m.path("copy.qcow2")), &expected, "copy.qcow2");
    assert_same_bytes(&convert_to_raw(&copy), &expected, "qemu-img convert -U");
    m.unmount();
    qemu_img_check(&copy);
    qemu_img_check(&five.image("file-E.img"));
    assert_same_bytes(&convert_to_raw(&copy), &expected, "copy after unmount");
    assert_same_bytes(
        &convert_to_raw(&five.top()),
        &frozen,
        "old top after unmount",
    );
}

#[test]
fn a_streams_final_pivot_while_four_threads_write_active_loses_no_write() {
    // The top stays the active node through a stream: the handle on its
    // own file keeps taking writes across the pivot.
    let Some(Busy {
        five,
        before,
        m,
        writers,
        own,
    }) = Busy::start()
    else {
        return;
    };

    command(&m, "stream").unwrap();
    let job = wait_for(&m, "the stream", |job| job.get("outcome").is_some());
    assert_eq!(job["outcome"], "completed", "{job}");
    writers.wait_for_more(SLOTS);
    own.wait_for_more(SLOTS);
    let mut logs = writers.stop();
    logs.extend(own.stop());

    assert_all_accepted(&logs, "through active and the top's own file");
    assert_eq!(names_in(&m), ["active", "ctl", "file-E.img"]);
    let expected = model(&before, &logs);
    assert_same_bytes(&read_all(&m.path("active")), &expected, "active");
    assert_same_bytes(
        &convert_to_raw(&five.top()),
        &expected,
        "qemu-img convert -U",
    );
    m.unmount();
    qemu_img_check(&five.top());
    let chain = qemu_chain_names(&five.top());
    assert_eq!(chain, ["file-E.img"], "the top still has a backing file");
    assert_same_bytes(&convert_to_raw(&five.top()), &expected, "top after unmount");
}
