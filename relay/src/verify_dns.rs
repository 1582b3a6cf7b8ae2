//! DNS side of the domain ownership proof (SPEC §2.3–2.4).
//!
//! [`DnsChecker::check`] looks up the TXT records at one name with hickory-resolver (cache
//! off, so a record published a second ago is found) and classifies the result as a
//! [`CheckOutcome`]. [`txt_matches`] is the pure matching rule. Storing outcomes and the
//! background re-check loop live in `verify.rs`.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
    net::{DnsError, NetError, runtime::TokioRuntimeProvider},
    proto::{
        op::ResponseCode,
        rr::{Name, RData, RecordType},
    },
};

use crate::{
    logsafe::Escaped,
    verify_auth::{AuthReport, AuthoritativeDns},
};

/// Where the system's nameservers are read from when none are configured.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Longest `found` text kept in a [`CheckOutcome::Mismatch`] (in characters, before "…").
const FOUND_MAX_CHARS: usize = 200;

/// What one lookup found. Display gives the human reason stored as `last_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// A TXT record at the name matched the expected value.
    Verified,
    /// NXDOMAIN, or the name exists but has no TXT record. String: human detail, e.g.
    /// "no TXT record at domauthvalidation.partner.example (NXDOMAIN)".
    NotFound(String),
    /// TXT records exist but none matches; `found` lists what was there (each value quoted,
    /// joined with ", ", truncated to ~200 chars with "…").
    Mismatch { found: String },
    /// Timeout, SERVFAIL, REFUSED, network error: temporary, retried later.
    DnsError(String),
}

impl fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckOutcome::Verified => f.write_str("verified"),
            CheckOutcome::NotFound(detail) => write!(f, "not found: {detail}"),
            CheckOutcome::Mismatch { found } => write!(f, "mismatch: found {found}"),
            CheckOutcome::DnsError(detail) => write!(f, "dns error: {detail}"),
        }
    }
}

impl CheckOutcome {
    /// True for outcomes that say nothing about the record (retry later; SPEC §2.6: a DNS
    /// error neither starts nor resets the grace clock).
    pub fn is_temporary(&self) -> bool {
        matches!(self, CheckOutcome::DnsError(_))
    }
}

/// Pure matching rule (SPEC §2.3): a record matches when its character-strings joined (no
/// separator) equal `expected` after trimming whitespace and removing ONE pair of
/// surrounding double quotes (then trimming again). Non-UTF-8 bytes are decoded lossily.
/// An empty `expected` never matches.
pub fn txt_matches(record_strings: &[&[u8]], expected: &str) -> bool {
    !expected.is_empty() && normalize(&joined_value(record_strings)) == expected
}

