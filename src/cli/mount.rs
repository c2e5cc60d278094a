//! `chainfs mount [OPTIONS] IMAGE MOUNTPOINT`.
//!
//! The order is what makes a failed mount harmless (SPEC §2): the mount point
//! and the FUSE device are checked before any image is opened, and the chain
//! is opened before anything is mounted, so a failure leaves nothing mounted
//! and no image touched.
//!
//! 1. [`MountPlan::prepare`]: mount point, `/dev/fuse`, log file; no image
//!    is opened yet.
//! 2. Without `-f`, fork the daemon now, while single-threaded (see
//!    `cli::daemon`); the command waits for the daemon's report.
//! 3. [`serve`]: block the stop signals and start the signal thread, open
//!    the chain (taking the image locks), mount, report ready, serve until
//!    unmounted; the session then flushes and closes every image.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::daemon::{self, Detached};
use super::preflight;
use super::signals::SignalWatch;
use super::{init_logging_to, CliError, MountArgs};
use crate::chain::{Chain, ChainOptions};
use crate::fs::{FsError, Mount, MountOptions};
use crate::jobs::Jobs;

/// Everything `mount` decided before opening an image.
pub struct MountPlan {
    /// The top image, absolute (the daemon later works from `/`).
    image: PathBuf,
    /// The mount point as the user wrote it, for messages.
    shown_mount_point: PathBuf,
    /// The mount point, canonical: what the mount table will show.
    mount_point: PathBuf,
    chain_options: ChainOptions,
    mount_options: MountOptions,
    /// `--log-file`, open for appending.
    log: Option<File>,
}

impl MountPlan {
    /// Checks what can be checked without opening an image.
    pub fn prepare(args: &MountArgs) -> Result<MountPlan, CliError> {
        let mount_point = preflight::check_mount_point(&args.mountpoint)?;
        preflight::check_fuse_device()?;
        if args.allow_other {
            preflight::check_allow_other()?;
        }
        let image = std::path::absolute(&args.image)
            .map_err(|e| CliError::at(&args.image, preflight::reason(&e)))?;
        let log = args.log_file.as_deref().map(open_log).transpose()?;
        let read_only = args.read_only || args.force_share;
        let defaults = ChainOptions::default();
        Ok(MountPlan {
            image,
            shown_mount_point: args.mountpoint.clone(),
            mount_point,
            chain_options: ChainOptions {
                writable: !read_only,
                force_share: args.force_share,
                cache_bytes: args.cache_size.unwrap_or(defaults.cache_bytes),
            },
            mount_options: MountOptions {
                read_only,
                allow_other: args.allow_other,
                threads: args.threads.map_or_else(default_threads, usize::from),
            },
            log,
        })
    }
}

/// Runs `chainfs mount`.
pub fn run(args: &MountArgs) -> Result<(), CliError> {
    let plan = MountPlan::prepare(args)?;
    if args.foreground {
        // Attached: log to the terminal, or to --log-file if given.
        let log = plan.log.as_ref().map(File::try_clone).transpose();
        init_logging_to(log.map_err(|e| CliError::Failed(e.to_string()))?);
        return serve(plan, |_| Ok(()));
    }
    // Detached, the daemon's stderr *is* the log file from the fork on (see
    // daemon::detach), so the logger writes to stderr, at the level a log
    // file gets.
    super::init_logging_at(if plan.log.is_some() { "info" } else { "warn" });
    detach_and_serve(plan)
}

/// Forks the daemon; in the command, returns its report; in the daemon,
/// serves and never returns.
fn detach_and_serve(plan: MountPlan) -> Result<(), CliError> {
    let mut readiness = match daemon::detach(&plan.shown_mount_point, plan.log.as_ref())? {
        Detached::Parent(report) => return report,
        Detached::Child(readiness) => readiness,
    };
    let result = serve(plan, |plan| {
        readiness
            .ready(plan.log.as_ref())
            .map_err(|e| CliError::Failed(format!("detaching the daemon: {e}")))
    });
    let code = match result {
        Ok(()) => 0,
        Err(error) => {
            // Before ready the command prints it; after, only the log can.
            if !readiness.fail(&error) {
                log::error!("{error}");
            }
            1
        }
    };
    std::process::exit(code)
}

/// Opens the chain, mounts it, calls `on_ready`, and serves until the mount
/// goes away (`chainfs umount`, `fusermount3 -u`, a stop signal).
fn serve(
    plan: MountPlan,
    on_ready: impl FnOnce(&MountPlan) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let shown = plan.shown_mount_point.clone();
    let signals = SignalWatch::start()
        .map_err(|e| CliError::Failed(format!("internal error: signal thread: {e}")))?;
    // Held for the daemon's whole life: on kernels whose /dev/fuse fdinfo
    // does not name the connection, `chainfs umount` finds the daemon by
    // this descriptor (see cli::procfs). It pins nothing new: the mount
    // already pins the directory.
    let _covered = File::open(&plan.mount_point).map_err(|e| mount_point_error(&shown, &e))?;
    let chain = Chain::open(&plan.image, &plan.chain_options)
        .map_err(|e| CliError::Failed(e.to_string()))?;
    if signals.stop_requested() {
        // Nothing was written; closing only releases the locks.
        let _ = chain.close();
        return Err(CliError::at(
            &shown,
            "interrupted before the mount was ready",
        ));
    }
    let read_only = plan.mount_options.read_only;
    let mount = Mount::new(
        Jobs::new(chain, read_only),
        &plan.mount_point,
        &plan.mount_options,
    )
    .map_err(|e| mount_error(&shown, &e))?;
    let unmounter = mount.unmounter();
    signals.arm(move || unmounter.unmount());
    on_ready(&plan)?;
    log::info!(
        "mounted {} at {}",
        plan.image.display(),
        plan.mount_point.display()
    );
    mount
        .run()
        .map_err(|e| CliError::at(&shown, format!("serving the mount: {e}")))?;
    log::info!(
        "unmounted {}; every image is closed",
        plan.mount_point.display()
    );
    Ok(())
}

/// Opens `--log-file` for appending, creating it if needed.
fn open_log(path: &Path) -> Result<File, CliError> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| CliError::at(path, preflight::reason(&e)))
}

/// Why the kernel mount failed, said of the mount point.
fn mount_error(mount_point: &Path, error: &FsError) -> CliError {
    match error {
        FsError::Session { source, .. } => CliError::at(
            mount_point,
            format!("cannot mount: {}", preflight::reason(source)),
        ),
        FsError::Mountpoint { reason, .. } => CliError::at(mount_point, reason),
        other => CliError::at(mount_point, other),
    }
}

fn mount_point_error(path: &Path, error: &std::io::Error) -> CliError {
    CliError::at(path, preflight::reason(error))
}

/// One FUSE thread per CPU, at least 2 (a slow request must not stall the
/// rest) and at most 16 (beyond that they mostly wait on the same images).
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(4, usize::from)
        .clamp(2, 16)
}
