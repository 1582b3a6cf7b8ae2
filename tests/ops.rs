//! End to end, the operations side (SPEC §10): `--version` and
//! `check-config`; the systemd notify protocol spoken to a datagram socket
//! the test owns (READY only once the ports accept, WATCHDOG, STATUS,
//! STOPPING at SIGTERM); `systemd-analyze verify` on the shipped unit;
//! SIGHUP reloading the TLS pair without dropping open sessions, and
//! refusing a broken one; `[log] format = "json"`.

mod common;

use std::{
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{BIN, Relay, RelayConfig, Sink, free_port, raw::RawClient};

const WAIT: Duration = Duration::from_secs(60);
const USER: &str = "info@acme.test";
const PASS: &str = "secret";

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// The port of a `["127.0.0.1:N"]` listener value.
fn listener_port(config: &RelayConfig, key: &str) -> u16 {
    config
        .get("server", key)
        .and_then(|v| v.trim_matches(['[', ']', '"']).rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("listener port")
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().expect("utf-8 path"))
}

/// A self-signed pair for `localhost` written to `dir/NAME.crt` and
/// `dir/NAME.key`; returns the certificate's DER.
fn write_pair(dir: &Path, name: &str) -> Vec<u8> {
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    std::fs::write(dir.join(format!("{name}.crt")), pair.cert.pem()).expect("write cert");
    std::fs::write(
        dir.join(format!("{name}.key")),
        pair.signing_key.serialize_pem(),
    )
    .expect("write key");
    pair.cert.der().to_vec()
}

/// Installs `dir/NAME.{crt,key}` as the live pair `dir/live.{crt,key}`
/// (each by rename, as a renewal tool would).
fn install_pair(dir: &Path, name: &str) {
    for ext in ["crt", "key"] {
        let tmp = dir.join(format!("live.{ext}.new"));
        std::fs::copy(dir.join(format!("{name}.{ext}")), &tmp).expect("copy");
        std::fs::rename(&tmp, dir.join(format!("live.{ext}"))).expect("rename");
    }
}

fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn expect(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected {prefix:?}, got {reply:?}"
    );
}

