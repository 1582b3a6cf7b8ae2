//! Fast counting SMTP sink: answers 250 to everything, 354 to DATA, counts messages.
//! Optionally offers STARTTLS (or implicit TLS) with a throw-away self-signed certificate
//! and accepts any AUTH, so the load generator's TLS and AUTH paths can be tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::client::Stream;

const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_PENDING: usize = 1024 * 1024;
const TERMINATOR: &[u8; 5] = b"\r\n.\r\n";

#[derive(Default)]
pub struct Counters {
    pub count: AtomicU64,
    pub first_ms: AtomicU64,
    pub last_ms: AtomicU64,
}

impl Counters {
    fn record(&self) {
        let now = now_ms();
        let _ = self
            .first_ms
            .compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        self.last_ms.fetch_max(now, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn line(&self) -> (u64, String) {
        let c = self.count.load(Ordering::SeqCst);
        let f = self.first_ms.load(Ordering::SeqCst);
        let l = self.last_ms.load(Ordering::SeqCst);
        (c, format!("{c} {f} {l}\n"))
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SinkTls {
    None,
    Starttls,
    Implicit,
}

fn write_count_file(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

fn self_signed() -> Result<Arc<ServerConfig>> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    Ok(Arc::new(cfg))
}

pub async fn run(listen: SocketAddr, count_file: Option<PathBuf>, tls: SinkTls) -> Result<()> {
    crate::client::check_loopback(&listen)?;
    let acceptor = match tls {
        SinkTls::None => None,
        _ => Some(TlsAcceptor::from(self_signed()?)),
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    let local = listener.local_addr()?;
    eprintln!("sink listening on {local}");
    let counters = Arc::new(Counters::default());
    if let Some(p) = &count_file {
        write_count_file(p, &counters.line().1)?;
    }

    // Count-file writer (every 100 ms when changed) and progress on stderr (every 1 s).
    {
        let counters = counters.clone();
        let path = count_file.clone();
        tokio::spawn(async move {
            let mut written = 0u64;
            let mut printed = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                n += 1;
                let (c, text) = counters.line();
                if c != written {
                    if let Some(p) = &path
                        && let Err(e) = write_count_file(p, &text)
                    {
                        eprintln!("sink: {e:#}");
                    }
                    written = c;
                }
                if n.is_multiple_of(10) && c != printed {
                    eprintln!("sink: {c} messages");
                    printed = c;
                }
            }
        });
    }

    let accept = {
        let counters = counters.clone();
        async move {
            loop {
                let (sock, _) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        eprintln!("sink: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let counters = counters.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = handle(sock, counters, acceptor, tls).await;
                });
            }
        }
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = accept => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let (c, text) = counters.line();
    if let Some(p) = &count_file {
        write_count_file(p, &text)?;
    }
    eprintln!("sink: stopped with {c} messages");
    Ok(())
}

enum End {
    Closed,
    StartTls,
}

async fn handle(
    sock: tokio::net::TcpStream,
    counters: Arc<Counters>,
    acceptor: Option<TlsAcceptor>,
    tls: SinkTls,
) -> Result<()> {
    let mut stream: Box<dyn Stream> = Box::new(sock);
    let mut secure = false;
    if tls == SinkTls::Implicit
        && let Some(a) = &acceptor
    {
        stream = Box::new(timeout(IDLE_TIMEOUT, a.accept(stream)).await??);
        secure = true;
    }
    let mut greet = true;
    loop {
        let offer_tls = tls == SinkTls::Starttls && !secure;
        match serve(
            &mut stream,
            &counters,
            greet,
            offer_tls,
            tls != SinkTls::None,
        )
        .await?
        {
            End::Closed => return Ok(()),
            End::StartTls => {
                let a = acceptor.as_ref().context("no TLS")?;
                stream = Box::new(timeout(IDLE_TIMEOUT, a.accept(stream)).await??);
                secure = true;
                greet = false;
            }
        }
    }
}

/// Feed `data` to the terminator matcher; returns bytes consumed when CRLF.CRLF completes.
fn scan_data(data: &[u8], state: &mut usize) -> Option<usize> {
    for (i, &b) in data.iter().enumerate() {
        if b == TERMINATOR[*state] {
            *state += 1;
            if *state == TERMINATOR.len() {
                return Some(i + 1);
            }
        } else {
            *state = usize::from(b == b'\r');
        }
    }
    None
}

async fn serve(
    stream: &mut Box<dyn Stream>,
    counters: &Counters,
    greet: bool,
    offer_tls: bool,
    offer_auth: bool,
) -> Result<End> {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut in_data = false;
    let mut state = 0usize;
    let mut auth_continue = false;
    if greet {
        out.extend_from_slice(b"220 sink.bench.test ESMTP bench sink\r\n");
    }
    loop {
        let mut consumed = 0;
        loop {
            if in_data {
                match scan_data(&buf[consumed..], &mut state) {
                    Some(n) => {
                        consumed += n;
                        in_data = false;
                        counters.record();
                        out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    }
                    None => {
                        consumed = buf.len();
                        break;
                    }
                }
                continue;
            }
            let Some(i) = buf[consumed..].iter().position(|&b| b == b'\n') else {
                break;
            };
            let line = &buf[consumed..consumed + i];
            consumed += i + 1;
            if auth_continue {
                auth_continue = false;
                out.extend_from_slice(b"235 2.7.0 Authentication successful\r\n");
                continue;
            }
            let verb: Vec<u8> = line
                .iter()
                .take_while(|b| !b.is_ascii_whitespace())
                .map(u8::to_ascii_uppercase)
                .collect();
            match verb.as_slice() {
                b"EHLO" => {
                    out.extend_from_slice(b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n");
                    if offer_tls {
                        out.extend_from_slice(b"250-STARTTLS\r\n");
                    } else if offer_auth {
                        out.extend_from_slice(b"250-AUTH PLAIN LOGIN\r\n");
                    }
                    out.extend_from_slice(b"250 ENHANCEDSTATUSCODES\r\n");
                }
                b"DATA" => {
                    out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                    in_data = true;
                    // The DATA line's CRLF counts: an immediate ".\r\n" ends the message.
                    state = 2;
                }
                b"QUIT" => {
                    out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                    let _ = timeout(IDLE_TIMEOUT, stream.write_all(&out)).await;
                    let _ = stream.shutdown().await;
                    return Ok(End::Closed);
                }
                b"STARTTLS" if offer_tls => {
                    out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
                    timeout(IDLE_TIMEOUT, stream.write_all(&out)).await??;
                    stream.flush().await?;
                    // Pipelined plaintext after STARTTLS is discarded.
                    return Ok(End::StartTls);
                }
                b"AUTH" => {
                    let args = line
                        .split(|b| b.is_ascii_whitespace())
                        .filter(|a| !a.is_empty())
                        .count();
                    if args >= 3 {
                        out.extend_from_slice(b"235 2.7.0 Authentication successful\r\n");
                    } else {
                        auth_continue = true;
                        out.extend_from_slice(b"334 \r\n");
                    }
                }
                _ => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
            }
        }
        buf.drain(..consumed);
        if !out.is_empty() {
            timeout(IDLE_TIMEOUT, stream.write_all(&out)).await??;
            stream.flush().await?;
            out.clear();
        }
        if buf.len() > MAX_PENDING {
            return Ok(End::Closed);
        }
        let mut tmp = [0u8; 16 * 1024];
        let n = match timeout(IDLE_TIMEOUT, stream.read(&mut tmp)).await {
            Ok(r) => r?,
            Err(_) => return Ok(End::Closed),
        };
        if n == 0 {
            return Ok(End::Closed);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::scan_data;

    #[test]
    fn terminator_split_across_reads() {
        let mut st = 2;
        assert_eq!(scan_data(b"hello\r\n.", &mut st), None);
        assert_eq!(scan_data(b"\r\nMAIL", &mut st), Some(2));
        let mut st = 2;
        assert_eq!(scan_data(b".\r\n", &mut st), Some(3));
        let mut st = 2;
        assert_eq!(scan_data(b"a\r\r\n.\r\n", &mut st), Some(7));
        let mut st = 2;
        assert_eq!(scan_data(b"..x\r\n.y\r\n", &mut st), None);
    }
}
