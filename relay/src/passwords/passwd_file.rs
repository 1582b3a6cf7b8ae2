//! A Dovecot passwd-file (`user:{SCHEME}hash:uid:gid:gecos:home:shell:extra`)
//! read directly: only the first two fields matter here. Comments (`#`) and
//! blank lines are skipped. Schemes: ARGON2ID, ARGON2I (argon2), BLF-CRYPT
//! (bcrypt), SHA512-CRYPT, SHA256-CRYPT (sha-crypt); `{CRYPT}` or no prefix
//! at all when the hash shows its kind (`$argon2id$`, `$2y$`, `$6$`, `$5$`).
//!
//! The file is re-read when it changes: every lookup compares its inode,
//! size and change times with the loaded version's (one `stat`). A version
//! that fails to parse keeps the last good one and is logged once. Lookups
//! and verification block (file I/O, hashing): callers run them on the
//! blocking pool.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use domauth_store::normalize_address;
use sha_crypt::ShaCrypt;

use crate::logsafe::Escaped;

/// How a stored hash is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    Argon2,
    BlfCrypt,
    Sha512Crypt,
    Sha256Crypt,
    /// A scheme we do not verify, or a hash that is malformed: the entry
    /// never logs in (and the load says so in the log).
    Unusable(String),
}

/// One user of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub scheme: Scheme,
    /// The hash without its `{SCHEME}` prefix.
    pub hash: String,
}

impl Entry {
    /// Constant-time where the hash crates are; call off the async runtime.
    pub fn verify(&self, password: &str) -> bool {
        match self.scheme {
            Scheme::Argon2 => PasswordHash::new(&self.hash).is_ok_and(|hash| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok()
            }),
            Scheme::BlfCrypt => bcrypt::verify(password, &self.hash).unwrap_or(false),
            Scheme::Sha512Crypt | Scheme::Sha256Crypt => {
                sha_crypt::PasswordVerifier::<str>::verify_password(
                    &ShaCrypt::default(),
                    password.as_bytes(),
                    self.hash.as_str(),
                )
                .is_ok()
            }
            Scheme::Unusable(_) => false,
        }
    }
}

/// The users of one version of the file, by normalised login.
#[derive(Debug, Default)]
pub struct Parsed {
    pub users: HashMap<String, Entry>,
    /// Line numbers and reasons of entries that can never log in.
    pub unusable: Vec<(usize, String)>,
}

/// Parses the whole file; an error names the line.
pub fn parse(text: &str) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (user, rest) = line
            .split_once(':')
            .ok_or_else(|| format!("line {n}: no ':' after the user name"))?;
        let user = user.trim();
        if user.is_empty() {
            return Err(format!("line {n}: empty user name"));
        }
        let password = rest.split(':').next().unwrap_or_default();
        let login = normalize_address(user).unwrap_or_else(|_| user.to_lowercase());
        let entry = parse_password(password);
        if let Scheme::Unusable(why) = &entry.scheme {
            parsed.unusable.push((n, why.clone()));
        }
        if parsed.users.insert(login.clone(), entry).is_some() {
            return Err(format!(
                "line {n}: user {} is listed twice",
                Escaped(&login)
            ));
        }
    }
    Ok(parsed)
}

/// `{SCHEME}hash`, or a bare hash whose prefix shows its kind.
fn parse_password(field: &str) -> Entry {
    let (scheme, hash) = match field
        .strip_prefix('{')
        .and_then(|rest| rest.split_once('}'))
    {
        Some((scheme, hash)) => (Some(scheme.to_ascii_uppercase()), hash),
        None => (None, field),
    };
    let detected = detect(hash);
    let scheme = match scheme.as_deref() {
        None | Some("CRYPT") => detected,
        Some("ARGON2ID" | "ARGON2I") if detected == Scheme::Argon2 => detected,
        Some("BLF-CRYPT") if detected == Scheme::BlfCrypt => detected,
        Some("SHA512-CRYPT") if detected == Scheme::Sha512Crypt => detected,
        Some("SHA256-CRYPT") if detected == Scheme::Sha256Crypt => detected,
        Some(s @ ("ARGON2ID" | "ARGON2I" | "BLF-CRYPT" | "SHA512-CRYPT" | "SHA256-CRYPT")) => {
            Scheme::Unusable(format!("a malformed {s} hash"))
        }
        Some(other) => Scheme::Unusable(format!("unsupported scheme {}", Escaped(other))),
    };
    Entry {
        scheme,
        hash: hash.to_string(),
    }
}

