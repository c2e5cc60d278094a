//! Whether an image can store one more persistent bitmap, decided as
//! QEMU's `qcow2_co_can_store_new_dirty_bitmap` (with
//! `check_constraints_on_bitmap`) decides before it adds one: the image
//! version, the granularity, the room the bitmap would take, its name, and
//! the room left in the directory.

use super::{
    bitmap_bits, entry_size, Bitmaps, GRANULARITY_BITS, MAX_BITMAPS, MAX_DIRECTORY_SIZE,
    MAX_NAME_SIZE, MAX_PHYS_SIZE, MAX_TABLE_ENTRIES,
};
use crate::format::qcow2::Qcow2;
use crate::sync;

/// Why a new persistent bitmap cannot be stored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreRefusal {
    /// The bitmap itself cannot be stored here: the image version, its
    /// granularity, its size at that granularity, its name (EINVAL).
    #[error("{0}")]
    Invalid(String),
    /// The image holds as many bitmaps as it can (ENOSPC).
    #[error("{0}")]
    NoRoom(String),
}

/// What a new bitmap is checked against.
#[derive(Clone, Copy, Debug)]
pub(super) struct Room {
    /// The qcow2 version (bitmaps need 3).
    pub(super) version: u32,
    /// The virtual disk in bytes, whole sectors.
    pub(super) disk: u64,
    pub(super) cluster_size: u64,
    /// Bitmaps in the directory now.
    pub(super) bitmaps: u64,
    /// Bytes of the directory now.
    pub(super) directory_size: u64,
}

/// QEMU's checks, in its order, for a new bitmap `name` of
/// `granularity_bits`.
pub(super) fn check_new(room: Room, name: &str, granularity_bits: u32) -> Result<(), StoreRefusal> {
    let invalid = |why: String| Err(StoreRefusal::Invalid(why));
    if room.version < 3 {
        // Without autoclear bits, any older program that opened the image
        // would leave the bitmaps silently stale.
        return invalid("a qcow2 version 2 image cannot store dirty bitmaps".into());
    }
    let (min, max) = (*GRANULARITY_BITS.start(), *GRANULARITY_BITS.end());
    if granularity_bits > u32::from(max) {
        return invalid(format!(
            "granularity exceeds the maximum ({} bytes)",
            1u64 << max
        ));
    }
    if granularity_bits < u32::from(min) {
        return invalid(format!(
            "granularity is under the minimum ({} bytes)",
            1u64 << min
        ));
    }
    let bytes = bitmap_bits(room.disk, granularity_bits as u8).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes > u64::from(MAX_TABLE_ENTRIES) * room.cluster_size {
        return invalid(format!(
            "the bitmap would take {bytes} bytes in the image; use a larger granularity"
        ));
    }
    if name.len() > usize::from(MAX_NAME_SIZE) {
        return invalid(format!(
            "the name exceeds the maximum of {MAX_NAME_SIZE} bytes"
        ));
    }
    if room.bitmaps + 1 > u64::from(MAX_BITMAPS) {
        return Err(StoreRefusal::NoRoom(format!(
            "the image already stores the maximum of {MAX_BITMAPS} bitmaps"
        )));
    }
    let directory = room.directory_size + entry_size(name.len() as u64, 0);
    if directory > MAX_DIRECTORY_SIZE {
        return Err(StoreRefusal::NoRoom(format!(
            "not enough space in the bitmap directory ({MAX_DIRECTORY_SIZE} bytes at most)"
        )));
    }
    Ok(())
}

impl Bitmaps {
    /// The directory's count and size now.
    fn room(&self, version: u32) -> Room {
        let state = sync::lock(&self.state);
        Room {
            version,
            disk: self.disk,
            cluster_size: self.cluster_size,
            bitmaps: state.directory.len() as u64,
            directory_size: state
                .directory
                .iter()
                .map(|e| entry_size(e.name.len() as u64, e.extra_data.len() as u64))
                .sum(),
        }
    }
}

impl Qcow2 {
    /// Whether bitmap `name` of `granularity_bits` could be added as
    /// persistent (QEMU's checks; the name being free is the caller's).
    /// The bitmaps must have been taken.
    pub fn can_store_bitmap(&self, name: &str, granularity_bits: u32) -> Result<(), StoreRefusal> {
        let room = match sync::read(&self.bitmaps).as_ref() {
            Some(bitmaps) => bitmaps.room(self.version),
            None => Room {
                version: self.version,
                disk: self.size,
                cluster_size: self.geometry.cluster_size(),
                bitmaps: 0,
                directory_size: 0,
            },
        };
        check_new(room, name, granularity_bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> Room {
        Room {
            version: 3,
            disk: 1 << 30,
            cluster_size: 65536,
            bitmaps: 0,
            directory_size: 0,
        }
    }

    fn invalid(result: Result<(), StoreRefusal>) -> bool {
        matches!(result, Err(StoreRefusal::Invalid(_)))
    }

    #[test]
    fn what_qemu_stores_is_accepted() {
        assert_eq!(check_new(room(), &"n".repeat(1023), 9), Ok(()));
        assert_eq!(check_new(room(), "b", 31), Ok(()));
    }

    #[test]
    fn the_bitmap_itself_is_checked_as_qemu_checks_it() {
        let v2 = Room {
            version: 2,
            ..room()
        };
        assert!(invalid(check_new(v2, "b", 16)));
        assert!(invalid(check_new(room(), "b", 8)));
        assert!(invalid(check_new(room(), "b", 32)));
        assert!(invalid(check_new(room(), &"n".repeat(1024), 16)));
        // 512 MiB of bits at most: 2 TiB at 512 bytes a bit, not 4 TiB.
        let large = Room {
            disk: 4 << 40,
            ..room()
        };
        assert!(invalid(check_new(large, "b", 9)));
        assert_eq!(check_new(large, "b", 10), Ok(()));
    }

    #[test]
    fn a_full_directory_has_no_room() {
        let most = Room {
            bitmaps: u64::from(MAX_BITMAPS) - 1,
            ..room()
        };
        assert_eq!(check_new(most, "b", 16), Ok(()));
        let full = Room {
            bitmaps: u64::from(MAX_BITMAPS),
            ..room()
        };
        assert!(matches!(
            check_new(full, "b", 16),
            Err(StoreRefusal::NoRoom(_))
        ));
        // 65534 entries of 1000-byte names leave less room than a
        // 1023-byte name needs.
        let long = Room {
            bitmaps: u64::from(MAX_BITMAPS) - 1,
            directory_size: (u64::from(MAX_BITMAPS) - 1) * entry_size(1000, 0),
            ..room()
        };
        assert!(matches!(
            check_new(long, &"n".repeat(1023), 16),
            Err(StoreRefusal::NoRoom(_))
        ));
        assert_eq!(check_new(long, "b", 16), Ok(()));
    }
}
