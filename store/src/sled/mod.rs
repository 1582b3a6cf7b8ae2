//! The sled backend: the authorization data in one embedded sled database (the default,
//! one node). The PostgreSQL backend keeps its in-memory view in the same shape (a
//! temporary sled database, see `crate::postgres`), so every rule written here — names,
//! conflicts, cascades — holds for both backends.
//!
//! # Trees and key layout
//!
//! All keys are UTF-8 strings. Composite keys join their parts with a `\0` byte, which no
//! normalized name, domain or address can contain, so a prefix `part\0` selects exactly
//! the records of that part and the natural key order is the order of the parts.
//! Values are JSON (serde_json) so that records are readable with any sled dump and new
//! optional fields can be added without a migration.
//!
//! | tree            | key                  | value                                   |
//! |-----------------|----------------------|-----------------------------------------|
//! | `hostings`      | `name`               | [`Hosting`]                             |
//! | `own_domains`   | `domain`             | name of the hosting that owns it (UTF-8, not JSON) |
//! | `mailboxes`     | `address`            | [`Mailbox`]                             |
//! | `domains`       | `hosting\0domain`    | [`AuthorizedDomain`]                    |
//! | `accounts`      | `hosting\0address`   | [`AuthorizedAccount`]                   |
//! | `account_index` | `address\0hosting`   | empty                                   |
//! | `dkim_keys`     | `hosting\0domain`    | [`DomainDkim`]: DKIM key generations of that authorized domain (private keys inside: never shown) |
//!
//! - `own_domains` is the index of [`Hosting::domains`]: a domain is the own domain of at
//!   most one hosting, and a mailbox's hosting is found from its address's domain.
//! - `accounts` is keyed for the check made on every `MAIL FROM` (one `get` of
//!   `hosting\0address`); `account_index` is the same relation the other way round, so that
//!   "which hostings list this address" is a prefix scan. Both are always written together
//!   in one transaction.
//!
//! A new tree must be added to [`TREES`] (export/import and the PostgreSQL mapping
//! follow it).
//!
//! Hosting names are `[a-z0-9._-]{1,63}`, domains are normalized by
//! [`crate::normalize_domain`], addresses by [`crate::normalize_address`]; all are lower case.
//!
//! # Durability
//!
//! sled flushes in the background every 500 ms; [`SledStore::flush`] forces it (the server
//! calls it at shutdown). The data here changes only through management commands.

// The record files keep their original `impl Store` / `Store` spelling: inside them
// `Store` is this module's `SledStore` (imported `as Store`), so their history reads on.
pub(crate) mod account;
pub(crate) mod dkim;
pub(crate) mod domain;
pub(crate) mod hosting;
pub(crate) mod mailbox;
pub(crate) mod token;

