//! What Postfix's `cleanup` does for us: the header checks of SPEC §3 and the
//! headers a submission server adds (RFC 6409 §8: Date and Message-ID when
//! missing; RFC 5321 §4.4: a Received trace line).

use std::net::IpAddr;

use domauth_store::normalize_address;
use mail_parser::{HeaderName, HeaderValue, MessageParser};

use crate::{
    policy::{Login, SenderPolicy},
    smtp::reply::{self, Reply},
};

#[derive(Debug)]
pub enum HeaderVerdict {
    Accept,
    Refuse { reply: Reply, reason: String },
}

/// The header block as a strict reader sees it: header fields and their
/// continuation lines, up to and including the empty line. A line that is
/// neither (no colon, a blank inside the field name) ends the block: that is
/// where Postfix's cleanup and mail clients start the body, while
/// mail-parser would skip the line and read on. Checking only this block
/// means we check exactly the headers the recipient will see.
pub fn header_block(message: &[u8]) -> &[u8] {
    let mut pos = 0;
    while pos < message.len() {
        let end = memchr::memchr(b'\n', &message[pos..]).map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        if line == b"\r\n" {
            return &message[..end];
        }
        let continuation = pos > 0 && matches!(line[0], b' ' | b'\t');
        if !continuation && !is_field_line(line) {
            return &message[..pos];
        }
        pos = end;
    }
    message
}

/// `name:` where the name is printable ASCII without blanks (RFC 5322
/// §3.6.8), optionally followed by blanks before the colon (§4.5 obsolete).
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = memchr::memchr(b':', line) else {
        return false;
    };
    let mut name = &line[..colon];
    while let [rest @ .., b' ' | b'\t'] = name {
        name = rest;
    }
    !name.is_empty() && name.iter().all(|b| (33..=126).contains(b))
}

/// Every address in every `From:` must be owned by the login, and so must
/// the `Sender:` when present. An unparsable or empty address list is
/// refused: an unreadable From could hide any sender (mail-parser is
/// lenient and would otherwise give us nothing to check).
pub fn check_headers(message: &[u8], login: &Login, policy: &dyn SenderPolicy) -> HeaderVerdict {
    let headers = header_block(message);
    let parsed = MessageParser::new().parse_headers(headers);
    let Some(parsed) = parsed else {
        return HeaderVerdict::Refuse {
            reply: reply::no_from_header(),
            reason: "message has no parsable header".into(),
        };
    };
    let mut saw_from = false;
    for (name, label) in [(HeaderName::From, "From"), (HeaderName::Sender, "Sender")] {
        for value in parsed.header_values(name) {
            if label == "From" {
                saw_from = true;
            }
            let addresses: Vec<Option<&str>> = match value {
                HeaderValue::Address(list) => list.iter().map(|a| a.address.as_deref()).collect(),
                _ => vec![None],
            };
            if addresses.is_empty() {
                return refuse_unparsable(label);
            }
            for address in addresses {
                let Some(address) = address.and_then(|a| normalize_address(a).ok()) else {
                    return refuse_unparsable(label);
                };
                let decision = policy.decide(login, &address);
                if !decision.allowed {
                    return HeaderVerdict::Refuse {
                        reply: reply::header_not_owned(label, &address, &login.address),
                        reason: format!("{label} header: {}", decision.reason),
                    };
                }
            }
        }
    }
    if !saw_from {
        return HeaderVerdict::Refuse {
            reply: reply::no_from_header(),
            reason: "message has no From header".into(),
        };
    }
    // mail-parser drops blanks inside field names ("Fro m:" reads as From):
    // the From headers it checked must be the message's real From lines.
    if parsed.header_values(HeaderName::From).count() != raw_from_lines(headers) {
        return refuse_unparsable("From");
    }
    HeaderVerdict::Accept
}

/// Header lines whose field name is exactly `From` (any case, blanks allowed
/// before the colon as RFC 5322 §4.5.3's obsolete syntax does).
fn raw_from_lines(headers: &[u8]) -> usize {
    headers
        .split(|&b| b == b'\n')
        .filter(|line| {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return false;
            };
            let mut name = &line[..colon];
            while let [rest @ .., b' ' | b'\t'] = name {
                name = rest;
            }
            name.eq_ignore_ascii_case(b"from")
        })
        .count()
}

fn refuse_unparsable(label: &str) -> HeaderVerdict {
    HeaderVerdict::Refuse {
        reply: reply::header_unparsable(label),
        reason: format!("{label} header has no parsable address"),
    }
}

/// What the Received line records about the session.
pub struct TraceInfo<'a> {
    pub hostname: &'a str,
    pub helo: &'a str,
    pub peer: IpAddr,
    pub queue_id: &'a str,
    pub recipients: &'a [String],
}

