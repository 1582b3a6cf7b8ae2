//! The HTTP side of the panel: the headers every response carries, the
//! stylesheet and script compiled into the binary, and the listener (plain
//! HTTP, or HTTPS with the `[tls]` pair when `panel.tls = true`).

use std::{future::IntoFuture, net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::{ConnectInfo, Request},
    http::{HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// No inline script and no framing (SPEC §8); no referrer leaves the panel.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

const CSS: &str = include_str!("../../static/panel.css");
const JS: &str = include_str!("../../static/panel.js");

pub fn static_files() -> Router {
    Router::new()
        .route(
            "/static/panel.css",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/css; charset=utf-8"),
                        (header::CACHE_CONTROL, "max-age=300"),
                    ],
                    CSS,
                )
                    .into_response()
            }),
        )
        .route(
            "/static/panel.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "max-age=300"),
                    ],
                    JS,
                )
                    .into_response()
            }),
        )
}

/// How long open panel requests may go on after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves one listener until shutdown.
pub async fn run(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(tls) = tls else {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        let mut stop = shutdown.clone();
        let serve = axum::serve(listener, service)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .into_future();
        // Requests in progress may finish, for a short while: a client that
        // holds a connection open must not hold up the server's shutdown.
        tokio::select! {
            result = serve => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "panel stopped");
                }
            }
            _ = async {
                let _ = stop.changed().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("panel connections still open at shutdown; closing them");
            }
        }
        return;
    };
    while let Some((tcp, peer)) =
        crate::server::next_connection(&listener, &mut shutdown, "panel").await
    {
        let (tls, app, mut shutdown) = (tls.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            else {
                return;
            };
            let service = app.map_request(move |mut r: Request<hyper::body::Incoming>| {
                r.extensions_mut().insert(ConnectInfo(peer));
                r.map(axum::body::Body::new)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                }
            }
        });
    }
}
