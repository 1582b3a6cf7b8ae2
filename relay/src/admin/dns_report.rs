//! The DNS report of a domain (SPEC §9: which authoritative server answered what, SPF and
//! DMARC advice) in the admin API's JSON and in `domain show`'s text.

use domauth_store::AuthorizedDomain;
use serde_json::{Value, json};

/// Adds `zone`, `servers`, `spf` and `dmarc` to a domain's JSON object.
pub fn add_json(v: &mut Value, d: &AuthorizedDomain) {
    let r = &d.dns_report;
    v["zone"] = json!(r.zone);
    v["servers"] = json!(r.servers);
    v["spf"] = json!(r.spf);
    v["dmarc"] = json!(r.dmarc);
}

/// Text lines for `domain show`, from the domain's JSON (nothing before the first check).
pub fn text_lines(d: &Value) -> Vec<String> {
    let mut lines = server_lines(d);
    lines.extend(advice_lines(d));
    lines
}

/// The zone and which authoritative server answered what (also shown by `domain verify`).
pub fn server_lines(d: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(zone) = d["zone"].as_str() {
        lines.push(format!(
            "Zone:         {} (its authoritative servers are asked directly)",
            clean(zone)
        ));
    }
    let servers = d["servers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for (i, s) in servers.iter().enumerate() {
        let head = if i == 0 { "Answers:" } else { "" };
        lines.push(format!(
            "{head:<14}{}: {} ({})",
            clean(str_of(s, "server")),
            clean(str_of(s, "outcome")),
            clean(str_of(s, "detail"))
        ));
    }
    lines
}

fn advice_lines(d: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(spf) = d.get("spf").filter(|v| v.is_object()) {
        let status = str_of(spf, "status").replace('_', " ");
        let mut line = format!("SPF:          {status}");
        for found in spf["found"].as_array().into_iter().flatten() {
            line.push_str(&format!(
                "; found \"{}\"",
                clean(found.as_str().unwrap_or(""))
            ));
        }
        lines.push(line);
        if let Some(advice) = spf["advice"].as_str() {
            lines.push(format!("              {}", clean(advice)));
        }
    }
    if let Some(dmarc) = d.get("dmarc").filter(|v| v.is_object()) {
        let mut line = format!(
            "DMARC:        {}",
            str_of(dmarc, "policy").replace('_', " ")
        );
        if let Some(found) = dmarc["found"].as_str() {
            line.push_str(&format!("; found \"{}\"", clean(found)));
        }
        lines.push(line);
        if let Some(advice) = dmarc["advice"].as_str() {
            lines.push(format!("              {}", clean(advice)));
        }
    }
    lines
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

/// TXT values and server answers are anyone's text: no control character reaches the
/// terminal.
fn clean(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<char>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_of_a_report() {
        let d = json!({
            "zone": "partner.example",
            "servers": [
                {"server": "ns1.partner.example (192.0.2.1)", "outcome": "verified", "detail": "the record matches"},
                {"server": "ns2.partner.example (192.0.2.2)", "outcome": "dns error", "detail": "timed out\u{1b}[2J"},
            ],
            "spf": {"status": "not_covering", "found": ["v=spf1 mx -all"], "advice": "replace it", "record": "x"},
            "dmarc": {"policy": "reject", "found": "v=DMARC1; p=reject", "advice": "fine"},
        });
        let lines = text_lines(&d);
        assert_eq!(
            lines[0],
            "Zone:         partner.example (its authoritative servers are asked directly)"
        );
        assert_eq!(
            lines[1],
            "Answers:      ns1.partner.example (192.0.2.1): verified (the record matches)"
        );
        assert!(lines[2].starts_with("              ns2.partner.example (192.0.2.2): dns error"));
        assert!(!lines[2].contains('\u{1b}'), "{:?}", lines[2]);
        assert_eq!(
            lines[3],
            "SPF:          not covering; found \"v=spf1 mx -all\""
        );
        assert_eq!(lines[4], "              replace it");
        assert_eq!(
            lines[5],
            "DMARC:        reject; found \"v=DMARC1; p=reject\""
        );
        assert!(
            text_lines(&json!({"zone": null, "servers": [], "spf": null, "dmarc": null}))
                .is_empty()
        );
    }
}
