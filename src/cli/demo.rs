//! `chainfs demo DIR`: a newcomer's first command. Builds SPEC's example
//! chain, five qcow2 images `file-A.img` ← … ← `file-E.img`, mounts it at
//! `DIR/mnt` and prints what to try next.
//!
//! Each layer writes the 16-byte line `layer X was here` over and over, so
//! `hexdump -C` or `strings` on a node file shows which layer each byte
//! comes from:
//!
//! ```text
//! MiB  0      1   2   3   4   5   6   7   8   9  10 …  16      18.5
//!      [hdr]  [A]     [B]     [C]     [D]     [E]      [overlaps ]
//! ```
//!
//! * the first 4 KiB: every layer writes it, so each node file starts with
//!   its own name;
//! * an own 1 MiB region per layer, at 1, 3, 5, 7 and 9 MiB;
//! * a 1 MiB region per layer starting at 16 MiB and ½ MiB further for each
//!   layer, so each covers the second half of the one below it;
//! * everything else is a hole, so `du` and `SEEK_DATA` have something to
//!   show.

use std::path::Path;

use super::{mount, CliError, DemoArgs, MountArgs};
use crate::chain::{create_image, Chain, ChainOptions, Format};

/// The layers, base first.
const LAYERS: [char; 5] = ['A', 'B', 'C', 'D', 'E'];

/// Virtual size of every image.
const SIZE: u64 = 64 << 20;

/// QEMU's default cluster size.
const CLUSTER: u64 = 64 << 10;

const MIB: u64 = 1 << 20;

/// Runs `chainfs demo`.
pub fn run(args: &DemoArgs) -> Result<(), CliError> {
    prepare_dir(&args.dir)?;
    for (level, _) in LAYERS.iter().enumerate() {
        build_layer(&args.dir, level)?;
    }
    let mount_point = args.dir.join("mnt");
    std::fs::create_dir(&mount_point).map_err(|e| CliError::at(&mount_point, e))?;
    mount::run(&MountArgs {
        foreground: false,
        read_only: false,
        allow_other: false,
        force_share: false,
        threads: None,
        cache_size: None,
        log_file: None,
        options: Vec::new(),
        image: args.dir.join(image_name(LAYERS.len() - 1)),
        mountpoint: mount_point.clone(),
    })?;
    print!("{}", next_steps(&args.dir, &mount_point));
    Ok(())
}

/// Creates `dir` if missing; refuses one that holds anything.
fn prepare_dir(dir: &Path) -> Result<(), CliError> {
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_none()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CliError::at(dir, "not an empty directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| CliError::at(dir, e))
        }
        Err(e) => Err(CliError::at(dir, e)),
    }
}

/// `file-A.img` for level 0, and so on.
fn image_name(level: usize) -> String {
    format!("file-{}.img", LAYERS[level])
}

/// Creates layer `level` over the one below it (relative backing name,
/// backing format qcow2) and writes its regions through the chain.
fn build_layer(dir: &Path, level: usize) -> Result<(), CliError> {
    let path = dir.join(image_name(level));
    let backing = level.checked_sub(1).map(image_name);
    let backing_ref = backing.as_deref().map(|name| (name, Format::Qcow2));
    create_image(&path, SIZE, CLUSTER, backing_ref).map_err(|e| CliError::Failed(e.to_string()))?;
    let options = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let chain = Chain::open(&path, &options).map_err(|e| CliError::Failed(e.to_string()))?;
    let active = chain.active().id();
    for (offset, len) in regions(level) {
        let data = stamp(LAYERS[level], len);
        chain
            .write(active, offset, &data)
            .map_err(|e| CliError::Failed(e.to_string()))?;
    }
    chain.close().map_err(|e| CliError::Failed(e.to_string()))
}

/// The (offset, length) ranges layer `level` writes (see the module doc).
fn regions(level: usize) -> [(u64, u64); 3] {
    let level = level as u64;
    [
        (0, 4 << 10),
        ((1 + 2 * level) * MIB, MIB),
        (16 * MIB + level * MIB / 2, MIB),
    ]
}

/// `len` bytes of `layer X was here`, repeated.
fn stamp(layer: char, len: u64) -> Vec<u8> {
    let line = format!("layer {layer} was here");
    line.bytes().cycle().take(len as usize).collect()
}

