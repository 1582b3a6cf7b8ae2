//! End-to-end test harness: the real `domauth` binary with a temporary
//! config and data dir on free loopback ports, a real upstream SMTP server
//! (aiosmtpd, `sink.py`), the real CLI, and swaks as the SMTP client.
//! `dns.rs` adds a real DNS server.
#![allow(dead_code)]

pub mod dns;
pub mod faulty;
pub mod http;
pub mod raw;

use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};

pub const BIN: &str = env!("CARGO_BIN_EXE_domauth");

/// Debian's interpreter: python3-aiosmtpd is installed for it only.
pub const PYTHON: &str = "/usr/bin/python3";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

// ---------------------------------------------------------------- upstream

/// One message as the upstream received it.
#[derive(Debug, Clone)]
pub struct SinkMessage {
    pub mail_from: String,
    /// The MAIL FROM parameters the relay sent (`BODY=8BITMIME`, `SMTPUTF8`).
    pub mail_options: Vec<String>,
    pub rcpt_tos: Vec<String>,
    /// Byte-exact content as sent by the relay (CRLF line endings).
    pub data: Vec<u8>,
}

impl SinkMessage {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// The value of the first header `name` (case-insensitive), unfolded.
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text.split("\r\n\r\n").next().unwrap_or("");
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(v) = value.as_mut() {
                if line.starts_with([' ', '\t']) {
                    v.push(' ');
                    v.push_str(line.trim());
                    continue;
                }
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case(name)
            {
                value = Some(v.trim().to_string());
            }
        }
        value
    }
}

/// A real SMTP server (aiosmtpd) standing in for the smarthost.
pub struct Sink {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Sink {
    pub fn start() -> Sink {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("messages");
        let mut sink = Sink::start_at(free_port(), &dir);
        sink._tmp = Some(tmp);
        sink
    }

    /// Starts on a given port and directory: a restarted upstream keeps its
    /// address and what it already stored.
    pub fn start_at(port: u16, dir: &Path) -> Sink {
        Sink::spawn(port, dir, &[])
    }

    /// A sink that advertises DSN (RFC 3461) and takes its parameters.
    pub fn start_dsn() -> Sink {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("messages");
        let mut sink = Sink::spawn(free_port(), &dir, &["dsn"]);
        sink._tmp = Some(tmp);
        sink
    }

    fn spawn(port: u16, dir: &Path, extra: &[&str]) -> Sink {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/common/sink.py");
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .arg(port.to_string())
            .arg(dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/bin/python3 sink.py (is python3-aiosmtpd installed?)");
        let stdout = child.stdout.take().expect("sink stdout");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("sink output");
        assert_eq!(line.trim(), "READY", "the upstream sink did not start");
        wait_until("the sink port", Duration::from_secs(10), || port_open(port));
        Sink {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
            _tmp: None,
        }
    }

    /// Everything received so far, in arrival order.
    pub fn messages(&self) -> Vec<SinkMessage> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .filter(|p| {
                        !p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|p| {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).expect("read message")).expect("json");
                SinkMessage {
                    mail_from: v["mail_from"].as_str().unwrap_or_default().to_string(),
                    mail_options: v["mail_options"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|o| o.as_str().map(str::to_string))
                        .collect(),
                    rcpt_tos: v["rcpt_tos"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_str().map(str::to_string))
                        .collect(),
                    data: B64
                        .decode(v["data_b64"].as_str().unwrap_or_default())
                        .expect("b64"),
                }
            })
            .collect()
    }

