//! The smarthost client (Postfix's `smtp`): plain TCP, STARTTLS or implicit TLS,
//! optional AUTH, one connection kept open per delivery worker, and a result per
//! recipient. mail-send carries the commands and parses the replies; the timeouts are
//! ours, one per stage as RFC 5321 §4.5.3.2 sets them, in every TLS mode, so a
//! smarthost that stalls anywhere costs one bounded attempt and never a worker.
//!
//! The message is streamed from its queue file in chunks and dot-stuffed on the way
//! (RFC 5321 §4.5.2), so delivering a 25 MB message holds a few hundred KB.

use std::{sync::Arc, time::Duration};

use domauth_store::{BodyType, Envelope, MessageReader};
use mail_send::SmtpClient;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use smtp_proto::{EXT_8BIT_MIME, EXT_DSN, EXT_PIPELINING, EXT_SMTP_UTF8, Response};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::config::{Config, UpstreamTls};

/// What happened to one recipient in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    Delivered(String),
    /// 4xx or a connection problem: try again later.
    Deferred(String),
    /// 5xx: bounce.
    Failed(String),
}

/// The outcome of one delivery attempt of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Upstream answered: one result per recipient, in order. `dsn`: the smarthost
    /// offered DSN, so it got the DSN parameters and success notices are its job.
    Replied { results: Vec<RcptResult>, dsn: bool },
    /// Upstream could not be reached, or the connection broke or stalled: nothing is
    /// known to be delivered, every recipient is deferred. Counts toward a dead
    /// destination.
    Unreachable(String),
    /// The message file cannot be read back as it was written: the transaction was
    /// abandoned before its end (upstream discards it); the message must be held.
    Damaged(String),
}

/// The stage timeouts (RFC 5321 §4.5.3.2 gives the defaults).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect, and the TLS handshake of implicit TLS.
    pub connect: Duration,
    /// The 220 greeting (§4.5.3.2.1: 5 minutes).
    pub greeting: Duration,
    /// EHLO, STARTTLS, AUTH, MAIL, RCPT, RSET, QUIT (§4.5.3.2.2-3: 5 minutes).
    pub command: Duration,
    /// The 354 after DATA (§4.5.3.2.4: 2 minutes).
    pub data: Duration,
    /// Each block of the message written (§4.5.3.2.5: 3 minutes).
    pub data_block: Duration,
    /// The reply to the final dot (§4.5.3.2.6: 10 minutes). Long on purpose: a message
    /// given up on here may have been delivered, and is then sent twice.
    pub final_reply: Duration,
}

pub struct Upstream {
    host: String,
    port: u16,
    mode: UpstreamTls,
    credentials: Option<(String, String)>,
    timeouts: Timeouts,
    helo: String,
    connector: TlsConnector,
}

/// What the smarthost offered in its EHLO reply.
#[derive(Debug, Clone, Copy, Default)]
struct Offers {
    pipelining: bool,
    eight_bit: bool,
    smtputf8: bool,
    /// RFC 3461: the DSN parameters are passed on only then.
    dsn: bool,
}

/// An open upstream connection and what the smarthost offers.
pub struct Connection {
    stream: Stream,
    offers: Offers,
}

enum Stream {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

/// Bytes of the message read from disk and written per block.
pub const CHUNK: usize = 256 * 1024;

/// A connection-level failure: the connection is unusable afterwards.
type Broken = String;

async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    stage: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Broken> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{stage}: {e}")),
        Err(_) => Err(format!(
            "{stage}: timed out after {}",
            humantime::format_duration(limit)
        )),
    }
}

impl Connection {
    /// Ends the session politely (QUIT), without waiting long for the answer.
    pub async fn quit(self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, async {
            match self.stream {
                Stream::Plain(c) => c.quit().await,
                Stream::Tls(c) => c.quit().await,
            }
        })
        .await;
    }
}

