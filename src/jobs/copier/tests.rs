//! The copier's parallel writers: chunks of one range never overtake each
//! other, and a range read again lands after its earlier copy.

use super::*;
use crate::chain::ChainOptions;

const SIZE: u64 = 4 * CHUNK;

/// A writable raw image of `SIZE` bytes of `fill`, opened as a chain.
fn raw_chain(dir: &std::path::Path, name: &str, fill: u8) -> Chain {
    let path = dir.join(name);
    std::fs::write(&path, vec![fill; SIZE as usize]).unwrap();
    let options = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    Chain::open(&path, &options).unwrap()
}

/// The chains a test copies between: a source of ones, `a.img`, and a
/// destination of zeros, `b.img`, in `dir`.
fn source_and_dest(dir: &std::path::Path) -> (Chain, Chain) {
    (raw_chain(dir, "a.img", 1), raw_chain(dir, "b.img", 0))
}

/// The copy of the only node of one chain into the only node of another.
fn mirror_copier(source: &Chain, dest: &Chain) -> Copier {
    Copier {
        view: source.active().id(),
        base: None,
        dest: dest.active().id(),
        overwrite: true,
    }
}

fn chunk(offset: u64, len: u64) -> Chunk {
    Chunk {
        offset,
        len,
        read: Ok(Vec::new()),
        buf: Vec::new(),
    }
}

/// A dispatcher whose writer threads are started by a plain function.
type TestDispatch<'c, 'a, B, A> = Dispatch<'c, 'a, B, A, fn()>;

/// A dispatcher over `chains` with `waiting` chunks read, nothing handed
/// out yet, its `writers` counted as started; the receiver is the
/// writers' end of its work queue, which the test reads itself.
fn dispatcher<'c, 'a, B, A>(
    copier: &'c Copier,
    chains: Chains<'a>,
    writers: usize,
    waiting: Vec<Chunk>,
    before: B,
    after: A,
) -> (TestDispatch<'c, 'a, B, A>, Receiver<Chunk>) {
    let (to_writers, work) = channel();
    // The reader's end is dropped: returned buffers are let go.
    let (to_reader, _) = sync_channel(8);
    let dispatch = Dispatch {
        copier,
        chains,
        writers,
        spawned: writers,
        spawn_writer: (|| {}) as fn(),
        to_writers,
        to_reader,
        waiting: waiting.into(),
        in_flight: Vec::new(),
        errors_heard: 0,
        read_all: false,
        before,
        after,
    };
    (dispatch, work)
}

#[test]
fn a_chunk_overlapping_one_in_flight_waits_and_keeps_the_later_ones_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = source_and_dest(dir.path());
    let copier = mirror_copier(&source, &dest);
    let chains = Chains {
        source: &source,
        dest: &dest,
    };
    let waiting = vec![
        chunk(0, CHUNK),
        chunk(CHUNK / 2, CHUNK),
        chunk(3 * CHUNK, CHUNK),
    ];
    let (mut dispatch, work) = dispatcher(
        &copier,
        chains,
        4,
        waiting,
        || Ok::<bool, ()>(true),
        |_, _, _| Ok::<Next, ()>(Next::Go),
    );
    assert!(dispatch.hand_out().is_none());
    assert_eq!(dispatch.in_flight, vec![(0, CHUNK, 0)]);
    let first = work.try_recv().unwrap();
    dispatch.written(first, Ok(CHUNK)).unwrap();
    assert!(dispatch.hand_out().is_none());
    assert_eq!(
        dispatch.in_flight,
        vec![(CHUNK / 2, CHUNK, 0), (3 * CHUNK, CHUNK, 0)]
    );
}

#[test]
fn a_range_read_again_after_a_change_ends_with_the_new_data() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..50u8 {
        let (source, dest) = source_and_dest(dir.path());
        let copier = mirror_copier(&source, &dest);
        let node = source.active().id();
        // Every range twice, the source rewritten between the two reads:
        // the second copy must be the one that stays.
        let mut takes = (0..SIZE / CHUNK).flat_map(|i| [i * CHUNK, i * CHUNK]);
        let mut taken = 0;
        let take = || {
            let offset = takes.next()?;
            taken += 1;
            if taken % 2 == 0 {
                source
                    .write(node, offset, &vec![round + 2; CHUNK as usize])
                    .unwrap();
            }
            Some((offset, CHUNK))
        };
        let ended = copier
            .run_between(
                Chains {
                    source: &source,
                    dest: &dest,
                },
                take,
                || Ok::<bool, ()>(true),
                |_, _, result| {
                    result.unwrap();
                    Ok(Next::Go)
                },
            )
            .unwrap();
        assert_eq!(ended, Ended::Drained);
        let mut copied = vec![0; SIZE as usize];
        dest.read(dest.active().id(), 0, &mut copied).unwrap();
        assert!(copied.iter().all(|&b| b == round + 2), "round {round}");
    }
}

