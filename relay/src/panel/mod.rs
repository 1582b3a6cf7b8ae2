//! The hosting panel (HTML) and the public HTTP API (JSON, `/api/v1`) of
//! SPEC §8, served from one listener (`[panel] listen`). Both are faces of
//! `ops`: they translate a form or a JSON body into a call with the hosting
//! of who is asking (the session's, the bearer token's) and render the
//! result. Neither reaches into the store.
//!
//! - `api.rs`      the JSON API, its bearer tokens and `openapi.json`
//! - `html.rs`     the pages (templates in `relay/templates/`)
//! - `guard.rs`    sign-in and token failure limits, password checks, CSRF
//! - `http.rs`     security headers, static files, the (TLS) listener
//! - `sessions.rs` the bounded in-memory session store

pub mod api;
mod guard;
mod html;
mod http;
mod sessions;

use std::{sync::Arc, time::Duration};

use axum::Router;
use tokio::{sync::watch, task::JoinHandle};

use crate::{config::Config, ops::Ops};

pub use guard::Guard;

/// What every handler of the panel and the API shares.
#[derive(Clone)]
pub struct PanelState {
    pub ops: Ops,
    pub guard: Arc<Guard>,
}

/// The whole HTTP application: API, pages, static files, headers.
pub fn app(state: PanelState, secure_cookie: bool, session_idle: Duration) -> Router {
    Router::new()
        .nest("/api/v1", api::router(state.clone()))
        .merge(html::router(state, secure_cookie, session_idle))
        .merge(http::static_files())
        .layer(axum::middleware::from_fn(http::security_headers))
}

/// Binds every `[panel] listen` address and serves until shutdown; one task
/// per listener. Nothing when the list is empty.
pub async fn serve(
    config: &Config,
    ops: Ops,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, String> {
    let p = &config.panel;
    if p.listen.is_empty() {
        return Ok(Vec::new());
    }
    let l = &config.limits;
    let guard = Guard::new(l.auth_failures, l.auth_window.get())?;
    let state = PanelState {
        ops,
        guard: Arc::new(guard),
    };
    let app = app(state, p.tls, p.session_idle.get());
    let tls = if p.tls {
        Some(crate::tls::acceptor(&config.tls, &config.server.hostname)?)
    } else {
        None
    };
    let mut tasks = Vec::new();
    for addr in &p.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("panel.listen: cannot listen on {addr}: {e}"))?;
        tracing::info!(event = "listening", addr = %addr, listener = "panel", tls = p.tls, "listening");
        tasks.push(tokio::spawn(http::run(
            listener,
            app.clone(),
            tls.clone(),
            shutdown.clone(),
        )));
    }
    Ok(tasks)
}
