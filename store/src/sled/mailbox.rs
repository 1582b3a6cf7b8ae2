//! Mailboxes: the logins of a hosting, one per address in its own domains.

use super::{
    Result, SledStore as Store, StoreError, abort, decode, decode_str, encode, tx, tx_result,
};
use crate::names::{domain_of, normalize_address};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sled::Transactional;

/// A login. Its hosting is the owner of its address's domain, recorded at creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Mailbox {
    pub address: String,
    pub hosting: String,
    /// Argon2id PHC string; the password itself is never stored.
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
    /// Lets an auth cache drop entries older than the last password change.
    pub password_changed_at: DateTime<Utc>,
}

impl Store {
    /// Creates a mailbox; its hosting is the one whose own domain the address is in.
    pub fn add_mailbox(&self, address: &str, phc: &str) -> Result<Mailbox> {
        let address = normalize_address(address)?;
        let domain = domain_of(&address);
        let now = Utc::now();
        tx_result(
            (&self.own_domains, &self.mailboxes).transaction(|(own_domains, mailboxes)| {
                let Some(owner) = own_domains.get(domain)? else {
                    return abort(StoreError::NotFound(format!(
                        "no hosting owns domain {domain}"
                    )));
                };
                if mailboxes.get(&address)?.is_some() {
                    return abort(StoreError::Conflict(format!(
                        "mailbox {address} already exists"
                    )));
                }
                let mailbox = Mailbox {
                    address: address.clone(),
                    hosting: tx(decode_str(format_args!("owner of {domain}"), &owner))?,
                    password_hash: phc.to_string(),
                    created_at: now,
                    password_changed_at: now,
                };
                mailboxes.insert(address.as_bytes(), encode(&mailbox))?;
                Ok(mailbox)
            }),
        )
    }

    /// The mailbox of `address` (any case, with or without `<>`); an invalid address has
    /// none.
    pub fn mailbox(&self, address: &str) -> Result<Option<Mailbox>> {
        let Ok(address) = normalize_address(address) else {
            return Ok(None);
        };
        self.mailboxes
            .get(&address)?
            .map(|v| decode(format_args!("mailbox {address}"), &v))
            .transpose()
    }

    /// All mailboxes, or those of one hosting, sorted by address. A full scan: this is for
    /// listings, not for the SMTP path.
    pub fn mailboxes(&self, hosting: Option<&str>) -> Result<Vec<Mailbox>> {
        let hosting = match hosting {
            Some(name) => Some(self.require_hosting(name)?),
            None => None,
        };
        let mut out = Vec::new();
        for entry in self.mailboxes.iter() {
            let (key, value) = entry?;
            let mailbox: Mailbox = decode(
                format_args!("mailbox {}", String::from_utf8_lossy(&key)),
                &value,
            )?;
            if hosting.as_ref().is_none_or(|h| *h == mailbox.hosting) {
                out.push(mailbox);
            }
        }
        Ok(out)
    }

    /// Replaces the password hash and records when.
    pub fn set_mailbox_password(&self, address: &str, phc: &str) -> Result<Mailbox> {
        let address = normalize_address(address)?;
        tx_result(self.mailboxes.transaction(|mailboxes| {
            let Some(value) = mailboxes.get(&address)? else {
                return abort(no_mailbox(&address));
            };
            let mut mailbox: Mailbox = tx(decode(format_args!("mailbox {address}"), &value))?;
            mailbox.password_hash = phc.to_string();
            mailbox.password_changed_at = Utc::now();
            mailboxes.insert(address.as_bytes(), encode(&mailbox))?;
            Ok(mailbox)
        }))
    }

    pub fn delete_mailbox(&self, address: &str) -> Result<()> {
        let address = normalize_address(address)?;
        match self.mailboxes.remove(&address)? {
            Some(_) => Ok(()),
            None => Err(no_mailbox(&address)),
        }
    }
}

fn no_mailbox(address: &str) -> StoreError {
    StoreError::NotFound(format!("no mailbox {address}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled::test_util::{store, strings};

    #[test]
    fn needs_an_owning_hosting() {
        let (_dir, store) = store();
        assert!(matches!(
            store.add_mailbox("info@acme.example", "phc"),
            Err(StoreError::NotFound(m)) if m == "no hosting owns domain acme.example"
        ));
        store
            .add_hosting("acme", &strings(&["acme.example"]))
            .unwrap();
        let m = store.add_mailbox("<Info@ACME.example>", "phc").unwrap();
        assert_eq!(
            (m.address.as_str(), m.hosting.as_str()),
            ("info@acme.example", "acme")
        );
        assert_eq!(m.created_at, m.password_changed_at);
        assert!(matches!(
            store.add_mailbox("info@acme.example", "phc"),
            Err(StoreError::Conflict(m)) if m == "mailbox info@acme.example already exists"
        ));
        // A subdomain is not an own domain.
        assert!(matches!(
            store.add_mailbox("info@sub.acme.example", "phc"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.add_mailbox("info", "phc"),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn lookup_list_password_delete() {
        let (_dir, store) = store();
        store
            .add_hosting("acme", &strings(&["acme.example"]))
            .unwrap();
        store
            .add_hosting("beta", &strings(&["beta.example"]))
            .unwrap();
        for a in ["z@acme.example", "a@beta.example", "b@acme.example"] {
            store.add_mailbox(a, "phc").unwrap();
        }
        assert_eq!(
            store.mailbox("B@Acme.Example").unwrap().unwrap().hosting,
            "acme"
        );
        assert_eq!(store.mailbox("not an address").unwrap(), None);
        assert_eq!(store.mailbox("c@acme.example").unwrap(), None);

        let addresses = |h| -> Vec<String> {
            store
                .mailboxes(h)
                .unwrap()
                .into_iter()
                .map(|m| m.address)
                .collect()
        };
        assert_eq!(
            addresses(None),
            ["a@beta.example", "b@acme.example", "z@acme.example"]
        );
        assert_eq!(
            addresses(Some("ACME")),
            ["b@acme.example", "z@acme.example"]
        );
        assert!(matches!(
            store.mailboxes(Some("nobody")),
            Err(StoreError::NotFound(_))
        ));

        let before = store.mailbox("b@acme.example").unwrap().unwrap();
        let after = store
            .set_mailbox_password("b@acme.example", "phc2")
            .unwrap();
        assert_eq!(after.password_hash, "phc2");
        assert!(after.password_changed_at >= before.password_changed_at);
        assert_eq!(after.created_at, before.created_at);
        assert_eq!(store.mailbox("b@acme.example").unwrap(), Some(after));
        assert!(matches!(
            store.set_mailbox_password("c@acme.example", "x"),
            Err(StoreError::NotFound(_))
        ));

        store.delete_mailbox("B@acme.example").unwrap();
        assert_eq!(store.mailbox("b@acme.example").unwrap(), None);
        assert!(matches!(
            store.delete_mailbox("b@acme.example"),
            Err(StoreError::NotFound(m)) if m == "no mailbox b@acme.example"
        ));
    }
}
