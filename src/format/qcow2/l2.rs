//! L2 table entries, standard (64-bit) and extended (128-bit, with
//! subcluster bitmaps), decoded into [`L2Entry`] so that no caller masks bits.
//!
//! Standard entry (qcow2.txt "Standard Cluster Descriptor"):
//!
//! ```text
//! bit 63      COPIED: refcount is exactly 1, the cluster may be written in place
//! bit 62      compressed (then bits 0..61 are a compressed descriptor)
//! bits 9..55  host cluster offset (0: unallocated, or a zero cluster without space)
//! bit 0       all zeros (version 3; reserved in extended L2 entries)
//! ```
//!
//! Extended entries add a 64-bit bitmap: bit `i` says subcluster `i` is
//! allocated, bit `32 + i` that it reads as zeros.

use std::sync::atomic::{AtomicU64, Ordering};

use super::types::{Geometry, HostOffset, SUBCLUSTERS_PER_CLUSTER};
use crate::format::{FormatError, Result};

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that hold the L2 table offset.
pub const L1_OFFSET_MASK: u64 = OFFSET_MASK;
/// The COPIED flag of an L1 entry (the L2 table has refcount 1).
pub const L1_COPIED: u64 = COPIED;
/// Every subcluster bit of one half of an extended bitmap.
pub const ALL_SUBCLUSTERS: u32 = u32::MAX;

/// One decoded L2 entry: how one guest cluster is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Nothing here: reads fall through to the backing file.
    Unallocated,
    /// Reads as zeros; `host` is space kept for it (preallocated zero cluster).
    Zero {
        /// Preallocated host cluster, if any.
        host: Option<HostOffset>,
        /// Whether `host` may be written in place.
        copied: bool,
    },
    /// Guest data at `host`.
    Data {
        /// Host cluster offset.
        host: HostOffset,
        /// Whether `host` may be written in place.
        copied: bool,
    },
    /// A compressed cluster (never written in place); the raw L2 word, which
    /// [`super::compress::decode_descriptor`] reads.
    Compressed(u64),
    /// An extended L2 entry: per-subcluster allocation and zero bitmaps.
    Subclusters {
        /// Host cluster for the allocated subclusters (`None` if none is).
        host: Option<HostOffset>,
        /// Whether `host` may be written in place.
        copied: bool,
        /// Bit `i`: subcluster `i` holds data at `host + i * subcluster_size`.
        allocated: u32,
        /// Bit `i`: subcluster `i` reads as zeros.
        zero: u32,
    },
}

/// What one subcluster (or whole cluster) reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Data at this host offset (already offset into the cluster).
    Data(HostOffset),
    /// Zeros.
    Zero,
    /// The backing file's content.
    Unallocated,
    /// Part of the compressed cluster with this raw L2 word.
    Compressed(u64),
}

impl L2Entry {
    /// Decodes the raw words of one entry (`bitmap` is 0 without extended L2).
    pub fn decode(geometry: &Geometry, word: u64, bitmap: u64) -> Result<L2Entry> {
        if word & COMPRESSED != 0 {
            return Ok(L2Entry::Compressed(word));
        }
        let copied = word & COPIED != 0;
        let offset = word & OFFSET_MASK;
        if offset & (geometry.cluster_size() - 1) != 0 {
            return Err(FormatError::malformed(
                "L2 entry",
                format!("{word:#018x} points to unaligned host offset {offset:#x}"),
            ));
        }
        // In an external data file, offset 0 is a real cluster when COPIED.
        let host =
            (offset != 0 || (copied && geometry.external_data)).then_some(HostOffset(offset));
        if geometry.extended_l2 {
            let allocated = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if allocated & zero != 0 {
                return Err(FormatError::malformed("L2 entry", format!("extended L2 bitmap {bitmap:#018x} marks subclusters both allocated and zero")));
            }
            if host.is_none() && allocated != 0 {
                return Err(FormatError::malformed("L2 entry", format!("extended L2 bitmap {bitmap:#018x} allocates subclusters without a host cluster")));
            }
            return Ok(L2Entry::Subclusters {
                host,
                copied,
                allocated,
                zero,
            });
        }
        Ok(match (word & ZERO != 0, host) {
            (true, host) => L2Entry::Zero { host, copied },
            (false, Some(host)) => L2Entry::Data { host, copied },
            (false, None) => L2Entry::Unallocated,
        })
    }

