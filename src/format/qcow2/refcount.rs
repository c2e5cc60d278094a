//! Refcount blocks of any width (1 to 64 bits) and the refcount table.
//!
//! A refcount block is one cluster of `refcount_bits`-wide entries. Widths of
//! 8 bits and more are big-endian; narrower ones are packed into bytes
//! starting at the least significant bit (qcow2.txt "Refcount table").

use super::types::Geometry;
use crate::format::{FormatError, Result};

/// One refcount block in memory.
#[derive(Clone, Debug)]
pub struct Refblock {
    bytes: Vec<u8>,
    order: u32,
}

impl Refblock {
    /// Wraps the bytes of one cluster.
    pub fn from_bytes(bytes: Vec<u8>, geometry: &Geometry) -> Refblock {
        Refblock {
            bytes,
            order: geometry.refcount_order,
        }
    }

    /// An all-zero block.
    pub fn empty(geometry: &Geometry) -> Refblock {
        Refblock::from_bytes(vec![0; geometry.cluster_size() as usize], geometry)
    }

    /// The refcount at `index`.
    pub fn get(&self, index: u64) -> u64 {
        let bits = 1u64 << self.order;
        if bits < 8 {
            let byte = self.bytes[(index * bits / 8) as usize];
            let shift = (index * bits) % 8;
            return u64::from(byte >> shift) & ((1 << bits) - 1);
        }
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        self.bytes[at..at + width]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }

    /// Sets the refcount at `index` and returns the byte range that changed,
    /// for writing through.
    pub fn set(&mut self, index: u64, value: u64) -> std::ops::Range<usize> {
        let bits = 1u64 << self.order;
        if bits < 8 {
            let at = (index * bits / 8) as usize;
            let shift = (index * bits) % 8;
            let mask = (((1u16 << bits) - 1) << shift) as u8;
            self.bytes[at] = (self.bytes[at] & !mask) | (((value << shift) as u8) & mask);
            return at..at + 1;
        }
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        let be = value.to_be_bytes();
        self.bytes[at..at + width].copy_from_slice(&be[8 - width..]);
        at..at + width
    }

    /// The block's on-disk bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Where the refcount of host cluster `cluster` lives: (reftable index,
/// index within the refcount block).
pub fn locate(geometry: &Geometry, cluster: u64) -> (u64, u64) {
    let per_block = geometry.refblock_entries();
    (cluster / per_block, cluster % per_block)
}

/// Decodes a refcount table entry into the refblock offset it names (0: no
/// block), checking alignment.
pub fn reftable_entry(geometry: &Geometry, index: u64, entry: u64) -> Result<u64> {
    let offset = entry & !0x1ff;
    if offset & (geometry.cluster_size() - 1) != 0 {
        return Err(FormatError::malformed(
            "refcount table",
            format!("entry {index} points to unaligned offset {offset:#x}"),
        ));
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_stores_its_maximum_and_keeps_neighbours() {
        for order in 0..=6 {
            let g = Geometry {
                cluster_bits: 9,
                extended_l2: false,
                refcount_order: order,
                external_data: false,
            };
            let mut block = Refblock::empty(&g);
            let max = g.max_refcount();
            block.set(1, max);
            block.set(2, 1);
            assert_eq!(block.get(0), 0, "order {order}");
            assert_eq!(block.get(1), max, "order {order}");
            assert_eq!(block.get(2), 1, "order {order}");
            block.set(1, 0);
            assert_eq!(block.get(2), 1, "order {order}");
        }
    }

    #[test]
    fn narrow_refcounts_pack_from_the_least_significant_bit() {
        let g = Geometry {
            cluster_bits: 9,
            extended_l2: false,
            refcount_order: 1,
            external_data: false,
        };
        let mut block = Refblock::empty(&g);
        block.set(0, 1);
        block.set(1, 2);
        assert_eq!(block.bytes()[0], 0b1001);
    }
}
