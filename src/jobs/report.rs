//! What `ctl/status`, `ctl/status.json` and `ctl/chain` show (SPEC §5).
//! Pure rendering: the caller passes the state to render.

use std::fmt::Write as _;

use super::Chain;

/// `ctl/status` for people: the jobs (none yet), then, when a command was
/// refused, the refusal as the last line.
pub fn status_text(last_rejection: Option<&str>) -> String {
    let mut text = String::from("No active jobs\n");
    if let Some(line) = last_rejection {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// `ctl/status.json`: the jobs as a JSON array (none yet).
pub fn status_json() -> String {
    "[]\n".to_owned()
}

/// `ctl/chain`: the chain base first on one line, then one line per node
/// with its path, format, virtual size and backing string.
///
/// ```text
/// file-A.img <- file-B.img
/// file-A.img: path="/img/file-A.img" format=raw virtual-size=67108864 backing=none
/// file-B.img: path="/img/file-B.img" format=qcow2 virtual-size=67108864 backing="file-A.img" backing-format=raw
/// ```
pub fn chain_text(chain: &Chain) -> String {
    let names: Vec<&str> = chain.nodes().iter().map(|node| node.name()).collect();
    let mut text = names.join(" <- ");
    text.push('\n');
    for node in chain.nodes() {
        // Writing to a String cannot fail.
        let _ = write!(
            text,
            "{}: path={:?} format={} virtual-size={}",
            node.name(),
            node.path().display().to_string(),
            node.format().name(),
            node.virtual_size()
        );
        match node.backing_file() {
            Some(backing) => {
                let _ = write!(text, " backing={backing:?}");
                if let Some(format) = node.backing_format() {
                    let _ = write!(text, " backing-format={}", format.name());
                }
            }
            None => text.push_str(" backing=none"),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_no_jobs_and_ends_with_the_last_rejection() {
        assert_eq!(status_text(None), "No active jobs\n");
        let text = status_text(Some("rejected: frob: EINVAL"));
        assert_eq!(text.lines().last(), Some("rejected: frob: EINVAL"));
    }

    #[test]
    fn status_json_is_an_empty_array() {
        let value: serde_json::Value = serde_json::from_str(&status_json()).unwrap();
        assert_eq!(value, serde_json::json!([]));
    }
}
