//! The public HTTP API (SPEC §8): the operations of `ops` as JSON, for the
//! one hosting its bearer token belongs to (`domauth hosting token NAME`).
//! Every error is `{"error": "<one line>"}`: 400 bad input, 401 no or bad
//! token, 404 unknown domain or account (another hosting's too), 409
//! already exists, 429 too many bad tokens.

use std::{collections::HashMap, net::SocketAddr};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{ConnectInfo, FromRequestParts, Path, Query, State},
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::PanelState;
use crate::{
    ops::{OpError, account_json},
    verify_dns::CheckOutcome,
};

/// An API error: status and one line.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        match e {
            OpError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            OpError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            OpError::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
            OpError::Internal(m) => {
                tracing::error!(error = %crate::logsafe::Escaped(&m), "API operation failed");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the server's log".into(),
                )
            }
        }
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type ApiResult = Result<Response, ApiError>;

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

/// The hosting the request's bearer token belongs to.
pub struct Tenant(pub String);

impl FromRequestParts<PanelState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &PanelState) -> Result<Tenant, ApiError> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
        if state.guard.token_limited(ip) {
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed authentications; try again later".into(),
            ));
        }
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let Some(token) = token else {
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer <token>)".into(),
            ));
        };
        match state.ops.hosting_of_token(token) {
            Ok(Some(hosting)) => Ok(Tenant(hosting)),
            Ok(None) => {
                state.guard.token_failed(ip);
                tracing::warn!(event = "api_bad_token", peer = %ip, "API request with a bad token");
                Err(ApiError(
                    StatusCode::UNAUTHORIZED,
                    "invalid or revoked token".into(),
                ))
            }
            Err(e) => Err(e.into()),
        }
    }
}

pub fn router(state: PanelState) -> Router {
    Router::new()
        .route("/domains", get(list_domains).post(add_domain))
        .route("/domains/{domain}", get(show_domain).delete(delete_domain))
        .route("/domains/{domain}/verify", post(verify_domain))
        .route(
            "/domains/{domain}/accounts",
            get(list_accounts).post(add_accounts),
        )
        .route(
            "/domains/{domain}/accounts/{address}",
            delete(delete_account),
        )
        .route("/explain", get(explain))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route".into(),
            )
        })
        .with_state(state)
}

/// A JSON body, with a 400 in our error shape for anything unreadable.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

async fn list_domains(State(s): State<PanelState>, Tenant(h): Tenant) -> ApiResult {
    let list = s.ops.list_domains(&h)?;
    ok(Value::Array(list.iter().map(|d| d.to_json()).collect()))
}

#[derive(Deserialize)]
struct NewDomain {
    domain: String,
}

async fn add_domain(State(s): State<PanelState>, Tenant(h): Tenant, raw: Bytes) -> ApiResult {
    let req: NewDomain = body(&raw)?;
    let d = s.ops.add_domain(&h, &req.domain).await?;
    Ok((StatusCode::CREATED, Json(d.to_json())).into_response())
}

async fn show_domain(
    State(s): State<PanelState>,
    Tenant(h): Tenant,
    Path(domain): Path<String>,
) -> ApiResult {
    ok(s.ops.domain(&h, &domain)?.to_json())
}

async fn delete_domain(
    State(s): State<PanelState>,
    Tenant(h): Tenant,
    Path(domain): Path<String>,
) -> ApiResult {
    let name = s.ops.domain(&h, &domain)?.domain.domain;
    let accounts = s.ops.delete_domain(&h, &name)?;
    ok(json!({ "domain": name, "accounts_deleted": accounts }))
}

async fn verify_domain(
    State(s): State<PanelState>,
    Tenant(h): Tenant,
    Path(domain): Path<String>,
) -> ApiResult {
    let (d, outcome) = s.ops.verify(&h, &domain).await?;
    let mut v = d.to_json();
    v["check"] = json!({
        "found": matches!(outcome, CheckOutcome::Verified),
        "outcome": outcome.to_string(),
    });
    ok(v)
}

async fn list_accounts(
    State(s): State<PanelState>,
    Tenant(h): Tenant,
    Path(domain): Path<String>,
) -> ApiResult {
    let list = s.ops.accounts(&h, Some(&domain))?;
    ok(Value::Array(list.iter().map(account_json).collect()))
}

#[derive(Deserialize)]
struct NewAccounts {
    addresses: Vec<String>,
}

/// A result per address: `added`, `already listed`, or `refused` with the
/// reason.
async fn add_accounts(
    State(s): State<PanelState>,
    Tenant(h): Tenant,
    Path(domain): Path<String>,
    raw: Bytes,
) -> ApiResult {
    let req: NewAccounts = body(&raw)?;
    if req.addresses.is_empty() {
        // Still a 404 first for a domain that is not this hosting's.
        s.ops.domain(&h, &domain)?;
        return Err(bad("give at least one address in \"addresses\""));
    }
    let results = s.ops.add_accounts_to(&h, &domain, &req.addresses)?;
    let results: Vec<Value> = results
        .iter()
        .map(|(address, outcome)| {
            let mut v = json!({ "address": address, "result": outcome.word() });
            if let crate::ops::AccountOutcome::Refused(why) = outcome {
                v["reason"] = json!(why);
            }
            v
        })
        .collect();
    ok(json!({ "results": results }))
}

async fn delete_account(
    State(s): State<PanelState>,
    Tenant(h): Tenant,
    Path((domain, address)): Path<(String, String)>,
) -> ApiResult {
    s.ops.delete_account_of(&h, &domain, &address)?;
    ok(json!({ "deleted": address }))
}

async fn explain(
    State(s): State<PanelState>,
    Tenant(h): Tenant,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Ok(Query(q)) = query else {
        return Err(bad("invalid query string"));
    };
    let (Some(login), Some(sender)) = (q.get("login"), q.get("sender")) else {
        return Err(bad(
            "give login and sender: /api/v1/explain?login=..&sender=..",
        ));
    };
    let d = s.ops.explain_for(&h, login, sender);
    ok(json!({ "allowed": d.allowed, "reason": d.reason }))
}

/// The OpenAPI 3 description of exactly these routes (hand-written; a test
/// checks that the server answers every route it lists and lists every
/// route the server has).
const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_is_json_and_openapi_3() {
        let v: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(v["paths"].as_object().unwrap().len(), 7);
    }
}
