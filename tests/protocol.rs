//! The SMTP dialogue end to end (SPEC §3–§4, issue 2's bad-input list):
//! every reply the core owns, each followed by proof that the server still
//! serves, plus start-up errors of `domauth serve` and the CLI's exit codes.
//! Real binary, real upstream (aiosmtpd), swaks and a byte-level client.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use common::{BIN, Relay, RelayConfig, Sink, raw::RawClient};

const WAIT: Duration = Duration::from_secs(20);
const USER: &str = "info@acme.test";
const PASS: &str = "secret";

// ---------------------------------------------------------------- helpers

/// A sink, and a relay (configured by `tune`) with the mailbox USER.
fn setup_with(tune: impl FnOnce(&mut RelayConfig)) -> (Sink, Relay) {
    let sink = Sink::start();
    let mut config = RelayConfig::new(sink.port);
    tune(&mut config);
    let relay = Relay::start_with(config);
    relay.add_mailbox("acme", USER, PASS);
    (sink, relay)
}

fn setup() -> (Sink, Relay) {
    setup_with(|_| {})
}

fn cert(relay: &Relay) -> PathBuf {
    relay.dir.path().join("certs/test.crt")
}

/// Connected to the submission port, greeting read, EHLO sent (no TLS).
fn plain(relay: &Relay) -> RawClient {
    let mut c = RawClient::connect(relay.submission, &cert(relay));
    expect(&c.read_reply().expect("greeting"), "220 ");
    expect(&c.cmd("EHLO client.test"), "250");
    c
}

/// Connected, STARTTLS done, EHLO again: not authenticated yet.
fn tls(relay: &Relay) -> RawClient {
    let mut c = plain(relay);
    c.starttls();
    expect(&c.cmd("EHLO client.test"), "250");
    c
}

/// Logged in as USER over STARTTLS: ready for MAIL.
fn login(relay: &Relay) -> RawClient {
    RawClient::login(relay.submission, &cert(relay), USER, PASS)
}

#[track_caller]
fn expect(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected a reply starting {prefix:?}, got {reply:?}"
    );
}

/// The same connection still works.
#[track_caller]
fn still_serves(c: &mut RawClient) {
    expect(&c.cmd("NOOP"), "250");
}

/// A complete transaction on `c`; returns the final reply.
fn transaction(c: &mut RawClient, from: &str, rcpts: &[&str], message: &str) -> String {
    expect(&c.cmd(&format!("MAIL FROM:<{from}>")), "250");
    for r in rcpts {
        expect(&c.cmd(&format!("RCPT TO:<{r}>")), "250");
    }
    expect(&c.cmd("DATA"), "354");
    c.send(message.as_bytes());
    c.send(b".\r\n");
    c.read_reply().expect("reply to the end of DATA")
}

/// A normal swaks submission succeeds; returns its queue id.
fn swaks_send_ok(relay: &Relay) -> String {
    let r = relay
        .swaks()
        .auth(USER, PASS)
        .from(USER)
        .to("someone@example.org")
        .run();
    r.assert_code(0).assert_contains("250 2.0.0 Ok: queued as ");
    r.queue_id().expect("queue id")
}

/// aiosmtpd records the null reverse-path as "<>".
fn is_null_sender(mail_from: &str) -> bool {
    mail_from.is_empty() || mail_from == "<>"
}

/// The extension keywords of an EHLO reply (every line but the first).
fn extensions(reply: &str) -> Vec<String> {
    reply
        .lines()
        .skip(1)
        .map(|l| l.get(4..).unwrap_or("").trim().to_string())
        .collect()
}

fn has_ext(exts: &[String], keyword: &str) -> bool {
    exts.iter()
        .any(|e| e.split_whitespace().next() == Some(keyword))
}

