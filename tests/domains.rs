//! External domains end to end (SPEC §2, §3, §6): the real `domauth` binary,
//! a real authoritative DNS server (hickory, in process) whose TXT records
//! each test changes between steps, the real CLI over the admin socket, a real
//! upstream, and swaks as the SMTP client.
//!
//! Timing: nothing here asserts on wall-clock durations. State changes made
//! by the background task are awaited by polling `domain show --json` with an
//! upper bound far above the configured intervals.

mod common;

use std::{
    net::Ipv4Addr,
    process::Output,
    time::{Duration, Instant},
};

use common::{Relay, RelayConfig, Sink, SwaksResult, dns::TestDns};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
/// Upper bound for a change the background task makes (intervals are 1–4 s).
const BACKGROUND: Duration = Duration::from_secs(30);
/// swaks exit code when the reply to the end of DATA (the `.`) is an error
/// (25 is a refused DATA command itself).
const REFUSED_AT_END_OF_DATA: i32 = 26;
const PARTNER: &str = "partner.example";
const RECORD: &str = "domauthvalidation.partner.example";

// ---------------------------------------------------------------- helpers

struct Env {
    // Field order = drop order: the relay stops before its DNS server.
    relay: Relay,
    sink: Sink,
    dns: Option<TestDns>,
}

