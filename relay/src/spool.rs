//! The queue boundary: the one place that puts messages into the queue and makes them
//! durable. Nothing before it knows about upstream; nothing after it knows about the
//! client (Postfix's split between smtpd/cleanup and qmgr).
//!
//! A message streams in: [`IncomingMessage`] keeps the header block (the header checks
//! and the trace headers need it), writes everything else through to the queue file once
//! more than [`SPILL`] bytes wait, so a session holds at most a few hundred KB whatever
//! the message size.
//!
//! Durability uses group commit: every message that asks while a commit runs joins the
//! next one. The committer thread makes the whole batch durable at once
//! ([`Queue::commit_batch`]: the data, then the renames into the queue; `queue.sync`
//! says how). Nobody gets an answer before the sync that covers their message. A message
//! whose commit failed is not in the queue: the client was told to try later, so it must
//! not be delivered as well.

use std::{net::IpAddr, sync::Arc};

use chrono::Utc;
use domauth_store::{BodyType, Envelope, MessageWriter, Queue, StoreError};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::{
    cleanup::{self, TraceInfo},
    dkim::{BodyHash, Signer},
    queue::QueueHandle,
    smtp::session::MessageStart,
};

/// Bytes of a message kept in memory before they are written to its queue file.
pub const SPILL: usize = 256 * 1024;
/// The largest header block kept for the header checks (Postfix keeps 100 KB); a message
/// with a larger one is refused.
pub const MAX_HEADER: usize = 256 * 1024;

/// Why a message could not be stored. Cloneable: one failed commit answers a batch.
#[derive(Debug, Clone)]
pub enum SpoolError {
    /// No space left: `452 4.3.1`.
    DiskFull(String),
    /// Anything else: `451 4.3.0`.
    Failed(String),
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::DiskFull(e) | SpoolError::Failed(e) => f.write_str(e),
        }
    }
}

impl From<StoreError> for SpoolError {
    fn from(e: StoreError) -> SpoolError {
        match e {
            StoreError::DiskFull(_) => SpoolError::DiskFull(e.to_string()),
            other => SpoolError::Failed(other.to_string()),
        }
    }
}

