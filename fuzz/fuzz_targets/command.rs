//! The `ctl/command` parser on arbitrary bytes: it must never panic, and
//! whatever it accepts must be a command of SPEC §4.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = chainfs::jobs::command::parse(text);
    }
});