/// Everything the upstream received, counted once the relay's queue is
/// empty: a wrongly accepted message has then arrived too.
fn all_delivered(relay: &Relay, sink: &Sink) -> Vec<common::SinkMessage> {
    relay.wait_queue_empty(WAIT);
    sink.messages()
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- EHLO

#[test]
fn ehlo_capabilities_before_and_after_starttls() {
    let (_sink, relay) = setup_with(|c| {
        c.set("server", "max_message_size", "123456");
    });
    let mut c = RawClient::connect(relay.submission, &cert(&relay));
    expect(&c.read_reply().unwrap(), "220 ");
    let before = c.cmd("EHLO client.test");
    expect(&before, "250-");
    let exts = extensions(&before);
    for k in ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS"] {
        assert!(has_ext(&exts, k), "{k} missing before TLS: {before}");
    }
    assert!(
        exts.iter().any(|e| e == "SIZE 123456"),
        "SIZE <max>: {before}"
    );
    assert!(
        !has_ext(&exts, "AUTH"),
        "AUTH advertised before TLS: {before}"
    );

    c.starttls();
    let after = c.cmd("EHLO client.test");
    let exts = extensions(&after);
    for k in ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"] {
        assert!(has_ext(&exts, k), "{k} missing after TLS: {after}");
    }
    assert!(
        exts.iter().any(|e| e == "SIZE 123456"),
        "SIZE <max>: {after}"
    );
    assert!(
        !has_ext(&exts, "STARTTLS"),
        "STARTTLS advertised inside TLS: {after}"
    );
    let auth = exts
        .iter()
        .find(|e| e.starts_with("AUTH "))
        .expect("AUTH after TLS");
    let mechs: Vec<&str> = auth.split_whitespace().skip(1).collect();
    assert!(
        mechs.contains(&"PLAIN") && mechs.contains(&"LOGIN"),
        "{after}"
    );
    // STARTTLS again inside TLS is refused, and the session goes on.
    expect(&c.cmd("STARTTLS"), "503");
    still_serves(&mut c);
}

#[test]
fn implicit_tls_port_offers_auth_and_no_starttls() {
    let (_sink, relay) = setup();
    let mut c = RawClient::connect_tls(relay.submissions, &cert(&relay));
    expect(&c.read_reply().unwrap(), "220 ");
    let reply = c.cmd("EHLO client.test");
    let exts = extensions(&reply);
    assert!(!has_ext(&exts, "STARTTLS"), "{reply}");
    for k in [
        "PIPELINING",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SIZE",
        "AUTH",
    ] {
        assert!(
            has_ext(&exts, k),
            "{k} missing on the implicit-TLS port: {reply}"
        );
    }
    expect(&c.cmd("STARTTLS"), "5");
    let token = B64.encode(format!("\0{USER}\0{PASS}"));
    expect(
        &c.cmd(&format!("AUTH PLAIN {token}")),
        "235 2.7.0 Authentication successful",
    );
    still_serves(&mut c);
}

// ---------------------------------------------------------------- order of commands

#[test]
fn auth_before_tls_is_refused_with_538() {
    let (sink, relay) = setup();
    let mut c = plain(&relay);
    let token = B64.encode(format!("\0{USER}\0{PASS}"));
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {token}")),
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    );
    assert_eq!(
        c.cmd("AUTH LOGIN"),
        "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    );
    still_serves(&mut c);
    // The same connection can still upgrade and log in.
    c.starttls();
    c.cmd("EHLO client.test");
    expect(&c.cmd(&format!("AUTH PLAIN {token}")), "235 ");
    let reply = transaction(
        &mut c,
        USER,
        &["a@example.org"],
        "From: info@acme.test\r\n\r\nhi\r\n",
    );
    expect(&reply, "250 2.0.0 Ok: queued as ");
    sink.wait_for(1, WAIT);
    let got = all_delivered(&relay, &sink);
    assert_eq!(got.len(), 1, "only the message sent after login: {got:?}");
    assert_eq!(got[0].rcpt_tos, vec!["a@example.org"]);
}

#[test]
fn mail_before_auth_is_refused_with_530() {
    let (_sink, relay) = setup();
    // In clear text.
    let mut c = plain(&relay);
    assert_eq!(
        c.cmd("MAIL FROM:<info@acme.test>"),
        "530 5.7.0 Authentication required\r\n"
    );
    still_serves(&mut c);
    // Inside TLS, not logged in yet.
    let mut c = tls(&relay);
    assert_eq!(
        c.cmd("MAIL FROM:<info@acme.test>"),
        "530 5.7.0 Authentication required\r\n"
    );
    still_serves(&mut c);
    swaks_send_ok(&relay);
}

#[test]
fn rcpt_before_mail_data_before_rcpt_and_null_rcpt() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    expect(&c.cmd("RCPT TO:<a@example.org>"), "503");
    still_serves(&mut c);
    expect(&c.cmd("DATA"), "503");
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250");
    expect(&c.cmd("DATA"), "503");
    expect(&c.cmd("RCPT TO:<>"), "501");
    still_serves(&mut c);
    // The transaction is still open and completes normally.
    expect(&c.cmd("RCPT TO:<a@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: info@acme.test\r\nSubject: after errors\r\n\r\nbody\r\n.\r\n");
    expect(&c.read_reply().unwrap(), "250 2.0.0 Ok: queued as ");
    sink.wait_for(1, WAIT);
    let got = all_delivered(&relay, &sink);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].rcpt_tos, vec!["a@example.org"]);
}

// ---------------------------------------------------------------- AUTH

