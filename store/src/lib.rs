//! The data model of domauth: hostings, their mailboxes, the external domains they proved
//! they control and the accounts of those domains (the *authorization data*), behind one
//! seam, [`Store`]; beside it, in files of its own, the message queue (`queue.rs`,
//! [`Queue`]), which is always local.
//!
//! # Backends
//!
//! [`Store`] is an enum over backends (the shape of Stalwart's `store` crate):
//!
//! - `sled/` — [`SledStore`], one embedded sled database (the default, one node). Every
//!   rule of the model (names, conflicts, cascades) is written there, once.
//! - `postgres/` (cargo feature `postgres`) — [`PgStore`], the data shared by several
//!   nodes in PostgreSQL. Reads are answered from an in-memory view of the same shape as
//!   the sled store (a temporary sled database, kept current through LISTEN/NOTIFY), and
//!   writes run the same sled code against that view under a cluster-wide lock, then
//!   write what changed to PostgreSQL. So the rules are not written twice.
//!
//! A new operation is written once as a method of `SledStore` (in the file of its
//! record) and gets one dispatch line in `seam.rs`: `read!` for a query, `write!` for a
//! change. A new record *field* needs nothing else: records travel as JSON (jsonb in
//! PostgreSQL), so an optional field needs no migration.
//!
//! No networking and no async logic is visible here: the API is synchronous. The
//! PostgreSQL backend runs its connections on a runtime thread of its own, and its
//! writes block the caller for a round trip or two; reads never touch the network.
//! [`Store::flush`] blocks on fsync (sled), so async callers run it on a blocking thread.

mod dns_report;
mod dump;
mod names;
#[cfg(feature = "postgres")]
pub mod postgres;
mod queue;
mod seam;
pub mod sled;

pub use chrono::{DateTime, Utc};
pub use dns_report::{DmarcFinding, DmarcPolicy, DnsReport, ServerAnswer, SpfFinding, SpfStatus};
pub use dump::Dump;
pub use names::{domain_of, normalize_address, normalize_domain, normalize_hosting_name};
#[cfg(feature = "postgres")]
pub use postgres::{PgConfig, PgStore};
pub use queue::{
    BodyType, DeliveryState, Envelope, MessageReader, MessageWriter, OpenReport, Queue,
    QueueRecipient, QueuedMessage, QueuedSummary, RecipientStatus, SyncMethod, is_disk_full,
};
pub use queue::{DsnNotify, DsnParams, DsnRet, RecipientDsn};
pub use seam::Store;
pub use sled::SledStore;
pub use sled::account::{AuthorizedAccount, wildcard_address};
pub use sled::dkim::{DkimKeySet, DkimStatus, DomainDkim};
pub use sled::domain::{AuthorizedDomain, DomainStatus};
pub use sled::hosting::Hosting;
pub use sled::mailbox::Mailbox;
pub use sled::token::ApiToken;

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
    Sled(::sled::Error),
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
    /// The shared database (PostgreSQL) cannot be reached or refused the operation:
    /// temporary; the message is one line without the connection URL.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> StoreError {
        match e {
            ::sled::Error::Io(io) if is_disk_full(&io) => StoreError::DiskFull(io.to_string()),
            ::sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                StoreError::Locked(io.to_string())
            }
            other => StoreError::Sled(other),
        }
    }
}
