//! The qcow2 engine opened directly on a storage, for the tests that drive
//! it without a chain: images with no external data file.

use std::sync::Arc;

use chainfs::format::Qcow2;
use chainfs::format::{MetadataCache, OpenOptions};
use chainfs::storage::Storage;

/// Opens `storage` as qcow2 with a metadata cache of `cache_bytes`; an
/// image that asks for an external data file fails the test.
pub fn open_qcow2(storage: Arc<dyn Storage>, writable: bool, cache_bytes: u64) -> Qcow2 {
    let no_files = |name: &str, _: bool| -> std::io::Result<Arc<dyn Storage>> {
        panic!("unexpected data file {name}")
    };
    let options = OpenOptions {
        writable,
        cache: MetadataCache::new(cache_bytes),
    };
    Qcow2::open(storage, &options, &no_files).unwrap()
}

/// A storage that holds back one write, chosen by its length, until the
/// test lets it go: to show what else an image does while a request sits
/// in its data I/O.
#[derive(Debug)]
pub struct HeldWrites {
    inner: Arc<dyn Storage>,
    state: std::sync::Mutex<Hold>,
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Hold {
    /// The least length of the next write to hold.
    armed: Option<usize>,
    held: bool,
    released: bool,
}

impl HeldWrites {
    /// Wraps `inner`, holding nothing yet.
    pub fn new(inner: Arc<dyn Storage>) -> HeldWrites {
        HeldWrites {
            inner,
            state: std::sync::Mutex::new(Hold::default()),
            changed: std::sync::Condvar::new(),
        }
    }

    /// Holds the next write of `len` bytes or more.
    pub fn hold_next_write_of(&self, len: usize) {
        *self.state.lock().unwrap() = Hold {
            armed: Some(len),
            ..Hold::default()
        };
    }

    /// Waits until the armed write has arrived and is being held.
    pub fn wait_until_held(&self) {
        let mut state = self.state.lock().unwrap();
        while !state.held {
            state = self.changed.wait(state).unwrap();
        }
    }

    /// Lets the held write (or the next one armed) go through.
    pub fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.changed.notify_all();
    }
}

impl Storage for HeldWrites {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if state.armed.is_some_and(|len| buf.len() >= len) {
            state.armed = None;
            state.held = true;
            self.changed.notify_all();
            while !state.released {
                state = self.changed.wait(state).unwrap();
            }
        }
        drop(state);
        self.inner.write_at(buf, offset)
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }

    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }

    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.inner.allocated_bytes()
    }

    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.inner.seek_data(offset)
    }

    fn seek_hole(&self, offset: u64) -> std::io::Result<u64> {
        self.inner.seek_hole(offset)
    }
}