/// Waits until the relay's log holds `n` lines containing `what`.
fn wait_log(relay: &Relay, what: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    while relay.log().lines().filter(|l| l.contains(what)).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn domauth(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run domauth")
}

// ---------------------------------------------------------------- CLI

#[test]
fn version_prints_the_package_version() {
    let out = domauth(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("domauth {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_validates_without_starting_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let a = write_pair(d, "a");
    assert!(!a.is_empty());
    write_pair(d, "b");
    let config = |cert: &str, key: &str, extra: &str| {
        let data = d.join("data");
        let path = d.join("config.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\ndata_dir = {}\nadmin_socket = {}\nsubmission = [\"127.0.0.1:{}\"]\n\
                 [tls]\ncert = {}\nkey = {}\nself_signed = false\n{extra}",
                toml_path(&data),
                toml_path(&data.join("admin.sock")),
                free_port(),
                toml_path(&d.join(cert)),
                toml_path(&d.join(key)),
            ),
        )
        .expect("write config");
        path
    };
    let run = |path: &Path| {
        let out = Command::new(BIN)
            .arg("check-config")
            .arg("--config")
            .arg(path)
            .output()
            .expect("run check-config");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let one_line = |stderr: &str, needle: &str| {
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
        assert!(stderr.contains(needle), "{needle:?} in {stderr:?}");
    };

    // A valid file and a matching pair.
    let (code, stdout, stderr) = run(&config("a.crt", "a.key", ""));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");

    // The certificate of one pair with the key of another.
    let (code, _, stderr) = run(&config("a.crt", "b.key", ""));
    assert_eq!(code, Some(1));
    one_line(&stderr, "does not match its key");

    // A missing key file.
    let (code, _, stderr) = run(&config("a.crt", "nope.key", ""));
    assert_eq!(code, Some(1));
    one_line(&stderr, "does not exist");

    // A key that is no PEM key.
    std::fs::write(d.join("junk.key"), "not a key\n").expect("write");
    let (code, _, stderr) = run(&config("a.crt", "junk.key", ""));
    assert_eq!(code, Some(1));
    one_line(&stderr, "tls.key");

    // A bad value names its key.
    let (code, _, stderr) = run(&config("a.crt", "a.key", "[log]\nformat = \"xml\"\n"));
    assert_eq!(code, Some(1));
    one_line(&stderr, "log.format");

    // A missing file.
    let (code, _, stderr) = run(&d.join("absent.toml"));
    assert_eq!(code, Some(1));
    one_line(&stderr, "cannot read config");

    // A development config whose pair `serve` would create: fine, and
    // check-config creates nothing.
    let dev = d.join("dev.toml");
    std::fs::write(
        &dev,
        format!(
            "[server]\ndata_dir = {}\n[tls]\ncert = {}\nkey = {}\nself_signed = true\n",
            toml_path(&d.join("data")),
            toml_path(&d.join("gen/x.crt")),
            toml_path(&d.join("gen/x.key")),
        ),
    )
    .expect("write");
    let (code, stdout, stderr) = run(&dev);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(!d.join("gen").exists(), "check-config created the pair");
    assert!(
        !d.join("data").exists(),
        "check-config created the data dir"
    );
}

// ---------------------------------------------------------------- systemd

/// Every datagram received so far, waiting up to `timeout` for one that
/// contains `want`.
fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    while !seen.iter().any(|m| m.contains(want)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {want:?} from the relay; got {seen:?}");
        sock.set_read_timeout(Some(left)).expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

#[test]
fn notify_ready_only_once_serving_then_watchdog_status_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    let mut config = RelayConfig::new(free_port());
    config
        .env("NOTIFY_SOCKET", path.to_str().expect("utf-8"))
        // 400 ms: WATCHDOG=1 (and STATUS=) every 200 ms.
        .env("WATCHDOG_USEC", "400000");
    let ports = [
        listener_port(&config, "submission"),
        listener_port(&config, "submissions"),
    ];

    // The moment READY=1 arrives, both ports must already accept.
    let listener = sock.try_clone().expect("clone");
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        recv_until(&listener, "READY=1", WAIT, &mut seen);
        let open = ports.map(port_open);
        (seen, open)
    });
    let mut relay = Relay::start_with(config);
    let (mut seen, open) = watcher.join().expect("watcher");
    assert_eq!(open, [true, true], "READY=1 before the listeners accepted");
    let ready = seen.iter().find(|m| m.contains("READY=1")).expect("ready");
    assert!(ready.contains("STATUS="), "{ready:?}");

    // The watchdog pings; STATUS counts an open session.
    recv_until(&sock, "WATCHDOG=1", WAIT, &mut seen);
    let mut session = RawClient::connect(relay.submission, Path::new("unused"));
    expect(&session.read_reply().expect("greeting"), "220");
    recv_until(&sock, "STATUS=1 session, 0 queued", WAIT, &mut seen);
    session.cmd("QUIT");
    drop(session);

    // SIGTERM: STOPPING=1, and a clean exit.
    assert_eq!(relay.stop(), Some(0), "{}", relay.log());
    recv_until(&sock, "STOPPING=1", Duration::from_secs(5), &mut seen);
}

#[test]
fn systemd_analyze_verify_accepts_the_shipped_unit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit =
        std::fs::read_to_string(root.join("dist/domauth.service")).expect("dist/domauth.service");
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/domauth serve --config /etc/domauth/config.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=domauth",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "StateDirectory=domauth",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "dist/domauth.service lacks {line:?}"
        );
    }
    // verify insists that ExecStart's binary exists: the .deb puts it in
    // /usr/bin; here the unit points at the binary under test instead,
    // and nothing else changes.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("domauth.service");
    std::fs::write(&copy, unit.replace("/usr/bin/domauth", BIN)).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze: {e} (tests/run installs the systemd package)")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
    // It only warns about unknown keys or bad values: any line about the
    // unit fails the test.
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("domauth") || l.contains(copy.to_str().unwrap_or("/")))
        .collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify:\n{stderr}");
}

// ---------------------------------------------------------------- reload

/// A relay serving the pair `live.{crt,key}` in `dir` (pair "a" at start).
fn relay_with_own_pair(upstream: u16, dir: &Path) -> (Relay, Vec<u8>) {
    let a = write_pair(dir, "a");
    install_pair(dir, "a");
    let mut config = RelayConfig::new(upstream);
    config
        .set("tls", "cert", &toml_path(&dir.join("live.crt")))
        .set("tls", "key", &toml_path(&dir.join("live.key")))
        .set("tls", "self_signed", "false");
    let relay = Relay::start_with(config);
    relay.add_mailbox("acme", USER, PASS);
    (relay, a)
}

/// A new implicit-TLS session; returns it and the certificate it got.
fn new_session(relay: &Relay, trusted: &Path) -> (RawClient, Vec<u8>) {
    let mut c = RawClient::connect_tls(relay.submissions, trusted);
    expect(&c.read_reply().expect("greeting"), "220");
    let cert = c.peer_certificate().expect("a server certificate");
    (c, cert)
}

