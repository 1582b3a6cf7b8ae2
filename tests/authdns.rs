//! Verification through the authoritative servers, and SPF/DMARC advice (SPEC §9), end to
//! end: the real `domauth` binary, real DNS servers (hickory, in process), the real CLI.
//!
//! Authoritative mode (`dns.nameservers = []`) reads the "system resolver" from
//! `dns.resolv_conf`, which has no port numbers, and asks the servers of the NS set on
//! port 53. So these DNS servers listen on port 53 of loopback addresses of their own
//! (127.x.y.z, all local on Linux; binding port 53 needs root, which the test run has).
//! The "recursive" server serves the zone walk (SOA, NS, the servers' A records) but not
//! the validation record: it answers NXDOMAIN for it, as a resolver with a stale negative
//! cache would.
//!
//! Nothing here asserts on wall-clock time.

mod common;

use std::{
    net::Ipv4Addr,
    process::Output,
    sync::atomic::{AtomicU8, Ordering},
};

use common::{Relay, RelayConfig, dns::TestDns, free_port};
use serde_json::Value;

const PARTNER: &str = "partner.example";
const RECORD: &str = "domauthvalidation.partner.example";
const SPF_INCLUDE: &str = "_spf.hosting.example";

/// A loopback address no other test of this run uses: 127.<pid>.<n>.<host>.
fn loopback(host: u8) -> Ipv4Addr {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // 127.0.0.x and 127.0.1.x are the usual local resolvers' addresses: stay clear.
    let pid = (std::process::id() % 200) as u8 + 20;
    Ipv4Addr::new(127, pid, n, host)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Env {
    // Field order = drop order: the relay stops before the DNS servers.
    relay: Relay,
    _servers: Vec<TestDns>,
    /// Holds the relay's resolv.conf in authoritative mode.
    _resolv: Option<tempfile::TempDir>,
}

impl Env {
    fn start(config: RelayConfig, servers: Vec<TestDns>) -> Env {
        Env::start_with_resolv(config, servers, None)
    }

    fn start_with_resolv(
        config: RelayConfig,
        servers: Vec<TestDns>,
        resolv: Option<tempfile::TempDir>,
    ) -> Env {
        let relay = Relay::start_with(config);
        relay.add_mailbox("acme", "info@acme.test", "secret");
        Env {
            relay,
            _servers: servers,
            _resolv: resolv,
        }
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.relay.cli_ok(&args, "");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
    }

    /// `domain add` for acme; returns the token.
    fn add(&self, domain: &str) -> String {
        let v = self.json(&["domain", "add", domain, "--hosting", "acme"]);
        v["record"]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no record.value in {v:#}"))
            .to_string()
    }

    /// `domain verify --json`: exit status and the answer.
    fn verify(&self, domain: &str) -> (Output, Value) {
        let out = self.relay.cli(
            &["domain", "verify", domain, "--hosting", "acme", "--json"],
            "",
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "domain verify --json: not JSON ({e}):\n{}{}",
                text(&out.stdout),
                text(&out.stderr)
            )
        });
        (out, v)
    }

    fn show(&self, domain: &str) -> Value {
        self.json(&["domain", "show", domain, "--hosting", "acme"])
    }

    fn show_text(&self, domain: &str) -> String {
        self.relay
            .cli_ok(&["domain", "show", domain, "--hosting", "acme"], "")
    }
}

