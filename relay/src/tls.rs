//! Server TLS: load the certificate and key (PEM), or create a self-signed
//! pair for development when `tls.self_signed = true` and the files are
//! missing; reload the pair on SIGHUP (SPEC §10). TLS 1.2 and 1.3 only
//! (RFC 8996 retired the older versions).
//!
//! One `ServerConfig` lives for the whole process: its certificate comes from
//! a [`CertStore`] resolver that a reload swaps atomically, so open sessions
//! keep the key they negotiated with, new handshakes get the new pair, and
//! the session cache and ticket keys survive a reload.

use std::{path::Path, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

pub fn acceptor(config: &TlsConfig, hostname: &str) -> Result<TlsAcceptor, String> {
    reloadable_acceptor(config, hostname).map(|(acceptor, _)| acceptor)
}

/// The acceptor, and the handle that reloads its certificate.
pub fn reloadable_acceptor(
    config: &TlsConfig,
    hostname: &str,
) -> Result<(TlsAcceptor, Arc<CertStore>), String> {
    let missing = !config.cert.exists() || !config.key.exists();
    if missing {
        if !config.self_signed {
            return Err(format!(
                "tls.cert / tls.key: {} or {} does not exist (set tls.self_signed = true to create a development pair)",
                config.cert.display(),
                config.key.display()
            ));
        }
        generate_self_signed(&config.cert, &config.key, hostname)?;
        tracing::warn!(
            cert = %config.cert.display(),
            "created a self-signed certificate: for development only"
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let store = Arc::new(CertStore {
        current: ArcSwap::from_pointee(load_pair(config, &provider)?),
        config: config.clone(),
        provider: provider.clone(),
    });
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    // Resumption: clients reconnecting (Roundcube opens a session per
    // message) skip the full handshake. Stateful cache plus tickets.
    server.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    server.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| format!("tls: {e}"))?;
    Ok((TlsAcceptor::from(Arc::new(server)), store))
}

/// The certificate every new handshake gets; [`CertStore::reload`] replaces
/// it from the configured files.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    config: TlsConfig,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert", &self.config.cert)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl CertStore {
    /// Re-reads `tls.cert` and `tls.key`. A pair that does not load or
    /// whose key does not match the certificate changes nothing: the error
    /// is returned and the old pair stays in service.
    pub fn reload(&self) -> Result<(), String> {
        let pair = load_pair(&self.config, &self.provider)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }
}

/// `domauth check-config`: the pair loads and matches, without creating
/// anything. Missing files are fine only when `serve` would create them.
pub fn check(config: &TlsConfig) -> Result<(), String> {
    if config.self_signed && (!config.cert.exists() || !config.key.exists()) {
        return Ok(());
    }
    let provider = rustls::crypto::ring::default_provider();
    load_pair(config, &provider).map(|_| ())
}

/// The certificate chain and its key, checked to belong together
/// (`keys_match`): a renewed certificate installed before its key would
/// otherwise fail every handshake.
fn load_pair(config: &TlsConfig, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    if !config.cert.exists() || !config.key.exists() {
        return Err(format!(
            "tls.cert / tls.key: {} or {} does not exist",
            config.cert.display(),
            config.key.display()
        ));
    }
    let certs = load_certs(&config.cert)?;
    let key = load_key(&config.key)?;
    let key = provider.key_provider.load_private_key(key).map_err(|e| {
        format!(
            "tls.key: {} is not a usable private key: {e}",
            config.key.display()
        )
    })?;
    let pair = CertifiedKey::new(certs, key);
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(e) => Err(format!(
            "tls.cert / tls.key: {} does not match its key or is unusable: {e}",
            config.cert.display()
        )),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("tls.cert: cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut text.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert: {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let text =
        std::fs::read(path).map_err(|e| format!("tls.key: cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut text.as_slice())
        .map_err(|e| format!("tls.key: {} is not valid PEM: {e}", path.display()))?
        .ok_or_else(|| format!("tls.key: {} holds no PEM private key", path.display()))
}

fn generate_self_signed(cert_path: &Path, key_path: &Path, hostname: &str) -> Result<(), String> {
    let mut names = vec![hostname.to_string()];
    if hostname != "localhost" {
        names.push("localhost".to_string());
    }
    let certified = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("tls: cannot create a self-signed certificate: {e}"))?;
    for path in [cert_path, key_path] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("tls: cannot create {}: {e}", dir.display()))?;
        }
    }
    write_private(key_path, certified.signing_key.serialize_pem().as_bytes())
        .map_err(|e| format!("tls.key: cannot write {}: {e}", key_path.display()))?;
    std::fs::write(cert_path, certified.cert.pem())
        .map_err(|e| format!("tls.cert: cannot write {}: {e}", cert_path.display()))?;
    Ok(())
}

/// Private keys are created readable by the owner only.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, self_signed: bool) -> TlsConfig {
        TlsConfig {
            cert: dir.join("c/x.crt"),
            key: dir.join("c/x.key"),
            self_signed,
        }
    }

    #[test]
    fn creates_then_reuses_a_development_pair() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), true);
        acceptor(&c, "localhost").expect("generated");
        let first = std::fs::read(&c.cert).unwrap();
        acceptor(&c, "localhost").expect("reloaded");
        assert_eq!(first, std::fs::read(&c.cert).unwrap(), "not regenerated");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&c.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn missing_or_corrupt_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), false);
        let e = acceptor(&c, "localhost").err().unwrap();
        assert!(
            e.contains("tls.cert") && e.contains("does not exist"),
            "{e}"
        );

        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        std::fs::write(&c.cert, "garbage").unwrap();
        std::fs::write(&c.key, "garbage").unwrap();
        let e = acceptor(&c, "localhost").err().unwrap();
        assert!(
            e.contains("tls.cert") && e.contains("no PEM certificate"),
            "{e}"
        );
    }

    fn served(store: &CertStore) -> Vec<u8> {
        store.current.load().end_entity_cert().unwrap().to_vec()
    }

    #[test]
    fn reload_swaps_a_good_pair_and_keeps_the_old_one_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), true);
        let (_, store) = reloadable_acceptor(&c, "localhost").expect("first pair");
        let first = served(&store);

        // Another pair: certificate and key replaced, then reloaded.
        std::fs::remove_file(&c.cert).unwrap();
        std::fs::remove_file(&c.key).unwrap();
        generate_self_signed(&c.cert, &c.key, "localhost").unwrap();
        store.reload().expect("second pair");
        let second = served(&store);
        assert_ne!(first, second);

        // A certificate without its key: refused, the second pair stays.
        generate_self_signed(&c.cert, &dir.path().join("other.key"), "localhost").unwrap();
        let e = store.reload().expect_err("mismatched pair");
        assert!(e.contains("does not match its key"), "{e}");
        assert_eq!(served(&store), second);

        // Garbage: refused too.
        std::fs::write(&c.key, "garbage").unwrap();
        let e = store.reload().expect_err("no key");
        assert!(e.contains("tls.key"), "{e}");
        assert_eq!(served(&store), second);
    }

    #[test]
    fn check_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        check(&config(dir.path(), true)).expect("serve would create the pair");
        assert!(!dir.path().join("c").exists());
        let e = check(&config(dir.path(), false)).expect_err("missing");
        assert!(e.contains("does not exist"), "{e}");
    }
}