#[test]
fn sighup_serves_the_new_certificate_and_open_sessions_go_on() {
    let sink = Sink::start();
    let certs = tempfile::tempdir().expect("tempdir");
    let d = certs.path();
    let (relay, a) = relay_with_own_pair(sink.port, d);
    let b = write_pair(d, "b");

    // A session opened with pair "a", mid-transaction across the reload.
    let (mut open, got) = new_session(&relay, &d.join("a.crt"));
    assert_eq!(fingerprint(&got), fingerprint(&a));
    open.ehlo();
    expect(&open.auth_plain(USER, PASS), "235");
    expect(&open.cmd(&format!("MAIL FROM:<{USER}>")), "250");

    install_pair(d, "b");
    relay.signal("HUP");
    wait_log(&relay, "tls_reloaded", 1);

    // New sessions get "b"...
    let (mut fresh, got) = new_session(&relay, &d.join("b.crt"));
    assert_eq!(
        fingerprint(&got),
        fingerprint(&b),
        "new session, new certificate"
    );
    fresh.cmd("QUIT");
    // ...and the open one completes its message on "a".
    expect(&open.cmd("RCPT TO:<someone@example.org>"), "250");
    expect(&open.cmd("DATA"), "354");
    let reply = open.cmd(&format!(
        "From: {USER}\r\nTo: someone@example.org\r\nSubject: across a reload\r\n\r\nstill here\r\n."
    ));
    expect(&reply, "250");
    assert_eq!(
        fingerprint(&open.peer_certificate().expect("cert")),
        fingerprint(&a)
    );
    open.cmd("QUIT");
    let got = sink.wait_for(1, WAIT);
    assert!(got[0].text().contains("across a reload"));
    assert!(
        !relay.log().contains("tls_reload_failed"),
        "{}",
        relay.log()
    );
}

#[test]
fn sighup_with_a_broken_pair_keeps_the_old_one_and_logs_one_line() {
    let certs = tempfile::tempdir().expect("tempdir");
    let d = certs.path();
    let (relay, a) = relay_with_own_pair(free_port(), d);
    write_pair(d, "b");

    // 1. The key of another pair: keys_match() refuses it.
    std::fs::copy(d.join("b.key"), d.join("live.key")).expect("copy");
    relay.signal("HUP");
    wait_log(&relay, "tls_reload_failed", 1);
    // 2. A truncated certificate.
    install_pair(d, "a");
    std::fs::write(d.join("live.crt"), "-----BEGIN CERTIFICATE-----\nMIIB\n").expect("write");
    relay.signal("HUP");
    wait_log(&relay, "tls_reload_failed", 2);

    let failures: Vec<String> = relay
        .log()
        .lines()
        .filter(|l| l.contains("tls_reload_failed"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        failures.len(),
        2,
        "one line per refused reload: {failures:?}"
    );
    assert!(failures[0].contains("ERROR"), "{failures:?}");
    assert!(
        failures[0].contains("does not match its key"),
        "{failures:?}"
    );
    assert!(failures[1].contains("tls.cert"), "{failures:?}");
    assert!(!relay.log().contains("tls_reloaded"), "{}", relay.log());

    // Pair "a" is still served, and the relay still works.
    let (mut c, got) = new_session(&relay, &d.join("a.crt"));
    assert_eq!(fingerprint(&got), fingerprint(&a), "the old pair stays");
    c.ehlo();
    expect(&c.auth_plain(USER, PASS), "235");
    c.cmd("QUIT");
}

// ---------------------------------------------------------------- logs

#[test]
fn json_log_is_one_object_a_line() {
    let sink = Sink::start();
    let mut config = RelayConfig::new(sink.port);
    config.set("log", "format", "\"json\"");
    let mut relay = Relay::start_with(config);
    relay.add_mailbox("acme", USER, PASS);
    relay
        .swaks()
        .auth(USER, PASS)
        .from(USER)
        .to("someone@example.org")
        .run()
        .assert_code(0);
    // A refused login logs too.
    relay
        .swaks()
        .auth(USER, "wrong")
        .from(USER)
        .to("someone@example.org")
        .run()
        .assert_code(28);
    sink.wait_for(1, WAIT);
    relay.wait_queue_empty(WAIT);
    assert_eq!(relay.stop(), Some(0));

    let log = relay.log();
    let mut events = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nwhole log:\n{log}"));
        assert!(v.is_object(), "{line}");
        for key in ["timestamp", "level", "message"] {
            assert!(v.get(key).is_some(), "no {key:?} in {line}");
        }
        if let Some(e) = v.get("event").and_then(|e| e.as_str()) {
            events.push(e.to_string());
        }
    }
    for e in ["listening", "started", "shutdown", "stopped"] {
        assert!(events.iter().any(|x| x == e), "no {e:?} event in:\n{log}");
    }
    assert!(log.lines().count() >= 8, "too little logged:\n{log}");
}