/// The record's character-strings concatenated, decoded lossily.
pub(crate) fn joined_value(record_strings: &[&[u8]]) -> String {
    let bytes: Vec<u8> = record_strings.concat();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Trim, strip one pair of surrounding double quotes, trim again. Curly
/// quotes count as quotes: word processors and chat tools turn "…" into
/// “…” on the way to a DNS panel.
fn normalize(value: &str) -> &str {
    let trimmed = value.trim();
    let pairs = [
        ('"', '"'),
        ('\u{201c}', '\u{201d}'),
        ('\u{201d}', '\u{201d}'),
        ('\u{2018}', '\u{2019}'),
    ];
    for (open, close) in pairs {
        if let Some(inner) = trimmed
            .strip_prefix(open)
            .and_then(|rest| rest.strip_suffix(close))
        {
            return inner.trim();
        }
    }
    trimmed
}

/// The `found` text of a mismatch: each value quoted (Rust string escaping, so control
/// characters and quotes are visible), sorted for a stable message, joined with ", ",
/// truncated to [`FOUND_MAX_CHARS`] characters with "…".
fn format_found(values: &[String]) -> String {
    let mut quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
    quoted.sort();
    quoted.dedup();
    let joined = quoted.join(", ");
    if joined.chars().count() <= FOUND_MAX_CHARS {
        joined
    } else {
        let mut cut: String = joined.chars().take(FOUND_MAX_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// Looks up TXT records and compares them with a token. Cheap to clone (the resolver is
/// reference-counted inside); Send + Sync.
#[derive(Clone)]
pub struct DnsChecker {
    resolver: TokioResolver,
    timeout: Duration,
    /// Hard bound on one `check`, whatever the resolver's retry logic does.
    overall: Duration,
    /// Set when the checks ask the zone's authoritative servers (`dns.nameservers` empty);
    /// `resolver` then only serves to find them.
    authoritative: Option<AuthoritativeDns>,
}

impl fmt::Debug for DnsChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsChecker")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl DnsChecker {
    /// `nameservers` empty => the system's /etc/resolv.conf (error when it cannot be read or
    /// lists no nameserver). Each nameserver ip:port is asked over UDP with TCP fallback
    /// (truncated answers, UDP errors). Cache off: a record published a second ago is
    /// found. `timeout` bounds one whole `check`: two tries of `timeout / 2` each, plus a
    /// hard stop at `timeout` + 0.5 s whatever the resolver does.
    ///
    /// Does not need a tokio runtime; `check` does.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<DnsChecker, String> {
        if timeout.is_zero() {
            return Err("dns timeout must be greater than zero".to_string());
        }
        let servers: Vec<SocketAddr> = if nameservers.is_empty() {
            system_nameservers()?
        } else {
            nameservers.to_vec()
        };
        Ok(DnsChecker {
            resolver: build_resolver(&servers, timeout, true)?,
            timeout,
            overall: timeout + Duration::from_millis(500),
            authoritative: None,
        })
    }

    /// The mode of SPEC §9 for `dns.nameservers` empty: `bootstrap` (the system's
    /// nameservers) is used only to find the zone cut, the NS set and its addresses; the
    /// ownership checks then ask each authoritative server directly (`verify_auth.rs`).
    pub fn authoritative(
        bootstrap: &[SocketAddr],
        timeout: Duration,
    ) -> Result<DnsChecker, String> {
        if bootstrap.is_empty() {
            return Err("no nameserver to find the authoritative servers with".to_string());
        }
        let mut checker = DnsChecker::new(bootstrap, timeout)?;
        checker.authoritative = Some(AuthoritativeDns::new(checker.resolver.clone(), timeout));
        // The zone walk, the NS set, their addresses, then the servers: a few round trips.
        checker.overall = timeout * 4 + Duration::from_millis(500);
        Ok(checker)
    }

    /// Look up TXT at `name` and compare with `expected` (see [`DnsChecker::check_report`]).
    pub async fn check(&self, name: &str, expected: &str) -> CheckOutcome {
        self.check_report(name, expected).await.0
    }

    /// Like [`DnsChecker::check`], with which authoritative server answered what (an empty
    /// report when the configured nameservers are used as they are).
    pub async fn check_report(&self, name: &str, expected: &str) -> (CheckOutcome, AuthReport) {
        self.check_report_with(name, token_matcher(expected)).await
    }

    /// [`DnsChecker::check`] with another rule for what matches (a DKIM record compares
    /// its `p=` key, not the whole text).
    pub async fn check_matching(&self, name: &str, matches: TxtMatcher) -> CheckOutcome {
        self.check_report_with(name, matches).await.0
    }

    async fn check_report_with(
        &self,
        name: &str,
        matches: TxtMatcher,
    ) -> (CheckOutcome, AuthReport) {
        let Some(auth) = &self.authoritative else {
            return (
                self.check_configured(name, &*matches).await,
                AuthReport::default(),
            );
        };
        let display_name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        match tokio::time::timeout(self.overall, auth.check(&display_name, &matches)).await {
            Ok(done) => done,
            Err(_elapsed) => (
                CheckOutcome::DnsError(format!(
                    "timed out after {} asking the authoritative servers of {display_name}",
                    fmt_secs(self.overall)
                )),
                AuthReport::default(),
            ),
        }
    }

    /// The TXT values at `name` (each record's strings joined), through the recursive
    /// resolver: for advice (SPF, DMARC), not for the ownership proof. A name without TXT
    /// gives an empty list; a DNS failure an error in words.
    pub async fn txt_values(&self, name: &str) -> Result<Vec<String>, String> {
        let display_name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        let fqdn = Name::from_ascii(format!("{display_name}."))
            .map_err(|e| format!("invalid DNS name {display_name:?}: {e}"))?;
        let timeout = self.timeout + Duration::from_millis(500);
        match tokio::time::timeout(timeout, self.resolver.lookup(fqdn, RecordType::TXT)).await {
            Err(_elapsed) => Err(format!(
                "timed out after {} looking up TXT at {display_name}",
                fmt_secs(self.timeout)
            )),
            Ok(Ok(lookup)) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => {
                        let strings: Vec<&[u8]> = txt.txt_data.iter().map(|s| &s[..]).collect();
                        Some(joined_value(&strings))
                    }
                    _ => None,
                })
                .collect()),
            Ok(Err(e)) => match classify_error(&e, &display_name, self.timeout) {
                CheckOutcome::DnsError(detail) => Err(detail),
                _ => Ok(Vec::new()),
            },
        }
    }

    /// Look up TXT at `name` through the configured nameservers (CNAMEs followed by the
    /// resolver; the TXT records of the answer are taken even when it also holds the CNAME
    /// records) and compare with `matches`.
    async fn check_configured(
        &self,
        name: &str,
        matches: &(dyn Fn(&[&[u8]]) -> bool + Send + Sync),
    ) -> CheckOutcome {
        let display_name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        let fqdn = match Name::from_ascii(format!("{display_name}.")) {
            Ok(n) => n,
            Err(e) => {
                // Not temporary: asking again will not make the name valid.
                return CheckOutcome::NotFound(format!("invalid DNS name {display_name:?}: {e}"));
            }
        };

        let lookup =
            tokio::time::timeout(self.overall, self.resolver.lookup(fqdn, RecordType::TXT)).await;
        let outcome = match lookup {
            Err(_elapsed) => CheckOutcome::DnsError(format!(
                "timed out after {} looking up TXT at {display_name}",
                fmt_secs(self.timeout)
            )),
            Ok(Ok(lookup)) => {
                let records: Vec<Vec<&[u8]>> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(txt) => Some(txt.txt_data.iter().map(|s| &s[..]).collect()),
                        _ => None,
                    })
                    .collect();
                classify_records(&records, matches, &display_name)
            }
            Ok(Err(e)) => classify_error(&e, &display_name, self.timeout),
        };
        // The outcome quotes what a DNS server answered: anyone's text.
        tracing::debug!(
            name = %Escaped(&display_name),
            outcome = %Escaped(&outcome.to_string()),
            "TXT ownership check"
        );
        outcome
    }
}