/// The header block is complete once a line that is not a header field (the empty line
/// that starts the body, or a non-field line a strict reader takes as body) follows it.
/// `None` while more input could still extend it. Only complete lines are judged: a
/// line cut by the network must not end the block early.
pub fn complete_header_block(received: &[u8]) -> Option<usize> {
    let complete_lines = memchr::memrchr(b'\n', received).map_or(0, |i| i + 1);
    let block = header_block(&received[..complete_lines]);
    let ended = block.len() < complete_lines || block.ends_with(b"\r\n\r\n") || block == b"\r\n";
    ended.then_some(block.len())
}

/// The headers the relay puts in front of the message: `Received:` (RFC 5321 §4.4;
/// "ESMTPSA" per RFC 3848: ESMTP with TLS and AUTH), and `Date:` / `Message-ID:` when
/// the client left them out (RFC 6409 §8.2, §8.3). They go before the client's header
/// block, so a message that starts with the empty line keeps them as headers.
pub fn trace_headers(headers: &[u8], trace: &TraceInfo<'_>) -> Vec<u8> {
    let now = chrono::Utc::now();
    let date = now.to_rfc2822();
    let (has_date, has_message_id) = present_headers(headers);
    let mut out = Vec::with_capacity(512);
    let for_clause = match trace.recipients {
        // Naming one recipient is the common trace; with several we name
        // none, so recipients do not learn of each other's addresses.
        [one] => format!("\r\n\tfor <{one}>"),
        _ => String::new(),
    };
    out.extend_from_slice(
        format!(
            "Received: from {} ([{}])\r\n\tby {} (domauth) with ESMTPSA id {}{};\r\n\t{}\r\n",
            trace.helo, trace.peer, trace.hostname, trace.queue_id, for_clause, date
        )
        .as_bytes(),
    );
    if !has_date {
        out.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
    }
    if !has_message_id {
        out.extend_from_slice(
            format!(
                "Message-ID: <{}.{}@{}>\r\n",
                trace.queue_id,
                now.timestamp(),
                trace.hostname
            )
            .as_bytes(),
        );
    }
    out
}

