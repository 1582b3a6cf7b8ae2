//! Prometheus metrics (SPEC §10): the registry, a typed handle for every
//! series, and the `GET /metrics` endpoint on `[metrics] listen`.
//!
//! Counters are incremented where the event happens, one call each
//! (`metrics::auth(&result)` in `smtp::conn`, `metrics::domain_check(&outcome)`
//! in `verify`...), never collected by a second pass. The registry is one
//! process-wide value, so no handle has to be threaded through the mail
//! modules. Every label set is resolved once, when the registry is built:
//! an event is one atomic increment, with no lock, lookup or allocation
//! (the histogram takes prometheus-client's short uncontended lock). Every
//! label value is registered up front, so a series reads 0 before its first
//! event instead of being absent.
//!
//! This module knows the vocabulary of the modules it counts (their result
//! enums); they only call it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        LazyLock,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Instant,
};

use axum::{Router, http::header, response::IntoResponse, routing};
use chrono::{DateTime, Utc};
use domauth_store::{AuthorizedDomain, DomainStatus, RecipientStatus};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    smtp::{
        data::DataOutcome,
        session::{AuthResult, Listener},
    },
    spool::SpoolError,
    verify_dns::CheckOutcome,
};

/// Why a message was refused (`domauth_messages_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `MAIL FROM` not owned by the login (553 5.7.1).
    Sender,
    /// A `From:` / `Sender:` address not owned, or no `From:` (550).
    Header,
    /// The header block is larger than the relay keeps.
    HeaderTooLarge,
    /// Over `server.max_message_size`, declared at MAIL or found in DATA (552).
    Size,
    /// A bare LF or bare CR in the content (SMTP smuggling, 550 5.5.2).
    BareLineEnding,
    /// A NUL byte in the content.
    Nul,
    /// The queue's disk is full (452).
    DiskFull,
    /// The message could not be stored for another reason (451).
    StorageError,
}

impl Refusal {
    const ALL: [Refusal; 8] = [
        Refusal::Sender,
        Refusal::Header,
        Refusal::HeaderTooLarge,
        Refusal::Size,
        Refusal::BareLineEnding,
        Refusal::Nul,
        Refusal::DiskFull,
        Refusal::StorageError,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Sender => "sender",
            Refusal::Header => "header",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::Size => "size",
            Refusal::BareLineEnding => "bare_line_ending",
            Refusal::Nul => "nul",
            Refusal::DiskFull => "disk_full",
            Refusal::StorageError => "storage_error",
        }
    }
}

type Labels = [(&'static str, &'static str); 1];

/// One pre-resolved counter per label value, in the order of `values`.
fn counters<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    values.map(|v| family.get_or_create_owned(&[(label, v)]))
}

fn gauges<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [Gauge; N] {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    values.map(|v| family.get_or_create_owned(&[(label, v)]))
}

/// Upper bounds of the MAIL-to-250 histogram, in seconds: from a pipelined
/// small message on loopback to a large upload over a slow link.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// No oldest message: the queue is empty.
const NO_MESSAGE: i64 = i64::MIN;

