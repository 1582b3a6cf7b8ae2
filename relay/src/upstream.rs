//! The smarthost client (Postfix's `smtp`): mail-send over plain TCP,
//! STARTTLS or implicit TLS, optional AUTH, one connection kept open per
//! delivery worker, and a result per recipient.

use std::{sync::Arc, time::Duration};

use mail_send::{SmtpClient, SmtpClientBuilder, smtp::message::Parameters};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
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

/// An open upstream connection.
pub enum Connection {
    Plain(SmtpClient<TcpStream>),
    Tls(Box<SmtpClient<TlsStream<TcpStream>>>),
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
        let mut builder = SmtpClientBuilder::new_with_tls_connector(
            self.host.clone(),
            self.port,
            self.connector.clone(),
        )
        // mail-send defaults to implicit TLS and a one-hour timeout.
        .implicit_tls(self.mode == UpstreamTls::Implicit)
        .timeout(self.timeout)
        .helo_host(self.helo.clone());
        if let Some((user, password)) = &self.credentials {
            builder = builder.credentials((user.clone(), password.clone()));
        }
        let upstream = self.describe();
        // TCP_NODELAY: mail-send writes the message and its final `.CRLF`
        // separately; with Nagle the second write waits for the delayed ACK
        // of the first (~40 ms per message on Linux).
        match self.mode {
            UpstreamTls::None => builder.connect_plain().await.map(|c| {
                let _ = c.stream.set_nodelay(true);
                Connection::Plain(c)
            }),
            UpstreamTls::Starttls | UpstreamTls::Implicit => builder.connect().await.map(|c| {
                let _ = c.stream.get_ref().0.set_nodelay(true);
                Connection::Tls(Box::new(c))
            }),
        }
        .map_err(|e| format!("cannot connect to {upstream}: {e}"))
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
            Some(Connection::Plain(c)) => transaction(c, from, recipients, message).await,
            Some(Connection::Tls(c)) => transaction(c.as_mut(), from, recipients, message).await,
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
/// connection dropped); SMTP replies become per-recipient results.
async fn transaction<T>(
    client: &mut SmtpClient<T>,
    from: &str,
    recipients: &[String],
    message: &[u8],
) -> Result<Vec<RcptResult>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let params = Parameters::default();
    match client.mail_from(from, &params).await {
        Ok(()) => {}
        Err(mail_send::Error::UnexpectedReply(r)) => {
            let text = reply_text(&r);
            client.rset().await.map_err(|e| e.to_string())?;
            let result = classify(r.code, text);
            return Ok(vec![result; recipients.len()]);
        }
        Err(e) => return Err(e.to_string()),
    }
    let mut results: Vec<Option<RcptResult>> = vec![None; recipients.len()];
    let mut accepted = Vec::new();
    for (i, rcpt) in recipients.iter().enumerate() {
        match client.rcpt_to(rcpt, &params).await {
            Ok(()) => accepted.push(i),
            Err(mail_send::Error::UnexpectedReply(r)) => {
                results[i] = Some(classify(r.code, reply_text(&r)));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    if accepted.is_empty() {
        client.rset().await.map_err(|e| e.to_string())?;
    } else {
        // mail-send appends CRLF.CRLF itself; our message already ends in
        // CRLF, so drop that one or the message would gain an empty line.
        let body = message.strip_suffix(b"\r\n").unwrap_or(message);
        let outcome = match client.data(body).await {
            Ok(r) => RcptResult::Delivered(reply_text(&r)),
            Err(mail_send::Error::UnexpectedReply(r)) => classify(r.code, reply_text(&r)),
            Err(e) => return Err(e.to_string()),
        };
        for i in accepted {
            results[i] = Some(outcome.clone());
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| RcptResult::Deferred("no reply".into())))
        .collect())
}

fn reply_text(r: &smtp_proto::Response<String>) -> String {
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

/// `upstream.tls_insecure`: for a smarthost on loopback with a self-signed
/// certificate. Signatures are still checked; only the chain is not.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

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
