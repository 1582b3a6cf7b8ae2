//! The PostgreSQL backend: the authorization data shared by several relay nodes
//! (SPEC §11).
//!
//! # Design
//!
//! - **Reads never touch the network.** Each node answers every read from a *view*: a
//!   temporary in-memory [`SledStore`] holding exactly the rows of PostgreSQL, in the sled
//!   layout. So the read code is the sled code.
//! - **The view follows the database** through the `changes` table: every committed write
//!   appends the keys it changed and sends `NOTIFY domauth_store, '<seq>'`. The listener
//!   task ([`sync`]) wakes on the notification (and every 500 ms anyway, which doubles as
//!   the liveness check), reads the changes after the last sequence it applied and copies
//!   those rows into the view. After every (re)connection — notifications are lost while
//!   disconnected — and every minute it reloads everything, building a new view and
//!   swapping it in.
//! - **Writes run the sled code too.** [`PgStore::write`] opens a transaction and takes a
//!   cluster-wide `pg_advisory_xact_lock` (management writes are rare; one at a time keeps
//!   the rules of the sled code — unique own domains, cascades — true across nodes),
//!   catches the view up with the changes log, runs the operation on the view while
//!   watching which keys it touches, writes those rows to PostgreSQL, appends them to
//!   `changes`, notifies and commits. A failed commit leaves the view ahead of the
//!   database for a moment: it is marked for a full reload at once.
//! - **Blocking.** The store API is synchronous. The connections live on a tokio runtime
//!   in a thread of this backend; a write blocks its caller for the round trips (a few
//!   milliseconds; the relay makes its management calls from admin handlers and the
//!   verifier, never from the SMTP hot path), bounded by a 10 s timeout.
//! - **Outage.** While the database is unreachable, reads go on from the view; after
//!   `max_staleness` without a connection [`PgStore::usable`] turns false (SMTP answers
//!   451 4.3.0 at MAIL). Writes fail with `StoreError::Unavailable` (one line). The
//!   listener reconnects every half second and reloads; nothing needs a restart.
//!
//! Connections are plain TCP or a Unix socket (`host=/run/postgresql`); TLS to the
//! database is not supported yet.

mod schema;

use crate::dump::{Dump, join_key, split_key};
use crate::sled::{SledStore, TREES, key2};
use crate::{Result, StoreError};
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_postgres::{AsyncMessage, NoTls};

type Client = tokio_postgres::Client;

/// The NOTIFY channel of committed writes; the payload is the last sequence written.
const CHANNEL: &str = "domauth_store";
/// The advisory lock every write holds in its transaction ("domauth2").
const WRITE_LOCK: i64 = 0x646f_6d61_7574_6832;
/// Bound of one database operation as seen by a caller.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the listener polls the changes log without a notification (the liveness
/// check too).
const TICK: Duration = Duration::from_millis(500);
/// The periodic consistency reload.
const FULL_RELOAD: Duration = Duration::from_secs(60);
/// Changes older than this are pruned (a node further behind has been disconnected, and
/// reloads everything anyway).
const KEEP_CHANGES: &str = "1 hour";

/// How to reach the database.
#[derive(Clone)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/db` or `host=... user=... dbname=...`.
    pub url: String,
    /// How long SMTP may go on from the view while the database is unreachable.
    pub max_staleness: Duration,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never show the URL: it may hold a password.
        f.debug_struct("PgConfig")
            .field("max_staleness", &self.max_staleness)
            .finish_non_exhaustive()
    }
}

/// One tree of the sled layout and its table. `account_index` has none: it is derived
/// from `accounts` when rows are copied into a view.
struct Table {
    tree: &'static str,
    table: &'static str,
    keys: &'static [&'static str],
    /// The value column: `record` (jsonb) or a text column.
    value: &'static str,
    json: bool,
}