    /// Encodes the entry into its raw words (`bitmap` is 0 without extended L2).
    pub fn encode(&self) -> (u64, u64) {
        let copied_bit = |copied: bool| if copied { COPIED } else { 0 };
        let host_bits = |host: Option<HostOffset>| host.map_or(0, |h| h.0);
        match *self {
            L2Entry::Unallocated => (0, 0),
            L2Entry::Zero { host, copied } => (host_bits(host) | copied_bit(copied) | ZERO, 0),
            L2Entry::Data { host, copied } => (host.0 | copied_bit(copied), 0),
            L2Entry::Compressed(word) => (word, 0),
            L2Entry::Subclusters {
                host,
                copied,
                allocated,
                zero,
            } => (
                host_bits(host) | copied_bit(copied),
                u64::from(allocated) | (u64::from(zero) << 32),
            ),
        }
    }

    /// The host cluster this entry keeps, if it is one that the image's
    /// refcounts cover as a whole cluster (not compressed).
    pub fn host_cluster(&self) -> Option<HostOffset> {
        match *self {
            L2Entry::Data { host, .. } => Some(host),
            L2Entry::Zero { host, .. } | L2Entry::Subclusters { host, .. } => host,
            L2Entry::Unallocated | L2Entry::Compressed(_) => None,
        }
    }

    /// Whether the host cluster may be written in place.
    pub fn is_copied(&self) -> bool {
        match *self {
            L2Entry::Data { copied, .. }
            | L2Entry::Zero { copied, .. }
            | L2Entry::Subclusters { copied, .. } => copied,
            L2Entry::Unallocated | L2Entry::Compressed(_) => false,
        }
    }

    /// The same entry with the COPIED flag set or cleared.
    pub fn with_copied(self, value: bool) -> L2Entry {
        match self {
            L2Entry::Data { host, .. } => L2Entry::Data {
                host,
                copied: value,
            },
            L2Entry::Zero { host, .. } => L2Entry::Zero {
                host,
                copied: value && host.is_some(),
            },
            L2Entry::Subclusters {
                host,
                allocated,
                zero,
                ..
            } => L2Entry::Subclusters {
                host,
                copied: value && host.is_some(),
                allocated,
                zero,
            },
            other => other,
        }
    }

    /// What subcluster `index` reads as (without extended L2, `index` is 0
    /// and stands for the whole cluster).
    pub fn piece(&self, geometry: &Geometry, index: u32) -> Piece {
        match *self {
            L2Entry::Unallocated => Piece::Unallocated,
            L2Entry::Zero { .. } => Piece::Zero,
            L2Entry::Data { host, .. } => Piece::Data(host),
            L2Entry::Compressed(word) => Piece::Compressed(word),
            L2Entry::Subclusters {
                host,
                allocated,
                zero,
                ..
            } => {
                let bit = 1u32 << index;
                match host {
                    _ if zero & bit != 0 => Piece::Zero,
                    Some(host) if allocated & bit != 0 => {
                        Piece::Data(host + u64::from(index) * geometry.subcluster_size())
                    }
                    _ => Piece::Unallocated,
                }
            }
        }
    }

