//! The authorization data on PostgreSQL, shared by several nodes (SPEC §11),
//! end to end: a throwaway PostgreSQL cluster (tests/common/pg.rs), real
//! `domauth serve` processes with their own data dirs on one database, the
//! real CLI, a real DNS server and upstream, swaks as the client.
//!
//! Timing: nothing asserts on wall-clock durations; a change made through one
//! node is awaited on another by polling with an upper bound far above the
//! 2 s the SPEC promises.

mod common;

use std::time::{Duration, Instant};

use common::{Relay, RelayConfig, Sink, SwaksResult, dns::TestDns, pg::TestPg};
use serde_json::Value;

/// Upper bound for a change to reach another node (the SPEC says 2 s).
const PROPAGATION: Duration = Duration::from_secs(15);
const PARTNER: &str = "partner.example";

struct Cluster {
    pg: TestPg,
    dns: TestDns,
    sink: Sink,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster {
            pg: TestPg::start(),
            dns: TestDns::start("example"),
            sink: Sink::start(),
        }
    }

    fn config(&self, backend_postgres: bool, max_staleness: &str) -> RelayConfig {
        let mut c = RelayConfig::new(self.sink.port);
        c.set("dns", "nameservers", &format!("[\"{}\"]", self.dns.addr()))
            .set("dns", "timeout", "\"1s\"");
        if backend_postgres {
            c.set("store", "backend", "\"postgres\"")
                .set("store", "url", &format!("{:?}", self.pg.url()))
                .set("store", "max_staleness", &format!("{max_staleness:?}"));
        }
        c
    }

    fn node(&self) -> Relay {
        Relay::start_with(self.config(true, "5m"))
    }
}

fn json(relay: &Relay, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = relay.cli_ok(&args, "");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
}

fn send(relay: &Relay, from: &str) -> SwaksResult {
    relay
        .swaks()
        .auth("info@acme.test", "secret")
        .from(from)
        .to("someone@example.org")
        .run()
}

