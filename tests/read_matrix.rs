//! Reads every node of every chain in the read matrix (tests/common `cases`)
//! through `Chain::read`, in chunks of odd sizes, and compares each byte with
//! what `qemu-img convert -O raw` makes of that node.

mod common;

use chainfs::chain::{Chain, ChainOptions, Node};
use common::TempChain;

/// Odd chunk sizes, cycled, so that reads start and end at every kind of
/// misalignment with clusters, subclusters and compressed runs.
const CHUNKS: [usize; 6] = [4093, 65537, 511, (1 << 20) + 3, 7, 131_071];

fn open_read_only(chain: &TempChain) -> Chain {
    let options = ChainOptions {
        writable: false,
        force_share: false,
        cache_bytes: 8 << 20,
    };
    Chain::open(chain.top(), &options)
        .unwrap_or_else(|e| panic!("open {}: {e}", chain.top().display()))
}

/// The whole guest content of `node`, read through the chain.
fn read_node(chain: &Chain, node: &Node) -> Vec<u8> {
    let size = usize::try_from(node.virtual_size()).unwrap_or_else(|e| panic!("size: {e}"));
    let mut content = vec![0xee_u8; size];
    let mut offset = 0;
    for chunk in CHUNKS.iter().cycle() {
        if offset == size {
            break;
        }
        let end = (offset + chunk).min(size);
        chain
            .read(node.id(), offset as u64, &mut content[offset..end])
            .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", node.name()));
        offset = end;
    }
    content
}

/// Every node of `chain` reads as QEMU reads it.
fn assert_reads_like_qemu(chain: &TempChain) {
    let opened = open_read_only(chain);
    assert_eq!(
        opened.nodes().len(),
        chain.layers().len(),
        "chainfs sees a different number of nodes than the test made"
    );
    for node in opened.nodes() {
        let expected = common::convert_to_raw(node.path());
        let actual = read_node(&opened, node);
        common::assert_same_bytes(&actual, &expected, node.name());
    }
}

macro_rules! read_case {
    ($case:ident) => {
        #[test]
        fn $case() {
            if common::require_qemu() {
                assert_reads_like_qemu(&common::cases::$case());
            }
        }
    };
}

common::cases::for_each_case!(read_case);

/// The snapshot case holds data that the active L1 table no longer shows:
/// chainfs must show the active state, not the snapshot's.
#[test]
fn internal_snapshot_shows_the_active_state_not_the_snapshot() {
    if !common::require_qemu() {
        return;
    }
    let chain = common::cases::internal_snapshot();
    let snapshot = common::convert_snapshot_to_raw(chain.top(), "s1");
    let opened = open_read_only(&chain);
    let active = read_node(&opened, &opened.nodes()[0]);
    assert_ne!(active, snapshot, "the test image should differ from s1");
}