#[test]
fn auth_plain_with_broken_base64_is_501_and_auth_works_afterwards() {
    let (_sink, relay) = setup();
    let mut c = tls(&relay);
    expect(&c.cmd("AUTH PLAIN !!!not-base64!!!"), "501 5.5.2");
    still_serves(&mut c);
    // Broken base64 as the response to an empty challenge.
    expect(&c.cmd("AUTH PLAIN"), "334");
    expect(&c.cmd("%%%%"), "501 5.5.2");
    still_serves(&mut c);
    let token = B64.encode(format!("\0{USER}\0{PASS}"));
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {token}")),
        "235 2.7.0 Authentication successful\r\n"
    );
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250");
}

#[test]
fn auth_login_with_broken_base64_is_501_and_auth_works_afterwards() {
    let (_sink, relay) = setup();
    let mut c = tls(&relay);
    expect(&c.cmd("AUTH LOGIN"), "334");
    expect(&c.cmd("not base64 at all!"), "501 5.5.2");
    still_serves(&mut c);
    expect(&c.cmd("AUTH LOGIN"), "334");
    expect(&c.cmd(&B64.encode(USER)), "334");
    expect(&c.cmd("@@@@"), "501 5.5.2");
    still_serves(&mut c);
    expect(
        &c.cmd(&format!("AUTH LOGIN {}", B64.encode("x@y") + "!")),
        "501 5.5.2",
    );
    still_serves(&mut c);
}

#[test]
fn auth_star_cancels_with_501() {
    let (_sink, relay) = setup();
    let mut c = tls(&relay);
    expect(&c.cmd("AUTH PLAIN"), "334");
    expect(&c.cmd("*"), "501");
    still_serves(&mut c);
    expect(&c.cmd("AUTH LOGIN"), "334");
    expect(&c.cmd("*"), "501");
    still_serves(&mut c);
    expect(&c.cmd("AUTH LOGIN"), "334");
    expect(&c.cmd(&B64.encode(USER)), "334");
    expect(&c.cmd("*"), "501");
    still_serves(&mut c);
    // Not logged in by any of it.
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "530");
}

#[test]
fn auth_login_succeeds() {
    let (sink, relay) = setup();
    let mut c = tls(&relay);
    let r = c.cmd("AUTH LOGIN");
    expect(&r, "334 ");
    expect(&c.cmd(&B64.encode(USER)), "334 ");
    assert_eq!(
        c.cmd(&B64.encode(PASS)),
        "235 2.7.0 Authentication successful\r\n"
    );
    let reply = transaction(
        &mut c,
        USER,
        &["a@example.org"],
        "From: info@acme.test\r\n\r\nx\r\n",
    );
    expect(&reply, "250 2.0.0 Ok: queued as ");
    // And with the user name as initial response, by swaks over STARTTLS.
    relay
        .swaks()
        .starttls()
        .arg("--auth")
        .arg("LOGIN")
        .arg("--auth-user")
        .arg(USER)
        .arg("--auth-password")
        .arg(PASS)
        .from(USER)
        .to("b@example.org")
        .run()
        .assert_code(0)
        .assert_contains("235 2.7.0 Authentication successful");
    sink.wait_for(2, WAIT);
    let got = all_delivered(&relay, &sink);
    let mut rcpts: Vec<String> = got.iter().map(|m| m.rcpt_tos.join(",")).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["a@example.org", "b@example.org"], "{got:?}");
}

#[test]
fn wrong_password_and_unknown_login_get_the_same_535() {
    let (sink, relay) = setup();
    let wrong = relay
        .swaks()
        .auth(USER, "not-the-password")
        .from(USER)
        .to("a@example.org")
        .run();
    wrong
        .assert_code(28)
        .assert_contains("535 5.7.8 Authentication credentials invalid");
    let unknown = relay
        .swaks()
        .auth("nobody@acme.test", PASS)
        .from("nobody@acme.test")
        .to("a@example.org")
        .run();
    unknown
        .assert_code(28)
        .assert_contains("535 5.7.8 Authentication credentials invalid");
    // Raw: the reply lines are identical.
    let mut c = tls(&relay);
    let a = c.cmd(&format!(
        "AUTH PLAIN {}",
        B64.encode(format!("\0{USER}\0bad"))
    ));
    let b = c.cmd(&format!(
        "AUTH PLAIN {}",
        B64.encode("\0ghost@acme.test\0bad")
    ));
    assert_eq!(a, "535 5.7.8 Authentication credentials invalid\r\n");
    assert_eq!(a, b);
    still_serves(&mut c);
    swaks_send_ok(&relay);
    sink.wait_for(1, WAIT);
    let got = all_delivered(&relay, &sink);
    assert_eq!(
        got.len(),
        1,
        "only the authenticated message is relayed: {got:?}"
    );
}

