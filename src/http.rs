//! The HTTP server: liveness, readiness, metrics and the Stripe webhook.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

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
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(webhook)
}

/// The process is alive and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Connected, topology declared, consumer running; else 503 with the reason.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}
