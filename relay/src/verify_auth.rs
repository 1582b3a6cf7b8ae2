//! Verification that no resolver cache can fool (SPEC §9): with `dns.nameservers` empty,
//! the ownership check asks the zone's authoritative nameservers directly.
//!
//! 1. Find the zone cut: ask the system resolver (the `bootstrap`) for the SOA of the name,
//!    then of each parent, until an answer holds the SOA at that name, or a negative answer
//!    names the zone in its authority section.
//! 2. Read the zone's NS set and resolve each server's addresses, still through the system
//!    resolver (their records are not what was just published, so a cache is harmless).
//! 3. Ask every server address for the TXT record with `recursion_desired = false` and no
//!    cache (UDP, TCP when truncated), so no recursive resolver — and no negative answer it
//!    cached — stands between the check and the zone's data.
//!
//! **Disagreement between servers.** Right after a change, the secondaries of a zone may lag
//! the primary. The check verifies when ANY authoritative server answers with the right
//! value (the owner published it: that is the proof). Otherwise it is `mismatch` if any
//! server holds a different value, `not found` if any server says there is none, and
//! `dns error` only when no server gave an answer at all. Every server's answer is kept in
//! the report, so `domain show` shows the mix.
//!
//! A CNAME at the name whose target lies in another zone is followed (up to
//! [`MAX_CNAME_DEPTH`] links): the target's zone is found and its servers asked the same way.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use domauth_store::ServerAnswer;
use hickory_resolver::{
    TokioResolver,
    net::{DnsError, NetError},
    proto::rr::{Name, RData, RecordType},
};
use tokio::task::JoinSet;

use crate::verify_dns::{
    CheckOutcome, TxtMatcher, build_resolver, classify_error, classify_records, fmt_secs,
};

/// Port the authoritative servers are asked on (DNS, RFC 1035 §4.2).
const DNS_PORT: u16 = 53;
/// Addresses asked per check at most (RFC 2182 advises 2–7 servers per zone).
const MAX_SERVERS: usize = 10;
/// CNAME links followed across zones at most.
const MAX_CNAME_DEPTH: usize = 4;
/// Labels walked up at most to find the zone cut.
const MAX_WALK: usize = 16;

/// Which server answered what in one authoritative check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthReport {
    /// The zone whose servers were asked (the last one, after CNAMEs), without trailing dot.
    pub zone: Option<String>,
    pub servers: Vec<ServerAnswer>,
}

/// Finds a name's authoritative servers through `bootstrap` and asks them directly.
#[derive(Clone)]
pub struct AuthoritativeDns {
    bootstrap: TokioResolver,
    timeout: Duration,
    port: u16,
}

impl AuthoritativeDns {
    pub fn new(bootstrap: TokioResolver, timeout: Duration) -> AuthoritativeDns {
        AuthoritativeDns {
            bootstrap,
            timeout,
            port: DNS_PORT,
        }
    }

    /// Checks TXT at `name` (lower case, no trailing dot) against `expected`.
    pub async fn check(&self, name: &str, expected: &TxtMatcher) -> (CheckOutcome, AuthReport) {
        let mut name = name.to_string();
        let mut via: Vec<String> = Vec::new();
        for _ in 0..=MAX_CNAME_DEPTH {
            let (outcome, mut report, cname) = self.check_once(&name, expected).await;
            if !via.is_empty() {
                let chain = via.join(" → ");
                for s in &mut report.servers {
                    s.detail = format!("{} (via CNAME {chain} → {name})", s.detail);
                }
            }
            match cname {
                Some(target) if outcome != CheckOutcome::Verified => {
                    via.push(name);
                    name = target;
                }
                _ => return (outcome, report),
            }
        }
        (
            CheckOutcome::DnsError(format!(
                "more than {MAX_CNAME_DEPTH} CNAMEs from {}",
                via.first().map(String::as_str).unwrap_or(&name)
            )),
            AuthReport::default(),
        )
    }