// ---------------------------------------------------------------- header checks

#[test]
fn null_sender_is_accepted_and_its_headers_still_checked() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    expect(&c.cmd("MAIL FROM:<>"), "250");
    expect(&c.cmd("RCPT TO:<a@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: boss@evil.test\r\nSubject: receipt\r\n\r\nread\r\n.\r\n");
    assert_eq!(
        c.read_reply().unwrap(),
        "550 5.7.1 <boss@evil.test>: From header address rejected: not owned by user info@acme.test\r\n"
    );
    let ok = transaction(
        &mut c,
        "",
        &["a@example.org"],
        "From: info@acme.test\r\nSubject: Read: hello\r\n\r\nread receipt\r\n",
    );
    expect(&ok, "250 2.0.0 Ok: queued as ");
    sink.wait_for(1, WAIT);
    let got = all_delivered(&relay, &sink);
    assert_eq!(got.len(), 1, "only the message with an owned From: {got:?}");
    assert!(is_null_sender(&got[0].mail_from), "{:?}", got[0].mail_from);
    assert!(got[0].text().contains("Subject: Read: hello"));
}

#[test]
fn from_and_sender_header_checks() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    let rcpt = ["a@example.org"];

    let r = transaction(
        &mut c,
        USER,
        &rcpt,
        "From: other@acme.test\r\nSubject: 1\r\n\r\nx\r\n",
    );
    assert_eq!(
        r,
        "550 5.7.1 <other@acme.test>: From header address rejected: not owned by user info@acme.test\r\n"
    );
    still_serves(&mut c);

    let r = transaction(
        &mut c,
        USER,
        &rcpt,
        "From: info@acme.test\r\nSender: boss@evil.test\r\nSubject: 2\r\n\r\nx\r\n",
    );
    assert_eq!(
        r,
        "550 5.7.1 <boss@evil.test>: Sender header address rejected: not owned by user info@acme.test\r\n"
    );
    still_serves(&mut c);

    let r = transaction(
        &mut c,
        USER,
        &rcpt,
        "Subject: 3 no from\r\nTo: a@example.org\r\n\r\nx\r\n",
    );
    assert_eq!(r, "550 5.6.0 Message has no From header\r\n");
    still_serves(&mut c);

    let r = transaction(
        &mut c,
        USER,
        &rcpt,
        "From: Info <info@acme.test>, Boss <boss@evil.test>\r\nSubject: 4\r\n\r\nx\r\n",
    );
    assert_eq!(
        r,
        "550 5.7.1 <boss@evil.test>: From header address rejected: not owned by user info@acme.test\r\n"
    );
    still_serves(&mut c);

    let r = transaction(
        &mut c,
        USER,
        &rcpt,
        "From: Info <INFO@Acme.Test>\r\nReply-To: boss@evil.test\r\nSubject: 5 reply-to\r\n\r\nx\r\n",
    );
    expect(&r, "250 2.0.0 Ok: queued as ");
    still_serves(&mut c);

    let got = sink.wait_for(1, WAIT);
    // A wrongly accepted message would be queued too: wait for the queue to
    // drain before counting what arrived.
    wait_until("an empty queue", || relay.queue_list().is_empty());
    let got_all = sink.messages();
    assert_eq!(
        got_all.len(),
        1,
        "only the Reply-To message is relayed: {got_all:?}"
    );
    assert!(got[0].text().contains("Subject: 5 reply-to"));
}

// ---------------------------------------------------------------- limits

#[test]
fn overlong_command_line_is_500_and_the_connection_continues() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    let long = format!("NOOP {}", "x".repeat(10_000));
    expect(&c.cmd(&long), "500");
    still_serves(&mut c);
    let long_mail = format!("MAIL FROM:<{}@acme.test>", "a".repeat(10_000));
    expect(&c.cmd(&long_mail), "500");
    let r = transaction(
        &mut c,
        USER,
        &["a@example.org"],
        "From: info@acme.test\r\n\r\nx\r\n",
    );
    expect(&r, "250 2.0.0 Ok: queued as ");
    assert_eq!(sink.wait_for(1, WAIT)[0].rcpt_tos, vec!["a@example.org"]);
}

