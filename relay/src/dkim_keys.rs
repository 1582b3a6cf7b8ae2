//! The DKIM keys of authorized domains (SPEC §9): making them (at `domain add`, at
//! `domain dkim-rotate`, and at first start for domains that have none), the TXT records
//! to publish, checking those records in DNS, and the background task that does it.
//! Signing itself is `dkim.rs`.
//!
//! Selectors are `domauth<N>e` (Ed25519) and `domauth<N>r` (RSA-2048), N the key
//! generation. After a rotation the previous generation goes on signing until the new
//! records are found; then it is dropped.

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use chrono::{DateTime, SecondsFormat, Utc};
use domauth_store::{DkimKeySet, DkimStatus, DomainDkim, Store};
use mail_auth::dkim::generate::DkimKeyPair;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    config::VerificationConfig,
    logsafe::Escaped,
    schedule::{self, Schedule},
    verify_dns::{CheckOutcome, DnsChecker},
};

/// Makes a key set (generation is set by the store). Blocking: RSA-2048 generation
/// takes up to seconds.
pub fn generate(generation: u32) -> Result<DkimKeySet, String> {
    let ed = DkimKeyPair::generate_ed25519().map_err(|e| format!("Ed25519 key: {e}"))?;
    let rsa = DkimKeyPair::generate_rsa(2048).map_err(|e| format!("RSA key: {e}"))?;
    Ok(DkimKeySet {
        generation,
        ed25519_selector: String::new(),
        rsa_selector: String::new(),
        ed25519_private: B64.encode(ed.private_key()),
        ed25519_public: B64.encode(ed.public_key()),
        rsa_private: B64.encode(rsa.private_key()),
        rsa_public: B64.encode(spki_from_pkcs1(rsa.public_key())),
        created_at: Utc::now(),
        status: DkimStatus::Pending,
        last_check: None,
        last_error: None,
        verified_at: None,
    })
}

/// Selectors of a generation.
pub fn selectors(generation: u32) -> (String, String) {
    (
        format!("domauth{generation}e"),
        format!("domauth{generation}r"),
    )
}

/// DER length octets.
fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// An RSA public key as SubjectPublicKeyInfo (RFC 5280 §4.1.2.7), the form RFC 6376
/// §3.6.1 publishes: `SEQUENCE { SEQUENCE { rsaEncryption, NULL }, BIT STRING pkcs1 }`.
pub fn spki_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ALGORITHM: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut content = RSA_ALGORITHM.to_vec();
    content.extend_from_slice(&der(0x03, &bits));
    der(0x30, &content)
}

/// One TXT record to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct DkimRecord {
    pub name: String,
    /// `ed25519` or `rsa` (the `k=` tag).
    pub key_type: &'static str,
    /// The whole value.
    pub value: String,
    /// The value cut into strings of at most 255 bytes (RFC 1035 §3.3.14): how a zone
    /// file or a DNS API that wants strings takes it.
    pub strings: Vec<String>,
    /// The `p=` the record must hold.
    pub public_key: String,
}

/// The records of a key set: Ed25519 first, then RSA.
pub fn records(domain: &str, set: &DkimKeySet) -> Vec<DkimRecord> {
    [
        (&set.ed25519_selector, "ed25519", &set.ed25519_public),
        (&set.rsa_selector, "rsa", &set.rsa_public),
    ]
    .into_iter()
    .map(|(selector, k, p)| {
        let value = format!("v=DKIM1; k={k}; p={p}");
        DkimRecord {
            name: format!("{selector}._domainkey.{domain}"),
            key_type: k,
            strings: value
                .as_bytes()
                .chunks(255)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect(),
            value,
            public_key: p.clone(),
        }
    })
    .collect()
}

