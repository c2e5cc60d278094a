//! Persistent dirty bitmaps written through the qcow2 engine, with QEMU as
//! the oracle: `qemu-img` makes the bitmaps and checks the image, and
//! `qemu-storage-daemon` exports a bitmap over NBD so that `qemu-img map`
//! with `x-dirty-bitmap` reads back exactly which granules QEMU sees dirty.

mod common;

use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chainfs::format::NoBacking;
use chainfs::format::Qcow2;
use chainfs::storage::{CrashMode, FileStorage, MemStorage, Storage};
use common::{
    create_qcow2, path_str, qemu_img, qemu_img_check, qemu_io, require_qemu, require_tool, run_any,
};

const MIB: u64 = 1 << 20;

/// A guest write (`Write`) or write-zeroes (`Zero`) through the engine.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64),
    Zero(u64, u64),
}

impl Op {
    fn range(self) -> Range<u64> {
        match self {
            Op::Write(at, len) | Op::Zero(at, len) => at..at + len,
        }
    }
}

struct Image {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// Whether the tools the tests drive are installed (see `require_tool`).
fn have_tools() -> bool {
    require_qemu() && require_tool("qemu-storage-daemon")
}

fn create(size: &str, options: &str) -> Image {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    create_qcow2(path_str(&path), size, options);
    Image { _dir: dir, path }
}

/// `qemu-img bitmap ARGS... IMAGE NAME`.
fn bitmap(image: &Path, args: &[&str], name: &str) {
    let mut all = vec!["bitmap"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[path_str(image), name]);
    qemu_img(&all);
}

fn open(storage: Arc<dyn Storage>, writable: bool) -> Qcow2 {
    common::engine::open_qcow2(storage, writable, 1 << 20)
}

fn open_file(path: &Path) -> Qcow2 {
    open(Arc::new(FileStorage::open(path, true).unwrap()), true)
}

fn apply(image: &Qcow2, ops: &[Op]) {
    for &op in ops {
        match op {
            Op::Write(at, len) => image
                .write(at, &vec![0xa5; len as usize], &NoBacking)
                .unwrap(),
            Op::Zero(at, len) => image.zero_range(at, len, &NoBacking).unwrap(),
        }
    }
}

/// Writes `ops` through the engine on the image file and closes it.
fn write_through_engine(path: &Path, ops: &[Op]) {
    let image = open_file(path);
    apply(&image, ops);
    image.close().unwrap();
}

/// Name → (flags, granularity) of every bitmap, as `qemu-img info` reports.
fn bitmap_info(image: &Path) -> Vec<(String, Vec<String>, u64)> {
    let out = qemu_img(&["info", "-U", "--output=json", path_str(image)]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    let Some(list) = bitmaps.as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let flags = b["flags"].as_array().unwrap();
            let flags = flags.iter().map(|f| f.as_str().unwrap().to_string());
            let name = b["name"].as_str().unwrap().to_string();
            (name, flags.collect(), b["granularity"].as_u64().unwrap())
        })
        .collect()
}

fn flags_of(image: &Path, name: &str) -> Vec<String> {
    let info = bitmap_info(image);
    let found = info.iter().find(|(n, _, _)| n == name);
    found
        .unwrap_or_else(|| panic!("no bitmap {name}: {info:?}"))
        .1
        .clone()
}

/// A `qemu-storage-daemon` exporting one image read-only over NBD; killed
/// on drop.
struct Export {
    child: Child,
    socket: PathBuf,
}

