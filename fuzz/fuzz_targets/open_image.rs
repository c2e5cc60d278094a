//! Fuzzes opening and reading a qcow2 image: arbitrary bytes as the image
//! file, opened read-only through `Image::open`, then the whole virtual size
//! read in 64 KiB chunks (at most 64 MiB). Errors are fine; panics, hangs
//! and unbounded allocation are not.

#![no_main]

use std::io;
use std::sync::Arc;

use chainfs::format::{Format, Image, OpenOptions};
use chainfs::storage::Storage;
use chainfs_fuzz::BytesStorage;
use libfuzzer_sys::fuzz_target;

const CHUNK: u64 = 64 << 10;
const READ_CAP: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let storage: Arc<dyn Storage> = Arc::new(BytesStorage::new(data));
    // The engine may want an external data file; there is none here.
    let opener = |_: &str, _: bool| -> io::Result<Arc<dyn Storage>> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    };
    let Ok(image) = Image::open(storage, Format::Qcow2, &OpenOptions::default(), &opener) else {
        return;
    };
    read_everything(&image);
});

fn read_everything(image: &Image) {
    let end = image.virtual_size().min(READ_CAP);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < end {
        let len = CHUNK.min(end - offset) as usize;
        let _ = image.block_status(offset, len as u64);
        let _ = image.read(offset, &mut buf[..len]);
        offset += len as u64;
    }
}