#[test]
fn a_stop_hands_back_every_chunk_taken_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = source_and_dest(dir.path());
    let copier = mirror_copier(&source, &dest);
    let mut written = Vec::new();
    let mut allowed = 2;
    let ended = copier
        .run_between(
            Chains {
                source: &source,
                dest: &dest,
            },
            linear(SIZE),
            || {
                allowed -= 1;
                Ok::<bool, ()>(allowed >= 0)
            },
            |offset, len, _| {
                written.push((offset, len));
                Ok(Next::Go)
            },
        )
        .unwrap();
    let Ended::Stopped(unwritten) = ended else {
        panic!("the run was stopped: {ended:?}");
    };
    assert_eq!(written.len(), 2, "two chunks were let through");
    assert!(!unwritten.is_empty(), "the chunk refused was taken");
    // The reader may not have taken the last chunks yet: what was taken is
    // a prefix of the walk, each chunk once.
    let mut all: Vec<_> = written.into_iter().chain(unwritten).collect();
    all.sort_unstable();
    let walk: Vec<_> = (0..SIZE / CHUNK).map(|i| (i * CHUNK, CHUNK)).collect();
    assert_eq!(all, walk[..all.len()]);
}

#[test]
fn a_chunk_that_failed_beside_one_retried_after_a_pause_is_retried_without_a_second_pause() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = source_and_dest(dir.path());
    let copier = mirror_copier(&source, &dest);
    let mut errors_heard = 0;
    let chains = Chains {
        source: &source,
        dest: &dest,
    };
    let waiting = vec![chunk(0, CHUNK), chunk(CHUNK, CHUNK)];
    let (mut dispatch, work) = dispatcher(
        &copier,
        chains,
        2,
        waiting,
        || Ok::<bool, ()>(true),
        // As `on-error=stop` does: pause, and once resumed, retry.
        |_, _, result: Result<u64, CopyFailure>| {
            Ok::<Next, ()>(match result {
                Ok(_) => Next::Go,
                Err(_) => {
                    errors_heard += 1;
                    Next::Retry
                }
            })
        },
    );
    assert!(dispatch.hand_out().is_none());
    let (first, second) = (work.try_recv().unwrap(), work.try_recv().unwrap());
    // Both failed while in flight (a full disk), before anyone resumed.
    let full = || {
        Err((
            "write",
            ChainError::Io {
                path: dir.path().join("b.img"),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            },
        ))
    };
    dispatch.written(first, full()).unwrap();
    dispatch.written(second, full()).unwrap();
    assert!(dispatch.in_flight.is_empty());
    drop(dispatch);
    assert_eq!(errors_heard, 1, "one pause for one full disk");
    let mut copied = vec![0; 2 * CHUNK as usize];
    dest.read(dest.active().id(), 0, &mut copied).unwrap();
    assert!(
        copied.iter().all(|&b| b == 1),
        "both chunks were copied again"
    );
}

/// Writer threads the next test's dispatcher started.
static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_start() {
    STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

#[test]
fn a_writer_thread_starts_only_when_every_started_one_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let (source, dest) = source_and_dest(dir.path());
    let copier = mirror_copier(&source, &dest);
    let chains = Chains {
        source: &source,
        dest: &dest,
    };
    let (mut dispatch, work) = dispatcher(
        &copier,
        chains,
        4,
        vec![chunk(0, CHUNK)],
        || Ok::<bool, ()>(true),
        |_, _, _| Ok::<Next, ()>(Next::Go),
    );
    dispatch.spawned = 0;
    dispatch.spawn_writer = count_start;
    let started = || STARTED.load(std::sync::atomic::Ordering::SeqCst);
    assert!(dispatch.hand_out().is_none());
    assert_eq!(started(), 1, "one chunk, one writer");
    dispatch
        .written(work.try_recv().unwrap(), Ok(CHUNK))
        .unwrap();
    dispatch
        .waiting
        .extend([chunk(CHUNK, CHUNK), chunk(2 * CHUNK, CHUNK)]);
    assert!(dispatch.hand_out().is_none());
    assert_eq!(started(), 2, "the first writer takes one of two");
}