/// Sends until swaks exits with `code` (panics after `timeout`).
fn wait_send(relay: &Relay, from: &str, code: i32, what: &str, timeout: Duration) -> SwaksResult {
    let deadline = Instant::now() + timeout;
    loop {
        let r = send(relay, from);
        if r.code == code {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never got swaks exit {code} within {timeout:?}; last:\n{}\nrelay log:\n{}",
            r.transcript,
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Adds partner.example to acme through `relay`, publishes its token,
/// verifies it, and adds the account sales@partner.example.
fn verified_account(cluster: &Cluster, relay: &Relay) {
    let v = json(relay, &["domain", "add", PARTNER, "--hosting", "acme"]);
    let token = v["token"]
        .as_str()
        .or_else(|| v["record"]["value"].as_str())
        .unwrap_or_else(|| panic!("no token in {v:#}"))
        .to_string();
    cluster
        .dns
        .set_txt(&format!("domauthvalidation.{PARTNER}"), &[&token]);
    let v = json(relay, &["domain", "verify", PARTNER, "--hosting", "acme"]);
    assert_eq!(v["status"], "verified", "{v:#}");
    relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
}

#[test]
fn a_domain_verified_on_one_node_is_usable_on_the_others_and_a_delete_reaches_them() {
    let cluster = Cluster::start();
    let a = cluster.node();
    let b = cluster.node();
    let c = cluster.node();
    a.add_mailbox("acme", "info@acme.test", "secret");
    // The mailbox made through node A logs in on node C.
    wait_send(
        &c,
        "info@acme.test",
        0,
        "own address on node C",
        PROPAGATION,
    );

    verified_account(&cluster, &a);
    let r = wait_send(
        &c,
        "sales@partner.example",
        0,
        "account verified through A, used on C",
        PROPAGATION,
    );
    r.assert_contains("250");
    // Node B reads the same data.
    let listed = json(&b, &["domain", "list", "--hosting", "acme"]);
    assert!(
        listed.to_string().contains(PARTNER),
        "node B lists {listed:#}"
    );

    b.cli_ok(
        &["domain", "delete", PARTNER, "--hosting", "acme", "--yes"],
        "",
    );
    wait_send(
        &a,
        "sales@partner.example",
        23,
        "domain deleted through B, refused on A",
        PROPAGATION,
    )
    .assert_contains("553");
    wait_send(
        &c,
        "sales@partner.example",
        23,
        "domain deleted through B, refused on C",
        PROPAGATION,
    );
    // The own address is unaffected.
    send(&a, "info@acme.test").assert_code(0);
}

#[test]
fn the_same_rules_hold_across_nodes() {
    let cluster = Cluster::start();
    let a = cluster.node();
    let b = cluster.node();
    a.cli_ok(&["hosting", "add", "acme", "--domain", "acme.test"], "");
    b.cli_ok(&["hosting", "add", "beta", "--domain", "beta.test"], "");
    // acme.test is acme's own domain, known to B at once (B catches up under
    // the write lock before it checks): another hosting cannot claim it.
    let out = b.cli(&["domain", "add", "acme.test", "--hosting", "beta"], "");
    assert!(
        !out.status.success(),
        "claimed another hosting's own domain"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("own domain of another hosting"), "{err}");
    // A duplicate hosting through the other node is a conflict, not a
    // database error.
    let out = a.cli(&["hosting", "add", "beta", "--domain", "beta2.test"], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("database"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn export_from_sled_then_import_into_postgres_gives_the_same_data() {
    let cluster = Cluster::start();
    let mut sled = Relay::start_with(cluster.config(false, "5m"));
    sled.add_mailbox("acme", "info@acme.test", "secret");
    sled.add_mailbox("beta", "joe@beta.test", "pw2");
    verified_account(&cluster, &sled);
    sled.cli_ok(
        &["domain", "add", "pending.example", "--hosting", "beta"],
        "",
    );
    let lists = |r: &Relay| {
        (
            json(r, &["hosting", "list"]),
            json(r, &["mailbox", "list"]),
            json(r, &["domain", "list", "--hosting", "acme"]),
            json(r, &["domain", "list", "--hosting", "beta"]),
            json(r, &["account", "list", "--hosting", "acme"]),
        )
    };
    let before = lists(&sled);
    sled.stop();
    let dump = sled.cli_ok(&["store", "export"], "");
    let parsed: Value = serde_json::from_str(&dump).expect("export is JSON");
    assert_eq!(parsed["format"], "domauth-store", "{parsed:#}");

    let pg = cluster.node();
    let out = pg.cli_ok(&["store", "import"], &dump);
    assert!(out.contains("imported"), "{out}");
    // The import ran in its own process: the serving node sees it within
    // the propagation bound.
    let deadline = Instant::now() + PROPAGATION;
    while json(&pg, &["hosting", "list"])
        .as_array()
        .map_or(0, Vec::len)
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the import never reached the node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(lists(&pg), before);
    let again: Value =
        serde_json::from_str(&pg.cli_ok(&["store", "export"], "")).expect("export is JSON");
    assert_eq!(again, parsed);
    // The imported data is in force: the password and the verified account.
    send(&pg, "sales@partner.example").assert_code(0);
    // A second import is refused: the store is not empty.
    let out = pg.cli(&["store", "import"], &dump);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn database_down_smtp_goes_on_then_451_then_recovers_without_restart() {
    let mut cluster = Cluster::start();
    let patient = Relay::start_with(cluster.config(true, "1h"));
    let strict = Relay::start_with(cluster.config(true, "1s"));
    patient.add_mailbox("acme", "info@acme.test", "secret");
    wait_send(
        &strict,
        "info@acme.test",
        0,
        "before the outage",
        PROPAGATION,
    );

    cluster.pg.stop_server();
    // Past its max_staleness the strict node refuses at MAIL with 451 4.3.0...
    wait_send(
        &strict,
        "info@acme.test",
        23,
        "stale node refuses",
        PROPAGATION,
    )
    .assert_contains("451 4.3.0");
    // ...while the patient one, as cut off as long, goes on from its view.
    send(&patient, "info@acme.test").assert_code(0);
    // Management commands fail with one clear line.
    let out = patient.cli(&["hosting", "add", "beta", "--domain", "beta.test"], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database is unavailable"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    cluster.pg.start_server();
    wait_send(
        &strict,
        "info@acme.test",
        0,
        "after the outage",
        PROPAGATION,
    );
    // Writes work again, through either node, and reach the other.
    patient.cli_ok(&["hosting", "add", "beta", "--domain", "beta.test"], "");
    let deadline = Instant::now() + PROPAGATION;
    while !json(&strict, &["hosting", "list"])
        .to_string()
        .contains("beta")
    {
        assert!(
            Instant::now() < deadline,
            "beta never reached the other node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ------------------------------------------------ the store API on two "nodes"

use domauth_store::{PgConfig, Store};

fn pg_store(pg: &TestPg) -> Store {
    Store::open_postgres(PgConfig {
        url: pg.url(),
        max_staleness: Duration::from_secs(300),
    })
    .expect("open the PostgreSQL store")
}

/// Polls `ready` (panics after `timeout`).
fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_domain_check_is_claimed_by_one_node_at_a_time() {
    let pg = TestPg::start();
    let a = pg_store(&pg);
    let b = pg_store(&pg);
    a.add_hosting("acme", &["acme.test".to_string()]).unwrap();
    a.add_domain("acme", PARTNER, "tok-1").unwrap();
    wait_for("the domain on node B", PROPAGATION, || {
        b.domain("acme", PARTNER).unwrap().is_some()
    });
    let lease = Duration::from_secs(600);
    // A claims the first check; B, with the same view, does not get it.
    assert!(a.claim_check("acme", PARTNER, None, lease).unwrap());
    assert!(!b.claim_check("acme", PARTNER, None, lease).unwrap());
    assert!(!a.claim_check("acme", PARTNER, None, lease).unwrap());
    // A's result lands: the lease ends with it; a node that has not seen the
    // result yet cannot claim (it would check again what A just checked).
    let checked = a
        .update_domain("acme", PARTNER, |d| {
            d.last_check = Some(domauth_store::Utc::now())
        })
        .unwrap()
        .unwrap();
    assert!(!b.claim_check("acme", PARTNER, None, lease).unwrap());
    wait_for("A's check on node B", PROPAGATION, || {
        b.domain("acme", PARTNER).unwrap().unwrap().last_check == checked.last_check
    });
    assert!(
        b.claim_check("acme", PARTNER, checked.last_check, lease)
            .unwrap()
    );
    assert!(
        !a.claim_check("acme", PARTNER, checked.last_check, lease)
            .unwrap()
    );
    // A lease that expires (its node died mid-check) frees the domain: on a
    // second domain B takes a short lease and never reports; A gets it later
    // (it never would if the lease did not end).
    a.add_domain("acme", "other.example", "tok-2").unwrap();
    wait_for("the second domain on node B", PROPAGATION, || {
        b.domain("acme", "other.example").unwrap().is_some()
    });
    assert!(
        b.claim_check("acme", "other.example", None, Duration::from_secs(1))
            .unwrap()
    );
    wait_for("the lease to expire", PROPAGATION, || {
        a.claim_check("acme", "other.example", None, lease).unwrap()
    });
}

#[test]
fn a_change_reaches_the_other_node_within_two_seconds() {
    let pg = TestPg::start();
    let a = pg_store(&pg);
    let b = pg_store(&pg);
    a.add_hosting("acme", &["acme.test".to_string()]).unwrap();
    wait_for("the hosting on node B", PROPAGATION, || {
        b.hosting("acme").unwrap().is_some()
    });
    // The SPEC's bound, as a generous failure bound (not a benchmark): the
    // measured times are printed.
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        let domain = format!("d{i}.example");
        a.add_domain("acme", &domain, "tok").unwrap();
        let started = Instant::now();
        wait_for("an add on node B", PROPAGATION, || {
            b.domain("acme", &domain).unwrap().is_some()
        });
        worst = worst.max(started.elapsed());
        a.delete_domain("acme", &domain).unwrap();
        let started = Instant::now();
        wait_for("a delete on node B", PROPAGATION, || {
            b.domain("acme", &domain).unwrap().is_none()
        });
        worst = worst.max(started.elapsed());
    }
    eprintln!("propagation: worst of 10 changes {worst:?}");
}

#[test]
fn auth_failures_are_counted_across_nodes() {
    let cluster = Cluster::start();
    let strict = |c: &mut RelayConfig| {
        c.set("limits", "auth_failures", "3")
            .set("limits", "auth_window", "\"10m\"");
    };
    let mut ca = cluster.config(true, "5m");
    strict(&mut ca);
    let mut cb = cluster.config(true, "5m");
    strict(&mut cb);
    let a = Relay::start_with(ca);
    let b = Relay::start_with(cb);
    a.add_mailbox("acme", "info@acme.test", "secret");
    wait_send(
        &b,
        "info@acme.test",
        0,
        "the mailbox on node B",
        PROPAGATION,
    );
    let guess = |relay: &Relay| {
        relay
            .swaks()
            .auth("info@acme.test", "wrong")
            .from("info@acme.test")
            .to("someone@example.org")
            .run()
    };
    // Two wrong passwords on node A, one on node B: under each node's own
    // limit (3), at the limit together.
    for node in [&a, &a, &b] {
        guess(node).assert_code(28).assert_contains("535");
    }
    // Now even the right password is refused on node A, which saw only two
    // failures itself (each failure is counted before its 535 is sent); a
    // further guess on B too.
    send(&a, "info@acme.test")
        .assert_code(28)
        .assert_contains("454");
    guess(&b).assert_code(28).assert_contains("454");
}

/// API tokens live in the shared data (SPEC §8, §11): a token made through
/// one node's CLI works on the other node's API, and a revoke through the
/// other node ends it on the first.
#[test]
fn an_api_token_made_on_one_node_works_on_the_others() {
    let cluster = Cluster::start();
    let a = cluster.node();
    let b = cluster.node();
    a.cli_ok(&["hosting", "add", "acme", "--domain", "acme.test"], "");
    let token = a
        .cli_ok(&["hosting", "token", "acme"], "")
        .trim()
        .to_string();
    let auth = format!("Bearer {token}");
    let status = |node: &Relay| {
        common::http::request(
            node.config.panel_port(),
            "GET",
            "/api/v1/domains",
            &[("authorization", auth.as_str())],
            None,
        )
        .status
    };
    wait_for("the token on node B", PROPAGATION, || status(&b) == 200);
    assert_eq!(status(&a), 200);
    wait_for("the hosting on node B", PROPAGATION, || {
        b.cli(&["hosting", "token", "acme", "--revoke"], "")
            .status
            .success()
    });
    wait_for("the revoke on node A", PROPAGATION, || status(&a) == 401);
    assert_eq!(status(&b), 401);
}
