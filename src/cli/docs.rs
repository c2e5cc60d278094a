//! `chainfs completions SHELL` and the hidden `chainfs man`: shell
//! completions (clap_complete) and the manual page (clap_mangen), generated
//! from the clap definitions so that they never drift from the command
//! line. `contrib/` carries their output; a test compares the two.
//!
//! The man page is one page for every subcommand: clap_mangen renders the
//! head (title, name, synopsis, description) and each subcommand's
//! synopsis, description and flags, which become subsections of COMMANDS;
//! `cli::manual` supplies the rest (the mount, the control directory, the
//! commands of `ctl/command`).

use std::io::{self, Write};

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use roff::{bold, roman, Roff};

use super::manual::{Block, SECTIONS};
use super::{Cli, CliError};

/// Prints the completion script for `shell` to stdout.
pub fn print_completions(shell: Shell) -> Result<(), CliError> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "chainfs", &mut script);
    write_stdout(&script)
}

/// Prints the man page (roff) to stdout.
pub fn print_man_page() -> Result<(), CliError> {
    let page = man_page().map_err(|e| CliError::Failed(format!("rendering the man page: {e}")))?;
    write_stdout(page.as_bytes())
}

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Failed(format!("stdout: {e}")))
}

/// The whole man page, `chainfs(1)`.
pub fn man_page() -> io::Result<String> {
    let mut cli = Cli::command();
    // Gives each subcommand its full name (`chainfs mount`) for its synopsis.
    cli.build();
    let man = Man::new(cli.clone()).title("CHAINFS");
    let mut head = Vec::new();
    man.render_title(&mut head)?;
    man.render_name_section(&mut head)?;
    man.render_synopsis_section(&mut head)?;
    man.render_description_section(&mut head)?;
    let mut page = String::from_utf8_lossy(&head).into_owned();

    page.push_str(".SH COMMANDS\n");
    // `help` is clap's own and says nothing `--help` does not.
    for sub in cli
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set() && sub.get_name() != "help")
    {
        page.push_str(&subcommand_section(sub)?);
    }
    page.push_str(&manual_sections());
    // Every part rendered on its own starts with the definition of the
    // apostrophe string; the page needs it once, first.
    Ok(Roff::new().render() + &without_preamble(&page))
}

/// One subcommand as a subsection of COMMANDS: its synopsis, description
/// and flags as clap_mangen renders them, without their section headings.
fn subcommand_section(sub: &clap::Command) -> io::Result<String> {
    let man = Man::new(sub.clone());
    let mut parts = Vec::new();
    man.render_synopsis_section(&mut parts)?;
    man.render_description_section(&mut parts)?;
    if sub.get_arguments().any(|arg| !arg.is_hide_set()) {
        man.render_options_section(&mut parts)?;
    }
    let name = sub.get_bin_name().unwrap_or_else(|| sub.get_name());
    let mut section = format!(".SS \"{name}\"\n");
    section.push_str(&without_headings(&String::from_utf8_lossy(&parts)));
    Ok(section)
}

/// Drops the `.SH` heading of each part clap_mangen rendered, so the parts
/// read as one subsection; a paragraph break separates them.
fn without_headings(rendered: &str) -> String {
    let mut out = String::new();
    let mut in_part = false;
    for line in rendered.lines() {
        if line.starts_with(".SH") {
            in_part = true;
            if !out.is_empty() {
                out.push_str(".PP\n");
            }
        } else if in_part {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `rendered` without the apostrophe preamble (the `.ie`/`.el` lines
/// defining `\*(Aq`) that each rendered part starts with.
fn without_preamble(rendered: &str) -> String {
    rendered
        .lines()
        .filter(|line| !line.starts_with(".ie ") && !line.starts_with(".el "))
        .flat_map(|line| [line, "\n"])
        .collect()
}

/// The sections of `cli::manual`, in roff.
fn manual_sections() -> String {
    let mut roff = Roff::new();
    for section in SECTIONS {
        roff.control("SH", [section.title]);
        for block in section.blocks {
            match block {
                Block::Para(text) => {
                    roff.control("PP", []).text([roman(*text)]);
                }
                Block::Item(term, text) => {
                    roff.control("TP", [])
                        .text([bold(*term)])
                        .text([roman(*text)]);
                }
                Block::Example(lines) => {
                    roff.control("PP", [])
                        .control("nf", [])
                        .control("RS", ["4"]);
                    for line in lines.lines() {
                        roff.text([roman(line)]);
                    }
                    roff.control("RE", []).control("fi", []);
                }
            }
        }
    }
    roff.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_documents_the_control_directory_and_every_command() {
        let page = match man_page() {
            Ok(page) => page.replace("\\-", "-"),
            Err(e) => panic!("{e}"),
        };
        // SPEC §3 and §5: the files of ctl/.
        for file in [
            "command",
            "status",
            "status.json",
            "events",
            "chain",
            "bitmaps",
            "bitmaps.json",
        ] {
            assert!(page.contains(&format!("\\fBctl/{file}\\fR")), "ctl/{file}");
        }
        // SPEC §4: every verb of ctl/command, as the head of an item.
        for verb in [
            "stream",
            "snapshot",
            "commit",
            "mirror",
            "backup",
            "bitmap-add",
            "bitmap-remove",
            "bitmap-clear",
            "bitmap-enable",
            "bitmap-disable",
            "bitmap-merge",
            "cancel",
            "pause",
            "resume",
            "complete",
            "dismiss",
            "set-speed",
        ] {
            let listed = page.lines().any(|line| {
                line.strip_prefix("\\fB")
                    .is_some_and(|item| item.split([' ', ',']).any(|word| word == verb))
            });
            assert!(listed, "ctl/command verb {verb} is not documented");
        }
        // Every subcommand, with its flags.
        for sub in ["mount", "umount", "info", "status", "demo", "completions"] {
            assert!(page.contains(&format!(".SS \"chainfs {sub}\"")), "{sub}");
        }
        assert!(page.contains("--cache-size"));
        assert_eq!(page.matches(".ds Aq").count(), 2, "one apostrophe preamble");
    }
}
