//! `SIGHUP` (`systemctl reload`): re-read the TLS certificate and key
//! (SPEC §10). New sessions get the new pair, open ones go on with theirs;
//! a pair that fails to load keeps the old one and logs one error line.

use std::sync::Arc;

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::tls::CertStore;

/// Installs the SIGHUP handler now (its default action would end the
/// process), then reloads on each signal until shutdown.
pub fn on_sighup(certs: Arc<CertStore>, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("signals: {e}"))?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                _ = shutdown.changed() => return,
            }
            let store = certs.clone();
            let result = tokio::task::spawn_blocking(move || store.reload())
                .await
                .unwrap_or_else(|e| Err(format!("tls reload: {e}")));
            match result {
                Ok(()) => {
                    tracing::info!(event = "tls_reloaded", "SIGHUP: TLS certificate reloaded")
                }
                Err(e) => tracing::error!(
                    event = "tls_reload_failed",
                    error = %e,
                    "SIGHUP: TLS certificate not reloaded; the previous one stays in use"
                ),
            }
        }
    });
    Ok(())
}
