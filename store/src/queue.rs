//! The message queue on disk: what was accepted with `250`, until upstream takes it or it
//! bounces. This is the boundary between the SMTP side and delivery (STYLE.md): the spool
//! writes here, the scheduler reads here. It lives outside sled and outside the
//! authorization data (it stays local to each node).
//!
//! # Layout: one file per message, as Postfix's queue
//!
//! In the queue directory:
//!
//! | file         | what                                                        | written |
//! |--------------|-------------------------------------------------------------|---------|
//! | `ID.msg`     | the envelope and the message, never changed after commit     | once    |
//! | `ID.st`      | the delivery state (attempts, per-recipient results, held)   | replaced atomically |
//! | `ID.tmp`     | a message being received; renamed to `ID.msg` at commit      | —       |
//!
//! `ID.msg`: `"DAQ1" | envelope length u32 LE | envelope JSON | message | message length
//! u64 LE | crc32(message) u32 LE | "DAQE"`. The trailer lets a reader check that it has
//! the whole message and that its bytes are the ones written.
//!
//! Why files, and not records in one log: a failure (a full disk, an I/O error) then
//! touches one message and nothing else. An append that fails half way leaves no state
//! behind for the next message to trip over; a delivered message goes by `unlink`, which
//! needs no free space, so a full disk can never make the relay re-send what upstream
//! already took. And a message can be written while it arrives, so no one holds a whole
//! message in memory.
//!
//! # Durability
//!
//! [`MessageWriter::commit`] writes the trailer, `fdatasync`s and renames `ID.tmp` to
//! `ID.msg`; [`Queue::sync_dir`] makes the renames durable. The relay's group commit
//! calls `commit` for every message of a batch and `sync_dir` once, then answers `250`.
//! The state file is not synced: losing it in a crash means a recipient is tried again
//! (at least once), never that a message is lost.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Result, StoreError};

const MAGIC: &[u8; 4] = b"DAQ1";
const TRAILER_MAGIC: &[u8; 4] = b"DAQE";
const TRAILER: u64 = 16;
/// An envelope is JSON of at most a few hundred recipients; this bound is checked before
/// anything read from disk decides how much to allocate.
const MAX_ENVELOPE: u32 = 16 * 1024 * 1024;

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
    /// A DSN for this (failed) recipient has been queued: a failure is bounced once,
    /// right after the attempt that found it, even while other recipients of the message
    /// are still being retried. Also set once a "relayed" DSN (NOTIFY=SUCCESS) is queued.
    #[serde(default)]
    pub bounced: bool,
    /// Accepted by a smarthost that did not offer DSN: a success notification asked for
    /// with NOTIFY=SUCCESS is then the relay's to send (RFC 3461 §4.1, "relayed").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relayed: bool,
}

/// The body type the client declared (RFC 6152): it travels upstream with the message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BodyType {
    #[default]
    #[serde(rename = "7bit")]
    SevenBit,
    #[serde(rename = "8bitmime")]
    EightBitMime,
}

/// `RET` of `MAIL FROM` (RFC 3461 §4.3): what a failure DSN returns of the message.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum DsnRet {
    /// The whole message.
    Full,
    /// Its header block only.
    Hdrs,
}

/// `NOTIFY` of `RCPT TO` (RFC 3461 §4.1). `NEVER` is the set with nothing in it. Kept as
/// its SMTP text (`"SUCCESS,FAILURE"`, `"NEVER"`) in the envelope JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DsnNotify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl DsnNotify {
    pub fn is_never(&self) -> bool {
        !(self.success || self.failure || self.delay)
    }
}

impl std::fmt::Display for DsnNotify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_never() {
            return f.write_str("NEVER");
        }
        let words = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ];
        let on: Vec<&str> = words.iter().filter(|w| w.0).map(|w| w.1).collect();
        f.write_str(&on.join(","))
    }
}

impl From<DsnNotify> for String {
    fn from(n: DsnNotify) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for DsnNotify {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<DsnNotify, String> {
        let mut n = DsnNotify::default();
        let mut never = false;
        for word in text.split(',') {
            match word.trim().to_ascii_uppercase().as_str() {
                "NEVER" => never = true,
                "SUCCESS" => n.success = true,
                "FAILURE" => n.failure = true,
                "DELAY" => n.delay = true,
                other => return Err(format!("unknown NOTIFY keyword {other:?}")),
            }
        }
        if never && !n.is_never() {
            return Err("NOTIFY=NEVER cannot be combined with other keywords".into());
        }
        Ok(n)
    }
}

/// The DSN parameters of one recipient (RFC 3461 §4.1-4.2), for those that had any.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecipientDsn {
    /// The recipient as in [`Envelope::recipients`].
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<DsnNotify>,
    /// `ORCPT=rfc822;…`, xtext-decoded (printable ASCII).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

/// The DSN parameters of a message (RFC 3461): passed to a smarthost that offers DSN,
/// honoured by the relay otherwise. Envelopes written before they existed load empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct DsnParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<DsnRet>,
    /// `ENVID=…`, xtext-decoded (printable ASCII).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<RecipientDsn>,
}