pub struct Metrics {
    registry: Registry,
    /// `[submission, submissions]`.
    sessions_open: [Gauge; 2],
    sessions_opened: [Counter; 2],
    /// `[max_connections, max_connections_per_ip]`.
    connections_refused: [Counter; 2],
    /// `[success, failure, rate_limited, temporary_failure]`.
    auth: [Counter; 5],
    accepted: Counter,
    /// Indexed like [`Refusal::ALL`].
    refused: [Counter; 8],
    mail_to_queued: Histogram,
    queue_messages: Gauge,
    /// Unix milliseconds of the oldest message's acceptance, or [`NO_MESSAGE`];
    /// turned into an age at each scrape.
    queue_oldest_ms: AtomicI64,
    queue_oldest_age: Gauge<f64, AtomicU64>,
    /// `[delivered, deferred, unreachable, failed, expired]`.
    deliveries: [Counter; 5],
    bounces: Counter,
    /// `[verified, not_found, mismatch, dns_error]`.
    domain_checks: [Counter; 4],
    /// `[pending, verified, failed]`.
    domains: [Gauge; 3],
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("domauth");
        let listeners = ["submission", "submissions"];
        let sessions_open = gauges(
            &mut r,
            "sessions",
            "SMTP sessions open now, by listener kind",
            "listener",
            listeners,
        );
        let sessions_opened = counters(
            &mut r,
            "sessions_opened",
            "SMTP connections accepted since start, by listener kind",
            "listener",
            listeners,
        );
        let connections_refused = counters(
            &mut r,
            "connections_refused",
            "Connections refused at once by a connection limit, by limit",
            "limit",
            ["max_connections", "max_connections_per_ip"],
        );
        let auth = counters(
            &mut r,
            "auth_attempts",
            "SMTP AUTH attempts that reached a credentials check, by result",
            "result",
            [
                "success",
                "failure",
                "rate_limited",
                "temporary_failure",
                "backend_unavailable",
            ],
        );
        let accepted = Counter::default();
        r.register(
            "messages_accepted",
            "Messages accepted (250 queued as, after fsync)",
            accepted.clone(),
        );
        let refused = counters(
            &mut r,
            "messages_refused",
            "Messages refused, by reason",
            "reason",
            Refusal::ALL.map(Refusal::label),
        );
        let mail_to_queued = Histogram::new(LATENCY_BUCKETS);
        r.register(
            "mail_to_queued_seconds",
            "Time from the accepted MAIL FROM to the 250 queued reply",
            mail_to_queued.clone(),
        );
        let queue_messages = Gauge::default();
        r.register(
            "queue_messages",
            "Messages in the queue waiting for delivery or being delivered (held messages excluded)",
            queue_messages.clone(),
        );
        let queue_oldest_age = Gauge::<f64, AtomicU64>::default();
        r.register(
            "queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue; 0 when the queue is empty",
            queue_oldest_age.clone(),
        );
        let deliveries = counters(
            &mut r,
            "delivery_attempts",
            "Delivery attempts to the upstream, one per recipient, by result",
            "result",
            ["delivered", "deferred", "unreachable", "failed", "expired"],
        );
        let bounces = Counter::default();
        r.register(
            "bounces",
            "Delivery status notifications (bounces) queued for senders",
            bounces.clone(),
        );
        let domain_checks = counters(
            &mut r,
            "domain_checks",
            "DNS ownership checks of authorized domains, by outcome",
            "outcome",
            ["verified", "not_found", "mismatch", "dns_error"],
        );
        let domains = gauges(
            &mut r,
            "domains",
            "Authorized domains by status",
            "status",
            ["pending", "verified", "failed"],
        );
        Metrics {
            registry: r,
            sessions_open,
            sessions_opened,
            connections_refused,
            auth,
            accepted,
            refused,
            mail_to_queued,
            queue_messages,
            queue_oldest_ms: AtomicI64::new(NO_MESSAGE),
            queue_oldest_age,
            deliveries,
            bounces,
            domain_checks,
            domains,
        }
    }

    /// The exposition in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let oldest = self.queue_oldest_ms.load(Ordering::Relaxed);
        let age = if oldest == NO_MESSAGE {
            0.0
        } else {
            (Utc::now().timestamp_millis().saturating_sub(oldest)).max(0) as f64 / 1000.0
        };
        self.queue_oldest_age.set(age);
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn get() -> &'static Metrics {
    &METRICS
}

/// SMTP sessions open now, every listener (for a status line such as
/// systemd's `STATUS=`).
pub fn open_sessions() -> i64 {
    get().sessions_open.iter().map(Gauge::get).sum()
}

/// Messages in the queue as the scheduler last saw them (idem).
pub fn queued_messages() -> i64 {
    get().queue_messages.get()
}

fn listener_index(listener: Listener) -> usize {
    match listener {
        Listener::Submission => 0,
        Listener::Submissions => 1,
    }
}

/// An open SMTP session; the open-sessions gauge goes down when it drops.
pub struct OpenSession(usize);

impl Drop for OpenSession {
    fn drop(&mut self) {
        get().sessions_open[self.0].dec();
    }
}

/// A connection became an SMTP session; keep the guard for its lifetime.
#[must_use = "the session counts as open while the guard lives"]
pub fn session_opened(listener: Listener) -> OpenSession {
    let m = get();
    let i = listener_index(listener);
    m.sessions_opened[i].inc();
    m.sessions_open[i].inc();
    OpenSession(i)
}

