//! The sled-backed data model of domauth: hostings, their mailboxes, the external domains
//! they proved they control, the accounts of those domains, and the message queue.
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
//! optional fields can be added without a migration; queue bodies are raw bytes.
//!
//! | tree            | key                  | value                                   |
//! |-----------------|----------------------|-----------------------------------------|
//! | `hostings`      | `name`               | [`Hosting`]                             |
//! | `own_domains`   | `domain`             | name of the hosting that owns it (UTF-8, not JSON) |
//! | `mailboxes`     | `address`            | [`Mailbox`]                             |
//! | `domains`       | `hosting\0domain`    | [`AuthorizedDomain`]                    |
//! | `accounts`      | `hosting\0address`   | [`AuthorizedAccount`]                   |
//! | `account_index` | `address\0hosting`   | empty                                   |
//! | `queue_meta`    | `id`                 | [`QueuedMessage`]                       |
//! | `queue_body`    | `id`                 | where the body is in the body log (24 bytes) |
//!
//! - `own_domains` is the index of [`Hosting::domains`]: a domain is the own domain of at
//!   most one hosting, and a mailbox's hosting is found from its address's domain.
//! - `accounts` is keyed for the check made on every `MAIL FROM` (one `get` of
//!   `hosting\0address`); `account_index` is the same relation the other way round, so that
//!   "which hostings list this address" is a prefix scan. Both are always written together
//!   in one transaction.
//! - Message bodies live outside sled, in the append-only segment files of `bodies/`
//!   (see `bodylog.rs`); `queue_body` holds where each one is. A message is written body
//!   first (log, then `queue_body`), envelope last, and removed envelope first, without a
//!   transaction (it would cost more than the rest of the hot path). `open` sweeps what a
//!   crash can leave half-written; none of it was acknowledged, as the group-commit flush
//!   covers all of a message's writes.
//!   Queue ids are opaque here; the relay makes them sort by time of acceptance.
//!
//! Hosting names are `[a-z0-9._-]{1,63}`, domains are normalized by
//! [`normalize_domain`], addresses by [`normalize_address`]; all are lower case.
//!
//! # Durability
//!
//! Writes are not flushed by the store. sled flushes in the background every 500 ms, the
//! body log never by itself; a caller that promises durability (the SMTP `250` after DATA)
//! calls [`Store::flush`] first (body log `fdatasync`, then sled), once for many writes if
//! it can (group commit).

mod account;
mod bodylog;
mod domain;
mod hosting;
mod mailbox;
mod names;
mod queue;

pub use account::AuthorizedAccount;
pub use chrono::{DateTime, Utc};
pub use domain::{AuthorizedDomain, DomainStatus};
pub use hosting::Hosting;
pub use mailbox::Mailbox;
pub use names::{domain_of, normalize_address, normalize_domain, normalize_hosting_name};
pub use queue::{QueueRecipient, QueuedMessage, RecipientStatus};

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
    Sled(#[from] sled::Error),
    /// A stored value that does not decode: never panic on what is on disk.
    /// A file of the body log could not be written or read.
    #[error("storage error: {0}")]
    Io(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

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
    queue_meta: sled::Tree,
    queue_body: sled::Tree,
    bodies: std::sync::Arc<bodylog::BodyLog>,
}

impl Store {
    /// Opens (or creates) the store in `dir`. sled allows one process per directory: a
    /// second open fails at once (an I/O error, `WouldBlock`).
    pub fn open(dir: &Path) -> Result<Store> {
        // sled's page cache defaults to 1 GiB; the queue streams through it,
        // so bound it (the working set of hostings and domains is small).
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
            queue_meta: db.open_tree("queue_meta")?,
            queue_body: db.open_tree("queue_body")?,
            bodies: std::sync::Arc::new(bodylog::BodyLog::open(&dir.join("bodies"))?),
            db,
        };
        store.sweep_queue()?;
        Ok(store)
    }

    /// Writes everything buffered to disk and fsyncs (all trees share one log).
    pub fn flush(&self) -> Result<()> {
        self.bodies.sync()?;
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
