//! Deep chains: 1,000 nodes open and read correctly, without per-depth
//! slowdown for data in the top; past the depth limit, a clear error.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chainfs::chain::{open::MAX_DEPTH, Chain, ChainError, ChainOptions};
use common::chain::{
    assert_same, at, open, open_writable, qemu_io_alone, raw_image, read_node, tempdir,
};
use common::{create_overlay, path_str, require_qemu};

const M: usize = 1024 * 1024;

/// Lets this test process hold as many open files as the hard limit allows:
/// each node of a chain holds its image open, and the library leaves the
/// process's limit to the program using it (the `chainfs` command raises
/// it where it starts).
fn allow_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill and setrlimit
    // to read; neither keeps the pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// The file name of overlay `i`; all have the same length, so a template's
/// backing name can be patched in place.
fn name(i: usize) -> String {
    format!("n{i:05}.qcow2")
}

/// Builds `base.img` (raw, `size` bytes, 0x11 in its first MiB or all of it
/// if smaller) and overlays 1..`nodes` on it, each backed by the one before.
/// qemu-img makes the first overlay and a template; the others are copies of
/// the template with the backing name patched, which is far faster than
/// running qemu-img a thousand times.
fn build(d: &Path, nodes: usize, size: usize, cluster: &str) {
    raw_image(&at(d, "base.img"), size, Some((0..M.min(size), 0x11)));
    let size = size.to_string();
    let options = format!("cluster_size={cluster}");
    let create = |file: &str, backing: &str, format: &str| {
        create_overlay(&at(d, file), (backing, format), Some(&size), &options);
    };
    create(&name(1), "base.img", "raw");
    create("template.qcow2", &name(0), "qcow2");
    let template = std::fs::read(at(d, "template.qcow2")).unwrap();
    let offset = u64::from_be_bytes(template[8..16].try_into().unwrap()) as usize;
    let len = u32::from_be_bytes(template[16..20].try_into().unwrap()) as usize;
    assert_eq!(len, name(0).len());
    let mut bytes = template.clone();
    for i in 2..nodes {
        bytes[offset..offset + len].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(at(d, &name(i)), &bytes).unwrap();
    }
}

fn expect(chain: &Chain, index: usize, want: &[u8]) {
    let node = &chain.nodes()[index];
    assert_same(node.name(), &read_node(chain, node.id()), want);
}

#[test]
fn a_thousand_node_chain_opens_and_reads_every_layer() {
    if !require_qemu() {
        return;
    }
    allow_open_files();
    const NODES: usize = 1000;
    let dir = tempdir();
    let d = dir.path();
    let started = Instant::now();
    build(d, NODES, 4 * M, "4096");
    let middle = NODES / 2;
    qemu_io_alone(d, &name(middle), "write -P 0x22 1M 1M");
    qemu_io_alone(d, &name(middle), "write -P 0x33 0 64k");
    qemu_io_alone(d, &name(NODES - 1), "write -P 0x44 3M 1M");
    eprintln!("built {NODES} nodes in {:?}", started.elapsed());

    let started = Instant::now();
    let chain = open(&at(d, &name(NODES - 1)));
    eprintln!("opened in {:?}", started.elapsed());
    assert_eq!(chain.nodes().len(), NODES);
    assert_eq!(chain.active().name(), name(NODES - 1));

    let mut below_middle = vec![0u8; 4 * M];
    below_middle[..M].fill(0x11);
    expect(&chain, 10, &below_middle);
    let mut top = below_middle.clone();
    top[..64 * 1024].fill(0x33);
    top[M..2 * M].fill(0x22);
    top[3 * M..].fill(0x44);
    expect(&chain, NODES - 1, &top);
    expect(&chain, middle, &{
        let mut v = top.clone();
        v[3 * M..].fill(0);
        v
    });
    chain.close().unwrap();
}

/// Time of `rounds` 1 MiB reads of data held by the top of `chain`.
fn time_top_reads(chain: &Chain, rounds: usize) -> Duration {
    let mut buf = vec![0u8; M];
    let started = Instant::now();
    for _ in 0..rounds {
        chain
            .read(chain.active().id(), 3 * M as u64, &mut buf)
            .unwrap();
    }
    assert!(buf.iter().all(|&b| b == 0x44));
    started.elapsed()
}

#[test]
fn data_in_the_top_reads_as_fast_at_any_depth() {
    if !require_qemu() {
        return;
    }
    allow_open_files();
    let deep_dir = tempdir();
    build(deep_dir.path(), 1000, 4 * M, "65536");
    qemu_io_alone(deep_dir.path(), &name(999), "write -P 0x44 3M 1M");
    let shallow_dir = tempdir();
    build(shallow_dir.path(), 2, 4 * M, "65536");
    qemu_io_alone(shallow_dir.path(), &name(1), "write -P 0x44 3M 1M");
    let deep = open(&at(deep_dir.path(), &name(999)));
    let shallow = open(&at(shallow_dir.path(), &name(1)));
    // Warm both, then measure.
    time_top_reads(&deep, 5);
    time_top_reads(&shallow, 5);
    let deep_time = time_top_reads(&deep, 200);
    let shallow_time = time_top_reads(&shallow, 200);
    eprintln!("deep {deep_time:?}, shallow {shallow_time:?}");
    assert!(
        deep_time < shallow_time * 3 + Duration::from_millis(200),
        "reads of data in the top slow down with depth: {deep_time:?} vs {shallow_time:?}"
    );
}

