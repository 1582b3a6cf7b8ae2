//! SPF and DMARC advice for an authorized domain (SPEC §9): does the domain's SPF record
//! cover the relay (`[deliverability] spf_include`), and which DMARC policy does it
//! publish — with the exact record text to publish. Advice only: nothing here is ever a
//! condition for sending.
//!
//! The rules are pure functions over the TXT values found ([`assess_spf`],
//! [`assess_dmarc`], [`insert_include`]); [`advise`] does the lookups through the
//! verifier's resolver (the recursive one: these records are read for advice, so a cached
//! answer is good enough and is refreshed at the next check).

use domauth_store::{DmarcFinding, DmarcPolicy, SpfFinding, SpfStatus};

use crate::verify_dns::DnsChecker;

/// At most this many `include:` targets of the domain's record are looked at (one level).
const MAX_FOLLOWED_INCLUDES: usize = 10;

/// An SPF record is a TXT value that starts with the version `v=spf1` followed by a space
/// or nothing (RFC 7208 §4.5); case-insensitive.
pub fn is_spf(value: &str) -> bool {
    let v = value.trim();
    v.len() >= 6
        && v[..6].eq_ignore_ascii_case("v=spf1")
        && v[6..].chars().next().is_none_or(char::is_whitespace)
}

/// `[deliverability] spf_include` must be a host name SPF can include: dot-separated labels
/// of letters, digits, `-` and `_` (as in `_spf.hosting.example`), at least two labels, a
/// trailing dot allowed, no macros.
pub fn is_spf_domain(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let labels: Vec<&str> = name.split('.').collect();
    name.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A DMARC record starts with the tag `v=DMARC1` (RFC 7489 §6.4), spaces around `=`
/// allowed; compared case-insensitively to be lenient with what users paste.
pub fn is_dmarc(value: &str) -> bool {
    let Some(first) = value.trim().split(';').next() else {
        return false;
    };
    let mut kv = first.splitn(2, '=');
    let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
        return false;
    };
    k.trim().eq_ignore_ascii_case("v") && v.trim().eq_ignore_ascii_case("DMARC1")
}

fn same_domain(a: &str, b: &str) -> bool {
    a.trim_end_matches('.')
        .eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// The record passes mail from `include`'s senders: an `include:<include>` mechanism with
/// the pass qualifier (none or `+`), or `redirect=<include>`.
pub fn spf_covers(record: &str, include: &str) -> bool {
    record.split_whitespace().skip(1).any(|term| {
        if let Some(target) = strip_prefix_ci(term, "redirect=") {
            return same_domain(target, include);
        }
        let term = term.strip_prefix('+').unwrap_or(term);
        strip_prefix_ci(term, "include:").is_some_and(|t| same_domain(t, include))
    })
}

/// The targets of the record's pass-qualified `include:` mechanisms (macros skipped).
pub fn spf_includes(record: &str) -> Vec<String> {
    record
        .split_whitespace()
        .skip(1)
        .filter_map(|term| {
            let term = term.strip_prefix('+').unwrap_or(term);
            strip_prefix_ci(term, "include:")
        })
        .filter(|t| !t.contains('%') && !t.is_empty())
        .map(|t| t.trim_end_matches('.').to_ascii_lowercase())
        .collect()
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s.is_char_boundary(prefix.len()))
        .then(|| s.split_at(prefix.len()))
        .filter(|(head, _)| head.eq_ignore_ascii_case(prefix))
        .map(|(_, tail)| tail)
}

/// `record` with `include:<include>` inserted before its `all` mechanism (whatever its
/// qualifier), or appended when it has none; terms joined by single spaces.
pub fn insert_include(record: &str, include: &str) -> String {
    let mut terms: Vec<&str> = record.split_whitespace().collect();
    let new_term = format!("include:{include}");
    let at = terms
        .iter()
        .position(|t| {
            let bare = t.trim_start_matches(['+', '-', '~', '?']);
            t.len() - bare.len() <= 1 && bare.eq_ignore_ascii_case("all")
        })
        .unwrap_or(terms.len());
    terms.insert(at, &new_term);
    terms.join(" ")
}

/// The record to publish at a domain without SPF.
pub fn new_spf_record(include: &str) -> String {
    format!("v=spf1 include:{include} ~all")
}

