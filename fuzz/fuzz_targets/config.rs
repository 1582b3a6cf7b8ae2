//! `Config::parse` on arbitrary UTF-8 text.
//!
//! Invariants:
//! - no panic;
//! - an error is one non-empty line (no CR or LF: it goes to one log line
//!   and to systemd's status);
//! - a config that parses passed validation (spot-checked on the limits the
//!   rest of the relay relies on).
#![no_main]

use domauth::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match Config::parse(text) {
        Ok(c) => {
            assert!(!c.server.submission.is_empty() || !c.server.submissions.is_empty());
            assert!(c.server.max_message_size >= 1024);
            assert!(c.server.max_recipients >= 1);
            assert!(c.limits.max_line_length >= 512);
            assert!(c.limits.max_errors >= 1);
            assert!(c.queue.retry_max.get() >= c.queue.retry_initial.get());
            assert!(!c.server.hostname.trim().is_empty());
        }
        Err(e) => {
            assert!(!e.trim().is_empty(), "empty error for {text:?}");
            assert!(
                !e.contains('\n') && !e.contains('\r'),
                "multi-line error {e:?} for {text:?}"
            );
        }
    }
});