    /// Waits until at least `n` messages arrived (panics after `timeout`).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<SinkMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "upstream received {} of {n} messages within {timeout:?}",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, "TERM");
            let _ = wait_timeout(&mut child, Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_until("the sink to stop", Duration::from_secs(5), || {
            !port_open(self.port)
        });
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------- relay

/// The relay's configuration for one test: defaults suited to tests (free
/// ports, fast retries), any key overridable with [`RelayConfig::set`].
#[derive(Clone)]
pub struct RelayConfig {
    values: BTreeMap<(String, String), String>,
    /// Extra environment for `domauth serve` (e.g. `NOTIFY_SOCKET`).
    env: Vec<(String, String)>,
}

impl RelayConfig {
    pub fn new(upstream_port: u16) -> RelayConfig {
        let mut c = RelayConfig {
            values: BTreeMap::new(),
            env: Vec::new(),
        };
        let submission = free_port();
        let mut submissions = free_port();
        // The kernel may hand out the port just released again.
        while submissions == submission {
            submissions = free_port();
        }
        c.set("server", "hostname", "\"relay.test\"")
            .set("server", "data_dir", "\"data\"")
            .set(
                "server",
                "submission",
                &format!("[\"127.0.0.1:{submission}\"]"),
            )
            .set(
                "server",
                "submissions",
                &format!("[\"127.0.0.1:{submissions}\"]"),
            )
            .set("server", "admin_socket", "\"data/admin.sock\"")
            .set("server", "shutdown_timeout", "\"5s\"")
            .set("tls", "cert", "\"certs/test.crt\"")
            .set("tls", "key", "\"certs/test.key\"")
            .set("tls", "self_signed", "true")
            .set("upstream", "host", "\"127.0.0.1\"")
            .set("upstream", "port", &upstream_port.to_string())
            .set("upstream", "tls", "\"none\"")
            .set("upstream", "connect_timeout", "\"10s\"")
            .set("upstream", "greeting_timeout", "\"10s\"")
            .set("upstream", "command_timeout", "\"10s\"")
            .set("upstream", "data_timeout", "\"10s\"")
            .set("upstream", "data_block_timeout", "\"10s\"")
            .set("upstream", "final_timeout", "\"10s\"")
            .set("dns", "nameservers", "[\"127.0.0.1:9\"]")
            .set("dns", "timeout", "\"2s\"")
            .set("queue", "retry_initial", "\"1s\"")
            .set("queue", "retry_max", "\"2s\"")
            .set("queue", "probe_interval", "\"1s\"")
            .set("limits", "auth_failure_delay", "\"100ms\"")
            // Many relays run at once: none takes the default metrics port.
            .set("metrics", "listen", "[]")
            // The panel and API (SPEC §8) on a free port: the default 8025 would be shared.
            .set(
                "panel",
                "listen",
                &format!("[\"127.0.0.1:{}\"]", free_port()),
            );
        c
    }

    pub fn set(&mut self, section: &str, key: &str, toml_value: &str) -> &mut RelayConfig {
        self.values.insert(
            (section.to_string(), key.to_string()),
            toml_value.to_string(),
        );
        self
    }

    /// Sets an environment variable for the relay process.
    pub fn env(&mut self, name: &str, value: &str) -> &mut RelayConfig {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.values
            .get(&(section.to_string(), key.to_string()))
            .map(String::as_str)
    }

    /// The panel's (and the API's) port.
    pub fn panel_port(&self) -> u16 {
        let v = self
            .get("panel", "listen")
            .expect("panel listener configured");
        v.trim_matches(|c| c == '[' || c == ']' || c == '"')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("panel port")
    }

    fn port_of(&self, key: &str) -> u16 {
        let v = self.get("server", key).expect("listener configured");
        v.trim_matches(|c| c == '[' || c == ']' || c == '"')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("listener port")
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut section = "";
        for ((s, k), v) in &self.values {
            if s != section {
                out.push_str(&format!("\n[{s}]\n"));
                section = s;
            }
            out.push_str(&format!("{k} = {v}\n"));
        }
        out
    }
}

/// A running `domauth serve`.
pub struct Relay {
    pub dir: tempfile::TempDir,
    pub config: RelayConfig,
    pub submission: u16,
    pub submissions: u16,
    child: Option<Child>,
}

impl Relay {
    /// Starts a relay delivering to `upstream_port`, with test defaults.
    pub fn start(upstream_port: u16) -> Relay {
        Relay::start_with(RelayConfig::new(upstream_port))
    }

    pub fn start_with(config: RelayConfig) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut relay = Relay {
            submission: config.port_of("submission"),
            submissions: config.port_of("submissions"),
            dir,
            config,
            child: None,
        };
        relay.launch();
        relay
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("relay.log")
    }

    /// What the relay logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes the config and starts `domauth serve`, its output appended to
    /// the relay's log; does not wait for it to serve.
    fn spawn_serve(&self) -> Child {
        std::fs::write(self.config_path(), self.config.render()).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(self.config_path())
            .current_dir(self.dir.path())
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start domauth")
    }

    fn launch(&mut self) {
        let child = self.spawn_serve();
        self.child = Some(child);
        let socket = self.dir.path().join("data/admin.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if socket.exists() && port_open(self.submission) && port_open(self.submissions) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("domauth exited at start ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "domauth did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the relay with SIGTERM (graceful) and waits for it; returns
    /// its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        send_signal(&child, "TERM");
        let status = wait_timeout(&mut child, Duration::from_secs(20));
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("domauth did not stop on SIGTERM:\n{}", self.log());
        }
        status.and_then(|s| s.code())
    }

    /// Sends `kill -SIGNAL` (e.g. "HUP") to the running relay.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the relay runs");
        send_signal(child, signal);
    }

