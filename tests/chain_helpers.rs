//! A stop-gap for `chain_deep.rs` alone, which still includes this file
//! with `#[path]` (another change is editing it): the old names, each a
//! one-line call into `tests/common/`. When `chain_deep.rs` says
//! `mod common;` and uses `common::chain` and `common::tools` with their
//! names (`require_qemu`, `qemu_img_in`, `path_str(&at(dir, name))`),
//! delete this file.

// chain_deep.rs uses a subset; the shared module is compiled whole.
#![allow(dead_code, unused_imports)]

#[path = "common/mod.rs"]
mod common;

use std::path::Path;

pub use common::chain::{assert_same, at, open, qemu_io_alone, raw_image, read_node, tempdir};

/// [`common::tools::require_qemu`] under its old name.
pub fn have_qemu() -> bool {
    common::tools::require_qemu()
}

/// [`common::tools::qemu_img_in`] under its old name.
pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    common::tools::qemu_img_in(dir, args)
}

/// `dir/name` as a string.
pub fn path_str(dir: &Path, name: &str) -> String {
    common::tools::path_str(&dir.join(name)).to_owned()
}
