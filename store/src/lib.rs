//! The data model of domauth: in sled, hostings, their mailboxes, the external domains
//! they proved they control and the accounts of those domains; beside it, in files of its
//! own, the message queue (`queue.rs`, [`Queue`]).
//!
//! No networking and no async logic lives here; [`Store::flush`] blocks on fsync, so async
//! callers run it on a blocking thread. Every operation is a method of [`Store`], in the
//! file of the record it is about.
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
//! | `api_tokens`    | token id             | [`ApiToken`] (hosting, hash of the secret) |
//!
//! - `own_domains` is the index of [`Hosting::domains`]: a domain is the own domain of at
//!   most one hosting, and a mailbox's hosting is found from its address's domain.
//! - `accounts` is keyed for the check made on every `MAIL FROM` (one `get` of
//!   `hosting\0address`); `account_index` is the same relation the other way round, so that
//!   "which hostings list this address" is a prefix scan. Both are always written together
//!   in one transaction.
//! - The queue is not in sled: a full disk or an I/O error must touch one message and
//!   nothing else, and sled 0.34 keeps failing after one I/O error until it is reopened.
//!   See `queue.rs`.
//!
//! Hosting names are `[a-z0-9._-]{1,63}`, domains are normalized by
//! [`normalize_domain`], addresses by [`normalize_address`]; all are lower case.
//!
//! # Durability
//!
//! sled flushes in the background every 500 ms; [`Store::flush`] forces it (the server
//! calls it at shutdown). The data here changes only through management commands.

mod account;
mod dkim;
mod dns_report;
mod domain;
mod hosting;
mod mailbox;
mod names;
mod queue;
mod token;

pub use account::{AuthorizedAccount, wildcard_address};
pub use chrono::{DateTime, Utc};
pub use dkim::{DkimKeySet, DkimStatus, DomainDkim};
pub use dns_report::{DmarcFinding, DmarcPolicy, DnsReport, ServerAnswer, SpfFinding, SpfStatus};
pub use domain::{AuthorizedDomain, DomainStatus};
pub use hosting::Hosting;
pub use mailbox::Mailbox;
pub use names::{domain_of, normalize_address, normalize_domain, normalize_hosting_name};
pub use queue::{
    BodyType, DeliveryState, Envelope, MessageReader, MessageWriter, OpenReport, Queue,
    QueueRecipient, QueuedMessage, QueuedSummary, RecipientStatus, SyncMethod, is_disk_full,
};
pub use queue::{DsnNotify, DsnParams, DsnRet, RecipientDsn};
pub use token::ApiToken;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::path::Path;

/// Errors of the store. The `Invalid`, `NotFound` and `Conflict` messages are complete
/// sentences for the user ("no hosting named \"acme\""); the caller shows them as they are.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A syntactically bad name, address, domain or token.
    #[error("{0}")]
    Invalid(String),
    /// The record the operation is about (or needs) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The operation would break a uniqueness rule or the record already exists.
    #[error("{0}")]
    Conflict(String),
    #[error("storage error: {0}")]
    Sled(sled::Error),
    /// A file could not be written or read.
    #[error("storage error: {0}")]
    Io(String),
    /// Another process holds the store (sled allows one).
    #[error("the store is locked by another process: {0}")]
    Locked(String),
    /// No space left on the device (or the quota is used up): temporary for a client.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// A stored value that does not decode: never panic on what is on disk.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        match e {
            sled::Error::Io(io) if is_disk_full(&io) => StoreError::DiskFull(io.to_string()),
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                StoreError::Locked(io.to_string())
            }
            other => StoreError::Sled(other),
        }
    }
}

/// The open database. Cloning is cheap: sled's `Db` and `Tree` are reference counted.
#[derive(Clone)]
pub struct Store {
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

impl Store {
    /// Opens (or creates) the store in `dir`. sled allows one process per directory: a
    /// second open fails at once (an I/O error, `WouldBlock`).
    pub fn open(dir: &Path) -> Result<Store> {
        // sled's page cache defaults to 1 GiB; the working set of hostings and
        // domains is small.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let store = Store {
            hostings: db.open_tree("hostings")?,
            own_domains: db.open_tree("own_domains")?,
            mailboxes: db.open_tree("mailboxes")?,
            domains: db.open_tree("domains")?,
            accounts: db.open_tree("accounts")?,
            account_index: db.open_tree("account_index")?,
            dkim_keys: db.open_tree("dkim_keys")?,
            api_tokens: db.open_tree("api_tokens")?,
            db,
        };
        Ok(store)
    }

    /// Writes everything buffered to disk and fsyncs (all trees share one log).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// `a\0b`: a composite key (see the layout above).
fn key2(a: &str, b: &str) -> Vec<u8> {
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

    pub fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open store");
        (dir, store)
    }

    pub fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::store;

    #[test]
    fn second_open_of_the_same_dir_fails() {
        let (dir, _store) = store();
        assert!(Store::open(dir.path()).is_err());
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
}
