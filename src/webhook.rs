//! `POST /webhook/stripe`: a verified `checkout.session.completed` (paid) or
//! `checkout.session.async_payment_succeeded` becomes `payment.event.success`;
//! `checkout.session.expired` and `checkout.session.async_payment_failed` are counted and
//! logged with the trip id; an event of the other mode than the secret key's is ignored.
//!
//! The answers match the Go api-gateway's, so Stripe's dashboard and the trip system see the
//! same thing, with its weaknesses fixed: an unpaid session publishes nothing, the event is
//! in the broker before Stripe hears 200 (otherwise 500, and Stripe retries), the event id
//! becomes the `message-id`, and an event id is published once whichever replica receives
//! it, and however often: the event goes to the outbox ([`crate::outbox`]), which publishes
//! it unless the ledger ([`crate::ledger`]) holds its id. An id the ledger already holds is
//! answered at once as a duplicate.
//!
//! Signatures are checked here as Stripe specifies (HMAC-SHA256 over `timestamp.payload`,
//! any `v1` entry may match, constant-time comparison, a timestamp tolerance, several secrets
//! during key rotation). async-stripe-webhook couples verification with a strict parse that
//! rejects events whose object lacks a field it expects; the Go gateway deliberately accepted
//! other API versions, so only the fields needed are read, leniently, after verification.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use hmac::{Hmac, Mac};
use lapin::types::FieldTable;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::{Mutex as AsyncMutex, Semaphore};
use tracing::field::Empty;
use tracing::{Instrument, error, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::broker::connect::Pool;
use crate::broker::headers::long_string;
use crate::broker::publish::{PublishError, Publisher, persistent_json};
use crate::broker::topology::Topology;
use crate::contract::{Envelope, PaymentSucceeded};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::trace;

/// The longest `Stripe-Signature` header read (Stripe's are a few hundred bytes).
const MAX_SIGNATURE_HEADER: usize = 4096;
/// The most `v1` entries read from it (one per signing secret of the endpoint).
const MAX_SIGNATURES: usize = 16;
/// The longest event id: it becomes the event's `message-id`, an AMQP short string.
const MAX_EVENT_ID: usize = 255;

/// How long the broker may take to confirm an event into the outbox before Stripe gets a 500.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Webhook settings.
#[derive(Clone)]
pub struct WebhookSettings {
    /// Signing secrets (`whsec_…`); any of them may have signed a request. Empty: the webhook
    /// answers 503.
    pub secrets: Vec<SecretString>,
    /// Largest accepted age (or future skew) of a signature's timestamp.
    pub tolerance: Duration,
    /// Webhook requests handled at once, bodies included; one more is answered 503 before
    /// its body is read (Stripe retries it), so memory stays within this many bodies.
    pub max_concurrent: usize,
    /// The mode of `STRIPE_SECRET_KEY` (`Some(true)`: live): an event of the other mode is
    /// answered and ignored. `None` (mock mode, or a key of no known form): not checked.
    pub livemode: Option<bool>,
}

/// The webhook handler's state.
pub struct Webhook {
    settings: WebhookSettings,
    topology: Arc<Topology>,
    pool: Pool,
    metrics: Arc<Metrics>,
    /// One confirm-mode channel, opened on first use and replaced when it breaks.
    publisher: AsyncMutex<Option<Publisher>>,
    /// The event ids published, for answering a duplicate at once.
    ledger: Arc<Ledger>,
    /// Permits for requests being handled (see [`WebhookSettings::max_concurrent`]).
    admitted: Arc<Semaphore>,
    /// An event of the other mode was logged.
    warned_mode: std::sync::atomic::AtomicBool,
}

/// How a webhook request ended: the answer to Stripe and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// In the outbox, to be published once.
    Published,
    /// The ledger holds the event id: published already.
    Duplicate,
    /// `checkout.session.completed` before the payment went through.
    Unpaid,
    /// No `trip_id` or `user_id` in the session's metadata.
    MissingMetadata,
    /// An event type the worker does not act on.
    IgnoredType,
    /// `checkout.session.expired`: the rider never paid; counted and logged.
    SessionExpired,
    /// `checkout.session.async_payment_failed`: the delayed payment failed; counted and logged.
    AsyncPaymentFailed,
    /// An event of the other mode (live against a test key, or the reverse): ignored.
    OtherMode,
    InvalidSignature,
    InvalidPayload,
    /// `STRIPE_WEBHOOK_KEY` is unset.
    NotConfigured,
    /// The body is larger than `WEBHOOK_MAX_BODY`.
    TooLarge,
    /// The body could not be read.
    Unreadable,
    /// The broker did not confirm the event into the outbox: Stripe should retry.
    PublishFailed,
    /// `WEBHOOK_MAX_CONCURRENT` requests are being handled: Stripe should retry.
    Busy,
}