impl Upstream {
    pub fn from_config(config: &Config) -> Result<Upstream, String> {
        let u = &config.upstream;
        let credentials = match (&u.username, config.upstream_password()?) {
            (Some(user), Some(password)) => Some((user.clone(), password)),
            _ => None,
        };
        Ok(Upstream {
            host: u.host.clone(),
            port: u.port,
            mode: u.tls,
            credentials,
            timeouts: Timeouts {
                connect: u.connect_timeout.get(),
                greeting: u.greeting_timeout.get(),
                command: u.command_timeout.get(),
                data: u.data_timeout.get(),
                data_block: u.data_block_timeout.get(),
                final_reply: u.final_timeout.get(),
            },
            helo: config.server.hostname.clone(),
            connector: tls_connector(u.tls_insecure, u.ca_file.as_deref())?,
        })
    }

    pub fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn command_timeout(&self) -> Duration {
        self.timeouts.command
    }

    /// Connects, reads the greeting, says EHLO, starts TLS and authenticates as
    /// configured. Every step has its own deadline.
    pub async fn connect(&self) -> Result<Connection, String> {
        let t = self.timeouts;
        let upstream = self.describe();
        let tcp = within(t.connect, "connect", async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
            // TCP_NODELAY: commands and the message go out in separate writes; with
            // Nagle a write waits for the delayed ACK of the one before (~40 ms).
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(tcp)
        })
        .await
        .map_err(|e| format!("{upstream}: {e}"))?;
        let result = match self.mode {
            UpstreamTls::None => {
                let mut client = SmtpClient {
                    stream: tcp,
                    timeout: t.command,
                };
                self.greet(&mut client).await.map(|offers| Connection {
                    stream: Stream::Plain(client),
                    offers,
                })
            }
            UpstreamTls::Implicit => {
                let client = SmtpClient {
                    stream: tcp,
                    timeout: t.connect,
                };
                match client.into_tls(&self.connector, &self.host).await {
                    Ok(mut client) => self.greet(&mut client).await.map(|offers| Connection {
                        stream: Stream::Tls(Box::new(client)),
                        offers,
                    }),
                    Err(e) => Err(format!("TLS handshake: {e}")),
                }
            }
            UpstreamTls::Starttls => {
                let mut client = SmtpClient {
                    stream: tcp,
                    timeout: t.command,
                };
                match self.greeting(&mut client).await {
                    Err(e) => Err(e),
                    Ok(()) => match within(t.command, "EHLO", client.ehlo(&self.helo)).await {
                        Err(e) => Err(e),
                        Ok(_) => match client.start_tls(&self.connector, &self.host).await {
                            Err(e) => Err(format!("STARTTLS: {e}")),
                            Ok(mut client) => {
                                self.hello(&mut client).await.map(|offers| Connection {
                                    stream: Stream::Tls(Box::new(client)),
                                    offers,
                                })
                            }
                        },
                    },
                }
            }
        };
        result.map_err(|e| format!("{upstream}: {e}"))
    }

    async fn greeting<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<T>,
    ) -> Result<(), Broken> {
        let greeting = within(self.timeouts.greeting, "greeting", client.read()).await?;
        if greeting.code != 220 {
            return Err(format!("greeting: {}", reply_text(&greeting)));
        }
        Ok(())
    }

    async fn greet<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<T>,
    ) -> Result<Offers, Broken> {
        self.greeting(client).await?;
        self.hello(client).await
    }

    /// EHLO, then AUTH when configured; returns what the smarthost offers.
    async fn hello<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<T>,
    ) -> Result<Offers, Broken> {
        client.timeout = self.timeouts.command;
        let ehlo = within(self.timeouts.command, "EHLO", client.ehlo(&self.helo)).await?;
        if let Some((user, password)) = &self.credentials {
            let credentials = mail_send::Credentials::new(user.clone(), password.clone());
            within(
                self.timeouts.command,
                "AUTH",
                client.authenticate(&credentials, &ehlo),
            )
            .await?;
        }
        Ok(Offers {
            pipelining: ehlo.has_capability(EXT_PIPELINING),
            eight_bit: ehlo.has_capability(EXT_8BIT_MIME),
            smtputf8: ehlo.has_capability(EXT_SMTP_UTF8),
            dsn: ehlo.has_capability(EXT_DSN),
        })
    }

    /// One delivery attempt of one message on `conn` (opened here when `None`, dropped
    /// again when it broke).
    pub async fn send(
        &self,
        conn: &mut Option<Connection>,
        envelope: &Envelope,
        recipients: &[String],
        message: MessageReader,
    ) -> Attempt {
        // A connection kept open may have been closed by the smarthost meanwhile: when
        // it fails before any of the message was sent, try once on a fresh one.
        let reused = conn.is_some();
        match self.send_once(conn, envelope, recipients, message).await {
            Ok(attempt) => attempt,
            Err((_, message)) if reused => {
                match self.send_once(conn, envelope, recipients, message).await {
                    Ok(attempt) => attempt,
                    Err((e, _)) => Attempt::Unreachable(e),
                }
            }
            Err((e, _)) => Attempt::Unreachable(e),
        }
    }

    /// `Err` gives the message back: the connection broke before any of it was sent.
    async fn send_once(
        &self,
        conn: &mut Option<Connection>,
        envelope: &Envelope,
        recipients: &[String],
        message: MessageReader,
    ) -> Result<Attempt, (String, MessageReader)> {
        if conn.is_none() {
            match self.connect().await {
                Ok(c) => *conn = Some(c),
                Err(e) => return Ok(Attempt::Unreachable(e)),
            }
        }
        let Some(c) = conn.as_mut() else {
            return Ok(Attempt::Unreachable("no connection".into()));
        };
        let offers = c.offers;
        let result = match &mut c.stream {
            Stream::Plain(client) => {
                transaction(client, self.timeouts, offers, envelope, recipients, message).await
            }
            Stream::Tls(client) => {
                transaction(
                    client.as_mut(),
                    self.timeouts,
                    offers,
                    envelope,
                    recipients,
                    message,
                )
                .await
            }
        };
        let upstream = self.describe();
        match result {
            Ok(results) => Ok(Attempt::Replied {
                results,
                dsn: offers.dsn,
            }),
            Err(failure) => {
                // The connection is in an unknown state: never reuse it.
                *conn = None;
                match failure {
                    Failure::BeforeData(e, message) => Err((format!("{upstream}: {e}"), message)),
                    Failure::Broken(e) => Ok(Attempt::Unreachable(format!("{upstream}: {e}"))),
                    Failure::Damaged(e) => Ok(Attempt::Damaged(e)),
                }
            }
        }
    }
}

