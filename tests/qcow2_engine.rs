//! The qcow2 engine on single images, against qemu-img and qemu-io as
//! oracles: reads equal `qemu-img convert -O raw`, and after writes through
//! the engine `qemu-img check` is clean and the content equals a model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chainfs::format::Qcow2;
use chainfs::format::{BackingReader, NoBacking, OpenOptions, Result as FormatResult};
use chainfs::storage::{FileStorage, MemStorage, Storage};
use rand::{Rng, SeedableRng};

mod common;
use common::{
    convert_to_raw, create_qcow2, path_str, qemu_img_check, qemu_io, require_tool, run_ok,
};

fn open(image: &Path, writable: bool) -> Qcow2 {
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(image, writable).unwrap());
    let dir = image.parent().unwrap().to_path_buf();
    let opener = move |name: &str, writable: bool| -> std::io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(&dir.join(name), writable)?))
    };
    Qcow2::open(
        storage,
        &OpenOptions {
            writable,
            cache: chainfs::format::MetadataCache::new(1 << 20),
        },
        &opener,
    )
    .unwrap()
}

fn read_all(image: &Qcow2, chunk: usize) -> Vec<u8> {
    let size = image.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos);
        let unheld = image.read(pos as u64, &mut out[pos..pos + n]).unwrap();
        for r in unheld {
            out[r.start as usize..r.end as usize].fill(0);
        }
        pos += n;
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
}

fn fixture(create_opts: &str, size: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.qcow2");
    create_qcow2(path_str(&image), size, create_opts);
    Fixture { _dir: dir, image }
}

const PATTERN_WRITES: &[&str] = &[
    "write -P 0x11 0 4k",
    "write -P 0x22 65000 70000",
    "write -P 0x33 1M 3M",
    "write -z 2M 64k",
    "write -P 0x44 5000000 1",
];

#[test]
fn reads_equal_qemu_img_convert_for_each_layout() {
    if !require_tool("qemu-img") {
        return;
    }
    for opts in [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
    ] {
        let f = fixture(opts, "8M");
        qemu_io(&f.image, "qcow2", PATTERN_WRITES);
        let image = open(&f.image, false);
        for chunk in [4096, 65536 + 512, 1 << 20] {
            assert!(
                read_all(&image, chunk) == convert_to_raw(&f.image),
                "{opts}: content differs (chunk {chunk})"
            );
        }
    }
}

/// An in-memory model of what the guest should read.
struct Model(Vec<u8>);

impl BackingReader for Model {
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> FormatResult<()> {
        buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn has_backing(&self) -> bool {
        true
    }
}

#[test]
fn random_writes_and_zeroes_leave_a_clean_image_equal_to_the_model() {
    if !require_tool("qemu-img") {
        return;
    }
    for opts in [
        "cluster_size=512",
        "cluster_size=512,refcount_bits=64",
        "cluster_size=2M",
        "extended_l2=on",
        "cluster_size=4096,refcount_bits=1",
        "compat=0.10",
    ] {
        let size = 24u64 << 20;
        let f = fixture(opts, &size.to_string());
        let mut model = vec![0u8; size as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        {
            let image = open(&f.image, true);
            for i in 0..400 {
                let len = rng.random_range(1..200_000usize);
                let offset = rng.random_range(0..size as usize - len);
                if i % 7 == 3 {
                    image
                        .zero_range(offset as u64, len as u64, &NoBacking)
                        .unwrap();
                    model[offset..offset + len].fill(0);
                } else {
                    let byte = rng.random::<u8>() | 1;
                    let data = vec![byte; len];
                    image.write(offset as u64, &data, &NoBacking).unwrap();
                    model[offset..offset + len].copy_from_slice(&data);
                }
            }
            assert!(
                read_all(&image, 1 << 20) == model,
                "{opts}: engine read differs"
            );
            image.close().unwrap();
        }
        qemu_img_check(&f.image);
        assert!(
            convert_to_raw(&f.image) == model,
            "{opts}: qemu-img sees other data"
        );
    }
}

#[test]
fn partial_writes_complete_clusters_from_the_backing_view() {
    if !require_tool("qemu-img") {
        return;
    }
    for opts in ["cluster_size=64k", "extended_l2=on", "compat=0.10"] {
        let f = fixture(opts, "4M");
        let mut model = Model((0..4u32 << 20).map(|i| (i % 251) as u8).collect());
        let image = open(&f.image, true);
        image.write(70_000, &[9u8; 1000], &model).unwrap();
        model.0[70_000..71_000].fill(9);
        image.zero_range(200_000, 300_000, &model).unwrap();
        model.0[200_000..500_000].fill(0);
        let mut out = vec![0u8; 4 << 20];
        let unheld = image.read(0, &mut out).unwrap();
        for r in unheld {
            let (s, e) = (r.start as usize, r.end as usize);
            out[s..e].copy_from_slice(&model.0[s..e]);
        }
        assert!(out == model.0, "{opts}: view differs");
        image.close().unwrap();
        qemu_img_check(&f.image);
    }
}

#[test]
fn writes_over_an_internal_snapshot_copy_shared_clusters_first() {
    if !require_tool("qemu-img") {
        return;
    }
    for opts in ["cluster_size=64k", "extended_l2=on", "cluster_size=512"] {
        let f = fixture(opts, "4M");
        qemu_io(&f.image, "qcow2", &["write -P 0x5a 0 4M"]);
        run_ok("qemu-img", &["snapshot", "-c", "s1", path_str(&f.image)]);
        let mut model = convert_to_raw(&f.image);
        {
            let image = open(&f.image, true);
            for (offset, len) in [(1000u64, 100usize), (65536, 65536), (3 << 20, 300_000)] {
                image.write(offset, &vec![0xa5; len], &NoBacking).unwrap();
                model[offset as usize..offset as usize + len].fill(0xa5);
            }
            image.zero_range(2 << 20, 1 << 19, &NoBacking).unwrap();
            model[2 << 20..(2 << 20) + (1 << 19)].fill(0);
            image.close().unwrap();
        }
        qemu_img_check(&f.image);
        assert!(
            convert_to_raw(&f.image) == model,
            "{opts}: active layer differs"
        );
        let snap = f.image.with_extension("snap.raw");
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-l",
                "snapshot.name=s1",
                "-O",
                "raw",
                path_str(&f.image),
                path_str(&snap),
            ],
        );
        assert!(
            std::fs::read(&snap).unwrap() == vec![0x5a; 4 << 20],
            "{opts}: the snapshot changed"
        );
    }
}

