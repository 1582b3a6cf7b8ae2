//! The public HTTP API (SPEC §8) end to end: the real `domauth serve`, its
//! CLI making the bearer tokens, the real DNS server of the other tests, and
//! plain HTTP/1.1 requests. Every route, every error status, tenant
//! isolation, and the OpenAPI document against what the server does.

mod common;

use std::collections::BTreeSet;

use common::{
    Relay, RelayConfig,
    dns::TestDns,
    free_port,
    http::{Response, encode, request},
};
use serde_json::{Value, json};

const PARTNER: &str = "partner.example";

struct Env {
    relay: Relay,
    dns: TestDns,
    port: u16,
}

impl Env {
    /// Hostings acme (mailbox info@acme.test) and beta (mailbox info@beta.test).
    fn start() -> Env {
        let dns = TestDns::start("example");
        let mut config = RelayConfig::new(free_port());
        config
            .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr()))
            .set("dns", "timeout", "\"1s\"")
            .set("limits", "auth_failures", "5");
        let relay = Relay::start_with(config);
        relay.add_mailbox("acme", "info@acme.test", "secret");
        relay.add_mailbox("beta", "info@beta.test", "secret");
        let port = relay.config.panel_port();
        Env { relay, dns, port }
    }

    fn token(&self, hosting: &str) -> String {
        let out = self.relay.cli_ok(&["hosting", "token", hosting], "");
        let token = out.trim().to_string();
        assert!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "{out:?}"
        );
        token
    }

    fn call(&self, token: Option<&str>, method: &str, path: &str, body: Option<Value>) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let body = body.map(|b| b.to_string());
        request(
            self.port,
            method,
            &format!("/api/v1{path}"),
            &headers,
            body.as_deref().map(str::as_bytes),
        )
    }

    /// Adds PARTNER for the token's hosting, publishes its record (as given
    /// by `wrap`, e.g. with quotes) and verifies it.
    fn verified_domain(&self, token: &str, wrap: impl Fn(&str) -> String) -> Value {
        let r = self.call(
            Some(token),
            "POST",
            "/domains",
            Some(json!({ "domain": PARTNER })),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        let d = r.json();
        let value = d["record"]["value"].as_str().expect("token").to_string();
        self.dns.set_txt(
            d["record"]["name"].as_str().expect("name"),
            &[&wrap(&value)],
        );
        let r = self.call(
            Some(token),
            "POST",
            &format!("/domains/{PARTNER}/verify"),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["status"], "verified", "{v}");
        assert_eq!(v["check"]["found"], true, "{v}");
        v
    }
}

fn error_of(r: &Response) -> String {
    let v = r.json();
    let e = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {}", r.body));
    assert!(!e.contains('\n'), "one line: {e:?}");
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(1),
        "only the error: {v}"
    );
    e.to_string()
}

