//! End to end: DKIM signing of authorized domains (SPEC §9). The relay makes keys at
//! `domain add`, the test DNS server publishes the records `domain show` lists, and what
//! the upstream receives is verified by two independent verifiers: mail-auth against the
//! test DNS server (expecting `Pass`: a broken body hash comes back `Neutral`, not
//! `Fail`) and Python's dkimpy (Debian's python3-dkim, with a dnsfunc serving the same
//! records).

mod common;

use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::{Relay, RelayConfig, Sink, SinkMessage, dns::TestDns, raw::RawClient};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, common::crypto::Algorithm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const PARTNER: &str = "partner.example";
const SENDER: &str = "sales@partner.example";
const USER: &str = "info@acme.test";
const PASS: &str = "secret";

struct Env {
    // Field order = drop order: the relay stops before its DNS server.
    relay: Relay,
    sink: Sink,
    dns: TestDns,
    /// Every record published so far (name → value), for dkimpy's dnsfunc.
    published: std::cell::RefCell<BTreeMap<String, String>>,
}

impl Env {
    fn start(tune: impl FnOnce(&mut RelayConfig)) -> Env {
        let dns = TestDns::start("example");
        let sink = Sink::start();
        let mut config = RelayConfig::new(sink.port);
        config
            .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr()))
            .set("dns", "timeout", "\"1s\"");
        tune(&mut config);
        let relay = Relay::start_with(config);
        relay.add_mailbox("acme", USER, PASS);
        Env {
            relay,
            sink,
            dns,
            published: Default::default(),
        }
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.relay.cli_ok(&args, "");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
    }

    fn show(&self) -> Value {
        self.json(&["domain", "show", PARTNER, "--hosting", "acme"])
    }

    /// Adds partner.example to acme, publishes its validation record, verifies it and
    /// lists sales@partner.example. Returns the `domain add` answer.
    fn authorize(&self) -> Value {
        let added = self.json(&["domain", "add", PARTNER, "--hosting", "acme"]);
        let token = added["record"]["value"]
            .as_str()
            .expect("token")
            .to_string();
        self.dns
            .set_txt(&format!("domauthvalidation.{PARTNER}"), &[&token]);
        self.verify();
        self.relay
            .cli_ok(&["account", "add", SENDER, "--hosting", "acme"], "");
        added
    }

    fn verify(&self) -> Value {
        let out = self.relay.cli(
            &["domain", "verify", PARTNER, "--hosting", "acme", "--json"],
            "",
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("verify --json");
        assert_eq!(out.status.code(), Some(0), "domain verify: {v:#}");
        v
    }

    /// Publishes the DKIM records of `dkim` as the relay lists them: each as its
    /// ≤255-byte strings, the way a zone file holds a long value.
    fn publish_dkim(&self, dkim: &Value) {
        for r in records(dkim) {
            let name = r["name"].as_str().expect("record name");
            let strings: Vec<&str> = r["strings"]
                .as_array()
                .expect("strings")
                .iter()
                .map(|s| s.as_str().expect("string"))
                .collect();
            assert!(strings.iter().all(|s| s.len() <= 255), "{r}");
            assert_eq!(r["type"], "TXT");
            self.dns.set_txt(name, &strings);
            self.published
                .borrow_mut()
                .insert(name.to_string(), strings.concat());
        }
    }

    /// Sends one message as `from` (From header too) with `body`; returns what arrived.
    fn send(&self, from: &str, subject: &str, body: &[u8]) -> SinkMessage {
        let before = self.sink.messages().len();
        let cert = self.relay.dir.path().join("certs/test.crt");
        let mut c = RawClient::login(self.relay.submission, &cert, USER, PASS);
        let reply = c.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(reply.starts_with("250"), "{reply}");
        let reply = c.cmd("RCPT TO:<someone@example.org>");
        assert!(reply.starts_with("250"), "{reply}");
        let reply = c.cmd("DATA");
        assert!(reply.starts_with("354"), "{reply}");
        let head = format!(
            "From: Sales <{from}>\r\nTo: Someone <someone@example.org>\r\nSubject:   {subject}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        );
        c.send(head.as_bytes());
        c.send(&stuffed(body));
        c.send(b".\r\n");
        let reply = c.read_reply().expect("reply to the end of data");
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
        let got = self.sink.wait_for(before + 1, WAIT);
        got.into_iter()
            .find(|m| m.text().contains(&format!("Subject:   {subject}\r\n")))
            .expect("the message arrived")
    }
}

fn records(dkim: &Value) -> Vec<Value> {
    dkim["records"].as_array().cloned().unwrap_or_default()
}

/// The wire form after DATA: dots at line starts doubled.
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

fn dkim_fields(m: &SinkMessage) -> Vec<String> {
    let text = m.text();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_string();
    head.split("\r\n")
        .filter(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .map(str::to_string)
        .collect()
}

/// mail-auth's verdicts against the test DNS server: (algorithm, selector, result).
fn mail_auth_verdicts(dns: SocketAddr, raw: &[u8]) -> Vec<(Algorithm, String, DkimResult)> {
    let mut config = ResolverConfig::from_parts(None, vec![], vec![]);
    let mut udp = ConnectionConfig::udp();
    udp.port = dns.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = dns.port();
    config.add_name_server(NameServerConfig::new(dns.ip(), true, vec![udp, tcp]));
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(5);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let auth = MessageAuthenticator::new(config, opts).expect("mail-auth resolver");
        let message = AuthenticatedMessage::parse(raw).expect("parsable message");
        auth.verify_dkim(&message)
            .await
            .into_iter()
            .map(|o| {
                let sig = o.signature().expect("a signature per output");
                (sig.a, sig.s.clone(), o.result().clone())
            })
            .collect()
    })
}

