//! The relay core end to end (issue: the five steps a new user takes):
//! real binary, swaks over STARTTLS and implicit TLS, a real upstream.

mod common;

use std::time::Duration;

use common::{Relay, Sink};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn own_address_is_relayed_and_others_are_refused() {
    let sink = Sink::start();
    let relay = Relay::start(sink.port);
    relay.add_mailbox("acme", "info@acme.test", "secret");

    let sent = relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from("info@acme.test")
        .to("someone@example.org")
        .run();
    sent.assert_code(0)
        .assert_contains("250 2.0.0 Ok: queued as ");
    let id = sent.queue_id().expect("queue id");

    relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from("other@acme.test")
        .to("someone@example.org")
        .run()
        .assert_code(23)
        .assert_contains(
            "553 5.7.1 <other@acme.test>: Sender address rejected: not owned by user info@acme.test",
        );

    sink.wait_for(1, WAIT);
    // Count once the queue is empty: a wrongly accepted message has then
    // arrived too.
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(got.len(), 1, "only the allowed message is relayed: {got:?}");
    let m = &got[0];
    assert_eq!(m.mail_from, "info@acme.test");
    assert_eq!(m.rcpt_tos, vec!["someone@example.org"]);
    let received = m.header("Received").expect("Received header");
    assert!(
        received.contains("ESMTPSA") && received.contains(&id),
        "{received}"
    );
    assert!(m.header("Message-Id").is_some() && m.header("Date").is_some());
}

#[test]
fn implicit_tls_port_relays_too() {
    let sink = Sink::start();
    let relay = Relay::start(sink.port);
    relay.add_mailbox("acme", "info@acme.test", "secret");
    let sent = relay
        .swaks_implicit()
        .arg("--auth")
        .arg("LOGIN")
        .arg("--auth-user")
        .arg("info@acme.test")
        .arg("--auth-password")
        .arg("secret")
        .from("info@acme.test")
        .to("someone@example.org")
        .header("Message-Id: <implicit.1@acme.test>")
        .arg("--body")
        .arg("implicit-tls-marker-7f3a")
        .run();
    sent.assert_code(0)
        .assert_contains("250 2.0.0 Ok: queued as ");
    let id = sent.queue_id().expect("queue id");
    sink.wait_for(1, WAIT);
    relay.wait_queue_empty(WAIT);
    let got = sink.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    assert_eq!(m.mail_from, "info@acme.test");
    assert_eq!(m.rcpt_tos, vec!["someone@example.org"]);
    assert_eq!(m.header("From").as_deref(), Some("info@acme.test"));
    assert_eq!(
        m.header("Message-ID").as_deref(),
        Some("<implicit.1@acme.test>")
    );
    assert!(
        m.text().contains("\r\n\r\nimplicit-tls-marker-7f3a"),
        "the body did not arrive: {:?}",
        m.text()
    );
    // Received over the implicit TLS port by an authenticated client.
    let received = m.header("Received").expect("Received header");
    assert!(
        received.contains("ESMTPSA") && received.contains(&id),
        "{received}"
    );
}

#[test]
fn raw_client_pipelines_a_whole_transaction() {
    let sink = Sink::start();
    let relay = Relay::start(sink.port);
    relay.add_mailbox("acme", "info@acme.test", "secret");
    let cert = relay.dir.path().join("certs/test.crt");
    let mut c = common::raw::RawClient::login(relay.submission, &cert, "info@acme.test", "secret");
    c.send(b"MAIL FROM:<info@acme.test>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n");
    assert!(c.read_reply().unwrap().starts_with("250 2.1.0"));
    assert!(c.read_reply().unwrap().starts_with("250 2.1.5"));
    assert!(c.read_reply().unwrap().starts_with("354"));
    c.send(b"From: info@acme.test\r\nSubject: pipelined\r\n\r\n..dot\r\n.\r\nQUIT\r\n");
    assert!(
        c.read_reply()
            .unwrap()
            .starts_with("250 2.0.0 Ok: queued as")
    );
    assert!(c.read_reply().unwrap().starts_with("221"));
    let m = &sink.wait_for(1, WAIT)[0];
    assert!(m.text().ends_with("\r\n\r\n.dot\r\n"), "{:?}", m.text());
}

#[test]
fn a_password_change_takes_effect_at_once_despite_the_login_cache() {
    let sink = Sink::start();
    let relay = Relay::start(sink.port);
    relay.add_mailbox("acme", "info@acme.test", "old-secret");
    let send = |password: &str| {
        relay
            .swaks()
            .auth("info@acme.test", password)
            .from("info@acme.test")
            .to("someone@example.org")
            .run()
    };
    // Twice: the second login is served from the cache.
    send("old-secret").assert_code(0);
    send("old-secret").assert_code(0);
    relay.cli_ok(&["mailbox", "passwd", "info@acme.test"], "new-secret\n");
    send("old-secret")
        .assert_code(28)
        .assert_contains("535 5.7.8 Authentication credentials invalid");
    send("new-secret").assert_code(0);
    // The store keeps only an Argon2id hash, never the password.
    let listed = relay.cli_ok(&["mailbox", "list", "--json"], "");
    assert!(
        !listed.contains("new-secret") && !listed.contains("argon2"),
        "{listed}"
    );
    assert!(
        !relay.log().contains("new-secret"),
        "no password in the log"
    );
}
