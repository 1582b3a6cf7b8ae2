//! Minimal SMTP client for benchmarking: plain, STARTTLS or implicit TLS, AUTH PLAIN,
//! pipelined transactions. Every reply wait and every write is bounded by a timeout.

use domauth::upstream::AcceptAnyCertificate;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// Anything we can talk SMTP over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Per-reply (and per-write, per-connect, per-handshake) timeout.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_LINE: usize = 64 * 1024;
const MAX_REPLY_LINES: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    Starttls,
    Implicit,
    None,
}

/// Only loopback targets are allowed: this tool generates heavy load.
pub fn check_loopback(addr: &SocketAddr) -> Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        bail!("refusing {addr}: only loopback addresses (127.0.0.0/8, ::1) are allowed")
    }
}

/// Parse `IP:PORT` (or `localhost:PORT`) and require a loopback address.
pub fn parse_loopback(s: &str) -> Result<SocketAddr> {
    let addr: SocketAddr = match s.parse() {
        Ok(a) => a,
        Err(_) => match s.strip_prefix("localhost:") {
            Some(port) => SocketAddr::from(([127, 0, 0, 1], port.parse().context("bad port")?)),
            None => bail!("{s}: expected IP:PORT on loopback, e.g. 127.0.0.1:2587"),
        },
    };
    check_loopback(&addr)?;
    Ok(addr)
}

/// One shared client configuration: its default in-memory session cache is shared by
/// every session, so later handshakes resume.
pub fn tls_config() -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The first line, as the server sent it (e.g. `535 5.7.8 Authentication ...`).
    pub fn first_line(&self) -> String {
        self.lines.first().cloned().unwrap_or_default()
    }

    /// EHLO keyword present (case-insensitive), e.g. `PIPELINING`, `STARTTLS`.
    pub fn has_keyword(&self, kw: &str) -> bool {
        self.lines.iter().skip(1).any(|l| {
            l.get(4..)
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|w| w.eq_ignore_ascii_case(kw))
        })
    }
}

pub struct Client {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    pos: usize,
    timeout: Duration,
}

impl Client {
    fn new(stream: Box<dyn Stream>, timeout: Duration) -> Self {
        Client {
            stream,
            buf: Vec::with_capacity(4096),
            pos: 0,
            timeout,
        }
    }

    /// Write everything and flush, within the timeout.
    pub async fn send(&mut self, data: &[u8]) -> Result<()> {
        let fut = async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        };
        match timeout(self.timeout, fut).await {
            Ok(r) => r.context("write"),
            Err(_) => bail!("timeout writing to server"),
        }
    }

    /// Read one complete (possibly multi-line) reply, within the timeout.
    pub async fn reply(&mut self) -> Result<Reply> {
        match timeout(self.timeout, self.read_reply()).await {
            Ok(r) => r,
            Err(_) => bail!("timeout ({}s) waiting for reply", self.timeout.as_secs()),
        }
    }

    pub async fn command(&mut self, cmd: &str) -> Result<Reply> {
        self.send(cmd.as_bytes()).await?;
        self.reply().await
    }

    async fn read_reply(&mut self) -> Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line().await?;
            let b = line.as_bytes();
            if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
                bail!("malformed reply line: {line:?}");
            }
            let code: u16 = line[..3].parse().map_err(|_| anyhow!("bad code"))?;
            let more = b.get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return Ok(Reply { code, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                bail!("reply has too many lines");
            }
        }
    }

    async fn read_line(&mut self) -> Result<String> {
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let mut line = &self.buf[self.pos..self.pos + i];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                let s = String::from_utf8_lossy(line).into_owned();
                self.pos += i + 1;
                if self.pos == self.buf.len() {
                    self.buf.clear();
                    self.pos = 0;
                }
                return Ok(s);
            }
            if self.buf.len() - self.pos > MAX_LINE {
                bail!("reply line too long");
            }
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let mut tmp = [0u8; 4096];
            let n = self.stream.read(&mut tmp).await.context("read")?;
            if n == 0 {
                bail!("connection closed by server");
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    async fn start_tls(self, cfg: &Arc<ClientConfig>) -> Result<Client> {
        let to = self.timeout;
        let connector = TlsConnector::from(cfg.clone());
        let name = ServerName::try_from("localhost").expect("static name");
        let tls = match timeout(to, connector.connect(name, self.stream)).await {
            Ok(r) => r.context("TLS handshake")?,
            Err(_) => bail!("timeout in TLS handshake"),
        };
        // Anything the server sent before the handshake is discarded.
        Ok(Client::new(Box::new(tls), to))
    }
}

/// Why a session could not be set up.
#[derive(Debug)]
pub enum SetupError {
    /// The server answered with a refusal (the reply's first line).
    Refused(String),
    /// I/O error, timeout, protocol error.
    Failed(String),
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Refused(s) => write!(f, "refused: {s}"),
            SetupError::Failed(s) => write!(f, "failed: {s}"),
        }
    }
}

