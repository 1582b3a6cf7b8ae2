//! Delivery status notifications (RFC 3464, in an RFC 6522
//! multipart/report): what Postfix's `bounce` daemon writes.

use chrono::{DateTime, Utc};
use domauth_store::Envelope;

use crate::cleanup::header_block;

/// One recipient that could not be delivered, with the last reply.
pub struct FailedRecipient<'a> {
    pub address: &'a str,
    pub diagnostic: &'a str,
}

/// Builds the DSN sent to `original.from` for `failed`. The original's
/// headers are included (text/rfc822-headers), not its body: the caller may
/// pass just the beginning of the message.
pub fn build(
    hostname: &str,
    original: &Envelope,
    original_message: &[u8],
    failed: &[FailedRecipient<'_>],
    now: DateTime<Utc>,
) -> Vec<u8> {
    let boundary = format!("{}/{}", original.id, hostname);
    let date = now.to_rfc2822();
    let mut m = String::with_capacity(2048);
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", original.from));
    m.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    m.push_str(&format!("Date: {date}\r\n"));
    m.push_str(&format!(
        "Message-ID: <{}.bounce.{}@{hostname}>\r\n",
        original.id,
        now.timestamp()
    ));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    m.push_str("\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str("Content-Type: text/plain; charset=us-ascii\r\n\r\n");
    m.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\n\
         I'm sorry to have to inform you that your message could not\r\n\
         be delivered to one or more recipients.\r\n\r\n"
    ));
    for f in failed {
        m.push_str(&format!("<{}>: {}\r\n", f.address, one_line(f.diagnostic)));
    }
    m.push_str("\r\n");

    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str("Content-Type: message/delivery-status\r\n\r\n");
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    m.push_str(&format!("X-Queue-ID: {}\r\n", original.id));
    m.push_str(&format!(
        "Arrival-Date: {}\r\n",
        original.received_at.to_rfc2822()
    ));
    for f in failed {
        m.push_str("\r\n");
        m.push_str(&format!("Final-Recipient: rfc822; {}\r\n", f.address));
        m.push_str("Action: failed\r\n");
        m.push_str(&format!("Status: {}\r\n", status_code(f.diagnostic)));
        m.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\n",
            one_line(f.diagnostic)
        ));
    }
    m.push_str("\r\n");

    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str("Content-Type: text/rfc822-headers\r\n\r\n");
    let mut out = m.into_bytes();
    let headers = header_block(original_message);
    out.extend_from_slice(headers);
    if !headers.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// The enhanced status code (RFC 3463) in the diagnostic, if it has one
/// (`550 5.1.1 ...`), else the generic permanent failure.
fn status_code(diagnostic: &str) -> String {
    diagnostic
        .split_whitespace()
        .nth(1)
        .filter(|c| {
            let parts: Vec<&str> = c.split('.').collect();
            parts.len() == 3
                && matches!(parts[0], "4" | "5")
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|c| format!("5{}", &c[1..]))
        .unwrap_or_else(|| "5.0.0".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_shape() {
        let now = Utc::now();
        let original = Envelope {
            id: "Q1".into(),
            from: "info@acme.test".into(),
            recipients: vec!["bad@example.org".into()],
            received_at: now,
            login: None,
            is_bounce: false,
            body: Default::default(),
            smtputf8: false,
        };
        let failed = [FailedRecipient {
            address: "bad@example.org",
            diagnostic: "550 5.1.1 no such user",
        }];
        let dsn = build(
            "relay.test",
            &original,
            b"From: info@acme.test\r\nSubject: hi\r\n\r\nsecret body\r\n",
            &failed,
            now,
        );
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("report-type=delivery-status"));
        assert!(text.contains("Content-Type: message/delivery-status"));
        assert!(text.contains("Final-Recipient: rfc822; bad@example.org"));
        assert!(text.contains("Status: 5.1.1"));
        assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user"));
        assert!(text.contains("Subject: hi"));
        assert!(!text.contains("secret body"), "the body is not returned");
        let parsed = mail_parser::MessageParser::new()
            .parse(text.as_bytes())
            .unwrap();
        assert_eq!(parsed.parts.len(), 4, "root + 3 parts");
    }

    #[test]
    fn status_codes() {
        assert_eq!(status_code("550 5.1.1 no"), "5.1.1");
        assert_eq!(status_code("451 4.4.1 later"), "5.4.1");
        assert_eq!(status_code("554 rejected"), "5.0.0");
        assert_eq!(status_code("expired"), "5.0.0");
    }
}
