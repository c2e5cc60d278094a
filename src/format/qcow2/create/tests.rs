//! Tests of image creation: layout arithmetic, option checks, and images
//! that `qemu-img check`, `qemu-img info` and `qemu-io` accept.

use std::path::Path;
use std::process::Command;

use super::*;
use crate::storage::test_support::require_qemu;
use crate::storage::FileStorage;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn options(size: u64, cluster_bits: u32) -> CreateOptions {
    CreateOptions {
        size,
        cluster_bits,
        backing: None,
        extended_l2: false,
        refcount_order: 4,
    }
}

fn create_file(path: &Path, options: &CreateOptions) -> Result<()> {
    let storage = FileStorage::create_new(path).unwrap();
    create(&storage, options)
}

fn geometry(cluster_bits: u32, refcount_order: u32) -> Geometry {
    Geometry {
        cluster_bits,
        extended_l2: false,
        refcount_order,
        external_data: false,
    }
}

#[test]
fn small_image_has_qemu_layout() {
    // qemu-img create -f qcow2 img 1G: reftable at 64 KiB, one refblock at
    // 128 KiB, the two-entry L1 table at 192 KiB.
    let layout = Layout::plan(&geometry(16, 4), 2);
    assert_eq!(layout.reftable_clusters, 1);
    assert_eq!(layout.refblocks, 1);
    assert_eq!(layout.first_l1_cluster(), 3);
    assert_eq!(layout.total_clusters(), 4);
}

#[test]
fn largest_l1_needs_several_reftable_clusters() {
    // 512-byte clusters and 64-bit refcounts: 64 refcounts per refblock for
    // an L1 table of 65536 clusters.
    let layout = Layout::plan(&geometry(9, 6), MAX_L1_ENTRIES);
    assert_eq!(layout.l1_clusters, 65536);
    assert!(layout.reftable_clusters > 1);
    let covered = layout.refblocks * 64;
    assert!(covered >= layout.total_clusters());
    assert!(
        covered - 64 < layout.total_clusters(),
        "a refblock too many"
    );
    assert!(layout.reftable_clusters * 64 >= layout.refblocks);
}

#[test]
fn layout_is_the_least_fixed_point_for_every_geometry() {
    for cluster_bits in 9..=21 {
        for order in 0..=6 {
            let g = geometry(cluster_bits, order);
            for l1_entries in [0, 1, 1000, MAX_L1_ENTRIES] {
                let layout = Layout::plan(&g, l1_entries);
                let total = layout.total_clusters();
                let refblocks = total.div_ceil(g.refblock_entries());
                assert!(layout.refblocks >= refblocks);
                assert!(layout.refblocks <= refblocks.max(1) + 1);
                let entries_per_cluster = g.cluster_size() / 8;
                assert!(layout.reftable_clusters * entries_per_cluster >= layout.refblocks);
            }
        }
    }
}

#[test]
fn refcounts_of_every_width_read_back_as_one() {
    for order in 0..=6u32 {
        let mut array = vec![0u8; 64];
        let bits = 1u64 << order;
        let entries = 64 * 8 / bits;
        for index in (0..entries).step_by(3) {
            set_refcount_to_one(&mut array, index, order);
        }
        for index in 0..entries {
            let bit = index * bits;
            let value = if bits < 8 {
                (array[(bit / 8) as usize] >> (bit % 8)) & ((1u16 << bits) - 1) as u8
            } else {
                let start = (bit / 8) as usize;
                let bytes = &array[start..start + (bits / 8) as usize];
                assert!(bytes[..bytes.len() - 1].iter().all(|&b| b == 0));
                bytes[bytes.len() - 1]
            };
            assert_eq!(
                value,
                u8::from(index % 3 == 0),
                "order {order} index {index}"
            );
        }
    }
}

#[test]
fn created_header_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let mut opts = options(10 * GIB + 1, 16);
    opts.backing = Some(("base.raw".into(), Some("raw".into())));
    create_file(&path, &opts).unwrap();
    let header = Header::read(&FileStorage::open(&path, false).unwrap()).unwrap();
    assert_eq!(header.version, 3);
    assert_eq!(header.size, 10 * GIB + 512);
    assert_eq!(header.l1_size, 21);
    assert_eq!(header.backing_file.as_deref(), Some(&b"base.raw"[..]));
    assert_eq!(header.backing_format.as_deref(), Some("raw"));
    assert_eq!(header.feature_names.len(), 8);
    assert!(header.incompatible.is_empty());
}

