//! Every way a mount ends closes the images cleanly: an Unmounter (what a
//! signal handler uses), an outside `umount`, and an unmount while a reader
//! still holds a file open (detached lazily, closed when the reader is done).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chainfs::fs::{FsError, Mount, MountOptions};
use chainfs::jobs::Jobs;
use common::mount::{mounted, Fixture};
use common::{create_qcow2, path_str, require_all, MIB};
use common::{qemu_img_check, run_ok};

fn image(dir: &Path) -> PathBuf {
    let top = dir.join("disk.qcow2");
    create_qcow2(path_str(&top), "8M", "");
    top
}

fn is_mounted(mnt: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mnt = mnt.canonicalize().unwrap_or_else(|_| mnt.to_path_buf());
    mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(path_str(&mnt)))
}

#[test]
fn an_outside_umount_ends_the_mount_and_closes_the_images() {
    let Some(Fixture { dir: _dir, top, m }) = mounted(&["umount"], image) else {
        return;
    };
    assert!(
        is_mounted(&m.mnt),
        "the mount is live when Mount::new returns"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("active"))
        .unwrap()
        .write_all_at(&[9; 4096], MIB)
        .unwrap();
    run_ok("umount", &[path_str(&m.mnt)]);
    let mnt = m.mnt.clone();
    m.join();
    assert!(!is_mounted(&mnt));
    qemu_img_check(&top);
}

#[test]
fn unmounting_while_a_reader_holds_a_file_detaches_and_closes_after_it() {
    let Some(Fixture { dir: _dir, top, m }) = mounted(&[], image) else {
        return;
    };
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("active"))
        .unwrap();
    m.request_unmount();
    assert!(!is_mounted(&m.mnt), "detached from the namespace at once");
    // The holder keeps working until it closes.
    held.write_all_at(&[5; 4096], 0).unwrap();
    let mut back = [0; 4096];
    held.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, [5; 4096]);
    std::thread::sleep(Duration::from_millis(100));
    drop(held);
    m.join();
    qemu_img_check(&top);
    assert_eq!(common::convert_to_raw(&top)[..4096], [5; 4096]);
}

#[test]
fn a_bad_mount_point_is_refused_by_name_and_releases_the_images() {
    if !require_all(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = image(dir.path());
    let open = || {
        let options = chainfs::chain::ChainOptions {
            writable: true,
            ..Default::default()
        };
        // Another test thread that forks a child (qemu-img) lends it a copy
        // of every descriptor until its exec, lock included: a lock this
        // test just let go of may stay held that long, so a conflict is
        // retried for a moment. An image never released still fails.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let chain = loop {
            match chainfs::chain::Chain::open(&top, &options) {
                Ok(chain) => break chain,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("retrying the open: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        Jobs::new(chain, false)
    };
    let cases = [
        (dir.path().join("missing"), libc::ENOENT),
        (top.clone(), libc::ENOTDIR),
        (dir.path().to_path_buf(), libc::ENOTEMPTY),
    ];
    for (mnt, errno) in cases {
        let error = Mount::new(open(), &mnt, &MountOptions::default()).unwrap_err();
        assert!(matches!(error, FsError::Mountpoint { .. }), "{error}");
        assert_eq!(error.errno(), errno, "{error}");
        assert!(error.to_string().contains(path_str(&mnt)), "{error}");
    }
    // Every failed attempt released the image: it opens writable again.
    drop(open());
    qemu_img_check(&top);
}
