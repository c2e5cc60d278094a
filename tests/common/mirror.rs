//! The mirror tests' own helpers: mirroring SPEC's chain through to the
//! pivot, and judging a target with QEMU's tools (`qemu-img compare`,
//! `check`, `map`).

use std::fs::File;
use std::path::Path;

use super::mount::{
    command, open_rw, read_all, wait_outcome, wait_ready, write_model, FiveChain, Mounted,
};
use super::tools::{convert_to_raw, path_str, qemu_img, qemu_img_check};

/// `qemu-img compare` finds `image` equal to `expected` (what a node
/// file showed).
pub fn assert_compare(image: &Path, format: &str, expected: &[u8]) {
    let raw = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(raw.path(), expected).unwrap();
    qemu_img(&[
        "compare",
        "-U",
        "-f",
        "raw",
        "-F",
        format,
        path_str(raw.path()),
        path_str(image),
    ]);
}

/// `target` (qcow2) passes `qemu-img check` and `qemu-img compare` finds it
/// equal to `expected`.
pub fn assert_good_copy(target: &Path, expected: &[u8]) {
    qemu_img_check(target);
    assert_compare(target, "qcow2", expected);
}

/// The ranges of guest data `image` holds itself (not its backing chain),
/// as `qemu-img map` sees them.
pub fn own_data(image: &Path) -> impl Iterator<Item = std::ops::Range<u64>> {
    let map = qemu_img(&["map", "-U", "--output=json", path_str(image)]);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    extents
        .into_iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            start..start + e["length"].as_u64().unwrap()
        })
}

/// Completes mirror `m` of `active` (opened on the mount), which must
/// then show `model`; after unmount the qcow2 `target` passes
/// `qemu-img check` and equals it.
pub fn complete_and_compare(m: Mounted, active: File, model: &[u8], target: &Path) {
    command(&m, "complete id=m").unwrap();
    assert_eq!(wait_outcome(&m, "m")["outcome"], "completed");
    assert!(read_all(&m.path("active")) == model);
    drop(active);
    m.unmount();
    assert_good_copy(target, model);
}

/// Mirrors `active` of SPEC's chain with `words` added to the command,
/// writing through `active` before and after ready, then completes; returns
/// the mount (the job concluded) and what `active` must show.
pub fn mirror_and_complete(five: &FiveChain, words: &str) -> (Mounted, Vec<u8>) {
    let mut model = convert_to_raw(&five.top());
    let m = five.mount();
    let active = open_rw(&m, "active");
    command(&m, &format!("mirror target=copy.img id=m {words}")).unwrap();
    write_model(&active, &mut model, 5 << 20, &[0x51; 100_000]);
    let job = wait_ready(&m, "m");
    assert_eq!(job["status"], "ready", "{job}");
    write_model(&active, &mut model, (7 << 20) + 3, &[0x52; 65536]);
    command(&m, "complete id=m").unwrap();
    let job = wait_outcome(&m, "m");
    assert_eq!(job["outcome"], "completed", "{job}");
    assert!(read_all(&m.path("active")) == model, "a write was lost");
    (m, model)
}
