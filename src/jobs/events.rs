//! The event log behind `ctl/events`: one JSON object a line, oldest first,
//! shaped like a QMP event (`timestamp` with `seconds` and `microseconds`,
//! `event`, `data`). Bounded: the oldest lines are dropped first.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::sync::{lock, Mutex};

/// How many events the log keeps by default.
pub const DEFAULT_CAPACITY: usize = 1024;

/// Names of the events chainfs itself adds to QMP's.
pub mod names {
    /// A write to `ctl/command` was refused.
    pub const COMMAND_REJECTED: &str = "COMMAND_REJECTED";
}

/// A QMP timestamp: wall-clock time split as QMP splits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    /// Whole seconds since the Unix epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Timestamp {
        // A clock before 1970 is a broken host; report the epoch then.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    timestamp: Timestamp,
    event: &'a str,
    data: &'a serde_json::Value,
}

/// A bounded, thread-safe log of rendered event lines.
#[derive(Debug)]
pub struct EventLog {
    /// Rendered lines, oldest first, each without its newline.
    lines: Mutex<VecDeque<String>>,
    capacity: usize,
}

impl EventLog {
    /// A log keeping the last `capacity` events (at least one).
    pub fn new(capacity: usize) -> EventLog {
        EventLog {
            lines: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    /// Appends `event` with `data`, stamped now, dropping the oldest line
    /// if the log is full.
    pub fn push(&self, event: &str, data: serde_json::Value) {
        let line = Line {
            timestamp: Timestamp::now(),
            event,
            data: &data,
        };
        // Serialising a struct of strings and JSON values cannot fail.
        let text = serde_json::to_string(&line).unwrap_or_default();
        let mut lines = lock(&self.lines);
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(text);
    }

    /// Every kept line, oldest first, each ending in a newline.
    pub fn render(&self) -> String {
        let lines = lock(&self.lines);
        let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for line in lines.iter() {
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_is_one_qmp_shaped_json_line() {
        let log = EventLog::default();
        log.push("COMMAND_REJECTED", serde_json::json!({"command": "x"}));
        let text = log.render();
        assert!(text.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(value["event"], "COMMAND_REJECTED");
        assert_eq!(value["data"]["command"], "x");
        assert!(value["timestamp"]["seconds"].as_u64().unwrap() > 0);
        assert!(value["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }

    #[test]
    fn the_oldest_events_are_dropped_when_full() {
        let log = EventLog::new(2);
        for i in 0..3 {
            log.push("E", serde_json::json!(i));
        }
        let text = log.render();
        let data: Vec<i64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["data"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert_eq!(data, [1, 2]);
    }
}