impl DsnParams {
    pub fn is_empty(&self) -> bool {
        self == &DsnParams::default()
    }

    /// The parameters given with `RCPT TO:<address>`, if any.
    pub fn recipient(&self, address: &str) -> Option<&RecipientDsn> {
        self.recipients
            .iter()
            .find(|r| r.address.eq_ignore_ascii_case(address))
    }

    /// `NOTIFY` of that recipient; `None` when it gave none.
    pub fn notify(&self, address: &str) -> Option<DsnNotify> {
        self.recipient(address).and_then(|r| r.notify)
    }
}

/// What is fixed when a message is accepted: written once, at the head of `ID.msg`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope {
    pub id: String,
    /// The envelope sender; `""` is the null sender (no bounce is sent for it).
    pub from: String,
    pub recipients: Vec<String>,
    pub received_at: DateTime<Utc>,
    /// The mailbox that submitted it; `None` for the relay's own bounces.
    pub login: Option<String>,
    #[serde(default)]
    pub is_bounce: bool,
    #[serde(default)]
    pub body: BodyType,
    #[serde(default)]
    pub smtputf8: bool,
    /// RET, ENVID, NOTIFY and ORCPT as the client gave them (RFC 3461).
    #[serde(default, skip_serializing_if = "DsnParams::is_empty")]
    pub dsn: DsnParams,
}

/// What changes with each delivery attempt: `ID.st`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeliveryState {
    pub attempts: u32,
    pub next_attempt: DateTime<Utc>,
    pub last_error: Option<String>,
    pub recipients: Vec<QueueRecipient>,
    /// Not delivered until an operator says so (`queue retry`): its file is damaged or
    /// unreadable. Never deleted silently.
    #[serde(default)]
    pub held: bool,
}

impl DeliveryState {
    /// The state of a message nobody tried yet.
    pub fn fresh(envelope: &Envelope) -> DeliveryState {
        DeliveryState {
            attempts: 0,
            next_attempt: envelope.received_at,
            last_error: None,
            recipients: envelope
                .recipients
                .iter()
                .map(|address| QueueRecipient {
                    address: address.clone(),
                    status: RecipientStatus::Pending,
                    last_reply: None,
                    bounced: false,
                    relayed: false,
                })
                .collect(),
            held: false,
        }
    }
}

/// A queued message as `queue list` / `queue show` see it: envelope, size and state.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedMessage {
    pub envelope: Envelope,
    pub size: u64,
    pub state: DeliveryState,
    /// Where the message starts in its file, and its CRC (for the reader).
    offset: u64,
    crc: u32,
}

impl QueuedMessage {
    pub fn id(&self) -> &str {
        &self.envelope.id
    }
}

/// What the scheduler needs of a queued message at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedSummary {
    pub id: String,
    pub received_at: DateTime<Utc>,
    pub next_attempt: DateTime<Utc>,
    pub held: bool,
}

/// What [`Queue::open`] found.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Every committed message, as much as the scheduler needs (a backlog of 100,000
    /// must not sit in memory whole).
    pub messages: Vec<QueuedSummary>,
    /// Messages whose file is damaged: kept, held, and listed with their error.
    pub damaged: Vec<(String, String)>,
    /// `ID.tmp` files removed: messages being received when the relay stopped; none of
    /// them got a `250`.
    pub incomplete_removed: usize,
    /// `ID.st` files without their message (a crash between the two unlinks).
    pub orphan_states_removed: usize,
}

/// How a group commit makes its messages durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMethod {
    /// `fdatasync` each message file, then fsync the directory: touches nothing but the
    /// queue's own files. For a data dir on a file system shared with busy writers.
    Fsync,
    /// One `syncfs` for the file data of the whole batch and one for the renames: two
    /// cache flushes per batch instead of one per message plus one, which on a
    /// file system without a journal (or with many small files) is most of the cost of
    /// accepting a message. It also flushes whatever else is dirty on that file system.
    /// Errors are reported (Linux 5.8+) through a directory handle kept open from the
    /// start, so no write-back error since then goes unseen.
    #[default]
    Syncfs,
}

/// The queue directory.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
    sync: SyncMethod,
    /// Opened before any message is written: `syncfs` reports write-back errors that
    /// happened since the handle was opened.
    dir_handle: std::sync::Arc<File>,
}

/// Whether an I/O error means the file system is full (or the quota is).
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122))
        || e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
}

/// An I/O error with what was being done to which file; a full disk is its own kind
/// (the client gets `452 4.3.1`, the operator a clear line).
fn classify(what: &str, path: &Path, e: io::Error) -> StoreError {
    let text = format!("{what} {}: {e}", path.display());
    if is_disk_full(&e) {
        StoreError::DiskFull(text)
    } else {
        StoreError::Io(text)
    }
}

