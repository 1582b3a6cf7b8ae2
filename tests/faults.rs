//! Real faults end to end: a full disk under the relay's data dir (a small
//! tmpfs mounted by the test; needs root), and smarthosts that are silent,
//! stall after DATA, answer the final dot late, or close every connection.
//!
//! Contract (SPEC §4-§5 and the fault behaviour): `250 ... queued as` only
//! once a message is durably on disk, a 4xx and nothing kept on ENOSPC,
//! acceptance again once space is back (no restart), no re-send after a
//! successful delivery whose bookkeeping write failed, a clear "disk full"
//! when starting on a full disk; every upstream phase bounded by its own
//! timeout in every TLS mode; a dead smarthost probed with backoff instead
//! of hammered per message, and the whole queue sent as soon as a probe
//! gets through; SIGTERM honoured within `server.shutdown_timeout`.
//!
//! Messages are told apart by their Message-ID header. Each test has its own
//! relay, ports, upstreams and (for the disk tests) its own mount point.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    Relay, RelayConfig, Sink, SinkMessage,
    faulty::{
        ClosingServer, Filler, FinalReply, KeepFull, Launch, Received, ScriptedServer,
        SilentServer, TmpfsRelay, fault_config, terminate, try_launch,
    },
    free_port,
    raw::RawClient,
};
use serde_json::Value;

const USER: &str = "info@acme.test";
const PASS: &str = "secret";
const TMPFS_SIZE: &str = "64m";

// ---------------------------------------------------------------- helpers

fn cert(relay: &Relay) -> std::path::PathBuf {
    relay.dir.path().join("certs/test.crt")
}

fn login(relay: &Relay) -> RawClient {
    RawClient::login(relay.submission, &cert(relay), USER, PASS)
}

/// A message of about `size` bytes with Message-ID `id`; lines of 78 bytes.
fn message(id: &str, size: usize) -> String {
    let mut m = format!(
        "From: {USER}\r\nTo: someone@example.org\r\nMessage-ID: {id}\r\n\
         Subject: fault test {id}\r\n\r\n"
    );
    let line = format!("{}\r\n", "x".repeat(76));
    while m.len() < size {
        m.push_str(&line);
    }
    m
}

/// Sends one message in session `c` (MAIL, RCPT, DATA one by one) and
/// returns the reply that decided it: the reply to the final dot, or the
/// first refusal (then the transaction is reset). None: the connection was
/// closed or timed out first.
fn send_in(c: &mut RawClient, id: &str, size: usize) -> Option<String> {
    for (cmd, want) in [
        (format!("MAIL FROM:<{USER}>"), "250"),
        ("RCPT TO:<someone@example.org>".to_string(), "250"),
        ("DATA".to_string(), "354"),
    ] {
        if !c.try_send(format!("{cmd}\r\n").as_bytes()) {
            return c.read_reply();
        }
        let reply = c.read_reply()?;
        if !reply.starts_with(want) {
            let _ = c.try_send(b"RSET\r\n");
            let _ = c.read_reply();
            return Some(reply);
        }
    }
    if !c.try_send(format!("{}.\r\n", message(id, size)).as_bytes()) {
        // Closed mid-message: a refusal sent before closing still counts.
        return c.read_reply();
    }
    c.read_reply()
}

/// One message in a session of its own.
fn send_one(relay: &Relay, id: &str, size: usize) -> Option<String> {
    let mut c = login(relay);
    c.tcp()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    send_in(&mut c, id, size)
}

fn accepted(reply: &Option<String>) -> bool {
    reply
        .as_deref()
        .is_some_and(|r| r.starts_with("250 ") && r.contains("queued as"))
}

fn temp_failure(reply: &Option<String>) -> bool {
    reply.as_deref().is_some_and(|r| r.starts_with('4'))
}

fn queue_id(reply: &str) -> String {
    reply
        .split("queued as ")
        .nth(1)
        .expect("queued as")
        .trim()
        .to_string()
}

/// How many times each Message-ID arrived.
fn counts<'a>(messages: impl IntoIterator<Item = &'a SinkMessage>) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for m in messages {
        if let Some(id) = m.header("Message-ID") {
            *n.entry(id).or_default() += 1;
        }
    }
    n
}

fn duplicates(n: &BTreeMap<String, usize>) -> Vec<(&String, &usize)> {
    n.iter().filter(|(_, c)| **c > 1).collect()
}

