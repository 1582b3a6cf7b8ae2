//! Delivery status notification requests (RFC 3461): the `RET`, `ENVID`, `NOTIFY` and
//! `ORCPT` parameters, from the client's `MAIL`/`RCPT` (smtp-proto parses and
//! xtext-decodes them) to the smarthost's (re-encoded here), and the rules for which
//! DSNs the relay itself owes when the smarthost does not offer DSN.
//!
//! Pure functions only: the session validates with them, `upstream.rs` writes the
//! parameters with them, `queue.rs` decides with them, `bounce.rs` writes the reports.

use domauth_store::{DsnNotify, DsnParams, DsnRet};
use smtp_proto::{
    MAIL_RET_FULL, MAIL_RET_HDRS, RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER,
    RCPT_NOTIFY_SUCCESS,
};

/// A refused parameter: its name and why (for `501 5.5.4`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub param: &'static str,
    pub why: &'static str,
}

/// RFC 3461 §4.4 / §4.2: ENVID and the ORCPT address are printable US-ASCII once
/// decoded. Control characters would end up in the header lines of a DSN (CR/LF: a
/// header injection), and 8-bit ones cannot be written as xtext again.
fn printable(value: &str) -> bool {
    !value.is_empty() && value.chars().all(|c| (' '..='~').contains(&c))
}

/// `RET` and `ENVID` of a `MAIL FROM` (the smtp-proto flags and decoded ENVID).
pub fn mail_params(flags: u64, env_id: Option<&str>) -> Result<DsnParams, Invalid> {
    let ret = match (flags & MAIL_RET_FULL != 0, flags & MAIL_RET_HDRS != 0) {
        (true, true) => {
            return Err(Invalid {
                param: "RET",
                why: "given twice",
            });
        }
        (true, false) => Some(DsnRet::Full),
        (false, true) => Some(DsnRet::Hdrs),
        (false, false) => None,
    };
    let envid = match env_id {
        Some(v) if !printable(v) => {
            return Err(Invalid {
                param: "ENVID",
                why: "must be printable US-ASCII",
            });
        }
        other => other.map(str::to_string),
    };
    Ok(DsnParams {
        ret,
        envid,
        recipients: Vec::new(),
    })
}

/// `NOTIFY` and `ORCPT` of a `RCPT TO` (`None` for each when not given).
pub fn rcpt_params(
    flags: u64,
    orcpt: Option<&str>,
) -> Result<(Option<DsnNotify>, Option<String>), Invalid> {
    let notify = if flags & RCPT_NOTIFY_NEVER != 0 {
        // smtp-proto refuses NEVER with anything else already; this keeps the rule
        // true whatever the parser lets through (RFC 3461 §4.1).
        if flags & (RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY) != 0 {
            return Err(Invalid {
                param: "NOTIFY",
                why: "NEVER cannot be combined with other keywords",
            });
        }
        Some(DsnNotify::default())
    } else if flags & (RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY) != 0 {
        Some(DsnNotify {
            success: flags & RCPT_NOTIFY_SUCCESS != 0,
            failure: flags & RCPT_NOTIFY_FAILURE != 0,
            delay: flags & RCPT_NOTIFY_DELAY != 0,
        })
    } else {
        None
    };
    let orcpt = match orcpt {
        Some(v) if !printable(v) => {
            return Err(Invalid {
                param: "ORCPT",
                why: "the address must be printable US-ASCII",
            });
        }
        other => other.map(str::to_string),
    };
    Ok((notify, orcpt))
}

/// xtext (RFC 3461 §4): `+XX` for `+`, `=`, and anything outside `!`..`~`.
pub fn xtext_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// The DSN parameters of the upstream `MAIL FROM`, each with a leading space.
pub fn upstream_mail_params(dsn: &DsnParams) -> String {
    let mut out = String::new();
    match dsn.ret {
        Some(DsnRet::Full) => out.push_str(" RET=FULL"),
        Some(DsnRet::Hdrs) => out.push_str(" RET=HDRS"),
        None => {}
    }
    if let Some(envid) = &dsn.envid {
        out.push_str(" ENVID=");
        out.push_str(&xtext_encode(envid));
    }
    out
}

/// The DSN parameters of the upstream `RCPT TO:<address>`, each with a leading space.
pub fn upstream_rcpt_params(dsn: &DsnParams, address: &str) -> String {
    let mut out = String::new();
    let Some(r) = dsn.recipient(address) else {
        return out;
    };
    if let Some(notify) = r.notify {
        out.push_str(&format!(" NOTIFY={notify}"));
    }
    if let Some(orcpt) = &r.orcpt {
        out.push_str(" ORCPT=rfc822;");
        out.push_str(&xtext_encode(orcpt));
    }
    out
}

/// Whether the sender wants a failure DSN for this recipient: yes unless NOTIFY was
/// given without FAILURE (NEVER, or SUCCESS/DELAY alone; RFC 3461 §4.1).
pub fn wants_failure(notify: Option<DsnNotify>) -> bool {
    notify.is_none_or(|n| n.failure)
}

