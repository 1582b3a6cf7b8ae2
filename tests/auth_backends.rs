//! Where passwords come from (SPEC §10, `[auth] backend`), end to end: a
//! real private Dovecot (Debian's dovecot-core, started here with its own
//! config in a temp dir) answering over its auth client socket, and a
//! Dovecot passwd-file read by the relay itself. Logins go through the real
//! relay with swaks; the hashes come from `doveadm pw`.

mod common;

use std::{
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Relay, RelayConfig, Sink, Swaks, SwaksResult, free_port};

const WAIT: Duration = Duration::from_secs(30);

/// The tools come from dovecot-core (tests/run installs it); without them
/// the test fails, never skips.
fn require_dovecot() {
    for tool in ["/usr/sbin/dovecot", "/usr/bin/doveadm"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install Debian's dovecot-core (tests/run does)"
        );
    }
}

/// `doveadm pw -s SCHEME -p PASSWORD`: `{SCHEME}hash`.
fn doveadm_pw(scheme: &str, password: &str) -> String {
    require_dovecot();
    let out = Command::new("/usr/bin/doveadm")
        .args(["pw", "-s", scheme, "-p", password])
        .output()
        .expect("run doveadm pw");
    assert!(
        out.status.success(),
        "doveadm pw -s {scheme}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A passwd-file line for a login and a hash.
fn passwd_line(login: &str, hash: &str) -> String {
    format!("{login}:{hash}::::::\n")
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private Dovecot with a passwd-file passdb and only an auth service.
struct Dovecot {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Dovecot {
    /// `extra`: more dovecot.conf lines (e.g. `auth_failure_delay = 15s`).
    fn start(users: &str, extra: &str) -> Dovecot {
        require_dovecot();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for sub in ["run", "state"] {
            std::fs::create_dir_all(d.join(sub)).expect("dovecot dirs");
        }
        std::fs::write(d.join("users"), users).expect("users file");
        // Run as root (the test's user) with every path in the temp dir,
        // so it never touches a system Dovecot.
        let conf = format!(
            "protocols =\n\
             base_dir = {d}/run\n\
             state_dir = {d}/state\n\
             instance_name = domauth-test\n\
             log_path = {d}/dovecot.log\n\
             default_internal_user = root\n\
             default_internal_group = root\n\
             default_login_user = root\n\
             ssl = no\n\
             auth_mechanisms = plain login\n\
             auth_verbose = yes\n\
             {extra}\n\
             passdb {{\n  driver = passwd-file\n  args = {d}/users\n}}\n\
             userdb {{\n  driver = static\n  args = uid=root gid=root home={d}/home/%u\n}}\n\
             service auth {{\n  unix_listener {d}/auth-client {{\n    mode = 0666\n  }}\n}}\n",
            d = d.display()
        );
        std::fs::write(d.join("dovecot.conf"), conf).expect("dovecot.conf");
        let mut dovecot = Dovecot { dir, child: None };
        dovecot.launch();
        dovecot
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("auth-client")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    fn launch(&mut self) {
        let d = self.dir.path().to_path_buf();
        // A pid file left behind would make Dovecot refuse to start.
        let _ = std::fs::remove_file(d.join("run/master.pid"));
        let _ = std::fs::remove_file(self.socket());
        let out = std::fs::File::create(d.join("dovecot.out")).expect("dovecot.out");
        let mut child = Command::new("/usr/sbin/dovecot")
            .arg("-F")
            .arg("-c")
            .arg(d.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("out"))
            .stderr(out)
            .spawn()
            .expect("start dovecot");
        let socket = self.socket();
        let log = d.join("dovecot.log");
        wait_until("Dovecot's auth socket", WAIT, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "dovecot exited at start ({status}): {}{}",
                    std::fs::read_to_string(d.join("dovecot.out")).unwrap_or_default(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        self.child = Some(child);
    }

    /// SIGTERM and wait: Dovecot is gone, its socket with it.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            common::send_signal(&child, "TERM");
            let deadline = Instant::now() + WAIT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

fn relay_config(upstream: u16, auth: &[(&str, &str)]) -> RelayConfig {
    let mut config = RelayConfig::new(upstream);
    // Many deliberate failures from loopback: the relay's own limiter is
    // tested elsewhere.
    config.set("limits", "auth_failures", "1000");
    for (key, value) in auth {
        config.set("auth", key, value);
    }
    config
}

fn add_hosting(relay: &Relay, name: &str, domain: &str) {
    relay.cli_ok(&["hosting", "add", name, "--domain", domain], "");
}

/// AUTH PLAIN only (swaks stops after AUTH): exit 0 when accepted, 28 not.
fn login(relay: &Relay, user: &str, password: &str) -> SwaksResult {
    relay
        .swaks()
        .auth(user, password)
        .arg("--quit-after")
        .arg("AUTH")
        .run()
}

fn login_from(swaks: Swaks, user: &str, password: &str) -> Swaks {
    swaks.auth(user, password).arg("--quit-after").arg("AUTH")
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

#[test]
fn dovecot_backend_logs_in_with_a_password_only_dovecot_knows() {
    let users = passwd_line("info@acme.test", &doveadm_pw("SHA512-CRYPT", "dove-secret"))
        + &passwd_line(
            "lost@nohost.test",
            &doveadm_pw("SHA512-CRYPT", "dove-secret"),
        );
    let dovecot = Dovecot::start(&users, "auth_failure_delay = 1s");
    let sink = Sink::start();
    let relay = Relay::start_with(relay_config(
        sink.port,
        &[
            ("backend", "\"dovecot\""),
            ("socket", &toml_path(&dovecot.socket())),
        ],
    ));
    add_hosting(&relay, "acme", "acme.test");

    // No mailbox in the relay's store: the password is Dovecot's.
    let sent = relay
        .swaks()
        .auth("info@acme.test", "dove-secret")
        .from("info@acme.test")
        .to("someone@example.org")
        .run();
    sent.assert_code(0)
        .assert_contains("235 2.7.0 Authentication successful")
        .assert_contains("250 2.0.0 Ok: queued as ");
    // The own-address rule is unchanged whichever backend answered.
    relay
        .swaks()
        .auth("info@acme.test", "dove-secret")
        .from("other@acme.test")
        .to("someone@example.org")
        .run()
        .assert_code(23)
        .assert_contains("553 5.7.1 <other@acme.test>: Sender address rejected: not owned by user info@acme.test");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].mail_from, "info@acme.test");

    // AUTH LOGIN: the relay holds both strings and asks Dovecot with PLAIN.
    relay
        .swaks()
        .starttls()
        .arg("--auth")
        .arg("LOGIN")
        .arg("--auth-user")
        .arg("info@acme.test")
        .arg("--auth-password")
        .arg("dove-secret")
        .arg("--quit-after")
        .arg("AUTH")
        .run()
        .assert_code(0)
        .assert_contains("235 2.7.0");

    login(&relay, "info@acme.test", "wrong")
        .assert_code(28)
        .assert_contains("535 5.7.8 Authentication credentials invalid");
    login(&relay, "nobody@acme.test", "dove-secret")
        .assert_code(28)
        .assert_contains("535 5.7.8");
    // Dovecot accepts it, but no hosting owns nohost.test: refused like a
    // wrong password.
    login(&relay, "lost@nohost.test", "dove-secret")
        .assert_code(28)
        .assert_contains("535 5.7.8");
    assert!(
        dovecot
            .log()
            .contains("passwd-file(info@acme.test,127.0.0.1): Password mismatch"),
        "Dovecot checked the wrong password, with the client's IP:\n{}",
        dovecot.log()
    );
    // `explain` finds the hosting by the login's domain too.
    let own = relay.cli(
        &[
            "explain",
            "--login",
            "info@acme.test",
            "--sender",
            "info@acme.test",
        ],
        "",
    );
    assert_eq!(own.status.code(), Some(0), "{own:?}");
    let lost = relay.cli(
        &[
            "explain",
            "--login",
            "lost@nohost.test",
            "--sender",
            "lost@nohost.test",
        ],
        "",
    );
    assert_eq!(lost.status.code(), Some(1), "{lost:?}");
    assert!(
        String::from_utf8_lossy(&lost.stdout).contains("belongs to no hosting"),
        "{lost:?}"
    );
    assert!(
        !relay.log().contains("dove-secret"),
        "no password in the log:\n{}",
        relay.log()
    );
}

#[test]
fn dovecot_down_answers_454_and_the_relay_reconnects_when_it_is_back() {
    let users = passwd_line("info@acme.test", &doveadm_pw("SHA256-CRYPT", "dove-secret"));
    let mut dovecot = Dovecot::start(&users, "");
    let relay = Relay::start_with(relay_config(
        free_port(),
        &[
            ("backend", "\"dovecot\""),
            ("socket", &toml_path(&dovecot.socket())),
        ],
    ));
    add_hosting(&relay, "acme", "acme.test");
    login(&relay, "info@acme.test", "dove-secret").assert_code(0);

    dovecot.stop();
    for _ in 0..2 {
        login(&relay, "info@acme.test", "dove-secret")
            .assert_code(28)
            .assert_contains(
                "454 4.7.0 Temporary authentication failure: password service unavailable",
            );
    }
    assert!(
        relay.log().contains("auth_backend_unavailable"),
        "{}",
        relay.log()
    );
    // The relay still serves; the pool reconnects once Dovecot is back.
    dovecot.launch();
    login(&relay, "info@acme.test", "dove-secret")
        .assert_code(0)
        .assert_contains("235 2.7.0");
    login(&relay, "info@acme.test", "wrong").assert_code(28);
}

#[test]
fn a_silent_dovecot_times_out_with_454() {
    // Something listens on the socket but never speaks.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("auth-client");
    let listener = UnixListener::bind(&socket).expect("bind");
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        while let Ok((conn, _)) = listener.accept() {
            conns.push(conn);
            if conns.len() >= 8 {
                break;
            }
        }
        conns
    });
    let relay = Relay::start_with(relay_config(
        free_port(),
        &[
            ("backend", "\"dovecot\""),
            ("socket", &toml_path(&socket)),
            ("timeout", "\"2s\""),
        ],
    ));
    add_hosting(&relay, "acme", "acme.test");
    login(&relay, "info@acme.test", "x")
        .assert_code(28)
        .assert_contains("454 4.7.0");
    assert!(
        relay.log().contains("no answer from Dovecot"),
        "{}",
        relay.log()
    );
    drop(held);
}

#[test]
fn a_good_login_is_not_stuck_behind_a_delayed_failure() {
    let users = passwd_line("info@acme.test", &doveadm_pw("SHA512-CRYPT", "dove-secret"));
    // Dovecot holds every failure for 20 s before answering (swaks gives up at 30 s).
    let dovecot = Dovecot::start(&users, "auth_failure_delay = 20s");
    let relay = Relay::start_with(relay_config(
        free_port(),
        &[
            ("backend", "\"dovecot\""),
            ("socket", &toml_path(&dovecot.socket())),
            ("timeout", "\"60s\""),
        ],
    ));
    add_hosting(&relay, "acme", "acme.test");
    // Warm the pool so every request goes over connections already open.
    login(&relay, "info@acme.test", "dove-secret").assert_code(0);

    // Wrong passwords from another client address (Dovecot's penalty is per
    // client IP, and so is the relay's limiter).
    let bad: Vec<_> = (0..3)
        .map(|_| {
            let swaks = login_from(
                relay.swaks().arg("--local-interface").arg("127.0.0.2"),
                "info@acme.test",
                "wrong",
            );
            std::thread::spawn(move || swaks.run())
        })
        .collect();
    // Dovecot has checked them (it logs the mismatch at once, then delays
    // the answer).
    wait_until("Dovecot to see the wrong passwords", WAIT, || {
        dovecot.log().matches("Password mismatch").count() >= 3
    });
    login(&relay, "info@acme.test", "dove-secret")
        .assert_code(0)
        .assert_contains("235 2.7.0");
    assert!(
        bad.iter().all(|t| !t.is_finished()),
        "the good login finished while the failures were still delayed"
    );
    for t in bad {
        t.join()
            .expect("swaks thread")
            .assert_code(28)
            .assert_contains("535 5.7.8");
    }
}

#[test]
fn passwd_file_backend_every_scheme_and_changes_while_running() {
    let schemes = [
        "SHA512-CRYPT",
        "SHA256-CRYPT",
        "BLF-CRYPT",
        "ARGON2I",
        "ARGON2ID",
    ];
    let mut users = String::from("# acme's mailboxes\n\n");
    for scheme in schemes {
        let login = format!("{}@acme.test", scheme.to_lowercase());
        users += &passwd_line(&login, &doveadm_pw(scheme, "file-secret"));
    }
    // A bare hash: its `$6$` says what it is.
    let bare = doveadm_pw("SHA512-CRYPT", "file-secret");
    let bare = bare.split_once('}').expect("{SCHEME}").1.to_string();
    users += &passwd_line("bare@acme.test", &bare);
    users += &passwd_line(
        "lost@nohost.test",
        &doveadm_pw("SHA512-CRYPT", "file-secret"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users");
    std::fs::write(&path, &users).expect("users");

    let relay = Relay::start_with(relay_config(
        free_port(),
        &[("backend", "\"passwd-file\""), ("path", &toml_path(&path))],
    ));
    add_hosting(&relay, "acme", "acme.test");

    for scheme in schemes {
        let login_name = format!("{}@acme.test", scheme.to_lowercase());
        login(&relay, &login_name, "file-secret")
            .assert_code(0)
            .assert_contains("235 2.7.0");
        login(&relay, &login_name, "wrong")
            .assert_code(28)
            .assert_contains("535 5.7.8");
    }
    login(&relay, "bare@acme.test", "file-secret").assert_code(0);
    login(&relay, "BARE@Acme.Test", "file-secret").assert_code(0);
    login(&relay, "nobody@acme.test", "file-secret")
        .assert_code(28)
        .assert_contains("535 5.7.8");
    login(&relay, "lost@nohost.test", "file-secret")
        .assert_code(28)
        .assert_contains("535 5.7.8");
    // The own-address rule with a passwd-file login.
    relay
        .swaks()
        .auth("bare@acme.test", "file-secret")
        .from("other@acme.test")
        .to("someone@example.org")
        .run()
        .assert_code(23)
        .assert_contains("553 5.7.1");

    let explain = |login: &str| relay.cli(&["explain", "--login", login, "--sender", login], "");
    assert_eq!(explain("bare@acme.test").status.code(), Some(0));
    let unknown = explain("nobody@acme.test");
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown.stdout).contains("not in the passwd-file"),
        "{unknown:?}"
    );

    // Changed while running: a new mailbox, a new password for another.
    let changed = users.replace(
        &format!("bare@acme.test:{bare}"),
        &format!("bare@acme.test:{}", doveadm_pw("BLF-CRYPT", "new-secret")),
    ) + &passwd_line("new@acme.test", &doveadm_pw("SHA256-CRYPT", "file-secret"));
    std::fs::write(&path, &changed).expect("rewrite users");
    login(&relay, "new@acme.test", "file-secret").assert_code(0);
    // The success cache of the old password goes with the old hash.
    login(&relay, "bare@acme.test", "file-secret").assert_code(28);
    login(&relay, "bare@acme.test", "new-secret").assert_code(0);

    // A broken file keeps the last good version and says so once.
    std::fs::write(&path, format!("{changed}this line has no colon\n")).expect("break users");
    login(&relay, "new@acme.test", "file-secret").assert_code(0);
    login(&relay, "new@acme.test", "file-secret").assert_code(0);
    let log = relay.log();
    assert_eq!(
        log.matches("passwd-file not reloaded").count(),
        1,
        "one line for the broken version:\n{log}"
    );
    assert!(log.contains("no ':' after the user name"), "{log}");
    assert!(
        !log.contains("file-secret"),
        "no password in the log:\n{log}"
    );
}

#[test]
fn passwd_file_backend_refuses_to_start_without_a_readable_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = relay_config(
        free_port(),
        &[
            ("backend", "\"passwd-file\""),
            ("path", &toml_path(&dir.path().join("missing"))),
        ],
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config.render()).expect("config");
    let out = Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&config_path)
        .current_dir(dir.path())
        .output()
        .expect("run domauth");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth.path: cannot read"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
