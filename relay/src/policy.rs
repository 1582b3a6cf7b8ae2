//! Sender authorization (SPEC §3): the one place that decides whether a
//! logged-in mailbox may use an address, for the envelope and the headers
//! alike, and says why in words for the log and for `domauth explain`.

use domauth_store::{
    AuthorizedAccount, DomainStatus, Store, domain_of, normalize_address, wildcard_address,
};

use crate::logsafe::Escaped;

/// An authenticated mailbox and the hosting it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub address: String,
    pub hosting: String,
}

/// The decision and its reason. The reason goes to the log and to support
/// staff, never into the SMTP reply (which must not leak account data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

impl Decision {
    fn allow(reason: String) -> Decision {
        Decision {
            allowed: true,
            reason,
        }
    }
    fn refuse(reason: String) -> Decision {
        Decision {
            allowed: false,
            reason,
        }
    }
}

/// Seam for the session's unit tests; production uses [`StorePolicy`].
pub trait SenderPolicy: Send + Sync {
    /// `address` is already normalised (lower-case, ASCII domain).
    fn decide(&self, login: &Login, address: &str) -> Decision;
}

pub struct StorePolicy {
    pub store: Store,
}

impl SenderPolicy for StorePolicy {
    fn decide(&self, login: &Login, address: &str) -> Decision {
        decide(&self.store, login, address)
    }
}

/// `A` is owned by `L` when `A == L`, or `A` is an authorized account of a
/// verified domain of `L`'s hosting (SPEC §9: or the domain's whole-domain
/// grant `*@domain` is), and that account is not restricted to other
/// mailboxes. The grant for the exact address wins over the whole-domain one,
/// so a restricted `ceo@` stays restricted beside `*@`. Every lookup is a
/// point read (account by hosting+address, then hosting+`*@domain` when there
/// is none; domain by hosting+domain): nothing scans.
pub fn decide(store: &Store, login: &Login, address: &str) -> Decision {
    if address == login.address {
        return Decision::allow(format!("{address} is the login's own mailbox"));
    }
    let hosting = &login.hosting;
    let domain = domain_of(address);
    let lookup = store
        .account(hosting, address)
        .and_then(|exact| match exact {
            Some(a) => Ok(Some(a)),
            None => store.account(hosting, &wildcard_address(domain)),
        })
        .and_then(|account| Ok((account, store.domain(hosting, domain)?)));
    let (account, authorized) = match lookup {
        Ok(found) => found,
        Err(e) => {
            // Fail closed: a store error never authorises a sender.
            // The store's error may quote the address, the client's text.
            tracing::error!(error = %Escaped(&e.to_string()), "store error during sender check");
            return Decision::refuse(format!("store error while checking {address}: {e}"));
        }
    };
    match (account, authorized) {
        (Some(a), Some(d)) => match d.status {
            DomainStatus::Verified if !a.allows_mailbox(&login.address) => {
                Decision::refuse(format!(
                    "{} {}, so not for {}",
                    grant(&a, address),
                    restriction(&a),
                    login.address
                ))
            }
            DomainStatus::Verified => Decision::allow(format!(
                "{}, verified for hosting {hosting}{}",
                grant(&a, address),
                if a.mailboxes.is_empty() {
                    String::new()
                } else {
                    format!(", {}", restriction(&a))
                }
            )),
            DomainStatus::Pending => Decision::refuse(format!(
                "{domain} is pending DNS verification for hosting {hosting}"
            )),
            DomainStatus::Failed => Decision::refuse(format!(
                "{domain} failed DNS verification for hosting {hosting}{}",
                d.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )),
        },
        (Some(_), None) => Decision::refuse(format!(
            "{domain} is no longer an authorized domain of hosting {hosting}"
        )),
        (None, Some(d)) => Decision::refuse(format!(
            "{address} is not a listed account of {domain} (domain {} for hosting {hosting})",
            d.status
        )),
        (None, None) => {
            let others = store.hostings_with_account(address).unwrap_or_default();
            if others.iter().any(|h| h != hosting) {
                return Decision::refuse(format!(
                    "{address} is an authorized account of another hosting, not of {hosting}"
                ));
            }
            match store.hosting_of_domain(domain) {
                Ok(Some(owner)) if &owner == hosting => Decision::refuse(format!(
                    "{address} is another mailbox address; {} may only send as itself",
                    login.address
                )),
                Ok(Some(_)) => Decision::refuse(format!(
                    "{domain} is hosted by another hosting, not by {hosting}"
                )),
                _ => Decision::refuse(format!(
                    "{address} is unknown: {domain} is not an authorized domain of hosting {hosting}"
                )),
            }
        }
    }
}

/// `domauth explain` when passwords come from Dovecot or a passwd-file (SPEC
/// §10): there is no mailbox in the store; the login's hosting is the owner
/// of its domain. `known`: whether the backend lists the login (`None`:
/// Dovecot, which only answers with a password).
pub fn explain_external(store: &Store, login: &str, sender: &str, known: Option<bool>) -> Decision {
    let address = match normalize_address(login) {
        Ok(a) => a,
        Err(e) => return Decision::refuse(format!("invalid login: {e}")),
    };
    if known == Some(false) {
        return Decision::refuse(format!("unknown login {address}: not in the passwd-file"));
    }
    let hosting = match store.hosting_of_domain(domain_of(&address)) {
        Ok(Some(h)) => h,
        Ok(None) => {
            return Decision::refuse(format!(
                "unknown login {address}: its domain belongs to no hosting"
            ));
        }
        Err(e) => return Decision::refuse(format!("store error: {e}")),
    };
    let sender = match normalize_address(sender) {
        Ok(a) => a,
        Err(e) => return Decision::refuse(format!("invalid sender address: {e}")),
    };
    let login = Login { address, hosting };
    let mut d = decide(store, &login, &sender);
    if known.is_none() {
        d.reason
            .push_str(" (if Dovecot accepts the login's password)");
    }
    d
}