const TABLES: &[Table] = &[
    Table {
        tree: "hostings",
        table: "hostings",
        keys: &["name"],
        value: "record",
        json: true,
    },
    Table {
        tree: "own_domains",
        table: "own_domains",
        keys: &["domain"],
        value: "hosting",
        json: false,
    },
    Table {
        tree: "mailboxes",
        table: "mailboxes",
        keys: &["address"],
        value: "record",
        json: true,
    },
    Table {
        tree: "domains",
        table: "authorized_domains",
        keys: &["hosting", "domain"],
        value: "record",
        json: true,
    },
    Table {
        tree: "accounts",
        table: "accounts",
        keys: &["hosting", "address"],
        value: "record",
        json: true,
    },
    Table {
        tree: "dkim_keys",
        table: "dkim_keys",
        keys: &["hosting", "domain"],
        value: "record",
        json: true,
    },
    Table {
        tree: "api_tokens",
        table: "api_tokens",
        keys: &["id"],
        value: "record",
        json: true,
    },
];

/// Trees kept in the view only, rebuilt from others.
const DERIVED: &[&str] = &["account_index"];

fn table(tree: &str) -> Result<&'static Table> {
    TABLES.iter().find(|t| t.tree == tree).ok_or_else(|| {
        StoreError::Unavailable(format!("store tree {tree:?} has no PostgreSQL table"))
    })
}

impl Table {
    fn select_all(&self) -> String {
        let cast = if self.json { "::text" } else { "" };
        format!(
            "SELECT {}, {}{cast} FROM {}",
            self.keys.join(", "),
            self.value,
            self.table
        )
    }
    fn select_one(&self) -> String {
        format!("{} WHERE {}", self.select_all(), self.key_match())
    }
    fn key_match(&self) -> String {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} = ${}", i + 1))
            .collect::<Vec<_>>()
            .join(" AND ")
    }
    fn upsert(&self) -> String {
        let n = self.keys.len();
        let cast = if self.json { "::jsonb" } else { "" };
        let params: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
        format!(
            "INSERT INTO {t} ({keys}, {v}) VALUES ({params}, ${last}::text{cast}) \
             ON CONFLICT ({keys}) DO UPDATE SET {v} = EXCLUDED.{v}",
            t = self.table,
            keys = self.keys.join(", "),
            v = self.value,
            params = params.join(", "),
            last = n + 1,
        )
    }
    fn delete(&self) -> String {
        format!("DELETE FROM {} WHERE {}", self.table, self.key_match())
    }
}

/// One row as copied between PostgreSQL and a view: `None` is a deleted row.
#[derive(Debug, Clone)]
struct Row {
    tree: &'static str,
    key: Vec<String>,
    value: Option<Vec<u8>>,
}

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    // tokio-postgres errors never contain the connection string.
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    };
    StoreError::Unavailable(text.replace('\n', " "))
}

fn unavailable(what: &str) -> StoreError {
    StoreError::Unavailable(what.to_string())
}

/// Copies rows into a view (and keeps the derived `account_index` in step).
fn apply(view: &SledStore, rows: &[Row]) -> Result<()> {
    for row in rows {
        let key = join_key(&row.key);
        let tree = view.tree(row.tree)?;
        match &row.value {
            Some(v) => {
                tree.insert(key, v.as_slice())?;
            }
            None => {
                tree.remove(key)?;
            }
        }
        if row.tree == "accounts"
            && let [hosting, address] = row.key.as_slice()
        {
            let index = view.tree("account_index")?;
            let ikey = key2(address, hosting);
            match row.value {
                Some(_) => index.insert(ikey, &[][..])?,
                None => index.remove(ikey)?,
            };
        }
    }
    Ok(())
}

