//! `hold`: open N idle sessions and keep them open for T seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::client::{self, TlsMode};

pub const MAX_CONNECTIONS: usize = 20_000;
const NOOP_EVERY: Duration = Duration::from_secs(60);
/// Connections being set up at once (avoids overflowing the server's accept backlog).
const SETUP_CONCURRENCY: usize = 256;

pub struct HoldOpts {
    pub server: SocketAddr,
    pub tls: TlsMode,
    pub connections: usize,
    pub auth: Option<(String, String)>,
    pub seconds: u64,
    pub ready_file: Option<PathBuf>,
    pub json: bool,
}

pub async fn run(opts: HoldOpts) -> Result<()> {
    if opts.connections == 0 || opts.connections > MAX_CONNECTIONS {
        bail!("--connections must be 1..={MAX_CONNECTIONS}");
    }
    if opts.seconds > 24 * 3600 {
        bail!("--seconds must be <= 86400");
    }
    client::check_loopback(&opts.server)?;
    let have = crate::raise_nofile(opts.connections as u64 + 256);
    if have < opts.connections as u64 + 64 {
        eprintln!(
            "hold: warning: RLIMIT_NOFILE is {have}; raise it (ulimit -n) to hold {} connections",
            opts.connections
        );
    }
    let tls_cfg = client::tls_config()?;
    let sem = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let auth = Arc::new(opts.auth.clone());
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..opts.connections {
        let sem = sem.clone();
        let tls_cfg = tls_cfg.clone();
        let ready_tx = ready_tx.clone();
        let mut stop_rx = stop_rx.clone();
        let auth = auth.clone();
        let (server, tls) = (opts.server, opts.tls);
        set.spawn(async move {
            let permit = sem.acquire_owned().await;
            let a = auth
                .as_ref()
                .as_ref()
                .map(|(l, p)| (l.as_str(), p.as_str()));
            let mut sess = match client::establish(server, tls, &tls_cfg, a).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return false;
                }
            };
            drop(permit);
            let _ = ready_tx.send(Ok(()));
            loop {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    _ = tokio::time::sleep(NOOP_EVERY) => {
                        if sess.noop().await.is_err() {
                            return false;
                        }
                    }
                }
            }
            // Alive at the end means: it still answers NOOP.
            sess.noop().await.is_ok()
        });
    }
    drop(ready_tx);
    let mut opened = 0usize;
    let mut failed = 0usize;
    let mut errors: Vec<String> = Vec::new();
    while let Some(r) = ready_rx.recv().await {
        match r {
            Ok(()) => opened += 1,
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
        if opened + failed == opts.connections {
            break;
        }
    }
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "hold: opened {opened}/{} in {setup_secs:.1} s ({failed} failed); holding {} s",
        opts.connections, opts.seconds
    );
    for e in &errors {
        eprintln!("hold: error: {e}");
    }
    if let Some(p) = &opts.ready_file {
        let mut tmp = p.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, format!("{opened}\n"))?;
        std::fs::rename(&tmp, p)?;
    }
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    let _ = stop_tx.send(true);
    let mut open_at_end = 0usize;
    while let Some(r) = set.join_next().await {
        if matches!(r, Ok(true)) {
            open_at_end += 1;
        }
    }
    if opts.json {
        println!(
            "{}",
            serde_json::json!({
                "requested": opts.connections,
                "opened": opened,
                "failed": failed,
                "open_at_end": open_at_end,
                "setup_seconds": crate::stats::r3(setup_secs),
                "errors": errors,
            })
        );
    } else {
        println!(
            "hold: {open_at_end} of {} connections open at the end (opened {opened}, failed {failed})",
            opts.connections
        );
    }
    Ok(())
}
