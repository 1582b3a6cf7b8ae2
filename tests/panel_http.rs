//! The hosting panel over HTTP, without a browser (SPEC §8): sign-in and its
//! limits, session cookie attributes, CSRF, security headers, escaping of
//! what DNS answered, tenant isolation, and the pages of the workflow with
//! JavaScript off (forms and redirects). The real `domauth serve` and the
//! real DNS server of the other tests.

mod common;

use common::{
    Relay, RelayConfig,
    dns::TestDns,
    free_port,
    http::{Response, form, request},
};

const PARTNER: &str = "partner.example";
const RECORD: &str = "domauthvalidation.partner.example";

struct Env {
    relay: Relay,
    dns: TestDns,
    port: u16,
}

impl Env {
    /// Hostings acme and beta, with panel passwords "acme-pw" / "beta-pw".
    fn start(tune: impl FnOnce(&mut RelayConfig)) -> Env {
        let dns = TestDns::start("example");
        let mut config = RelayConfig::new(free_port());
        config
            .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr()))
            .set("dns", "timeout", "\"1s\"");
        tune(&mut config);
        let relay = Relay::start_with(config);
        relay.add_mailbox("acme", "info@acme.test", "secret");
        relay.add_mailbox("beta", "info@beta.test", "secret");
        relay.cli_ok(&["hosting", "passwd", "acme"], "acme-pw\n");
        relay.cli_ok(&["hosting", "passwd", "beta"], "beta-pw\n");
        let port = relay.config.panel_port();
        Env { relay, dns, port }
    }

    fn browser(&self) -> Browser {
        Browser {
            port: self.port,
            cookie: None,
        }
    }

    /// A browser signed in as `hosting`.
    fn signed_in(&self, hosting: &str) -> Browser {
        let mut b = self.browser();
        let r = b.sign_in(hosting, &format!("{hosting}-pw"));
        assert_eq!(r.status, 303, "sign-in as {hosting}: {}", r.body);
        assert_eq!(r.header("location"), Some("/"));
        b
    }
}

/// A cookie jar of one session cookie, following what the server sets.
struct Browser {
    port: u16,
    cookie: Option<String>,
}

fn set_cookie_value(r: &Response) -> Option<String> {
    r.headers_named("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("domauth_session="))
        .map(|c| c.split(';').next().unwrap_or_default().to_string())
}

/// The value of the first hidden `csrf` input of a page.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no csrf field in page:\n{page}"));
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').expect("end of value")].to_string()
}

impl Browser {
    fn send(&mut self, method: &str, path: &str, body: Option<String>) -> Response {
        let mut headers: Vec<(&str, &str)> = Vec::new();
        let cookie = self.cookie.clone();
        if let Some(c) = &cookie {
            headers.push(("cookie", c.as_str()));
        }
        if body.is_some() {
            headers.push(("content-type", "application/x-www-form-urlencoded"));
        }
        let r = request(
            self.port,
            method,
            path,
            &headers,
            body.as_deref().map(str::as_bytes),
        );
        if let Some(c) = set_cookie_value(&r) {
            self.cookie = Some(c);
        }
        r
    }

    fn get(&mut self, path: &str) -> Response {
        self.send("GET", path, None)
    }

    fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Response {
        self.send("POST", path, Some(form(fields)))
    }

    /// A form post with the session's CSRF token, taken from `page`.
    fn submit(&mut self, page: &str, action: &str, fields: &[(&str, &str)]) -> Response {
        let csrf = {
            let r = self.get(page);
            assert_eq!(r.status, 200, "GET {page}: {}", r.body);
            csrf_of(&r.body)
        };
        let mut all = fields.to_vec();
        all.push(("csrf", &csrf));
        self.post(action, &all)
    }

    fn sign_in(&mut self, hosting: &str, password: &str) -> Response {
        let page = self.get("/signin");
        let csrf = csrf_of(&page.body);
        self.post(
            "/signin",
            &[
                ("hosting", hosting),
                ("password", password),
                ("csrf", &csrf),
            ],
        )
    }
}

