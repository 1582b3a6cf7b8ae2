//! The delivery scheduler (Postfix's `qmgr`): picks due messages, hands them
//! to a bounded set of delivery workers (each keeps one upstream connection
//! open), records each recipient's outcome, retries with exponential backoff
//! and bounces what failed for good.
//!
//! Scheduling is event-driven: a new message wakes a worker at once; a
//! deferred one gets a timer for its next attempt. On start every queued
//! message is scheduled again, so nothing accepted is forgotten by a restart.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use domauth_store::{QueueRecipient, QueuedMessage, RecipientStatus, Store};
use tokio::sync::{mpsc, watch};

use crate::{
    bounce::{self, FailedRecipient},
    spool::{Spool, new_queue_id},
    upstream::{Connection, RcptResult, Upstream},
};

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_lifetime: Duration,
    pub concurrency: usize,
    pub hostname: String,
}

/// The delay before attempt `attempts + 1`: `initial`, doubling per failed
/// attempt, never more than `max`.
pub fn backoff(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    initial.saturating_mul(1u32 << exp).min(max)
}

/// Wakes the scheduler for a message id. Cheap to clone.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<String>,
}

impl QueueHandle {
    pub fn wake(&self, id: String) {
        let _ = self.tx.send(id);
    }

    /// Wakes the scheduler for `id` after `delay`.
    pub fn wake_after(&self, id: String, delay: Duration) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(id);
        });
    }
}

/// The receiving half, given to [`start`] once the spool exists (the spool
/// wakes the queue, the queue writes bounces through the spool).
pub struct QueueReceiver(mpsc::UnboundedReceiver<String>);

pub fn channel() -> (QueueHandle, QueueReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (QueueHandle { tx }, QueueReceiver(rx))
}

struct Shared {
    store: Store,
    spool: Arc<Spool>,
    upstream: Upstream,
    settings: QueueSettings,
    handle: QueueHandle,
    /// Ids a worker is delivering right now: a second wake for the same id
    /// (a `queue retry` racing a timer) must not deliver it twice at once.
    in_flight: Mutex<HashSet<String>>,
}

/// Starts the workers and re-schedules everything already queued.
pub fn start(
    store: Store,
    spool: Arc<Spool>,
    upstream: Upstream,
    settings: QueueSettings,
    handle: QueueHandle,
    receiver: QueueReceiver,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let queued = store
        .queued()
        .map_err(|e| format!("cannot read the queue: {e}"))?;
    let now = Utc::now();
    for msg in &queued {
        let delay = (msg.next_attempt - now).to_std().unwrap_or(Duration::ZERO);
        handle.wake_after(msg.id.clone(), delay);
    }
    if !queued.is_empty() {
        tracing::info!(
            event = "queue_resumed",
            messages = queued.len(),
            "resuming queued messages"
        );
    }
    let concurrency = settings.concurrency;
    let shared = Arc::new(Shared {
        store,
        spool,
        upstream,
        settings,
        handle,
        in_flight: Mutex::new(HashSet::new()),
    });
    let receiver = Arc::new(tokio::sync::Mutex::new(receiver.0));
    Ok((0..concurrency)
        .map(|_| tokio::spawn(worker(shared.clone(), receiver.clone(), shutdown.clone())))
        .collect())
}

/// How long a worker keeps an idle upstream connection open.
const IDLE_UPSTREAM: Duration = Duration::from_secs(30);

async fn worker(
    shared: Arc<Shared>,
    receiver: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn: Option<Connection> = None;
    loop {
        let next = tokio::select! {
            id = async {
                let mut rx = receiver.lock().await;
                tokio::time::timeout(IDLE_UPSTREAM, rx.recv()).await
            } => id,
            _ = shutdown.changed() => break,
        };
        let id = match next {
            Ok(Some(id)) => id,
            Ok(None) => break,
            Err(_) => {
                // Idle: let the smarthost free its slot.
                close(conn.take()).await;
                continue;
            }
        };
        {
            let mut in_flight = lock(&shared.in_flight);
            if !in_flight.insert(id.clone()) {
                continue;
            }
        }
        if let Err(e) = deliver(&shared, &id, &mut conn).await {
            tracing::error!(event = "delivery_error", id = %id, error = %e, "queue error");
            // Try again later rather than forget the message.
            shared
                .handle
                .wake_after(id.clone(), shared.settings.retry_initial);
        }
        lock(&shared.in_flight).remove(&id);
    }
    close(conn).await;
}

async fn close(conn: Option<Connection>) {
    if let Some(c) = conn {
        c.quit().await;
    }
}

