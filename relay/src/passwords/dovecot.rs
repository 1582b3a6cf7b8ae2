//! A client of Dovecot's authentication protocol (version 1.2) over its auth
//! client socket, doing what Postfix's `xsasl_dovecot_server.c` does.
//!
//! The exchange: we send `VERSION 1 2` and `CPID <pid>`; Dovecot sends
//! `VERSION`, one `MECH` per mechanism, `SPID`, `CUID`, `COOKIE` and `DONE`.
//! Then each login is one `AUTH <id> PLAIN service=smtp nologin secured
//! rip=<ip> resp=<base64>` answered by `OK <id> user=…` or `FAIL <id> …`
//! (fields separated by tabs, values tab-escaped). AUTH LOGIN from the
//! client is sent as PLAIN too: we hold both strings.
//!
//! Dovecot delays each failure by seconds (and more per client IP after
//! repeated ones), so requests are never serialised: a small pool of
//! connections, each carrying any number of requests at once, told apart by
//! their id; a reader task per connection hands each answer to its waiter.
//! A connection that reaches EOF is replaced at the next use.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::Engine;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::oneshot,
};

use super::Verdict;
use crate::logsafe::Escaped;

/// Connections kept open to Dovecot. Each multiplexes requests; several
/// spread the load and survive one being reset.
const POOL_SIZE: usize = 4;
/// Dovecot's own client line limit is 16 KiB; anything far longer is not
/// Dovecot.
const MAX_LINE: usize = 64 * 1024;
/// The protocol major version we speak.
const MAJOR: u32 = 1;

/// One line from Dovecot, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    Version {
        major: u32,
        minor: u32,
    },
    Mech {
        name: String,
    },
    Done,
    Ok {
        id: u32,
        user: Option<String>,
    },
    Fail {
        id: u32,
        temporary: bool,
    },
    Cont {
        id: u32,
    },
    /// `SPID`, `CUID`, `COOKIE` and anything a newer Dovecot adds.
    Other,
}

impl ServerLine {
    fn request_id(&self) -> Option<u32> {
        match self {
            ServerLine::Ok { id, .. } | ServerLine::Fail { id, .. } | ServerLine::Cont { id } => {
                Some(*id)
            }
            _ => None,
        }
    }
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str) -> Result<ServerLine, String> {
    let mut fields = line.split('\t');
    let command = fields.next().unwrap_or_default();
    let number = |v: Option<&str>, what: &str| -> Result<u32, String> {
        v.and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{command} without a valid {what}"))
    };
    Ok(match command {
        "VERSION" => ServerLine::Version {
            major: number(fields.next(), "major version")?,
            minor: number(fields.next(), "minor version")?,
        },
        "MECH" => ServerLine::Mech {
            name: fields
                .next()
                .filter(|n| !n.is_empty())
                .ok_or("MECH without a name")?
                .to_ascii_uppercase(),
        },
        "DONE" => ServerLine::Done,
        "OK" => {
            let id = number(fields.next(), "request id")?;
            let user = fields.find_map(|f| f.strip_prefix("user=")).map(unescape);
            ServerLine::Ok { id, user }
        }
        "FAIL" => {
            let id = number(fields.next(), "request id")?;
            // Dovecot 2.3 marks an internal failure (a passdb down) with the
            // flag `temp`; newer ones with `code=temp_fail`.
            let temporary = fields.any(|f| f == "temp" || f == "code=temp_fail");
            ServerLine::Fail { id, temporary }
        }
        "CONT" => ServerLine::Cont {
            id: number(fields.next(), "request id")?,
        },
        _ => ServerLine::Other,
    })
}

/// Dovecot's `str_tabunescape`: `\x01` then `1`, `t`, `r`, `n`.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('1') => out.push('\u{1}'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// What the handshake has told us so far.
#[derive(Debug, Default)]
pub struct Handshake {
    version: Option<(u32, u32)>,
    plain: bool,
}

