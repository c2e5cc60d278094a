//! Byte-granular space for compressed clusters, as QEMU's
//! `qcow2_alloc_bytes`: compressed clusters are packed one after the other
//! into host clusters, and one may run from the end of a host cluster into
//! the next. The refcount of a host cluster counts the compressed clusters
//! that touch it (qcow2.txt, "Compressed Clusters Descriptor";
//! `qcow2_free_any_cluster` drops one reference per host cluster touched),
//! so `qemu-img check` agrees with what is written here.
//!
//! Refcounts are written before the caller writes the data and the L2
//! entries; the caller syncs before it publishes the entries, so a crash
//! leaves at worst a leak.

use super::super::types::HostOffset;
use super::super::{Meta, Qcow2};
use crate::format::Result;

/// Where the next compressed cluster may start: QEMU's `free_byte_offset`.
/// Lives in [`Meta`], under the metadata lock.
#[derive(Debug, Default)]
pub(in crate::format::qcow2) struct Packing {
    /// A host offset inside a host cluster that compressed data already
    /// uses in part (its refcount counts that data); 0 when there is none.
    next: u64,
}

impl Packing {
    /// Forgets the partly used host cluster if it is among the clusters
    /// just `freed` (every compressed cluster in it was replaced), or if
    /// what was freed is unknown (`None`: applying the frees failed half
    /// way): the allocator may now hand it out whole, to anything.
    pub(in crate::format::qcow2) fn forget_freed(
        &mut self,
        freed: Option<&[u64]>,
        cluster_size: u64,
    ) {
        let cluster = self.next & !(cluster_size - 1);
        if freed.is_none_or(|freed| freed.contains(&cluster)) {
            self.next = 0;
        }
    }
}

/// Host bytes claimed for one compressed cluster, with what to undo if the
/// write that wanted them fails before an L2 entry points to them.
#[derive(Debug)]
pub(super) struct Claim {
    /// Host offset of the first byte.
    pub(super) offset: u64,
    /// A partly used host cluster whose refcount was raised, and its count
    /// before.
    raised: Option<(u64, u64)>,
    /// A cluster taken from the allocator (its refcount 1 is on disk).
    fresh: Option<HostOffset>,
    /// [`Packing::next`] before the claim.
    previous: u64,
}

impl Qcow2 {
    /// Claims `len` bytes (at most a cluster) for compressed data, and
    /// counts them in the refcounts of the host clusters they touch.
    pub(super) fn claim_bytes(&self, meta: &mut Meta, len: u64) -> Result<Claim> {
        let cluster_size = self.geometry.cluster_size();
        let storage = self.storage.as_ref();
        let previous = meta.packing.next;
        let mut partial = None;
        if previous != 0 {
            let cluster = self.geometry.cluster_start(previous);
            let count = meta.allocator.refcount(storage, cluster)?;
            // As QEMU: a cluster whose refcount is at the width's maximum
            // takes no more; the next compressed cluster starts a new one.
            if count > 0 && count < self.geometry.max_refcount() {
                partial = Some((cluster, count));
            }
        }
        let room = partial.map_or(0, |(cluster, _)| cluster + cluster_size - previous);
        let mut claim = Claim {
            offset: previous,
            raised: None,
            fresh: None,
            previous,
        };
        if room < len {
            let fresh = self.allocate_cluster(meta)?;
            claim.fresh = Some(fresh);
            match partial {
                // The new cluster follows the partly used one: the data
                // runs on from one into the other, as QEMU packs it.
                Some((cluster, _)) if cluster + cluster_size == fresh.0 => {}
                _ => {
                    claim.offset = fresh.0;
                    partial = None;
                }
            }
        }
        if let Some((cluster, count)) = partial {
            // Raised even if the write fails: the allocator changes its
            // cached refcount before it writes, and the undo puts it back.
            claim.raised = Some((cluster, count));
            if let Err(err) = meta.allocator.set_refcount(storage, cluster, count + 1) {
                self.undo_claim(meta, claim);
                return Err(err);
            }
        }
        let end = claim.offset + len;
        meta.packing.next = if self.geometry.offset_in_cluster(end) == 0 {
            0
        } else {
            end
        };
        Ok(claim)
    }

    /// Takes back a claim that no L2 entry came to point to.
    pub(super) fn undo_claim(&self, meta: &mut Meta, claim: Claim) {
        meta.packing.next = claim.previous;
        if let Some((cluster, count)) = claim.raised {
            let restored = meta
                .allocator
                .set_refcount(self.storage.as_ref(), cluster, count);
            if let Err(err) = restored {
                // A refcount one too high is a leak, which `qemu-img check`
                // repairs; nothing points wrongly.
                log::warn!("a compressed write failed and its space leaks: {err}");
            }
        }
        if let Some(fresh) = claim.fresh {
            meta.allocator.give_back(fresh);
        }
    }

    /// Takes back claims made one after the other in one write, none of
    /// which an L2 entry came to point to: the latest first, so each puts
    /// back what the one before it left (a claim may have raised the
    /// refcount of the cluster the one before took fresh).
    pub(super) fn undo_claims(&self, meta: &mut Meta, claims: Vec<Claim>) {
        for claim in claims.into_iter().rev() {
            self.undo_claim(meta, claim);
        }
    }
}
