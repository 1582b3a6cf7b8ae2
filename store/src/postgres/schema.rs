//! The PostgreSQL schema, created and migrated at start-up by numbered migrations. All of
//! them run in one transaction that first takes `pg_advisory_xact_lock`, so several nodes
//! starting at once migrate one after the other (the second finds the work done).
//!
//! Tables are typed by their key columns; the record itself is one `jsonb` column holding
//! the same serde JSON as the sled store. Fields other records gain later (DKIM keys,
//! SPF/DMARC findings, grant kinds...) travel inside `record` with no schema change: add a
//! migration only for a new *tree* (a new table) or a column the database must index.

use super::{Client, pg_err};
use crate::Result;

/// The advisory lock key of migrations ("domauth1" as ASCII, arbitrary but fixed).
const MIGRATE_LOCK: i64 = 0x646f_6d61_7574_6831;

/// Migration `n` is applied once, in order; never edit a released one, add the next.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE hostings (
         name text PRIMARY KEY,
         record jsonb NOT NULL
     );
     CREATE TABLE own_domains (
         domain text PRIMARY KEY,
         hosting text NOT NULL
     );
     CREATE TABLE mailboxes (
         address text PRIMARY KEY,
         record jsonb NOT NULL
     );
     CREATE TABLE authorized_domains (
         hosting text NOT NULL,
         domain text NOT NULL,
         record jsonb NOT NULL,
         PRIMARY KEY (hosting, domain)
     );
     CREATE TABLE accounts (
         hosting text NOT NULL,
         address text NOT NULL,
         record jsonb NOT NULL,
         PRIMARY KEY (hosting, address)
     );
     CREATE INDEX accounts_by_address ON accounts (address);
     -- Every committed write appends the keys it changed; nodes follow this log (woken by
     -- NOTIFY domauth_store) to keep their in-memory views current.
     CREATE TABLE changes (
         seq bigserial PRIMARY KEY,
         tree text NOT NULL,
         key text[] NOT NULL,
         at timestamptz NOT NULL DEFAULT now()
     );
     CREATE INDEX changes_at ON changes (at);",
    ),
    (
        2,
        // The background check of a domain runs on one node at a time: a node claims
        // it by taking this lease (see `PgStore::claim_check`). The lease ends when the
        // check's result lands (`last_check` differs from `lease_seen`), or when it
        // expires: a node that dies mid-check loses it.
        "ALTER TABLE authorized_domains
             ADD COLUMN lease_owner text,
             ADD COLUMN lease_until timestamptz,
             ADD COLUMN lease_seen jsonb;",
    ),
    (
        3,
        // AUTH failures counted across nodes (SPEC §4 limits, shared): counters only,
        // so UNLOGGED (not crash-safe, not replicated, cheap to write).
        "CREATE UNLOGGED TABLE auth_failures (
             kind text NOT NULL,
             key text NOT NULL,
             window_start timestamptz NOT NULL,
             failures integer NOT NULL,
             PRIMARY KEY (kind, key)
         );",
    ),
    (
        4,
        // DKIM keys of authorized domains (SPEC §9; the record holds the private keys,
        // which never leave the servers).
        "CREATE TABLE dkim_keys (
             hosting text NOT NULL,
             domain text NOT NULL,
             record jsonb NOT NULL,
             PRIMARY KEY (hosting, domain)
         );",
    ),
    (
        5,
        // API bearer tokens of hostings (SPEC §8): the hosting and the SHA-256 of the
        // token's secret, keyed by the token's id.
        "CREATE TABLE api_tokens (
             id text PRIMARY KEY,
             record jsonb NOT NULL
         );",
    ),
];

/// Brings the schema to the newest version. Returns the migrations applied now.
pub(super) async fn migrate(client: &Client) -> Result<Vec<i32>> {
    client.batch_execute("BEGIN").await.map_err(pg_err)?;
    let result = async {
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS domauth_schema (
                     version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await?;
        let have: Vec<i32> = client
            .query("SELECT version FROM domauth_schema", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut applied = Vec::new();
        for (version, sql) in MIGRATIONS {
            if have.contains(version) {
                continue;
            }
            client.batch_execute(sql).await?;
            client
                .execute(
                    "INSERT INTO domauth_schema (version) VALUES ($1)",
                    &[version],
                )
                .await?;
            applied.push(*version);
        }
        Ok::<_, tokio_postgres::Error>(applied)
    }
    .await;
    match result {
        Ok(applied) => {
            client.batch_execute("COMMIT").await.map_err(pg_err)?;
            Ok(applied)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(pg_err(e))
        }
    }
}
