//! The bitmap directory as the image stores it, read without changing
//! anything: what a writable open starts from, and all that a read-only
//! node shows of its bitmaps (QEMU loads the bitmaps of a read-only image
//! too, read-only, and `query-block` lists them).

use super::{load_tracked, parse_directory, BitmapFlags, DirEntry, Extension, Sizes};
use crate::format::error::IoContext;
use crate::format::qcow2::features::Autoclear;
use crate::format::qcow2::meta::Meta;
use crate::format::qcow2::types::Geometry;
use crate::format::qcow2::Qcow2;
use crate::format::Result;
use crate::storage::Storage;
use crate::sync;

use super::runtime::handed_out;
use super::PersistentBitmap;

/// The bitmaps extension and the directory it points to.
pub(super) type Stored = (Extension, Vec<DirEntry>);

/// The sizes bitmaps are checked against, and what the image stores;
/// `None` when it has no bitmaps, or the autoclear bit says a writer
/// without bitmap support invalidated them (QEMU then ignores the
/// extension too).
pub(super) fn read_directory(
    storage: &dyn Storage,
    meta: &mut Meta,
    geometry: &Geometry,
) -> Result<(Sizes, Option<Stored>)> {
    let header = meta.header();
    let sizes = Sizes {
        cluster: geometry.cluster_size(),
        // QEMU sizes bitmaps by the disk in whole sectors.
        disk: header.size & !511,
        file: storage.len().io("measure the image file")?,
    };
    let Some(data) = header.bitmaps_extension.as_deref() else {
        return Ok((sizes, None));
    };
    if !header.autoclear.contains(Autoclear::BITMAPS) {
        return Ok((sizes, None));
    }
    let extension = Extension::parse(data, sizes.cluster, sizes.file)?;
    let mut bytes = vec![0u8; extension.directory_size as usize];
    storage
        .read_at(&mut bytes, extension.directory_offset)
        .io_at("read the bitmap directory", extension.directory_offset)?;
    let directory = parse_directory(&bytes, extension.nb_bitmaps)?;
    Ok((sizes, Some((extension, directory))))
}

impl Qcow2 {
    /// Every persistent bitmap as the image stores it now, read without a
    /// write (for a node that does not take writes): the consistent ones
    /// with their bits, those found `in_use` as inconsistent, without bits.
    pub fn peek_bitmaps(&self) -> Result<Vec<PersistentBitmap>> {
        let storage = self.storage.as_ref();
        let mut meta = sync::lock(&self.meta);
        let (sizes, stored) = read_directory(storage, &mut meta, &self.geometry)?;
        let Some((_, directory)) = stored else {
            return Ok(Vec::new());
        };
        let consistent = |entry: &DirEntry| !entry.flags.contains(BitmapFlags::IN_USE);
        let loaded = load_tracked(storage, &directory, sizes, consistent)?;
        Ok(handed_out(&directory, &loaded, sizes.cluster))
    }
}
