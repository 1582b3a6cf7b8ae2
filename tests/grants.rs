//! Wider grants (SPEC §9) end to end: the whole-domain grant `*@domain` and
//! accounts restricted to some mailboxes, through the real CLI, a real DNS
//! server for the domain proof, a real upstream and swaks. Both grants hold
//! for the envelope and the headers, and for one hosting only.

mod common;

use std::{process::Output, time::Duration};

use common::{Relay, RelayConfig, Sink, SwaksResult, dns::TestDns};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
/// swaks: MAIL refused; the reply to the end of DATA is an error.
const REFUSED_AT_MAIL: i32 = 23;
const REFUSED_AT_END_OF_DATA: i32 = 26;
const PARTNER: &str = "partner.example";

struct Env {
    // Field order = drop order: the relay stops before its DNS server.
    relay: Relay,
    sink: Sink,
    dns: TestDns,
}

impl Env {
    /// Hosting acme (acme.test: info@, boss@) with partner.example verified;
    /// hosting beta (beta.test: bob@) with beta-partner.example verified.
    fn start() -> Env {
        let dns = TestDns::start("example");
        let sink = Sink::start();
        let mut config = RelayConfig::new(sink.port);
        config
            .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr()))
            .set("dns", "timeout", "\"1s\"");
        let relay = Relay::start_with(config);
        relay.add_mailbox("acme", "info@acme.test", "secret");
        relay.add_mailbox("acme", "boss@acme.test", "secret");
        relay.add_mailbox("beta", "bob@beta.test", "secret");
        let env = Env { relay, sink, dns };
        env.verified(PARTNER, "acme");
        env.verified("beta-partner.example", "beta");
        env
    }

    fn verified(&self, domain: &str, hosting: &str) {
        let v = self.json(&["domain", "add", domain, "--hosting", hosting]);
        let token = v["record"]["value"].as_str().expect("token").to_string();
        self.dns
            .set_txt(&format!("domauthvalidation.{domain}"), &[&token]);
        let v = self.json(&["domain", "verify", domain, "--hosting", hosting]);
        assert_eq!(v["status"], "verified", "{v:#}");
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

    /// Logs in as `login` and sends a message with `sender` in MAIL FROM and
    /// `from` in the From header.
    fn send(&self, login: &str, sender: &str, from: &str) -> SwaksResult {
        self.relay
            .swaks()
            .auth(login, "secret")
            .from(sender)
            .to("someone@dest.test")
            .header(&format!("From: <{from}>"))
            .run()
    }

    fn explain(&self, login: &str, sender: &str) -> (bool, String) {
        let out = self.cli(&["explain", "--login", login, "--sender", sender, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("explain --json");
        assert_eq!(out.status.success(), v["allowed"] == true, "{v:#}");
        (
            v["allowed"] == true,
            v["reason"].as_str().unwrap_or_default().to_string(),
        )
    }

    fn accounts(&self, hosting: &str) -> Vec<Value> {
        self.json(&["account", "list", "--hosting", hosting])
            .as_array()
            .expect("account list is an array")
            .clone()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_whole_domain_grant_lets_every_address_be_used() {
    let env = Env::start();
    // Before the grant: an unlisted address is refused.
    env.send(
        "info@acme.test",
        "anyone@partner.example",
        "anyone@partner.example",
    )
    .assert_code(REFUSED_AT_MAIL);

    let out = env.relay.cli_ok(
        &["account", "add", "*@Partner.Example", "--hosting", "acme"],
        "",
    );
    assert!(out.contains("every address of partner.example"), "{out}");
    let list = env.accounts("acme");
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["address"], "*@partner.example");
    assert_eq!(list[0]["domain"], PARTNER);
    assert_eq!(list[0]["wildcard"], true);
    assert!(
        list[0].get("mailboxes").is_none(),
        "unrestricted: {:#}",
        list[0]
    );
    let plain = env
        .relay
        .cli_ok(&["account", "list", "--hosting", "acme"], "");
    assert!(plain.contains("whole domain partner.example"), "{plain}");

    // Every mailbox of acme, any address of the domain, envelope and header.
    for login in ["info@acme.test", "boss@acme.test"] {
        for sender in ["anyone@partner.example", "Sales@Partner.example"] {
            env.send(login, sender, sender).assert_code(0);
        }
    }
    env.sink.wait_for(4, WAIT);
    let (allowed, reason) = env.explain("info@acme.test", "anyone@partner.example");
    assert!(allowed, "{reason}");
    assert!(
        reason.contains("whole-domain grant") && reason.contains("*@partner.example"),
        "{reason}"
    );
    let said = text(
        &env.cli(&[
            "explain",
            "--login",
            "info@acme.test",
            "--sender",
            "x@partner.example",
        ])
        .stdout,
    );
    assert!(said.contains("*@partner.example"), "{said}");

    // Not a subdomain, and not another hosting.
    env.send(
        "info@acme.test",
        "x@sub.partner.example",
        "x@sub.partner.example",
    )
    .assert_code(REFUSED_AT_MAIL);
    env.send(
        "bob@beta.test",
        "anyone@partner.example",
        "anyone@partner.example",
    )
    .assert_code(REFUSED_AT_MAIL);
    env.send("bob@beta.test", "bob@beta.test", "anyone@partner.example")
        .assert_code(REFUSED_AT_END_OF_DATA);
    assert!(!env.explain("bob@beta.test", "anyone@partner.example").0);
    // beta does not see acme's grant, and cannot delete it.
    assert!(env.accounts("beta").is_empty());
    let out = env.cli(&[
        "account",
        "delete",
        "*@partner.example",
        "--hosting",
        "beta",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));

    // Deleting the grant takes effect at the next MAIL FROM.
    env.relay.cli_ok(
        &[
            "account",
            "delete",
            "*@partner.example",
            "--hosting",
            "acme",
        ],
        "",
    );
    env.send(
        "info@acme.test",
        "anyone@partner.example",
        "anyone@partner.example",
    )
    .assert_code(REFUSED_AT_MAIL);
}

#[test]
fn a_restricted_account_is_only_for_its_mailboxes() {
    let env = Env::start();
    let out = env.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            "acme",
            "--mailbox",
            "BOSS@acme.test",
        ],
        "",
    );
    assert!(out.contains("boss@acme.test"), "{out}");
    let list = env.accounts("acme");
    assert_eq!(list[0]["address"], "sales@partner.example");
    assert_eq!(list[0]["mailboxes"], serde_json::json!(["boss@acme.test"]));
    let plain = env
        .relay
        .cli_ok(&["account", "list", "--hosting", "acme"], "");
    assert!(plain.contains("only boss@acme.test"), "{plain}");

    env.send(
        "boss@acme.test",
        "sales@partner.example",
        "sales@partner.example",
    )
    .assert_code(0);
    env.sink.wait_for(1, WAIT);
    env.send("info@acme.test", "sales@partner.example", "sales@partner.example")
        .assert_code(REFUSED_AT_MAIL)
        .assert_contains("553 5.7.1 <sales@partner.example>: Sender address rejected: not owned by user info@acme.test");
    env.send("info@acme.test", "info@acme.test", "sales@partner.example")
        .assert_code(REFUSED_AT_END_OF_DATA)
        .assert_contains("550 5.7.1 <sales@partner.example>: From header address rejected");

    let (allowed, reason) = env.explain("boss@acme.test", "sales@partner.example");
    assert!(
        allowed && reason.contains("restricted to mailboxes boss@acme.test"),
        "{reason}"
    );
    let (allowed, reason) = env.explain("info@acme.test", "sales@partner.example");
    assert!(
        !allowed && reason.contains("restricted to mailboxes boss@acme.test"),
        "{reason}"
    );

    // With a whole-domain grant beside it, the exact grant still decides for
    // its own address; the rest of the domain is open to every mailbox.
    env.relay.cli_ok(
        &["account", "add", "*@partner.example", "--hosting", "acme"],
        "",
    );
    env.send(
        "info@acme.test",
        "sales@partner.example",
        "sales@partner.example",
    )
    .assert_code(REFUSED_AT_MAIL);
    env.send(
        "info@acme.test",
        "other@partner.example",
        "other@partner.example",
    )
    .assert_code(0);

    // A mailbox that is not the hosting's is refused, and nothing is added.
    for (mailbox, words) in [
        ("bob@beta.test", "not a mailbox of hosting acme"),
        ("not-an-address", "invalid address"),
    ] {
        let out = env.cli(&[
            "account",
            "add",
            "new@partner.example",
            "--hosting",
            "acme",
            "--mailbox",
            mailbox,
        ]);
        assert_eq!(out.status.code(), Some(1), "{mailbox}");
        assert!(
            text(&out.stderr).contains(words),
            "{mailbox}: {}",
            text(&out.stderr)
        );
    }
    assert!(
        !env.accounts("acme")
            .iter()
            .any(|a| a["address"] == "new@partner.example")
    );
    // Restricted grants of one hosting give another hosting nothing either.
    env.relay.cli_ok(
        &[
            "account",
            "add",
            "*@beta-partner.example",
            "--hosting",
            "beta",
            "--mailbox",
            "bob@beta.test",
        ],
        "",
    );
    env.send(
        "bob@beta.test",
        "x@beta-partner.example",
        "x@beta-partner.example",
    )
    .assert_code(0);
    env.send(
        "boss@acme.test",
        "x@beta-partner.example",
        "x@beta-partner.example",
    )
    .assert_code(REFUSED_AT_MAIL);
}
