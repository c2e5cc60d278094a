//! `chainfs info [--json] IMAGE`: the chain as chainfs sees it, top first.
//!
//! The chain is opened read-only with `force_share`, as `qemu-img info -U`
//! does, so that `info` works while a VM or a chainfs mount holds the images.
//! The JSON field names are those of `qemu-img info --output=json` where QEMU
//! has one, so a script can treat both alike.

use std::path::Path;

use serde::Serialize;

use super::{CliError, InfoArgs};
use crate::chain::{Chain, ChainOptions, Format, Node};

/// The metadata cache budget for `info`: it reads headers and counts
/// allocation, so a small cache is plenty.
const INFO_CACHE_BYTES: u64 = 4 << 20;

/// What `info` reports about one node of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    /// The node's name: its file name in a mount.
    pub node: String,
    /// Absolute path of the node's image file.
    pub filename: String,
    /// The image format.
    pub format: Format,
    /// Virtual (guest-visible) size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Cluster size in bytes; absent for raw images, as in QEMU.
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The backing file name exactly as the image stores it.
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The backing format from the image header, when it names one.
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_format: Option<Format>,
    /// Bytes the node's image file occupies on the host.
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
}

/// Runs `chainfs info`.
pub fn run(args: &InfoArgs) -> Result<(), CliError> {
    let reports = collect(&args.image)?;
    let text = if args.json {
        to_json(&reports)?
    } else {
        to_text(&reports)
    };
    println!("{text}");
    Ok(())
}

/// Opens the chain of `image` without taking write locks and reports every
/// node, top first.
pub fn collect(image: &Path) -> Result<Vec<NodeReport>, CliError> {
    let options = ChainOptions {
        writable: false,
        force_share: true,
        cache_bytes: INFO_CACHE_BYTES,
    };
    let chain = Chain::open(image, &options).map_err(|e| CliError::Failed(e.to_string()))?;
    // `nodes()` is base first; people and QEMU list the top first.
    chain.nodes().iter().rev().map(report).collect()
}

fn report(node: &Node) -> Result<NodeReport, CliError> {
    let actual_size = node
        .allocated_bytes()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    Ok(NodeReport {
        node: node.name().to_string(),
        filename: node.path().display().to_string(),
        format: node.format(),
        virtual_size: node.virtual_size(),
        cluster_size: node.cluster_size(),
        backing_filename: node.backing_file().map(str::to_string),
        backing_format: node.backing_format(),
        actual_size,
    })
}

/// The `--json` output: a pretty-printed array, top first.
pub fn to_json(reports: &[NodeReport]) -> Result<String, CliError> {
    serde_json::to_string_pretty(reports).map_err(|e| CliError::Failed(e.to_string()))
}

/// The human output: one block per node, top first, separated by blank lines.
pub fn to_text(reports: &[NodeReport]) -> String {
    let blocks: Vec<String> = reports.iter().map(node_text).collect();
    blocks.join("\n\n")
}

fn node_text(r: &NodeReport) -> String {
    let mut lines = vec![
        field("node", &escape(&r.node)),
        field("path", &escape(&r.filename)),
        field("format", &r.format.to_string()),
        field("virtual size", &sized(r.virtual_size)),
    ];
    if let Some(cluster) = r.cluster_size {
        lines.push(field("cluster size", &cluster.to_string()));
    }
    let backing = r
        .backing_filename
        .as_deref()
        .map_or("(none)".into(), escape);
    lines.push(field("backing file", &backing));
    if let Some(format) = r.backing_format {
        lines.push(field("backing format", &format.to_string()));
    }
    lines.push(field("allocated", &sized(r.actual_size)));
    lines.join("\n")
}

/// `text` with a backslash and every control character written as an
/// escape (`\\`, `\n`, `\t`, `\r`, else `\u{7f}`), so that a name holding a
/// newline cannot break the one-field-a-line format or forge a field.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\t' => escaped.push_str("\\t"),
            '\r' => escaped.push_str("\\r"),
            c if c.is_control() => escaped.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => escaped.push(c),
        }
    }
    escaped
}

fn field(label: &str, value: &str) -> String {
    format!("{:<15} {value}", format!("{label}:"))
}

/// `64 MiB (67108864 bytes)`, as `qemu-img info` shows sizes.
fn sized(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", human(bytes))
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    // Three decimals at most, trailing zeros dropped: "1.5 KiB", "64 MiB".
    let digits = format!("{value:.3}");
    let digits = digits.trim_end_matches('0').trim_end_matches('.');
    format!("{digits} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay() -> NodeReport {
        NodeReport {
            node: "top.qcow2".into(),
            filename: "/images/top.qcow2".into(),
            format: Format::Qcow2,
            virtual_size: 64 << 20,
            cluster_size: Some(65536),
            backing_filename: Some("base.raw".into()),
            backing_format: Some(Format::Raw),
            actual_size: 200_704,
        }
    }

    fn base() -> NodeReport {
        NodeReport {
            node: "base.raw".into(),
            filename: "/images/base.raw".into(),
            format: Format::Raw,
            virtual_size: 1536,
            cluster_size: None,
            backing_filename: None,
            backing_format: None,
            actual_size: 4096,
        }
    }

    #[test]
    fn json_uses_qemu_field_names_and_omits_what_qemu_omits() {
        let json = to_json(&[overlay(), base()]).ok();
        let value: serde_json::Value =
            serde_json::from_str(json.as_deref().unwrap_or("null")).unwrap_or_default();
        assert_eq!(value[0]["node"], "top.qcow2");
        assert_eq!(value[0]["filename"], "/images/top.qcow2");
        assert_eq!(value[0]["format"], "qcow2");
        assert_eq!(value[0]["virtual-size"], 64 << 20);
        assert_eq!(value[0]["cluster-size"], 65536);
        assert_eq!(value[0]["backing-filename"], "base.raw");
        assert_eq!(value[0]["backing-filename-format"], "raw");
        assert_eq!(value[0]["actual-size"], 200_704);
        let raw = value[1].as_object().cloned().unwrap_or_default();
        assert!(!raw.contains_key("cluster-size"));
        assert!(!raw.contains_key("backing-filename"));
        assert!(!raw.contains_key("backing-filename-format"));
    }

    #[test]
    fn text_lists_every_node_top_first() {
        let text = to_text(&[overlay(), base()]);
        let top = text.find("node:           top.qcow2");
        let bottom = text.find("node:           base.raw");
        assert!(top.is_some() && bottom.is_some() && top < bottom, "{text}");
        assert!(
            text.contains("virtual size:   64 MiB (67108864 bytes)"),
            "{text}"
        );
        assert!(text.contains("backing file:   (none)"), "{text}");
        assert!(
            text.contains("allocated:      4 KiB (4096 bytes)"),
            "{text}"
        );
    }

    #[test]
    fn control_characters_in_names_are_escaped_in_the_text() {
        let mut node = overlay();
        node.node = "a\nformat:         raw".into();
        node.filename = "/images/a\nformat:         raw".into();
        node.backing_filename = Some("b\\c\t\u{1b}[31m\r".into());
        let text = to_text(&[node]);
        assert_eq!(text.lines().count(), 8, "{text}");
        assert!(text.contains("node:           a\\nformat:         raw\n"));
        assert!(text.contains("path:           /images/a\\nformat:"));
        assert!(text.contains("backing file:   b\\\\c\\t\\u{1b}[31m\\r\n"));
    }

    #[test]
    fn sizes_read_like_qemu_img() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(64 << 20), "64 MiB");
    }
}
