//! Typed configuration (SPEC §7): one loader, defaults for every key, and
//! validation whose errors name the offending key in one line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// The whole `config.toml`. Unknown keys are refused so a typo never silently
/// falls back to a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub upstream: UpstreamConfig,
    pub dns: DnsConfig,
    pub verification: VerificationConfig,
    pub queue: QueueConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub deliverability: DeliverabilityConfig,
    pub metrics: MetricsConfig,
    pub panel: PanelConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub hostname: String,
    pub data_dir: PathBuf,
    pub submission: Vec<SocketAddr>,
    pub submissions: Vec<SocketAddr>,
    pub admin_socket: PathBuf,
    pub max_message_size: usize,
    pub max_recipients: usize,
    /// How long SIGTERM waits for open sessions before closing them.
    pub shutdown_timeout: Dur,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            data_dir: "data".into(),
            submission: vec![SocketAddr::from(([127, 0, 0, 1], 2587))],
            submissions: vec![SocketAddr::from(([127, 0, 0, 1], 2465))],
            admin_socket: "data/admin.sock".into(),
            max_message_size: 26_214_400,
            max_recipients: 100,
            shutdown_timeout: Dur::secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub self_signed: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: "certs/localhost.crt".into(),
            key: "certs/localhost.key".into(),
            self_signed: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    None,
    Starttls,
    Implicit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Accept any certificate from the smarthost (a self-signed one on loopback).
    pub tls_insecure: bool,
    /// PEM file of extra trust anchors for the smarthost's certificate.
    pub ca_file: Option<PathBuf>,
    /// TCP connect, and the TLS handshake of implicit TLS.
    pub connect_timeout: Dur,
    /// RFC 5321 §4.5.3.2: the 220 greeting (5 min), each command (5 min), the 354
    /// after DATA (2 min), each block of the message written (3 min), the reply to the
    /// final dot (10 min).
    pub greeting_timeout: Dur,
    pub command_timeout: Dur,
    pub data_timeout: Dur,
    pub data_block_timeout: Dur,
    pub final_timeout: Dur,
    /// Whether upstream can carry SMTPUTF8 (then we advertise it to clients).
    pub smtputf8: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: "127.0.0.1".into(),
            port: 2525,
            tls: UpstreamTls::None,
            username: None,
            password_file: None,
            tls_insecure: false,
            ca_file: None,
            connect_timeout: Dur::secs(30),
            greeting_timeout: Dur::secs(300),
            command_timeout: Dur::secs(300),
            data_timeout: Dur::secs(120),
            data_block_timeout: Dur::secs(180),
            final_timeout: Dur::secs(600),
            smtputf8: false,
        }
    }
}

