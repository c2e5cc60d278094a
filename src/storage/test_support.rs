//! What the unit tests of every layer share: one gate for the QEMU tools they use as
//! oracles, with the integration tests' rule (`tests/common/tools.rs`): when
//! the `CI` environment variable is set to anything but the empty string, a
//! missing tool fails the test; elsewhere the test prints a loud SKIPPED and
//! returns early.

use std::os::unix::fs::PermissionsExt;

/// Whether we run under CI, where a missing tool is a failure, not a skip.
pub(crate) fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Whether `tool` is on `PATH` and executable: true, or false after a loud
/// SKIPPED; under CI a missing tool panics.
pub(crate) fn require_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if found {
        return true;
    }
    if in_ci() {
        panic!("{tool} is required but missing (.ci/run installs it)");
    }
    eprintln!();
    eprintln!("!!!!!!!! SKIPPED: {tool} is missing; this test checked NOTHING !!!!!!!!");
    eprintln!();
    false
}

/// `require_tool` for both `qemu-img` and `qemu-io`.
pub(crate) fn require_qemu() -> bool {
    require_tool("qemu-img") && require_tool("qemu-io")
}
