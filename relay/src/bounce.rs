//! Delivery status notifications (RFC 3464, in an RFC 6522
//! multipart/report): what Postfix's `bounce` daemon writes.

use chrono::{DateTime, Utc};
use domauth_store::Envelope;

use crate::cleanup::header_block;

/// What happened to a recipient, as the DSN reports it (RFC 3464 §2.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnAction {
    /// Could not be delivered (a bounce).
    Failed,
    /// Accepted by a smarthost that does not offer DSN: no further notice will come
    /// (the sender asked for NOTIFY=SUCCESS; RFC 3461 §4.1).
    Relayed,
}

/// One recipient the DSN reports on, with upstream's last reply.
pub struct FailedRecipient<'a> {
    pub address: &'a str,
    pub diagnostic: &'a str,
    pub action: DsnAction,
    /// `ORCPT` as the client gave it (RFC 3461 §4.2), for `Original-Recipient`.
    pub orcpt: Option<&'a str>,
}

/// What the DSN carries of the original message (RFC 3461 §4.3, RET).
pub enum Returned<'a> {
    /// Its header block (text/rfc822-headers): `RET=HDRS`, the default, and every
    /// success notice.
    Headers(&'a [u8]),
    /// The whole message (message/rfc822): `RET=FULL`, when it is small enough.
    Full(&'a [u8]),
}

/// Builds the DSN sent to `original.from` for `recipients`. Every report carries the
/// original's `ENVID` (Original-Envelope-Id) and each recipient's `ORCPT`
/// (Original-Recipient).
pub fn build(
    hostname: &str,
    original: &Envelope,
    returned: Returned<'_>,
    recipients: &[FailedRecipient<'_>],
    now: DateTime<Utc>,
) -> Vec<u8> {
    let failed: Vec<&FailedRecipient<'_>> = recipients
        .iter()
        .filter(|r| r.action == DsnAction::Failed)
        .collect();
    let relayed: Vec<&FailedRecipient<'_>> = recipients
        .iter()
        .filter(|r| r.action == DsnAction::Relayed)
        .collect();
    let subject = if failed.is_empty() {
        "Successful Mail Delivery Report"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let boundary = format!("{}/{}", original.id, hostname);
    let date = now.to_rfc2822();
    let mut m = String::with_capacity(2048);
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", original.from));
    m.push_str(&format!("Subject: {subject}\r\n"));
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
        "This is the mail system at host {hostname}.\r\n\r\n"
    ));
    if !failed.is_empty() {
        m.push_str(
            "I'm sorry to have to inform you that your message could not\r\n\
             be delivered to one or more recipients.\r\n\r\n",
        );
        for f in &failed {
            m.push_str(&format!("<{}>: {}\r\n", f.address, one_line(f.diagnostic)));
        }
        m.push_str("\r\n");
    }
    if !relayed.is_empty() {
        m.push_str(
            "Your message was relayed for the recipients below to a mail\r\n\
             server that does not send delivery notifications: it left this\r\n\
             system, and no further notice will come for them.\r\n\r\n",
        );
        for r in &relayed {
            m.push_str(&format!("<{}>: {}\r\n", r.address, one_line(r.diagnostic)));
        }
        m.push_str("\r\n");
    }

    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str("Content-Type: message/delivery-status\r\n\r\n");
    // RFC 3464 §2.2: per-message fields, Original-Envelope-Id first.
    if let Some(envid) = &original.dsn.envid {
        m.push_str(&format!("Original-Envelope-Id: {}\r\n", one_line(envid)));
    }
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    m.push_str(&format!("X-Queue-ID: {}\r\n", original.id));
    m.push_str(&format!(
        "Arrival-Date: {}\r\n",
        original.received_at.to_rfc2822()
    ));
    for f in recipients {
        m.push_str("\r\n");
        if let Some(orcpt) = f.orcpt {
            m.push_str(&format!(
                "Original-Recipient: rfc822; {}\r\n",
                one_line(orcpt)
            ));
        }
        m.push_str(&format!("Final-Recipient: rfc822; {}\r\n", f.address));
        match f.action {
            DsnAction::Failed => {
                m.push_str("Action: failed\r\n");
                m.push_str(&format!("Status: {}\r\n", status_code(f.diagnostic)));
            }
            DsnAction::Relayed => {
                m.push_str("Action: relayed\r\n");
                m.push_str(&format!("Status: {}\r\n", success_code(f.diagnostic)));
            }
        }
        m.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\n",
            one_line(f.diagnostic)
        ));
    }
    m.push_str("\r\n");

    m.push_str(&format!("--{boundary}\r\n"));
    let mut out;
    match returned {
        Returned::Full(message) => {
            m.push_str("Content-Type: message/rfc822\r\n\r\n");
            out = m.into_bytes();
            out.extend_from_slice(message);
            if !message.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
        Returned::Headers(message) => {
            m.push_str("Content-Type: text/rfc822-headers\r\n\r\n");
            out = m.into_bytes();
            let headers = header_block(message);
            out.extend_from_slice(headers);
            if !headers.ends_with(b"\r\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The enhanced status code (RFC 3463) of a reply (`550 5.1.1 ...`) when its class is
/// one of `classes`.
fn enhanced_code<'a>(diagnostic: &'a str, classes: &[&str]) -> Option<&'a str> {
    diagnostic.split_whitespace().nth(1).filter(|c| {
        let parts: Vec<&str> = c.split('.').collect();
        parts.len() == 3
            && classes.contains(&parts[0])
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The enhanced status code of a success reply (`250 2.0.0 Ok`), else `2.0.0`.
fn success_code(diagnostic: &str) -> String {
    enhanced_code(diagnostic, &["2"])
        .unwrap_or("2.0.0")
        .to_string()
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// The status of a failed recipient: the reply's enhanced code made permanent
/// (a 4.x.x that expired is reported as 5.x.x), else the generic permanent failure.
fn status_code(diagnostic: &str) -> String {
    enhanced_code(diagnostic, &["4", "5"])
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
            dsn: Default::default(),
        };
        let failed = [FailedRecipient {
            address: "bad@example.org",
            diagnostic: "550 5.1.1 no such user",
            action: DsnAction::Failed,
            orcpt: None,
        }];
        let dsn = build(
            "relay.test",
            &original,
            Returned::Headers(b"From: info@acme.test\r\nSubject: hi\r\n\r\nsecret body\r\n"),
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
    fn relayed_notice_with_envid_orcpt_and_full_return() {
        let now = Utc::now();
        let mut original = Envelope {
            id: "Q2".into(),
            from: "info@acme.test".into(),
            recipients: vec!["a@example.org".into(), "b@example.org".into()],
            received_at: now,
            login: None,
            is_bounce: false,
            body: Default::default(),
            smtputf8: false,
            dsn: Default::default(),
        };
        original.dsn.envid = Some("env-42".into());
        let message = b"From: info@acme.test\r\nSubject: hi\r\n\r\nthe body\r\n";
        let relayed = [FailedRecipient {
            address: "a@example.org",
            diagnostic: "250 2.0.0 Ok: queued as X",
            action: DsnAction::Relayed,
            orcpt: Some("A@Example.org"),
        }];
        let text = String::from_utf8(build(
            "relay.test",
            &original,
            Returned::Headers(message),
            &relayed,
            now,
        ))
        .unwrap();
        for want in [
            "Subject: Successful Mail Delivery Report",
            "Original-Envelope-Id: env-42\r\nReporting-MTA: dns; relay.test",
            "Original-Recipient: rfc822; A@Example.org\r\nFinal-Recipient: rfc822; a@example.org",
            "Action: relayed\r\nStatus: 2.0.0\r\n",
            "Content-Type: text/rfc822-headers",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        assert!(!text.contains("the body") && !text.contains("could not"));

        let failed = [FailedRecipient {
            address: "b@example.org",
            diagnostic: "550 5.1.1 no",
            action: DsnAction::Failed,
            orcpt: None,
        }];
        let text = String::from_utf8(build(
            "relay.test",
            &original,
            Returned::Full(message),
            &failed,
            now,
        ))
        .unwrap();
        assert!(text.contains("Subject: Undelivered Mail Returned to Sender"));
        assert!(text.contains("Content-Type: message/rfc822\r\n\r\nFrom: info@acme.test"));
        assert!(text.contains("the body"), "RET=FULL returns the body");
        assert!(!text.contains("Original-Recipient"));
        let parsed = mail_parser::MessageParser::new()
            .parse(text.as_bytes())
            .unwrap();
        assert!(parsed.parts.len() >= 4);
        assert_eq!(success_code("250 ok"), "2.0.0");
        assert_eq!(success_code("250 2.1.5 ok"), "2.1.5");
    }

    #[test]
    fn status_codes() {
        assert_eq!(status_code("550 5.1.1 no"), "5.1.1");
        assert_eq!(status_code("451 4.4.1 later"), "5.4.1");
        assert_eq!(status_code("554 rejected"), "5.0.0");
        assert_eq!(status_code("expired"), "5.0.0");
    }
}
