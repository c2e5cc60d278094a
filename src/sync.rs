//! The single source of the synchronisation primitives used by chainfs, so
//! that tests can swap them for instrumented ones.

pub use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, recovering the data if a panicking thread poisoned it.
///
/// A panic in one request must not take every later request down with it;
/// the metadata it protects is written through to disk in an order that is
/// consistent at every step, so the in-memory state is still usable.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes a shared lock on `rwlock`, ignoring poisoning (see [`lock`]).
pub fn read<T>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes an exclusive lock on `rwlock`, ignoring poisoning (see [`lock`]).
pub fn write<T>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
