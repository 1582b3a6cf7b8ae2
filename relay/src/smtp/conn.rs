//! The socket side of an SMTP session: framing of command lines and DATA,
//! reply batching for PIPELINING (RFC 2920), timeouts, the STARTTLS upgrade,
//! and carrying out the session's [`Action`]s.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

use super::{
    auth::Authenticator,
    data::DataDecoder,
    reply::{self, Reply},
    session::{Action, Listener, Session, SessionConfig},
};
use crate::{
    logsafe::Escaped,
    policy::SenderPolicy,
    spool::{IncomingMessage, Spool, SpoolError},
};

/// What every connection shares.
pub struct ConnContext {
    pub session: Arc<SessionConfig>,
    pub policy: Arc<dyn SenderPolicy>,
    pub auth: Arc<Authenticator>,
    pub spool: Arc<Spool>,
    pub tls: TlsAcceptor,
    pub idle_timeout: Duration,
    pub data_timeout: Duration,
    pub max_line_length: usize,
}

enum Outcome {
    Closed,
    UpgradeTls,
}

/// Serves one client connection to the end. Errors are logged, never
/// propagated: one client's trouble is not the server's.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    ctx: Arc<ConnContext>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let _open = crate::metrics::session_opened(listener);
    let started = std::time::Instant::now();
    let mut session = Session::new(ctx.session.clone(), ctx.policy.clone(), listener, peer.ip());
    tracing::info!(event = "session_start", peer = %peer, listener = ?listener, "connection");
    let result = match listener {
        Listener::Submissions => match handshake(&ctx, tcp).await {
            Ok(mut tls) => run(&mut tls, &mut session, &ctx, shutdown, true).await,
            Err(e) => Err(e),
        },
        Listener::Submission => {
            let mut tcp = tcp;
            match run(&mut tcp, &mut session, &ctx, shutdown.clone(), true).await {
                Ok(Outcome::UpgradeTls) => match handshake(&ctx, tcp).await {
                    Ok(mut tls) => {
                        session.tls_started();
                        run(&mut tls, &mut session, &ctx, shutdown, false).await
                    }
                    Err(e) => Err(e),
                },
                other => other,
            }
        }
    };
    let login = session
        .login()
        .map(|l| l.address.clone())
        .unwrap_or_default();
    match result {
        Ok(_) => tracing::info!(
            event = "session_end",
            peer = %peer,
            login = %Escaped(&login),
            tls = session.is_tls(),
            secs = started.elapsed().as_secs_f64(),
            "connection closed"
        ),
        Err(e) => tracing::info!(
            event = "session_end",
            peer = %peer,
            login = %Escaped(&login),
            tls = session.is_tls(),
            secs = started.elapsed().as_secs_f64(),
            error = %e,
            "connection ended with an error"
        ),
    }
}