/// Waits until every id in `want` arrived at `sink` and the queue is
/// empty; then checks each arrived exactly once and nothing of `refused`
/// arrived at all.
fn assert_delivered_once(
    relay: &Relay,
    sink: &Sink,
    want: &BTreeSet<String>,
    refused: &BTreeSet<String>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let n = counts(&sink.messages());
        let missing: Vec<&String> = want.iter().filter(|id| !n.contains_key(*id)).collect();
        if missing.is_empty() && relay.queue_list().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "within {timeout:?}: {} accepted messages not delivered ({missing:?}); queue: {:?}\n{}",
            missing.len(),
            relay.queue_list(),
            tail(&relay.log())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let n = counts(&sink.messages());
    assert!(
        duplicates(&n).is_empty(),
        "delivered more than once: {:?}",
        duplicates(&n)
    );
    let came_back: Vec<&String> = refused.iter().filter(|id| n.contains_key(*id)).collect();
    assert!(
        came_back.is_empty(),
        "messages refused with 4xx were delivered anyway (kept after the refusal): {came_back:?}"
    );
}

/// The end of a relay log: enough to see what went wrong, not thousands
/// of retry lines.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(60);
    let mut out = String::new();
    if from > 0 {
        out.push_str(&format!("[... {from} earlier log lines ...]\n"));
    }
    out.push_str(&lines[from..].join("\n"));
    out
}

/// Message-IDs a scripted smarthost received again after it had answered
/// 250 to them.
fn resent_after_250(got: &[Received]) -> Vec<String> {
    let mut done = BTreeSet::new();
    let mut again = Vec::new();
    for r in got {
        let id = r.message.header("Message-ID").unwrap_or_default();
        if done.contains(&id) {
            again.push(id.clone());
        }
        if r.answered {
            done.insert(id);
        }
    }
    again
}

/// How many times each Message-ID was accepted (answered 250).
fn answered_counts(got: &[Received]) -> BTreeMap<String, usize> {
    counts(got.iter().filter(|r| r.answered).map(|r| &r.message))
}

fn mentions_timeout(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("timed out") || t.contains("timeout")
}

