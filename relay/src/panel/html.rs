//! The panel's pages (SPEC §8 page table). Plain forms and redirects
//! (POST-redirect-GET), so everything works with JavaScript off; the
//! templates in `relay/templates/` are askama `.html` files, escaped by
//! default — a TXT value found in DNS is anyone's text.
//!
//! The hosting comes only from the session; a domain in a URL is looked up
//! within that hosting, so another hosting's domain is "not found".

use std::{net::SocketAddr, time::Duration};

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form, Router,
    extract::{ConnectInfo, Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use domauth_store::DomainStatus;
use serde::{Deserialize, Serialize};
use tower_sessions::{Expiry, Session, SessionManagerLayer, cookie::SameSite};

use super::{
    PanelState,
    guard::{SignIn, csrf_ok, new_csrf},
};
use crate::ops::{AccountOutcome, DomainView, OpError};

const HOSTING: &str = "hosting";
const CSRF: &str = "csrf";
const FLASH: &str = "flash";
const RESULTS: &str = "results";

pub fn router(state: PanelState, secure_cookie: bool, idle: Duration) -> Router {
    let idle = tower_sessions::cookie::time::Duration::seconds(
        i64::try_from(idle.as_secs()).unwrap_or(i64::MAX / 2),
    );
    let sessions = SessionManagerLayer::new(super::sessions::BoundedMemoryStore::default())
        .with_name("domauth_session")
        .with_http_only(true)
        .with_same_site(SameSite::Strict)
        .with_secure(secure_cookie)
        .with_expiry(Expiry::OnInactivity(idle))
        // Idle expiry slides with every request, not only with changes.
        .with_always_save(true);
    Router::new()
        .route("/", get(home))
        .route("/signin", get(signin_page).post(signin))
        .route("/signout", post(signout))
        .route("/add", get(add_page).post(add))
        .route("/check", get(check))
        .route("/domains/{domain}/record", get(record))
        .route("/domains/{domain}/verify", get(verified).post(verify))
        .route(
            "/domains/{domain}/accounts",
            get(accounts).post(save_accounts),
        )
        .route("/domains/{domain}/accounts/remove", post(remove_account))
        .route("/domains/{domain}/delete", get(delete_page).post(delete))
        .fallback(|| async { not_found() })
        .layer(sessions)
        .with_state(state)
}

/// What the layout needs: who is signed in and the form token.
pub struct Nav {
    pub hosting: Option<String>,
    pub csrf: String,
}

/// A message shown once after a redirect.
#[derive(Serialize, Deserialize, Clone)]
pub struct Flash {
    pub ok: bool,
    pub text: String,
}

/// One domain as a row or a page header.
pub struct Row {
    pub domain: String,
    pub status: String,
    pub badge: &'static str,
    pub missing_since: Option<String>,
    pub last_check: Option<String>,
    pub outcome: String,
    pub hint: Option<&'static str>,
    pub verified: bool,
    pub accounts: usize,
    pub record_name: String,
    pub record_label: String,
    pub record_value: String,
    /// DKIM (SPEC §9): the records' state in words and the (name, value) pairs to
    /// publish.
    pub dkim_status: String,
    pub dkim_records: Vec<(String, String)>,
}

fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds().max(0);
    match secs {
        0..60 => "just now".into(),
        60..120 => "1 minute ago".into(),
        120..3600 => format!("{} minutes ago", secs / 60),
        3600..7200 => "1 hour ago".into(),
        7200..172_800 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

/// The last check's outcome in the panel's words (SPEC §8).
fn outcome_words(v: &DomainView) -> String {
    let d = &v.domain;
    match (&d.last_error, d.last_check) {
        (_, None) => "not checked yet".into(),
        (None, Some(_)) => "verified".into(),
        (Some(e), Some(_)) => match e.strip_prefix("dns error: ") {
            Some(rest) => format!("DNS error: {rest}"),
            None => e.clone(),
        },
    }
}

/// Which of the four things went wrong, said plainly (issue 10).
fn hint(last_error: Option<&str>) -> Option<&'static str> {
    let e = last_error?;
    Some(if e.contains("the zone was added twice") {
        "Your DNS panel added the domain to the name a second time. Enter only the label as the record name."
    } else if e.contains("NXDOMAIN") {
        "The name does not exist in DNS (yet). Check the record name, or wait: DNS changes can take from minutes to hours."
    } else if e.contains("has no TXT record") {
        "The name exists but has no TXT record. Check the record type."
    } else if e.starts_with("mismatch") {
        "A TXT record is there, but its value is not the one shown here. Copy the value again."
    } else if e.starts_with("dns error") {
        "A temporary DNS error: the check is retried automatically."
    } else {
        return None;
    })
}

fn row(v: &DomainView, now: DateTime<Utc>) -> Row {
    let d = &v.domain;
    Row {
        domain: d.domain.clone(),
        status: d.status.to_string(),
        badge: match d.status {
            DomainStatus::Pending => "Pending",
            DomainStatus::Verified => "Verified",
            DomainStatus::Failed => "Failed",
        },
        missing_since: d
            .record_missing_since
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()),
        last_check: d.last_check.map(|t| ago(t, now)),
        outcome: outcome_words(v),
        hint: hint(d.last_error.as_deref()),
        verified: d.status == DomainStatus::Verified,
        accounts: v.accounts,
        record_name: v.record.name.clone(),
        record_label: v.record.label.clone(),
        record_value: v.record.value.clone(),
        dkim_status: v.dkim["status"]
            .as_str()
            .unwrap_or("not made yet")
            .to_string(),
        dkim_records: v.dkim["records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                Some((
                    r["name"].as_str()?.to_string(),
                    r["value"].as_str()?.to_string(),
                ))
            })
            .collect(),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "signin.html")]
