//! The `bitmap-*` commands (QEMU's block-dirty-bitmap-add, -remove, -clear,
//! -enable, -disable and -merge), run synchronously on a node's
//! [`NodeBitmaps`](crate::chain::bitmap::NodeBitmaps), and the rendering of
//! `ctl/bitmaps` and `ctl/bitmaps.json`.

use super::command::{error, parse_rate, Args, ParseError};
use super::registry::resolve;
use super::report::escape;
use super::{Chain, Format, JobError, Node};
use crate::chain::bitmap::{BitmapError, BitmapInfo, Bits, Kind, GRANULARITIES};
use crate::chain::StoreRefusal;

/// A parsed `bitmap-*` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapCommand {
    /// The node whose bitmap it is.
    pub node: String,
    /// The bitmap (the target, for a merge).
    pub name: String,
    /// What is done to it.
    pub action: BitmapAction,
}

/// What a `bitmap-*` command does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapAction {
    /// `bitmap-add`.
    Add {
        /// Bytes per bit (default: from the node's cluster size).
        granularity: Option<u64>,
        /// Stored in the image.
        persistent: bool,
        /// Created not recording.
        disabled: bool,
    },
    /// `bitmap-remove`.
    Remove,
    /// `bitmap-clear`.
    Clear,
    /// `bitmap-enable`.
    Enable,
    /// `bitmap-disable`.
    Disable,
    /// `bitmap-merge`: the bitmaps ORed into the target.
    Merge(Vec<String>),
}

/// Parses the words of `verb` (a word starting with `bitmap-`).
pub(super) fn parse(verb: &str, args: &mut Args) -> Result<BitmapCommand, ParseError> {
    let node = args.required("node")?;
    let (name, action) = match verb {
        "bitmap-add" => (
            args.required("name")?,
            BitmapAction::Add {
                granularity: args
                    .take("granularity")
                    .map(|g| granularity(&g))
                    .transpose()?,
                persistent: switch(args, "persistent")?,
                disabled: switch(args, "disabled")?,
            },
        ),
        "bitmap-remove" => (args.required("name")?, BitmapAction::Remove),
        "bitmap-clear" => (args.required("name")?, BitmapAction::Clear),
        "bitmap-enable" => (args.required("name")?, BitmapAction::Enable),
        "bitmap-disable" => (args.required("name")?, BitmapAction::Disable),
        "bitmap-merge" => {
            let target = args.required("target")?;
            let sources = args.required("bitmaps")?;
            let sources: Vec<String> = sources.split(',').map(str::to_owned).collect();
            if sources.iter().any(String::is_empty) {
                return Err(error("bitmap-merge: bitmaps=A[,B…] names no empty bitmap"));
            }
            (target, BitmapAction::Merge(sources))
        }
        other => return Err(error(format!("unknown command {other:?}"))),
    };
    if name.is_empty() {
        return Err(error(format!("{verb}: a bitmap name cannot be empty")));
    }
    Ok(BitmapCommand { node, name, action })
}

/// `KEY=on|off`, off when absent.
fn switch(args: &mut Args, key: &str) -> Result<bool, ParseError> {
    match args.take(key).as_deref() {
        None | Some("off") => Ok(false),
        Some("on") => Ok(true),
        Some(other) => Err(error(format!("{key}={other:?}: expected on or off"))),
    }
}

/// A bitmap's `granularity=SIZE`: a power of two from 512 B to 2 GiB.
fn granularity(text: &str) -> Result<u64, ParseError> {
    match parse_rate(text) {
        Ok(size) if size.is_power_of_two() && GRANULARITIES.contains(&size) => Ok(size),
        _ => Err(error(format!(
            "bitmap granularity {text:?}: expected a power of two from 512 to 2G"
        ))),
    }
}

/// Runs a bitmap command on the chain as it stands now.
pub(super) fn execute(chain: &Chain, command: BitmapCommand) -> Result<(), JobError> {
    let node = &chain.nodes()[chain_level(chain, &command.node)?];
    // The image's own bitmaps are known before any name is looked up.
    node.take_persistent_bitmaps()?;
    let bitmaps = node.bitmaps();
    let name = &command.name;
    if command.action.changes_target() {
        check_changeable(node, name)?;
    }
    let result = match command.action {
        BitmapAction::Add {
            granularity,
            persistent,
            disabled,
        } => {
            let granularity = granularity.unwrap_or_else(|| default_granularity(node));
            if persistent {
                if node.format() != Format::Qcow2 || !node.writable() {
                    return Err(JobError::Invalid(format!(
                        "persistent bitmaps need a writable qcow2 node; {} is {}",
                        node.name(),
                        describe(node)
                    )));
                }
                bitmaps.check_free(name).map_err(|e| refusal(node, e))?;
                node.can_store_bitmap(name, granularity)
                    .map_err(|e| unstorable(node, name, e))?;
                return Ok(node.add_persistent_bitmap(name, granularity, !disabled)?);
            }
            let bits = Bits::new(granularity, node.virtual_size());
            bitmaps.add(name, bits, !disabled, Kind::Transient)
        }
        BitmapAction::Remove => {
            if bitmaps.stored(name).map_err(|e| refusal(node, e))? {
                // A busy bitmap is refused before the image changes.
                check_removable(bitmaps, name).map_err(|e| refusal(node, e))?;
                node.remove_persistent_bitmap(name)?;
            }
            bitmaps.remove(name)
        }
        BitmapAction::Clear => bitmaps.clear(name),
        BitmapAction::Enable => bitmaps.set_enabled(name, true),
        BitmapAction::Disable => bitmaps.set_enabled(name, false),
        BitmapAction::Merge(sources) => bitmaps.merge(name, &sources),
    };
    result.map_err(|e| refusal(node, e))
}