#[test]
fn external_data_files_read_and_write_with_and_without_raw_mode() {
    if !require_tool("qemu-img") {
        return;
    }
    for raw in ["off", "on"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img.qcow2");
        let data = dir.path().join("img.data");
        let opts = format!("data_file={},data_file_raw={raw}", path_str(&data));
        create_qcow2(path_str(&image), "4M", &opts);
        qemu_io(&image, "qcow2", PATTERN_WRITES[..3].as_ref());
        let mut model = convert_to_raw(&image);
        {
            let engine = open(&image, true);
            assert!(
                read_all(&engine, 65536) == model,
                "data_file_raw={raw}: read differs"
            );
            engine.write(3 << 20, &[0x77; 70_000], &NoBacking).unwrap();
            model[3 << 20..(3 << 20) + 70_000].fill(0x77);
            engine.zero_range(0, 65536, &NoBacking).unwrap();
            model[..65536].fill(0);
            engine.close().unwrap();
        }
        qemu_img_check(&image);
        assert!(
            convert_to_raw(&image) == model,
            "data_file_raw={raw}: differs"
        );
        if raw == "on" {
            assert!(
                std::fs::read(&data).unwrap()[..4 << 20] == model[..],
                "raw data file"
            );
        }
    }
}

#[test]
fn concurrent_writers_and_readers_keep_the_image_consistent() {
    if !require_tool("qemu-img") {
        return;
    }
    for opts in [
        "cluster_size=4096",
        "extended_l2=on",
        "cluster_size=512,refcount_bits=1",
    ] {
        let size = 16u64 << 20;
        let f = fixture(opts, &size.to_string());
        let image = Arc::new(open(&f.image, true));
        let region = size / 4;
        let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    let image = Arc::clone(&image);
                    scope.spawn(move || {
                        let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                        let mut model = vec![0u8; region as usize];
                        for i in 0..300 {
                            let len = rng.random_range(1..40_000usize);
                            let at = rng.random_range(0..region as usize - len);
                            let guest = t * region + at as u64;
                            if i % 5 == 0 {
                                image.zero_range(guest, len as u64, &NoBacking).unwrap();
                                model[at..at + len].fill(0);
                            } else {
                                let data = vec![rng.random::<u8>() | 1; len];
                                image.write(guest, &data, &NoBacking).unwrap();
                                model[at..at + len].copy_from_slice(&data);
                            }
                            let mut back = vec![0u8; len];
                            let unheld = image.read(guest, &mut back).unwrap();
                            for r in unheld {
                                let s = (r.start - guest) as usize;
                                back[s..s + (r.end - r.start) as usize].fill(0);
                            }
                            assert!(back == model[at..at + len], "read-after-write");
                        }
                        model
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        image.close().unwrap();
        drop(image);
        qemu_img_check(&f.image);
        assert!(
            convert_to_raw(&f.image) == models.concat(),
            "{opts}: differs"
        );
    }
}

#[test]
fn compressed_clusters_read_and_are_copied_before_a_write() {
    if !require_tool("qemu-img") {
        return;
    }
    for (kind, cluster) in [
        ("zlib", "65536"),
        ("zstd", "65536"),
        ("zlib", "512"),
        ("zstd", "2M"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        let image = dir.path().join("img.qcow2");
        let mut model: Vec<u8> = (0..6u32 << 20).map(|i| ((i / 1000) % 7) as u8).collect();
        std::fs::write(&raw, &model).unwrap();
        let opts = format!("compression_type={kind},cluster_size={cluster}");
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &opts,
                path_str(&raw),
                path_str(&image),
            ],
        );
        {
            let engine = open(&image, true);
            assert!(read_all(&engine, 100_000) == model, "{opts}: read differs");
            for (offset, len) in [(100u64, 10usize), (70_000, 200_000), (5 << 20, 1 << 20)] {
                engine.write(offset, &vec![0xee; len], &NoBacking).unwrap();
                model[offset as usize..offset as usize + len].fill(0xee);
            }
            engine.zero_range(3 << 20, 1 << 20, &NoBacking).unwrap();
            model[3 << 20..4 << 20].fill(0);
            assert!(
                read_all(&engine, 1 << 20) == model,
                "{opts}: read after write differs"
            );
            engine.close().unwrap();
        }
        qemu_img_check(&image);
        assert!(
            convert_to_raw(&image) == model,
            "{opts}: qemu-img sees other data"
        );
    }
}

#[test]
fn populate_fills_only_what_the_image_lacks_and_never_reverts_a_write() {
    if !require_tool("qemu-img") {
        return;
    }
    for opts in [
        "cluster_size=64k",
        "extended_l2=on",
        "cluster_size=512",
        "compat=0.10",
    ] {
        let size = 4u64 << 20;
        let f = fixture(opts, &size.to_string());
        let below = Model((0..size as u32).map(|i| (i % 253) as u8 | 1).collect());
        let image = Arc::new(open(&f.image, true));
        let mut model = below.0.clone();
        image.write(10_000, &[0xaa; 5000], &below).unwrap();
        model[10_000..15_000].fill(0xaa);
        image.zero_range(1 << 20, 1 << 20, &below).unwrap();
        model[1 << 20..2 << 20].fill(0);
        // A guest writer races the population of the whole image.
        let writes: Vec<(u64, usize)> = (0..200u64)
            .map(|i| (i * 19_997 % (size - 3000), 3000))
            .collect();
        std::thread::scope(|scope| {
            let writer = Arc::clone(&image);
            let below_ref = &below;
            let writes_ref = &writes;
            scope.spawn(move || {
                for &(at, len) in writes_ref {
                    writer.write(at, &vec![0x5c; len], below_ref).unwrap();
                }
            });
            let mut pos = 0;
            while pos < size {
                let n = (size - pos).min(300_000);
                let slice = &below.0[pos as usize..(pos + n) as usize];
                image.populate(pos, n, Some(slice), &below).unwrap();
                pos += n;
            }
        });
        for &(at, len) in &writes {
            model[at as usize..at as usize + len].fill(0x5c);
        }
        let mut out = vec![0u8; size as usize];
        let unheld = image.read(0, &mut out).unwrap();
        assert!(unheld.is_empty(), "{opts}: populate left holes {unheld:?}");
        assert!(out == model, "{opts}: populate overwrote or lost data");
        image.close().unwrap();
        drop(image);
        qemu_img_check(&f.image);
    }
}

#[test]
fn an_image_switches_between_read_only_and_writable_in_place() {
    if !require_tool("qemu-img") {
        return;
    }
    let f = fixture("cluster_size=4096", "1M");
    qemu_io(&f.image, "qcow2", &["write -P 0x21 0 100k"]);
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&f.image, true).unwrap());
    let no_files = |_: &str, _: bool| -> std::io::Result<Arc<dyn Storage>> { unreachable!() };
    let options = OpenOptions {
        writable: false,
        cache: chainfs::format::MetadataCache::new(1 << 20),
    };
    let image = Qcow2::open(storage, &options, &no_files).unwrap();
    let mut cached = vec![0u8; 8192];
    image.read(0, &mut cached).unwrap();
    assert!(
        image.write(0, &[1], &NoBacking).is_err(),
        "read-only image took a write"
    );
    image.set_writable(true).unwrap();
    image.write(4096, &[0x42; 4096], &NoBacking).unwrap();
    image.write(200_000, &[0x43; 10], &NoBacking).unwrap();
    // The same caches serve the reader: it sees the write at once.
    image.read(0, &mut cached).unwrap();
    assert!(cached[4096..] == [0x42; 4096][..]);
    image.set_writable(false).unwrap();
    assert!(
        image.write(0, &[1], &NoBacking).is_err(),
        "disabled image took a write"
    );
    qemu_img_check(&f.image);
    let raw = convert_to_raw(&f.image);
    assert!(raw[4096..8192] == [0x42; 4096][..] && raw[200_000..200_010] == [0x43; 10][..]);

    let read_only_fd: Arc<dyn Storage> = Arc::new(FileStorage::open(&f.image, false).unwrap());
    let image = Qcow2::open(read_only_fd, &options, &no_files).unwrap();
    assert!(
        image.set_writable(true).is_err(),
        "a read-only descriptor cannot take writes"
    );
}