    /// One zone: the outcome, the report, and a CNAME target in another zone to follow.
    async fn check_once(
        &self,
        name: &str,
        expected: &TxtMatcher,
    ) -> (CheckOutcome, AuthReport, Option<String>) {
        let fqdn = match Name::from_ascii(format!("{name}.")) {
            Ok(n) => n,
            Err(e) => {
                return (
                    CheckOutcome::NotFound(format!("invalid DNS name {name:?}: {e}")),
                    AuthReport::default(),
                    None,
                );
            }
        };
        let zone = match self.zone_of(&fqdn, name).await {
            Ok(zone) => zone,
            Err(outcome) => return (outcome, AuthReport::default(), None),
        };
        let zone_text = display(&zone);
        let mut report = AuthReport {
            zone: Some(zone_text.clone()),
            servers: Vec::new(),
        };
        let servers = match self.servers_of(&zone, &zone_text).await {
            Ok(servers) => servers,
            Err(outcome) => return (outcome, report, None),
        };

        let mut tasks = JoinSet::new();
        let mut unreachable = Vec::new();
        for (i, (ns, ip)) in servers.into_iter().enumerate() {
            let label = match ip {
                Some(ip) => format!("{ns} ({ip})"),
                None => ns.clone(),
            };
            let Some(ip) = ip else {
                unreachable.push(Answer {
                    index: i,
                    label,
                    ip: None,
                    outcome: CheckOutcome::DnsError(format!(
                        "no address found for nameserver {ns}"
                    )),
                    authoritative: false,
                });
                continue;
            };
            let (fqdn, name, expected) = (fqdn.clone(), name.to_string(), expected.clone());
            let (timeout, port) = (self.timeout, self.port);
            tasks.spawn(async move {
                let (outcome, authoritative) =
                    ask(SocketAddr::new(ip, port), fqdn, &name, &expected, timeout).await;
                Answer {
                    index: i,
                    label,
                    ip: Some(ip),
                    outcome,
                    authoritative,
                }
            });
        }
        let mut answers = unreachable;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(answer) => answers.push(answer),
                Err(e) => tracing::error!(error = %e, "authoritative query task failed"),
            }
        }
        answers.sort_by_key(|a| a.index);
        let outcomes: Vec<(&str, &CheckOutcome)> = answers
            .iter()
            .map(|a| (a.label.as_str(), &a.outcome))
            .collect();
        let outcome = combine(&outcomes, &zone_text);
        report.servers = answers
            .iter()
            .map(|a| server_answer(&a.label, &a.outcome, a.authoritative))
            .collect();

        // Not verified: maybe the name is a CNAME into another zone, which these servers
        // do not serve (they refuse, or answer only the CNAME).
        let cname = if outcome == CheckOutcome::Verified {
            None
        } else {
            self.cname_elsewhere(&answers, &fqdn, &zone).await
        };
        (outcome, report, cname)
    }

    /// The zone that holds `fqdn` (`shown` is its text for messages).
    async fn zone_of(&self, fqdn: &Name, shown: &str) -> Result<Name, CheckOutcome> {
        let mut candidate = fqdn.clone();
        for _ in 0..MAX_WALK {
            let lookup = tokio::time::timeout(
                self.timeout + Duration::from_millis(500),
                self.bootstrap.lookup(candidate.clone(), RecordType::SOA),
            )
            .await;
            match lookup {
                Err(_elapsed) => {
                    return Err(CheckOutcome::DnsError(format!(
                        "timed out after {} looking for the zone of {shown}",
                        fmt_secs(self.timeout)
                    )));
                }
                Ok(Ok(lookup)) => {
                    let apex = lookup
                        .answers()
                        .iter()
                        .any(|r| matches!(r.data, RData::SOA(_)) && r.name == candidate);
                    if apex {
                        return Ok(candidate);
                    }
                }
                Ok(Err(NetError::Dns(DnsError::NoRecordsFound(no)))) => {
                    // A negative answer carries the SOA of the zone the name would be in.
                    if let Some(soa) = &no.soa
                        && soa.name.zone_of(&candidate)
                    {
                        return Ok(soa.name.clone());
                    }
                }
                Ok(Err(e)) => {
                    return Err(CheckOutcome::DnsError(format!(
                        "looking for the zone of {shown} (SOA at {}): {}",
                        display(&candidate),
                        error_words(&e, self.timeout)
                    )));
                }
            }
            if candidate.is_root() {
                break;
            }
            candidate = candidate.base_name();
        }
        Err(CheckOutcome::DnsError(format!("no zone found for {shown}")))
    }

    /// The zone's nameservers with their addresses (`None`: no address found), in the order
    /// of the NS set, at most [`MAX_SERVERS`] addresses.
    async fn servers_of(
        &self,
        zone: &Name,
        zone_text: &str,
    ) -> Result<Vec<(String, Option<IpAddr>)>, CheckOutcome> {
        let budget = self.timeout + Duration::from_millis(500);
        let ns = tokio::time::timeout(budget, self.bootstrap.lookup(zone.clone(), RecordType::NS))
            .await
            .map_err(|_| {
                CheckOutcome::DnsError(format!(
                    "timed out after {} reading the NS records of {zone_text}",
                    fmt_secs(self.timeout)
                ))
            })?
            .map_err(|e| {
                CheckOutcome::DnsError(format!(
                    "reading the NS records of {zone_text}: {}",
                    error_words(&e, self.timeout)
                ))
            })?;
        let mut names: Vec<Name> = Vec::new();
        for r in ns.answers() {
            if let RData::NS(n) = &r.data
                && !names.contains(&n.0)
            {
                names.push(n.0.clone());
            }
        }
        if names.is_empty() {
            return Err(CheckOutcome::DnsError(format!(
                "{zone_text} has no NS records"
            )));
        }
        let mut servers = Vec::new();
        for name in names {
            if servers.len() >= MAX_SERVERS {
                break;
            }
            let shown = display(&name);
            let ips = tokio::time::timeout(budget, self.bootstrap.lookup_ip(name))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|l| l.iter().collect::<Vec<IpAddr>>())
                .unwrap_or_default();
            if ips.is_empty() {
                servers.push((shown.clone(), None));
            }
            for ip in ips {
                servers.push((shown.clone(), Some(ip)));
            }
        }
        servers.truncate(MAX_SERVERS);
        Ok(servers)
    }

    /// A CNAME target outside `zone` at `fqdn`, asked of the first server that answered.
    async fn cname_elsewhere(
        &self,
        answers: &[Answer],
        fqdn: &Name,
        zone: &Name,
    ) -> Option<String> {
        for ip in answers.iter().filter_map(|a| a.ip) {
            let resolver =
                build_resolver(&[SocketAddr::new(ip, self.port)], self.timeout, false).ok()?;
            let Ok(Ok(lookup)) = tokio::time::timeout(
                self.timeout + Duration::from_millis(500),
                resolver.lookup(fqdn.clone(), RecordType::CNAME),
            )
            .await
            else {
                continue;
            };
            let target = lookup.answers().iter().find_map(|r| match &r.data {
                RData::CNAME(c) if r.name == *fqdn => Some(c.0.clone()),
                _ => None,
            })?;
            // A target inside the zone was already followed by the server's own answer.
            return (!zone.zone_of(&target)).then(|| display(&target));
        }
        None
    }
}

