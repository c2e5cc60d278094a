//! Guest writes and write-zeroes raced against a backup's background copy
//! of the same clusters, round after round, without a mount: each
//! backup's target must equal the disk as it was when its command was
//! accepted, however the copies before write and the background copy met.
//!
//! The writes aim just ahead of the job's offset, where the background
//! copy claims its next clusters; two writers also meet each other on the
//! same clusters. The speed limit keeps each job running for many writes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chainfs::jobs::command::parse;
use chainfs::jobs::job::Outcome;
use chainfs::jobs::registry::{LiveChain, Registry};
use chainfs::jobs::EventLog;
use common::chain::{assert_same, at, close_live, open_writable, overlay, read_node, tempdir};
use common::{convert_to_raw, qemu_img_check, qemu_io};
use rand::{Rng, SeedableRng};

const SIZE: u64 = 16 << 20;
const ROUNDS: usize = 8;

#[test]
fn every_backup_is_its_point_in_time_whatever_writes_race_it() {
    if !common::require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    overlay(d, "base.qcow2", None, "16M");
    qemu_io(&at(d, "base.qcow2"), "qcow2", &["write -P 0x11 0 16M"]);
    overlay(d, "top.qcow2", Some(("base.qcow2", "qcow2")), "16M");
    qemu_io(&at(d, "top.qcow2"), "qcow2", &["write -P 0x22 3M 5M"]);
    let events = Arc::new(EventLog::default());
    let live = Arc::new(LiveChain::new(
        open_writable(&at(d, "top.qcow2")),
        events.clone(),
    ));
    let registry = Registry::new(Arc::clone(&live), events);
    let top = live.current().active().id();
    let mut points = Vec::new();
    for round in 0..ROUNDS {
        let target = at(d, &format!("b{round}.qcow2"));
        let point = {
            // The point in time: no write lands between this read and
            // the command.
            let _drained = live.drain();
            read_node(&live.current(), top)
        };
        let text = format!(
            "backup target={} sync=full speed=8M id=b{round}",
            target.display()
        );
        registry
            .execute(parse(&text).unwrap())
            .unwrap_or_else(|e| panic!("{text}: errno {}", e.errno()));
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            for writer in 0..2u64 {
                let (live, registry, done) = (&live, &registry, &done);
                scope.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(round as u64 * 7 + writer);
                    let mut writes = 0;
                    while writes < 300 || !done.load(Ordering::Acquire) {
                        let cursor = registry.infos().last().map_or(0, |info| info.offset % SIZE);
                        let len = rng.random_range(1..=96u64) * 1024;
                        let near = cursor + rng.random_range(0..(2u64 << 20));
                        let offset = near.min(SIZE - len);
                        let _gate = live.write_gate();
                        let chain = live.current();
                        if rng.random_bool(0.2) {
                            chain.zero_range(top, offset, len).unwrap();
                        } else {
                            let data = vec![rng.random::<u8>() | 1; len as usize];
                            chain.write(top, offset, &data).unwrap();
                        }
                        writes += 1;
                        if writes > 20_000 {
                            break;
                        }
                    }
                });
            }
            let deadline = Instant::now() + Duration::from_secs(120);
            while registry
                .infos()
                .last()
                .is_none_or(|info| info.outcome.is_none())
            {
                assert!(Instant::now() < deadline, "backup {round} never ended");
                std::thread::sleep(Duration::from_millis(5));
            }
            done.store(true, Ordering::Release);
        });
        let info = registry.infos().pop().unwrap();
        assert_eq!(info.outcome, Some(Outcome::Completed), "{:?}", info.error);
        assert!(info.offset <= SIZE, "a cluster was copied twice: {info:?}");
        points.push((target, point));
    }
    registry.shutdown();
    drop(registry);
    close_live(live);
    qemu_img_check(&at(d, "top.qcow2"));
    for (target, point) in &points {
        qemu_img_check(target);
        assert_same(
            &target.display().to_string(),
            &convert_to_raw(target),
            point,
        );
    }
}