#[test]
fn invalid_options_are_refused_before_writing() {
    let mut bad = vec![
        options(MIB, 8),
        options(MIB, 22),
        CreateOptions {
            extended_l2: true,
            ..options(MIB, 13)
        },
        CreateOptions {
            refcount_order: 7,
            ..options(MIB, 16)
        },
        options(u64::MAX, 16),
        // 16 TiB of 512-byte clusters needs a 4 GiB L1 table.
        options(16 * TIB, 9),
        options(128 * GIB + 512, 9),
    ];
    for backing in [
        (String::new(), None),
        ("a\0b".to_string(), None),
        ("x".repeat(1024), None),
        ("base".to_string(), Some(String::new())),
        // Fits the 1023-byte limit but not a 512-byte header cluster.
        ("x".repeat(1000), Some("raw".to_string())),
    ] {
        bad.push(CreateOptions {
            backing: Some(backing),
            ..options(MIB, 9)
        });
    }
    let dir = tempfile::tempdir().unwrap();
    for (index, opts) in bad.iter().enumerate() {
        let path = dir.path().join(format!("bad{index}.qcow2"));
        std::fs::write(&path, b"untouched").unwrap();
        let storage = FileStorage::open(&path, true).unwrap();
        let err = create(&storage, opts).expect_err("accepted bad options");
        assert!(matches!(err, FormatError::Unsupported { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"untouched", "{opts:?}");
    }
}

#[test]
fn largest_l1_of_512_byte_clusters_is_accepted() {
    assert_eq!(validate(&options(128 * GIB, 9)).unwrap(), 128 * GIB);
}

/// Runs `qemu-img` or `qemu-io` and returns stdout; panics with stderr on
/// failure.
fn run(tool: &str, args: &[&str], path: &Path) -> String {
    let output = Command::new(tool).args(args).arg(path).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{tool} {args:?} failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn assert_check_clean(path: &Path) {
    let report = run("qemu-img", &["check", "--output=json"], path);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report.get("leaks").is_none(), "leaks: {report}");
    assert!(report.get("corruptions").is_none(), "corruptions: {report}");
}

/// What `qemu-img info` must report for an image made with `opts`.
fn assert_info_agrees(path: &Path, opts: &CreateOptions) {
    let info = run("qemu-img", &["info", "--output=json", "-U"], path);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], opts.size.next_multiple_of(512));
    assert_eq!(info["cluster-size"], 1u64 << opts.cluster_bits);
    let (name, format) = match &opts.backing {
        Some((name, format)) => (Some(name.as_str()), format.as_deref()),
        None => (None, None),
    };
    assert_eq!(info["backing-filename"].as_str(), name);
    assert_eq!(info["backing-filename-format"].as_str(), format);
    let data = &info["format-specific"]["data"];
    assert_eq!(data["compat"], "1.1");
    assert_eq!(data["extended-l2"], opts.extended_l2);
    assert_eq!(data["refcount-bits"], 1u64 << opts.refcount_order);
    assert_eq!(data["lazy-refcounts"], false);
    assert_eq!(data["corrupt"], false);
}

/// A guest write and read back through QEMU, then a clean check.
fn assert_qemu_io_works(path: &Path) {
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 64k",
            "-c",
            "read -P 7 0 64k",
        ],
        path,
    );
    assert!(out.contains("wrote 65536/65536"), "{out}");
    assert!(out.contains("read 65536/65536"), "{out}");
    assert!(!out.contains("fail"), "{out}");
    assert_check_clean(path);
}