impl Export {
    fn start(image: &Path, bitmap: &str) -> Export {
        let socket = image.with_file_name(format!("{bitmap}.sock"));
        // A killed daemon leaves its socket behind.
        let _ = std::fs::remove_file(&socket);
        let file = format!(
            "driver=file,filename={},node-name=file,read-only=on",
            path_str(image)
        );
        let addr = format!("addr.type=unix,addr.path={}", path_str(&socket));
        let export = format!("type=nbd,id=e,node-name=fmt,name=exp,bitmaps.0={bitmap}");
        let child = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &file])
            .args([
                "--blockdev",
                "driver=qcow2,file=file,node-name=fmt,read-only=on",
            ])
            .args(["--nbd-server", &addr, "--export", &export])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut export = Export { child, socket };
        export.wait_ready();
        export
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("qemu-storage-daemon exited early: {status}");
            }
            assert!(Instant::now() < deadline, "NBD export never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest ranges that bitmap `name` of `image` marks dirty, as QEMU
/// reads them: through an NBD export, where `x-dirty-bitmap` reports dirty
/// granules as holes (`"data": false`).
fn dirty_ranges(image: &Path, name: &str) -> Vec<Range<u64>> {
    let export = Export::start(image, name);
    let opts = format!(
        "driver=nbd,export=exp,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        path_str(&export.socket)
    );
    let out = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let dirty = map.iter().filter(|e| e["data"] == false).map(|e| {
        let start = e["start"].as_u64().unwrap();
        start..start + e["length"].as_u64().unwrap()
    });
    merge(dirty.collect())
}

/// Sorted, coalesced ranges.
fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges.into_iter().filter(|r| !r.is_empty()) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The granules of `granularity` that `ranges` touch, clipped to `size`.
fn granules(
    ranges: impl IntoIterator<Item = Range<u64>>,
    granularity: u64,
    size: u64,
) -> Vec<Range<u64>> {
    let widened = ranges.into_iter().map(|r| {
        let start = r.start / granularity * granularity;
        start..r.end.next_multiple_of(granularity).min(size)
    });
    merge(widened.collect())
}

fn ranges_of(ops: &[Op]) -> Vec<Range<u64>> {
    ops.iter().map(|op| op.range()).collect()
}

/// Writes of every shape: a byte, across a granule edge, long, unaligned,
/// zeroed ranges, and the last byte of the disk.
fn varied_ops(size: u64) -> Vec<Op> {
    vec![
        Op::Write(0, 1),
        Op::Write(65535, 2),
        Op::Write(10 * MIB + 100, 200 << 10),
        Op::Zero(20 * MIB, MIB),
        Op::Zero(30 * MIB + 512, 512),
        Op::Write(40 * MIB + 4096, 3 * MIB + 17),
        Op::Write(size - 1, 1),
    ]
}

#[test]
fn enabled_bitmap_records_exactly_the_written_granules_and_disabled_one_is_untouched() {
    if !have_tools() {
        return;
    }
    let size = 64 * MIB;
    let img = create("64M", "cluster_size=65536");
    // b1 gets dirty bits while enabled, then is disabled: they must survive.
    bitmap(&img.path, &["--add"], "b1");
    qemu_io(&img.path, "qcow2", &["write 3M 100k".to_string()]);
    bitmap(&img.path, &["--disable"], "b1");
    bitmap(&img.path, &["--add"], "b0");
    let b1_before = dirty_ranges(&img.path, "b1");
    let written = std::iter::once(3 * MIB..3 * MIB + (100 << 10));
    assert_eq!(b1_before, granules(written, 65536, 64 * MIB));

    let ops = varied_ops(size);
    write_through_engine(&img.path, &ops);

    qemu_img_check(&img.path);
    assert_eq!(flags_of(&img.path, "b0"), vec!["auto"]);
    assert!(flags_of(&img.path, "b1").is_empty());
    let expected = granules(ranges_of(&ops), 65536, size);
    assert_eq!(dirty_ranges(&img.path, "b0"), expected);
    assert_eq!(dirty_ranges(&img.path, "b1"), b1_before);
}

#[test]
fn small_and_large_granularities_record_their_own_granules() {
    if !have_tools() {
        return;
    }
    let size = 64 * MIB;
    for granularity in [512u64, 2 * MIB] {
        let img = create("64M", "cluster_size=65536");
        bitmap(&img.path, &["--add", "-g", &granularity.to_string()], "g");
        let ops = varied_ops(size);
        write_through_engine(&img.path, &ops);
        qemu_img_check(&img.path);
        let info = bitmap_info(&img.path);
        assert_eq!(
            info,
            vec![("g".to_string(), vec!["auto".to_string()], granularity)]
        );
        let expected = granules(ranges_of(&ops), granularity, size);
        assert_eq!(
            dirty_ranges(&img.path, "g"),
            expected,
            "granularity {granularity}"
        );
    }
}

#[test]
fn dirty_bits_from_qemu_and_from_earlier_opens_are_kept() {
    if !have_tools() {
        return;
    }
    let size = 64 * MIB;
    let img = create("64M", "cluster_size=65536");
    bitmap(&img.path, &["--add"], "b0");
    qemu_io(&img.path, "qcow2", &["write 1M 64k", "write 50M 1"]);
    let first = [Op::Write(2 * MIB, 4096), Op::Zero(8 * MIB, 2 * MIB)];
    write_through_engine(&img.path, &first);
    let second = [Op::Write(2 * MIB + 65536 * 3, 10), Op::Write(60 * MIB, MIB)];
    write_through_engine(&img.path, &second);
    qemu_io(&img.path, "qcow2", &["write 33M 4k"]);

    qemu_img_check(&img.path);
    assert_eq!(flags_of(&img.path, "b0"), vec!["auto"]);
    let mut written = vec![
        MIB..MIB + 65536,
        50 * MIB..50 * MIB + 1,
        33 * MIB..33 * MIB + 4096,
    ];
    written.extend(ranges_of(&first));
    written.extend(ranges_of(&second));
    assert_eq!(
        dirty_ranges(&img.path, "b0"),
        granules(written, 65536, size)
    );
}

#[test]
fn tables_and_directory_spanning_several_clusters_stay_valid() {
    if !have_tools() {
        return;
    }
    // 512-byte clusters and granules over 256 MiB: 64 KiB of bitmap data,
    // a 128-entry table of two clusters; twenty long names fill a directory
    // of several clusters.
    let size = 256 * MIB;
    let img = create("256M", "cluster_size=512");
    let names: Vec<String> = (0..20)
        .map(|i| format!("bitmap-with-a-rather-long-name-{i:02}"))
        .collect();
    for name in &names {
        bitmap(&img.path, &["--add", "-g", "512"], name);
    }
    let mut ops: Vec<Op> = (0..256).map(|i| Op::Write(i * MIB + i * 700, 1)).collect();
    // Whole 2 MiB chunks of the bitmap become all ones.
    ops.push(Op::Zero(64 * MIB, 64 * MIB));
    write_through_engine(&img.path, &ops);

    qemu_img_check(&img.path);
    let expected = granules(ranges_of(&ops), 512, size);
    for name in [&names[0], &names[19]] {
        assert_eq!(flags_of(&img.path, name), vec!["auto"]);
        assert_eq!(dirty_ranges(&img.path, name), expected, "{name}");
    }
    // And chainfs reads back what it wrote: one more round trip.
    write_through_engine(&img.path, &[Op::Write(200 * MIB, 512)]);
    qemu_img_check(&img.path);
    let mut more = ranges_of(&ops);
    more.push(200 * MIB..200 * MIB + 512);
    assert_eq!(
        dirty_ranges(&img.path, &names[7]),
        granules(more, 512, size)
    );
}

#[test]
fn a_crash_leaves_enabled_bitmaps_in_use_and_the_image_consistent() {
    if !have_tools() {
        return;
    }
    let img = create("64M", "cluster_size=65536");
    bitmap(&img.path, &["--add"], "b0");
    bitmap(&img.path, &["--add", "--disable"], "b1");
    let storage = Arc::new(MemStorage::from_bytes(std::fs::read(&img.path).unwrap()));
    let image = open(Arc::clone(&storage) as Arc<dyn Storage>, true);
    apply(&image, &varied_ops(64 * MIB));
    image.flush().unwrap();
    apply(&image, &[Op::Write(5 * MIB, 100)]);
    let crashed = storage.crash(CrashMode::DropAll).contents();
    drop(image);
    std::fs::write(&img.path, crashed).unwrap();

    assert_no_check_errors(&img.path);
    let mut b0 = flags_of(&img.path, "b0");
    b0.sort();
    assert_eq!(b0, vec!["auto", "in-use"]);
    assert!(flags_of(&img.path, "b1").is_empty());

    // An inconsistent bitmap is left alone by a later writer, as by QEMU.
    write_through_engine(&img.path, &[Op::Write(0, 4096)]);
    assert_no_check_errors(&img.path);
    let mut b0 = flags_of(&img.path, "b0");
    b0.sort();
    assert_eq!(b0, vec!["auto", "in-use"]);
    assert!(dirty_ranges(&img.path, "b1").is_empty());
}

#[test]
fn a_crash_at_any_point_of_close_leaves_the_old_or_the_new_bitmap() {
    if !have_tools() {
        return;
    }
    let size = 64 * MIB;
    let img = create("64M", "cluster_size=65536");
    bitmap(&img.path, &["--add"], "b0");
    qemu_io(&img.path, "qcow2", &["write 7M 4k"]);
    let storage = Arc::new(MemStorage::from_bytes(std::fs::read(&img.path).unwrap()));
    let image = open(Arc::clone(&storage) as Arc<dyn Storage>, true);
    let ops = varied_ops(size);
    apply(&image, &ops);
    image.flush().unwrap();
    let before_close = storage.op_count();
    image.close().unwrap();
    let mut written = ranges_of(&ops);
    written.push(7 * MIB..7 * MIB + 4096);
    let expected = granules(written, 65536, size);

    // Every instant of close, each with the unsynced writes lost or torn.
    let (mut old, mut new) = (0, 0);
    for point in before_close..=storage.op_count() {
        for mode in [
            CrashMode::DropAll,
            CrashMode::TornSubset { seed: point as u64 },
        ] {
            let crashed = storage.crash_at(point, mode).contents();
            std::fs::write(&img.path, crashed).unwrap();
            assert_no_check_errors(&img.path);
            let flags = flags_of(&img.path, "b0");
            if flags == ["auto"] {
                assert_eq!(dirty_ranges(&img.path, "b0"), expected, "crash at {point}");
                new += 1;
            } else {
                assert!(
                    flags.contains(&"in-use".to_string()),
                    "{flags:?} at {point}"
                );
                old += 1;
            }
        }
    }
    assert!(old > 0 && new > 0, "old {old}, new {new}");
}

#[test]
fn a_crash_while_opening_leaves_the_bitmap_clean_in_use_or_ignored() {
    if !have_tools() {
        return;
    }
    let img = create("64M", "cluster_size=65536");
    bitmap(&img.path, &["--add"], "b0");
    qemu_io(&img.path, "qcow2", &["write 7M 4k"]);
    let storage = Arc::new(MemStorage::from_bytes(std::fs::read(&img.path).unwrap()));
    let image = open(Arc::clone(&storage) as Arc<dyn Storage>, true);
    let opened = storage.op_count();
    drop(image);

    let (mut clean, mut in_use, mut ignored) = (0, 0, 0);
    for point in 0..=opened {
        for mode in [
            CrashMode::DropAll,
            CrashMode::TornSubset { seed: point as u64 },
        ] {
            let crashed = storage.crash_at(point, mode).contents();
            std::fs::write(&img.path, crashed).unwrap();
            assert_no_check_errors(&img.path);
            let info = bitmap_info(&img.path);
            match info.first().map(|(_, flags, _)| flags.len()) {
                // The autoclear bit was cleared: QEMU ignores the bitmaps.
                None => ignored += 1,
                Some(1) => {
                    let expected =
                        granules(std::iter::once(7 * MIB..7 * MIB + 4096), 65536, 64 * MIB);
                    assert_eq!(dirty_ranges(&img.path, "b0"), expected, "crash at {point}");
                    clean += 1;
                }
                Some(_) => in_use += 1,
            }
        }
    }
    assert!(
        clean > 0 && in_use > 0 && ignored > 0,
        "{clean} {in_use} {ignored}"
    );
}

#[test]
fn a_full_disk_while_closing_leaves_the_image_consistent() {
    if !have_tools() {
        return;
    }
    let img = create("64M", "cluster_size=65536");
    bitmap(&img.path, &["--add"], "b0");
    let pristine = std::fs::read(&img.path).unwrap();
    let mut failures = 0;
    for budget in (0..60).step_by(3) {
        let storage = Arc::new(MemStorage::from_bytes(pristine.clone()));
        let image = open(Arc::clone(&storage) as Arc<dyn Storage>, true);
        apply(&image, &varied_ops(64 * MIB));
        image.flush().unwrap();
        storage.fail_writes_after(budget, libc::ENOSPC);
        if image.close().is_err() {
            failures += 1;
        }
        storage.clear_faults();
        drop(image);
        std::fs::write(&img.path, storage.contents()).unwrap();
        assert_no_check_errors(&img.path);
        let flags = flags_of(&img.path, "b0");
        assert!(
            flags == ["auto"] || flags.contains(&"in-use".to_string()),
            "{flags:?}"
        );
    }
    assert!(failures > 0);
}

#[test]
fn switching_writes_on_and_off_in_place_loads_and_stores_the_bitmaps() {
    if !have_tools() {
        return;
    }
    let size = 64 * MIB;
    let img = create("64M", "cluster_size=65536");
    bitmap(&img.path, &["--add"], "b0");
    let storage = Arc::new(FileStorage::open(&img.path, true).unwrap());
    let image = open(storage, false);
    let rounds = [[Op::Write(MIB, 10)], [Op::Zero(9 * MIB, 3 * MIB)]];
    for ops in &rounds {
        image.set_writable(true).unwrap();
        assert_eq!(flags_of(&img.path, "b0").len(), 2, "in_use while writable");
        apply(&image, ops);
        image.set_writable(false).unwrap();
        qemu_img_check(&img.path);
        assert_eq!(flags_of(&img.path, "b0"), vec!["auto"]);
    }
    drop(image);
    let written = rounds.iter().flatten().map(|op| op.range());
    assert_eq!(
        dirty_ranges(&img.path, "b0"),
        granules(written, 65536, size)
    );
}

#[test]
fn a_read_only_open_changes_nothing() {
    if !have_tools() {
        return;
    }
    let img = create("64M", "cluster_size=65536");
    bitmap(&img.path, &["--add"], "b0");
    let before = std::fs::read(&img.path).unwrap();
    let image = open(
        Arc::new(FileStorage::open(&img.path, false).unwrap()),
        false,
    );
    image.close().unwrap();
    drop(image);
    assert_eq!(std::fs::read(&img.path).unwrap(), before);
}

/// `qemu-img check` finds no corruption (a crash may leak clusters).
fn assert_no_check_errors(image: &Path) {
    let out = run_any("qemu-img", &["check", "--output=json", path_str(image)]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let count = |key: &str| report.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    assert_eq!(
        (count("check-errors"), count("corruptions")),
        (0, 0),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
