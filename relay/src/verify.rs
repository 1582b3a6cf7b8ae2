//! Domain ownership proof (SPEC §2): tokens, the state changes a DNS check
//! causes, `domain verify` on demand, and the background task that re-checks
//! pending and verified domains. The DNS lookup itself is in `verify_dns.rs`.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use domauth_store::{AuthorizedDomain, DomainStatus, Store};
use tokio::sync::watch;

use crate::{
    config::VerificationConfig,
    logsafe::Escaped,
    schedule::{self, Schedule},
    verify_dns::{CheckOutcome, DnsChecker},
};

/// A fresh verification token: 160 bits from the OS's secure random source,
/// hex, so it is printable ASCII and one short TXT string.
pub fn new_token() -> Result<String, String> {
    use rand::TryRngCore;
    let mut bytes = [0u8; 20];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| format!("no OS randomness: {e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("domauth-{hex}"))
}

#[derive(Debug, Clone)]
pub struct Timing {
    pub pending_expiry: Duration,
    pub grace: Duration,
}

/// Applies one check's outcome to a domain (pure: the rules of SPEC §2.4–6).
/// `manual` is `domain verify`, which may revive a failed domain.
pub fn apply(
    d: &mut AuthorizedDomain,
    outcome: &CheckOutcome,
    now: DateTime<Utc>,
    timing: &Timing,
) {
    d.last_check = Some(now);
    let found = matches!(outcome, CheckOutcome::Verified);
    if found {
        if d.status != DomainStatus::Verified {
            d.verified_at = Some(now);
        }
        d.status = DomainStatus::Verified;
        d.last_error = None;
        d.record_missing_since = None;
        return;
    }
    d.last_error = Some(outcome.to_string());
    match d.status {
        DomainStatus::Pending => {
            if elapsed(d.created_at, now) >= timing.pending_expiry {
                d.status = DomainStatus::Failed;
                d.last_error = Some(format!(
                    "not verified within {} of being added; last check: {outcome}",
                    humantime::format_duration(timing.pending_expiry)
                ));
            }
        }
        DomainStatus::Verified => {
            // A DNS error says nothing about the record: the clock neither
            // starts nor resets.
            if outcome.is_temporary() {
                return;
            }
            let since = *d.record_missing_since.get_or_insert(now);
            if elapsed(since, now) >= timing.grace {
                d.status = DomainStatus::Failed;
                d.last_error = Some(format!(
                    "record missing since {} (grace {} passed): {outcome}",
                    since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    humantime::format_duration(timing.grace)
                ));
            }
        }
        DomainStatus::Failed => {}
    }
}

fn elapsed(since: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - since).to_std().unwrap_or_default()
}

pub struct Verifier {
    store: Store,
    dns: DnsChecker,
    config: VerificationConfig,
    timing: Timing,
    /// When each domain is next due (see [`Verifier::run`]).
    schedule: Schedule,
    /// `[deliverability] spf_include`: what the SPF advice looks for (empty: none).
    spf_include: String,
}

impl Verifier {
    pub fn new(store: Store, dns: DnsChecker, config: VerificationConfig) -> Arc<Verifier> {
        Verifier::with_spf_include(store, dns, config, String::new())
    }

    /// A verifier whose checks also give SPF advice about `spf_include` (SPEC §9).
    pub fn with_spf_include(
        store: Store,
        dns: DnsChecker,
        config: VerificationConfig,
        spf_include: String,
    ) -> Arc<Verifier> {
        let timing = Timing {
            pending_expiry: config.pending_expiry.get(),
            grace: config.grace.get(),
        };
        Arc::new(Verifier {
            store,
            dns,
            config,
            timing,
            schedule: Schedule::default(),
            spf_include,
        })
    }

    /// The name the TXT record goes to: `domauthvalidation.<domain>`.
    pub fn record_name(&self, domain: &str) -> String {
        format!("{}.{domain}", self.config.record_label)
    }

    /// The label the TXT record goes to, as configured (`domauthvalidation`).
    pub fn record_label(&self) -> &str {
        &self.config.record_label
    }

