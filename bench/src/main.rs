//! domauth-bench: load generator, counting SMTP sink and idle-connection holder.
//! Every address must be on loopback; every wait is bounded.

mod client;
mod hold;
mod load;
mod plot;
mod sink;
mod stats;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use client::TlsMode;

#[derive(Parser)]
#[command(
    name = "domauth-bench",
    about = "Benchmark tools for the domauth SMTP relay (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N concurrent sessions, each sending K messages of S bytes.
    Load {
        /// Server address (loopback only).
        #[arg(long, default_value = "127.0.0.1:2587")]
        server: String,
        #[arg(long, value_enum, default_value = "starttls")]
        tls: TlsMode,
        /// Concurrent sessions (at most 20000).
        #[arg(long, default_value_t = 20)]
        sessions: usize,
        /// Messages per session.
        #[arg(long, default_value_t = 250)]
        messages: usize,
        /// Body size in bytes.
        #[arg(long, default_value_t = 10240)]
        size: usize,
        /// A file of `login:password` lines, or a comma-separated list of pairs.
        #[arg(long)]
        mailboxes: Option<String>,
        /// Login pattern, `{i}` replaced by 1..=--mailbox-count (e.g. `user{i}@bench.test`).
        #[arg(long)]
        mailbox_pattern: Option<String>,
        /// Password for --mailbox-pattern logins.
        #[arg(long, default_value = "pw")]
        password: String,
        #[arg(long, default_value_t = 20)]
        mailbox_count: usize,
        /// Envelope and header recipient.
        #[arg(long, default_value = "sink@example.org")]
        rcpt: String,
        /// Skip AUTH (MAIL FROM is the mailbox login if given, else bench@bench.test).
        #[arg(long)]
        no_auth: bool,
        /// Send as other addresses than the login (authorized accounts): `{i}` runs over
        /// 1..=--sender-count, `{j}` is i % --sender-domains.
        #[arg(long)]
        sender_pattern: Option<String>,
        #[arg(long, default_value_t = 1)]
        sender_count: usize,
        #[arg(long, default_value_t = 1)]
        sender_domains: usize,
        /// Print one JSON object on stdout (the table goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Counting SMTP sink: 250 to everything, counts messages.
    Sink {
        #[arg(long, default_value = "127.0.0.1:2525")]
        listen: String,
        /// Written atomically as `count first_ts_ms last_ts_ms`.
        #[arg(long)]
        count_file: Option<PathBuf>,
        /// Testing aid: offer STARTTLS (self-signed) or implicit TLS, and accept any AUTH.
        #[arg(long, value_enum, default_value = "none")]
        tls: TlsMode,
    },
    /// Fill a stopped relay's store with verified external domains and their accounts
    /// (for the scale run): `{prefix}{j}.ext.test` for j in 0..DOMAINS, accounts
    /// `s{i}@{prefix}{i % DOMAINS}.ext.test` for i in 1..=ACCOUNTS, all for HOSTING.
    Seed {
        #[arg(long, default_value = "d")]
        prefix: String,
        /// The relay's store directory (`<data_dir>/store`); the relay must be stopped.
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        hosting: String,
        #[arg(long)]
        domains: usize,
        #[arg(long)]
        accounts: usize,
        /// Leave the domains pending (for a verification pass) instead of verified;
        /// their tokens are `seed-token-{j}`.
        #[arg(long)]
        pending: bool,
        /// Mark the domains' DKIM records verified too, so their mail is signed (for
        /// the signing cost); by default they stay pending and nothing is signed.
        #[arg(long)]
        dkim_verified: bool,
    },
    /// Draw the sweeps of `bench/run` (a TSV of `sweep x series y`) as one SVG.
    Plot {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
    /// Open N sessions and hold them idle for T seconds.
    Hold {
        #[arg(long, default_value = "127.0.0.1:2587")]
        server: String,
        #[arg(long, value_enum, default_value = "starttls")]
        tls: TlsMode,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// `login:password`
        #[arg(long)]
        auth: Option<String>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Written with the number of opened connections once set-up is complete.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Raise RLIMIT_NOFILE's soft limit towards `want` (up to the hard limit); returns the
/// resulting soft limit.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < want {
            let new = libc::rlimit {
                rlim_cur: lim.rlim_max.min(want),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                return new.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

fn split_pair(s: &str) -> Result<(String, String)> {
    let (l, p) = s
        .split_once(':')
        .with_context(|| format!("expected login:password, got {s:?}"))?;
    if l.is_empty() {
        bail!("empty login in {s:?}");
    }
    Ok((l.to_string(), p.to_string()))
}

fn mailboxes(
    list: Option<String>,
    pattern: Option<String>,
    password: &str,
    count: usize,
) -> Result<Vec<(String, String)>> {
    if let Some(list) = list {
        let text = if std::path::Path::new(&list).is_file() {
            std::fs::read_to_string(&list).with_context(|| format!("read {list}"))?
        } else {
            list.replace(',', "\n")
        };
        let v = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(split_pair)
            .collect::<Result<Vec<_>>>()?;
        if v.is_empty() {
            bail!("--mailboxes: no login:password pairs");
        }
        return Ok(v);
    }
    if let Some(p) = pattern {
        if count == 0 || count > 100_000 {
            bail!("--mailbox-count must be 1..=100000");
        }
        return Ok((1..=count)
            .map(|i| (p.replace("{i}", &i.to_string()), password.to_string()))
            .collect());
    }
    Ok(Vec::new())
}

/// See [`Cmd::Seed`]. Domains are marked verified directly in the store: this measures
/// the relay's lookups, not DNS.
fn seed(
    dir: &std::path::Path,
    hosting: &str,
    prefix: &str,
    domains: usize,
    accounts: usize,
    pending: bool,
    dkim_verified: bool,
) -> Result<()> {
    let store =
        domauth_store::Store::open(dir).with_context(|| format!("open {}", dir.display()))?;
    let now = chrono::Utc::now();
    // One DKIM key pair for every seeded domain, so the relay's first start finds none
    // to make: the bench measures lookups, not key generation (a real upgrade makes one
    // pair per domain in the background; RSA-2048 takes a fraction of a second each).
    let dkim = domauth::dkim_keys::generate(0).map_err(anyhow::Error::msg)?;
    for j in 0..domains {
        let domain = format!("{prefix}{j}.ext.test");
        store
            .add_domain(hosting, &domain, &format!("seed-token-{j}"))
            .with_context(|| format!("add {domain}"))?;
        store
            .add_dkim_keys(
                hosting,
                &domain,
                dkim.clone(),
                true,
                domauth::dkim_keys::selectors,
            )
            .with_context(|| format!("DKIM keys of {domain}"))?;
        if pending {
            continue;
        }
        if dkim_verified {
            store.update_dkim(hosting, &domain, |d| {
                for k in &mut d.keys {
                    k.status = domauth_store::DkimStatus::Verified;
                    k.verified_at = Some(now);
                    k.last_check = Some(now);
                }
            })?;
        }
        store.update_domain(hosting, &domain, |d| {
            d.status = domauth_store::DomainStatus::Verified;
            d.verified_at = Some(now);
            d.last_check = Some(now);
        })?;
    }
    for i in 1..=accounts {
        let address = format!("s{i}@{prefix}{}.ext.test", i % domains.max(1));
        store
            .add_account(hosting, &address)
            .with_context(|| format!("add {address}"))?;
    }
    store.flush()?;
    let status = if pending { "pending" } else { "verified" };
    eprintln!("seeded {domains} {status} domains and {accounts} accounts for {hosting}");
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("domauth-bench: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(real_main(cli)) {
        eprintln!("domauth-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Load {
            server,
            tls,
            sessions,
            messages,
            size,
            mailboxes: list,
            mailbox_pattern,
            password,
            mailbox_count,
            rcpt,
            no_auth,
            json,
            sender_pattern,
            sender_count,
            sender_domains,
        } => {
            let server = client::parse_loopback(&server)?;
            let senders = sender_pattern.map(|pattern| load::SenderPattern {
                pattern,
                count: sender_count,
                domains: sender_domains,
            });
            let mailboxes = mailboxes(list, mailbox_pattern, &password, mailbox_count)?;
            load::run(load::LoadOpts {
                server,
                tls,
                sessions,
                messages,
                size,
                mailboxes,
                rcpt,
                no_auth,
                json,
                senders,
            })
            .await
        }
        Cmd::Sink {
            listen,
            count_file,
            tls,
        } => {
            let listen = client::parse_loopback(&listen)?;
            raise_nofile(65_536);
            let tls = match tls {
                TlsMode::None => sink::SinkTls::None,
                TlsMode::Starttls => sink::SinkTls::Starttls,
                TlsMode::Implicit => sink::SinkTls::Implicit,
            };
            sink::run(listen, count_file, tls).await
        }
        Cmd::Plot { input, output } => plot::run(&input, &output),
        Cmd::Seed {
            prefix,
            store,
            hosting,
            domains,
            accounts,
            pending,
            dkim_verified,
        } => seed(
            &store,
            &hosting,
            &prefix,
            domains,
            accounts,
            pending,
            dkim_verified,
        ),
        Cmd::Hold {
            server,
            tls,
            connections,
            auth,
            seconds,
            ready_file,
            json,
        } => {
            let server = client::parse_loopback(&server)?;
            let auth = auth.as_deref().map(split_pair).transpose()?;
            hold::run(hold::HoldOpts {
                server,
                tls,
                connections,
                auth,
                seconds,
                ready_file,
                json,
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(client::parse_loopback("127.0.0.1:25").is_ok());
        assert!(client::parse_loopback("127.3.2.1:25").is_ok());
        assert!(client::parse_loopback("[::1]:25").is_ok());
        assert!(client::parse_loopback("localhost:25").is_ok());
        assert!(client::parse_loopback("10.0.0.1:25").is_err());
        assert!(client::parse_loopback("example.org:25").is_err());
    }

    #[test]
    fn mailbox_sources() {
        let v = mailboxes(Some("a@x:p1,b@x:p:2".into()), None, "", 0).unwrap();
        assert_eq!(v[1], ("b@x".to_string(), "p:2".to_string()));
        let v = mailboxes(None, Some("user{i}@bench.test".into()), "pw", 3).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].0, "user1@bench.test");
    }
}