enum Failure {
    /// The connection broke before any message data was written.
    BeforeData(Broken, MessageReader),
    Broken(Broken),
    Damaged(String),
}

impl From<Broken> for Failure {
    fn from(e: Broken) -> Failure {
        Failure::Broken(e)
    }
}

/// `MAIL FROM` with what the client declared, where the smarthost offers it (RFC 6152:
/// BODY=8BITMIME; RFC 6531: SMTPUTF8; RFC 3461: RET, ENVID). A message that needs SMTPUTF8 cannot go to a
/// smarthost without it.
fn mail_command(envelope: &Envelope, offers: Offers) -> Result<String, RcptResult> {
    let mut command = format!("MAIL FROM:<{}>", envelope.from);
    if envelope.body == BodyType::EightBitMime && offers.eight_bit {
        command.push_str(" BODY=8BITMIME");
    }
    if envelope.smtputf8 {
        if !offers.smtputf8 {
            return Err(RcptResult::Failed(
                "554 5.6.7 the smarthost does not offer SMTPUTF8, which this message needs".into(),
            ));
        }
        command.push_str(" SMTPUTF8");
    }
    if offers.dsn {
        command.push_str(&crate::dsn::upstream_mail_params(&envelope.dsn));
    }
    command.push_str("\r\n");
    Ok(command)
}

