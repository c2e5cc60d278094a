//! `compress=on`: a backup's copy that writes each target cluster
//! compressed ([`Chain::write_compressed`]), as QEMU's backup with
//! `compress` does. A range the view does not hold (below `top`'s base) is
//! left to the target's backing file; one that reads as zeros becomes
//! zeros, which a compressed cluster would only waste space on. The
//! clusters between those go to the target as one compressed write per
//! run, which syncs the target once, not once per cluster.
//!
//! [`Chain::write_compressed`]: crate::chain::Chain::write_compressed

use super::super::copier::{Chains, Copier, CopyFailure};
use crate::chain::Allocation;

/// Copies `offset..offset + len` (whole target clusters, or the disk's
/// last partial one) of the view into the target, compressed; returns the
/// bytes written.
pub(super) fn copy_compressed(
    copy: &Copier,
    chains: Chains<'_>,
    cluster: u64,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, CopyFailure> {
    let end = offset + len;
    let mut copied = 0;
    // `buf` holds the run of clusters read so far that are to be written
    // compressed: `run..at`. The run is at most `len`, which the caller
    // chose to hold in memory.
    let mut run = offset;
    buf.clear();
    let mut at = offset;
    while at < end {
        let n = cluster.min(end - at);
        let extent = chains
            .source
            .block_status(copy.view, copy.base, at, n)
            .map_err(|e| ("read", e))?;
        let unheld = extent.allocation == Allocation::Unallocated && extent.len >= n;
        let left_to_backing = unheld && copy.base.is_some();
        if !left_to_backing {
            let from = buf.len();
            buf.resize(from + n as usize, 0);
            chains
                .source
                .read(copy.view, at, &mut buf[from..])
                .map_err(|e| ("read", e))?;
            if buf[from..].iter().any(|&b| b != 0) {
                at += n;
                continue;
            }
            buf.truncate(from);
        }
        // The run ends before this cluster, which is not written compressed.
        copied += write_run(copy, &chains, run, buf)?;
        if !left_to_backing {
            chains
                .dest
                .zero_range(copy.dest, at, n)
                .map_err(|e| ("write", e))?;
        }
        at += n;
        run = at;
    }
    copied += write_run(copy, &chains, run, buf)?;
    Ok(copied)
}

/// Writes the run of clusters in `buf` at `offset` of the target, in one
/// compressed write, and empties `buf`; returns the bytes written.
fn write_run(
    copy: &Copier,
    chains: &Chains<'_>,
    offset: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, CopyFailure> {
    if buf.is_empty() {
        return Ok(0);
    }
    chains
        .dest
        .write_compressed(copy.dest, offset, buf)
        .map_err(|e| ("write", e))?;
    let written = buf.len() as u64;
    buf.clear();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::track::BeforeWrite;
    use crate::chain::{create_image, Chain, ChainOptions};
    use crate::sync::{self, Arc, Mutex};

    const CLUSTER: u64 = 4096;

    /// Every write to a node, as (offset, len), in order.
    #[derive(Default)]
    struct Writes(Mutex<Vec<(u64, u64)>>);

    impl BeforeWrite for Writes {
        fn before_write(&self, offset: u64, len: u64) {
            sync::lock(&self.0).push((offset, len));
        }
    }

    /// One cluster of a kind: `t` text, `n` noise (which does not
    /// compress), `z` zeros.
    fn cluster(kind: u8, index: u64) -> Vec<u8> {
        let mut x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        match kind {
            b't' => format!("cluster {index} of a compressed backup; ")
                .bytes()
                .cycle()
                .take(CLUSTER as usize)
                .collect(),
            b'n' => (0..CLUSTER)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect(),
            _ => vec![0; CLUSTER as usize],
        }
    }

    #[test]
    fn each_run_of_data_clusters_goes_to_the_target_in_one_compressed_write() {
        let dir = tempfile::tempdir().unwrap();
        let kinds = b"tttztnttzzt";
        // The disk's last cluster is partial.
        let size = kinds.len() as u64 * CLUSTER - 1024;
        let mut data: Vec<u8> = (0..)
            .zip(kinds)
            .flat_map(|(i, &kind)| cluster(kind, i))
            .collect();
        data.truncate(size as usize);
        let (source, target) = (dir.path().join("disk.raw"), dir.path().join("bak.qcow2"));
        std::fs::write(&source, &data).unwrap();
        create_image(&target, size, CLUSTER, None).unwrap();
        let writable = ChainOptions {
            writable: true,
            ..ChainOptions::default()
        };
        let source = Chain::open(&source, &ChainOptions::default()).unwrap();
        let target = Chain::open(&target, &writable).unwrap();
        let writes = Arc::new(Writes::default());
        target.active().add_before_write_hook(writes.clone());
        let copy = Copier {
            view: source.active().id(),
            base: None,
            dest: target.active().id(),
            overwrite: true,
        };
        let chains = Chains {
            source: &source,
            dest: &target,
        };
        let copied = copy_compressed(&copy, chains, CLUSTER, 0, size, &mut Vec::new()).unwrap();
        assert_eq!(
            copied,
            size - 3 * CLUSTER,
            "the zero clusters are not counted"
        );
        let c = CLUSTER;
        assert_eq!(
            *sync::lock(&writes.0),
            [
                (0, 3 * c),
                (3 * c, c),
                (4 * c, 4 * c),
                (8 * c, c),
                (9 * c, c),
                (10 * c, c - 1024)
            ],
            "one write per run of data clusters, one zeroing per zero cluster"
        );
        let mut back = vec![1; size as usize];
        target.read(target.active().id(), 0, &mut back).unwrap();
        assert!(back == data, "the target reads as the disk");
    }
}
