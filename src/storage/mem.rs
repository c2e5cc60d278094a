//! In-memory storage for tests (placeholder; see the crash helper).

/// In-memory storage.
#[derive(Debug)]
pub struct MemStorage;
