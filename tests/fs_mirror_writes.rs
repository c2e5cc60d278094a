//! Writers racing a `mirror` through a real mount: a write right after the
//! command, writes across its start, fio verifying across the pivot in
//! both copy modes, and write-blocking writes (1-byte, unaligned,
//! overlapping from several threads) that are in the target when they
//! return.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::mirror::*;
use common::mount::*;
use common::*;

#[test]
fn with_sync_none_a_write_right_after_the_command_reaches_the_target() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let m = five.mount();
    let active = open_rw(&m, "active");
    // Nothing is scanned for sync=none: only the tracking sees this write,
    // so it must be in place when the command returns.
    for round in 0..20u8 {
        let name = format!("none-{round}.qcow2");
        let id = format!("n{round}");
        command(&m, &format!("mirror target={name} sync=none id={id}")).unwrap();
        active.write_all_at(&[round + 1; 4096], 8 << 20).unwrap();
        wait_ready(&m, &id);
        command(&m, &format!("cancel id={id}")).unwrap();
        assert_eq!(wait_outcome(&m, &id)["outcome"], "completed");
        // The target's view reads through to the node: look at what the
        // target itself holds.
        let target = five.image(&name);
        assert!(
            own_data(&target).any(|range| range.contains(&(8 << 20))),
            "round {round}: the write missed the target"
        );
        assert_eq!(convert_to_raw(&target)[8 << 20], round + 1);
    }
    drop(active);
    m.unmount();
}

#[test]
fn writes_racing_the_command_all_reach_the_target() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let m = five.mount();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (Arc::clone(&stop), m.path("active"));
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let mut round = 0u64;
            // Writes keep landing on every region while the job starts.
            while !stop.load(Ordering::Acquire) || round < 64 {
                let offset = (round * 1_048_583) % (60 << 20);
                file.write_all_at(&pattern(round, offset, 4096), offset)
                    .unwrap();
                round += 1;
            }
            round
        })
    };
    command(&m, "mirror target=copy.img id=m").unwrap();
    wait_ready(&m, "m");
    stop.store(true, Ordering::Release);
    let rounds = writer.join().unwrap();
    assert!(rounds > 64, "the writer never raced the start");
    command(&m, "complete id=m").unwrap();
    assert_eq!(wait_outcome(&m, "m")["outcome"], "completed");
    let shown = read_all(&m.path("active"));
    m.unmount();
    qemu_img_check(&five.image("copy.img"));
    assert_compare(&five.image("copy.img"), "qcow2", &shown);
}

/// fio (4 jobs, crc32c) writes `active` while a mirror in `copy_mode`
/// becomes ready and completes; fio verifies what it wrote across the
/// pivot, and the target then equals what `active` showed.
fn fio_through_the_mirror(copy_mode: &str) {
    let Some(five) = FiveChain::gated(&["fio"]) else {
        return;
    };
    let m = five.mount();
    let fio = fio_verify_live(&m.path("active"));
    command(
        &m,
        &format!("mirror target=copy.img id=f copy-mode={copy_mode}"),
    )
    .unwrap();
    assert_eq!(wait_ready(&m, "f")["status"], "ready");
    command(&m, "complete id=f").unwrap();
    assert_eq!(wait_outcome(&m, "f")["outcome"], "completed");
    assert!(
        !fio.is_finished(),
        "fio ended before the pivot: it raced nothing"
    );
    let output = fio.join().unwrap();
    assert!(
        output.status.success(),
        "fio failed across the mirror:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert_eq!(names_in(&m), ["active", "copy.img", "ctl"]);
    let shown = read_all(&m.path("active"));
    m.unmount();
    let target = five.image("copy.img");
    assert_good_copy(&target, &shown);
}

#[test]
fn fio_verifies_across_a_mirror_in_the_background() {
    fio_through_the_mirror("background");
}

#[test]
fn fio_verifies_across_a_mirror_with_blocking_writes() {
    fio_through_the_mirror("write-blocking");
}

#[test]
fn after_ready_a_blocking_write_is_in_the_target_when_it_returns() {
    let Some(five) = FiveChain::gated(&[]) else {
        return;
    };
    let target = five.image("copy.img");
    let mut model = convert_to_raw(&five.top());
    let m = five.mount();
    let active = open_rw(&m, "active");
    write_model(&active, &mut model, 1 << 20, &[0x31; 5000]);
    command(&m, "mirror target=copy.img id=w copy-mode=write-blocking").unwrap();
    write_model(&active, &mut model, 2 << 20, &[0x32; 70_000]);
    assert_eq!(wait_ready(&m, "w")["status"], "ready");
    // From now on the job's own copies would wait for ever: only the
    // writers' copies can reach the target in time.
    command(&m, "set-speed id=w speed=1").unwrap();
    for (offset, byte) in [(3 << 20, 0x33u8), ((4 << 20) + 4095, 0x34), (5 << 20, 0x35)] {
        write_model(&active, &mut model, offset, &[byte]);
        let seen = convert_to_raw(&target);
        assert_eq!(seen[offset as usize], byte, "a 1-byte write at {offset}");
    }
    // Overlapping writes from several threads, none waiting on another.
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let path = m.path("active");
            std::thread::spawn(move || {
                let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                for i in 0..200u64 {
                    let offset = (6 << 20) + i * 333 + u64::from(t) * 77;
                    file.write_all_at(&[t; 1000], offset).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let shown = read_all(&m.path("active"));
    assert!(shown[..6 << 20] == model[..6 << 20]);
    assert_compare(&target, "qcow2", &shown);
    command(&m, "set-speed id=w speed=0").unwrap();
    command(&m, "complete id=w").unwrap();
    assert_eq!(wait_outcome(&m, "w")["outcome"], "completed");
    assert!(read_all(&m.path("active")) == shown);
    drop(active);
    m.unmount();
    assert_good_copy(&target, &shown);
}