/// A tree and a key in it.
type TreeKey = (&'static str, Vec<u8>);

/// Runs `op` on `view` and lists the keys it wrote (tree, key), in order, once each.
fn capture<T>(
    view: &SledStore,
    op: impl FnOnce(&SledStore) -> Result<T>,
) -> Result<(Result<T>, Vec<TreeKey>)> {
    let mut subscribers = Vec::new();
    for name in TREES {
        subscribers.push((*name, view.tree(name)?.watch_prefix(Vec::new())));
    }
    let result = op(view);
    let mut touched: Vec<TreeKey> = Vec::new();
    for (name, mut sub) in subscribers {
        // Every event of the operation was reserved before its write returned: with a
        // zero timeout this drains them and stops.
        while let Ok(event) = sub.next_timeout(Duration::ZERO) {
            let key = event.key().to_vec();
            if !touched.iter().any(|(t, k)| *t == name && *k == key) {
                touched.push((name, key));
            }
        }
    }
    Ok((result, touched))
}

/// The handle; cloning is cheap.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: tokio_postgres::Config,
    max_staleness: Duration,
    handle: tokio::runtime::Handle,
    view: ArcSwap<SledStore>,
    /// Held by whoever changes the view (a write, the listener applying changes, a
    /// reload). The listener only ever `try_lock`s it: it runs on the runtime the writer
    /// waits for.
    state: Mutex<ViewState>,
    connected: AtomicBool,
    down_since: Mutex<Option<Instant>>,
    /// Set when the view may hold what the database does not: reload it.
    dirty: AtomicBool,
    /// The connection of the AUTH failure counters.
    counters: Mutex<Option<Arc<Client>>>,
    /// Who holds a lease: host name and process id.
    node: String,
}

struct ViewState {
    /// The last `changes.seq` the view holds.
    last_seq: i64,
    /// The connection writes use, made on first use and dropped on any error.
    writer: Option<Arc<Client>>,
}

async fn connect(
    config: &tokio_postgres::Config,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(pg_err)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // The connection is gone: `rx` sees the channel close.
    });
    Ok((client, rx))
}

/// Every row of every table, and the sequence they are current at (one snapshot).
async fn load_all(client: &Client) -> Result<(i64, Vec<Row>)> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(pg_err)?;
    let result = async {
        let seq: i64 = client
            .query_one("SELECT coalesce(max(seq), 0) FROM changes", &[])
            .await?
            .get(0);
        let mut rows = Vec::new();
        for t in TABLES {
            for r in client.query(&t.select_all(), &[]).await? {
                let key: Vec<String> = (0..t.keys.len()).map(|i| r.get(i)).collect();
                let value: String = r.get(t.keys.len());
                rows.push(Row {
                    tree: t.tree,
                    key,
                    value: Some(value.into_bytes()),
                });
            }
        }
        Ok::<_, tokio_postgres::Error>((seq, rows))
    }
    .await;
    let _ = client.batch_execute("COMMIT").await;
    result.map_err(pg_err)
}

