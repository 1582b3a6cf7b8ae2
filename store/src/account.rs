//! Authorized accounts: addresses of a verified authorized domain that every mailbox of
//! the hosting may send as.
//!
//! Two wider grants (SPEC §9) live in the same records, so the `MAIL FROM` check stays a
//! couple of point reads:
//! - **whole domain**: the account `*@partner.example` ([`wildcard_address`]) lets every
//!   address of the domain be used. It is an ordinary record under the key
//!   `hosting\0*@partner.example`; the policy reads it when the exact address has none.
//! - **restricted**: an account with [`AuthorizedAccount::mailboxes`] may be used only by
//!   those mailboxes of the hosting (empty: by every mailbox). Records written before
//!   this field existed load as unrestricted.

use crate::domain::{AuthorizedDomain, DomainStatus};
use crate::hosting::{Hosting, hosting_key, no_hosting};
use crate::names::{domain_of, normalize_address, normalize_domain};
use crate::{
    Result, Store, StoreError, abort, decode, encode, key_suffix, key2, prefix, tx, tx_result,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sled::Transactional;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthorizedAccount {
    pub hosting: String,
    pub address: String,
    /// The authorized domain it belongs to: the domain of `address`, exactly.
    pub domain: String,
    pub created_at: DateTime<Utc>,
    /// The mailboxes of the hosting that may use it, normalized and sorted; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mailboxes: Vec<String>,
}

/// The account that grants every address of `domain` (a normalized domain).
pub fn wildcard_address(domain: &str) -> String {
    format!("*@{domain}")
}

impl AuthorizedAccount {
    /// Whether this is the whole-domain grant `*@domain`.
    pub fn is_wildcard(&self) -> bool {
        self.address.starts_with("*@")
    }

    /// Whether mailbox `login` (normalized) may use this account.
    pub fn allows_mailbox(&self, login: &str) -> bool {
        self.mailboxes.is_empty() || self.mailboxes.iter().any(|m| m == login)
    }
}

impl Store {
    /// Adds an account. Its domain must be exactly (not a parent of) an authorized domain
    /// of the hosting, verified now. The domain is re-read inside the transaction so that a
    /// concurrent `delete_domain` cannot leave an account without its domain.
    pub fn add_account(&self, hosting: &str, address: &str) -> Result<AuthorizedAccount> {
        self.add_account_restricted(hosting, address, &[])
    }

    /// Adds an account that only `mailboxes` of the hosting may use (empty: every
    /// mailbox). Each must be an address in one of the hosting's own domains.
    /// `*@domain` adds the whole-domain grant.
    pub fn add_account_restricted(
        &self,
        hosting: &str,
        address: &str,
        mailboxes: &[String],
    ) -> Result<AuthorizedAccount> {
        let hosting = hosting_key(hosting);
        let address = normalize_address(address)?;
        let domain = domain_of(&address).to_string();
        let mut restricted = mailboxes
            .iter()
            .map(|m| normalize_address(m))
            .collect::<Result<Vec<_>>>()?;
        restricted.sort();
        restricted.dedup();
        let account = AuthorizedAccount {
            hosting: hosting.clone(),
            address: address.clone(),
            domain: domain.clone(),
            created_at: Utc::now(),
            mailboxes: restricted.clone(),
        };
        let value = encode(&account);
        let domain_key = key2(&hosting, &domain);
        let account_key = key2(&hosting, &address);
        let index_key = key2(&address, &hosting);
        tx_result(
            (
                &self.hostings,
                &self.domains,
                &self.accounts,
                &self.account_index,
            )
                .transaction(|(hostings, domains, accounts, index)| {
                    let Some(owner) = hostings.get(&hosting)? else {
                        return abort(no_hosting(&hosting));
                    };
                    if !restricted.is_empty() {
                        let owner: Hosting =
                            tx(decode(format_args!("hosting {hosting:?}"), &owner))?;
                        if let Some(m) = restricted
                            .iter()
                            .find(|m| !owner.domains.iter().any(|d| d == domain_of(m)))
                        {
                            return abort(StoreError::Invalid(format!(
                                "{m} is not a mailbox of hosting {hosting}: its domain is not one of the hosting's own domains"
                            )));
                        }
                    }
                    let Some(record) = domains.get(domain_key.as_slice())? else {
                        return abort(StoreError::NotFound(format!(
                            "{domain} is not an authorized domain of hosting {hosting}"
                        )));
                    };
                    let record: AuthorizedDomain = tx(decode(
                        format_args!("domain {domain} of {hosting}"),
                        &record,
                    ))?;
                    match record.status {
                        DomainStatus::Verified => {}
                        DomainStatus::Pending => {
                            return abort(StoreError::Invalid(format!(
                                "{domain} is pending verification: verify it first"
                            )));
                        }
                        DomainStatus::Failed => {
                            return abort(StoreError::Invalid(format!(
                                "{domain} failed verification: verify it again first"
                            )));
                        }
                    }
                    if accounts.get(account_key.as_slice())?.is_some() {
                        return abort(StoreError::Conflict(format!(
                            "{address} is already an account of hosting {hosting}"
                        )));
                    }
                    accounts.insert(account_key.as_slice(), value.as_slice())?;
                    index.insert(index_key.as_slice(), &[][..])?;
                    Ok(())
                }),
        )?;
        Ok(account)
    }

    /// The hosting's account for `address` (one `get`: this runs on every `MAIL FROM`).
    /// An invalid address has none. The caller still checks the domain's status.
    pub fn account(&self, hosting: &str, address: &str) -> Result<Option<AuthorizedAccount>> {
        let Ok(address) = normalize_address(address) else {
            return Ok(None);
        };
        let hosting = hosting_key(hosting);
        self.accounts
            .get(key2(&hosting, &address))?
            .map(|v| decode(format_args!("account {address} of {hosting}"), &v))
            .transpose()
    }

    /// The hosting's accounts, optionally of one domain, sorted by address.
    pub fn accounts(&self, hosting: &str, domain: Option<&str>) -> Result<Vec<AuthorizedAccount>> {
        let hosting = self.require_hosting(hosting)?;
        let domain = domain.map(normalize_domain).transpose()?;
        let mut out = Vec::new();
        for entry in self.accounts.scan_prefix(prefix(&hosting)) {
            let (key, value) = entry?;
            let address = key_suffix(&key)?;
            if domain.as_deref().is_some_and(|d| d != domain_of(address)) {
                continue;
            }
            out.push(decode(
                format_args!("account {address} of {hosting}"),
                &value,
            )?);
        }
        Ok(out)
    }

    /// The hostings that list `address` as an account, sorted (a prefix scan of
    /// `account_index`).
    pub fn hostings_with_account(&self, address: &str) -> Result<Vec<String>> {
        let Ok(address) = normalize_address(address) else {
            return Ok(Vec::new());
        };
        self.account_index
            .scan_prefix(prefix(&address))
            .map(|entry| Ok(key_suffix(&entry?.0)?.to_string()))
            .collect()
    }

    /// Removes the account from both indexes in one transaction.
    pub fn delete_account(&self, hosting: &str, address: &str) -> Result<()> {
        let hosting = hosting_key(hosting);
        let address = normalize_address(address)?;
        let account_key = key2(&hosting, &address);
        let index_key = key2(&address, &hosting);
        tx_result(
            (&self.accounts, &self.account_index).transaction(|(accounts, index)| {
                if accounts.remove(account_key.as_slice())?.is_none() {
                    return abort(StoreError::NotFound(format!(
                        "{address} is not an account of hosting {hosting}"
                    )));
                }
                index.remove(index_key.as_slice())?;
                Ok(())
            }),
        )
    }

    /// Addresses of the hosting's accounts in `domain` (normalized arguments), from the
    /// keys alone.
    pub(crate) fn account_addresses(&self, hosting: &str, domain: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in self.accounts.scan_prefix(prefix(hosting)) {
            let (key, _) = entry?;
            let address = key_suffix(&key)?;
            if domain_of(address) == domain {
                out.push(address.to_string());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{store, strings};

    fn verify(store: &Store, hosting: &str, domain: &str) {
        store
            .update_domain(hosting, domain, |d| d.status = DomainStatus::Verified)
            .unwrap()
            .unwrap();
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let (dir, store) = store();
        store
            .add_hosting("acme", &strings(&["acme.example"]))
            .unwrap();
        store
            .add_hosting("beta", &strings(&["beta.example"]))
            .unwrap();
        store.add_domain("acme", "partner.example", "tok").unwrap();
        (dir, store)
    }

    #[test]
    fn only_in_a_verified_domain() {
        let (_dir, store) = setup();
        let refused =
            |hosting: &str, address: &str| store.add_account(hosting, address).unwrap_err();

        assert!(matches!(
            refused("acme", "sales@partner.example"),
            StoreError::Invalid(m) if m == "partner.example is pending verification: verify it first"
        ));
        assert!(matches!(
            refused("acme", "sales@other.example"),
            StoreError::NotFound(m) if m == "other.example is not an authorized domain of hosting acme"
        ));
        assert!(matches!(
            refused("nobody", "sales@partner.example"),
            StoreError::NotFound(_)
        ));
        assert!(matches!(
            refused("acme", "not-an-address"),
            StoreError::Invalid(_)
        ));

        verify(&store, "acme", "partner.example");
        // Exactly the domain: a subdomain is not covered.
        assert!(matches!(
            refused("acme", "x@sub.partner.example"),
            StoreError::NotFound(_)
        ));
        // Another hosting's verified domain does not count.
        assert!(matches!(
            refused("beta", "sales@partner.example"),
            StoreError::NotFound(_)
        ));

        let a = store
            .add_account("ACME", "<Sales@Partner.example>")
            .unwrap();
        assert_eq!(
            (a.hosting.as_str(), a.address.as_str(), a.domain.as_str()),
            ("acme", "sales@partner.example", "partner.example")
        );
        assert_eq!(
            store.account("acme", "SALES@partner.example").unwrap(),
            Some(a)
        );
        assert_eq!(
            store.account("beta", "sales@partner.example").unwrap(),
            None
        );
        assert_eq!(store.account("acme", "garbage").unwrap(), None);
        assert!(matches!(
            refused("acme", "sales@partner.example"),
            StoreError::Conflict(m) if m == "sales@partner.example is already an account of hosting acme"
        ));

        store
            .update_domain("acme", "partner.example", |d| {
                d.status = DomainStatus::Failed
            })
            .unwrap();
        assert!(matches!(
            refused("acme", "info@partner.example"),
            StoreError::Invalid(m) if m.contains("failed verification")
        ));
        // Existing accounts of a failed domain are kept.
        assert!(
            store
                .account("acme", "sales@partner.example")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn wildcard_and_restricted_accounts() {
        let (_dir, store) = setup();
        verify(&store, "acme", "partner.example");
        let all = store.add_account("acme", "*@Partner.example").unwrap();
        assert_eq!(all.address, "*@partner.example");
        assert!(all.is_wildcard() && all.allows_mailbox("anyone@acme.example"));
        assert_eq!(
            store
                .account("acme", &wildcard_address("partner.example"))
                .unwrap(),
            Some(all)
        );
        let m = |v: &[&str]| strings(v);
        let sales = store
            .add_account_restricted(
                "acme",
                "sales@partner.example",
                &m(&[
                    "Info@acme.example",
                    "boss@acme.example",
                    "info@acme.example",
                ]),
            )
            .unwrap();
        assert_eq!(sales.mailboxes, ["boss@acme.example", "info@acme.example"]);
        assert!(!sales.is_wildcard());
        assert!(sales.allows_mailbox("info@acme.example"));
        assert!(!sales.allows_mailbox("other@acme.example"));
        assert_eq!(
            store
                .account("acme", "sales@partner.example")
                .unwrap()
                .unwrap()
                .mailboxes,
            ["boss@acme.example", "info@acme.example"]
        );
        // A mailbox of another hosting (or no mailbox address at all) is refused.
        assert!(matches!(
            store.add_account_restricted("acme", "x@partner.example", &m(&["bob@beta.example"])),
            Err(StoreError::Invalid(e)) if e.contains("not a mailbox of hosting acme")
        ));
        assert!(matches!(
            store.add_account_restricted("acme", "x@partner.example", &m(&["nope"])),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.account("acme", "x@partner.example").unwrap(), None);
        // A record written before `mailboxes` existed loads as unrestricted.
        let old: AuthorizedAccount = serde_json::from_str(
            r#"{"hosting":"acme","address":"a@partner.example","domain":"partner.example","created_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert!(old.mailboxes.is_empty() && old.allows_mailbox("x@acme.example"));
        // Unrestricted records are written as before.
        assert!(
            !String::from_utf8(encode(&old))
                .unwrap()
                .contains("mailboxes")
        );
    }

    #[test]
    fn list_index_and_delete() {
        let (_dir, store) = setup();
        store.add_domain("acme", "second.example", "tok").unwrap();
        store.add_domain("beta", "partner.example", "tok").unwrap();
        verify(&store, "acme", "partner.example");
        verify(&store, "acme", "second.example");
        verify(&store, "beta", "partner.example");
        for (h, a) in [
            ("acme", "z@partner.example"),
            ("acme", "a@second.example"),
            ("acme", "b@partner.example"),
            ("beta", "b@partner.example"),
        ] {
            store.add_account(h, a).unwrap();
        }
        let addresses = |d: Option<&str>| -> Vec<String> {
            store
                .accounts("acme", d)
                .unwrap()
                .into_iter()
                .map(|a| a.address)
                .collect()
        };
        assert_eq!(
            addresses(None),
            ["a@second.example", "b@partner.example", "z@partner.example"]
        );
        assert_eq!(
            addresses(Some("Partner.Example")),
            ["b@partner.example", "z@partner.example"]
        );
        assert!(matches!(
            store.accounts("nobody", None),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.account_count("acme", "partner.example").unwrap(), 2);

        assert_eq!(
            store.hostings_with_account("B@partner.example").unwrap(),
            ["acme", "beta"]
        );
        assert!(
            store
                .hostings_with_account("z@partner.example.x")
                .unwrap()
                .is_empty()
        );
        // The prefix is the whole address: "b@partner.example" does not match "b@partner.examples".
        assert!(
            store
                .hostings_with_account("b@partner.exampl")
                .unwrap()
                .is_empty()
        );

        store.delete_account("acme", "B@partner.example").unwrap();
        assert_eq!(store.account("acme", "b@partner.example").unwrap(), None);
        assert_eq!(
            store.hostings_with_account("b@partner.example").unwrap(),
            ["beta"]
        );
        assert!(matches!(
            store.delete_account("acme", "b@partner.example"),
            Err(StoreError::NotFound(m)) if m == "b@partner.example is not an account of hosting acme"
        ));
    }

    #[test]
    fn delete_domain_removes_its_accounts_from_both_indexes() {
        let (_dir, store) = setup();
        store.add_domain("acme", "second.example", "tok").unwrap();
        store.add_domain("beta", "partner.example", "tok").unwrap();
        verify(&store, "acme", "partner.example");
        verify(&store, "acme", "second.example");
        verify(&store, "beta", "partner.example");
        store.add_account("acme", "a@partner.example").unwrap();
        store.add_account("acme", "b@partner.example").unwrap();
        store.add_account("acme", "c@second.example").unwrap();
        store.add_account("beta", "a@partner.example").unwrap();

        assert_eq!(store.delete_domain("acme", "partner.example").unwrap(), 2);

        assert_eq!(store.domain("acme", "partner.example").unwrap(), None);
        assert_eq!(store.account("acme", "a@partner.example").unwrap(), None);
        assert_eq!(store.account("acme", "b@partner.example").unwrap(), None);
        assert_eq!(
            store.hostings_with_account("a@partner.example").unwrap(),
            ["beta"]
        );
        assert!(
            store
                .hostings_with_account("b@partner.example")
                .unwrap()
                .is_empty()
        );
        // Other domains and other hostings are untouched.
        assert!(store.account("acme", "c@second.example").unwrap().is_some());
        assert!(
            store
                .account("beta", "a@partner.example")
                .unwrap()
                .is_some()
        );
        assert_eq!(store.account_count("acme", "partner.example").unwrap(), 0);
        // Re-adding the domain does not bring the accounts back.
        store.add_domain("acme", "partner.example", "tok2").unwrap();
        assert!(
            store
                .accounts("acme", Some("partner.example"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn concurrent_add_and_delete_leave_no_orphan() {
        for _ in 0..20 {
            let (_dir, store) = setup();
            verify(&store, "acme", "partner.example");
            let adder = {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut added = 0;
                    for i in 0..200 {
                        if store
                            .add_account("acme", &format!("u{i}@partner.example"))
                            .is_ok()
                        {
                            added += 1;
                        }
                    }
                    added
                })
            };
            std::thread::yield_now();
            let removed = store.delete_domain("acme", "partner.example").unwrap();
            let added = adder.join().unwrap();
            assert_eq!(removed, added);
            assert_eq!(store.account_count("acme", "partner.example").unwrap(), 0);
            assert_eq!(store.account_index.len(), 0);
        }
    }
}
