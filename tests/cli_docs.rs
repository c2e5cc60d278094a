//! The man page and shell completions in contrib/ are what the current
//! command line generates (issue 12): a change to the clap definitions or
//! to `cli::manual` without regenerating them fails here, saying how.

mod common;

use std::path::Path;

use common::cli::chainfs;

/// Each file of contrib/ and the `chainfs` arguments that print it.
const GENERATED: &[(&str, &[&str])] = &[
    ("contrib/chainfs.1", &["man"]),
    ("contrib/completions/chainfs.bash", &["completions", "bash"]),
    ("contrib/completions/_chainfs", &["completions", "zsh"]),
    ("contrib/completions/chainfs.fish", &["completions", "fish"]),
];

#[test]
fn contrib_holds_what_the_command_line_generates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for (file, args) in GENERATED {
        let generated = chainfs(*args).ok().stdout_bytes;
        assert!(!generated.is_empty(), "chainfs {args:?} printed nothing");
        let on_disk = std::fs::read(root.join(file)).unwrap_or_default();
        if on_disk != generated {
            stale.push(format!("cargo run -q -- {} > {file}", args.join(" ")));
        }
    }
    assert!(
        stale.is_empty(),
        "contrib/ differs from what the command line generates; regenerate with:\n    {}",
        stale.join("\n    ")
    );
}