impl Reply {
    /// The status Stripe gets, as the Go api-gateway answered.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Published
            | Self::Duplicate
            | Self::Unpaid
            | Self::MissingMetadata
            | Self::IgnoredType
            | Self::SessionExpired
            | Self::AsyncPaymentFailed
            | Self::OtherMode => StatusCode::OK,
            Self::InvalidSignature | Self::InvalidPayload => StatusCode::BAD_REQUEST,
            Self::NotConfigured | Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unreadable | Self::PublishFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body Stripe gets.
    pub fn body(self) -> &'static str {
        match self {
            Self::Published
            | Self::Duplicate
            | Self::Unpaid
            | Self::MissingMetadata
            | Self::IgnoredType
            | Self::SessionExpired
            | Self::AsyncPaymentFailed
            | Self::OtherMode => "ok",
            Self::InvalidSignature => "Invalid signature",
            Self::InvalidPayload => "Invalid payload",
            Self::NotConfigured => "Stripe webhook not configured",
            Self::TooLarge => "payload too large",
            Self::Unreadable => "cannot read body",
            Self::PublishFailed => "publish failed",
            Self::Busy => "busy, retry later",
        }
    }

    /// The label in `payment_worker_webhook_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Published => "published",
            Self::Duplicate => "duplicate",
            Self::Unpaid => "unpaid",
            Self::MissingMetadata => "missing_metadata",
            Self::IgnoredType => "ignored_type",
            Self::SessionExpired => "session_expired",
            Self::AsyncPaymentFailed => "async_payment_failed",
            Self::OtherMode => "other_mode",
            Self::InvalidSignature => "invalid_signature",
            Self::InvalidPayload => "invalid_payload",
            Self::NotConfigured => "not_configured",
            Self::TooLarge => "too_large",
            Self::Unreadable => "unreadable",
            Self::PublishFailed => "publish_failed",
            Self::Busy => "busy",
        }
    }
}

/// Why the event was not confirmed into the outbox.
#[derive(Debug, thiserror::Error)]
enum NotPublished {
    #[error("connecting: {0}")]
    Connect(crate::broker::connect::PoolError),
    #[error("opening a channel: {0}")]
    Channel(lapin::Error),
    #[error(transparent)]
    Publish(PublishError),
    #[error("the broker did not confirm within {0:?}")]
    Timeout(Duration),
}

/// A verified event that calls for `payment.event.success`.
pub struct PaidSession {
    pub event_id: String,
    pub success: PaymentSucceeded,
}