/// SPF finding from the TXT values at the domain. `include` empty: no advice.
/// `covered_via`: an `include:` target of the domain's record whose own SPF record covers
/// `include` (found by following includes one level).
pub fn assess_spf(
    domain: &str,
    include: &str,
    txt_values: &[String],
    covered_via: Option<&str>,
) -> SpfFinding {
    let found: Vec<String> = txt_values.iter().filter(|v| is_spf(v)).cloned().collect();
    if include.is_empty() {
        return SpfFinding {
            status: SpfStatus::NoneConfigured,
            found,
            advice: None,
            record: None,
        };
    }
    match found.as_slice() {
        [] => {
            let record = new_spf_record(include);
            SpfFinding {
                status: SpfStatus::Missing,
                advice: Some(format!(
                    "{domain} has no SPF record: publish TXT at {domain}: \"{record}\" \
                     (add the domain's other senders, e.g. mx, before ~all)"
                )),
                record: Some(record),
                found,
            }
        }
        [one] if spf_covers(one, include) => SpfFinding {
            status: SpfStatus::Ok,
            advice: None,
            record: None,
            found,
        },
        [_] if covered_via.is_some() => SpfFinding {
            status: SpfStatus::Ok,
            advice: Some(format!(
                "covered through include:{}",
                covered_via.unwrap_or_default()
            )),
            record: None,
            found,
        },
        [one] => {
            let record = insert_include(one, include);
            SpfFinding {
                status: SpfStatus::NotCovering,
                advice: Some(format!(
                    "the SPF record of {domain} does not include {include}: replace it with \
                     \"{record}\""
                )),
                record: Some(record),
                found,
            }
        }
        [first, ..] => {
            // RFC 7208 §4.5: more than one record is a permanent error; receivers then
            // treat the domain as having no usable SPF at all.
            let record = if spf_covers(first, include) {
                first.split_whitespace().collect::<Vec<_>>().join(" ")
            } else {
                insert_include(first, include)
            };
            SpfFinding {
                status: SpfStatus::NotCovering,
                advice: Some(format!(
                    "{domain} has {} SPF records, which receivers treat as an error (RFC 7208 \
                     §4.5): replace them with one: \"{record}\"",
                    found.len()
                )),
                record: Some(record),
                found,
            }
        }
    }
}

/// The value of tag `p` of a DMARC record, lower-cased.
fn dmarc_tag<'a>(record: &'a str, tag: &str) -> Option<&'a str> {
    record.split(';').find_map(|part| {
        let mut kv = part.splitn(2, '=');
        let k = kv.next()?.trim();
        let v = kv.next()?.trim();
        k.eq_ignore_ascii_case(tag).then_some(v)
    })
}

/// A DMARC record to start with: monitoring only.
pub fn new_dmarc_record() -> String {
    "v=DMARC1; p=none".to_string()
}

/// DMARC finding from the TXT values at `_dmarc.<domain>`.
pub fn assess_dmarc(domain: &str, txt_values: &[String]) -> DmarcFinding {
    let found: Vec<&String> = txt_values.iter().filter(|v| is_dmarc(v)).collect();
    let name = format!("_dmarc.{domain}");
    let start = new_dmarc_record();
    let record = match found.as_slice() {
        [] => {
            return DmarcFinding {
                policy: DmarcPolicy::Missing,
                found: None,
                advice: Some(format!(
                    "{domain} publishes no DMARC policy: publish TXT at {name}: \"{start}\" \
                     (add rua=mailto:… for reports), and move to p=quarantine or p=reject \
                     once its mail passes DKIM"
                )),
                record: Some(start),
            };
        }
        [one] => one.trim().to_string(),
        [first, ..] => {
            // RFC 7489 §6.6.3: several records mean no DMARC policy at all.
            return DmarcFinding {
                policy: DmarcPolicy::Invalid,
                found: Some(first.trim().to_string()),
                advice: Some(format!(
                    "{name} has {} DMARC records, so receivers apply none (RFC 7489 §6.6.3): \
                     keep exactly one",
                    found.len()
                )),
                record: None,
            };
        }
    };
    let policy = match dmarc_tag(&record, "p")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("none") => DmarcPolicy::None,
        Some("quarantine") => DmarcPolicy::Quarantine,
        Some("reject") => DmarcPolicy::Reject,
        _ => DmarcPolicy::Invalid,
    };
    let (advice, fix) = match policy {
        DmarcPolicy::None => (
            format!(
                "p=none: receivers only report DMARC failures of {domain}; once mail relayed \
                 here is DKIM-signed for {domain}, consider p=quarantine, then p=reject"
            ),
            None,
        ),
        DmarcPolicy::Quarantine | DmarcPolicy::Reject => (
            format!(
                "p={}: receivers {} mail of {domain} that fails DMARC, so mail relayed here \
                 must pass DKIM for {domain} (its DKIM record verified) or SPF (see the SPF \
                 advice)",
                if policy == DmarcPolicy::Reject {
                    "reject"
                } else {
                    "quarantine"
                },
                if policy == DmarcPolicy::Reject {
                    "refuse"
                } else {
                    "put in spam"
                },
            ),
            None,
        ),
        _ => (
            format!(
                "the DMARC record at {name} has no valid p= tag, so receivers ignore it: \
                 publish \"{start}\" or fix its p= tag"
            ),
            Some(start),
        ),
    };
    DmarcFinding {
        policy,
        found: Some(record),
        advice: Some(advice),
        record: fix,
    }
}

