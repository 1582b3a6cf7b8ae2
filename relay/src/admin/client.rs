//! The CLI's side of the admin API: one HTTP/1.1 request per command over
//! the server's Unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

pub struct AdminClient {
    socket: PathBuf,
}

/// Percent-encodes one path segment (addresses contain `@`, IDNs non-ASCII).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@' | b'+') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl AdminClient {
    pub fn new(socket: &Path) -> AdminClient {
        AdminClient {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends the request; `Err` is one line for the user (the server's error
    /// message, or why the server could not be reached).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            format!(
                "cannot reach the domauth server at {} ({e}): is `domauth serve` running with this config?",
                self.socket.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("admin socket: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = match &body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "domauth")
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .map_err(|e| format!("admin request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("admin socket: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("admin socket: {e}"))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).trim().to_string()));
        if status.is_success() {
            Ok(value)
        } else {
            Err(value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("server answered {status}: {value}")))
        }
    }
}