/// Whether a TXT record found at a selector's name is this key (RFC 6376 §3.6.1): its
/// strings joined, tags split at `;`, whitespace anywhere ignored (§3.2: FWS around and
/// inside base64), `p=` equal to ours and `k=` (default `rsa`) the right type. A user
/// may paste surrounding quotes: one pair is removed.
pub fn record_matches(strings: &[&[u8]], key_type: &str, public_key: &str) -> bool {
    let joined: String = String::from_utf8_lossy(&strings.concat()).into_owned();
    let trimmed = joined.trim();
    let inner = trimmed
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(trimmed);
    let mut p = None;
    let mut k = "rsa".to_string();
    for tag in inner.split(';') {
        let tag: String = tag.chars().filter(|c| !c.is_whitespace()).collect();
        if let Some((name, value)) = tag.split_once('=') {
            match name {
                "p" => p = Some(value.to_string()),
                "k" => k = value.to_ascii_lowercase(),
                _ => {}
            }
        }
    }
    p.as_deref() == Some(public_key) && k == key_type
}

/// Both records of a key set looked up: the first that is not right decides (a
/// definite answer before a DNS error, which says nothing about the record).
pub async fn check_set(dns: &DnsChecker, domain: &str, set: &DkimKeySet) -> CheckOutcome {
    let mut temporary = None;
    for record in records(domain, set) {
        let outcome = dns
            .check_matching(&record.name, {
                let (key_type, public_key) = (record.key_type, record.public_key.clone());
                std::sync::Arc::new(move |strings: &[&[u8]]| {
                    record_matches(strings, key_type, &public_key)
                })
            })
            .await;
        match outcome {
            CheckOutcome::Verified => {}
            CheckOutcome::DnsError(_) => {
                temporary.get_or_insert(outcome);
            }
            definite => return definite,
        }
    }
    temporary.unwrap_or(CheckOutcome::Verified)
}

/// Applies a check's outcome to a key set (pure). A definite "not found" or "mismatch"
/// stops the signing with a verified set at once (a signature nobody can verify is
/// worth nothing); a pending set fails after `pending_expiry`; a DNS error changes only
/// `last_check` / `last_error`.
pub fn apply(
    set: &mut DkimKeySet,
    outcome: &CheckOutcome,
    now: DateTime<Utc>,
    pending_expiry: Duration,
) {
    set.last_check = Some(now);
    if matches!(outcome, CheckOutcome::Verified) {
        if set.status != DkimStatus::Verified {
            set.verified_at = Some(now);
        }
        set.status = DkimStatus::Verified;
        set.last_error = None;
        return;
    }
    set.last_error = Some(outcome.to_string());
    if outcome.is_temporary() {
        return;
    }
    match set.status {
        DkimStatus::Verified => set.status = DkimStatus::Failed,
        DkimStatus::Pending => {
            let age = (now - set.created_at).to_std().unwrap_or_default();
            if age >= pending_expiry {
                set.status = DkimStatus::Failed;
            }
        }
        DkimStatus::Failed => {}
    }
}

/// Once the newest generation is verified, the older ones are no longer used: dropped.
fn drop_replaced(d: &mut DomainDkim) {
    if d.keys.len() > 1
        && d.keys
            .last()
            .is_some_and(|k| k.status == DkimStatus::Verified)
    {
        let keep = d.keys.len() - 1;
        d.keys.drain(..keep);
    }
}

fn ts(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Secs, true)))
        .unwrap_or(Value::Null)
}

/// The `dkim` object of a domain's JSON. Public keys and state only: nothing here reads
/// a private key.
pub fn dkim_json(dkim: Option<&DomainDkim>, signing_enabled: bool) -> Value {
    let Some(current) = dkim.and_then(DomainDkim::current) else {
        return json!({
            "status": "pending",
            "last_check": null,
            "last_error": "the signing keys are being made",
            "records": [],
            "signing": null,
            "enabled": signing_enabled,
        });
    };
    let Some(dkim) = dkim else {
        return Value::Null;
    };
    let recs: Vec<Value> = records(&dkim.domain, current)
        .iter()
        .map(|r| json!({ "name": r.name, "type": "TXT", "value": r.value, "strings": r.strings }))
        .collect();
    let signing = dkim.signing().map(|s| {
        json!({ "ed25519": s.ed25519_selector, "rsa": s.rsa_selector, "generation": s.generation })
    });
    json!({
        "status": current.status.to_string(),
        "last_check": ts(current.last_check),
        "last_error": current.last_error,
        "verified_at": ts(current.verified_at),
        "generation": current.generation,
        "selectors": [current.ed25519_selector, current.rsa_selector],
        "records": recs,
        "signing": signing,
        "enabled": signing_enabled,
    })
}