/// Whether the sender asked to hear of success (NOTIFY=SUCCESS): the relay owes a
/// "relayed" DSN when the smarthost that took the message does not offer DSN.
pub fn wants_success(notify: Option<DsnNotify>) -> bool {
    notify.is_some_and(|n| n.success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtp_proto::Request;

    fn parse(line: &str) -> Request<String> {
        Request::parse(&mut format!("{line}\r\n").as_bytes().iter())
            .map(|r| r.into_owned())
            .unwrap_or_else(|e| panic!("{line}: {e:?}"))
    }

    #[test]
    fn xtext_encoding() {
        for (plain, wire) in [
            ("QQ314159", "QQ314159"),
            ("a+b=c", "a+2Bb+3Dc"),
            ("hi there", "hi+20there"),
            ("<id@host>", "<id@host>"),
            ("~!", "~!"),
        ] {
            assert_eq!(xtext_encode(plain), wire, "{plain}");
        }
    }

    #[test]
    fn xtext_round_trips_through_the_parser() {
        for value in ["a+b=c d", "Bob@Example.COM", "+++", "x=y", "~ok!"] {
            let line = format!("MAIL FROM:<a@b.test> ENVID={}", xtext_encode(value));
            let Request::Mail { from } = parse(&line) else {
                panic!("{line}")
            };
            assert_eq!(from.env_id.as_deref(), Some(value), "{line}");
            let line = format!("RCPT TO:<a@b.test> ORCPT=rfc822;{}", xtext_encode(value));
            let Request::Rcpt { to } = parse(&line) else {
                panic!("{line}")
            };
            assert_eq!(to.orcpt.as_deref(), Some(value), "{line}");
        }
    }

    #[test]
    fn mail_parameters() {
        let ok = |line: &str| {
            let Request::Mail { from } = parse(line) else {
                panic!("{line}")
            };
            mail_params(from.flags, from.env_id.as_deref())
        };
        let p = ok("MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2B1").unwrap();
        assert_eq!(p.ret, Some(DsnRet::Hdrs));
        assert_eq!(p.envid.as_deref(), Some("QQ+1"));
        assert_eq!(upstream_mail_params(&p), " RET=HDRS ENVID=QQ+2B1");
        let p = ok("MAIL FROM:<a@b.test> ret=full").unwrap();
        assert_eq!((p.ret, p.envid), (Some(DsnRet::Full), None));
        let p = ok("MAIL FROM:<a@b.test>").unwrap();
        assert!(p.is_empty());
        assert_eq!(upstream_mail_params(&p), "");
        for (line, param) in [
            ("MAIL FROM:<a@b.test> RET=HDRS RET=FULL", "RET"),
            (
                "MAIL FROM:<a@b.test> ENVID=a+0D+0AX-Injected:+20yes",
                "ENVID",
            ),
            ("MAIL FROM:<a@b.test> ENVID=caf+E9", "ENVID"),
            ("MAIL FROM:<a@b.test> ENVID=+00", "ENVID"),
        ] {
            assert_eq!(ok(line).map_err(|e| e.param), Err(param), "{line}");
        }
    }

    #[test]
    fn rcpt_parameters() {
        let ok = |line: &str| {
            let Request::Rcpt { to } = parse(line) else {
                panic!("{line}")
            };
            rcpt_params(to.flags, to.orcpt.as_deref())
        };
        let n = |s: &str| Some(DsnNotify::try_from(s.to_string()).unwrap());
        for (line, notify, orcpt) in [
            ("RCPT TO:<x@y.test>", None, None),
            ("RCPT TO:<x@y.test> NOTIFY=NEVER", n("NEVER"), None),
            (
                "RCPT TO:<x@y.test> NOTIFY=SUCCESS,FAILURE",
                n("SUCCESS,FAILURE"),
                None,
            ),
            (
                "RCPT TO:<x@y.test> NOTIFY=delay ORCPT=rfc822;Bob+2Bx@Example.COM",
                n("DELAY"),
                Some("Bob+x@Example.COM".to_string()),
            ),
        ] {
            assert_eq!(ok(line), Ok((notify, orcpt)), "{line}");
        }
        assert_eq!(
            ok("RCPT TO:<x@y.test> ORCPT=rfc822;a+0Ab@c").map_err(|e| e.param),
            Err("ORCPT")
        );
        // smtp-proto lets NEVER before another keyword through; refused here.
        assert_eq!(
            ok("RCPT TO:<x@y.test> NOTIFY=NEVER,SUCCESS").map_err(|e| e.param),
            Err("NOTIFY")
        );
        // What the parser itself refuses (reply 501 5.5.4 through the session).
        for line in [
            "RCPT TO:<x@y.test> NOTIFY=FAILURE,NEVER",
            "RCPT TO:<x@y.test> NOTIFY=SOMETIMES",
            "RCPT TO:<x@y.test> ORCPT=utf-8;x@y",
            "RCPT TO:<x@y.test> ORCPT=rfc822;",
        ] {
            assert!(
                Request::parse(&mut format!("{line}\r\n").as_bytes().iter()).is_err(),
                "{line}"
            );
        }
    }

    #[test]
    fn upstream_recipient_parameters() {
        let mut dsn = DsnParams::default();
        dsn.recipients.push(domauth_store::RecipientDsn {
            address: "x@y.test".into(),
            notify: Some(DsnNotify {
                success: true,
                failure: true,
                delay: false,
            }),
            orcpt: Some("a b+c@d".into()),
        });
        assert_eq!(
            upstream_rcpt_params(&dsn, "X@y.test"),
            " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+20b+2Bc@d"
        );
        assert_eq!(upstream_rcpt_params(&dsn, "other@y.test"), "");
    }

    #[test]
    fn which_dsn_is_owed() {
        let n = |s: &str| Some(DsnNotify::try_from(s.to_string()).unwrap());
        for (notify, failure, success) in [
            (None, true, false),
            (n("NEVER"), false, false),
            (n("SUCCESS"), false, true),
            (n("SUCCESS,FAILURE"), true, true),
            (n("FAILURE,DELAY"), true, false),
            (n("DELAY"), false, false),
        ] {
            assert_eq!(wants_failure(notify), failure, "{notify:?}");
            assert_eq!(wants_success(notify), success, "{notify:?}");
        }
    }
}
