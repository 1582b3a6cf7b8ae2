//! The hosting panel (SPEC §8) in a real browser: headless Chromium over WebDriver against
//! the real `domauth serve`, the in-process DNS server whose TXT records the test changes,
//! and swaks through the relay to prove a change made in the panel is in force for SMTP.
//!
//! Controls and fields are found by the words SPEC §8 puts on them ("Add domain", "Verify",
//! "Hosting", ...), as a user finds them. Screenshots of each step of a failing test are
//! left in `target/tmp/panel/<test>/`.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::{
    net::{SocketAddr, TcpStream},
    sync::Mutex,
    time::{Duration, Instant},
};

use browser::{Browser, BrowserOptions};
use common::{Relay, RelayConfig, Sink, dns::TestDns};

const HOSTING: &str = "acme";
const PANEL_PASSWORD: &str = "panel-secret-1";
const MAILBOX: &str = "info@acme.example";
const MAILBOX_PASSWORD: &str = "mailbox-pw-1";
const LABEL: &str = "domauthvalidation";

/// One browser test at a time: each runs a relay and a Chromium, and the machine is small.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

/// Runs a browser test's steps on a runtime of its own, one test at a time.
fn serial(steps: impl std::future::Future<Output = ()>) {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(steps);
}

/// The relay with its panel on a free port, a DNS server for the zone `example`, an
/// upstream, and the hosting `acme` (own domain acme.example, mailbox info@acme.example,
/// panel password set).
struct Panel {
    relay: Relay,
    dns: TestDns,
    sink: Sink,
    base: String,
}

impl Panel {
    fn start() -> Panel {
        Panel::start_with(|_| {})
    }

