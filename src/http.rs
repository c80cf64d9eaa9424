//! The HTTP server: liveness, readiness, metrics and the Stripe webhook, bounded against
//! clients that are slow or many.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tracing::warn;

use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::webhook::{self, Webhook};

/// What the HTTP handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
}

/// How much the HTTP server gives one client, and all of them.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers; a connection that sends
    /// none within it is closed.
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body.
    pub body_timeout: Duration,
    /// Largest webhook body, in bytes.
    pub max_body: usize,
}

/// `/healthz`, `/readyz`, `/metrics` and `POST /webhook/stripe`: a webhook body up to
/// `limits.max_body`, sent within `limits.body_timeout`, and only while the webhook admits
/// the request (see [`webhook::admission`]).
pub fn router(state: HttpState, webhook: Arc<Webhook>, limits: HttpLimits) -> Router {
    let webhook = Router::new()
        .route("/webhook/stripe", post(webhook::endpoint))
        .layer(DefaultBodyLimit::max(limits.max_body))
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .layer(middleware::from_fn_with_state(webhook.clone(), webhook::admission))
        .with_state(webhook);
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(webhook);
    catch_panics(routes)
}

/// Serves `app` on `listener` until `stop`, within `limits`: at most `max_connections` at
/// once (one more is closed at once and counted in
/// `payment_worker_http_connections_refused_total`), each closed when a request's headers
/// take longer than `header_timeout`. On `stop`, requests in flight get up to
/// [`HTTP_DRAIN`] to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: give the others a moment to close.
                warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            metrics.http_connections_refused.inc();
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(HTTP_DRAIN, graceful.shutdown()).await.is_err() {
        warn!(waited_ms = HTTP_DRAIN.as_millis() as u64, "HTTP connections still open at stop");
    }
}

/// How long a stop waits for HTTP requests in flight.
pub const HTTP_DRAIN: Duration = Duration::from_secs(3);

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
