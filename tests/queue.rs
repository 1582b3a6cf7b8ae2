//! The queue and delivery end to end (SPEC §5): messages wait while the
//! upstream is down and survive a restart (graceful and kill -9), recipient
//! outcomes are tracked one by one, 5xx and expiry produce an RFC 3464
//! bounce sent with the null reverse-path, a null sender gets no bounce, and
//! `domauth queue list|show|retry|delete` manage it all.

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::{Relay, RelayConfig, Sink, SinkMessage, raw::RawClient};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "info@acme.test";
const PASS: &str = "secret";

// ---------------------------------------------------------------- helpers

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_relay(config: RelayConfig) -> Relay {
    let relay = Relay::start_with(config);
    relay.add_mailbox("acme", USER, PASS);
    relay
}

fn queue_show(relay: &Relay, id: &str) -> Value {
    let out = relay.cli_ok(&["queue", "show", id, "--json"], "");
    serde_json::from_str(&out).expect("queue show --json is JSON")
}

/// Waits until the queue holds exactly the message `id` (anything else it
/// produced, such as a bounce, has left it: delivered). Counting what the
/// upstream got is meaningful only after this.
fn wait_queue_only(relay: &Relay, id: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = relay.queue_list();
        let ids: Vec<&str> = last.iter().filter_map(|m| m["id"].as_str()).collect();
        if ids == [id] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the queue never held only {id}: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one message with a known Message-ID to `rcpts`; returns the queue id.
fn send(relay: &Relay, rcpts: &[&str], message_id: &str) -> String {
    let r = relay
        .swaks()
        .auth(USER, PASS)
        .from(USER)
        .to(&rcpts.join(","))
        .header(&format!("Message-Id: <{message_id}>"))
        .header(&format!("Subject: test {message_id}"))
        .run();
    r.assert_code(0).assert_contains("250 2.0.0 Ok: queued as ");
    r.queue_id().expect("queue id")
}

/// aiosmtpd records the null reverse-path as "<>".
fn is_null_sender(mail_from: &str) -> bool {
    mail_from.is_empty() || mail_from == "<>"
}

fn bounces(got: &[SinkMessage]) -> Vec<&SinkMessage> {
    got.iter()
        .filter(|m| is_null_sender(&m.mail_from))
        .collect()
}

fn delivered_to<'a>(got: &'a [SinkMessage], rcpt: &str) -> Vec<&'a SinkMessage> {
    got.iter()
        .filter(|m| !is_null_sender(&m.mail_from) && m.rcpt_tos.iter().any(|r| r == rcpt))
        .collect()
}

fn message_ids(got: &[SinkMessage]) -> BTreeSet<String> {
    got.iter().filter_map(|m| m.header("Message-ID")).collect()
}

/// The bounce is an RFC 3464 report about `failed`, sent to the sender
/// with the null reverse-path, carrying the original's headers.
#[track_caller]
fn assert_bounce(b: &SinkMessage, failed: &str, original_message_id: &str, status_prefix: &str) {
    assert!(
        is_null_sender(&b.mail_from),
        "bounce reverse-path: {:?}",
        b.mail_from
    );
    assert_eq!(b.rcpt_tos, vec![USER.to_string()]);
    let ct = b.header("Content-Type").expect("Content-Type");
    assert!(
        ct.contains("multipart/report") && ct.contains("report-type=delivery-status"),
        "{ct}"
    );
    let text = b.text();
    let (_, report) = text
        .split_once("Content-Type: message/delivery-status")
        .expect("a message/delivery-status part");
    assert!(
        report.contains(&format!("Final-Recipient: rfc822; {failed}")),
        "delivery-status does not name {failed}:\n{text}"
    );
    assert!(report.contains("Action: failed"), "{text}");
    assert!(
        report.contains(&format!("Status: {status_prefix}")),
        "{text}"
    );
    // The original's headers, in their own part (RFC 3464 §2: the
    // returned content follows the delivery-status part).
    let original = [
        "Content-Type: text/rfc822-headers",
        "Content-Type: message/rfc822",
    ]
    .iter()
    .find_map(|ct| report.split_once(ct).map(|(_, rest)| rest))
    .unwrap_or_else(|| panic!("no part with the original headers:\n{text}"));
    for line in [
        format!("Message-Id: <{original_message_id}>"),
        format!("From: {USER}"),
    ] {
        assert!(
            original.contains(&format!("\r\n{line}\r\n")),
            "the original header {line:?} is not included:\n{text}"
        );
    }
}