/// Creates, then checks with QEMU, every size and backing variant for one
/// cluster geometry and each refcount width.
fn check_matrix(cluster_bits: u32, extended_l2: bool) {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::File::create(&base).unwrap().set_len(MIB).unwrap();
    let backings = [
        None,
        Some(("base.raw".to_string(), Some("raw".to_string()))),
        Some((base.to_str().unwrap().to_string(), None)),
    ];
    for size in [0, MIB, GIB, 100 * TIB] {
        for refcount_order in [0, 4, 6] {
            for backing in &backings {
                let opts = CreateOptions {
                    size,
                    cluster_bits,
                    backing: backing.clone(),
                    extended_l2,
                    refcount_order,
                };
                let path = dir
                    .path()
                    .join(format!("img-{size}-{refcount_order}.qcow2"));
                let _ = std::fs::remove_file(&path);
                let l1_entries = size.div_ceil(geometry_of(&opts).l2_span());
                match create_file(&path, &opts) {
                    Err(err) if l1_entries > MAX_L1_ENTRIES => {
                        assert!(err.to_string().contains("larger cluster size"), "{err}");
                        continue;
                    }
                    result => result.unwrap_or_else(|err| panic!("{opts:?}: {err}")),
                }
                assert_check_clean(&path);
                assert_info_agrees(&path, &opts);
                if size > 0 {
                    assert_qemu_io_works(&path);
                }
            }
        }
    }
}

fn geometry_of(opts: &CreateOptions) -> Geometry {
    Geometry {
        cluster_bits: opts.cluster_bits,
        extended_l2: opts.extended_l2,
        refcount_order: opts.refcount_order,
        external_data: false,
    }
}

#[test]
fn qemu_accepts_images_with_512_byte_clusters() {
    check_matrix(9, false);
}

#[test]
fn qemu_accepts_images_with_4_kib_clusters() {
    check_matrix(12, false);
}

#[test]
fn qemu_accepts_images_with_64_kib_clusters() {
    check_matrix(16, false);
}

#[test]
fn qemu_accepts_images_with_64_kib_clusters_and_subclusters() {
    check_matrix(16, true);
}

#[test]
fn qemu_accepts_images_with_2_mib_clusters() {
    check_matrix(21, false);
}

#[test]
fn qemu_accepts_images_with_2_mib_clusters_and_subclusters() {
    check_matrix(21, true);
}

#[test]
fn qemu_accepts_the_largest_l1_table_with_every_refcount_width() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for refcount_order in [0, 3, 6] {
        let opts = CreateOptions {
            refcount_order,
            ..options(128 * GIB, 9)
        };
        let path = dir.path().join(format!("big-{refcount_order}.qcow2"));
        create_file(&path, &opts).unwrap();
        assert_check_clean(&path);
        assert_info_agrees(&path, &opts);
    }
}

#[test]
fn qemu_img_refuses_what_create_refuses() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("too-large.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
        .arg(&path)
        .arg((128 * GIB + 512).to_string())
        .status()
        .unwrap();
    assert!(!status.success());
    assert!(validate(&options(128 * GIB + 512, 9)).is_err());
}

#[test]
fn small_images_match_qemu_img_byte_for_byte() {
    if !require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("", options(GIB, 16)),
        (
            "-b base.qcow2 -F qcow2",
            CreateOptions {
                backing: Some(("base.qcow2".into(), Some("qcow2".into()))),
                ..options(GIB, 16)
            },
        ),
        (
            "-o cluster_size=2M,extended_l2=on,refcount_bits=1",
            CreateOptions {
                extended_l2: true,
                refcount_order: 0,
                ..options(5 * GIB, 21)
            },
        ),
        ("-o cluster_size=4k", options(MIB, 12)),
    ];
    for (index, (qemu_args, opts)) in cases.iter().enumerate() {
        let ours = dir.path().join(format!("ours{index}.qcow2"));
        let theirs = dir.path().join(format!("theirs{index}.qcow2"));
        create_file(&ours, opts).unwrap();
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u"])
            .args(qemu_args.split_whitespace())
            .arg(&theirs)
            .arg(opts.size.to_string())
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let ours = std::fs::read(&ours).unwrap();
        let theirs = std::fs::read(&theirs).unwrap();
        // QEMU ends the file at the last byte of the L1 table; chainfs at
        // the end of its cluster, which reads the same.
        assert!(ours.len() >= theirs.len());
        assert!(ours[..theirs.len()] == theirs[..], "case {index} differs");
        assert!(ours[theirs.len()..].iter().all(|&b| b == 0));
    }
}
