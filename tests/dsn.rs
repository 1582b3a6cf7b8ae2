//! DSN (RFC 3461, SPEC §9) end to end: the real binary, a real upstream
//! (aiosmtpd, with and without the DSN extension) and a byte-level client
//! (swaks has no DSN options). The parameters reach a smarthost that offers
//! DSN; with one that does not, the relay honours them itself: NOTIFY=NEVER
//! means no bounce, NOTIFY=SUCCESS a "relayed" DSN, RET=HDRS a bounce with
//! the headers only (RET=FULL: the whole message).

mod common;

use std::{path::PathBuf, time::Duration};

use common::{Relay, Sink, SinkMessage, raw::RawClient};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "info@acme.test";
const PASS: &str = "secret";

fn setup(sink: &Sink) -> Relay {
    let relay = Relay::start(sink.port);
    relay.add_mailbox("acme", USER, PASS);
    relay
}

fn login(relay: &Relay) -> RawClient {
    let cert: PathBuf = relay.dir.path().join("certs/test.crt");
    RawClient::login(relay.submission, &cert, USER, PASS)
}

#[track_caller]
fn expect(c: &mut RawClient, line: &str, code: &str) -> String {
    let reply = c.cmd(line);
    assert!(
        reply.starts_with(code),
        "{line:?}: expected {code}, got {reply:?}"
    );
    reply
}

/// One transaction: MAIL with `mail`, one RCPT per entry of `rcpts`, a
/// message with `subject` and `body`; returns the queue id.
fn submit(c: &mut RawClient, mail: &str, rcpts: &[&str], subject: &str, body: &str) -> String {
    expect(c, mail, "250");
    for r in rcpts {
        expect(c, r, "250");
    }
    expect(c, "DATA", "354");
    let message = format!(
        "From: <{USER}>\r\nTo: <someone@dest.test>\r\nSubject: {subject}\r\n\r\n{body}\r\n.\r\n"
    );
    c.send(message.as_bytes());
    let reply = c.read_reply().expect("reply to the message");
    assert!(reply.starts_with("250"), "message refused: {reply}");
    reply
        .trim()
        .rsplit(' ')
        .next()
        .expect("queue id")
        .to_string()
}

/// The RCPT parameters the sink recorded: per message, one list per recipient.
fn rcpt_options(sink: &Sink) -> Vec<Vec<Vec<String>>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(&sink.dir)
        .expect("sink dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            let v: Value = serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json");
            serde_json::from_value(v["rcpt_options"].clone()).expect("rcpt_options")
        })
        .collect()
}

fn dsns_to(messages: &[SinkMessage], to: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|m| (m.mail_from.is_empty() || m.mail_from == "<>") && m.rcpt_tos == [to])
        .map(SinkMessage::text)
        .collect()
}

