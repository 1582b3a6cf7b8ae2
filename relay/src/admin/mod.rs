//! Administration: the HTTP/JSON API on the server's Unix socket
//! (`server.rs`), the CLI's client for it (`client.rs`) and the CLI's
//! commands rendered for people or as JSON (`commands.rs`).

pub mod client;
pub mod commands;
pub mod dns_report;
pub mod server;
