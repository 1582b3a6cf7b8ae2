//! When each authorized domain is next due for a background DNS check, and the loop
//! that runs the checks as they come due. The ownership checks (`verify.rs`) and the
//! DKIM record checks (`dkim_keys.rs`) each keep one [`Schedule`].
//!
//! The schedule lives in memory: a tick costs the domains that are due, not a scan of
//! the store. Whoever changes a domain tells its schedule ([`Schedule::set`]); a rescan
//! of the store at start and every [`RESCAN`] catches anything that reached the store
//! another way.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::{sync::watch, task::JoinSet};

/// `(hosting, domain)`.
pub type DomainKey = (String, String);

/// How often the store is scanned again, as a safety net.
pub const RESCAN: Duration = Duration::from_secs(600);

#[derive(Default)]
pub struct Schedule {
    timeline: Mutex<Timeline>,
    wake: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Schedule {
    /// Puts the domain on the schedule at `at`, or takes it off (`None`: nothing
    /// to check, e.g. a failed domain).
    pub fn set(&self, key: DomainKey, at: Option<DateTime<Utc>>) {
        let mut timeline = lock(&self.timeline);
        match at {
            Some(at) => timeline.set(key, at),
            None => timeline.remove(&key),
        }
        drop(timeline);
        self.wake.notify_one();
    }

    /// As [`Schedule::set`], for a rescan: a domain already scheduled keeps its slot
    /// (it may have been checked since the scan read it).
    pub fn set_if_absent(&self, key: DomainKey, at: Option<DateTime<Utc>>) {
        let mut timeline = lock(&self.timeline);
        if let Some(at) = at
            && !timeline.contains(&key)
        {
            timeline.set(key, at);
        }
    }

    /// Runs `check` for each domain as it comes due, at most `concurrency` at once and
    /// never twice at the same time for one domain; `check` reschedules the domain (or
    /// not). `rescan` runs at start and every [`RESCAN`]. Returns at shutdown.
    pub async fn run<C, CF, R, RF>(
        &self,
        concurrency: usize,
        check: C,
        rescan: R,
        mut shutdown: watch::Receiver<bool>,
    ) where
        C: Fn(DomainKey) -> CF,
        CF: Future<Output = ()> + Send + 'static,
        R: Fn() -> RF,
        RF: Future<Output = ()>,
    {
        let limit = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let in_progress = Arc::new(Mutex::new(HashSet::new()));
        let mut running: JoinSet<()> = JoinSet::new();
        rescan().await;
        let mut rescan_at = tokio::time::Instant::now() + RESCAN;
        loop {
            while let Some(done) = running.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(error = %e, "background DNS check task failed");
                }
            }
            if tokio::time::Instant::now() >= rescan_at {
                rescan().await;
                rescan_at = tokio::time::Instant::now() + RESCAN;
            }
            let due = lock(&self.timeline).take_due(Utc::now());
            for key in due {
                if !lock(&in_progress).insert(key.clone()) {
                    continue;
                }
                let (limit, in_progress) = (limit.clone(), in_progress.clone());
                let checked = check(key.clone());
                running.spawn(async move {
                    if let Ok(_permit) = limit.acquire().await {
                        checked.await;
                    }
                    lock(&in_progress).remove(&key);
                });
            }
            // Sleep until the next domain is due (at most until the next rescan).
            let next = lock(&self.timeline).next_due();
            let sleep_for = next
                .map(|at| (at - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(RESCAN)
                .min(rescan_at.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                _ = tokio::time::sleep(sleep_for) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => break,
            }
        }
        running.abort_all();
    }
}

/// `at + interval`, saturating.
pub fn after(at: DateTime<Utc>, interval: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(interval)
        .ok()
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Domains ordered by when they are due.
#[derive(Default)]
struct Timeline {
    by_time: BTreeSet<(DateTime<Utc>, DomainKey)>,
    by_key: HashMap<DomainKey, DateTime<Utc>>,
}

impl Timeline {
    fn set(&mut self, key: DomainKey, at: DateTime<Utc>) {
        if let Some(old) = self.by_key.insert(key.clone(), at) {
            self.by_time.remove(&(old, key.clone()));
        }
        self.by_time.insert((at, key));
    }

    fn remove(&mut self, key: &DomainKey) {
        if let Some(old) = self.by_key.remove(key) {
            self.by_time.remove(&(old, key.clone()));
        }
    }

    fn contains(&self, key: &DomainKey) -> bool {
        self.by_key.contains_key(key)
    }

    fn next_due(&self) -> Option<DateTime<Utc>> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Removes and returns every domain due at `now`.
    fn take_due(&mut self, now: DateTime<Utc>) -> Vec<DomainKey> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.by_time.first()
            && *at <= now
        {
            if let Some((_, key)) = self.by_time.pop_first() {
                self.by_key.remove(&key);
                due.push(key);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_hands_out_due_domains_once_in_time_order() {
        let t0 = Utc::now();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let key = |d: &str| ("acme".to_string(), d.to_string());
        let mut t = Timeline::default();
        t.set(key("c.example"), at(30));
        t.set(key("a.example"), at(10));
        t.set(key("b.example"), at(20));
        // Re-setting moves a domain instead of adding it twice.
        t.set(key("c.example"), at(5));
        assert_eq!(t.next_due(), Some(at(5)));
        assert_eq!(t.take_due(at(10)), vec![key("c.example"), key("a.example")]);
        assert!(t.take_due(at(10)).is_empty(), "handed out once");
        assert!(t.contains(&key("b.example")) && !t.contains(&key("a.example")));
        t.remove(&key("b.example"));
        assert_eq!((t.next_due(), t.take_due(at(100))), (None, vec![]));
    }

    #[test]
    fn a_rescan_does_not_move_a_scheduled_domain() {
        let s = Schedule::default();
        let t0 = Utc::now();
        let key = ("acme".to_string(), "a.example".to_string());
        s.set(key.clone(), Some(t0 + chrono::Duration::seconds(60)));
        s.set_if_absent(key.clone(), Some(t0));
        assert!(lock(&s.timeline).take_due(t0).is_empty());
        s.set(key, None);
        assert_eq!(lock(&s.timeline).next_due(), None);
    }
}