/// What a TXT record (its strings) must hold to count as found: shared with the tasks
/// that ask each authoritative server.
pub type TxtMatcher = Arc<dyn Fn(&[&[u8]]) -> bool + Send + Sync>;

/// The ownership proof's rule (SPEC §2.3): the strings joined equal the token.
pub fn token_matcher(expected: &str) -> TxtMatcher {
    let expected = expected.to_string();
    Arc::new(move |strings: &[&[u8]]| txt_matches(strings, &expected))
}

/// A resolver over `servers` (UDP, TCP fallback on truncation and UDP errors), cache off.
/// `recursion_desired = false` asks an authoritative server for its own data only.
pub(crate) fn build_resolver(
    servers: &[SocketAddr],
    timeout: Duration,
    recursion_desired: bool,
) -> Result<TokioResolver, String> {
    let mut config = ResolverConfig::from_parts(None, vec![], vec![]);
    for addr in servers {
        let mut udp = ConnectionConfig::udp();
        udp.port = addr.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = addr.port();
        config.add_name_server(NameServerConfig::new(addr.ip(), true, vec![udp, tcp]));
    }

    // Two tries (one retry: a lost UDP packet is not a failure) of half the budget
    // each, so a dead nameserver gives a DnsError after about `timeout`.
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout / 2;
    opts.attempts = 1; // retries after the first try
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    opts.use_hosts_file = ResolveHosts::Never;
    opts.try_tcp_on_error = true;
    opts.ndots = 0;
    opts.recursion_desired = recursion_desired;

    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("cannot build DNS resolver: {e}"))
}

