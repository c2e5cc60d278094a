//! Dirty bitmaps of one node (QEMU's block-dirty-bitmap): named sets of
//! granules written since the bitmap was added or cleared.
//!
//! A node's [`NodeBitmaps`] lives with its open image, so it follows the
//! image through every change of the chain: a bitmap of the active node
//! keeps recording across jobs, and after a snapshot the old node is no
//! longer written, so its bitmaps stop recording, as in QEMU.
//!
//! For jobs (a backup): [`NodeBitmaps::set_busy`] reserves a bitmap (busy
//! bitmaps refuse remove, clear and merge into them with EBUSY),
//! [`NodeBitmaps::copy`] takes its bits, and [`NodeBitmaps::merge_bits`] /
//! [`NodeBitmaps::clear`] put bits back or drop them at the end.

use std::fmt;

use crate::sync::{self, Mutex};

/// The granularities QEMU accepts: powers of two from 512 B to 2 GiB.
pub const GRANULARITIES: std::ops::RangeInclusive<u64> = 512..=(2 << 30);

/// Why a bitmap command was refused; the layer above maps each to its errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapError {
    /// No bitmap of that name on the node (ENOENT).
    NotFound(String),
    /// The name is already used on the node (EEXIST).
    Exists(String),
    /// In use by a job (EBUSY).
    Busy(String),
    /// A value the command cannot take (EINVAL).
    Invalid(String),
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapError::NotFound(name) => write!(f, "no dirty bitmap {name:?} on the node"),
            BitmapError::Exists(name) => write!(f, "the node already has a bitmap {name:?}"),
            BitmapError::Busy(name) => write!(f, "bitmap {name:?} is in use by a job"),
            BitmapError::Invalid(reason) => f.write_str(reason),
        }
    }
}

/// The bits of one bitmap: bit `n` covers guest bytes from `n << shift`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bits {
    shift: u32,
    /// Granules covered (the disk size rounded up to the granularity).
    len: u64,
    words: Vec<u64>,
}

impl Bits {
    /// An empty bitmap of `granularity` bytes per bit over `size` bytes.
    pub fn new(granularity: u64, size: u64) -> Bits {
        let shift = granularity.trailing_zeros();
        let len = size.div_ceil(granularity);
        Bits {
            shift,
            len,
            words: vec![0; len.div_ceil(64) as usize],
        }
    }

    /// Bits laid out as qcow2 stores them: bit `n` is bit `n % 8` of byte
    /// `n / 8` (missing bytes are zeros).
    pub fn from_bytes(granularity: u64, size: u64, data: &[u8]) -> Bits {
        let mut bits = Bits::new(granularity, size);
        for (word, bytes) in bits.words.iter_mut().zip(data.chunks(8)) {
            let mut raw = [0u8; 8];
            raw[..bytes.len()].copy_from_slice(bytes);
            *word = u64::from_le_bytes(raw);
        }
        // Nothing past the disk's last granule.
        if bits.len % 64 != 0 {
            if let Some(last) = bits.words.last_mut() {
                *last &= (1u64 << (bits.len % 64)) - 1;
            }
        }
        bits
    }

    /// The layout of [`Bits::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.len.div_ceil(8) as usize);
        out
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Empty bits of the same granularity and size.
    fn empty_like(&self) -> Bits {
        Bits {
            shift: self.shift,
            len: self.len,
            words: vec![0; self.words.len()],
        }
    }

    /// Sets the bits of every granule that `offset..offset + len` touches.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.shift;
        let end = ((offset.saturating_add(len - 1) >> self.shift) + 1).min(self.len);
        // Word by word: a discard of the whole disk is one call.
        let mut bit = first;
        while bit < end {
            let word = (bit / 64) as usize;
            let from = bit % 64;
            let to = (end - (bit - from)).min(64);
            let mask = if to == 64 { u64::MAX } else { (1u64 << to) - 1 };
            self.words[word] |= mask & !((1u64 << from) - 1);
            bit += to - from;
        }
    }

    /// Whether the granule holding guest byte `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        let bit = offset >> self.shift;
        bit < self.len && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Dirty bytes: the set bits times the granularity (QEMU's `count`).
    pub fn count(&self) -> u64 {
        let bits: u64 = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        bits << self.shift
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Sets every granule that is dirty in `other`, whatever its
    /// granularity (QEMU's `bdrv_merge_dirty_bitmap`).
    pub fn merge(&mut self, other: &Bits) {
        if other.shift == self.shift && other.len == self.len {
            for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
                *mine |= theirs;
            }
            return;
        }
        for bit in 0..other.len {
            if other.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0 {
                self.set_range(bit << other.shift, 1 << other.shift);
            }
        }
    }
}

