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

/// The dirty ranges (start, length) of bitmap `name` of the qcow2 `image`
/// as QEMU reads them: exported read-only over NBD by qemu-storage-daemon
/// and mapped by `qemu-img map` through `x-dirty-bitmap`, which shows
/// dirty ranges as `data: false`. `scratch` is a directory for the socket.
pub fn qemu_dirty_ranges(image: &Path, name: &str, scratch: &Path) -> Vec<(u64, u64)> {
    let sock = scratch.join("bitmap.sock");
    let pid = scratch.join("bitmap.pid");
    let export = serde_json::json!({
        "type": "nbd", "id": "e", "node-name": "fmt", "name": "x", "bitmaps": [name],
    })
    .to_string();
    super::tools::run_ok(
        "qemu-storage-daemon",
        &[
            "--blockdev",
            &format!(
                "driver=file,node-name=file,filename={},read-only=on",
                path_str(image)
            ),
            "--blockdev",
            "driver=qcow2,node-name=fmt,file=file,read-only=on",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", path_str(&sock)),
            "--export",
            &export,
            "--daemonize",
            "--pidfile",
            path_str(&pid),
        ],
    );
    let map = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(format!(
            "driver=nbd,export=x,server.type=unix,server.path={},\
             x-dirty-bitmap=qemu:dirty-bitmap:{name}",
            path_str(&sock)
        ))
        .output();
    let daemon: i32 = std::fs::read_to_string(&pid)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", pid.display()));
    // SAFETY: kill has no memory-safety preconditions; the pid is the
    // daemon started above.
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    let map = map.unwrap_or_else(|e| panic!("qemu-img map: {e}"));
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img map: {e}: {}",
            String::from_utf8_lossy(&map.stderr)
        )
    });
    extents
        .iter()
        .filter(|e| e["data"] == false)
        .map(|e| {
            (
                e["start"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}
