//! The layers of the crate hold: each folder under `src/` imports only
//! itself, the layer directly below it, and the `sync` leaf, except where an
//! exception below says why.
//!
//! Layers, bottom to top: storage → format → chain → jobs → fs → cli.
//! The test reads the source (not the compiled crate): every `crate::`
//! path outside comments, in `use` lines and in code, names the layer it
//! reaches. A layer reaching one above it, or skipping one below it, fails
//! the test unless an [`EXCEPTIONS`] entry allows it; an entry that no
//! longer matches anything fails too, so the list cannot go stale.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, bottom first.
const LAYERS: [&str; 6] = ["storage", "format", "chain", "jobs", "fs", "cli"];

/// The leaf every layer may use.
const LEAF: &str = "sync";

/// An import the layering rule would refuse, allowed with a reason.
struct Exception {
    from: &'static str,
    to: &'static str,
    /// Files (relative to `src/<from>/`) allowed to make the import; every
    /// other file of the layer is held to the rule.
    files: &'static [&'static str],
    /// Why the import is right, or what would remove it.
    #[allow(dead_code)]
    reason: &'static str,
}

const EXCEPTIONS: &[Exception] = &[
    Exception {
        from: "chain",
        to: "storage",
        files: &["open.rs", "create.rs", "node.rs", "error.rs"],
        reason: "the chain decides which host file each node is, opens it and takes its \
                 QEMU-compatible lock (read or write, relocked when a job changes who \
                 writes); the format layer only reads the Storage it is handed and never \
                 opens a file by name, so it has nothing to re-export here",
    },
    Exception {
        from: "cli",
        to: "chain",
        files: &["info.rs", "demo.rs", "mount.rs"],
        reason: "`info` reports a chain without jobs or a mount, `demo` creates the \
                 images it then mounts, and `mount` opens the chain it hands to jobs: \
                 the process start is where the layers are put together",
    },
    Exception {
        from: "cli",
        to: "jobs",
        files: &["mount.rs"],
        reason: "`mount` builds the job owner over the chain it opened and hands it to \
                 the fs layer (same composition as above; it would go if fs::Mount \
                 opened the chain from a path itself)",
    },
    Exception {
        from: "fs",
        to: "chain",
        files: &["ops/tests.rs"],
        reason: "unit tests of the fs model create images on disk to serve; a fixture, \
                 not a dependency of the mount",
    },
    Exception {
        from: "fs",
        to: "format",
        files: &["ops/tests.rs"],
        reason: "the same fixture names the backing file's format",
    },
];

/// The top-level module each `crate::` path in `source` names, comments
/// left out. `use crate::{a::X, b}` names both `a` and `b`.
fn crate_paths(source: &str) -> Vec<String> {
    let code: String = source
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        rest = after;
        // `$crate::` in a macro, or an identifier ending in `crate`.
        if before.is_some_and(|c| c == '$' || c == '_' || c.is_alphanumeric()) {
            continue;
        }
        if let Some(group) = after.strip_prefix('{') {
            found.extend(group_heads(group));
        } else {
            found.push(ident(after));
        }
    }
    found.retain(|name| !name.is_empty() && name != "self");
    found
}

/// The first identifier of each top-level item of a `{…}` group, which may
/// span lines.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && (c.is_alphabetic() || c == '_') => {
                heads.push(ident(&group[i..]));
                item_start = false;
            }
            _ => {}
        }
    }
    heads
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The imports of one layer that break the rule: (file, layer reached).
fn violations_of(layer: &str, files: &[(PathBuf, String)]) -> Vec<(String, String)> {
    let own = LAYERS.iter().position(|l| *l == layer);
    let mut bad = BTreeSet::new();
    for (file, source) in files {
        for reached in crate_paths(source) {
            let allowed = reached == layer
                || reached == LEAF
                || match (own, LAYERS.iter().position(|l| *l == reached)) {
                    (Some(own), Some(other)) => own >= 1 && other == own - 1,
                    // The leaf imports nothing; `crate::` items that are not
                    // layers (none today) are not the rule's business.
                    (None, Some(_)) => false,
                    (_, None) => true,
                };
            if !allowed {
                bad.insert((file.to_string_lossy().into_owned(), reached));
            }
        }
    }
    bad.into_iter().collect()
}