impl Env {
    /// DNS server for zone "example", upstream sink, relay pointed at both,
    /// hosting acme (own domain acme.test) with mailbox info@acme.test.
    fn start(tune: impl FnOnce(&mut RelayConfig)) -> Env {
        let dns = TestDns::start("example");
        let sink = Sink::start();
        let mut config = RelayConfig::new(sink.port);
        config
            .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr()))
            .set("dns", "timeout", "\"1s\"");
        tune(&mut config);
        let relay = Relay::start_with(config);
        relay.add_mailbox("acme", "info@acme.test", "secret");
        Env {
            relay,
            sink,
            dns: Some(dns),
        }
    }

    fn dns(&self) -> &TestDns {
        self.dns.as_ref().expect("DNS server running")
    }

    /// Publishes `token` as the one TXT string at domauthvalidation.<domain>.
    fn publish(&self, domain: &str, token: &str) {
        self.dns()
            .set_txt(&format!("domauthvalidation.{domain}"), &[token]);
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.relay.cli(args, "")
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.relay.cli_ok(&args, "");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
    }

    /// `domain add DOMAIN --hosting H --json`; returns the domain object.
    fn add_domain(&self, domain: &str, hosting: &str) -> Value {
        self.json(&["domain", "add", domain, "--hosting", hosting])
    }

    fn show(&self, domain: &str, hosting: &str) -> Value {
        self.json(&["domain", "show", domain, "--hosting", hosting])
    }

    /// `domain verify --json`: exit status and the answer.
    fn verify(&self, domain: &str, hosting: &str) -> (Output, Value) {
        let out = self.cli(&["domain", "verify", domain, "--hosting", hosting, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "domain verify --json: not JSON ({e}):\n{}{}",
                text(&out.stdout),
                text(&out.stderr)
            )
        });
        (out, v)
    }

    /// Adds partner.example (or `domain`) for acme, publishes its token and
    /// verifies it now; returns the token.
    fn verified(&self, domain: &str, hosting: &str) -> String {
        let token = token_of(&self.add_domain(domain, hosting));
        self.publish(domain, &token);
        let (out, v) = self.verify(domain, hosting);
        assert_eq!(
            out.status.code(),
            Some(0),
            "verify: {v:#}\n{}",
            text(&out.stderr)
        );
        assert_eq!(v["status"], "verified", "{v:#}");
        token
    }

    /// Polls `domain show --json` until `ready` holds (panics after `timeout`).
    fn wait_domain(
        &self,
        domain: &str,
        hosting: &str,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.show(domain, hosting);
            if ready(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{domain} never got {what} within {timeout:?}; last state: {v:#}\nrelay log:\n{}",
                tail(&self.relay.log())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One message as `login`, envelope sender `from`, default swaks headers.
    fn send_as(&self, login: &str, password: &str, from: &str) -> SwaksResult {
        self.relay
            .swaks()
            .auth(login, password)
            .from(from)
            .to("someone@example.org")
            .run()
    }

    fn send(&self, from: &str) -> SwaksResult {
        self.send_as("info@acme.test", "secret", from)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn token_of(v: &Value) -> String {
    v["record"]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no record.value in {v:#}"))
        .to_string()
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn not_owned(address: &str, login: &str) -> String {
    format!("553 5.7.1 <{address}>: Sender address rejected: not owned by user {login}")
}

/// `last_check` of a domain as a time (None while never checked).
fn last_check(v: &Value) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    let t = v["last_check"].as_str()?;
    Some(
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap_or_else(|e| panic!("last_check {t:?} is not RFC 3339 ({e})")),
    )
}

fn fast_pending(c: &mut RelayConfig) {
    c.set("verification", "check_interval", "\"1s\"");
}

// ---------------------------------------------------------------- 1. add / show / list

#[test]
fn add_prints_the_record_and_show_and_list_report_it() {
    let env = Env::start(|_| {});
    let out = env.cli(&["domain", "add", PARTNER, "--hosting", "acme"]);
    assert_exit(&out, 0, "domain add");
    let human = text(&out.stdout);

    let v = env.show(PARTNER, "acme");
    for key in [
        "domain",
        "status",
        "record",
        "last_check",
        "last_error",
        "record_missing_since",
        "created_at",
        "verified_at",
    ] {
        assert!(v.get(key).is_some(), "JSON lacks {key:?}: {v:#}");
    }
    assert_eq!(v["domain"], PARTNER);
    assert_eq!(v["status"], "pending");
    assert_eq!(v["record"]["name"], RECORD);
    assert_eq!(v["record"]["type"], "TXT");
    assert!(
        v["verified_at"].is_null() && v["record_missing_since"].is_null(),
        "{v:#}"
    );
    let created = v["created_at"].as_str().expect("created_at is a string");
    chrono::DateTime::parse_from_rfc3339(created).expect("created_at is RFC 3339");
    let token = token_of(&v);
    assert!(token.len() >= 22 && token.len() <= 255, "{token}");
    assert!(
        token.bytes().all(|c| c.is_ascii_graphic()),
        "printable: {token}"
    );

    let line = format!("{RECORD}  TXT  \"{token}\"");
    assert!(human.contains(&line), "add output lacks {line:?}:\n{human}");
    assert!(
        human.contains("pending"),
        "add output lacks the status:\n{human}"
    );
    let lower = human.to_lowercase();
    assert!(
        lower.contains("propagat") && lower.contains("minutes") && lower.contains("hours"),
        "add output lacks the propagation note:\n{human}"
    );

    // show, human: the record again.
    let shown = env
        .relay
        .cli_ok(&["domain", "show", PARTNER, "--hosting", "acme"], "");
    assert!(shown.contains(&line), "show lacks {line:?}:\n{shown}");
    assert!(shown.contains("pending"), "{shown}");

    // A check, then list shows status, last check and last error.
    let (out, _) = env.verify(PARTNER, "acme");
    assert_exit(&out, 1, "verify without record");
    let listed = env
        .relay
        .cli_ok(&["domain", "list", "--hosting", "acme"], "");
    let row = listed
        .lines()
        .find(|l| l.contains(PARTNER))
        .unwrap_or_else(|| panic!("list lacks the domain:\n{listed}"));
    let checked = env.show(PARTNER, "acme");
    let last_check = checked["last_check"]
        .as_str()
        .expect("last_check set after verify");
    chrono::DateTime::parse_from_rfc3339(last_check).expect("last_check is RFC 3339");
    assert!(row.contains("pending"), "{row}");
    assert!(
        row.contains(last_check),
        "list row lacks last check {last_check}: {row}"
    );
    assert!(
        row.contains("not found"),
        "list row lacks the last error: {row}"
    );

    let list = env.json(&["domain", "list", "--hosting", "acme"]);
    let items = list.as_array().expect("list --json is an array");
    assert_eq!(items.len(), 1, "{list:#}");
    assert_eq!(items[0]["domain"], PARTNER);
    assert_eq!(items[0]["record"]["value"], token.as_str());
    assert!(
        items[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("not found"),
        "{list:#}"
    );
}

#[test]
fn add_json_carries_the_record_to_publish() {
    let env = Env::start(|_| {});
    let v = env.add_domain("Partner.Example.", "acme");
    assert_eq!(v["domain"], PARTNER, "normalised: {v:#}");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["record"]["name"], RECORD);
    assert_eq!(v["record"]["type"], "TXT");
    // Not checked yet: the key is there, and null (or, should `add` check at
    // once, an RFC 3339 time).
    match v.get("last_check") {
        Some(Value::Null) => {}
        Some(Value::String(t)) => {
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap_or_else(|e| panic!("last_check {t:?} is not RFC 3339 ({e}): {v:#}"));
        }
        other => panic!("last_check must be present, RFC 3339 or null; got {other:?}: {v:#}"),
    }
    for key in [
        "last_error",
        "record_missing_since",
        "created_at",
        "verified_at",
    ] {
        assert!(v.get(key).is_some(), "JSON lacks {key:?}: {v:#}");
    }
}

// ---------------------------------------------------------------- 2. refusals

#[test]
fn add_refuses_bad_domains_and_normalises_idn() {
    let env = Env::start(|_| {});
    env.add_domain(PARTNER, "acme");
    for (domain, why) in [
        ("acme.test", "own"),
        ("ACME.test.", "own"),
        (PARTNER, "already"),
        ("a..b", "invalid"),
        ("1.2.3.4", "IP"),
        ("localhost", "single label"),
    ] {
        let out = env.cli(&["domain", "add", domain, "--hosting", "acme"]);
        assert_exit(&out, 1, &format!("domain add {domain}"));
        let err = text(&out.stderr);
        assert!(
            err.contains(why),
            "domain add {domain}: message lacks {why:?}: {err}"
        );
    }
    let list = env.json(&["domain", "list", "--hosting", "acme"]);
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "only partner.example: {list:#}"
    );

    let idn = env.add_domain("bücher.example", "acme");
    assert_eq!(idn["domain"], "xn--bcher-kva.example", "{idn:#}");
    assert_eq!(
        idn["record"]["name"],
        "domauthvalidation.xn--bcher-kva.example"
    );
    // The Unicode and the ASCII spelling are one domain.
    let again = env.cli(&[
        "domain",
        "add",
        "xn--bcher-kva.example",
        "--hosting",
        "acme",
    ]);
    assert_exit(&again, 1, "the same IDN twice");
    let shown = env.show("bücher.example", "acme");
    assert_eq!(shown["domain"], "xn--bcher-kva.example");
}

#[test]
fn two_hostings_get_two_tokens_for_one_domain() {
    let env = Env::start(|_| {});
    env.relay.add_mailbox("beta", "bob@beta.test", "pw-beta");
    let a = token_of(&env.add_domain(PARTNER, "acme"));
    let b = token_of(&env.add_domain(PARTNER, "beta"));
    assert_ne!(a, b, "each hosting proves with its own token");

    // Only acme's token is published: acme verified, beta not (mismatch).
    env.publish(PARTNER, &a);
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "acme verify");
    assert_eq!(v["status"], "verified");
    let (out, v) = env.verify(PARTNER, "beta");
    assert_exit(&out, 1, "beta verify with acme's token");
    assert_eq!(v["status"], "pending");
    assert_eq!(v["check"]["found"], false);

    // Both tokens published as two TXT records: both hostings verified.
    env.dns().add_txt(RECORD, &[&b]);
    let (out, v) = env.verify(PARTNER, "beta");
    assert_exit(&out, 0, "beta verify with both records");
    assert_eq!(v["status"], "verified");
    let (out, _) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "acme still verified");
}

#[test]
fn unknown_hosting_or_domain_is_an_error() {
    let env = Env::start(|_| {});
    let out = env.cli(&["domain", "add", PARTNER, "--hosting", "nosuch"]);
    assert_exit(&out, 1, "add to an unknown hosting");
    let err = text(&out.stderr);
    assert!(
        err.contains("nosuch") && err.to_lowercase().contains("no hosting"),
        "the error does not say the hosting is unknown: {err}"
    );
    // show and verify (human and --json): exit 1, and stderr says that
    // partner.example is not a domain of acme.
    for args in [
        &["domain", "show", PARTNER, "--hosting", "acme"][..],
        &["domain", "show", PARTNER, "--hosting", "acme", "--json"][..],
        &["domain", "verify", PARTNER, "--hosting", "acme"][..],
        &["domain", "verify", PARTNER, "--hosting", "acme", "--json"][..],
    ] {
        let out = env.cli(args);
        assert_exit(&out, 1, &format!("{args:?} for a domain never added"));
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("{PARTNER} is not a domain of hosting acme")),
            "{args:?}: the error does not say the domain is unknown: {err}"
        );
        assert!(
            text(&out.stdout).trim().is_empty(),
            "{args:?}: stdout: {}",
            text(&out.stdout)
        );
    }
    // Nothing was created by asking.
    let list = env.json(&["domain", "list", "--hosting", "acme"]);
    assert_eq!(list, serde_json::json!([]), "{list:#}");
}

