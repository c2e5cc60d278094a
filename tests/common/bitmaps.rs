//! Dirty bitmaps as a mount and QEMU's tools show them: `ctl/bitmaps.json`
//! and the bitmaps `qemu-img info` lists.

use std::path::Path;

use super::mount::read_all;
use super::path_str;
use super::tools::qemu_img;

/// The bitmaps of `ctl/bitmaps.json` of the mount at `mnt`.
pub fn listed(mnt: &Path) -> Vec<serde_json::Value> {
    let text = read_all(&mnt.join("ctl/bitmaps.json"));
    match serde_json::from_slice(&text) {
        Ok(serde_json::Value::Array(list)) => list,
        other => panic!("ctl/bitmaps.json is not an array: {other:?}"),
    }
}

/// The bitmap `name` of node `node` in `ctl/bitmaps.json`.
pub fn listed_one(mnt: &Path, node: &str, name: &str) -> serde_json::Value {
    listed(mnt)
        .into_iter()
        .find(|b| b["node"] == node && b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {node}/{name} in {:?}", listed(mnt)))
}

/// The `count` (dirty bytes) of bitmap `name` of `node`.
pub fn dirty_bytes(mnt: &Path, node: &str, name: &str) -> u64 {
    listed_one(mnt, node, name)["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("{node}/{name} has no count"))
}

/// The bitmaps `qemu-img info` lists for the qcow2 `image` (its
/// `format-specific` `bitmaps`: name, granularity, flags).
pub fn qemu_bitmaps(image: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&["info", "-U", "--output=json", path_str(image)]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    match &info["format-specific"]["data"]["bitmaps"] {
        serde_json::Value::Array(list) => list.clone(),
        _ => Vec::new(),
    }
}