/// Both signatures pass mail-auth: Ed25519 and RSA-SHA256, with `selectors`.
fn assert_mail_auth_pass(dns: SocketAddr, raw: &[u8], selectors: (&str, &str)) {
    let verdicts = mail_auth_verdicts(dns, raw);
    assert_eq!(verdicts.len(), 2, "two signatures: {verdicts:?}");
    for (algorithm, selector) in [
        (Algorithm::Ed25519Sha256, selectors.0),
        (Algorithm::RsaSha256, selectors.1),
    ] {
        let v = verdicts
            .iter()
            .find(|(a, _, _)| *a == algorithm)
            .unwrap_or_else(|| panic!("no {algorithm:?} signature: {verdicts:?}"));
        assert_eq!(v.1, selector, "{verdicts:?}");
        assert_eq!(v.2, DkimResult::Pass, "{algorithm:?}: {verdicts:?}");
    }
}

const DKIMPY: &str = r#"
import json, sys
import dkim
records = json.loads(sys.argv[1])
def dnsfunc(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    value = records.get(name.rstrip('.'))
    return value.encode() if value is not None else None
message = sys.stdin.buffer.read()
d = dkim.DKIM(message)
count = sum(1 for (k, v) in d.headers if k.lower() == b'dkim-signature')
for i in range(count):
    ok = d.verify(idx=i, dnsfunc=dnsfunc)
    print("%s %s" % (d.signature_fields.get(b'a', b'?').decode(), "pass" if ok else "fail"))
"#;

/// dkimpy's verdict per signature: "ed25519-sha256 pass", "rsa-sha256 pass".
fn dkimpy(published: &BTreeMap<String, String>, raw: &[u8]) -> Vec<String> {
    let python = "/usr/bin/python3";
    let check = Command::new(python)
        .args(["-c", "import dkim, nacl"])
        .output()
        .expect("run /usr/bin/python3");
    assert!(
        check.status.success(),
        "dkimpy missing: install python3-dkim and python3-nacl (tests/run does): {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let records = serde_json::to_string(published).expect("json");
    let mut child = Command::new(python)
        .args(["-c", DKIMPY, &records])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dkimpy");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(raw)
        .expect("feed dkimpy");
    let out: Output = child.wait_with_output().expect("dkimpy output");
    assert!(
        out.status.success(),
        "dkimpy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn assert_dkimpy_pass(env: &Env, raw: &[u8]) {
    assert_eq!(
        dkimpy(&env.published.borrow(), raw),
        ["ed25519-sha256 pass", "rsa-sha256 pass"],
    );
}

/// The private keys the relay stored (read from the store once it is stopped).
fn private_keys(relay: &Relay) -> Vec<String> {
    let store = domauth_store::Store::open(&relay.dir.path().join("data/store"))
        .expect("open the stopped relay's store");
    let dkim = store
        .dkim("acme", PARTNER)
        .expect("read DKIM keys")
        .expect("keys stored");
    dkim.keys
        .iter()
        .flat_map(|k| [k.ed25519_private.clone(), k.rsa_private.clone()])
        .collect()
}

fn body_lines(n: usize) -> Vec<u8> {
    let mut body = Vec::new();
    for i in 0..n {
        if i % 7 == 0 {
            body.extend_from_slice(b".a line that starts with a dot  \t \r\n");
        } else if i % 11 == 0 {
            body.extend_from_slice(b"\r\n");
        } else {
            body.extend_from_slice(format!("line {i}   with  spaces\t and tabs \r\n").as_bytes());
        }
    }
    body.extend_from_slice(b"\r\n\r\n");
    body
}

#[test]
fn signed_mail_verifies_with_mail_auth_and_dkimpy_and_keys_stay_private() {
    let mut env = Env::start(|_| {});
    let added = env.authorize();
    // `domain add` lists the records to publish.
    let dkim = &added["dkim"];
    let recs = records(dkim);
    assert_eq!(recs.len(), 2, "{dkim:#}");
    assert_eq!(recs[0]["name"], "domauth1e._domainkey.partner.example");
    assert_eq!(recs[1]["name"], "domauth1r._domainkey.partner.example");
    assert!(
        recs[0]["value"]
            .as_str()
            .unwrap()
            .starts_with("v=DKIM1; k=ed25519; p=")
    );
    assert!(
        recs[1]["value"]
            .as_str()
            .unwrap()
            .starts_with("v=DKIM1; k=rsa; p=MII")
    );
    assert!(
        recs[1]["strings"].as_array().unwrap().len() >= 2,
        "RSA value split"
    );
    assert_eq!(env.show()["dkim"]["status"], "pending");

    env.publish_dkim(dkim);
    let v = env.verify();
    assert_eq!(v["dkim"]["status"], "verified", "{v:#}");
    assert_eq!(v["dkim"]["signing"]["rsa"], "domauth1r", "{v:#}");
    let list = env.json(&["domain", "list", "--hosting", "acme"]);
    assert_eq!(list[0]["dkim"]["status"], "verified", "{list:#}");

    let m = env.send(SENDER, "signed", &body_lines(200));
    let fields = dkim_fields(&m);
    assert_eq!(fields.len(), 2, "two signatures: {}", m.text());
    assert!(m.text().starts_with("DKIM-Signature: "), "signatures first");
    assert!(m.text().contains("c=relaxed/relaxed"));
    assert_mail_auth_pass(env.dns.addr(), &m.data, ("domauth1e", "domauth1r"));
    assert_dkimpy_pass(&env, &m.data);

    // A changed body no longer verifies (mail-auth: Neutral for a body hash mismatch).
    let mut tampered = m.data.clone();
    let at = tampered.len() - 10;
    tampered[at] = b'X';
    let verdicts = mail_auth_verdicts(env.dns.addr(), &tampered);
    assert!(
        verdicts.iter().all(|v| v.2 != DkimResult::Pass),
        "{verdicts:?}"
    );

    // The mailbox's own domain is not signed.
    let own = env.send(USER, "own", b"hello\r\n");
    assert!(dkim_fields(&own).is_empty(), "{}", own.text());

    // Private keys appear in no answer and no log line.
    let answers = [
        added.to_string(),
        env.show().to_string(),
        env.json(&["domain", "list", "--hosting", "acme"])
            .to_string(),
        env.relay
            .cli_ok(&["domain", "show", PARTNER, "--hosting", "acme"], ""),
    ];
    env.relay.stop();
    let log = env.relay.log();
    assert!(log.contains("dkim_signed"), "the signing is logged");
    let keys = private_keys(&env.relay);
    assert_eq!(keys.len(), 2);
    for key in &keys {
        // A long enough piece of the base64 is as telling as the whole.
        let piece = &key[key.len() / 2..key.len() / 2 + 24];
        assert!(!log.contains(piece), "private key in the log");
        for a in &answers {
            assert!(!a.contains(piece), "private key in an answer");
        }
    }
    assert!(answers.iter().all(|a| !a.contains("private")));
}

#[test]
fn a_multi_megabyte_message_is_signed_while_it_streams() {
    let env = Env::start(|_| {});
    let added = env.authorize();
    env.publish_dkim(&added["dkim"]);
    assert_eq!(env.verify()["dkim"]["status"], "verified");
    // Several MB: the start of the message is on disk before the signatures exist.
    let mut body = Vec::new();
    while body.len() < 6 * 1024 * 1024 {
        body.extend_from_slice(&body_lines(500));
    }
    let m = env.send(SENDER, "big", &body);
    assert!(m.data.ends_with(&body), "body arrives unchanged");
    assert_eq!(dkim_fields(&m).len(), 2);
    assert_mail_auth_pass(env.dns.addr(), &m.data, ("domauth1e", "domauth1r"));
    assert_dkimpy_pass(&env, &m.data);
}

#[test]
fn no_signature_before_the_dkim_record_is_verified_nor_when_dkim_is_off() {
    // Domain verified, DKIM records not published: no signature.
    let env = Env::start(|_| {});
    let added = env.authorize();
    let v = env.verify();
    assert_eq!(v["dkim"]["status"], "pending", "{v:#}");
    assert!(
        v["dkim"]["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("not found")),
        "{v:#}"
    );
    let m = env.send(SENDER, "unsigned", b"hello\r\n");
    assert!(dkim_fields(&m).is_empty(), "{}", m.text());
    // A record with another key: mismatch, still no signature.
    let mut wrong = added["dkim"].clone();
    let other = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
    wrong["records"][0]["strings"] = serde_json::json!([other]);
    env.publish_dkim(&wrong);
    let v = env.verify();
    assert!(
        v["dkim"]["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("mismatch")),
        "{v:#}"
    );
    assert!(dkim_fields(&env.send(SENDER, "unsigned2", b"x\r\n")).is_empty());
    drop(env);

    // Everything published and verified, but `[deliverability] dkim = false`.
    let env = Env::start(|c| {
        c.set("deliverability", "dkim", "false");
    });
    let added = env.authorize();
    env.publish_dkim(&added["dkim"]);
    let v = env.verify();
    assert_eq!(v["dkim"]["status"], "verified");
    assert_eq!(v["dkim"]["enabled"], false);
    let m = env.send(SENDER, "off", b"hello\r\n");
    assert!(dkim_fields(&m).is_empty(), "{}", m.text());
}

#[test]
fn rotation_signs_with_the_old_keys_until_the_new_records_are_verified() {
    let env = Env::start(|_| {});
    let added = env.authorize();
    env.publish_dkim(&added["dkim"]);
    assert_eq!(env.verify()["dkim"]["status"], "verified");

    let rotated = env.json(&["domain", "dkim-rotate", PARTNER, "--hosting", "acme"]);
    let dkim = &rotated["dkim"];
    assert_eq!(dkim["status"], "pending", "{dkim:#}");
    assert_eq!(
        records(dkim)[0]["name"],
        "domauth2e._domainkey.partner.example"
    );
    assert_eq!(
        records(dkim)[1]["name"],
        "domauth2r._domainkey.partner.example"
    );
    assert_eq!(dkim["signing"]["ed25519"], "domauth1e", "{dkim:#}");

    // New records not published yet: the old keys sign.
    let m = env.send(SENDER, "during", b"during rotation\r\n");
    assert_mail_auth_pass(env.dns.addr(), &m.data, ("domauth1e", "domauth1r"));

    env.publish_dkim(dkim);
    let v = env.verify();
    assert_eq!(v["dkim"]["status"], "verified", "{v:#}");
    assert_eq!(v["dkim"]["signing"]["ed25519"], "domauth2e", "{v:#}");
    let m = env.send(SENDER, "after", b"after rotation\r\n");
    assert_mail_auth_pass(env.dns.addr(), &m.data, ("domauth2e", "domauth2r"));
    assert_dkimpy_pass(&env, &m.data);

    // The text output says what to publish and how to enter a long TXT value.
    let text = env
        .relay
        .cli_ok(&["domain", "show", PARTNER, "--hosting", "acme"], "");
    assert!(
        text.contains("domauth2r._domainkey.partner.example"),
        "{text}"
    );
    assert!(text.contains("255 bytes"), "{text}");
}

#[test]
fn domains_without_keys_get_them_at_start() {
    let mut env = Env::start(|_| {});
    env.authorize();
    // As a domain added before this version: its keys gone from the store.
    env.relay.stop();
    {
        let store = domauth_store::Store::open(&env.relay.dir.path().join("data/store"))
            .expect("open the stopped relay's store");
        store.delete_dkim("acme", PARTNER).expect("delete keys");
        store.flush().expect("flush");
    }
    env.relay.restart();
    let deadline = std::time::Instant::now() + WAIT;
    let dkim = loop {
        let v = env.show();
        if !records(&v["dkim"]).is_empty() {
            break v["dkim"].clone();
        }
        assert!(std::time::Instant::now() < deadline, "no keys made: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        records(&dkim)[0]["name"],
        "domauth1e._domainkey.partner.example"
    );
    env.publish_dkim(&dkim);
    assert_eq!(env.verify()["dkim"]["status"], "verified");
    let m = env.send(SENDER, "backfilled", b"hello\r\n");
    assert_mail_auth_pass(env.dns.addr(), &m.data, ("domauth1e", "domauth1r"));
}
