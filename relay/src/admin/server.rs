//! The admin API: HTTP/JSON on a Unix socket (mode 0600), the only way to
//! change the store while the server owns it. Every route is scoped by
//! hosting where the data belongs to one, so hosting A's requests never see
//! or change hosting B's data.

use std::{path::Path, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use chrono::Utc;
use domauth_store::{
    AuthorizedAccount, AuthorizedDomain, Hosting, Mailbox, Queue, QueuedMessage, Store, StoreError,
    normalize_domain,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::{net::UnixListener, sync::watch};

use crate::{
    logsafe::Escaped,
    ops::{OpError, Ops, ts},
    queue::QueueHandle,
    smtp::auth::hash_password,
    verify::Verifier,
    verify_dns::CheckOutcome,
};

#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub verifier: Arc<Verifier>,
    /// The queue on disk (read by `queue list/show`) and the scheduler (told about
    /// `retry` and `delete`).
    pub queue: Queue,
    pub scheduler: QueueHandle,
    /// Where passwords come from: `explain` finds the login's hosting by it.
    pub passwords: crate::passwords::Backend,
    /// DKIM keys of authorized domains (SPEC §9).
    pub dkim: Arc<crate::dkim_keys::DkimKeys>,
    /// The domain, account and explain operations, shared with the panel and the API.
    pub ops: Ops,
}

/// An error for the CLI: HTTP status plus one line of text.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        let status = match e {
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Conflict(_) => StatusCode::CONFLICT,
            OpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let status = match e {
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, msg.into())
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/hostings", get(list_hostings).post(add_hosting))
        .route("/hostings/{name}/password", put(hosting_password))
        .route("/mailboxes", get(list_mailboxes).post(add_mailbox))
        .route(
            "/mailboxes/{address}",
            axum::routing::delete(delete_mailbox),
        )
        .route("/mailboxes/{address}/password", put(mailbox_password))
        .route(
            "/hostings/{name}/domains",
            get(list_domains).post(add_domain),
        )
        .route(
            "/hostings/{name}/domains/{domain}",
            get(show_domain).delete(delete_domain),
        )
        .route(
            "/hostings/{name}/domains/{domain}/verify",
            post(verify_domain),
        )
        .route(
            "/hostings/{name}/accounts",
            get(list_accounts).post(add_accounts),
        )
        .route(
            "/hostings/{name}/accounts/{address}",
            axum::routing::delete(delete_account),
        )
        .route(
            "/hostings/{name}/domains/{domain}/dkim-rotate",
            post(rotate_dkim),
        )
        .route(
            "/hostings/{name}/tokens",
            post(issue_token).delete(revoke_tokens),
        )
        .route("/queue", get(list_queue))
        .route("/queue/{id}", get(show_queued).delete(delete_queued))
        .route("/queue/{id}/retry", post(retry_queued))
        .route("/explain", get(explain))
        .with_state(state)
}

/// Binds the socket (replacing a stale file) with mode 0600 from the first
/// moment, and serves until shutdown.
pub async fn serve(
    path: &Path,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("server.admin_socket: cannot create {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "server.admin_socket: cannot replace {}: {e}",
                path.display()
            ));
        }
    }
    // The umask makes the socket 0600 at creation: no window in which
    // another local user could connect.
    // SAFETY: umask only changes this process's file creation mask; no other
    // thread creates files while the server is starting.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener
        .map_err(|e| format!("server.admin_socket: cannot bind {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("server.admin_socket: cannot chmod {}: {e}", path.display()))?;
    let app = router(state);
    Ok(tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "admin API stopped");
        }
    }))
}

fn hosting_json(h: &Hosting) -> Value {
    json!({ "name": h.name, "domains": h.domains, "created_at": ts(Some(h.created_at)) })
}

fn mailbox_json(m: &Mailbox) -> Value {
    json!({ "address": m.address, "hosting": m.hosting, "created_at": ts(Some(m.created_at)) })
}

