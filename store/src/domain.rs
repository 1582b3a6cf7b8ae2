//! Authorized domains: external domains a hosting asked to send for, and their
//! verification state (SPEC §2).

use crate::hosting::{hosting_key, no_hosting};
use crate::names::normalize_domain;
use crate::{
    Result, Store, StoreError, abort, decode, decode_str, encode, key2, prefix, tx, tx_result,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use std::fmt;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DomainStatus {
    /// Added, TXT record not found yet.
    Pending,
    /// The TXT record was found; accounts of the domain may be used as senders.
    Verified,
    /// Never verified within the pending expiry, or verified and then lost past the grace
    /// period. Its accounts are kept but unusable until it is verified again.
    Failed,
}

impl fmt::Display for DomainStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainStatus::Pending => "pending",
            DomainStatus::Verified => "verified",
            DomainStatus::Failed => "failed",
        })
    }
}

/// One hosting's claim on an external domain. Several hostings may claim the same domain,
/// each with its own record and token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthorizedDomain {
    pub hosting: String,
    pub domain: String,
    /// The value the TXT record must hold.
    pub token: String,
    pub status: DomainStatus,
    pub created_at: DateTime<Utc>,
    pub verified_at: Option<DateTime<Utc>>,
    pub last_check: Option<DateTime<Utc>>,
    /// The human reason of the last check that did not verify ("not found", "mismatch: …").
    pub last_error: Option<String>,
    /// Start of the grace clock of a verified domain whose record is gone (SPEC §2.6).
    pub record_missing_since: Option<DateTime<Utc>>,
    /// Per-server answers and SPF/DMARC advice of the last check (SPEC §9); absent in
    /// records written before it existed.
    #[serde(default)]
    pub dns_report: crate::DnsReport,
}

/// A TXT record holds strings of at most 255 bytes (RFC 1035 §3.3.14); the verifier trims
/// whitespace and one pair of quotes from what it finds, so a token must contain neither.
fn check_token(token: &str) -> Result<()> {
    let ok = !token.is_empty()
        && token.len() <= 255
        && token.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid verification token {token:?}: 1 to 255 printable ASCII characters without spaces or quotes"
        )))
    }
}

fn not_authorized(hosting: &str, domain: &str) -> StoreError {
    StoreError::NotFound(format!(
        "{domain} is not an authorized domain of hosting {hosting}"
    ))
}

impl Store {
    /// Adds `domain` to the hosting's list as pending, with the token the TXT record must
    /// hold. A domain hosted here (the own domain of any hosting) is refused: its owner
    /// sends from it natively, and another tenant must not claim it through DNS it does not
    /// run.
    pub fn add_domain(&self, hosting: &str, domain: &str, token: &str) -> Result<AuthorizedDomain> {
        let hosting = hosting_key(hosting);
        let domain = normalize_domain(domain)?;
        check_token(token)?;
        let record = AuthorizedDomain {
            hosting: hosting.clone(),
            domain: domain.clone(),
            token: token.to_string(),
            status: DomainStatus::Pending,
            created_at: Utc::now(),
            verified_at: None,
            last_check: None,
            last_error: None,
            record_missing_since: None,
            dns_report: crate::DnsReport::default(),
        };
        let key = key2(&hosting, &domain);
        let value = encode(&record);
        tx_result(
            (&self.hostings, &self.own_domains, &self.domains).transaction(
                |(hostings, own_domains, domains)| {
                    if hostings.get(&hosting)?.is_none() {
                        return abort(no_hosting(&hosting));
                    }
                    if let Some(owner) = own_domains.get(&domain)? {
                        let owner = tx(decode_str(format_args!("owner of {domain}"), &owner))?;
                        // Another tenant's name is not shown to this one.
                        let whose = if owner == hosting {
                            format!("hosting {hosting}")
                        } else {
                            "another hosting".to_string()
                        };
                        return abort(StoreError::Conflict(format!(
                            "{domain} is an own domain of {whose}"
                        )));
                    }
                    if domains.get(key.as_slice())?.is_some() {
                        return abort(StoreError::Conflict(format!(
                            "{domain} is already an authorized domain of hosting {hosting}"
                        )));
                    }
                    domains.insert(key.as_slice(), value.as_slice())?;
                    Ok(())
                },
            ),
        )?;
        Ok(record)
    }