#[test]
fn a_chain_deeper_than_the_limit_is_refused_naming_the_image() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    allow_open_files();
    // base + MAX_DEPTH overlays: one image too many.
    build(d, MAX_DEPTH + 1, 65536, "512");
    let top = at(d, &name(MAX_DEPTH));
    let err = Chain::open(&top, &ChainOptions::default()).unwrap_err();
    assert!(matches!(err, ChainError::TooDeep { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&MAX_DEPTH.to_string()), "{text}");
    assert!(text.contains(path_str(&at(d, &name(1)))), "{text}");
}

#[test]
fn running_out_of_descriptors_is_reported_as_such_naming_the_limit() {
    if !require_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    build(d, 100, 65536, "512");
    // A hard limit of 64 that `chainfs` cannot raise: the chain must say
    // why it stopped, not just "Too many open files".
    let output = std::process::Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" info \"$1\""])
        .arg(env!("CARGO_BIN_EXE_chainfs"))
        .arg(at(d, &name(99)))
        .output()
        .expect("run chainfs info under a low open-file limit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("out of file descriptors after opening"),
        "{stderr}"
    );
    assert!(stderr.contains("ulimit -n"), "{stderr}");
}

/// Reads `len` bytes at `offset` of the active node of `chain`.
fn read_active(chain: &Chain, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xa5u8; len];
    chain.read(chain.active().id(), offset, &mut buf).unwrap();
    buf
}

/// The memo of which level answers a range never returns old data: each
/// step first reads base data through the top of a 200-deep chain (so the
/// memo learns that the base answers), then changes a level above the base
/// there, and reads again.
#[test]
fn what_the_deep_chain_remembers_never_hides_a_later_change() {
    if !require_qemu() {
        return;
    }
    allow_open_files();
    const NODES: usize = 200;
    let dir = tempdir();
    let d = dir.path();
    build(d, NODES, 4 * M, "65536");
    let chain = open_writable(&at(d, &name(NODES - 1)));
    let k = 64 * 1024;
    let mut want = read_active(&chain, 0, 4 * M);
    assert!(want[..M].iter().all(|&b| b == 0x11));

    // A write to the active layer.
    chain.write(chain.active().id(), 0, &[0x51; 4096]).unwrap();
    want[..4096].fill(0x51);
    assert_same("after a write", &read_active(&chain, 0, 4 * M), &want);

    // A populate (what a stream copies up).
    let populated = chain
        .populate(
            chain.active().id(),
            k as u64,
            k as u64,
            Some(&[0x52; 65536]),
        )
        .unwrap();
    assert_eq!(populated, k as u64);
    want[k..2 * k].fill(0x52);
    assert_same("after a populate", &read_active(&chain, 0, 4 * M), &want);

    // A write to a node in the middle (what a commit does to its base).
    let middle = chain.nodes()[NODES / 2].clone();
    middle.set_writable(true).unwrap();
    chain
        .write(middle.id(), 2 * k as u64, &[0x53; 8192])
        .unwrap();
    want[2 * k..2 * k + 8192].fill(0x53);
    assert_same(
        "after a middle write",
        &read_active(&chain, 0, 4 * M),
        &want,
    );
    chain
        .zero_range(middle.id(), 4 * k as u64, k as u64)
        .unwrap();
    want[4 * k..5 * k].fill(0);
    assert_same("after zeroing", &read_active(&chain, 0, 4 * M), &want);
    middle.set_writable(false).unwrap();

    // Hiding the middle changes nothing that the top shows.
    let hidden = chain.hiding(&[middle.id()]).unwrap();
    assert_same("hidden", &read_active(&hidden, 0, 4 * M), &want);

    // A snapshot: writes to the new top show; the old version still reads.
    let chain = hidden.with_new_top(&at(d, "snap.qcow2")).unwrap();
    read_active(&chain, 0, 4 * M);
    chain
        .write(chain.active().id(), 6 * k as u64, &[0x54; 4096])
        .unwrap();
    let mut snapped = want.clone();
    snapped[6 * k..6 * k + 4096].fill(0x54);
    assert_same("after a snapshot", &read_active(&chain, 0, 4 * M), &snapped);

    // A rebacking that drops the levels above the base (the end of a
    // stream that copied nothing): what only they held is gone.
    let base = chain.nodes()[0].id();
    let rebacked = chain
        .rebacked(chain.active().id(), Some(base), None)
        .unwrap();
    let mut bare = vec![0u8; 4 * M];
    bare[..M].fill(0x11);
    bare[6 * k..6 * k + 4096].fill(0x54);
    assert_same("after rebacking", &read_active(&rebacked, 0, 4 * M), &bare);
    assert_same("old version", &read_active(&chain, 0, 4 * M), &snapped);
    rebacked.close().unwrap();
}
