//! Every reply line the relay sends to a submission client, in one place
//! (SPEC §3–§4). The texts are part of the contract: clients, scripts and
//! support staff match on them.

use std::fmt::{self, Write as _};

/// One SMTP reply: a code and its lines (RFC 5321 §4.2: multi-line replies
/// repeat the code with `-` on every line but the last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form, CRLF-terminated.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        let mut s = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let _ = write!(s, "{}{}{}\r\n", self.code, sep, line);
        }
        if self.lines.is_empty() {
            let _ = write!(s, "{} \r\n", self.code);
        }
        out.extend_from_slice(s.as_bytes());
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

pub fn greeting(hostname: &str) -> Reply {
    Reply::new(220, format!("{hostname} ESMTP domauth"))
}

pub fn ehlo(hostname: &str, client: &str, extensions: Vec<String>) -> Reply {
    let mut lines = vec![format!("{hostname} greets {client}")];
    lines.extend(extensions);
    Reply { code: 250, lines }
}

pub fn helo(hostname: &str) -> Reply {
    Reply::new(250, hostname.to_string())
}

pub fn ok() -> Reply {
    Reply::new(250, "2.0.0 Ok")
}

pub fn sender_ok() -> Reply {
    Reply::new(250, "2.1.0 Ok")
}

pub fn recipient_ok() -> Reply {
    Reply::new(250, "2.1.5 Ok")
}

pub fn start_data() -> Reply {
    Reply::new(354, "End data with <CR><LF>.<CR><LF>")
}

pub fn queued(id: &str) -> Reply {
    Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
}

pub fn bye() -> Reply {
    Reply::new(221, "2.0.0 Bye")
}

pub fn ready_to_start_tls() -> Reply {
    Reply::new(220, "2.0.0 Ready to start TLS")
}

pub fn help() -> Reply {
    Reply::new(
        214,
        "2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
    )
}

pub fn vrfy() -> Reply {
    // RFC 5321 §3.5.3: 252 when the server will not verify but will accept.
    Reply::new(
        252,
        "2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
    )
}

pub fn auth_success() -> Reply {
    Reply::new(235, "2.7.0 Authentication successful")
}

/// A SASL challenge (base64 text, possibly empty).
pub fn auth_challenge(b64: &str) -> Reply {
    Reply::new(334, b64.to_string())
}

pub fn auth_failed() -> Reply {
    Reply::new(535, "5.7.8 Authentication credentials invalid")
}

pub fn auth_bad_base64() -> Reply {
    Reply::new(501, "5.5.2 Invalid base64 data")
}

pub fn auth_malformed() -> Reply {
    Reply::new(501, "5.5.2 Malformed authentication data")
}

pub fn auth_cancelled() -> Reply {
    Reply::new(501, "5.0.0 Authentication cancelled")
}

pub fn auth_mechanism_unsupported() -> Reply {
    Reply::new(504, "5.5.4 Unrecognized authentication mechanism")
}

pub fn auth_encryption_required() -> Reply {
    Reply::new(
        538,
        "5.7.11 Encryption required for requested authentication mechanism",
    )
}

pub fn auth_already() -> Reply {
    Reply::new(503, "5.5.1 Already authenticated")
}

pub fn auth_during_transaction() -> Reply {
    Reply::new(503, "5.5.1 AUTH not permitted during a mail transaction")
}

pub fn auth_rate_limited() -> Reply {
    Reply::new(
        454,
        "4.7.0 Too many authentication failures, try again later",
    )
}

pub fn auth_temporary_failure() -> Reply {
    Reply::new(454, "4.7.0 Temporary authentication failure")
}

/// `[auth] backend = "dovecot"` and Dovecot is down or did not answer.
pub fn auth_backend_unavailable() -> Reply {
    Reply::new(
        454,
        "4.7.0 Temporary authentication failure: password service unavailable, try again later",
    )
}

pub fn auth_required() -> Reply {
    Reply::new(530, "5.7.0 Authentication required")
}

pub fn starttls_unavailable() -> Reply {
    Reply::new(503, "5.5.1 TLS already active")
}

pub fn starttls_not_offered() -> Reply {
    Reply::new(502, "5.5.1 STARTTLS not available on this port")
}

pub fn send_hello_first() -> Reply {
    Reply::new(503, "5.5.1 Send EHLO first")
}

pub fn nested_mail() -> Reply {
    Reply::new(503, "5.5.1 Nested MAIL command")
}

pub fn need_mail() -> Reply {
    Reply::new(503, "5.5.1 Need MAIL command first")
}

pub fn need_rcpt() -> Reply {
    Reply::new(503, "5.5.1 Need RCPT command first")
}

pub fn sender_not_owned(address: &str, login: &str) -> Reply {
    Reply::new(
        553,
        format!("5.7.1 <{address}>: Sender address rejected: not owned by user {login}"),
    )
}

pub fn bad_sender_syntax(detail: &str) -> Reply {
    Reply::new(501, format!("5.1.7 Bad sender address syntax: {detail}"))
}

pub fn bad_recipient_syntax(detail: &str) -> Reply {
    Reply::new(501, format!("5.1.3 Bad recipient address syntax: {detail}"))
}