impl From<anyhow::Error> for SetupError {
    fn from(e: anyhow::Error) -> Self {
        SetupError::Failed(format!("{e:#}"))
    }
}

pub struct Session {
    pub client: Client,
    pub pipelining: bool,
}

fn expect(r: &Reply, code: u16, what: &str) -> Result<(), SetupError> {
    if r.code == code {
        Ok(())
    } else {
        Err(SetupError::Refused(format!("{what}: {}", r.first_line())))
    }
}

/// Connect, greet, EHLO, optional STARTTLS + EHLO, optional AUTH PLAIN.
pub async fn establish(
    addr: SocketAddr,
    tls: TlsMode,
    tls_cfg: &Arc<ClientConfig>,
    auth: Option<(&str, &str)>,
) -> Result<Session, SetupError> {
    check_loopback(&addr)?;
    let tcp = match timeout(REPLY_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(r) => r.map_err(|e| SetupError::Failed(format!("connect {addr}: {e}")))?,
        Err(_) => return Err(SetupError::Failed(format!("connect {addr}: timeout"))),
    };
    let _ = tcp.set_nodelay(true);
    let mut client = Client::new(Box::new(tcp), REPLY_TIMEOUT);
    if tls == TlsMode::Implicit {
        client = client.start_tls(tls_cfg).await?;
    }
    let greeting = client.reply().await?;
    expect(&greeting, 220, "greeting")?;
    let mut ehlo = client.command("EHLO bench.test\r\n").await?;
    expect(&ehlo, 250, "EHLO")?;
    if tls == TlsMode::Starttls {
        if !ehlo.has_keyword("STARTTLS") {
            return Err(SetupError::Refused("STARTTLS not advertised".into()));
        }
        let r = client.command("STARTTLS\r\n").await?;
        expect(&r, 220, "STARTTLS")?;
        client = client.start_tls(tls_cfg).await?;
        ehlo = client.command("EHLO bench.test\r\n").await?;
        expect(&ehlo, 250, "EHLO after STARTTLS")?;
    }
    if let Some((login, password)) = auth {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("\0{login}\0{password}").as_bytes());
        let r = client.command(&format!("AUTH PLAIN {token}\r\n")).await?;
        expect(&r, 235, "AUTH")?;
    }
    Ok(Session {
        pipelining: ehlo.has_keyword("PIPELINING"),
        client,
    })
}

pub enum TxOutcome {
    Accepted,
    /// Refused with this reply (code, first line).
    Refused(u16, String),
}

impl Session {
    /// One transaction. `message` is already dot-safe and ends with `CRLF.CRLF`.
    pub async fn transaction(
        &mut self,
        from: &str,
        rcpt: &str,
        message: &[u8],
    ) -> Result<TxOutcome> {
        let c = &mut self.client;
        let mail = format!("MAIL FROM:<{from}>\r\n");
        let rcpt = format!("RCPT TO:<{rcpt}>\r\n");
        let (m, r, d) = if self.pipelining {
            let cmds = format!("{mail}{rcpt}DATA\r\n");
            c.send(cmds.as_bytes()).await?;
            let m = c.reply().await?;
            let r = c.reply().await?;
            let d = c.reply().await?;
            (m, r, d)
        } else {
            let m = c.command(&mail).await?;
            if !m.is_positive() {
                return refused(c, &m).await;
            }
            let r = c.command(&rcpt).await?;
            if !r.is_positive() {
                return refused(c, &r).await;
            }
            let d = c.command("DATA\r\n").await?;
            (m, r, d)
        };
        if d.code == 354 {
            c.send(message).await?;
            let fin = c.reply().await?;
            for x in [&m, &r] {
                if !x.is_positive() {
                    return Ok(TxOutcome::Refused(x.code, x.first_line()));
                }
            }
            if fin.is_positive() {
                Ok(TxOutcome::Accepted)
            } else {
                Ok(TxOutcome::Refused(fin.code, fin.first_line()))
            }
        } else {
            let worst = [&m, &r, &d]
                .into_iter()
                .find(|x| !x.is_positive())
                .unwrap_or(&d)
                .clone();
            refused(c, &worst).await
        }
    }

    pub async fn quit(mut self) {
        let _ = self.client.command("QUIT\r\n").await;
    }

    pub async fn noop(&mut self) -> Result<()> {
        let r = self.client.command("NOOP\r\n").await?;
        if r.is_positive() {
            Ok(())
        } else {
            bail!("NOOP refused: {}", r.first_line())
        }
    }
}

async fn refused(c: &mut Client, r: &Reply) -> Result<TxOutcome> {
    if r.code != 421 {
        // Reset the transaction; failure here shows up on the next command.
        let _ = c.command("RSET\r\n").await;
    }
    Ok(TxOutcome::Refused(r.code, r.first_line()))
}