    /// What guest `offset` reads as, and for how many bytes (up to `max_len`
    /// and the end of its cluster) the same holds contiguously.
    pub fn run_at(&self, geometry: &Geometry, offset: u64, max_len: u64) -> (Piece, u64) {
        let in_cluster = geometry.offset_in_cluster(offset);
        let to_cluster_end = (geometry.cluster_size() - in_cluster).min(max_len);
        if !matches!(self, L2Entry::Subclusters { .. }) {
            let piece = match self.piece(geometry, 0) {
                Piece::Data(host) => Piece::Data(host + in_cluster),
                other => other,
            };
            return (piece, to_cluster_end);
        }
        let sc_size = geometry.subcluster_size();
        let first = geometry.subcluster_index(offset);
        let start_piece = self.piece(geometry, first);
        let mut len = sc_size - in_cluster % sc_size;
        let mut index = first + 1;
        while len < to_cluster_end && u64::from(index) < SUBCLUSTERS_PER_CLUSTER {
            let next = self.piece(geometry, index);
            let continues = match (start_piece, next) {
                (Piece::Data(a), Piece::Data(b)) => b.0 == a.0 + u64::from(index - first) * sc_size,
                (a, b) => a == b,
            };
            if !continues {
                break;
            }
            len += sc_size;
            index += 1;
        }
        let piece = match start_piece {
            Piece::Data(host) => Piece::Data(host + in_cluster % sc_size),
            other => other,
        };
        (piece, len.min(to_cluster_end))
    }
}

/// One L2 table as raw big-endian words decoded to host order, shared
/// between threads. A writer changes entries in place ([`L2Table::store`])
/// while readers go on using the table, so that an allocating write never
/// copies the table. A standard entry is one word, read whole. An extended
/// entry is two words that a reader must see change together: the table's
/// `version` makes a seqlock of them (odd while a store is under way; a
/// reader that saw it odd or changed reads again).
#[derive(Debug)]
pub struct L2Table {
    words: Vec<AtomicU64>,
    extended: bool,
    version: AtomicU64,
}

impl Clone for L2Table {
    fn clone(&self) -> L2Table {
        let words = self
            .words
            .iter()
            .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
            .collect();
        L2Table {
            words,
            extended: self.extended,
            version: AtomicU64::new(0),
        }
    }
}