impl Handshake {
    /// Feeds one line; `Ok(true)` once `DONE` arrived and Dovecot can serve us.
    pub fn on_line(&mut self, line: ServerLine) -> Result<bool, String> {
        match line {
            ServerLine::Version { major, minor } => {
                if major != MAJOR {
                    return Err(format!(
                        "Dovecot speaks auth protocol {major}.{minor}, not {MAJOR}.x"
                    ));
                }
                self.version = Some((major, minor));
            }
            ServerLine::Mech { name } => self.plain |= name == "PLAIN",
            ServerLine::Done => {
                if self.version.is_none() {
                    return Err("Dovecot sent no VERSION".into());
                }
                if !self.plain {
                    return Err(
                        "Dovecot does not offer the PLAIN mechanism (auth_mechanisms)".into(),
                    );
                }
                return Ok(true);
            }
            ServerLine::Other => {}
            other => return Err(format!("unexpected {other:?} during the handshake")),
        }
        Ok(false)
    }
}

/// The AUTH line for one login. `secured`: AUTH is only accepted inside TLS
/// (SPEC §4), so Dovecot may allow plaintext mechanisms; `nologin`: we only
/// check the password, nobody logs in to Dovecot.
pub fn auth_request(id: u32, login: &str, password: &str, rip: IpAddr) -> String {
    let mut plain = Vec::with_capacity(login.len() + password.len() + 2);
    plain.push(0);
    plain.extend_from_slice(login.as_bytes());
    plain.push(0);
    plain.extend_from_slice(password.as_bytes());
    let resp = base64::engine::general_purpose::STANDARD.encode(plain);
    format!("AUTH\t{id}\tPLAIN\tservice=smtp\tnologin\tsecured\trip={rip}\tresp={resp}\n")
}

/// The verdict for Dovecot's answer to a login's request.
pub fn verdict(line: ServerLine, login: &str) -> Verdict {
    match line {
        ServerLine::Ok { user, .. } => Verdict::Valid {
            user: user.unwrap_or_else(|| login.to_string()),
        },
        ServerLine::Fail {
            temporary: true, ..
        } => Verdict::Unavailable("Dovecot reported a temporary failure".into()),
        ServerLine::Fail { .. } => Verdict::Invalid,
        ServerLine::Cont { .. } => {
            Verdict::Unavailable("Dovecot asked for more data for PLAIN".into())
        }
        other => Verdict::Unavailable(format!("unexpected answer from Dovecot: {other:?}")),
    }
}

/// The pool of connections to one Dovecot auth socket.
pub struct DovecotClient {
    socket: PathBuf,
    timeout: Duration,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Connection>>>>,
    next_slot: AtomicUsize,
}

impl DovecotClient {
    pub fn new(socket: PathBuf, timeout: Duration) -> DovecotClient {
        DovecotClient {
            socket,
            timeout,
            slots: (0..POOL_SIZE)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next_slot: AtomicUsize::new(0),
        }
    }

    /// Asks Dovecot; never waits longer than the configured timeout.
    pub async fn authenticate(&self, login: &str, password: &str, rip: IpAddr) -> Verdict {
        match tokio::time::timeout(self.timeout, self.ask(login, password, rip)).await {
            Ok(Ok(line)) => verdict(line, login),
            Ok(Err(why)) => Verdict::Unavailable(why),
            Err(_) => Verdict::Unavailable(format!(
                "no answer from Dovecot at {} within {}",
                self.socket.display(),
                humantime::format_duration(self.timeout)
            )),
        }
    }

    async fn ask(&self, login: &str, password: &str, rip: IpAddr) -> Result<ServerLine, String> {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        // A connection Dovecot closed while idle (a restart) is only noticed
        // when used: then one retry on a fresh connection.
        let mut last = String::new();
        for _ in 0..2 {
            let conn = self.connection(slot).await?;
            match conn.request(login, password, rip).await {
                Ok(line) => return Ok(line),
                Err(why) => last = why,
            }
        }
        Err(last)
    }

    async fn connection(&self, slot: usize) -> Result<Arc<Connection>, String> {
        let mut current = self.slots[slot].lock().await;
        if let Some(conn) = current.as_ref()
            && !conn.closed.load(Ordering::Acquire)
        {
            return Ok(conn.clone());
        }
        let conn = Connection::open(&self.socket).await?;
        *current = Some(conn.clone());
        Ok(conn)
    }
}

