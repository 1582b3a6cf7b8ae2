//! The operations on a hosting's authorized domains and accounts, and the
//! sender decision: one implementation behind every face (the admin socket
//! and its CLI, the panel, the public API). A face translates its request
//! into a call with a hosting and arguments and the typed result back; the
//! hosting always comes from who is asking (the operator naming it on the
//! socket, a panel session, an API token), never from a URL alone.
//!
//! Every domain lookup is scoped by hosting, so another hosting's domain is
//! "not found" exactly like a domain that does not exist.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use domauth_store::{
    AuthorizedAccount, AuthorizedDomain, Store, StoreError, domain_of, normalize_address,
    normalize_domain,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    dkim_keys::DkimKeys, logsafe::Escaped, passwords::Backend, policy::Decision, verify::Verifier,
    verify_dns::CheckOutcome,
};

/// Why an operation did not happen, one line for the user. The faces map
/// the kind to their own vocabulary (HTTP status, page message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// Bad input: an invalid name, a refused domain.
    Invalid(String),
    /// The domain or account does not exist for this hosting.
    NotFound(String),
    /// It already exists.
    Conflict(String),
    /// The server's fault (storage, randomness).
    Internal(String),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Invalid(m)
            | OpError::NotFound(m)
            | OpError::Conflict(m)
            | OpError::Internal(m) => f.write_str(m),
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> OpError {
        match e {
            StoreError::Invalid(m) => OpError::Invalid(m),
            StoreError::NotFound(m) => OpError::NotFound(m),
            StoreError::Conflict(m) => OpError::Conflict(m),
            other => OpError::Internal(other.to_string()),
        }
    }
}

pub type OpResult<T> = Result<T, OpError>;

/// The TXT record a hosting publishes to prove it controls a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// In full: `domauthvalidation.partner.example`.
    pub name: String,
    /// The bare label, for DNS panels that append the zone themselves.
    pub label: String,
    pub value: String,
}

/// A domain as the faces show it.
#[derive(Debug, Clone)]
pub struct DomainView {
    pub domain: AuthorizedDomain,
    pub record: Record,
    /// How many authorized accounts it has.
    pub accounts: usize,
    /// The `dkim` object of `domain show --json` (state and records to publish; never
    /// a private key).
    pub dkim: Value,
}

/// What adding one address as an account came to (the panel's and the
/// API's result per address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountOutcome {
    Added,
    AlreadyListed,
    Refused(String),
}

impl AccountOutcome {
    /// The word the panel and the API use.
    pub fn word(&self) -> &'static str {
        match self {
            AccountOutcome::Added => "added",
            AccountOutcome::AlreadyListed => "already listed",
            AccountOutcome::Refused(_) => "refused",
        }
    }
}

#[derive(Clone)]
pub struct Ops {
    pub store: Store,
    pub verifier: Arc<Verifier>,
    /// Where passwords come from: `explain` finds a login's hosting by it.
    pub passwords: Backend,
    /// DKIM keys: made when a domain is added, checked with it (SPEC §9).
    pub dkim: Arc<DkimKeys>,
}

/// RFC 3339 in seconds, UTC, or null.
pub fn ts(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Secs, true)))
        .unwrap_or(Value::Null)
}

impl DomainView {
    /// The domain object of SPEC §6 (`--json`, the API).
    pub fn to_json(&self) -> Value {
        let d = &self.domain;
        let mut v = json!({
            "domain": d.domain,
            "hosting": d.hosting,
            "status": d.status.to_string(),
            "record": {
                "name": self.record.name,
                "label": self.record.label,
                "type": "TXT",
                "value": self.record.value,
            },
            "last_check": ts(d.last_check),
            "last_error": d.last_error,
            "record_missing_since": ts(d.record_missing_since),
            "created_at": ts(Some(d.created_at)),
            "verified_at": ts(d.verified_at),
            "accounts": self.accounts,
            "dkim": self.dkim,
        });
        // Which servers answered what, and the SPF/DMARC advice (as `domain show --json`).
        crate::admin::dns_report::add_json(&mut v, d);
        v
    }
}

/// The account object of SPEC §6.
pub fn account_json(a: &AuthorizedAccount) -> Value {
    json!({ "address": a.address, "domain": a.domain, "hosting": a.hosting, "created_at": ts(Some(a.created_at)) })
}

