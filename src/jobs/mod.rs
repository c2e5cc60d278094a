//! Block jobs (placeholder until the fs branch's jobs facade merges).

pub mod command;
pub mod job;
pub mod ratelimit;
pub mod registry;
pub mod state;
pub mod status;
pub mod stream;
