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
    /// Rings when the timeline changes or a check ends (a slot is free).
    wake: Arc<tokio::sync::Notify>,
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
    ///
    /// A domain leaves the timeline only when a slot is free for it, so memory stays
    /// bounded by `concurrency` checks in flight however many domains are due at once
    /// (10,000 pending domains after a start are 10,000 entries, not 10,000 futures).
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
            let now = Utc::now();
            while let Ok(permit) = limit.clone().try_acquire_owned() {
                let Some(key) = lock(&self.timeline).take_first_due(now) else {
                    break;
                };
                if !lock(&in_progress).insert(key.clone()) {
                    // Being checked right now: that check puts it back on the timeline.
                    continue;
                }
                let (in_progress, wake) = (in_progress.clone(), self.wake.clone());
                let checked = check(key.clone());
                running.spawn(async move {
                    checked.await;
                    drop(permit);
                    lock(&in_progress).remove(&key);
                    wake.notify_one();
                });
            }
            // Sleep until the next domain is due (at most until the next rescan); with
            // every slot taken, until a check ends.
            let saturated = limit.available_permits() == 0;
            let next = if saturated {
                None
            } else {
                lock(&self.timeline).next_due()
            };
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

    /// Removes and returns the domain due first, if one is due at `now`.
    fn take_first_due(&mut self, now: DateTime<Utc>) -> Option<DomainKey> {
        if self.by_time.first().is_none_or(|(at, _)| *at > now) {
            return None;
        }
        let (_, key) = self.by_time.pop_first()?;
        self.by_key.remove(&key);
        Some(key)
    }

    /// Removes and returns every domain due at `now`, in time order.
    #[cfg(test)]
    fn take_due(&mut self, now: DateTime<Utc>) -> Vec<DomainKey> {
        std::iter::from_fn(|| self.take_first_due(now)).collect()
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

    /// 100 domains due at once with room for 2 checks: no more than 2 check futures
    /// ever exist together (the others wait as timeline entries), and all 100 run.
    #[tokio::test]
    async fn due_domains_wait_on_the_timeline_not_as_futures() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let schedule = Arc::new(Schedule::default());
        let past = Utc::now() - chrono::Duration::seconds(1);
        for i in 0..100 {
            schedule.set(("acme".to_string(), format!("d{i}.example")), Some(past));
        }
        let live = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = watch::channel(false);
        let runner = {
            let (schedule, live, peak, done) =
                (schedule.clone(), live.clone(), peak.clone(), done.clone());
            tokio::spawn(async move {
                let check = |_key: DomainKey| {
                    let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let (live, done) = (live.clone(), done.clone());
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        live.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                };
                schedule.run(2, check, || async {}, stopped).await;
            })
        };
        // A bound for a failure only: 100 checks of 1 ms take well under a second.
        for _ in 0..3000 {
            if done.load(Ordering::SeqCst) == 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(true);
        let _ = runner.await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            100,
            "every due domain was checked"
        );
        assert!(
            peak.load(Ordering::SeqCst) <= 2,
            "at most 2 checks at once, saw {}",
            peak.load(Ordering::SeqCst)
        );
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