/// Which grant an account is, in words (`explain` says which one applied).
fn grant(a: &AuthorizedAccount, address: &str) -> String {
    if a.is_wildcard() {
        format!(
            "{address} is covered by the whole-domain grant (wildcard) {}",
            a.address
        )
    } else {
        format!("{address} is an authorized account of {}", a.domain)
    }
}

fn restriction(a: &AuthorizedAccount) -> String {
    format!("restricted to mailboxes {}", a.mailboxes.join(", "))
}

/// `domauth explain`: the decision for a login and an address as typed by a
/// support agent (any case, with or without angle brackets).
pub fn explain(store: &Store, login: &str, sender: &str) -> Decision {
    let login_address = match normalize_address(login) {
        Ok(a) => a,
        Err(e) => return Decision::refuse(format!("invalid login: {e}")),
    };
    let mailbox = match store.mailbox(&login_address) {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Decision::refuse(format!("unknown login {login_address}: no such mailbox"));
        }
        Err(e) => return Decision::refuse(format!("store error: {e}")),
    };
    let address = match normalize_address(sender) {
        Ok(a) => a,
        Err(e) => return Decision::refuse(format!("invalid sender address: {e}")),
    };
    let login = Login {
        address: mailbox.address,
        hosting: mailbox.hosting,
    };
    decide(store, &login, &address)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// acme (own domain acme.example) has partner.example verified with a whole-domain
    /// grant, `sales@` restricted to info@, and `ceo@` restricted to boss@; beta has
    /// other.example verified with `*@` restricted to bob@.
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        store.add_hosting("acme", &s(&["acme.example"])).unwrap();
        store.add_hosting("beta", &s(&["beta.example"])).unwrap();
        for (h, d) in [("acme", "partner.example"), ("beta", "other.example")] {
            store.add_domain(h, d, "tok").unwrap();
            store
                .update_domain(h, d, |d| d.status = DomainStatus::Verified)
                .unwrap();
        }
        store.add_domain("acme", "pending.example", "tok").unwrap();
        store.add_account("acme", "*@partner.example").unwrap();
        store
            .add_account_restricted("acme", "sales@partner.example", &s(&["info@acme.example"]))
            .unwrap();
        store
            .add_account_restricted("acme", "ceo@partner.example", &s(&["boss@acme.example"]))
            .unwrap();
        store
            .add_account_restricted("beta", "*@other.example", &s(&["bob@beta.example"]))
            .unwrap();
        (dir, store)
    }

    #[test]
    fn grants_table() {
        let (_dir, store) = store();
        let acme = |m: &str| Login {
            address: m.into(),
            hosting: "acme".into(),
        };
        let beta = |m: &str| Login {
            address: m.into(),
            hosting: "beta".into(),
        };
        for (login, sender, allowed, words) in [
            (
                acme("info@acme.example"),
                "info@acme.example",
                true,
                "own mailbox",
            ),
            (
                acme("info@acme.example"),
                "anyone@partner.example",
                true,
                "whole-domain grant (wildcard) *@partner.example",
            ),
            (
                acme("other@acme.example"),
                "anyone@partner.example",
                true,
                "verified for hosting acme",
            ),
            (
                acme("info@acme.example"),
                "sales@partner.example",
                true,
                "authorized account of partner.example, verified for hosting acme, restricted to mailboxes info@acme.example",
            ),
            // The exact grant wins over the whole-domain one.
            (
                acme("other@acme.example"),
                "sales@partner.example",
                false,
                "restricted to mailboxes info@acme.example, so not for other@acme.example",
            ),
            (
                acme("boss@acme.example"),
                "ceo@partner.example",
                true,
                "restricted to mailboxes boss@acme.example",
            ),
            (
                acme("info@acme.example"),
                "ceo@partner.example",
                false,
                "so not for info@acme.example",
            ),
            // A subdomain is not covered by *@partner.example.
            (
                acme("info@acme.example"),
                "x@sub.partner.example",
                false,
                "unknown",
            ),
            (
                acme("info@acme.example"),
                "x@pending.example",
                false,
                "pending",
            ),
            (
                acme("info@acme.example"),
                "x@other.example",
                false,
                "not an authorized domain of hosting acme",
            ),
            // Tenant isolation: acme's grants give beta nothing, and beta's restricted
            // wildcard only its listed mailbox.
            (
                beta("bob@beta.example"),
                "anyone@partner.example",
                false,
                "not an authorized domain of hosting beta",
            ),
            (
                beta("bob@beta.example"),
                "x@other.example",
                true,
                "*@other.example",
            ),
            (
                beta("eve@beta.example"),
                "x@other.example",
                false,
                "restricted to mailboxes bob@beta.example",
            ),
        ] {
            let d = decide(&store, &login, sender);
            assert_eq!(
                d.allowed, allowed,
                "{} as {sender}: {}",
                login.address, d.reason
            );
            assert!(
                d.reason.contains(words),
                "{} as {sender}: {:?} lacks {words:?}",
                login.address,
                d.reason
            );
        }
        // Without the whole-domain grant an unlisted address is refused as before.
        store.delete_account("acme", "*@partner.example").unwrap();
        let d = decide(&store, &acme("info@acme.example"), "anyone@partner.example");
        assert!(
            !d.allowed && d.reason.contains("not a listed account"),
            "{}",
            d.reason
        );
    }
}