#[test]
fn ehlo_lists_dsn_and_malformed_parameters_get_501() {
    let sink = Sink::start();
    let relay = setup(&sink);
    let mut c = login(&relay);
    let ehlo = expect(&mut c, "EHLO client.test", "250");
    assert!(
        ehlo.lines()
            .any(|l| l.trim_end() == "250-DSN" || l.trim_end() == "250 DSN"),
        "{ehlo}"
    );
    for (line, want) in [
        ("MAIL FROM:<info@acme.test> RET=HDRS RET=FULL", "501 5.5.4"),
        ("MAIL FROM:<info@acme.test> RET=MAYBE", "501 5.5.4"),
        (
            "MAIL FROM:<info@acme.test> ENVID=a+0D+0AInjected:+20x",
            "501 5.5.4",
        ),
    ] {
        expect(&mut c, line, want);
    }
    expect(
        &mut c,
        "MAIL FROM:<info@acme.test> RET=HDRS ENVID=ok",
        "250",
    );
    for (line, want) in [
        ("RCPT TO:<a@dest.test> NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        ("RCPT TO:<a@dest.test> NOTIFY=SOMETIMES", "501 5.5.4"),
        ("RCPT TO:<a@dest.test> ORCPT=rfc822;a+0Ab", "501 5.5.4"),
        ("RCPT TO:<a@dest.test> ORCPT=bogus", "501 5.5.4"),
    ] {
        expect(&mut c, line, want);
    }
    // The session still works after the refusals.
    expect(&mut c, "RCPT TO:<a@dest.test> NOTIFY=FAILURE", "250");
    expect(&mut c, "RSET", "250");
}

#[test]
fn parameters_reach_a_smarthost_that_offers_dsn() {
    let sink = Sink::start_dsn();
    let relay = setup(&sink);
    let mut c = login(&relay);
    submit(
        &mut c,
        "MAIL FROM:<info@acme.test> RET=HDRS ENVID=QQ+2B314",
        &[
            "RCPT TO:<a@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bx@Dest.test",
            "RCPT TO:<b@dest.test>",
            // Refused by the smarthost at RCPT: the relay would bounce it, but
            // the sender asked for no notice.
            "RCPT TO:<reject-n@dest.test> NOTIFY=NEVER",
        ],
        "passed on",
        "hello",
    );
    relay.wait_queue_empty(WAIT);
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got.len(), 1, "the message only: no relayed DSN, no bounce");
    let m = &got[0];
    assert_eq!(m.rcpt_tos, ["a@dest.test", "b@dest.test"]);
    assert!(
        m.mail_options.iter().any(|o| o == "RET=HDRS")
            && m.mail_options.iter().any(|o| o == "ENVID=QQ+2B314"),
        "{:?}",
        m.mail_options
    );
    let options = rcpt_options(&sink);
    assert_eq!(
        options[0],
        vec![
            vec![
                "NOTIFY=SUCCESS,FAILURE".to_string(),
                "ORCPT=RFC822;A+2BX@DEST.TEST".to_string()
            ],
            vec![],
        ],
        "(aiosmtpd upper-cases parameters)"
    );
}

#[test]
fn without_dsn_upstream_the_relay_honours_notify() {
    let sink = Sink::start();
    let relay = setup(&sink);
    let mut c = login(&relay);
    let id = submit(
        &mut c,
        "MAIL FROM:<info@acme.test> RET=HDRS ENVID=env-7",
        &[
            "RCPT TO:<reject-never@dest.test> NOTIFY=NEVER",
            "RCPT TO:<ok@dest.test> NOTIFY=SUCCESS ORCPT=rfc822;Ok+2Btag@dest.test",
            "RCPT TO:<plain@dest.test>",
        ],
        "relayed notice",
        "the body text",
    );
    relay.wait_queue_empty(WAIT);
    let got = sink.wait_for(2, WAIT);
    assert_eq!(got.len(), 2, "the message and one relayed DSN: {got:#?}");
    let original = got
        .iter()
        .find(|m| m.mail_from == USER)
        .expect("the message");
    assert_eq!(original.rcpt_tos, ["ok@dest.test", "plain@dest.test"]);
    assert!(
        !original
            .mail_options
            .iter()
            .any(|o| o.starts_with("RET") || o.starts_with("ENVID")),
        "no DSN parameters to a smarthost without DSN: {:?}",
        original.mail_options
    );
    assert!(rcpt_options(&sink).iter().flatten().all(Vec::is_empty));

    let dsns = dsns_to(&got, USER);
    assert_eq!(dsns.len(), 1, "{got:#?}");
    let dsn = &dsns[0];
    for want in [
        "Subject: Successful Mail Delivery Report",
        "report-type=delivery-status",
        "Original-Envelope-Id: env-7",
        &format!("X-Queue-ID: {id}"),
        "Original-Recipient: rfc822; Ok+tag@dest.test",
        "Final-Recipient: rfc822; ok@dest.test",
        "Action: relayed",
        "Status: 2.0.0",
        "Subject: relayed notice",
    ] {
        assert!(dsn.contains(want), "{want:?} in\n{dsn}");
    }
    assert!(
        !dsn.contains("reject-never"),
        "NOTIFY=NEVER: not reported\n{dsn}"
    );
    assert!(
        !dsn.contains("plain@dest.test"),
        "no NOTIFY: no success notice\n{dsn}"
    );
    assert!(!dsn.contains("the body text"), "headers only\n{dsn}");
}