async fn handshake(
    ctx: &ConnContext,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    // A client that stalls half way through the handshake must not hold a
    // connection slot for ever.
    match tokio::time::timeout(ctx.idle_timeout, ctx.tls.accept(tcp)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}

/// Input buffer with a read offset; compacted as it is consumed.
struct InputBuffer {
    buf: Vec<u8>,
    start: usize,
    /// Inside an over-long line: drop bytes up to its end.
    discarding: bool,
}

enum Line {
    Complete(Vec<u8>),
    TooLong,
    Incomplete,
}

impl InputBuffer {
    fn new() -> InputBuffer {
        InputBuffer {
            buf: Vec::with_capacity(4096),
            start: 0,
            discarding: false,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    fn next_line(&mut self, max: usize) -> Line {
        let pending = self.pending();
        match memchr::memchr(b'\n', pending) {
            Some(pos) => {
                let too_long = self.discarding || pos + 1 > max;
                let line = pending[..=pos].to_vec();
                self.discarding = false;
                self.consume(pos + 1);
                if too_long {
                    Line::TooLong
                } else {
                    Line::Complete(line)
                }
            }
            None if pending.len() > max => {
                // Keep memory bounded: forget the line's bytes so far.
                let n = pending.len();
                self.discarding = true;
                self.consume(n);
                Line::Incomplete
            }
            None => Line::Incomplete,
        }
    }

    async fn fill<S: AsyncRead + Unpin>(&mut self, io: &mut S) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        io.read_buf(&mut self.buf).await
    }
}

/// A command line must end in CRLF and hold no other CR or LF (RFC 5321
/// §2.3.8); anything else is refused, which also stops smuggling through
/// command lines.
fn well_formed(line: &[u8]) -> bool {
    line.len() >= 2 && line.ends_with(b"\r\n") && !line[..line.len() - 2].contains(&b'\r')
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    session: &mut Session,
    ctx: &ConnContext,
    mut shutdown: watch::Receiver<bool>,
    greet: bool,
) -> std::io::Result<Outcome> {
    let mut input = InputBuffer::new();
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    if greet {
        session.greeting().write_to(&mut out);
    }
    // The idle timeout is per command line, not per read: a client that
    // trickles one byte at a time (slowloris) must still finish its line
    // within it.
    let mut line_deadline: Option<Instant> = None;
    loop {
        let next = input.next_line(ctx.max_line_length);
        if !matches!(next, Line::Incomplete) {
            line_deadline = None;
        }
        let action = match next {
            Line::Complete(line) if well_formed(&line) => session.command(&line),
            Line::Complete(_) => session.protocol_error(reply::command_bare_line_ending()),
            Line::TooLong => session.protocol_error(reply::line_too_long()),
            Line::Incomplete => {
                // RFC 2920 §3.1: replies may wait while more commands are
                // buffered, but must go out before we block on the client.
                write_out(io, &mut out).await?;
                if *shutdown.borrow() {
                    return close(io, &mut out, reply::shutting_down(&ctx.session.hostname)).await;
                }
                let deadline =
                    *line_deadline.get_or_insert_with(|| deadline_after(ctx.idle_timeout));
                tokio::select! {
                    read = tokio::time::timeout_at(deadline, input.fill(io)) => match read {
                        Ok(Ok(0)) => return Ok(Outcome::Closed),
                        Ok(Ok(_)) => continue,
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            return close(io, &mut out, reply::idle_timeout(&ctx.session.hostname)).await;
                        }
                    },
                    _ = shutdown.changed() => {
                        return close(io, &mut out, reply::shutting_down(&ctx.session.hostname)).await;
                    }
                }
            }
        };
        let action = match action {
            Action::Authenticate(creds) => {
                write_out(io, &mut out).await?;
                let result = ctx.auth.authenticate(session.peer, creds).await;
                crate::metrics::auth(&result);
                session.auth_result(result)
            }
            other => other,
        };
        match action {
            Action::Reply(r) => r.write_to(&mut out),
            Action::Close(r) => return close(io, &mut out, r).await,
            Action::StartTls(r) => {
                r.write_to(&mut out);
                write_out(io, &mut out).await?;
                // Whatever the client pipelined behind STARTTLS was sent in
                // clear: dropping `input` here discards it (CVE-2011-0411).
                return Ok(Outcome::UpgradeTls);
            }
            Action::ReceiveData(r) => {
                r.write_to(&mut out);
                write_out(io, &mut out).await?;
                let Some(reply) = receive_message(io, &mut input, session, ctx).await? else {
                    tracing::info!(
                        event = "message_aborted",
                        peer = %session.peer,
                        "client disconnected during DATA: nothing queued"
                    );
                    return Ok(Outcome::Closed);
                };
                reply.write_to(&mut out);
            }
            // `auth_result` never asks to authenticate again.
            Action::Authenticate(_) => reply::local_error().write_to(&mut out),
        }
    }
}

/// Reads the message up to CRLF.CRLF within the DATA deadline, streaming it
/// to its queue file, then checks it and commits it. `None`: the client went
/// away (or timed out) mid-DATA, and nothing was queued.
async fn receive_message<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    input: &mut InputBuffer,
    session: &mut Session,
    ctx: &ConnContext,
) -> std::io::Result<Option<Reply>> {
    let mut decoder = DataDecoder::new(ctx.session.max_message_size);
    let start = session.message_start();
    let mail_at = start.as_ref().and_then(|s| s.envelope.mail_at);
    let mut message = match start.map(|start| {
        ctx.spool.incoming(
            start,
            crate::spool::new_queue_id(),
            &ctx.session.hostname,
            session.peer,
        )
    }) {
        Some(Ok(m)) => Some(m),
        Some(Err(e)) => {
            tracing::error!(event = "message_not_queued", error = %e, "cannot start a queue file");
            None
        }
        None => None,
    };
    let deadline = deadline_after(ctx.data_timeout);
    // Decoded bytes when there is no message to take them (they are dropped).
    let mut dropped = Vec::new();
    loop {
        let pending = input.pending();
        if !pending.is_empty() {
            let fed = pending.len();
            let end = match message.as_mut() {
                Some(m) => m.receive(|out| decoder.feed(pending, out)),
                None => {
                    let end = decoder.feed(pending, &mut dropped);
                    dropped.clear();
                    end
                }
            };
            match end {
                Some(used) => {
                    input.consume(used);
                    break;
                }
                None => input.consume(fed),
            }
            if let Some(m) = message.as_mut()
                && m.wants_spill()
            {
                m.spill().await;
            }
        }
        match tokio::time::timeout_at(deadline, input.fill(io)).await {
            Ok(Ok(0)) => {
                discard(message).await;
                return Ok(None);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                discard(message).await;
                return Err(e);
            }
            Err(_) => {
                discard(message).await;
                let mut out = Vec::new();
                reply::idle_timeout(&ctx.session.hostname).write_to(&mut out);
                let _ = io.write_all(&out).await;
                return Ok(None);
            }
        }
    }
    let size = decoder.size();
    let Some(mut message) = message else {
        // The queue file could not even be started (or no transaction): the
        // transaction ends here, with a temporary error.
        let _ = session.data_received(decoder.finish(), None);
        crate::metrics::message_refused(crate::metrics::Refusal::StorageError);
        return Ok(Some(reply::storage_error()));
    };
    let verdict = session.data_received(decoder.finish(), message.headers());
    let login = session
        .login()
        .map(|l| l.address.clone())
        .unwrap_or_default();
    if let Err(reply) = verdict {
        tracing::info!(
            event = "message_refused",
            peer = %session.peer,
            login = %Escaped(&login),
            size,
            reply = %Escaped(&reply.to_string()),
            "message refused"
        );
        message.discard().await;
        return Ok(Some(reply));
    }
    let id = message.queue_id().to_string();
    let (from, recipients) = (message.from().to_string(), message.recipients().len());
    match ctx.spool.commit(message).await {
        Ok(()) => {
            crate::metrics::message_accepted(mail_at);
            tracing::info!(
                event = "message_accepted",
                id = %id,
                login = %Escaped(&login),
                from = %Escaped(&from),
                recipients,
                size,
                "queued"
            );
            Ok(Some(reply::queued(&id)))
        }
        Err(e) => {
            tracing::error!(event = "message_not_queued", id = %id, error = %e, "cannot store message");
            crate::metrics::spool_failed(&e);
            Ok(Some(match e {
                SpoolError::DiskFull(_) => reply::storage_full(),
                SpoolError::Failed(_) => reply::storage_error(),
            }))
        }
    }
}