// ---------------------------------------------------------------- 3. verify outcomes

#[test]
fn verify_nxdomain_is_not_found() {
    let env = Env::start(|_| {});
    env.add_domain(PARTNER, "acme");
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 1, "verify NXDOMAIN");
    assert_eq!(v["check"]["found"], false, "{v:#}");
    assert_eq!(v["status"], "pending");
    let err = v["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("not found"), "{v:#}");
    assert!(!v["last_check"].is_null(), "{v:#}");

    // Human output says so too.
    let out = env.cli(&["domain", "verify", PARTNER, "--hosting", "acme"]);
    assert_exit(&out, 1, "verify NXDOMAIN (human)");
    assert!(
        text(&out.stdout).contains("not found"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn verify_name_without_txt_is_not_found() {
    let env = Env::start(|_| {});
    env.add_domain(PARTNER, "acme");
    env.dns().set_a(RECORD, Ipv4Addr::new(192, 0, 2, 1));
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 1, "verify a name with only an A record");
    assert_eq!(v["check"]["found"], false);
    assert_eq!(v["status"], "pending");
    assert!(
        v["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("not found"),
        "{v:#}"
    );
}

#[test]
fn verify_wrong_value_is_a_mismatch_showing_what_was_found() {
    let env = Env::start(|_| {});
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    env.publish(PARTNER, "domauth-not-the-right-value");
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 1, "verify a wrong value");
    assert_eq!(v["check"]["found"], false);
    assert_eq!(v["status"], "pending");
    let err = v["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("mismatch"), "{v:#}");
    assert!(
        err.contains("domauth-not-the-right-value"),
        "shows the found value: {v:#}"
    );
    // A prefix of the token is not the token.
    env.publish(PARTNER, &token[..token.len() - 1]);
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 1, "verify a truncated token");
    assert!(
        v["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("mismatch"),
        "{v:#}"
    );
}

#[test]
fn verify_accepts_quotes_and_spaces_around_the_value() {
    let env = Env::start(|_| {});
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    env.publish(PARTNER, &format!("\"  {token}  \""));
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "verify a quoted value with spaces");
    assert_eq!(v["check"]["found"], true, "{v:#}");
    assert_eq!(v["status"], "verified");
    assert!(v["last_error"].is_null(), "{v:#}");
    assert!(v["verified_at"].is_string(), "{v:#}");

    let human = env
        .relay
        .cli_ok(&["domain", "verify", PARTNER, "--hosting", "acme"], "");
    assert!(human.contains("verified"), "{human}");
}

#[test]
fn verify_joins_the_strings_of_one_txt_record() {
    let env = Env::start(|_| {});
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    let (a, b) = token.split_at(token.len() / 2);
    let (b, c) = b.split_at(b.len() / 2);
    // An unrelated TXT record next to it does not disturb the match.
    env.dns().set_txt(RECORD, &["v=spf1 -all"]);
    env.dns().add_txt(RECORD, &[a, b, c]);
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "verify a TXT of several strings");
    assert_eq!(v["check"]["found"], true, "{v:#}");
    assert_eq!(v["status"], "verified");
}

#[test]
fn verify_follows_a_cname() {
    let env = Env::start(|_| {});
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    env.dns().set_cname(RECORD, "tokens.provider.example");
    env.dns().set_txt("tokens.provider.example", &[&token]);
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "verify through a CNAME");
    assert_eq!(v["check"]["found"], true, "{v:#}");
    assert_eq!(v["status"], "verified");
}

#[test]
fn dns_server_down_is_a_dns_error_and_the_domain_stays_pending() {
    let mut env = Env::start(|_| {});
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    env.publish(PARTNER, &token);
    env.dns.take().expect("dns").stop();
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 1, "verify with the DNS server down");
    assert_eq!(v["check"]["found"], false, "{v:#}");
    assert_eq!(v["status"], "pending", "{v:#}");
    let err = v["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("dns error"), "{v:#}");
    assert!(
        !err.contains("not found") && !err.contains("mismatch"),
        "{v:#}"
    );
    // The relay keeps serving.
    env.send("info@acme.test").assert_code(0);
}

#[test]
fn publish_then_verify_right_after_a_failed_check() {
    let env = Env::start(|_| {});
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    // Several negative answers first (NXDOMAIN, then no TXT)...
    for _ in 0..3 {
        let (out, _) = env.verify(PARTNER, "acme");
        assert_exit(&out, 1, "verify before publishing");
    }
    env.dns().set_a(RECORD, Ipv4Addr::new(192, 0, 2, 1));
    let (out, _) = env.verify(PARTNER, "acme");
    assert_exit(&out, 1, "verify with only an A record");
    // ...and the record published now is found by the very next check.
    env.publish(PARTNER, &token);
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "verify right after publishing");
    assert_eq!(v["status"], "verified", "{v:#}");
}

// ---------------------------------------------------------------- 4. background task

#[test]
fn background_task_verifies_a_published_record() {
    let env = Env::start(fast_pending);
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    // Give the task a first (negative) look, then publish.
    env.wait_domain(PARTNER, "acme", "a first check", BACKGROUND, |v| {
        !v["last_check"].is_null()
    });
    env.publish(PARTNER, &token);
    let v = env.wait_domain(PARTNER, "acme", "verified", BACKGROUND, |v| {
        v["status"] == "verified"
    });
    assert!(
        v["verified_at"].is_string() && v["last_error"].is_null(),
        "{v:#}"
    );
    assert!(
        env.relay.log().contains("domain_check"),
        "the check is logged"
    );
}

#[test]
fn pending_expiry_fails_and_only_manual_verify_revives() {
    let env = Env::start(|c| {
        fast_pending(c);
        c.set("verification", "recheck_interval", "\"1s\"").set(
            "verification",
            "pending_expiry",
            "\"2s\"",
        );
    });
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    // A witness: a verified domain the task re-checks every second, to
    // see the task run while the failed domain stays untouched.
    const WITNESS: &str = "witness.example";
    env.verified(WITNESS, "acme");
    let v = env.wait_domain(PARTNER, "acme", "failed", BACKGROUND, |v| {
        v["status"] == "failed"
    });
    assert!(
        !v["last_error"].is_null(),
        "a failed domain says why: {v:#}"
    );

    // The record appears late: the task does not re-check failed domains.
    env.publish(PARTNER, &token);
    let before = env.show(PARTNER, "acme");
    // Three more rounds of the task (the witness checked three more times,
    // each at least recheck_interval = check_interval after the previous
    // one): a failed domain treated as due would have been checked too.
    let mut seen = last_check(&env.show(WITNESS, "acme"));
    for round in 1..=3 {
        let v = env.wait_domain(
            WITNESS,
            "acme",
            &format!("re-check {round}"),
            BACKGROUND,
            |v| last_check(v) > seen,
        );
        assert_eq!(v["status"], "verified", "{v:#}");
        seen = last_check(&v);
    }
    let after = env.show(PARTNER, "acme");
    assert_eq!(
        after["status"], "failed",
        "the task revived a failed domain: {after:#}"
    );
    assert_eq!(
        after["last_check"], before["last_check"],
        "a failed domain was re-checked"
    );

    let out = env.cli(&[
        "account",
        "add",
        "sales@partner.example",
        "--hosting",
        "acme",
    ]);
    assert_exit(&out, 1, "account add in a failed domain");

    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "manual verify of a failed domain");
    assert_eq!(v["status"], "verified", "{v:#}");
    assert_eq!(v["check"]["found"], true);
}

#[test]
fn background_dns_error_keeps_the_domain_pending() {
    // The DNS server down while the background task runs: dns errors, the
    // domain stays pending (a temporary error is no verdict).
    let mut env = Env::start(fast_pending);
    env.add_domain(PARTNER, "acme");
    env.dns.take().expect("dns").stop();
    let v = env.wait_domain(PARTNER, "acme", "a dns error", BACKGROUND, |v| {
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("dns error"))
    });
    assert_eq!(v["status"], "pending", "{v:#}");
}

