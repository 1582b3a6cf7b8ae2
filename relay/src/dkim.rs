//! DKIM signing of authorized domains' mail (SPEC §9), the last step of cleanup before
//! the queue, so a retry re-sends the very bytes that were signed.
//!
//! A message streams to its queue file and is never whole in memory, so signing is in
//! two halves: [`BodyHash`] canonicalizes (relaxed, RFC 6376 §3.4.4) and hashes the body
//! as it arrives; at the end of DATA [`Signer::sign`] signs the header block with that
//! hash and returns the `DKIM-Signature:` fields, which the spool puts in front of the
//! message ([`domauth_store::MessageWriter::prepend`]). mail-auth does the
//! canonicalization and the signature encoding; only the split between body and headers
//! is ours (its streaming signer borrows its key, which a message that lives across
//! `await`s cannot hold).
//!
//! Who is signed: a message whose (first) From address is in an authorized domain that
//! the sending mailbox's hosting has verified, and whose DKIM records are verified. It
//! gets two signatures, Ed25519 (RFC 8463) and RSA-SHA256, for receivers that know only
//! the latter.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use domauth_store::{DkimKeySet, DomainStatus, Store, domain_of, normalize_address};
use mail_auth::{
    common::{
        crypto::{Algorithm, Ed25519Key, HashContext, HashImpl, RsaKey, Sha256, SigningKey},
        headers::{Writable, Writer},
    },
    dkim::{Canonicalization, Signature, canonicalize::BodyHasher},
};
use mail_parser::{HeaderName, HeaderValue, MessageParser};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer};

/// The fields signed (SPEC §9), From twice: the second, absent instance is signed as
/// empty, so nobody can add a From of their own (RFC 6376 §8.15). Absent fields of the
/// list are signed the same way.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "From",
];

type HashCtx = <Sha256 as HashImpl>::Context;

/// The relaxed body hash (SHA-256) of a message, fed as the body streams in. Both
/// signatures use SHA-256 and relaxed body canonicalization, so one hash serves both.
pub struct BodyHash(BodyHasher<HashCtx>);

impl Default for BodyHash {
    fn default() -> Self {
        BodyHash(BodyHasher::new(
            Sha256::hasher(),
            Canonicalization::Relaxed,
            0,
        ))
    }
}

impl BodyHash {
    pub fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    pub fn finish(self) -> Vec<u8> {
        let (hasher, _len) = self.0.finish();
        hasher.complete().as_ref().to_vec()
    }
}

/// A key set's private keys, parsed once.
struct LoadedKeys {
    /// Which stored set these are (a domain deleted and added again starts over at
    /// generation 1 with other keys).
    rsa_public: String,
    ed25519_selector: String,
    rsa_selector: String,
    ed25519: Ed25519Key,
    rsa: RsaKey<Sha256>,
}

fn b64(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("stored key is not base64: {e}"))
}

impl LoadedKeys {
    fn load(set: &DkimKeySet) -> Result<LoadedKeys, String> {
        let ed25519 = Ed25519Key::from_pkcs8_der(&b64(&set.ed25519_private)?)
            .map_err(|e| format!("Ed25519 key of {}: {e}", set.ed25519_selector))?;
        let rsa = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(
            b64(&set.rsa_private)?,
        )))
        .map_err(|e| format!("RSA key of {}: {e}", set.rsa_selector))?;
        Ok(LoadedKeys {
            rsa_public: set.rsa_public.clone(),
            ed25519_selector: set.ed25519_selector.clone(),
            rsa_selector: set.rsa_selector.clone(),
            ed25519,
            rsa,
        })
    }
}

/// The canonical header fields and the signature being made: what is signed (RFC 6376
/// §3.7), the signature last with an empty `b=`.
struct Signable<'a> {
    headers: mail_auth::dkim::canonicalize::CanonicalHeaders<'a>,
    signature: &'a Signature,
}

impl Writable for Signable<'_> {
    fn write(self, writer: &mut impl Writer) {
        self.headers.write(writer);
        self.signature.write(writer, false);
    }
}

