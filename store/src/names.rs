//! Normalization of the names the store is keyed by: domains, addresses, hosting names.
//!
//! Everything stored is in normalized form, so lookups normalize their argument first and
//! compare bytes.

use crate::{Result, StoreError};

/// RFC 1035 §2.3.4: 255 octets on the wire, i.e. 253 characters in dotted text form.
const MAX_DOMAIN: usize = 253;
/// RFC 1035 §2.3.4.
const MAX_LABEL: usize = 63;
/// RFC 5321 §4.5.3.1.1.
const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 §4.5.3.1.3 limits a path to 256 octets including the angle brackets.
const MAX_ADDRESS: usize = 254;

/// Normalizes a domain for storage and lookup: trims it, strips one trailing dot, lower
/// cases it and converts an internationalized name to its ASCII (punycode) form, then
/// checks it is a plausible public host name. Address literals are refused: a hosting
/// proves control of a domain through DNS, which an IP address does not have.
pub fn normalize_domain(input: &str) -> Result<String> {
    domain(input).map_err(|why| StoreError::Invalid(format!("invalid domain {input:?}: {why}")))
}

/// The domain rules, returning the bare reason so that addresses can word it their way.
fn domain(input: &str) -> std::result::Result<String, String> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err("empty".into());
    }
    let name = trimmed.strip_suffix('.').unwrap_or(trimmed);
    if name.starts_with('[') || name.parse::<std::net::IpAddr>().is_ok() {
        return Err("IP addresses are not accepted, only domain names".into());
    }
    // Checked before IDNA so that the message is about the input, not the mapped form.
    if name.split('.').any(str::is_empty) {
        return Err("empty label".into());
    }
    // UTS #46 as in the WHATWG URL standard: maps case and compatibility forms, and
    // refuses malformed punycode ("xn--" labels that do not decode).
    let ascii = idna::domain_to_ascii(&name.to_lowercase())
        .map_err(|_| "not a valid internationalized domain name".to_string())?;
    if ascii.len() > MAX_DOMAIN {
        return Err(format!("longer than {MAX_DOMAIN} characters"));
    }
    let labels: Vec<&str> = ascii.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err("empty label".into());
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "label {label:?} is longer than {MAX_LABEL} characters"
            ));
        }
        // RFC 952 / RFC 1123 §2.1 host name syntax ("LDH" labels).
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!("label {label:?} contains {c:?}"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    if labels.len() < 2 {
        return Err("a single label is not a public domain name".into());
    }
    // RFC 3696 §2: a top-level domain is never all-numeric (and 1.2.3.4-like names would
    // be read as addresses).
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the top-level domain is all digits".into());
    }
    Ok(ascii)
}

/// Normalizes a mailbox address: trims it, strips one pair of angle brackets, lower cases
/// the local part and normalizes the domain (split at the last `@`).
///
/// Quoted local parts (`"john doe"@example.com`) are refused: legal (RFC 5321 §4.1.2) but
/// never a mailbox name here, and a source of ambiguity between the envelope and headers.
/// Outside quotes the RFC 5322 specials cannot appear in a local part either. Unusual dot
/// placement (`a..b@`, `.a@`) is accepted, as Postfix does, because such addresses exist.
/// The local part is lower-cased although RFC 5321 lets servers treat it as case
/// sensitive: the product compares addresses case-insensitively (SPEC §1).
pub fn normalize_address(input: &str) -> Result<String> {
    let invalid = |why: String| StoreError::Invalid(format!("invalid address {input:?}: {why}"));
    let trimmed = input.trim();
    let bare = trimmed
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(trimmed);
    if bare.is_empty() {
        return Err(invalid("empty".into()));
    }
    let Some((local, domain_part)) = bare.rsplit_once('@') else {
        return Err(invalid("no '@'".into()));
    };
    if local.is_empty() {
        return Err(invalid("empty local part".into()));
    }
    if local.starts_with('"') {
        return Err(invalid("quoted local parts are not accepted".into()));
    }
    if local.len() > MAX_LOCAL_PART {
        return Err(invalid(format!(
            "local part longer than {MAX_LOCAL_PART} bytes"
        )));
    }
    if let Some(c) = local
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "\"()<>[]:;@\\,".contains(*c))
    {
        return Err(invalid(format!("local part contains {c:?}")));
    }
    if domain_part.chars().any(char::is_whitespace) {
        return Err(invalid("domain contains whitespace".into()));
    }
    let domain = domain(domain_part).map_err(|why| invalid(format!("domain: {why}")))?;
    let address = format!("{}@{domain}", local.to_lowercase());
    if address.len() > MAX_ADDRESS {
        return Err(invalid(format!("longer than {MAX_ADDRESS} bytes")));
    }
    Ok(address)
}

/// The domain of a normalized address (after its last `@`); empty if there is none.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, domain)| domain)
}

