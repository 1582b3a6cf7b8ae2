//! The SMTP submission state machine, sans-IO (RFC 5321, RFC 6409, RFC 4954,
//! RFC 3207). It is fed one command line at a time and answers with an
//! [`Action`]; sockets, TLS, password hashing and the queue live elsewhere
//! (`conn.rs`, `auth.rs`, `queue.rs`), so every rule here is a unit test.

use std::{net::IpAddr, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use domauth_store::{DsnParams, RecipientDsn, normalize_address};
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, Error as ParseError, MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME,
    MAIL_SMTPUTF8, Request,
};

use super::{auth::SaslCredentials, data::DataOutcome, reply, reply::Reply};
use crate::{
    cleanup::{self, HeaderVerdict},
    logsafe::Escaped,
    policy::{Login, SenderPolicy},
};

/// Settings a session needs; copied from the config once per listener.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_errors: usize,
    pub smtputf8: bool,
}

/// The envelope of the transaction in progress (RFC 5321 §2.3.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// Normalised reverse-path; empty for the null sender `<>`.
    pub from: String,
    /// When MAIL FROM was accepted (the MAIL-to-250 latency metric).
    pub mail_at: Option<std::time::Instant>,
    pub recipients: Vec<String>,
    pub smtputf8: bool,
    /// `BODY=8BITMIME` (RFC 6152): declared again when the message goes upstream.
    pub eight_bit: bool,
    /// RET, ENVID and each recipient's NOTIFY / ORCPT (RFC 3461).
    pub dsn: DsnParams,
}

/// What the socket side needs to receive a message, taken at the 354.
#[derive(Debug, Clone)]
pub struct MessageStart {
    pub envelope: Envelope,
    pub login: String,
    /// The client's EHLO name, printable (for the Received line).
    pub helo: String,
}

/// What the socket side must do next.
#[derive(Debug)]
pub enum Action {
    /// Send the reply and read the next command.
    Reply(Reply),
    /// Send the reply, then start TLS. Bytes already read are discarded
    /// (CVE-2011-0411: never execute plaintext pipelined behind STARTTLS).
    StartTls(Reply),
    /// Verify these credentials (off the async runtime) and report with
    /// [`Session::auth_result`].
    Authenticate(SaslCredentials),
    /// Send 354, read the message with a DATA decoder, report with
    /// [`Session::data_received`].
    ReceiveData(Reply),
    /// Send the reply and close the connection.
    Close(Reply),
}

