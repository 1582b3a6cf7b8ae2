//! `load`: N concurrent sessions, each sending K messages of S bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use rand::Rng;
use rustls::ClientConfig;

use crate::client::{self, SetupError, TlsMode, TxOutcome};
use crate::sink::now_ms;
use crate::stats::{max_ms, percentile_ms, r3};

pub const MAX_SESSIONS: usize = 20_000;
pub const MAX_MESSAGES: usize = 1_000_000;
pub const MAX_SIZE: usize = 64 * 1024 * 1024;
const KEEP_SAMPLES: usize = 5;

pub struct LoadOpts {
    pub server: SocketAddr,
    pub tls: TlsMode,
    pub sessions: usize,
    pub messages: usize,
    pub size: usize,
    /// login, password; empty with --no-auth and no mailboxes given.
    pub mailboxes: Vec<(String, String)>,
    pub rcpt: String,
    pub no_auth: bool,
    pub json: bool,
    /// MAIL FROM and From: instead of the login: `{i}` is 1..=count (a different one
    /// per message), `{j}` is `i % domains` (authorized accounts of many domains).
    pub senders: Option<SenderPattern>,
}

pub struct SenderPattern {
    pub pattern: String,
    pub count: usize,
    pub domains: usize,
}

impl SenderPattern {
    /// The sender of message `n` overall (spread over the whole range).
    pub fn sender(&self, n: usize) -> String {
        let i = n % self.count.max(1) + 1;
        let j = i % self.domains.max(1);
        self.pattern
            .replace("{i}", &i.to_string())
            .replace("{j}", &j.to_string())
    }
}

#[derive(Default)]
struct SessionResult {
    setup_us: Option<u64>,
    lat_us: Vec<u64>,
    accepted: u64,
    refused: u64,
    errors: u64,
    refusals: Vec<String>,
    error_msgs: Vec<String>,
    first_send: Option<Instant>,
}

impl SessionResult {
    fn refusal(&mut self, n: u64, line: String) {
        self.refused += n;
        if self.refusals.len() < KEEP_SAMPLES {
            self.refusals.push(line);
        }
    }
    fn error(&mut self, n: u64, msg: String) {
        self.errors += n;
        if self.error_msgs.len() < KEEP_SAMPLES {
            self.error_msgs.push(msg);
        }
    }
}

/// Body of exactly `size` bytes (when size >= 2): ASCII lines of at most 78 chars
/// including CRLF, never starting with a dot.
pub fn make_body(size: usize) -> Vec<u8> {
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ";
    let mut rng = rand::rng();
    let mut body = Vec::with_capacity(size + 80);
    while body.len() < size {
        let remaining = size - body.len();
        let mut len = remaining.saturating_sub(2).min(76);
        if remaining - (len + 2) == 1 && len > 1 {
            // Never leave a single byte for the last line.
            len -= 1;
        }
        for i in 0..len {
            // First and last characters are never spaces: no trailing whitespace.
            let n = if i == 0 || i + 1 == len { 62 } else { 63 };
            body.push(ALPHA[rng.random_range(0..n)]);
        }
        body.extend_from_slice(b"\r\n");
    }
    body
}