fn account_json(a: &AuthorizedAccount) -> Value {
    let mut v = json!({ "address": a.address, "domain": a.domain, "hosting": a.hosting, "created_at": ts(Some(a.created_at)) });
    // SPEC §9 wider grants: `mailboxes` only when restricted; `*@domain` is the
    // whole-domain grant.
    if !a.mailboxes.is_empty() {
        v["mailboxes"] = json!(a.mailboxes);
    }
    if a.is_wildcard() {
        v["wildcard"] = json!(true);
    }
    v
}

fn domain_json(verifier: &Verifier, d: &AuthorizedDomain) -> Value {
    let mut v = domain_base_json(verifier, d);
    super::dns_report::add_json(&mut v, d);
    v
}

fn domain_base_json(verifier: &Verifier, d: &AuthorizedDomain) -> Value {
    json!({
        "domain": d.domain,
        "hosting": d.hosting,
        "status": d.status.to_string(),
        "record": { "name": verifier.record_name(&d.domain), "type": "TXT", "value": d.token },
        "last_check": ts(d.last_check),
        "last_error": d.last_error,
        "record_missing_since": ts(d.record_missing_since),
        "created_at": ts(Some(d.created_at)),
        "verified_at": ts(d.verified_at),
    })
}

fn queue_json(m: &QueuedMessage) -> Value {
    let (e, st) = (&m.envelope, &m.state);
    json!({
        "id": e.id,
        "from": e.from,
        "recipients": e.recipients,
        "recipient_status": st.recipients.iter().map(|r| json!({
            "address": r.address, "status": r.status, "last_reply": r.last_reply,
        })).collect::<Vec<_>>(),
        "size": m.size,
        "attempts": st.attempts,
        "next_attempt": ts(Some(st.next_attempt)),
        "last_error": st.last_error,
        "held": st.held,
        "received_at": ts(Some(e.received_at)),
        "login": e.login,
        "bounce": e.is_bounce,
        "body": e.body,
        "smtputf8": e.smtputf8,
        // RFC 3461 parameters as given (RET, ENVID, NOTIFY/ORCPT per recipient).
        "dsn": e.dsn,
    })
}

/// Runs a blocking queue operation off the async runtime.
async fn on_queue<T: Send + 'static>(
    queue: &Queue,
    f: impl FnOnce(&Queue) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let queue = queue.clone();
    tokio::task::spawn_blocking(move || f(&queue))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

/// Passwords arrive in the request body (the socket is 0600) and are hashed
/// on the blocking pool: Argon2 would stall the runtime.
async fn hash(password: String) -> Result<String, ApiError> {
    if password.is_empty() {
        return Err(bad("the password must not be empty"));
    }
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn list_hostings(State(s): State<AdminState>) -> ApiResult {
    let list: Vec<Value> = s.store.hostings()?.iter().map(hosting_json).collect();
    Ok(Json(Value::Array(list)))
}

#[derive(Deserialize)]
struct NewHosting {
    name: String,
    domains: Vec<String>,
}

async fn add_hosting(State(s): State<AdminState>, Json(req): Json<NewHosting>) -> ApiResult {
    let h = s.store.add_hosting(&req.name, &req.domains)?;
    tracing::info!(event = "hosting_added", hosting = %Escaped(&h.name), "admin");
    Ok(Json(hosting_json(&h)))
}

#[derive(Deserialize)]
struct Password {
    password: String,
}

async fn hosting_password(
    State(s): State<AdminState>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<Password>,
) -> ApiResult {
    if s.store.hosting(&name)?.is_none() {
        return Err(not_found(format!("no hosting named {name:?}")));
    }
    let phc = hash(req.password).await?;
    s.store.set_hosting_password(&name, &phc)?;
    tracing::info!(event = "hosting_password_changed", hosting = %Escaped(&name), "admin");
    Ok(Json(json!({ "name": name })))
}

#[derive(Deserialize)]
struct NewMailbox {
    address: String,
    password: String,
}

async fn add_mailbox(State(s): State<AdminState>, Json(req): Json<NewMailbox>) -> ApiResult {
    // Refuse before paying for the hash when the address is unusable.
    let address = domauth_store::normalize_address(&req.address)?;
    if s.store.mailbox(&address)?.is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("mailbox {address} already exists"),
        ));
    }
    let phc = hash(req.password).await?;
    let m = s.store.add_mailbox(&address, &phc)?;
    tracing::info!(event = "mailbox_added", mailbox = %Escaped(&m.address), hosting = %Escaped(&m.hosting), "admin");
    Ok(Json(mailbox_json(&m)))
}

