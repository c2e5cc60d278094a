//! `chainfs info` against `qemu-img info --backing-chain` on every chain of
//! the read matrix, plus its human output and its errors.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::TempChain;
use serde_json::Value;

/// The fields `chainfs info --json` shares with `qemu-img info` and reports
/// alike (`actual-size` is compared by [`expected_actual_size`]).
const SHARED_FIELDS: [&str; 6] = [
    "filename",
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
];

fn chainfs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chainfs"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run chainfs: {e}"))
}

fn chainfs_ok(args: &[&str]) -> String {
    let output = chainfs(args);
    assert!(
        output.status.success(),
        "chainfs {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn info_json(top: &Path) -> Vec<Value> {
    let out = chainfs_ok(&["info", "--json", common::path_str(top)]);
    match serde_json::from_str(&out) {
        Ok(Value::Array(nodes)) => nodes,
        other => panic!("chainfs info --json: not a JSON array: {other:?}\n{out}"),
    }
}

/// `chainfs info --json` lists the nodes qemu-img lists, in the same order
/// (top first), with the same values for every field they share.
fn assert_info_like_qemu(chain: &TempChain) {
    let ours = info_json(chain.top());
    let qemu = common::qemu_img_info_chain(chain.top());
    assert_eq!(
        ours.len(),
        qemu.len(),
        "chainfs: {ours:#?}\nqemu-img: {qemu:#?}"
    );
    for (node, reference) in ours.iter().zip(&qemu) {
        for field in SHARED_FIELDS {
            assert_eq!(
                node.get(field),
                reference.get(field),
                "field {field} of {}",
                node["filename"]
            );
        }
        assert_eq!(
            node.get("actual-size"),
            Some(&expected_actual_size(reference)),
            "actual-size of {}",
            node["filename"]
        );
        let filename = node["filename"].as_str().unwrap_or_default();
        let expected_node = common::file_name(Path::new(filename));
        assert_eq!(node["node"].as_str(), Some(expected_node.as_str()));
    }
}

/// chainfs counts every byte a node holds on the host, its external data
/// file included (README: `actual-size`); QEMU's `actual-size` counts the
/// qcow2 file alone. Elsewhere the two agree exactly.
fn expected_actual_size(reference: &Value) -> Value {
    let qemu = reference["actual-size"].as_u64().unwrap_or_default();
    let data_file = reference["format-specific"]["data"]["data-file"].as_str();
    let data = data_file.map_or(0, |path| {
        let metadata = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::os::unix::fs::MetadataExt::blocks(&metadata) * 512
    });
    Value::from(qemu + data)
}

/// The human output names every node and its path, top first.
fn assert_text_lists_every_node(chain: &TempChain) {
    let text = chainfs_ok(&["info", common::path_str(chain.top())]);
    let mut last = None;
    for layer in chain.layers().iter().rev() {
        let name = common::file_name(&layer.path);
        let at = text.find(&format!("node:           {name}\n"));
        assert!(at.is_some(), "{name} missing from:\n{text}");
        assert!(at > last, "{name} out of order in:\n{text}");
        assert!(text.contains(common::path_str(&layer.path)), "{text}");
        last = at;
    }
}

macro_rules! info_case {
    ($case:ident) => {
        #[test]
        fn $case() {
            if common::require_qemu() {
                let chain = common::cases::$case();
                assert_info_like_qemu(&chain);
                assert_text_lists_every_node(&chain);
            }
        }
    };
}

common::cases::for_each_case!(info_case);

#[test]
fn a_missing_image_fails_with_one_line_naming_it() {
    let output = chainfs(&["info", "/nonexistent/chainfs-test.qcow2"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("/nonexistent/chainfs-test.qcow2"),
        "{stderr}"
    );
}

#[test]
fn a_missing_backing_file_fails_naming_both_images() {
    if !common::require_qemu() {
        return;
    }
    let chain = TempChain::new()
        .qcow2_base("gone.qcow2", common::MIB, "")
        .overlay("top.qcow2", None, "");
    std::fs::remove_file(&chain.layers()[0].path).unwrap_or_else(|e| panic!("{e}"));
    let output = chainfs(&["info", common::path_str(chain.top())]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("gone.qcow2") && stderr.contains("top.qcow2"),
        "{stderr}"
    );
}

#[test]
fn info_works_while_qemu_holds_the_image_for_writing() {
    if !common::require_qemu() {
        return;
    }
    let chain = TempChain::new().qcow2_base("busy.qcow2", common::MIB, "");
    // qemu-io holds its write lock while it waits on stdin; once it has
    // answered a read it surely holds it. (Probing with `qemu-img info`
    // would race: the probe's own lock makes a starting writer fail.)
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", common::path_str(chain.top())])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("qemu-io: {e}"));
    let stdin = holder.stdin.as_mut().unwrap();
    stdin.write_all(b"read 0 512\n").unwrap();
    stdin.flush().unwrap();
    let answered = BufReader::new(holder.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains("read 512/512 bytes"));
    assert!(answered, "qemu-io did not open the image");
    let plain = common::run_any("qemu-img", &["info", common::path_str(chain.top())]);
    assert!(
        !plain.status.success(),
        "the image is not locked: the test proves nothing"
    );
    let nodes = info_json(chain.top());
    drop(holder.stdin.take());
    let _ = holder.wait();
    assert_eq!(nodes.len(), 1);
}

#[test]
fn a_newline_in_a_name_is_escaped_in_the_text() {
    if !common::require_qemu() {
        return;
    }
    let chain = TempChain::new()
        // No colon: QEMU would read the name as a protocol.
        .qcow2_base("odd\nforged line.qcow2", common::MIB, "")
        .overlay("top.qcow2", None, "");
    let text = chainfs_ok(&["info", common::path_str(chain.top())]);
    let nodes: Vec<&str> = text.lines().filter(|l| l.starts_with("node:")).collect();
    assert_eq!(
        nodes,
        [
            "node:           top.qcow2",
            "node:           odd\\nforged line.qcow2"
        ],
        "{text}"
    );
    assert!(
        text.contains("backing file:   odd\\nforged line.qcow2\n"),
        "{text}"
    );
}

/// A FIFO's open waits for a writer: opened as an image, `info` (and a
/// mount) would hang for ever. It is refused at once, naming it and the
/// image that points to it; so is a FIFO given as the image itself.
#[test]
fn a_fifo_is_refused_without_blocking_naming_it_and_its_image() {
    if !common::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let fifo = dir.path().join("pipe.raw");
    common::run_ok("mkfifo", &[common::path_str(&fifo)]);
    let top = dir.path().join("top.qcow2");
    common::create_overlay(&top, ("pipe.raw", "raw"), Some("1M"), "");
    for (image, named) in [
        (&top, vec!["pipe.raw", "top.qcow2"]),
        (&fifo, vec!["pipe.raw"]),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chainfs"))
            .args(["info", common::path_str(image)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run chainfs: {e}"));
        // Generous: only a hang reaches it.
        let code = common::cli::wait_child(&mut child, Duration::from_secs(60));
        assert_eq!(
            code,
            Some(Some(1)),
            "chainfs info {} hung or passed",
            image.display()
        );
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(stderr.contains("FIFO"), "{stderr}");
        for name in named {
            assert!(stderr.contains(name), "{name} not named: {stderr}");
        }
    }
}
