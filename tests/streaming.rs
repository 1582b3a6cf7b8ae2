//! End to end: what the client declared and sent reaches the upstream as it was —
//! large messages streamed through the queue byte for byte, `BODY=8BITMIME` declared
//! again — and what may not be relayed (a NUL byte, the `<CRLF>NUL.<CRLF>` smuggling
//! probe) is refused while the session goes on serving.

mod common;

use std::{path::PathBuf, time::Duration};

use common::{Relay, RelayConfig, Sink, raw::RawClient};

const WAIT: Duration = Duration::from_secs(60);
const USER: &str = "info@acme.test";
const PASS: &str = "secret";

fn setup() -> (Sink, Relay) {
    let sink = Sink::start();
    let relay = Relay::start_with(RelayConfig::new(sink.port));
    relay.add_mailbox("acme", USER, PASS);
    (sink, relay)
}

fn cert(relay: &Relay) -> PathBuf {
    relay.dir.path().join("certs/test.crt")
}

fn login(relay: &Relay) -> RawClient {
    RawClient::login(relay.submission, &cert(relay), USER, PASS)
}

fn expect(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected {prefix:?}, got {reply:?}"
    );
}

fn send_message(c: &mut RawClient, mail: &str, body: &[u8]) -> String {
    expect(&c.cmd(mail), "250");
    expect(&c.cmd("RCPT TO:<someone@example.org>"), "250");
    expect(&c.cmd("DATA"), "354");
    c.send(body);
    c.send(b".\r\n");
    c.read_reply().expect("reply to the end of data")
}

/// A message body of `size` bytes of CRLF lines, with lines that start with a dot
/// (they must be stuffed on the way out and arrive as they were).
fn big_body(marker: &str, size: usize) -> Vec<u8> {
    let mut body = format!("From: {USER}\r\nTo: someone@example.org\r\nSubject: {marker}\r\n\r\n")
        .into_bytes();
    let mut n = 0u64;
    while body.len() < size {
        n += 1;
        if n.is_multiple_of(100) {
            body.extend_from_slice(format!(".dot line {n}\r\n").as_bytes());
        } else {
            body.extend_from_slice(
                format!("line {n:010} of the big message, padding padding padding\r\n").as_bytes(),
            );
        }
    }
    body
}

/// The wire form of `body` after DATA: dots at line starts doubled.
fn stuffed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 50);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

#[test]
fn a_20_mb_message_arrives_byte_for_byte() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    let body = big_body("big-20mb", 20 * 1024 * 1024);
    let reply = send_message(&mut c, &format!("MAIL FROM:<{USER}>"), &stuffed(&body));
    expect(&reply, "250 2.0.0 Ok: queued as ");
    sink.wait_for(1, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(got.len(), 1, "exactly one copy");
    let data = &got[0].data;
    assert!(
        data.ends_with(&body),
        "the message arrives as sent, after the relay's headers ({} bytes received, {} sent)",
        data.len(),
        body.len()
    );
    let prefix = &data[..data.len() - body.len()];
    assert!(prefix.starts_with(b"Received: "), "trace header first");
    // The relay kept no copy of a delivered message.
    assert_eq!(
        std::fs::read_dir(relay.dir.path().join("data/queue"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "queue directory empty after delivery"
    );
}

#[test]
fn nul_bytes_are_refused_and_the_session_goes_on() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    // SEC Consult's `<CRLF>NUL.<CRLF>` probe: a message ends there for some
    // upstreams, so what follows would be a smuggled second message.
    let smuggle = format!(
        "From: {USER}\r\nSubject: nul-probe\r\n\r\nhello\r\n\0.\r\nMAIL FROM:<{USER}>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nFrom: {USER}\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
    );
    let reply = send_message(&mut c, &format!("MAIL FROM:<{USER}>"), smuggle.as_bytes());
    expect(&reply, "550 5.6.0");
    // A NUL inside a line.
    let inline = format!("From: {USER}\r\nSubject: nul-inline\r\n\r\nab\0cd\r\n");
    let reply = send_message(&mut c, &format!("MAIL FROM:<{USER}>"), inline.as_bytes());
    expect(&reply, "550 5.6.0");
    // The same session still relays a clean message.
    let clean = format!("From: {USER}\r\nSubject: clean-after-nul\r\n\r\nfine\r\n");
    let reply = send_message(&mut c, &format!("MAIL FROM:<{USER}>"), clean.as_bytes());
    expect(&reply, "250 2.0.0 Ok: queued as ");
    sink.wait_for(1, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(got.len(), 1, "only the clean message was relayed: {got:?}");
    assert!(got[0].text().contains("Subject: clean-after-nul"));
    assert!(
        got.iter().all(|m| !m.data.contains(&0)),
        "no NUL reached the upstream"
    );
}

#[test]
fn eight_bit_mime_is_declared_upstream() {
    let (sink, relay) = setup();
    let mut c = login(&relay);
    let body = format!(
        "From: {USER}\r\nSubject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln\r\n"
    );
    let reply = send_message(
        &mut c,
        &format!("MAIL FROM:<{USER}> BODY=8BITMIME"),
        body.as_bytes(),
    );
    expect(&reply, "250 2.0.0 Ok: queued as ");
    let plain = format!("From: {USER}\r\nSubject: 7bit\r\n\r\nplain ascii\r\n");
    let reply = send_message(&mut c, &format!("MAIL FROM:<{USER}>"), plain.as_bytes());
    expect(&reply, "250 2.0.0 Ok: queued as ");
    sink.wait_for(2, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(got.len(), 2);
    let eight = got
        .iter()
        .find(|m| m.text().contains("Subject: 8bit"))
        .expect("the 8bit message");
    assert!(
        eight
            .mail_options
            .iter()
            .any(|o| o.eq_ignore_ascii_case("BODY=8BITMIME")),
        "BODY=8BITMIME travels on: {:?}",
        eight.mail_options
    );
    assert!(eight.data.ends_with("Grüße aus Köln\r\n".as_bytes()));
    let seven = got
        .iter()
        .find(|m| m.text().contains("Subject: 7bit"))
        .expect("the 7bit message");
    assert!(
        !seven
            .mail_options
            .iter()
            .any(|o| o.to_ascii_uppercase().starts_with("BODY=")),
        "nothing declared for a message the client did not declare: {:?}",
        seven.mail_options
    );
}