/// One signature over `header_section` (the header fields, each with its CRLF, without
/// the empty line) with a body hash already made. As mail-auth's own signer: fields in
/// the list are signed bottom-up, list entries with no field left are signed as absent.
pub fn sign_one(
    key: &impl SigningKey,
    algorithm: Algorithm,
    domain: &str,
    selector: &str,
    header_section: &[u8],
    body_hash: &[u8],
    now: u64,
) -> Result<Signature, String> {
    let mut headers = Vec::new();
    let mut found = vec![false; SIGNED_HEADERS.len()];
    let mut signed = Vec::new();
    for (name, value) in header_fields(header_section) {
        if let Some(pos) = SIGNED_HEADERS
            .iter()
            .position(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        {
            headers.push((name, value));
            found[pos] = true;
            signed.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    signed.reverse();
    for (h, found) in SIGNED_HEADERS.iter().zip(found) {
        if !found {
            signed.push(h.to_string());
        }
    }
    let mut signature = Signature {
        v: 1,
        a: algorithm,
        d: domain.to_string(),
        s: selector.to_string(),
        bh: body_hash.to_vec(),
        h: signed,
        t: now,
        ch: Canonicalization::Relaxed,
        cb: Canonicalization::Relaxed,
        ..Default::default()
    };
    signature.b = key
        .sign(Signable {
            headers: Canonicalization::Relaxed.canonical_headers(headers),
            signature: &signature,
        })
        .map_err(|e| format!("signing failed: {e}"))?;
    Ok(signature)
}

/// The fields of a header section as (name, value), the value from after the colon
/// through its CRLF, continuation lines included (as mail-auth's verifier splits them).
fn header_fields(section: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < section.len() {
        let start = pos;
        loop {
            match memchr::memchr(b'\n', &section[pos..]) {
                Some(i) => {
                    pos += i + 1;
                    if !matches!(section.get(pos), Some(b' ' | b'\t')) {
                        break;
                    }
                }
                None => {
                    pos = section.len();
                    break;
                }
            }
        }
        let field = &section[start..pos];
        if let Some(colon) = memchr::memchr(b':', field) {
            fields.push((&field[..colon], &field[colon + 1..]));
        }
    }
    fields
}

/// Decides whether a message is signed and signs it. Keys are parsed once per key set
/// and kept until a rotation replaces them.
pub struct Signer {
    store: Store,
    cache: Mutex<HashMap<(String, String), Arc<LoadedKeys>>>,
}

/// What [`Signer::sign`] made: the fields to put in front of the message.
pub struct Signed {
    pub domain: String,
    pub selectors: String,
    pub fields: Vec<u8>,
}

impl Signer {
    pub fn new(store: Store) -> Arc<Signer> {
        Arc::new(Signer {
            store,
            cache: Mutex::default(),
        })
    }

    /// Whether a message from `login` with this header block would be signed now: decided
    /// when the header block is complete, so the body of a message that will not be
    /// signed (most of them) is not hashed. [`Signer::sign`] decides again at the end.
    pub fn wants(&self, login: &str, headers: &[u8]) -> bool {
        matches!(self.signing_set(login, headers), Ok(Some(_)))
    }

    /// The From domain, the hosting and the key set that signs, if any.
    fn signing_set(
        &self,
        login: &str,
        headers: &[u8],
    ) -> Result<Option<(String, String, DkimKeySet)>, String> {
        let Some(from_domain) = from_domain(headers) else {
            return Ok(None);
        };
        let err = |e: domauth_store::StoreError| e.to_string();
        let Some(hosting) = self
            .store
            .hosting_of_domain(domain_of(login))
            .map_err(err)?
        else {
            return Ok(None);
        };
        let verified = self
            .store
            .domain(&hosting, &from_domain)
            .map_err(err)?
            .is_some_and(|d| d.status == DomainStatus::Verified);
        if !verified {
            return Ok(None);
        }
        let Some(dkim) = self.store.dkim(&hosting, &from_domain).map_err(err)? else {
            return Ok(None);
        };
        Ok(dkim
            .signing()
            .cloned()
            .map(|set| (from_domain, hosting, set)))
    }

    /// `headers`: the message's header block as it will be queued (the relay's trace
    /// fields, then the client's, ending with the empty line); `body_hash` from
    /// [`BodyHash`]. `Ok(None)`: not a message to sign. Blocking (store reads, RSA).
    pub fn sign(
        &self,
        login: &str,
        headers: &[u8],
        body_hash: &[u8],
    ) -> Result<Option<Signed>, String> {
        let Some((from_domain, hosting, set)) = self.signing_set(login, headers)? else {
            return Ok(None);
        };
        let keys = self.keys(&hosting, &from_domain, &set)?;
        let section = headers.strip_suffix(b"\r\n").unwrap_or(headers);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ed = sign_one(
            &keys.ed25519,
            Algorithm::Ed25519Sha256,
            &from_domain,
            &keys.ed25519_selector,
            section,
            body_hash,
            now,
        )?;
        let rsa = sign_one(
            &keys.rsa,
            Algorithm::RsaSha256,
            &from_domain,
            &keys.rsa_selector,
            section,
            body_hash,
            now,
        )?;
        use mail_auth::common::headers::HeaderWriter;
        // The RSA signature goes on top: verifiers that stop at the first signature
        // they understand mostly know RSA.
        let fields = format!("{}{}", rsa.to_header(), ed.to_header()).into_bytes();
        Ok(Some(Signed {
            selectors: format!("{},{}", keys.ed25519_selector, keys.rsa_selector),
            domain: from_domain,
            fields,
        }))
    }

    fn keys(
        &self,
        hosting: &str,
        domain: &str,
        set: &DkimKeySet,
    ) -> Result<Arc<LoadedKeys>, String> {
        let key = (hosting.to_string(), domain.to_string());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(&key).filter(|k| k.rsa_public == set.rsa_public) {
            return Ok(k.clone());
        }
        let loaded = Arc::new(LoadedKeys::load(set)?);
        cache.insert(key, loaded.clone());
        Ok(loaded)
    }
}

/// The domain of the first From address (the one DMARC aligns with), normalized.
pub fn from_domain(headers: &[u8]) -> Option<String> {
    let parsed = MessageParser::new().parse_headers(headers)?;
    let value = parsed.header_values(HeaderName::From).next()?;
    let HeaderValue::Address(list) = value else {
        return None;
    };
    let address = list.iter().next()?.address.as_deref()?;
    let address = normalize_address(address).ok()?;
    Some(domain_of(&address).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::dkim::DkimSigner;

    const MESSAGE: &str = "Received: from x\r\n\tby y; Mon, 1 Jan 2024 00:00:00 +0000\r\nFrom: Sales <sales@partner.example>\r\nTo: a@b.example\r\nSubject:  Hello   world \r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nBody  line \r\n\r\n\r\nlast\r\n\r\n";

    fn split(m: &str) -> (&[u8], &[u8]) {
        let at = m.find("\r\n\r\n").unwrap() + 4;
        (&m.as_bytes()[..at], &m.as_bytes()[at..])
    }

    #[test]
    fn streamed_body_hash_and_signature_equal_mail_auths_own() {
        let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
        let (headers, body) = split(MESSAGE);
        // Fed in awkward pieces, as the network delivers it.
        let mut hash = BodyHash::default();
        for piece in body.chunks(3) {
            hash.write(piece);
        }
        let bh = hash.finish();
        let theirs = DkimSigner::from_key(Ed25519Key::from_pkcs8_der(&pkcs8).unwrap())
            .domain("partner.example")
            .selector("domauth1e")
            .headers(SIGNED_HEADERS.iter().copied())
            .sign(MESSAGE.as_bytes())
            .unwrap();
        let key = Ed25519Key::from_pkcs8_der(&pkcs8).unwrap();
        let ours = sign_one(
            &key,
            Algorithm::Ed25519Sha256,
            "partner.example",
            "domauth1e",
            headers.strip_suffix(b"\r\n").unwrap(),
            &bh,
            theirs.t,
        )
        .unwrap();
        assert_eq!(ours.bh, theirs.bh);
        assert_eq!(ours.h, theirs.h);
        assert_eq!(ours.b, theirs.b);
        assert_eq!(ours.h.iter().filter(|h| *h == "From").count(), 2);
    }

    #[test]
    fn from_domain_is_the_first_from_address() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "From: A <a@Partner.Example>\r\n\r\n",
                Some("partner.example"),
            ),
            ("From: a@x.example, b@y.example\r\n\r\n", Some("x.example")),
            ("Subject: none\r\n\r\n", None),
            ("From: undisclosed\r\n\r\n", None),
        ];
        for (h, want) in cases {
            assert_eq!(from_domain(h.as_bytes()).as_deref(), *want, "{h:?}");
        }
    }
}
