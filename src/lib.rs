//! chainfs: a FUSE filesystem that shows every node of a QEMU disk-image
//! snapshot chain as a flat raw file.
//!
//! The crate is layered; each layer imports only the one directly below it.
//! `tests/layering.rs` checks this and lists the exceptions with their
//! reasons (the chain opens and locks host files in `storage`; the command
//! line, where the process starts, puts the chain, the jobs and the mount
//! together):
//!
//! ```text
//! cli  →  fs  →  jobs  →  chain  →  format  →  storage
//! ```
//!
//! * [`storage`]: byte-addressed files (host files, QEMU-compatible locks,
//!   and an in-memory double that can drop unsynced writes).
//! * [`format`](mod@format): one image at a time (raw, qcow2), answering shallowly: what
//!   this image holds, and which ranges fall through to its backing file.
//! * [`chain`]: backing resolution and the one iterative walk down the chain
//!   that reads, writes with copy-on-write, and answers allocation queries.
//! * [`jobs`]: the owner of the mounted chain; commands written to
//!   `ctl/command`, the event log, status and chain reports. Re-exports
//!   what `fs` needs of the chain.
//! * [`fs`]: the FUSE mount (SPEC §3): node files, `active`, `ctl/`; a
//!   fuser-free model and a thin adapter; [`fs::Mount`] to serve it.
//! * [`cli`]: the `chainfs` command line.
//!
//! [`sync`] is a leaf that every layer may use.
#![warn(missing_docs)]

pub mod chain;
pub mod cli;
pub mod format;
pub mod fs;
pub mod jobs;
pub mod storage;
pub mod sync;
