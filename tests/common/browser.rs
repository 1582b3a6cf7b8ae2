//! A real browser for end-to-end tests of the panel: Debian's headless Chromium driven over
//! WebDriver (fantoccini) through a `chromedriver` this harness starts on a free port.
//!
//! Each [`Browser`] owns its chromedriver, its Chromium (a fresh profile in a temporary
//! directory) and its output directory. Both processes run in a process group of their own,
//! so dropping the value (also when a test panics) kills exactly them and nothing else.
//!
//! Tests find controls the way a user does: by the words on them and by the labels of
//! fields (SPEC §8 names them), never by CSS classes or ids of the implementation.
//!
//! [`Browser::step`] writes a screenshot and the page's HTML to the test's output
//! directory (`target/tmp/panel/<test>/`); every failure through [`Browser::fail`] (which
//! every helper here uses) writes one more, and prints where they are. A test that ends
//! with [`Browser::close`] removes the directory again: what is left is from failures.
//!
//! Missing Chromium or chromedriver is a failure with the command that installs them, never
//! a skip.
#![allow(dead_code)]

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator, cookies::Cookie, elements::Element};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// How long a page may take to show what a test waits for (a failure bound only: the
/// machine is small and shared).
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the browser is set up.
#[derive(Clone, Debug)]
pub struct BrowserOptions {
    /// false: JavaScript is blocked for every page (Chromium's content setting), to prove a
    /// workflow works with plain forms and redirects.
    pub javascript: bool,
    /// The window size in CSS pixels.
    pub window: (u32, u32),
}

impl Default for BrowserOptions {
    fn default() -> Self {
        BrowserOptions {
            javascript: true,
            window: (1280, 900),
        }
    }
}