impl BitmapAction {
    /// Whether the command changes the bitmap it names (a merge changes
    /// its target, not its sources).
    fn changes_target(&self) -> bool {
        !matches!(self, BitmapAction::Add { .. })
    }
}

/// Refuses to change a bitmap the image stores while the node takes no
/// writes: the change could never be stored (QEMU's read-only bitmaps).
pub(super) fn check_changeable(node: &Node, name: &str) -> Result<(), JobError> {
    let stored = node.bitmaps().stored(name).map_err(|e| refusal(node, e))?;
    if stored && !node.writable() {
        return Err(JobError::Invalid(format!(
            "{}: bitmap {name:?} is stored in an image that takes no writes; \
             it cannot be changed",
            node.name()
        )));
    }
    Ok(())
}

/// A persistent bitmap the image cannot store, as QEMU words it.
fn unstorable(node: &Node, name: &str, refusal: StoreRefusal) -> JobError {
    let text = format!(
        "cannot make bitmap {name:?} persistent in {}: {refusal}",
        node.name()
    );
    match refusal {
        StoreRefusal::Invalid(_) => JobError::Invalid(text),
        StoreRefusal::NoRoom(_) => JobError::NoSpace(text),
    }
}

/// A refused bitmap command as the jobs layer reports it.
fn refusal(node: &Node, e: BitmapError) -> JobError {
    let text = format!("{}: {e}", node.name());
    match e {
        BitmapError::NotFound(_) => JobError::NotFound(text),
        BitmapError::Exists(_) => JobError::Exists(text),
        BitmapError::Busy(_) => JobError::Busy(text),
        BitmapError::Invalid(_) => JobError::Invalid(text),
    }
}

/// Fails with EBUSY when a job uses `name`.
fn check_removable(
    bitmaps: &crate::chain::bitmap::NodeBitmaps,
    name: &str,
) -> Result<(), BitmapError> {
    match bitmaps.infos().into_iter().find(|b| b.name == name) {
        Some(info) if info.busy => Err(BitmapError::Busy(name.to_owned())),
        Some(_) => Ok(()),
        None => Err(BitmapError::NotFound(name.to_owned())),
    }
}

fn chain_level(chain: &Chain, name: &str) -> Result<usize, JobError> {
    let id = resolve(chain, name)?;
    chain
        .nodes()
        .iter()
        .position(|n| n.id() == id)
        .ok_or_else(|| JobError::NotFound(format!("no node {name:?}")))
}

/// What a node is, for a refusal of a persistent bitmap.
fn describe(node: &Node) -> &'static str {
    match (node.format(), node.writable()) {
        (Format::Raw, _) => "raw",
        (_, false) => "read-only",
        _ => "writable qcow2",
    }
}

/// QEMU's default: the cluster size clamped to 4 KiB ..= 64 KiB, 64 KiB
/// for formats without clusters.
fn default_granularity(node: &Node) -> u64 {
    node.cluster_size()
        .map_or(64 << 10, |size| size.clamp(4 << 10, 64 << 10))
}

/// One node's bitmap as `ctl/bitmaps` lists it.
struct Listed<'a> {
    node: &'a Node,
    info: BitmapInfo,
}

impl Listed<'_> {
    /// Enabled, consistent, and on a node that is written (the old top
    /// after a snapshot is not).
    fn recording(&self) -> bool {
        self.info.enabled && self.info.kind != Kind::Inconsistent && self.node.writable()
    }
}

fn listed(chain: &Chain) -> Vec<Listed<'_>> {
    chain
        .nodes()
        .iter()
        .rev()
        .flat_map(|node| {
            // A node that joined the chain since (a mirror's target after
            // its pivot) shows its image's bitmaps too.
            if let Err(err) = node.take_persistent_bitmaps() {
                log::warn!("persistent bitmaps of {}: {err}", node.name());
            }
            node.bitmaps()
                .infos()
                .into_iter()
                .map(move |info| Listed { node, info })
        })
        .collect()
}

/// What `ctl/bitmaps` shows: one line per bitmap, active node first.
pub fn bitmaps_text(chain: &Chain) -> String {
    let listed = listed(chain);
    if listed.is_empty() {
        return "No dirty bitmaps\n".to_owned();
    }
    let mut out = String::new();
    for bitmap in &listed {
        let mut flags = Vec::new();
        if bitmap.recording() {
            flags.push("recording");
        }
        if bitmap.info.busy {
            flags.push("busy");
        }
        if bitmap.info.kind != Kind::Transient {
            flags.push("persistent");
        }
        if bitmap.info.kind == Kind::Inconsistent {
            flags.push("inconsistent");
        }
        out.push_str(&format!(
            "{} {}: granularity {}, {} dirty bytes{}{}\n",
            escape(bitmap.node.name()),
            escape(&bitmap.info.name),
            bitmap.info.granularity,
            bitmap.info.count,
            if flags.is_empty() { "" } else { ", " },
            flags.join(" "),
        ));
    }
    out
}

/// What `ctl/bitmaps.json` shows: QEMU's `query-block` dirty-bitmaps
/// fields plus `node`.
pub fn bitmaps_json(chain: &Chain) -> String {
    let list: Vec<serde_json::Value> = listed(chain)
        .iter()
        .map(|bitmap| {
            serde_json::json!({
                "node": bitmap.node.name(),
                "name": bitmap.info.name,
                "granularity": bitmap.info.granularity,
                "count": bitmap.info.count,
                "recording": bitmap.recording(),
                "busy": bitmap.info.busy,
                "persistent": bitmap.info.kind != Kind::Transient,
                "inconsistent": bitmap.info.kind == Kind::Inconsistent,
            })
        })
        .collect();
    let mut text = serde_json::Value::Array(list).to_string();
    text.push('\n');
    text
}