pub fn null_recipient() -> Reply {
    Reply::new(
        501,
        "5.1.3 Bad recipient address syntax: <> is not a mailbox",
    )
}

pub fn header_not_owned(header: &str, address: &str, login: &str) -> Reply {
    Reply::new(
        550,
        format!("5.7.1 <{address}>: {header} header address rejected: not owned by user {login}"),
    )
}

pub fn header_unparsable(header: &str) -> Reply {
    Reply::new(
        550,
        format!("5.7.1 {header} header address rejected: cannot be parsed"),
    )
}

pub fn no_from_header() -> Reply {
    Reply::new(550, "5.6.0 Message has no From header")
}

pub fn too_many_recipients() -> Reply {
    Reply::new(452, "4.5.3 Too many recipients")
}

pub fn message_too_big() -> Reply {
    Reply::new(552, "5.3.4 Message size exceeds fixed maximum message size")
}

pub fn bare_line_ending() -> Reply {
    // SMTP smuggling defence: RFC 5321 §2.3.8 allows CR and LF only as CRLF.
    Reply::new(
        550,
        "5.5.2 Message contains bare CR or LF characters, refused",
    )
}

pub fn nul_in_message() -> Reply {
    // RFC 6152 / RFC 5321 §4.5.2: no NUL in 7bit or 8BITMIME content; some
    // upstreams end DATA at `<CRLF>NUL.<CRLF>` (another smuggling vector).
    Reply::new(550, "5.6.0 Message contains NUL characters, refused")
}

pub fn header_too_large() -> Reply {
    Reply::new(552, "5.3.4 Message header exceeds fixed maximum size")
}

pub fn command_bare_line_ending() -> Reply {
    Reply::new(500, "5.5.2 Command line must end with CRLF")
}

pub fn line_too_long() -> Reply {
    Reply::new(500, "5.5.2 Line too long")
}

pub fn unknown_command() -> Reply {
    Reply::new(500, "5.5.1 Command unrecognized")
}

pub fn not_implemented(command: &str) -> Reply {
    Reply::new(502, format!("5.5.1 {command} not implemented"))
}

pub fn syntax_error(detail: &str) -> Reply {
    Reply::new(501, format!("5.5.4 Syntax error: {detail}"))
}

pub fn parameter_unsupported(param: &str) -> Reply {
    Reply::new(555, format!("5.5.4 Unsupported parameter {param}"))
}

/// A DSN parameter (RFC 3461) that is malformed once parsed.
pub fn dsn_parameter_invalid(param: &str, why: &str) -> Reply {
    Reply::new(501, format!("5.5.4 Invalid {param} parameter: {why}"))
}

pub fn smtputf8_unsupported() -> Reply {
    Reply::new(555, "5.6.7 SMTPUTF8 not supported by this relay's upstream")
}

pub fn too_many_errors() -> Reply {
    Reply::new(421, "4.7.0 Too many errors, closing connection")
}

pub fn idle_timeout(hostname: &str) -> Reply {
    Reply::new(
        421,
        format!("4.4.2 {hostname} Error: timeout exceeded, closing connection"),
    )
}

pub fn too_many_connections() -> Reply {
    Reply::new(421, "4.7.0 Too many connections, try again later")
}

pub fn shutting_down(hostname: &str) -> Reply {
    Reply::new(
        421,
        format!("4.3.2 {hostname} Service shutting down, closing connection"),
    )
}

pub fn local_error() -> Reply {
    Reply::new(451, "4.3.0 Local error in processing, try again later")
}

/// The disk is full: the client keeps the message and tries later.
pub fn storage_full() -> Reply {
    Reply::new(452, "4.3.1 Insufficient system storage, try again later")
}

/// The message could not be stored for another reason (an I/O error).
pub fn storage_error() -> Reply {
    Reply::new(451, "4.3.0 Cannot store the message, try again later")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_replies_use_dashes_but_the_last_line() {
        let mut out = Vec::new();
        ehlo("mx", "client", vec!["PIPELINING".into(), "8BITMIME".into()]).write_to(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "250-mx greets client\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
    }

    #[test]
    fn contract_texts() {
        let cases = [
            (
                sender_not_owned("other@acme.test", "info@acme.test"),
                "553 5.7.1 <other@acme.test>: Sender address rejected: not owned by user info@acme.test",
            ),
            (
                header_not_owned("From", "x@y.test", "info@acme.test"),
                "550 5.7.1 <x@y.test>: From header address rejected: not owned by user info@acme.test",
            ),
            (no_from_header(), "550 5.6.0 Message has no From header"),
            (auth_success(), "235 2.7.0 Authentication successful"),
            (
                auth_failed(),
                "535 5.7.8 Authentication credentials invalid",
            ),
            (
                auth_encryption_required(),
                "538 5.7.11 Encryption required for requested authentication mechanism",
            ),
            (auth_required(), "530 5.7.0 Authentication required"),
            (queued("ABC"), "250 2.0.0 Ok: queued as ABC"),
        ];
        for (reply, text) in cases {
            let mut out = Vec::new();
            reply.write_to(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{text}\r\n"));
        }
    }
}
