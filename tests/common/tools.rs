//! The tools the tests drive: one gate that decides whether a missing tool
//! fails the test or skips it, and one way to run `qemu-img` and `qemu-io`.
//!
//! The CI rule, the only one: when the `CI` environment variable is set to
//! anything but the empty string, a missing tool (or `/dev/fuse`) is a
//! failure; elsewhere the test prints a loud SKIPPED and returns early.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::thread::JoinHandle;

/// Whether we run under CI, where a missing tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Under CI, panics naming `what`; elsewhere prints a SKIPPED banner.
/// Returns false so that a gate can end with it.
fn missing(what: &str) -> bool {
    if in_ci() {
        panic!("{what} is required but missing (.ci/run installs it)");
    }
    eprintln!();
    eprintln!("!!!!!!!! SKIPPED: {what} is missing; this test checked NOTHING !!!!!!!!");
    eprintln!("!!!!!!!! install it (see .ci/run) to run the test                !!!!!!!!");
    eprintln!();
    false
}

/// Checks that `tool` can be run. Without it a test cannot check anything:
/// under CI that is a failure (panic); on a developer's machine the test says
/// so loudly and the caller returns early (false).
pub fn require_tool(tool: &str) -> bool {
    // Not `TOOL --version`: sh (dash) and e2fsprogs have no such option.
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    found || missing(tool)
}

/// `require_tool` for both QEMU tools the tests drive.
pub fn require_qemu() -> bool {
    require_tool("qemu-img") && require_tool("qemu-io")
}

/// Whether FUSE mounts can be made here: `/dev/fuse`, and `fusermount3`,
/// which unmounts (for the binary and for an in-process mount alike).
pub fn require_fuse() -> bool {
    (Path::new("/dev/fuse").exists() || missing("/dev/fuse")) && require_tool("fusermount3")
}

/// FUSE, qemu-img and qemu-io, and every extra tool a test names.
pub fn require_all(tools: &[&str]) -> bool {
    require_fuse() && require_qemu() && tools.iter().all(|tool| require_tool(tool))
}

/// Runs `program` with `args`, panicking with its stderr unless it succeeds.
pub fn run_ok(program: &str, args: &[&str]) -> Output {
    run_ok_in(None, program, args)
}

/// `run_ok` in directory `cwd` (QEMU creates a relative `data_file` there,
/// and relative image names are resolved there).
pub fn run_ok_in(cwd: Option<&Path>, program: &str, args: &[&str]) -> Output {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run {program}: {e}"),
    };
    if !output.status.success() {
        panic!(
            "{program} {} failed ({}):\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// Runs `program` with `args` and returns whatever it did.
pub fn run_any(program: &str, args: &[&str]) -> Output {
    match Command::new(program).args(args).output() {
        Ok(output) => output,
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// Runs `qemu-img` and returns its stdout; panics if it fails.
pub fn qemu_img(args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok("qemu-img", args).stdout).into_owned()
}

/// `qemu-img create -q -f qcow2 [-o options] path size`: a fresh qcow2
/// image (no `-o` when `options` is empty).
pub fn create_qcow2(path: &str, size: &str, options: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path, size]);
    qemu_img(&args);
}

/// A qcow2 overlay `image` on `backing`, given as (the name the overlay
/// stores, its format): `qemu-img create -q -f qcow2 [-o options] -b NAME
/// -F FORMAT image [size]`, in the image's directory when its path is
/// absolute. With a `size` the backing file is not opened (`-u`), so it
/// may be missing, a loop or a FIFO; without one the overlay takes the
/// backing file's size.
pub fn create_overlay(image: &Path, backing: (&str, &str), size: Option<&str>, options: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    if size.is_some() {
        args.push("-u");
    }
    args.extend(["-b", backing.0, "-F", backing.1, path_str(image)]);
    args.extend(size);
    run_ok_in(image_dir(image), "qemu-img", &args);
}

/// `qemu_img` in directory `dir`, for relative image names.
pub fn qemu_img_in(dir: &Path, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok_in(Some(dir), "qemu-img", args).stdout).into_owned()
}

