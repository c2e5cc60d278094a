//! The speed limit of a job: a budget of bytes per time slice, as QEMU's
//! `ratelimit.h` keeps it, so that a job copies at most `speed` bytes per
//! second on average and never sleeps longer than a slice at once.

use std::time::{Duration, Instant};

/// Length of one accounting slice (QEMU uses 100 ms for block jobs).
const SLICE: Duration = Duration::from_millis(100);

/// A token bucket over bytes copied.
#[derive(Debug)]
pub struct RateLimit {
    /// Bytes per second; 0 means unlimited.
    speed: u64,
    slice_start: Instant,
    dispatched: u64,
}

impl RateLimit {
    /// A limit of `speed` bytes per second (0: unlimited).
    pub fn new(speed: u64) -> RateLimit {
        RateLimit {
            speed,
            slice_start: Instant::now(),
            dispatched: 0,
        }
    }

    /// The limit in bytes per second (0: unlimited).
    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Changes the limit; takes effect from the next slice.
    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
        self.dispatched = 0;
        self.slice_start = Instant::now();
    }

    /// Accounts `bytes` just copied and says how long to wait before copying
    /// more, so that the average stays at the limit.
    pub fn account(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        let per_slice = (self.speed as u128 * SLICE.as_nanos() / 1_000_000_000).max(1) as u64;
        if now.duration_since(self.slice_start) >= SLICE {
            // Carry over what this slice overspent, so that big chunks
            // still average out to the limit.
            let elapsed_slices =
                (now.duration_since(self.slice_start).as_nanos() / SLICE.as_nanos()) as u64;
            self.dispatched = self.dispatched.saturating_sub(per_slice * elapsed_slices);
            self.slice_start = now;
        }
        self.dispatched += bytes;
        if self.dispatched <= per_slice {
            return Duration::ZERO;
        }
        let over_slices = self.dispatched / per_slice;
        (self.slice_start + SLICE * over_slices as u32).saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulated copy of `total` bytes in `chunk`s, returning the seconds it
    /// would take when every requested wait is honoured.
    fn simulate(speed: u64, chunk: u64, total: u64) -> f64 {
        let mut limit = RateLimit::new(speed);
        let start = limit.slice_start;
        let mut now = start;
        let mut copied = 0;
        while copied < total {
            copied += chunk;
            now += limit.account(chunk, now);
        }
        now.duration_since(start).as_secs_f64()
    }

    #[test]
    fn average_rate_matches_the_limit() {
        for (speed, chunk) in [
            (1 << 20, 64 << 10),
            (10 << 20, 1 << 20),
            (100 << 10, 512 << 10),
        ] {
            let total = 5 * speed;
            let secs = simulate(speed, chunk, total);
            assert!(
                (4.5..=5.5).contains(&secs),
                "{speed} B/s in {chunk} chunks: {secs} s"
            );
        }
    }

    #[test]
    fn unlimited_never_waits() {
        let mut limit = RateLimit::new(0);
        assert_eq!(limit.account(1 << 30, Instant::now()), Duration::ZERO);
    }
}
