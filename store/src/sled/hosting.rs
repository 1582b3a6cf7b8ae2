//! Hostings (tenants) and the index of their own domains.

use super::{
    Result, SledStore as Store, StoreError, abort, decode, decode_str, encode, tx, tx_result,
};
use crate::names::{normalize_domain, normalize_hosting_name};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sled::Transactional;

/// A tenant: a customer's hosting plan, with the domains it hosts here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hosting {
    pub name: String,
    /// Own domains, normalized, in the order given at creation.
    pub domains: Vec<String>,
    /// Argon2id PHC string of the dashboard password; `None` until one is set.
    pub password_hash: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Creates a hosting with its own domains. A domain is the own domain of at most one
    /// hosting, because a mailbox's hosting is found from its address's domain.
    pub fn add_hosting(&self, name: &str, domains: &[String]) -> Result<Hosting> {
        let name = normalize_hosting_name(name)?;
        let mut own = Vec::with_capacity(domains.len());
        for d in domains {
            let d = normalize_domain(d)?;
            if !own.contains(&d) {
                own.push(d);
            }
        }
        if own.is_empty() {
            return Err(StoreError::Invalid(format!(
                "hosting {name:?} needs at least one domain"
            )));
        }
        let hosting = Hosting {
            name: name.clone(),
            domains: own,
            password_hash: None,
            created_at: Utc::now(),
        };
        let value = encode(&hosting);
        tx_result(
            (&self.hostings, &self.own_domains).transaction(|(hostings, index)| {
                if hostings.get(&name)?.is_some() {
                    return abort(StoreError::Conflict(format!(
                        "hosting {name:?} already exists"
                    )));
                }
                for d in &hosting.domains {
                    if let Some(owner) = index.get(d)? {
                        let owner = tx(decode_str(format!("owner of {d}"), &owner))?;
                        return abort(StoreError::Conflict(format!(
                            "{d} is an own domain of hosting {owner}"
                        )));
                    }
                    index.insert(d.as_bytes(), name.as_bytes())?;
                }
                hostings.insert(name.as_bytes(), value.as_slice())?;
                Ok(())
            }),
        )?;
        Ok(hosting)
    }

    /// The hosting named `name` (any case), if it exists.
    pub fn hosting(&self, name: &str) -> Result<Option<Hosting>> {
        let name = hosting_key(name);
        self.hostings
            .get(&name)?
            .map(|v| decode(format_args!("hosting {name:?}"), &v))
            .transpose()
    }

    /// All hostings, sorted by name.
    pub fn hostings(&self) -> Result<Vec<Hosting>> {
        self.hostings
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                decode(
                    format_args!("hosting {:?}", String::from_utf8_lossy(&key)),
                    &value,
                )
            })
            .collect()
    }

    /// The name of the hosting whose own domain `domain` is. An invalid domain is owned by
    /// no one.
    pub fn hosting_of_domain(&self, domain: &str) -> Result<Option<String>> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(None);
        };
        self.own_domains
            .get(&domain)?
            .map(|v| decode_str(format_args!("owner of {domain}"), &v))
            .transpose()
    }

    /// Sets the dashboard password (an Argon2id PHC string, hashed by the caller).
    pub fn set_hosting_password(&self, name: &str, phc: &str) -> Result<()> {
        let name = hosting_key(name);
        tx_result(self.hostings.transaction(|hostings| {
            let Some(value) = hostings.get(&name)? else {
                return abort(no_hosting(&name));
            };
            let mut hosting: Hosting = tx(decode(format_args!("hosting {name:?}"), &value))?;
            hosting.password_hash = Some(phc.to_string());
            hostings.insert(name.as_bytes(), encode(&hosting))?;
            Ok(())
        }))
    }

    /// Fails with `NotFound` unless the hosting exists; returns its key.
    pub(crate) fn require_hosting(&self, name: &str) -> Result<String> {
        let key = hosting_key(name);
        if self.hostings.contains_key(&key)? {
            Ok(key)
        } else {
            Err(no_hosting(&key))
        }
    }
}

/// The key a hosting name is looked up by. Lookups do not validate: a name that could not
/// have been created simply is not found.
pub(crate) fn hosting_key(name: &str) -> String {
    name.trim().to_lowercase()
}

pub(crate) fn no_hosting(name: &str) -> StoreError {
    StoreError::NotFound(format!("no hosting named {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled::test_util::{store, strings};

    #[test]
    fn add_and_read_back() {
        let (_dir, store) = store();
        let h = store
            .add_hosting(
                " Acme ",
                &strings(&["ACME.example.", "acme.example", "bücher.example"]),
            )
            .unwrap();
        assert_eq!(h.name, "acme");
        assert_eq!(
            h.domains,
            strings(&["acme.example", "xn--bcher-kva.example"])
        );
        assert_eq!(h.password_hash, None);
        assert_eq!(store.hosting("ACME").unwrap(), Some(h.clone()));
        assert_eq!(
            store.hosting_of_domain("Acme.Example").unwrap().as_deref(),
            Some("acme")
        );
        assert_eq!(
            store
                .hosting_of_domain("bücher.example")
                .unwrap()
                .as_deref(),
            Some("acme")
        );
        assert_eq!(store.hosting_of_domain("other.example").unwrap(), None);
        assert_eq!(store.hosting_of_domain("a..b").unwrap(), None);
        assert_eq!(store.hosting("nobody").unwrap(), None);
    }

    #[test]
    fn own_domain_belongs_to_one_hosting() {
        let (_dir, store) = store();
        store
            .add_hosting("acme", &strings(&["acme.example"]))
            .unwrap();
        let err = store
            .add_hosting("beta", &strings(&["beta.example", "ACME.example"]))
            .unwrap_err();
        match err {
            StoreError::Conflict(m) => {
                assert_eq!(m, "acme.example is an own domain of hosting acme")
            }
            other => panic!("{other:?}"),
        }
        // The aborted transaction wrote nothing: neither the hosting nor beta.example.
        assert_eq!(store.hosting("beta").unwrap(), None);
        assert_eq!(store.hosting_of_domain("beta.example").unwrap(), None);
        store
            .add_hosting("beta", &strings(&["beta.example"]))
            .unwrap();
    }

    #[test]
    fn refusals() {
        let (_dir, store) = store();
        store
            .add_hosting("acme", &strings(&["acme.example"]))
            .unwrap();
        assert!(matches!(
            store.add_hosting("ACME", &strings(&["other.example"])),
            Err(StoreError::Conflict(m)) if m == "hosting \"acme\" already exists"
        ));
        assert!(matches!(
            store.add_hosting("x", &[]),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_hosting("a b", &strings(&["x.example"])),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.add_hosting("x", &strings(&["a..b"])),
            Err(StoreError::Invalid(m)) if m == "invalid domain \"a..b\": empty label"
        ));
    }

    #[test]
    fn list_sorted_and_password() {
        let (_dir, store) = store();
        for name in ["zeta", "acme", "mid"] {
            store
                .add_hosting(name, &[format!("{name}.example")])
                .unwrap();
        }
        let names: Vec<_> = store
            .hostings()
            .unwrap()
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["acme", "mid", "zeta"]);

        store.set_hosting_password("Acme", "$argon2id$x").unwrap();
        let h = store.hosting("acme").unwrap().unwrap();
        assert_eq!(h.password_hash.as_deref(), Some("$argon2id$x"));
        assert!(matches!(
            store.set_hosting_password("nobody", "x"),
            Err(StoreError::NotFound(m)) if m == "no hosting named \"nobody\""
        ));
    }
}