impl UpstreamConfig {
    /// The per-stage timeouts with their keys, for the checks that apply to all.
    fn stage_timeouts(&self) -> [(&'static str, Dur); 6] {
        [
            ("upstream.connect_timeout", self.connect_timeout),
            ("upstream.greeting_timeout", self.greeting_timeout),
            ("upstream.command_timeout", self.command_timeout),
            ("upstream.data_timeout", self.data_timeout),
            ("upstream.data_block_timeout", self.data_block_timeout),
            ("upstream.final_timeout", self.final_timeout),
        ]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Dur,
    /// With `nameservers` empty: the file whose nameservers find the zone's authoritative
    /// servers (README; tests point it at a DNS server of their own).
    pub resolv_conf: PathBuf,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Dur::secs(5),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

/// SPEC §9: signing of authorized domains' mail and SPF advice.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverabilityConfig {
    /// Sign mail of authorized domains whose DKIM record is verified.
    pub dkim: bool,
    /// The SPF include that covers the relay (`_spf.hosting.example`); empty: no advice.
    pub spf_include: String,
}

impl Default for DeliverabilityConfig {
    fn default() -> Self {
        DeliverabilityConfig {
            dkim: true,
            spf_include: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationConfig {
    pub record_label: String,
    pub check_interval: Dur,
    pub pending_expiry: Dur,
    pub recheck_interval: Dur,
    pub grace: Dur,
    /// How many DNS checks the background task runs at once.
    pub concurrency: usize,
}

impl Default for VerificationConfig {
    fn default() -> Self {
        VerificationConfig {
            record_label: "domauthvalidation".into(),
            check_interval: Dur::secs(5 * 60),
            pending_expiry: Dur::secs(72 * 3600),
            recheck_interval: Dur::secs(24 * 3600),
            grace: Dur::secs(72 * 3600),
            concurrency: 8,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub retry_initial: Dur,
    pub retry_max: Dur,
    pub max_lifetime: Dur,
    pub concurrency: usize,
    /// Consecutive failures to reach upstream after which it counts as down: messages
    /// wait instead of each trying, and one probe at a time tests it (Postfix's dead
    /// destination).
    pub dead_after: u32,
    /// The first wait between probes of a dead upstream; doubles up to `retry_max`.
    pub probe_interval: Dur,
    /// How a group commit makes accepted messages durable: `"syncfs"` (one flush of the
    /// data dir's file system per batch) or `"fsync"` (each file, then the directory).
    pub sync: domauth_store::SyncMethod,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            retry_initial: Dur::secs(60),
            retry_max: Dur::secs(3600),
            max_lifetime: Dur::secs(5 * 24 * 3600),
            concurrency: 16,
            dead_after: 3,
            probe_interval: Dur::secs(10),
            sync: domauth_store::SyncMethod::Syncfs,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub idle_timeout: Dur,
    pub data_timeout: Dur,
    pub max_errors: usize,
    pub max_line_length: usize,
    pub auth_failures: u32,
    pub auth_window: Dur,
    /// Pause after each failed AUTH before answering (slows guessing).
    pub auth_failure_delay: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 1000,
            max_connections_per_ip: 50,
            idle_timeout: Dur::secs(300),
            data_timeout: Dur::secs(600),
            max_errors: 20,
            max_line_length: 4096,
            auth_failures: 5,
            auth_window: Dur::secs(600),
            auth_failure_delay: Dur(Duration::from_millis(1000)),
        }
    }
}

/// `[log]` (SPEC §10): `format = "text"` (one readable line an event) or
/// `"json"` (one JSON object a line, for journald / Loki).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where mailbox passwords come from (SPEC §10).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthBackend {
    /// Mailboxes added with `domauth mailbox add` (the sled store).
    Store,
    /// A running Dovecot, over its authentication client socket.
    Dovecot,
    /// A Dovecot passwd-file read directly.
    PasswdFile,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub backend: AuthBackend,
    /// Dovecot's auth client socket (`backend = "dovecot"`).
    pub socket: PathBuf,
    /// The passwd-file (`backend = "passwd-file"`).
    pub path: Option<PathBuf>,
    /// How long one answer from Dovecot may take: Dovecot delays failures by
    /// seconds per client IP, so keep it well above its `auth_failure_delay`.
    pub timeout: Dur,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            backend: AuthBackend::Store,
            socket: "/run/dovecot/auth-client".into(),
            path: None,
            timeout: Dur::secs(15),
        }
    }
}

/// `[metrics]` (SPEC §10): where `GET /metrics` is served; empty: nowhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Vec<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 9025))],
        }
    }
}

/// `[panel]`: the hosting panel and its HTTP API (SPEC §8), on one listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PanelConfig {
    /// Empty: no panel and no API.
    pub listen: Vec<SocketAddr>,
    /// Serve HTTPS with the `[tls]` pair.
    pub tls: bool,
    /// A session unused this long is over.
    pub session_idle: Dur,
}

impl Default for PanelConfig {
    fn default() -> Self {
        PanelConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8025))],
            tls: false,
            session_idle: Dur::secs(30 * 60),
        }
    }
}

impl PanelConfig {
    fn validate(&self) -> Result<(), String> {
        positive("panel.session_idle", self.session_idle)?;
        at_most("panel.session_idle", self.session_idle, max::SCHEDULE)
    }
}

/// A duration written as a humantime string (`"1s"`, `"5m"`, `"72h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