    /// Checks one domain now and stores the result. A check whose result
    /// arrives after a newer check was stored is dropped (compare-and-swap in
    /// the store), so a manual verify racing the background task never loses
    /// an update.
    pub async fn check(
        &self,
        hosting: &str,
        domain: &str,
    ) -> Result<Option<(AuthorizedDomain, CheckOutcome)>, String> {
        let Some(current) = self
            .store
            .domain(hosting, domain)
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let started = Utc::now();
        // The SPF/DMARC advice (SPEC §9) is read beside the proof; never a condition.
        let record_name = self.record_name(&current.domain);
        let ((mut outcome, auth), (spf, dmarc)) = tokio::join!(
            self.dns.check_report(&record_name, &current.token),
            crate::dns_advice::advise(&self.dns, &current.domain, &self.spf_include),
        );
        if !matches!(outcome, CheckOutcome::Verified) && !outcome.is_temporary() {
            // The commonest mistake: a DNS panel appended the zone to a
            // name typed in full. Say so instead of a bare "not found".
            let doubled = format!("{record_name}.{}", current.domain);
            if self.dns.check(&doubled, &current.token).await == CheckOutcome::Verified {
                outcome = CheckOutcome::NotFound(format!(
                    "no matching TXT record at {record_name}; found at {doubled}: the zone was added twice, enter only {} as the record name",
                    self.config.record_label
                ));
            }
        }
        let report = domauth_store::DnsReport {
            zone: auth.zone,
            servers: auth.servers,
            spf: Some(spf),
            dmarc: Some(dmarc),
        };
        crate::metrics::domain_check(&outcome);
        let mut before = None;
        // A check is dated by when it asked DNS: the check that asked last
        // decides, whichever answer arrives last. (Dated by its answer, a
        // background check that asked before the record was published and
        // answered after `domain verify` asked would undo that verify.)
        let updated = self
            .store
            .update_domain(hosting, domain, |d| {
                before = Some(d.status); // the last call is the one stored
                if d.last_check.is_some_and(|t| t > started) {
                    return; // a check that asked later already decided
                }
                apply(d, &outcome, started, &self.timing);
                d.dns_report = report.clone();
            })
            .map_err(|e| e.to_string())?;
        crate::metrics::domain_status(
            before.filter(|_| updated.is_some()),
            updated.as_ref().map(|d| d.status),
        );
        if let Some(d) = &updated {
            self.track(d);
            tracing::info!(
                event = "domain_check",
                hosting = %hosting,
                domain = %domain,
                // The outcome quotes what a DNS server answered: anyone's text.
                outcome = %Escaped(&outcome.to_string()),
                status = %d.status,
                "DNS ownership check"
            );
        }
        Ok(updated.map(|d| (d, outcome)))
    }

    /// When the background task should next check `d`: pending domains every
    /// `check_interval`, verified ones every `recheck_interval`, failed ones never
    /// (only `domain verify` revives them).
    fn next_check(&self, d: &AuthorizedDomain) -> Option<DateTime<Utc>> {
        let interval = match d.status {
            DomainStatus::Pending => self.config.check_interval.get(),
            DomainStatus::Verified => self.config.recheck_interval.get(),
            DomainStatus::Failed => return None,
        };
        Some(
            d.last_check
                .map_or_else(Utc::now, |t| schedule::after(t, interval)),
        )
    }

    /// Puts `d` on the background task's schedule (or takes it off when it is
    /// failed). Called at `domain add` and after every check, so the task never
    /// scans the store to find what is due.
    pub fn track(&self, d: &AuthorizedDomain) {
        self.schedule
            .set((d.hosting.clone(), d.domain.clone()), self.next_check(d));
    }