/// A connection refused by `limit` (`"max_connections"` or
/// `"max_connections_per_ip"`, the names `server.rs` logs).
pub fn connection_refused(limit: &str) {
    let i = usize::from(limit == "max_connections_per_ip");
    get().connections_refused[i].inc();
}

pub fn auth(result: &AuthResult) {
    let i = match result {
        AuthResult::Success(_) => 0,
        AuthResult::Failed => 1,
        AuthResult::RateLimited => 2,
        AuthResult::TemporaryFailure => 3,
        AuthResult::BackendUnavailable => 4,
    };
    get().auth[i].inc();
}

pub fn message_refused(reason: Refusal) {
    // `Refusal::ALL` lists the variants in declaration order.
    get().refused[reason as usize].inc();
}

/// The DATA decoder's verdict: counts the refusals it implies.
pub fn data_outcome(outcome: &DataOutcome) {
    match outcome {
        DataOutcome::Complete => {}
        DataOutcome::TooBig => message_refused(Refusal::Size),
        DataOutcome::BareLineEnding => message_refused(Refusal::BareLineEnding),
        DataOutcome::Nul => message_refused(Refusal::Nul),
    }
}

/// A message could not be committed to the queue.
pub fn spool_failed(error: &SpoolError) {
    message_refused(match error {
        SpoolError::DiskFull(_) => Refusal::DiskFull,
        SpoolError::Failed(_) => Refusal::StorageError,
    });
}

/// A message got its `250 queued as`; `mail_at` is when its MAIL FROM was accepted.
pub fn message_accepted(mail_at: Option<Instant>) {
    let m = get();
    m.accepted.inc();
    if let Some(t) = mail_at {
        m.mail_to_queued.observe(t.elapsed().as_secs_f64());
    }
}

/// The scheduler's view of the queue: how many messages, and when the oldest
/// was accepted.
pub fn queue(messages: usize, oldest: Option<DateTime<Utc>>) {
    let m = get();
    m.queue_messages
        .set(i64::try_from(messages).unwrap_or(i64::MAX));
    m.queue_oldest_ms.store(
        oldest.map_or(NO_MESSAGE, |t| t.timestamp_millis()),
        Ordering::Relaxed,
    );
}

/// One recipient's result of a delivery attempt. `unreachable`: the upstream
/// could not be reached at all (the recipient stays pending).
pub fn delivery_attempt(status: &RecipientStatus, unreachable: bool) {
    let i = match status {
        RecipientStatus::Delivered => 0,
        RecipientStatus::Pending if unreachable => 2,
        RecipientStatus::Pending => 1,
        RecipientStatus::Failed => 3,
    };
    get().deliveries[i].inc();
}

/// A recipient given up on after `queue.max_lifetime`.
pub fn delivery_expired() {
    get().deliveries[4].inc();
}

pub fn bounce_queued() {
    get().bounces.inc();
}

pub fn domain_check(outcome: &CheckOutcome) {
    let i = match outcome {
        CheckOutcome::Verified => 0,
        CheckOutcome::NotFound(_) => 1,
        CheckOutcome::Mismatch { .. } => 2,
        CheckOutcome::DnsError(_) => 3,
    };
    get().domain_checks[i].inc();
}

fn status_index(status: DomainStatus) -> usize {
    match status {
        DomainStatus::Pending => 0,
        DomainStatus::Verified => 1,
        DomainStatus::Failed => 2,
    }
}

/// A domain's status changed (`None`: it did not exist, or no longer does):
/// the by-status gauges follow at once.
pub fn domain_status(from: Option<DomainStatus>, to: Option<DomainStatus>) {
    if from == to {
        return;
    }
    let m = get();
    if let Some(s) = from {
        m.domains[status_index(s)].dec();
    }
    if let Some(s) = to {
        m.domains[status_index(s)].inc();
    }
}

/// Every authorized domain, from the verification task's scan (which reads
/// them all anyway, so this costs no extra store read): the by-status gauges
/// are reset to the store's counts, so a change made where no
/// [`domain_status`] call sits is reflected within one pass.
pub fn domains(all: &[AuthorizedDomain]) {
    let mut counts = [0i64; 3];
    for d in all {
        counts[status_index(d.status)] += 1;
    }
    for (gauge, n) in get().domains.iter().zip(counts) {
        gauge.set(n);
    }
}