/// One server's answer in [`AuthoritativeDns::check_once`].
struct Answer {
    /// Position in the NS set (answers arrive in any order).
    index: usize,
    label: String,
    ip: Option<IpAddr>,
    outcome: CheckOutcome,
    authoritative: bool,
}

/// Asks one server, without recursion. Returns the outcome and the answer's AA bit.
async fn ask(
    server: SocketAddr,
    fqdn: Name,
    name: &str,
    expected: &TxtMatcher,
    timeout: Duration,
) -> (CheckOutcome, bool) {
    let resolver = match build_resolver(&[server], timeout, false) {
        Ok(r) => r,
        Err(e) => return (CheckOutcome::DnsError(e), false),
    };
    let lookup = tokio::time::timeout(
        timeout + Duration::from_millis(500),
        resolver.lookup(fqdn, RecordType::TXT),
    )
    .await;
    match lookup {
        Err(_elapsed) => (
            CheckOutcome::DnsError(format!(
                "timed out after {} looking up TXT at {name}",
                fmt_secs(timeout)
            )),
            false,
        ),
        Ok(Ok(lookup)) => {
            let records: Vec<Vec<&[u8]>> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(txt.txt_data.iter().map(|s| &s[..]).collect()),
                    _ => None,
                })
                .collect();
            (
                classify_records(&records, &**expected, name),
                lookup.message().metadata.authoritative,
            )
        }
        Ok(Err(NetError::Dns(DnsError::NoRecordsFound(no))))
            if no.soa.is_none() && no.ns.is_some() =>
        {
            // A referral: this server does not hold the zone (lame delegation).
            (
                CheckOutcome::DnsError(format!(
                    "referral instead of an answer for {name}: the server is not authoritative"
                )),
                false,
            )
        }
        Ok(Err(e)) => {
            let aa = matches!(&e, NetError::Dns(DnsError::NoRecordsFound(no)) if no.soa.is_some());
            (classify_error(&e, name, timeout), aa)
        }
    }
}