/// One delivery attempt of one message.
async fn deliver(shared: &Shared, id: &str, conn: &mut Option<Connection>) -> Result<(), String> {
    let store = &shared.store;
    let Some(mut msg) = store.queued_message(id).map_err(|e| e.to_string())? else {
        return Ok(()); // delivered or deleted meanwhile
    };
    let now = Utc::now();
    if msg.next_attempt > now + chrono::Duration::seconds(1) {
        return Ok(()); // a stale wake-up; its own timer is pending
    }
    let body = store
        .queue_body(id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("message {id} has no body"))?;

    let pending: Vec<usize> = msg
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == RecipientStatus::Pending)
        .map(|(i, _)| i)
        .collect();
    if !pending.is_empty() {
        let addresses: Vec<String> = pending
            .iter()
            .map(|&i| msg.recipients[i].address.clone())
            .collect();
        let results = shared
            .upstream
            .send(conn, &msg.from, &addresses, &body)
            .await;
        msg.attempts += 1;
        let mut last_error = None;
        for (&i, result) in pending.iter().zip(results) {
            let r = &mut msg.recipients[i];
            let (status, text) = match result {
                RcptResult::Delivered(t) => (RecipientStatus::Delivered, t),
                RcptResult::Failed(t) => (RecipientStatus::Failed, t),
                RcptResult::Deferred(t) => {
                    last_error = Some(t.clone());
                    (RecipientStatus::Pending, t)
                }
            };
            tracing::info!(
                event = "delivery_attempt",
                id = %msg.id,
                rcpt = %r.address,
                attempt = msg.attempts,
                status = ?status,
                reply = %text,
                upstream = %shared.upstream.describe(),
                "delivery attempt"
            );
            r.status = status;
            r.last_reply = Some(text);
        }
        msg.last_error = last_error;
    }

    let age = (Utc::now() - msg.received_at).to_std().unwrap_or_default();
    if age >= shared.settings.max_lifetime {
        let why = msg.last_error.clone().unwrap_or_else(|| "no reply".into());
        for r in msg
            .recipients
            .iter_mut()
            .filter(|r| r.status == RecipientStatus::Pending)
        {
            r.status = RecipientStatus::Failed;
            // RFC 3463 5.4.7: delivery time expired.
            r.last_reply = Some(format!(
                "554 5.4.7 Delivery time expired: the message was {} in the queue; last error: {why}",
                humantime::format_duration(shared.settings.max_lifetime)
            ));
        }
    }
    // Failures are bounced right after the attempt that found them, not
    // when the last deferred recipient of the message is settled.
    bounce_new_failures(shared, &mut msg, &body).await?;

    let still_pending = msg
        .recipients
        .iter()
        .any(|r| r.status == RecipientStatus::Pending);
    if !still_pending {
        match store.dequeue(&msg.id) {
            Ok(()) | Err(domauth_store::StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        let failed = msg
            .recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Failed)
            .count();
        tracing::info!(
            event = "message_done",
            id = %msg.id,
            delivered = msg.recipients.len() - failed,
            failed,
            "removed from queue"
        );
        return Ok(());
    }
    let delay = backoff(
        msg.attempts,
        shared.settings.retry_initial,
        shared.settings.retry_max,
    );
    msg.next_attempt =
        Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1));
    match store.update_queued(&msg) {
        Ok(()) => shared.handle.wake_after(msg.id.clone(), delay),
        Err(domauth_store::StoreError::NotFound(_)) => {} // deleted meanwhile
        Err(e) => return Err(e.to_string()),
    }
    Ok(())
}

/// Queues one DSN for the failed recipients not bounced yet, and marks them
/// bounced. None for a null sender, and never for a bounce (RFC 5321
/// §4.5.5). The DSN is durable before the mark is written: a crash in
/// between repeats the DSN, it never loses it.
async fn bounce_new_failures(
    shared: &Shared,
    msg: &mut QueuedMessage,
    body: &[u8],
) -> Result<(), String> {
    let fresh: Vec<usize> = msg
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == RecipientStatus::Failed && !r.bounced)
        .map(|(i, _)| i)
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    if msg.from.is_empty() || msg.is_bounce {
        tracing::info!(event = "dropped", id = %msg.id, failed = fresh.len(), "undeliverable, no bounce (null sender or bounce)");
    } else {
        let failed: Vec<FailedRecipient<'_>> = fresh
            .iter()
            .map(|&i| {
                let r = &msg.recipients[i];
                FailedRecipient {
                    address: &r.address,
                    diagnostic: r.last_reply.as_deref().unwrap_or("delivery failed"),
                }
            })
            .collect();
        let now = Utc::now();
        let dsn = bounce::build(&shared.settings.hostname, msg, body, &failed, now);
        let record = QueuedMessage {
            id: new_queue_id(),
            from: String::new(),
            recipients: vec![QueueRecipient {
                address: msg.from.clone(),
                status: RecipientStatus::Pending,
                last_reply: None,
                bounced: false,
            }],
            size: dsn.len() as u64,
            received_at: now,
            login: None,
            attempts: 0,
            next_attempt: now,
            last_error: None,
            is_bounce: true,
        };
        tracing::info!(event = "bounce", id = %msg.id, bounce_id = %record.id, to = %msg.from, failed = failed.len(), "bouncing");
        shared.spool.insert(record, &dsn).await?;
    }
    for i in fresh {
        msg.recipients[i].bounced = true;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs;
        let cases = [
            (0, 60),
            (1, 60),
            (2, 120),
            (3, 240),
            (6, 1920),
            (7, 3600),
            (100, 3600),
        ];
        for (attempts, expect) in cases {
            assert_eq!(
                backoff(attempts, s(60), s(3600)),
                s(expect),
                "attempt {attempts}"
            );
        }
    }
}
