//! Unit tests of the refcount map and of the layout of the rebuilt
//! structure.

use super::count::RefcountMap;
use super::*;

fn geometry(cluster_bits: u32, refcount_order: u32) -> Geometry {
    Geometry {
        cluster_bits,
        extended_l2: false,
        refcount_order,
        external_data: false,
    }
}

#[test]
fn counts_beyond_sixteen_bits_stay_exact() {
    let g = geometry(9, 6);
    let mut map = RefcountMap::new(4 * 512, &g).unwrap();
    for _ in 0..70_000 {
        map.add_cluster(1, &|| "x".into()).unwrap();
    }
    assert_eq!(map.get(1), 70_000);
    assert_eq!(map.get(2), 0);
    assert!(map.check_width(&geometry(9, 4)).is_err());
    assert!(map.check_width(&g).is_ok());
}

#[test]
fn references_past_the_end_of_the_file_refuse_the_repair() {
    let g = geometry(9, 4);
    let mut map = RefcountMap::new(1000, &g).unwrap();
    assert!(map.add_bytes(512, 512, &|| "x".into()).is_ok());
    assert!(map.add_bytes(1024, 1, &|| "x".into()).is_err());
    assert!(map.add_bytes(u64::MAX, 2, &|| "x".into()).is_err());
}

#[test]
fn the_new_structure_describes_itself() {
    // 512-byte clusters, 16-bit refcounts: 256 clusters per block.
    let g = geometry(9, 4);
    let mut map = RefcountMap::new(255 * 512, &g).unwrap();
    map.add_cluster(0, &|| "x".into()).unwrap();
    let layout = plan_layout(&map, &g).unwrap();
    // Clusters 255 (block 0's last), 256 (block 1) and the table.
    assert_eq!(layout.start, 255);
    assert_eq!(layout.slots, vec![0, 1]);
    assert_eq!(layout.table_clusters, 1);
    for cluster in 255..258 {
        assert_eq!(layout.refcount(&map, cluster), 1);
    }
    let block = build_refblock(&g, &map, &layout, 1);
    assert_eq!(block.get(0), 1);
    assert_eq!(block.get(1), 1);
    assert_eq!(block.get(2), 0);
}

#[test]
fn gaps_without_references_get_no_refcount_block() {
    let g = geometry(9, 4);
    let mut map = RefcountMap::new(1024 * 512, &g).unwrap();
    map.add_cluster(0, &|| "x".into()).unwrap();
    let layout = plan_layout(&map, &g).unwrap();
    assert_eq!(layout.slots, vec![0, 4]);
}
