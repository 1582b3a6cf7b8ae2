//! What the last DNS check of an authorized domain saw beyond the pass/fail of its
//! ownership proof (SPEC §9): which authoritative nameserver answered what, and the SPF and
//! DMARC advice. Kept with the domain so `domain show` can report it without asking DNS;
//! every field defaults, so records written before these existed still load.

use serde::{Deserialize, Serialize};

/// Findings of the last check. Empty (the default) until a check has run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DnsReport {
    /// The zone whose authoritative servers were asked (`None` when `dns.nameservers` is
    /// set: those servers are used as they are).
    pub zone: Option<String>,
    /// One entry per authoritative server asked, in the order of the NS set.
    pub servers: Vec<ServerAnswer>,
    pub spf: Option<SpfFinding>,
    pub dmarc: Option<DmarcFinding>,
}

/// What one authoritative nameserver answered for the validation record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ServerAnswer {
    /// The server's name from the NS set and its address: `ns1.partner.example (192.0.2.1)`.
    pub server: String,
    /// `verified`, `not found`, `mismatch` or `dns error` (the kinds of SPEC §2.4).
    pub outcome: String,
    /// The human reason, as `last_error` words it.
    pub detail: String,
    /// The answer carried the AA bit.
    pub authoritative: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SpfStatus {
    /// The SPF record includes the relay's `spf_include` (directly or one include deep).
    Ok,
    /// The domain has no SPF record.
    Missing,
    /// An SPF record exists but does not include the relay.
    NotCovering,
    /// `[deliverability] spf_include` is empty: nothing to compare with.
    #[default]
    NoneConfigured,
    /// The lookup failed (timeout, SERVFAIL); retried at the next check.
    DnsError,
}

/// The domain's SPF record compared with `[deliverability] spf_include`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SpfFinding {
    pub status: SpfStatus,
    /// The SPF record(s) found at the domain, as published.
    pub found: Vec<String>,
    /// What to do, in words, with the exact record text when a record should change.
    pub advice: Option<String>,
    /// The exact TXT value to publish at the domain (`None` when nothing needs changing).
    pub record: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
    /// No DMARC record at `_dmarc.<domain>`.
    #[default]
    Missing,
    /// A record without a valid `p=` tag (receivers ignore it, RFC 7489 §6.6.3).
    Invalid,
    /// The lookup failed (timeout, SERVFAIL); retried at the next check.
    DnsError,
}

/// The domain's DMARC record (`_dmarc.<domain>`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DmarcFinding {
    pub policy: DmarcPolicy,
    /// The DMARC record found, as published.
    pub found: Option<String>,
    pub advice: Option<String>,
    /// A TXT value to publish at `_dmarc.<domain>` when there is none (or it is invalid).
    pub record: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_partial_json_load() {
        let r: DnsReport = serde_json::from_str("{}").unwrap();
        assert_eq!(r, DnsReport::default());
        let r: DnsReport =
            serde_json::from_str(r#"{"spf":{"status":"not_covering"},"servers":[{"server":"a"}]}"#)
                .unwrap();
        assert_eq!(r.spf.unwrap().status, SpfStatus::NotCovering);
        assert_eq!(r.servers[0].server, "a");
    }

    #[test]
    fn domain_records_written_before_the_report_load() {
        let old = r#"{"hosting":"acme","domain":"partner.example","token":"t","status":"verified",
            "created_at":"2026-01-01T00:00:00Z","verified_at":null,"last_check":null,
            "last_error":null,"record_missing_since":null}"#;
        let d: crate::AuthorizedDomain = serde_json::from_str(old).unwrap();
        assert_eq!(d.dns_report, DnsReport::default());
    }
}
