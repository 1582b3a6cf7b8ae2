//! The delivery scheduler (Postfix's `qmgr`): decides which queued message goes out
//! when, hands it to one of a bounded set of delivery workers (each keeps one upstream
//! connection open), records each recipient's outcome, retries with exponential backoff
//! and bounces what failed for good.
//!
//! One task, the dispatcher, owns the schedule: no locks, and every decision in one
//! place. Workers report back what happened. Two rules make faults cheap:
//!
//! - **A dead upstream is one problem, not N** (Postfix's dead destination): after
//!   `dead_after` consecutive attempts that could not reach upstream, messages that
//!   come due wait ("parked") instead of each trying; one probe at a time tests the
//!   upstream, with backoff from `probe_interval` up to `retry_max`. When a probe gets
//!   through, every waiting message is due at once and the backlog drains at full speed.
//! - **A delivery is never repeated for a bookkeeping failure**: when the new state of a
//!   message cannot be written (a full disk), it is kept in memory and used instead of
//!   the file's; a finished message leaves by `unlink`, which needs no space.
//!
//! On start every queued message is scheduled at its recorded next attempt, so nothing
//! accepted is forgotten by a restart.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use domauth_store::{
    DeliveryState, DsnRet, Envelope, MessageReader, Queue, QueueRecipient, QueuedMessage,
    QueuedSummary, RecipientStatus, StoreError,
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use crate::{
    bounce::{self, DsnAction, FailedRecipient, Returned},
    cleanup::header_block,
    dsn,
    logsafe::Escaped,
    spool::{MAX_HEADER, Spool, new_queue_id},
    upstream::{Attempt, Connection, RcptResult, Upstream},
};

#[derive(Debug, Clone)]
pub struct QueueSettings {
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_lifetime: Duration,
    pub concurrency: usize,
    pub hostname: String,
    pub dead_after: u32,
    pub probe_interval: Duration,
}

/// The delay before attempt `attempts + 1`: `initial`, doubling per failed
/// attempt, never more than `max`.
pub fn backoff(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    initial.saturating_mul(1u32 << exp).min(max)
}

/// `now + d` without overflow: a far-off time is as good as "later" here.
fn instant_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

fn utc_after(d: Duration) -> DateTime<Utc> {
    let now = Utc::now();
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(now)
}

enum Event {
    /// A message was committed: due now.
    Enqueued(String),
    /// `queue retry`: due now, even while upstream is down.
    Retry(String),
    /// `queue delete`: forget it.
    Forget(String),
}

/// Tells the scheduler about the queue. Cheap to clone.
#[derive(Clone)]
pub struct QueueHandle {
    tx: mpsc::UnboundedSender<Event>,
}

impl QueueHandle {
    pub fn enqueued(&self, id: String) {
        let _ = self.tx.send(Event::Enqueued(id));
    }

    pub fn retry(&self, id: String) {
        let _ = self.tx.send(Event::Retry(id));
    }

    pub fn forget(&self, id: String) {
        let _ = self.tx.send(Event::Forget(id));
    }
}

/// The receiving half, given to [`start`] once the spool exists (the spool
/// tells the scheduler about new messages; workers write bounces through the spool).
pub struct QueueReceiver(mpsc::UnboundedReceiver<Event>);

pub fn channel() -> (QueueHandle, QueueReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    (QueueHandle { tx }, QueueReceiver(rx))
}

/// What the workers share.
struct Shared {
    queue: Queue,
    spool: Arc<Spool>,
    upstream: Upstream,
    settings: QueueSettings,
    /// Delivery states that could not be written (a full disk): newer than the file's.
    unsaved: Mutex<HashMap<String, DeliveryState>>,
    reaper: Reaper,
}

/// Removes finished messages from the queue directory on a thread of its own, many per
/// wake-up: a delivery does not wait for its `unlink` (which, like the state file, is
/// not synced either way: after a crash a finished message may be delivered again,
/// never lost). `unlink` needs no free space.
struct Reaper {
    tx: Option<std::sync::mpsc::Sender<String>>,
    queue: Queue,
}

