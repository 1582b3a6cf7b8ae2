//! Where mailbox passwords come from (SPEC §10, `[auth] backend`).
//!
//! - `store`: mailboxes added with `domauth mailbox add`; checked in
//!   `smtp::auth` itself, whose success cache is keyed to the stored hash.
//! - `dovecot`: a running Dovecot answers over its auth client socket
//!   ([`dovecot`]), as Postfix's `smtpd_sasl_type = dovecot` does.
//! - `passwd-file`: a Dovecot passwd-file read directly ([`passwd_file`]).
//!
//! Whatever answered, `smtp::auth` turns a valid login into a session login
//! whose hosting is the owner of the login's domain, and keeps the failure
//! limiter and the equal cost of unknown logins for every backend.

pub mod dovecot;
pub mod passwd_file;

use std::sync::Arc;

use domauth_store::Store;

use crate::{
    config::{AuthBackend, AuthConfig},
    policy::{self, Decision},
    smtp::auth::login_key,
};

/// What a backend says about one login and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The password is right; `user` is the login as the backend names it
    /// (Dovecot may rewrite it, e.g. lower-case it).
    Valid { user: String },
    /// Wrong password or unknown login: the client's fault.
    Invalid,
    /// The backend could not answer (Dovecot down, timed out, confused); the
    /// reason is for the log.
    Unavailable(String),
}

/// The configured source of passwords, built once at start-up.
#[derive(Clone)]
pub enum Backend {
    Store,
    Dovecot(Arc<dovecot::DovecotClient>),
    PasswdFile(Arc<passwd_file::PasswdFile>),
}

impl Backend {
    /// A passwd-file that cannot be read or parsed at start-up stops it with
    /// one line; Dovecot is only asked at the first AUTH (it may start after
    /// us, and a Dovecot that is down means 454 for a while, not no relay).
    pub fn from_config(c: &AuthConfig) -> Result<Backend, String> {
        Ok(match c.backend {
            AuthBackend::Store => Backend::Store,
            AuthBackend::Dovecot => Backend::Dovecot(Arc::new(dovecot::DovecotClient::new(
                c.socket.clone(),
                c.timeout.get(),
            ))),
            AuthBackend::PasswdFile => {
                let path = c
                    .path
                    .clone()
                    .ok_or("auth.path: a passwd-file is needed with backend = \"passwd-file\"")?;
                Backend::PasswdFile(Arc::new(
                    passwd_file::PasswdFile::open(path).map_err(|e| format!("auth.path: {e}"))?,
                ))
            }
        })
    }
}

/// `domauth explain` (and every face of it) for the configured backend.
/// Blocking: a changed passwd-file is read here.
pub fn explain(backend: &Backend, store: &Store, login: &str, sender: &str) -> Decision {
    match backend {
        Backend::Store => policy::explain(store, login, sender),
        Backend::Dovecot(_) => policy::explain_external(store, login, sender, None),
        Backend::PasswdFile(file) => {
            let known = file.lookup(&login_key(login)).is_some();
            policy::explain_external(store, login, sender, Some(known))
        }
    }
}
