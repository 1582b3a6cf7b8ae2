//! The message queue: what was accepted with `250`, until upstream takes it or it bounces.
//! This is the boundary between the SMTP side and delivery (STYLE.md): the session writes
//! here, the scheduler reads here.

use crate::{Result, Store, StoreError, bodylog::BodyRef, decode, encode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RecipientStatus {
    /// Not yet accepted by upstream: to be (re)tried.
    Pending,
    /// Accepted by upstream; never retried.
    Delivered,
    /// Refused permanently (or timed out): goes into the bounce.
    Failed,
}

/// One envelope recipient and its own delivery result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueRecipient {
    pub address: String,
    pub status: RecipientStatus,
    /// Upstream's last reply for this recipient, for the log and the DSN.
    pub last_reply: Option<String>,
    /// A DSN for this (failed) recipient has been queued: a failure is
    /// bounced once, right after the attempt that found it, even while
    /// other recipients of the message are still being retried.
    #[serde(default)]
    pub bounced: bool,
}

/// The envelope and delivery state of a queued message; the body is stored apart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueuedMessage {
    pub id: String,
    /// The envelope sender; `""` is the null sender (no bounce is sent for it).
    pub from: String,
    pub recipients: Vec<QueueRecipient>,
    pub size: u64,
    pub received_at: DateTime<Utc>,
    /// The mailbox that submitted it; `None` for the relay's own bounces.
    pub login: Option<String>,
    pub attempts: u32,
    pub next_attempt: DateTime<Utc>,
    pub last_error: Option<String>,
    pub is_bounce: bool,
}

impl Store {
    /// Stores a message. No transaction (they cost more than the whole SMTP
    /// transaction on the hot path): the body is written before the envelope,
    /// so an envelope never exists without its body. A crash can leave a body
    /// without an envelope, from a write that was never flushed and so never
    /// acknowledged; [`Store::open`] sweeps those. Does not flush: the caller
    /// group-commits with [`Store::flush`] before answering `250`.
    pub fn enqueue(&self, msg: &QueuedMessage, body: &[u8]) -> Result<()> {
        if msg.id.is_empty() {
            return Err(StoreError::Invalid("empty queue id".into()));
        }
        let id = msg.id.as_bytes();
        if self.queue_meta.contains_key(id)? {
            return Err(StoreError::Conflict(format!(
                "queue id {} already exists",
                msg.id
            )));
        }
        let at = self.bodies.append(body)?;
        self.queue_body.insert(id, &encode_ref(&at)[..])?;
        self.queue_meta.insert(id, encode(msg))?;
        Ok(())
    }

    /// Every queued message, ordered by id.
    pub fn queued(&self) -> Result<Vec<QueuedMessage>> {
        self.queue_meta
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                decode(
                    format_args!("queued message {}", String::from_utf8_lossy(&key)),
                    &value,
                )
            })
            .collect()
    }

    pub fn queued_message(&self, id: &str) -> Result<Option<QueuedMessage>> {
        self.queue_meta
            .get(id)?
            .map(|v| decode(format_args!("queued message {id}"), &v))
            .transpose()
    }

    pub fn queue_body(&self, id: &str) -> Result<Option<Vec<u8>>> {
        match self.queue_body.get(id)?.and_then(|v| decode_ref(&v)) {
            Some(at) => self.bodies.read(&at),
            None => Ok(None),
        }
    }

    /// Overwrites the envelope and delivery state (never the body). A message dequeued
    /// meanwhile (`queue delete` racing a delivery) is not brought back: `NotFound`.
    /// One atomic read-modify-write of one key.
    pub fn update_queued(&self, msg: &QueuedMessage) -> Result<()> {
        let meta = encode(msg);
        let previous = self
            .queue_meta
            .fetch_and_update(msg.id.as_bytes(), |old| old.map(|_| meta.clone()))?;
        match previous {
            Some(_) => Ok(()),
            None => Err(no_message(&msg.id)),
        }
    }

    /// Removes a message: the envelope first (from then on it is gone for every
    /// reader), then the body.
    pub fn dequeue(&self, id: &str) -> Result<()> {
        if self.queue_meta.remove(id.as_bytes())?.is_none() {
            return Err(no_message(id));
        }
        if let Some(at) = self
            .queue_body
            .remove(id.as_bytes())?
            .and_then(|v| decode_ref(&v))
        {
            self.bodies.release(&at);
        }
        Ok(())
    }

    /// Removes what a crash may have left half-written: bodies without an
    /// envelope (an enqueue cut short), bodies whose record in the log is
    /// missing or damaged (written but never synced), and envelopes without a
    /// body. None of it was acknowledged. Then counts the live bodies so the
    /// log can delete segments nobody refers to.
    pub(crate) fn sweep_queue(&self) -> Result<usize> {
        let mut removed = 0;
        for entry in self.queue_body.iter() {
            let (id, value) = entry?;
            let at = decode_ref(&value);
            let intact = match &at {
                Some(at) => self.bodies.read(at)?.is_some(),
                None => false,
            };
            if intact && self.queue_meta.contains_key(&id)? {
                if let Some(at) = at {
                    self.bodies.retain(&at);
                }
            } else {
                self.queue_body.remove(&id)?;
                removed += 1;
            }
        }
        for entry in self.queue_meta.iter().keys() {
            let id = entry?;
            if !self.queue_body.contains_key(&id)? {
                self.queue_meta.remove(&id)?;
                removed += 1;
            }
        }
        self.bodies.remove_unreferenced()?;
        Ok(removed)
    }
}