/// Reads a verified event: the fields needed, leniently. `Err` is the answer when it calls for
/// no publish.
pub fn read_event(body: &[u8]) -> Result<PaidSession, Reply> {
    let event = serde_json::from_slice::<Value>(body).map_err(|_| Reply::InvalidPayload)?;
    let event_id = event["id"].as_str().unwrap_or_default().to_owned();
    if event_id.len() > MAX_EVENT_ID {
        return Err(Reply::InvalidPayload);
    }
    let kind = event["type"].as_str().unwrap_or_default();
    let object = &event["data"]["object"];
    let completed = kind == "checkout.session.completed";
    let unpaid_end = match kind {
        "checkout.session.expired" => Some(Reply::SessionExpired),
        "checkout.session.async_payment_failed" => Some(Reply::AsyncPaymentFailed),
        _ => None,
    };
    if !completed && unpaid_end.is_none() && kind != "checkout.session.async_payment_succeeded" {
        return Err(Reply::IgnoredType);
    }
    let Some(session_id) = object["id"].as_str().filter(|_| object.is_object()) else {
        return Err(Reply::InvalidPayload);
    };
    if let Some(reply) = unpaid_end {
        let trip_id = object["metadata"]["trip_id"].as_str().unwrap_or_default();
        match reply {
            Reply::SessionExpired => {
                info!(event_id, session_id, trip_id, "checkout session expired unpaid")
            }
            _ => warn!(event_id, session_id, trip_id, "asynchronous payment failed"),
        }
        return Err(reply);
    }
    let payment_status = object["payment_status"].as_str().unwrap_or_default();
    if completed && !matches!(payment_status, "paid" | "no_payment_required") {
        info!(
            event_id,
            session_id,
            payment_status,
            "checkout completed but not paid yet; waiting for async_payment_succeeded"
        );
        return Err(Reply::Unpaid);
    }
    let success = paid_session(object)?;
    if success.trip_id.is_empty() || success.user_id.is_empty() {
        warn!(
            event_id,
            session_id,
            "checkout session has no trip_id or user_id in its metadata; nothing published"
        );
        return Err(Reply::MissingMetadata);
    }
    Ok(PaidSession { event_id, success })
}

/// The success event a paid Checkout Session `object` calls for, read leniently: what its
/// metadata lacks is empty, a currency defaults to `usd` and a region to `unspecified`.
fn paid_session(object: &Value) -> Result<PaymentSucceeded, Reply> {
    let amount_cents = object["amount_total"].as_i64().unwrap_or(0);
    if amount_cents < 0 {
        return Err(Reply::InvalidPayload);
    }
    let metadata = |key: &str| object["metadata"][key].as_str().unwrap_or_default().to_owned();
    Ok(PaymentSucceeded {
        trip_id: metadata("trip_id"),
        user_id: metadata("user_id"),
        driver_id: metadata("driver_id"),
        amount_cents,
        currency: object["currency"].as_str().filter(|c| !c.is_empty()).unwrap_or("usd").to_owned(),
        region: Some(metadata("region"))
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "unspecified".into()),
        package_slug: metadata("package_slug"),
    })
}

impl Webhook {
    pub fn new(
        settings: WebhookSettings,
        topology: Arc<Topology>,
        pool: Pool,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let admitted = Arc::new(Semaphore::new(settings.max_concurrent));
        let publisher = AsyncMutex::new(None);
        let warned_mode = std::sync::atomic::AtomicBool::new(false);
        Self { settings, topology, pool, metrics, publisher, ledger, admitted, warned_mode }
    }

    /// Handles one request.
    pub async fn handle(&self, headers: &HeaderMap, body: &Bytes) -> Reply {
        if self.settings.secrets.is_empty() {
            return Reply::NotConfigured;
        }
        let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
        // Hashing the body is CPU work: off the runtime's worker threads.
        let (signature, body_copy) = (signature.to_owned(), body.clone());
        let (secrets, tolerance) = (self.settings.secrets.clone(), self.settings.tolerance);
        let verified = tokio::task::spawn_blocking(move || {
            verify(&signature, &body_copy, &secrets, tolerance, unix_now())
        })
        .await
        .unwrap_or(Err("signature check failed"));
        if let Err(reason) = verified {
            warn!(reason, "webhook signature rejected");
            return Reply::InvalidSignature;
        }
        if let Some(reply) = self.other_mode(body) {
            return reply;
        }
        let paid = match read_event(body) {
            Ok(paid) => paid,
            Err(reply) => return reply,
        };
        if !paid.event_id.is_empty() && self.ledger.contains(&paid.event_id) {
            info!(
                event_id = paid.event_id,
                trip_id = %paid.success.trip_id,
                "duplicate webhook delivery; already published",
            );
            return Reply::Duplicate;
        }
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
        self.publish_success(&paid, traceparent).await
    }

