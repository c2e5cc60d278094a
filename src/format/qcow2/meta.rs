//! The metadata that writers change under the image's `meta` lock: the
//! refcount allocator and the header as chainfs last wrote it.
//!
//! The header on disk is rewritten whole by several paths (rebacking,
//! bitmaps stored at close or marked in use, autoclear bits cleared), and in
//! part by the allocator when the refcount table grows and moves. If the
//! cached header kept its own copy of the refcount table's location, a whole
//! rewrite after a move would name the old table again, whose clusters have
//! meanwhile been freed and reused: corruption. So the location lives in one
//! place, the allocator, and the cached header is only reachable through
//! [`Meta::header`] and [`Meta::write_header`], which both take the
//! allocator's current values first. Every whole-header write of an open
//! image goes through [`Meta::write_header`].

use super::alloc::Allocator;
use super::compress::Packing;
use super::header::Header;
use crate::format::error::IoContext;
use crate::format::Result;
use crate::storage::Storage;

/// Metadata that only writers change, under [`super::Qcow2`]'s `meta` lock.
#[derive(Debug)]
pub(super) struct Meta {
    /// Private: read it through [`Meta::header`], so that the refcount
    /// table's location is never taken from a stale copy.
    header: Header,
    /// The refcount state, and the one source of the refcount table's
    /// location.
    pub(super) allocator: Allocator,
    /// Where compressed writes pack their next bytes.
    pub(super) packing: Packing,
}

impl Meta {
    /// Wraps the header found on disk and the allocator loaded from it.
    pub(super) fn new(header: Header, allocator: Allocator) -> Meta {
        Meta {
            header,
            allocator,
            packing: Packing::default(),
        }
    }

    /// The header as it is on disk now, refcount table location included.
    pub(super) fn header(&mut self) -> &Header {
        self.refresh();
        &self.header
    }

    /// Applies `change` to the current header and writes the whole header,
    /// synced. The cached header changes only once the write is durable, so
    /// it never shows what the disk may not have.
    ///
    /// The structures the new header names must already be durable; the
    /// refcount table's location is the allocator's, whose table is synced
    /// before it reports it.
    pub(super) fn write_header(
        &mut self,
        storage: &dyn Storage,
        change: impl FnOnce(&mut Header),
    ) -> Result<()> {
        self.refresh();
        let mut next = self.header.clone();
        change(&mut next);
        // The change may not move the refcount table: only the allocator does.
        let (offset, clusters) = self.allocator.reftable_location();
        next.refcount_table_offset = offset;
        next.refcount_table_clusters = clusters;
        let bytes = next.serialize()?;
        storage.write_at(&bytes, 0).io_at("write the header", 0)?;
        storage.sync().io("sync the image")?;
        self.header = next;
        Ok(())
    }

    /// Takes the refcount table's location from the allocator.
    fn refresh(&mut self) {
        let (offset, clusters) = self.allocator.reftable_location();
        self.header.refcount_table_offset = offset;
        self.header.refcount_table_clusters = clusters;
    }
}
