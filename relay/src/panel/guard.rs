//! Who may use the panel and the API: the hosting password check at sign-in
//! (Argon2id, off the runtime), failure limits per client IP and per
//! hosting name like SMTP AUTH (`limits.auth_failures` in
//! `limits.auth_window`), the same limit per IP for bad API tokens, and the
//! CSRF token of the panel's forms.

use std::{
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use subtle::ConstantTimeEq;

use crate::{
    logsafe::Escaped,
    ops::{Ops, random_hex},
    smtp::auth::{FailureCounter, hash_password, verify_password},
};

pub enum SignIn {
    /// The hosting's name, normalised.
    Ok(String),
    Failed,
    Limited,
}

pub struct Guard {
    by_ip: Mutex<FailureCounter>,
    by_name: Mutex<FailureCounter>,
    tokens_by_ip: Mutex<FailureCounter>,
    /// Verified against for unknown hostings, so an unknown name costs the
    /// same time as a wrong password.
    dummy_phc: String,
    /// One Argon2 run per core at a time (each takes ~19 MiB).
    hashing: tokio::sync::Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Guard {
    pub fn new(failures: u32, window: Duration) -> Result<Guard, String> {
        Ok(Guard {
            by_ip: Mutex::new(FailureCounter::new(failures, window)),
            by_name: Mutex::new(FailureCounter::new(failures, window)),
            tokens_by_ip: Mutex::new(FailureCounter::new(failures, window)),
            dummy_phc: hash_password("domauth-dummy-panel-password")?,
            hashing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
        })
    }

    /// Checks a hosting's panel password. Past the failure limit of the IP
    /// or of the name, even the right password is refused until the window
    /// passes.
    pub async fn sign_in(&self, ops: &Ops, ip: IpAddr, name: &str, password: &str) -> SignIn {
        let name = name.trim().to_lowercase();
        let ip_key = ip.to_string();
        let now = Instant::now();
        if lock(&self.by_ip).blocked(&ip_key, now) || lock(&self.by_name).blocked(&name, now) {
            tracing::warn!(event = "panel_signin_limited", peer = %ip, hosting = %Escaped(&name), "panel sign-in refused: too many failures");
            return SignIn::Limited;
        }
        let phc = match ops.hosting_password_hash(&name) {
            Ok(phc) => phc,
            Err(e) => {
                tracing::error!(error = %Escaped(&e.to_string()), "store error during panel sign-in");
                return SignIn::Failed;
            }
        };
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_phc.clone());
        let password = password.to_string();
        let verified = match self.hashing.acquire().await {
            Ok(_permit) => tokio::task::spawn_blocking(move || verify_password(&password, &phc))
                .await
                .unwrap_or(false),
            Err(_) => false,
        };
        if verified && known {
            tracing::info!(event = "panel_signin", peer = %ip, hosting = %Escaped(&name), "panel sign-in");
            return SignIn::Ok(name);
        }
        lock(&self.by_ip).record(&ip_key, now);
        lock(&self.by_name).record(&name, now);
        tracing::warn!(event = "panel_signin_failed", peer = %ip, hosting = %Escaped(&name), "panel sign-in failed");
        SignIn::Failed
    }

    pub fn token_limited(&self, ip: IpAddr) -> bool {
        lock(&self.tokens_by_ip).blocked(&ip.to_string(), Instant::now())
    }

    pub fn token_failed(&self, ip: IpAddr) {
        lock(&self.tokens_by_ip).record(&ip.to_string(), Instant::now());
    }
}

/// A fresh CSRF token (128 bits).
pub fn new_csrf() -> String {
    random_hex(16).unwrap_or_default()
}

/// The form's token equals the session's, compared in constant time; an
/// empty token never matches.
pub fn csrf_ok(expected: Option<&str>, given: &str) -> bool {
    match expected {
        Some(e) if !e.is_empty() => e.as_bytes().ct_eq(given.as_bytes()).into(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_compare() {
        assert!(csrf_ok(Some("abc"), "abc"));
        assert!(!csrf_ok(Some("abc"), "abd"));
        assert!(!csrf_ok(Some("abc"), ""));
        assert!(!csrf_ok(Some(""), ""));
        assert!(!csrf_ok(None, "abc"));
        assert_eq!(new_csrf().len(), 32);
    }
}
