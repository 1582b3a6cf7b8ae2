//! The smarthost client (Postfix's `smtp`): mail-send over plain TCP,
//! STARTTLS or implicit TLS, optional AUTH, one connection kept open per
//! delivery worker, and a result per recipient.

use std::{sync::Arc, time::Duration};

use mail_send::{SmtpClient, SmtpClientBuilder};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use smtp_proto::Response;
use tokio::net::TcpStream;
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

pub struct Upstream {
    host: String,
    port: u16,
    mode: UpstreamTls,
    credentials: Option<(String, String)>,
    timeout: Duration,
    helo: String,
    connector: TlsConnector,
}

/// An open upstream connection and whether the smarthost pipelines.
pub struct Connection {
    stream: Stream,
    pipelining: bool,
}

enum Stream {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
}

impl Connection {
    /// Ends the session politely (QUIT).
    pub async fn quit(self) {
        let _ = match self.stream {
            Stream::Plain(c) => c.quit().await,
            Stream::Tls(c) => c.quit().await,
        };
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
            timeout: u.timeout.get(),
            helo: config.server.hostname.clone(),
            connector: tls_connector(u.tls_insecure, u.ca_file.as_deref())?,
        })
    }

    pub fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub async fn connect(&self) -> Result<Connection, String> {
        let builder = SmtpClientBuilder::new_with_tls_connector(
            self.host.clone(),
            self.port,
            self.connector.clone(),
        )
        // mail-send defaults to implicit TLS and a one-hour timeout.
        .implicit_tls(self.mode == UpstreamTls::Implicit)
        .timeout(self.timeout)
        .helo_host(self.helo.clone())
        // We say EHLO ourselves, to learn whether the smarthost pipelines.
        .say_ehlo(false);
        let upstream = self.describe();
        let failed = |e: mail_send::Error| format!("cannot connect to {upstream}: {e}");
        // TCP_NODELAY: commands and the message go out in separate writes;
        // with Nagle a write waits for the delayed ACK of the one before
        // (~40 ms per message on Linux).
        let connection = match self.mode {
            UpstreamTls::None => {
                let mut c = builder.connect_plain().await.map_err(failed)?;
                let _ = c.stream.set_nodelay(true);
                let pipelining = self.hello(&mut c).await.map_err(failed)?;
                Connection {
                    stream: Stream::Plain(c),
                    pipelining,
                }
            }
            UpstreamTls::Starttls | UpstreamTls::Implicit => {
                let mut c = builder.connect().await.map_err(failed)?;
                let _ = c.stream.get_ref().0.set_nodelay(true);
                let pipelining = self.hello(&mut c).await.map_err(failed)?;
                Connection {
                    stream: Stream::Tls(Box::new(c)),
                    pipelining,
                }
            }
        };
        Ok(connection)
    }

    /// EHLO, then AUTH when configured; returns whether PIPELINING is offered.
    async fn hello<T>(&self, client: &mut SmtpClient<T>) -> mail_send::Result<bool>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let capabilities = client.ehlo(&self.helo).await?;
        if let Some((user, password)) = &self.credentials {
            let credentials = mail_send::Credentials::new(user.clone(), password.clone());
            client.authenticate(&credentials, &capabilities).await?;
        }
        Ok(capabilities.has_capability(smtp_proto::EXT_PIPELINING))
    }

    /// Sends one message on `conn` (opened here when `None`, dropped again
    /// when it broke). Returns one result per recipient, in order.
    pub async fn send(
        &self,
        conn: &mut Option<Connection>,
        from: &str,
        recipients: &[String],
        message: &[u8],
    ) -> Vec<RcptResult> {
        // A reused connection may have been closed by the smarthost while
        // idle: on a connection-level failure, retry once on a fresh one.
        let reused = conn.is_some();
        let mut results = self.send_once(conn, from, recipients, message).await;
        if reused && conn.is_none() && results.iter().all(|r| matches!(r, RcptResult::Deferred(_)))
        {
            results = self.send_once(conn, from, recipients, message).await;
        }
        results
    }

    async fn send_once(
        &self,
        conn: &mut Option<Connection>,
        from: &str,
        recipients: &[String],
        message: &[u8],
    ) -> Vec<RcptResult> {
        if conn.is_none() {
            match self.connect().await {
                Ok(c) => *conn = Some(c),
                Err(e) => return vec![RcptResult::Deferred(e); recipients.len()],
            }
        }
        let result = match conn.as_mut() {
            Some(Connection {
                stream: Stream::Plain(c),
                pipelining,
            }) => transaction(c, *pipelining, from, recipients, message).await,
            Some(Connection {
                stream: Stream::Tls(c),
                pipelining,
            }) => transaction(c.as_mut(), *pipelining, from, recipients, message).await,
            None => Err("no connection".to_string()),
        };
        match result {
            Ok(results) => results,
            Err(e) => {
                // The connection is in an unknown state: never reuse it.
                *conn = None;
                let e = format!("{}: {e}", self.describe());
                vec![RcptResult::Deferred(e); recipients.len()]
            }
        }
    }
}