/// Each reservation of clusters syncs the image, and a sync also writes
/// back every dirty data page: a sequential fill (what a stream or commit
/// does to its destination) must sync a number of times that grows with the
/// log of what it writes, not with its size. A clean close then leaves no
/// reserved clusters past the last one used.
#[test]
fn a_sequential_fill_syncs_rarely_and_a_clean_close_leaves_no_reserved_tail() {
    if !require_tool("qemu-img") {
        return;
    }
    let fx = fixture("cluster_size=65536", "1G");
    let storage = Arc::new(MemStorage::from_bytes(std::fs::read(&fx.image).unwrap()));
    let image = common::engine::open_qcow2(storage.clone(), true, 1 << 20);
    let data = vec![0x5a; 1 << 20];
    let before = storage.sync_count();
    for mib in 0..256u64 {
        image.write(mib << 20, &data, &NoBacking).unwrap();
    }
    let syncs = storage.sync_count() - before;
    // Batches of a fixed 8 MiB took 32 syncs here; doubling ones take 6.
    assert!(syncs <= 10, "256 MiB written with {syncs} syncs");
    image.close().unwrap();
    let contents = storage.contents();
    // 256 MiB of data, its L2 table and refcount block, the header's
    // clusters: well under one more MiB.
    assert!(
        contents.len() < (257 << 20),
        "closed image is {} bytes: a reserved tail was left",
        contents.len()
    );
    std::fs::write(&fx.image, &contents).unwrap();
    qemu_img_check(&fx.image);
    assert_eq!(convert_to_raw(&fx.image)[..256 << 20], data.repeat(256)[..]);
}