pub struct Browser {
    client: Option<Client>,
    driver: Option<Child>,
    profile: tempfile::TempDir,
    out: PathBuf,
    steps: usize,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A string as an XPath literal (XPath 1.0 has no escapes: use concat() for mixed quotes).
pub fn xpath_literal(s: &str) -> String {
    if !s.contains('\'') {
        format!("'{s}'")
    } else if !s.contains('"') {
        format!("\"{s}\"")
    } else {
        let parts: Vec<String> = s.split('\'').map(|p| format!("'{p}'")).collect();
        format!("concat({})", parts.join(", \"'\", "))
    }
}

/// XPath condition: a control a user presses that says `label` — a button, a submit or
/// button input, or a link.
fn control_condition(label: &str) -> String {
    let l = xpath_literal(label);
    format!(
        "((self::button or self::a or self::summary) and normalize-space(.)={l}) \
         or (self::input and (@type='submit' or @type='button') and normalize-space(@value)={l})"
    )
}

impl Browser {
    /// Starts chromedriver and a headless Chromium for the test `name` (used for the
    /// output directory). Fails, with the install command, when either is missing.
    pub async fn start(name: &str, options: BrowserOptions) -> Browser {
        for (path, package) in [(CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the panel's browser tests need Debian's chromium and \
                 chromium-driver (tests/run installs them; or: apt-get install -y chromium \
                 chromium-driver) [package {package}]"
            );
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("panel")
            .join(name);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).expect("create the test's output directory");

        let profile = tempfile::tempdir().expect("tempdir for the Chromium profile");
        let port = free_port();
        let log = std::fs::File::create(out.join("chromedriver.log")).expect("chromedriver log");
        // A process group of its own: Drop kills chromedriver and the Chromium it started
        // (which inherits the group), and nothing else.
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("start {CHROMEDRIVER}: {e}"));
        let mut browser = Browser {
            client: None,
            driver: Some(driver),
            profile,
            out,
            steps: 0,
        };
        browser.wait_driver(port);

        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-gpu".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--window-size={},{}", options.window.0, options.window.1),
            format!("--user-data-dir={}", browser.profile.path().display()),
        ];
        args.push("--lang=en-US".into());
        let mut chrome = json!({ "binary": CHROMIUM, "args": args });
        if !options.javascript {
            // 2 = block: the same switch as the user's "Don't allow sites to use JavaScript".
            chrome["prefs"] = json!({
                "profile.managed_default_content_settings.javascript": 2,
                "profile.default_content_setting_values.javascript": 2,
            });
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), chrome);
        // A dialog a page opens must not be closed silently by the driver: a test that
        // looks for one (alert(1) from hostile text) has to be able to see it.
        caps.insert("unhandledPromptBehavior".into(), json!("ignore"));
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver did not start a Chromium session: {e}\n{}",
                    browser.driver_log()
                )
            });
        browser.client = Some(client);
        if options.window != (1280, 900) {
            // --window-size is the outer size; make the viewport what the test asked for.
            browser
                .set_viewport(options.window.0, options.window.1)
                .await;
        }
        browser
    }

    fn wait_driver(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            if let Some(child) = self.driver.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "chromedriver exited at start ({status}):\n{}",
                    self.driver_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port}:\n{}",
                self.driver_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn driver_log(&self) -> String {
        std::fs::read_to_string(self.out.join("chromedriver.log")).unwrap_or_default()
    }

    /// The WebDriver client, for what the helpers here do not cover.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("browser session open")
    }

    /// The directory where this test's screenshots go.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// Ends the session (Chromium quits) and chromedriver; removes the output directory,
    /// which only a failing test leaves behind.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.out);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.driver.take() {
            let pgid = child.id() as libc::pid_t;
            // SAFETY: kill(2) on the process group this harness created for chromedriver.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    // ------------------------------------------------------------ evidence

    /// Saves a screenshot and the HTML of the page as the next numbered step.
    pub async fn step(&mut self, name: &str) {
        self.steps += 1;
        let base = self.out.join(format!("{:02}-{name}", self.steps));
        if let Ok(png) = self.client().screenshot().await {
            let _ = std::fs::write(base.with_extension("png"), png);
        }
        if let Ok(html) = self.client().source().await {
            let _ = std::fs::write(base.with_extension("html"), html);
        }
    }

    /// Fails the test: a last screenshot, then a panic naming the page and where the
    /// screenshots are.
    pub async fn fail(&mut self, message: &str) -> ! {
        self.step("failure").await;
        let url = self
            .client()
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default();
        let text = self.text().await;
        panic!(
            "{message}\n  page: {url}\n  screenshots: {}\n  page text:\n{text}",
            self.out.display()
        );
    }

    /// Fails with `message` unless `ok`.
    pub async fn check(&mut self, ok: bool, message: &str) {
        if !ok {
            self.fail(message).await;
        }
    }

    // ------------------------------------------------------------ navigation and reading

    pub async fn goto(&mut self, url: &str) {
        if let Err(e) = self.client().goto(url).await {
            self.fail(&format!("open {url}: {e}")).await;
        }
    }

    pub async fn url(&self) -> String {
        self.client()
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    /// The text a user sees on the page (the body's rendered text).
    pub async fn text(&self) -> String {
        match self.client().find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// What the page shows, including the values of fields (a record value offered in a
    /// read-only input to select and copy is shown too).
    pub async fn shown(&self) -> String {
        let mut out = self.text().await;
        for e in self.all("//input[not(@type='hidden')]|//textarea").await {
            if e.is_displayed().await.unwrap_or(false)
                && let Ok(Some(v)) = e.prop("value").await
            {
                out.push('\n');
                out.push_str(&v);
            }
        }
        out
    }

    /// Waits until the page's text is no longer `before` (after a form was sent); returns
    /// the new text.
    pub async fn wait_change(&mut self, before: &str) -> String {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let text = self.text().await;
            // Empty while the next page loads; then settled when two reads agree.
            if !text.is_empty() && text != before {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if self.text().await == text {
                    return text;
                }
                continue;
            }
            if Instant::now() >= deadline {
                self.fail("the page did not change").await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The text of the row (a table row or list item) that shows `text` and has a control
    /// saying `label` (a domain's row, an account's row), or None when there is none.
    pub async fn row_text(&self, text: &str, label: &str) -> Option<String> {
        let found = self.visible(&Self::row_xpath(text, label)).await;
        match found.last() {
            Some(e) => e.text().await.ok(),
            None => None,
        }
    }

    /// Presses the submit button of the form that holds `field`.
    pub async fn submit_form_of(&mut self, field: &Element) {
        let button = field
            .find(Locator::XPath(
                "./ancestor::form[1]//*[(self::button and not(@type='button') and \
                 not(@type='reset')) or (self::input and @type='submit')]",
            ))
            .await;
        match button {
            Ok(b) => {
                if let Err(e) = b.click().await {
                    self.fail(&format!("press the form's button: {e}")).await;
                }
            }
            Err(e) => {
                self.fail(&format!("no submit button in the field's form: {e}"))
                    .await
            }
        }
    }

    pub async fn html(&self) -> String {
        self.client().source().await.unwrap_or_default()
    }

    /// Waits until the page's text contains `needle` (case-insensitive); returns the text.
    pub async fn wait_text(&mut self, needle: &str) -> String {
        self.wait_text_any(&[needle]).await
    }

    /// Waits until the page's text contains one of `needles` (case-insensitive).
    pub async fn wait_text_any(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let text = self.text().await;
            let lower = text.to_lowercase();
            if needles.iter().any(|n| lower.contains(&n.to_lowercase())) {
                return text;
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "the page did not show any of {needles:?} within {PAGE_TIMEOUT:?}"
                ))
                .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails if the page's text contains `needle` (case-insensitive).
    pub async fn assert_no_text(&mut self, needle: &str) {
        let text = self.text().await;
        if text.to_lowercase().contains(&needle.to_lowercase()) {
            self.fail(&format!("the page shows {needle:?}, it should not"))
                .await;
        }
    }

    /// Waits until an element matching `xpath` is visible; returns it.
    pub async fn wait_visible(&mut self, xpath: &str, what: &str) -> Element {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            if let Some(e) = self.visible(xpath).await.into_iter().next() {
                return e;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("no {what} on the page")).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every element matching the XPath expression.
    pub async fn all(&self, xpath: &str) -> Vec<Element> {
        self.client()
            .find_all(Locator::XPath(xpath))
            .await
            .unwrap_or_default()
    }

    /// The visible elements among [`Browser::all`].
    pub async fn visible(&self, xpath: &str) -> Vec<Element> {
        let mut out = Vec::new();
        for e in self.all(xpath).await {
            if e.is_displayed().await.unwrap_or(false) {
                out.push(e);
            }
        }
        out
    }

    /// The innermost elements containing `text` (case-sensitive) that also contain a
    /// control saying `label`: "the row of this domain".
    fn scope_xpath(text: &str, label: &str) -> String {
        let t = xpath_literal(text);
        let c = control_condition(label);
        let cond = format!("contains(normalize-space(.), {t}) and .//*[{c}]");
        format!("//body//*[{cond} and not(.//*[{cond}])]")
    }

    /// Rows of a list: table rows and list items (or what says it is one).
    fn row_xpath(text: &str, label: &str) -> String {
        let t = xpath_literal(text);
        let c = control_condition(label);
        format!(
            "//*[(self::tr or self::li or @role='row' or @role='listitem') \
             and contains(normalize-space(.), {t}) and .//*[{c}]]"
        )
    }

    // ------------------------------------------------------------ acting

    /// Clicks the one visible control that says `label` (button, submit, link).
    pub async fn click(&mut self, label: &str) {
        let xpath = format!("//*[{}]", control_condition(label));
        self.click_xpath(&xpath, &format!("a control {label:?}"))
            .await;
    }

    /// Clicks the control saying `label` inside the innermost element that shows `text`
    /// (a domain's row: `click_in("partner.example", "Verify")`).
    pub async fn click_in(&mut self, text: &str, label: &str) {
        let scope = Self::scope_xpath(text, label);
        let xpath = format!("{scope}//*[{}]", control_condition(label));
        self.click_xpath(&xpath, &format!("a control {label:?} next to {text:?}"))
            .await;
    }

    /// Clicks the control saying `label` in the row (table row, list item) that shows
    /// `text`: `click_in_row("partner.example", "Verify")`.
    pub async fn click_in_row(&mut self, text: &str, label: &str) {
        let t = xpath_literal(text);
        let xpath = format!(
            "//*[{}][ancestor::*[self::tr or self::li or @role='row' or @role='listitem'][1]\
             [contains(normalize-space(.), {t})]]",
            control_condition(label)
        );
        self.click_xpath(
            &xpath,
            &format!("a control {label:?} in the row of {text:?}"),
        )
        .await;
    }

    async fn click_xpath(&mut self, xpath: &str, what: &str) {
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            let found = self.visible(xpath).await;
            match found.as_slice() {
                [one] => {
                    if let Err(e) = one.click().await {
                        self.fail(&format!("click {what}: {e}")).await;
                    }
                    return;
                }
                [] if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                [] => self.fail(&format!("no visible {what} on the page")).await,
                many => {
                    self.fail(&format!("{} visible matches for {what}", many.len()))
                        .await
                }
            }
        }
    }

    /// The field a user knows by its label: a `<label>` whose text is `label` (exactly, or
    /// starting with it), pointing at its control with `for=` or wrapping it; else
    /// `aria-label`.
    pub async fn field(&mut self, label: &str) -> Element {
        let l = xpath_literal(label);
        let label_match =
            format!("//label[normalize-space(.)={l} or starts-with(normalize-space(.), {l})]");
        let deadline = Instant::now() + PAGE_TIMEOUT;
        loop {
            for lab in self.all(&label_match).await {
                if let Ok(Some(id)) = lab.attr("for").await
                    && let Ok(e) = self.client().find(Locator::Id(&id)).await
                {
                    return e;
                }
                if let Ok(e) = lab
                    .find(Locator::XPath(".//input|.//textarea|.//select"))
                    .await
                {
                    return e;
                }
            }
            let aria =
                format!("//*[(self::input or self::textarea or self::select) and @aria-label={l}]");
            if let Some(e) = self.all(&aria).await.into_iter().next() {
                return e;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("no field labelled {label:?} on the page"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Types `value` into the field labelled `label` (replacing what was there).
    pub async fn fill(&mut self, label: &str, value: &str) {
        let field = self.field(label).await;
        let _ = field.clear().await;
        if let Err(e) = field.send_keys(value).await {
            self.fail(&format!("type into {label:?}: {e}")).await;
        }
    }

    /// Types into the page's only visible text area.
    pub async fn fill_textarea(&mut self, value: &str) {
        let found = self.visible("//textarea").await;
        let Some(area) = found.first() else {
            self.fail("no text area on the page").await;
        };
        let _ = area.clear().await;
        if let Err(e) = area.send_keys(value).await {
            self.fail(&format!("type into the text area: {e}")).await;
        }
    }

    /// Resizes the window so that the page's viewport is `width`×`height` CSS pixels.
    pub async fn set_viewport(&mut self, width: u32, height: u32) {
        let _ = self.client().set_window_size(width, height).await;
    }

    /// The text of an open alert/confirm/prompt dialog, if any.
    pub async fn dialog_text(&self) -> Option<String> {
        self.client().get_alert_text().await.ok()
    }

    /// The browser's cookies for the current page.
    pub async fn cookies(&self) -> Vec<Cookie<'static>> {
        self.client().get_all_cookies().await.unwrap_or_default()
    }

    /// Runs a script in the page (only with JavaScript on).
    pub async fn script(&mut self, source: &str) -> serde_json::Value {
        match self.client().execute(source, vec![]).await {
            Ok(v) => v,
            Err(e) => self.fail(&format!("script {source:?}: {e}")).await,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The session's task would need the runtime: kill the processes instead.
        self.client.take();
        self.kill();
        if std::thread::panicking() {
            eprintln!("browser screenshots of this test: {}", self.out.display());
        }
    }
}