/// One named bitmap.
#[derive(Clone, Debug)]
struct Bitmap {
    name: String,
    bits: Bits,
    enabled: bool,
    busy: bool,
    kind: Kind,
    /// While a backup uses the bitmap (QEMU's successor): the writes made
    /// since it started, recorded here instead of in `bits`.
    successor: Option<Bits>,
}

impl Bitmap {
    /// A bitmap no job uses.
    fn new(name: &str, bits: Bits, enabled: bool, kind: Kind) -> Bitmap {
        Bitmap {
            name: name.to_owned(),
            bits,
            enabled,
            busy: false,
            kind,
            successor: None,
        }
    }

    /// The bits as they would be stored now: with what the successor
    /// recorded (QEMU stores the bitmap reclaimed when a job is cut short).
    fn all_bits(&self) -> Bits {
        let mut bits = self.bits.clone();
        if let Some(successor) = &self.successor {
            bits.merge(successor);
        }
        bits
    }
}

/// Where a bitmap lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// In memory only, while mounted.
    Transient,
    /// Stored in the qcow2 image at close.
    Persistent,
    /// Stored in the image, found `in_use` at open (a crash): its bits are
    /// unknown and only removing it is allowed.
    Inconsistent,
}

/// What `ctl/bitmaps` shows of one bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes at that granularity.
    pub count: u64,
    /// Enabled: it records writes to the node when the node is written.
    pub enabled: bool,
    /// In use by a job.
    pub busy: bool,
    /// Where it lives.
    pub kind: Kind,
}

/// The dirty bitmaps of one node, in the order they were added.
#[derive(Debug, Default)]
pub struct NodeBitmaps {
    bitmaps: Mutex<Vec<Bitmap>>,
    /// How the image's persistent bitmaps are held here.
    pub(super) loaded: Mutex<Loaded>,
}

/// How a node holds its image's persistent bitmaps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Loaded {
    /// Not yet read.
    #[default]
    Not,
    /// Read as the image stores them, while the node takes no writes:
    /// listed, never recorded or changed.
    ReadOnly,
    /// Taken over from the writable image: recorded here, stored at close.
    Taken,
}