impl Reaper {
    fn start(queue: Queue) -> Reaper {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reaping = queue.clone();
        let spawned = std::thread::Builder::new()
            .name("domauth-reaper".into())
            .spawn(move || {
                while let Ok(id) = rx.recv() {
                    for id in std::iter::once(id).chain(rx.try_iter()) {
                        reap(&reaping, &id);
                    }
                }
            });
        let tx = match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::error!(event = "queue_error", error = %e, "cannot start the reaper thread; finished messages are removed inline");
                None
            }
        };
        Reaper { tx, queue }
    }

    fn remove(&self, id: String) {
        let id = match &self.tx {
            Some(tx) => match tx.send(id) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(id)) => id,
            },
            None => id,
        };
        reap(&self.queue, &id);
    }
}

fn reap(queue: &Queue, id: &str) {
    if let Err(e) = queue.remove(id) {
        tracing::error!(event = "queue_error", id = %id, error = %e, "cannot remove a finished message; it may be delivered again after a restart");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// Try to deliver.
    Deliver,
    /// Upstream is down: only expire what is too old (and bounce it).
    ExpireOnly,
}

/// How an attempt went, for the dispatcher.
#[derive(Debug)]
enum Next {
    /// Gone from the queue (delivered, bounced, deleted).
    Done,
    RetryAfter(Duration),
    /// Held until `queue retry`.
    Held,
}

#[derive(Debug, PartialEq, Eq)]
enum Contact {
    Reached,
    Unreachable,
    NotTried,
}

struct Report {
    id: String,
    next: Next,
    contact: Contact,
    received_at: DateTime<Utc>,
}

/// Starts the dispatcher and the workers, and schedules what is already queued.
pub fn start(
    queue: Queue,
    queued: Vec<QueuedSummary>,
    spool: Arc<Spool>,
    upstream: Upstream,
    settings: QueueSettings,
    receiver: QueueReceiver,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut schedule = Schedule::default();
    let now = Utc::now();
    let mut held = 0;
    for m in &queued {
        if m.held {
            held += 1;
            continue;
        }
        let delay = (m.next_attempt - now).to_std().unwrap_or(Duration::ZERO);
        schedule.insert(m.id.clone(), m.received_at, instant_after(delay));
    }
    if !queued.is_empty() {
        tracing::info!(
            event = "queue_resumed",
            messages = queued.len(),
            held,
            "resuming queued messages"
        );
    }
    let concurrency = settings.concurrency;
    let shared = Arc::new(Shared {
        reaper: Reaper::start(queue.clone()),
        queue,
        spool,
        upstream,
        settings,
        unsaved: Mutex::new(HashMap::new()),
    });
    let (jobs_tx, jobs_rx) = mpsc::channel(concurrency);
    let jobs_rx = Arc::new(tokio::sync::Mutex::new(jobs_rx));
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let mut tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(worker(
                shared.clone(),
                jobs_rx.clone(),
                reports_tx.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    let destination = Destination::new(&shared.settings);
    tasks.push(tokio::spawn(dispatcher(
        schedule,
        destination,
        shared.settings.clone(),
        receiver.0,
        jobs_tx,
        reports_rx,
        shutdown,
    )));
    tasks
}

/// Which messages are due when. Parked messages wait for a dead upstream to come back.
#[derive(Default)]
struct Schedule {
    due: BTreeSet<(Instant, String)>,
    /// Every known message: when it is due (`None`: parked or being delivered), and
    /// when it was accepted (parked messages still expire).
    entries: HashMap<String, Entry>,
    parked: HashSet<String>,
    /// When each message was accepted: the oldest, for the queue-age metric.
    accepted: crate::metrics::AcceptedTimes,
    /// Deferred because upstream could not be reached, before it was declared dead:
    /// due at once when it comes back, like the parked ones.
    unreachable: HashSet<String>,
}

struct Entry {
    at: Option<Instant>,
    received_at: DateTime<Utc>,
}

impl Schedule {
    fn insert(&mut self, id: String, received_at: DateTime<Utc>, at: Instant) {
        self.remove(&id);
        self.accepted.add(received_at);
        self.due.insert((at, id.clone()));
        self.entries.insert(
            id,
            Entry {
                at: Some(at),
                received_at,
            },
        );
    }

    fn remove(&mut self, id: &str) -> Option<Entry> {
        self.parked.remove(id);
        self.unreachable.remove(id);
        let entry = self.entries.remove(id)?;
        self.accepted.remove(entry.received_at);
        if let Some(at) = entry.at {
            self.due.remove(&(at, id.to_string()));
        }
        Some(entry)
    }

    /// Takes the first message due by `now` out of the timeline.
    fn pop_due(&mut self, now: Instant) -> Option<String> {
        let first = self.due.first()?;
        if first.0 > now {
            return None;
        }
        let (_, id) = self.due.pop_first()?;
        if let Some(e) = self.entries.get_mut(&id) {
            e.at = None;
        }
        // Tried again now: no longer waiting for upstream to come back.
        self.unreachable.remove(&id);
        Some(id)
    }

    fn park(&mut self, id: String, received_at: DateTime<Utc>) {
        self.remove(&id);
        self.accepted.add(received_at);
        self.entries.insert(
            id.clone(),
            Entry {
                at: None,
                received_at,
            },
        );
        self.parked.insert(id);
    }

    /// Upstream is back: every parked message, and every one deferred because upstream
    /// was unreachable, is due now.
    fn release_all(&mut self) -> usize {
        let now = Instant::now();
        let ids: Vec<String> = self
            .parked
            .drain()
            .chain(self.unreachable.drain())
            .collect();
        let n = ids.len();
        for id in ids {
            let received_at = self
                .entries
                .get(&id)
                .map(|e| e.received_at)
                .unwrap_or_else(Utc::now);
            self.insert(id, received_at, now);
        }
        n
    }

    fn next_wake(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }
}

/// Whether upstream can be reached, and when to probe it again if not.
struct Destination {
    consecutive_failures: u32,
    dead: bool,
    probe_delay: Duration,
    next_probe: Instant,
    /// A probe is out: no second one.
    probing: Option<String>,
    dead_after: u32,
    probe_interval: Duration,
    probe_max: Duration,
}

impl Destination {
    fn new(s: &QueueSettings) -> Destination {
        Destination {
            consecutive_failures: 0,
            dead: false,
            probe_delay: s.probe_interval,
            next_probe: Instant::now(),
            probing: None,
            dead_after: s.dead_after.max(1),
            probe_interval: s.probe_interval,
            probe_max: s.retry_max.max(s.probe_interval),
        }
    }

    /// Records an attempt's contact; `true` when upstream just came back.
    fn record(&mut self, id: &str, contact: &Contact) -> bool {
        let was_probe = self.probing.as_deref() == Some(id);
        if was_probe {
            self.probing = None;
        }
        match contact {
            Contact::NotTried => false,
            Contact::Reached => {
                self.consecutive_failures = 0;
                self.probe_delay = self.probe_interval;
                std::mem::replace(&mut self.dead, false)
            }
            Contact::Unreachable => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if !self.dead && self.consecutive_failures >= self.dead_after {
                    self.dead = true;
                    self.probe_delay = self.probe_interval;
                    self.next_probe = instant_after(self.probe_delay);
                    tracing::warn!(
                        event = "upstream_down",
                        failures = self.consecutive_failures,
                        probe_in = %humantime::format_duration(self.probe_delay),
                        "upstream unreachable: messages wait, one probe at a time"
                    );
                } else if self.dead && was_probe {
                    self.probe_delay = self.probe_delay.saturating_mul(2).min(self.probe_max);
                    self.next_probe = instant_after(self.probe_delay);
                }
                false
            }
        }
    }
}

async fn dispatcher(
    mut schedule: Schedule,
    mut destination: Destination,
    settings: QueueSettings,
    mut events: mpsc::UnboundedReceiver<Event>,
    jobs: mpsc::Sender<(String, Job)>,
    mut reports: mpsc::UnboundedReceiver<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut free = settings.concurrency;
    // Ids a worker has now, and those asked for again meanwhile (`queue retry`): a
    // message is never with two workers at once.
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut again: HashSet<String> = HashSet::new();
    loop {
        crate::metrics::queue(schedule.entries.len(), schedule.accepted.oldest());
        // Hand out work while workers are free.
        while free > 0 {
            let now = Instant::now();
            let job = if destination.dead {
                // Due messages wait for upstream instead of each failing on it.
                while let Some(id) = schedule.pop_due(now) {
                    let received_at = schedule
                        .entries
                        .get(&id)
                        .map(|e| e.received_at)
                        .unwrap_or_else(Utc::now);
                    schedule.park(id, received_at);
                }
                if destination.probing.is_none() && now >= destination.next_probe {
                    schedule.parked.iter().next().cloned().map(|id| {
                        schedule.parked.remove(&id);
                        destination.probing = Some(id.clone());
                        tracing::info!(event = "upstream_probe", id = %id, "probing upstream");
                        (id, Job::Deliver)
                    })
                } else {
                    expired_parked(&mut schedule, settings.max_lifetime)
                        .map(|id| (id, Job::ExpireOnly))
                }
            } else {
                schedule.pop_due(now).map(|id| (id, Job::Deliver))
            };
            let Some(job) = job else { break };
            if in_flight.contains(&job.0) {
                again.insert(job.0);
                continue;
            }
            in_flight.insert(job.0.clone());
            if jobs.send(job).await.is_err() {
                return;
            }
            free -= 1;
        }
        // With every worker busy only a report can change anything: no timer
        // (a due time in the past would spin).
        let wake = if free == 0 {
            None
        } else if destination.dead && destination.probing.is_none() && !schedule.parked.is_empty() {
            Some(destination.next_probe)
        } else {
            schedule.next_wake()
        };
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Enqueued(id)) => schedule.insert(id, Utc::now(), Instant::now()),
                Some(Event::Retry(id)) if in_flight.contains(&id) => { again.insert(id); }
                Some(Event::Retry(id)) => {
                    let received_at = schedule.remove(&id).map(|e| e.received_at).unwrap_or_else(Utc::now);
                    schedule.insert(id, received_at, Instant::now());
                    // An operator asking for a retry is as good as a probe.
                    if destination.dead {
                        destination.next_probe = Instant::now();
                    }
                }
                Some(Event::Forget(id)) => { schedule.remove(&id); }
                None => return,
            },
            report = reports.recv() => {
                let Some(report) = report else { return };
                free += 1;
                let came_back = destination.record(&report.id, &report.contact);
                let Report { id, next, contact, received_at } = report;
                in_flight.remove(&id);
                let next = match next {
                    Next::RetryAfter(_) if again.remove(&id) => Next::RetryAfter(Duration::ZERO),
                    other => {
                        again.remove(&id);
                        other
                    }
                };
                match next {
                    Next::Done | Next::Held => { schedule.remove(&id); }
                    Next::RetryAfter(_) if contact == Contact::Unreachable && destination.dead => {
                        schedule.park(id, received_at);
                    }
                    Next::RetryAfter(delay) => {
                        let unreachable = contact == Contact::Unreachable;
                        schedule.insert(id.clone(), received_at, instant_after(delay));
                        if unreachable {
                            schedule.unreachable.insert(id);
                        }
                    }
                }
                if came_back {
                    let n = schedule.release_all();
                    tracing::info!(event = "upstream_up", waiting = n, "upstream reachable again: delivering what waited");
                }
            }
            _ = sleep => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A parked message past its lifetime: it is bounced without waiting for upstream.
fn expired_parked(schedule: &mut Schedule, max_lifetime: Duration) -> Option<String> {
    let now = Utc::now();
    let id = schedule
        .parked
        .iter()
        .find(|id| {
            schedule.entries.get(*id).is_some_and(|e| {
                (now - e.received_at)
                    .to_std()
                    .is_ok_and(|age| age >= max_lifetime)
            })
        })?
        .clone();
    schedule.parked.remove(&id);
    Some(id)
}

/// How long a worker keeps an idle upstream connection open.
const IDLE_UPSTREAM: Duration = Duration::from_secs(30);

async fn worker(
    shared: Arc<Shared>,
    jobs: Arc<tokio::sync::Mutex<mpsc::Receiver<(String, Job)>>>,
    reports: mpsc::UnboundedSender<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conn: Option<Connection> = None;
    loop {
        let next = tokio::select! {
            job = async {
                let mut rx = jobs.lock().await;
                tokio::time::timeout(IDLE_UPSTREAM, rx.recv()).await
            } => job,
            _ = shutdown.changed() => break,
        };
        let (id, job) = match next {
            Ok(Some(job)) => job,
            Ok(None) => break,
            Err(_) => {
                // Idle: let the smarthost free its slot.
                close(&shared, conn.take()).await;
                continue;
            }
        };
        let report = deliver(&shared, &id, job, &mut conn).await;
        if reports.send(report).is_err() {
            break;
        }
    }
    close(&shared, conn).await;
}

async fn close(shared: &Shared, conn: Option<Connection>) {
    if let Some(c) = conn {
        c.quit(
            shared
                .upstream
                .command_timeout()
                .min(Duration::from_secs(5)),
        )
        .await;
    }
}

/// Runs a blocking queue operation off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Io(format!("queue task failed: {e}"))))
}

/// One delivery attempt of one message, start to end; never fails: every outcome is a
/// report.
async fn deliver(shared: &Shared, id: &str, job: Job, conn: &mut Option<Connection>) -> Report {
    let queue = shared.queue.clone();
    let owned = id.to_string();
    // One blocking call reads the envelope, the state and (for most messages) the
    // whole content; a damaged content shows here already.
    let loaded = blocking(move || {
        let Some((m, mut reader)) = queue.open_for_delivery(&owned)? else {
            return Ok(None);
        };
        reader.prefetch(crate::upstream::CHUNK)?;
        Ok(Some((m, reader)))
    })
    .await;
    let retry_later = |why: &str| {
        tracing::error!(event = "queue_error", id = %id, error = %why, "cannot read queued message; trying later");
        Report {
            id: id.to_string(),
            next: Next::RetryAfter(shared.settings.retry_initial),
            contact: Contact::NotTried,
            received_at: Utc::now(),
        }
    };
    let (mut msg, reader) = match loaded {
        Ok(Some(found)) => found,
        Ok(None) => {
            forget_unsaved(shared, id);
            return Report {
                id: id.to_string(),
                next: Next::Done,
                contact: Contact::NotTried,
                received_at: Utc::now(),
            };
        }
        Err(StoreError::Corrupt(why)) => return hold_unreadable(shared, id, None, &why).await,
        Err(e) => return retry_later(&e.to_string()),
    };
    if let Some(newer) = lock(&shared.unsaved).get(id) {
        msg.state = newer.clone();
    }
    let received_at = msg.envelope.received_at;
    if msg.state.held {
        return Report {
            id: id.to_string(),
            next: Next::Held,
            contact: Contact::NotTried,
            received_at,
        };
    }

    let pending: Vec<usize> = msg
        .state
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.status == RecipientStatus::Pending)
        .map(|(i, _)| i)
        .collect();
    let mut contact = Contact::NotTried;
    if !pending.is_empty() && job == Job::Deliver {
        contact = attempt(shared, &mut msg, &pending, reader, conn).await;
        if contact == Contact::NotTried {
            // The file turned out damaged while it was being sent.
            let why = msg.state.last_error.clone().unwrap_or_default();
            return hold_unreadable(shared, id, Some(msg), &why).await;
        }
    }

    let age = (Utc::now() - received_at).to_std().unwrap_or_default();
    if age >= shared.settings.max_lifetime {
        let why = msg
            .state
            .last_error
            .clone()
            .unwrap_or_else(|| "no reply".into());
        for r in msg
            .state
            .recipients
            .iter_mut()
            .filter(|r| r.status == RecipientStatus::Pending)
        {
            r.status = RecipientStatus::Failed;
            crate::metrics::delivery_expired();
            // RFC 3463 5.4.7: delivery time expired.
            r.last_reply = Some(format!(
                "554 5.4.7 Delivery time expired: the message was {} in the queue; last error: {why}",
                humantime::format_duration(shared.settings.max_lifetime)
            ));
        }
    }
    // Failures are bounced right after the attempt that found them, not
    // when the last deferred recipient of the message is settled.
    let bounced = bounce_new_failures(shared, &mut msg).await;

    let settled = msg.state.recipients.iter().all(|r| {
        r.status != RecipientStatus::Pending && (r.bounced || !owes_notice(&msg.envelope, r))
    });
    if settled {
        forget_unsaved(shared, id);
        let failed = msg
            .state
            .recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Failed)
            .count();
        tracing::info!(
            event = "message_done",
            id = %id,
            delivered = msg.state.recipients.len() - failed,
            failed,
            "removed from queue"
        );
        shared.reaper.remove(id.to_string());
        return Report {
            id: id.to_string(),
            next: Next::Done,
            contact,
            received_at,
        };
    }
    let delay = if bounced.is_err() {
        // Only the bounce is owed: try again soon, not after the backoff.
        shared.settings.retry_initial
    } else {
        backoff(
            msg.state.attempts,
            shared.settings.retry_initial,
            shared.settings.retry_max,
        )
    };
    msg.state.next_attempt = utc_after(delay);
    save_state(shared, id, &msg.state).await;
    Report {
        id: id.to_string(),
        next: Next::RetryAfter(delay),
        contact,
        received_at,
    }
}

