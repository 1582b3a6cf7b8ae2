//! DKIM signing keys of authorized domains (SPEC §9): per hosting and domain, one or
//! more generations of an Ed25519 + RSA key pair, each with its own selectors and the
//! state of its DNS records. The store keeps bytes only; making keys, the record text and
//! signing are the relay's (`relay/src/dkim*.rs`).
//!
//! Private keys are kept here and nowhere else: [`DkimKeySet`]'s `Debug` leaves them out,
//! and nothing that builds JSON for a user reads them.

use super::hosting::hosting_key;
use super::{Result, SledStore as Store, decode, encode, key2};
use crate::names::normalize_domain;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The state of a key set's DNS records.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DkimStatus {
    /// Not (yet) found in DNS: no signing with this key set.
    Pending,
    /// Both records found with the right keys: messages may be signed with it.
    Verified,
    /// Verified once and then gone or changed, or never found within the pending expiry.
    Failed,
}

impl fmt::Display for DkimStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DkimStatus::Pending => "pending",
            DkimStatus::Verified => "verified",
            DkimStatus::Failed => "failed",
        })
    }
}

/// One generation of keys: an Ed25519 and an RSA pair, a selector each.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct DkimKeySet {
    /// 1 for the keys made with the domain, +1 at every rotation.
    pub generation: u32,
    pub ed25519_selector: String,
    pub rsa_selector: String,
    /// PKCS#8 DER, base64.
    pub ed25519_private: String,
    /// The raw 32-byte public key, base64 (the `p=` of RFC 8463).
    pub ed25519_public: String,
    /// PKCS#1 DER, base64.
    pub rsa_private: String,
    /// SubjectPublicKeyInfo DER, base64 (the `p=` of RFC 6376).
    pub rsa_public: String,
    pub created_at: DateTime<Utc>,
    pub status: DkimStatus,
    pub last_check: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub verified_at: Option<DateTime<Utc>>,
}

impl fmt::Debug for DkimKeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkimKeySet")
            .field("generation", &self.generation)
            .field("ed25519_selector", &self.ed25519_selector)
            .field("rsa_selector", &self.rsa_selector)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// The DKIM keys of one hosting's authorized domain, oldest generation first. The newest
/// is the one to publish; the newest *verified* one signs, so after a rotation the old
/// keys sign until the new records are found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DomainDkim {
    pub hosting: String,
    pub domain: String,
    pub keys: Vec<DkimKeySet>,
}

impl DomainDkim {
    /// The key set whose records are to be published (the newest).
    pub fn current(&self) -> Option<&DkimKeySet> {
        self.keys.last()
    }

    /// The key set that signs: the newest verified one.
    pub fn signing(&self) -> Option<&DkimKeySet> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.status == DkimStatus::Verified)
    }
}