/// Outcome of a successful lookup whose answer holds `records` (TXT only).
pub(crate) fn classify_records(
    records: &[Vec<&[u8]>],
    matches: &dyn Fn(&[&[u8]]) -> bool,
    name: &str,
) -> CheckOutcome {
    if records.is_empty() {
        return CheckOutcome::NotFound(format!(
            "no TXT record at {name} (the name exists but has no TXT record)"
        ));
    }
    if records.iter().any(|strings| matches(strings)) {
        return CheckOutcome::Verified;
    }
    let values: Vec<String> = records.iter().map(|s| joined_value(s)).collect();
    CheckOutcome::Mismatch {
        found: format_found(&values),
    }
}

/// Outcome of a failed lookup.
pub(crate) fn classify_error(err: &NetError, name: &str, timeout: Duration) -> CheckOutcome {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => {
                CheckOutcome::NotFound(format!("no TXT record at {name} (NXDOMAIN)"))
            }
            ResponseCode::NoError => CheckOutcome::NotFound(format!(
                "no TXT record at {name} (the name exists but has no TXT record)"
            )),
            code => CheckOutcome::DnsError(format!(
                "nameserver answered {} looking up TXT at {name}",
                rcode(code)
            )),
        },
        NetError::Dns(DnsError::ResponseCode(code)) => CheckOutcome::DnsError(format!(
            "nameserver answered {} looking up TXT at {name}",
            rcode(*code)
        )),
        NetError::Timeout => CheckOutcome::DnsError(format!(
            "timed out after {} looking up TXT at {name}",
            fmt_secs(timeout)
        )),
        other => CheckOutcome::DnsError(format!("looking up TXT at {name}: {other}")),
    }
}

/// The usual mnemonic of a response code: "SERVFAIL", "REFUSED", …
fn rcode(code: ResponseCode) -> String {
    format!("{code:?}").to_ascii_uppercase()
}