/// Waits until the queue item `id` shows an attempt whose error mentions a
/// timeout; returns the item.
fn wait_timeout_error(relay: &Relay, id: &str, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = relay.queue_list();
        if let Some(item) = last.iter().find(|m| m["id"] == id)
            && item["attempts"].as_u64().unwrap_or(0) >= 1
            && item["last_error"].as_str().is_some_and(mentions_timeout)
        {
            return item.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no attempt with a timeout error recorded for {id} within 60 s; queue: {last:?}\n{}",
            tail(&relay.log())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) until the relay's queue directory holds no `ID.tmp`: a
/// message refused with a 4xx must not leave its half-written file behind
/// (it is not in `queue list`, but it keeps the disk full until a restart).
fn assert_no_tmp_files(relay: &TmpfsRelay, what: &str) {
    let dir = relay.data_dir().join("queue");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tmp: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".tmp"))
                    .collect()
            })
            .unwrap_or_default();
        if tmp.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: half-written queue files left behind: {tmp:?}\n{}",
            tail(&relay.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tmpfs_relay(upstream_port: u16) -> TmpfsRelay {
    let relay = TmpfsRelay::start(fault_config(upstream_port), TMPFS_SIZE);
    relay.add_mailbox("acme", USER, PASS);
    relay
}

// ---------------------------------------------------------------- disk full

/// Upstream down while the disk is full, so acceptance is tested alone:
/// whatever got 250 is in the queue, whatever got 4xx is not, and space
/// coming back makes the relay accept again without a restart.
#[test]
fn disk_full_gives_4xx_and_loses_nothing() {
    let upstream_port = free_port(); // nothing listens until later
    let sink_dir = tempfile::tempdir().expect("tempdir");
    let mut relay = tmpfs_relay(upstream_port);
    let (mut ok, mut refused) = (BTreeSet::new(), BTreeSet::new());

    let filler = Filler::fill(&relay.data_dir(), 200 * 1024);
    println!("disk full: {:?} (total, free)", relay.tmpfs().stats());

    // 2 MB cannot fit in 200 KB.
    let big = "<big@faults.test>".to_string();
    let reply = send_one(&relay, &big, 2 * 1024 * 1024);
    assert!(
        temp_failure(&reply),
        "a 2 MB message on a disk with 200 KB free: want a 4xx, got {reply:?}\n{}",
        tail(&relay.log())
    );
    refused.insert(big);
    assert_no_tmp_files(&relay, "after the 2 MB message was refused");

    // Small ones may fit or not; either answer is fine, nothing else is.
    for i in 0..5 {
        let id = format!("<small-{i}@faults.test>");
        let reply = send_one(&relay, &id, 1024);
        if accepted(&reply) {
            ok.insert(id);
        } else {
            assert!(
                temp_failure(&reply),
                "small message {i} on a full disk: want 250 or 4xx, got {reply:?}\n{}",
                tail(&relay.log())
            );
            refused.insert(id);
        }
    }
    println!(
        "on the full disk: {} accepted, {} refused",
        ok.len(),
        refused.len()
    );
    assert_eq!(
        relay.queue_list().len(),
        ok.len(),
        "the queue holds exactly the accepted messages (nothing of a refused one stays)"
    );
    assert_no_tmp_files(&relay, "after the small messages on the full disk");

    // Space back: accepted again, no restart.
    filler.free();
    for i in 0..5 {
        let id = format!("<after-{i}@faults.test>");
        let reply = send_one(&relay, &id, 4096);
        assert!(
            accepted(&reply),
            "with space back, message {i}: want 250, got {reply:?}\n{}",
            tail(&relay.log())
        );
        ok.insert(id);
    }
    assert_eq!(relay.queue_list().len(), ok.len());

    let sink = Sink::start_at(upstream_port, &sink_dir.path().join("messages"));
    assert_delivered_once(&relay, &sink, &ok, &refused, Duration::from_secs(60));

    // A restart on the same data dir re-sends nothing and loses nothing.
    relay.restart();
    for i in 0..3 {
        let id = format!("<restarted-{i}@faults.test>");
        let reply = send_one(&relay, &id, 4096);
        assert!(accepted(&reply), "after restart: {reply:?}");
        ok.insert(id);
    }
    assert_delivered_once(&relay, &sink, &ok, &refused, Duration::from_secs(60));
    assert_eq!(relay.stop(), Some(0));
}

/// The disk fills up while messages are being delivered and stays full:
/// the smarthost holds its `250` to the first messages for 2 s, and the
/// disk is filled in that window, so the relay learns of each successful
/// delivery when it can no longer write that down. That must not make it
/// send them again (and again, every retry).
#[test]
fn disk_full_with_smarthost_up_no_duplicate_storm() {
    const HELD: usize = 6;
    let server = ScriptedServer::start(|i| {
        if i < HELD {
            FinalReply::After(Duration::from_secs(2))
        } else {
            FinalReply::Now
        }
    });
    let mut config = fault_config(server.port());
    config.set("queue", "retry_initial", "\"1s\"");
    let relay = TmpfsRelay::start(config, TMPFS_SIZE);
    relay.add_mailbox("acme", USER, PASS);
    let (mut ok, mut refused) = (BTreeSet::new(), BTreeSet::new());

    let mut c = login(&relay);
    for i in 0..HELD {
        let id = format!("<storm-{i}@faults.test>");
        let reply = send_in(&mut c, &id, 8 * 1024);
        assert!(
            accepted(&reply),
            "message {i} (disk not full yet): {reply:?}"
        );
        ok.insert(id);
    }
    // A delivery is waiting for its 250: fill the disk now.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.received().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no delivery within 30 s\n{}",
            tail(&relay.log())
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let filler = Filler::fill(&relay.data_dir(), 0);
    let full = KeepFull::start(&filler);
    let in_flight = server.received().iter().filter(|r| !r.answered).count();
    println!("storm: disk filled with {in_flight} deliveries waiting for their 250");

    // More messages while it is full: 250 or 4xx.
    for i in HELD..HELD + 10 {
        let id = format!("<storm-{i}@faults.test>");
        let reply = send_in(&mut c, &id, 8 * 1024);
        if accepted(&reply) {
            ok.insert(id);
        } else {
            assert!(
                temp_failure(&reply),
                "message {i} on a full disk: want 250 or 4xx, got {reply:?}\n{}",
                tail(&relay.log())
            );
            refused.insert(id);
        }
    }
    drop(c);
    println!(
        "storm: {} accepted, {} refused on the full disk",
        ok.len() - HELD,
        refused.len()
    );

    // ~12 s of relay activity on a disk kept full (retries every second).
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let again = resent_after_250(&server.received());
        assert!(
            again.is_empty(),
            "on a full disk, messages the smarthost had accepted were sent again: {again:?}\n{}",
            tail(&relay.log())
        );
        if relay.queue_list().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    drop(full);
    filler.free();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = server.received();
        let answered = answered_counts(&got);
        let missing: Vec<&String> = ok.iter().filter(|id| !answered.contains_key(*id)).collect();
        if missing.is_empty() && relay.queue_list().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with space back, not delivered within 60 s: {missing:?}; queue {:?}\n{}",
            relay.queue_list(),
            tail(&relay.log())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = server.received();
    let again = resent_after_250(&got);
    assert!(again.is_empty(), "sent again after a 250: {again:?}");
    let answered = answered_counts(&got);
    for id in &ok {
        assert_eq!(answered.get(id), Some(&1), "{id}: {answered:?}");
    }
    let came_back: Vec<&String> = refused
        .iter()
        .filter(|id| {
            got.iter()
                .any(|r| r.message.header("Message-ID").as_ref() == Some(*id))
        })
        .collect();
    assert!(
        came_back.is_empty(),
        "messages refused with 4xx were delivered anyway: {came_back:?}"
    );
}

#[test]
fn restart_on_full_disk_says_disk_full() {
    let sink = Sink::start();
    let mut relay = tmpfs_relay(sink.port);
    assert!(accepted(&send_one(&relay, "<before@faults.test>", 1024)));
    sink.wait_for(1, Duration::from_secs(30));
    assert_eq!(relay.stop(), Some(0));

    let filler = Filler::fill(&relay.data_dir(), 0);
    let log_before = relay.log().len();
    match try_launch(&mut relay) {
        Launch::Exited(status) => {
            let log = relay.log();
            let said = &log[log_before.min(log.len())..];
            println!("start on a full disk: {status}\n{said}");
            assert!(
                !status.success(),
                "a start on a full disk must fail, exited {status}:\n{said}"
            );
            let lower = said.to_ascii_lowercase();
            assert!(
                lower.contains("disk full") || lower.contains("no space left"),
                "a start on a full disk must say so (\"disk full\" / \"No space left\"):\n{said}"
            );
        }
        Launch::Serving => panic!(
            "the relay started on a completely full disk instead of refusing with \"disk full\":\n{}",
            tail(&relay.log())
        ),
    }

    filler.free();
    relay.restart();
    assert!(
        accepted(&send_one(&relay, "<after@faults.test>", 1024)),
        "with space back the relay serves again"
    );
    let got = sink.wait_for(2, Duration::from_secs(30));
    let n = counts(&got);
    assert_eq!(n.get("<after@faults.test>"), Some(&1), "{n:?}");
    assert_eq!(n.get("<before@faults.test>"), Some(&1), "{n:?}");
}

// ---------------------------------------------------------------- smarthost faults

#[test]
fn silent_smarthost() {
    let silent = SilentServer::start();
    let mut config = fault_config(silent.port());
    config
        .set("upstream", "greeting_timeout", "\"2s\"")
        .set("queue", "retry_initial", "\"1s\"")
        .set("server", "shutdown_timeout", "\"3s\"");
    let mut relay = Relay::start_with(config);
    relay.add_mailbox("acme", USER, PASS);

    let reply = send_one(&relay, "<silent@faults.test>", 1024);
    assert!(accepted(&reply), "{reply:?}");
    let id = queue_id(reply.as_deref().unwrap());
    let item = wait_timeout_error(&relay, &id, "greeting never comes");
    println!("silent smarthost: {item}");
    assert!(silent.connections() >= 1);

    // The relay is (or soon will be) waiting on the silent smarthost again.
    match terminate(&mut relay, Duration::from_secs(3 + 10)) {
        Ok((status, took)) => println!("SIGTERM: exited {status} after {took:?}"),
        Err(e) => panic!(
            "shutdown_timeout = 3s with a silent smarthost: {e}\n{}",
            tail(&relay.log())
        ),
    }
}

#[test]
fn smarthost_stalls_after_data() {
    // The final dot goes unanswered until the test has seen the timeout
    // recorded; from then on the server answers.
    let answer = Arc::new(AtomicBool::new(false));
    let a = answer.clone();
    let server = ScriptedServer::start(move |_| {
        if a.load(Ordering::SeqCst) {
            FinalReply::Now
        } else {
            FinalReply::Never
        }
    });
    let mut config = fault_config(server.port());
    config
        .set("upstream", "final_timeout", "\"2s\"")
        .set("queue", "retry_initial", "\"1s\"");
    let relay = Relay::start_with(config);
    relay.add_mailbox("acme", USER, PASS);

    let mid = "<stalled@faults.test>";
    let reply = send_one(&relay, mid, 1024);
    assert!(accepted(&reply), "{reply:?}");
    let id = queue_id(reply.as_deref().unwrap());
    let item = wait_timeout_error(&relay, &id, "final dot never answered");
    println!("stalled smarthost: {item}");
    assert!(
        server.received().iter().all(|r| !r.answered),
        "nothing was answered yet"
    );

    answer.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server.received().iter().any(|r| r.answered) || !relay.queue_list().is_empty() {
        assert!(
            Instant::now() < deadline,
            "not delivered within 60 s after the server started answering; queue {:?}\n{}",
            relay.queue_list(),
            tail(&relay.log())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give a wrong retry a chance to show up.
    std::thread::sleep(Duration::from_secs(3));
    let got = server.received();
    let answered: Vec<_> = got.iter().filter(|r| r.answered).collect();
    assert_eq!(answered.len(), 1, "accepted by the smarthost once: {got:?}");
    assert_eq!(
        answered[0].message.header("Message-ID").as_deref(),
        Some(mid)
    );
    let last = got.last().expect("received");
    assert!(
        last.answered,
        "nothing may be sent after the smarthost accepted the message: {got:?}"
    );
}

#[test]
fn slow_final_reply_is_not_resent() {
    // 7 s is slow, but well inside the default final_timeout (10 min).
    let server = ScriptedServer::start(|_| FinalReply::After(Duration::from_secs(7)));
    let mut config = fault_config(server.port());
    config.set("queue", "retry_initial", "\"1s\"");
    let relay = Relay::start_with(config);
    relay.add_mailbox("acme", USER, PASS);

    let reply = send_one(&relay, "<slow@faults.test>", 1024);
    assert!(accepted(&reply), "{reply:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    while server.received().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no delivery attempt within 30 s\n{}",
            tail(&relay.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = Instant::now();
    while first.elapsed() < Duration::from_secs(20) {
        let got = server.received();
        assert_eq!(
            got.len(),
            1,
            "the message was sent again while (or after) the smarthost took 7 s to answer: {got:?}\n{}",
            tail(&relay.log())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = server.received();
    assert!(got[0].answered, "the 250 after 7 s was sent: {got:?}");
    assert!(
        relay.queue_list().is_empty(),
        "the message was delivered: {:?}",
        relay.queue_list()
    );
}

#[test]
fn dead_smarthost_is_probed_not_hammered() {
    const N: usize = 100;
    let mut closer = ClosingServer::start();
    let port = closer.port();
    let mut config = fault_config(port);
    config
        .set("queue", "retry_initial", "\"1h\"")
        .set("queue", "retry_max", "\"1h\"")
        .set("queue", "dead_after", "3")
        .set("queue", "probe_interval", "\"1s\"");
    let relay = Relay::start_with(config);
    relay.add_mailbox("acme", USER, PASS);

    let mut ids = BTreeSet::new();
    let mut c = login(&relay);
    for i in 0..N {
        let id = format!("<dead-{i}@faults.test>");
        let reply = send_in(&mut c, &id, 512);
        assert!(accepted(&reply), "message {i}: {reply:?}");
        ids.insert(id);
    }
    drop(c);

    std::thread::sleep(Duration::from_secs(8));
    let hits = closer.connections();
    println!("dead smarthost: {hits} connections for {N} queued messages in ~8 s");
    assert!(
        hits >= 1,
        "the relay never tried the smarthost\n{}",
        tail(&relay.log())
    );
    assert!(
        hits <= 30,
        "a dead smarthost was hammered: {hits} connections for {N} messages \
         (want a few probes once {} failures in a row marked it dead)\n{}",
        3,
        tail(&relay.log())
    );

    // The smarthost comes back on the same port. Per-message retries are
    // an hour away: only the probe can find it, and then everything goes.
    closer.stop();
    let sink_dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start_at(port, &sink_dir.path().join("messages"));
    assert_delivered_once(
        &relay,
        &sink,
        &ids,
        &BTreeSet::new(),
        Duration::from_secs(60),
    );
}

#[test]
fn silent_smarthost_implicit_tls_and_starttls() {
    for mode in ["implicit", "starttls"] {
        let silent = SilentServer::start();
        let mut config: RelayConfig = fault_config(silent.port());
        config
            .set("upstream", "tls", &format!("\"{mode}\""))
            .set("upstream", "tls_insecure", "true")
            .set("upstream", "connect_timeout", "\"2s\"")
            .set("upstream", "greeting_timeout", "\"2s\"")
            .set("queue", "retry_initial", "\"1s\"");
        let relay = Relay::start_with(config);
        relay.add_mailbox("acme", USER, PASS);

        let reply = send_one(&relay, &format!("<silent-{mode}@faults.test>"), 1024);
        assert!(accepted(&reply), "{mode}: {reply:?}");
        let id = queue_id(reply.as_deref().unwrap());
        let item = wait_timeout_error(&relay, &id, &format!("upstream tls = {mode}"));
        println!("silent smarthost, tls = {mode}: {item}");
        assert!(silent.connections() >= 1, "{mode}");
    }
}