#[test]
fn every_route_with_its_errors() {
    let env = Env::start();
    let a = env.token("acme");

    // 401: no token, a made-up token, the wrong scheme.
    for auth in [None, Some("dat_00_11"), Some("nonsense")] {
        let r = env.call(auth, "GET", "/domains", None);
        assert_eq!(r.status, 401, "{auth:?}: {}", r.body);
        error_of(&r);
    }
    let basic = request(
        env.port,
        "GET",
        "/api/v1/domains",
        &[("authorization", "Basic YTpi")],
        None,
    );
    assert_eq!(basic.status, 401);

    // Empty list, then add: 201 with the record to publish.
    let r = env.call(Some(&a), "GET", "/domains", None);
    assert_eq!((r.status, r.json()), (200, json!([])));
    let r = env.call(
        Some(&a),
        "POST",
        "/domains",
        Some(json!({ "domain": "Partner.Example." })),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let d = r.json();
    assert_eq!(d["domain"], PARTNER);
    assert_eq!(d["status"], "pending");
    assert_eq!(d["record"]["name"], "domauthvalidation.partner.example");
    assert_eq!(d["record"]["label"], "domauthvalidation");
    assert_eq!(d["record"]["type"], "TXT");
    for key in [
        "last_check",
        "last_error",
        "record_missing_since",
        "verified_at",
    ] {
        assert!(d[key].is_null(), "{key}: {d}");
    }
    assert!(d["created_at"].is_string());
    // SPEC §9: the DKIM keys are made with the domain, its records shown at once, and
    // no private key leaves the server.
    assert_eq!(d["dkim"]["status"], "pending", "{d}");
    let dkim_names: Vec<&str> = d["dkim"]["records"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        dkim_names,
        [
            "domauth1e._domainkey.partner.example",
            "domauth1r._domainkey.partner.example"
        ],
        "{d}"
    );
    assert!(!r.body.contains("private"), "{}", r.body);
    let token = d["record"]["value"].as_str().unwrap().to_string();

    // 409 already listed / own domain; 400 invalid domain, bad JSON, no field.
    let r = env.call(
        Some(&a),
        "POST",
        "/domains",
        Some(json!({ "domain": PARTNER })),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(error_of(&r).contains("already"));
    let r = env.call(
        Some(&a),
        "POST",
        "/domains",
        Some(json!({ "domain": "acme.test" })),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(error_of(&r).contains("own domain"));
    let r = env.call(
        Some(&a),
        "POST",
        "/domains",
        Some(json!({ "domain": "a..b" })),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    error_of(&r);
    let auth = format!("Bearer {a}");
    let r = request(
        env.port,
        "POST",
        "/api/v1/domains",
        &[("authorization", &auth)],
        Some(b"{not json"),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    error_of(&r);
    let r = env.call(
        Some(&a),
        "POST",
        "/domains",
        Some(json!({ "name": PARTNER })),
    );
    assert_eq!(r.status, 400, "{}", r.body);

    // Show and list; unknown domain 404.
    let r = env.call(Some(&a), "GET", &format!("/domains/{PARTNER}"), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["record"]["value"], token.as_str());
    assert_eq!(r.json()["accounts"], 0);
    let r = env.call(Some(&a), "GET", "/domains", None);
    assert_eq!(r.json().as_array().map(Vec::len), Some(1));
    let r = env.call(Some(&a), "GET", "/domains/nothere.example", None);
    assert_eq!(r.status, 404);
    error_of(&r);

    // Verify with nothing published: 200, the outcome in words, saved.
    let r = env.call(
        Some(&a),
        "POST",
        &format!("/domains/{PARTNER}/verify"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (v["status"].as_str(), v["check"]["found"].as_bool()),
        (Some("pending"), Some(false))
    );
    assert!(
        v["check"]["outcome"]
            .as_str()
            .unwrap()
            .starts_with("not found"),
        "{v}"
    );
    assert!(v["last_check"].is_string());
    // A wrong value: mismatch, with what was found.
    env.dns
        .set_txt("domauthvalidation.partner.example", &["something-else"]);
    let v = env
        .call(
            Some(&a),
            "POST",
            &format!("/domains/{PARTNER}/verify"),
            None,
        )
        .json();
    assert_eq!(
        v["check"]["outcome"], "mismatch: found \"something-else\"",
        "{v}"
    );
    // Accounts of a pending domain: refused with the reason, per address.
    let r = env.call(
        Some(&a),
        "POST",
        &format!("/domains/{PARTNER}/accounts"),
        Some(json!({ "addresses": ["sales@partner.example"] })),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let res = &r.json()["results"][0];
    assert_eq!(res["result"], "refused");
    assert!(res["reason"].as_str().unwrap().contains("pending"), "{res}");

    // The right value with curly quotes pasted around it: verified.
    env.dns.set_txt(
        "domauthvalidation.partner.example",
        &[&format!("\u{201c}{token}\u{201d}")],
    );
    let v = env
        .call(
            Some(&a),
            "POST",
            &format!("/domains/{PARTNER}/verify"),
            None,
        )
        .json();
    assert_eq!(
        (v["status"].as_str(), v["check"]["found"].as_bool()),
        (Some("verified"), Some(true)),
        "{v}"
    );
    assert_eq!(v["check"]["outcome"], "verified");
    assert!(v["verified_at"].is_string() && v["last_error"].is_null());

    // Accounts: a result per address, duplicates once.
    let r = env.call(
        Some(&a),
        "POST",
        &format!("/domains/{PARTNER}/accounts"),
        Some(json!({ "addresses": ["Sales@Partner.Example", "not an address", "x@other.example", "sales@partner.example", "info@partner.example"] })),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let results: Vec<(String, String)> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["address"].as_str().unwrap().to_string(),
                x["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("sales@partner.example".to_string(), "added".to_string()),
            ("not an address".to_string(), "refused".to_string()),
            ("x@other.example".to_string(), "refused".to_string()),
            ("info@partner.example".to_string(), "added".to_string()),
        ]
    );
    let reason = r.json()["results"][2]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("not an address of partner.example"),
        "{reason}"
    );
    let r = env.call(
        Some(&a),
        "POST",
        &format!("/domains/{PARTNER}/accounts"),
        Some(json!({ "addresses": ["sales@partner.example"] })),
    );
    assert_eq!(r.json()["results"][0]["result"], "already listed");
    // 400: no address, no field.
    for body in [json!({ "addresses": [] }), json!({})] {
        let r = env.call(
            Some(&a),
            "POST",
            &format!("/domains/{PARTNER}/accounts"),
            Some(body),
        );
        assert_eq!(r.status, 400, "{}", r.body);
        error_of(&r);
    }
    let r = env.call(
        Some(&a),
        "GET",
        &format!("/domains/{PARTNER}/accounts"),
        None,
    );
    assert_eq!(r.status, 200);
    let list = r.json();
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["info@partner.example", "sales@partner.example"]);
    assert_eq!(
        env.call(Some(&a), "GET", &format!("/domains/{PARTNER}"), None)
            .json()["accounts"],
        2
    );

    // Explain: allowed, refused, unknown login, another hosting's mailbox, 400.
    let explain = |login: &str, sender: &str| {
        env.call(
            Some(&a),
            "GET",
            &format!("/explain?login={}&sender={}", encode(login), encode(sender)),
            None,
        )
    };
    let v = explain("info@acme.test", "sales@partner.example").json();
    assert_eq!(v["allowed"], true, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("authorized account"));
    let v = explain("info@acme.test", "other@partner.example").json();
    assert_eq!(v["allowed"], false, "{v}");
    let unknown = explain("nobody@acme.test", "sales@partner.example").json();
    let foreign = explain("info@beta.test", "sales@partner.example").json();
    assert_eq!(unknown["allowed"], false);
    assert_eq!(foreign["allowed"], false);
    // Another hosting's mailbox reads exactly like one that does not exist.
    assert_eq!(
        foreign["reason"]
            .as_str()
            .unwrap()
            .replace("info@beta.test", "X"),
        unknown["reason"]
            .as_str()
            .unwrap()
            .replace("nobody@acme.test", "X"),
    );
    let r = env.call(Some(&a), "GET", "/explain?login=info@acme.test", None);
    assert_eq!(r.status, 400);
    error_of(&r);

    // Delete an account: 200, then 404; an address of another domain 404.
    let r = env.call(
        Some(&a),
        "DELETE",
        &format!("/domains/{PARTNER}/accounts/info@partner.example"),
        None,
    );
    assert_eq!(
        (r.status, r.json()),
        (200, json!({ "deleted": "info@partner.example" }))
    );
    let r = env.call(
        Some(&a),
        "DELETE",
        &format!("/domains/{PARTNER}/accounts/info@partner.example"),
        None,
    );
    assert_eq!(r.status, 404);
    error_of(&r);
    let r = env.call(
        Some(&a),
        "DELETE",
        &format!("/domains/{PARTNER}/accounts/info@acme.test"),
        None,
    );
    assert_eq!(r.status, 404);

    // Unknown API route: 404 in the error shape.
    let r = env.call(Some(&a), "GET", "/nothing", None);
    assert_eq!(r.status, 404);
    error_of(&r);

    // Delete the domain (with its last account); then it is gone.
    let r = env.call(Some(&a), "DELETE", &format!("/domains/{PARTNER}"), None);
    assert_eq!(
        (r.status, r.json()),
        (200, json!({ "domain": PARTNER, "accounts_deleted": 1 }))
    );
    for (method, path) in [
        ("GET", format!("/domains/{PARTNER}")),
        ("DELETE", format!("/domains/{PARTNER}")),
        ("POST", format!("/domains/{PARTNER}/verify")),
        ("GET", format!("/domains/{PARTNER}/accounts")),
    ] {
        assert_eq!(
            env.call(Some(&a), method, &path, None).status,
            404,
            "{method} {path}"
        );
    }
    let v = explain("info@acme.test", "sales@partner.example").json();
    assert_eq!(v["allowed"], false);

    // Revoking: every token of the hosting stops working at once.
    let a2 = env.token("acme");
    assert_ne!(a, a2);
    assert_eq!(env.call(Some(&a2), "GET", "/domains", None).status, 200);
    let out = env
        .relay
        .cli_ok(&["hosting", "token", "acme", "--revoke", "--json"], "");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["revoked"], 2, "{v}");
    for t in [&a, &a2] {
        assert_eq!(env.call(Some(t), "GET", "/domains", None).status, 401);
    }
    // A token for a hosting that does not exist: refused by the CLI.
    let out = env.relay.cli(&["hosting", "token", "nobody"], "");
    assert_eq!(out.status.code(), Some(1));

    // Past limits.auth_failures bad tokens from one IP: 429, even with a good token.
    let b = env.token("beta");
    let mut limited = false;
    for _ in 0..10 {
        let r = env.call(Some("dat_0123_bad"), "GET", "/domains", None);
        if r.status == 429 {
            error_of(&r);
            limited = true;
            break;
        }
        assert_eq!(r.status, 401);
    }
    assert!(limited, "bad tokens were never rate-limited");
    assert_eq!(env.call(Some(&b), "GET", "/domains", None).status, 429);
}

#[test]
fn another_hostings_domain_is_not_found_on_every_route() {
    let env = Env::start();
    let a = env.token("acme");
    let b = env.token("beta");
    env.verified_domain(&a, |t| format!("\"{t}\""));
    let r = env.call(
        Some(&a),
        "POST",
        &format!("/domains/{PARTNER}/accounts"),
        Some(json!({ "addresses": ["sales@partner.example"] })),
    );
    assert_eq!(r.json()["results"][0]["result"], "added");

    // Beta sees nothing of acme's domain: every route answers exactly as for
    // a domain that does not exist.
    assert_eq!(
        env.call(Some(&b), "GET", "/domains", None).json(),
        json!([])
    );
    let routes = |d: &str| {
        vec![
            ("GET", format!("/domains/{d}"), None),
            ("DELETE", format!("/domains/{d}"), None),
            ("POST", format!("/domains/{d}/verify"), None),
            ("GET", format!("/domains/{d}/accounts"), None),
            (
                "POST",
                format!("/domains/{d}/accounts"),
                Some(json!({ "addresses": [format!("x@{d}")] })),
            ),
            ("DELETE", format!("/domains/{d}/accounts/sales@{d}"), None),
        ]
    };
    for ((method, path, body), (_, ghost, ghost_body)) in
        routes(PARTNER).into_iter().zip(routes("ghost.example"))
    {
        let theirs = env.call(Some(&b), method, &path, body);
        let nobodys = env.call(Some(&b), method, &ghost, ghost_body);
        assert_eq!(theirs.status, 404, "{method} {path}: {}", theirs.body);
        assert_eq!(nobodys.status, 404, "{method} {ghost}");
        assert_eq!(
            error_of(&theirs).replace(PARTNER, "D"),
            error_of(&nobodys).replace("ghost.example", "D"),
            "{method} {path}"
        );
    }
    // Explain says nothing about acme either.
    let v = env
        .call(
            Some(&b),
            "GET",
            "/explain?login=info%40beta.test&sender=sales%40partner.example",
            None,
        )
        .json();
    assert_eq!(v["allowed"], false);
    assert!(!v["reason"].as_str().unwrap().contains("acme"), "{v}");
    assert!(
        !v["reason"].as_str().unwrap().contains("another hosting"),
        "{v}"
    );

    // Beta may add the same domain with its own token; acme's stays intact.
    let r = env.call(
        Some(&b),
        "POST",
        "/domains",
        Some(json!({ "domain": PARTNER })),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["status"], "pending");
    let mine = env
        .call(Some(&a), "GET", &format!("/domains/{PARTNER}"), None)
        .json();
    assert_eq!(
        (mine["status"].as_str(), mine["accounts"].as_u64()),
        (Some("verified"), Some(1))
    );
    assert_ne!(mine["record"]["value"], r.json()["record"]["value"]);
}

/// Every path and method in openapi.json is answered (not 404/405), and the
/// document lists every route the server has: the routes of SPEC §8, and no
/// other method on them.
#[test]
fn openapi_document_matches_the_server() {
    let env = Env::start();
    let a = env.token("acme");
    // The document needs no token.
    let r = env.call(None, "GET", "/openapi.json", None);
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    assert_eq!(doc["servers"][0]["url"], "/api/v1");

    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];
    let mut documented: BTreeSet<(String, String)> = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(m).is_some() {
                documented.insert((path.clone(), m.to_string()));
            }
        }
    }
    let spec: BTreeSet<(String, String)> = [
        ("/domains", "get"),
        ("/domains", "post"),
        ("/domains/{domain}", "get"),
        ("/domains/{domain}", "delete"),
        ("/domains/{domain}/verify", "post"),
        ("/domains/{domain}/accounts", "get"),
        ("/domains/{domain}/accounts", "post"),
        ("/domains/{domain}/accounts/{address}", "delete"),
        ("/explain", "get"),
        ("/openapi.json", "get"),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    assert_eq!(
        documented, spec,
        "openapi.json lists exactly the routes of SPEC §8"
    );

    // Real values for the parameters: a verified domain with an account.
    env.verified_domain(&a, |t| t.to_string());
    env.call(
        Some(&a),
        "POST",
        &format!("/domains/{PARTNER}/accounts"),
        Some(json!({ "addresses": ["sales@partner.example"] })),
    );
    let fill = |p: &str| {
        p.replace("{domain}", PARTNER)
            .replace("{address}", "sales@partner.example")
    };
    // Deletions last: the account, then the domain.
    let mut order: Vec<&(String, String)> = documented.iter().collect();
    order.sort_by_key(|(p, m)| (m == "delete", std::cmp::Reverse(p.len())));
    for (path, method) in order {
        let mut url = fill(path);
        let body = match (path.as_str(), method.as_str()) {
            ("/domains", "post") => Some(json!({ "domain": "other.example" })),
            ("/domains/{domain}/accounts", "post") => {
                Some(json!({ "addresses": ["info@partner.example"] }))
            }
            _ => None,
        };
        if path == "/explain" {
            url.push_str("?login=info%40acme.test&sender=sales%40partner.example");
        }
        let r = env.call(Some(&a), &method.to_uppercase(), &url, body);
        assert!(
            r.status != 404 && r.status != 405 && r.status < 500,
            "{method} {url}: {} {}",
            r.status,
            r.body
        );
        // Every documented status is one the document declares.
        let declared = &doc["paths"][path][method.as_str()]["responses"];
        assert!(
            declared.get(r.status.to_string()).is_some(),
            "{method} {path} answered {} which openapi.json does not declare",
            r.status
        );
    }
    // No undocumented method on a documented path.
    env.verified_domain(&a, |t| t.to_string());
    for path in spec.iter().map(|(p, _)| p).collect::<BTreeSet<_>>() {
        for m in METHODS {
            if documented.contains(&(path.clone(), m.to_string())) {
                continue;
            }
            let r = env.call(Some(&a), &m.to_uppercase(), &fill(path), None);
            assert_eq!(r.status, 405, "{m} {path} is answered but not documented");
            error_of(&r);
        }
    }
}