/// Every `.rs` file of a layer (`src/<layer>.rs` and `src/<layer>/**`),
/// with its path relative to `src/<layer>/`.
fn layer_files(src: &Path, layer: &str) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let single = src.join(format!("{layer}.rs"));
    if single.is_file() {
        files.push((PathBuf::from(format!("../{layer}.rs")), read(&single)));
    }
    let dir = src.join(layer);
    let mut pending = vec![dir.clone()];
    while let Some(at) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read a directory entry of src/").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(&dir).expect("under its layer").to_owned();
                files.push((relative, read(&path)));
            }
        }
    }
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn no_layer_imports_one_above_it_or_skips_one_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut unexplained = Vec::new();
    let mut used = BTreeSet::new();
    for layer in LAYERS.iter().copied().chain([LEAF]) {
        for (file, reached) in violations_of(layer, &layer_files(&src, layer)) {
            let excused = EXCEPTIONS.iter().position(|e| {
                e.from == layer && e.to == reached && e.files.iter().any(|f| file == *f)
            });
            match excused {
                Some(index) => {
                    used.insert(index);
                }
                None => unexplained.push(format!("src/{layer}/{file} imports crate::{reached}")),
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "layering broken (a layer may import itself, the layer directly below it and \
         `{LEAF}`; add an exception with a reason only if the import is right):\n  {}",
        unexplained.join("\n  ")
    );
    let stale: Vec<_> = (0..EXCEPTIONS.len())
        .filter(|i| !used.contains(i))
        .map(|i| format!("{} → {}", EXCEPTIONS[i].from, EXCEPTIONS[i].to))
        .collect();
    assert!(
        stale.is_empty(),
        "exceptions that nothing needs any more (remove them): {stale:?}"
    );
}

#[test]
fn every_layer_folder_is_known_to_the_test() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).expect("read src/") {
        let path = entry.expect("read an entry of src/").path();
        let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() || !matches!(name, "lib" | "main") {
            assert!(
                LAYERS.contains(&name) || name == LEAF,
                "src/{name} is not in the layer list of tests/layering.rs"
            );
        }
    }
}

#[test]
fn the_reader_finds_paths_in_groups_and_code_but_not_in_comments() {
    let source = "use crate::chain::Chain;\n\
                  use crate::{format::Format, storage};\n\
                  use crate::{\n    jobs::{Jobs, NodeId},\n    cli,\n};\n\
                  //! see [`crate::jobs`]\n\
                  let x = crate::fs::Mount::new(); // crate::cli\n\
                  macro_rules! m { () => { $crate::sync::Mutex } }\n";
    assert_eq!(
        crate_paths(source),
        ["chain", "format", "storage", "jobs", "cli", "fs"].map(String::from)
    );
}

#[test]
fn an_import_from_above_or_across_a_layer_is_reported() {
    let files = [(
        PathBuf::from("raw.rs"),
        "use crate::storage::Storage;\nuse crate::jobs::Jobs;\nuse crate::sync::Mutex;\n"
            .to_owned(),
    )];
    assert_eq!(
        violations_of("format", &files),
        [("raw.rs".to_owned(), "jobs".to_owned())]
    );
    assert_eq!(
        violations_of("chain", &files),
        [
            ("raw.rs".to_owned(), "jobs".to_owned()),
            ("raw.rs".to_owned(), "storage".to_owned())
        ]
    );
    assert_eq!(
        violations_of(LEAF, &files),
        [
            ("raw.rs".to_owned(), "jobs".to_owned()),
            ("raw.rs".to_owned(), "storage".to_owned())
        ]
    );
}