/// Upper bounds (SPEC §7: a bad configuration stops start-up with one line).
/// A value past these is a typo or an attack on the operator, and would
/// otherwise panic later: `Instant + Duration` and chrono's date arithmetic
/// overflow on huge durations, and tokio's `Semaphore` panics past
/// `usize::MAX >> 3` permits. The bounds leave room for any sane setting.
pub mod max {
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    /// A wait for the network or a client (command, DATA, DNS, shutdown).
    pub const TIMEOUT: Duration = DAY;
    /// Schedules: retries, lifetimes, expiry, re-check intervals, windows.
    pub const SCHEDULE: Duration = Duration::from_secs(365 * 24 * 3600);
    /// The pause after a failed AUTH holds the connection: a short one slows
    /// guessing as well as a long one.
    pub const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(60);
    pub const CONNECTIONS: usize = 1_000_000;
    pub const RECIPIENTS: usize = 100_000;
    /// Far past any mail system's limit; it keeps sizes well inside every
    /// integer they pass through.
    pub const MESSAGE_SIZE: usize = 2 << 30;
    pub const LINE_LENGTH: usize = 1 << 20;
    pub const ERRORS: usize = 10_000;
    pub const CONCURRENCY: usize = 10_000;
    pub const DEAD_AFTER: usize = 1_000_000;
    pub const AUTH_FAILURES: usize = 1_000_000;
}

