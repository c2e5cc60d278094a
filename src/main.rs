//! The `chainfs` binary: parses the command line and hands it to
//! [`chainfs::cli::run`], which owns everything else (logging, dispatch,
//! exit codes).

use clap::Parser;

fn main() -> std::process::ExitCode {
    chainfs::cli::run(chainfs::cli::Cli::parse())
}