/// `segment u64 | offset u64 | len u32 | crc u32`, little-endian.
fn encode_ref(at: &BodyRef) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&at.segment.to_le_bytes());
    out[8..16].copy_from_slice(&at.offset.to_le_bytes());
    out[16..20].copy_from_slice(&at.len.to_le_bytes());
    out[20..].copy_from_slice(&at.crc.to_le_bytes());
    out
}

fn decode_ref(raw: &[u8]) -> Option<BodyRef> {
    let raw: &[u8; 24] = raw.try_into().ok()?;
    let u64_at = |i: usize| raw[i..i + 8].try_into().ok().map(u64::from_le_bytes);
    let u32_at = |i: usize| raw[i..i + 4].try_into().ok().map(u32::from_le_bytes);
    Some(BodyRef {
        segment: u64_at(0)?,
        offset: u64_at(8)?,
        len: u32_at(16)?,
        crc: u32_at(20)?,
    })
}

fn no_message(id: &str) -> StoreError {
    StoreError::NotFound(format!("no queued message {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::store;

    fn message(id: &str) -> QueuedMessage {
        let now = Utc::now();
        QueuedMessage {
            id: id.into(),
            from: "info@acme.example".into(),
            recipients: vec![
                QueueRecipient {
                    address: "a@dest.example".into(),
                    status: RecipientStatus::Pending,
                    last_reply: None,
                    bounced: false,
                },
                QueueRecipient {
                    address: "b@dest.example".into(),
                    status: RecipientStatus::Pending,
                    last_reply: None,
                    bounced: false,
                },
            ],
            size: 5,
            received_at: now,
            login: Some("info@acme.example".into()),
            attempts: 0,
            next_attempt: now,
            last_error: None,
            is_bounce: false,
        }
    }

    #[test]
    fn round_trip() {
        let (_dir, store) = store();
        let (second, first) = (message("0002"), message("0001"));
        store.enqueue(&second, b"body2").unwrap();
        store.enqueue(&first, b"body1").unwrap();
        assert!(matches!(
            store.enqueue(&first, b"x"),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            store.queue_body("0001").unwrap().as_deref(),
            Some(&b"body1"[..])
        );

        assert_eq!(store.queued().unwrap(), [first.clone(), second.clone()]);
        assert_eq!(store.queued_message("0002").unwrap(), Some(second));

        let mut updated = first.clone();
        updated.attempts = 1;
        updated.recipients[0].status = RecipientStatus::Delivered;
        updated.recipients[0].last_reply = Some("250 2.0.0 Ok".into());
        updated.recipients[1].status = RecipientStatus::Failed;
        updated.last_error = Some("550 5.1.1 no such user".into());
        store.update_queued(&updated).unwrap();
        assert_eq!(store.queued_message("0001").unwrap(), Some(updated.clone()));
        assert_eq!(
            store.queue_body("0001").unwrap().as_deref(),
            Some(&b"body1"[..])
        );

        store.dequeue("0001").unwrap();
        assert_eq!(store.queued_message("0001").unwrap(), None);
        assert_eq!(store.queue_body("0001").unwrap(), None);
        assert!(matches!(
            store.dequeue("0001"),
            Err(StoreError::NotFound(_))
        ));
        // A late update after a delete does not resurrect the message.
        assert!(matches!(
            store.update_queued(&updated),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.queued_message("0001").unwrap(), None);
        assert_eq!(store.queued().unwrap().len(), 1);
    }

    #[test]
    fn null_sender_and_json_shape() {
        let (_dir, store) = store();
        let mut bounce = message("0003");
        bounce.from = String::new();
        bounce.login = None;
        bounce.is_bounce = true;
        store.enqueue(&bounce, b"").unwrap();
        assert_eq!(store.queued_message("0003").unwrap(), Some(bounce));
        let raw = store.queue_meta.get("0003").unwrap().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(json["recipients"][0]["status"], "pending");
        assert_eq!(json["from"], "");
    }

    #[test]
    fn survives_reopen() {
        let (dir, store) = store();
        store
            .add_hosting("acme", &["acme.example".to_string()])
            .unwrap();
        let msg = message("0001");
        store.enqueue(&msg, b"Subject: hi\r\n\r\nbody\r\n").unwrap();
        store.flush().unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.queued().unwrap(), [msg]);
        assert_eq!(
            store.queue_body("0001").unwrap().as_deref(),
            Some(&b"Subject: hi\r\n\r\nbody\r\n"[..])
        );
        assert_eq!(
            store.hosting_of_domain("acme.example").unwrap().as_deref(),
            Some("acme")
        );
    }

    #[test]
    fn open_sweeps_half_written_messages() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.enqueue(&message("0001"), b"kept").unwrap();
            // What a crash between the two writes (or a lost body) leaves.
            store
                .queue_body
                .insert("0002", &b"orphan body"[..])
                .unwrap();
            store
                .queue_meta
                .insert("0003", encode(&message("0003")))
                .unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let ids: Vec<String> = store.queued().unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, vec!["0001"]);
        assert_eq!(store.queue_body("0002").unwrap(), None);
        assert_eq!(
            store.queue_body("0001").unwrap().as_deref(),
            Some(&b"kept"[..])
        );
    }
}
