//! The one support module of the integration tests; every test file says
//! `mod common;` and uses what it needs:
//!
//! * [`tools`]: the gate (a missing tool fails under CI, skips loudly
//!   elsewhere), `qemu_img`, `qemu_io`, and QEMU's view of an image;
//! * [`chain`]: chains of images built by QEMU (base plus overlays);
//! * [`cases`]: the read matrix of image kinds;
//! * [`mount`]: a chain mounted in-process, and the `mounted()` fixture;
//! * [`cli`]: running the `chainfs` binary and watching its mounts;
//! * [`engine`]: the qcow2 engine opened directly on a storage;
//! * [`hostile`]: qcow2 images patched to be hostile;
//! * [`writers`]: threads writing their own regions while a job runs;
//! * [`backup`]: write-zeroes, incremental targets, bitmap models;
//! * [`mirror`]: the mirror tests' runs and QEMU's judgement of a target;
//! * here: byte patterns and comparing bytes.
//!
//! QEMU is the reference: images are made and filled by QEMU's own tools, and
//! whatever chainfs reads or writes is compared with what `qemu-img` says.

// Each test binary compiles this whole module but uses a different part of
// it, so what one binary leaves unused is not dead code.
#![allow(dead_code)]

pub mod backup;
pub mod bitmaps;
pub mod cases;
pub mod chain;
pub mod cli;
pub mod engine;
pub mod hostile;
pub mod mirror;
pub mod mount;
pub mod tools;
pub mod writers;

// Shorter paths for the helpers most test files use; a binary that uses
// none of them would otherwise warn.
#[allow(unused_imports)]
pub use chain::{file_name, TempChain};
#[allow(unused_imports)]
pub use tools::*;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// A deterministic byte for guest `offset` under `seed`: different seeds give
/// different contents, and any slice can be regenerated from its offset.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    // A cheap mix (splitmix64's finaliser) so that neighbouring offsets and
    // seeds differ and no run of bytes repeats at a cluster stride.
    let mut x = offset ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) as u8
}

/// `len` bytes of the pattern of `seed` starting at guest `offset`.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|o| pattern_byte(seed, o))
        .collect()
}

/// Compares two images' bytes, naming the first difference instead of
/// printing megabytes.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length {} but QEMU says {}",
        actual.len(),
        expected.len()
    );
    if let Some(first) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        let differing = actual.iter().zip(expected).filter(|(a, e)| a != e).count();
        let end = (first + 16).min(actual.len());
        panic!(
            "{what}: {differing} bytes differ, the first at offset {first:#x}: \
             got {:02x?}, QEMU has {:02x?}",
            &actual[first..end],
            &expected[first..end]
        );
    }
}