#[derive(Deserialize)]
struct HostingFilter {
    hosting: Option<String>,
}

async fn list_mailboxes(State(s): State<AdminState>, Query(q): Query<HostingFilter>) -> ApiResult {
    let list: Vec<Value> = s
        .store
        .mailboxes(q.hosting.as_deref())?
        .iter()
        .map(mailbox_json)
        .collect();
    Ok(Json(Value::Array(list)))
}

async fn mailbox_password(
    State(s): State<AdminState>,
    UrlPath(address): UrlPath<String>,
    Json(req): Json<Password>,
) -> ApiResult {
    if s.store.mailbox(&address)?.is_none() {
        return Err(not_found(format!("no mailbox {address}")));
    }
    let phc = hash(req.password).await?;
    let m = s.store.set_mailbox_password(&address, &phc)?;
    tracing::info!(event = "mailbox_password_changed", mailbox = %Escaped(&m.address), "admin");
    Ok(Json(mailbox_json(&m)))
}

async fn delete_mailbox(
    State(s): State<AdminState>,
    UrlPath(address): UrlPath<String>,
) -> ApiResult {
    s.store.delete_mailbox(&address)?;
    tracing::info!(event = "mailbox_deleted", mailbox = %Escaped(&address), "admin");
    Ok(Json(json!({ "deleted": address })))
}

#[derive(Deserialize)]
struct NewDomain {
    domain: String,
}

async fn add_domain(
    State(s): State<AdminState>,
    UrlPath(hosting): UrlPath<String>,
    Json(req): Json<NewDomain>,
) -> ApiResult {
    let token =
        crate::verify::new_token().map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let d = s.store.add_domain(&hosting, &req.domain, &token)?;
    s.verifier.track(&d);
    crate::metrics::domain_status(None, Some(d.status));
    tracing::info!(event = "domain_added", hosting = %Escaped(&d.hosting), domain = %Escaped(&d.domain), "admin");
    if let Err(e) = s.dkim.ensure(&d.hosting, &d.domain).await {
        // The domain is added; the background task makes the keys later.
        tracing::error!(error = %e, domain = %Escaped(&d.domain), "cannot make DKIM keys");
    }
    Ok(Json(with_dkim(&s, domain_json(&s.verifier, &d), &d)?))
}

async fn list_domains(State(s): State<AdminState>, UrlPath(hosting): UrlPath<String>) -> ApiResult {
    let list: Vec<Value> = s
        .store
        .domains(&hosting)?
        .iter()
        .map(|d| with_dkim(&s, domain_json(&s.verifier, d), d))
        .collect::<Result<_, _>>()?;
    Ok(Json(Value::Array(list)))
}

fn domain_key(domain: &str) -> Result<String, ApiError> {
    Ok(normalize_domain(domain)?)
}

async fn show_domain(
    State(s): State<AdminState>,
    UrlPath((hosting, domain)): UrlPath<(String, String)>,
) -> ApiResult {
    let domain = domain_key(&domain)?;
    let d = s
        .store
        .domain(&hosting, &domain)?
        .ok_or_else(|| not_found(format!("{domain} is not a domain of hosting {hosting}")))?;
    let mut v = with_dkim(&s, domain_json(&s.verifier, &d), &d)?;
    v["accounts"] = json!(s.store.account_count(&hosting, &domain)?);
    Ok(Json(v))
}