/// Reads the SPF and DMARC records of `domain` and assesses them (both at once). A failed
/// lookup gives a `dns_error` finding (retried at the next check).
pub async fn advise(
    dns: &DnsChecker,
    domain: &str,
    spf_include: &str,
) -> (SpfFinding, DmarcFinding) {
    let include = spf_include
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    tokio::join!(spf(dns, domain, &include), dmarc(dns, domain))
}

async fn spf(dns: &DnsChecker, domain: &str, include: &str) -> SpfFinding {
    let values = match dns.txt_values(domain).await {
        Ok(values) => values,
        Err(e) => {
            return SpfFinding {
                status: SpfStatus::DnsError,
                found: Vec::new(),
                advice: Some(format!("could not read the SPF record: {e}")),
                record: None,
            };
        }
    };
    let spf_records: Vec<&String> = values.iter().filter(|v| is_spf(v)).collect();
    let mut covered_via = None;
    if let [one] = spf_records.as_slice()
        && !include.is_empty()
        && !spf_covers(one, include)
    {
        // One level of includes: the domain may include a provider record that includes
        // ours. A DNS error ends the search (the resolver is unlikely to do better on the
        // next name, and the check must not wait for each).
        for target in spf_includes(one).into_iter().take(MAX_FOLLOWED_INCLUDES) {
            let Ok(inner) = dns.txt_values(&target).await else {
                break;
            };
            if inner.iter().any(|v| is_spf(v) && spf_covers(v, include)) {
                covered_via = Some(target);
                break;
            }
        }
    }
    assess_spf(domain, include, &values, covered_via.as_deref())
}

