//! The `chainfs` command line (SPEC §2): the clap definitions of every
//! subcommand, dispatch, and the exit-code policy.
//!
//! Exit codes: 0 on success, 1 when the command ran and failed (a message
//! naming the file and the reason goes to stderr), 2 for usage errors (clap's
//! own convention).

mod daemon;
pub mod demo;
mod docs;
pub mod info;
mod limits;
mod manual;
pub mod mount;
pub mod mount_options;
mod preflight;
mod procfs;
mod signals;
mod size;
pub mod status;
pub mod umount;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// `chainfs`: a FUSE filesystem that shows every node of a QEMU disk-image
/// chain as a flat raw file.
///
/// Besides its subcommands it takes the mount helper's form, `chainfs
/// [OPTIONS] IMAGE MOUNTPOINT`, which is `chainfs mount`: fuse3's
/// `mount.fuse3` runs it in that form for `mount -t fuse.chainfs` and
/// fstab lines.
#[derive(Debug, Parser)]
#[command(
    name = "chainfs",
    version,
    about,
    long_about = manual::LONG_ABOUT,
    after_long_help = manual::AFTER_LONG_HELP,
    // The two forms, as clap would write them; said here so that the man
    // page's synopsis shows them too rather than every flag of the first.
    override_usage = "chainfs [OPTIONS] <IMAGE> <MOUNTPOINT>\n       chainfs <COMMAND>",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// The subcommand to run; none for the mount helper's form.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The mount helper's form: what `chainfs mount` takes.
    #[command(flatten)]
    pub helper: Option<MountArgs>,
}

/// The subcommands of SPEC §2.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount IMAGE's whole backing chain at MOUNTPOINT.
    Mount(MountArgs),
    /// Unmount MOUNTPOINT; returns once the daemon has written everything
    /// and released the images.
    Umount(UmountArgs),
    /// Print the chain of IMAGE, top first.
    Info(InfoArgs),
    /// Print the jobs of a mount.
    Status(StatusArgs),
    /// Create and mount a five-image demo chain in DIR.
    Demo(DemoArgs),
    /// Print a completion script for SHELL, generated from this command
    /// line.
    Completions(CompletionsArgs),
    /// Print the manual page (roff), generated from this command line.
    #[command(hide = true)]
    Man,
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
    /// Number of threads serving requests (default: one per CPU, 2 to 16).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Metadata cache budget of the whole mount in bytes (default 16M),
    /// shared by every image of the chain; K, M or G suffixes (powers of
    /// 1024) are accepted.
    #[arg(long, value_name = "BYTES", value_parser = size::parse_size)]
    pub cache_size: Option<u64>,
    /// Write the daemon's log to PATH.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Mount options, comma-separated, as mount(8) and fstab pass them: ro,
    /// rw, allow_other, force_share, threads=N, cache_size=SIZE,
    /// log_file=PATH; generic ones (defaults, nofail, noauto, user, _netdev,
    /// x-systemd.*, dev, suid, exec and their no forms) are ignored.
    #[arg(short = 'o', value_name = "OPTIONS", value_parser = mount_options::parse_list)]
    pub options: Vec<mount_options::OptionList>,
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

/// Options of `chainfs completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    pub shell: clap_complete::Shell,
}

/// Why a subcommand failed.
#[derive(Debug)]
pub enum CliError {
    /// The subcommand ran and failed; the message names the file and reason.
    Failed(String),
}

impl CliError {
    /// A failure concerning `path`: `PATH: reason`, the shape of every
    /// message chainfs prints.
    pub fn at(path: &Path, reason: impl fmt::Display) -> CliError {
        CliError::Failed(format!("{}: {reason}", path.display()))
    }

    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Failed(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for CliError {}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let command = match (cli.command, cli.helper) {
        (Some(command), _) => command,
        (None, Some(args)) => {
            refuse_mistyped_command(&args.image);
            Command::Mount(args)
        }
        // arg_required_else_help: clap printed the help already.
        (None, None) => return ExitCode::from(2),
    };
    match dispatch(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, so scripts can show it as is.
            eprintln!("chainfs: {}", one_line(&err.to_string()));
            ExitCode::from(err.exit_code())
        }
    }
}

/// In the helper's form a mistyped subcommand (`chainfs stauts /mnt`)
/// would be taken for an image to mount; a bare name that names no file is
/// reported as the unknown subcommand it most likely is (exit 2).
fn refuse_mistyped_command(image: &Path) {
    if image.components().count() == 1 && !image.exists() {
        use clap::CommandFactory;
        let message = format!(
            "unrecognized subcommand '{}' (and no image of that name)",
            image.display()
        );
        Cli::command()
            .error(clap::error::ErrorKind::InvalidSubcommand, message)
            .exit();
    }
}

/// Joins a message that spans lines (QEMU-style lock errors add a hint on
/// a second line) into one, as SPEC §2 wants one message per failure.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines.join("; ")
}

/// Logs go to stderr at `warn` unless RUST_LOG says otherwise, so that the
/// warnings SPEC §1 asks for (a probed backing format) reach the user.
fn init_logging() {
    init_logging_to(None);
}