// ---------------------------------------------------------------- upstream down

/// Three messages accepted while nothing listens on the upstream port; they
/// wait in the queue with their last error; the relay goes down (graceful or
/// SIGKILL), the upstream comes up on that port, the relay restarts, and
/// every message arrives once.
fn upstream_down_then_back(graceful: bool) {
    let port = common::free_port();
    let mut relay = start_relay(RelayConfig::new(port));
    let tag = if graceful { "term" } else { "kill" };
    let mids: BTreeSet<String> = (1..=3)
        .map(|i| format!("<{tag}{i}.durable@acme.test>"))
        .collect();
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(send(
            &relay,
            &["someone@example.org"],
            &format!("{tag}{i}.durable@acme.test"),
        ));
    }
    if graceful {
        // Each waits with its last error and at least one attempt.
        wait_until("3 queued messages with an error", || {
            let list = relay.queue_list();
            list.len() == 3
                && list
                    .iter()
                    .all(|m| !m["last_error"].is_null() && m["attempts"].as_u64().unwrap_or(0) >= 1)
        });
        let list = relay.queue_list();
        let listed: BTreeSet<&str> = list.iter().filter_map(|m| m["id"].as_str()).collect();
        assert_eq!(listed, ids.iter().map(String::as_str).collect());
        for m in &list {
            assert_eq!(m["from"], USER);
            assert_eq!(m["recipients"], serde_json::json!(["someone@example.org"]));
            assert!(m["size"].as_u64().unwrap_or(0) > 0, "{m}");
            assert!(m["next_attempt"].is_string(), "{m}");
        }
        let shown = queue_show(&relay, &ids[0]);
        assert_eq!(shown["id"], ids[0].as_str());
        assert_eq!(shown["from"], USER);
        assert!(shown["last_error"].is_string(), "{shown}");
        assert!(shown["attempts"].as_u64().unwrap_or(0) >= 1, "{shown}");
        assert_eq!(relay.stop(), Some(0), "SIGTERM: exit 0");
    } else {
        // Right after the 250s: no chance to flush anything more.
        relay.kill9();
    }

    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start_at(port, &dir.path().join("messages"));
    relay.restart();
    sink.wait_for(3, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(message_ids(&got), mids, "every accepted message arrives");
    assert_eq!(got.len(), 3, "each once: {got:?}");
    for m in &got {
        assert_eq!(m.mail_from, USER);
        assert_eq!(m.rcpt_tos, vec!["someone@example.org"]);
    }
}

#[test]
fn upstream_down_messages_wait_and_go_out_after_graceful_restart() {
    upstream_down_then_back(true);
}

#[test]
fn upstream_down_messages_survive_kill9_and_go_out_after_restart() {
    upstream_down_then_back(false);
}

// ---------------------------------------------------------------- permanent failure

