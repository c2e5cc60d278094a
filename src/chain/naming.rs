//! Node names: the unique file name under which each node of the chain is
//! shown in the mount (SPEC §3, "Node files").
//!
//! # The rule
//!
//! A node is named after its image's file name (the last component of the
//! path, as the chain names it). Names are given from the top of the chain
//! down, so the top-most image keeps its plain name. A name that is already
//! taken — by a node higher in the chain, or by one of the mount's own
//! entries, `active` and `ctl` — gets the first free suffix `~2`, `~3`, …:
//!
//! ```text
//! top/disk.img  <- the top keeps  disk.img
//! mid/disk.img  <- then           disk.img~2
//! base/disk.img <- then           disk.img~3
//! ```
//!
//! File names that are not valid UTF-8 are shown with U+FFFD in place of
//! the bad bytes; the same suffix rule keeps them apart.

use std::collections::HashSet;
use std::path::Path;

/// Names of the mount's own entries, which no node may take.
pub const RESERVED: [&str; 2] = ["active", "ctl"];

/// The name used for a path without a file name component (never a real
/// image, but an image path can be any string).
const FALLBACK: &str = "image";

/// The plain node name of an image at `path`: its file name.
pub fn file_name(path: &Path) -> String {
    match path.file_name() {
        Some(name) => name.to_string_lossy().into_owned(),
        None => FALLBACK.to_owned(),
    }
}

/// Whether `name` is one of the mount's own entries.
pub fn is_reserved(name: &str) -> bool {
    RESERVED.contains(&name)
}

/// The first name from `plain`, `plain~2`, `plain~3`, … that is neither
/// reserved nor `taken`.
pub fn unique_name(plain: &str, taken: impl Fn(&str) -> bool) -> String {
    let free = |name: &str| !is_reserved(name) && !taken(name);
    if free(plain) {
        return plain.to_owned();
    }
    // Terminates: only finitely many names can be taken.
    (2u64..)
        .map(|n| format!("{plain}~{n}"))
        .find(|name| free(name))
        .unwrap_or_else(|| plain.to_owned())
}

/// Node names for the images at `paths`, given top first; the result is in
/// the same order.
pub fn name_nodes<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<String> {
    let mut taken = HashSet::new();
    let mut names = Vec::new();
    for path in paths {
        let name = unique_name(&file_name(path), |name| taken.contains(name));
        taken.insert(name.clone());
        names.push(name);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(paths: &[&str]) -> Vec<String> {
        name_nodes(paths.iter().map(Path::new))
    }

    #[test]
    fn distinct_file_names_are_kept() {
        assert_eq!(
            names(&["/a/E.img", "/a/D.img", "/b/A.raw"]),
            ["E.img", "D.img", "A.raw"]
        );
    }

    #[test]
    fn the_top_most_duplicate_keeps_the_plain_name() {
        assert_eq!(
            names(&["/top/disk.img", "/mid/disk.img", "/base/disk.img"]),
            ["disk.img", "disk.img~2", "disk.img~3"]
        );
    }

    #[test]
    fn reserved_entries_are_never_node_names() {
        assert_eq!(names(&["/x/active", "/x/ctl"]), ["active~2", "ctl~2"]);
    }

    #[test]
    fn a_suffix_never_collides_with_a_real_file_name() {
        assert_eq!(
            names(&["/a/disk.img~2", "/b/disk.img", "/c/disk.img"]),
            ["disk.img~2", "disk.img", "disk.img~3"]
        );
        assert_eq!(
            names(&["/a/disk.img", "/b/disk.img", "/c/disk.img~2"]),
            ["disk.img", "disk.img~2", "disk.img~2~2"]
        );
    }

    #[test]
    fn a_path_without_a_file_name_gets_a_fallback() {
        assert_eq!(file_name(Path::new("/")), FALLBACK);
    }

    #[test]
    fn non_utf8_names_are_shown_lossily_and_kept_apart() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let a = Path::new(OsStr::from_bytes(b"/a/x\xff.img"));
        let b = Path::new(OsStr::from_bytes(b"/b/x\xfe.img"));
        assert_eq!(name_nodes([a, b]), ["x\u{fffd}.img", "x\u{fffd}.img~2"]);
    }
}