impl Config {
    /// Reads and validates the file. The error is one line naming the key.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        // Relative paths in the file resolve against the working directory,
        // as with a systemd unit's `WorkingDirectory=`.
        Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses TOML text; pure, so the rules are unit-tested (and fuzzed).
    pub fn parse(text: &str) -> Result<Config, String> {
        let line_of = |e: &toml::de::Error| {
            e.span()
                .map(|r| {
                    format!(
                        "line {}: ",
                        text[..r.start.min(text.len())].matches('\n').count() + 1
                    )
                })
                .unwrap_or_default()
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| format!("{}{}", line_of(&e), one_line(e.message())))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            // A quoted TOML key may hold a newline: the path is user text too.
            let key = one_line(&e.path().to_string());
            let msg = one_line(e.inner().message());
            if key == "." || key.is_empty() {
                msg
            } else {
                format!("{key}: {msg}")
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        // The upper bounds come first: a huge value is reported under its
        // own key, not as the other side of an ordering rule
        // (retry_max >= retry_initial).
        self.validate_upper_bounds()?;
        let s = &self.server;
        if s.hostname.trim().is_empty() || s.hostname.contains(char::is_whitespace) {
            return Err("server.hostname: must be a host name without spaces".into());
        }
        if s.submission.is_empty() && s.submissions.is_empty() {
            return Err(
                "server.submission / server.submissions: at least one listener is needed".into(),
            );
        }
        at_least("server.max_message_size", s.max_message_size, 1024)?;
        at_least("server.max_recipients", s.max_recipients, 1)?;
        if s.admin_socket.as_os_str().is_empty() {
            return Err("server.admin_socket: must be a path".into());
        }
        if self.upstream.host.trim().is_empty() {
            return Err("upstream.host: must not be empty".into());
        }
        if self.upstream.port == 0 {
            return Err("upstream.port: must be 1-65535".into());
        }
        if self.upstream.username.is_some() != self.upstream.password_file.is_some() {
            return Err("upstream.username / upstream.password_file: set both or neither".into());
        }
        for (key, d) in self.upstream.stage_timeouts() {
            positive(key, d)?;
        }
        positive("dns.timeout", self.dns.timeout)?;
        if self.dns.resolv_conf.as_os_str().is_empty() {
            return Err("dns.resolv_conf: must be a path".into());
        }
        let include = &self.deliverability.spf_include;
        if !include.is_empty() && !crate::dns_advice::is_spf_domain(include) {
            return Err(format!(
                "deliverability.spf_include: {include:?} is not a domain name"
            ));
        }
        let v = &self.verification;
        let label_ok = !v.record_label.is_empty()
            && v.record_label.len() <= 63
            && v.record_label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !label_ok {
            return Err(format!(
                "verification.record_label: {:?} is not a DNS label",
                v.record_label
            ));
        }
        positive("verification.check_interval", v.check_interval)?;
        positive("verification.pending_expiry", v.pending_expiry)?;
        positive("verification.recheck_interval", v.recheck_interval)?;
        at_least("verification.concurrency", v.concurrency, 1)?;
        let q = &self.queue;
        positive("queue.retry_initial", q.retry_initial)?;
        positive("queue.retry_max", q.retry_max)?;
        positive("queue.max_lifetime", q.max_lifetime)?;
        if q.retry_max.0 < q.retry_initial.0 {
            return Err("queue.retry_max: must not be shorter than queue.retry_initial".into());
        }
        at_least("queue.concurrency", q.concurrency, 1)?;
        if q.dead_after == 0 {
            return Err("queue.dead_after: must be at least 1".into());
        }
        positive("queue.probe_interval", q.probe_interval)?;
        let l = &self.limits;
        at_least("limits.max_connections", l.max_connections, 1)?;
        at_least("limits.max_connections_per_ip", l.max_connections_per_ip, 1)?;
        positive("limits.idle_timeout", l.idle_timeout)?;
        positive("limits.data_timeout", l.data_timeout)?;
        at_least("limits.max_errors", l.max_errors, 1)?;
        // RFC 5321 §4.5.3.1.4: a command line is at least 512 octets.
        at_least("limits.max_line_length", l.max_line_length, 512)?;
        if l.auth_failures == 0 {
            return Err("limits.auth_failures: must be at least 1".into());
        }
        positive("limits.auth_window", l.auth_window)?;
        let a = &self.auth;
        if a.backend == AuthBackend::Dovecot && a.socket.as_os_str().is_empty() {
            return Err("auth.socket: must be a path with backend = \"dovecot\"".into());
        }
        if a.backend == AuthBackend::PasswdFile
            && a.path.as_ref().is_none_or(|p| p.as_os_str().is_empty())
        {
            return Err("auth.path: a passwd-file is needed with backend = \"passwd-file\"".into());
        }
        positive("auth.timeout", a.timeout)?;
        self.panel.validate()?;
        Ok(())
    }

    /// Every duration and count has a ceiling (see [`max`]). A new key gets
    /// its line here.
    fn validate_upper_bounds(&self) -> Result<(), String> {
        let s = &self.server;
        count_at_most(
            "server.max_message_size",
            s.max_message_size,
            max::MESSAGE_SIZE,
        )?;
        count_at_most("server.max_recipients", s.max_recipients, max::RECIPIENTS)?;
        at_most("server.shutdown_timeout", s.shutdown_timeout, max::TIMEOUT)?;
        for (key, d) in self.upstream.stage_timeouts() {
            at_most(key, d, max::TIMEOUT)?;
        }
        at_most("dns.timeout", self.dns.timeout, max::TIMEOUT)?;
        let v = &self.verification;
        at_most(
            "verification.check_interval",
            v.check_interval,
            max::SCHEDULE,
        )?;
        at_most(
            "verification.pending_expiry",
            v.pending_expiry,
            max::SCHEDULE,
        )?;
        at_most(
            "verification.recheck_interval",
            v.recheck_interval,
            max::SCHEDULE,
        )?;
        at_most("verification.grace", v.grace, max::SCHEDULE)?;
        count_at_most("verification.concurrency", v.concurrency, max::CONCURRENCY)?;
        let q = &self.queue;
        at_most("queue.retry_initial", q.retry_initial, max::SCHEDULE)?;
        at_most("queue.retry_max", q.retry_max, max::SCHEDULE)?;
        at_most("queue.max_lifetime", q.max_lifetime, max::SCHEDULE)?;
        count_at_most("queue.concurrency", q.concurrency, max::CONCURRENCY)?;
        count_at_most(
            "queue.dead_after",
            usize::try_from(q.dead_after).unwrap_or(usize::MAX),
            max::DEAD_AFTER,
        )?;
        at_most("queue.probe_interval", q.probe_interval, max::SCHEDULE)?;
        let l = &self.limits;
        count_at_most(
            "limits.max_connections",
            l.max_connections,
            max::CONNECTIONS,
        )?;
        count_at_most(
            "limits.max_connections_per_ip",
            l.max_connections_per_ip,
            max::CONNECTIONS,
        )?;
        at_most("limits.idle_timeout", l.idle_timeout, max::TIMEOUT)?;
        at_most("limits.data_timeout", l.data_timeout, max::TIMEOUT)?;
        count_at_most("limits.max_errors", l.max_errors, max::ERRORS)?;
        count_at_most(
            "limits.max_line_length",
            l.max_line_length,
            max::LINE_LENGTH,
        )?;
        count_at_most(
            "limits.auth_failures",
            l.auth_failures as usize,
            max::AUTH_FAILURES,
        )?;
        at_most("limits.auth_window", l.auth_window, max::SCHEDULE)?;
        at_most(
            "limits.auth_failure_delay",
            l.auth_failure_delay,
            max::AUTH_FAILURE_DELAY,
        )?;
        at_most("auth.timeout", self.auth.timeout, max::TIMEOUT)?;
        Ok(())
    }

    /// The upstream password, read from `password_file` (first line).
    pub fn upstream_password(&self) -> Result<Option<String>, String> {
        match &self.upstream.password_file {
            None => Ok(None),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "upstream.password_file: cannot read {}: {e}",
                        path.display()
                    )
                })?;
                Ok(Some(text.lines().next().unwrap_or("").to_string()))
            }
        }
    }
}