#[test]
fn message_over_the_size_limit_is_552_declared_or_sent() {
    let (sink, relay) = setup_with(|c| {
        c.set("server", "max_message_size", "10000");
    });
    let mut c = login(&relay);
    let r = c.cmd("MAIL FROM:<info@acme.test> SIZE=999999");
    expect(&r, "552 5.3.4");
    still_serves(&mut c);

    // Declared small (or not at all), but actually too big.
    expect(&c.cmd("MAIL FROM:<info@acme.test> SIZE=500"), "250");
    expect(&c.cmd("RCPT TO:<a@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    let mut big = String::from("From: info@acme.test\r\nSubject: big\r\n\r\n");
    while big.len() < 30_000 {
        big.push_str(&"y".repeat(70));
        big.push_str("\r\n");
    }
    c.send(big.as_bytes());
    c.send(b".\r\n");
    expect(&c.read_reply().unwrap(), "552 5.3.4");
    still_serves(&mut c);

    // A message under the limit still goes through, on the same connection.
    let r = transaction(
        &mut c,
        USER,
        &["small@example.org"],
        "From: info@acme.test\r\n\r\nsmall\r\n",
    );
    expect(&r, "250 2.0.0 Ok: queued as ");
    sink.wait_for(1, WAIT);
    wait_until("an empty queue", || relay.queue_list().is_empty());
    let got = sink.messages();
    assert_eq!(got.len(), 1, "the oversized message must not be relayed");
    assert_eq!(got[0].rcpt_tos, vec!["small@example.org"]);

    // swaks too (its own envelope, the data over the limit).
    let body = format!(
        "From: {USER}\r\nSubject: swaks big\r\n\r\n{}\r\n",
        "z".repeat(20_000)
    );
    relay
        .swaks()
        .auth(USER, PASS)
        .from(USER)
        .to("a@example.org")
        .data(&body)
        .run()
        .assert_contains("552 5.3.4");
    swaks_send_ok(&relay);
    sink.wait_for(2, WAIT);
    let got = all_delivered(&relay, &sink);
    assert_eq!(got.len(), 2, "no oversized message is relayed: {got:?}");
    assert!(
        got.iter().all(|m| !m.text().contains("swaks big")),
        "the oversized swaks message was relayed"
    );
}

#[test]
fn too_many_recipients_is_452_on_the_fourth() {
    let (sink, relay) = setup_with(|c| {
        c.set("server", "max_recipients", "3");
    });
    let mut c = login(&relay);
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250");
    for i in 1..=3 {
        expect(&c.cmd(&format!("RCPT TO:<r{i}@example.org>")), "250");
    }
    expect(&c.cmd("RCPT TO:<r4@example.org>"), "452 4.5.3");
    expect(&c.cmd("RCPT TO:<r5@example.org>"), "452 4.5.3");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: info@acme.test\r\nSubject: three\r\n\r\nx\r\n.\r\n");
    expect(&c.read_reply().unwrap(), "250 2.0.0 Ok: queued as ");
    let got = sink.wait_for(1, WAIT);
    let mut rcpts = got[0].rcpt_tos.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec!["r1@example.org", "r2@example.org", "r3@example.org"]
    );
}

#[test]
fn disconnect_in_the_middle_of_data_queues_nothing() {
    let (sink, relay) = setup();
    {
        let mut c = login(&relay);
        expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250");
        expect(&c.cmd("RCPT TO:<lost@example.org>"), "250");
        expect(&c.cmd("DATA"), "354");
        c.send(b"From: info@acme.test\r\nSubject: cut\r\n\r\nhalf a mes");
        // Dropped here: the connection closes in the middle of DATA.
    }
    // The only SMTP session so far has ended (a TLS connection cut without
    // close_notify may be logged as an error rather than message_aborted).
    wait_until("the relay to notice the disconnect", || {
        relay.log().contains("session_end")
    });
    assert!(relay.queue_list().is_empty(), "nothing queued");
    // Still serving; the one message relayed is the new one.
    swaks_send_ok(&relay);
    sink.wait_for(1, WAIT);
    wait_until("an empty queue", || relay.queue_list().is_empty());
    let got = sink.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].rcpt_tos, vec!["someone@example.org"]);
}

#[test]
fn vrfy_help_rset_noop_unknown_and_quit() {
    let (_sink, relay) = setup();
    let mut c = login(&relay);
    expect(&c.cmd("VRFY info@acme.test"), "252");
    expect(&c.cmd("HELP"), "214");
    expect(&c.cmd("XYZZY plugh"), "500 5.5.1");
    expect(&c.cmd("RSET"), "250");
    expect(&c.cmd("NOOP"), "250");
    // RSET ends a transaction: RCPT needs a new MAIL.
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250");
    expect(&c.cmd("RSET"), "250");
    expect(&c.cmd("RCPT TO:<a@example.org>"), "503");
    expect(&c.cmd("QUIT"), "221");
    c.assert_closed("QUIT closes the connection");
    // Also before any login.
    let mut c = plain(&relay);
    expect(&c.cmd("VRFY postmaster"), "252");
    expect(&c.cmd("HELP"), "214");
    expect(&c.cmd("FOO"), "500 5.5.1");
    expect(&c.cmd("RSET"), "250");
    expect(&c.cmd("QUIT"), "221");
    swaks_send_ok(&relay);
}

