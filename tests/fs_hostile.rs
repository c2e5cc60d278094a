//! The mount as a hostile or careless user meets it, through the real
//! daemon: opening a ctl file many times costs the daemon no memory per
//! open, a command write the kernel splits starts nothing, and node files
//! never show others an image its own mode keeps from them.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use common::chain::small_chain;
use common::cli::{chainfs, chainfs_processes, run, MountGuard};
use common::{path_str, require_fuse};

/// A two-node chain (`base.qcow2` under `top.qcow2`) mounted by the daemon.
struct Mounted {
    // Dropped first: the guard looks at the mount point, in `dir`.
    _guard: MountGuard,
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Mounted {
    /// Makes the chain, sets each image's mode (base first), and mounts.
    fn new(modes: [u32; 2]) -> Mounted {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = small_chain(dir.path());
        for (image, mode) in images.iter().zip(modes) {
            std::fs::set_permissions(image, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let guard = MountGuard(mnt.clone());
        chainfs(["mount", path_str(&images[1]), path_str(&mnt)]).ok();
        Mounted {
            dir,
            mnt,
            _guard: guard,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// The daemon's resident set, in KiB.
    fn daemon_rss_kib(&self) -> u64 {
        let daemons = chainfs_processes(self.dir.path());
        assert_eq!(daemons.len(), 1, "one daemon");
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", daemons[0])).expect("daemon status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    fn status_json(&self) -> String {
        std::fs::read_to_string(self.path("ctl/status.json")).expect("status.json")
    }

    fn unmount(self) {
        chainfs(["umount", path_str(&self.mnt)]).ok();
    }
}

/// Lets this process hold `n` more descriptors than it has open now.
fn allow_descriptors(n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill and setrlimit
    // to read; neither keeps the pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let wanted = (n + 256).min(limit.rlim_max);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}

#[test]
fn a_thousand_opens_of_ctl_events_do_not_grow_the_daemon() {
    if !require_fuse() {
        return;
    }
    let m = Mounted::new([0o644, 0o644]);
    // Fill the event log (1,024 events kept) with long refusals: about
    // 700 KiB, which a copy per open would turn into about 700 MiB.
    let mut command = File::options()
        .write(true)
        .open(m.path("ctl/command"))
        .expect("open ctl/command");
    for i in 0..1100 {
        let line = format!("bogus-{i} {}\n", "x".repeat(400));
        command.write_all(line.as_bytes()).expect_err("refused");
    }
    drop(command);
    let log = std::fs::read(m.path("ctl/events")).expect("events");
    assert!(log.len() > 500 << 10, "a large log: {} bytes", log.len());

    const OPENS: u64 = 1000;
    allow_descriptors(OPENS);
    let before = m.daemon_rss_kib();
    let handles: Vec<File> = (0..OPENS)
        .map(|_| File::open(m.path("ctl/events")).expect("open ctl/events"))
        .collect();
    let after = m.daemon_rss_kib();
    drop(handles);
    assert!(
        after.saturating_sub(before) < 8 << 10,
        "{OPENS} opens grew the daemon from {before} KiB to {after} KiB"
    );
    m.unmount();
}

#[test]
fn a_command_write_the_kernel_splits_starts_no_job() {
    if !require_fuse() {
        return;
    }
    let m = Mounted::new([0o644, 0o644]);
    // 2 MiB reach the daemon as two 1 MiB pieces; the first used to start
    // a stream whose id was cut at the split.
    let big = m.dir.path().join("big-command");
    let id = "j".repeat((2 << 20) - "stream id=\n".len());
    std::fs::write(&big, format!("stream id={id}\n")).expect("write command file");
    let dd = run(Command::new("dd").args([
        &format!("if={}", path_str(&big)),
        &format!("of={}", path_str(&m.path("ctl/command"))),
        "bs=2M",
        "count=1",
    ]));
    assert_ne!(dd.code, Some(0), "refused: {dd:?}");
    assert!(dd.stderr.contains("Invalid argument"), "{dd:?}");
    let jobs = m.status_json();
    // Not the JSON itself in the message: its id would be 1 MiB long.
    assert!(jobs.trim() == "[]", "a job started ({} bytes)", jobs.len());

    // A shell reusing the descriptor writes each command at a later
    // offset: each is still one whole command.
    let command = path_str(&m.path("ctl/command")).to_owned();
    let script = "exec 3>\"$1\" && echo 'stream id=a speed=64K' >&3 && \
                  echo 'set-speed id=a speed=128K' >&3 && echo 'cancel id=a' >&3";
    run(Command::new("sh").args(["-c", script, "sh", &command])).ok();
    assert!(m.status_json().contains("\"a\""), "{}", m.status_json());
    m.unmount();
}

#[test]
fn node_files_never_show_others_what_the_image_hides() {
    if !require_fuse() {
        return;
    }
    let mode = |m: &Mounted, name: &str| {
        std::fs::metadata(m.path(name))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    };
    // 0600 on disk: 0400 in the mount, the active node 0600.
    let private = Mounted::new([0o600, 0o600]);
    assert_eq!(mode(&private, "base.qcow2"), 0o400);
    assert_eq!(mode(&private, "top.qcow2"), 0o600);
    assert_eq!(mode(&private, "active"), 0o600);
    private.unmount();

    // Group may read the base only; everyone may read the top.
    let mixed = Mounted::new([0o640, 0o644]);
    assert_eq!(mode(&mixed, "base.qcow2"), 0o440);
    assert_eq!(mode(&mixed, "top.qcow2"), 0o644);
    assert_eq!(mode(&mixed, "active"), 0o644);
    mixed.unmount();
}