    fn start_with(tweak: impl FnOnce(&mut RelayConfig)) -> Panel {
        let sink = Sink::start();
        let dns = TestDns::start("example");
        let mut config = RelayConfig::new(sink.port);
        config.set("dns", "nameservers", &format!("[\"{}\"]", dns.addr()));
        tweak(&mut config);
        let port = config.panel_port();
        let relay = Relay::start_with(config);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the panel did not listen on 127.0.0.1:{port}:\n{}",
                relay.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        relay.add_mailbox(HOSTING, MAILBOX, MAILBOX_PASSWORD);
        relay.cli_ok(
            &["hosting", "passwd", HOSTING],
            &format!("{PANEL_PASSWORD}\n"),
        );
        Panel {
            relay,
            dns,
            sink,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The TXT value to publish for `domain`, as the CLI shows it.
    fn token(&self, domain: &str) -> String {
        let out = self.relay.cli_ok(
            &["domain", "show", domain, "--hosting", HOSTING, "--json"],
            "",
        );
        let v: serde_json::Value = serde_json::from_str(&out).expect("domain show --json");
        v["record"]["value"]
            .as_str()
            .expect("record.value in domain show --json")
            .to_string()
    }

    fn publish(&self, domain: &str, value: &str) {
        self.dns.set_txt(&format!("{LABEL}.{domain}."), &[value]);
    }

    /// swaks as the mailbox, sending as `from`: its exit code (0: 250, 23: MAIL refused).
    fn send_as(&self, from: &str) -> common::SwaksResult {
        self.relay
            .swaks()
            .auth(MAILBOX, MAILBOX_PASSWORD)
            .from(from)
            .to("someone@elsewhere.test")
            .header(&format!("From: {from}"))
            .run()
    }
}

/// Signs in as `acme` from the sign-in page and waits for the home page.
async fn sign_in(b: &mut Browser, p: &Panel) {
    sign_in_as(b, p, HOSTING, PANEL_PASSWORD).await;
}

async fn sign_in_as(b: &mut Browser, p: &Panel, hosting: &str, password: &str) {
    b.goto(&p.url("/")).await;
    b.fill("Hosting", hosting).await;
    b.fill("Password", password).await;
    b.click("Sign in").await;
    b.wait_text("Domain authorization").await;
}

/// The domains of `acme`, as the CLI lists them.
fn listed_domains(p: &Panel) -> Vec<String> {
    let out = p
        .relay
        .cli_ok(&["domain", "list", "--hosting", HOSTING, "--json"], "");
    let v: serde_json::Value = serde_json::from_str(&out).expect("domain list --json");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["domain"].as_str().map(str::to_string))
        .collect()
}

/// Sends a POST form to `action` from the current page, as the page's own forms do: with
/// the page's hidden fields (its CSRF token) and `fields`.
async fn post_from_page(b: &mut Browser, action: &str, fields: &[(&str, &str)]) {
    let fields: Vec<serde_json::Value> = fields
        .iter()
        .map(|(n, v)| serde_json::json!([n, v]))
        .collect();
    let script = "const [action, fields] = arguments;
        const f = document.createElement('form');
        f.method = 'post';
        f.action = action;
        const add = (name, value) => {
            if (f.querySelector(`[name=\"${name}\"]`)) return;
            const i = document.createElement('input');
            i.type = 'hidden'; i.name = name; i.value = value;
            f.appendChild(i);
        };
        for (const [n, v] of fields) add(n, v);
        document.querySelectorAll('input[type=hidden]').forEach(i => add(i.name, i.value));
        document.body.appendChild(f);
        window.domauthOldPage = true;
        f.submit();";
    if let Err(e) = b
        .client()
        .execute(
            script,
            vec![serde_json::json!(action), serde_json::json!(fields)],
        )
        .await
    {
        b.fail(&format!("post a form to {action}: {e}")).await;
    }
    // The answer is a new document (the marker is gone), settled.
    let deadline = Instant::now() + browser::PAGE_TIMEOUT;
    loop {
        let old = b
            .client()
            .execute("return window.domauthOldPage === true;", vec![])
            .await
            .map(|v| v == serde_json::Value::Bool(true))
            .unwrap_or(true);
        if !old && !b.text().await.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            b.fail(&format!("no answer to the form sent to {action}"))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// From the home page: "Add domain", type it, "Add"; waits for the record page.
async fn add_domain(b: &mut Browser, p: &Panel, domain: &str) {
    b.goto(&p.url("/")).await;
    b.click("Add domain").await;
    b.fill("Domain", domain).await;
    b.click("Add").await;
    b.wait_text(&format!("{LABEL}.{domain}")).await;
}

/// Goes home and waits for the domain's row.
async fn home_row(b: &mut Browser, p: &Panel, domain: &str) -> String {
    b.goto(&p.url("/")).await;
    b.wait_text("Domain authorization").await;
    let deadline = Instant::now() + browser::PAGE_TIMEOUT;
    loop {
        if let Some(row) = b.row_text(domain, "Verify").await {
            return row;
        }
        if Instant::now() >= deadline {
            b.fail(&format!(
                "no row with {domain} and \"Verify\" on the home page"
            ))
            .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After "Verify" was pressed on a page that read `before`: the outcome says verified.
async fn verified_outcome(b: &mut Browser, before: &str) {
    let text = b.wait_change(before).await.to_lowercase();
    b.check(
        text.contains("verified") && !text.contains("not verified"),
        "\"Verify\" with the right record does not say verified",
    )
    .await;
}

/// Lines of `text` that mention `address`.
fn lines_with<'a>(text: &'a str, address: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(address)).collect()
}

/// True when some line mentioning `address` also says one of `words` (case-insensitive).
fn says(text: &str, address: &str, words: &[&str]) -> bool {
    lines_with(text, address).iter().any(|l| {
        let l = l.to_lowercase();
        words.iter().any(|w| l.contains(w))
    })
}

/// The record's name is shown bare too: "domauthvalidation" not followed by ".".
fn shows_bare_label(shown: &str) -> bool {
    shown
        .split(LABEL)
        .skip(1)
        .any(|rest| !rest.starts_with('.'))
}

// ---------------------------------------------------------------- the harness itself

/// The no-JavaScript pass below is only a proof if the switch really stops scripts: a page
/// whose script changes its text shows the change with JavaScript on and not with it off.
#[test]
fn harness_javascript_switch_really_blocks_scripts() {
    serial(harness_javascript_switch_really_blocks_scripts_steps());
}

async fn harness_javascript_switch_really_blocks_scripts_steps() {
    let page = "data:text/html,<p id=x>static</p><script>document.getElementById('x').textContent='scripted'</script>";
    for (javascript, expected) in [(true, "scripted"), (false, "static")] {
        let mut b = Browser::start(
            &format!("harness-js-{javascript}"),
            BrowserOptions {
                javascript,
                ..Default::default()
            },
        )
        .await;
        b.goto(page).await;
        let text = b.wait_text_any(&["scripted", "static"]).await;
        b.check(
            text.trim() == expected,
            &format!("javascript={javascript}: the page says {text:?}, expected {expected:?}"),
        )
        .await;
        b.close().await;
    }
}

// ---------------------------------------------------------------- sign-in and session

#[test]
fn sign_in_failure_does_not_say_which_field_and_success_lands_home() {
    serial(sign_in_failure_does_not_say_which_field_and_success_lands_home_steps());
}

async fn sign_in_failure_does_not_say_which_field_and_success_lands_home_steps() {
    let p = Panel::start();
    let mut b = Browser::start("sign-in", BrowserOptions::default()).await;

    b.goto(&p.url("/")).await;
    b.field("Hosting").await;
    b.field("Password").await;
    let blank = b.text().await;
    b.step("sign-in-page").await;

    // Right hosting, wrong password.
    b.fill("Hosting", HOSTING).await;
    b.fill("Password", "not-the-password").await;
    b.click("Sign in").await;
    let wrong_password = b.wait_change(&blank).await;
    b.step("wrong-password").await;
    b.check(
        !wrong_password.contains("Domain authorization"),
        "a wrong password signed in",
    )
    .await;

    // Unknown hosting, a password that exists elsewhere.
    b.goto(&p.url("/")).await;
    b.fill("Hosting", "nosuchhosting").await;
    b.fill("Password", PANEL_PASSWORD).await;
    b.click("Sign in").await;
    let unknown_hosting = b.wait_change(&blank).await;
    b.step("unknown-hosting").await;
    b.check(
        !unknown_hosting.contains("Domain authorization"),
        "an unknown hosting signed in",
    )
    .await;
    // The same words for both: nothing tells which field was wrong.
    let neutral = |t: &str| t.replace(HOSTING, "").replace("nosuchhosting", "");
    b.check(
        neutral(&wrong_password) == neutral(&unknown_hosting),
        &format!(
            "a wrong password and an unknown hosting read differently:\n--- wrong password:\n\
             {wrong_password}\n--- unknown hosting:\n{unknown_hosting}"
        ),
    )
    .await;

    let before: Vec<(String, String)> = b
        .cookies()
        .await
        .iter()
        .map(|c| (c.name().to_string(), c.value().to_string()))
        .collect();
    sign_in(&mut b, &p).await;
    b.step("home").await;
    b.check(
        b.text().await.contains("Add domain"),
        "the home page has no \"Add domain\"",
    )
    .await;

    // The session cookie: HttpOnly, SameSite=Strict, and a new one at sign-in (no
    // session fixation).
    let cookies = b.cookies().await;
    b.check(!cookies.is_empty(), "signed in, but no cookie was set")
        .await;
    for c in &cookies {
        b.check(
            c.http_only() == Some(true),
            &format!("cookie {} is not HttpOnly", c.name()),
        )
        .await;
        b.check(
            format!("{:?}", c.same_site()) == "Some(Strict)",
            &format!(
                "cookie {} is not SameSite=Strict: {:?}",
                c.name(),
                c.same_site()
            ),
        )
        .await;
        if let Some((_, old)) = before.iter().find(|(n, _)| n == c.name()) {
            b.check(
                old != c.value(),
                &format!("cookie {} kept its value across sign-in", c.name()),
            )
            .await;
        }
    }
    b.close().await;
}

// ---------------------------------------------------------------- the seed workflow

/// The workflow the product exists for, end to end, with JavaScript on: add a domain, read
/// the record, fail to verify (not found, then mismatch), publish, verify, type accounts,
/// send through the relay, remove one, check a sender, delete (cancel, then confirm), sign
/// out.
#[test]
fn seed_workflow_in_the_browser() {
    serial(seed_workflow_in_the_browser_steps());
}

async fn seed_workflow_in_the_browser_steps() {
    let p = Panel::start();
    let mut b = Browser::start("seed-workflow", BrowserOptions::default()).await;
    let domain = "partner.example";

    sign_in(&mut b, &p).await;
    b.step("home-empty").await;

    // Add domain -> the record page.
    add_domain(&mut b, &p, domain).await;
    b.step("record").await;
    let token = p.token(domain);
    let shown = b.shown().await;
    b.check(
        shown.contains(&format!("{LABEL}.{domain}")),
        "the record page lacks the full name",
    )
    .await;
    b.check(
        shows_bare_label(&shown),
        "the record page lacks the bare label",
    )
    .await;
    b.check(shown.contains("TXT"), "the record page lacks the type TXT")
        .await;
    b.check(
        shown.contains(&token),
        &format!("the record page lacks the value {token:?}"),
    )
    .await;
    b.check(
        shown.to_lowercase().contains("hours"),
        "the record page lacks the note that DNS changes take minutes to hours",
    )
    .await;
    let copies = b
        .visible("//*[(self::button or self::a) and normalize-space(.)='Copy']|//input[@type='button' and @value='Copy']")
        .await
        .len();
    b.check(
        copies >= 3,
        &format!(
            "{copies} \"Copy\" buttons on the record page, expected one each for Name, Type, Value"
        ),
    )
    .await;

    // "Copy" puts the value beside it on the clipboard (the page's call to the clipboard
    // API is recorded: headless Chromium has no clipboard to read back).
    b.script(
        "window.copied = [];
         navigator.clipboard.writeText = t => { window.copied.push(t); return Promise.resolve(); };",
    )
    .await;
    b.click_in(&token, "Copy").await;
    let copied = b.script("return window.copied;").await;
    b.check(
        copied == serde_json::json!([token]),
        &format!("\"Copy\" beside the value copied {copied}"),
    )
    .await;

    // Verify before publishing: not found, still pending.
    b.click("Verify").await;
    b.wait_text_any(&["not found", "does not exist", "no txt"])
        .await;
    b.step("verify-not-found").await;
    let row = home_row(&mut b, &p, domain).await;
    b.check(
        row.contains("Pending"),
        &format!("the row is not Pending: {row:?}"),
    )
    .await;

    // Accounts of a domain not verified yet are refused, and say why.
    b.click_in_row(domain, "Accounts").await;
    b.fill_textarea("early@partner.example").await;
    b.click("Save").await;
    let text = b.wait_text("refused").await;
    b.check(
        says(
            &text,
            "early@partner.example",
            &["not verified", "pending verification"],
        ),
        "an account of a pending domain is not refused as \"domain not verified\"",
    )
    .await;
    b.step("accounts-pending").await;
    home_row(&mut b, &p, domain).await;

    // A record with another value: mismatch, showing what was found.
    p.publish(domain, "wrong-value-123");
    b.click_in_row(domain, "Verify").await;
    let text = b.wait_text("wrong-value-123").await.to_lowercase();
    b.check(
        text.contains("mismatch") || text.contains("found"),
        "a wrong record is not reported as a mismatch",
    )
    .await;
    b.step("verify-mismatch").await;
    // "Verify" saved its outcome: the list shows it, with when.
    let row = home_row(&mut b, &p, domain).await;
    b.check(
        row.contains("wrong-value-123") && row.to_lowercase().contains("last checked"),
        &format!("the row does not keep the last check (when, what was found): {row:?}"),
    )
    .await;

    // The commonest mistake: the name typed with the zone twice. The panel says so.
    let doubled = format!("{LABEL}.{domain}.{domain}.");
    p.dns.remove(&format!("{LABEL}.{domain}."));
    p.dns.set_txt(&doubled, &[&token]);
    b.click_in_row(domain, "Verify").await;
    b.wait_text(&format!("{domain}.{domain}")).await;
    b.step("verify-zone-twice").await;
    p.dns.remove(&doubled);

    // The right record: Verified.
    p.publish(domain, &token);
    let row = home_row(&mut b, &p, domain).await;
    b.check(!row.contains("Verified"), "verified before anybody checked")
        .await;
    let before = b.text().await;
    b.click_in_row(domain, "Verify").await;
    verified_outcome(&mut b, &before).await;
    b.step("verify-ok").await;
    let row = home_row(&mut b, &p, domain).await;
    b.check(
        row.contains("Verified"),
        &format!("the row has no Verified badge: {row:?}"),
    )
    .await;
    b.step("home-verified").await;

    // Accounts: separators of every kind, one foreign address, one invalid.
    b.click_in_row(domain, "Accounts").await;
    b.fill_textarea(
        "sales@partner.example, billing@partner.example\nother@elsewhere.example not-an-address",
    )
    .await;
    b.step("accounts-typed").await;
    b.click("Save").await;
    let text = b.wait_text("added").await;
    b.step("accounts-saved").await;
    for address in ["sales@partner.example", "billing@partner.example"] {
        b.check(
            says(&text, address, &["added"]),
            &format!("no \"added\" for {address}"),
        )
        .await;
    }
    b.check(
        says(&text, "other@elsewhere.example", &["not an address"])
            && !says(&text, "other@elsewhere.example", &["added"]),
        "the foreign address is not refused as not of this domain",
    )
    .await;
    b.check(
        says(&text, "not-an-address", &["invalid"]) && !says(&text, "not-an-address", &["added"]),
        "the invalid address is not refused as invalid",
    )
    .await;
    b.fill_textarea("SALES@partner.example").await;
    b.click("Save").await;
    let text = b.wait_text("already").await;
    b.check(
        says(&text, "sales@partner.example", &["already listed"]),
        "an address typed again is not \"already listed\"",
    )
    .await;
    b.step("accounts-already").await;

    // In force for SMTP at once.
    p.send_as("billing@partner.example").assert_code(0);
    p.send_as("sales@partner.example").assert_code(0);
    p.sink.wait_for(2, Duration::from_secs(30));

    // Remove one: refused at the next MAIL FROM.
    b.click_in_row("billing@partner.example", "Remove").await;
    let deadline = Instant::now() + browser::PAGE_TIMEOUT;
    while b
        .row_text("billing@partner.example", "Remove")
        .await
        .is_some()
    {
        if Instant::now() >= deadline {
            b.fail("billing@partner.example is still listed after \"Remove\"")
                .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.step("accounts-removed").await;
    p.send_as("billing@partner.example")
        .assert_code(23)
        .assert_contains("553 5.7.1");

    // Check a sender: the decision `domauth explain` gives, in words.
    for (sender, allowed) in [
        ("sales@partner.example", true),
        ("billing@partner.example", false),
    ] {
        let out = p.relay.cli(
            &["explain", "--login", MAILBOX, "--sender", sender, "--json"],
            "",
        );
        let explained: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("explain --json");
        assert_eq!(explained["allowed"], allowed, "explain: {explained}");
        let reason = explained["reason"].as_str().unwrap_or_default().to_string();
        b.goto(&p.url("/")).await;
        b.click("Check a sender").await;
        let field = b.field("Sender").await;
        b.fill("Mailbox", MAILBOX).await;
        b.fill("Sender", sender).await;
        let before = b.text().await;
        b.submit_form_of(&field).await;
        let text = b.wait_change(&before).await;
        b.step(&format!("check-a-sender-{allowed}")).await;
        b.check(
            text.contains(&reason),
            &format!("\"Check a sender\" does not give explain's reason {reason:?}"),
        )
        .await;
        let verdict = if allowed { "allowed" } else { "refused" };
        b.check(
            text.to_lowercase().contains(verdict),
            &format!("\"Check a sender\" does not say {verdict}"),
        )
        .await;
    }

    // Delete: the question, Cancel keeps it, Delete removes it.
    home_row(&mut b, &p, domain).await;
    let question = format!("Delete {domain} and its 1 authorized account");
    for confirm in [false, true] {
        b.click_in_row(domain, "Delete").await;
        if let Some(dialog) = b.dialog_text().await {
            // A script's confirm(): the same question, OK deletes.
            b.check(
                dialog.contains(&question),
                &format!("the confirmation asks {dialog:?}"),
            )
            .await;
            if confirm {
                let _ = b.client().accept_alert().await;
            } else {
                let _ = b.client().dismiss_alert().await;
            }
        } else {
            b.wait_text(&question).await;
            b.step(if confirm {
                "delete-confirm"
            } else {
                "delete-ask"
            })
            .await;
            let label = if confirm { "Delete" } else { "Cancel" };
            b.click_in(&question, label).await;
        }
        if !confirm {
            let row = home_row(&mut b, &p, domain).await;
            b.check(row.contains("Verified"), "Cancel changed the domain")
                .await;
        }
    }
    b.goto(&p.url("/")).await;
    let deadline = Instant::now() + browser::PAGE_TIMEOUT;
    while b.row_text(domain, "Verify").await.is_some() {
        if Instant::now() >= deadline {
            b.fail("the domain is still listed after \"Delete\"").await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.goto(&p.url("/")).await;
    }
    b.step("deleted").await;
    p.send_as("sales@partner.example")
        .assert_code(23)
        .assert_contains("553 5.7.1");

    // Sign out: the session is gone, also for whoever kept its cookie.
    let kept = b.cookies().await;
    b.click("Sign out").await;
    b.field("Hosting").await;
    b.step("signed-out").await;
    b.goto(&p.url("/")).await;
    b.field("Hosting").await;
    b.assert_no_text("Domain authorization").await;
    let _ = b.client().delete_all_cookies().await;
    for c in kept {
        let _ = b.client().add_cookie(c).await;
    }
    b.goto(&p.url("/")).await;
    b.field("Hosting").await;
    b.assert_no_text("Domain authorization").await;
    b.close().await;
}

// ---------------------------------------------------------------- hostile DNS text

/// A TXT record is attacker-controlled text: the panel shows it as text on the verify
/// outcome and on the home page; no dialog opens and no element is made from it.
#[test]
fn hostile_txt_value_is_shown_as_text() {
    serial(hostile_txt_value_is_shown_as_text_steps());
}

async fn hostile_txt_value_is_shown_as_text_steps() {
    let p = Panel::start();
    let mut b = Browser::start("hostile-txt", BrowserOptions::default()).await;
    sign_in(&mut b, &p).await;
    for (domain, hostile) in [
        ("img.example", "<img src=x onerror=alert(1)>"),
        ("script.example", "\"><script>alert(1)</script>"),
    ] {
        add_domain(&mut b, &p, domain).await;
        p.publish(domain, hostile);
        let row = home_row(&mut b, &p, domain).await;
        b.check(!row.contains("Verified"), "verified with a wrong record")
            .await;
        b.click_in_row(domain, "Verify").await;
        b.wait_text(hostile).await;
        b.step(&format!("verify-{domain}")).await;
        for page in ["verify outcome", "home page"] {
            if page == "home page" {
                home_row(&mut b, &p, domain).await;
                b.wait_text(hostile).await;
                b.step(&format!("home-{domain}")).await;
            }
            let dialog = b.dialog_text().await;
            b.check(
                dialog.is_none(),
                &format!("{page}: a dialog opened: {dialog:?}"),
            )
            .await;
            let made = b
                .all("//img[@src='x' or @onerror]|//script[contains(., 'alert(1)')]")
                .await
                .len();
            b.check(
                made == 0,
                &format!("{page}: the TXT value became {made} element(s)"),
            )
            .await;
        }
    }
    b.close().await;
}

// ---------------------------------------------------------------- live status

/// With a short check_interval the background check verifies a pending domain once its
/// record appears, and the home page shows it without the user reloading.
#[test]
fn pending_row_updates_without_a_manual_reload() {
    serial(pending_row_updates_without_a_manual_reload_steps());
}

async fn pending_row_updates_without_a_manual_reload_steps() {
    let p = Panel::start_with(|c| {
        c.set("verification", "check_interval", "\"1s\"");
    });
    let mut b = Browser::start("live-status", BrowserOptions::default()).await;
    let domain = "live.example";
    sign_in(&mut b, &p).await;
    add_domain(&mut b, &p, domain).await;
    let row = home_row(&mut b, &p, domain).await;
    b.check(
        row.contains("Pending"),
        &format!("a new domain is not Pending: {row:?}"),
    )
    .await;
    b.step("pending").await;

    p.publish(domain, &p.token(domain));
    // Only waiting from here: no goto, no refresh.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = b.row_text(domain, "Verify").await.unwrap_or_default();
        if row.contains("Verified") {
            break;
        }
        if Instant::now() >= deadline {
            b.fail(&format!(
                "the row still reads {row:?} 60 s after the record appeared"
            ))
            .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.step("verified-live").await;
    b.close().await;
}

// ---------------------------------------------------------------- refusals on Add

#[test]
fn add_domain_says_why_a_name_is_refused() {
    serial(add_domain_says_why_a_name_is_refused_steps());
}

async fn add_domain_says_why_a_name_is_refused_steps() {
    let p = Panel::start();
    let mut b = Browser::start("add-refused", BrowserOptions::default()).await;
    sign_in(&mut b, &p).await;
    add_domain(&mut b, &p, "listed.example").await;
    for (name, why) in [
        ("not a domain!", &["invalid"][..]),
        ("acme.example", &["own"][..]),
        ("LISTED.example.", &["already"][..]),
    ] {
        b.goto(&p.url("/")).await;
        b.click("Add domain").await;
        b.fill("Domain", name).await;
        let before = b.text().await;
        b.click("Add").await;
        let text = b.wait_change(&before).await.to_lowercase();
        b.step(&format!("refused-{}", why[0])).await;
        b.check(
            why.iter().any(|w| text.contains(w)),
            &format!("adding {name:?} does not say {why:?}"),
        )
        .await;
    }
    let listed = p
        .relay
        .cli_ok(&["domain", "list", "--hosting", HOSTING, "--json"], "");
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("domain list --json");
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "refused names were added: {listed}"
    );
    b.close().await;
}

// ---------------------------------------------------------------- phone width

/// On a phone-sized screen the pages of the workflow scroll only vertically.
#[test]
fn phone_sized_window_has_no_horizontal_scroll() {
    serial(phone_sized_window_has_no_horizontal_scroll_steps());
}

async fn phone_sized_window_has_no_horizontal_scroll_steps() {
    let p = Panel::start();
    let mut b = Browser::start(
        "phone",
        BrowserOptions {
            window: (390, 844),
            ..Default::default()
        },
    )
    .await;
    let domain = "a-rather-long-partner-domain-name.example";
    let overflow = "return [document.documentElement.scrollWidth, \
                    document.documentElement.clientWidth, window.innerWidth];";

    b.goto(&p.url("/")).await;
    b.field("Hosting").await;
    let mut pages = vec![("sign-in", b.script(overflow).await)];
    sign_in(&mut b, &p).await;
    add_domain(&mut b, &p, domain).await;
    pages.push(("record", b.script(overflow).await));
    p.publish(domain, &p.token(domain));
    home_row(&mut b, &p, domain).await;
    let before = b.text().await;
    b.click_in_row(domain, "Verify").await;
    verified_outcome(&mut b, &before).await;
    home_row(&mut b, &p, domain).await;
    b.step("home-phone").await;
    pages.push(("home", b.script(overflow).await));
    b.click_in_row(domain, "Accounts").await;
    b.wait_visible("//textarea", "the accounts text area").await;
    pages.push(("accounts", b.script(overflow).await));

    for (page, sizes) in pages {
        let n = |i: usize| sizes[i].as_f64().unwrap_or(f64::MAX);
        let (scroll, client, inner) = (n(0), n(1), n(2));
        b.check(
            inner <= 420.0,
            &format!("the window is not phone-sized: innerWidth {inner}"),
        )
        .await;
        b.check(
            scroll <= client,
            &format!("{page}: scrolls sideways on a phone ({scroll} px wide in {client} px)"),
        )
        .await;
    }
    b.close().await;
}

// ---------------------------------------------------------------- without JavaScript

/// The core workflow with JavaScript blocked: plain forms and redirects only.
#[test]
fn core_workflow_without_javascript() {
    serial(core_workflow_without_javascript_steps());
}

async fn core_workflow_without_javascript_steps() {
    let p = Panel::start();
    let mut b = Browser::start(
        "no-javascript",
        BrowserOptions {
            javascript: false,
            ..Default::default()
        },
    )
    .await;
    let domain = "nojs.example";
    sign_in(&mut b, &p).await;
    add_domain(&mut b, &p, domain).await;
    let token = p.token(domain);
    b.check(
        b.shown().await.contains(&token),
        "the record page lacks the value",
    )
    .await;
    b.step("record").await;
    // Quoted, as users paste it.
    p.publish(domain, &format!("\"{token}\""));
    let before = b.text().await;
    b.click("Verify").await;
    verified_outcome(&mut b, &before).await;
    b.step("verified").await;
    let row = home_row(&mut b, &p, domain).await;
    b.check(row.contains("Verified"), "no Verified badge").await;

    b.click_in_row(domain, "Accounts").await;
    b.fill_textarea("sales@nojs.example").await;
    b.click("Save").await;
    let text = b.wait_text("added").await;
    b.check(
        says(&text, "sales@nojs.example", &["added"]),
        "the account was not added",
    )
    .await;
    b.step("account-added").await;
    p.send_as("sales@nojs.example").assert_code(0);

    home_row(&mut b, &p, domain).await;
    b.click_in_row(domain, "Delete").await;
    let question = format!("Delete {domain} and its 1 authorized account");
    b.wait_text(&question).await;
    b.step("delete-ask").await;
    b.click_in(&question, "Delete").await;
    b.wait_text("Domain authorization").await;
    b.goto(&p.url("/")).await;
    b.check(
        b.row_text(domain, "Verify").await.is_none(),
        "the domain is still listed after \"Delete\"",
    )
    .await;
    p.send_as("sales@nojs.example").assert_code(23);

    b.click("Sign out").await;
    b.field("Hosting").await;
    b.close().await;
}

// ---------------------------------------------------------------- tenant isolation

/// Another hosting gets, for acme's domain, exactly what it gets for a domain that does
/// not exist: on every page of a domain and for every action, through the browser.
#[test]
fn another_hostings_domain_is_not_found_in_the_panel() {
    serial(another_hostings_domain_is_not_found_in_the_panel_steps());
}

async fn another_hostings_domain_is_not_found_in_the_panel_steps() {
    let p = Panel::start();
    p.relay
        .cli_ok(&["hosting", "add", "beta", "--domain", "beta.example"], "");
    p.relay
        .cli_ok(&["hosting", "passwd", "beta"], "beta-secret-1\n");
    let mut b = Browser::start("isolation", BrowserOptions::default()).await;
    let domain = "partner.example";
    let absent = "nosuch.example";

    // As acme: the domain, verified, with an account; collect the addresses of its pages
    // and forms from the panel itself.
    sign_in(&mut b, &p).await;
    add_domain(&mut b, &p, domain).await;
    let token = p.token(domain);
    p.publish(domain, &token);
    p.relay
        .cli_ok(&["domain", "verify", domain, "--hosting", HOSTING], "");
    p.relay.cli_ok(
        &[
            "account",
            "add",
            "sales@partner.example",
            "--hosting",
            HOSTING,
        ],
        "",
    );
    home_row(&mut b, &p, domain).await;
    let t = browser::xpath_literal(domain);
    let row =
        format!("//tr[contains(normalize-space(.), {t})]|//li[contains(normalize-space(.), {t})]");
    let mut pages = Vec::new();
    for link in b.all(&format!("({row})//a[@href]")).await {
        if let Ok(Some(href)) = link.prop("href").await {
            pages.push(href);
        }
    }
    let mut actions = Vec::new();
    for form in b
        .all(&format!("({row})//form[@method='post' or @method='POST']"))
        .await
    {
        if let Ok(Some(action)) = form.prop("action").await {
            actions.push(action);
        }
    }
    // The delete form is on the confirmation page; the accounts forms on theirs.
    for page in pages.clone() {
        b.goto(&page).await;
        for form in b
            .all("//main//form[@method='post' or @method='POST']")
            .await
        {
            if let Ok(Some(action)) = form.prop("action").await
                && action.contains(domain)
                && !actions.contains(&action)
            {
                actions.push(action);
            }
        }
    }
    b.check(
        pages.len() >= 3 && actions.len() >= 2,
        &format!("too few pages {pages:?} or forms {actions:?} of a domain to test"),
    )
    .await;
    eprintln!("acme's pages {pages:?}, forms {actions:?}");
    b.goto(&p.url("/")).await;
    b.click("Sign out").await;
    b.field("Hosting").await;

    // As beta.
    sign_in_as(&mut b, &p, "beta", "beta-secret-1").await;
    b.assert_no_text(domain).await;
    let neutral = |t: &str| t.replace(domain, "DOMAIN").replace(absent, "DOMAIN");
    for page in &pages {
        b.goto(page).await;
        let other = b.text().await;
        b.step("other-page").await;
        b.goto(&page.replace(domain, absent)).await;
        let none = b.text().await;
        b.check(
            neutral(&other) == neutral(&none),
            &format!(
                "{page} reads differently for another hosting's domain and for none:\n\
                 --- acme's:\n{other}\n--- none:\n{none}"
            ),
        )
        .await;
        b.check(
            !other.contains(&token),
            &format!("{page} shows acme's token"),
        )
        .await;
    }
    for action in &actions {
        let fields = [
            ("addresses", "x@partner.example"),
            ("address", "sales@partner.example"),
        ];
        b.goto(&p.url("/")).await;
        post_from_page(&mut b, action, &fields).await;
        let other = b.text().await;
        b.step("other-action").await;
        b.goto(&p.url("/")).await;
        let fields_absent = [
            ("addresses", "x@nosuch.example"),
            ("address", "sales@nosuch.example"),
        ];
        post_from_page(&mut b, &action.replace(domain, absent), &fields_absent).await;
        let none = b.text().await;
        b.check(
            neutral(&other).replace("x@DOMAIN", "") == neutral(&none).replace("x@DOMAIN", ""),
            &format!(
                "POST {action} reads differently for another hosting's domain and for none:\n\
                 --- acme's:\n{other}\n--- none:\n{none}"
            ),
        )
        .await;
    }
    // Nothing of acme's changed.
    assert_eq!(listed_domains(&p), vec![domain.to_string()]);
    let accounts = p
        .relay
        .cli_ok(&["account", "list", "--hosting", HOSTING, "--json"], "");
    assert!(
        accounts.contains("sales@partner.example") && !accounts.contains("x@partner.example"),
        "another hosting changed acme's accounts: {accounts}"
    );
    b.close().await;
}

// ---------------------------------------------------------------- CSRF

/// A form sent with a forged CSRF token changes nothing; the same form with the page's
/// token works.
#[test]
fn a_form_with_a_forged_csrf_token_changes_nothing() {
    serial(a_form_with_a_forged_csrf_token_changes_nothing_steps());
}

async fn a_form_with_a_forged_csrf_token_changes_nothing_steps() {
    let p = Panel::start();
    let mut b = Browser::start("csrf", BrowserOptions::default()).await;
    sign_in(&mut b, &p).await;
    b.click("Add domain").await;
    b.fill("Domain", "forged.example").await;
    let hidden = b.all("//form//input[@type='hidden']").await.len();
    b.check(hidden > 0, "the Add form carries no hidden token")
        .await;
    b.script(
        "document.querySelectorAll('form input[type=hidden]').forEach(i => i.value = 'forged');",
    )
    .await;
    let before = b.text().await;
    b.click("Add").await;
    b.wait_change(&before).await;
    b.step("forged").await;
    b.assert_no_text(&format!("{LABEL}.forged.example")).await;
    assert!(
        listed_domains(&p).is_empty(),
        "a forged CSRF token added a domain"
    );
    add_domain(&mut b, &p, "forged.example").await;
    assert_eq!(listed_domains(&p), vec!["forged.example".to_string()]);
    b.close().await;
}

// ---------------------------------------------------------------- keyboard and idle expiry

/// Signing in with the keyboard only: Tab to the fields, Enter to send.
#[test]
fn sign_in_by_keyboard() {
    serial(sign_in_by_keyboard_steps());
}

async fn sign_in_by_keyboard_steps() {
    use fantoccini::key::Key;
    let p = Panel::start();
    let mut b = Browser::start("keyboard", BrowserOptions::default()).await;
    b.goto(&p.url("/")).await;
    let hosting = b.field("Hosting").await;
    let hosting_id = hosting.element_id();
    let mut reached = false;
    for _ in 0..20 {
        let body = b.client().find(fantoccini::Locator::Css("body")).await;
        let active = b.client().active_element().await;
        if let Ok(active) = &active
            && active.element_id() == hosting_id
        {
            reached = true;
            break;
        }
        let target = match active {
            Ok(a) => a,
            Err(_) => body.expect("body"),
        };
        let _ = target.send_keys(&char::from(Key::Tab).to_string()).await;
    }
    b.check(reached, "Tab never reaches the \"Hosting\" field")
        .await;
    let typed = format!("{HOSTING}{}", char::from(Key::Tab));
    let _ = hosting.send_keys(&typed).await;
    let password = b.field("Password").await;
    let active = b.client().active_element().await;
    b.check(
        active.is_ok_and(|a| a.element_id() == password.element_id()),
        "Tab from \"Hosting\" does not go to \"Password\"",
    )
    .await;
    let _ = password
        .send_keys(&format!("{PANEL_PASSWORD}{}", char::from(Key::Enter)))
        .await;
    b.wait_text("Domain authorization").await;
    b.close().await;
}

/// A session left idle longer than panel.session_idle is gone.
#[test]
fn an_idle_session_expires() {
    serial(an_idle_session_expires_steps());
}

async fn an_idle_session_expires_steps() {
    let p = Panel::start_with(|c| {
        c.set("panel", "session_idle", "\"2s\"");
    });
    let mut b = Browser::start("idle", BrowserOptions::default()).await;
    sign_in(&mut b, &p).await;
    // Three times the idle limit: long enough on a loaded machine.
    tokio::time::sleep(Duration::from_secs(6)).await;
    b.goto(&p.url("/")).await;
    b.field("Hosting").await;
    b.assert_no_text("Domain authorization").await;
    b.close().await;
}

// ---------------------------------------------------------------- hostile typed input

/// What a user types comes back as text too: a domain name, an account address and a
/// sender made of markup are refused or answered, never turned into elements.
#[test]
fn hostile_input_typed_in_forms_is_shown_as_text() {
    serial(hostile_input_typed_in_forms_is_shown_as_text_steps());
}

async fn hostile_input_typed_in_forms_is_shown_as_text_steps() {
    let p = Panel::start();
    let mut b = Browser::start("hostile-input", BrowserOptions::default()).await;
    let domain = "partner.example";
    let hostile = "<img src=x onerror=alert(1)>";
    sign_in(&mut b, &p).await;
    add_domain(&mut b, &p, domain).await;
    p.publish(domain, &p.token(domain));
    p.relay
        .cli_ok(&["domain", "verify", domain, "--hosting", HOSTING], "");

    // A domain name.
    b.goto(&p.url("/")).await;
    b.click("Add domain").await;
    b.fill("Domain", hostile).await;
    let before = b.text().await;
    b.click("Add").await;
    b.wait_change(&before).await;
    b.step("add-hostile").await;
    no_markup_made(&mut b, "Add domain").await;

    // An account address (the text area splits at spaces: one word of markup).
    home_row(&mut b, &p, domain).await;
    b.click_in_row(domain, "Accounts").await;
    let address = "<svg/onload=alert(1)>@partner.example";
    b.fill_textarea(address).await;
    b.click("Save").await;
    b.wait_text(address).await;
    b.step("accounts-hostile").await;
    no_markup_made(&mut b, "Accounts").await;

    // A sender to check.
    b.goto(&p.url("/")).await;
    b.click("Check a sender").await;
    let field = b.field("Sender").await;
    b.fill("Mailbox", MAILBOX).await;
    b.fill("Sender", hostile).await;
    let before = b.text().await;
    b.submit_form_of(&field).await;
    b.wait_change(&before).await;
    b.step("check-hostile").await;
    no_markup_made(&mut b, "Check a sender").await;
    b.close().await;
}

/// No dialog open and no element made from the hostile strings used in these tests.
async fn no_markup_made(b: &mut Browser, page: &str) {
    let dialog = b.dialog_text().await;
    b.check(
        dialog.is_none(),
        &format!("{page}: a dialog opened: {dialog:?}"),
    )
    .await;
    let made = b
        .all("//img[@src='x' or @onerror]|//svg[@onload]|//*[local-name()='svg'][@onload]|//script[contains(., 'alert(1)')]")
        .await
        .len();
    b.check(
        made == 0,
        &format!("{page}: typed markup became {made} element(s)"),
    )
    .await;
}

// ---------------------------------------------------------------- sign-in limits

/// Sign-in failures are limited like SMTP AUTH: past `limits.auth_failures` even the
/// right password does not sign in for a while.
#[test]
fn sign_in_failures_are_limited() {
    serial(sign_in_failures_are_limited_steps());
}

async fn sign_in_failures_are_limited_steps() {
    let p = Panel::start_with(|c| {
        c.set("limits", "auth_failures", "2")
            .set("limits", "auth_window", "\"10m\"");
    });
    let mut b = Browser::start("sign-in-limit", BrowserOptions::default()).await;
    for attempt in 0..3 {
        b.goto(&p.url("/")).await;
        b.fill("Hosting", HOSTING).await;
        b.fill("Password", &format!("wrong-{attempt}")).await;
        let before = b.text().await;
        b.click("Sign in").await;
        b.wait_change(&before).await;
    }
    b.goto(&p.url("/")).await;
    b.fill("Hosting", HOSTING).await;
    b.fill("Password", PANEL_PASSWORD).await;
    let before = b.text().await;
    b.click("Sign in").await;
    let text = b.wait_change(&before).await;
    b.step("limited").await;
    b.check(
        !text.contains("Domain authorization"),
        "the right password signed in right after the failure limit",
    )
    .await;
    b.close().await;
}

// ---------------------------------------------------------------- what users paste

/// What users type and paste: an internationalised name in any case with a trailing dot
/// (kept in its ASCII form), and the value pasted with curly quotes and spaces around it.
#[test]
fn pasted_and_typed_variants_are_understood() {
    serial(pasted_and_typed_variants_are_understood_steps());
}

async fn pasted_and_typed_variants_are_understood_steps() {
    let p = Panel::start();
    let mut b = Browser::start("pasted", BrowserOptions::default()).await;
    let ascii = "xn--bcher-kva.example";
    sign_in(&mut b, &p).await;
    b.click("Add domain").await;
    b.fill("Domain", "Bücher.Example.").await;
    b.click("Add").await;
    b.wait_text(&format!("{LABEL}.{ascii}")).await;
    b.step("idn-record").await;
    assert_eq!(listed_domains(&p), vec![ascii.to_string()]);

    let token = p.token(ascii);
    p.publish(ascii, &format!("  \u{201c}{token}\u{201d} "));
    let before = b.text().await;
    b.click("Verify").await;
    verified_outcome(&mut b, &before).await;
    b.step("curly-quotes-verified").await;
    b.close().await;
}

// ---------------------------------------------------------------- badges over time

/// The badges follow the background checks: a pending domain whose record never comes
/// turns Failed (and "Verify" revives it once the record is right); a verified domain
/// whose record disappears stays Verified with "record missing since …" until the record
/// is back.
#[test]
fn status_badges_follow_the_background_checks() {
    serial(status_badges_follow_the_background_checks_steps());
}

async fn status_badges_follow_the_background_checks_steps() {
    let p = Panel::start_with(|c| {
        c.set("verification", "check_interval", "\"1s\"")
            .set("verification", "recheck_interval", "\"1s\"")
            .set("verification", "pending_expiry", "\"3s\"")
            .set("verification", "grace", "\"1h\"");
    });
    let mut b = Browser::start("badges", BrowserOptions::default()).await;
    sign_in(&mut b, &p).await;

    // Verified, then its record disappears.
    let kept = "kept.example";
    add_domain(&mut b, &p, kept).await;
    let token = p.token(kept);
    p.publish(kept, &token);
    home_row(&mut b, &p, kept).await;
    let before = b.text().await;
    b.click_in_row(kept, "Verify").await;
    verified_outcome(&mut b, &before).await;
    p.dns.remove(&format!("{LABEL}.{kept}."));
    let row = wait_row(&mut b, &p, kept, |r| r.contains("record missing since")).await;
    b.check(
        row.contains("Verified"),
        &format!("a domain in its grace period is not Verified: {row:?}"),
    )
    .await;
    b.step("record-missing").await;
    p.publish(kept, &token);
    wait_row(&mut b, &p, kept, |r| {
        r.contains("Verified") && !r.contains("record missing since")
    })
    .await;

    // Pending until it expires: Failed; "Verify" with the right record revives it.
    let lost = "lost.example";
    add_domain(&mut b, &p, lost).await;
    wait_row(&mut b, &p, lost, |r| r.contains("Failed")).await;
    b.step("failed").await;
    p.publish(lost, &p.token(lost));
    let before = b.text().await;
    b.click_in_row(lost, "Verify").await;
    verified_outcome(&mut b, &before).await;
    let row = home_row(&mut b, &p, lost).await;
    b.check(
        row.contains("Verified"),
        &format!("\"Verify\" did not revive a failed domain: {row:?}"),
    )
    .await;
    b.close().await;
}

/// Reloads the home page until the domain's row satisfies `ok` (60 s at most).
async fn wait_row(b: &mut Browser, p: &Panel, domain: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = home_row(b, p, domain).await;
        if ok(&row) {
            return row;
        }
        if Instant::now() >= deadline {
            b.fail(&format!("the row of {domain} still reads {row:?}"))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