/// One SMTP transaction. `Err` is a connection-level failure (all deferred, connection
/// dropped); SMTP replies become per-recipient results. With PIPELINING (RFC 2920) MAIL,
/// every RCPT and DATA go out in one write.
async fn transaction<T>(
    client: &mut SmtpClient<T>,
    t: Timeouts,
    offers: Offers,
    envelope: &Envelope,
    recipients: &[String],
    message: MessageReader,
) -> Result<Vec<RcptResult>, Failure>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mail = match mail_command(envelope, offers) {
        Ok(m) => m,
        Err(refused) => return Ok(vec![refused; recipients.len()]),
    };
    let mut commands = Vec::with_capacity(recipients.len() + 2);
    commands.push(mail);
    commands.extend(recipients.iter().map(|r| {
        let params = if offers.dsn {
            crate::dsn::upstream_rcpt_params(&envelope.dsn, r)
        } else {
            String::new()
        };
        format!("RCPT TO:<{r}>{params}\r\n")
    }));
    commands.push("DATA\r\n".to_string());
    let replies = match negotiate(client, t, offers.pipelining, &commands).await {
        Ok(replies) => replies,
        Err(e) => return Err(Failure::BeforeData(e, message)),
    };
    client.timeout = t.command;
    let mail = &replies[0];
    if !(200..300).contains(&mail.code) {
        let result = classify(mail.code, reply_text(mail));
        if replies
            .get(commands.len() - 1)
            .is_some_and(|r| r.code == 354)
        {
            // A pipelined DATA the server accepted anyway: end it empty.
            finish_empty(client, t).await?;
        }
        within(t.command, "RSET", client.rset()).await?;
        return Ok(vec![result; recipients.len()]);
    }
    let mut results: Vec<Option<RcptResult>> = vec![None; recipients.len()];
    let mut accepted = Vec::new();
    for (i, reply) in replies.iter().skip(1).take(recipients.len()).enumerate() {
        if (200..300).contains(&reply.code) {
            accepted.push(i);
        } else {
            results[i] = Some(classify(reply.code, reply_text(reply)));
        }
    }
    let data = replies.get(recipients.len() + 1);
    match data {
        Some(d) if d.code == 354 && !accepted.is_empty() => {
            let done = send_message(client, t, message).await?;
            let outcome = classify(done.code, reply_text(&done));
            for &i in &accepted {
                results[i] = Some(outcome.clone());
            }
        }
        Some(d) if d.code == 354 => {
            // No recipient, but the pipelined DATA was taken: send nothing.
            finish_empty(client, t).await?;
        }
        Some(d) => {
            let outcome = classify(d.code, reply_text(d));
            for &i in &accepted {
                results[i] = Some(outcome.clone());
            }
            within(t.command, "RSET", client.rset()).await?;
        }
        None => within(t.command, "RSET", client.rset()).await?,
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| RcptResult::Deferred("no reply".into())))
        .collect())
}

/// MAIL, RCPT for each recipient, DATA: their replies. Without PIPELINING one command
/// at a time, stopping where the server said no.
async fn negotiate<T>(
    client: &mut SmtpClient<T>,
    t: Timeouts,
    pipelining: bool,
    commands: &[String],
) -> Result<Vec<Response<String>>, Broken>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    if pipelining {
        client.timeout = t.command.max(t.data);
        return within(client.timeout, "MAIL/RCPT/DATA", client.cmds(commands)).await;
    }
    let rcpt_count = commands.len() - 2;
    let mut replies = Vec::with_capacity(commands.len());
    for (i, command) in commands.iter().enumerate() {
        let is_data = i == commands.len() - 1;
        let limit = if is_data { t.data } else { t.command };
        client.timeout = limit;
        let stage = if i == 0 {
            "MAIL"
        } else if is_data {
            "DATA"
        } else {
            "RCPT"
        };
        let reply = within(limit, stage, client.cmd(command)).await?;
        let positive = (200..400).contains(&reply.code);
        let accepted_so_far = replies
            .iter()
            .skip(1)
            .any(|r: &Response<String>| r.code < 400);
        replies.push(reply);
        let is_mail = i == 0;
        let is_last_rcpt = i == rcpt_count;
        if (is_mail && !positive) || (is_last_rcpt && !accepted_so_far && !positive) {
            break;
        }
    }
    Ok(replies)
}

/// After a 354 nobody wants: an empty message, and its reply.
async fn finish_empty<T>(client: &mut SmtpClient<T>, t: Timeouts) -> Result<(), Broken>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    within(t.data_block, "writing the message", async {
        client.stream.write_all(b".\r\n").await?;
        client.stream.flush().await
    })
    .await?;
    within(t.final_reply, "reply to the end of data", client.read()).await?;
    Ok(())
}