/// A write into a new cluster whose other bytes read as zeros writes only
/// its own bytes into a cluster made zeros by deallocation, as QEMU's
/// `is_zero_cow` does, so a 4 KiB write into an empty overlay allocates
/// 4 KiB of host storage, not a cluster. The cluster it lands on may have
/// held data before (QEMU does not always discard what it frees): that
/// data must not show.
#[test]
fn a_write_into_a_new_cluster_over_zeros_writes_only_its_bytes_and_hides_what_the_cluster_held() {
    if !require_tool("qemu-img") {
        return;
    }
    let f = fixture("cluster_size=65536", "4M");
    // Free clusters past the image's metadata that still hold old bytes.
    let stale_start = std::fs::metadata(&f.image).unwrap().len();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&f.image)
            .unwrap();
        file.write_all(&vec![0xaa; 1 << 20]).unwrap();
    }
    let image = open(&f.image, true);
    image.write(8192, &[0x55; 4096], &NoBacking).unwrap();
    let mut expected = vec![0u8; 4 << 20];
    expected[8192..12288].fill(0x55);
    assert!(read_all(&image, 1 << 20) == expected, "view differs");
    image.close().unwrap();
    qemu_img_check(&f.image);
    assert!(
        convert_to_raw(&f.image) == expected,
        "qemu reads other bytes"
    );
    // Every byte past `stale_start` was written before the image was
    // opened; a hole there is the part of the data cluster the guest did
    // not write.
    let len = std::fs::metadata(&f.image).unwrap().len();
    let hole = FileStorage::open(&f.image, false)
        .unwrap()
        .seek_hole(stale_start)
        .unwrap();
    assert!(
        hole < len,
        "no hole in the clusters allocated: the copy-on-write wrote its zeros"
    );
}
