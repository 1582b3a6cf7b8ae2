//! Opening the authorization data per `[store]` (SPEC §11), and `domauth store
//! export` / `import`, which work on the configured store directly (not through
//! the admin socket): a sled store must not be in use by `serve` then; a
//! PostgreSQL one may be (the running nodes see an import within seconds).

use crate::config::{Config, StoreBackend, StoreConfig};
use domauth_store::{Dump, Store, StoreError};
use std::io::{Read, Write};

/// The shared store when `backend = "postgres"`; `None` for sled, which
/// `server` opens in `data_dir` itself.
pub fn shared(config: &StoreConfig) -> Result<Option<Store>, String> {
    match config.backend {
        StoreBackend::Sled => Ok(None),
        StoreBackend::Postgres => open_postgres(config).map(Some),
    }
}

#[cfg(feature = "postgres")]
fn open_postgres(config: &StoreConfig) -> Result<Store, String> {
    let url = config.url()?;
    let pg = domauth_store::PgConfig {
        url,
        max_staleness: config.max_staleness.get(),
    };
    Store::open_postgres(pg).map_err(|e| match e {
        StoreError::Invalid(m) => m,
        e => format!("store.url: cannot open the PostgreSQL store: {e}"),
    })
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(_: &StoreConfig) -> Result<Store, String> {
    Err("store.backend: this domauth was built without PostgreSQL support (cargo feature \"postgres\")".into())
}

/// The configured store, for the offline commands.
fn open(config: &Config) -> Result<Store, String> {
    if let Some(store) = shared(&config.store)? {
        return Ok(store);
    }
    let dir = config.server.data_dir.join("store");
    Store::open(&dir).map_err(|e| match e {
        StoreError::Locked(_) => format!(
            "server.data_dir: the store in {} is in use: stop domauth serve first (sled allows one process)",
            dir.display()
        ),
        e => format!(
            "server.data_dir: cannot open the store in {}: {e}",
            dir.display()
        ),
    })
}

/// `domauth store export`: the authorization data as JSON on stdout.
pub fn export(config: &Config) -> Result<(), String> {
    let store = open(config)?;
    let dump = store.export().map_err(|e| format!("export: {e}"))?;
    let mut text = serde_json::to_string_pretty(&dump).map_err(|e| format!("export: {e}"))?;
    text.push('\n');
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| format!("export: cannot write to stdout: {e}"))
}

/// `domauth store import`: loads a dump from stdin into the (empty) store.
pub fn import(config: &Config) -> Result<(), String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| format!("import: cannot read stdin: {e}"))?;
    let dump: Dump = serde_json::from_str(&text)
        .map_err(|e| format!("import: not a domauth store dump: {e}"))?;
    let store = open(config)?;
    let n = store.import(&dump).map_err(|e| format!("import: {e}"))?;
    store.flush().map_err(|e| format!("import: {e}"))?;
    println!("imported {n} records into the {} store", store.backend());
    Ok(())
}