fn make_message(
    from: &str,
    rcpt: &str,
    run: &str,
    session: usize,
    msg: usize,
    body: &[u8],
) -> Vec<u8> {
    let date = chrono::Utc::now().to_rfc2822();
    let mut m = Vec::with_capacity(body.len() + 512);
    m.extend_from_slice(
        format!(
            "From: <{from}>\r\nTo: <{rcpt}>\r\nSubject: bench {run} session {session} message {msg}\r\n\
             Message-ID: <bench-{run}-{session}-{msg}@bench.test>\r\nDate: {date}\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        .as_bytes(),
    );
    m.extend_from_slice(body);
    m.extend_from_slice(b".\r\n");
    m
}

#[allow(clippy::too_many_arguments)]
async fn one_session(
    idx: usize,
    opts: Arc<LoadOpts>,
    tls_cfg: Arc<ClientConfig>,
    body: Arc<Vec<u8>>,
    run: Arc<String>,
) -> SessionResult {
    let mut res = SessionResult::default();
    let k = opts.messages as u64;
    let (from, auth) = if opts.mailboxes.is_empty() {
        ("bench@bench.test".to_string(), None)
    } else {
        let (l, p) = &opts.mailboxes[idx % opts.mailboxes.len()];
        let auth = (!opts.no_auth).then_some((l.as_str(), p.as_str()));
        (l.clone(), auth)
    };
    let t0 = Instant::now();
    let mut sess = match client::establish(opts.server, opts.tls, &tls_cfg, auth).await {
        Ok(s) => s,
        Err(SetupError::Refused(line)) => {
            res.refusal(k, format!("session {idx}: {line}"));
            return res;
        }
        Err(SetupError::Failed(e)) => {
            res.error(k, format!("session {idx}: {e}"));
            return res;
        }
    };
    res.setup_us = Some(t0.elapsed().as_micros() as u64);
    res.lat_us.reserve(opts.messages);
    for m in 0..opts.messages {
        let sender = match &opts.senders {
            // Spread over the whole range: session and message pick different ones.
            Some(p) => p.sender(idx.wrapping_mul(7919).wrapping_add(m.wrapping_mul(104_729))),
            None => from.clone(),
        };
        let from = &sender;
        let msg = make_message(from, &opts.rcpt, &run, idx, m, &body);
        let t = Instant::now();
        if res.first_send.is_none() {
            res.first_send = Some(t);
        }
        match sess.transaction(from, &opts.rcpt, &msg).await {
            Ok(TxOutcome::Accepted) => {
                res.lat_us.push(t.elapsed().as_micros() as u64);
                res.accepted += 1;
            }
            Ok(TxOutcome::Refused(code, line)) => {
                res.refusal(1, line);
                if code == 421 {
                    res.error(
                        k - m as u64 - 1,
                        format!("session {idx}: closed by server (421)"),
                    );
                    return res;
                }
            }
            Err(e) => {
                res.error(k - m as u64, format!("session {idx} message {m}: {e:#}"));
                return res;
            }
        }
    }
    sess.quit().await;
    res
}

pub async fn run(opts: LoadOpts) -> Result<()> {
    if opts.sessions == 0 || opts.sessions > MAX_SESSIONS {
        bail!("--sessions must be 1..={MAX_SESSIONS}");
    }
    if opts.messages > MAX_MESSAGES {
        bail!("--messages must be <= {MAX_MESSAGES}");
    }
    if opts.size > MAX_SIZE {
        bail!("--size must be <= {MAX_SIZE}");
    }
    if !opts.no_auth && opts.mailboxes.is_empty() {
        bail!("give --mailboxes or --mailbox-pattern (or --no-auth)");
    }
    client::check_loopback(&opts.server)?;
    crate::raise_nofile(opts.sessions as u64 + 256);

    let tls_cfg = client::tls_config()?;
    let body = Arc::new(make_body(opts.size));
    let run = Arc::new(format!("{:08x}", rand::rng().random::<u32>()));
    let opts = Arc::new(opts);

    let start_ms = now_ms();
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..opts.sessions {
        set.spawn(one_session(
            i,
            opts.clone(),
            tls_cfg.clone(),
            body.clone(),
            run.clone(),
        ));
    }
    let mut total = SessionResult::default();
    let mut setups = Vec::with_capacity(opts.sessions);
    let mut failed_sessions = 0usize;
    while let Some(r) = set.join_next().await {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                total.error(opts.messages as u64, format!("task: {e}"));
                continue;
            }
        };
        match r.setup_us {
            Some(s) => setups.push(s),
            None => failed_sessions += 1,
        }
        total.accepted += r.accepted;
        total.refused += r.refused;
        total.errors += r.errors;
        total.lat_us.extend(r.lat_us);
        for l in r.refusals {
            if total.refusals.len() < KEEP_SAMPLES {
                total.refusals.push(l);
            }
        }
        for l in r.error_msgs {
            if total.error_msgs.len() < KEEP_SAMPLES {
                total.error_msgs.push(l);
            }
        }
        if let Some(f) = r.first_send {
            total.first_send = Some(total.first_send.map_or(f, |t| t.min(f)));
        }
    }
    let wall = start.elapsed();
    let end_ms = now_ms();
    total.lat_us.sort_unstable();
    setups.sort_unstable();
    let secs = wall.as_secs_f64();
    let rate = if secs > 0.0 {
        total.accepted as f64 / secs
    } else {
        0.0
    };
    let first_send_ms = total
        .first_send
        .map(|f| start_ms + f.duration_since(start).as_millis() as u64);
    let l = &total.lat_us;
    let report = serde_json::json!({
        "accepted": total.accepted,
        "refused": total.refused,
        "errors": total.errors,
        "seconds": r3(secs),
        "msgs_per_sec": r3(rate),
        "lat_p50_ms": r3(percentile_ms(l, 50.0)),
        "lat_p90_ms": r3(percentile_ms(l, 90.0)),
        "lat_p99_ms": r3(percentile_ms(l, 99.0)),
        "lat_max_ms": r3(max_ms(l)),
        "setup_p50_ms": r3(percentile_ms(&setups, 50.0)),
        "setup_p99_ms": r3(percentile_ms(&setups, 99.0)),
        "sessions": opts.sessions,
        "sessions_failed": failed_sessions,
        "messages_per_session": opts.messages,
        "size": opts.size,
        "start_unix_ms": start_ms,
        "first_send_unix_ms": first_send_ms,
        "end_unix_ms": end_ms,
        "refusals": total.refusals,
        "error_samples": total.error_msgs,
    });
    let table = format!(
        "domauth-bench load: {} sessions x {} messages x {} bytes, tls={:?}, auth={}, server {}\n\
         \x20 accepted      {}\n\
         \x20 refused       {}\n\
         \x20 errors        {}   (failed sessions: {})\n\
         \x20 wall time     {:.3} s\n\
         \x20 msgs/s        {:.1}\n\
         \x20 latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}   (MAIL sent -> 250 after dot)\n\
         \x20 setup ms      p50 {:.2}  p99 {:.2}   (connect -> ready/235)\n",
        opts.sessions,
        opts.messages,
        opts.size,
        opts.tls,
        if opts.no_auth || opts.mailboxes.is_empty() {
            "no"
        } else {
            "plain"
        },
        opts.server,
        total.accepted,
        total.refused,
        total.errors,
        failed_sessions,
        secs,
        rate,
        percentile_ms(l, 50.0),
        percentile_ms(l, 90.0),
        percentile_ms(l, 99.0),
        max_ms(l),
        percentile_ms(&setups, 50.0),
        percentile_ms(&setups, 99.0),
    );
    let mut extra = String::new();
    for r in &total.refusals {
        extra.push_str(&format!("  refusal: {r}\n"));
    }
    for e in &total.error_msgs {
        extra.push_str(&format!("  error:   {e}\n"));
    }
    if opts.json {
        eprint!("{table}{extra}");
        println!("{report}");
    } else {
        print!("{table}{extra}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        for size in [0usize, 2, 3, 77, 78, 79, 10_240] {
            let b = make_body(size);
            assert!(b.len() >= size && b.len() <= size.max(2), "size {size}");
            for line in b.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
                assert!(line.len() <= 77);
                assert_eq!(line.last(), Some(&b'\r'));
                assert_ne!(line[0], b'.');
            }
        }
        let m = make_message("a@b.c", "d@e.f", "r", 1, 2, &make_body(100));
        assert!(m.ends_with(b"\r\n.\r\n"));
        assert!(String::from_utf8_lossy(&m).contains("Message-ID: <bench-r-1-2@bench.test>\r\n"));
    }
}