async fn dmarc(dns: &DnsChecker, domain: &str) -> DmarcFinding {
    match dns.txt_values(&format!("_dmarc.{domain}")).await {
        Err(e) => DmarcFinding {
            policy: DmarcPolicy::DnsError,
            found: None,
            advice: Some(format!("could not read the DMARC record: {e}")),
            record: None,
        },
        Ok(values) => assess_dmarc(domain, &values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn spf_detection() {
        for (value, want) in [
            ("v=spf1 -all", true),
            ("V=SPF1 mx ~all", true),
            ("  v=spf1", true),
            ("v=spf10 -all", false),
            ("v=spf1-all", false),
            ("spf1", false),
            ("domauth-abc", false),
            ("", false),
        ] {
            assert_eq!(is_spf(value), want, "{value:?}");
        }
    }

    #[test]
    fn spf_include_names() {
        for (name, want) in [
            ("_spf.hosting.example", true),
            ("spf.Hosting.Example.", true),
            ("hosting", false),
            ("", false),
            ("a..example", false),
            ("_spf.hosting.example ~all", false),
            ("%{d}.example", false),
            ("include:x.example", false),
        ] {
            assert_eq!(is_spf_domain(name), want, "{name:?}");
        }
    }

    #[test]
    fn spf_coverage() {
        let inc = "_spf.hosting.example";
        for (record, want) in [
            ("v=spf1 include:_spf.hosting.example ~all", true),
            ("v=spf1 +include:_SPF.Hosting.Example. -all", true),
            ("v=spf1 mx redirect=_spf.hosting.example", true),
            ("v=spf1 -include:_spf.hosting.example ~all", false),
            ("v=spf1 ~include:_spf.hosting.example ~all", false),
            ("v=spf1 include:_spf.hosting.example.evil ~all", false),
            ("v=spf1 mx ~all", false),
            ("v=spf1 a:_spf.hosting.example ~all", false),
        ] {
            assert_eq!(spf_covers(record, inc), want, "{record:?}");
        }
        assert_eq!(
            spf_includes(
                "v=spf1 include:a.example +include:B.example. -include:c %{d}x include:%{d}.x ~all"
            ),
            vec!["a.example", "b.example"]
        );
    }

    #[test]
    fn include_insertion() {
        let inc = "_spf.h.example";
        for (record, want) in [
            ("v=spf1 mx ~all", "v=spf1 mx include:_spf.h.example ~all"),
            ("v=spf1 -all", "v=spf1 include:_spf.h.example -all"),
            (
                "v=spf1  a   mx  ?all",
                "v=spf1 a mx include:_spf.h.example ?all",
            ),
            ("v=spf1 mx ALL", "v=spf1 mx include:_spf.h.example ALL"),
            ("v=spf1 mx +all", "v=spf1 mx include:_spf.h.example +all"),
            ("v=spf1 mx", "v=spf1 mx include:_spf.h.example"),
            (
                "v=spf1 redirect=_spf.other.example",
                "v=spf1 redirect=_spf.other.example include:_spf.h.example",
            ),
            (
                "v=spf1 include:allowed.example ~all",
                "v=spf1 include:allowed.example include:_spf.h.example ~all",
            ),
        ] {
            assert_eq!(insert_include(record, inc), want, "{record:?}");
        }
    }

    #[test]
    fn spf_findings() {
        let d = "partner.example";
        let inc = "_spf.h.example";
        let missing = assess_spf(
            d,
            inc,
            &v(&["domauth-x", "google-site-verification=y"]),
            None,
        );
        assert_eq!(missing.status, SpfStatus::Missing);
        assert_eq!(
            missing.record.as_deref(),
            Some("v=spf1 include:_spf.h.example ~all")
        );
        assert!(
            missing
                .advice
                .unwrap()
                .contains("\"v=spf1 include:_spf.h.example ~all\"")
        );

        let nc = assess_spf(d, inc, &v(&["v=spf1 mx -all"]), None);
        assert_eq!(nc.status, SpfStatus::NotCovering);
        assert_eq!(nc.found, v(&["v=spf1 mx -all"]));
        assert_eq!(
            nc.record.as_deref(),
            Some("v=spf1 mx include:_spf.h.example -all")
        );

        let ok = assess_spf(d, inc, &v(&["v=spf1 include:_spf.h.example -all"]), None);
        assert_eq!(
            (ok.status, ok.record, ok.advice),
            (SpfStatus::Ok, None, None)
        );

        let via = assess_spf(
            d,
            inc,
            &v(&["v=spf1 include:p.example -all"]),
            Some("p.example"),
        );
        assert_eq!(via.status, SpfStatus::Ok);
        assert!(via.advice.unwrap().contains("include:p.example"));

        let two = assess_spf(
            d,
            inc,
            &v(&["v=spf1 include:_spf.h.example -all", "v=spf1 mx -all"]),
            None,
        );
        assert_eq!(two.status, SpfStatus::NotCovering);
        assert!(two.advice.unwrap().contains("2 SPF records"));

        let none = assess_spf(d, "", &v(&["v=spf1 mx -all"]), None);
        assert_eq!(
            (none.status, none.advice),
            (SpfStatus::NoneConfigured, None)
        );
        assert_eq!(none.found, v(&["v=spf1 mx -all"]));
    }

    #[test]
    fn dmarc_findings() {
        let d = "partner.example";
        let cases = [
            (vec![], DmarcPolicy::Missing, true),
            (
                v(&["v=DMARC1; p=reject; rua=mailto:x@partner.example"]),
                DmarcPolicy::Reject,
                false,
            ),
            (
                v(&["v=DMARC1;p=quarantine"]),
                DmarcPolicy::Quarantine,
                false,
            ),
            (v(&["v = dmarc1 ; P = None"]), DmarcPolicy::None, false),
            (v(&["v=DMARC1; rua=mailto:x@y"]), DmarcPolicy::Invalid, true),
            (v(&["v=DMARC1; p=bogus"]), DmarcPolicy::Invalid, true),
            (v(&["v=spf1 -all"]), DmarcPolicy::Missing, true),
            (
                v(&["v=DMARC1; p=none", "v=DMARC1; p=reject"]),
                DmarcPolicy::Invalid,
                false,
            ),
        ];
        for (values, policy, has_fix) in cases {
            let f = assess_dmarc(d, &values);
            assert_eq!(f.policy, policy, "{values:?}");
            assert_eq!(f.record.is_some(), has_fix, "{values:?}");
            assert!(f.advice.is_some());
        }
        let missing = assess_dmarc(d, &[]);
        assert!(
            missing
                .advice
                .unwrap()
                .contains("_dmarc.partner.example: \"v=DMARC1; p=none\"")
        );
    }
}