// ---------------------------------------------------------------- 5. revocation

#[test]
fn revocation_after_grace_and_revival() {
    // A grace period no test run outlasts while the in-grace message is
    // checked; then a restart with a short one lets it run out.
    let mut env = Env::start(|c| {
        c.set("verification", "check_interval", "\"1s\"")
            .set("verification", "recheck_interval", "\"1s\"")
            .set("verification", "grace", "\"1h\"");
    });
    let token = env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.send("sales@partner.example").assert_code(0);

    env.dns().remove(RECORD);
    let v = env.wait_domain(PARTNER, "acme", "record_missing_since", BACKGROUND, |v| {
        !v["record_missing_since"].is_null()
    });
    assert_eq!(v["status"], "verified", "still usable during grace: {v:#}");
    let since = v["record_missing_since"].as_str().expect("timestamp");
    chrono::DateTime::parse_from_rfc3339(since).expect("RFC 3339");
    let shown = env
        .relay
        .cli_ok(&["domain", "show", PARTNER, "--hosting", "acme"], "");
    assert!(shown.contains("missing since"), "show warns: {shown}");
    // Within grace, the account still works.
    env.send("sales@partner.example").assert_code(0);
    let v = env.show(PARTNER, "acme");
    assert_eq!(v["status"], "verified", "{v:#}");
    assert!(!v["record_missing_since"].is_null(), "{v:#}");

    // The same relay and store with a 1 s grace: the clock that started
    // above has run out at the next re-check.
    env.relay.config.set("verification", "grace", "\"1s\"");
    env.relay.restart();
    let v = env.wait_domain(PARTNER, "acme", "failed", BACKGROUND, |v| {
        v["status"] == "failed"
    });
    assert!(
        v["last_error"].as_str().unwrap_or("").contains("missing"),
        "{v:#}"
    );
    env.send("sales@partner.example")
        .assert_code(23)
        .assert_contains(&not_owned("sales@partner.example", "info@acme.test"));
    // Accounts are kept.
    let accounts = env.json(&["account", "list", "--hosting", "acme"]);
    assert_eq!(accounts.as_array().map(Vec::len), Some(1), "{accounts:#}");

    env.publish(PARTNER, &token);
    let (out, v) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "verify after revocation");
    assert_eq!(v["status"], "verified");
    assert!(v["record_missing_since"].is_null(), "{v:#}");
    env.send("sales@partner.example").assert_code(0);
    // Before, during grace and after revival: three relayed, and not the
    // one refused after revocation.
    env.sink.wait_for(3, WAIT);
    env.relay.wait_queue_empty(WAIT);
    let got = env.sink.messages();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got.iter().all(|m| m.mail_from == "sales@partner.example"),
        "{got:?}"
    );
}

