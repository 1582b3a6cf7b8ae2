//! Crash safety (issue 4): many concurrent sessions send messages, the
//! relay is killed with SIGKILL in the middle, restarted, and every message
//! that got a `250` must reach the upstream (compared by Message-ID;
//! duplicates are allowed: delivery is at-least-once).
//!
//! Two variants, N = 240 messages over 12 sessions each:
//! - upstream DOWN while the messages are sent and the relay is killed, so
//!   every accepted message exists only in the relay's queue on disk at the
//!   moment of the kill (nothing could have been delivered earlier); the
//!   upstream is started afterwards on the configured port;
//! - upstream UP: the kill also hits deliveries in progress (a message
//!   delivered but not yet marked so is delivered again: a duplicate).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Relay, Sink, free_port, raw::RawClient};

const SESSIONS: usize = 12;
const PER_SESSION: usize = 20;
const N: usize = SESSIONS * PER_SESSION; // 240
/// Kill once this many messages were accepted: well inside the run.
const KILL_AFTER: usize = N / 2;

fn message_id(session: usize, i: usize) -> String {
    format!("<crash-{session}-{i}@test>")
}

/// One session: sends its messages until done or until the relay dies;
/// returns the Message-IDs that got a complete `250 ... queued as` reply.
fn session(mut c: RawClient, s: usize, accepted: &AtomicUsize) -> Vec<String> {
    let mut ok = Vec::new();
    for i in 0..PER_SESSION {
        if !c.try_send(
            format!("MAIL FROM:<info@acme.test>\r\nRCPT TO:<rcpt-{s}-{i}@example.org>\r\nDATA\r\n")
                .as_bytes(),
        ) {
            break;
        }
        let replies: Vec<Option<String>> = (0..3).map(|_| c.read_reply()).collect();
        let started = matches!(
            (&replies[0], &replies[1], &replies[2]),
            (Some(a), Some(b), Some(d)) if a.starts_with("250") && b.starts_with("250") && d.starts_with("354")
        );
        if !started {
            break;
        }
        let id = message_id(s, i);
        let body = format!(
            "From: info@acme.test\r\nTo: rcpt-{s}-{i}@example.org\r\nMessage-ID: {id}\r\n\
             Subject: crash {s} {i}\r\n\r\nmessage {i} of session {s}\r\n.\r\n"
        );
        if !c.try_send(body.as_bytes()) {
            break;
        }
        match c.read_reply() {
            // Only a complete reply counts; one cut by the kill is None.
            Some(r) if r.starts_with("250 ") && r.contains("queued as") => {
                ok.push(id);
                accepted.fetch_add(1, Ordering::SeqCst);
            }
            Some(r) => panic!("session {s} message {i}: unexpected reply {r}"),
            None => break,
        }
    }
    ok
}

#[test]
fn every_accepted_message_survives_kill_9_with_upstream_down() {
    crash_run(false);
}

#[test]
fn every_accepted_message_survives_kill_9_while_delivering() {
    crash_run(true);
}

fn crash_run(upstream_up: bool) {
    // Upstream down: a free port where nothing listens (yet). Up: the
    // relay is killed while it also delivers (duplicates possible).
    let upstream_port = free_port();
    let sink_dir = tempfile::tempdir().expect("tempdir");
    let mut sink =
        upstream_up.then(|| Sink::start_at(upstream_port, &sink_dir.path().join("messages")));
    let mut relay = Relay::start(upstream_port);
    relay.add_mailbox("acme", "info@acme.test", "secret");
    let cert = relay.dir.path().join("certs/test.crt");
    let submission = relay.submission;

    let accepted = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(Barrier::new(SESSIONS + 1));
    let results = Arc::new(Mutex::new(BTreeSet::new()));
    let threads: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let (accepted, ready, results, cert) = (
                accepted.clone(),
                ready.clone(),
                results.clone(),
                cert.clone(),
            );
            std::thread::spawn(move || {
                // Everyone is logged in before the first message, so the
                // kill can only hit sessions that are sending.
                let c = RawClient::login(submission, &cert, "info@acme.test", "secret");
                ready.wait();
                let ok = session(c, s, &accepted);
                results.lock().unwrap().extend(ok);
            })
        })
        .collect();
    ready.wait();

    // Kill in the middle (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(
            Instant::now() < deadline,
            "only {} messages accepted:\n{}",
            accepted.load(Ordering::SeqCst),
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    relay.kill9();
    let at_kill = accepted.load(Ordering::SeqCst);
    for t in threads {
        t.join().expect("session thread");
    }
    let acked: BTreeSet<String> = results.lock().unwrap().clone();
    assert_eq!(acked.len(), accepted.load(Ordering::SeqCst));
    assert!(
        acked.len() < N,
        "the kill did not interrupt the sessions (all {N} accepted)"
    );

    // Upstream up, relay back on the same data dir.
    let sink = sink
        .get_or_insert_with(|| Sink::start_at(upstream_port, &sink_dir.path().join("messages")));
    relay.restart();

    // Wait until every accepted message arrived and the queue is empty.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (delivered, missing) = loop {
        let mut delivered: BTreeMap<String, usize> = BTreeMap::new();
        for m in sink.messages() {
            if let Some(id) = m.header("Message-ID") {
                *delivered.entry(id).or_default() += 1;
            }
        }
        let missing: Vec<&String> = acked
            .iter()
            .filter(|id| !delivered.contains_key(*id))
            .collect();
        let queue_empty = missing.is_empty() && {
            let out = relay.cli(&["--json", "queue", "list"], "");
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().map(Vec::is_empty))
                .unwrap_or(false)
        };
        if queue_empty {
            break (delivered, missing.len());
        }
        if Instant::now() >= deadline {
            break (delivered, missing.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let copies: usize = delivered.values().sum();
    let duplicates = copies - delivered.len();
    let unacked_delivered = delivered.keys().filter(|id| !acked.contains(*id)).count();
    println!(
        "crash test (upstream {}): {N} attempted, {} accepted (250; {at_kill} when killed), \
         {} distinct delivered ({copies} copies, {duplicates} duplicates, \
         {unacked_delivered} delivered without a 250: cut by the kill), {missing} missing",
        if upstream_up { "up" } else { "down" },
        acked.len(),
        delivered.len()
    );
    assert_eq!(
        missing,
        0,
        "accepted messages lost: {:?}\n{}",
        acked
            .iter()
            .filter(|id| !delivered.contains_key(*id))
            .collect::<Vec<_>>(),
        relay.log()
    );
    // Nothing appears that was never sent.
    for id in delivered.keys() {
        assert!(id.starts_with("<crash-"), "{id}");
    }
    assert_eq!(relay.stop(), Some(0));
}
