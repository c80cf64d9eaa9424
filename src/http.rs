//! The HTTP server: liveness, readiness, metrics and the Stripe webhook.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;

use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::webhook::{self, Webhook};

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
}

/// `/healthz`, `/readyz`, `/metrics` and `POST /webhook/stripe` (bodies up to `max_body`).
pub fn router(state: HttpState, webhook: Arc<Webhook>, max_body: usize) -> Router {
    let webhook = Router::new()
        .route("/webhook/stripe", post(webhook::endpoint))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(webhook);
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(webhook);
    catch_panics(routes)
}

/// A handler that panics answers 500 instead of dropping the connection (Stripe then retries
/// the webhook).
fn catch_panics(routes: Router) -> Router {
    routes.layer(CatchPanicLayer::new())
}

/// The process is alive and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Connected, topology declared, consumer running; else 503 with the reason.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    match state.readiness.check() {
        Ok(what) => (StatusCode::OK, format!("ready: {what}\n")),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500() {
        async fn boom() -> &'static str {
            panic!("a handler's bug")
        }
        let routes = Router::new().route("/boom", get(boom));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, catch_panics(routes)).await });
        let answer = testkit::http_get(addr, "/boom").await.map(|(status, _)| status);
        assert_eq!(answer, Some(500), "a 500, not a dropped connection");
    }
}