    /// An event whose `livemode` is not the secret key's mode: answered and ignored (a test
    /// payment must never mark a live trip paid, nor the reverse). Logged once per process.
    fn other_mode(&self, body: &[u8]) -> Option<Reply> {
        let expected = self.settings.livemode?;
        let event: Value = serde_json::from_slice(body).ok()?;
        let livemode = event["livemode"].as_bool()?;
        if livemode == expected {
            return None;
        }
        if !self.warned_mode.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn!(
                event_id = event["id"].as_str().unwrap_or_default(),
                event_livemode = livemode,
                key_livemode = expected,
                "a webhook event of the other mode than STRIPE_SECRET_KEY's is ignored (is the \
                 endpoint registered in both modes?); counted as result=\"other_mode\", logged \
                 once"
            );
        }
        Some(Reply::OtherMode)
    }

    /// Hands `payment.event.success` to the outbox, confirmed.
    async fn publish_success(&self, paid: &PaidSession, traceparent: Option<&str>) -> Reply {
        let (event_id, success) = (&paid.event_id, &paid.success);
        let publish = self.publish(event_id, success, traceparent);
        let published = tokio::time::timeout(PUBLISH_TIMEOUT, publish)
            .await
            .unwrap_or(Err(NotPublished::Timeout(PUBLISH_TIMEOUT)));
        match published {
            Ok(()) => {
                info!(
                    event_id,
                    trip_id = %success.trip_id,
                    amount_cents = success.amount_cents,
                    "payment success handed to the outbox",
                );
                Reply::Published
            }
            Err(e) => {
                error!(
                    event_id,
                    trip_id = %success.trip_id,
                    error = %e,
                    "payment success not confirmed by the broker; answering 500 so Stripe retries",
                );
                Reply::PublishFailed
            }
        }
    }

    /// Hands `payment.event.success` for `event_id` to the outbox, exactly as it will be
    /// published. The event carries the request's trace: the producer span's context when
    /// spans are exported, else the request's `traceparent` continued.
    async fn publish(
        &self,
        event_id: &str,
        success: &PaymentSucceeded,
        traceparent: Option<&str>,
    ) -> Result<(), NotPublished> {
        let (body, properties) = success_message(event_id, success, traceparent);
        let routing_key = &self.topology.success.outbox;
        let span = trace::producer_span("", routing_key, "event");
        let mut slot = self.publisher.lock().await;
        if slot.as_ref().is_none_or(|p| !p.channel().status().connected()) {
            let connection = self.pool.get().await.map_err(NotPublished::Connect)?;
            *slot = Some(Publisher::open(&connection).await.map_err(NotPublished::Channel)?);
        }
        let publisher = slot.as_ref().expect("just opened");
        let target = ("", routing_key.as_str());
        let result =
            trace::publish(publisher, target, &body, properties, span, &self.metrics).await;
        if result.as_ref().is_err_and(PublishError::is_channel_failure) {
            *slot = None;
        }
        result.map_err(NotPublished::Publish)
    }
}

/// The body and properties of `payment.event.success` for a Stripe event: the `message-id`
/// is the event id, and the trace continues `traceparent` when one came with it.
pub fn success_message(
    event_id: &str,
    success: &PaymentSucceeded,
    traceparent: Option<&str>,
) -> (Vec<u8>, lapin::BasicProperties) {
    let body = Envelope::encode(&success.user_id, success);
    let mut properties = persistent_json();
    if !event_id.is_empty() {
        properties = properties.with_message_id(event_id.into());
    }
    if let Some(child) = traceparent.and_then(trace::continue_trace) {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), long_string(&child));
        properties = properties.with_headers(headers);
    }
    (body, properties)
}

/// Admits a webhook request before its body is read, while fewer than
/// `WEBHOOK_MAX_CONCURRENT` are being handled; answers 503 `busy` otherwise.
pub async fn admission(
    State(webhook): State<Arc<Webhook>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = webhook.admitted.clone().try_acquire_owned() else {
        let reply = Reply::Busy;
        webhook.metrics.webhook_requests.with_label_values(&[reply.as_str()]).inc();
        return (reply.status(), [(RETRY_AFTER, "1")], reply.body()).into_response();
    };
    next.run(request).await
}