/// Splits what a user typed into addresses: one per line, or separated by
/// commas, semicolons or spaces.
pub fn split_addresses(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn not_a_domain(hosting: &str, domain: &str) -> OpError {
    OpError::NotFound(format!("{domain} is not a domain of hosting {hosting}"))
}

impl Ops {
    pub fn new(
        store: Store,
        verifier: Arc<Verifier>,
        passwords: Backend,
        dkim: Arc<DkimKeys>,
    ) -> Ops {
        Ops {
            store,
            verifier,
            passwords,
            dkim,
        }
    }

    fn view(&self, d: AuthorizedDomain) -> OpResult<DomainView> {
        let accounts = self.store.account_count(&d.hosting, &d.domain)?;
        let dkim = self
            .dkim
            .get(&d.hosting, &d.domain)
            .map_err(OpError::Internal)?;
        Ok(DomainView {
            dkim: crate::dkim_keys::dkim_json(dkim.as_ref(), self.dkim.signing_enabled),
            record: Record {
                name: self.verifier.record_name(&d.domain),
                label: self.verifier.record_label().to_string(),
                value: d.token.clone(),
            },
            accounts,
            domain: d,
        })
    }

    /// The normalised domain, or the reason it is not one.
    fn domain_key(domain: &str) -> OpResult<String> {
        Ok(normalize_domain(domain)?)
    }

    pub fn list_domains(&self, hosting: &str) -> OpResult<Vec<DomainView>> {
        self.store
            .domains(hosting)?
            .into_iter()
            .map(|d| self.view(d))
            .collect()
    }

    /// Adds the domain as pending with a fresh token and makes its DKIM keys (RSA
    /// generation runs off the async runtime).
    pub async fn add_domain(&self, hosting: &str, domain: &str) -> OpResult<DomainView> {
        let token = crate::verify::new_token().map_err(OpError::Internal)?;
        let d = self.store.add_domain(hosting, domain, &token)?;
        self.verifier.track(&d);
        crate::metrics::domain_status(None, Some(d.status));
        tracing::info!(event = "domain_added", hosting = %Escaped(&d.hosting), domain = %Escaped(&d.domain), "domain added");
        if let Err(e) = self.dkim.ensure(&d.hosting, &d.domain).await {
            // The domain is added; the background task makes the keys later.
            tracing::error!(error = %Escaped(e.as_str()), domain = %Escaped(&d.domain), "cannot make DKIM keys");
        }
        self.view(d)
    }

    pub fn domain(&self, hosting: &str, domain: &str) -> OpResult<DomainView> {
        let domain = Self::domain_key(domain)?;
        let d = self
            .store
            .domain(hosting, &domain)?
            .ok_or_else(|| not_a_domain(hosting, &domain))?;
        self.view(d)
    }

    /// Checks DNS now and stores the outcome (SPEC §2.5).
    pub async fn verify(
        &self,
        hosting: &str,
        domain: &str,
    ) -> OpResult<(DomainView, CheckOutcome)> {
        let domain = Self::domain_key(domain)?;
        let (d, outcome) = self
            .verifier
            .check(hosting, &domain)
            .await
            .map_err(OpError::Internal)?
            .ok_or_else(|| not_a_domain(hosting, &domain))?;
        // The DKIM records are checked with the validation record; their outcome is in
        // `dkim` and does not change this check's result (SPEC §2.5).
        if let Err(e) = self.dkim.check(hosting, &domain).await {
            tracing::error!(error = %Escaped(e.as_str()), domain = %Escaped(&domain), "DKIM check failed");
        }
        Ok((self.view(d)?, outcome))
    }

    /// Deletes the domain with its accounts; returns how many accounts went.
    pub fn delete_domain(&self, hosting: &str, domain: &str) -> OpResult<usize> {
        let domain = Self::domain_key(domain)?;
        let status = self.store.domain(hosting, &domain)?.map(|d| d.status);
        let accounts = self
            .store
            .delete_domain(hosting, &domain)
            .map_err(|e| match e {
                StoreError::NotFound(_) => not_a_domain(hosting, &domain),
                other => other.into(),
            })?;
        crate::metrics::domain_status(status, None);
        tracing::info!(event = "domain_deleted", hosting = %Escaped(hosting), domain = %Escaped(&domain), accounts, "domain deleted");
        Ok(accounts)
    }

    /// The hosting's accounts, of one domain or all.
    pub fn accounts(
        &self,
        hosting: &str,
        domain: Option<&str>,
    ) -> OpResult<Vec<AuthorizedAccount>> {
        if let Some(domain) = domain {
            // A domain of nobody, or of someone else, is not found.
            self.domain(hosting, domain)?;
        }
        Ok(self.store.accounts(hosting, domain)?)
    }

    pub fn add_account(&self, hosting: &str, address: &str) -> OpResult<AuthorizedAccount> {
        let a = self.store.add_account(hosting, address)?;
        tracing::info!(event = "account_added", hosting = %Escaped(hosting), account = %Escaped(&a.address), "account added");
        Ok(a)
    }

    /// Adds each address to one domain's accounts; a result per address,
    /// in the order given (duplicates once). The domain must be the
    /// hosting's.
    pub fn add_accounts_to(
        &self,
        hosting: &str,
        domain: &str,
        addresses: &[String],
    ) -> OpResult<Vec<(String, AccountOutcome)>> {
        let view = self.domain(hosting, domain)?;
        let domain = view.domain.domain;
        let mut out: Vec<(String, AccountOutcome)> = Vec::new();
        for raw in addresses {
            let (shown, outcome) = match normalize_address(raw) {
                Err(e) => (
                    raw.trim().to_string(),
                    AccountOutcome::Refused(e.to_string()),
                ),
                Ok(address) if domain_of(&address) != domain => {
                    let why = format!("not an address of {domain}");
                    (address, AccountOutcome::Refused(why))
                }
                Ok(address) => match self.add_account(hosting, &address) {
                    Ok(_) => (address, AccountOutcome::Added),
                    Err(OpError::Conflict(_)) => (address, AccountOutcome::AlreadyListed),
                    Err(OpError::Internal(e)) => return Err(OpError::Internal(e)),
                    Err(e) => (address, AccountOutcome::Refused(e.to_string())),
                },
            };
            if !out.iter().any(|(a, _)| *a == shown) {
                out.push((shown, outcome));
            }
        }
        Ok(out)
    }

    pub fn delete_account(&self, hosting: &str, address: &str) -> OpResult<()> {
        self.store.delete_account(hosting, address)?;
        tracing::info!(event = "account_deleted", hosting = %Escaped(hosting), account = %Escaped(address), "account deleted");
        Ok(())
    }

    /// Removes one account of one domain of the hosting: an address of
    /// another domain is not found there.
    pub fn delete_account_of(&self, hosting: &str, domain: &str, address: &str) -> OpResult<()> {
        let view = self.domain(hosting, domain)?;
        let missing = || {
            OpError::NotFound(format!(
                "{} is not an account of {}",
                address.trim(),
                view.domain.domain
            ))
        };
        let address = normalize_address(address).map_err(|_| missing())?;
        if domain_of(&address) != view.domain.domain {
            return Err(missing());
        }
        self.delete_account(hosting, &address).map_err(|e| match e {
            OpError::NotFound(_) => missing(),
            other => other,
        })
    }

    /// The hosting's panel password hash (Argon2id PHC), if the hosting
    /// exists and has one. The caller verifies it off the runtime.
    pub fn hosting_password_hash(&self, hosting: &str) -> OpResult<Option<String>> {
        Ok(self.store.hosting(hosting)?.and_then(|h| h.password_hash))
    }

    /// The hosting's mailboxes (their addresses), for "Check a sender".
    pub fn mailboxes(&self, hosting: &str) -> OpResult<Vec<String>> {
        Ok(self
            .store
            .mailboxes(Some(hosting))?
            .into_iter()
            .map(|m| m.address)
            .collect())
    }

    /// `domauth explain` for the operator: any login.
    pub fn explain(&self, login: &str, sender: &str) -> Decision {
        crate::passwords::explain(&self.passwords, &self.store, login, sender)
    }

    /// The sender decision as one hosting may see it: only its own
    /// mailboxes, and nothing about other hostings' data (a mailbox or an
    /// account of another hosting reads like one that does not exist).
    pub fn explain_for(&self, hosting: &str, login: &str, sender: &str) -> Decision {
        let refuse = |reason: String| Decision {
            allowed: false,
            reason,
        };
        let Ok(address) = normalize_address(login) else {
            return self.explain(login, sender);
        };
        // The login's hosting: its mailbox's, or with an outside password
        // backend the owner of its domain.
        let owner = match &self.passwords {
            Backend::Store => self.store.mailbox(&address).map(|m| m.map(|m| m.hosting)),
            _ => self.store.hosting_of_domain(domain_of(&address)),
        };
        match owner {
            Ok(Some(h)) if h == hosting => {}
            Ok(_) => {
                return refuse(format!(
                    "unknown login {address}: no such mailbox of hosting {hosting}"
                ));
            }
            Err(e) => return refuse(format!("store error: {e}")),
        }
        let d = self.explain(&address, sender);
        if d.reason.contains("another hosting") {
            let sender = normalize_address(sender).unwrap_or_else(|_| sender.to_string());
            return refuse(format!(
                "{sender} is unknown: {} is not an authorized domain of hosting {hosting}",
                domain_of(&sender)
            ));
        }
        d
    }

    /// Makes an API token for the hosting: `dat_<id>_<secret>`, the id and
    /// 256 bits of secret from the OS; only the secret's SHA-256 is kept.
    /// The token is shown once.
    pub fn issue_token(&self, hosting: &str) -> OpResult<String> {
        let id = random_hex(8)?;
        let secret = random_hex(32)?;
        self.store
            .add_api_token(&id, hosting, &hex(&Sha256::digest(secret.as_bytes())))?;
        tracing::info!(event = "api_token_issued", hosting = %Escaped(hosting), id = %id, "API token issued");
        Ok(format!("dat_{id}_{secret}"))
    }

    /// Invalidates every token of the hosting; how many there were.
    pub fn revoke_tokens(&self, hosting: &str) -> OpResult<usize> {
        let n = self.store.revoke_api_tokens(hosting)?;
        tracing::info!(event = "api_tokens_revoked", hosting = %Escaped(hosting), count = n, "API tokens revoked");
        Ok(n)
    }

    /// The hosting a bearer token belongs to, or None for any bad token.
    /// The secret's hash is compared in constant time.
    pub fn hosting_of_token(&self, token: &str) -> OpResult<Option<String>> {
        let Some((id, secret)) = token
            .strip_prefix("dat_")
            .and_then(|rest| rest.split_once('_'))
        else {
            return Ok(None);
        };
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let Some(stored) = self.store.api_token(id)? else {
            return Ok(None);
        };
        let given = hex(&Sha256::digest(secret.as_bytes()));
        let same: bool = given.as_bytes().ct_eq(stored.secret_hash.as_bytes()).into();
        Ok(same.then_some(stored.hosting))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` bytes from the OS's secure random source, as hex.
pub fn random_hex(n: usize) -> OpResult<String> {
    use rand::TryRngCore;
    let mut bytes = vec![0u8; n];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| OpError::Internal(format!("no OS randomness: {e}")))?;
    Ok(hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_on_lines_commas_and_spaces() {
        assert_eq!(
            split_addresses("a@x.example\r\nb@x.example, c@x.example;d@x.example  e@x.example\n\n"),
            [
                "a@x.example",
                "b@x.example",
                "c@x.example",
                "d@x.example",
                "e@x.example"
            ]
        );
        assert!(split_addresses(" \n , ").is_empty());
    }

    fn ops() -> (tempfile::TempDir, Ops) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let dns = crate::verify_dns::DnsChecker::new(
            &["127.0.0.1:9".parse().expect("addr")],
            std::time::Duration::from_secs(1),
        )
        .expect("dns");
        let verifier = Verifier::new(store.clone(), dns.clone(), Default::default());
        let dkim = DkimKeys::new(store.clone(), dns, Default::default(), true);
        for (h, d) in [("acme", "acme.test"), ("beta", "beta.test")] {
            store.add_hosting(h, &[d.to_string()]).expect("hosting");
            store
                .add_mailbox(&format!("info@{d}"), "$argon2id$x")
                .expect("mailbox");
        }
        (dir, Ops::new(store, verifier, Backend::Store, dkim))
    }

    fn verify_now(ops: &Ops, hosting: &str, domain: &str) {
        ops.store
            .update_domain(hosting, domain, |d| {
                d.status = domauth_store::DomainStatus::Verified
            })
            .expect("update");
    }

    #[test]
    fn tokens_issue_check_revoke() {
        let (_dir, ops) = ops();
        let t = ops.issue_token("acme").unwrap();
        assert!(t.starts_with("dat_") && t.len() >= 4 + 16 + 1 + 64, "{t}");
        assert_eq!(ops.hosting_of_token(&t).unwrap().as_deref(), Some("acme"));
        let last = if t.ends_with('0') { '1' } else { '0' };
        let tampered = format!("{}{last}", &t[..t.len() - 1]);
        for bad in [
            tampered.as_str(),
            "",
            "dat_",
            "dat__",
            "dat_zz_00",
            &t[4..],
            &t.replace("dat_", "dat_x"),
        ] {
            assert_eq!(ops.hosting_of_token(bad).unwrap(), None, "{bad:?}");
        }
        assert!(matches!(
            ops.issue_token("nobody"),
            Err(OpError::NotFound(_))
        ));
        assert_eq!(ops.revoke_tokens("acme").unwrap(), 1);
        assert_eq!(ops.hosting_of_token(&t).unwrap(), None);
    }

    #[tokio::test]
    async fn accounts_per_address_within_one_domain() {
        let (_dir, ops) = ops();
        ops.add_domain("acme", "partner.example").await.unwrap();
        let pending = ops
            .add_accounts_to("acme", "partner.example", &["a@partner.example".into()])
            .unwrap();
        assert!(matches!(&pending[0].1, AccountOutcome::Refused(w) if w.contains("pending")));
        verify_now(&ops, "acme", "partner.example");
        let input: Vec<String> = [
            "A@Partner.Example",
            "a@partner.example",
            "x@other.example",
            "bad",
        ]
        .map(String::from)
        .to_vec();
        let out = ops
            .add_accounts_to("acme", "partner.example", &input)
            .unwrap();
        let words: Vec<(&str, &str)> = out.iter().map(|(a, o)| (a.as_str(), o.word())).collect();
        assert_eq!(
            words,
            [
                ("a@partner.example", "added"),
                ("x@other.example", "refused"),
                ("bad", "refused"),
            ]
        );
        let again = ops
            .add_accounts_to("acme", "partner.example", &["a@partner.example".into()])
            .unwrap();
        assert_eq!(again[0].1, AccountOutcome::AlreadyListed);
        // Another hosting's domain is not found, exactly like none.
        for d in ["partner.example", "ghost.example"] {
            assert!(matches!(ops.domain("beta", d), Err(OpError::NotFound(_))));
            assert!(matches!(
                ops.add_accounts_to("beta", d, &input),
                Err(OpError::NotFound(_))
            ));
            assert!(matches!(
                ops.delete_account_of("beta", d, "a@partner.example"),
                Err(OpError::NotFound(_))
            ));
            assert!(matches!(
                ops.delete_domain("beta", d),
                Err(OpError::NotFound(_))
            ));
        }
        assert!(matches!(
            ops.delete_account_of("acme", "partner.example", "info@acme.test"),
            Err(OpError::NotFound(_))
        ));
        ops.delete_account_of("acme", "partner.example", "A@partner.example")
            .unwrap();
        assert_eq!(ops.domain("acme", "partner.example").unwrap().accounts, 0);
    }

    #[tokio::test]
    async fn explain_for_one_hosting_says_nothing_of_the_others() {
        let (_dir, ops) = ops();
        ops.add_domain("beta", "partner.example").await.unwrap();
        verify_now(&ops, "beta", "partner.example");
        ops.add_account("beta", "sales@partner.example").unwrap();
        // The operator hears the truth...
        let d = ops.explain("info@acme.test", "sales@partner.example");
        assert!(d.reason.contains("another hosting"), "{}", d.reason);
        // ...acme hears only about itself.
        let d = ops.explain_for("acme", "info@acme.test", "sales@partner.example");
        assert!(!d.allowed);
        assert!(!d.reason.contains("another"), "{}", d.reason);
        let foreign = ops.explain_for("acme", "info@beta.test", "sales@partner.example");
        let unknown = ops.explain_for("acme", "nobody@acme.test", "sales@partner.example");
        assert!(!foreign.allowed && !unknown.allowed);
        assert_eq!(
            foreign.reason.replace("info@beta.test", "X"),
            unknown.reason.replace("nobody@acme.test", "X")
        );
        assert!(
            ops.explain_for("beta", "info@beta.test", "sales@partner.example")
                .allowed
        );
    }

    #[test]
    fn random_hex_is_random() {
        let a = random_hex(32).unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_hex(32).unwrap());
    }
}
