//! SMTP AUTH behind the protocol: SASL PLAIN decoding (RFC 4616), Argon2id
//! verification on the blocking pool, the failure limiter (SPEC §4: per IP
//! and per login, 454 past the threshold) and a cache of recent successful
//! logins so a busy client does not pay Argon2 on every session (as Dovecot's
//! auth cache does).
//!
//! The password itself is checked by the configured backend (`crate::passwords`:
//! the store's mailboxes here, Dovecot, or a passwd-file); the limiter, the
//! failure delay and the hosting-by-domain rule are applied here for all.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use domauth_store::{Store, domain_of, normalize_address};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::session::AuthResult;
use crate::{
    logsafe::Escaped,
    passwords::{Backend, Verdict, passwd_file::PasswdFile},
    policy::Login,
};

/// Credentials from a SASL exchange. `Debug` never prints the password.
#[derive(Clone)]
pub struct SaslCredentials {
    pub login: String,
    pub password: String,
}

impl std::fmt::Debug for SaslCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaslCredentials")
            .field("login", &self.login)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl SaslCredentials {
    /// RFC 4616: `[authzid] NUL authcid NUL passwd`. An authzid other than
    /// the authcid would mean "act as another user": refused.
    pub fn from_plain(raw: &[u8]) -> Option<SaslCredentials> {
        let mut parts = raw.split(|&b| b == 0);
        let authzid = parts.next()?;
        let authcid = parts.next()?;
        let passwd = parts.next()?;
        if parts.next().is_some() || authcid.is_empty() {
            return None;
        }
        if !authzid.is_empty() && authzid != authcid {
            return None;
        }
        Some(SaslCredentials {
            login: String::from_utf8(authcid.to_vec()).ok()?,
            password: String::from_utf8(passwd.to_vec()).ok()?,
        })
    }
}

/// Argon2id PHC string for a new password (SPEC §1), for the admin API.
pub fn hash_password(password: &str) -> Result<String, String> {
    // The salt comes from the OS's random source (argon2's getrandom feature).
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash password: {e}"))
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// The login an AUTH attempt is counted, cached and logged under: the
/// normalised address, or, when the client's text is no address at all, that
/// text in lower case (so `A` and `a` share one failure count).
pub fn login_key(raw: &str) -> String {
    normalize_address(raw).unwrap_or_else(|_| raw.to_lowercase())
}

/// What one AUTH attempt came to, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthEvent {
    RateLimited,
    Success { cached: bool },
    Failure { known_login: bool },
}

/// Writes one AUTH outcome to the log: every outcome goes through here so
/// the login, which is the client's own text whenever it matched no mailbox
/// (`x\r\nevent=auth_success` is a valid SASL user name), is escaped
/// once for all of them (SPEC §4). The fuzz target `session` calls it too.
pub fn log_auth(event: AuthEvent, peer: IpAddr, login: &str) {
    let login = Escaped(login);
    match event {
        AuthEvent::RateLimited => tracing::warn!(
            event = "auth_rate_limited",
            peer = %peer,
            login = %login,
            "AUTH refused: too many failures"
        ),
        AuthEvent::Success { cached } => tracing::info!(
            event = "auth_success",
            peer = %peer,
            login = %login,
            cached,
            "AUTH ok"
        ),
        AuthEvent::Failure { known_login } => tracing::warn!(
            event = "auth_failure",
            peer = %peer,
            login = %login,
            known_login,
            "AUTH failed"
        ),
    }
}

/// Failures per key inside a sliding window (SMTP AUTH here, the panel's
/// sign-in and the API's bearer tokens in `panel`).
pub(crate) struct FailureCounter {
    window: Duration,
    threshold: u32,
    entries: HashMap<String, (Instant, u32)>,
}

impl FailureCounter {
    /// Memory stays bounded whatever an attacker sends: past this many keys
    /// the expired ones are swept, and if that is not enough the oldest go.
    const MAX_KEYS: usize = 100_000;

    pub(crate) fn new(threshold: u32, window: Duration) -> FailureCounter {
        FailureCounter {
            window,
            threshold,
            entries: HashMap::new(),
        }
    }

    pub(crate) fn blocked(&self, key: &str, now: Instant) -> bool {
        match self.entries.get(key) {
            Some((start, count)) => {
                now.duration_since(*start) < self.window && *count >= self.threshold
            }
            None => false,
        }
    }