/// Making, rotating and checking keys; shared by the admin API and the background task.
pub struct DkimKeys {
    store: Store,
    dns: DnsChecker,
    config: VerificationConfig,
    /// `[deliverability] dkim`: shown with the records (keys are made either way, so
    /// turning signing on needs no new records).
    pub signing_enabled: bool,
    /// When each domain's DKIM records are next due (see [`DkimKeys::run`]).
    schedule: Schedule,
    /// Keys are being made for domains that had none (one task at a time).
    making: std::sync::atomic::AtomicBool,
}

impl DkimKeys {
    pub fn new(
        store: Store,
        dns: DnsChecker,
        config: VerificationConfig,
        signing_enabled: bool,
    ) -> Arc<DkimKeys> {
        Arc::new(DkimKeys {
            store,
            dns,
            config,
            signing_enabled,
            schedule: Schedule::default(),
            making: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The domain's keys, or `None` while they are being made.
    pub fn get(&self, hosting: &str, domain: &str) -> Result<Option<DomainDkim>, String> {
        self.store.dkim(hosting, domain).map_err(|e| e.to_string())
    }

    /// Makes a new generation (off the async runtime) and stores it. `first`: only if
    /// the domain has none yet. `Ok(None)`: the domain is gone.
    async fn add_generation(
        &self,
        hosting: &str,
        domain: &str,
        first: bool,
    ) -> Result<Option<DomainDkim>, String> {
        if first && let Some(d) = self.get(hosting, domain)?.filter(|d| !d.keys.is_empty()) {
            return Ok(Some(d));
        }
        let store = self.store.clone();
        let (hosting, domain) = (hosting.to_string(), domain.to_string());
        let made = tokio::task::spawn_blocking(move || {
            let set = generate(0)?;
            store
                .add_dkim_keys(&hosting, &domain, set, first, selectors)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("key generation task failed: {e}"))??;
        if let Some(d) = &made {
            self.track(d);
        }
        Ok(made)
    }

    /// Keys for a domain just added (or one that has none).
    pub async fn ensure(&self, hosting: &str, domain: &str) -> Result<Option<DomainDkim>, String> {
        let made = self.add_generation(hosting, domain, true).await?;
        if made.is_some() {
            tracing::info!(event = "dkim_keys_made", hosting = %Escaped(hosting), domain = %Escaped(domain), "DKIM keys made");
        }
        Ok(made)
    }

    /// `domain dkim-rotate`: a new generation, to be published; the current one signs
    /// until it is verified. A rotation while another is still pending replaces that
    /// pending one (its records were never found, so nothing depends on them).
    pub async fn rotate(&self, hosting: &str, domain: &str) -> Result<Option<DomainDkim>, String> {
        self.store
            .update_dkim(hosting, domain, |d| {
                if d.keys.len() > 1
                    && d.keys
                        .last()
                        .is_some_and(|k| k.status != DkimStatus::Verified)
                {
                    d.keys.pop();
                }
            })
            .map_err(|e| e.to_string())?;
        let rotated = self.add_generation(hosting, domain, false).await?;
        if let Some(d) = &rotated
            && let Some(k) = d.current()
        {
            tracing::info!(event = "dkim_rotated", hosting = %Escaped(hosting), domain = %Escaped(domain), generation = k.generation, "DKIM keys rotated");
        }
        Ok(rotated)
    }

    /// Checks every key set of the domain now and stores the outcomes.
    pub async fn check(&self, hosting: &str, domain: &str) -> Result<Option<DomainDkim>, String> {
        let Some(current) = self.get(hosting, domain)? else {
            return Ok(None);
        };
        let started = Utc::now();
        let mut outcomes = Vec::new();
        for set in &current.keys {
            outcomes.push((
                set.generation,
                check_set(&self.dns, &current.domain, set).await,
            ));
        }
        let now = Utc::now();
        let expiry = self.config.pending_expiry.get();
        let updated = self
            .store
            .update_dkim(hosting, domain, |d| {
                for set in &mut d.keys {
                    if set.last_check.is_some_and(|t| t > started) {
                        continue;
                    }
                    if let Some((_, outcome)) = outcomes.iter().find(|(g, _)| *g == set.generation)
                    {
                        apply(set, outcome, now, expiry);
                    }
                }
                drop_replaced(d);
            })
            .map_err(|e| e.to_string())?;
        if let Some(d) = &updated {
            self.track(d);
            for (generation, outcome) in &outcomes {
                tracing::info!(
                    event = "dkim_check",
                    hosting = %Escaped(hosting),
                    domain = %Escaped(&d.domain),
                    generation,
                    outcome = %Escaped(&outcome.to_string()),
                    "DKIM record check"
                );
            }
        }
        Ok(updated)
    }

    /// When the background task should next check the domain's DKIM records: the
    /// earliest of its key sets, verified ones every `recheck_interval`, the others
    /// every `check_interval`. `None` without keys (the rescan makes them).
    fn next_check(&self, d: &DomainDkim) -> Option<DateTime<Utc>> {
        d.keys
            .iter()
            .map(|k| {
                let interval = match k.status {
                    DkimStatus::Verified => self.config.recheck_interval.get(),
                    DkimStatus::Pending | DkimStatus::Failed => self.config.check_interval.get(),
                };
                k.last_check
                    .map_or_else(Utc::now, |t| schedule::after(t, interval))
            })
            .min()
    }

    /// Puts the domain's DKIM check on the schedule (after every change of its keys).
    fn track(&self, d: &DomainDkim) {
        self.schedule
            .set((d.hosting.clone(), d.domain.clone()), self.next_check(d));
    }

    /// At start and every [`schedule::RESCAN`]: puts every domain's DKIM check on the
    /// schedule, and makes keys for every domain that has none (domains added before
    /// this version, or by a face that does not call [`DkimKeys::ensure`]) in a task of
    /// its own, one domain after another: after an upgrade with thousands of domains that
    /// takes minutes of RSA key generation, during which the checks go on.
    async fn rescan(self: &Arc<Self>, shutdown: &watch::Receiver<bool>) {
        // One domain's keys in memory at a time: with 20,000 domains, collecting every
        // key set first cost ~120 MiB of RSS at start.
        let this = self.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            let mut slots = Vec::new();
            let mut with_keys = std::collections::HashSet::new();
            this.store.for_each_dkim(|d| {
                let at = this.next_check(&d);
                let key = (d.hosting, d.domain);
                if !d.keys.is_empty() {
                    with_keys.insert(key.clone());
                }
                slots.push((key, at));
            })?;
            let missing: Vec<(String, String)> = this
                .store
                .all_domains()?
                .into_iter()
                .map(|d| (d.hosting, d.domain))
                .filter(|k| !with_keys.contains(k))
                .collect();
            Ok::<_, domauth_store::StoreError>((slots, missing))
        })
        .await;
        let (slots, missing) = match scanned {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return tracing::error!(error = %e, "cannot list domains for DKIM keys"),
            Err(e) => return tracing::error!(error = %e, "DKIM key scan task failed"),
        };
        for (key, at) in slots {
            self.schedule.set_if_absent(key, at);
        }
        if missing.is_empty() || self.making.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let (this, shutdown) = (self.clone(), shutdown.clone());
        tokio::spawn(async move {
            tracing::info!(
                event = "dkim_keys_backfill",
                domains = missing.len(),
                "making DKIM keys for domains that have none"
            );
            for (hosting, domain) in missing {
                if *shutdown.borrow() {
                    break;
                }
                if let Err(e) = this.ensure(&hosting, &domain).await {
                    tracing::error!(error = %e, domain = %Escaped(&domain), "cannot make DKIM keys");
                }
            }
            this.making
                .store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }

    /// The background task: re-checks DKIM records as they come due, as the verifier
    /// does domains.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let check = |key: schedule::DomainKey| {
            let this = self.clone();
            async move {
                if let Err(e) = this.check(&key.0, &key.1).await {
                    tracing::error!(error = %e, domain = %Escaped(&key.1), "DKIM check failed");
                    let retry = schedule::after(Utc::now(), this.config.check_interval.get());
                    this.schedule.set(key, Some(retry));
                }
            }
        };
        let rescan_shutdown = shutdown.clone();
        self.schedule
            .run(
                self.config.concurrency,
                check,
                || self.rescan(&rescan_shutdown),
                shutdown,
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_matching_tolerates_layout_not_other_keys() {
        let p = "MIIBIjANBgkq+/abc=";
        let cases: &[(&[&str], &str, bool)] = &[
            (&["v=DKIM1; k=rsa; p=MIIBIjANBgkq+/abc="], "rsa", true),
            (&["v=DKIM1; k=rsa; p=MIIBIj", "ANBgkq+/abc="], "rsa", true),
            (
                &["\"v=DKIM1;k=rsa;  p = MIIBIj ANBgkq+/abc= \""],
                "rsa",
                true,
            ),
            (&["v=DKIM1; p=MIIBIjANBgkq+/abc="], "rsa", true),
            (&["v=DKIM1; p=MIIBIjANBgkq+/abc="], "ed25519", false),
            (&["v=DKIM1; k=rsa; p=MIIBIjANBgkq+/abd="], "rsa", false),
            (&["v=DKIM1; k=rsa; p="], "rsa", false),
            (
                &["v=DKIM1; k=ed25519; p=MIIBIjANBgkq+/abc="],
                "ed25519",
                true,
            ),
        ];
        for (strings, k, want) in cases {
            let bytes: Vec<&[u8]> = strings.iter().map(|s| s.as_bytes()).collect();
            assert_eq!(record_matches(&bytes, k, p), *want, "{strings:?} {k}");
        }
    }

    #[test]
    fn keys_records_and_spki() {
        let mut set = generate(1).unwrap();
        (set.ed25519_selector, set.rsa_selector) = selectors(1);
        let recs = records("partner.example", &set);
        assert_eq!(recs[0].name, "domauth1e._domainkey.partner.example");
        assert_eq!(recs[1].name, "domauth1r._domainkey.partner.example");
        assert!(recs[0].value.starts_with("v=DKIM1; k=ed25519; p="));
        assert!(
            recs[1]
                .value
                .starts_with("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")
        );
        assert!(recs[1].strings.len() >= 2 && recs[1].strings.iter().all(|s| s.len() <= 255));
        assert_eq!(recs[1].strings.concat(), recs[1].value);
        // The SPKI parses as a public key for ring's verifier (via mail-auth).
        let spki = B64.decode(&set.rsa_public).unwrap();
        assert_eq!(spki.len(), 294);
    }

    #[test]
    fn outcomes_move_key_sets() {
        let now = Utc::now();
        let expiry = Duration::from_secs(100);
        let mut set = generate(1).unwrap();
        apply(&mut set, &CheckOutcome::NotFound("nx".into()), now, expiry);
        assert_eq!(set.status, DkimStatus::Pending);
        apply(&mut set, &CheckOutcome::Verified, now, expiry);
        assert_eq!(
            (set.status, set.last_error.clone()),
            (DkimStatus::Verified, None)
        );
        apply(&mut set, &CheckOutcome::DnsError("t".into()), now, expiry);
        assert_eq!(set.status, DkimStatus::Verified);
        apply(
            &mut set,
            &CheckOutcome::Mismatch { found: "x".into() },
            now,
            expiry,
        );
        assert_eq!(set.status, DkimStatus::Failed);
        let later = now + chrono::Duration::seconds(200);
        let mut old = generate(1).unwrap();
        apply(
            &mut old,
            &CheckOutcome::NotFound("nx".into()),
            later,
            expiry,
        );
        assert_eq!(old.status, DkimStatus::Failed);
    }
}