/// The outcome over all servers (see the module docs). `answers`: (server label, outcome).
pub fn combine(answers: &[(&str, &CheckOutcome)], zone: &str) -> CheckOutcome {
    if answers.iter().any(|(_, o)| **o == CheckOutcome::Verified) {
        return CheckOutcome::Verified;
    }
    if let Some((_, o)) = answers
        .iter()
        .find(|(_, o)| matches!(o, CheckOutcome::Mismatch { .. }))
    {
        return (*o).clone();
    }
    if let Some((server, CheckOutcome::NotFound(detail))) = answers
        .iter()
        .find(|(_, o)| matches!(o, CheckOutcome::NotFound(_)))
    {
        return CheckOutcome::NotFound(format!("{detail} at {server}"));
    }
    if answers.is_empty() {
        return CheckOutcome::DnsError(format!("no authoritative server of {zone} to ask"));
    }
    let each: Vec<String> = answers
        .iter()
        .map(|(server, o)| format!("{server}: {}", detail_of(o)))
        .collect();
    CheckOutcome::DnsError(format!(
        "no authoritative server of {zone} answered ({})",
        each.join("; ")
    ))
}

/// A failed lookup of the zone walk in words (the record type is in the caller's words).
fn error_words(err: &NetError, timeout: Duration) -> String {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(no)) => {
            format!(
                "the nameserver answered {:?} without records",
                no.response_code
            )
        }
        NetError::Dns(DnsError::ResponseCode(code)) => {
            format!(
                "the nameserver answered {}",
                format!("{code:?}").to_ascii_uppercase()
            )
        }
        NetError::Timeout => format!("timed out after {}", fmt_secs(timeout)),
        other => other.to_string(),
    }
}

/// The kind of an outcome as stored per server: `verified`, `not found`, `mismatch`,
/// `dns error`.
pub fn kind(outcome: &CheckOutcome) -> &'static str {
    match outcome {
        CheckOutcome::Verified => "verified",
        CheckOutcome::NotFound(_) => "not found",
        CheckOutcome::Mismatch { .. } => "mismatch",
        CheckOutcome::DnsError(_) => "dns error",
    }
}

/// The outcome's reason without its kind ("no TXT record at …").
fn detail_of(outcome: &CheckOutcome) -> String {
    match outcome {
        CheckOutcome::Verified => "the record matches".to_string(),
        CheckOutcome::NotFound(d) | CheckOutcome::DnsError(d) => d.clone(),
        CheckOutcome::Mismatch { found } => format!("found {found}"),
    }
}

fn server_answer(label: &str, outcome: &CheckOutcome, authoritative: bool) -> ServerAnswer {
    let mut detail = detail_of(outcome);
    if !authoritative && !outcome.is_temporary() {
        detail.push_str(" (answer without the authoritative bit)");
    }
    ServerAnswer {
        server: label.to_string(),
        outcome: kind(outcome).to_string(),
        detail,
        authoritative,
    }
}

/// A name as users write it: lower case, no trailing dot.
fn display(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combining_server_answers() {
        let v = CheckOutcome::Verified;
        let nx = CheckOutcome::NotFound("no TXT record at x (NXDOMAIN)".into());
        let mm = CheckOutcome::Mismatch {
            found: "\"old\"".into(),
        };
        let err = CheckOutcome::DnsError("timed out".into());
        let z = "partner.example";
        assert_eq!(combine(&[("a", &nx), ("b", &v)], z), v);
        assert_eq!(combine(&[("a", &err), ("b", &v)], z), v);
        assert_eq!(combine(&[("a", &nx), ("b", &mm)], z), mm);
        assert_eq!(
            combine(&[("a", &err), ("ns2 (10.0.0.2)", &nx)], z),
            CheckOutcome::NotFound("no TXT record at x (NXDOMAIN) at ns2 (10.0.0.2)".into())
        );
        let all_down = combine(&[("a", &err), ("b", &err)], z);
        assert_eq!(
            all_down.to_string(),
            "dns error: no authoritative server of partner.example answered \
             (a: timed out; b: timed out)"
        );
        assert!(combine(&[], z).is_temporary());
    }

    #[test]
    fn server_answers_say_what_and_whether_authoritative() {
        let a = server_answer("ns1.p.example (10.0.0.1)", &CheckOutcome::Verified, true);
        assert_eq!(
            (a.outcome.as_str(), a.detail.as_str()),
            ("verified", "the record matches")
        );
        let b = server_answer(
            "ns2",
            &CheckOutcome::NotFound("no TXT record at x (NXDOMAIN)".into()),
            false,
        );
        assert_eq!(b.outcome, "not found");
        assert!(b.detail.ends_with("(answer without the authoritative bit)"));
        let c = server_answer("ns3", &CheckOutcome::DnsError("timed out".into()), false);
        assert_eq!(
            (c.outcome.as_str(), c.detail.as_str()),
            ("dns error", "timed out")
        );
    }
}