struct CommitJob {
    writer: MessageWriter,
    id: String,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

pub struct Spool {
    queue: Queue,
    commits: mpsc::UnboundedSender<CommitJob>,
    /// DKIM signing (`[deliverability] dkim`); `None`: off.
    dkim: Option<Arc<Signer>>,
}

/// A queue id: the arrival time in microseconds (hex, so ids sort by
/// arrival) and 20 random bits against collisions within a microsecond.
pub fn new_queue_id() -> String {
    let micros = Utc::now().timestamp_micros().max(0) as u64;
    let random: u32 = rand::rng().random_range(0..1 << 20);
    format!("{micros:013X}{random:05X}")
}

impl Spool {
    /// Starts the committer thread. Committed messages are handed to `queue_handle`.
    pub fn start(
        queue: Queue,
        queue_handle: QueueHandle,
        dkim: Option<Arc<Signer>>,
    ) -> Result<Arc<Spool>, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        let committing = queue.clone();
        std::thread::Builder::new()
            .name("domauth-commit".into())
            .spawn(move || committer(committing, rx, queue_handle))
            .map_err(|e| format!("cannot start the commit thread: {e}"))?;
        Ok(Arc::new(Spool {
            queue,
            commits: tx,
            dkim,
        }))
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Starts receiving a client's message (nothing is on disk yet).
    pub fn incoming(
        &self,
        start: MessageStart,
        queue_id: String,
        hostname: &str,
        peer: IpAddr,
    ) -> Result<IncomingMessage, SpoolError> {
        let envelope = Envelope {
            id: queue_id.clone(),
            from: start.envelope.from,
            recipients: start.envelope.recipients,
            received_at: Utc::now(),
            login: Some(start.login),
            is_bounce: false,
            body: if start.envelope.eight_bit {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
            smtputf8: start.envelope.smtputf8,
            dsn: start.envelope.dsn,
        };
        let writer = self.queue.writer(&envelope)?;
        Ok(IncomingMessage {
            writer: Some(writer),
            failure: None,
            head: Vec::new(),
            header_len: None,
            header_too_large: false,
            size: 0,
            hostname: hostname.to_string(),
            trace: Vec::new(),
            signer: self.dkim.clone(),
            body_hash: None,
            login: envelope.login.clone().unwrap_or_default(),
            from: envelope.from.clone(),
            helo: start.helo,
            peer,
            queue_id,
            recipients: envelope.recipients,
            dropped: Vec::new(),
        })
    }

    /// Makes a received message durable. `Ok` means it is on disk: only then may the
    /// client get `250`.
    pub async fn commit(&self, mut message: IncomingMessage) -> Result<(), SpoolError> {
        message.finish_headers();
        if let Some(e) = message.failure.take() {
            return Err(e);
        }
        let Some(mut writer) = message.writer.take() else {
            return Err(SpoolError::Failed("message was not written".into()));
        };
        if let (Some(signer), Some(hash)) = (self.dkim.clone(), message.body_hash.take())
            && message.signable()
        {
            writer = sign(signer, &mut message, hash, writer).await?;
        }
        self.commit_writer(writer, message.queue_id).await
    }

    /// Queues a message the relay made itself (a bounce).
    pub async fn insert(&self, envelope: &Envelope, message: &[u8]) -> Result<(), SpoolError> {
        let mut writer = self.queue.writer(envelope)?;
        writer.push(message);
        self.commit_writer(writer, envelope.id.clone()).await
    }

    async fn commit_writer(&self, writer: MessageWriter, id: String) -> Result<(), SpoolError> {
        let (done, result) = oneshot::channel();
        let stopped = || SpoolError::Failed("the commit thread has stopped".into());
        self.commits
            .send(CommitJob { writer, id, done })
            .map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

/// DKIM-signs a finished message when its From domain is set up for it (`dkim.rs`
/// decides) and puts the signatures in front of it, off the async runtime (RSA, and a
/// large message's file moves up). A signing error is logged and the message goes
/// unsigned (a refusal would cost the user their mail); a write error fails the commit.
async fn sign(
    signer: Arc<Signer>,
    message: &mut IncomingMessage,
    hash: BodyHash,
    mut writer: MessageWriter,
) -> Result<MessageWriter, SpoolError> {
    let mut headers = std::mem::take(&mut message.trace);
    headers.extend_from_slice(&message.head);
    let login = message.login.clone();
    let id = message.queue_id.clone();
    let joined = tokio::task::spawn_blocking(move || {
        match signer.sign(&login, &headers, &hash.finish()) {
            Ok(Some(signed)) => {
                writer.prepend(&signed.fields)?;
                tracing::info!(event = "dkim_signed", id = %id, domain = %signed.domain, selectors = %signed.selectors, "DKIM-signed");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(event = "dkim_sign_failed", id = %id, error = %e, "message not DKIM-signed");
            }
        }
        Ok::<_, StoreError>(writer)
    })
    .await;
    match joined {
        Ok(Ok(writer)) => Ok(writer),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(SpoolError::Failed(format!("signing task failed: {e}"))),
    }
}

/// Group commit, on its own thread: everything here blocks on the disk.
fn committer(queue: Queue, mut jobs: mpsc::UnboundedReceiver<CommitJob>, handle: QueueHandle) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        // Everyone who asked while the previous commit ran joins this one.
        while let Ok(more) = jobs.try_recv() {
            batch.push(more);
        }
        let mut writers: Vec<&mut MessageWriter> =
            batch.iter_mut().map(|job| &mut job.writer).collect();
        let results: Vec<Result<(), SpoolError>> = queue
            .commit_batch(&mut writers)
            .into_iter()
            .map(|r| r.map_err(SpoolError::from))
            .collect();
        for (job, result) in batch.into_iter().zip(results) {
            match &result {
                Ok(()) => handle.enqueued(job.id),
                Err(e) => {
                    tracing::error!(event = "queue_write_failed", id = %job.id, error = %e, "message not stored");
                }
            }
            let _ = job.done.send(result);
        }
    }
}

/// A message being received: its header block in memory until it is complete, then
/// everything on its way to the queue file.
pub struct IncomingMessage {
    writer: Option<MessageWriter>,
    /// The first storage error: the rest of the message is read and dropped, and the
    /// client gets a 4xx at the end.
    failure: Option<SpoolError>,
    /// The bytes received before the header block was complete; then the header block.
    head: Vec<u8>,
    header_len: Option<usize>,
    header_too_large: bool,
    size: u64,
    hostname: String,
    /// The relay's trace fields put in front of the header block (they are signed too).
    trace: Vec<u8>,
    /// Decides at the end of the header block whether the body is hashed for DKIM.
    signer: Option<Arc<Signer>>,
    /// The DKIM body hash, fed with everything after the header block as it arrives.
    body_hash: Option<BodyHash>,
    /// The mailbox that submits it (whose hosting's keys sign).
    login: String,
    from: String,
    helo: String,
    peer: IpAddr,
    queue_id: String,
    recipients: Vec<String>,
    /// Where the bytes of a message that will be refused are decoded to, and dropped.
    dropped: Vec<u8>,
}

impl IncomingMessage {
    pub fn queue_id(&self) -> &str {
        &self.queue_id
    }