/// Sends the message to its pending recipients and records each one's result.
/// Returns `NotTried` when the file turned out to be damaged on the way.
async fn attempt(
    shared: &Shared,
    msg: &mut QueuedMessage,
    pending: &[usize],
    reader: MessageReader,
    conn: &mut Option<Connection>,
) -> Contact {
    let addresses: Vec<String> = pending
        .iter()
        .map(|&i| msg.state.recipients[i].address.clone())
        .collect();
    let mut upstream_dsn = false;
    let (results, contact) = match shared
        .upstream
        .send(conn, &msg.envelope, &addresses, reader)
        .await
    {
        Attempt::Replied { results, dsn } => {
            upstream_dsn = dsn;
            (results, Contact::Reached)
        }
        Attempt::Unreachable(e) => (
            vec![RcptResult::Deferred(e); addresses.len()],
            Contact::Unreachable,
        ),
        Attempt::Damaged(e) => {
            msg.state.last_error = Some(format!("message file damaged: {e}"));
            return Contact::NotTried;
        }
    };
    msg.state.attempts = msg.state.attempts.saturating_add(1);
    let mut last_error = None;
    for (&i, result) in pending.iter().zip(results) {
        let r = &mut msg.state.recipients[i];
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
            id = %msg.envelope.id,
            rcpt = %Escaped(&r.address),
            attempt = msg.state.attempts,
            status = ?status,
            reply = %Escaped(&text),
            upstream = %shared.upstream.describe(),
            "delivery attempt"
        );
        if status == RecipientStatus::Delivered {
            r.relayed = !upstream_dsn;
        }
        crate::metrics::delivery_attempt(&status, contact == Contact::Unreachable);
        r.status = status;
        r.last_reply = Some(text);
    }
    msg.state.last_error = last_error;
    contact
}

