//! The end-of-DATA header checks and header additions on arbitrary message
//! bytes (mail-parser input).
//!
//! Invariants:
//! - no panic in `header_block`, `complete_header_block`, `check_headers` or
//!   `trace_headers`;
//! - if the message is accepted, its header block has a `From:` header line
//!   (checked for CRLF-only input, the only kind the session passes on: the
//!   DATA decoder refuses bare CR/LF first), and every From/Sender address mail-parser reported was shown to the
//!   policy and allowed (the policy records what it was asked);
//! - `trace_headers` starts with `Received: ` and adds no bare CR/LF;
//! - `complete_header_block`, fed the message in two pieces, never ends the
//!   block past what `header_block` of the whole message says, and says the
//!   same as `header_block` once the message is complete and ends the block.
#![no_main]

use std::sync::Mutex;

use domauth::{
    cleanup::{self, HeaderVerdict, TraceInfo},
    policy::{Decision, Login, SenderPolicy},
};
use libfuzzer_sys::fuzz_target;

/// The login owns its own address and anything at `ext.test`; remembers
/// every address it was asked about.
struct Policy {
    asked: Mutex<Vec<String>>,
}

impl SenderPolicy for Policy {
    fn decide(&self, login: &Login, address: &str) -> Decision {
        self.asked.lock().unwrap().push(address.to_string());
        let allowed = address == login.address || address.ends_with("@ext.test");
        Decision {
            allowed,
            reason: "fuzz".into(),
        }
    }
}

fn canonical(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

/// A header line named From (any case, optional blanks before the colon)
/// at a line start of the header block.
fn has_from_line(headers: &[u8]) -> bool {
    headers.split(|&b| b == b'\n').any(|line| {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return false;
        };
        let mut name = &line[..colon];
        while let [rest @ .., b' ' | b'\t'] = name {
            name = rest;
        }
        name.eq_ignore_ascii_case(b"from")
    })
}

fuzz_target!(|message: &[u8]| {
    let login = Login {
        address: "info@acme.test".into(),
        hosting: "acme".into(),
    };
    let policy = Policy {
        asked: Mutex::new(Vec::new()),
    };
    let headers = cleanup::header_block(message);
    assert!(message.starts_with(headers));

    match cleanup::check_headers(message, &login, &policy) {
        HeaderVerdict::Accept => {
            // conn.rs refuses a message with a bare CR or LF before the
            // header check, and mail-parser takes a lone CR as a line end,
            // so the line-based check only holds for canonical input.
            assert!(
                !canonical(message) || has_from_line(headers),
                "accepted without a From header line: {:?}",
                String::from_utf8_lossy(headers)
            );
            let asked = policy.asked.lock().unwrap();
            assert!(!asked.is_empty(), "accepted without asking the policy");
            for a in asked.iter() {
                assert!(
                    a == &login.address || a.ends_with("@ext.test"),
                    "accepted although {a} was refused"
                );
            }
        }
        HeaderVerdict::Refuse { reply, .. } => {
            assert!(reply.code >= 500, "refusal code {reply:?}");
            for line in &reply.lines {
                assert!(!line.contains('\r') && !line.contains('\n'), "{reply:?}");
            }
        }
    }

    let recipients = ["to@example.test".to_string()];
    let trace = TraceInfo {
        hostname: "relay.test",
        helo: "client.test",
        peer: "192.0.2.1".parse().unwrap(),
        queue_id: "Q1",
        recipients: &recipients,
    };
    let out = cleanup::trace_headers(cleanup::header_block(message), &trace);
    assert!(out.starts_with(b"Received: "));
    assert!(canonical(&out), "trace_headers made a bare CR/LF");
    let whole = cleanup::header_block(message).len();
    for cut in [message.len() / 3, message.len() / 2, message.len()] {
        if let Some(n) = cleanup::complete_header_block(&message[..cut]) {
            assert_eq!(n, whole, "the block ended early at a cut of {cut}");
        }
    }
});