/// Normalizes a hosting name: trimmed, lower case, 1 to 63 of `[a-z0-9._-]`. The limit
/// keeps names usable as a DNS label or a directory name by the provider's tooling.
pub fn normalize_hosting_name(input: &str) -> Result<String> {
    let name = input.trim().to_lowercase();
    let invalid = |why: &str| StoreError::Invalid(format!("invalid hosting name {input:?}: {why}"));
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > 63 {
        return Err(invalid("longer than 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(invalid(
            "only letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Ok(normalized)` or `Err(a fragment of the message)`.
    type Case<'a> = (&'a str, std::result::Result<&'a str, &'a str>);

    fn check(f: fn(&str) -> Result<String>, cases: &[Case<'_>]) {
        for (input, want) in cases {
            match (f(input), want) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "input {input:?}"),
                (Err(StoreError::Invalid(msg)), Err(fragment)) => {
                    assert!(msg.contains(fragment), "input {input:?}: message {msg:?}");
                    assert!(
                        msg.contains(&format!("{input:?}")),
                        "{msg:?} names the input"
                    );
                }
                (got, want) => panic!("input {input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn domains() {
        let long_label = format!("{}.example", "a".repeat(64));
        let max_label = format!("{}.example", "a".repeat(63));
        let long_name = format!("{}example", "abcdefghi.".repeat(25)); // 257 characters
        check(
            normalize_domain,
            &[
                ("acme.example", Ok("acme.example")),
                ("ACME.Example", Ok("acme.example")),
                ("  acme.example \t", Ok("acme.example")),
                ("acme.example.", Ok("acme.example")),
                ("acme.example..", Err("empty label")),
                ("bücher.example", Ok("xn--bcher-kva.example")),
                ("BÜCHER.example", Ok("xn--bcher-kva.example")),
                ("xn--bcher-kva.example", Ok("xn--bcher-kva.example")),
                ("mail-1.a-b.example", Ok("mail-1.a-b.example")),
                ("3com.example", Ok("3com.example")),
                ("a..b", Err("empty label")),
                (".acme.example", Err("empty label")),
                ("", Err("empty")),
                ("   ", Err("empty")),
                (".", Err("empty label")),
                ("-a.example", Err("starts or ends with '-'")),
                ("a-.example", Err("starts or ends with '-'")),
                ("localhost", Err("single label")),
                ("localhost.", Err("single label")),
                ("1.2.3.4", Err("IP addresses")),
                ("[1.2.3.4]", Err("IP addresses")),
                ("[IPv6:::1]", Err("IP addresses")),
                ("::1", Err("IP addresses")),
                ("a.123", Err("all digits")),
                ("1.2.3.4.", Err("IP addresses")),
                (&max_label, Ok(&max_label)),
                (&long_label, Err("longer than 63")),
                (&long_name, Err("longer than 253")),
                ("under_score.example", Err("contains '_'")),
                ("sp ace.example", Err("contains ' '")),
                ("a@b.example", Err("contains '@'")),
                ("xn--zz.example", Err("internationalized")),
            ],
        );
    }

    #[test]
    fn addresses() {
        let long_local = format!("{}@x.example", "a".repeat(65));
        let max_local = format!("{}@x.example", "a".repeat(64));
        let long_address = format!("{}@{}example", "a".repeat(64), "abcdefghi.".repeat(19));
        check(
            normalize_address,
            &[
                ("info@acme.example", Ok("info@acme.example")),
                ("Info@ACME.Example.", Ok("info@acme.example")),
                (" <Sales@Partner.Example> ", Ok("sales@partner.example")),
                ("first.last+tag@x.example", Ok("first.last+tag@x.example")),
                ("info@bücher.example", Ok("info@xn--bcher-kva.example")),
                ("Jörg@x.example", Ok("jörg@x.example")),
                (&max_local, Ok(&max_local)),
                ("info.acme.example", Err("no '@'")),
                ("<>", Err("empty")),
                ("", Err("empty")),
                ("@x.example", Err("empty local part")),
                ("\"quoted\"@x.example", Err("quoted")),
                ("\"a@b\"@x.example", Err("quoted")),
                ("a@b@x.example", Err("contains '@'")),
                ("in fo@x.example", Err("contains ' '")),
                ("info @x.example", Err("contains ' '")),
                ("info@ x.example", Err("whitespace")),
                ("info@x .example", Err("whitespace")),
                ("a<b@x.example", Err("contains '<'")),
                ("<<a@x.example>>", Err("contains '<'")),
                ("a\u{7}b@x.example", Err("contains '\\u{7}'")),
                (&long_local, Err("local part longer than 64")),
                (&long_address, Err("longer than 254")),
                ("info@", Err("domain: empty")),
                ("info@localhost", Err("domain: a single label")),
                ("info@[127.0.0.1]", Err("IP addresses")),
                ("info@a..b", Err("empty label")),
            ],
        );
    }

    #[test]
    fn domain_of_takes_the_part_after_the_last_at() {
        assert_eq!(domain_of("info@acme.example"), "acme.example");
        assert_eq!(domain_of("a@b@c.example"), "c.example");
        assert_eq!(domain_of("no-at"), "");
    }

    #[test]
    fn hosting_names() {
        let long = "a".repeat(64);
        check(
            normalize_hosting_name,
            &[
                ("acme", Ok("acme")),
                (" ACME ", Ok("acme")),
                ("a.b_c-1", Ok("a.b_c-1")),
                ("", Err("empty")),
                (&long, Err("longer than 63")),
                ("a b", Err("only letters")),
                ("a\0b", Err("only letters")),
                ("bücher", Err("only letters")),
            ],
        );
    }
}