#[test]
fn a_recipient_refused_with_5xx_is_bounced_and_the_other_delivered_once() {
    let sink = Sink::start();
    let relay = start_relay(RelayConfig::new(sink.port));
    send(
        &relay,
        &["ok@example.org", "reject1@example.org"],
        "mixed.5xx@acme.test",
    );
    sink.wait_for(2, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();

    let ok = delivered_to(&got, "ok@example.org");
    assert_eq!(
        ok.len(),
        1,
        "ok@example.org delivered exactly once: {got:?}"
    );
    assert_eq!(ok[0].rcpt_tos, vec!["ok@example.org"]);
    assert_eq!(
        ok[0].header("Message-ID").as_deref(),
        Some("<mixed.5xx@acme.test>")
    );
    assert!(delivered_to(&got, "reject1@example.org").is_empty());

    let b = bounces(&got);
    assert_eq!(b.len(), 1, "one bounce: {got:?}");
    assert_bounce(b[0], "reject1@example.org", "mixed.5xx@acme.test", "5.1.1");
    assert!(
        !b[0]
            .text()
            .contains("Final-Recipient: rfc822; ok@example.org")
    );
    assert_eq!(got.len(), 2, "nothing else: {got:?}");
}

#[test]
fn null_sender_whose_recipient_is_refused_gets_no_bounce() {
    let sink = Sink::start();
    let relay = start_relay(RelayConfig::new(sink.port));
    let cert = relay.dir.path().join("certs/test.crt");
    let mut c = RawClient::login(relay.submission, &cert, USER, PASS);
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<reject2@example.org>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"From: info@acme.test\r\nSubject: receipt\r\nMessage-ID: <null.rx@acme.test>\r\n\r\nread\r\n.\r\n");
    let reply = c.read_reply().unwrap();
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    let id = reply.trim_end().rsplit(' ').next().unwrap().to_string();
    drop(c);
    // The attempt is refused for good and the message leaves the queue.
    relay.wait_queue_empty(WAIT);
    assert_eq!(
        relay.cli(&["queue", "show", &id], "").status.code(),
        Some(1)
    );
    // A bounce would have been queued before the original left: none was.
    // A marker proves the sink was reachable all along.
    send(&relay, &["marker@example.org"], "marker.null@acme.test");
    sink.wait_for(1, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(got.len(), 1, "only the marker arrives, no bounce: {got:?}");
    assert_eq!(got[0].rcpt_tos, vec!["marker@example.org"]);
}

#[test]
fn all_recipients_refused_gives_one_bounce_naming_each() {
    let sink = Sink::start();
    let relay = start_relay(RelayConfig::new(sink.port));
    send(
        &relay,
        &["reject3@example.org", "reject4@example.org"],
        "all.refused@acme.test",
    );
    sink.wait_for(1, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(got.len(), 1, "exactly one bounce, nothing else: {got:?}");
    assert_bounce(
        &got[0],
        "reject3@example.org",
        "all.refused@acme.test",
        "5.1.1",
    );
    assert_bounce(
        &got[0],
        "reject4@example.org",
        "all.refused@acme.test",
        "5.1.1",
    );
}

#[test]
fn a_bounce_the_upstream_refuses_is_not_bounced_again() {
    let sink = Sink::start();
    let relay = start_relay(RelayConfig::new(sink.port));
    // The sender's own address is one the upstream refuses.
    relay.add_mailbox("acme", "rejectme@acme.test", "pw");
    let r = relay
        .swaks()
        .auth("rejectme@acme.test", "pw")
        .from("rejectme@acme.test")
        .to("reject5@example.org")
        .run();
    r.assert_code(0);
    let id = r.queue_id().unwrap();
    // The original fails, its bounce fails too: both leave the queue.
    wait_until("the original to leave the queue", || {
        relay.cli(&["queue", "show", &id], "").status.code() == Some(1)
    });
    relay.wait_queue_empty(WAIT);
    send(&relay, &["marker@example.org"], "marker.double@acme.test");
    sink.wait_for(1, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(got.len(), 1, "only the marker arrives: {got:?}");
    assert_eq!(got[0].rcpt_tos, vec!["marker@example.org"]);
}

#[test]
fn a_5xx_recipient_is_bounced_while_another_is_still_deferred() {
    let sink = Sink::start();
    let mut config = RelayConfig::new(sink.port);
    config
        .set("queue", "retry_initial", "\"1h\"")
        .set("queue", "retry_max", "\"1h\"");
    let relay = start_relay(config);
    let id = send(
        &relay,
        &[
            "ok@example.org",
            "reject6@example.org",
            "defer6@example.org",
        ],
        "mixed.three@acme.test",
    );
    // ok delivered, reject6 failed for good: its bounce is due now, not
    // when defer6 finally resolves.
    sink.wait_for(2, WAIT);
    // Only the original (for defer6) is left: the bounce went out.
    wait_queue_only(&relay, &id);
    let got = sink.messages();
    assert_eq!(got.len(), 2, "one delivery and one bounce: {got:?}");
    assert_eq!(delivered_to(&got, "ok@example.org").len(), 1, "{got:?}");
    let b = bounces(&got);
    assert_eq!(b.len(), 1, "{got:?}");
    assert_bounce(
        b[0],
        "reject6@example.org",
        "mixed.three@acme.test",
        "5.1.1",
    );
    assert!(
        !b[0]
            .text()
            .contains("Final-Recipient: rfc822; defer6@example.org"),
        "the deferred recipient is in the bounce: {}",
        b[0].text()
    );
    // defer6 is still queued.
    assert!(queue_show(&relay, &id)["last_error"].is_string());
}

// ---------------------------------------------------------------- temporary failure

#[test]
fn a_deferred_recipient_is_retried_with_growing_attempts() {
    let sink = Sink::start();
    let relay = start_relay(RelayConfig::new(sink.port));
    let id = send(
        &relay,
        &["ok@example.org", "defer1@example.org"],
        "defer.grow@acme.test",
    );
    sink.wait_for(1, WAIT);
    wait_until("three attempts", || {
        queue_show(&relay, &id)["attempts"].as_u64().unwrap_or(0) >= 3
    });
    let shown = queue_show(&relay, &id);
    let err = shown["last_error"].as_str().expect("last_error set");
    assert!(err.contains("451"), "{err}");
    // Only the deferred recipient is still to do.
    let status = shown["recipient_status"]
        .as_array()
        .unwrap_or_else(|| panic!("queue show lacks recipient_status: {shown}"));
    let mut addresses: Vec<&str> = status
        .iter()
        .filter_map(|r| r["address"].as_str())
        .collect();
    addresses.sort();
    assert_eq!(
        addresses,
        ["defer1@example.org", "ok@example.org"],
        "{shown}"
    );
    for r in status {
        let pending = r["status"].to_string().to_lowercase().contains("pending");
        assert_eq!(pending, r["address"] == "defer1@example.org", "{shown}");
    }
    // A wrongly made bounce would have been queued and sent by now.
    wait_queue_only(&relay, &id);
    let got = sink.messages();
    assert_eq!(delivered_to(&got, "ok@example.org").len(), 1, "{got:?}");
    assert_eq!(
        got.len(),
        1,
        "nothing for the deferred recipient, no bounce: {got:?}"
    );

    assert!(relay.cli(&["queue", "delete", &id], "").status.success());
    assert!(relay.queue_list().is_empty());
    assert_eq!(
        relay.cli(&["queue", "show", &id], "").status.code(),
        Some(1)
    );
}

#[test]
fn queue_retry_triggers_an_attempt_and_delete_removes() {
    let sink = Sink::start();
    let mut config = RelayConfig::new(sink.port);
    // Backoff long enough that only `queue retry` causes further attempts.
    config
        .set("queue", "retry_initial", "\"1h\"")
        .set("queue", "retry_max", "\"1h\"");
    let relay = start_relay(config);
    let id = send(
        &relay,
        &["ok@example.org", "defer2@example.org"],
        "defer.retry@acme.test",
    );
    sink.wait_for(1, WAIT);
    wait_until("the first attempt", || {
        queue_show(&relay, &id)["attempts"].as_u64().unwrap_or(0) >= 1
    });
    let first = queue_show(&relay, &id);
    assert_eq!(first["attempts"], 1, "{first}");
    assert!(
        first["last_error"].as_str().unwrap_or("").contains("451"),
        "{first}"
    );

    for expected in [2u64, 3] {
        let out = relay.cli(&["queue", "retry", &id], "");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until("an attempt after queue retry", || {
            queue_show(&relay, &id)["attempts"].as_u64().unwrap_or(0) >= expected
        });
    }
    wait_queue_only(&relay, &id);
    let got = sink.messages();
    assert_eq!(
        got.len(),
        1,
        "ok@example.org is not delivered again by a retry: {got:?}"
    );
    assert_eq!(got[0].rcpt_tos, vec!["ok@example.org"]);

    let out = relay.cli(&["queue", "delete", &id], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(relay.queue_list().is_empty());

    // Unknown ids: the operation fails with exit 1.
    for args in [
        &["queue", "show", &id][..],
        &["queue", "show", "NOSUCHID"][..],
        &["queue", "retry", "NOSUCHID"][..],
        &["queue", "delete", "NOSUCHID"][..],
    ] {
        let out = relay.cli(args, "");
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(args[2]),
            "{args:?}: the message on stderr does not name the id: {err}"
        );
    }
    // Still serving, and a deleted message is never delivered.
    send(&relay, &["after@example.org"], "after.delete@acme.test");
    sink.wait_for(2, WAIT);
    relay.wait_queue_empty(WAIT);
    assert_eq!(sink.messages().len(), 2);
}

#[test]
fn a_message_deferred_past_max_lifetime_is_bounced_and_removed() {
    let sink = Sink::start();
    let mut config = RelayConfig::new(sink.port);
    config.set("queue", "max_lifetime", "\"3s\"");
    let relay = start_relay(config);
    let id = send(&relay, &["defer3@example.org"], "expire.me@acme.test");
    let got = sink.wait_for(1, WAIT);
    relay.wait_queue_empty(WAIT);
    assert_eq!(
        relay.cli(&["queue", "show", &id], "").status.code(),
        Some(1)
    );
    let got_all = sink.messages();
    assert_eq!(got_all.len(), 1, "only the bounce: {got_all:?}");
    assert_bounce(&got[0], "defer3@example.org", "expire.me@acme.test", "5.");
}
