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
//! `logsafe` escapes outside text on its way into the log. `ops` holds the
//! domain/account operations behind every face; `panel` serves the hosting
//! panel and the public HTTP API (SPEC §8).

pub mod admin;
pub mod bounce;
pub mod cleanup;
pub mod config;
pub mod logsafe;
pub mod ops;
pub mod panel;
pub mod policy;
pub mod queue;
pub mod server;
pub mod smtp;
pub mod spool;
pub mod tls;
pub mod upstream;
pub mod verify;
pub mod verify_dns;