    /// The envelope sender (`""`: the null sender).
    pub fn from(&self) -> &str {
        &self.from
    }

    pub fn recipients(&self) -> &[String] {
        &self.recipients
    }

    /// Takes decoded message bytes that `decode` appends to the Vec it is given (no I/O):
    /// once the header block is complete they land straight in the queue file's buffer.
    /// Returns `decode`'s result.
    pub fn receive<R>(&mut self, decode: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let writing = self.header_len.is_some();
        if self.failure.is_some() || self.header_too_large || (writing && self.writer.is_none()) {
            let mut dropped = std::mem::take(&mut self.dropped);
            let result = decode(&mut dropped);
            self.size += dropped.len() as u64;
            dropped.clear();
            self.dropped = dropped;
            return result;
        }
        if writing && let Some(w) = self.writer.as_mut() {
            let (result, added) = w.append_with(decode);
            self.size += added.len() as u64;
            if let Some(h) = self.body_hash.as_mut() {
                h.write(added);
            }
            return result;
        }
        let start = self.head.len();
        let result = decode(&mut self.head);
        self.size += (self.head.len().max(start) - start) as u64;
        self.head_grew();
        result
    }

    /// More of the header block arrived: is it complete, or too large?
    fn head_grew(&mut self) {
        if let Some(n) = cleanup::complete_header_block(&self.head) {
            self.start_body(n);
        } else if self.head.len() > MAX_HEADER {
            // Refused at the end; meanwhile keep nothing.
            self.header_too_large = true;
            self.head = Vec::new();
        }
    }

    /// The header block is known: the trace headers, then everything received so far,
    /// go to the writer; only the header block stays in `head`.
    fn start_body(&mut self, header_len: usize) {
        self.header_len = Some(header_len);
        let trace = TraceInfo {
            hostname: &self.hostname,
            helo: &self.helo,
            peer: self.peer,
            queue_id: &self.queue_id,
            recipients: &self.recipients,
        };
        let prefix = cleanup::trace_headers(&self.head[..header_len], &trace);
        if let Some(w) = self.writer.as_mut() {
            w.push(&prefix);
            w.push(&self.head);
        }
        let block = &self.head[..header_len];
        if self
            .signer
            .as_ref()
            .is_some_and(|s| s.wants(&self.login, block))
        {
            let mut hash = BodyHash::default();
            hash.write(&self.head[header_len..]);
            self.body_hash = Some(hash);
            self.trace = prefix;
        }
        self.head.truncate(header_len);
        self.head.shrink_to_fit();
    }

    /// At the end of DATA: a message without a body is all header block.
    fn finish_headers(&mut self) {
        if self.header_len.is_none() && !self.header_too_large && self.failure.is_none() {
            self.start_body(self.head.len());
        }
    }

    /// Whether a DKIM verifier splits header and body where we did: the header block
    /// ends with the empty line, or the message is all header fields.
    fn signable(&self) -> bool {
        self.head.ends_with(b"\r\n\r\n") || self.head.len() as u64 == self.size
    }

    /// The header block, once the message is complete; `None` when it was larger than
    /// [`MAX_HEADER`].
    pub fn headers(&mut self) -> Option<&[u8]> {
        self.finish_headers();
        if self.header_too_large {
            return None;
        }
        Some(&self.head)
    }

    /// Bytes of the client's message received (without the relay's headers).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether enough waits in memory to be written out now.
    pub fn wants_spill(&self) -> bool {
        self.failure.is_none() && self.writer.as_ref().is_some_and(|w| w.buffered() >= SPILL)
    }

    /// Writes what waits in memory to the queue file, off the async runtime. A failure
    /// is kept for the end of DATA.
    pub async fn spill(&mut self) {
        let Some(mut writer) = self.writer.take() else {
            return;
        };
        // On failure the writer is dropped on the blocking thread: that removes its
        // temporary file, so the space comes back at once.
        let joined = tokio::task::spawn_blocking(move || writer.spill().map(|()| writer)).await;
        match joined {
            Ok(Ok(writer)) => self.writer = Some(writer),
            Ok(Err(e)) => self.failure = Some(e.into()),
            Err(e) => self.failure = Some(SpoolError::Failed(format!("write task failed: {e}"))),
        }
    }

    /// Drops a refused message, removing what of it was written (off the runtime).
    pub async fn discard(mut self) {
        if let Some(writer) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || drop(writer)).await;
        }
    }
}
