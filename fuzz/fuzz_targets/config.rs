//! `Config::parse` on arbitrary UTF-8 text.
//!
//! Invariants:
//! - no panic;
//! - an error is one non-empty line (no CR or LF: it goes to one log line
//!   and to systemd's status);
//! - a config that parses passed validation (spot-checked on the limits the
//!   rest of the relay relies on), including the upper bounds: every
//!   duration can be added to an `Instant` and to a date, every count fits
//!   a tokio `Semaphore` (at most `usize::MAX >> 3` permits).
#![no_main]

use std::time::{Instant, SystemTime};

use domauth::config::{Config, max};
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
            let durations = [
                c.server.shutdown_timeout,
                c.upstream.connect_timeout,
                c.upstream.greeting_timeout,
                c.upstream.command_timeout,
                c.upstream.data_timeout,
                c.upstream.data_block_timeout,
                c.upstream.final_timeout,
                c.queue.probe_interval,
                c.dns.timeout,
                c.verification.check_interval,
                c.verification.pending_expiry,
                c.verification.recheck_interval,
                c.verification.grace,
                c.queue.retry_initial,
                c.queue.retry_max,
                c.queue.max_lifetime,
                c.limits.idle_timeout,
                c.limits.data_timeout,
                c.limits.auth_window,
                c.limits.auth_failure_delay,
            ];
            for d in durations {
                assert!(d.get() <= max::SCHEDULE, "{d:?} accepted");
                assert!(Instant::now().checked_add(d.get()).is_some());
                assert!(SystemTime::now().checked_add(d.get()).is_some());
            }
            let permits = [
                c.limits.max_connections,
                c.limits.max_connections_per_ip,
                c.queue.concurrency,
                c.verification.concurrency,
            ];
            for n in permits {
                assert!(n <= usize::MAX >> 3, "{n} permits accepted");
            }
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