/// What to try next, with `dir` and `mnt` as the user wrote them.
fn next_steps(dir: &Path, mnt: &Path) -> String {
    let m = |name: &str| quote(&mnt.join(name));
    let mnt_q = quote(mnt);
    let steps = [
        (
            format!("ls -l {mnt_q}"),
            "one flat file per node, active, ctl/",
        ),
        (format!("cat {}", m("ctl/chain")), "the chain, base first"),
        (
            format!("hexdump -C {} | head", m("file-C.img")),
            "layer C's data over B's and A's",
        ),
        (
            format!("cmp {} {}", m("active"), m("file-E.img")),
            "active is the top node, file-E.img",
        ),
        (
            format!(
                "qemu-img compare -U -f raw -F qcow2 {} {}",
                m("file-C.img"),
                quote(&dir.join("file-C.img"))
            ),
            "QEMU agrees",
        ),
        (
            format!("du -h {mnt_q}/*.img"),
            "what each node holds itself",
        ),
        (
            format!("echo \"stream base=file-A.img\" > {}", m("ctl/command")),
            "copy B, C and D into E, live; E then rests on A",
        ),
        (
            format!("chainfs status --wait {mnt_q}"),
            "watch it to the end",
        ),
        (
            format!("cat {}", m("ctl/chain")),
            "file-A.img <- file-E.img",
        ),
        (format!("chainfs umount {mnt_q}"), "when done"),
    ];
    let mut text = format!(
        "Made the chain file-A.img <- file-B.img <- ... <- file-E.img in {}\n\
         and mounted it at {mnt_q}. Try:\n",
        quote(dir)
    );
    for (command, comment) in steps {
        text.push_str(&format!("\n  # {comment}\n  {command}\n"));
    }
    text
}

/// `path` as a shell word: as is when it is plain, else single-quoted.
fn quote(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_repeat_a_sixteen_byte_line() {
        let data = stamp('B', 40);
        assert_eq!(&data[..16], b"layer B was here");
        assert_eq!(&data[16..32], b"layer B was here");
        assert_eq!(data.len(), 40);
    }

    #[test]
    fn overlap_regions_cover_half_of_the_layer_below() {
        let below = regions(1)[2];
        let above = regions(2)[2];
        assert_eq!(above.0, below.0 + below.1 / 2);
        let own: Vec<u64> = (0..5).map(|level| regions(level)[1].0 / MIB).collect();
        assert_eq!(own, [1, 3, 5, 7, 9]);
    }

    #[test]
    fn next_steps_pair_each_command_with_a_comment_above_it() {
        let text = next_steps(Path::new("demo"), Path::new("demo/mnt"));
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("  ")).collect();
        assert_eq!(lines.len(), 20);
        for pair in lines.chunks(2) {
            assert!(pair[0].starts_with("  # "), "{pair:?}");
            assert!(!pair[1].starts_with("  #"), "{pair:?}");
        }
        assert_eq!(lines[19], "  chainfs umount demo/mnt");
    }

    #[test]
    fn paths_are_quoted_only_when_needed() {
        assert_eq!(quote(Path::new("/tmp/demo/mnt")), "/tmp/demo/mnt");
        assert_eq!(quote(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(quote(Path::new("it's")), r"'it'\''s'");
    }

    #[test]
    fn a_non_empty_directory_is_refused_and_a_missing_one_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("x"), b"x").expect("write");
        let err = prepare_dir(dir.path()).expect_err("refused");
        assert!(
            err.to_string().ends_with(": not an empty directory"),
            "{err}"
        );
        let fresh = dir.path().join("new/deeper");
        prepare_dir(&fresh).expect("made");
        assert!(fresh.is_dir());
    }

    #[test]
    fn the_built_chain_reads_each_layer_where_it_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        for level in 0..LAYERS.len() {
            build_layer(dir.path(), level).expect("layer");
        }
        // Read without locks, as `qemu-img -U`: a test thread forking
        // `qemu-img` meanwhile can hold a copy of a descriptor the build
        // just closed, and with it that image's write lock, until its exec.
        let options = ChainOptions {
            force_share: true,
            ..ChainOptions::default()
        };
        let chain = Chain::open(&dir.path().join("file-E.img"), &options).expect("opens");
        assert_eq!(chain.nodes().len(), 5);
        let mut buf = [0u8; 16];
        let expect = [
            // (node level, offset, layer seen there)
            (2, 0, 'C'),
            (4, 0, 'E'),
            (4, MIB, 'A'),
            (4, 9 * MIB, 'E'),
            (1, 16 * MIB + MIB / 2, 'B'),
            (4, 16 * MIB, 'A'),
        ];
        for (level, offset, layer) in expect {
            let node = chain.nodes()[level].id();
            chain.read(node, offset, &mut buf).expect("read");
            assert_eq!(buf, stamp(layer, 16).as_slice(), "node {level} @ {offset}");
        }
        chain
            .read(chain.active().id(), 12 * MIB, &mut buf)
            .expect("hole");
        assert_eq!(buf, [0u8; 16]);
        chain.close().expect("close");
    }
}