/// When the messages of the queue were accepted, as a multiset, so the oldest
/// is found in O(log n) rather than by a scan per scrape. The scheduler keeps
/// it beside its schedule.
#[derive(Debug, Default)]
pub struct AcceptedTimes(BTreeMap<DateTime<Utc>, u32>);

impl AcceptedTimes {
    pub fn add(&mut self, t: DateTime<Utc>) {
        *self.0.entry(t).or_insert(0) += 1;
    }

    pub fn remove(&mut self, t: DateTime<Utc>) {
        if let Some(n) = self.0.get_mut(&t) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&t);
            }
        }
    }

    pub fn oldest(&self) -> Option<DateTime<Utc>> {
        self.0.first_key_value().map(|(t, _)| *t)
    }
}

async fn scrape() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
        get().encode(),
    )
}

/// Serves `GET /metrics` on every address of `[metrics] listen`. An address
/// that cannot be bound is logged and skipped: monitoring never stops the
/// relay from taking mail.
pub async fn serve(addrs: &[SocketAddr], shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let app = Router::new().route("/metrics", routing::get(scrape));
    let mut tasks = Vec::new();
    for addr in addrs {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(event = "metrics_not_listening", addr = %addr, error = %e, "metrics.listen: cannot listen on {addr}: {e}; no metrics there");
                continue;
            }
        };
        tracing::info!(event = "listening", addr = %addr, listener = "metrics", "listening");
        let (app, mut shutdown) = (app.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                while !*shutdown.borrow() {
                    if shutdown.changed().await.is_err() {
                        break;
                    }
                }
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(event = "metrics_error", error = %e, "metrics endpoint failed");
            }
        }));
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_times_track_the_oldest() {
        let t0 = Utc::now();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let mut a = AcceptedTimes::default();
        assert_eq!(a.oldest(), None);
        a.add(at(5));
        a.add(at(1));
        a.add(at(1));
        a.add(at(3));
        assert_eq!(a.oldest(), Some(at(1)));
        a.remove(at(1));
        assert_eq!(a.oldest(), Some(at(1)), "two messages share that time");
        a.remove(at(1));
        assert_eq!(a.oldest(), Some(at(3)));
        a.remove(at(42)); // unknown: nothing happens
        a.remove(at(3));
        a.remove(at(5));
        assert_eq!(a.oldest(), None);
    }

    /// The registry builds (prometheus-client panics in debug builds on a
    /// counter name ending in `_total`) and every series is there, `domauth_`
    /// prefixed, before any event.
    #[test]
    fn every_series_is_exposed_from_the_start() {
        let text = Metrics::new().encode();
        for series in [
            "domauth_sessions{listener=\"submission\"} 0",
            "domauth_sessions_opened_total{listener=\"submissions\"} 0",
            "domauth_connections_refused_total{limit=\"max_connections_per_ip\"} 0",
            "domauth_auth_attempts_total{result=\"rate_limited\"} 0",
            "domauth_messages_accepted_total 0",
            "domauth_messages_refused_total{reason=\"bare_line_ending\"} 0",
            "domauth_mail_to_queued_seconds_count 0",
            "domauth_queue_messages 0",
            "domauth_queue_oldest_message_age_seconds 0",
            "domauth_delivery_attempts_total{result=\"expired\"} 0",
            "domauth_bounces_total 0",
            "domauth_domain_checks_total{outcome=\"dns_error\"} 0",
            "domauth_domains{status=\"failed\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("domauth_"), "{line}");
        }
    }

    #[test]
    fn open_sessions_follow_the_guards() {
        // The only test that opens sessions: the global gauges are its own.
        let before = open_sessions();
        let a = session_opened(Listener::Submission);
        let b = session_opened(Listener::Submissions);
        assert_eq!(open_sessions(), before + 2);
        drop(a);
        assert_eq!(open_sessions(), before + 1);
        drop(b);
        assert_eq!(open_sessions(), before);
    }

    #[test]
    fn refusals_index_their_own_counter() {
        let labels: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