struct SignInPage {
    nav: Nav,
    error: Option<String>,
    name: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "home.html")]
struct HomePage {
    nav: Nav,
    flash: Option<Flash>,
    rows: Vec<Row>,
    any_pending: bool,
}

#[derive(Template, WebTemplate)]
#[template(path = "add.html")]
struct AddPage {
    nav: Nav,
    error: Option<String>,
    value: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "record.html")]
struct RecordPage {
    nav: Nav,
    row: Row,
    /// The page after "Verify": the outcome is the headline.
    checked: bool,
}

#[derive(Template, WebTemplate)]
#[template(path = "accounts.html")]
struct AccountsPage {
    nav: Nav,
    flash: Option<Flash>,
    row: Row,
    accounts: Vec<String>,
    results: Vec<AddResult>,
}

#[derive(Serialize, Deserialize, Clone)]
struct AddResult {
    address: String,
    word: String,
    /// The word as a CSS class: `added`, `already-listed`, `refused`.
    class: String,
    reason: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "delete.html")]
struct DeletePage {
    nav: Nav,
    row: Row,
}

#[derive(Template, WebTemplate)]
#[template(path = "check.html")]
struct CheckPage {
    nav: Nav,
    mailboxes: Vec<String>,
    mailbox: String,
    sender: String,
    decision: Option<(bool, String)>,
}

#[derive(Template, WebTemplate)]
#[template(path = "message.html")]
struct MessagePage {
    nav: Nav,
    title: String,
    text: String,
}

fn message(status: StatusCode, nav: Nav, title: &str, text: &str) -> Response {
    (
        status,
        MessagePage {
            nav,
            title: title.into(),
            text: text.into(),
        },
    )
        .into_response()
}

fn not_found() -> Response {
    message(
        StatusCode::NOT_FOUND,
        Nav {
            hosting: None,
            csrf: String::new(),
        },
        "Not found",
        "There is no such page or domain.",
    )
}

fn to(path: &str) -> Response {
    Redirect::to(path).into_response()
}

/// The signed-in hosting and the session's form token; or the response
/// that sends the visitor to the sign-in page.
async fn signed_in(session: &Session) -> Result<Nav, Response> {
    let hosting: Option<String> = session.get(HOSTING).await.ok().flatten();
    let Some(hosting) = hosting else {
        return Err(to("/signin"));
    };
    let csrf = csrf_of(session).await;
    Ok(Nav {
        hosting: Some(hosting),
        csrf,
    })
}