    pub(crate) fn record(&mut self, key: &str, now: Instant) {
        if self.entries.len() >= Self::MAX_KEYS {
            let window = self.window;
            self.entries
                .retain(|_, (start, _)| now.duration_since(*start) < window);
            if self.entries.len() >= Self::MAX_KEYS {
                self.entries.clear();
            }
        }
        let entry = self.entries.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

struct CacheEntry {
    expires: Instant,
    login: Login,
    /// The password hash the entry was verified against: a password change
    /// (a new PHC string) invalidates the entry at once.
    phc: String,
}

pub struct AuthSettings {
    pub failures: u32,
    pub window: Duration,
    pub failure_delay: Duration,
    pub cache_ttl: Duration,
    /// Where passwords come from (`[auth] backend`).
    pub passwords: Backend,
}

pub struct Authenticator {
    store: Store,
    settings: AuthSettings,
    by_ip: Mutex<FailureCounter>,
    by_login: Mutex<FailureCounter>,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
    /// Key of the cache's HMAC: random per process, so the cache keys are
    /// useless outside it.
    cache_key: [u8; 32],
    /// A real hash to verify unknown logins against, so that an unknown
    /// login costs the same time as a wrong password.
    dummy_phc: String,
    /// Argon2 runs at most once per core at a time: each run takes ~19 MiB
    /// and a burst of logins would otherwise fill the blocking pool (512
    /// threads) and the memory with hashes.
    hashing: tokio::sync::Semaphore,
}

impl Authenticator {
    pub fn new(store: Store, settings: AuthSettings) -> Result<Arc<Authenticator>, String> {
        let mut cache_key = [0u8; 32];
        use rand::TryRngCore;
        rand::rngs::OsRng
            .try_fill_bytes(&mut cache_key)
            .map_err(|e| format!("no OS randomness: {e}"))?;
        let dummy_phc = hash_password("domauth-dummy-password-for-timing")?;
        Ok(Arc::new(Authenticator {
            by_ip: Mutex::new(FailureCounter::new(settings.failures, settings.window)),
            by_login: Mutex::new(FailureCounter::new(settings.failures, settings.window)),
            cache: Mutex::new(HashMap::new()),
            store,
            settings,
            cache_key,
            dummy_phc,
            hashing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
        }))
    }

    fn cache_id(&self, login: &str, password: &str) -> [u8; 32] {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.cache_key) else {
            return [0; 32];
        };
        mac.update(login.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A live cache entry for these credentials, valid only while the
    /// mailbox still has the password hash it was verified against.
    fn cached(&self, id: &[u8; 32], mailbox: Option<&domauth_store::Mailbox>) -> Option<Login> {
        self.cached_for_hash(id, mailbox.map(|m| m.password_hash.as_str()))
    }

    /// The same for any backend that shows us the hash (a passwd-file).
    fn cached_for_hash(&self, id: &[u8; 32], hash: Option<&str>) -> Option<Login> {
        let hash = hash?;
        let cache = lock(&self.cache);
        let entry = cache.get(id)?;
        (entry.expires > Instant::now() && entry.phc == hash).then(|| entry.login.clone())
    }

    fn remember(&self, id: [u8; 32], login: Login, phc: String, now: Instant) {
        let mut cache = lock(&self.cache);
        if cache.len() >= 10_000 {
            cache.retain(|_, e| e.expires > now);
            if cache.len() >= 10_000 {
                cache.clear();
            }
        }
        cache.insert(
            id,
            CacheEntry {
                expires: now + self.settings.cache_ttl,
                login,
                phc,
            },
        );
    }

    /// Checks credentials; the outcome feeds [`super::session::Session::auth_result`].
    pub async fn authenticate(&self, peer: IpAddr, creds: SaslCredentials) -> AuthResult {
        let login = login_key(&creds.login);
        let ip_key = peer.to_string();
        let now = Instant::now();
        let limited =
            lock(&self.by_ip).blocked(&ip_key, now) || lock(&self.by_login).blocked(&login, now);
        if limited {
            // Also for a correct password: the attacker learns nothing.
            log_auth(AuthEvent::RateLimited, peer, &login);
            return AuthResult::RateLimited;
        }
        match &self.settings.passwords {
            Backend::Store => {}
            Backend::Dovecot(dovecot) => {
                let verdict = dovecot
                    .authenticate(&creds.login, &creds.password, peer)
                    .await;
                return self.conclude(verdict, peer, &login, &ip_key).await;
            }
            Backend::PasswdFile(file) => {
                return self
                    .with_passwd_file(file.clone(), peer, creds, &login, &ip_key)
                    .await;
            }
        }

        let mailbox = match self.store.mailbox(&login) {
            Ok(m) => m,
            Err(e) => {
                // The store's error may quote the client's login.
                tracing::error!(error = %Escaped(&e.to_string()), "store error during AUTH");
                return AuthResult::TemporaryFailure;
            }
        };
        let id = self.cache_id(&login, &creds.password);
        if let Some(hit) = self.cached(&id, mailbox.as_ref()) {
            log_auth(AuthEvent::Success { cached: true }, peer, &login);
            return AuthResult::Success(hit);
        }
        let Ok(permit) = self.hashing.acquire().await else {
            return AuthResult::TemporaryFailure;
        };
        // While we waited, another session may have verified the same
        // credentials (a client opening many sessions at once).
        if let Some(hit) = self.cached(&id, mailbox.as_ref()) {
            log_auth(AuthEvent::Success { cached: true }, peer, &login);
            return AuthResult::Success(hit);
        }

        let phc = mailbox
            .as_ref()
            .map(|m| m.password_hash.clone())
            .unwrap_or_else(|| self.dummy_phc.clone());
        let password = creds.password;
        let verified = tokio::task::spawn_blocking(move || verify_password(&password, &phc))
            .await
            .unwrap_or(false);
        // The failure delay below must not hold up other logins' hashing.
        drop(permit);

        match mailbox {
            Some(mailbox) if verified => {
                let session_login = Login {
                    address: mailbox.address.clone(),
                    hosting: mailbox.hosting.clone(),
                };
                self.remember(id, session_login.clone(), mailbox.password_hash, now);
                log_auth(AuthEvent::Success { cached: false }, peer, &login);
                AuthResult::Success(session_login)
            }
            other => self.failed(peer, &login, &ip_key, other.is_some()).await,
        }
    }

    /// A wrong password or an unknown login: counted, logged, and answered
    /// after the failure delay, the same way whichever backend said so.
    async fn failed(&self, peer: IpAddr, login: &str, ip_key: &str, known: bool) -> AuthResult {
        let now = Instant::now();
        lock(&self.by_ip).record(ip_key, now);
        lock(&self.by_login).record(login, now);
        log_auth(AuthEvent::Failure { known_login: known }, peer, login);
        tokio::time::sleep(self.settings.failure_delay).await;
        AuthResult::Failed
    }

    /// SPEC §10: with every backend the hosting of a login is the hosting
    /// that owns the login's domain. `Ok(None)`: no hosting owns it (or the
    /// backend's user name is no address), refused like a wrong password.
    fn session_login(&self, user: &str) -> Result<Option<Login>, ()> {
        let Ok(address) = normalize_address(user) else {
            return Ok(None);
        };
        match self.store.hosting_of_domain(domain_of(&address)) {
            Ok(Some(hosting)) => Ok(Some(Login { address, hosting })),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::error!(error = %Escaped(&e.to_string()), "store error during AUTH");
                Err(())
            }
        }
    }

    /// The outcome of an external backend's verdict.
    async fn conclude(
        &self,
        verdict: Verdict,
        peer: IpAddr,
        login: &str,
        ip_key: &str,
    ) -> AuthResult {
        match verdict {
            Verdict::Valid { user } => match self.session_login(&user) {
                Ok(Some(session_login)) => {
                    log_auth(AuthEvent::Success { cached: false }, peer, login);
                    AuthResult::Success(session_login)
                }
                Ok(None) => {
                    tracing::warn!(peer = %peer, login = %Escaped(login), user = %Escaped(&user), "AUTH refused: the login's domain belongs to no hosting");
                    self.failed(peer, login, ip_key, false).await
                }
                Err(()) => AuthResult::TemporaryFailure,
            },
            Verdict::Invalid => self.failed(peer, login, ip_key, false).await,
            Verdict::Unavailable(why) => {
                // Not the client's fault: not counted against it.
                tracing::error!(event = "auth_backend_unavailable", peer = %peer, error = %Escaped(&why), "AUTH: the password backend did not answer");
                AuthResult::BackendUnavailable
            }
        }
    }

    /// `backend = "passwd-file"`: the file's hash is verified here, on the
    /// blocking pool under the hashing limit, with the success cache keyed
    /// to that hash (a changed password invalidates it at once). An unknown
    /// login is verified against a dummy hash: it costs the same time.
    async fn with_passwd_file(
        &self,
        file: Arc<PasswdFile>,
        peer: IpAddr,
        creds: SaslCredentials,
        login: &str,
        ip_key: &str,
    ) -> AuthResult {
        let key = login.to_string();
        let entry = tokio::task::spawn_blocking(move || file.lookup(&key))
            .await
            .unwrap_or(None);
        let id = self.cache_id(login, &creds.password);
        let hash = entry.as_ref().map(|e| e.hash.as_str());
        if let Some(hit) = self.cached_for_hash(&id, hash) {
            log_auth(AuthEvent::Success { cached: true }, peer, login);
            return AuthResult::Success(hit);
        }
        let Ok(permit) = self.hashing.acquire().await else {
            return AuthResult::TemporaryFailure;
        };
        if let Some(hit) = self.cached_for_hash(&id, hash) {
            log_auth(AuthEvent::Success { cached: true }, peer, login);
            return AuthResult::Success(hit);
        }
        let password = creds.password;
        let dummy = self.dummy_phc.clone();
        let check = entry.clone();
        let verified = tokio::task::spawn_blocking(move || match check {
            Some(entry) => entry.verify(&password),
            None => {
                verify_password(&password, &dummy);
                false
            }
        })
        .await
        .unwrap_or(false);
        drop(permit);
        match (entry, verified) {
            (Some(entry), true) => match self.session_login(login) {
                Ok(Some(session_login)) => {
                    self.remember(id, session_login.clone(), entry.hash, Instant::now());
                    log_auth(AuthEvent::Success { cached: false }, peer, login);
                    AuthResult::Success(session_login)
                }
                Ok(None) => {
                    tracing::warn!(peer = %peer, login = %Escaped(login), "AUTH refused: the login's domain belongs to no hosting");
                    self.failed(peer, login, ip_key, true).await
                }
                Err(()) => AuthResult::TemporaryFailure,
            },
            (entry, _) => self.failed(peer, login, ip_key, entry.is_some()).await,
        }
    }
}

/// A poisoned lock only means another task panicked mid-update of a counter;
/// the data is still usable, and auth must keep working.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_decoding_table() {
        type Case<'a> = (&'a [u8], Option<(&'a str, &'a str)>);
        let cases: &[Case] = &[
            (b"\0user\0pass", Some(("user", "pass"))),
            (b"user\0user\0pass", Some(("user", "pass"))),
            (b"other\0user\0pass", None),
            (b"\0\0pass", None),
            (b"\0user", None),
            (b"\0user\0pass\0extra", None),
            (b"", None),
            (b"\0user\0", Some(("user", ""))),
            (b"\0us\xffer\0pass", None),
        ];
        for (raw, expect) in cases {
            let got = SaslCredentials::from_plain(raw);
            let got = got
                .as_ref()
                .map(|c| (c.login.as_str(), c.password.as_str()));
            assert_eq!(got, *expect, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    /// What `f` logs through tracing's fmt subscriber (the relay's format).
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                lock(&self.0).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8_lossy(&lock(&buf.0)).into_owned()
    }

    /// SPEC §4: a CR/LF in the SASL user name cannot start a log line.
    #[test]
    fn every_auth_outcome_logs_a_hostile_login_on_one_line() {
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let hostile = login_key("x\r\nevent=auth_success login=fake\u{1b}[2k");
        for event in [
            AuthEvent::RateLimited,
            AuthEvent::Success { cached: true },
            AuthEvent::Failure { known_login: false },
        ] {
            let log = logged(|| log_auth(event, peer, &hostile));
            assert_eq!(log.lines().count(), 1, "{event:?}: {log:?}");
            assert!(log.ends_with('\n'), "{event:?}: {log:?}");
            assert!(
                !log.trim_end_matches('\n').contains(['\r', '\n', '\u{1b}']),
                "{event:?}: {log:?}"
            );
            assert!(
                log.contains("login=x\\r\\nevent=auth_success login=fake\\u{1b}[2k"),
                "{event:?}: {log:?}"
            );
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let c = SaslCredentials {
            login: "a".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn failure_counter_blocks_within_the_window_only() {
        let mut c = FailureCounter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            c.record("k", t0);
        }
        assert!(!c.blocked("k", t0));
        c.record("k", t0);
        assert!(c.blocked("k", t0));
        assert!(!c.blocked("other", t0));
        assert!(!c.blocked("k", t0 + Duration::from_secs(11)));
        // A failure after the window starts a new count.
        c.record("k", t0 + Duration::from_secs(11));
        assert!(!c.blocked("k", t0 + Duration::from_secs(11)));
    }

    #[test]
    fn hashes_are_argon2id_and_verify() {
        let phc = hash_password("secret").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(verify_password("secret", &phc));
        assert!(!verify_password("Secret", &phc));
        assert!(!verify_password("secret", "not a phc string"));
    }
}