/// A page's text with HTML's character references for markup resolved.
fn unescape(page: &str) -> String {
    page.replace("&#60;", "<")
        .replace("&lt;", "<")
        .replace("&#62;", ">")
        .replace("&gt;", ">")
        .replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

fn assert_security_headers(r: &Response, what: &str) {
    let csp = r
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy"));
    assert!(csp.contains("script-src 'self'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{what}");
    assert!(r.header("referrer-policy").is_some(), "{what}");
}

#[test]
fn sign_in_cookies_csrf_and_headers() {
    let env = Env::start(|c| {
        c.set("limits", "auth_failures", "3");
    });
    let mut b = env.browser();

    // Signed out: every page sends to the sign-in page.
    for path in ["/", "/add", "/check", "/domains/partner.example/record"] {
        let r = b.get(path);
        assert_eq!(
            (r.status, r.header("location")),
            (303, Some("/signin")),
            "{path}"
        );
    }
    let page = b.get("/signin");
    assert_eq!(page.status, 200);
    for word in [
        "Hosting",
        "Password",
        "Sign in",
        "<label for=\"hosting\">",
        "<label for=\"password\">",
    ] {
        assert!(page.body.contains(word), "sign-in page lacks {word:?}");
    }
    assert!(!page.body.contains("<script>"), "no inline script");
    let before = b.cookie.clone().expect("a session cookie before sign-in");
    let set = page.headers_named("set-cookie").join("\n");
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    assert!(!set.contains("Secure"), "plain HTTP: no Secure flag: {set}");
    assert!(
        set.contains("Max-Age=1800"),
        "30 minutes idle by default: {set}"
    );

    // A failed sign-in does not say which field was wrong.
    let wrong_password = b.sign_in("acme", "nope");
    let wrong_name = b.sign_in("nobody", "acme-pw");
    for r in [&wrong_password, &wrong_name] {
        assert_eq!(r.status, 401, "{}", r.body);
        assert!(
            r.body
                .contains("Sign-in failed: the hosting name or the password is wrong.")
        );
    }
    assert_eq!(
        wrong_password.body.replace("value=\"acme\"", "X"),
        wrong_name.body.replace("value=\"nobody\"", "X"),
        "the two failures look the same"
    );

    // Without the form token: refused, not signed in.
    let r = b.post("/signin", &[("hosting", "acme"), ("password", "acme-pw")]);
    assert_eq!(r.status, 403);
    assert_eq!(b.get("/").status, 303);

    // Success: a new session id (no fixation), then the home page.
    let r = b.sign_in("acme", "acme-pw");
    assert_eq!(
        (r.status, r.header("location")),
        (303, Some("/")),
        "{}",
        r.body
    );
    let after = b.cookie.clone().unwrap();
    assert_ne!(before, after, "the session id changes at sign-in");
    let mut planted = Browser {
        port: env.port,
        cookie: Some(before),
    };
    assert_eq!(planted.get("/").status, 303, "the old id is worth nothing");
    let home = b.get("/");
    assert_eq!(home.status, 200, "{}", home.body);
    for word in [
        "Domain authorization",
        "Add domain",
        "Sign out",
        "Check a sender",
    ] {
        assert!(home.body.contains(word), "home lacks {word:?}");
    }

    // CSRF: a state change without the token, or with another session's, is refused.
    let r = b.post("/add", &[("domain", PARTNER)]);
    assert_eq!(r.status, 403);
    let other = env.signed_in("beta");
    let foreign_token = {
        let mut o = other;
        csrf_of(&o.get("/").body)
    };
    let r = b.post("/add", &[("domain", PARTNER), ("csrf", &foreign_token)]);
    assert_eq!(r.status, 403);
    let listed = env
        .relay
        .cli_ok(&["domain", "list", "--hosting", "acme", "--json"], "");
    assert_eq!(listed.trim(), "[]", "nothing was added");
    let r = b.submit("/add", "/add", &[("domain", PARTNER)]);
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(
        r.header("location"),
        Some("/domains/partner.example/record")
    );

    // Headers on every kind of response.
    let mut anon = env.browser();
    for (what, r) in [
        ("home", b.get("/")),
        ("record", b.get("/domains/partner.example/record")),
        ("sign-in", anon.get("/signin")),
        ("redirect", anon.get("/")),
        ("404", b.get("/no/such/page")),
        ("css", anon.get("/static/panel.css")),
        ("js", anon.get("/static/panel.js")),
        ("api", anon.get("/api/v1/domains")),
    ] {
        assert_security_headers(&r, what);
    }
    assert_eq!(anon.get("/static/panel.css").status, 200);
    assert!(
        anon.get("/static/panel.js")
            .header("content-type")
            .unwrap()
            .contains("javascript")
    );

    // Sign out: the session is over.
    let r = b.submit("/", "/signout", &[]);
    assert_eq!((r.status, r.header("location")), (303, Some("/signin")));
    assert_eq!(b.get("/").status, 303);

    // Failures are limited per hosting name, like SMTP AUTH: past
    // limits.auth_failures even the right password is refused for a while.
    let mut c = env.browser();
    let mut failures = 0;
    while c.sign_in("beta", "wrong").status == 401 {
        failures += 1;
        assert!(failures <= 3, "sign-in failures were never limited");
    }
    let r = c.sign_in("beta", "beta-pw");
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("Sign-in failed"));
}

#[test]
fn workflow_without_javascript_and_hostile_dns() {
    let env = Env::start(|_| {});
    let mut b = env.signed_in("acme");

    // Add: refusals say why.
    for (input, why) in [("a..b", "invalid domain"), ("acme.test", "own domain")] {
        let r = b.submit("/add", "/add", &[("domain", input)]);
        assert_eq!(r.status, 400, "{input}");
        assert!(r.body.contains(why), "{input}: {}", r.body);
        assert!(r.body.contains("<label for=\"domain\">Domain</label>"));
    }
    let r = b.submit("/add", "/add", &[("domain", "Partner.Example")]);
    assert_eq!(r.status, 303);
    let r = b.submit("/add", "/add", &[("domain", PARTNER)]);
    assert!(r.body.contains("already"), "{}", r.body);

    // The record: name in full and as the bare label, type, value, each with Copy.
    let page = b.get("/domains/partner.example/record").body;
    let shown: serde_json::Value = serde_json::from_str(&env.relay.cli_ok(
        &["domain", "show", PARTNER, "--hosting", "acme", "--json"],
        "",
    ))
    .unwrap();
    let token = shown["record"]["value"].as_str().unwrap().to_string();
    for needle in [
        format!("<code id=\"record-name\">{RECORD}</code>"),
        "<code id=\"record-label\">domauthvalidation</code>".to_string(),
        "<code id=\"record-type\">TXT</code>".to_string(),
        format!("<code id=\"record-value\">{token}</code>"),
        "minutes to a few hours".to_string(),
        ">Verify</button>".to_string(),
    ] {
        assert!(page.contains(&needle), "record page lacks {needle:?}");
    }
    assert!(page.matches(">Copy</button>").count() >= 3);
    let home = b.get("/").body;
    assert!(home.contains("badge-pending\">Pending<"), "{home}");
    assert!(
        home.contains("http-equiv=\"refresh\""),
        "pending rows refresh"
    );
    for word in [">Record<", ">Verify<", ">Accounts<", ">Delete<"] {
        assert!(home.contains(word), "row lacks {word}");
    }

    // A hostile TXT value found in DNS shows as text, never as markup.
    env.dns.set_txt(
        RECORD,
        &["\"><script>alert(1)</script><img src=x onerror=alert(2)>"],
    );
    let r = b.submit(
        "/domains/partner.example/record",
        "/domains/partner.example/verify",
        &[],
    );
    assert_eq!(
        (r.status, r.header("location")),
        (303, Some("/domains/partner.example/verify"))
    );
    let result = b.get("/domains/partner.example/verify");
    assert_eq!(result.status, 200);
    for page in [&result.body, &b.get("/").body] {
        assert!(!page.contains("<script>alert"), "unescaped:\n{page}");
        assert!(!page.contains("<img src=x"), "unescaped:\n{page}");
        assert!(
            unescape(page).contains("<script>alert(1)</script><img src=x onerror=alert(2)>"),
            "the value is shown, as text: {page}"
        );
        assert!(page.contains("mismatch: found"), "{page}");
    }
    assert!(result.body.contains("id=\"verify-outcome\""));
    assert!(result.body.contains("its value is not the one shown here"));

    // The zone typed twice: said so.
    env.dns.remove(RECORD);
    env.dns.set_txt(&format!("{RECORD}.{PARTNER}"), &[&token]);
    b.submit(
        "/domains/partner.example/record",
        "/domains/partner.example/verify",
        &[],
    );
    let page = b.get("/domains/partner.example/verify").body;
    assert!(
        page.contains("found at domauthvalidation.partner.example.partner.example"),
        "{page}"
    );
    assert!(page.contains("Enter only the label"), "{page}");
    // NXDOMAIN vs no TXT vs DNS error are told apart on the page.
    env.dns.remove(&format!("{RECORD}.{PARTNER}"));
    b.submit(
        "/domains/partner.example/record",
        "/domains/partner.example/verify",
        &[],
    );
    let page = b.get("/domains/partner.example/verify").body;
    assert!(page.contains("does not exist"), "{page}");

    // The right value, with curly quotes: Verified, and saved (the list shows it).
    env.dns
        .set_txt(RECORD, &[&format!("\u{201c}{token}\u{201d}")]);
    b.submit("/", "/domains/partner.example/verify", &[]);
    let page = b.get("/domains/partner.example/verify").body;
    assert!(page.contains("<h2>Verified</h2>"), "{page}");
    let home = b.get("/").body;
    assert!(home.contains("badge-verified\">Verified<"), "{home}");
    assert!(home.contains("last checked just now"), "{home}");
    assert!(!home.contains("http-equiv=\"refresh\""), "nothing pending");

    // Accounts: one per line or comma/space separated; a result per address.
    let r = b.submit(
        "/domains/partner.example/accounts",
        "/domains/partner.example/accounts",
        &[(
            "addresses",
            "sales@partner.example,\nhelp@partner.example x@other.example\n<b>@partner.example",
        )],
    );
    assert_eq!(r.status, 303);
    let page = b.get("/domains/partner.example/accounts").body;
    assert!(
        page.contains("<strong>sales@partner.example</strong>: added"),
        "{page}"
    );
    assert!(
        page.contains("<strong>help@partner.example</strong>: added"),
        "{page}"
    );
    assert!(
        page.contains(
            "<strong>x@other.example</strong>: refused (not an address of partner.example)"
        ),
        "{page}"
    );
    assert!(
        !page.contains("<b>@") && unescape(&page).contains("<b>@partner.example</strong>: refused"),
        "{page}"
    );
    assert!(page.contains(">Remove</button>"));
    assert!(page.contains("<label for=\"addresses\">"));
    // The results were shown once (POST-redirect-GET), the list stays.
    let again = b.get("/domains/partner.example/accounts").body;
    assert!(!again.contains("id=\"account-results\""));
    assert!(again.contains("<span class=\"address\">help@partner.example</span>"));
    let r = b.submit(
        "/domains/partner.example/accounts",
        "/domains/partner.example/accounts",
        &[("addresses", "sales@partner.example")],
    );
    assert_eq!(r.status, 303);
    assert!(
        b.get("/domains/partner.example/accounts")
            .body
            .contains(": already listed")
    );
    let r = b.submit(
        "/domains/partner.example/accounts",
        "/domains/partner.example/accounts/remove",
        &[("address", "help@partner.example")],
    );
    assert_eq!(r.status, 303);
    let page = b.get("/domains/partner.example/accounts").body;
    assert!(!page.contains("<span class=\"address\">help@partner.example</span>"));

    // Check a sender: the decision of SPEC §3 in words.
    let page = b
        .get("/check?mailbox=info%40acme.test&sender=sales%40partner.example")
        .body;
    assert!(page.contains("<h2>Allowed</h2>"), "{page}");
    let page = b
        .get("/check?mailbox=info%40acme.test&sender=help%40partner.example")
        .body;
    assert!(page.contains("<h2>Refused</h2>"), "{page}");
    assert!(page.contains("<label for=\"mailbox\">") && page.contains("<label for=\"sender\">"));
    let page = b
        .get("/check?mailbox=info%40beta.test&sender=sales%40partner.example")
        .body;
    assert!(
        page.contains("<h2>Refused</h2>") && page.contains("unknown login"),
        "{page}"
    );

    // Delete asks first; Cancel goes back; Delete deletes.
    let page = b.get("/domains/partner.example/delete").body;
    assert!(
        page.contains("Delete partner.example and its 1 authorized accounts?"),
        "{page}"
    );
    assert!(page.contains(">Delete</button>") && page.contains(">Cancel</a>"));
    assert!(b.get("/").body.contains("row-partner.example"));
    let r = b.submit(
        "/domains/partner.example/delete",
        "/domains/partner.example/delete",
        &[],
    );
    assert_eq!((r.status, r.header("location")), (303, Some("/")));
    let home = b.get("/").body;
    assert!(!home.contains("row-partner.example"));
    assert!(
        home.contains("Deleted partner.example and its 1 authorized account."),
        "{home}"
    );
    let out = env.relay.cli(
        &[
            "explain",
            "--login",
            "info@acme.test",
            "--sender",
            "sales@partner.example",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn another_hostings_domain_is_not_found() {
    let env = Env::start(|_| {});
    let mut a = env.signed_in("acme");
    assert_eq!(a.submit("/add", "/add", &[("domain", PARTNER)]).status, 303);
    let mut b = env.signed_in("beta");
    assert!(!b.get("/").body.contains(PARTNER));
    let ghost = "ghost.example";
    for d in [PARTNER, ghost] {
        for path in ["record", "verify", "accounts", "delete"] {
            let r = b.get(&format!("/domains/{d}/{path}"));
            assert_eq!(r.status, 404, "GET {d}/{path}");
            assert!(!r.body.contains(d) || d == ghost, "{}", r.body);
        }
        for path in ["verify", "accounts", "accounts/remove", "delete"] {
            let r = b.submit(
                "/",
                &format!("/domains/{d}/{path}"),
                &[
                    ("addresses", &format!("x@{d}")),
                    ("address", &format!("x@{d}")),
                ],
            );
            assert_eq!(r.status, 404, "POST {d}/{path}: {}", r.body);
        }
    }
    // Acme's domain is untouched.
    assert!(a.get("/").body.contains("row-partner.example"));
    assert_eq!(a.get("/domains/partner.example/record").status, 200);
}

/// `[panel] tls = true`: HTTPS with the [tls] pair, and the cookie is Secure.
#[test]
fn panel_over_tls() {
    let curl = std::process::Command::new("curl").arg("--version").output();
    assert!(
        curl.is_ok_and(|o| o.status.success()),
        "curl is needed for this test (tests/run installs it)"
    );
    let env = Env::start(|c| {
        c.set("panel", "tls", "true");
    });
    let out = std::process::Command::new("curl")
        .args(["-sk", "-D", "-", "-o", "/dev/null"])
        .arg(format!("https://127.0.0.1:{}/signin", env.port))
        .output()
        .expect("run curl");
    let head = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let cookie = head
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: domauth_session=")
        })
        .unwrap_or_else(|| panic!("no session cookie: {head}"));
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    // Plain HTTP on the TLS port gets nothing useful.
    let plain = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(format!("http://127.0.0.1:{}/signin", env.port))
        .output()
        .expect("run curl");
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "200");
}

/// SIGTERM stops the server even while a client holds a panel connection
/// open in the middle of its request headers.
#[test]
fn a_slow_panel_client_does_not_hold_up_shutdown() {
    use std::io::Write;
    let mut env = Env::start(|_| {});
    let mut held = std::net::TcpStream::connect(("127.0.0.1", env.port)).expect("connect");
    held.write_all(b"GET /signin HTTP/1.1\r\nHost: x\r\n")
        .expect("half a request");
    // And one idle keep-alive connection after a complete request.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", env.port)).expect("connect");
    idle.write_all(b"GET /signin HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("a request");
    assert_eq!(env.relay.stop(), Some(0), "{}", env.relay.log());
}

/// `panel.session_idle`: every request extends the session; one left
/// unused longer than that is over.
#[test]
fn idle_sessions_expire() {
    let env = Env::start(|c| {
        c.set("panel", "session_idle", "\"2s\"");
    });
    let mut b = env.signed_in("acme");
    let r = b.get("/");
    assert_eq!(r.status, 200);
    let set = r.headers_named("set-cookie").join("\n");
    assert!(
        set.contains("Max-Age=2"),
        "each request renews the cookie: {set}"
    );
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let r = b.get("/");
    assert_eq!((r.status, r.header("location")), (303, Some("/signin")));
}