/// Streams the message after a 354, block by block, each within `data_block`, then
/// waits `final_reply` for the answer. A damaged queue file is noticed before its last
/// block, so the final dot is never sent for it: dropping the connection makes the
/// smarthost discard the transaction.
async fn send_message<T>(
    client: &mut SmtpClient<T>,
    t: Timeouts,
    message: MessageReader,
) -> Result<Response<String>, Failure>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut reader = Some(message);
    let mut chunk = Vec::new();
    let mut wire = Vec::new();
    let mut stuffer = DotStuffer::default();
    loop {
        let Some(mut r) = reader.take() else { break };
        let more = match r.take_prefetched() {
            // Read ahead by the caller's one blocking call: no second one.
            Some(first) => {
                chunk = first;
                Ok(!chunk.is_empty())
            }
            None => {
                let mut buf = std::mem::take(&mut chunk);
                // The read runs off the async runtime.
                let (back, buf, more) = tokio::task::spawn_blocking(move || {
                    let more = r.next_chunk(&mut buf, CHUNK);
                    (r, buf, more)
                })
                .await
                .map_err(|e| Failure::Damaged(format!("read task failed: {e}")))?;
                r = back;
                chunk = buf;
                more
            }
        };
        let more = more.map_err(|e| Failure::Damaged(e.to_string()))?;
        if !more {
            break;
        }
        wire.clear();
        // Most chunks need no stuffing: they go out as read, without a copy.
        let stuffed = stuffer.push_if_needed(&chunk, &mut wire);
        let body: &[u8] = if stuffed { &wire } else { &chunk };
        let last = r.len_remaining() == 0;
        let mut end = Vec::new();
        if last {
            stuffer.finish(&mut end);
        } else {
            reader = Some(r);
        }
        within(t.data_block, "writing the message", async {
            client.stream.write_all(body).await?;
            client.stream.write_all(&end).await?;
            client.stream.flush().await
        })
        .await?;
        if last {
            return Ok(within(t.final_reply, "reply to the end of data", client.read()).await?);
        }
    }
    // An empty message: only the terminator.
    wire.clear();
    stuffer.finish(&mut wire);
    within(t.data_block, "writing the message", async {
        client.stream.write_all(&wire).await?;
        client.stream.flush().await
    })
    .await?;
    Ok(within(t.final_reply, "reply to the end of data", client.read()).await?)
}

/// The transparency procedure (RFC 5321 §4.5.2) over a message in pieces: a dot at
/// the start of a line is doubled, a final CRLF is added if missing, then `.CRLF`. The
/// message has canonical CRLF line endings (bare CR/LF is refused at DATA), so a line
/// start is the byte after an LF.
#[derive(Debug)]
pub struct DotStuffer {
    at_line_start: bool,
    /// The last two bytes seen: does the message end with CRLF?
    tail: [u8; 2],
    empty: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            tail: [0, 0],
            empty: true,
        }
    }
}

impl DotStuffer {
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        out.reserve(chunk.len() + 64);
        let mut rest = chunk;
        if self.at_line_start && rest[0] == b'.' {
            out.push(b'.');
        }
        while let Some(pos) = memchr::memmem::find(rest, b"\n.") {
            out.extend_from_slice(&rest[..=pos]);
            out.push(b'.');
            rest = &rest[pos + 1..];
        }
        out.extend_from_slice(rest);
        self.note(chunk);
    }

    /// Like [`DotStuffer::push`] when `chunk` has a line that starts with a dot (then
    /// `true`: the stuffed bytes are in `out`); otherwise only takes note of `chunk`, which
    /// goes on the wire as it is (`false`).
    pub fn push_if_needed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> bool {
        let needs = (self.at_line_start && chunk.first() == Some(&b'.'))
            || memchr::memmem::find(chunk, b"\n.").is_some();
        if needs {
            self.push(chunk, out);
        } else {
            self.note(chunk);
        }
        needs
    }

    /// Keeps what the next chunk and [`DotStuffer::finish`] need to know of `chunk`.
    fn note(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.at_line_start = chunk.ends_with(b"\n");
        self.tail = match chunk {
            [.., a, b] => [*a, *b],
            [b] => [self.tail[1], *b],
            [] => self.tail,
        };
        self.empty = false;
    }

    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.empty && self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The whole message as sent after DATA (tests, benchmarks).
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut stuffer = DotStuffer::default();
    stuffer.push(message, &mut out);
    stuffer.finish(&mut out);
    out
}

