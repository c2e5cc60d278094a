//! Deep chains: 1,000 nodes open and read correctly, without per-depth
//! slowdown for data in the top; past the depth limit, a clear error.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chainfs::chain::{open::MAX_DEPTH, Chain, ChainError, ChainOptions};
use common::chain::{assert_same, at, open, qemu_io_alone, raw_image, read_node, tempdir};
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