async fn verify_domain(
    State(s): State<AdminState>,
    UrlPath((hosting, domain)): UrlPath<(String, String)>,
) -> ApiResult {
    let domain = domain_key(&domain)?;
    let (d, outcome) = s
        .verifier
        .check(&hosting, &domain)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .ok_or_else(|| not_found(format!("{domain} is not a domain of hosting {hosting}")))?;
    // The DKIM records are checked with the validation record; their outcome is in
    // `dkim` and does not change this command's result (SPEC §2.5).
    if let Err(e) = s.dkim.check(&hosting, &domain).await {
        tracing::error!(error = %e, domain = %Escaped(&domain), "DKIM check failed");
    }
    let mut v = with_dkim(&s, domain_json(&s.verifier, &d), &d)?;
    v["check"] = json!({
        "found": matches!(outcome, CheckOutcome::Verified),
        "outcome": outcome.to_string(),
    });
    Ok(Json(v))
}

/// Adds the domain's `dkim` object (public records and state; no private key).
fn with_dkim(s: &AdminState, mut v: Value, d: &AuthorizedDomain) -> Result<Value, ApiError> {
    let dkim = s
        .dkim
        .get(&d.hosting, &d.domain)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    v["dkim"] = crate::dkim_keys::dkim_json(dkim.as_ref(), s.dkim.signing_enabled);
    Ok(v)
}

/// `domain dkim-rotate`: a new selector pair to publish; the old keys sign until the
/// new records are verified.
async fn rotate_dkim(
    State(s): State<AdminState>,
    UrlPath((hosting, domain)): UrlPath<(String, String)>,
) -> ApiResult {
    let domain = domain_key(&domain)?;
    let missing = || not_found(format!("{domain} is not a domain of hosting {hosting}"));
    let d = s.store.domain(&hosting, &domain)?.ok_or_else(missing)?;
    // A domain whose first keys are still being made gets them now.
    s.dkim
        .ensure(&hosting, &domain)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .ok_or_else(missing)?;
    s.dkim
        .rotate(&hosting, &domain)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .ok_or_else(missing)?;
    Ok(Json(with_dkim(&s, domain_json(&s.verifier, &d), &d)?))
}

async fn delete_domain(
    State(s): State<AdminState>,
    UrlPath((hosting, domain)): UrlPath<(String, String)>,
) -> ApiResult {
    let domain = domain_key(&domain)?;
    let status = s.store.domain(&hosting, &domain)?.map(|d| d.status);
    let accounts = s.store.delete_domain(&hosting, &domain)?;
    crate::metrics::domain_status(status, None);
    tracing::info!(event = "domain_deleted", hosting = %Escaped(&hosting), domain = %Escaped(&domain), accounts, "admin");
    Ok(Json(
        json!({ "domain": domain, "accounts_deleted": accounts }),
    ))
}

#[derive(Deserialize)]
struct NewAccounts {
    addresses: Vec<String>,
    /// Restricts the new accounts to these mailboxes of the hosting (SPEC §9).
    #[serde(default)]
    mailboxes: Vec<String>,
}

/// Adds each address; stops at the first refusal and reports which ones
/// were added before it, so a retry knows where it stands.
async fn add_accounts(
    State(s): State<AdminState>,
    UrlPath(hosting): UrlPath<String>,
    Json(req): Json<NewAccounts>,
) -> ApiResult {
    if req.addresses.is_empty() {
        return Err(bad("give at least one address"));
    }
    let mut added = Vec::new();
    for address in &req.addresses {
        match s
            .store
            .add_account_restricted(&hosting, address, &req.mailboxes)
        {
            Ok(a) => {
                tracing::info!(event = "account_added", hosting = %Escaped(&hosting), account = %Escaped(&a.address), "admin");
                added.push(account_json(&a));
            }
            Err(e) => {
                let ApiError(status, msg) = ApiError::from(e);
                let msg = if added.is_empty() {
                    msg
                } else {
                    format!("{msg} (added before this: {})", added.len())
                };
                return Err(ApiError(status, msg));
            }
        }
    }
    Ok(Json(Value::Array(added)))
}