#[test]
fn ret_hdrs_bounces_carry_headers_only_and_ret_full_the_message() {
    let sink = Sink::start();
    let relay = setup(&sink);
    let mut c = login(&relay);
    submit(
        &mut c,
        "MAIL FROM:<info@acme.test> RET=HDRS",
        &["RCPT TO:<reject-hdrs@dest.test> NOTIFY=SUCCESS,FAILURE"],
        "headers only",
        "SECRET-BODY-HDRS",
    );
    submit(
        &mut c,
        "MAIL FROM:<info@acme.test> RET=FULL ENVID=full-1",
        &["RCPT TO:<reject-full@dest.test>"],
        "whole message",
        "RETURNED-BODY-FULL",
    );
    // NOTIFY=DELAY alone asks for no failure notice either (RFC 3461 §4.1).
    submit(
        &mut c,
        "MAIL FROM:<info@acme.test>",
        &["RCPT TO:<reject-delay@dest.test> NOTIFY=DELAY"],
        "no notice",
        "x",
    );
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    let dsns = dsns_to(&got, USER);
    assert_eq!(
        dsns.len(),
        2,
        "two bounces, none for NOTIFY=DELAY: {got:#?}"
    );
    let hdrs = dsns
        .iter()
        .find(|d| d.contains("reject-hdrs@dest.test"))
        .expect("the RET=HDRS bounce");
    for want in [
        "Subject: Undelivered Mail Returned to Sender",
        "Action: failed",
        "Status: 5.1.1",
        "Content-Type: text/rfc822-headers",
        "Subject: headers only",
    ] {
        assert!(hdrs.contains(want), "{want:?} in\n{hdrs}");
    }
    assert!(
        !hdrs.contains("SECRET-BODY-HDRS"),
        "RET=HDRS: no body\n{hdrs}"
    );
    let full = dsns
        .iter()
        .find(|d| d.contains("reject-full@dest.test"))
        .expect("the RET=FULL bounce");
    for want in [
        "Content-Type: message/rfc822",
        "Original-Envelope-Id: full-1",
        "Subject: whole message",
        "RETURNED-BODY-FULL",
    ] {
        assert!(full.contains(want), "{want:?} in\n{full}");
    }
    assert!(!dsns.iter().any(|d| d.contains("reject-delay")));
}

#[test]
fn queue_show_keeps_the_dsn_parameters() {
    let sink = Sink::start();
    let relay = setup(&sink);
    let mut c = login(&relay);
    let id = submit(
        &mut c,
        "MAIL FROM:<info@acme.test> RET=FULL ENVID=keep+2Bme",
        &["RCPT TO:<defer-1@dest.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;D@dest.test"],
        "deferred",
        "x",
    );
    let out = relay.cli_ok(&["queue", "show", &id, "--json"], "");
    let v: Value = serde_json::from_str(&out).expect("queue show --json");
    assert_eq!(v["dsn"]["ret"], "FULL", "{v:#}");
    assert_eq!(v["dsn"]["envid"], "keep+me", "{v:#}");
    assert_eq!(v["dsn"]["recipients"][0]["address"], "defer-1@dest.test");
    assert_eq!(v["dsn"]["recipients"][0]["notify"], "FAILURE,DELAY");
    assert_eq!(v["dsn"]["recipients"][0]["orcpt"], "D@dest.test");
    // Kept across a restart (the envelope is on disk).
    let mut relay = relay;
    relay.restart();
    let out = relay.cli_ok(&["queue", "show", &id, "--json"], "");
    let v: Value = serde_json::from_str(&out).expect("queue show --json");
    assert_eq!(v["dsn"]["envid"], "keep+me", "{v:#}");
    relay.cli_ok(&["queue", "delete", &id], "");
}
