//! Arbitrary command sequences into the sans-IO SMTP session, driven the way
//! `smtp::conn` drives it.
//!
//! Input layout: byte 0 holds options (bit 0: listener Submission instead of
//! Submissions; bit 1: hand every line to `Session::command` raw instead of
//! applying conn.rs's CRLF framing rule first). The rest is the client's byte
//! stream, split into lines at LF. When the session asks to authenticate, the
//! next input byte picks the result; when it starts DATA, the following bytes
//! go to a `DataDecoder` up to its terminator, and the stream continues after
//! it (pipelining).
//!
//! Invariants:
//! - no panic;
//! - MAIL gets a 2xx/3xx only after a successful AUTH that no STARTTLS has
//!   erased since (`Session::login()` agrees with that model at every step);
//! - after `tls_started()` no login survives;
//! - a message is accepted only for a logged-in session, with recipients,
//!   and what would be queued has canonical CRLF only;
//! - no reply line contains CR or LF (no reply injection);
//! - no log field holds a raw control character (SPEC §4: no client can
//!   start a log line of its own). A tracing layer checks every field of
//!   every event the session logs, and every AUTH outcome is logged the way
//!   `auth.rs` logs it (`auth::log_auth` with the client's user name).
#![no_main]

use std::{
    fmt,
    net::IpAddr,
    sync::{Arc, Once},
};

use domauth::{
    policy::{Decision, Login, SenderPolicy},
    smtp::{
        auth::{self, AuthEvent},
        data::DataDecoder,
        reply::{self, Reply},
        session::{Action, AuthResult, Listener, Session, SessionConfig},
    },
};
use libfuzzer_sys::fuzz_target;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id, Record},
};
use tracing_subscriber::{
    layer::{Context, Layer, SubscriberExt},
    registry::Registry,
};

/// The login owns its own address and anything at `ext.test`. The reason
/// quotes the address, as the store's policy does, so client text reaches
/// the `reason` log field too.
struct Policy;

impl SenderPolicy for Policy {
    fn decide(&self, login: &Login, address: &str) -> Decision {
        let allowed = address == login.address || address.ends_with("@ext.test");
        Decision {
            allowed,
            reason: format!("fuzz: {address}"),
        }
    }
}

/// Fails on a field value that would put a raw control character into a
/// log line. Values are taken as a formatting subscriber writes them:
/// `%x` fields (the usual way text is logged) and the message by Display,
/// `?x` fields by Debug (which escapes strings itself); plain `&str` fields
/// are checked raw, which is stricter than fmt's quoting.
struct FieldCheck;

impl FieldCheck {
    fn check(field: &Field, text: &str) {
        assert!(
            !text.chars().any(char::is_control),
            "log field `{}` holds a raw control character: {text:?}",
            field.name()
        );
    }
}

impl Visit for FieldCheck {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        FieldCheck::check(field, &format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        FieldCheck::check(field, value);
    }
}

/// Runs [`FieldCheck`] on every event and span the relay records.
struct NoControlInLog;

impl<S: Subscriber> Layer<S> for NoControlInLog {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        event.record(&mut FieldCheck);
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        attrs.record(&mut FieldCheck);
    }

    fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
        values.record(&mut FieldCheck);
    }
}

/// The checking layer, for the whole process; every level is enabled.
fn install_log_check() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let subscriber = Registry::default().with(NoControlInLog);
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
}

const MAX_SIZE: usize = 2048;

fn reply_of(action: &Action) -> Option<&Reply> {
    match action {
        Action::Reply(r) | Action::Close(r) | Action::StartTls(r) | Action::ReceiveData(r) => {
            Some(r)
        }
        Action::Authenticate(_) => None,
    }
}

fn check_reply(r: &Reply) {
    for line in &r.lines {
        assert!(
            !line.contains('\r') && !line.contains('\n'),
            "reply line with CR/LF: {r:?}"
        );
    }
    assert!((200..600).contains(&r.code), "reply code {r:?}");
}