    /// Every domain in the store onto the schedule: at start, and now and then in
    /// case a domain reached the store by a path that did not call
    /// [`Verifier::track`]. Off the async runtime (10,000 domains are a few
    /// milliseconds of sled reads and JSON).
    async fn track_all(&self) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.all_domains()).await {
            Ok(Ok(domains)) => {
                crate::metrics::domains(&domains);
                for d in &domains {
                    self.schedule
                        .set_if_absent((d.hosting.clone(), d.domain.clone()), self.next_check(d));
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot list domains"),
            Err(e) => tracing::error!(error = %e, "domain scan task failed"),
        }
    }

    /// The background task: checks the domains as they come due, several at once
    /// (bounded), so one slow nameserver holds up nobody.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let check = |key: schedule::DomainKey| {
            let this = self.clone();
            async move {
                if let Err(e) = this.check(&key.0, &key.1).await {
                    tracing::error!(error = %e, domain = %Escaped(&key.1), "domain check failed");
                    // Try again one interval later rather than never.
                    let retry = schedule::after(Utc::now(), this.config.check_interval.get());
                    this.schedule.set(key, Some(retry));
                }
            }
        };
        self.schedule
            .run(
                self.config.concurrency,
                check,
                || self.track_all(),
                shutdown,
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(status: DomainStatus, created_ago: i64) -> AuthorizedDomain {
        let now = Utc::now();
        AuthorizedDomain {
            hosting: "acme".into(),
            domain: "partner.example".into(),
            token: "t".into(),
            status,
            created_at: now - chrono::Duration::seconds(created_ago),
            verified_at: None,
            last_check: None,
            last_error: None,
            record_missing_since: None,
            dns_report: Default::default(),
        }
    }

    fn timing() -> Timing {
        Timing {
            pending_expiry: Duration::from_secs(100),
            grace: Duration::from_secs(50),
        }
    }

    #[test]
    fn token_is_long_random_and_printable() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.len() >= 8 + 32 && a.len() <= 255);
        assert!(a.bytes().all(|c| c.is_ascii_graphic()));
    }

    #[test]
    fn pending_domains() {
        use CheckOutcome::*;
        let now = Utc::now();
        let cases = [
            (Verified, 10, DomainStatus::Verified),
            (NotFound("nx".into()), 10, DomainStatus::Pending),
            (
                Mismatch {
                    found: "\"x\"".into(),
                },
                10,
                DomainStatus::Pending,
            ),
            (DnsError("timeout".into()), 10, DomainStatus::Pending),
            (NotFound("nx".into()), 200, DomainStatus::Failed),
            (DnsError("timeout".into()), 200, DomainStatus::Failed),
            (Verified, 200, DomainStatus::Verified),
        ];
        for (outcome, age, expect) in cases {
            let mut d = domain(DomainStatus::Pending, age);
            apply(&mut d, &outcome, now, &timing());
            assert_eq!(d.status, expect, "{outcome:?} at age {age}");
            assert_eq!(d.last_check, Some(now));
            assert_eq!(d.last_error.is_none(), expect == DomainStatus::Verified);
        }
    }

    #[test]
    fn verified_domains_grace_clock() {
        let t0 = Utc::now();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let mut d = domain(DomainStatus::Verified, 1000);
        let missing = CheckOutcome::NotFound("nx".into());
        apply(&mut d, &missing, at(0), &timing());
        assert_eq!(
            (d.status, d.record_missing_since),
            (DomainStatus::Verified, Some(at(0)))
        );
        // A DNS error neither starts nor resets the clock.
        apply(
            &mut d,
            &CheckOutcome::DnsError("x".into()),
            at(20),
            &timing(),
        );
        assert_eq!(d.record_missing_since, Some(at(0)));
        apply(&mut d, &missing, at(30), &timing());
        assert_eq!(
            (d.status, d.record_missing_since),
            (DomainStatus::Verified, Some(at(0)))
        );
        apply(&mut d, &missing, at(50), &timing());
        assert_eq!(d.status, DomainStatus::Failed);
        assert!(
            d.last_error
                .as_deref()
                .unwrap()
                .contains("record missing since")
        );

        // Success resets the clock; a failed domain is revived by a match.
        let mut d = domain(DomainStatus::Verified, 1000);
        apply(&mut d, &missing, at(0), &timing());
        apply(&mut d, &CheckOutcome::Verified, at(10), &timing());
        assert_eq!(d.record_missing_since, None);
        let mut f = domain(DomainStatus::Failed, 1000);
        apply(&mut f, &missing, at(0), &timing());
        assert_eq!(f.status, DomainStatus::Failed);
        apply(&mut f, &CheckOutcome::Verified, at(1), &timing());
        assert_eq!(
            (f.status, f.verified_at),
            (DomainStatus::Verified, Some(at(1)))
        );
    }
}