/// Starts the logger: to `file` at `info` (a daemon's log is read after the
/// fact, so it says what happened), or to stderr at `warn`. RUST_LOG
/// overrides the level either way.
fn init_logging_to(file: Option<std::fs::File>) {
    let level = if file.is_some() { "info" } else { "warn" };
    init_logger(level, file);
}

/// Starts the logger on stderr at `level` (unless RUST_LOG says otherwise).
fn init_logging_at(level: &str) {
    init_logger(level, None);
}

fn init_logger(level: &str, file: Option<std::fs::File>) {
    let env = env_logger::Env::default().default_filter_or(level);
    let mut builder = env_logger::Builder::from_env(env);
    if let Some(file) = file {
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    // A second init (tests calling run twice) is harmless; ignore it.
    let _ = builder.try_init();
}

fn dispatch(command: Command) -> Result<(), CliError> {
    match command {
        Command::Info(args) => {
            init_logging();
            limits::raise_open_file_limit();
            info::run(&args)
        }
        Command::Mount(args) => {
            limits::raise_open_file_limit();
            mount::run(&mount_options::apply(args))
        }
        Command::Umount(args) => {
            init_logging();
            umount::run(&args)
        }
        Command::Status(args) => {
            init_logging();
            status::run(&args)
        }
        Command::Demo(args) => {
            init_logging();
            limits::raise_open_file_limit();
            demo::run(&args)
        }
        Command::Completions(args) => docs::print_completions(args.shell),
        Command::Man => docs::print_man_page(),
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
    fn cache_size_takes_binary_suffixes() {
        let cli = Cli::try_parse_from(["chainfs", "mount", "--cache-size", "64M", "a", "b"]);
        match cli.map(|c| c.command) {
            Ok(Some(Command::Mount(args))) => assert_eq!(args.cache_size, Some(64 << 20)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn zero_threads_is_a_usage_error() {
        let cli = Cli::try_parse_from(["chainfs", "mount", "--threads", "0", "a", "b"]);
        assert!(cli.is_err());
    }

    /// The mount arguments `args` parse to, `-o` folded in.
    fn mount_args(args: &[&str]) -> MountArgs {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string());
        match cli.map(|cli| (cli.command, cli.helper)) {
            Ok((Some(Command::Mount(args)), None)) | Ok((None, Some(args))) => {
                mount_options::apply(args)
            }
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn the_mount_helpers_form_is_mount() {
        // As mount.fuse3 runs it for `mount -t fuse.chainfs top.qcow2 /mnt`.
        let args = mount_args(&["chainfs", "/i/top.qcow2", "/mnt", "-o", "ro,dev,suid"]);
        assert_eq!(args.image, Path::new("/i/top.qcow2"));
        assert_eq!(args.mountpoint, Path::new("/mnt"));
        assert!(args.read_only);
        let args = mount_args(&["chainfs", "-o", "allow_other", "top.qcow2", "/mnt"]);
        assert!(args.allow_other && !args.read_only);
    }

    #[test]
    fn o_options_set_their_flags_and_override_them() {
        let args = mount_args(&[
            "chainfs",
            "mount",
            "--threads",
            "5",
            "-o",
            "threads=3,cache_size=1M,force_share",
            "-o",
            "log_file=/tmp/l",
            "a",
            "b",
        ]);
        assert_eq!(args.threads, Some(3));
        assert_eq!(args.cache_size, Some(1 << 20));
        assert!(args.force_share);
        assert_eq!(args.log_file.as_deref(), Some(Path::new("/tmp/l")));
        // rw undoes an earlier ro, not the flag.
        assert!(!mount_args(&["chainfs", "a", "b", "-o", "ro", "-o", "rw"]).read_only);
        assert!(mount_args(&["chainfs", "mount", "--read-only", "-o", "rw", "a", "b"]).read_only);
    }

    #[test]
    fn an_unknown_o_option_is_a_usage_error_naming_it() {
        let err = Cli::try_parse_from(["chainfs", "a", "b", "-o", "ro,bogus"]).expect_err("bogus");
        assert!(err.to_string().contains("`bogus`"), "{err}");
    }

    #[test]
    fn subcommands_are_not_taken_for_the_helpers_form() {
        let cli = Cli::try_parse_from(["chainfs", "umount", "/mnt"]).map_err(|e| e.to_string());
        assert!(
            matches!(
                cli,
                Ok(Cli {
                    command: Some(Command::Umount(_)),
                    helper: None
                })
            ),
            "{cli:?}"
        );
    }

    #[test]
    fn multi_line_messages_become_one_line() {
        assert_eq!(
            one_line("a.img: Failed to get \"write\" lock\nIs another process using the image [a.img]?\n"),
            "a.img: Failed to get \"write\" lock; Is another process using the image [a.img]?"
        );
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn failures_name_the_file_first() {
        let err = CliError::at(Path::new("/mnt/x"), "not an empty directory");
        assert_eq!(err.to_string(), "/mnt/x: not an empty directory");
        assert_eq!(err.exit_code(), 1);
    }
}