/// The axum handler. The body limit is a layer on the route; a body over it is 413 and never
/// parsed, a body that cannot be read is 500 (as in the Go gateway).
pub async fn endpoint(
    State(webhook): State<Arc<Webhook>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> (StatusCode, &'static str) {
    let span = info_span!(
        "webhook",
        otel.name = "POST /webhook/stripe",
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        http.request.method = "POST",
        http.route = "/webhook/stripe",
        http.response.status_code = Empty,
        webhook.result = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(&headers))
    });
    let _ = span.set_parent(parent);
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    trace::record_ids(&span, traceparent);
    let reply = match body {
        Ok(body) => webhook.handle(&headers, &body).instrument(span.clone()).await,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Reply::TooLarge,
        Err(_) => Reply::Unreadable,
    };
    webhook.metrics.webhook_requests.with_label_values(&[reply.as_str()]).inc();
    span.record("http.response.status_code", reply.status().as_u16());
    span.record("webhook.result", reply.as_str());
    if reply.status().is_server_error() {
        trace::failed(&span, &reply.as_str());
    }
    (reply.status(), reply.body())
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Checks a `Stripe-Signature` header (`t=…,v1=…[,v1=…]`) against the body.
///
/// # Errors
/// A short reason: missing or malformed header, stale timestamp, or no matching signature.
pub fn verify(
    header: &str,
    body: &[u8],
    secrets: &[SecretString],
    tolerance: Duration,
    now: i64,
) -> Result<(), &'static str> {
    if header.is_empty() {
        return Err("missing Stripe-Signature header");
    }
    if header.len() > MAX_SIGNATURE_HEADER {
        return Err("Stripe-Signature header too long");
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => {
                if signatures.len() == MAX_SIGNATURES {
                    return Err("too many v1 signatures in Stripe-Signature");
                }
                if let Ok(bytes) = hex::decode(value) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or("no timestamp in Stripe-Signature")?;
    if signatures.is_empty() {
        return Err("no v1 signature in Stripe-Signature");
    }
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.abs_diff(timestamp) > tolerance.unsigned_abs() {
        return Err("timestamp outside the tolerance");
    }
    // One HMAC over the body per secret; each candidate is compared against a copy of its
    // state (`verify_slice` compares in constant time).
    for secret in secrets {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if signatures.iter().any(|signature| mac.clone().verify_slice(signature).is_ok()) {
            return Ok(());
        }
    }
    Err("no signature matches")
}

/// The `Stripe-Signature` header Stripe would send for `body` at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter().map(|s| SecretString::from((*s).to_owned())).collect()
    }

    const TOLERANCE: Duration = Duration::from_secs(300);

    #[test]
    fn accepts_a_valid_signature_and_rejects_the_rest() {
        let body = br#"{"id":"evt_1"}"#;
        let header = sign("whsec_a", 1000, body);
        assert_eq!(verify(&header, body, &secrets(&["whsec_a"]), TOLERANCE, 1000), Ok(()));
        assert!(
            verify(&header, body, &secrets(&["whsec_b"]), TOLERANCE, 1000).is_err(),
            "wrong secret"
        );
        assert!(
            verify(&header, b"{}", &secrets(&["whsec_a"]), TOLERANCE, 1000).is_err(),
            "tampered body"
        );
        assert!(verify(&header, body, &secrets(&["whsec_a"]), TOLERANCE, 1301).is_err(), "stale");
        assert!(
            verify(&header, body, &secrets(&["whsec_a"]), TOLERANCE, 699).is_err(),
            "from the future"
        );
        assert!(verify("", body, &secrets(&["whsec_a"]), TOLERANCE, 1000).is_err(), "missing");
        assert!(
            verify("garbage", body, &secrets(&["whsec_a"]), TOLERANCE, 1000).is_err(),
            "malformed"
        );
        assert!(verify("t=1000", body, &secrets(&["whsec_a"]), TOLERANCE, 1000).is_err(), "no v1");
    }

    #[test]
    fn any_v1_entry_and_any_secret_may_match() {
        let body = b"payload";
        let good = sign("whsec_new", 50, body);
        let good_v1 = good.split("v1=").nth(1).unwrap();
        let header = format!("t=50,v1={},v1={good_v1},v0=abc", "00".repeat(32));
        assert_eq!(
            verify(&header, body, &secrets(&["whsec_old", "whsec_new"]), TOLERANCE, 60),
            Ok(())
        );
    }
}