fn reply_text(r: &Response<String>) -> String {
    let esc = if r.esc[0] > 0 {
        format!("{}.{}.{} ", r.esc[0], r.esc[1], r.esc[2])
    } else {
        String::new()
    };
    format!("{} {esc}{}", r.code, r.message.replace(['\r', '\n'], " "))
}

fn classify(code: u16, text: String) -> RcptResult {
    match code {
        200..=399 => RcptResult::Delivered(text),
        500..=599 => RcptResult::Failed(text),
        _ => RcptResult::Deferred(text),
    }
}

fn tls_connector(
    insecure: bool,
    ca_file: Option<&std::path::Path>,
) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream TLS: {e}"))?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("upstream.ca_file: {}: {e}", path.display()))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("upstream.ca_file: {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("upstream.ca_file: {}: {e}", path.display()))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `upstream.tls_insecure` (and the benchmark's client): for a peer on
/// loopback with a self-signed certificate. Handshake signatures are still
/// checked; only the certificate chain is not.
#[derive(Debug)]
pub struct AcceptAnyCertificate(pub Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_over_any_split() {
        let message = b".a\r\nb\r\n.\r\n..c\r\nend";
        let whole = dot_stuff(message);
        for split in 0..=message.len() {
            for second in split..=message.len() {
                let mut out = Vec::new();
                let mut stuffer = DotStuffer::default();
                stuffer.push(&message[..split], &mut out);
                stuffer.push(&message[split..second], &mut out);
                stuffer.push(&message[second..], &mut out);
                stuffer.finish(&mut out);
                assert_eq!(out, whole, "split at {split}, {second}");
                // The way send_message does it: chunks without a dot line go as they are.
                let mut sent = Vec::new();
                let mut stuffer = DotStuffer::default();
                for piece in [
                    &message[..split],
                    &message[split..second],
                    &message[second..],
                ] {
                    let mut wire = Vec::new();
                    if stuffer.push_if_needed(piece, &mut wire) {
                        sent.extend_from_slice(&wire);
                    } else {
                        assert!(wire.is_empty());
                        sent.extend_from_slice(piece);
                    }
                }
                stuffer.finish(&mut sent);
                assert_eq!(sent, whole, "pass-through, split at {split}, {second}");
            }
        }
        let crlf_split = [&b"a\r"[..], &b"\n"[..]];
        let mut out = Vec::new();
        let mut stuffer = DotStuffer::default();
        for piece in crlf_split {
            stuffer.push(piece, &mut out);
        }
        stuffer.finish(&mut out);
        assert_eq!(out, b"a\r\n.\r\n");
    }

    #[test]
    fn dot_stuffing() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".a\r\n", b"..a\r\n.\r\n"),
            (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\n..b\r\n", b"a\r\n...b\r\n.\r\n"),
            (b"no final crlf", b"no final crlf\r\n.\r\n"),
        ];
        for (input, wire) in cases {
            assert_eq!(
                dot_stuff(input),
                wire.to_vec(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// A message in a queue of its own, ready to be read for delivery.
    fn queued(body: &[u8], rcpts: &[String]) -> (tempfile::TempDir, Envelope, MessageReader) {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _) =
            domauth_store::Queue::open(dir.path(), domauth_store::SyncMethod::Fsync).unwrap();
        let envelope = Envelope {
            id: "Q1".into(),
            from: "a@b.test".into(),
            recipients: rcpts.to_vec(),
            received_at: chrono::Utc::now(),
            login: None,
            is_bounce: false,
            body: BodyType::EightBitMime,
            smtputf8: false,
            dsn: Default::default(),
        };
        let mut w = queue.writer(&envelope).unwrap();
        w.push(body);
        for r in queue.commit_batch(&mut [&mut w]) {
            r.unwrap();
        }
        let reader = queue.open_message("Q1").unwrap();
        (dir, envelope, reader)
    }

    /// A scripted smarthost on an in-memory stream: answers each command
    /// line with the next reply, and after a 354 reads up to `.CRLF`.
    async fn scripted(pipelining: bool, replies: Vec<&'static str>) -> (Vec<RcptResult>, String) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (client_side, server_side) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut lines = BufReader::new(server_side);
            let mut seen = String::new();
            let mut replies = replies.into_iter();
            let mut line = String::new();
            while lines.read_line(&mut line).await.unwrap_or(0) > 0 {
                seen.push_str(&line);
                if let Some(reply) = replies.next() {
                    lines.get_mut().write_all(reply.as_bytes()).await.unwrap();
                    if reply.starts_with("354") {
                        seen.push_str("<354>");
                        loop {
                            line.clear();
                            lines.read_line(&mut line).await.unwrap();
                            seen.push_str(&line);
                            if line == ".\r\n" {
                                break;
                            }
                        }
                        if let Some(done) = replies.next() {
                            lines.get_mut().write_all(done.as_bytes()).await.unwrap();
                        }
                    }
                }
                line.clear();
            }
            seen
        });
        let mut client = SmtpClient {
            stream: client_side,
            timeout: Duration::from_secs(5),
        };
        let rcpts = vec!["ok@x.test".to_string(), "bad@x.test".to_string()];
        let (_dir, envelope, reader) = queued(b"hi\r\n", &rcpts);
        let second = Duration::from_secs(5);
        let timeouts = Timeouts {
            connect: second,
            greeting: second,
            command: second,
            data: second,
            data_block: second,
            final_reply: second,
        };
        let offers = Offers {
            pipelining,
            eight_bit: true,
            smtputf8: false,
            dsn: false,
        };
        let results =
            match transaction(&mut client, timeouts, offers, &envelope, &rcpts, reader).await {
                Ok(r) => r,
                Err(_) => panic!("transaction failed at connection level"),
            };
        drop(client);
        (results, server.await.unwrap())
    }

    #[tokio::test]
    async fn pipelined_transaction_with_one_refused_recipient() {
        for pipelining in [true, false] {
            let (results, seen) = scripted(
                pipelining,
                vec![
                    "250 ok\r\n",
                    "250 ok\r\n",
                    "550 5.1.1 no\r\n",
                    "354 go\r\n",
                    "250 queued\r\n",
                ],
            )
            .await;
            assert!(
                matches!(results[0], RcptResult::Delivered(_)),
                "{results:?}"
            );
            assert!(
                matches!(&results[1], RcptResult::Failed(t) if t.contains("5.1.1")),
                "{results:?}"
            );
            assert!(seen.contains("<354>hi\r\n.\r\n"), "{seen:?}");
            // What the client declared travels on (RFC 6152).
            assert!(
                seen.starts_with("MAIL FROM:<a@b.test> BODY=8BITMIME\r\n"),
                "{seen:?}"
            );
        }
    }

    #[tokio::test]
    async fn refused_sender_defers_or_fails_everyone_and_resets() {
        let (results, seen) = scripted(false, vec!["451 4.3.0 later\r\n", "250 reset\r\n"]).await;
        assert!(
            results.iter().all(|r| matches!(r, RcptResult::Deferred(_))),
            "{results:?}"
        );
        assert!(
            !seen.contains("RCPT"),
            "no RCPT after a refused MAIL: {seen:?}"
        );
        assert!(seen.contains("RSET"), "{seen:?}");
        let (results, seen) = scripted(
            true,
            vec![
                "550 5.7.1 no\r\n",
                "503 no\r\n",
                "503 no\r\n",
                "503 no\r\n",
                "250 reset\r\n",
            ],
        )
        .await;
        assert!(
            results.iter().all(|r| matches!(r, RcptResult::Failed(_))),
            "{results:?}"
        );
        assert!(!seen.contains("<354>"), "{seen:?}");
    }

    #[test]
    fn reply_classes() {
        assert!(matches!(
            classify(250, "ok".into()),
            RcptResult::Delivered(_)
        ));
        assert!(matches!(classify(451, "x".into()), RcptResult::Deferred(_)));
        assert!(matches!(classify(550, "x".into()), RcptResult::Failed(_)));
        assert!(matches!(classify(0, "x".into()), RcptResult::Deferred(_)));
    }
}
