//! `domauth-bench dkim-cost`: what one DKIM signature costs, per algorithm, with the
//! relay's own signing code (`domauth::dkim::sign_one`) and a key pair made the way
//! `domain add` makes it. The body hash is made once per message whatever the
//! algorithms, so it is timed on its own.

use std::time::Instant;

use anyhow::{Result, anyhow};
use base64::Engine;
use domauth::dkim::{BodyHash, sign_one};
use mail_auth::common::crypto::{Algorithm, Ed25519Key, RsaKey, Sha256};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer};

const HEADERS: &[u8] = b"Received: from client.example (client.example [127.0.0.1])\r\n\
\tby localhost (domauth) with ESMTPSA id 6616835AFD00C4B541\r\n\
\tfor <sink@example.org>; Sun, 29 Nov 2026 12:00:00 +0000\r\n\
From: Sales <s1@g0.ext.test>\r\n\
To: <sink@example.org>\r\n\
Subject: a message of the standard load\r\n\
Date: Sun, 29 Nov 2026 12:00:00 +0000\r\n\
Message-ID: <bench-1@g0.ext.test>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n";

fn per_op(n: usize, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    let t0 = Instant::now();
    for _ in 0..n {
        op()?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3 / n as f64)
}

pub fn run(messages: usize, size: usize) -> Result<()> {
    let set = domauth::dkim_keys::generate(1).map_err(|e| anyhow!(e))?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s);
    let ed = Ed25519Key::from_pkcs8_der(&b64(&set.ed25519_private)?)
        .map_err(|e| anyhow!("Ed25519 key: {e}"))?;
    let rsa = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(b64(
        &set.rsa_private,
    )?)))
    .map_err(|e| anyhow!("RSA key: {e}"))?;
    let body = vec![b'x'; size]
        .chunks(76)
        .flat_map(|l| [l, b"\r\n"].concat())
        .collect::<Vec<u8>>();
    let hash = {
        let mut h = BodyHash::default();
        h.write(&body);
        h.finish()
    };
    let n = messages.max(1);
    let body_ms = per_op(n, || {
        let mut h = BodyHash::default();
        h.write(&body);
        std::hint::black_box(h.finish());
        Ok(())
    })?;
    let sign = |key: &dyn Fn() -> Result<()>| per_op(n, key);
    let ed_ms = sign(&|| {
        sign_one(
            &ed,
            Algorithm::Ed25519Sha256,
            "g0.ext.test",
            "domauth1e",
            HEADERS,
            &hash,
            0,
        )
        .map(std::hint::black_box)
        .map(|_| ())
        .map_err(|e| anyhow!(e))
    })?;
    let rsa_ms = sign(&|| {
        sign_one(
            &rsa,
            Algorithm::RsaSha256,
            "g0.ext.test",
            "domauth1r",
            HEADERS,
            &hash,
            0,
        )
        .map(std::hint::black_box)
        .map(|_| ())
        .map_err(|e| anyhow!(e))
    })?;
    println!("DKIM signing cost, {n} messages of {size} bytes (one core, this process):");
    println!("  body hash (relaxed, SHA-256, once a message)  {body_ms:8.3} ms");
    println!("  Ed25519-SHA256 signature                      {ed_ms:8.3} ms");
    println!("  RSA-SHA256 signature (2048 bits)              {rsa_ms:8.3} ms");
    println!(
        "  both, as domauth signs                        {:8.3} ms",
        body_ms + ed_ms + rsa_ms
    );
    Ok(())
}
