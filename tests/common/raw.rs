//! A byte-level SMTP client for tests that need exact control of what goes
//! on the wire (smuggling probes, pipelining, STARTTLS injection, framing),
//! where swaks would normalise the input.
#![allow(dead_code)]

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.as_mut(),
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

pub struct RawClient {
    stream: Option<Stream>,
    buf: Vec<u8>,
    cert: std::path::PathBuf,
}

/// Trusts the relay's own (self-signed) certificate; the name is localhost.
pub fn tls_config(cert: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).expect("relay certificate") {
        roots.add(c.expect("certificate")).expect("trust anchor");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn wrap_tls(tcp: TcpStream, cert: &Path) -> Stream {
    let name = ServerName::try_from("localhost").expect("server name");
    let conn = ClientConnection::new(tls_config(cert), name).expect("tls client");
    Stream::Tls(Box::new(StreamOwned::new(conn, tcp)))
}

/// A TCP connection to 127.0.0.1:`port` from source address `src` (any
/// 127.0.0.x: per-IP limits are tested from several loopback addresses).
/// std cannot bind before connecting; tokio's TcpSocket can.
fn tcp_from(src: Ipv4Addr, port: u16) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let tcp = rt
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(src.into(), 0))?;
            let stream = socket
                .connect(SocketAddr::from(([127, 0, 0, 1], port)))
                .await?;
            stream.into_std()
        })
        .expect("connect to the relay");
    tcp.set_nonblocking(false).expect("blocking");
    tcp.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    tcp
}

impl RawClient {
    /// Plain connection (the STARTTLS port); reads nothing yet.
    pub fn connect(port: u16, cert: &Path) -> RawClient {
        RawClient::connect_from(Ipv4Addr::LOCALHOST, port, cert)
    }

    /// Implicit TLS connection (the submissions port); reads nothing yet.
    pub fn connect_tls(port: u16, cert: &Path) -> RawClient {
        RawClient::connect_tls_from(Ipv4Addr::LOCALHOST, port, cert)
    }

    /// Like [`RawClient::connect`], from source address `src`.
    pub fn connect_from(src: Ipv4Addr, port: u16, cert: &Path) -> RawClient {
        RawClient {
            stream: Some(Stream::Plain(tcp_from(src, port))),
            buf: Vec::new(),
            cert: cert.to_path_buf(),
        }
    }

    /// Like [`RawClient::connect_tls`], from source address `src`.
    pub fn connect_tls_from(src: Ipv4Addr, port: u16, cert: &Path) -> RawClient {
        RawClient {
            stream: Some(wrap_tls(tcp_from(src, port), cert)),
            buf: Vec::new(),
            cert: cert.to_path_buf(),
        }
    }

    /// The TCP socket under the session (to change its read timeout).
    pub fn tcp(&self) -> &TcpStream {
        match self.stream.as_ref().expect("open") {
            Stream::Plain(t) => t,
            Stream::Tls(s) => s.get_ref(),
        }
    }

    /// The DER of the certificate the server presented (TLS sessions only;
    /// after the handshake, i.e. after the first reply).
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self.stream.as_ref()? {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let io = self.stream.as_mut().expect("open").io();
        io.write_all(bytes).expect("send");
        io.flush().expect("flush");
    }

    /// Sends without panicking; false when the server closed the connection.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        match self.stream.as_mut() {
            Some(s) => s.io().write_all(bytes).and_then(|_| s.io().flush()).is_ok(),
            None => false,
        }
    }

    /// Reads one complete reply (all lines of a multi-line reply), or None
    /// when the server closed the connection first. A read timeout is no
    /// close: it panics (the server neither answered nor hung up).
    #[track_caller]
    pub fn read_reply(&mut self) -> Option<String> {
        match self.poll_reply() {
            Ok(reply) => reply,
            Err(()) => panic!(
                "no reply within the read timeout ({:?}) and the connection is still open; \
                 unanswered bytes: {:?}",
                self.tcp().read_timeout().ok().flatten(),
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// `Ok(Some)`: a reply; `Ok(None)`: the connection is closed (EOF, or
    /// reset by the server); `Err`: the read timed out with no complete
    /// reply (the connection is still open).
    pub fn poll_reply(&mut self) -> Result<Option<String>, ()> {
        loop {
            if let Some(end) = reply_end(&self.buf) {
                let reply: Vec<u8> = self.buf.drain(..end).collect();
                return Ok(Some(String::from_utf8_lossy(&reply).into_owned()));
            }
            let Some(stream) = self.stream.as_mut() else {
                return Ok(None);
            };
            let mut chunk = [0u8; 4096];
            match stream.io().read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // Reset, aborted, EOF inside TLS (no close_notify), a fatal
                // TLS alert: the server ended the connection.
                Err(_) => return Ok(None),
            }
        }
    }

    /// `EHLO`, which must succeed.
    pub fn ehlo(&mut self) {
        let reply = self.cmd("EHLO client.test");
        assert!(reply.starts_with("250"), "EHLO refused: {reply}");
    }

    /// `AUTH PLAIN` with an initial response; returns the reply.
    pub fn auth_plain(&mut self, user: &str, password: &str) -> String {
        let token = B64.encode(format!("\0{user}\0{password}"));
        self.cmd(&format!("AUTH PLAIN {token}"))
    }

    /// Sends `line` + CRLF and returns the reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.read_reply()
            .unwrap_or_else(|| panic!("connection closed after {line:?}"))
    }

    /// Asserts that the server has closed the connection: the next read
    /// sees EOF (or a reset). A reply instead fails, and so does a read
    /// timeout: a silent but open connection is not a closed one.
    #[track_caller]
    pub fn assert_closed(&mut self, what: &str) {
        match self.poll_reply() {
            Ok(None) => {}
            Ok(Some(reply)) => {
                panic!("{what}: expected the server to close the connection, got {reply:?}")
            }
            Err(()) => panic!(
                "{what}: the connection is still open: no close and no reply within the read \
                 timeout ({:?})",
                self.tcp().read_timeout().ok().flatten()
            ),
        }
    }

    /// `STARTTLS`, expects 220, and continues inside TLS. Anything the
    /// server sent but we did not read is discarded, as a client must.
    pub fn starttls(&mut self) {
        let reply = self.cmd("STARTTLS");
        assert!(reply.starts_with("220"), "STARTTLS refused: {reply}");
        self.upgrade();
    }

    /// Performs the TLS handshake on the plain connection now.
    pub fn upgrade(&mut self) {
        let tcp = match self.stream.take() {
            Some(Stream::Plain(t)) => t,
            _ => panic!("not a plain connection"),
        };
        self.buf.clear();
        self.stream = Some(wrap_tls(tcp, &self.cert));
    }

    /// Greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN: ready for MAIL.
    pub fn login(port: u16, cert: &Path, user: &str, password: &str) -> RawClient {
        let mut c = RawClient::connect(port, cert);
        let greeting = c.read_reply().expect("greeting");
        assert!(greeting.starts_with("220"), "{greeting}");
        c.ehlo();
        c.starttls();
        c.ehlo();
        let reply = c.auth_plain(user, password);
        assert!(reply.starts_with("235"), "AUTH failed: {reply}");
        c
    }
}

/// End of the first complete reply in `buf`: lines until one whose fourth
/// byte is a space (RFC 5321 §4.2.1).
fn reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
        let line = &buf[start..start + pos + 1];
        start += pos + 1;
        if line.len() < 4 || line[3] != b'-' {
            return Some(start);
        }
    }
    None
}