pub(crate) fn fmt_secs(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The `nameserver` lines of /etc/resolv.conf, port 53.
fn system_nameservers() -> Result<Vec<SocketAddr>, String> {
    system_nameservers_from(std::path::Path::new(RESOLV_CONF))
}

/// The `nameserver` lines of a resolv.conf file (`dns.resolv_conf`), port 53.
pub fn system_nameservers_from(path: &std::path::Path) -> Result<Vec<SocketAddr>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("dns.nameservers is empty and {shown} cannot be read: {e}"))?;
    let servers = parse_resolv_conf(&text);
    if servers.is_empty() {
        return Err(format!(
            "dns.nameservers is empty and {shown} lists no usable nameserver"
        ));
    }
    Ok(servers)
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            // Drop an IPv6 zone index ("fe80::1%eth0"): not representable in IpAddr.
            let ip = words.next()?.split('%').next()?;
            ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_matches_table() {
        let cases: &[(&[&[u8]], &str, bool)] = &[
            (&[b"tok"], "tok", true),
            (&[b"  tok  "], "tok", true),
            (&[b"\"tok\""], "tok", true),
            (&[b"  \"  tok  \"  "], "tok", true),
            (&[b"\t\"tok\"\n"], "tok", true),
            (&[b"\"\"tok\"\""], "tok", false), // only ONE pair of quotes removed
            (&[b"\"\"tok\"\""], "\"tok\"", true),
            (&[b"\"tok"], "tok", false), // unbalanced quote stays
            (&[b"\"tok"], "\"tok", true),
            (&[b"to", b"k"], "tok", true), // strings joined without separator
            (&["\u{201c}tok\u{201d}".as_bytes()], "tok", true), // curly quotes pasted
            (&["\u{2018}tok\u{2019}".as_bytes()], "tok", true),
            (&[b"\"to", b"k\""], "tok", true),
            (&[b"to ", b"k"], "tok", false), // inner whitespace is significant
            (&[b"TOK"], "tok", false),       // case-sensitive
            (&[b"tok2"], "tok", false),
            (&[b""], "tok", false),
            (&[], "tok", false),
            (&[b""], "", false), // empty expected never matches
            (&[b"\"\""], "", false),
            (&[b"\""], "\"", true),             // a lone quote is not a pair
            (&[b"t\xffk"], "t\u{fffd}k", true), // lossy UTF-8
            (&[b"v=spf1 -all"], "tok", false),
        ];
        for (i, (strings, expected, want)) in cases.iter().enumerate() {
            assert_eq!(
                txt_matches(strings, expected),
                *want,
                "case {i}: {strings:?} vs {expected:?}"
            );
        }
    }

    #[test]
    fn display_table() {
        let cases = [
            (CheckOutcome::Verified, "verified", false),
            (
                CheckOutcome::NotFound(
                    "no TXT record at domauthvalidation.partner.example (NXDOMAIN)".into(),
                ),
                "not found: no TXT record at domauthvalidation.partner.example (NXDOMAIN)",
                false,
            ),
            (
                CheckOutcome::Mismatch {
                    found: "\"abc\", \"def\"".into(),
                },
                "mismatch: found \"abc\", \"def\"",
                false,
            ),
            (
                CheckOutcome::DnsError("request timed out".into()),
                "dns error: request timed out",
                true,
            ),
        ];
        for (outcome, text, temporary) in cases {
            assert_eq!(outcome.to_string(), text);
            assert_eq!(outcome.is_temporary(), temporary, "{outcome:?}");
        }
    }

    #[test]
    fn found_formatting() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(format_found(&s(&["wrong"])), "\"wrong\"");
        assert_eq!(
            format_found(&s(&["v=spf1 -all", "abc"])),
            "\"abc\", \"v=spf1 -all\""
        );
        assert_eq!(format_found(&s(&["a\"b"])), "\"a\\\"b\"");
        assert_eq!(format_found(&s(&["x", "x"])), "\"x\"");
        let long = format_found(&s(&[&"a".repeat(300)]));
        assert_eq!(long.chars().count(), FOUND_MAX_CHARS + 1);
        assert!(long.starts_with("\"aaa") && long.ends_with('…'));
        // Truncation never splits a multi-byte character.
        let wide = format_found(&s(&[&"é".repeat(300)]));
        assert_eq!(wide.chars().count(), FOUND_MAX_CHARS + 1);
    }

    #[test]
    fn classify_records_table() {
        let name = "domauthvalidation.partner.example";
        assert_eq!(
            classify_records(&[vec![b"tok"]], &|s: &[&[u8]]| txt_matches(s, "tok"), name),
            CheckOutcome::Verified
        );
        assert_eq!(
            classify_records(
                &[vec![b"other"], vec![b"\"tok\""]],
                &|s: &[&[u8]]| txt_matches(s, "tok"),
                name
            ),
            CheckOutcome::Verified
        );
        assert_eq!(
            classify_records(
                &[vec![b"other"]],
                &|s: &[&[u8]]| txt_matches(s, "tok"),
                name
            ),
            CheckOutcome::Mismatch {
                found: "\"other\"".into()
            }
        );
        assert_eq!(
            classify_records(&[], &|s: &[&[u8]]| txt_matches(s, "tok"), name).to_string(),
            "not found: no TXT record at domauthvalidation.partner.example \
             (the name exists but has no TXT record)"
        );
    }

    #[test]
    fn resolv_conf_parsing() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.1\nnameserver  ::1\n\
                    nameserver fe80::1%eth0\nnameserver bogus\noptions ndots:2\n";
        let got = parse_resolv_conf(text);
        let want: Vec<SocketAddr> = vec![
            "10.0.0.1:53".parse().unwrap(),
            "[::1]:53".parse().unwrap(),
            "[fe80::1]:53".parse().unwrap(),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn checker_is_send_sync_clone_and_builds_without_runtime() {
        fn assert_traits<T: Send + Sync + Clone + 'static>() {}
        assert_traits::<DnsChecker>();
        let checker = DnsChecker::new(&["127.0.0.1:53".parse().unwrap()], Duration::from_secs(1));
        assert!(checker.is_ok());
        assert!(DnsChecker::new(&[], Duration::ZERO).is_err());
    }
}