/// One SMTP transaction. `Err` is a connection-level failure (all deferred,
/// connection dropped); SMTP replies become per-recipient results. With
/// PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one write.
async fn transaction<T>(
    client: &mut SmtpClient<T>,
    pipelining: bool,
    from: &str,
    recipients: &[String],
    message: &[u8],
) -> Result<Vec<RcptResult>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut commands = Vec::with_capacity(recipients.len() + 2);
    commands.push(format!("MAIL FROM:<{from}>\r\n"));
    commands.extend(recipients.iter().map(|r| format!("RCPT TO:<{r}>\r\n")));
    commands.push("DATA\r\n".to_string());
    let replies = if pipelining {
        client.cmds(&commands).await.map_err(|e| e.to_string())?
    } else {
        // One command at a time, stopping where the server said no.
        let mut replies = Vec::with_capacity(commands.len());
        for (i, command) in commands.iter().enumerate() {
            let reply = client.cmd(command).await.map_err(|e| e.to_string())?;
            let positive = (200..400).contains(&reply.code);
            let accepted_so_far = replies
                .iter()
                .skip(1)
                .any(|r: &Response<String>| r.code < 400);
            replies.push(reply);
            let is_mail = i == 0;
            let is_last_rcpt = i == recipients.len();
            if (is_mail && !positive) || (is_last_rcpt && !accepted_so_far && !positive) {
                break;
            }
        }
        replies
    };
    let mail = &replies[0];
    if !(200..300).contains(&mail.code) {
        let result = classify(mail.code, reply_text(mail));
        if replies
            .get(commands.len() - 1)
            .is_some_and(|r| r.code == 354)
        {
            // A pipelined DATA the server accepted anyway: end it empty.
            finish_data(client, b"").await?;
        }
        client.rset().await.map_err(|e| e.to_string())?;
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
            let done = finish_data(client, message).await?;
            let outcome = classify(done.code, reply_text(&done));
            for &i in &accepted {
                results[i] = Some(outcome.clone());
            }
        }
        Some(d) if d.code == 354 => {
            // No recipient, but the pipelined DATA was taken: send nothing.
            finish_data(client, b"").await?;
        }
        Some(d) => {
            let outcome = classify(d.code, reply_text(d));
            for &i in &accepted {
                results[i] = Some(outcome.clone());
            }
            client.rset().await.map_err(|e| e.to_string())?;
        }
        None => client.rset().await.map_err(|e| e.to_string())?,
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| RcptResult::Deferred("no reply".into())))
        .collect())
}

/// Sends the message after a 354 and reads the final reply. The message
/// has canonical CRLF line endings (bare CR/LF is refused at DATA), so the
/// transparency procedure (RFC 5321 §4.5.2) is a search for `LF .`. Message
/// and terminator go out in one write.
async fn finish_data<T>(
    client: &mut SmtpClient<T>,
    message: &[u8],
) -> Result<Response<String>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let wire = dot_stuff(message);
    let timeout = client.timeout;
    tokio::time::timeout(timeout, async {
        client.stream.write_all(&wire).await?;
        client.stream.flush().await?;
        client.read().await
    })
    .await
    .map_err(|_| "timed out sending the message".to_string())?
    .map_err(|e| e.to_string())
}

/// The message as sent after DATA: dots doubled at line starts, a final
/// CRLF if missing, and the `.CRLF` terminator.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut rest = message;
    if rest.first() == Some(&b'.') {
        out.push(b'.');
    }
    while let Some(pos) = memchr::memmem::find(rest, b"\n.") {
        out.extend_from_slice(&rest[..=pos]);
        out.push(b'.');
        rest = &rest[pos + 1..];
    }
    out.extend_from_slice(rest);
    if !message.is_empty() && !message.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
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
        let results = transaction(&mut client, pipelining, "a@b.test", &rcpts, b"hi\r\n")
            .await
            .unwrap();
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