#[cfg(test)]
use self::hosting::Hosting;
#[cfg(doc)]
use crate::{AuthorizedAccount, AuthorizedDomain, DomainDkim, Mailbox};
pub use crate::{Result, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::path::Path;

/// Every tree of the authorization data, in dependency order (a tree's records only refer
/// to trees before it): export, import and the PostgreSQL mapping walk this list.
pub const TREES: &[&str] = &[
    "hostings",
    "own_domains",
    "mailboxes",
    "domains",
    "accounts",
    "account_index",
    "dkim_keys",
    "api_tokens",
];

/// The open database. Cloning is cheap: sled's `Db` and `Tree` are reference counted.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    hostings: sled::Tree,
    own_domains: sled::Tree,
    mailboxes: sled::Tree,
    domains: sled::Tree,
    accounts: sled::Tree,
    account_index: sled::Tree,
    dkim_keys: sled::Tree,
    api_tokens: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. sled allows one process per directory: a
    /// second open fails at once (an I/O error, `WouldBlock`).
    pub fn open(dir: &Path) -> Result<SledStore> {
        // sled's page cache defaults to 1 GiB; the working set of hostings and
        // domains is small.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Self::with_db(db)
    }

    /// An in-memory database, gone when the last clone is dropped (the PostgreSQL
    /// backend's view).
    pub fn temporary() -> Result<SledStore> {
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Self::with_db(db)
    }

    fn with_db(db: sled::Db) -> Result<SledStore> {
        Ok(SledStore {
            hostings: db.open_tree("hostings")?,
            own_domains: db.open_tree("own_domains")?,
            mailboxes: db.open_tree("mailboxes")?,
            domains: db.open_tree("domains")?,
            accounts: db.open_tree("accounts")?,
            account_index: db.open_tree("account_index")?,
            dkim_keys: db.open_tree("dkim_keys")?,
            api_tokens: db.open_tree("api_tokens")?,
            db,
        })
    }

    /// Writes everything buffered to disk and fsyncs (all trees share one log).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// The tree named `name` (one of [`TREES`]).
    pub(crate) fn tree(&self, name: &str) -> Result<&sled::Tree> {
        Ok(match name {
            "hostings" => &self.hostings,
            "own_domains" => &self.own_domains,
            "mailboxes" => &self.mailboxes,
            "domains" => &self.domains,
            "accounts" => &self.accounts,
            "account_index" => &self.account_index,
            "dkim_keys" => &self.dkim_keys,
            "api_tokens" => &self.api_tokens,
            other => return Err(StoreError::Invalid(format!("unknown store tree {other:?}"))),
        })
    }

    /// True when no tree holds a record.
    pub(crate) fn is_empty(&self) -> Result<bool> {
        for name in TREES {
            if !self.tree(name)?.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// `a\0b`: a composite key (see the layout above).
pub(crate) fn key2(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + 1 + b.len());
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

/// `a\0`: the prefix of every composite key whose first part is `a`.
fn prefix(a: &str) -> Vec<u8> {
    key2(a, "")
}

/// The part of a composite key after its first `\0`.
fn key_suffix(key: &[u8]) -> Result<&str> {
    let at = key
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| StoreError::Corrupt(format!("key {key:?} has no separator")))?;
    std::str::from_utf8(&key[at + 1..])
        .map_err(|_| StoreError::Corrupt(format!("key {key:?} is not UTF-8")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Our records are plain structs with string keys: serializing them cannot fail.
    serde_json::to_vec(value).expect("records always serialize to JSON")
}

/// Decodes a stored value; `what` names the record in the error ("hosting \"acme\"").
fn decode<T: DeserializeOwned>(what: impl std::fmt::Display, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn decode_str(what: impl std::fmt::Display, bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| StoreError::Corrupt(format!("{what}: value is not UTF-8")))
}

/// The error type inside our transactions: a `StoreError` aborts the transaction and
/// comes back unchanged from [`tx_result`].
type TxResult<T> = std::result::Result<T, ConflictableTransactionError<StoreError>>;

/// Aborts a transaction with `e`.
fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// `?` for a [`Result`] inside a transaction closure.
fn tx<T>(r: Result<T>) -> TxResult<T> {
    r.map_err(ConflictableTransactionError::Abort)
}

fn tx_result<T>(r: std::result::Result<T, TransactionError<StoreError>>) -> Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open store");
        (dir, store)
    }

    pub fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled::test_util::store;

    #[test]
    fn second_open_of_the_same_dir_fails() {
        let (dir, _store) = store();
        assert!(SledStore::open(dir.path()).is_err());
    }

    #[test]
    fn corrupt_value_is_an_error_not_a_panic() {
        let (_dir, store) = store();
        store.hostings.insert("acme", &b"{not json"[..]).unwrap();
        match store.hosting("acme") {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("acme"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn a_temporary_store_works_like_a_file_one() {
        let store = SledStore::temporary().unwrap();
        assert!(store.is_empty().unwrap());
        let h: Hosting = store
            .add_hosting("acme", &["acme.example".to_string()])
            .unwrap();
        assert_eq!(h.name, "acme");
        assert!(!store.is_empty().unwrap());
    }
}