/// The rows changed after `from`, as they are now, and the last sequence seen.
async fn changes_since(client: &Client, from: i64) -> Result<(i64, Vec<Row>)> {
    let listed = client
        .query(
            "SELECT seq, tree, key FROM changes WHERE seq > $1 ORDER BY seq",
            &[&from],
        )
        .await
        .map_err(pg_err)?;
    let mut last = from;
    let mut keys: Vec<(&'static Table, Vec<String>)> = Vec::new();
    for r in &listed {
        last = last.max(r.get::<_, i64>(0));
        let tree: String = r.get(1);
        let key: Vec<String> = r.get(2);
        let t = table(&tree)?;
        if !keys.iter().any(|(k, kk)| k.tree == t.tree && *kk == key) {
            keys.push((t, key));
        }
    }
    let mut rows = Vec::new();
    for (t, key) in keys {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = key
            .iter()
            .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let found = client
            .query_opt(&t.select_one(), &params)
            .await
            .map_err(pg_err)?;
        let value = found.map(|r| r.get::<_, String>(t.keys.len()).into_bytes());
        rows.push(Row {
            tree: t.tree,
            key,
            value,
        });
    }
    Ok((last, rows))
}

/// Writes `rows`, logs them in `changes` and notifies, inside the open transaction.
/// Returns the last sequence.
async fn write_rows(client: &Client, rows: &[Row], seq: i64) -> Result<i64> {
    let mut last = seq;
    for row in rows {
        let t = table(row.tree)?;
        if row.key.len() != t.keys.len() {
            return Err(StoreError::Corrupt(format!(
                "{} key {:?} does not have {} parts",
                t.tree,
                row.key,
                t.keys.len()
            )));
        }
        let text = match &row.value {
            Some(v) => Some(String::from_utf8(v.clone()).map_err(|_| {
                StoreError::Corrupt(format!("{} {:?}: value is not UTF-8", t.tree, row.key))
            })?),
            None => None,
        };
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = row
            .key
            .iter()
            .map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        match &text {
            Some(text) => {
                params.push(text);
                client.execute(&t.upsert(), &params).await.map_err(pg_err)?;
            }
            None => {
                client.execute(&t.delete(), &params).await.map_err(pg_err)?;
            }
        }
        last = client
            .query_one(
                "INSERT INTO changes (tree, key) VALUES ($1, $2) RETURNING seq",
                &[&t.tree, &row.key],
            )
            .await
            .map_err(pg_err)?
            .get(0);
    }
    client
        .execute(
            &format!("DELETE FROM changes WHERE at < now() - interval '{KEEP_CHANGES}'"),
            &[],
        )
        .await
        .map_err(pg_err)?;
    client
        .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &last.to_string()])
        .await
        .map_err(pg_err)?;
    Ok(last)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PgStore {
    /// Starts the backend's runtime thread, connects, migrates the schema, loads the view
    /// and starts following changes. Fails (one line) when the database is unreachable.
    pub fn open(config: PgConfig) -> Result<PgStore> {
        let pg: tokio_postgres::Config = config.url.parse().map_err(|e| {
            StoreError::Invalid(format!(
                "store.url: not a PostgreSQL connection string: {e}"
            ))
        })?;
        let mut pg = pg;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("domauth-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("cannot start the database thread: {e}")))?;
        let handle = runtime.handle().clone();
        // The runtime lives as long as the process: it is parked on a thread of its own
        // (dropping a runtime from async code would panic).
        std::thread::Builder::new()
            .name("domauth-pg".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .map_err(|e| StoreError::Io(format!("cannot start the database thread: {e}")))?;
        let store = PgStore {
            inner: Arc::new(Inner {
                config: pg,
                max_staleness: config.max_staleness,
                handle,
                view: ArcSwap::from_pointee(SledStore::temporary()?),
                state: Mutex::new(ViewState {
                    last_seq: 0,
                    writer: None,
                }),
                connected: AtomicBool::new(false),
                down_since: Mutex::new(None),
                dirty: AtomicBool::new(false),
                counters: Mutex::new(None),
                node: format!(
                    "{}:{}",
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .unwrap_or_default()
                        .trim(),
                    std::process::id()
                ),
            }),
        };
        let inner = store.inner.clone();
        let (seq, rows) = store.block(async move {
            let (client, _notes) = connect(&inner.config).await?;
            schema::migrate(&client).await?;
            load_all(&client).await
        })?;
        store.install(seq, &rows)?;
        store.inner.connected.store(true, Ordering::SeqCst);
        let inner = store.inner.clone();
        store.inner.handle.spawn(sync::run(inner));
        Ok(store)
    }

    /// The current view (reads).
    pub fn view(&self) -> Arc<SledStore> {
        self.inner.view.load_full()
    }

    /// False once the database has been unreachable for longer than `max_staleness`.
    pub fn usable(&self) -> bool {
        if self.inner.connected.load(Ordering::SeqCst) {
            return true;
        }
        match *lock(&self.inner.down_since) {
            Some(since) => since.elapsed() < self.inner.max_staleness,
            None => true,
        }
    }

    /// Runs `fut` on the backend's runtime and waits for it (at most [`OP_TIMEOUT`]).
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.handle.spawn(async move {
            let r = match tokio::time::timeout(OP_TIMEOUT, fut).await {
                Ok(r) => r,
                Err(_) => Err(unavailable("the database did not answer in time")),
            };
            let _ = tx.send(r);
        });
        rx.recv()
            .map_err(|_| unavailable("the database thread stopped"))?
    }

    /// Replaces the view by a new one holding `rows` (a full load at `seq`).
    fn install(&self, seq: i64, rows: &[Row]) -> Result<()> {
        let view = SledStore::temporary()?;
        apply(&view, rows)?;
        let mut state = lock(&self.inner.state);
        self.swap(&mut state, seq, view);
        Ok(())
    }

    fn swap(&self, state: &mut ViewState, seq: i64, view: SledStore) {
        self.inner.view.store(Arc::new(view));
        state.last_seq = seq;
        self.inner.dirty.store(false, Ordering::SeqCst);
    }

    /// The write connection, connecting if needed.
    fn writer(&self, state: &mut ViewState) -> Result<Arc<Client>> {
        if let Some(c) = &state.writer
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let inner = self.inner.clone();
        let client = Arc::new(self.block(async move {
            let (client, _notes) = connect(&inner.config).await?;
            Ok(client)
        })?);
        state.writer = Some(client.clone());
        Ok(client)
    }

    /// Opens a write transaction under the cluster-wide lock and brings the view up to
    /// date; the caller then commits or rolls back.
    fn begin(&self, state: &mut ViewState) -> Result<(Arc<Client>, Arc<SledStore>)> {
        let client = self.writer(state)?;
        let c = client.clone();
        let from = state.last_seq;
        let caught_up = self.block(async move {
            c.batch_execute("BEGIN").await.map_err(pg_err)?;
            c.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .await
                .map_err(pg_err)?;
            changes_since(&c, from).await
        });
        let (seq, rows) = match caught_up {
            Ok(v) => v,
            Err(e) => {
                self.rollback(state, &client);
                return Err(e);
            }
        };
        let view = self.view();
        apply(&view, &rows)?;
        state.last_seq = seq;
        Ok((client, view))
    }

    fn rollback(&self, state: &mut ViewState, client: &Arc<Client>) {
        let c = client.clone();
        if self
            .block(async move { c.batch_execute("ROLLBACK").await.map_err(pg_err) })
            .is_err()
        {
            state.writer = None;
        }
    }

    /// Commits `rows` (already in the view). On failure the view is reloaded from the
    /// database.
    fn commit(&self, state: &mut ViewState, client: &Arc<Client>, rows: Vec<Row>) -> Result<()> {
        let c = client.clone();
        let seq = state.last_seq;
        let result = self.block(async move {
            let last = write_rows(&c, &rows, seq).await?;
            c.batch_execute("COMMIT").await.map_err(pg_err)?;
            Ok(last)
        });
        match result {
            Ok(last) => {
                state.last_seq = last;
                Ok(())
            }
            Err(e) => {
                self.rollback(state, client);
                state.writer = None;
                self.inner.dirty.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Runs a sled operation on the view under the cluster-wide write lock and writes
    /// what it changed to PostgreSQL before returning.
    pub fn write<T>(&self, op: impl FnOnce(&SledStore) -> Result<T>) -> Result<T> {
        let mut state = lock(&self.inner.state);
        let (client, view) = self.begin(&mut state)?;
        let (result, touched) = match capture(&view, op) {
            Ok(v) => v,
            Err(e) => {
                self.rollback(&mut state, &client);
                self.inner.dirty.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        if result.is_err() || touched.is_empty() {
            self.rollback(&mut state, &client);
            return result;
        }
        let mut rows = Vec::new();
        for (tree, key) in touched {
            if DERIVED.contains(&tree) {
                continue;
            }
            let value = view.tree(tree)?.get(&key)?.map(|v| v.to_vec());
            rows.push(Row {
                tree,
                key: split_key(tree, &key)?,
                value,
            });
        }
        self.commit(&mut state, &client, rows)?;
        result
    }

    /// Claims the background check of a domain for this node: true when no other node
    /// holds its lease and nobody checked it since `seen_last_check` (what this node's
    /// view says). The lease ends when the check's result lands (a newer `last_check`,
    /// which also keeps the other nodes off until the next interval) or after `lease`.
    /// The claim takes the row with `FOR UPDATE SKIP LOCKED`: two nodes claiming at once
    /// do not wait for each other, one of them gets it.
    pub fn claim_check(
        &self,
        hosting: &str,
        domain: &str,
        seen_last_check: Option<DateTime<Utc>>,
        lease: Duration,
    ) -> Result<bool> {
        let mut state = lock(&self.inner.state);
        let client = self.writer(&mut state)?;
        let seen = serde_json::to_string(&seen_last_check)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (hosting, domain) = (hosting.to_string(), domain.to_string());
        let owner = self.inner.node.clone();
        let secs = lease.as_secs_f64();
        let claimed = self.block(async move {
            let rows = client
                .query(
                    "UPDATE authorized_domains
                        SET lease_owner = $3, lease_until = now() + make_interval(secs => $4),
                            lease_seen = $5::text::jsonb
                      WHERE (hosting, domain) IN (
                            SELECT hosting, domain FROM authorized_domains
                             WHERE hosting = $1 AND domain = $2
                               AND (lease_until IS NULL OR lease_until < now()
                                    OR lease_seen IS DISTINCT FROM record->'last_check')
                               AND record->'last_check' IS NOT DISTINCT FROM $5::text::jsonb
                               FOR UPDATE SKIP LOCKED)
                  RETURNING 1",
                    &[&hosting, &domain, &owner, &secs, &seen],
                )
                .await
                .map_err(pg_err)?;
            Ok(!rows.is_empty())
        });
        if claimed.is_err() {
            state.writer = None;
        }
        claimed
    }

    /// The connection of the AUTH failure counters (apart from the write connection:
    /// counting never waits for a management write).
    /// While the listener finds the database down, this fails at once (the caller
    /// falls back to its own counters) instead of waiting for a connect timeout.
    fn counters(&self) -> Result<Arc<Client>> {
        if !self.inner.connected.load(Ordering::SeqCst) {
            return Err(unavailable("not connected"));
        }
        let mut slot = lock(&self.inner.counters);
        if let Some(c) = slot.as_ref()
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let inner = self.inner.clone();
        let client = Arc::new(self.block(async move {
            let (client, _notes) = connect(&inner.config).await?;
            Ok(client)
        })?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Counts one AUTH failure under each `(kind, key)` in the shared table (a window
    /// of `window` starting at the first failure); returns the counts now.
    pub fn record_auth_failure(&self, keys: &[(&str, &str)], window: Duration) -> Result<Vec<u32>> {
        let client = self.counters()?;
        let keys: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let secs = window.as_secs_f64();
        self.block(async move {
            let mut counts = Vec::new();
            for (kind, key) in &keys {
                let n: i32 = client
                    .query_one(
                        "INSERT INTO auth_failures AS f (kind, key, window_start, failures)
                         VALUES ($1, $2, now(), 1)
                         ON CONFLICT (kind, key) DO UPDATE SET
                           window_start = CASE WHEN f.window_start < now() - make_interval(secs => $3)
                                               THEN now() ELSE f.window_start END,
                           failures = CASE WHEN f.window_start < now() - make_interval(secs => $3)
                                           THEN 1 ELSE f.failures + 1 END
                         RETURNING failures",
                        &[kind, key, &secs],
                    )
                    .await
                    .map_err(pg_err)?
                    .get(0);
                counts.push(u32::try_from(n).unwrap_or(0));
            }
            // Old windows go; the table stays as small as the attack.
            client
                .execute(
                    "DELETE FROM auth_failures
                      WHERE window_start < now() - make_interval(secs => $1) - interval '1 minute'",
                    &[&secs],
                )
                .await
                .map_err(pg_err)?;
            Ok(counts)
        })
    }

    /// The shared AUTH failure count of `(kind, key)` in the current window.
    pub fn auth_failures(&self, kind: &str, key: &str, window: Duration) -> Result<u32> {
        let client = self.counters()?;
        let (kind, key) = (kind.to_string(), key.to_string());
        let secs = window.as_secs_f64();
        self.block(async move {
            let row = client
                .query_opt(
                    "SELECT failures FROM auth_failures
                      WHERE kind = $1 AND key = $2
                        AND window_start >= now() - make_interval(secs => $3)",
                    &[&kind, &key, &secs],
                )
                .await
                .map_err(pg_err)?;
            Ok(row.map_or(0, |r| u32::try_from(r.get::<_, i32>(0)).unwrap_or(0)))
        })
    }

    /// Loads a dump; the database must hold no authorization data yet.
    pub fn import(&self, dump: &Dump) -> Result<usize> {
        let raw = dump.raw()?;
        let mut state = lock(&self.inner.state);
        let (client, view) = self.begin(&mut state)?;
        if !view.is_empty()? {
            self.rollback(&mut state, &client);
            return Err(StoreError::Conflict(
                "the target store is not empty: import only into a new store".into(),
            ));
        }
        let mut rows = Vec::new();
        for (tree, entries) in raw {
            if DERIVED.contains(&tree) {
                continue;
            }
            for (key, value) in entries {
                rows.push(Row {
                    tree,
                    key: split_key(tree, &key)?,
                    value: Some(value),
                });
            }
        }
        if let Err(e) = apply(&view, &rows) {
            self.rollback(&mut state, &client);
            self.inner.dirty.store(true, Ordering::SeqCst);
            return Err(e);
        }
        self.commit(&mut state, &client, rows)?;
        Ok(dump.records())
    }
}

mod sync {
    //! The listener: follows the changes log, reconnects, reloads.

    use super::*;

    fn mark_up(inner: &Inner) {
        inner.connected.store(true, Ordering::SeqCst);
        *lock(&inner.down_since) = None;
    }

    fn mark_down(inner: &Inner) {
        inner.connected.store(false, Ordering::SeqCst);
        let mut since = lock(&inner.down_since);
        if since.is_none() {
            *since = Some(Instant::now());
        }
    }

    /// Applies the changes after the view's sequence. Skipped (false) when a writer holds
    /// the view: it catches up itself, and the next tick comes soon.
    async fn follow(store: &PgStore, client: &Client) -> Result<bool> {
        let from = match store.inner.state.try_lock() {
            Ok(state) => state.last_seq,
            Err(_) => return Ok(false),
        };
        let (seq, rows) = changes_since(client, from).await?;
        let Ok(mut state) = store.inner.state.try_lock() else {
            return Ok(false);
        };
        if state.last_seq != from {
            return Ok(false); // a writer moved on meanwhile; read again next time
        }
        apply(&store.view(), &rows)?;
        state.last_seq = seq;
        Ok(true)
    }

    async fn reload(store: &PgStore, client: &Client) -> Result<()> {
        let (seq, rows) = load_all(client).await?;
        let view = SledStore::temporary()?;
        apply(&view, &rows)?;
        loop {
            if let Ok(mut state) = store.inner.state.try_lock() {
                if seq >= state.last_seq || store.inner.dirty.load(Ordering::SeqCst) {
                    store.swap(&mut state, seq, view);
                }
                // else: a writer committed after our snapshot; following picks it up.
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn session(store: &PgStore) -> Result<()> {
        let (client, mut notes) = connect(&store.inner.config).await?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(pg_err)?;
        tokio::time::timeout(OP_TIMEOUT, reload(store, &client))
            .await
            .map_err(|_| unavailable("reload timed out"))??;
        mark_up(&store.inner);
        let mut tick = tokio::time::interval(TICK);
        let mut last_full = Instant::now();
        loop {
            tokio::select! {
                note = notes.recv() => {
                    if note.is_none() {
                        return Err(unavailable("the connection closed"));
                    }
                    while notes.try_recv().is_ok() {}
                }
                _ = tick.tick() => {}
            }
            let step = async {
                if store.inner.dirty.load(Ordering::SeqCst) || last_full.elapsed() >= FULL_RELOAD {
                    reload(store, &client).await?;
                    last_full = Instant::now();
                } else {
                    follow(store, &client).await?;
                }
                Ok::<_, StoreError>(())
            };
            tokio::time::timeout(OP_TIMEOUT, step)
                .await
                .map_err(|_| unavailable("the database did not answer in time"))??;
            mark_up(&store.inner);
        }
    }

    pub(super) async fn run(inner: Arc<Inner>) {
        let store = PgStore { inner };
        loop {
            let _ = session(&store).await;
            mark_down(&store.inner);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled::test_util::strings;

    #[test]
    fn capture_lists_every_key_an_operation_writes() {
        let view = SledStore::temporary().unwrap();
        let (r, touched) = capture(&view, |s| {
            s.add_hosting("acme", &strings(&["acme.example"]))
        })
        .unwrap();
        r.unwrap();
        let names: Vec<_> = touched.iter().map(|(t, _)| *t).collect();
        assert_eq!(names, ["hostings", "own_domains"]);
        view.add_domain("acme", "example.org", "tok").unwrap();
        let (r, touched) = capture(&view, |s| s.add_account("acme", "a@example.org")).unwrap();
        assert!(r.is_err(), "pending domain: no account");
        assert!(touched.is_empty());
        view.update_domain("acme", "example.org", |d| {
            d.status = crate::DomainStatus::Verified
        })
        .unwrap();
        let (r, touched) = capture(&view, |s| s.add_account("acme", "a@example.org")).unwrap();
        r.unwrap();
        let names: Vec<_> = touched.iter().map(|(t, _)| *t).collect();
        assert_eq!(names, ["accounts", "account_index"]);
        let (r, touched) = capture(&view, |s| s.delete_domain("acme", "example.org")).unwrap();
        assert_eq!(r.unwrap(), 1);
        let names: Vec<_> = touched.iter().map(|(t, _)| *t).collect();
        assert_eq!(names, ["domains", "accounts", "account_index"]);
    }

    #[test]
    fn apply_keeps_the_account_index() {
        let view = SledStore::temporary().unwrap();
        let row = |value: Option<&str>| Row {
            tree: "accounts",
            key: strings(&["acme", "a@example.org"]),
            value: value.map(|v| v.as_bytes().to_vec()),
        };
        apply(&view, &[row(Some("{}"))]).unwrap();
        assert_eq!(
            view.hostings_with_account("a@example.org").unwrap(),
            ["acme"]
        );
        apply(&view, &[row(None)]).unwrap();
        assert!(
            view.hostings_with_account("a@example.org")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn sql_is_built_from_the_table_list() {
        let t = table("domains").unwrap();
        assert_eq!(
            t.upsert(),
            "INSERT INTO authorized_domains (hosting, domain, record) VALUES ($1, $2, $3::text::jsonb) \
             ON CONFLICT (hosting, domain) DO UPDATE SET record = EXCLUDED.record"
        );
        assert_eq!(
            t.select_one(),
            "SELECT hosting, domain, record::text FROM authorized_domains WHERE hosting = $1 AND domain = $2"
        );
        assert!(table("account_index").is_err());
    }
}