/// The kind a hash shows by its prefix, checked to be well-formed.
fn detect(hash: &str) -> Scheme {
    let well_formed = |ok: bool, scheme: Scheme| {
        if ok {
            scheme
        } else {
            Scheme::Unusable("a malformed hash".into())
        }
    };
    if hash.starts_with("$argon2id$") || hash.starts_with("$argon2i$") {
        well_formed(PasswordHash::new(hash).is_ok(), Scheme::Argon2)
    } else if ["$2y$", "$2b$", "$2a$", "$2x$"]
        .iter()
        .any(|p| hash.starts_with(p))
    {
        // `$2y$05$` + 22 characters of salt + 31 of hash.
        well_formed(hash.len() == 60, Scheme::BlfCrypt)
    } else if hash.starts_with("$6$") {
        well_formed(sha_crypt_ok(hash), Scheme::Sha512Crypt)
    } else if hash.starts_with("$5$") {
        well_formed(sha_crypt_ok(hash), Scheme::Sha256Crypt)
    } else if hash.is_empty() {
        Scheme::Unusable("no password".into())
    } else {
        Scheme::Unusable("a hash of unknown kind".into())
    }
}

fn sha_crypt_ok(hash: &str) -> bool {
    sha_crypt::PasswordHashRef::new(hash).is_ok()
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

struct Loaded {
    stamp: Stamp,
    users: Arc<HashMap<String, Entry>>,
    /// The version that last failed to load, so it is logged once.
    failed: Option<Stamp>,
}

/// The file and its last good version.
pub struct PasswdFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl PasswdFile {
    /// Reads the file; at start-up an unreadable or malformed file is an error.
    pub fn open(path: PathBuf) -> Result<PasswdFile, String> {
        let (stamp, parsed) = read(&path)?;
        log_loaded(&path, &parsed);
        Ok(PasswdFile {
            loaded: Mutex::new(Loaded {
                stamp,
                users: Arc::new(parsed.users),
                failed: None,
            }),
            path,
        })
    }

    /// The entry for a normalised login, from the current version of the
    /// file. Blocking: a changed file is read here.
    pub fn lookup(&self, login: &str) -> Option<Entry> {
        self.current().get(login).cloned()
    }

    fn current(&self) -> Arc<HashMap<String, Entry>> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = match Stamp::of(&self.path) {
            Ok(stamp) => stamp,
            Err(e) => {
                // A file being replaced by rename may be missing for an
                // instant; keep serving the last good version.
                if loaded.failed.is_none() {
                    tracing::error!(path = %self.path.display(), error = %e, "passwd-file unreadable; keeping the last good version");
                    loaded.failed = Some(loaded.stamp);
                }
                return loaded.users.clone();
            }
        };
        if stamp == loaded.stamp || Some(stamp) == loaded.failed {
            return loaded.users.clone();
        }
        match read(&self.path) {
            Ok((stamp, parsed)) => {
                log_loaded(&self.path, &parsed);
                loaded.stamp = stamp;
                loaded.users = Arc::new(parsed.users);
                loaded.failed = None;
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %Escaped(&e), "passwd-file not reloaded; keeping the last good version");
                loaded.failed = Some(stamp);
            }
        }
        loaded.users.clone()
    }
}