impl L2Table {
    /// Decodes a table from the bytes of one cluster.
    pub fn from_bytes(bytes: &[u8], extended: bool) -> L2Table {
        let words = bytes
            .chunks_exact(8)
            .map(|w| u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .map(AtomicU64::new)
            .collect();
        L2Table {
            words,
            extended,
            version: AtomicU64::new(0),
        }
    }

    /// The entry at `index`.
    pub fn entry(&self, geometry: &Geometry, index: u64) -> Result<L2Entry> {
        let (word, bitmap) = self.raw(index);
        L2Entry::decode(geometry, word, bitmap)
    }

    fn raw(&self, index: u64) -> (u64, u64) {
        if !self.extended {
            return (self.words[index as usize].load(Ordering::Acquire), 0);
        }
        let at = index as usize * 2;
        loop {
            let before = self.version.load(Ordering::Acquire);
            // Acquire loads: the version below is read after both words.
            let word = self.words[at].load(Ordering::Acquire);
            let bitmap = self.words[at + 1].load(Ordering::Acquire);
            if before & 1 == 0 && self.version.load(Ordering::Acquire) == before {
                return (word, bitmap);
            }
            std::hint::spin_loop();
        }
    }

    /// The on-disk bytes of `entry` at `index`, and their offset within
    /// the table, for writing through.
    pub fn encoded(&self, index: u64, entry: &L2Entry) -> (u64, Vec<u8>) {
        let (word, bitmap) = entry.encode();
        if self.extended {
            let mut bytes = word.to_be_bytes().to_vec();
            bytes.extend_from_slice(&bitmap.to_be_bytes());
            (index * 16, bytes)
        } else {
            (index * 8, word.to_be_bytes().to_vec())
        }
    }

    /// Replaces the entry at `index` in a table no other thread sees, and
    /// returns what [`L2Table::encoded`] does.
    pub fn set(&mut self, index: u64, entry: &L2Entry) -> (u64, Vec<u8>) {
        let (word, bitmap) = entry.encode();
        if self.extended {
            let at = index as usize * 2;
            *self.words[at].get_mut() = word;
            *self.words[at + 1].get_mut() = bitmap;
        } else {
            *self.words[index as usize].get_mut() = word;
        }
        self.encoded(index, entry)
    }

    /// Replaces the entry at `index` where readers see it. The caller wrote
    /// it to disk first and holds the metadata lock, so stores never race.
    pub fn store(&self, index: u64, entry: &L2Entry) {
        let (word, bitmap) = entry.encode();
        if !self.extended {
            self.words[index as usize].store(word, Ordering::Release);
            return;
        }
        let at = index as usize * 2;
        // Odd before either word changes (AcqRel: the stores below stay
        // after it), even again once both have (Release).
        self.version.fetch_add(1, Ordering::AcqRel);
        self.words[at].store(word, Ordering::Release);
        self.words[at + 1].store(bitmap, Ordering::Release);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The whole table as on-disk bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_be_bytes())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(extended_l2: bool) -> Geometry {
        Geometry {
            cluster_bits: 16,
            extended_l2,
            refcount_order: 4,
            external_data: false,
        }
    }

    #[test]
    fn standard_entries_round_trip() {
        let g = geometry(false);
        for entry in [
            L2Entry::Unallocated,
            L2Entry::Zero {
                host: None,
                copied: false,
            },
            L2Entry::Zero {
                host: Some(HostOffset(0x30000)),
                copied: true,
            },
            L2Entry::Data {
                host: HostOffset(0x50000),
                copied: true,
            },
        ] {
            let (word, bitmap) = entry.encode();
            assert_eq!(L2Entry::decode(&g, word, bitmap).unwrap(), entry);
        }
    }

    #[test]
    fn unaligned_host_offset_is_malformed() {
        let g = geometry(false);
        assert!(L2Entry::decode(&g, 0x50200 | COPIED, 0).is_err());
    }

    #[test]
    fn subcluster_runs_stop_where_the_status_changes() {
        let g = geometry(true);
        let entry = L2Entry::Subclusters {
            host: Some(HostOffset(0x100000)),
            copied: true,
            allocated: 0b0011,
            zero: 0b0100,
        };
        let (piece, len) = entry.run_at(&g, 1024, 1 << 20);
        assert_eq!(piece, Piece::Data(HostOffset(0x100000 + 1024)));
        assert_eq!(len, 2 * 2048 - 1024);
        assert_eq!(entry.run_at(&g, 4096, 1 << 20), (Piece::Zero, 2048));
        assert_eq!(
            entry.run_at(&g, 6144, 1 << 20),
            (Piece::Unallocated, 65536 - 6144)
        );
    }

    #[test]
    fn readers_see_an_extended_entry_change_whole() {
        let g = geometry(true);
        let table = std::sync::Arc::new(L2Table::from_bytes(&vec![0u8; 65536], true));
        let entries = [
            L2Entry::Subclusters {
                host: Some(HostOffset(0x10000)),
                copied: true,
                allocated: 0x0000_ffff,
                zero: 0xffff_0000,
            },
            L2Entry::Subclusters {
                host: Some(HostOffset(0x20000)),
                copied: true,
                allocated: 0xffff_0000,
                zero: 0x0000_ffff,
            },
        ];
        table.store(3, &entries[0]);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (table, done) = (table.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..2_000_000 {
                    // A torn read mixes one entry's host with the other's
                    // bits, which no store ever wrote.
                    let entry = table.entry(&g, 3).unwrap();
                    assert!(entries.contains(&entry), "torn read: {entry:?}");
                }
                done.store(true, Ordering::Release);
            })
        };
        // The writer flips the entry for as long as the reader reads.
        let mut i = 0;
        while !done.load(Ordering::Acquire) && !reader.is_finished() {
            table.store(3, &entries[i % 2]);
            i += 1;
        }
        reader.join().unwrap();
    }

    #[test]
    fn bitmap_with_allocated_and_zero_bit_is_malformed() {
        let g = geometry(true);
        assert!(L2Entry::decode(&g, 0x100000, 1 | (1 << 32)).is_err());
    }
}
