//! The queue boundary: the one place that puts messages into the queue and
//! makes them durable. Nothing before it knows about upstream; nothing after
//! it knows about the client (Postfix's split between smtpd/cleanup and qmgr).
//!
//! Durability uses group commit: a writer stores its message (no fsync) and
//! asks the committer for a flush; the committer takes every request that
//! arrived meanwhile and covers all of them with one sled flush (fsync).
//! Nobody gets an answer before a flush that started after their write.

use std::sync::Arc;

use chrono::Utc;
use domauth_store::{QueueRecipient, QueuedMessage, RecipientStatus, Store};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::{queue::QueueHandle, smtp::session::Accepted};

type CommitRequest = oneshot::Sender<Result<(), String>>;

pub struct Spool {
    store: Store,
    commits: mpsc::UnboundedSender<CommitRequest>,
    queue: QueueHandle,
}

/// A queue id: the arrival time in microseconds (hex, so ids sort by
/// arrival) and 20 random bits against collisions within a microsecond.
pub fn new_queue_id() -> String {
    let micros = Utc::now().timestamp_micros().max(0) as u64;
    let random: u32 = rand::rng().random_range(0..1 << 20);
    format!("{micros:013X}{random:05X}")
}

impl Spool {
    pub fn start(store: Store, queue: QueueHandle) -> Arc<Spool> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(committer(store.clone(), rx));
        Arc::new(Spool {
            store,
            commits: tx,
            queue,
        })
    }

    /// Stores an accepted message durably, then hands it to delivery.
    /// `Ok` means the message is on disk: only then may the client get 250.
    pub async fn accept(&self, accepted: Accepted) -> Result<(), String> {
        let now = Utc::now();
        let record = QueuedMessage {
            id: accepted.queue_id.clone(),
            from: accepted.envelope.from,
            recipients: accepted
                .envelope
                .recipients
                .into_iter()
                .map(|address| QueueRecipient {
                    address,
                    status: RecipientStatus::Pending,
                    last_reply: None,
                    bounced: false,
                })
                .collect(),
            size: accepted.message.len() as u64,
            received_at: now,
            login: Some(accepted.login),
            attempts: 0,
            next_attempt: now,
            last_error: None,
            is_bounce: false,
        };
        self.insert(record, &accepted.message).await
    }

    /// Queues a message the relay made itself (a bounce).
    pub async fn insert(&self, record: QueuedMessage, body: &[u8]) -> Result<(), String> {
        self.store
            .enqueue(&record, body)
            .map_err(|e| format!("cannot store message: {e}"))?;
        self.commit().await?;
        self.queue.wake(record.id);
        Ok(())
    }

    /// Waits until everything written so far is on disk.
    pub async fn commit(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.commits
            .send(tx)
            .map_err(|_| "the commit task has stopped".to_string())?;
        rx.await
            .map_err(|_| "the commit task has stopped".to_string())?
    }
}

async fn committer(store: Store, mut requests: mpsc::UnboundedReceiver<CommitRequest>) {
    let mut batch = Vec::new();
    while let Some(first) = requests.recv().await {
        batch.push(first);
        // Everyone who asked while the previous flush ran joins this one.
        while let Ok(more) = requests.try_recv() {
            batch.push(more);
        }
        let flushing = store.clone();
        let result = tokio::task::spawn_blocking(move || flushing.flush())
            .await
            .map_err(|e| format!("flush task failed: {e}"))
            .and_then(|r| r.map_err(|e| format!("flush failed: {e}")));
        if let Err(e) = &result {
            tracing::error!(error = %e, "queue flush failed");
        }
        for waiter in batch.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_are_unique_and_sort_by_time() {
        let a = new_queue_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_queue_id();
        assert_eq!(a.len(), 18);
        assert!(a < b, "{a} < {b}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
        );
    }
}