impl NodeBitmaps {
    /// Adds an empty bitmap; `enabled` says whether it records writes.
    pub fn add(
        &self,
        name: &str,
        bits: Bits,
        enabled: bool,
        kind: Kind,
    ) -> Result<(), BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        if bitmaps.iter().any(|b| b.name == name) {
            return Err(BitmapError::Exists(name.to_owned()));
        }
        bitmaps.push(Bitmap::new(name, bits, enabled, kind));
        Ok(())
    }

    /// Holds a bitmap the image stores: replaces the entry of that name
    /// that an earlier load made (a node that went from read-only to
    /// writable is taken over with the bits its image has), keeping its
    /// place and whether a job uses it; adds it otherwise. A transient
    /// bitmap of the same name is left as it is.
    pub fn load_stored(&self, name: &str, bits: Bits, enabled: bool, kind: Kind) {
        let mut bitmaps = sync::lock(&self.bitmaps);
        match bitmaps.iter_mut().find(|b| b.name == name) {
            Some(old) if old.kind == Kind::Transient => {}
            Some(old) => {
                old.bits = bits;
                old.enabled = enabled;
                old.kind = kind;
            }
            None => bitmaps.push(Bitmap::new(name, bits, enabled, kind)),
        }
    }

    /// Whether `name` is stored in the image (inconsistent or not).
    pub fn stored(&self, name: &str) -> Result<bool, BitmapError> {
        let bitmaps = sync::lock(&self.bitmaps);
        Ok(bitmaps[position(&bitmaps, name)?].kind != Kind::Transient)
    }

    /// Fails with EEXIST when `name` is used.
    pub fn check_free(&self, name: &str) -> Result<(), BitmapError> {
        match position(&sync::lock(&self.bitmaps), name) {
            Ok(_) => Err(BitmapError::Exists(name.to_owned())),
            Err(_) => Ok(()),
        }
    }

    /// The consistent persistent bitmaps: name, bits, enabled.
    pub fn persistent(&self) -> Vec<(String, Vec<u8>, bool)> {
        sync::lock(&self.bitmaps)
            .iter()
            .filter(|b| b.kind == Kind::Persistent)
            .map(|b| (b.name.clone(), b.all_bits().to_bytes(), b.enabled))
            .collect()
    }

    /// Removes a bitmap that no job uses.
    pub fn remove(&self, name: &str) -> Result<(), BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        let index = position(&bitmaps, name)?;
        // An inconsistent bitmap can be removed: that is all it allows.
        if bitmaps[index].busy {
            return Err(BitmapError::Busy(name.to_owned()));
        }
        bitmaps.remove(index);
        Ok(())
    }

    /// Clears every bit of a bitmap that no job uses.
    pub fn clear(&self, name: &str) -> Result<(), BitmapError> {
        self.with_idle(name, |bitmap| bitmap.bits.clear())
    }

    /// Starts or stops recording (allowed on a busy bitmap, as in QEMU, which
    /// refuses only a bitmap whose bits a job owns; chainfs's jobs copy them).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        let index = position(&bitmaps, name)?;
        check_consistent(&bitmaps[index])?;
        bitmaps[index].enabled = enabled;
        Ok(())
    }

    /// ORs the bitmaps named in `sources` into `target`, which no job uses.
    pub fn merge(&self, target: &str, sources: &[String]) -> Result<(), BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        let index = position(&bitmaps, target)?;
        check_idle(&bitmaps[index])?;
        let mut merged = bitmaps[index].bits.clone();
        for source in sources {
            let source = &bitmaps[position(&bitmaps, source)?];
            check_consistent(source)?;
            merged.merge(&source.bits);
        }
        bitmaps[index].bits = merged;
        Ok(())
    }

    /// Marks a bitmap as used by a job, or releases it.
    pub fn set_busy(&self, name: &str, busy: bool) -> Result<(), BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        let index = position(&bitmaps, name)?;
        if busy {
            check_idle(&bitmaps[index])?;
        }
        bitmaps[index].busy = busy;
        Ok(())
    }

    /// A copy of a bitmap's bits as they are now.
    pub fn copy(&self, name: &str) -> Result<Bits, BitmapError> {
        let bitmaps = sync::lock(&self.bitmaps);
        Ok(bitmaps[position(&bitmaps, name)?].bits.clone())
    }

    /// ORs `bits` into a bitmap, busy or not (a job giving back what it did
    /// not copy).
    pub fn merge_bits(&self, name: &str, bits: &Bits) -> Result<(), BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        let index = position(&bitmaps, name)?;
        bitmaps[index].bits.merge(bits);
        Ok(())
    }

    /// Every bitmap, in the order added.
    pub fn infos(&self) -> Vec<BitmapInfo> {
        sync::lock(&self.bitmaps)
            .iter()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: b.bits.granularity(),
                count: b.bits.count(),
                enabled: b.enabled,
                busy: b.busy,
                kind: b.kind,
            })
            .collect()
    }

    /// Records a write (or write-zeroes, or discard) of the node in every
    /// enabled bitmap.
    pub fn record(&self, offset: u64, len: u64) {
        let mut bitmaps = sync::lock(&self.bitmaps);
        for bitmap in bitmaps
            .iter_mut()
            .filter(|b| b.enabled && b.kind != Kind::Inconsistent)
        {
            let bits = bitmap.successor.as_mut().unwrap_or(&mut bitmap.bits);
            bits.set_range(offset, len);
        }
    }

    /// A backup starts with the bitmap (QEMU's
    /// `bdrv_dirty_bitmap_create_successor`): it becomes busy, writes from
    /// now on go to a successor, and its bits as they are now are returned.
    pub fn freeze(&self, name: &str) -> Result<Bits, BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        let index = position(&bitmaps, name)?;
        let bitmap = &mut bitmaps[index];
        check_idle(bitmap)?;
        bitmap.busy = true;
        bitmap.successor = Some(bitmap.bits.empty_like());
        Ok(bitmap.bits.clone())
    }

    /// The backup that froze the bitmap ends: with `sync`, the bitmap
    /// becomes its successor (QEMU's abdicate: only the writes made since
    /// the start), else the successor is merged back into it (QEMU's
    /// reclaim). Either way it is no longer busy.
    pub fn thaw(&self, name: &str, sync: bool) -> Result<(), BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        let index = position(&bitmaps, name)?;
        let bitmap = &mut bitmaps[index];
        if let Some(successor) = bitmap.successor.take() {
            if sync {
                bitmap.bits = successor;
            } else {
                bitmap.bits.merge(&successor);
            }
        }
        bitmap.busy = false;
        Ok(())
    }

    fn with_idle(&self, name: &str, change: impl FnOnce(&mut Bitmap)) -> Result<(), BitmapError> {
        let mut bitmaps = sync::lock(&self.bitmaps);
        let index = position(&bitmaps, name)?;
        check_idle(&bitmaps[index])?;
        change(&mut bitmaps[index]);
        Ok(())
    }
}

