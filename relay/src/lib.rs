//! domauth: an SMTP submission relay for a hosting provider. A message
//! flows one way through these modules:
//!
//! `smtp::conn` (socket) → `smtp::session` (protocol) → `policy` (who may
//! send as whom) → `cleanup` (header checks, trace headers) → `spool` (the
//! durable queue boundary) → `queue` (scheduling, retries) → `upstream`
//! (the smarthost) or `bounce` (DSNs).
//!
//! Around them: `config`, `tls`, `server` (listeners, limits, shutdown),
//! `verify` / `verify_dns` (DNS ownership proofs) and `admin` (the API on
//! the Unix socket and the CLI's client). `main.rs` is only the CLI.
//! `logsafe` escapes outside text on its way into the log; `passwords`
//! holds the password backends (`[auth] backend`) behind `smtp::auth`.
//! `notify` (systemd) and `reload` (SIGHUP) are the operations side that
//! `server` wires up.
//! `verify_auth` asks a zone's authoritative nameservers (SPEC §9) and
//! `dns_advice` reads SPF and DMARC for advice.
//! `metrics` counts what happens, for Prometheus (`GET /metrics`). `ops`
//! holds the domain/account operations behind every face; `panel` serves
//! the hosting panel and the public HTTP API (SPEC §8).

pub mod admin;
pub mod bounce;
pub mod cleanup;
pub mod config;
pub mod dkim;
pub mod dkim_keys;
pub mod dns_advice;
pub mod dsn;
pub mod logsafe;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod panel;
pub mod passwords;
pub mod policy;
pub mod queue;
pub mod reload;
pub mod schedule;
pub mod server;
pub mod smtp;
pub mod spool;
pub mod tls;
pub mod upstream;
pub mod verify;
pub mod verify_auth;
pub mod verify_dns;