// ---------------------------------------------------------------- added headers

/// The header names of the block the relay put before `original`.
fn prefix_header_names(data: &[u8], original: &[u8]) -> Vec<String> {
    assert!(
        data.ends_with(original),
        "the message is not byte-exact after the added headers:\n{}",
        String::from_utf8_lossy(data)
    );
    let prefix = String::from_utf8_lossy(&data[..data.len() - original.len()]).into_owned();
    assert!(prefix.ends_with("\r\n"), "{prefix:?}");
    prefix
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with([' ', '\t']))
        .map(|l| l.split(':').next().unwrap_or("").to_ascii_lowercase())
        .collect()
}

fn count_headers(data: &[u8], name: &str) -> usize {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .count()
}

#[test]
fn received_date_and_message_id_are_added_when_missing() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    // On the wire: dot-stuffed lines; as stored: unstuffed.
    let wire = "From: info@acme.test\r\nTo: a@example.org\r\nSubject: no date\r\n\r\n\
                line one\r\n..\r\n...two dots\r\n.x\r\n\r\n  \tspaces\r\nlast\r\n";
    let stored = "From: info@acme.test\r\nTo: a@example.org\r\nSubject: no date\r\n\r\n\
                  line one\r\n.\r\n..two dots\r\nx\r\n\r\n  \tspaces\r\nlast\r\n";
    let reply = transaction(&mut c, USER, &["a@example.org"], wire);
    expect(&reply, "250 2.0.0 Ok: queued as ");
    let id = reply.trim_end().rsplit(' ').next().unwrap().to_string();
    let m = &sink.wait_for(1, WAIT)[0];
    let mut names = prefix_header_names(&m.data, stored.as_bytes());
    names.sort();
    assert_eq!(names, vec!["date", "message-id", "received"]);
    let received = m.header("Received").expect("Received");
    assert!(received.contains("ESMTPSA"), "{received}");
    assert!(received.contains(&id), "queue id {id} in {received}");
    assert!(m.text().starts_with("Received:"), "Received is prepended");
    assert_eq!(count_headers(&m.data, "Date"), 1);
    assert_eq!(count_headers(&m.data, "Message-ID"), 1);
    let mid = m.header("Message-ID").unwrap();
    assert!(
        mid.starts_with('<') && mid.ends_with('>') && mid.contains('@'),
        "{mid}"
    );
}

#[test]
fn date_and_message_id_are_not_duplicated_when_present() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    let msg = "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <mine.1@acme.test>\r\n\
               From: info@acme.test\r\nSubject: dated\r\n\r\nbody\r\n\r\n";
    let reply = transaction(&mut c, USER, &["a@example.org"], msg);
    expect(&reply, "250 2.0.0 Ok: queued as ");
    let m = &sink.wait_for(1, WAIT)[0];
    assert_eq!(
        prefix_header_names(&m.data, msg.as_bytes()),
        vec!["received"]
    );
    assert_eq!(count_headers(&m.data, "Date"), 1);
    assert_eq!(count_headers(&m.data, "Message-ID"), 1);
    assert_eq!(m.header("Message-ID").unwrap(), "<mine.1@acme.test>");
}

#[test]
fn a_lone_dot_line_sent_as_two_dots_arrives_as_one_dot() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250");
    expect(&c.cmd("RCPT TO:<a@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: info@acme.test\r\nMessage-ID: <d@acme.test>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n");
    c.send(b"..\r\n");
    c.send(b"after the dot\r\n");
    c.send(b".\r\n");
    expect(&c.read_reply().unwrap(), "250 2.0.0 Ok: queued as ");
    let m = &sink.wait_for(1, WAIT)[0];
    assert!(
        m.text().ends_with("\r\n\r\n.\r\nafter the dot\r\n"),
        "{:?}",
        m.text()
    );
}

// ---------------------------------------------------------------- STARTTLS

#[test]
fn starttls_resets_the_session() {
    let (sink, relay) = setup();
    let mut c = plain(&relay);
    c.starttls();
    // Nothing of the plaintext session survives the handshake: not logged
    // in (530), and the earlier EHLO no longer counts (AUTH needs a new one).
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "530");
    expect(&c.cmd("AUTH PLAIN AGluZm9AYWNtZS50ZXN0AHNlY3JldA=="), "503");
    still_serves(&mut c);
    expect(&c.cmd("EHLO client.test"), "250");
    let token = B64.encode(format!("\0{USER}\0{PASS}"));
    expect(&c.cmd(&format!("AUTH PLAIN {token}")), "235");
    let r = transaction(
        &mut c,
        USER,
        &["a@example.org"],
        "From: info@acme.test\r\n\r\nx\r\n",
    );
    expect(&r, "250 2.0.0 Ok: queued as ");
    sink.wait_for(1, WAIT);
}