/// The session's CSRF token, made on first use.
async fn csrf_of(session: &Session) -> String {
    if let Ok(Some(t)) = session.get::<String>(CSRF).await {
        return t;
    }
    let t = new_csrf();
    let _ = session.insert(CSRF, &t).await;
    t
}

/// A state-changing request: signed in and carrying the session's token.
async fn checked_post(session: &Session, given: &str) -> Result<(Nav, String), Response> {
    let nav = signed_in(session).await?;
    if !csrf_ok(Some(&nav.csrf), given) {
        return Err(forbidden(nav));
    }
    let hosting = nav.hosting.clone().unwrap_or_default();
    Ok((nav, hosting))
}

fn forbidden(nav: Nav) -> Response {
    message(
        StatusCode::FORBIDDEN,
        nav,
        "Request refused",
        "The form was not sent from this panel, or it expired. Go back, reload the page and try again.",
    )
}

fn op_error(nav: Nav, e: OpError) -> Response {
    match e {
        OpError::NotFound(_) => message(
            StatusCode::NOT_FOUND,
            nav,
            "Not found",
            "There is no such page or domain.",
        ),
        OpError::Internal(m) => {
            tracing::error!(error = %crate::logsafe::Escaped(&m), "panel operation failed");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                nav,
                "Something went wrong",
                "The server could not do this now; try again later.",
            )
        }
        other => message(StatusCode::BAD_REQUEST, nav, "Refused", &other.to_string()),
    }
}

async fn flash(session: &Session, ok: bool, text: String) {
    let _ = session.insert(FLASH, Flash { ok, text }).await;
}

async fn take_flash(session: &Session) -> Option<Flash> {
    session.remove::<Flash>(FLASH).await.ok().flatten()
}

// ------------------------------------------------------------ sign-in