    /// Kills the relay with SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the relay again on the same data dir, ports and config.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.launch();
    }

    /// Runs a management command against this relay; `stdin` is written to
    /// the command's standard input (passwords, confirmations).
    pub fn cli(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run domauth");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        child.wait_with_output().expect("domauth output")
    }

    /// Like [`Relay::cli`], but the command must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str], stdin: &str) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "domauth {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Adds a hosting with one own domain and one mailbox in it.
    pub fn add_mailbox(&self, hosting: &str, address: &str, password: &str) {
        let domain = address.rsplit('@').next().expect("address");
        let exists = self.cli(&["hosting", "list", "--json"], "");
        let listed: serde_json::Value =
            serde_json::from_slice(&exists.stdout).unwrap_or(serde_json::Value::Null);
        let known = listed
            .as_array()
            .into_iter()
            .flatten()
            .any(|h| h["name"] == hosting);
        if !known {
            self.cli_ok(&["hosting", "add", hosting, "--domain", domain], "");
        }
        self.cli_ok(&["mailbox", "add", address], &format!("{password}\n"));
    }

    /// Waits until the relay's queue is empty (`queue list --json` is `[]`):
    /// everything accepted was delivered or bounced. Count what the upstream
    /// got only after this, so that a wrongly accepted message has had its
    /// chance to arrive.
    /// `domauth queue list --json`: the queued messages.
    pub fn queue_list(&self) -> Vec<serde_json::Value> {
        let out = self.cli_ok(&["queue", "list", "--json"], "");
        serde_json::from_str::<serde_json::Value>(&out)
            .expect("queue list --json is JSON")
            .as_array()
            .expect("a JSON array")
            .clone()
    }

    pub fn wait_queue_empty(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.cli(&["queue", "list", "--json"], "");
            let list: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            if list.as_array().is_some_and(|a| a.is_empty()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the queue did not empty within {timeout:?}: {list}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A swaks command aimed at the submission (STARTTLS) port.
    pub fn swaks(&self) -> Swaks {
        Swaks::new(self.submission)
    }

    /// A swaks command aimed at the submissions (implicit TLS) port.
    pub fn swaks_implicit(&self) -> Swaks {
        let mut s = Swaks::new(self.submissions);
        s.args.push("--tls-on-connect".into());
        s.tls = true;
        s
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------- swaks

/// swaks as the SMTP client (Debian's, with libnet-ssleay-perl for TLS).
pub struct Swaks {
    args: Vec<String>,
    tls: bool,
}

/// What swaks did: its exit code (0 ok, 23 MAIL refused, 24 RCPT refused,
/// 25 DATA refused, 28 AUTH failed...) and its transcript.
#[derive(Debug)]
pub struct SwaksResult {
    pub code: i32,
    pub transcript: String,
}

impl SwaksResult {
    /// The queue id from `250 2.0.0 Ok: queued as ID`.
    pub fn queue_id(&self) -> Option<String> {
        self.transcript
            .lines()
            .find_map(|l| l.split("queued as ").nth(1))
            .map(|id| id.trim().to_string())
    }

    pub fn assert_code(&self, code: i32) -> &SwaksResult {
        assert_eq!(
            self.code, code,
            "swaks exit code; transcript:\n{}",
            self.transcript
        );
        self
    }

    pub fn assert_contains(&self, text: &str) -> &SwaksResult {
        assert!(
            self.transcript.contains(text),
            "swaks transcript lacks {text:?}:\n{}",
            self.transcript
        );
        self
    }
}

impl Swaks {
    fn new(port: u16) -> Swaks {
        Swaks {
            args: vec![
                "--server".into(),
                format!("127.0.0.1:{port}"),
                "--timeout".into(),
                "30".into(),
                "--helo".into(),
                "client.test".into(),
            ],
            tls: false,
        }
    }

    pub fn arg(mut self, a: &str) -> Swaks {
        self.args.push(a.to_string());
        self
    }

    /// STARTTLS (required before AUTH on the submission port).
    pub fn starttls(mut self) -> Swaks {
        if !self.tls {
            self.args.push("--tls".into());
            self.tls = true;
        }
        self
    }

    /// AUTH PLAIN over TLS.
    pub fn auth(self, user: &str, password: &str) -> Swaks {
        self.starttls()
            .arg("--auth")
            .arg("PLAIN")
            .arg("--auth-user")
            .arg(user)
            .arg("--auth-password")
            .arg(password)
    }

    pub fn from(self, from: &str) -> Swaks {
        self.arg("--from").arg(from)
    }

    pub fn to(self, to: &str) -> Swaks {
        self.arg("--to").arg(to)
    }

    /// Adds a header, or replaces swaks's own (e.g. `From: x@y`).
    pub fn header(self, header: &str) -> Swaks {
        self.arg("--header").arg(header)
    }

    /// The whole message (headers and body) as given, CRLF line endings.
    pub fn data(self, data: &str) -> Swaks {
        self.arg("--data").arg(data)
    }

    pub fn run(&self) -> SwaksResult {
        let out = Command::new("swaks")
            .args(&self.args)
            .stdin(Stdio::null())
            .output()
            .expect("run swaks (is it installed?)");
        SwaksResult {
            code: out.status.code().unwrap_or(-1),
            transcript: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

// ---------------------------------------------------------------- process helpers

/// `kill -SIGNAL pid`, e.g. "TERM".
pub fn send_signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status();
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