struct Connection {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// Waiters by request id. `closed` is set under this lock, so a request
    /// never registers on a connection whose reader has already gone.
    pending: Mutex<HashMap<u32, oneshot::Sender<ServerLine>>>,
    next_id: AtomicU32,
    closed: AtomicBool,
}

impl Connection {
    async fn open(socket: &PathBuf) -> Result<Arc<Connection>, String> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            format!(
                "cannot connect to Dovecot's auth socket {}: {e}",
                socket.display()
            )
        })?;
        let (read, mut write) = stream.into_split();
        // Dovecot ignores the PID of a client that only authenticates (no
        // login requests), so every connection may send ours.
        write
            .write_all(format!("VERSION\t{MAJOR}\t2\nCPID\t{}\n", std::process::id()).as_bytes())
            .await
            .map_err(|e| format!("cannot write to Dovecot: {e}"))?;
        let mut reader = BufReader::new(read);
        let mut handshake = Handshake::default();
        loop {
            let line = read_line(&mut reader)
                .await?
                .ok_or("Dovecot closed the connection during the handshake")?;
            if handshake.on_line(parse_line(&line)?)? {
                break;
            }
        }
        let conn = Arc::new(Connection {
            writer: tokio::sync::Mutex::new(write),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(read_answers(conn.clone(), reader));
        tracing::debug!(socket = %socket.display(), "connected to Dovecot's auth socket");
        Ok(conn)
    }

    async fn request(
        &self,
        login: &str,
        password: &str,
        rip: IpAddr,
    ) -> Result<ServerLine, String> {
        let id = match self.next_id.fetch_add(1, Ordering::Relaxed) {
            0 => self.next_id.fetch_add(1, Ordering::Relaxed),
            id => id,
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if self.closed.load(Ordering::Acquire) {
                return Err("the connection to Dovecot is closed".into());
            }
            pending.insert(id, tx);
        }
        // Removes the waiter when the answer never comes (timeout, EOF).
        let _waiter = Waiter { conn: self, id };
        let line = auth_request(id, login, password, rip);
        {
            let mut writer = self.writer.lock().await;
            if let Err(e) = writer.write_all(line.as_bytes()).await {
                self.close();
                return Err(format!("cannot write to Dovecot: {e}"));
            }
        }
        rx.await
            .map_err(|_| "Dovecot closed the connection before answering".into())
    }

    fn close(&self) {
        let mut pending = lock(&self.pending);
        self.closed.store(true, Ordering::Release);
        // Dropping the senders wakes every waiter with an error.
        pending.clear();
    }
}

struct Waiter<'a> {
    conn: &'a Connection,
    id: u32,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        lock(&self.conn.pending).remove(&self.id);
    }
}

/// The reader task of one connection: hands each answer to its waiter until
/// EOF or a line that is not Dovecot's protocol.
async fn read_answers(conn: Arc<Connection>, mut reader: BufReader<OwnedReadHalf>) {
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => {
                tracing::info!("Dovecot closed its auth connection; reconnecting at next use");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %Escaped(&e), "reading from Dovecot's auth socket");
                break;
            }
        };
        match parse_line(&line) {
            Ok(answer) => {
                if let Some(id) = answer.request_id()
                    && let Some(waiter) = lock(&conn.pending).remove(&id)
                {
                    let _ = waiter.send(answer);
                }
            }
            Err(e) => {
                tracing::warn!(error = %Escaped(&e), "Dovecot sent a line we do not understand; closing");
                break;
            }
        }
    }
    conn.close();
}

