//! Real faults for `tests/faults.rs`: a size-limited tmpfs as the relay's
//! data dir (mounted and unmounted by the test, needs root), a filler file
//! that makes it full, and fake smarthosts that misbehave on purpose (silent,
//! closing every connection, or a scripted SMTP server that stalls or answers
//! late). Everything listens on 127.0.0.1 only.
//!
//! This module is a child of `common`, so it may use the harness's private
//! parts (`Relay::child`, `Relay::launch`, `RelayConfig::values`) without
//! changing them.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    ops::{Deref, DerefMut},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{Relay, RelayConfig, SinkMessage, port_open, send_signal};

/// The configuration every fault test starts from: the harness's defaults
/// (one place to change should the fault tests need other ones).
pub fn fault_config(upstream_port: u16) -> RelayConfig {
    RelayConfig::new(upstream_port)
}

// ---------------------------------------------------------------- tmpfs

/// A tmpfs mounted at a directory; unmounted on drop (also on panic).
pub struct Tmpfs {
    path: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs PATH`; panics loudly when that is
    /// not possible (the fault tests need root / CAP_SYS_ADMIN).
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "FAULT INFRASTRUCTURE: cannot mount a tmpfs at {} ({}): {}{}\n\
             these tests need root (or CAP_SYS_ADMIN) to mount a small filesystem",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let t = Tmpfs {
            path: path.to_path_buf(),
            mounted: true,
        };
        let total = t.stats().0;
        assert!(
            total > 0 && total <= 1 << 30,
            "FAULT INFRASTRUCTURE: {} is not the small tmpfs just mounted ({total} bytes)",
            path.display()
        );
        t
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (total, available) bytes.
    pub fn stats(&self) -> (u64, u64) {
        disk_stats(&self.path)
    }

    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        let ok = Command::new("umount")
            .arg(&self.path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file there: detach it anyway so no
            // mount outlives the test.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// (total, available) bytes of the filesystem holding `path`.
pub fn disk_stats(path: &Path) -> (u64, u64) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {}", path.display());
    let frsize = st.f_frsize as u64;
    (st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize)
}

/// A relay whose `data_dir` (`data/` in its directory, with the admin
/// socket) is a fresh tmpfs; certificates, config and log stay outside it.
/// Derefs to [`Relay`]. Drop kills the relay, then unmounts, then removes
/// the directory.
pub struct TmpfsRelay {
    relay: Relay,
    tmpfs: Tmpfs,
}

impl TmpfsRelay {
    pub fn start(config: RelayConfig, size: &str) -> TmpfsRelay {
        assert_eq!(config.get("server", "data_dir"), Some("\"data\""));
        let dir = tempfile::tempdir().expect("tempdir");
        let tmpfs = Tmpfs::mount(&dir.path().join("data"), size);
        let mut r = TmpfsRelay {
            relay: Relay {
                submission: config.port_of("submission"),
                submissions: config.port_of("submissions"),
                dir,
                config,
                child: None,
            },
            tmpfs,
        };
        r.relay.launch();
        r
    }

    pub fn data_dir(&self) -> PathBuf {
        self.tmpfs.path().to_path_buf()
    }

    pub fn tmpfs(&self) -> &Tmpfs {
        &self.tmpfs
    }
}

impl Deref for TmpfsRelay {
    type Target = Relay;
    fn deref(&self) -> &Relay {
        &self.relay
    }
}

impl DerefMut for TmpfsRelay {
    fn deref_mut(&mut self) -> &mut Relay {
        &mut self.relay
    }
}

impl Drop for TmpfsRelay {
    fn drop(&mut self) {
        self.relay.kill9();
        self.tmpfs.unmount();
    }
}

/// How a start attempt ended.
#[derive(Debug)]
pub enum Launch {
    /// The process exited before it was serving.
    Exited(ExitStatus),
    /// It serves (admin socket and both listeners up); it keeps running.
    Serving,
}

/// Starts `domauth serve` for `relay` (not running) and reports whether it
/// exited or came up; unlike [`Relay::restart`] an early exit is a result,
/// not a panic.
pub fn try_launch(relay: &mut Relay) -> Launch {
    assert!(relay.child.is_none(), "the relay is still running");
    let mut child = relay.spawn_serve();
    let socket = relay.dir.path().join("data/admin.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Launch::Exited(status);
        }
        if socket.exists() && port_open(relay.submission) && port_open(relay.submissions) {
            relay.child = Some(child);
            return Launch::Serving;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "domauth neither served nor exited within 30 s:\n{}",
                relay.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then waits up to `limit` for the process to exit. `Ok` with
/// its status and how long it took, or `Err` after `limit` (the process is
/// then killed).
pub fn terminate(relay: &mut Relay, limit: Duration) -> Result<(ExitStatus, Duration), String> {
    let mut child = relay.child.take().expect("the relay is running");
    let start = Instant::now();
    send_signal(&child, "TERM");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok((status, start.elapsed()));
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("still running {limit:?} after SIGTERM"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- filler

/// A file that takes the free space of a filesystem.
pub struct Filler {
    path: PathBuf,
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// Appends to `file` until the filesystem says ENOSPC.
fn write_until_full(file: &mut File) {
    let chunk = vec![0x5a_u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_enospc(&e) => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
}

impl Filler {
    /// Writes `dir/filler` until ENOSPC, then frees `leave` bytes of it
    /// (0: the filesystem stays completely full).
    pub fn fill(dir: &Path, leave: u64) -> Filler {
        let path = dir.join("filler");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("filler file");
        write_until_full(&mut file);
        if leave > 0 {
            let len = file.metadata().expect("filler size").len();
            file.set_len(len.saturating_sub(leave))
                .expect("shrink filler");
        }
        let (_, avail) = disk_stats(dir);
        assert!(
            avail <= leave + 64 * 1024,
            "FAULT INFRASTRUCTURE: {} still has {avail} bytes free after filling",
            dir.display()
        );
        Filler { path }
    }

    /// Takes whatever space was freed since (the relay deleting files).
    pub fn top_up(&self) {
        if let Ok(mut file) = OpenOptions::new().append(true).open(&self.path) {
            write_until_full(&mut file);
        }
    }

    /// Deletes the filler: the space is back.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.free();
    }
}

/// Keeps a filesystem full (tops the filler up every 50 ms) until dropped.
pub struct KeepFull {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KeepFull {
    pub fn start(filler: &Filler) -> KeepFull {
        let stop = Arc::new(AtomicBool::new(false));
        let path = filler.path.clone();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let f = Filler { path };
            while !s.load(Ordering::SeqCst) {
                f.top_up();
                std::thread::sleep(Duration::from_millis(50));
            }
            // Not ours to delete: the test's Filler owns the file.
            std::mem::forget(f);
        });
        KeepFull {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for KeepFull {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- fake smarthosts

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.set_nonblocking(true).expect("nonblocking listener");
    let port = l.local_addr().expect("addr").port();
    (l, port)
}

/// Runs `on_accept` for each connection until stopped.
struct AcceptLoop {
    pub port: u16,
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptLoop {
    fn start(mut on_accept: impl FnMut(TcpStream, usize) + Send + 'static) -> AcceptLoop {
        let (l, port) = listener();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (connections.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((stream, _)) => {
                        let n = c.fetch_add(1, Ordering::SeqCst);
                        stream.set_nonblocking(false).expect("blocking stream");
                        on_accept(stream, n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        AcceptLoop {
            port,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops accepting and closes the listening socket (the port is free).
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts connections and never sends a byte (no greeting, no TLS
/// handshake); holds them open until dropped.
pub struct SilentServer {
    inner: AcceptLoop,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl SilentServer {
    pub fn start() -> SilentServer {
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = held.clone();
        let inner = AcceptLoop::start(move |stream, _| h.lock().unwrap().push(stream));
        SilentServer { inner, held }
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.inner.stop();
        self.held.lock().unwrap().clear();
    }
}

/// Accepts each connection and closes it at once (a smarthost that is up
/// at the TCP level but dead), counting connections.
pub struct ClosingServer {
    inner: AcceptLoop,
}

impl ClosingServer {
    pub fn start() -> ClosingServer {
        ClosingServer {
            inner: AcceptLoop::start(|stream, _| drop(stream)),
        }
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Stops listening: the port is free for a real server.
    pub fn stop(&mut self) {
        self.inner.stop();
    }
}

/// How a [`ScriptedServer`] answers the final dot of a message.
#[derive(Clone, Copy, Debug)]
pub enum FinalReply {
    /// `250` at once.
    Now,
    /// `250` after this long.
    After(Duration),
    /// Never: reads and ignores everything until the client closes.
    Never,
}

/// One message a [`ScriptedServer`] received (its DATA, dot-stuffed as on
/// the wire).
#[derive(Debug, Clone)]
pub struct Received {
    pub message: SinkMessage,
    /// Number of the connection it came on (0-based).
    pub connection: usize,
    /// Whether the server answered its final dot with 250.
    pub answered: bool,
}

type Policy = dyn Fn(usize) -> FinalReply + Send + Sync;

struct Script {
    policy: Box<Policy>,
    received: Mutex<Vec<Received>>,
    stop: AtomicBool,
}

/// A hand-written SMTP server (plain TCP) that answers greeting, EHLO
/// (with PIPELINING), MAIL, RCPT, DATA, RSET, NOOP and QUIT normally, and
/// the final dot of message number `i` (0-based, over all connections) as
/// `policy(i)` says.
pub struct ScriptedServer {
    inner: AcceptLoop,
    script: Arc<Script>,
}

impl ScriptedServer {
    pub fn start(policy: impl Fn(usize) -> FinalReply + Send + Sync + 'static) -> ScriptedServer {
        let script = Arc::new(Script {
            policy: Box::new(policy),
            received: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = script.clone();
        let inner = AcceptLoop::start(move |stream, n| {
            let s = s.clone();
            std::thread::spawn(move || serve_scripted(stream, n, &s));
        });
        ScriptedServer { inner, script }
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Every message received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.script.received.lock().unwrap().clone()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.script.stop.store(true, Ordering::SeqCst);
        self.inner.stop();
    }
}

/// One line (with its CRLF), or None at EOF, on error or when stopped.
fn read_line(r: &mut BufReader<TcpStream>, stop: &AtomicBool) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => return None,
            Ok(_) if buf.ends_with(b"\n") => return Some(buf),
            Ok(_) => return None,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::SeqCst) {
                    return None;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

fn serve_scripted(stream: TcpStream, connection: usize, script: &Script) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut out = stream.try_clone().expect("clone stream");
    let mut r = BufReader::new(stream);
    let stop = &script.stop;
    let say = |out: &mut TcpStream, s: &str| out.write_all(s.as_bytes()).is_ok();
    if !say(&mut out, "220 fake.test ESMTP scripted\r\n") {
        return;
    }
    let (mut from, mut rcpts) = (String::new(), Vec::new());
    while let Some(line) = read_line(&mut r, stop) {
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let verb = text
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let arg = |prefix: &str| {
            text.get(prefix.len()..)
                .unwrap_or("")
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_string()
        };
        let ok = match verb.as_str() {
            "EHLO" => say(
                &mut out,
                "250-fake.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                 250-ENHANCEDSTATUSCODES\r\n250 SIZE 104857600\r\n",
            ),
            "HELO" => say(&mut out, "250 fake.test\r\n"),
            "MAIL" => {
                from = arg("MAIL FROM:");
                rcpts.clear();
                say(&mut out, "250 2.1.0 Ok\r\n")
            }
            "RCPT" => {
                rcpts.push(arg("RCPT TO:"));
                say(&mut out, "250 2.1.5 Ok\r\n")
            }
            "RSET" => say(&mut out, "250 2.0.0 Ok\r\n"),
            "NOOP" => say(&mut out, "250 2.0.0 Ok\r\n"),
            "QUIT" => {
                let _ = say(&mut out, "221 2.0.0 Bye\r\n");
                return;
            }
            "DATA" => {
                if !say(&mut out, "354 End data with <CR><LF>.<CR><LF>\r\n") {
                    return;
                }
                let mut data = Vec::new();
                loop {
                    let Some(l) = read_line(&mut r, stop) else {
                        return;
                    };
                    if l == b".\r\n" {
                        break;
                    }
                    data.extend_from_slice(&l);
                }
                let index = {
                    let mut got = script.received.lock().unwrap();
                    got.push(Received {
                        message: SinkMessage {
                            mail_from: from.clone(),
                            mail_options: Vec::new(),
                            rcpt_tos: rcpts.clone(),
                            data,
                        },
                        connection,
                        answered: false,
                    });
                    got.len() - 1
                };
                let wait = match (script.policy)(index) {
                    FinalReply::Now => Duration::ZERO,
                    FinalReply::After(d) => d,
                    FinalReply::Never => {
                        // Swallow whatever comes until the client gives up.
                        let mut sink = [0u8; 4096];
                        loop {
                            match r.read(&mut sink) {
                                Ok(0) => return,
                                Ok(_) => {}
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        ErrorKind::WouldBlock | ErrorKind::TimedOut
                                    ) =>
                                {
                                    if stop.load(Ordering::SeqCst) {
                                        return;
                                    }
                                }
                                Err(_) => return,
                            }
                        }
                    }
                };
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let sent = say(&mut out, "250 2.0.0 Ok: queued by the scripted server\r\n");
                if sent {
                    script.received.lock().unwrap()[index].answered = true;
                }
                sent
            }
            _ => say(&mut out, "502 5.5.2 Command not recognized\r\n"),
        };
        if !ok {
            return;
        }
    }
}
