//! SMTP submission: the sans-IO session (`session.rs`, `data.rs`), the
//! socket side (`conn.rs`), SASL and its rate limiting (`auth.rs`), and every
//! reply text of the contract (`reply.rs`).

pub mod auth;
pub mod conn;
pub mod data;
pub mod reply;
pub mod session;