/// A message whose file cannot be read back: held (never deleted), logged with its id,
/// listed by `queue list` with the reason.
async fn hold_unreadable(
    shared: &Shared,
    id: &str,
    msg: Option<QueuedMessage>,
    why: &str,
) -> Report {
    tracing::error!(event = "message_held", id = %id, error = %why, "queued message cannot be read; held until `queue retry`");
    let received_at = msg
        .as_ref()
        .map(|m| m.envelope.received_at)
        .unwrap_or_else(Utc::now);
    if let Some(mut m) = msg {
        m.state.held = true;
        m.state.last_error = Some(format!("held: message file damaged: {why}"));
        save_state(shared, id, &m.state).await;
    }
    Report {
        id: id.to_string(),
        next: Next::Held,
        contact: Contact::NotTried,
        received_at,
    }
}

/// Writes a message's state; when that fails (a full disk) the state is kept in memory,
/// so what upstream took is never sent again.
async fn save_state(shared: &Shared, id: &str, state: &DeliveryState) {
    let queue = shared.queue.clone();
    let (owned, copy) = (id.to_string(), state.clone());
    match blocking(move || queue.save_state(&owned, &copy)).await {
        Ok(()) => forget_unsaved(shared, id),
        Err(StoreError::NotFound(_)) => forget_unsaved(shared, id), // deleted meanwhile
        Err(e) => {
            tracing::error!(event = "queue_error", id = %id, error = %e, "cannot write delivery state; keeping it in memory");
            lock(&shared.unsaved).insert(id.to_string(), state.clone());
        }
    }
}