/// Runs each of `commands` (e.g. `write -P 0x11 0 4k`) through one `qemu-io`
/// on `image` of `format`, which is opened with its backing chain (in the
/// image's directory when its path is absolute). Panics if any command fails (qemu-io exits non-zero
/// for most failures, and prints `failed` for the rest, e.g. `read -P`).
/// Returns its stdout.
pub fn qemu_io<S: AsRef<str>>(image: &Path, format: &str, commands: &[S]) -> String {
    let mut args: Vec<&str> = vec!["-f", format];
    for command in commands {
        args.push("-c");
        args.push(command.as_ref());
    }
    args.push(path_str(image));
    let output = run_ok_in(image_dir(image), "qemu-io", &args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        !stdout.contains("failed"),
        "qemu-io {}: {stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs fio's verifying random-write job on `file`: four jobs of 12 MiB
/// each, mixed block sizes, crc32c verified after writing; `extra` adds or
/// sets options (`--offset_increment`, `--direct`, `--rate`, ...).
pub fn fio_verify(file: &Path, extra: &[&str]) -> Output {
    let filename = format!("--filename={}", path_str(file));
    let mut args = vec![
        "--name=verify",
        &filename,
        "--rw=randwrite",
        "--bssplit=4k/40:8k/10:64k/25:256k/15:1m/10",
        "--numjobs=4",
        "--size=12M",
        "--ioengine=psync",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--randrepeat=0",
        "--group_reporting",
        // No verify-state files left in the working directory.
        "--verify_state_save=0",
    ];
    args.extend_from_slice(extra);
    run_any("fio", &args)
}

/// Where to run a QEMU tool on `image`: its directory when its path is
/// absolute, because QEMU resolves a relative `data_file` name against its
/// working directory, not the image's.
fn image_dir(image: &Path) -> Option<&Path> {
    image.parent().filter(|_| image.is_absolute())
}

/// A path as `&str`; test paths are always UTF-8.
pub fn path_str(path: &Path) -> &str {
    match path.to_str() {
        Some(s) => s,
        None => panic!("non-UTF-8 test path {}", path.display()),
    }
}

/// The guest content of `image` (with its backing chain) as QEMU reads it.
/// `-U` so that it also works while chainfs holds the image.
pub fn convert_to_raw(image: &Path) -> Vec<u8> {
    convert_with(image, &[])
}

/// The guest content of internal snapshot `snapshot` of `image`.
pub fn convert_snapshot_to_raw(image: &Path, snapshot: &str) -> Vec<u8> {
    let selector = format!("snapshot.name={snapshot}");
    convert_with(image, &["-l", &selector])
}

fn convert_with(image: &Path, extra: &[&str]) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("temp file: {e}"));
    let out_path = path_str(out.path());
    let mut args = vec!["convert", "-U", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[path_str(image), out_path]);
    run_ok_in(image_dir(image), "qemu-img", &args);
    std::fs::read(out.path()).unwrap_or_else(|e| panic!("read {out_path}: {e}"))
}

/// Asserts that `qemu-img check` finds no errors, no corruptions and no
/// leaked clusters in `image`, which must be qcow2 (QEMU cannot check raw).
pub fn qemu_img_check(image: &Path) {
    let output = run_any(
        "qemu-img",
        &["check", "-U", "--output=json", path_str(image)],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {}: no JSON ({e}): {stdout}\n{}",
            image.display(),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let count = |key: &str| report.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(
        output.status.success()
            && count("check-errors") == 0
            && count("corruptions") == 0
            && count("leaks") == 0,
        "qemu-img check {} is not clean ({}):\n{stdout}\n{}",
        image.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `qemu-img check` of `image` after a daemon was killed: no errors or
/// corruptions, but leaked clusters (exit 3), which a kill may leave, are
/// allowed.
pub fn qemu_img_check_allowing_leaks(image: &Path) {
    let output = run_any("qemu-img", &["check", path_str(image)]);
    let code = output.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `qemu-img info --backing-chain --output=json -U` of `image`, top first.
pub fn qemu_img_info_chain(image: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&[
        "info",
        "-U",
        "--backing-chain",
        "--output=json",
        path_str(image),
    ]);
    match serde_json::from_str(&out) {
        Ok(serde_json::Value::Array(nodes)) => nodes,
        other => panic!("qemu-img info: not a JSON array: {other:?}\n{out}"),
    }
}

/// The file names of `top`'s chain as `qemu-img info` sees it, top first.
pub fn qemu_chain_names(top: &Path) -> Vec<String> {
    qemu_img_info_chain(top)
        .iter()
        .map(|node| match node["filename"].as_str() {
            Some(name) => name.rsplit('/').next().unwrap_or(name).to_string(),
            None => panic!("qemu-img info: no filename in {node}"),
        })
        .collect()
}

/// Whether QEMU may open `image` for writing now: `qemu-io` opens it
/// read-write and reads a sector; `false` when a lock held elsewhere
/// refuses it ("Failed to get ... lock"), a panic on any other failure.
pub fn qemu_may_write(image: &Path, format: &str) -> bool {
    let output = Command::new("qemu-io")
        .args(["-f", format, "-c", "read 0 512", path_str(image)])
        .current_dir(image_dir(image).unwrap_or(Path::new(".")))
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        return true;
    }
    assert!(
        stderr.contains("Failed to get"),
        "qemu-io {}: {stderr}",
        image.display()
    );
    false
}

/// fio writing `file` (4 jobs of 12 MiB, 16 MiB apart, random blocks of
/// 4 KiB to 1 MiB, direct, 3 MiB/s each) and then verifying every block
/// (crc32c), on a thread: what the live jobs' tests write while a job
/// becomes ready and pivots.
pub fn fio_verify_live(file: &Path) -> JoinHandle<std::process::Output> {
    let file = file.to_path_buf();
    std::thread::spawn(move || {
        let extra = ["--offset_increment=16M", "--direct=1", "--rate=3m"];
        fio_verify(&file, &extra)
    })
}