#[test]
fn plaintext_pipelined_behind_starttls_is_discarded() {
    let (_sink, relay) = setup();
    let mut c = plain(&relay);
    c.send(b"STARTTLS\r\nRSET\r\nNOOP\r\n");
    expect(&c.read_reply().expect("STARTTLS reply"), "220");
    c.upgrade();
    // The first reply inside TLS must answer our EHLO, not the injected RSET.
    let first = c.cmd("EHLO client.test");
    assert!(
        first.starts_with("250-") && first.contains("greets") && first.contains("AUTH"),
        "the first reply inside TLS is not the EHLO's: {first:?}"
    );
    still_serves(&mut c);
    let token = B64.encode(format!("\0{USER}\0{PASS}"));
    expect(&c.cmd(&format!("AUTH PLAIN {token}")), "235");
    // The next reply is for our MAIL (nothing else queued up).
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250 2.1.0");
}

#[test]
fn injected_mail_behind_starttls_is_not_executed() {
    let (sink, relay) = setup();
    let mut c = plain(&relay);
    c.send(b"STARTTLS\r\nMAIL FROM:<info@acme.test>\r\n");
    expect(&c.read_reply().unwrap(), "220");
    c.upgrade();
    expect(&c.cmd("EHLO client.test"), "250-");
    let token = B64.encode(format!("\0{USER}\0{PASS}"));
    expect(&c.cmd(&format!("AUTH PLAIN {token}")), "235");
    // Had the injected MAIL run, a new one would be "nested".
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250");
    expect(&c.cmd("RCPT TO:<a@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: info@acme.test\r\n\r\nx\r\n.\r\n");
    expect(&c.read_reply().unwrap(), "250 2.0.0");
    sink.wait_for(1, WAIT);
}

// ---------------------------------------------------------------- start-up errors

/// Runs `domauth serve --config <file with text>` in a fresh directory;
/// kills it (and fails) when it does not exit by itself.
fn serve_with(text: &str, extra: &[(&str, &[u8])]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    for (name, content) in extra {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    run_bounded(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(dir.path()),
    )
}

fn run_bounded(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run domauth");
    let deadline = Instant::now() + WAIT;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "domauth did not exit on a bad configuration:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A complete, valid test configuration with `key = value` set in `section`.
fn config_with(section: &str, key: &str, value: &str) -> String {
    let mut c = RelayConfig::new(common::free_port());
    c.set(section, key, value);
    c.render()
}

#[track_caller]
fn assert_one_line_error(out: &Output, must_contain: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exit status {} for a bad config; stderr: {stderr}",
        out.status
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr, got:\n{stderr}");
    for s in must_contain {
        assert!(lines[0].contains(s), "{s:?} not named in {:?}", lines[0]);
    }
}

#[test]
fn bad_config_values_stop_startup_with_one_line_naming_the_key() {
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            config_with("server", "no_such_key", "1"),
            vec!["no_such_key"],
        ),
        (
            config_with("bogus_section", "x", "1"),
            vec!["bogus_section"],
        ),
        (
            config_with("queue", "retry_initial", "\"5 parsecs\""),
            vec!["queue.retry_initial"],
        ),
        (
            config_with("limits", "idle_timeout", "\"soon\""),
            vec!["limits.idle_timeout"],
        ),
        (
            config_with("upstream", "port", "70000"),
            vec!["upstream.port"],
        ),
        (config_with("upstream", "port", "-1"), vec!["upstream.port"]),
        (
            config_with("server", "submission", "[\"127.0.0.1:99999\"]"),
            vec!["server.submission"],
        ),
        (
            config_with("upstream", "tls", "\"maybe\""),
            vec!["upstream.tls"],
        ),
        (
            config_with("server", "max_recipients", "\"many\""),
            vec!["server.max_recipients"],
        ),
    ];
    for (text, names) in cases {
        let out = serve_with(&text, &[]);
        assert_one_line_error(&out, &names);
    }
}

#[test]
fn a_file_that_is_not_toml_stops_startup_with_one_line() {
    for text in [
        "this is not toml ][\n",
        "[server\nhostname = \"x\"\n",
        "\u{0}\u{1}binary",
    ] {
        let out = serve_with(text, &[]);
        assert_one_line_error(&out, &["config.toml"]);
    }
    // A config file that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let out = run_bounded(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(dir.path().join("missing.toml"))
            .current_dir(dir.path()),
    );
    assert_one_line_error(&out, &["missing.toml"]);
}

