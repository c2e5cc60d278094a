//! Block jobs (placeholder until the fs branch's jobs facade merges).

pub mod command;
pub mod ratelimit;
pub mod state;