#[test]
fn dns_error_neither_starts_nor_resets_the_grace_clock() {
    let mut env = Env::start(|c| {
        c.set("verification", "recheck_interval", "\"1s\"")
            .set("verification", "grace", "\"2s\"");
    });
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.dns.take().expect("dns").stop();
    let v = env.wait_domain(PARTNER, "acme", "a dns error", BACKGROUND, |v| {
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("dns error"))
    });
    assert!(
        v["record_missing_since"].is_null(),
        "a dns error started the clock: {v:#}"
    );
    // Well past the grace period (2 s), with dns errors all along: still
    // verified. Waited for by the checks' own times, not by sleeping (a
    // failed domain is no longer checked: stop waiting then, too).
    let first = last_check(&v).expect("last_check of the dns error");
    let v = env.wait_domain(
        PARTNER,
        "acme",
        "a check 4 s after the first dns error",
        BACKGROUND,
        |v| {
            v["status"] != "verified"
                || last_check(v).is_some_and(|t| t >= first + chrono::Duration::seconds(4))
        },
    );
    assert_eq!(
        v["status"], "verified",
        "dns errors revoked the domain: {v:#}"
    );
    assert!(
        v["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("dns error")),
        "{v:#}"
    );
    assert!(v["record_missing_since"].is_null(), "{v:#}");
    env.send("sales@partner.example").assert_code(0);
}

#[test]
fn record_back_within_grace_resets_the_clock() {
    let env = Env::start(|c| {
        c.set("verification", "recheck_interval", "\"1s\"")
            .set("verification", "grace", "\"1h\"");
    });
    let token = env.verified(PARTNER, "acme");
    env.dns().remove(RECORD);
    env.wait_domain(PARTNER, "acme", "record_missing_since", BACKGROUND, |v| {
        !v["record_missing_since"].is_null()
    });
    env.publish(PARTNER, &token);
    let v = env.wait_domain(PARTNER, "acme", "the clock reset", BACKGROUND, |v| {
        v["record_missing_since"].is_null()
    });
    assert_eq!(v["status"], "verified");
}

// ---------------------------------------------------------------- 6. accounts