/// `now + d`, saturating: the config bounds durations, but the clock must never
/// panic on what a config file says.
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

async fn discard(message: Option<IncomingMessage>) {
    if let Some(m) = message {
        m.discard().await;
    }
}

async fn write_out<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> std::io::Result<()> {
    if !out.is_empty() {
        io.write_all(out).await?;
        io.flush().await?;
        out.clear();
    }
    Ok(())
}

async fn close<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    r: Reply,
) -> std::io::Result<Outcome> {
    r.write_to(out);
    write_out(io, out).await?;
    let _ = io.shutdown().await;
    Ok(Outcome::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_framing() {
        let mut b = InputBuffer::new();
        b.buf.extend_from_slice(b"NOOP\r\nRSET\r\nPART");
        assert!(matches!(b.next_line(100), Line::Complete(l) if l == b"NOOP\r\n"));
        assert!(matches!(b.next_line(100), Line::Complete(l) if l == b"RSET\r\n"));
        assert!(matches!(b.next_line(100), Line::Incomplete));
        assert_eq!(b.pending(), b"PART");
    }

    #[test]
    fn overlong_lines_are_dropped_with_bounded_memory() {
        let mut b = InputBuffer::new();
        b.buf.extend_from_slice(&[b'A'; 300]);
        assert!(matches!(b.next_line(100), Line::Incomplete));
        assert!(b.pending().is_empty(), "the long line's bytes are not kept");
        b.buf.extend_from_slice(&[b'A'; 300]);
        assert!(matches!(b.next_line(100), Line::Incomplete));
        b.buf.extend_from_slice(b"AAAA\r\nNOOP\r\n");
        assert!(matches!(b.next_line(100), Line::TooLong));
        assert!(matches!(b.next_line(100), Line::Complete(l) if l == b"NOOP\r\n"));
    }

    #[test]
    fn command_line_endings() {
        assert!(well_formed(b"NOOP\r\n"));
        assert!(!well_formed(b"NOOP\n"));
        assert!(!well_formed(b"NO\rOP\r\n"));
        assert!(!well_formed(b"\n"));
    }
}