    /// The hosting's record for `domain`; an invalid domain has none.
    pub fn domain(&self, hosting: &str, domain: &str) -> Result<Option<AuthorizedDomain>> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(None);
        };
        let hosting = hosting_key(hosting);
        self.domains
            .get(key2(&hosting, &domain))?
            .map(|v| decode(format_args!("domain {domain} of {hosting}"), &v))
            .transpose()
    }

    /// The hosting's authorized domains, sorted by domain.
    pub fn domains(&self, hosting: &str) -> Result<Vec<AuthorizedDomain>> {
        let hosting = self.require_hosting(hosting)?;
        self.domains
            .scan_prefix(prefix(&hosting))
            .map(|entry| {
                let (key, value) = entry?;
                decode(
                    format_args!("domain {:?}", String::from_utf8_lossy(&key)),
                    &value,
                )
            })
            .collect()
    }

    /// Every authorized domain of every hosting, sorted by hosting then domain (for the
    /// background verifier).
    pub fn all_domains(&self) -> Result<Vec<AuthorizedDomain>> {
        self.domains
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                decode(
                    format_args!("domain {:?}", String::from_utf8_lossy(&key)),
                    &value,
                )
            })
            .collect()
    }

    /// Read-modify-write with compare-and-swap, retried on conflict, so a manual verify
    /// racing the background task never loses an update. Returns the new record, or
    /// `Ok(None)` if the domain no longer exists (deleted meanwhile): a delete is never
    /// undone by a late update. `f` may be called more than once; it cannot change the
    /// record's `hosting` or `domain` (they are its key).
    pub fn update_domain(
        &self,
        hosting: &str,
        domain: &str,
        mut f: impl FnMut(&mut AuthorizedDomain),
    ) -> Result<Option<AuthorizedDomain>> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(None);
        };
        let hosting = hosting_key(hosting);
        let key = key2(&hosting, &domain);
        loop {
            let Some(old) = self.domains.get(&key)? else {
                return Ok(None);
            };
            let mut record: AuthorizedDomain =
                decode(format_args!("domain {domain} of {hosting}"), &old)?;
            f(&mut record);
            record.hosting.clone_from(&hosting);
            record.domain.clone_from(&domain);
            let new = encode(&record);
            match self.domains.compare_and_swap(&key, Some(&old), Some(new))? {
                Ok(()) => return Ok(Some(record)),
                // Changed (or deleted) since we read it: start again from what is there.
                Err(_) => continue,
            }
        }
    }

    /// Removes the domain and all its accounts (both indexes) in one transaction. Returns
    /// how many accounts were removed.
    pub fn delete_domain(&self, hosting: &str, domain: &str) -> Result<usize> {
        let hosting = hosting_key(hosting);
        let domain = normalize_domain(domain)?;
        let key = key2(&hosting, &domain);
        // A sled transaction cannot scan, so the accounts are listed first.
        let addresses = self.account_addresses(&hosting, &domain)?;
        let mut removed = tx_result(
            (&self.domains, &self.accounts, &self.account_index).transaction(
                |(domains, accounts, index)| {
                    if domains.remove(key.as_slice())?.is_none() {
                        return abort(not_authorized(&hosting, &domain));
                    }
                    let mut removed = 0;
                    for address in &addresses {
                        if accounts.remove(key2(&hosting, address))?.is_some() {
                            removed += 1;
                        }
                        index.remove(key2(address, &hosting))?;
                    }
                    Ok(removed)
                },
            ),
        )?;
        // An account added between the listing and the transaction above (add_account
        // checked the domain before we removed it) would be left behind. Now that the
        // domain is gone no new account can appear, so one more pass finds them all.
        for address in self.account_addresses(&hosting, &domain)? {
            let gone = tx_result(
                (&self.domains, &self.accounts, &self.account_index).transaction(
                    |(domains, accounts, index)| {
                        if domains.get(key.as_slice())?.is_some() {
                            return Ok(false); // added again meanwhile: not ours to clean
                        }
                        let gone = accounts.remove(key2(&hosting, &address))?.is_some();
                        index.remove(key2(&address, &hosting))?;
                        Ok(gone)
                    },
                ),
            )?;
            removed += usize::from(gone);
        }
        // Its DKIM keys go with it (a domain added again gets new ones).
        if self.domains.get(key.as_slice())?.is_none() {
            self.dkim_keys.remove(key.as_slice())?;
        }
        Ok(removed)
    }

    /// How many accounts the hosting has in `domain`.
    pub fn account_count(&self, hosting: &str, domain: &str) -> Result<usize> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(0);
        };
        Ok(self
            .account_addresses(&hosting_key(hosting), &domain)?
            .len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{store, strings};

    fn setup() -> (tempfile::TempDir, Store) {
        let (dir, store) = store();
        store
            .add_hosting("acme", &strings(&["acme.example"]))
            .unwrap();
        store
            .add_hosting("beta", &strings(&["beta.example"]))
            .unwrap();
        (dir, store)
    }

    #[test]
    fn add_and_list() {
        let (_dir, store) = setup();
        let d = store
            .add_domain("ACME", "Partner.Example.", "tok-1")
            .unwrap();
        assert_eq!(
            (d.hosting.as_str(), d.domain.as_str()),
            ("acme", "partner.example")
        );
        assert_eq!(d.status, DomainStatus::Pending);
        assert_eq!(d.status.to_string(), "pending");
        assert_eq!(
            store.domain("acme", "partner.example").unwrap(),
            Some(d.clone())
        );
        assert_eq!(store.domain("acme", "a..b").unwrap(), None);
        assert_eq!(store.domain("beta", "partner.example").unwrap(), None);

        // The same external domain for another hosting, with its own token.
        store
            .add_domain("beta", "partner.example", "tok-2")
            .unwrap();
        store
            .add_domain("acme", "another.example", "tok-3")
            .unwrap();
        let names: Vec<_> = store
            .domains("acme")
            .unwrap()
            .into_iter()
            .map(|d| d.domain)
            .collect();
        assert_eq!(names, ["another.example", "partner.example"]);
        let all: Vec<_> = store
            .all_domains()
            .unwrap()
            .into_iter()
            .map(|d| (d.hosting, d.domain, d.token))
            .collect();
        assert_eq!(
            all,
            [
                ("acme".into(), "another.example".into(), "tok-3".into()),
                ("acme".into(), "partner.example".into(), "tok-1".into()),
                ("beta".into(), "partner.example".into(), "tok-2".into()),
            ]
        );
        assert!(matches!(
            store.domains("nobody"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn add_refusals() {
        let (_dir, store) = setup();
        store.add_domain("acme", "partner.example", "tok").unwrap();
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "nobody",
                "partner.example",
                "tok",
                "no hosting named \"nobody\"",
            ),
            (
                "acme",
                "ACME.example",
                "tok",
                "acme.example is an own domain of hosting acme",
            ),
            (
                "acme",
                "beta.example",
                "tok",
                "beta.example is an own domain of another hosting",
            ),
            (
                "acme",
                "partner.example.",
                "tok",
                "partner.example is already an authorized domain of hosting acme",
            ),
            (
                "acme",
                "a..b",
                "tok",
                "invalid domain \"a..b\": empty label",
            ),
            (
                "acme",
                "x.example",
                "has space",
                "invalid verification token",
            ),
            ("acme", "x.example", "", "invalid verification token"),
        ];
        for (hosting, domain, token, want) in cases {
            let err = store.add_domain(hosting, domain, token).unwrap_err();
            let kind_ok = match &err {
                StoreError::NotFound(_) => want.starts_with("no hosting"),
                StoreError::Conflict(_) => want.contains(" is "),
                StoreError::Invalid(_) => want.starts_with("invalid"),
                _ => false,
            };
            let msg = err.to_string();
            assert!(kind_ok && msg.starts_with(want), "{domain}: {err:?}");
        }
    }

    #[test]
    fn update_is_compare_and_swap_and_keeps_the_key() {
        let (_dir, store) = setup();
        store.add_domain("acme", "partner.example", "tok").unwrap();
        let now = Utc::now();
        let mut calls = 0;
        let d = store
            .update_domain("acme", "Partner.example", |d| {
                calls += 1;
                d.status = DomainStatus::Verified;
                d.verified_at = Some(now);
                d.domain = "hijack.example".into();
            })
            .unwrap()
            .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(d.status, DomainStatus::Verified);
        assert_eq!(d.domain, "partner.example");
        assert_eq!(store.domain("acme", "partner.example").unwrap(), Some(d));
        assert_eq!(store.domain("acme", "hijack.example").unwrap(), None);
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let (_dir, store) = setup();
        store.add_domain("acme", "partner.example", "tok").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        store
                            .update_domain("acme", "partner.example", |d| {
                                let n: u32 =
                                    d.last_error.as_deref().unwrap_or("0").parse().unwrap();
                                d.last_error = Some((n + 1).to_string());
                            })
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let d = store.domain("acme", "partner.example").unwrap().unwrap();
        assert_eq!(d.last_error.as_deref(), Some("200"));
    }

    #[test]
    fn update_after_delete_is_none() {
        let (_dir, store) = setup();
        store.add_domain("acme", "partner.example", "tok").unwrap();
        assert_eq!(store.delete_domain("acme", "partner.example").unwrap(), 0);
        let mut called = false;
        let got = store
            .update_domain("acme", "partner.example", |_| called = true)
            .unwrap();
        assert_eq!(got, None);
        assert!(!called);
        assert_eq!(store.domain("acme", "partner.example").unwrap(), None);
        assert!(matches!(
            store.delete_domain("acme", "partner.example"),
            Err(StoreError::NotFound(m)) if m == "partner.example is not an authorized domain of hosting acme"
        ));
    }
}