/// A relay in authoritative mode whose system resolver is `recursive` (its resolv.conf
/// lives in the returned directory).
fn authoritative_config(recursive: &TestDns) -> (RelayConfig, tempfile::TempDir) {
    let mut config = RelayConfig::new(free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\n", recursive.addr().ip()))
        .expect("write resolv.conf");
    config
        .set("dns", "nameservers", "[]")
        .set(
            "dns",
            "resolv_conf",
            &format!("{:?}", resolv.display().to_string()),
        )
        .set("dns", "timeout", "\"2s\"");
    (config, dir)
}

/// The "recursive" server: zone partner.example with NS ns1/ns2 at these addresses and
/// no validation record.
fn recursive_for(ns: &[(&str, Ipv4Addr)]) -> TestDns {
    let recursive = TestDns::start_on(PARTNER, loopback(1));
    let names: Vec<&str> = ns.iter().map(|(n, _)| *n).collect();
    recursive.set_ns(&names);
    for (name, ip) in ns {
        recursive.set_a(name, *ip);
    }
    recursive
}

fn servers(v: &Value) -> Vec<(String, String, bool)> {
    v["servers"]
        .as_array()
        .unwrap_or_else(|| panic!("no servers in {v:#}"))
        .iter()
        .map(|s| {
            (
                s["server"].as_str().unwrap_or("").to_string(),
                s["outcome"].as_str().unwrap_or("").to_string(),
                s["authoritative"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn a_stale_negative_cache_does_not_hide_a_published_record() {
    let (ip1, ip_down) = (loopback(2), loopback(3));
    let auth = TestDns::start_on(PARTNER, ip1);
    // ns2's address has no server: it is down.
    let recursive = recursive_for(&[("ns1", ip1), ("ns2", ip_down)]);
    let (config, resolv) = authoritative_config(&recursive);
    let env = Env::start_with_resolv(config, vec![auth, recursive], Some(resolv));
    let token = env.add(PARTNER);
    env._servers[0].set_txt(RECORD, &[&token]);

    let (out, v) = env.verify(PARTNER);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify: {v:#}\n{}\nlog:\n{}",
        text(&out.stderr),
        env.relay.log()
    );
    assert_eq!(v["status"], "verified", "{v:#}");
    assert_eq!(v["zone"], PARTNER, "{v:#}");
    let got = servers(&v);
    assert_eq!(got.len(), 2, "{v:#}");
    assert_eq!(
        got[0],
        (
            format!("ns1.partner.example ({ip1})"),
            "verified".into(),
            true
        ),
        "{v:#}"
    );
    assert_eq!(
        got[1].0,
        format!("ns2.partner.example ({ip_down})"),
        "{v:#}"
    );
    assert_eq!(got[1].1, "dns error", "{v:#}");

    // `domain show` reports the same, in JSON and in words.
    let shown = env.show(PARTNER);
    assert_eq!(servers(&shown), got, "{shown:#}");
    let words = env.show_text(PARTNER);
    assert!(
        words.contains(&format!("ns1.partner.example ({ip1}): verified")),
        "{words}"
    );
    assert!(
        words.contains(&format!("ns2.partner.example ({ip_down}): dns error")),
        "{words}"
    );
}

#[test]
fn authoritative_servers_that_disagree_are_each_reported() {
    let (ip1, ip2) = (loopback(2), loopback(3));
    let ns1 = TestDns::start_on(PARTNER, ip1);
    let ns2 = TestDns::start_on(PARTNER, ip2);
    let recursive = recursive_for(&[("ns1", ip1), ("ns2", ip2)]);
    let (config, resolv) = authoritative_config(&recursive);
    let env = Env::start_with_resolv(config, vec![ns1, ns2, recursive], Some(resolv));
    let token = env.add(PARTNER);
    let (ns1, ns2, recursive) = (&env._servers[0], &env._servers[1], &env._servers[2]);
    // The recursive server even has the right value: it must not be what is asked.
    recursive.set_txt(RECORD, &[&token]);

    // Neither authoritative server has it: not found, said by each.
    let (out, v) = env.verify(PARTNER);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert_eq!(v["status"], "pending", "{v:#}");
    let last_error = v["last_error"].as_str().unwrap_or("");
    assert!(last_error.starts_with("not found"), "{v:#}");
    assert!(last_error.contains("NXDOMAIN"), "{v:#}");
    let got = servers(&v);
    assert_eq!(got.len(), 2, "{v:#}");
    assert!(
        got.iter().all(|(_, o, aa)| o == "not found" && *aa),
        "{v:#}"
    );

    // ns1 has an old value, ns2 none: a mismatch, showing what was found.
    ns1.set_txt(RECORD, &["old-token"]);
    let (out, v) = env.verify(PARTNER);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert!(
        v["last_error"]
            .as_str()
            .unwrap_or("")
            .starts_with("mismatch: found \"old-token\""),
        "{v:#}"
    );
    let outcomes: Vec<String> = servers(&v).into_iter().map(|s| s.1).collect();
    assert_eq!(outcomes, ["mismatch", "not found"], "{v:#}");

    // ns2 gets the new value first (ns1 lags): one right answer verifies.
    ns2.set_txt(RECORD, &[&format!("\"{token}\"")]);
    let (out, v) = env.verify(PARTNER);
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    assert_eq!(v["status"], "verified", "{v:#}");
    let outcomes: Vec<String> = servers(&v).into_iter().map(|s| s.1).collect();
    assert_eq!(outcomes, ["mismatch", "verified"], "{v:#}");
}

#[test]
fn a_cname_into_another_zone_is_followed_to_that_zones_servers() {
    let (ip_p, ip_o) = (loopback(2), loopback(3));
    let partner = TestDns::start_on(PARTNER, ip_p);
    let other = TestDns::start_on("other.example", ip_o);
    // The system resolver knows both zones.
    let recursive = TestDns::start_zones_on(&[PARTNER, "other.example"], loopback(1));
    recursive.set_ns(&["ns1"]);
    recursive.set_a("ns1", ip_p);
    recursive.set_a("ns.other.example.", ip_o);
    let (config, resolv) = authoritative_config(&recursive);
    let env = Env::start_with_resolv(config, vec![partner, other, recursive], Some(resolv));
    let token = env.add(PARTNER);
    env._servers[0].set_cname(RECORD, "tok.other.example.");
    env._servers[1].set_txt("tok", &[&token]);

    let (out, v) = env.verify(PARTNER);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{v:#}\nlog:\n{}",
        env.relay.log()
    );
    assert_eq!(v["zone"], "other.example", "{v:#}");
    let got = servers(&v);
    assert_eq!(
        got,
        [(
            format!("ns.other.example ({ip_o})"),
            "verified".into(),
            true
        )],
        "{v:#}"
    );
    let detail = v["servers"][0]["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("via CNAME domauthvalidation.partner.example → tok.other.example"),
        "{v:#}"
    );
}

#[test]
fn an_answer_too_big_for_udp_is_fetched_over_tcp() {
    let ip1 = loopback(2);
    let auth = TestDns::start_on(PARTNER, ip1);
    let recursive = recursive_for(&[("ns1", ip1)]);
    let (config, resolv) = authoritative_config(&recursive);
    let env = Env::start_with_resolv(config, vec![auth, recursive], Some(resolv));
    let token = env.add(PARTNER);
    let auth = &env._servers[0];
    // Well past any UDP payload size (512 bytes, 1232 with EDNS): the answer comes
    // truncated over UDP and whole over TCP.
    let filler = "x".repeat(255);
    auth.set_txt(RECORD, &[&filler, &filler]);
    for _ in 0..8 {
        auth.add_txt(RECORD, &[&filler, &filler]);
    }
    auth.add_txt(RECORD, &[&token]);

    let (out, v) = env.verify(PARTNER);
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    let outcomes: Vec<String> = servers(&v).into_iter().map(|s| s.1).collect();
    assert_eq!(outcomes, ["verified"], "{v:#}");
}

#[test]
fn a_zone_the_system_resolver_cannot_find_is_a_dns_error() {
    // The "system resolver" serves another zone only: it refuses partner.example.
    let recursive = TestDns::start_on("other.example", loopback(1));
    let (config, resolv) = authoritative_config(&recursive);
    let env = Env::start_with_resolv(config, vec![recursive], Some(resolv));
    env.add(PARTNER);
    let (out, v) = env.verify(PARTNER);
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    assert_eq!(v["status"], "pending", "{v:#}");
    let last_error = v["last_error"].as_str().unwrap_or("");
    assert!(
        last_error
            .starts_with("dns error: looking for the zone of domauthvalidation.partner.example"),
        "{v:#}"
    );
    assert_eq!(v["servers"], serde_json::json!([]), "{v:#}");
}

// ------------------------------------------------------------ SPF / DMARC advice

/// A relay on the configured-nameserver path (one test DNS server for zone "example")
/// with `spf_include` set.
fn advice_env() -> Env {
    let dns = TestDns::start("example");
    let mut config = RelayConfig::new(free_port());
    config
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr()))
        .set("dns", "timeout", "\"2s\"")
        .set(
            "deliverability",
            "spf_include",
            &format!("\"{SPF_INCLUDE}\""),
        );
    Env::start(config, vec![dns])
}

/// Adds and verifies `domain` (the advice never decides that) and returns `domain show`.
fn checked(env: &Env, domain: &str) -> Value {
    let token = env.add(domain);
    env._servers[0].set_txt(&format!("domauthvalidation.{domain}"), &[&token]);
    let (out, v) = env.verify(domain);
    assert_eq!(out.status.code(), Some(0), "{domain}: {v:#}");
    let shown = env.show(domain);
    assert_eq!(shown["status"], "verified", "{shown:#}");
    // Configured nameservers are used as they are: no per-server report.
    assert_eq!(shown["zone"], Value::Null, "{shown:#}");
    shown
}

#[test]
fn spf_and_dmarc_advice() {
    let env = advice_env();
    let dns = &env._servers[0];

    // No SPF, no DMARC: a whole new record to publish for each.
    let v = checked(&env, "nospf.example");
    assert_eq!(v["spf"]["status"], "missing", "{v:#}");
    assert_eq!(
        v["spf"]["record"],
        format!("v=spf1 include:{SPF_INCLUDE} ~all"),
        "{v:#}"
    );
    assert!(
        v["spf"]["advice"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("\"v=spf1 include:{SPF_INCLUDE} ~all\"")),
        "{v:#}"
    );
    assert_eq!(v["dmarc"]["policy"], "missing", "{v:#}");
    assert_eq!(v["dmarc"]["record"], "v=DMARC1; p=none", "{v:#}");
    let words = env.show_text("nospf.example");
    assert!(words.contains("SPF:          missing"), "{words}");
    assert!(words.contains("DMARC:        missing"), "{words}");

    // SPF without the include: the include goes before the all mechanism.
    dns.set_txt("partial.example", &["v=spf1 mx -all"]);
    dns.set_txt("_dmarc.partial.example", &["v=DMARC1; p=none"]);
    let v = checked(&env, "partial.example");
    assert_eq!(v["spf"]["status"], "not_covering", "{v:#}");
    assert_eq!(
        v["spf"]["found"],
        serde_json::json!(["v=spf1 mx -all"]),
        "{v:#}"
    );
    assert_eq!(
        v["spf"]["record"],
        format!("v=spf1 mx include:{SPF_INCLUDE} -all"),
        "{v:#}"
    );
    assert_eq!(v["dmarc"]["policy"], "none", "{v:#}");
    assert_eq!(v["dmarc"]["found"], "v=DMARC1; p=none", "{v:#}");

    // SPF with the include, beside other TXT records: ok; DMARC reject reported.
    dns.set_txt(
        "good.example",
        &["v=spf1 ", &format!("include:{SPF_INCLUDE} ~all")],
    );
    dns.add_txt("good.example", &["google-site-verification=abc"]);
    dns.set_txt(
        "_dmarc.good.example",
        &["v=DMARC1; p=reject; rua=mailto:d@good.example"],
    );
    let v = checked(&env, "good.example");
    assert_eq!(v["spf"]["status"], "ok", "{v:#}");
    assert_eq!(v["spf"]["record"], Value::Null, "{v:#}");
    assert_eq!(v["dmarc"]["policy"], "reject", "{v:#}");

    // Covered one include deep (a provider record that includes ours).
    dns.set_txt(
        "via.example",
        &["v=spf1 include:_spf.provider.example -all"],
    );
    dns.set_txt(
        "_spf.provider.example",
        &[&format!("v=spf1 include:{SPF_INCLUDE} -all")],
    );
    let v = checked(&env, "via.example");
    assert_eq!(v["spf"]["status"], "ok", "{v:#}");
    assert!(
        v["spf"]["advice"]
            .as_str()
            .unwrap_or("")
            .contains("_spf.provider.example"),
        "{v:#}"
    );

    // A fixed record is seen at the next check.
    dns.set_txt(
        "partial.example",
        &[&format!("v=spf1 mx include:{SPF_INCLUDE} -all")],
    );
    let (_, v) = env.verify("partial.example");
    assert_eq!(v["spf"]["status"], "ok", "{v:#}");
}

#[test]
fn no_spf_include_configured_means_no_spf_advice() {
    let dns = TestDns::start("example");
    let mut config = RelayConfig::new(free_port());
    config
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr()))
        .set("dns", "timeout", "\"2s\"");
    let env = Env::start(config, vec![dns]);
    env._servers[0].set_txt("plain.example", &["v=spf1 mx -all"]);
    let v = checked(&env, "plain.example");
    assert_eq!(v["spf"]["status"], "none_configured", "{v:#}");
    assert_eq!(v["spf"]["advice"], Value::Null, "{v:#}");
    assert_eq!(
        v["spf"]["found"],
        serde_json::json!(["v=spf1 mx -all"]),
        "{v:#}"
    );
}
