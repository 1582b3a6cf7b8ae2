//! systemd's notify protocol (`Type=notify`, sd_notify(3)): `READY=1` once
//! the relay serves, `STOPPING=1` when it begins to shut down, `WATCHDOG=1`
//! at half the `WatchdogSec` period, and a `STATUS=` line with the open
//! sessions and the queue size that `systemctl status` shows.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op. A
//! failed send is logged at debug level only: the service manager going
//! away must never stop the relay.

use std::{path::PathBuf, sync::Arc, time::Duration};

use sd_notify::NotifyState;
use tokio::sync::{Semaphore, watch};

/// How often `STATUS=` is refreshed (at most; as often as the watchdog
/// pings when its period is shorter).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Whether a service manager listens (`NOTIFY_SOCKET` is set).
fn managed() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Every listener is bound and the store is open.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Shutdown began: no new connections; open sessions may finish.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: open sessions may finish"),
    ]);
}

/// What the periodic `STATUS=` line reports: open sessions are the taken
/// permits of the connection semaphore, the queue size is the number of
/// messages (`*.msg`) in the queue directory.
pub struct StatusSource {
    pub connections: Arc<Semaphore>,
    pub max_connections: usize,
    pub queue_dir: PathBuf,
}

impl StatusSource {
    fn sessions(&self) -> usize {
        self.max_connections
            .saturating_sub(self.connections.available_permits())
    }
}

/// Counts queued messages without reading them.
fn queue_size(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".msg")))
                .count()
        })
        .unwrap_or(0)
}

/// The status line, e.g. `3 sessions, 12 queued`.
pub fn status_line(sessions: usize, queued: usize) -> String {
    let s = if sessions == 1 { "" } else { "s" };
    format!("{sessions} session{s}, {queued} queued")
}

/// Under systemd: refreshes `STATUS=` and, when the unit sets `WatchdogSec`
/// (`WATCHDOG_USEC` in the environment), pings the watchdog at half the
/// period, until shutdown. The watchdog ping runs on the async runtime on
/// purpose: a stuck runtime stops it, and systemd restarts the relay.
pub fn spawn(source: StatusSource, mut shutdown: watch::Receiver<bool>) {
    if !managed() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2);
    if let Some(period) = watchdog {
        tracing::info!(
            event = "watchdog",
            period_ms = period.as_millis() as u64,
            "systemd watchdog on"
        );
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => send(&[NotifyState::Watchdog]),
                    _ = shutdown.changed() => return,
                }
            }
        });
    }
    let every = watchdog.map_or(STATUS_INTERVAL, |p| p.min(STATUS_INTERVAL));
    let source = Arc::new(source);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        // The first tick is immediate and READY=1 already said "serving".
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let s = source.clone();
            let queued = tokio::task::spawn_blocking(move || queue_size(&s.queue_dir))
                .await
                .unwrap_or(0);
            let line = status_line(source.sessions(), queued);
            send(&[NotifyState::Status(&line)]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        for (sessions, queued, line) in [
            (0, 0, "0 sessions, 0 queued"),
            (1, 5, "1 session, 5 queued"),
            (12, 1, "12 sessions, 1 queued"),
        ] {
            assert_eq!(status_line(sessions, queued), line);
        }
    }

    #[test]
    fn queue_size_counts_messages_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.msg", "a.st", "b.msg", "c.tmp"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(queue_size(dir.path()), 2);
        assert_eq!(queue_size(&dir.path().join("missing")), 0);
    }
}
