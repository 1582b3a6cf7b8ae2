//! Sender authorization (SPEC §3): the one place that decides whether a
//! logged-in mailbox may use an address, for the envelope and the headers
//! alike, and says why in words for the log and for `domauth explain`.

use domauth_store::{DomainStatus, Store, domain_of, normalize_address};

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
/// verified domain of `L`'s hosting. Every lookup is a point read (account
/// by hosting+address, domain by hosting+domain): nothing scans.
pub fn decide(store: &Store, login: &Login, address: &str) -> Decision {
    if address == login.address {
        return Decision::allow(format!("{address} is the login's own mailbox"));
    }
    let hosting = &login.hosting;
    let domain = domain_of(address);
    let lookup = store
        .account(hosting, address)
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
        (Some(_), Some(d)) => match d.status {
            DomainStatus::Verified => Decision::allow(format!(
                "{address} is an authorized account of {domain}, verified for hosting {hosting}"
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
