//! [`Store`]: the one type the relay uses for the authorization data, an enum over the
//! backends. Every operation is written once, as a method of [`SledStore`]; here each gets
//! one dispatch line: `read!` runs it on the sled store or on the PostgreSQL backend's
//! in-memory view (no network), `write!` runs it on the sled store or through
//! [`PgStore::write`](crate::PgStore::write) (under the cluster-wide write lock, then
//! written to PostgreSQL).

use crate::sled::SledStore;
use crate::{
    ApiToken, AuthorizedAccount, AuthorizedDomain, DkimKeySet, DomainDkim, Dump, Hosting, Mailbox,
    Result,
};
use std::path::Path;

/// The authorization data. Cloning is cheap (reference counted inside).
#[derive(Clone)]
pub enum Store {
    Sled(SledStore),
    #[cfg(feature = "postgres")]
    Postgres(crate::PgStore),
}

macro_rules! read {
    ($self:ident, |$s:ident| $e:expr) => {
        match $self {
            Store::Sled($s) => $e,
            #[cfg(feature = "postgres")]
            Store::Postgres(pg) => {
                let view = pg.view();
                let $s: &SledStore = &view;
                $e
            }
        }
    };
}

macro_rules! write {
    ($self:ident, |$s:ident| $e:expr) => {
        match $self {
            Store::Sled($s) => $e,
            #[cfg(feature = "postgres")]
            Store::Postgres(pg) => pg.write(|$s: &SledStore| $e),
        }
    };
}

impl Store {
    /// Opens (or creates) the sled store in `dir`. sled allows one process per directory:
    /// a second open fails at once (`StoreError::Locked`).
    pub fn open(dir: &Path) -> Result<Store> {
        Ok(Store::Sled(SledStore::open(dir)?))
    }

    /// Connects to PostgreSQL, migrates the schema and loads the view (see `postgres/`).
    #[cfg(feature = "postgres")]
    pub fn open_postgres(config: crate::PgConfig) -> Result<Store> {
        Ok(Store::Postgres(crate::PgStore::open(config)?))
    }

    /// Writes everything buffered to disk and fsyncs (sled); nothing to do for
    /// PostgreSQL, whose writes are committed before they return.
    pub fn flush(&self) -> Result<()> {
        match self {
            Store::Sled(s) => s.flush(),
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => Ok(()),
        }
    }

    /// False when the data may be too old to decide on: the PostgreSQL backend has been
    /// cut off from the database for longer than `store.max_staleness` (SMTP answers
    /// `MAIL` with 451 4.3.0 then). Always true for sled.
    pub fn usable(&self) -> bool {
        match self {
            Store::Sled(_) => true,
            #[cfg(feature = "postgres")]
            Store::Postgres(pg) => pg.usable(),
        }
    }

