//! Offsets and the cluster geometry of a qcow2 image.
//!
//! Guest offsets (what the guest addresses) and host offsets (where the bytes
//! sit in the image file) are different types, so that one is never passed
//! where the other is meant.

use std::fmt;

/// A byte offset in the image file (or its external data file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

impl std::ops::Add<u64> for HostOffset {
    type Output = HostOffset;

    /// The offset `bytes` further on.
    fn add(self, bytes: u64) -> HostOffset {
        HostOffset(self.0 + bytes)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// The cluster layout of one image, fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9 to 21).
    pub cluster_bits: u32,
    /// Whether L2 entries are 128 bits wide and carry subcluster bitmaps.
    pub extended_l2: bool,
    /// log2 of the refcount width in bits (0 to 6).
    pub refcount_order: u32,
    /// Whether guest data lives in an external data file, where host offset
    /// 0 is a valid data cluster (flagged COPIED).
    pub external_data: bool,
}

/// Subclusters per cluster when extended L2 entries are in use.
pub const SUBCLUSTERS_PER_CLUSTER: u64 = 32;

impl Geometry {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Offset of `offset` inside its cluster.
    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// `offset` rounded down to its cluster.
    pub fn cluster_start(&self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }

    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// L2 entries per L2 table (an L2 table fills one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes that one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    /// Index into the L1 table of the L2 table that maps guest `offset`.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest / self.l2_span()
    }

    /// Index into its L2 table of the entry that maps guest `offset`.
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.l2_entries() - 1)
    }

    /// Bytes per subcluster (the whole cluster without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS_PER_CLUSTER
        } else {
            self.cluster_size()
        }
    }

    /// Index of the subcluster holding `offset` within its cluster.
    pub fn subcluster_index(&self, offset: u64) -> u32 {
        (self.offset_in_cluster(offset) / self.subcluster_size()) as u32
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1 << self.refcount_bits()) - 1
        }
    }

    /// Refcount entries per refcount block (a refblock fills one cluster).
    pub fn refblock_entries(&self) -> u64 {
        self.cluster_size() * 8 / self.refcount_bits()
    }

    /// Number of L1 entries needed to map `virtual_size` guest bytes.
    pub fn l1_entries_for(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(self.l2_span())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry_maps_512_mib_per_l2_table() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
            external_data: false,
        };
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_span(), 512 << 20);
        assert_eq!(g.refblock_entries(), 32768);
        assert_eq!(g.l1_index(512 << 20), 1);
        assert_eq!(g.l2_index((512 << 20) + 65536 * 3 + 7), 3);
    }

    #[test]
    fn extended_l2_halves_entries_and_splits_clusters_in_32() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: true,
            refcount_order: 0,
            external_data: false,
        };
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(g.subcluster_index(65536 + 4096), 2);
        assert_eq!(g.max_refcount(), 1);
        assert_eq!(g.refblock_entries(), 65536 * 8);
    }
}