fn tls_config(cert: &str, key: &str, self_signed: bool) -> String {
    let mut c = RelayConfig::new(common::free_port());
    c.set("tls", "cert", &format!("\"{cert}\""))
        .set("tls", "key", &format!("\"{key}\""))
        .set(
            "tls",
            "self_signed",
            if self_signed { "true" } else { "false" },
        );
    c.render()
}

#[track_caller]
fn assert_clear_startup_error(out: &Output, must_contain: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    for s in must_contain {
        assert!(
            last.contains(s),
            "{s:?} not in the error {last:?} (stderr: {stderr})"
        );
    }
}

#[test]
fn missing_certificate_without_self_signed_is_a_clear_error() {
    let out = serve_with(&tls_config("certs/none.crt", "certs/none.key", false), &[]);
    assert_clear_startup_error(&out, &["tls.cert", "certs/none.crt"]);
}

#[test]
fn corrupt_certificate_is_a_clear_error() {
    let garbage = b"-----BEGIN CERTIFICATE-----\nnot base64 !!!\n-----END CERTIFICATE-----\n";
    for self_signed in [false, true] {
        let out = serve_with(
            &tls_config("certs/bad.crt", "certs/bad.key", self_signed),
            &[("certs/bad.crt", garbage), ("certs/bad.key", b"nothing\n")],
        );
        assert_clear_startup_error(&out, &["tls.cert", "certs/bad.crt"]);
    }
    // A file with no certificate in it at all.
    let out = serve_with(
        &tls_config("certs/empty.crt", "certs/empty.key", false),
        &[
            ("certs/empty.crt", b"hello\n"),
            ("certs/empty.key", b"hello\n"),
        ],
    );
    assert_clear_startup_error(&out, &["tls.cert", "certs/empty.crt"]);
}

#[test]
fn a_good_certificate_with_a_corrupt_key_is_a_clear_error() {
    // Let a relay make a valid pair, then pair its certificate with junk.
    let (_sink, relay) = setup();
    let crt = std::fs::read(cert(&relay)).unwrap();
    let out = serve_with(
        &tls_config("certs/good.crt", "certs/bad.key", false),
        &[
            ("certs/good.crt", &crt),
            (
                "certs/bad.key",
                b"-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n",
            ),
        ],
    );
    assert_clear_startup_error(&out, &["tls.key"]);
}

// ---------------------------------------------------------------- CLI

fn cli_without_server(dir: &Path, args: &[&str]) -> Output {
    let config = dir.join("config.toml");
    std::fs::write(&config, RelayConfig::new(common::free_port()).render()).unwrap();
    run_bounded(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .current_dir(dir),
    )
}

#[test]
fn cli_without_a_running_server_exits_1_naming_the_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["queue", "list"][..], &["hosting", "list", "--json"][..]] {
        let out = cli_without_server(dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("admin.sock"),
            "{args:?}: the socket is not named: {stderr}"
        );
    }
}

#[test]
fn cli_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["domain"][..],
        &["queue", "show"][..],
        &["frobnicate"][..],
        &["hosting", "add", "acme"][..],
    ] {
        let out = cli_without_server(dir.path(), args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Usage errors are found before the config is read.
    let out = run_bounded(Command::new(BIN).args(["--config", "/nonexistent.toml", "domain"]));
    assert_eq!(out.status.code(), Some(2));
}

// ---------------------------------------------------------------- more bad input

#[test]
fn more_malformed_commands_get_clear_replies_and_the_session_goes_on() {
    let (sink, relay) = setup();
    let mut c = tls(&relay);
    // Valid base64, but not "authzid NUL authcid NUL password".
    expect(
        &c.cmd(&format!("AUTH PLAIN {}", B64.encode("no-nuls-here"))),
        "501 5.5.2",
    );
    expect(&c.cmd("AUTH CRAM-MD5"), "504");
    expect(&c.cmd("AUTH"), "501");
    still_serves(&mut c);
    let token = B64.encode(format!("\0{USER}\0{PASS}"));
    expect(&c.cmd(&format!("AUTH PLAIN {token}")), "235");
    expect(&c.cmd(&format!("AUTH PLAIN {token}")), "503");
    expect(&c.cmd("MAIL FROM:info@acme.test"), "501");
    expect(&c.cmd("MAIL FROM:<info@acme.test> SIZE=lots"), "501");
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "250");
    expect(&c.cmd("MAIL FROM:<info@acme.test>"), "503");
    expect(&c.cmd("RCPT TO:<not an address>"), "501");
    expect(&c.cmd("RCPT TO:<a@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(b"From: info@acme.test\r\n\r\nstill fine\r\n.\r\n");
    expect(&c.read_reply().unwrap(), "250 2.0.0 Ok: queued as ");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].rcpt_tos, vec!["a@example.org"]);
}