/// Which of Date and Message-ID the header block already has. A plain scan
/// of field names at line starts: cheaper than a parse and exact enough.
fn present_headers(headers: &[u8]) -> (bool, bool) {
    let mut date = false;
    let mut id = false;
    for line in headers.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        if name.eq_ignore_ascii_case(b"date") {
            date = true;
        } else if name.eq_ignore_ascii_case(b"message-id") {
            id = true;
        }
    }
    (date, id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Decision;

    struct Table;
    impl SenderPolicy for Table {
        fn decide(&self, login: &Login, address: &str) -> Decision {
            Decision {
                allowed: address == login.address || address == "alias@ext.test",
                reason: "table".into(),
            }
        }
    }

    fn login() -> Login {
        Login {
            address: "info@acme.test".into(),
            hosting: "acme".into(),
        }
    }

    fn verdict(msg: &str) -> Result<(), String> {
        match check_headers(msg.as_bytes(), &login(), &Table) {
            HeaderVerdict::Accept => Ok(()),
            HeaderVerdict::Refuse { reply, .. } => Err(reply.to_string()),
        }
    }

    #[test]
    fn header_check_table() {
        let ok = [
            "From: info@acme.test\r\n\r\nbody\r\n",
            "From: \"Info\" <INFO@ACME.TEST>\r\nTo: x@y.test\r\n\r\nbody\r\n",
            "From: info@acme.test, alias@ext.test\r\n\r\n",
            "From: info@acme.test\r\nSender: alias@ext.test\r\n\r\n",
            "Subject: x\r\nFrom: info@acme.test\r\n",
            "From: Info <info@acme.test>\r\nReply-To: anyone@else.test\r\n\r\n",
            // The second From is body text to a strict reader.
            "Subject: x\r\nFrom: info@acme.test\r\ngarbage\r\nFrom: bad@x.test\r\n",
            "From : info@acme.test\r\n\r\n",
            "Subject: folded\r\n  over two lines\r\nFrom: info@acme.test\r\n\r\n",
        ];
        for m in ok {
            assert_eq!(verdict(m), Ok(()), "{m:?}");
        }
        let refused = [
            ("Subject: x\r\n\r\nbody\r\n", "550 5.6.0"),
            ("\r\nFrom: info@acme.test\r\n", "550 5.6.0"),
            (
                "From: other@acme.test\r\n\r\n",
                "550 5.7.1 <other@acme.test>: From header",
            ),
            (
                "From: info@acme.test, bad@x.test\r\n\r\n",
                "<bad@x.test>: From header",
            ),
            (
                "From: info@acme.test\r\nFrom: bad@x.test\r\n\r\n",
                "<bad@x.test>: From header",
            ),
            (
                "From: info@acme.test\r\nSender: bad@x.test\r\n\r\n",
                "<bad@x.test>: Sender header",
            ),
            ("From: not an address\r\n\r\n", "550 5.7.1 From header"),
            ("From: \r\n\r\n", "550 5.7.1 From header"),
            ("From: Group:;\r\n\r\n", "550 5.7.1 From header"),
            (
                "From: Friends: info@acme.test, bad@x.test;\r\n\r\n",
                "<bad@x.test>: From header",
            ),
            // The body's lines are not headers.
            ("Subject: x\r\n\r\nFrom: info@acme.test\r\n", "550 5.6.0"),
            // Found by fuzz/headers: mail-parser reads "Fro m" as From, so
            // this message, which has no From line, was accepted.
            ("Fro m:info@acme.test\r\n\r\n", "550 5.6.0"),
            (" From: info@acme.test\r\n\r\n", "550 5.6.0"),
            // A strict reader starts the body at a line that is no header:
            // the From below it is body text, so the message has no From.
            (
                "Subject: x\r\ngarbage\r\nFrom: info@acme.test\r\n\r\n",
                "550 5.6.0",
            ),
        ];
        for (m, expect) in refused {
            let got = verdict(m).expect_err(m);
            assert!(got.contains(expect), "{m:?}: got {got:?}, want {expect:?}");
        }
    }

    #[test]
    fn header_block_ends_where_a_strict_reader_ends_it() {
        let cases: &[(&str, &str)] = &[
            ("A: 1\r\n\r\nbody\r\n", "A: 1\r\n\r\n"),
            ("A: 1\r\n b\r\nC: 2\r\n\r\n", "A: 1\r\n b\r\nC: 2\r\n\r\n"),
            ("A: 1\r\nno colon\r\nB: 2\r\n\r\n", "A: 1\r\n"),
            ("A b: 1\r\n\r\n", ""),
            (" A: 1\r\n\r\n", ""),
            ("\r\nA: 1\r\n", "\r\n"),
            ("A: 1\r\nB: 2\r\n", "A: 1\r\nB: 2\r\n"),
            ("A : 1\r\n\r\n", "A : 1\r\n\r\n"),
            ("", ""),
        ];
        for (message, block) in cases {
            assert_eq!(
                String::from_utf8_lossy(header_block(message.as_bytes())),
                *block,
                "{message:?}"
            );
        }
    }

    #[test]
    fn header_block_completion_waits_for_whole_lines() {
        let cases: &[(&str, Option<usize>)] = &[
            ("", None),
            ("From: a@b.test", None),
            ("From: a@b.test\r\n", None),
            ("From: a@b.test\r\nSubj", None),
            // "Fro" alone has no colon, but the line is not complete yet.
            ("Fro", None),
            ("From: a@b.test\r\n\r\n", Some(18)),
            ("From: a@b.test\r\n\r\nbody", Some(18)),
            ("\r\nbody", Some(2)),
            ("From: a@b.test\r\nnot a header\r\n", Some(16)),
            ("From: a\r\n folded\r\n", None),
        ];
        for (input, expect) in cases {
            assert_eq!(
                complete_header_block(input.as_bytes()),
                *expect,
                "{input:?}"
            );
        }
    }

    #[test]
    fn adds_trace_and_missing_headers() {
        let trace = TraceInfo {
            hostname: "relay.test",
            helo: "client",
            peer: "127.0.0.1".parse().unwrap(),
            queue_id: "Q1",
            recipients: &["a@b.test".to_string()],
        };
        let add = |m: &[u8]| {
            let mut out = trace_headers(header_block(m), &trace);
            out.extend_from_slice(m);
            String::from_utf8(out).unwrap()
        };
        let out = add(b"From: a@b.test\r\n\r\nhi\r\n");
        assert!(out.starts_with("Received: from client ([127.0.0.1])\r\n\tby relay.test (domauth) with ESMTPSA id Q1\r\n\tfor <a@b.test>;"), "{out}");
        assert!(out.contains("\r\nDate: "), "{out}");
        assert!(out.contains("\r\nMessage-ID: <Q1."), "{out}");
        assert!(out.ends_with("From: a@b.test\r\n\r\nhi\r\n"));

        let kept =
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-Id: <x@y>\r\nFrom: a@b.test\r\n\r\n";
        let out = add(kept.as_bytes());
        assert_eq!(out.matches("Date:").count(), 1, "{out}");
        assert_eq!(out.to_ascii_lowercase().matches("message-id:").count(), 1);
    }
}