/// Result of a credentials check, from `auth.rs`.
#[derive(Debug, Clone)]
pub enum AuthResult {
    Success(Login),
    Failed,
    RateLimited,
    TemporaryFailure,
    /// The password backend (Dovecot) is down or did not answer in time.
    BackendUnavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Sasl {
    None,
    /// `AUTH PLAIN` without initial response: the next line is the response.
    PlainResponse,
    /// `AUTH LOGIN`: the next line is the user name.
    LoginUser,
    /// `AUTH LOGIN`: the next line is the password.
    LoginPassword(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Port 587 style: plaintext until STARTTLS.
    Submission,
    /// Port 465 style: TLS from the first byte.
    Submissions,
}

pub struct Session {
    config: Arc<SessionConfig>,
    policy: Arc<dyn SenderPolicy>,
    listener: Listener,
    pub peer: IpAddr,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    login: Option<Login>,
    envelope: Option<Envelope>,
    sasl: Sasl,
    errors: usize,
}

impl Session {
    pub fn new(
        config: Arc<SessionConfig>,
        policy: Arc<dyn SenderPolicy>,
        listener: Listener,
        peer: IpAddr,
    ) -> Session {
        Session {
            config,
            policy,
            listener,
            peer,
            tls: listener == Listener::Submissions,
            helo: None,
            esmtp: false,
            login: None,
            envelope: None,
            sasl: Sasl::None,
            errors: 0,
        }
    }

    pub fn greeting(&self) -> Reply {
        reply::greeting(&self.config.hostname)
    }

    pub fn login(&self) -> Option<&Login> {
        self.login.as_ref()
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// RFC 3207 §4.2: after the handshake the client knows nothing of the
    /// earlier session; it must EHLO again, and we forget everything.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.login = None;
        self.envelope = None;
        self.sasl = Sasl::None;
    }

    /// One complete command line, CRLF included.
    pub fn command(&mut self, line: &[u8]) -> Action {
        if self.sasl != Sasl::None {
            return self.sasl_line(line);
        }
        let action = match Request::parse(&mut line.iter()) {
            Ok(request) => self.request(request),
            Err(e) => Action::Reply(parse_error_reply(e)),
        };
        self.count_errors(action)
    }

    /// A line that could not be taken as a command (too long, bare LF).
    /// Inside an AUTH exchange it ends the exchange (see `count_errors`).
    pub fn protocol_error(&mut self, reply: Reply) -> Action {
        self.count_errors(Action::Reply(reply))
    }

    /// Every reply to a client line goes through here, so the two rules
    /// about error replies live in one place:
    /// - SPEC §4: any error reply ends an AUTH exchange in progress and the
    ///   next line is a command again. Otherwise a line refused by the
    ///   framing (too long, bare LF) would leave the exchange open, and the
    ///   client's next command would be taken as its password.
    /// - RFC 5321 §4.5.3.2: the relay may drop a client that keeps erring.
    fn count_errors(&mut self, action: Action) -> Action {
        if let Action::Reply(r) | Action::Close(r) = &action
            && !r.is_positive()
        {
            self.sasl = Sasl::None;
        }
        if let Action::Reply(r) = &action
            && !r.is_positive()
            && r.code != 454
        {
            self.errors += 1;
            if self.errors >= self.config.max_errors {
                return Action::Close(reply::too_many_errors());
            }
        }
        action
    }

    fn request(&mut self, request: Request<std::borrow::Cow<'_, str>>) -> Action {
        match request {
            Request::Ehlo { host } => self.hello(host.as_ref(), true),
            Request::Helo { host } => self.hello(host.as_ref(), false),
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response.as_ref()),
            Request::Mail { from } => {
                match crate::dsn::mail_params(from.flags, from.env_id.as_deref()) {
                    Ok(dsn) => self.mail(from.address.as_ref(), from.flags, from.size, dsn),
                    Err(e) => Action::Reply(reply::dsn_parameter_invalid(e.param, e.why)),
                }
            }
            Request::Rcpt { to } => match crate::dsn::rcpt_params(to.flags, to.orcpt.as_deref()) {
                Ok((notify, orcpt)) => self.rcpt(to.address.as_ref(), notify, orcpt),
                Err(e) => Action::Reply(reply::dsn_parameter_invalid(e.param, e.why)),
            },
            Request::Data => self.data(),
            Request::Rset => {
                self.envelope = None;
                Action::Reply(reply::ok())
            }
            Request::Noop { .. } => Action::Reply(reply::ok()),
            Request::Quit => Action::Close(reply::bye()),
            Request::Help { .. } => Action::Reply(reply::help()),
            Request::Vrfy { .. } => Action::Reply(reply::vrfy()),
            other => Action::Reply(reply::not_implemented(other.name())),
        }
    }

    fn hello(&mut self, host: &str, esmtp: bool) -> Action {
        // RFC 5321 §4.1.4: EHLO in a transaction resets it.
        self.envelope = None;
        self.helo = Some(sanitize(host));
        self.esmtp = esmtp;
        if !esmtp {
            return Action::Reply(reply::helo(&self.config.hostname));
        }
        let mut ext = vec![
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.tls {
            if self.login.is_none() {
                ext.push("AUTH PLAIN LOGIN".to_string());
            }
        } else {
            ext.push("STARTTLS".to_string());
        }
        if self.config.smtputf8 {
            ext.push("SMTPUTF8".to_string());
        }
        // RFC 3461: RET/ENVID/NOTIFY/ORCPT are always accepted; they go to a smarthost
        // that offers DSN, and the relay honours them itself otherwise.
        ext.push("DSN".to_string());
        Action::Reply(reply::ehlo(
            &self.config.hostname,
            self.helo.as_deref().unwrap_or(""),
            ext,
        ))
    }

    fn starttls(&mut self) -> Action {
        if self.tls {
            return Action::Reply(reply::starttls_unavailable());
        }
        if self.listener == Listener::Submissions {
            return Action::Reply(reply::starttls_not_offered());
        }
        if self.helo.is_none() {
            return Action::Reply(reply::send_hello_first());
        }
        Action::StartTls(reply::ready_to_start_tls())
    }

    fn auth(&mut self, mechanism: u64, initial: &str) -> Action {
        // RFC 4954 §4 with RFC 6409 §4.3: never accept credentials in clear.
        // This refusal comes first: it is the one the client must act on.
        if !self.tls {
            return Action::Reply(reply::auth_encryption_required());
        }
        if self.helo.is_none() || !self.esmtp {
            return Action::Reply(reply::send_hello_first());
        }
        if self.login.is_some() {
            return Action::Reply(reply::auth_already());
        }
        if self.envelope.is_some() {
            return Action::Reply(reply::auth_during_transaction());
        }
        match mechanism {
            AUTH_PLAIN if initial.is_empty() => {
                self.sasl = Sasl::PlainResponse;
                Action::Reply(reply::auth_challenge(""))
            }
            AUTH_PLAIN => self.plain_response(initial),
            AUTH_LOGIN if initial.is_empty() => {
                self.sasl = Sasl::LoginUser;
                Action::Reply(reply::auth_challenge("VXNlcm5hbWU6"))
            }
            AUTH_LOGIN => match decode_b64(initial) {
                Ok(user) => {
                    self.sasl = Sasl::LoginPassword(user);
                    Action::Reply(reply::auth_challenge("UGFzc3dvcmQ6"))
                }
                Err(r) => Action::Reply(r),
            },
            _ => Action::Reply(reply::auth_mechanism_unsupported()),
        }
    }

    fn sasl_line(&mut self, line: &[u8]) -> Action {
        let state = std::mem::replace(&mut self.sasl, Sasl::None);
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']).trim();
        // RFC 4954 §4: "*" cancels the exchange.
        if text == "*" {
            return self.count_errors(Action::Reply(reply::auth_cancelled()));
        }
        let action = match state {
            Sasl::None => Action::Reply(reply::unknown_command()),
            Sasl::PlainResponse => self.plain_response(text),
            Sasl::LoginUser => match decode_b64(text) {
                Ok(user) => {
                    self.sasl = Sasl::LoginPassword(user);
                    Action::Reply(reply::auth_challenge("UGFzc3dvcmQ6"))
                }
                Err(r) => Action::Reply(r),
            },
            Sasl::LoginPassword(user) => match decode_b64(text) {
                Ok(password) => Action::Authenticate(SaslCredentials {
                    login: user,
                    password,
                }),
                Err(r) => Action::Reply(r),
            },
        };
        self.count_errors(action)
    }

    fn plain_response(&mut self, b64: &str) -> Action {
        let raw = if b64 == "=" {
            Vec::new()
        } else {
            match B64.decode(b64.as_bytes()) {
                Ok(raw) => raw,
                Err(_) => return Action::Reply(reply::auth_bad_base64()),
            }
        };
        match SaslCredentials::from_plain(&raw) {
            Some(creds) => Action::Authenticate(creds),
            None => Action::Reply(reply::auth_malformed()),
        }
    }

    /// The outcome of [`Action::Authenticate`].
    pub fn auth_result(&mut self, result: AuthResult) -> Action {
        let action = match result {
            AuthResult::Success(login) => {
                self.login = Some(login);
                Action::Reply(reply::auth_success())
            }
            AuthResult::Failed => Action::Reply(reply::auth_failed()),
            AuthResult::RateLimited => Action::Reply(reply::auth_rate_limited()),
            AuthResult::TemporaryFailure => Action::Reply(reply::auth_temporary_failure()),
            AuthResult::BackendUnavailable => Action::Reply(reply::auth_backend_unavailable()),
        };
        self.count_errors(action)
    }

    fn mail(&mut self, address: &str, flags: u64, size: usize, dsn: DsnParams) -> Action {
        // RFC 4954 §6 / SPEC §4: 530 before anything else when not logged in.
        let Some(login) = &self.login else {
            return Action::Reply(reply::auth_required());
        };
        if self.helo.is_none() {
            return Action::Reply(reply::send_hello_first());
        }
        if self.envelope.is_some() {
            return Action::Reply(reply::nested_mail());
        }
        // RFC 1870 §6.3: refuse early when the declared size is too big.
        if size > self.config.max_message_size {
            crate::metrics::message_refused(crate::metrics::Refusal::Size);
            return Action::Reply(reply::message_too_big());
        }
        if flags & MAIL_BODY_BINARYMIME != 0 {
            return Action::Reply(reply::parameter_unsupported("BODY=BINARYMIME"));
        }
        let smtputf8 = flags & MAIL_SMTPUTF8 != 0;
        if smtputf8 && !self.config.smtputf8 {
            return Action::Reply(reply::smtputf8_unsupported());
        }
        let from = if address.is_empty() {
            // RFC 6409 §4.1 / SPEC §3: the null sender is accepted at MAIL;
            // its message still passes the header checks.
            String::new()
        } else {
            let normalized = match normalize_address(address) {
                Ok(a) => a,
                Err(e) => return Action::Reply(reply::bad_sender_syntax(&e.to_string())),
            };
            let decision = self.policy.decide(login, &normalized);
            if !decision.allowed {
                crate::metrics::message_refused(crate::metrics::Refusal::Sender);
                // The sender is the client's text (normalised, but the
                // log does not rely on what normalisation lets through).
                tracing::info!(
                    event = "sender_refused",
                    login = %Escaped(&login.address),
                    sender = %Escaped(&normalized),
                    reason = %Escaped(&decision.reason),
                    "MAIL FROM refused"
                );
                return Action::Reply(reply::sender_not_owned(&normalized, &login.address));
            }
            normalized
        };
        self.envelope = Some(Envelope {
            from,
            mail_at: Some(std::time::Instant::now()),
            recipients: Vec::new(),
            smtputf8,
            eight_bit: flags & MAIL_BODY_8BITMIME != 0,
            dsn,
        });
        Action::Reply(reply::sender_ok())
    }

    fn rcpt(
        &mut self,
        address: &str,
        notify: Option<domauth_store::DsnNotify>,
        orcpt: Option<String>,
    ) -> Action {
        let max = self.config.max_recipients;
        let Some(envelope) = &mut self.envelope else {
            return Action::Reply(reply::need_mail());
        };
        if address.is_empty() {
            return Action::Reply(reply::null_recipient());
        }
        if let Err(e) = normalize_address(address) {
            return Action::Reply(reply::bad_recipient_syntax(&e.to_string()));
        }
        if envelope.recipients.len() >= max {
            return Action::Reply(reply::too_many_recipients());
        }
        // The local part is kept as given: only the recipient's own server
        // may decide that it is case-insensitive (RFC 5321 §2.4).
        let address = address.trim().to_string();
        if !envelope
            .recipients
            .iter()
            .any(|r| r.eq_ignore_ascii_case(&address))
        {
            if notify.is_some() || orcpt.is_some() {
                envelope.dsn.recipients.push(RecipientDsn {
                    address: address.clone(),
                    notify,
                    orcpt,
                });
            }
            envelope.recipients.push(address);
        }
        Action::Reply(reply::recipient_ok())
    }

    fn data(&mut self) -> Action {
        match &self.envelope {
            None if self.login.is_none() => Action::Reply(reply::auth_required()),
            None => Action::Reply(reply::need_mail()),
            Some(e) if e.recipients.is_empty() => Action::Reply(reply::need_rcpt()),
            Some(_) => Action::ReceiveData(reply::start_data()),
        }
    }

    /// The envelope and login of the message about to be received (after
    /// [`Action::ReceiveData`]).
    pub fn message_start(&self) -> Option<MessageStart> {
        let (Some(envelope), Some(login)) = (&self.envelope, &self.login) else {
            return None;
        };
        Some(MessageStart {
            envelope: envelope.clone(),
            login: login.address.clone(),
            helo: self.helo.clone().unwrap_or_else(|| "unknown".into()),
        })
    }

    /// The DATA phase ended at CRLF.CRLF: the verdict on the message from the
    /// decoder's outcome and its header block (`None`: the header block was
    /// larger than the relay keeps). `Ok` means it may be queued; the caller
    /// answers `250 ... queued as` once it is on disk. The transaction is
    /// over either way.
    pub fn data_received(
        &mut self,
        outcome: DataOutcome,
        headers: Option<&[u8]>,
    ) -> Result<(), Reply> {
        let envelope = self.envelope.take();
        let (Some(envelope), Some(login)) = (envelope, self.login.as_ref()) else {
            return Err(reply::need_mail());
        };
        crate::metrics::data_outcome(&outcome);
        match outcome {
            DataOutcome::TooBig => return Err(reply::message_too_big()),
            DataOutcome::BareLineEnding => return Err(reply::bare_line_ending()),
            DataOutcome::Nul => return Err(reply::nul_in_message()),
            DataOutcome::Complete => {}
        }
        let Some(headers) = headers else {
            crate::metrics::message_refused(crate::metrics::Refusal::HeaderTooLarge);
            return Err(reply::header_too_large());
        };
        match cleanup::check_headers(headers, login, self.policy.as_ref()) {
            HeaderVerdict::Accept => Ok(()),
            HeaderVerdict::Refuse { reply, reason } => {
                crate::metrics::message_refused(crate::metrics::Refusal::Header);
                // The reason quotes header addresses: the client's text.
                tracing::info!(
                    event = "message_refused",
                    login = %Escaped(&login.address),
                    from = %Escaped(&envelope.from),
                    reason = %Escaped(&reason),
                    "message refused at end of DATA"
                );
                Err(reply)
            }
        }
    }
}

/// Keeps client-supplied text printable before it goes into headers and logs.
fn sanitize(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

fn decode_b64(text: &str) -> Result<String, Reply> {
    let raw = B64
        .decode(text.as_bytes())
        .map_err(|_| reply::auth_bad_base64())?;
    String::from_utf8(raw).map_err(|_| reply::auth_malformed())
}

fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => reply::unknown_command(),
        ParseError::InvalidSenderAddress => reply::bad_sender_syntax("invalid address"),
        ParseError::InvalidRecipientAddress => reply::bad_recipient_syntax("invalid address"),
        ParseError::SyntaxError { syntax } => reply::syntax_error(syntax),
        ParseError::InvalidParameter { param } => {
            reply::syntax_error(&format!("invalid parameter {param}"))
        }
        ParseError::UnsupportedParameter { param } => {
            reply::parameter_unsupported(&sanitize(&param))
        }
        ParseError::ResponseTooLong => reply::line_too_long(),
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => {
            reply::syntax_error("incomplete command")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Decision;

    /// A policy table: the login owns only its own address and `alias@ext.test`.
    struct Table;
    impl SenderPolicy for Table {
        fn decide(&self, login: &Login, address: &str) -> Decision {
            let allowed = address == login.address || address == "alias@ext.test";
            Decision {
                allowed,
                reason: if allowed {
                    "ok".into()
                } else {
                    "not listed".into()
                },
            }
        }
    }

    fn session(listener: Listener) -> Session {
        let config = SessionConfig {
            hostname: "relay.test".into(),
            max_message_size: 1000,
            max_recipients: 3,
            max_errors: 5,
            smtputf8: false,
        };
        Session::new(
            Arc::new(config),
            Arc::new(Table),
            listener,
            "127.0.0.1".parse().unwrap(),
        )
    }

    fn code(action: &Action) -> u16 {
        match action {
            Action::Reply(r) | Action::Close(r) | Action::StartTls(r) | Action::ReceiveData(r) => {
                r.code
            }
            Action::Authenticate(_) => 0,
        }
    }

    fn text(action: &Action) -> String {
        match action {
            Action::Reply(r) | Action::Close(r) | Action::StartTls(r) | Action::ReceiveData(r) => {
                r.to_string()
            }
            Action::Authenticate(c) => format!("AUTH {}", c.login),
        }
    }

    fn send(s: &mut Session, line: &str) -> Action {
        s.command(format!("{line}\r\n").as_bytes())
    }

    fn logged_in() -> Session {
        let mut s = session(Listener::Submissions);
        send(&mut s, "EHLO client");
        let a = send(&mut s, "AUTH PLAIN AGluZm9AYWNtZS50ZXN0AHNlY3JldA==");
        assert!(
            matches!(a, Action::Authenticate(ref c) if c.login == "info@acme.test" && c.password == "secret")
        );
        s.auth_result(AuthResult::Success(Login {
            address: "info@acme.test".into(),
            hosting: "acme".into(),
        }));
        s
    }

    #[test]
    fn ehlo_advertises_by_tls_state() {
        let mut plain = session(Listener::Submission);
        let t = text(&send(&mut plain, "EHLO c"));
        assert!(t.contains("STARTTLS") && !t.contains("AUTH"), "{t}");
        for ext in ["PIPELINING", "SIZE 1000", "8BITMIME", "ENHANCEDSTATUSCODES"] {
            assert!(t.contains(ext), "{ext} in {t}");
        }
        let mut tls = session(Listener::Submissions);
        let t = text(&send(&mut tls, "EHLO c"));
        assert!(
            !t.contains("STARTTLS") && t.contains("AUTH PLAIN LOGIN"),
            "{t}"
        );
    }

    #[test]
    fn command_table_before_auth() {
        // (listener, commands before, command, expected code)
        let cases: &[(Listener, &[&str], &str, u16)] = &[
            (
                Listener::Submission,
                &["EHLO c"],
                "AUTH PLAIN AGEAYg==",
                538,
            ),
            (Listener::Submission, &["EHLO c"], "AUTH LOGIN", 538),
            (
                Listener::Submission,
                &["EHLO c"],
                "MAIL FROM:<a@b.test>",
                530,
            ),
            (Listener::Submission, &[], "MAIL FROM:<a@b.test>", 530),
            (Listener::Submission, &[], "AUTH PLAIN AGEAYg==", 538),
            (Listener::Submission, &["EHLO c"], "RCPT TO:<a@b.test>", 503),
            (Listener::Submission, &["EHLO c"], "DATA", 530),
            (Listener::Submission, &["EHLO c"], "STARTTLS", 220),
            (Listener::Submission, &[], "STARTTLS", 503),
            (Listener::Submissions, &["EHLO c"], "STARTTLS", 503),
            (Listener::Submissions, &["EHLO c"], "AUTH PLAIN %%%", 501),
            (
                Listener::Submissions,
                &["EHLO c"],
                "AUTH PLAIN AGZvbw==",
                501,
            ),
            (Listener::Submissions, &["EHLO c"], "AUTH CRAM-MD5", 504),
            (Listener::Submissions, &["EHLO c"], "AUTH PLAIN", 334),
            (Listener::Submissions, &["EHLO c"], "AUTH LOGIN", 334),
            (Listener::Submissions, &[], "AUTH PLAIN", 503),
            (Listener::Submission, &[], "NOOP", 250),
            (Listener::Submission, &[], "RSET", 250),
            (Listener::Submission, &[], "HELP", 214),
            (Listener::Submission, &[], "VRFY x", 252),
            (Listener::Submission, &[], "EXPN x", 502),
            (Listener::Submission, &[], "BDAT 10 LAST", 502),
            (Listener::Submission, &[], "FOO", 500),
            (Listener::Submission, &[], "QUIT", 221),
            (Listener::Submission, &[], "HELO c", 250),
        ];
        for (listener, before, cmd, expect) in cases {
            let mut s = session(*listener);
            for b in *before {
                send(&mut s, b);
            }
            let a = send(&mut s, cmd);
            assert_eq!(code(&a), *expect, "{before:?} then {cmd}: {}", text(&a));
        }
    }

    #[test]
    fn dsn_parameters_are_kept_or_refused() {
        let t = text(&send(&mut session(Listener::Submission), "EHLO c"));
        assert!(t.contains("DSN"), "{t}");
        let mut s = logged_in();
        let a = send(
            &mut s,
            "MAIL FROM:<info@acme.test> RET=HDRS ENVID=QQ+2B1+20x",
        );
        assert_eq!(code(&a), 250, "{}", text(&a));
        for line in [
            "RCPT TO:<a@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bx@Dest.test",
            "RCPT TO:<A@dest.test> NOTIFY=DELAY",
            "RCPT TO:<b@dest.test> NOTIFY=NEVER",
        ] {
            assert_eq!(code(&send(&mut s, line)), 250, "{line}");
        }
        let start = s.message_start().unwrap();
        let dsn = &start.envelope.dsn;
        assert_eq!(dsn.ret, Some(domauth_store::DsnRet::Hdrs));
        assert_eq!(dsn.envid.as_deref(), Some("QQ+1 x"));
        assert_eq!(
            dsn.notify("a@dest.test").map(|n| n.to_string()).as_deref(),
            Some("SUCCESS,FAILURE"),
            "a duplicate recipient keeps its first parameters"
        );
        assert_eq!(
            dsn.recipient("a@dest.test").unwrap().orcpt.as_deref(),
            Some("A+x@Dest.test")
        );
        assert!(dsn.notify("b@dest.test").unwrap().is_never());
        assert_eq!(dsn.recipients.len(), 2);
        assert_eq!(start.envelope.recipients.len(), 2);

        for (line, reply) in [
            (
                "MAIL FROM:<info@acme.test> RET=HDRS RET=FULL",
                "501 5.5.4 Invalid RET parameter: given twice",
            ),
            (
                "MAIL FROM:<info@acme.test> ENVID=a+0D+0AX:+20y",
                "501 5.5.4 Invalid ENVID parameter: must be printable US-ASCII",
            ),
            (
                "MAIL FROM:<info@acme.test> RET=SOME",
                "501 5.5.4 Syntax error: invalid parameter RET",
            ),
        ] {
            let mut s = logged_in();
            assert_eq!(text(&send(&mut s, line)), reply, "{line}");
        }
        for (line, expect) in [
            ("RCPT TO:<a@dest.test> NOTIFY=NEVER,SUCCESS", 501),
            ("RCPT TO:<a@dest.test> NOTIFY=OFTEN", 501),
            ("RCPT TO:<a@dest.test> ORCPT=rfc822;", 501),
            ("RCPT TO:<a@dest.test> ORCPT=x400;a", 501),
            ("RCPT TO:<a@dest.test> ORCPT=rfc822;a+0Ab", 501),
        ] {
            let mut s = logged_in();
            send(&mut s, "MAIL FROM:<info@acme.test>");
            let a = send(&mut s, line);
            assert_eq!(code(&a), expect, "{line}: {}", text(&a));
            assert!(text(&a).starts_with("501 5.5.4"), "{line}: {}", text(&a));
        }
    }

    #[test]
    fn transaction_table_after_auth() {
        let cases: &[(&[&str], &str, u16)] = &[
            (&[], "MAIL FROM:<info@acme.test>", 250),
            (&[], "MAIL FROM:<INFO@Acme.Test>", 250),
            (&[], "MAIL FROM:<alias@ext.test>", 250),
            (&[], "MAIL FROM:<other@acme.test>", 553),
            (&[], "MAIL FROM:<>", 250),
            (&[], "MAIL FROM:<info@acme.test> SIZE=5000", 552),
            (&[], "MAIL FROM:<info@acme.test> SMTPUTF8", 555),
            (&[], "MAIL FROM:<info@acme.test> BODY=8BITMIME", 250),
            (&[], "MAIL FROM:<no-at-sign>", 501),
            (&[], "RCPT TO:<a@b.test>", 503),
            (&[], "DATA", 503),
            (&[], "AUTH PLAIN AGEAYg==", 503),
            (
                &["MAIL FROM:<info@acme.test>"],
                "MAIL FROM:<info@acme.test>",
                503,
            ),
            (&["MAIL FROM:<info@acme.test>"], "RCPT TO:<>", 501),
            (&["MAIL FROM:<info@acme.test>"], "RCPT TO:<a@b.test>", 250),
            (&["MAIL FROM:<info@acme.test>"], "DATA", 503),
            (
                &["MAIL FROM:<info@acme.test>", "RCPT TO:<a@b.test>"],
                "DATA",
                354,
            ),
            (
                &[
                    "MAIL FROM:<info@acme.test>",
                    "RCPT TO:<a@b.test>",
                    "RCPT TO:<b@b.test>",
                    "RCPT TO:<c@b.test>",
                ],
                "RCPT TO:<d@b.test>",
                452,
            ),
            (
                &["MAIL FROM:<info@acme.test>", "RSET"],
                "RCPT TO:<a@b.test>",
                503,
            ),
        ];
        for (before, cmd, expect) in cases {
            let mut s = logged_in();
            for b in *before {
                send(&mut s, b);
            }
            let a = send(&mut s, cmd);
            assert_eq!(code(&a), *expect, "{before:?} then {cmd}: {}", text(&a));
        }
    }

    #[test]
    fn refusal_text_names_address_and_login() {
        let mut s = logged_in();
        let a = send(&mut s, "MAIL FROM:<Other@acme.test>");
        assert_eq!(
            text(&a),
            "553 5.7.1 <other@acme.test>: Sender address rejected: not owned by user info@acme.test"
        );
    }

    #[test]
    fn auth_login_exchange_and_cancel() {
        let mut s = session(Listener::Submissions);
        send(&mut s, "EHLO c");
        assert_eq!(text(&send(&mut s, "AUTH LOGIN")), "334 VXNlcm5hbWU6");
        assert_eq!(
            text(&send(&mut s, "aW5mb0BhY21lLnRlc3Q=")),
            "334 UGFzc3dvcmQ6"
        );
        let a = send(&mut s, "c2VjcmV0");
        assert!(
            matches!(a, Action::Authenticate(ref c) if c.login == "info@acme.test" && c.password == "secret")
        );
        assert_eq!(code(&s.auth_result(AuthResult::Failed)), 535);

        send(&mut s, "AUTH LOGIN");
        assert_eq!(code(&send(&mut s, "*")), 501);
        // Back to command mode after the cancel.
        assert_eq!(code(&send(&mut s, "NOOP")), 250);
        send(&mut s, "AUTH PLAIN");
        assert_eq!(code(&send(&mut s, "not base64!")), 501);
        assert_eq!(code(&send(&mut s, "NOOP")), 250);
    }

    /// SPEC §4: any error reply inside an AUTH exchange ends it; the next
    /// line is a command again, never a SASL response (a password).
    #[test]
    fn an_error_reply_ends_the_auth_exchange() {
        // How the exchange is broken off: by the socket side's framing (a
        // too-long line, a bare LF) or by a refused SASL response.
        #[derive(Debug, Clone, Copy)]
        enum Break {
            TooLong,
            BareLf,
            Line(&'static str),
        }
        // (lines that open the exchange, how it breaks, the error code)
        let cases: &[(&[&str], Break, u16)] = &[
            (&["AUTH LOGIN"], Break::TooLong, 500),
            (&["AUTH LOGIN"], Break::BareLf, 500),
            (&["AUTH LOGIN", "aW5mb0BhY21lLnRlc3Q="], Break::TooLong, 500),
            (&["AUTH LOGIN", "aW5mb0BhY21lLnRlc3Q="], Break::BareLf, 500),
            (&["AUTH LOGIN aW5mb0BhY21lLnRlc3Q="], Break::TooLong, 500),
            (&["AUTH PLAIN"], Break::TooLong, 500),
            (&["AUTH PLAIN"], Break::BareLf, 500),
            (&["AUTH LOGIN"], Break::Line("not base64!"), 501),
            (
                &["AUTH LOGIN", "aW5mb0BhY21lLnRlc3Q="],
                Break::Line("%%"),
                501,
            ),
            (&["AUTH PLAIN"], Break::Line("not base64!"), 501),
            (&["AUTH PLAIN"], Break::Line("AGZvbw=="), 501),
            (&["AUTH PLAIN"], Break::Line("*"), 501),
        ];
        for (open, how, expect) in cases {
            let mut s = session(Listener::Submissions);
            send(&mut s, "EHLO c");
            for line in *open {
                assert_eq!(code(&send(&mut s, line)), 334, "{open:?}: {line}");
            }
            let a = match how {
                Break::TooLong => s.protocol_error(reply::line_too_long()),
                Break::BareLf => s.protocol_error(reply::command_bare_line_ending()),
                Break::Line(l) => send(&mut s, l),
            };
            assert_eq!(code(&a), *expect, "{open:?} then {how:?}: {}", text(&a));
            // "NOOP" is valid base64: were the exchange still open it would
            // be taken as the password (LOGIN) or the response (PLAIN).
            let a = send(&mut s, "NOOP");
            assert_eq!(code(&a), 250, "{open:?} then {how:?}: {}", text(&a));
            // And a new exchange can start.
            assert_eq!(code(&send(&mut s, "AUTH LOGIN")), 334, "{open:?} {how:?}");
        }
    }

    #[test]
    fn a_protocol_error_outside_auth_keeps_the_session() {
        let mut s = logged_in();
        send(&mut s, "MAIL FROM:<info@acme.test>");
        assert_eq!(code(&s.protocol_error(reply::line_too_long())), 500);
        assert_eq!(code(&send(&mut s, "RCPT TO:<a@b.test>")), 250);
        assert!(s.login().is_some());
    }

    #[test]
    fn starttls_resets_the_session() {
        let mut s = session(Listener::Submission);
        send(&mut s, "EHLO c");
        assert!(matches!(send(&mut s, "STARTTLS"), Action::StartTls(_)));
        s.tls_started();
        // Must EHLO again before anything else.
        assert_eq!(code(&send(&mut s, "AUTH PLAIN AGEAYg==")), 503);
        let t = text(&send(&mut s, "EHLO c"));
        assert!(t.contains("AUTH PLAIN LOGIN") && !t.contains("STARTTLS"));
        assert_eq!(code(&send(&mut s, "STARTTLS")), 503);
    }

    #[test]
    fn too_many_errors_closes() {
        let mut s = session(Listener::Submission);
        for _ in 0..4 {
            assert!(matches!(send(&mut s, "FOO"), Action::Reply(_)));
        }
        let a = send(&mut s, "FOO");
        assert!(
            matches!(a, Action::Close(ref r) if r.code == 421),
            "{}",
            text(&a)
        );
    }

    #[test]
    fn data_outcomes() {
        let ready = || {
            let mut s = logged_in();
            send(&mut s, "MAIL FROM:<info@acme.test>");
            send(&mut s, "RCPT TO:<a@b.test>");
            assert_eq!(code(&send(&mut s, "DATA")), 354);
            s
        };
        let ok = DataOutcome::Complete;
        let cases: [(DataOutcome, Option<&str>, Option<u16>); 10] = [
            (
                DataOutcome::TooBig,
                Some("From: info@acme.test\r\n\r\n"),
                Some(552),
            ),
            (
                DataOutcome::BareLineEnding,
                Some("From: info@acme.test\r\n\r\n"),
                Some(550),
            ),
            (
                DataOutcome::Nul,
                Some("From: info@acme.test\r\n\r\n"),
                Some(550),
            ),
            (ok, None, Some(552)),
            (ok, Some("Subject: x\r\n\r\n"), Some(550)),
            (ok, Some("From: other@acme.test\r\n\r\n"), Some(550)),
            (
                ok,
                Some("From: info@acme.test\r\nSender: other@acme.test\r\n\r\n"),
                Some(550),
            ),
            (ok, Some("From: Info <info@acme.test>\r\n\r\n"), None),
            (ok, Some("From: alias@ext.test\r\n\r\n"), None),
            (ok, Some("From: info@acme.test\r\n"), None),
        ];
        for (outcome, headers, expect) in cases {
            let mut s = ready();
            let label = format!("{outcome:?} {headers:?}");
            let start = s.message_start().expect("in a transaction");
            assert_eq!(start.envelope.recipients, ["a@b.test"]);
            assert_eq!(start.login, "info@acme.test");
            let result = s.data_received(outcome, headers.map(str::as_bytes));
            match (result, expect) {
                (Ok(()), None) => {}
                (Err(reply), Some(code)) => assert_eq!(reply.code, code, "{label}: {reply}"),
                (other, _) => panic!("{label}: unexpected {other:?}"),
            }
            // The transaction is over either way.
            assert_eq!(code(&send(&mut s, "RCPT TO:<a@b.test>")), 503);
        }
    }
}