    /// The backend's name as in `store.backend`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sled(_) => "sled",
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => "postgres",
        }
    }

    /// Claims the background DNS check of a domain for this node (SPEC §11: each check
    /// runs on one node only). Always true with sled (one node); with PostgreSQL see
    /// [`PgStore::claim_check`](crate::PgStore::claim_check).
    pub fn claim_check(
        &self,
        hosting: &str,
        domain: &str,
        seen_last_check: Option<crate::DateTime<crate::Utc>>,
        lease: std::time::Duration,
    ) -> Result<bool> {
        match self {
            Store::Sled(_) => {
                let _ = (hosting, domain, seen_last_check, lease);
                Ok(true)
            }
            #[cfg(feature = "postgres")]
            Store::Postgres(pg) => pg.claim_check(hosting, domain, seen_last_check, lease),
        }
    }

    /// Counts an AUTH failure under each `(kind, key)` (e.g. `("ip", "192.0.2.1")`) in
    /// the counters all nodes share, and returns the counts. `None` with sled: there the
    /// relay's own per-process limiter is the only one.
    pub fn record_auth_failure(
        &self,
        keys: &[(&str, &str)],
        window: std::time::Duration,
    ) -> Result<Option<Vec<u32>>> {
        match self {
            Store::Sled(_) => {
                let _ = (keys, window);
                Ok(None)
            }
            #[cfg(feature = "postgres")]
            Store::Postgres(pg) => pg.record_auth_failure(keys, window).map(Some),
        }
    }

    /// The shared AUTH failure count of `(kind, key)` within `window`; `None` with sled.
    pub fn auth_failures(
        &self,
        kind: &str,
        key: &str,
        window: std::time::Duration,
    ) -> Result<Option<u32>> {
        match self {
            Store::Sled(_) => {
                let _ = (kind, key, window);
                Ok(None)
            }
            #[cfg(feature = "postgres")]
            Store::Postgres(pg) => pg.auth_failures(kind, key, window).map(Some),
        }
    }

    /// All the authorization data (`domauth store export`).
    pub fn export(&self) -> Result<Dump> {
        read!(self, |s| s.export())
    }

    /// Loads a dump into this store, which must be empty (`domauth store import`).
    /// Returns the number of records.
    pub fn import(&self, dump: &Dump) -> Result<usize> {
        match self {
            Store::Sled(s) => s.import(dump),
            #[cfg(feature = "postgres")]
            Store::Postgres(pg) => pg.import(dump),
        }
    }

    // Hostings (sled/hosting.rs).

    pub fn add_hosting(&self, name: &str, domains: &[String]) -> Result<Hosting> {
        write!(self, |s| s.add_hosting(name, domains))
    }
    pub fn hosting(&self, name: &str) -> Result<Option<Hosting>> {
        read!(self, |s| s.hosting(name))
    }
    pub fn hostings(&self) -> Result<Vec<Hosting>> {
        read!(self, |s| s.hostings())
    }
    pub fn hosting_of_domain(&self, domain: &str) -> Result<Option<String>> {
        read!(self, |s| s.hosting_of_domain(domain))
    }
    pub fn set_hosting_password(&self, name: &str, phc: &str) -> Result<()> {
        write!(self, |s| s.set_hosting_password(name, phc))
    }

    // Mailboxes (sled/mailbox.rs).

    pub fn add_mailbox(&self, address: &str, phc: &str) -> Result<Mailbox> {
        write!(self, |s| s.add_mailbox(address, phc))
    }
    pub fn mailbox(&self, address: &str) -> Result<Option<Mailbox>> {
        read!(self, |s| s.mailbox(address))
    }
    pub fn mailboxes(&self, hosting: Option<&str>) -> Result<Vec<Mailbox>> {
        read!(self, |s| s.mailboxes(hosting))
    }
    pub fn set_mailbox_password(&self, address: &str, phc: &str) -> Result<Mailbox> {
        write!(self, |s| s.set_mailbox_password(address, phc))
    }
    pub fn delete_mailbox(&self, address: &str) -> Result<()> {
        write!(self, |s| s.delete_mailbox(address))
    }

    // Authorized domains (sled/domain.rs).

    pub fn add_domain(&self, hosting: &str, domain: &str, token: &str) -> Result<AuthorizedDomain> {
        write!(self, |s| s.add_domain(hosting, domain, token))
    }
    pub fn domain(&self, hosting: &str, domain: &str) -> Result<Option<AuthorizedDomain>> {
        read!(self, |s| s.domain(hosting, domain))
    }
    pub fn domains(&self, hosting: &str) -> Result<Vec<AuthorizedDomain>> {
        read!(self, |s| s.domains(hosting))
    }
    pub fn all_domains(&self) -> Result<Vec<AuthorizedDomain>> {
        read!(self, |s| s.all_domains())
    }
    /// See [`SledStore::update_domain`]: `f` may be called more than once.
    pub fn update_domain(
        &self,
        hosting: &str,
        domain: &str,
        mut f: impl FnMut(&mut AuthorizedDomain),
    ) -> Result<Option<AuthorizedDomain>> {
        write!(self, |s| s.update_domain(hosting, domain, &mut f))
    }
    pub fn delete_domain(&self, hosting: &str, domain: &str) -> Result<usize> {
        write!(self, |s| s.delete_domain(hosting, domain))
    }
    pub fn account_count(&self, hosting: &str, domain: &str) -> Result<usize> {
        read!(self, |s| s.account_count(hosting, domain))
    }

    // Authorized accounts (sled/account.rs).

    pub fn add_account(&self, hosting: &str, address: &str) -> Result<AuthorizedAccount> {
        write!(self, |s| s.add_account(hosting, address))
    }
    pub fn add_account_restricted(
        &self,
        hosting: &str,
        address: &str,
        mailboxes: &[String],
    ) -> Result<AuthorizedAccount> {
        write!(self, |s| s
            .add_account_restricted(hosting, address, mailboxes))
    }
    pub fn account(&self, hosting: &str, address: &str) -> Result<Option<AuthorizedAccount>> {
        read!(self, |s| s.account(hosting, address))
    }
    pub fn accounts(&self, hosting: &str, domain: Option<&str>) -> Result<Vec<AuthorizedAccount>> {
        read!(self, |s| s.accounts(hosting, domain))
    }
    pub fn hostings_with_account(&self, address: &str) -> Result<Vec<String>> {
        read!(self, |s| s.hostings_with_account(address))
    }
    pub fn delete_account(&self, hosting: &str, address: &str) -> Result<()> {
        write!(self, |s| s.delete_account(hosting, address))
    }

    // DKIM keys (sled/dkim.rs).

    pub fn dkim(&self, hosting: &str, domain: &str) -> Result<Option<DomainDkim>> {
        read!(self, |s| s.dkim(hosting, domain))
    }
    pub fn all_dkim(&self) -> Result<Vec<DomainDkim>> {
        read!(self, |s| s.all_dkim())
    }
    pub fn for_each_dkim(&self, each: impl FnMut(DomainDkim)) -> Result<()> {
        read!(self, |s| s.for_each_dkim(each))
    }
    pub fn add_dkim_keys(
        &self,
        hosting: &str,
        domain: &str,
        set: DkimKeySet,
        only_if_none: bool,
        selectors: impl Fn(u32) -> (String, String),
    ) -> Result<Option<DomainDkim>> {
        write!(self, |s| s.add_dkim_keys(
            hosting,
            domain,
            set,
            only_if_none,
            &selectors
        ))
    }
    /// See [`SledStore::update_dkim`]: `f` may be called more than once.
    pub fn update_dkim(
        &self,
        hosting: &str,
        domain: &str,
        mut f: impl FnMut(&mut DomainDkim),
    ) -> Result<Option<DomainDkim>> {
        write!(self, |s| s.update_dkim(hosting, domain, &mut f))
    }
    pub fn delete_dkim(&self, hosting: &str, domain: &str) -> Result<()> {
        write!(self, |s| s.delete_dkim(hosting, domain))
    }

    // API tokens (sled/token.rs).

    pub fn add_api_token(&self, id: &str, hosting: &str, secret_hash: &str) -> Result<ApiToken> {
        write!(self, |s| s.add_api_token(id, hosting, secret_hash))
    }
    pub fn api_token(&self, id: &str) -> Result<Option<ApiToken>> {
        read!(self, |s| s.api_token(id))
    }
    pub fn revoke_api_tokens(&self, hosting: &str) -> Result<usize> {
        write!(self, |s| s.revoke_api_tokens(hosting))
    }
}