/// CRLF only: every CR is followed by LF and every LF preceded by CR.
fn canonical(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

fn is_mail_command(line: &[u8]) -> bool {
    matches!(
        smtp_proto::Request::parse(&mut line.iter()),
        Ok(smtp_proto::Request::Mail { .. })
    )
}

fuzz_target!(|input: &[u8]| {
    install_log_check();
    let Some((&options, mut rest)) = input.split_first() else {
        return;
    };
    let listener = if options & 1 != 0 {
        Listener::Submission
    } else {
        Listener::Submissions
    };
    let raw_lines = options & 2 != 0;
    let config = SessionConfig {
        hostname: "relay.test".into(),
        max_message_size: MAX_SIZE,
        max_recipients: 3,
        max_errors: 10,
        smtputf8: options & 4 != 0,
    };
    let peer: IpAddr = IpAddr::from([192, 0, 2, 1]);
    let mut session = Session::new(Arc::new(config), Arc::new(Policy), listener, peer);
    check_reply(&session.greeting());
    // The harness's own model of the login state.
    let mut logged_in = false;
    // The previous reply was a SASL challenge: this line is a SASL response.
    let mut in_sasl = false;

    while !rest.is_empty() {
        let (line, tail) = match memchr::memchr(b'\n', rest) {
            Some(pos) => rest.split_at(pos + 1),
            None => (rest, &rest[rest.len()..]),
        };
        rest = tail;
        let well_formed =
            line.len() >= 2 && line.ends_with(b"\r\n") && !line[..line.len() - 2].contains(&b'\r');
        let mut action = if raw_lines || well_formed {
            session.command(line)
        } else {
            session.protocol_error(reply::command_bare_line_ending())
        };
        let was_mail = !in_sasl && is_mail_command(line);

        if let Action::Authenticate(creds) = &action {
            let pick = match rest.split_first() {
                Some((&b, tail)) => {
                    rest = tail;
                    b
                }
                None => 0,
            };
            // auth.rs logs every outcome but a store error under the
            // client's user name (its login key): so does the harness.
            let logged = match pick & 3 {
                0 => Some(AuthEvent::Success { cached: false }),
                1 => Some(AuthEvent::Failure { known_login: false }),
                2 => Some(AuthEvent::RateLimited),
                _ => None,
            };
            if let Some(event) = logged {
                auth::log_auth(event, peer, &auth::login_key(&creds.login));
            }
            let result = match pick & 3 {
                0 => {
                    logged_in = true;
                    // auth.rs answers with the stored mailbox's address,
                    // which is normalised; never the raw client text.
                    let address = domauth_store::normalize_address(&creds.login)
                        .unwrap_or_else(|_| "info@acme.test".into());
                    AuthResult::Success(Login {
                        address,
                        hosting: "hosting".into(),
                    })
                }
                1 => AuthResult::Failed,
                2 => AuthResult::RateLimited,
                _ => AuthResult::TemporaryFailure,
            };
            action = session.auth_result(result);
            assert!(
                !matches!(action, Action::Authenticate(_)),
                "auth_result asked to authenticate again"
            );
        }
        assert_eq!(
            session.login().is_some(),
            logged_in,
            "login state differs from the model"
        );

        let r = reply_of(&action).expect("Authenticate handled above");
        check_reply(r);
        if was_mail && r.code < 400 {
            assert!(logged_in, "MAIL accepted without a login: {r:?}");
        }
        if *r == reply::sender_ok() {
            assert!(logged_in, "sender_ok without a login");
        }
        in_sasl = r.code == 334;

        match action {
            Action::Reply(_) | Action::Authenticate(_) => {}
            Action::Close(_) => return,
            Action::StartTls(_) => {
                // conn.rs drops whatever was pipelined behind STARTTLS; the
                // session must forget everything either way. Keep feeding
                // the rest of the input as if it came inside TLS.
                session.tls_started();
                logged_in = false;
                in_sasl = false;
                assert!(session.login().is_none(), "a login survived STARTTLS");
                assert!(session.is_tls());
            }
            Action::ReceiveData(_) => {
                assert!(logged_in, "DATA started without a login");
                let start = session.message_start();
                assert!(
                    start.as_ref().is_some_and(|s| !s.envelope.recipients.is_empty()),
                    "DATA started without recipients"
                );
                let mut decoder = DataDecoder::new(MAX_SIZE);
                let mut message = Vec::new();
                match decoder.feed(rest, &mut message) {
                    Some(used) => rest = &rest[used..],
                    None => rest = &rest[rest.len()..],
                }
                let outcome = decoder.finish();
                let headers = domauth::cleanup::header_block(&message);
                match session.data_received(outcome, Some(headers)) {
                    Ok(()) => {
                        assert!(logged_in, "message accepted without a login");
                        assert!(
                            canonical(&message),
                            "queued message with a bare CR/LF: {:?}",
                            String::from_utf8_lossy(&message)
                        );
                        assert!(!message.contains(&0), "queued message with a NUL");
                    }
                    Err(r) => {
                        check_reply(&r);
                        assert!(r.code >= 400, "refusal with a positive code: {r:?}");
                    }
                }
            }
        }
    }
});