impl Store {
    /// The DKIM keys of the hosting's `domain`, if any were made.
    pub fn dkim(&self, hosting: &str, domain: &str) -> Result<Option<DomainDkim>> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(None);
        };
        let hosting = hosting_key(hosting);
        self.dkim_keys
            .get(key2(&hosting, &domain))?
            .map(|v| decode(format_args!("DKIM keys of {domain} of {hosting}"), &v))
            .transpose()
    }

    /// Every domain's DKIM keys (for the background checks).
    pub fn all_dkim(&self) -> Result<Vec<DomainDkim>> {
        let mut all = Vec::new();
        self.for_each_dkim(|d| all.push(d))?;
        Ok(all)
    }

    /// Every domain's keys, one domain at a time: a store of thousands of domains is
    /// never held whole in memory (each key set carries its private keys).
    pub fn for_each_dkim(&self, mut each: impl FnMut(DomainDkim)) -> Result<()> {
        for entry in self.dkim_keys.iter() {
            let (key, value) = entry?;
            each(decode(
                format_args!("DKIM keys {:?}", String::from_utf8_lossy(&key)),
                &value,
            )?);
        }
        Ok(())
    }

    /// Appends a new generation of keys (the first at `domain add`, the next at a
    /// rotation). `Ok(None)`: the domain is not (or no longer) an authorized domain of the
    /// hosting, and nothing was stored. `only_if_none`: store it only when the domain has
    /// no keys yet (first start after an upgrade, racing a `domain add`). The store
    /// numbers the generation; `selectors` names the set's selectors after that number.
    pub fn add_dkim_keys(
        &self,
        hosting: &str,
        domain: &str,
        mut set: DkimKeySet,
        only_if_none: bool,
        selectors: impl Fn(u32) -> (String, String),
    ) -> Result<Option<DomainDkim>> {
        let domain = normalize_domain(domain)?;
        let hosting = hosting_key(hosting);
        let key = key2(&hosting, &domain);
        loop {
            if self.domains.get(&key)?.is_none() {
                return Ok(None);
            }
            let old = self.dkim_keys.get(&key)?;
            let mut record = match &old {
                Some(v) => decode(format_args!("DKIM keys of {domain} of {hosting}"), v)?,
                None => DomainDkim {
                    hosting: hosting.clone(),
                    domain: domain.clone(),
                    keys: Vec::new(),
                },
            };
            if only_if_none && !record.keys.is_empty() {
                return Ok(Some(record));
            }
            set.generation = record.keys.last().map_or(1, |k| k.generation + 1);
            (set.ed25519_selector, set.rsa_selector) = selectors(set.generation);
            record.keys.push(set.clone());
            let new = encode(&record);
            if self
                .dkim_keys
                .compare_and_swap(&key, old, Some(new))?
                .is_ok()
            {
                return Ok(Some(record));
            }
        }
    }

    /// Read-modify-write with compare-and-swap (as [`Store::update_domain`]). `Ok(None)`:
    /// the domain has no keys.
    pub fn update_dkim(
        &self,
        hosting: &str,
        domain: &str,
        mut f: impl FnMut(&mut DomainDkim),
    ) -> Result<Option<DomainDkim>> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(None);
        };
        let hosting = hosting_key(hosting);
        let key = key2(&hosting, &domain);
        loop {
            let Some(old) = self.dkim_keys.get(&key)? else {
                return Ok(None);
            };
            let mut record: DomainDkim =
                decode(format_args!("DKIM keys of {domain} of {hosting}"), &old)?;
            f(&mut record);
            record.hosting.clone_from(&hosting);
            record.domain.clone_from(&domain);
            let new = encode(&record);
            if self
                .dkim_keys
                .compare_and_swap(&key, Some(&old), Some(new))?
                .is_ok()
            {
                return Ok(Some(record));
            }
        }
    }

    /// Forgets the domain's keys (with the domain).
    pub fn delete_dkim(&self, hosting: &str, domain: &str) -> Result<()> {
        let Ok(domain) = normalize_domain(domain) else {
            return Ok(());
        };
        self.dkim_keys
            .remove(key2(&hosting_key(hosting), &domain))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled::test_util::{store, strings};

    fn set(tag: &str) -> DkimKeySet {
        DkimKeySet {
            generation: 0,
            ed25519_selector: format!("{tag}e"),
            rsa_selector: format!("{tag}r"),
            ed25519_private: "SECRET-E".into(),
            ed25519_public: "pub-e".into(),
            rsa_private: "SECRET-R".into(),
            rsa_public: "pub-r".into(),
            created_at: Utc::now(),
            status: DkimStatus::Pending,
            last_check: None,
            last_error: None,
            verified_at: None,
        }
    }

    fn sel(g: u32) -> (String, String) {
        (format!("s{g}e"), format!("s{g}r"))
    }

    #[test]
    fn generations_rotation_and_delete() {
        let (_dir, store) = store();
        store
            .add_hosting("acme", &strings(&["acme.example"]))
            .unwrap();
        // No domain: nothing stored.
        assert_eq!(
            store
                .add_dkim_keys("acme", "partner.example", set("a"), false, sel)
                .unwrap(),
            None
        );
        store.add_domain("acme", "partner.example", "tok").unwrap();
        let d = store
            .add_dkim_keys("acme", "Partner.Example", set("a"), false, sel)
            .unwrap()
            .unwrap();
        assert_eq!(d.keys[0].generation, 1);
        assert!(d.signing().is_none());
        // only_if_none keeps what is there.
        let d = store
            .add_dkim_keys("acme", "partner.example", set("x"), true, sel)
            .unwrap()
            .unwrap();
        assert_eq!(d.keys.len(), 1);
        store
            .update_dkim("acme", "partner.example", |d| {
                d.keys[0].status = DkimStatus::Verified
            })
            .unwrap();
        let d = store
            .add_dkim_keys("acme", "partner.example", set("b"), false, sel)
            .unwrap()
            .unwrap();
        assert_eq!(d.current().unwrap().generation, 2);
        assert_eq!(d.signing().unwrap().ed25519_selector, "s1e");
        assert_eq!(d.current().unwrap().rsa_selector, "s2r");
        assert_eq!(store.all_dkim().unwrap().len(), 1);
        let debug = format!("{:?}", d);
        assert!(!debug.contains("SECRET"), "{debug}");
        store.delete_dkim("acme", "partner.example").unwrap();
        assert_eq!(store.dkim("acme", "partner.example").unwrap(), None);
    }
}