/// One line without its newline; `None` at EOF.
async fn read_line(reader: &mut BufReader<OwnedReadHalf>) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| format!("cannot read from Dovecot: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() >= MAX_LINE {
            return Err("Dovecot sent a line longer than 64 KiB".into());
        }
        return Ok(None);
    }
    buf.pop();
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lines() {
        let cases: &[(&str, Result<ServerLine, &str>)] = &[
            (
                "VERSION\t1\t2",
                Ok(ServerLine::Version { major: 1, minor: 2 }),
            ),
            ("VERSION\tx\t2", Err("major version")),
            (
                "MECH\tplain\tplaintext",
                Ok(ServerLine::Mech {
                    name: "PLAIN".into(),
                }),
            ),
            ("MECH", Err("MECH without a name")),
            ("SPID\t123", Ok(ServerLine::Other)),
            ("COOKIE\tabcdef", Ok(ServerLine::Other)),
            ("DONE", Ok(ServerLine::Done)),
            (
                "OK\t7\tuser=info@acme.test",
                Ok(ServerLine::Ok {
                    id: 7,
                    user: Some("info@acme.test".into()),
                }),
            ),
            ("OK\t7", Ok(ServerLine::Ok { id: 7, user: None })),
            (
                "OK\t8\tuser=a\u{1}tb\u{1}1c",
                Ok(ServerLine::Ok {
                    id: 8,
                    user: Some("a\tb\u{1}c".into()),
                }),
            ),
            (
                "FAIL\t9\tuser=info@acme.test",
                Ok(ServerLine::Fail {
                    id: 9,
                    temporary: false,
                }),
            ),
            (
                "FAIL\t9\ttemp",
                Ok(ServerLine::Fail {
                    id: 9,
                    temporary: true,
                }),
            ),
            (
                "FAIL\t9\tcode=temp_fail\treason=x",
                Ok(ServerLine::Fail {
                    id: 9,
                    temporary: true,
                }),
            ),
            (
                "FAIL\t9\treason=temp",
                Ok(ServerLine::Fail {
                    id: 9,
                    temporary: false,
                }),
            ),
            ("FAIL", Err("request id")),
            ("OK\t-1", Err("request id")),
            ("CONT\t3\t", Ok(ServerLine::Cont { id: 3 })),
            ("", Ok(ServerLine::Other)),
        ];
        for (line, expect) in cases {
            let got = parse_line(line);
            match (expect, &got) {
                (Ok(e), Ok(g)) => assert_eq!(e, g, "{line:?}"),
                (Err(text), Err(g)) => assert!(g.contains(text), "{line:?}: {g}"),
                _ => panic!("{line:?}: expected {expect:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn handshake_needs_version_and_plain() {
        let feed = |lines: &[&str]| -> Result<bool, String> {
            let mut h = Handshake::default();
            let mut done = false;
            for l in lines {
                done = h.on_line(parse_line(l)?)?;
            }
            Ok(done)
        };
        let dovecot = [
            "VERSION\t1\t2",
            "MECH\tPLAIN\tplaintext",
            "MECH\tLOGIN\tplaintext",
            "SPID\t25870",
            "CUID\t1",
            "COOKIE\tc6714f6ce542741260bcfac2f2ef938d",
            "DONE",
        ];
        assert_eq!(feed(&dovecot), Ok(true));
        assert_eq!(feed(&dovecot[..3]), Ok(false));
        let no_plain = ["VERSION\t1\t2", "MECH\tLOGIN\tplaintext", "DONE"];
        assert!(feed(&no_plain).unwrap_err().contains("PLAIN"));
        assert!(
            feed(&["MECH\tPLAIN", "DONE"])
                .unwrap_err()
                .contains("VERSION")
        );
        assert!(feed(&["VERSION\t2\t0"]).unwrap_err().contains("2.0"));
        assert!(feed(&["VERSION\t1\t2", "OK\t1"]).is_err());
    }

    #[test]
    fn auth_line_carries_plain_and_the_client_ip() {
        let line = auth_request(5, "info@acme.test", "pa\tss", "192.0.2.7".parse().unwrap());
        assert!(line.ends_with('\n'));
        let fields: Vec<&str> = line.trim_end().split('\t').collect();
        assert_eq!(
            &fields[..7],
            [
                "AUTH",
                "5",
                "PLAIN",
                "service=smtp",
                "nologin",
                "secured",
                "rip=192.0.2.7"
            ]
        );
        let resp = fields[7].strip_prefix("resp=").unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(resp)
            .unwrap();
        assert_eq!(raw, b"\0info@acme.test\0pa\tss");
        assert_eq!(
            fields.len(),
            8,
            "the password's tab stays inside the base64"
        );
    }

    #[test]
    fn verdicts() {
        let ok = ServerLine::Ok {
            id: 1,
            user: Some("x@y.test".into()),
        };
        assert_eq!(
            verdict(ok, "X@y.test"),
            Verdict::Valid {
                user: "x@y.test".into()
            }
        );
        let ok = ServerLine::Ok { id: 1, user: None };
        assert_eq!(
            verdict(ok, "a@b.test"),
            Verdict::Valid {
                user: "a@b.test".into()
            }
        );
        let fail = ServerLine::Fail {
            id: 1,
            temporary: false,
        };
        assert_eq!(verdict(fail, "a"), Verdict::Invalid);
        let temp = ServerLine::Fail {
            id: 1,
            temporary: true,
        };
        assert!(matches!(verdict(temp, "a"), Verdict::Unavailable(_)));
        assert!(matches!(
            verdict(ServerLine::Cont { id: 1 }, "a"),
            Verdict::Unavailable(_)
        ));
    }

    /// A fake Dovecot: answers the second request before the first, then
    /// closes; the client matches answers by id and reconnects.
    #[tokio::test]
    async fn answers_are_matched_by_id_and_a_closed_connection_is_replaced() {
        use tokio::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("auth-client");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (conn, _) = listener.accept().await.unwrap();
                let (read, mut write) = conn.into_split();
                let mut read = BufReader::new(read);
                write
                    .write_all(b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t1\nCUID\t1\nCOOKIE\tab\nDONE\n")
                    .await
                    .unwrap();
                let mut lines = Vec::new();
                while lines.len() < 4 {
                    lines.push(read_line(&mut read).await.unwrap().unwrap());
                }
                assert!(lines[0].starts_with("VERSION\t1\t"), "{lines:?}");
                assert!(lines[1].starts_with("CPID\t"), "{lines:?}");
                let id = |l: &str| l.split('\t').nth(1).unwrap().to_string();
                let (first, second) = (id(&lines[2]), id(&lines[3]));
                // Whichever request carried the good password gets OK.
                let answer = |l: &str, i: &str| {
                    if l.contains(
                        &base64::engine::general_purpose::STANDARD.encode("\0a@b.test\0good"),
                    ) {
                        format!("OK\t{i}\tuser=a@b.test\n")
                    } else {
                        format!("FAIL\t{i}\tuser=a@b.test\n")
                    }
                };
                write
                    .write_all(answer(&lines[3], &second).as_bytes())
                    .await
                    .unwrap();
                write
                    .write_all(answer(&lines[2], &first).as_bytes())
                    .await
                    .unwrap();
                // Then the connection ends (a Dovecot restart).
            }
        });
        let client = Arc::new(DovecotClient::new(socket, Duration::from_secs(30)));
        // The pool spreads requests over its slots; both go over slot 0 here.
        let conn = client.connection(0).await.unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let (bad, good) = tokio::join!(
            conn.request("a@b.test", "bad", ip),
            conn.request("a@b.test", "good", ip)
        );
        assert!(matches!(bad, Ok(ServerLine::Fail { .. })), "{bad:?}");
        assert!(matches!(good, Ok(ServerLine::Ok { .. })), "{good:?}");
        // The server closed that connection: slot 0 opens a new one.
        for _ in 0..100 {
            if conn.closed.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(conn.closed.load(Ordering::Acquire));
        let again = client.connection(0).await.unwrap();
        assert!(!Arc::ptr_eq(&conn, &again));
        let (bad, good) = tokio::join!(
            again.request("a@b.test", "bad", ip),
            again.request("a@b.test", "good", ip)
        );
        assert!(matches!(bad, Ok(ServerLine::Fail { .. })), "{bad:?}");
        assert!(matches!(good, Ok(ServerLine::Ok { .. })), "{good:?}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_socket_is_unavailable_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let client = DovecotClient::new(dir.path().join("none"), Duration::from_secs(30));
        let v = client
            .authenticate("a@b.test", "x", "127.0.0.1".parse().unwrap())
            .await;
        match v {
            Verdict::Unavailable(why) => assert!(why.contains("cannot connect"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