fn positive(key: &str, d: Dur) -> Result<(), String> {
    if d.0.is_zero() {
        return Err(format!("{key}: must be longer than zero"));
    }
    Ok(())
}

fn at_least(key: &str, value: usize, min: usize) -> Result<(), String> {
    if value < min {
        return Err(format!("{key}: must be at least {min}, got {value}"));
    }
    Ok(())
}

fn at_most(key: &str, d: Dur, max: Duration) -> Result<(), String> {
    if d.0 > max {
        return Err(format!(
            "{key}: must be at most {}, got {}",
            humantime::format_duration(max),
            humantime::format_duration(d.0)
        ));
    }
    Ok(())
}

fn count_at_most(key: &str, value: usize, max: usize) -> Result<(), String> {
    if value > max {
        return Err(format!("{key}: must be at most {max}, got {value}"));
    }
    Ok(())
}

/// toml's errors span several lines with a source excerpt; the contract is one
/// line naming the key, so keep the message (the caller adds the key path).
fn one_line(msg: &str) -> String {
    msg.trim().replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::parse("").expect("defaults are valid");
        assert_eq!(c.server.submission[0].port(), 2587);
        assert_eq!(c.server.submissions[0].port(), 2465);
        assert_eq!(c.server.max_message_size, 26_214_400);
        assert_eq!(c.verification.record_label, "domauthvalidation");
        assert_eq!(c.queue.max_lifetime.get(), Duration::from_secs(5 * 86400));
        assert_eq!(c.limits.idle_timeout.get(), Duration::from_secs(300));
        assert_eq!(c.upstream.tls, UpstreamTls::None);
        assert_eq!(c.queue.sync, domauth_store::SyncMethod::Syncfs);
        assert_eq!(c.queue.dead_after, 3);
        let fsync = Config::parse("[queue]\nsync = \"fsync\"").expect("fsync is a method");
        assert_eq!(fsync.queue.sync, domauth_store::SyncMethod::Fsync);
        let err = Config::parse("[queue]\nsync = \"sometimes\"").expect_err("unknown method");
        assert!(err.contains("sync"), "{err}");
    }

    #[test]
    fn metrics_listen_defaults_to_loopback_and_may_be_empty() {
        let c = Config::parse("").expect("defaults are valid");
        assert_eq!(c.metrics.listen, [SocketAddr::from(([127, 0, 0, 1], 9025))]);
        let off = Config::parse("[metrics]\nlisten = []").expect("empty list: off");
        assert!(off.metrics.listen.is_empty());
        let two = Config::parse("[metrics]\nlisten = [\"127.0.0.1:9100\", \"[::1]:9100\"]")
            .expect("two addresses");
        assert_eq!(two.metrics.listen.len(), 2);
        for bad in [
            "[metrics]\nlisten = [\"nope\"]",
            "[metrics]\nlisten = \"127.0.0.1:9025\"",
            "[metrics]\nport = 1",
        ] {
            let err = Config::parse(bad).expect_err(bad);
            assert!(err.starts_with("metrics."), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_repository_config_parses() {
        let text = include_str!("../../config.toml");
        Config::parse(text).expect("config.toml is valid");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[server]\nsubmission = [\"nope\"]", "submission"),
            ("[queue]\nretry_initial = \"soon\"", "retry_initial"),
            ("[queue]\nretry_initial = \"0s\"", "queue.retry_initial"),
            ("[queue]\nconcurrency = 0", "queue.concurrency"),
            ("[upstream]\ntls = \"maybe\"", "tls"),
            ("[upstream]\nport = 0", "upstream.port"),
            ("[limits]\nmax_line_length = 100", "limits.max_line_length"),
            ("[panel]\nsession_idle = \"0s\"", "panel.session_idle"),
            ("[panel]\nlisten = [\"nowhere\"]", "panel.listen"),
            ("[panel]\ntls = \"yes\"", "panel.tls"),
            ("[server]\nhostnme = \"x\"", "hostnme"),
            ("[nonsense]\na = 1", "nonsense"),
            (
                "[verification]\nrecord_label = \"a b\"",
                "verification.record_label",
            ),
            ("[upstream]\nusername = \"u\"", "upstream.username"),
            (
                "[deliverability]\nspf_include = \"a..b\"",
                "deliverability.spf_include",
            ),
            ("[deliverability]\ndkim = \"yes\"", "dkim"),
            (
                "[deliverability]\nspf_include = \"not a name\"",
                "deliverability.spf_include",
            ),
            ("[dns]\nresolv_conf = \"\"", "dns.resolv_conf"),
            // A TOML syntax error has no key: it names the line instead.
            ("[server\n", "line 1: "),
            // Found by fuzz/config: the key path carried the raw newline.
            ("[server]\n\"host\\nname\" = \"x\"", "host name"),
            ("[server]\n\"host\\rname\" = \"x\"", "host name"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).expect_err(text);
            assert!(
                err.contains(key),
                "{text:?}: error {err:?} should name {key:?}"
            );
            assert!(
                !err.contains('\n'),
                "{text:?}: error must be one line: {err:?}"
            );
        }
    }

    /// Each value past its ceiling is refused with one line that starts with
    /// its key (not the key of an ordering rule it also breaks).
    #[test]
    fn over_limit_values_name_their_key() {
        let cases = [
            ("server", "max_message_size", "2147483649"),
            ("server", "max_recipients", "100001"),
            ("server", "shutdown_timeout", "\"24h 1s\""),
            ("upstream", "connect_timeout", "\"2days\""),
            ("upstream", "greeting_timeout", "\"25h\""),
            ("upstream", "command_timeout", "\"25h\""),
            ("upstream", "data_timeout", "\"25h\""),
            ("upstream", "data_block_timeout", "\"25h\""),
            ("upstream", "final_timeout", "\"500000000y\""),
            ("queue", "dead_after", "1000001"),
            ("queue", "probe_interval", "\"366d\""),
            ("dns", "timeout", "\"86401s\""),
            ("verification", "check_interval", "\"366d\""),
            ("verification", "pending_expiry", "\"500000000y\""),
            ("verification", "recheck_interval", "\"366d\""),
            ("verification", "grace", "\"18446744073709551615s\""),
            ("verification", "concurrency", "10001"),
            ("queue", "retry_initial", "\"366d\""),
            ("queue", "retry_max", "\"500000000y\""),
            ("queue", "max_lifetime", "\"365d 1s\""),
            ("queue", "concurrency", "18446744073709551615"),
            ("limits", "max_connections", "2305843009213693952"),
            ("limits", "max_connections", "1000001"),
            ("limits", "max_connections_per_ip", "1000001"),
            ("limits", "idle_timeout", "\"25h\""),
            ("limits", "data_timeout", "\"18446744073709551615s\""),
            ("limits", "max_errors", "10001"),
            ("limits", "max_line_length", "1048577"),
            ("limits", "auth_failures", "1000001"),
            ("limits", "auth_failures", "4294967295"),
            ("limits", "auth_window", "\"366d\""),
            ("limits", "auth_failure_delay", "\"61s\""),
        ];
        for (section, key, value) in cases {
            let text = format!("[{section}]\n{key} = {value}\n");
            let err = Config::parse(&text).expect_err(&text);
            let prefix = format!("{section}.{key}: must be at most ");
            assert!(
                err.starts_with(&prefix),
                "{text:?}: error {err:?} should start with {prefix:?}"
            );
            assert!(!err.contains('\n'), "{text:?}: one line: {err:?}");
        }
    }

    /// The ceilings themselves are allowed, all at once.
    #[test]
    fn the_maxima_parse() {
        let text = "
            [server]
            max_message_size = 2147483648
            max_recipients = 100000
            shutdown_timeout = \"24h\"
            [upstream]
            connect_timeout = \"1day\"
            greeting_timeout = \"1day\"
            command_timeout = \"1day\"
            data_timeout = \"1day\"
            data_block_timeout = \"1day\"
            final_timeout = \"1day\"
            [dns]
            timeout = \"86400s\"
            [verification]
            check_interval = \"365d\"
            pending_expiry = \"365days\"
            recheck_interval = \"8760h\"
            grace = \"365d\"
            concurrency = 10000
            [queue]
            retry_initial = \"365d\"
            retry_max = \"365d\"
            max_lifetime = \"365d\"
            concurrency = 10000
            dead_after = 1000000
            probe_interval = \"365d\"
            [limits]
            max_connections = 1000000
            max_connections_per_ip = 1000000
            idle_timeout = \"24h\"
            data_timeout = \"24h\"
            max_errors = 10000
            max_line_length = 1048576
            auth_failures = 1000000
            auth_window = \"365d\"
            auth_failure_delay = \"60s\"
        ";
        let c = Config::parse(text).expect("the maxima are valid");
        assert_eq!(c.server.max_message_size, max::MESSAGE_SIZE);
        assert_eq!(c.queue.retry_max.get(), max::SCHEDULE);
        assert_eq!(c.limits.idle_timeout.get(), max::TIMEOUT);
        assert_eq!(c.limits.max_connections, max::CONNECTIONS);
        assert_eq!(c.limits.auth_failure_delay.get(), max::AUTH_FAILURE_DELAY);
    }

    #[test]
    fn durations_accept_humantime() {
        let c = Config::parse("[verification]\ncheck_interval = \"1s\"\ngrace = \"72h\"").unwrap();
        assert_eq!(c.verification.check_interval.get(), Duration::from_secs(1));
        assert_eq!(c.verification.grace.get(), Duration::from_secs(72 * 3600));
    }

    #[test]
    fn log_format_and_the_packaged_config() {
        assert_eq!(Config::parse("").unwrap().log.format, LogFormat::Text);
        let c = Config::parse("[log]\nformat = \"json\"").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let err = Config::parse("[log]\nformat = \"xml\"").expect_err("unknown format");
        assert!(err.starts_with("log.format: "), "{err}");
        // What the .deb installs as /etc/domauth/config.toml.
        let deb = Config::parse(include_str!("../../dist/config.toml")).expect("dist/config.toml");
        assert_eq!(deb.server.data_dir, Path::new("/var/lib/domauth"));
        assert!(!deb.tls.self_signed);
    }

    #[test]
    fn auth_backend_keys() {
        let c = Config::parse("").expect("defaults");
        assert_eq!(c.auth.backend, AuthBackend::Store);
        assert_eq!(c.auth.socket, PathBuf::from("/run/dovecot/auth-client"));
        assert_eq!(c.auth.timeout.get(), Duration::from_secs(15));
        let c =
            Config::parse("[auth]\nbackend = \"dovecot\"\nsocket = \"/tmp/a\"").expect("dovecot");
        assert_eq!(c.auth.backend, AuthBackend::Dovecot);
        let c = Config::parse("[auth]\nbackend = \"passwd-file\"\npath = \"/etc/users\"")
            .expect("passwd-file");
        assert_eq!(c.auth.path, Some(PathBuf::from("/etc/users")));
        for (text, key) in [
            ("[auth]\nbackend = \"ldap\"", "auth.backend"),
            ("[auth]\nbackend = \"passwd-file\"", "auth.path"),
            (
                "[auth]\nbackend = \"dovecot\"\nsocket = \"\"",
                "auth.socket",
            ),
            ("[auth]\ntimeout = \"0s\"", "auth.timeout"),
            ("[auth]\ntimeout = \"3d\"", "auth.timeout"),
            ("[auth]\nsockett = \"/x\"", "sockett"),
        ] {
            let err = Config::parse(text).expect_err(text);
            assert!(err.contains(key), "{text:?}: {err:?} should name {key:?}");
            assert!(!err.contains('\n'), "{err:?}");
        }
    }

    #[test]
    fn panel_defaults_and_off() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.panel.listen, [SocketAddr::from(([127, 0, 0, 1], 8025))]);
        assert!(!c.panel.tls);
        assert_eq!(c.panel.session_idle.get(), Duration::from_secs(1800));
        let off = Config::parse("[panel]\nlisten = []\ntls = true\nsession_idle = \"5m\"").unwrap();
        assert!(off.panel.listen.is_empty() && off.panel.tls);
        assert_eq!(off.panel.session_idle.get(), Duration::from_secs(300));
    }
}