/// The stamp is taken before reading: a write during the read changes the
/// file's stamp again, so the next lookup reads it once more.
fn read(path: &Path) -> Result<(Stamp, Parsed), String> {
    let stamp = Stamp::of(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let parsed = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((stamp, parsed))
}

fn log_loaded(path: &Path, parsed: &Parsed) {
    tracing::info!(path = %path.display(), users = parsed.users.len(), "passwd-file loaded");
    if !parsed.unusable.is_empty() {
        let lines: Vec<String> = parsed
            .unusable
            .iter()
            .map(|(n, why)| format!("line {n}: {why}"))
            .collect();
        tracing::warn!(path = %path.display(), entries = %lines.join("; "), "passwd-file entries that can never log in");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `doveadm pw -p secret -s SCHEME` (Dovecot 2.3.19).
    const SHA512: &str = "{SHA512-CRYPT}$6$Jb2QX.vr/LPncezn$00jzKVM5oEt3wDtNePmO2MthYJSgFntMs0GZhfz7Q8cmcBjYCFSQtBD8sHVomUOSfLl7Nygs85WN4eYwPPilr.";
    const SHA256: &str =
        "{SHA256-CRYPT}$5$hSs914YtfBPbjgoz$zT6DjZ2upVdyU/KZHAbr7cLyFSPN45dc1S6pjVIBTq.";
    const BLF: &str = "{BLF-CRYPT}$2y$05$ey/Fqm4UwZXsgWGw610yQOuuVkGD.AnzJJE9GNPohbfrNiiGjm.1C";
    const ARGON2I: &str = "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$FTmomMRJO6vARAUZ08/HvA$n3hit6JHXxTZ3U1wSazwWtJxy2JR4HUtq1jbLhp0OUQ";

    #[test]
    fn every_scheme_verifies_doveadm_hashes() {
        let argon2id = format!(
            "{{ARGON2ID}}{}",
            crate::smtp::auth::hash_password("secret").unwrap()
        );
        for field in [SHA512, SHA256, BLF, ARGON2I, argon2id.as_str()] {
            let entry = parse_password(field);
            assert!(
                !matches!(entry.scheme, Scheme::Unusable(_)),
                "{field}: {:?}",
                entry.scheme
            );
            assert!(entry.verify("secret"), "{field}");
            assert!(!entry.verify("Secret"), "{field}");
            // Without the prefix the hash shows its kind.
            let bare = field.split_once('}').unwrap().1;
            assert_eq!(parse_password(bare).scheme, entry.scheme, "{bare}");
            assert!(parse_password(bare).verify("secret"), "{bare}");
        }
    }

    #[test]
    fn scheme_table() {
        let cases: &[(&str, Option<Scheme>)] = &[
            (
                "{sha512-crypt}$6$Jb2QX.vr/LPncezn$00jzKVM5oEt3wDtNePmO2MthYJSgFntMs0GZhfz7Q8cmcBjYCFSQtBD8sHVomUOSfLl7Nygs85WN4eYwPPilr.",
                Some(Scheme::Sha512Crypt),
            ),
            (
                "{CRYPT}$5$hSs914YtfBPbjgoz$zT6DjZ2upVdyU/KZHAbr7cLyFSPN45dc1S6pjVIBTq.",
                Some(Scheme::Sha256Crypt),
            ),
            ("{PLAIN}secret", None),
            ("{MD5-CRYPT}$1$abc$def", None),
            (
                "{SHA512-CRYPT}$5$hSs914YtfBPbjgoz$zT6DjZ2upVdyU/KZHAbr7cLyFSPN45dc1S6pjVIBTq.",
                None,
            ),
            ("{BLF-CRYPT}$2y$05$short", None),
            ("{ARGON2ID}$argon2id$garbage", None),
            ("secret", None),
            ("", None),
        ];
        for (field, expect) in cases {
            let got = parse_password(field).scheme;
            match expect {
                Some(s) => assert_eq!(&got, s, "{field}"),
                None => assert!(matches!(got, Scheme::Unusable(_)), "{field}: {got:?}"),
            }
            if expect.is_none() {
                assert!(!parse_password(field).verify("secret"), "{field}");
            }
        }
    }

    #[test]
    fn file_format() {
        let text = format!(
            "# users of acme\n\n   \nInfo@Acme.test:{SHA512}:1000:1000::/home/info::userdb_quota_rule=*:storage=1G\r\nsales@acme.test:{BLF}\nold@acme.test:{{MD5-CRYPT}}$1$x$y:::\n"
        );
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed.users.len(), 3);
        assert!(parsed.users["info@acme.test"].verify("secret"));
        assert!(parsed.users["sales@acme.test"].verify("secret"));
        assert_eq!(parsed.unusable.len(), 1);
        assert_eq!(parsed.unusable[0].0, 6);
        for (bad, line) in [
            ("a@b.test:x\nno colon here\n", "line 2"),
            (":{PLAIN}x\n", "line 1: empty user name"),
            ("a@b.test:x\n# c\nA@B.test:y\n", "line 3"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(line), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_changed_file_is_reread_and_a_broken_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, format!("a@b.test:{SHA256}\n")).unwrap();
        let file = PasswdFile::open(path.clone()).unwrap();
        assert!(file.lookup("a@b.test").unwrap().verify("secret"));
        assert!(file.lookup("c@b.test").is_none());
        std::fs::write(&path, format!("a@b.test:{SHA256}\nc@b.test:{BLF}\n")).unwrap();
        assert!(file.lookup("c@b.test").unwrap().verify("secret"));
        std::fs::write(&path, "broken line\n").unwrap();
        assert!(
            file.lookup("c@b.test").is_some(),
            "the last good version stays"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(file.lookup("a@b.test").is_some());
        std::fs::write(&path, format!("d@b.test:{SHA256}\n")).unwrap();
        assert!(file.lookup("d@b.test").is_some());
        assert!(file.lookup("a@b.test").is_none());
        assert!(PasswdFile::open(dir.path().join("missing")).is_err());
    }
}