fn forget_unsaved(shared: &Shared, id: &str) {
    lock(&shared.unsaved).remove(id);
}

/// Whether the relay owes the sender a DSN for this settled recipient (sent or not yet):
/// a failure, unless NOTIFY said otherwise; a success accepted by a smarthost without
/// DSN, when NOTIFY=SUCCESS asked for it (RFC 3461 §4.1). Never for a null sender or a
/// bounce (RFC 5321 §4.5.5); that is decided where the DSN is written.
fn owes_notice(envelope: &Envelope, r: &QueueRecipient) -> bool {
    match r.status {
        RecipientStatus::Pending => false,
        RecipientStatus::Failed => true,
        RecipientStatus::Delivered => {
            r.relayed && dsn::wants_success(envelope.dsn.notify(&r.address))
        }
    }
}

/// Largest message a `RET=FULL` bounce returns whole; a larger one returns its headers
/// (RFC 3462 allows that; Postfix's `bounce_size_limit` does the same).
const RET_FULL_LIMIT: u64 = 1024 * 1024;

/// Queues one DSN for the recipients whose notice is owed and not sent yet (failures
/// and, with NOTIFY=SUCCESS to a smarthost without DSN, "relayed" notices), and marks
/// them. None for a null sender, never for a bounce (RFC 5321 §4.5.5), and none for a
/// failed recipient whose NOTIFY excludes FAILURE (NEVER). The DSN is durable before
/// the mark is written: a crash in between repeats the DSN, it never loses it. `Err`:
/// the DSN could not be queued (a full disk); the recipients stay unmarked and it is
/// tried again.
async fn bounce_new_failures(shared: &Shared, msg: &mut QueuedMessage) -> Result<(), ()> {
    let fresh: Vec<usize> = msg
        .state
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.bounced && owes_notice(&msg.envelope, r))
        .map(|(i, _)| i)
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    let original = &msg.envelope;
    let wanted: Vec<usize> = fresh
        .iter()
        .copied()
        .filter(|&i| {
            let r = &msg.state.recipients[i];
            r.status != RecipientStatus::Failed
                || dsn::wants_failure(original.dsn.notify(&r.address))
        })
        .collect();
    if original.from.is_empty() || original.is_bounce {
        tracing::info!(event = "dropped", id = %original.id, failed = fresh.len(), "undeliverable, no bounce (null sender or bounce)");
    } else if wanted.is_empty() {
        tracing::info!(event = "dropped", id = %original.id, failed = fresh.len(), "undeliverable, no bounce (NOTIFY=NEVER or without FAILURE)");
    } else {
        let any_failed = wanted
            .iter()
            .any(|&i| msg.state.recipients[i].status == RecipientStatus::Failed);
        let full =
            any_failed && original.dsn.ret == Some(DsnRet::Full) && msg.size <= RET_FULL_LIMIT;
        let queue = shared.queue.clone();
        let id = original.id.clone();
        let limit = if full {
            RET_FULL_LIMIT as usize
        } else {
            MAX_HEADER
        };
        let head = blocking(move || queue.read_head(&id, limit))
            .await
            .unwrap_or_default();
        let recipients: Vec<FailedRecipient<'_>> = wanted
            .iter()
            .map(|&i| {
                let r = &msg.state.recipients[i];
                let (action, fallback) = if r.status == RecipientStatus::Failed {
                    (DsnAction::Failed, "delivery failed")
                } else {
                    (DsnAction::Relayed, "250 relayed")
                };
                FailedRecipient {
                    address: &r.address,
                    diagnostic: r.last_reply.as_deref().unwrap_or(fallback),
                    action,
                    orcpt: original
                        .dsn
                        .recipient(&r.address)
                        .and_then(|d| d.orcpt.as_deref()),
                }
            })
            .collect();
        let returned = if full && head.len() as u64 == msg.size {
            Returned::Full(&head)
        } else {
            Returned::Headers(header_block(&head))
        };
        let now = Utc::now();
        let dsn = bounce::build(
            &shared.settings.hostname,
            original,
            returned,
            &recipients,
            now,
        );
        let envelope = Envelope {
            id: new_queue_id(),
            from: String::new(),
            recipients: vec![original.from.clone()],
            received_at: now,
            login: None,
            is_bounce: true,
            body: Default::default(),
            smtputf8: false,
            dsn: Default::default(),
        };
        if let Err(e) = shared.spool.insert(&envelope, &dsn).await {
            tracing::error!(event = "bounce_not_queued", id = %original.id, error = %e, "cannot queue the bounce; trying again later");
            return Err(());
        }
        crate::metrics::bounce_queued();
        let relayed = recipients.len()
            - recipients
                .iter()
                .filter(|r| r.action == DsnAction::Failed)
                .count();
        tracing::info!(event = "bounce", id = %original.id, bounce_id = %envelope.id, to = %Escaped(&original.from), failed = recipients.len() - relayed, relayed, "bouncing");
    }
    for i in fresh {
        msg.state.recipients[i].bounced = true;
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
        // Huge settings saturate instead of overflowing.
        let huge = Duration::from_secs(u64::MAX / 4);
        assert_eq!(
            backoff(40, huge, Duration::MAX),
            huge.saturating_mul(1 << 30)
        );
        let _ = instant_after(Duration::MAX);
        let _ = utc_after(Duration::MAX);
    }

    fn settings() -> QueueSettings {
        QueueSettings {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(86400),
            concurrency: 4,
            hostname: "relay.test".into(),
            dead_after: 3,
            probe_interval: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn upstream_is_dead_after_consecutive_failures_and_back_on_contact() {
        let mut d = Destination::new(&settings());
        assert!(!d.record("a", &Contact::Unreachable));
        assert!(!d.record("b", &Contact::Unreachable));
        assert!(!d.dead);
        // Success in between resets the count.
        assert!(!d.record("c", &Contact::Reached));
        for id in ["d", "e", "f"] {
            d.record(id, &Contact::Unreachable);
        }
        assert!(d.dead);
        assert_eq!(d.probe_delay, Duration::from_secs(10));
        // A failed probe doubles the delay, up to retry_max.
        for expect in [20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600] {
            d.probing = Some("p".into());
            d.record("p", &Contact::Unreachable);
            assert_eq!(d.probe_delay, Duration::from_secs(expect));
            assert!(d.probing.is_none());
        }
        // Not-tried reports change nothing.
        assert!(!d.record("x", &Contact::NotTried));
        assert!(d.dead);
        assert!(d.record("p", &Contact::Reached), "came back");
        assert!(!d.dead);
        assert_eq!(d.probe_delay, Duration::from_secs(10));
    }

    #[tokio::test]
    async fn schedule_orders_parks_and_releases() {
        let mut s = Schedule::default();
        let now = Instant::now();
        let t0 = Utc::now();
        s.insert("b".into(), t0, now + Duration::from_secs(5));
        s.insert("a".into(), t0, now);
        s.insert("c".into(), t0, now + Duration::from_secs(1));
        assert_eq!(s.pop_due(now).as_deref(), Some("a"));
        assert_eq!(s.pop_due(now), None);
        assert_eq!(s.next_wake(), Some(now + Duration::from_secs(1)));
        s.park("c".into(), t0);
        s.unreachable.insert("b".into());
        assert_eq!(s.next_wake(), Some(now + Duration::from_secs(5)));
        assert_eq!(s.release_all(), 2);
        let later = Instant::now();
        let mut got = vec![s.pop_due(later).unwrap(), s.pop_due(later).unwrap()];
        got.sort();
        assert_eq!(got, ["b", "c"]);
        // A message tried again is no longer waiting for upstream to come back: a
        // release must not hand it out a second time while a worker has it.
        s.insert("u".into(), t0, later);
        s.unreachable.insert("u".into());
        assert_eq!(s.pop_due(later).as_deref(), Some("u"));
        assert!(!s.unreachable.contains("u"));
        assert_eq!(s.release_all(), 0);
        // Re-inserting replaces, never duplicates.
        s.insert("a".into(), t0, later);
        s.insert("a".into(), t0, later);
        assert_eq!(s.due.len(), 1);
        assert!(s.remove("a").is_some());
        assert!(s.due.is_empty());
    }

    #[test]
    fn which_recipients_are_owed_a_notice() {
        let mut envelope = Envelope {
            id: "Q".into(),
            from: "a@b.test".into(),
            recipients: vec!["x@d.test".into(), "y@d.test".into()],
            received_at: Utc::now(),
            login: None,
            is_bounce: false,
            body: Default::default(),
            smtputf8: false,
            dsn: Default::default(),
        };
        envelope.dsn.recipients.push(domauth_store::RecipientDsn {
            address: "x@d.test".into(),
            notify: Some(domauth_store::DsnNotify {
                success: true,
                failure: false,
                delay: false,
            }),
            orcpt: None,
        });
        let r = |address: &str, status, relayed| QueueRecipient {
            address: address.into(),
            status,
            last_reply: None,
            bounced: false,
            relayed,
        };
        use RecipientStatus::*;
        for (rcpt, owed) in [
            // NOTIFY=SUCCESS: a notice once a smarthost without DSN took it.
            (r("x@d.test", Delivered, true), true),
            (r("x@d.test", Delivered, false), false),
            (r("x@d.test", Pending, true), false),
            // A failure is always settled through the bounce step (which then
            // leaves out those whose NOTIFY excludes FAILURE).
            (r("x@d.test", Failed, false), true),
            // No NOTIFY: no success notice.
            (r("y@d.test", Delivered, true), false),
            (r("y@d.test", Failed, false), true),
        ] {
            assert_eq!(owes_notice(&envelope, &rcpt), owed, "{rcpt:?}");
        }
    }

    #[tokio::test]
    async fn expired_parked_messages_are_found() {
        let mut s = Schedule::default();
        let old = Utc::now() - chrono::Duration::days(2);
        s.park("old".into(), old);
        s.park("new".into(), Utc::now());
        assert_eq!(
            expired_parked(&mut s, Duration::from_secs(86400)).as_deref(),
            Some("old")
        );
        assert_eq!(expired_parked(&mut s, Duration::from_secs(86400)), None);
    }
}