async fn signin_page(session: Session) -> Response {
    if let Ok(Some(_)) = session.get::<String>(HOSTING).await {
        return to("/");
    }
    let csrf = csrf_of(&session).await;
    SignInPage {
        nav: Nav {
            hosting: None,
            csrf,
        },
        error: None,
        name: String::new(),
    }
    .into_response()
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    hosting: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

async fn signin(
    State(s): State<PanelState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    session: Session,
    Form(f): Form<SignInForm>,
) -> Response {
    let csrf = csrf_of(&session).await;
    let nav = Nav {
        hosting: None,
        csrf: csrf.clone(),
    };
    if !csrf_ok(Some(&csrf), &f.csrf) {
        return forbidden(nav);
    }
    let (status, error) = match s
        .guard
        .sign_in(&s.ops, peer.ip(), &f.hosting, &f.password)
        .await
    {
        SignIn::Ok(hosting) => {
            // A new session id at sign-in: a planted cookie is worth nothing.
            if session.cycle_id().await.is_err()
                || session.insert(HOSTING, &hosting).await.is_err()
                || session.insert(CSRF, new_csrf()).await.is_err()
            {
                return message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    nav,
                    "Something went wrong",
                    "Could not start a session.",
                );
            }
            return to("/");
        }
        SignIn::Failed => (
            StatusCode::UNAUTHORIZED,
            "Sign-in failed: the hosting name or the password is wrong.",
        ),
        SignIn::Limited => (
            StatusCode::TOO_MANY_REQUESTS,
            "Sign-in failed: too many failed attempts. Try again later.",
        ),
    };
    (
        status,
        SignInPage {
            nav,
            error: Some(error.into()),
            name: f.hosting.trim().to_string(),
        },
    )
        .into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn signout(session: Session, Form(f): Form<CsrfForm>) -> Response {
    if let Err(r) = checked_post(&session, &f.csrf).await {
        return r;
    }
    let _ = session.flush().await;
    to("/signin")
}

// ------------------------------------------------------------ domains

async fn home(State(s): State<PanelState>, session: Session) -> Response {
    let nav = match signed_in(&session).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let hosting = nav.hosting.clone().unwrap_or_default();
    let list = match s.ops.list_domains(&hosting) {
        Ok(l) => l,
        Err(e) => return op_error(nav, e),
    };
    let now = Utc::now();
    let rows: Vec<Row> = list.iter().map(|v| row(v, now)).collect();
    HomePage {
        flash: take_flash(&session).await,
        any_pending: rows.iter().any(|r| r.status == "pending"),
        rows,
        nav,
    }
    .into_response()
}

async fn add_page(session: Session) -> Response {
    match signed_in(&session).await {
        Ok(nav) => AddPage {
            nav,
            error: None,
            value: String::new(),
        }
        .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct AddForm {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    csrf: String,
}

async fn add(State(s): State<PanelState>, session: Session, Form(f): Form<AddForm>) -> Response {
    let (nav, hosting) = match checked_post(&session, &f.csrf).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match s.ops.add_domain(&hosting, &f.domain).await {
        Ok(v) => to(&format!("/domains/{}/record", v.domain.domain)),
        Err(OpError::Internal(m)) => op_error(nav, OpError::Internal(m)),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            AddPage {
                nav,
                error: Some(e.to_string()),
                value: f.domain,
            },
        )
            .into_response(),
    }
}

/// The signed-in hosting's domain named in the URL, or the response to give.
async fn domain_page(
    s: &PanelState,
    session: &Session,
    domain: &str,
) -> Result<(Nav, DomainView), Response> {
    let nav = signed_in(session).await?;
    let hosting = nav.hosting.clone().unwrap_or_default();
    match s.ops.domain(&hosting, domain) {
        Ok(v) => Ok((nav, v)),
        Err(e) => Err(op_error(nav, e)),
    }
}

async fn record(
    State(s): State<PanelState>,
    session: Session,
    Path(domain): Path<String>,
) -> Response {
    record_page(&s, &session, &domain, false).await
}

/// The record page; `checked`: after "Verify", with the outcome as the headline.
async fn record_page(s: &PanelState, session: &Session, domain: &str, checked: bool) -> Response {
    match domain_page(s, session, domain).await {
        Ok((nav, v)) => RecordPage {
            nav,
            row: row(&v, Utc::now()),
            checked,
        }
        .into_response(),
        Err(r) => r,
    }
}

/// "Verify": checks now (the outcome is stored on the domain), then shows
/// it on the result page.
async fn verify(
    State(s): State<PanelState>,
    session: Session,
    Path(domain): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let (nav, hosting) = match checked_post(&session, &f.csrf).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match s.ops.verify(&hosting, &domain).await {
        Ok((v, _)) => to(&format!("/domains/{}/verify", v.domain.domain)),
        Err(e) => op_error(nav, e),
    }
}

async fn verified(
    State(s): State<PanelState>,
    session: Session,
    Path(domain): Path<String>,
) -> Response {
    record_page(&s, &session, &domain, true).await
}

// ------------------------------------------------------------ accounts

async fn accounts(
    State(s): State<PanelState>,
    session: Session,
    Path(domain): Path<String>,
) -> Response {
    let (nav, v) = match domain_page(&s, &session, &domain).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let hosting = nav.hosting.clone().unwrap_or_default();
    let list = match s.ops.accounts(&hosting, Some(&v.domain.domain)) {
        Ok(l) => l,
        Err(e) => return op_error(nav, e),
    };
    let results: Vec<AddResult> = session
        .remove(RESULTS)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    AccountsPage {
        flash: take_flash(&session).await,
        row: row(&v, Utc::now()),
        accounts: list.into_iter().map(|a| a.address).collect(),
        results,
        nav,
    }
    .into_response()
}

#[derive(Deserialize)]
struct AccountsForm {
    #[serde(default)]
    addresses: String,
    #[serde(default)]
    csrf: String,
}

async fn save_accounts(
    State(s): State<PanelState>,
    session: Session,
    Path(domain): Path<String>,
    Form(f): Form<AccountsForm>,
) -> Response {
    let (nav, hosting) = match checked_post(&session, &f.csrf).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let addresses = crate::ops::split_addresses(&f.addresses);
    let results = match s.ops.add_accounts_to(&hosting, &domain, &addresses) {
        Ok(r) => r,
        Err(e) => return op_error(nav, e),
    };
    let results: Vec<AddResult> = results
        .into_iter()
        .map(|(address, outcome)| AddResult {
            word: outcome.word().to_string(),
            class: outcome.word().replace(' ', "-"),
            reason: match outcome {
                AccountOutcome::Refused(why) => Some(why),
                _ => None,
            },
            address,
        })
        .collect();
    if results.is_empty() {
        flash(&session, false, "Type at least one address.".into()).await;
    }
    let _ = session.insert(RESULTS, results).await;
    to(&format!(
        "/domains/{}/accounts",
        domauth_store::normalize_domain(&domain).unwrap_or_default()
    ))
}

#[derive(Deserialize)]
struct RemoveForm {
    #[serde(default)]
    address: String,
    #[serde(default)]
    csrf: String,
}

async fn remove_account(
    State(s): State<PanelState>,
    session: Session,
    Path(domain): Path<String>,
    Form(f): Form<RemoveForm>,
) -> Response {
    let (nav, hosting) = match checked_post(&session, &f.csrf).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match s.ops.delete_account_of(&hosting, &domain, &f.address) {
        Ok(()) => {
            flash(&session, true, format!("Removed {}.", f.address.trim())).await;
            to(&format!(
                "/domains/{}/accounts",
                domauth_store::normalize_domain(&domain).unwrap_or_default()
            ))
        }
        Err(e) => op_error(nav, e),
    }
}

// ------------------------------------------------------------ delete

async fn delete_page(
    State(s): State<PanelState>,
    session: Session,
    Path(domain): Path<String>,
) -> Response {
    match domain_page(&s, &session, &domain).await {
        Ok((nav, v)) => DeletePage {
            nav,
            row: row(&v, Utc::now()),
        }
        .into_response(),
        Err(r) => r,
    }
}

async fn delete(
    State(s): State<PanelState>,
    session: Session,
    Path(domain): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let (nav, hosting) = match checked_post(&session, &f.csrf).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let name = match s.ops.domain(&hosting, &domain) {
        Ok(v) => v.domain.domain,
        Err(e) => return op_error(nav, e),
    };
    match s.ops.delete_domain(&hosting, &name) {
        Ok(n) => {
            let accounts = if n == 1 { "account" } else { "accounts" };
            flash(
                &session,
                true,
                format!("Deleted {name} and its {n} authorized {accounts}."),
            )
            .await;
            to("/")
        }
        Err(e) => op_error(nav, e),
    }
}

// ------------------------------------------------------------ check a sender

#[derive(Deserialize)]
struct CheckQuery {
    #[serde(default)]
    mailbox: String,
    #[serde(default)]
    sender: String,
}

async fn check(
    State(s): State<PanelState>,
    session: Session,
    Query(q): Query<CheckQuery>,
) -> Response {
    let nav = match signed_in(&session).await {
        Ok(n) => n,
        Err(r) => return r,
    };
    let hosting = nav.hosting.clone().unwrap_or_default();
    let mailboxes = match s.ops.mailboxes(&hosting) {
        Ok(m) => m,
        Err(e) => return op_error(nav, e),
    };
    let decision = (!q.mailbox.trim().is_empty() && !q.sender.trim().is_empty()).then(|| {
        let d = s.ops.explain_for(&hosting, &q.mailbox, &q.sender);
        (d.allowed, d.reason)
    });
    CheckPage {
        nav,
        mailboxes,
        mailbox: q.mailbox,
        sender: q.sender,
        decision,
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ago_in_words() {
        let now = Utc::now();
        let s = |secs: i64| ago(now - chrono::Duration::seconds(secs), now);
        assert_eq!(s(5), "just now");
        assert_eq!(s(61), "1 minute ago");
        assert_eq!(s(600), "10 minutes ago");
        assert_eq!(s(3700), "1 hour ago");
        assert_eq!(s(3 * 86_400), "3 days ago");
    }

    #[test]
    fn hints_name_the_four_failures() {
        let h = |e: &str| hint(Some(e)).unwrap_or("");
        assert!(h("not found: no TXT record at x (NXDOMAIN)").contains("does not exist"));
        assert!(
            h("not found: no TXT record at x (the name exists but has no TXT record)")
                .contains("no TXT record")
        );
        assert!(h("mismatch: found \"x\"").contains("value"));
        assert!(h("dns error: timed out").contains("temporary"));
        assert!(h("not found: …; found at y: the zone was added twice, …").contains("label"));
        assert_eq!(hint(None), None);
    }
}
