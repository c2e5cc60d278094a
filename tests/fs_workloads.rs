//! Real workloads on `active`: fio with verification from four jobs, and
//! an ext4 file system made, filled and checked on it, across a remount.
//! After each unmount QEMU finds the images clean and equal to what the
//! mount showed.

mod common;

use std::path::{Path, PathBuf};

use common::chain::overlay_with;
use common::mount::{mount_default, mounted, read_all, Fixture};
use common::{assert_same_bytes, fio_verify, pattern, qemu_img_check, run_any, run_ok};
use common::{convert_to_raw, path_str, qemu_img_in, qemu_io, require_all};

/// base.qcow2 (64 KiB clusters, data in places) <- top.qcow2 (4 KiB
/// clusters, so mixed-size writes hit partial clusters and COW).
fn chain(dir: &Path, size: &str) -> PathBuf {
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", size]);
    let writes = ["write -P 0x42 0 8M", "write -P 0x43 70M 3M"];
    qemu_io(&dir.join("base.qcow2"), "qcow2", &writes);
    let backing = Some(("base.qcow2", "qcow2"));
    overlay_with(dir, "top.qcow2", backing, size, "cluster_size=4096");
    dir.join("top.qcow2")
}

fn fio(active: &Path, direct: bool, offset: &str) {
    let direct = format!("--direct={}", u8::from(direct));
    let offset = format!("--offset={offset}");
    let output = fio_verify(active, &[&offset, "--offset_increment=12M", &direct]);
    assert!(
        output.status.success(),
        "fio {direct} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // fio's summary, for whoever reads the test log.
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout
        .lines()
        .filter(|l| l.contains("WRITE:") || l.contains("READ:"))
    {
        eprintln!("fio {direct}: {}", line.trim());
    }
}

#[test]
fn fio_random_writes_from_four_jobs_verify_and_qemu_agrees_after_unmount() {
    let Some(Fixture { dir: _dir, top, m }) = mounted(&["fio"], |d| chain(d, "128M")) else {
        return;
    };
    let active = m.path("active");
    fio(&active, true, "0");
    fio(&active, false, "48M");
    let shown = read_all(&active);
    m.unmount();
    qemu_img_check(&top);
    assert_same_bytes(&convert_to_raw(&top), &shown, "top after fio vs active");
}

/// Files to copy into the ext4 image: small, medium, and one spanning many
/// clusters.
fn source_files(dir: &Path) -> Vec<(String, PathBuf)> {
    [
        ("small", 1000usize),
        ("medium", 300 << 10),
        ("large", 5 << 20),
    ]
    .iter()
    .enumerate()
    .map(|(i, (name, len))| {
        let path = dir.join(format!("src-{name}"));
        std::fs::write(&path, pattern(i as u64 + 1, 0, *len)).unwrap();
        (name.to_string(), path)
    })
    .collect()
}

fn e2fsck_clean(image: &Path) {
    let output = run_any("e2fsck", &["-fn", path_str(image)]);
    assert!(
        output.status.success(),
        "e2fsck -fn {}:\n{}\n{}",
        image.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Dumps every file back out of the ext4 image and compares it.
fn files_read_back(image: &Path, files: &[(String, PathBuf)], out: &Path) {
    for (name, source) in files {
        let dumped = out.join(format!("dump-{name}"));
        let _ = std::fs::remove_file(&dumped);
        let request = format!("dump {name} {}", path_str(&dumped));
        run_ok("debugfs", &["-R", &request, path_str(image)]);
        assert_same_bytes(&read_all(&dumped), &read_all(source), name);
    }
}

#[test]
fn ext4_on_active_is_clean_before_and_after_a_remount() {
    if !require_all(&["mkfs.ext4", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path(), "96M");
    let files = source_files(dir.path());
    let m = mount_default(&top, dir.path());
    let active = m.path("active");
    run_ok("mkfs.ext4", &["-q", "-F", path_str(&active)]);
    for (name, source) in &files {
        let request = format!("write {} {name}", path_str(source));
        run_ok("debugfs", &["-w", "-R", &request, path_str(&active)]);
    }
    e2fsck_clean(&active);
    files_read_back(&active, &files, dir.path());
    m.unmount();
    qemu_img_check(&top);

    let m = mount_default(&top, dir.path());
    let active = m.path("active");
    e2fsck_clean(&active);
    files_read_back(&active, &files, dir.path());
    m.unmount();
    qemu_img_check(&top);
}