/// Queue ids are generated by the relay; anything else (a path separator, a dot) must
/// never reach a file name.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Queue {
    /// Opens (creates) the queue directory, removes what a crash left half-written, and
    /// reads every message's envelope and state.
    pub fn open(dir: &Path, sync: SyncMethod) -> Result<(Queue, OpenReport)> {
        fs::create_dir_all(dir).map_err(|e| classify("cannot create", dir, e))?;
        let dir_handle = File::open(dir).map_err(|e| classify("cannot open", dir, e))?;
        let queue = Queue {
            dir: dir.to_path_buf(),
            sync,
            dir_handle: std::sync::Arc::new(dir_handle),
        };
        let mut report = OpenReport::default();
        let mut ids = Vec::new();
        let mut states = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| classify("cannot list", dir, e))? {
            let entry = entry.map_err(|e| classify("cannot list", dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((id, ext)) = name.split_once('.') else {
                continue;
            };
            if !valid_id(id) {
                continue;
            }
            match ext {
                "msg" => ids.push(id.to_string()),
                "st" => states.push(id.to_string()),
                // A message being received, or a state being replaced, when the
                // relay stopped.
                "tmp" | "st.new" => {
                    let path = entry.path();
                    fs::remove_file(&path).map_err(|e| classify("cannot remove", &path, e))?;
                    report.incomplete_removed += 1;
                }
                _ => {}
            }
        }
        ids.sort();
        for id in states {
            if ids.binary_search(&id).is_err() {
                let path = queue.state_path(&id);
                fs::remove_file(&path).map_err(|e| classify("cannot remove", &path, e))?;
                report.orphan_states_removed += 1;
            }
        }
        for id in ids {
            match queue.load(&id) {
                Ok(Some(m)) => report.messages.push(QueuedSummary {
                    received_at: m.envelope.received_at,
                    next_attempt: m.state.next_attempt,
                    held: m.state.held,
                    id,
                }),
                Ok(None) => {}
                Err(StoreError::Corrupt(why)) => report.damaged.push((id, why)),
                Err(e) => return Err(e),
            }
        }
        Ok((queue, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn msg_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.msg"))
    }

    fn state_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.st"))
    }

    fn tmp_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.tmp"))
    }

    /// Starts a message. Nothing touches the disk until [`MessageWriter::spill`] or
    /// [`MessageWriter::commit`].
    pub fn writer(&self, envelope: &Envelope) -> Result<MessageWriter> {
        if !valid_id(&envelope.id) {
            return Err(StoreError::Invalid(format!(
                "invalid queue id {:?}",
                envelope.id
            )));
        }
        let json = serde_json::to_vec(envelope)
            .map_err(|e| StoreError::Invalid(format!("envelope: {e}")))?;
        let len = u32::try_from(json.len())
            .ok()
            .filter(|&n| n <= MAX_ENVELOPE)
            .ok_or_else(|| StoreError::Invalid("envelope too large".into()))?;
        let mut head = Vec::with_capacity(8 + json.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&json);
        Ok(MessageWriter {
            tmp: self.tmp_path(&envelope.id),
            msg: self.msg_path(&envelope.id),
            head_len: head.len() as u64,
            buf: head,
            file: None,
            written: 0,
            message_len: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Group commit: makes every finished message of the batch durable and puts it into
    /// the queue, one result per writer. Blocking. A message whose commit failed is not
    /// in the queue afterwards (its client is told to try again, so it must not be
    /// delivered as well).
    pub fn commit_batch(&self, writers: &mut [&mut MessageWriter]) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = writers.iter_mut().map(|w| w.finish()).collect();
        // The data first: no message enters the queue before its bytes are on disk.
        match self.sync {
            SyncMethod::Fsync => {
                for (w, r) in writers.iter_mut().zip(results.iter_mut()) {
                    if r.is_ok() {
                        *r = w.sync_data();
                    }
                }
            }
            SyncMethod::Syncfs => {
                if results.iter().any(Result::is_ok)
                    && let Err(e) = self.syncfs()
                {
                    fail_all(&mut results, &e);
                }
            }
        }
        for (w, r) in writers.iter_mut().zip(results.iter_mut()) {
            if r.is_ok() {
                *r = w.rename_into_queue();
            }
        }
        // Then the directory entries.
        if results.iter().any(Result::is_ok) {
            let synced = match self.sync {
                SyncMethod::Fsync => self
                    .dir_handle
                    .sync_all()
                    .map_err(|e| classify("cannot sync", &self.dir, e)),
                SyncMethod::Syncfs => self.syncfs(),
            };
            if let Err(e) = synced {
                for (w, r) in writers.iter_mut().zip(results.iter()) {
                    if r.is_ok() {
                        w.revoke();
                    }
                }
                fail_all(&mut results, &e);
            }
        }
        results
    }

    fn syncfs(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs takes a file descriptor we own for the life of `self`.
        let rc = unsafe { libc::syncfs(self.dir_handle.as_raw_fd()) };
        if rc != 0 {
            return Err(classify(
                "cannot sync",
                &self.dir,
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Every message, ordered by id (= by time of acceptance). Damaged ones are listed
    /// with a held state that says what is wrong.
    pub fn list(&self) -> Result<Vec<QueuedMessage>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| classify("cannot list", &self.dir, e))? {
            let entry = entry.map_err(|e| classify("cannot list", &self.dir, e))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".msg"))
                .filter(|id| valid_id(id))
            {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(m) = self.show(&id)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// One message as `queue show` sees it: a damaged one is shown held, with its error.
    pub fn show(&self, id: &str) -> Result<Option<QueuedMessage>> {
        match self.load(id) {
            Err(StoreError::Corrupt(why)) => Ok(Some(damaged_view(id, why))),
            other => other,
        }
    }

    /// One message's envelope, size and state; `None` when it is not (or no longer) queued.
    /// A damaged file is `Err(Corrupt)`.
    pub fn load(&self, id: &str) -> Result<Option<QueuedMessage>> {
        Ok(self.open_file(id)?.map(|(_, _, m)| m))
    }

    /// What a delivery needs, from one open of the file: the message's envelope and
    /// state, and a reader of its content. `None` when it is no longer queued.
    pub fn open_for_delivery(&self, id: &str) -> Result<Option<(QueuedMessage, MessageReader)>> {
        let Some((file, path, m)) = self.open_file(id)? else {
            return Ok(None);
        };
        let reader = MessageReader::new(file, path, &m)?;
        Ok(Some((m, reader)))
    }

    fn open_file(&self, id: &str) -> Result<Option<(File, PathBuf, QueuedMessage)>> {
        if !valid_id(id) {
            return Ok(None);
        }
        let path = self.msg_path(id);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(classify("cannot open", &path, e)),
        };
        let layout = read_layout(&mut file, &path)?;
        let state = match self.read_state(id)? {
            Some(s) if s.recipients.len() == layout.envelope.recipients.len() => s,
            _ => DeliveryState::fresh(&layout.envelope),
        };
        let message = QueuedMessage {
            size: layout.message_len,
            envelope: layout.envelope,
            state,
            offset: layout.message_offset,
            crc: layout.crc,
        };
        Ok(Some((file, path, message)))
    }

    fn read_state(&self, id: &str) -> Result<Option<DeliveryState>> {
        let path = self.state_path(id);
        match fs::read(&path) {
            // A state file torn by a crash is as good as none: the message is tried again.
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(classify("cannot read", &path, e)),
        }
    }

    /// Replaces a message's delivery state (write to a temporary file, rename). Not
    /// synced: see the module documentation. A message removed meanwhile is not brought
    /// back: `NotFound`.
    pub fn save_state(&self, id: &str, state: &DeliveryState) -> Result<()> {
        if !valid_id(id) || !self.msg_path(id).exists() {
            return Err(no_message(id));
        }
        let path = self.state_path(id);
        let tmp = self.dir.join(format!("{id}.st.new"));
        let json = serde_json::to_vec(state)
            .map_err(|e| StoreError::Invalid(format!("delivery state: {e}")))?;
        let written = fs::write(&tmp, &json).and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(classify("cannot write", &path, e));
        }
        // `queue delete` between the check and the rename leaves a state without its
        // message: remove it again (the sweep at open would too).
        if !self.msg_path(id).exists() {
            let _ = fs::remove_file(&path);
            return Err(no_message(id));
        }
        Ok(())
    }

    /// Opens a message's content: a reader of exactly its bytes that checks the CRC at
    /// the end.
    pub fn open_message(&self, id: &str) -> Result<MessageReader> {
        match self.open_file(id)? {
            Some((file, path, m)) => MessageReader::new(file, path, &m),
            None => Err(no_message(id)),
        }
    }

    /// The message's header block, at most `limit` bytes (for bounces, which carry the
    /// original's headers, not its body).
    pub fn read_head(&self, id: &str, limit: usize) -> Result<Vec<u8>> {
        let mut reader = self.open_message(id)?;
        let want = usize::try_from(reader.remaining)
            .unwrap_or(usize::MAX)
            .min(limit);
        let mut out = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match reader.file.read(&mut out[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Err(classify("cannot read", &reader.path, e)),
            }
        }
        out.truncate(filled);
        Ok(out)
    }

    /// Removes a message: the message file first (from then on it is gone for every
    /// reader), then its state. `unlink` needs no free space: on a full disk a delivered
    /// message still leaves the queue. `false` when it was not queued.
    pub fn remove(&self, id: &str) -> Result<bool> {
        if !valid_id(id) {
            return Ok(false);
        }
        let path = self.msg_path(id);
        let existed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(classify("cannot remove", &path, e)),
        };
        let state = self.state_path(id);
        match fs::remove_file(&state) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(classify("cannot remove", &state, e)),
        }
        Ok(existed)
    }
}

fn no_message(id: &str) -> StoreError {
    StoreError::NotFound(format!("no queued message {id}"))
}

/// Every still successful result of a batch becomes `e`.
fn fail_all(results: &mut [Result<()>], e: &StoreError) {
    for r in results.iter_mut().filter(|r| r.is_ok()) {
        *r = Err(match e {
            StoreError::DiskFull(t) => StoreError::DiskFull(t.clone()),
            other => StoreError::Io(other.to_string()),
        });
    }
}

/// The listing of a message whose file cannot be read: held, with the reason.
fn damaged_view(id: &str, why: String) -> QueuedMessage {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    QueuedMessage {
        envelope: Envelope {
            id: id.to_string(),
            from: String::new(),
            recipients: Vec::new(),
            received_at: epoch,
            login: None,
            is_bounce: false,
            body: BodyType::SevenBit,
            smtputf8: false,
            dsn: Default::default(),
        },
        size: 0,
        state: DeliveryState {
            attempts: 0,
            next_attempt: epoch,
            last_error: Some(format!("message file damaged: {why}")),
            recipients: Vec::new(),
            held: true,
        },
        offset: 0,
        crc: 0,
    }
}

struct Layout {
    envelope: Envelope,
    message_offset: u64,
    message_len: u64,
    crc: u32,
}

/// Reads and checks the head and the trailer of `ID.msg`. Every length read from the
/// file is checked against the file's size before it is used.
fn read_layout(file: &mut File, path: &Path) -> Result<Layout> {
    let corrupt = |why: &str| StoreError::Corrupt(format!("{}: {why}", path.display()));
    let size = file
        .metadata()
        .map_err(|e| classify("cannot read", path, e))?
        .len();
    let mut head = [0u8; 8];
    file.read_exact_at(&mut head, 0)
        .map_err(|_| corrupt("shorter than its header"))?;
    if &head[..4] != MAGIC {
        return Err(corrupt("not a queue file"));
    }
    let env_len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if env_len > MAX_ENVELOPE || 8 + u64::from(env_len) + TRAILER > size {
        return Err(corrupt("envelope length out of range"));
    }
    let mut json = vec![0u8; env_len as usize];
    file.read_exact_at(&mut json, 8)
        .map_err(|e| classify("cannot read", path, e))?;
    let envelope: Envelope =
        serde_json::from_slice(&json).map_err(|e| corrupt(&format!("envelope: {e}")))?;
    let mut trailer = [0u8; TRAILER as usize];
    file.read_exact_at(&mut trailer, size - TRAILER)
        .map_err(|e| classify("cannot read", path, e))?;
    if &trailer[12..] != TRAILER_MAGIC {
        return Err(corrupt("no trailer"));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&trailer[..8]);
    let message_len = u64::from_le_bytes(len8);
    let message_offset = 8 + u64::from(env_len);
    if message_offset.checked_add(message_len).map(|n| n + TRAILER) != Some(size) {
        return Err(corrupt("message length does not match the file size"));
    }
    let crc = u32::from_le_bytes([trailer[8], trailer[9], trailer[10], trailer[11]]);
    Ok(Layout {
        envelope,
        message_offset,
        message_len,
        crc,
    })
}

/// A message being written. Bytes are buffered in memory; [`MessageWriter::spill`]
/// writes the buffer to `ID.tmp` (blocking: call it off the async runtime), so a large
/// message never sits whole in memory. Dropping a writer that was not committed removes
/// its temporary file.
pub struct MessageWriter {
    tmp: PathBuf,
    msg: PathBuf,
    buf: Vec<u8>,
    file: Option<File>,
    /// Bytes already in the file.
    written: u64,
    /// Where the message starts (after the magic and the envelope).
    head_len: u64,
    message_len: u64,
    crc: crc32fast::Hasher,
}

impl MessageWriter {
    /// Appends message bytes to the buffer (no I/O).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.message_len += bytes.len() as u64;
        self.crc.update(bytes);
    }

    /// Appends what `fill` writes at the end of the buffer (no I/O), without copying it
    /// through another buffer first; returns `fill`'s result and the bytes it appended.
    /// `fill` may only append.
    pub fn append_with<R>(&mut self, fill: impl FnOnce(&mut Vec<u8>) -> R) -> (R, &[u8]) {
        let start = self.buf.len();
        let result = fill(&mut self.buf);
        // Only appending keeps the bytes already counted; anything else is a caller's bug.
        let start = start.min(self.buf.len());
        let added = &self.buf[start..];
        self.message_len += added.len() as u64;
        self.crc.update(added);
        (result, added)
    }

    /// Bytes waiting in memory.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Message bytes pushed so far.
    pub fn message_len(&self) -> u64 {
        self.message_len
    }

    /// Writes the buffer to the temporary file (creating it). Blocking.
    pub fn spill(&mut self) -> Result<()> {
        if self.file.is_none() {
            // Read as well: `prepend` moves what is written.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&self.tmp)
                .map_err(|e| classify("cannot create", &self.tmp, e))?;
            self.file = Some(file);
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(file) = self.file.as_mut() else {
            return Err(StoreError::Io("queue file not open".into()));
        };
        // A failed write is never retried: the caller drops the writer, which
        // removes the file, so nothing half-written is ever renamed into the queue.
        file.write_all_at(&self.buf, self.written)
            .map_err(|e| classify("cannot write", &self.tmp, e))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        // Keep a small buffer: a long message streams through it.
        if self.buf.capacity() > 1024 * 1024 {
            self.buf.shrink_to(256 * 1024);
        }
        Ok(())
    }

    /// Puts `bytes` in front of the message pushed so far: headers that can only be made
    /// once the whole message was seen (DKIM-Signature). While the start of the message
    /// is still in memory this is an insert there; once it is in the file (a message
    /// larger than the spill threshold) the file's message bytes move up by `bytes.len()`,
    /// copied in bounded chunks from the end backwards, so memory stays bounded. Blocking.
    pub fn prepend(&mut self, bytes: &[u8]) -> Result<()> {
        let n = bytes.len() as u64;
        if self.written <= self.head_len {
            let at = usize::try_from(self.head_len - self.written)
                .map_err(|_| StoreError::Io("queue buffer offset".into()))?;
            self.buf.splice(at..at, bytes.iter().copied());
        } else {
            let Some(file) = self.file.as_ref() else {
                return Err(StoreError::Io("queue file not open".into()));
            };
            let mut chunk = vec![0u8; 1 << 20];
            let mut end = self.written;
            while end > self.head_len {
                let start = end.saturating_sub(chunk.len() as u64).max(self.head_len);
                let len = (end - start) as usize;
                file.read_exact_at(&mut chunk[..len], start)
                    .map_err(|e| classify("cannot read", &self.tmp, e))?;
                file.write_all_at(&chunk[..len], start + n)
                    .map_err(|e| classify("cannot write", &self.tmp, e))?;
                end = start;
            }
            file.write_all_at(bytes, self.head_len)
                .map_err(|e| classify("cannot write", &self.tmp, e))?;
            self.written += n;
        }
        // crc(bytes ‖ message) from the running crc of the message.
        let mut crc = crc32fast::Hasher::new();
        crc.update(bytes);
        crc.combine(&self.crc);
        self.crc = crc;
        self.message_len += n;
        Ok(())
    }

    /// Writes the rest and the trailer (not synced). Blocking.
    fn finish(&mut self) -> Result<()> {
        let crc = self.crc.clone().finalize();
        self.buf.extend_from_slice(&self.message_len.to_le_bytes());
        self.buf.extend_from_slice(&crc.to_le_bytes());
        self.buf.extend_from_slice(TRAILER_MAGIC);
        self.spill()
    }

    fn sync_data(&mut self) -> Result<()> {
        let Some(file) = self.file.as_ref() else {
            return Err(StoreError::Io("queue file not open".into()));
        };
        file.sync_data()
            .map_err(|e| classify("cannot sync", &self.tmp, e))
    }

    fn rename_into_queue(&mut self) -> Result<()> {
        fs::rename(&self.tmp, &self.msg).map_err(|e| classify("cannot rename", &self.tmp, e))?;
        self.file = None;
        Ok(())
    }

    /// Takes a renamed message back out: the sync of its batch failed.
    fn revoke(&mut self) {
        let _ = fs::remove_file(&self.msg);
    }
}

impl Drop for MessageWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Reads one message's bytes (without envelope or trailer) and checks its CRC at the
/// end: a damaged message is an error before its last byte is handed out, so a caller
/// that sends it on can still abort instead of finishing the transaction.
pub struct MessageReader {
    file: File,
    path: PathBuf,
    remaining: u64,
    expected_crc: u32,
    crc: crc32fast::Hasher,
    /// A chunk read ahead by [`MessageReader::prefetch`].
    prefetched: Option<Vec<u8>>,
}

impl MessageReader {
    fn new(mut file: File, path: PathBuf, m: &QueuedMessage) -> Result<MessageReader> {
        file.seek(SeekFrom::Start(m.offset))
            .map_err(|e| classify("cannot read", &path, e))?;
        Ok(MessageReader {
            file,
            path,
            remaining: m.size,
            expected_crc: m.crc,
            crc: crc32fast::Hasher::new(),
            prefetched: None,
        })
    }

    /// Reads the first chunk now (blocking), so that the caller can hand the reader to
    /// async code that takes it with [`MessageReader::take_prefetched`] without blocking:
    /// a message up to `max` bytes then costs one blocking call in all.
    pub fn prefetch(&mut self, max: usize) -> Result<()> {
        if self.prefetched.is_none() {
            let mut chunk = Vec::new();
            self.next_chunk(&mut chunk, max)?;
            self.prefetched = Some(chunk);
        }
        Ok(())
    }

    /// The chunk [`MessageReader::prefetch`] read, once.
    pub fn take_prefetched(&mut self) -> Option<Vec<u8>> {
        self.prefetched.take()
    }

    /// Bytes not yet handed out (a prefetched chunk counts as handed out).
    pub fn len_remaining(&self) -> u64 {
        self.remaining
    }

    /// Fills `buf` (cleared first) with up to `max` bytes; `Ok(false)` at the end.
    /// Blocking.
    pub fn next_chunk(&mut self, buf: &mut Vec<u8>, max: usize) -> Result<bool> {
        buf.clear();
        if self.remaining == 0 {
            return Ok(false);
        }
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(max);
        // `read_to_end` fills the spare capacity without zeroing it first (the
        // buffer is reused for every chunk of a delivery).
        buf.reserve_exact(want);
        let got = (&mut self.file)
            .take(want as u64)
            .read_to_end(buf)
            .map_err(|e| classify("cannot read", &self.path, e))?;
        if got < want {
            return Err(StoreError::Corrupt(format!(
                "{}: message cut short",
                self.path.display()
            )));
        }
        self.crc.update(buf);
        self.remaining -= want as u64;
        if self.remaining == 0 && self.crc.clone().finalize() != self.expected_crc {
            return Err(StoreError::Corrupt(format!(
                "{}: message checksum mismatch",
                self.path.display()
            )));
        }
        Ok(true)
    }

    /// The whole message in memory (small messages, tests). Blocking.
    pub fn read_all(mut self) -> Result<Vec<u8>> {
        let mut out = self.prefetched.take().unwrap_or_default();
        out.reserve(usize::try_from(self.remaining).unwrap_or(0));
        let mut chunk = Vec::new();
        while self.next_chunk(&mut chunk, 1 << 20)? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepend_in_memory_and_after_spill() {
        for spill_at in [None, Some(10usize), Some(3_000_000)] {
            let dir = tempfile::tempdir().unwrap();
            let (queue, _) = Queue::open(dir.path(), SyncMethod::Fsync).unwrap();
            let mut w = queue.writer(&envelope("0001")).unwrap();
            let body: Vec<u8> = (0..2_500_000u32).map(|i| b'a' + (i % 26) as u8).collect();
            let mut expect = b"DKIM: x\r\n".to_vec();
            for (i, piece) in body.chunks(100_000).enumerate() {
                w.push(piece);
                if spill_at.is_some_and(|at| i * 100_000 >= at) {
                    w.spill().unwrap();
                }
            }
            w.prepend(b"DKIM: x\r\n").unwrap();
            expect.extend_from_slice(&body);
            assert!(
                queue
                    .commit_batch(&mut [&mut w])
                    .into_iter()
                    .all(|r| r.is_ok())
            );
            let (_, reader) = queue.open_for_delivery("0001").unwrap().unwrap();
            assert!(reader.read_all().unwrap() == expect, "{spill_at:?}");
        }
    }

    fn envelope(id: &str) -> Envelope {
        Envelope {
            id: id.into(),
            from: "info@acme.example".into(),
            recipients: vec!["a@dest.example".into(), "b@dest.example".into()],
            received_at: Utc::now(),
            login: Some("info@acme.example".into()),
            is_bounce: false,
            body: BodyType::EightBitMime,
            smtputf8: false,
            dsn: Default::default(),
        }
    }

    fn put(q: &Queue, id: &str, body: &[u8]) {
        let mut w = q.writer(&envelope(id)).unwrap();
        w.push(body);
        for r in q.commit_batch(&mut [&mut w]) {
            r.unwrap();
        }
    }

    fn open(dir: &Path) -> (Queue, OpenReport) {
        Queue::open(dir, SyncMethod::Syncfs).unwrap()
    }

    #[test]
    fn envelopes_without_dsn_fields_load_and_dsn_fields_round_trip() {
        let old = r#"{"id":"Q1","from":"a@b.example","recipients":["c@d.example"],"received_at":"2026-01-01T00:00:00Z","login":null}"#;
        let e: Envelope = serde_json::from_str(old).unwrap();
        assert!(e.dsn.is_empty());
        assert!(!serde_json::to_string(&e).unwrap().contains("dsn"));
        let st: QueueRecipient = serde_json::from_str(
            r#"{"address":"c@d.example","status":"delivered","last_reply":null}"#,
        )
        .unwrap();
        assert!(!st.relayed && !st.bounced);

        let mut e = e;
        e.dsn.ret = Some(DsnRet::Hdrs);
        e.dsn.envid = Some("id 1".into());
        e.dsn.recipients.push(RecipientDsn {
            address: "c@d.example".into(),
            notify: Some(DsnNotify::try_from("failure,success".to_string()).unwrap()),
            orcpt: Some("C@d.example".into()),
        });
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["dsn"]["ret"], "HDRS");
        assert_eq!(json["dsn"]["recipients"][0]["notify"], "SUCCESS,FAILURE");
        let back: Envelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
        assert_eq!(
            back.dsn.notify("C@D.example").map(|n| n.failure),
            Some(true)
        );
        for bad in ["NEVER,SUCCESS", "SOMETIMES", ""] {
            assert!(DsnNotify::try_from(bad.to_string()).is_err(), "{bad}");
        }
        assert!(DsnNotify::try_from("never".to_string()).unwrap().is_never());
    }

    #[test]
    fn a_batch_commits_with_either_sync_method() {
        for method in [SyncMethod::Fsync, SyncMethod::Syncfs] {
            let dir = tempfile::tempdir().unwrap();
            let (q, _) = Queue::open(dir.path(), method).unwrap();
            let mut writers: Vec<MessageWriter> = ["0001", "0002", "0003"]
                .iter()
                .map(|id| {
                    let mut w = q.writer(&envelope(id)).unwrap();
                    w.push(format!("message {id}\r\n").as_bytes());
                    w
                })
                .collect();
            let mut refs: Vec<&mut MessageWriter> = writers.iter_mut().collect();
            let results = q.commit_batch(&mut refs);
            assert!(results.iter().all(Result::is_ok), "{method:?}: {results:?}");
            drop(writers);
            let listed = q.list().unwrap();
            assert_eq!(listed.len(), 3, "{method:?}");
            assert_eq!(
                q.open_message("0002").unwrap().read_all().unwrap(),
                b"message 0002\r\n"
            );
            let leftovers = fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
                })
                .count();
            assert_eq!(leftovers, 0, "{method:?}: committed writers leave no .tmp");
        }
    }

    #[test]
    fn round_trip_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let (q, report) = open(dir.path());
        assert!(report.messages.is_empty());
        put(&q, "0002", b"body2");
        put(&q, "0001", b"body1\r\n");
        let list = q.list().unwrap();
        assert_eq!(
            list.iter().map(|m| m.id()).collect::<Vec<_>>(),
            ["0001", "0002"]
        );
        assert_eq!(list[0].size, 7);
        assert_eq!(list[0].envelope.body, BodyType::EightBitMime);
        assert_eq!(list[0].state, DeliveryState::fresh(&list[0].envelope));
        assert_eq!(
            q.open_message("0001").unwrap().read_all().unwrap(),
            b"body1\r\n"
        );

        let mut st = list[0].state.clone();
        st.attempts = 1;
        st.recipients[0].status = RecipientStatus::Delivered;
        st.last_error = Some("451 later".into());
        q.save_state("0001", &st).unwrap();
        assert_eq!(q.load("0001").unwrap().unwrap().state, st);

        assert!(q.remove("0001").unwrap());
        assert!(!q.remove("0001").unwrap());
        assert_eq!(q.load("0001").unwrap(), None);
        // A late state write after a delete does not resurrect the message.
        assert!(matches!(
            q.save_state("0001", &st),
            Err(StoreError::NotFound(_))
        ));
        assert!(!dir.path().join("0001.st").exists());
    }

    #[test]
    fn large_message_streams_through_spills() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = open(dir.path());
        let mut w = q.writer(&envelope("0001")).unwrap();
        let block: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        for _ in 0..30 {
            w.push(&block);
            w.spill().unwrap();
            assert_eq!(w.buffered(), 0);
        }
        for r in q.commit_batch(&mut [&mut w]) {
            r.unwrap();
        }
        let mut r = q.open_message("0001").unwrap();
        let mut chunk = Vec::new();
        let mut total = 0;
        while r.next_chunk(&mut chunk, 65536).unwrap() {
            total += chunk.len();
        }
        assert_eq!(total, 3_000_000);
    }

    #[test]
    fn uncommitted_and_dropped_writers_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = open(dir.path());
        {
            let mut w = q.writer(&envelope("0001")).unwrap();
            w.push(b"partial");
            w.spill().unwrap();
            assert!(dir.path().join("0001.tmp").exists());
        }
        assert!(!dir.path().join("0001.tmp").exists());
        assert!(q.list().unwrap().is_empty());
    }

    #[test]
    fn open_sweeps_temporaries_and_orphan_states_and_holds_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (q, _) = open(dir.path());
            put(&q, "0001", b"kept");
            put(&q, "0003", b"will be damaged");
        }
        fs::write(dir.path().join("0002.tmp"), b"half a message").unwrap();
        fs::write(dir.path().join("0001.st.new"), b"{\"half").unwrap();
        fs::write(dir.path().join("0009.st"), b"{}").unwrap();
        // Flip one byte of 0003's message: its CRC no longer matches.
        let p = dir.path().join("0003.msg");
        let mut bytes = fs::read(&p).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 1;
        fs::write(&p, &bytes).unwrap();
        fs::write(dir.path().join("0004.msg"), b"DAQ1garbage").unwrap();

        let (q, report) = open(dir.path());
        assert_eq!(report.incomplete_removed, 2);
        assert!(!dir.path().join("0001.st.new").exists());
        assert_eq!(report.orphan_states_removed, 1);
        let ids: Vec<&str> = report.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["0001", "0003"]);
        assert_eq!(report.damaged.len(), 1, "{:?}", report.damaged);
        assert_eq!(report.damaged[0].0, "0004");
        // The CRC is checked while reading, before the last byte is handed out.
        assert!(matches!(
            q.open_message("0003").unwrap().read_all(),
            Err(StoreError::Corrupt(_))
        ));
        // Damaged files are listed, held, never dropped.
        let listed = q.list().unwrap();
        let damaged = listed.iter().find(|m| m.id() == "0004").unwrap();
        assert!(damaged.state.held);
        assert!(
            damaged
                .state
                .last_error
                .as_deref()
                .unwrap()
                .contains("damaged")
        );
    }

    #[test]
    fn lengths_from_disk_are_checked_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = open(dir.path());
        let mut evil = Vec::new();
        evil.extend_from_slice(MAGIC);
        evil.extend_from_slice(&u32::MAX.to_le_bytes());
        evil.extend_from_slice(&[0u8; 32]);
        fs::write(dir.path().join("0001.msg"), &evil).unwrap();
        assert!(matches!(q.load("0001"), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn ids_never_become_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (q, _) = open(dir.path());
        assert!(q.writer(&envelope("../x")).is_err());
        assert_eq!(q.load("../x").unwrap(), None);
        assert!(!q.remove("a/b").unwrap());
    }
}