#[test]
fn accounts_only_in_verified_domains() {
    let env = Env::start(|_| {});
    let token = token_of(&env.add_domain(PARTNER, "acme"));
    let out = env.cli(&[
        "account",
        "add",
        "sales@partner.example",
        "--hosting",
        "acme",
    ]);
    assert_exit(&out, 1, "account add while pending");
    assert!(
        text(&out.stderr).contains("pending") || text(&out.stderr).contains("verified"),
        "{}",
        text(&out.stderr)
    );

    env.publish(PARTNER, &token);
    let (out, _) = env.verify(PARTNER, "acme");
    assert_exit(&out, 0, "verify");
    let added = env.json(&[
        "account",
        "add",
        "Sales@Partner.Example",
        "--hosting",
        "acme",
    ]);
    assert_eq!(added[0]["address"], "sales@partner.example", "{added:#}");
    assert_eq!(added[0]["domain"], PARTNER);
    assert!(added[0]["created_at"].is_string());

    for addr in [
        "x@other.example",
        "x@sub.partner.example",
        "x@acme.test",
        "not-an-address",
    ] {
        let out = env.cli(&["account", "add", addr, "--hosting", "acme"]);
        assert_exit(&out, 1, &format!("account add {addr}"));
        assert!(!text(&out.stderr).trim().is_empty());
    }
    // Same address twice: refused or idempotent, never two rows.
    let _ = env.cli(&[
        "account",
        "add",
        "sales@partner.example",
        "--hosting",
        "acme",
    ]);
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "billing@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.verified("other.example", "acme");
    env.relay.cli_ok(
        &["account", "add", "x@other.example", "--hosting", "acme"],
        "",
    );

    let all = env.json(&["account", "list", "--hosting", "acme"]);
    let mut addrs: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["address"].as_str())
        .collect();
    addrs.sort();
    assert_eq!(
        addrs,
        [
            "billing@partner.example",
            "sales@partner.example",
            "x@other.example"
        ]
    );
    let some = env.json(&["account", "list", "--hosting", "acme", "--domain", PARTNER]);
    let mut addrs: Vec<&str> = some
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["address"].as_str())
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["billing@partner.example", "sales@partner.example"]);
    let human = env.relay.cli_ok(
        &["account", "list", "--hosting", "acme", "--domain", PARTNER],
        "",
    );
    assert!(
        human.contains("sales@partner.example") && !human.contains("x@other.example"),
        "{human}"
    );

    env.send("billing@partner.example").assert_code(0);
    env.relay.cli_ok(
        &[
            "account",
            "delete",
            "billing@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    let some = env.json(&["account", "list", "--hosting", "acme", "--domain", PARTNER]);
    assert_eq!(some.as_array().map(Vec::len), Some(1), "{some:#}");
    env.send("billing@partner.example")
        .assert_code(23)
        .assert_contains(&not_owned("billing@partner.example", "info@acme.test"));
    let out = env.cli(&[
        "account",
        "delete",
        "billing@partner.example",
        "--hosting",
        "acme",
    ]);
    assert_exit(&out, 1, "delete an account twice");
}

// ---------------------------------------------------------------- 7. SMTP side

#[test]
fn smtp_envelope_and_headers_for_an_authorized_account() {
    let env = Env::start(|_| {});
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.relay
        .cli_ok(&["mailbox", "add", "info2@acme.test"], "secret2\n");

    // Envelope and (swaks's default) From header both sales@.
    env.send("sales@partner.example").assert_code(0);
    let got = env.sink.wait_for(1, WAIT);
    assert_eq!(got[0].mail_from, "sales@partner.example");

    // Another address of the domain.
    env.send("other@partner.example")
        .assert_code(23)
        .assert_contains(&not_owned("other@partner.example", "info@acme.test"));
    // Case does not matter.
    env.send("SALES@Partner.EXAMPLE").assert_code(0);

    // From header the account, envelope the mailbox.
    env.relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from("info@acme.test")
        .to("someone@example.org")
        .header("From: Sales <sales@partner.example>")
        .run()
        .assert_code(0);
    // From header another address of the domain.
    env.relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from("info@acme.test")
        .to("someone@example.org")
        .header("From: other@partner.example")
        .run()
        .assert_code(REFUSED_AT_END_OF_DATA)
        .assert_contains(
            "550 5.7.1 <other@partner.example>: From header address rejected: not owned by user info@acme.test",
        );
    // Sender header foreign.
    env.relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from("info@acme.test")
        .to("someone@example.org")
        .header("From: sales@partner.example")
        .header("Sender: other@partner.example")
        .run()
        .assert_code(REFUSED_AT_END_OF_DATA)
        .assert_contains(
            "550 5.7.1 <other@partner.example>: Sender header address rejected: not owned by user info@acme.test",
        );
    // Sender header the account: fine.
    env.relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from("info@acme.test")
        .to("someone@example.org")
        .header("Sender: sales@partner.example")
        .run()
        .assert_code(0);

    // Every mailbox of acme may use the account.
    env.send_as("info2@acme.test", "secret2", "sales@partner.example")
        .assert_code(0);

    env.sink.wait_for(5, WAIT);
    env.relay.wait_queue_empty(WAIT);
    let got = env.sink.messages();
    assert_eq!(
        got.len(),
        5,
        "only the accepted messages are relayed: {got:?}"
    );
    assert!(
        got.iter()
            .all(|m| !m.text().contains("other@partner.example")),
        "a refused sender was relayed"
    );
    let log = env.relay.log();
    assert!(
        log.lines()
            .any(|l| l.contains("other@partner.example") && l.contains("not a listed account")),
        "the refusal and its reason are logged:\n{}",
        tail(&log)
    );
}

#[test]
fn null_sender_message_still_has_its_headers_checked() {
    let env = Env::start(|_| {});
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from("<>")
        .to("someone@example.org")
        .header("From: sales@partner.example")
        .run()
        .assert_code(0);
    env.relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from("<>")
        .to("someone@example.org")
        .header("From: other@partner.example")
        .run()
        .assert_code(REFUSED_AT_END_OF_DATA)
        .assert_contains("550 5.7.1 <other@partner.example>: From header address rejected");
    env.sink.wait_for(1, WAIT);
    env.relay.wait_queue_empty(WAIT);
    let got = env.sink.messages();
    assert_eq!(got.len(), 1, "only the message with an owned From: {got:?}");
    assert!(
        matches!(got[0].mail_from.as_str(), "" | "<>"),
        "{:?}",
        got[0].mail_from
    );
}

#[test]
fn another_hostings_mailbox_cannot_use_the_account() {
    let env = Env::start(|_| {});
    env.relay.add_mailbox("beta", "bob@beta.test", "pw-beta");
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    let refused = not_owned("sales@partner.example", "bob@beta.test");
    env.send_as("bob@beta.test", "pw-beta", "sales@partner.example")
        .assert_code(23)
        .assert_contains(&refused);
    // From header likewise.
    env.relay
        .swaks()
        .auth("bob@beta.test", "pw-beta")
        .from("bob@beta.test")
        .to("someone@example.org")
        .header("From: sales@partner.example")
        .run()
        .assert_code(REFUSED_AT_END_OF_DATA)
        .assert_contains("550 5.7.1 <sales@partner.example>: From header address rejected: not owned by user bob@beta.test");

    // beta adds partner.example too: its own token, still pending for beta
    // although acme's record is published.
    let beta = env.add_domain(PARTNER, "beta");
    let (out, v) = env.verify(PARTNER, "beta");
    assert_exit(&out, 1, "beta verify with acme's record only");
    assert_eq!(v["status"], "pending", "{v:#}");
    assert!(
        v["last_error"].as_str().unwrap_or("").contains("mismatch"),
        "{v:#}"
    );
    assert_ne!(token_of(&beta), token_of(&env.show(PARTNER, "acme")));
    let out = env.cli(&[
        "account",
        "add",
        "sales@partner.example",
        "--hosting",
        "beta",
    ]);
    assert_exit(&out, 1, "beta account while pending");
    env.send_as("bob@beta.test", "pw-beta", "sales@partner.example")
        .assert_code(23)
        .assert_contains(&refused);
    // acme is untouched.
    env.send("sales@partner.example").assert_code(0);
    // And bob still sends as himself.
    env.send_as("bob@beta.test", "pw-beta", "bob@beta.test")
        .assert_code(0);
}

#[test]
fn accounts_of_a_pending_domain_are_not_usable() {
    // Accounts can only be added once verified; after a re-add the domain
    // is pending again and nothing carries over.
    let env = Env::start(|_| {});
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.relay.cli_ok(
        &["domain", "delete", PARTNER, "--hosting", "acme", "--yes"],
        "",
    );
    env.add_domain(PARTNER, "acme");
    let accounts = env.json(&["account", "list", "--hosting", "acme"]);
    assert_eq!(accounts.as_array().map(Vec::len), Some(0), "{accounts:#}");
    env.send("sales@partner.example")
        .assert_code(23)
        .assert_contains(&not_owned("sales@partner.example", "info@acme.test"));
}

// ---------------------------------------------------------------- 8. delete

#[test]
fn delete_asks_for_confirmation() {
    let env = Env::start(|_| {});
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "billing@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.send("sales@partner.example").assert_code(0);
    let prompt = format!("Delete {PARTNER} and its 2 authorized accounts? [y/N] ");

    // "n": nothing deleted.
    let out = env
        .relay
        .cli(&["domain", "delete", PARTNER, "--hosting", "acme"], "n\n");
    assert!(!out.status.success(), "answer n: must fail");
    assert!(
        text(&out.stderr).starts_with(&prompt),
        "expected the prompt {prompt:?}: {}",
        text(&out.stderr)
    );
    assert_eq!(env.show(PARTNER, "acme")["status"], "verified");
    // No answer at all (stdin closed): nothing deleted.
    let out = env
        .relay
        .cli(&["domain", "delete", PARTNER, "--hosting", "acme"], "");
    assert!(!out.status.success(), "no answer: must fail");
    env.send("sales@partner.example").assert_code(0);

    // "y": deleted, with the prompt on stderr (not stdout).
    let out = env
        .relay
        .cli(&["domain", "delete", PARTNER, "--hosting", "acme"], "y\n");
    assert_exit(&out, 0, "answer y");
    assert!(
        text(&out.stderr).starts_with(&prompt),
        "expected the prompt {prompt:?} on stderr: {}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("[y/N]"), "prompt not on stdout");
    assert_exit(
        &env.cli(&["domain", "show", PARTNER, "--hosting", "acme"]),
        1,
        "show after delete",
    );
    let accounts = env.json(&["account", "list", "--hosting", "acme"]);
    assert_eq!(
        accounts.as_array().map(Vec::len),
        Some(0),
        "accounts deleted too: {accounts:#}"
    );
    // The by-address index is cleaned too: nobody "owns" sales@ any more.
    env.relay.add_mailbox("beta", "bob@beta.test", "pw-beta");
    let out = env.cli(&[
        "explain",
        "--login",
        "bob@beta.test",
        "--sender",
        "sales@partner.example",
    ]);
    assert_exit(&out, 1, "explain after delete");
    let said = text(&out.stdout);
    assert!(said.contains("refused"), "{said}");
    assert!(!said.contains("another hosting"), "stale index: {said}");
    env.send("sales@partner.example")
        .assert_code(23)
        .assert_contains(&not_owned("sales@partner.example", "info@acme.test"));
}

#[test]
fn delete_with_yes_does_not_ask() {
    let env = Env::start(|_| {});
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    let out = env.relay.cli(
        &["domain", "delete", PARTNER, "--hosting", "acme", "--yes"],
        "",
    );
    assert_exit(&out, 0, "delete --yes");
    assert!(
        !text(&out.stderr).contains("[y/N]"),
        "asked anyway: {}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("[y/N]"));
    env.send("sales@partner.example")
        .assert_code(23)
        .assert_contains(&not_owned("sales@partner.example", "info@acme.test"));
    let prompt_one = env.relay.cli(
        &["domain", "delete", PARTNER, "--hosting", "acme", "--yes"],
        "",
    );
    assert_exit(&prompt_one, 1, "delete a domain that is gone");
}

#[test]
fn delete_prompt_singular() {
    let env = Env::start(|_| {});
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    let out = env
        .relay
        .cli(&["domain", "delete", PARTNER, "--hosting", "acme"], "N\n");
    assert!(!out.status.success());
    // The prompt is the first thing on stderr, exactly; then the refusal.
    let err = text(&out.stderr);
    let prompt = format!("Delete {PARTNER} and its 1 authorized account? [y/N] ");
    assert!(
        err.starts_with(&prompt),
        "expected the prompt {prompt:?}, got {err:?}"
    );
    assert_eq!(
        env.show(PARTNER, "acme")["status"],
        "verified",
        "not deleted"
    );
}

// ---------------------------------------------------------------- 9. explain

#[test]
fn explain_gives_the_decision_and_reason() {
    let env = Env::start(|_| {});
    env.relay.add_mailbox("beta", "bob@beta.test", "pw-beta");
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.add_domain("pending.example", "acme");

    let explain =
        |login: &str, sender: &str| env.cli(&["explain", "--login", login, "--sender", sender]);

    let out = explain("info@acme.test", "sales@partner.example");
    assert_exit(&out, 0, "explain allowed");
    let line = text(&out.stdout);
    assert_eq!(line.trim().lines().count(), 1, "one line: {line}");
    assert!(line.to_lowercase().contains("allowed"), "{line}");
    let own = explain("info@acme.test", "info@acme.test");
    assert_exit(&own, 0, "explain own address");

    for (login, sender, words) in [
        ("info@acme.test", "x@pending.example", "pending"),
        (
            "info@acme.test",
            "other@partner.example",
            "not a listed account",
        ),
        ("info@acme.test", "someone@unknown.example", "unknown"),
        ("bob@beta.test", "sales@partner.example", "another hosting"),
        ("nobody@acme.test", "info@acme.test", "unknown login"),
    ] {
        let out = explain(login, sender);
        assert_exit(&out, 1, &format!("explain {login} {sender}"));
        let said = text(&out.stdout) + &text(&out.stderr);
        assert!(
            said.to_lowercase().contains(words),
            "explain {login} as {sender}: lacks {words:?}: {said}"
        );
        assert!(said.to_lowercase().contains("refused"), "{said}");
    }

    let j = env.json(&[
        "explain",
        "--login",
        "info@acme.test",
        "--sender",
        "sales@partner.example",
    ]);
    assert_eq!(j["allowed"], true, "{j:#}");
    assert!(j["reason"].as_str().is_some_and(|r| !r.is_empty()), "{j:#}");
    let out = env.cli(&[
        "explain",
        "--login",
        "bob@beta.test",
        "--sender",
        "sales@partner.example",
        "--json",
    ]);
    assert_exit(&out, 1, "explain --json refused");
    let j: Value = serde_json::from_slice(&out.stdout).expect("explain --json");
    assert_eq!(j["allowed"], false, "{j:#}");
    assert!(
        j["reason"]
            .as_str()
            .is_some_and(|r| r.contains("another hosting")),
        "{j:#}"
    );
}

#[test]
fn explain_reports_a_failed_domain() {
    let env = Env::start(|c| {
        c.set("verification", "recheck_interval", "\"1s\"")
            .set("verification", "grace", "\"1s\"");
    });
    env.verified(PARTNER, "acme");
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.dns().remove(RECORD);
    env.wait_domain(PARTNER, "acme", "failed", BACKGROUND, |v| {
        v["status"] == "failed"
    });
    let out = env.cli(&[
        "explain",
        "--login",
        "info@acme.test",
        "--sender",
        "sales@partner.example",
    ]);
    assert_exit(&out, 1, "explain a failed domain's account");
    assert!(
        text(&out.stdout).contains("failed"),
        "{}",
        text(&out.stdout)
    );
}