#[derive(Deserialize)]
struct DomainFilter {
    domain: Option<String>,
}

async fn list_accounts(
    State(s): State<AdminState>,
    UrlPath(hosting): UrlPath<String>,
    Query(q): Query<DomainFilter>,
) -> ApiResult {
    if s.store.hosting(&hosting)?.is_none() {
        return Err(not_found(format!("no hosting named {hosting:?}")));
    }
    let list: Vec<Value> = s
        .store
        .accounts(&hosting, q.domain.as_deref())?
        .iter()
        .map(account_json)
        .collect();
    Ok(Json(Value::Array(list)))
}

async fn delete_account(
    State(s): State<AdminState>,
    UrlPath((hosting, address)): UrlPath<(String, String)>,
) -> ApiResult {
    s.ops.delete_account(&hosting, &address)?;
    Ok(Json(json!({ "deleted": address })))
}

/// `domauth hosting token NAME`: a new API token, shown once.
async fn issue_token(State(s): State<AdminState>, UrlPath(hosting): UrlPath<String>) -> ApiResult {
    let token = s.ops.issue_token(&hosting)?;
    Ok(Json(json!({ "hosting": hosting, "token": token })))
}

/// `domauth hosting token NAME --revoke`: every token of the hosting stops working.
async fn revoke_tokens(
    State(s): State<AdminState>,
    UrlPath(hosting): UrlPath<String>,
) -> ApiResult {
    let revoked = s.ops.revoke_tokens(&hosting)?;
    Ok(Json(json!({ "hosting": hosting, "revoked": revoked })))
}

async fn list_queue(State(s): State<AdminState>) -> ApiResult {
    let list = on_queue(&s.queue, |q| q.list()).await?;
    Ok(Json(Value::Array(list.iter().map(queue_json).collect())))
}

async fn queued(queue: &Queue, id: &str) -> Result<QueuedMessage, ApiError> {
    let owned = id.to_string();
    on_queue(queue, move |q| q.show(&owned))
        .await?
        .ok_or_else(|| not_found(format!("no queued message {id}")))
}

async fn show_queued(State(s): State<AdminState>, UrlPath(id): UrlPath<String>) -> ApiResult {
    Ok(Json(queue_json(&queued(&s.queue, &id).await?)))
}

/// Due now, and no longer held: an operator's word that the problem is fixed.
async fn retry_queued(State(s): State<AdminState>, UrlPath(id): UrlPath<String>) -> ApiResult {
    let mut m = queued(&s.queue, &id).await?;
    m.state.next_attempt = Utc::now();
    m.state.held = false;
    let (owned, state) = (id.clone(), m.state.clone());
    on_queue(&s.queue, move |q| q.save_state(&owned, &state)).await?;
    s.scheduler.retry(id);
    Ok(Json(queue_json(&m)))
}

async fn delete_queued(State(s): State<AdminState>, UrlPath(id): UrlPath<String>) -> ApiResult {
    let owned = id.clone();
    if !on_queue(&s.queue, move |q| q.remove(&owned)).await? {
        return Err(not_found(format!("no queued message {id}")));
    }
    s.scheduler.forget(id.clone());
    tracing::info!(event = "queue_deleted", id = %Escaped(&id), "admin");
    Ok(Json(json!({ "deleted": id })))
}

#[derive(Deserialize)]
struct ExplainQuery {
    login: String,
    sender: String,
}

async fn explain(State(s): State<AdminState>, Query(q): Query<ExplainQuery>) -> ApiResult {
    let d = s.ops.explain(&q.login, &q.sender);
    Ok(Json(json!({ "allowed": d.allowed, "reason": d.reason })))
}