fn position(bitmaps: &[Bitmap], name: &str) -> Result<usize, BitmapError> {
    bitmaps
        .iter()
        .position(|b| b.name == name)
        .ok_or_else(|| BitmapError::NotFound(name.to_owned()))
}

fn check_consistent(bitmap: &Bitmap) -> Result<(), BitmapError> {
    if bitmap.kind == Kind::Inconsistent {
        return Err(BitmapError::Invalid(format!(
            "bitmap {:?} is inconsistent (not stored cleanly): it can only be removed",
            bitmap.name
        )));
    }
    Ok(())
}

fn check_idle(bitmap: &Bitmap) -> Result<(), BitmapError> {
    check_consistent(bitmap)?;
    if bitmap.busy {
        return Err(BitmapError::Busy(bitmap.name.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_touched_granules_and_merges_across_granularities() {
        let mut bits = Bits::new(65536, 1 << 20);
        bits.set_range(0, 1);
        bits.set_range(65536 * 3 + 5, 1);
        bits.set_range(65536 * 5 - 1, 2);
        assert_eq!(bits.count(), 4 * 65536);
        bits.set_range((1 << 20) - 1, 100);
        assert_eq!(bits.count(), 5 * 65536);
        let mut coarse = Bits::new(1 << 20, 1 << 20);
        coarse.merge(&bits);
        assert_eq!(coarse.count(), 1 << 20);
        let mut fine = Bits::new(4096, 1 << 20);
        fine.merge(&bits);
        assert_eq!(fine.count(), 5 * 65536);
        assert!(fine.get(65536 * 3) && !fine.get(65536 * 2));
    }

    #[test]
    fn ranges_set_exactly_their_granules_across_words() {
        for (offset, len) in [
            (0, 1),
            (63 * 512, 2 * 512),
            (100 * 512, 300 * 512),
            (5, 64 * 512),
        ] {
            let mut bits = Bits::new(512, 1 << 20);
            bits.set_range(offset, len);
            let first = offset / 512;
            let end = (offset + len - 1) / 512 + 1;
            for granule in 0..(1 << 20) / 512 {
                let want = (first..end).contains(&granule);
                assert_eq!(bits.get(granule * 512), want, "{offset}+{len}: {granule}");
            }
            assert_eq!(bits.count(), (end - first) * 512);
        }
    }

    #[test]
    fn busy_bitmaps_refuse_remove_clear_and_merge_into_them() {
        let node = NodeBitmaps::default();
        node.add("a", Bits::new(512, 4096), true, Kind::Transient)
            .unwrap();
        node.add("b", Bits::new(512, 4096), true, Kind::Transient)
            .unwrap();
        assert_eq!(
            node.add("a", Bits::new(512, 4096), true, Kind::Transient),
            Err(BitmapError::Exists("a".into()))
        );
        node.record(0, 512);
        node.set_busy("a", true).unwrap();
        assert!(matches!(node.remove("a"), Err(BitmapError::Busy(_))));
        assert!(matches!(node.clear("a"), Err(BitmapError::Busy(_))));
        assert!(matches!(
            node.merge("a", &["b".into()]),
            Err(BitmapError::Busy(_))
        ));
        node.merge("b", &["a".into()]).unwrap();
        assert!(matches!(
            node.merge("b", &["c".into()]),
            Err(BitmapError::NotFound(_))
        ));
        assert_eq!(node.copy("a").unwrap().count(), 512);
        assert!(matches!(node.freeze("a"), Err(BitmapError::Busy(_))));
        node.set_busy("a", false).unwrap();
        node.remove("a").unwrap();
        assert_eq!(node.infos().len(), 1);
    }

    #[test]
    fn a_frozen_bitmap_records_into_its_successor_until_thawed() {
        let node = NodeBitmaps::default();
        node.add("a", Bits::new(512, 8192), true, Kind::Persistent)
            .unwrap();
        node.record(0, 512);
        let frozen = node.freeze("a").unwrap();
        assert_eq!(frozen.count(), 512);
        node.record(4096, 512);
        assert_eq!(
            node.copy("a").unwrap().count(),
            512,
            "the original is frozen"
        );
        assert_eq!(node.persistent()[0].1, vec![0x01, 0x01], "stored: both");
        assert!(matches!(node.clear("a"), Err(BitmapError::Busy(_))));
        node.thaw("a", true).unwrap();
        let bits = node.copy("a").unwrap();
        assert!(bits.get(4096) && !bits.get(0), "abdicated: only new writes");
        node.freeze("a").unwrap();
        node.record(1024, 1);
        node.thaw("a", false).unwrap();
        let bits = node.copy("a").unwrap();
        assert!(bits.get(4096) && bits.get(1024), "reclaimed: both");
        node.clear("a").unwrap();
    }
}
