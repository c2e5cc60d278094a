//! The `chainfs` command line (SPEC §2): the clap definitions of every
//! subcommand, dispatch, and the exit-code policy.
//!
//! Exit codes: 0 on success, 1 when the command ran and failed (a message
//! naming the file and the reason goes to stderr), 2 for usage errors (clap's
//! own convention) and for subcommands that are not implemented yet.

pub mod info;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// `chainfs`: a FUSE filesystem that shows every node of a QEMU disk-image
/// chain as a flat raw file.
#[derive(Debug, Parser)]
#[command(name = "chainfs", version, about, long_about = None)]
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of SPEC §2.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount IMAGE's whole backing chain at MOUNTPOINT (not implemented yet).
    Mount(MountArgs),
    /// Unmount MOUNTPOINT once everything is written (not implemented yet).
    Umount(UmountArgs),
    /// Print the chain of IMAGE, top first.
    Info(InfoArgs),
    /// Print the jobs of a mount (not implemented yet).
    Status(StatusArgs),
    /// Create and mount a five-image demo chain in DIR (not implemented yet).
    Demo(DemoArgs),
}

/// Options of `chainfs mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Stay attached and log to stderr; SIGINT or SIGTERM unmount cleanly.
    #[arg(short, long)]
    pub foreground: bool,
    /// Make every node file read-only; commands are refused with EROFS.
    #[arg(long)]
    pub read_only: bool,
    /// Let users other than the one mounting access the mount.
    #[arg(long)]
    pub allow_other: bool,
    /// Ignore image locks, as `qemu-img -U` does; implies --read-only.
    #[arg(long)]
    pub force_share: bool,
    /// Number of threads serving requests.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Metadata cache budget in bytes.
    #[arg(long, value_name = "BYTES")]
    pub cache_size: Option<u64>,
    /// Write the daemon's log to PATH.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// The active (top) image of the chain.
    pub image: PathBuf,
    /// An empty directory to mount on.
    pub mountpoint: PathBuf,
}

/// Options of `chainfs umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The directory chainfs is mounted on.
    pub mountpoint: PathBuf,
}

/// Options of `chainfs info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print a JSON array instead of text.
    #[arg(long)]
    pub json: bool,
    /// The top image of the chain.
    pub image: PathBuf,
}

/// Options of `chainfs status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Draw progress until every job has finished.
    #[arg(long)]
    pub wait: bool,
    /// Print `ctl/status.json` instead of `ctl/status`.
    #[arg(long)]
    pub json: bool,
    /// The directory chainfs is mounted on.
    pub mountpoint: PathBuf,
}

/// Options of `chainfs demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to create the demo chain (created if missing; must be empty).
    pub dir: PathBuf,
}

/// Why a subcommand failed.
#[derive(Debug)]
pub enum CliError {
    /// The subcommand exists in the contract but has not been written yet.
    NotImplemented(&'static str),
    /// The subcommand ran and failed; the message names the file and reason.
    Failed(String),
}

impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NotImplemented(_) => 2,
            CliError::Failed(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::NotImplemented(cmd) => write!(f, "{cmd}: not implemented yet"),
            CliError::Failed(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for CliError {}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    init_logging();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, so scripts can show it as is.
            eprintln!("chainfs: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Logs go to stderr at `warn` unless RUST_LOG says otherwise, so that the
/// warnings SPEC §1 asks for (a probed backing format) reach the user.
fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("warn");
    // A second init (tests calling run twice) is harmless; ignore it.
    let _ = env_logger::Builder::from_env(env).try_init();
}

fn dispatch(command: Command) -> Result<(), CliError> {
    match command {
        Command::Info(args) => info::run(&args),
        Command::Mount(_) => Err(CliError::NotImplemented("mount")),
        Command::Umount(_) => Err(CliError::NotImplemented("umount")),
        Command::Status(_) => Err(CliError::NotImplemented("status")),
        Command::Demo(_) => Err(CliError::NotImplemented("demo")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn mount_takes_every_documented_option() {
        let cli = Cli::try_parse_from([
            "chainfs",
            "mount",
            "-f",
            "--read-only",
            "--allow-other",
            "--force-share",
            "--threads",
            "4",
            "--cache-size",
            "1048576",
            "--log-file",
            "/tmp/log",
            "top.qcow2",
            "/mnt",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
    }

    #[test]
    fn unwritten_subcommands_exit_2() {
        let cli = Cli::try_parse_from(["chainfs", "umount", "/mnt"]).ok();
        let err = cli.map(|c| dispatch(c.command));
        assert!(matches!(err, Some(Err(CliError::NotImplemented("umount")))));
        assert_eq!(CliError::NotImplemented("x").exit_code(), 2);
    }
}
