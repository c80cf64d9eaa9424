//! Creating Stripe Checkout Sessions, idempotently by trip.
//!
//! async-stripe's request types (`async-stripe-checkout`) build and form-encode the call. The
//! HTTP exchange itself is done here, on a pooled hyper client, because async-stripe's bundled
//! client drops the `Stripe-Should-Retry` header of a single-attempt request (the worker must
//! honour it: the retry happens in the broker, not in the client) and opens a new connection
//! for every call. Only the fields the worker needs are read from the answer, so a session
//! object from a newer API version still parses.
//!
//! In front of the client, per replica: [`flow`] grades Stripe's health and decides whether a
//! call may go, from [`breaker`] (the circuit over Stripe-wide failures) and [`pacer`] (the
//! adaptive request rate).

pub mod breaker;
pub mod flow;
pub mod pacer;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionLineItemsPriceData,
    CreateCheckoutSessionPaymentIntentData, ProductData,
};
use stripe_client_core::{StripeMethod, StripeRequest};
use stripe_shared::CheckoutSessionMode;
use tokio::sync::watch;
use tracing::field::Empty;
use tracing::{Instrument, Span, info, info_span};

use crate::contract::CreateSession;
use crate::error_chain;
use crate::metrics::Metrics;
use crate::stripe::breaker::{Caller, Signal, Spread, State};
use crate::stripe::flow::FlowControl;
use crate::trace;

/// Stripe's own API, the default base URL.
pub const STRIPE_API: &str = "https://api.stripe.com/";
/// The name of the single line item, as the Go service named it.
pub const LINE_ITEM_NAME: &str = "Ride Payment";
/// Session ids in mock mode; the rider's browser recognises the prefix.
pub const MOCK_SESSION_PREFIX: &str = "cs_test_mock_session_";

/// The Stripe-Version this build speaks.
pub fn api_version() -> String {
    stripe_client_core::VERSION.to_string()
}

/// Where checkout sends the rider afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutUrls {
    pub success: String,
    pub cancel: String,
}

/// A created (or replayed) Checkout Session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// Whether Stripe said this answer is a replay of an earlier request with the same key.
    pub replayed: bool,
}

/// Why creating a session failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StripeError {
    /// The request did not get an answer: the connection failed, or the request could not be
    /// built. The text shows the whole chain of causes; the first is the source.
    #[error("connecting to Stripe failed: {}", error_chain(.0.as_ref()))]
    Transport(#[source] Arc<dyn std::error::Error + Send + Sync>),
    #[error("Stripe did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Stripe answered {status}{}: {message}", describe_kind(.kind, .code))]
    Api {
        status: u16,
        /// The `Stripe-Should-Retry` header, when Stripe sent one.
        should_retry: Option<bool>,
        /// The `Retry-After` header in seconds, when Stripe sent one.
        retry_after: Option<Duration>,
        /// `Idempotent-Replayed: true`: Stripe's saved answer for this key, which will not
        /// change however often the request is sent again.
        replayed: bool,
        /// `error.type`: `api_error`, `invalid_request_error`, `idempotency_error`, …
        kind: Option<String>,
        code: Option<String>,
        message: String,
    },
    #[error("Stripe's answer could not be read: {0}")]
    BadResponse(String),
}

fn describe_kind(kind: &Option<String>, code: &Option<String>) -> String {
    match (kind, code) {
        (Some(kind), Some(code)) => format!(" {kind}/{code}"),
        (Some(kind), None) => format!(" {kind}"),
        _ => String::new(),
    }
}

impl StripeError {
    /// A request that got no answer, because of `cause`.
    pub fn transport(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Transport(Arc::from(cause.into()))
    }

    /// Whether the same request may succeed later. `Stripe-Should-Retry` decides when Stripe
    /// sent it; otherwise 409 (a concurrent request with the same key), 424, 429 and 5xx are
    /// transient and every other 4xx is permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Timeout(_) => true,
            Self::Api { replayed: true, .. } => false,
            Self::Api { should_retry: Some(retry), .. } => *retry,
            Self::Api { status, .. } => matches!(status, 409 | 424 | 429 | 500..=599),
            Self::BadResponse(_) => false,
        }
    }

    /// What the failure says about Stripe as a whole: a timeout, a connection error or a 5xx
    /// (unless `Stripe-Should-Retry: false` or `Idempotent-Replayed: true` marks a saved
    /// answer for this request) is Stripe failing; a 429 is Stripe asking to slow down;
    /// anything else is an answer about this request. A replayed answer comes from Stripe's
    /// idempotency store: Stripe is up, and the answer is about this key alone.
    pub fn signal(&self) -> Signal {
        match self {
            Self::Transport(_) | Self::Timeout(_) => Signal::Failed,
            Self::Api { replayed: true, .. } => Signal::Answered,
            Self::Api { status: 429, .. } => Signal::Throttled,
            Self::Api { status: 500.., should_retry, .. } if *should_retry != Some(false) => {
                Signal::Failed
            }
            Self::Api { .. } | Self::BadResponse(_) => Signal::Answered,
        }
    }

    /// How long Stripe asked to wait (`Retry-After`) on a 429 or a 503, the answers about the
    /// rate and Stripe's load; on any other status it is ignored (a 400 that carries one says
    /// nothing about when other payments may go).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { status: 429 | 503, retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A server error Stripe saved under this trip's key and replays: every retry with the
    /// key gets it again, until Stripe forgets the key (24 hours at the earliest).
    pub fn is_replayed_server_error(&self) -> bool {
        matches!(self, Self::Api { status: 500.., replayed: true, .. })
    }

    /// An `idempotency_error`: the trip's key is in use by a concurrent request (a 409,
    /// transient) or was first used with other parameters (a changed amount).
    pub fn is_idempotency_conflict(&self) -> bool {
        matches!(self, Self::Api { kind: Some(kind), .. } if kind == "idempotency_error")
    }

    /// The trip's key was first used with other parameters: the `idempotency_error` that no
    /// retry with the same request can change (not the 409 of a concurrent request).
    pub fn is_parameter_mismatch(&self) -> bool {
        self.is_idempotency_conflict() && !self.is_transient()
    }

    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Transport(_) => "transport",
            Self::Timeout(_) => "timeout",
            Self::Api { status: 429, .. } => "rate_limited",
            Self::Api { status: 500.., .. } => "server_error",
            Self::Api { .. } if self.is_idempotency_conflict() => "idempotency_conflict",
            Self::Api { .. } => "client_error",
            Self::BadResponse(_) => "bad_response",
        }
    }
}

/// Why no session came back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The circuit breaker is open: Stripe was not called.
    #[error("Stripe's circuit is open; not called")]
    CircuitOpen,
    /// Stripe was called and failed; `spread` says, for a Stripe-wide failure, whether it
    /// stood alone.
    #[error("{error}")]
    Stripe { error: StripeError, spread: Spread },
}

/// The Checkout event types the webhook acts on or counts, and `payment-worker reconcile`
/// lists: a bounded set, used as a metric label.
pub const EVENT_TYPES: [&str; 4] = [
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.expired",
    "checkout.session.async_payment_failed",
];

/// The mode a Stripe secret or restricted key works in: `Some(true)` for `sk_live_`/`rk_live_`,
/// `Some(false)` for `sk_test_`/`rk_test_`, `None` for a key of no known form.
pub fn key_livemode(key: &str) -> Option<bool> {
    ["sk_live_", "rk_live_"]
        .iter()
        .any(|p| key.starts_with(p))
        .then_some(true)
        .or_else(|| ["sk_test_", "rk_test_"].iter().any(|p| key.starts_with(p)).then_some(false))
}

/// Who creates sessions: Stripe's API behind flow control, or mock mode. Records the
/// `payment_worker_stripe_*` metrics of every call.
pub struct Gateway {
    backend: Backend,
    metrics: Arc<Metrics>,
}

enum Backend {
    Stripe(Box<(StripeApi, FlowControl)>),
    /// Deterministic fake sessions (`cs_test_mock_session_<trip id>`) for local runs.
    Mock,
}

/// Counts a call in flight for as long as it lives, however the call ends (a task aborted
/// mid-call included).
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn start(metrics: &'a Metrics) -> Self {
        metrics.stripe_in_flight.inc();
        Self(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.stripe_in_flight.dec();
    }
}

impl Gateway {
    pub fn stripe(api: StripeApi, flow: FlowControl, metrics: Arc<Metrics>) -> Self {
        Self { backend: Backend::Stripe(Box::new((api, flow))), metrics }
    }

    pub fn mock(metrics: Arc<Metrics>) -> Self {
        Self { backend: Backend::Mock, metrics }
    }

    /// Creates the session for `cmd`, or gets the one already created for its trip. Waits for
    /// the circuit breaker and the rate limiter first. `suspect`: this payment spent an
    /// attempt already, so its failures are evidence about it, not about Stripe.
    ///
    /// # Errors
    /// See [`CallError`]; mock mode never fails.
    pub async fn create_session(
        &self,
        cmd: &CreateSession,
        urls: &CheckoutUrls,
        suspect: bool,
    ) -> Result<Session, CallError> {
        let Backend::Stripe(stripe) = &self.backend else {
            self.metrics.stripe_requests.with_label_values(&["created"]).inc();
            return Ok(Session {
                id: format!("{MOCK_SESSION_PREFIX}{}", cmd.trip_id),
                replayed: false,
            });
        };
        let (api, flow) = &**stripe;
        let permit = flow.admit(suspect).await.ok_or(CallError::CircuitOpen)?;
        let span = client_span(api, &cmd.trip_id);
        let result = {
            let _in_flight = InFlight::start(&self.metrics);
            let started = Instant::now();
            let result = api.create_checkout_session(cmd, urls).instrument(span.clone()).await;
            self.metrics.stripe_duration.observe(started.elapsed().as_secs_f64());
            result
        };
        let (signal, retry_after) = match &result {
            Ok(_) => (Signal::Answered, None),
            Err(e) => (e.signal(), e.retry_after()),
        };
        let spread = permit.finish(signal, retry_after, Caller { payment: &cmd.trip_id, suspect });
        self.metrics.stripe_requests.with_label_values(&[record_result(&span, &result)]).inc();
        result.map_err(|error| CallError::Stripe { error, spread })
    }

    pub fn is_mock(&self) -> bool {
        matches!(self.backend, Backend::Mock)
    }

    /// How many replicas consume the work queue: see [`FlowControl::set_replicas`]. Mock
    /// mode has no rate.
    pub fn set_replicas(&self, replicas: u32, join: Option<Duration>) {
        if let Backend::Stripe(stripe) = &self.backend {
            stripe.1.set_replicas(replicas, join);
        }
    }

    /// The circuit breaker's state; `None` in mock mode, which has none.
    pub fn circuit(&self) -> Option<watch::Receiver<State>> {
        match &self.backend {
            Backend::Stripe(stripe) => Some(stripe.1.circuit()),
            Backend::Mock => None,
        }
    }
}

/// The Idempotency-Key for a trip: the same on every attempt and every redelivery, so Stripe
/// returns the first session however often the command is processed.
pub fn idempotency_key(trip_id: &str) -> String {
    format!("payment-worker:checkout-session:{trip_id}")
}

/// Which parameters a Checkout Session request carries. Stripe saves the parameters of the
/// first request under the trip's idempotency key and answers `idempotency_error` to a later
/// request with others, so a version that sends new parameters must still get the sessions an
/// older version created (payments waiting in the retry tiers during a rolling upgrade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamSet {
    /// This version's: the trip's metadata on the session and on its PaymentIntent
    /// (`payment_intent_data[metadata]`), so refunds, disputes and charges lead to the trip.
    Current,
    /// The one before: metadata on the session only. Tried once after an
    /// `idempotency_error` to the current set.
    Previous,
}

/// The Checkout Session parameters for a command: the same command always gives the same
/// parameters, which Stripe's idempotency check requires (the same bytes once
/// [`metadata_in_order`] has ordered the metadata).
pub fn checkout_params(
    cmd: &CreateSession,
    urls: &CheckoutUrls,
    set: ParamSet,
) -> CreateCheckoutSession {
    let mut price = CreateCheckoutSessionLineItemsPriceData::new(cmd.currency.stripe().clone());
    price.product_data = Some(ProductData::new(LINE_ITEM_NAME));
    price.unit_amount = Some(cmd.amount.get());
    let mut item = CreateCheckoutSessionLineItems::new();
    item.price_data = Some(price);
    item.quantity = Some(1);
    let mut metadata = HashMap::from([
        ("trip_id".to_owned(), cmd.trip_id.clone()),
        ("user_id".to_owned(), cmd.user_id.clone()),
    ]);
    // Stripe treats an empty metadata value as "unset", so empty values are left out.
    if !cmd.driver_id.is_empty() {
        metadata.insert("driver_id".into(), cmd.driver_id.clone());
    }
    let trip = metadata.clone();
    if let Some(slug) = &cmd.package_slug {
        metadata.insert("package_slug".into(), slug.clone());
    }
    let params = CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Payment)
        .line_items(vec![item])
        .success_url(urls.success.clone())
        .cancel_url(urls.cancel.clone())
        .client_reference_id(cmd.trip_id.clone())
        .metadata(metadata);
    match set {
        ParamSet::Previous => params,
        ParamSet::Current => {
            let mut intent = CreateCheckoutSessionPaymentIntentData::new();
            intent.metadata = Some(trip);
            params.payment_intent_data(intent)
        }
    }
}

/// The form body of the request for `cmd` with the parameter set `set`, as sent.
pub fn checkout_form(cmd: &CreateSession, urls: &CheckoutUrls, set: ParamSet) -> String {
    metadata_in_order(&checkout_params(cmd, urls, set).build().body.unwrap_or_default())
}

/// The form body with the fields of each metadata map (`metadata[…]`,
/// `payment_intent_data[metadata][…]`) in the order of their names. async-stripe keeps
/// metadata in a `HashMap`, whose order differs from one process to the next; Stripe compares
/// a retried request's parameters with the first one's, so every replica must send the same
/// bytes for the same trip. The fields of one map are written next to each other, so sorting
/// them in place changes nothing else.
pub fn metadata_in_order(form: &str) -> String {
    /// The map a field belongs to, if it is a metadata field.
    fn map_of(field: &str) -> Option<&'static str> {
        const MAPS: [&str; 4] = [
            "metadata[",
            "metadata%5B",
            "payment_intent_data[metadata][",
            "payment_intent_data%5Bmetadata%5D%5B",
        ];
        MAPS.into_iter().find(|prefix| field.starts_with(prefix))
    }
    let mut fields: Vec<&str> = form.split('&').collect();
    let mut start = 0;
    while start < fields.len() {
        let Some(map) = map_of(fields[start]) else {
            start += 1;
            continue;
        };
        let count = fields[start..].iter().take_while(|f| map_of(f) == Some(map)).count();
        fields[start..start + count].sort_unstable();
        start += count;
    }
    fields.join("&")
}

/// Whether `id` looks like a Checkout Session id (`cs_test_…`, `cs_live_…`): `cs_`, then
/// ASCII letters, digits and `_`, at most 255 bytes in all. The rider is sent a URL built from
/// it, so an empty, binary or otherwise strange id is a broken answer, never passed on.
pub fn is_session_id(id: &str) -> bool {
    id.len() <= 255
        && id.strip_prefix("cs_").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// A Stripe API base URL that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidBase(String);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Stripe's HTTP API at a configurable base URL.
pub struct StripeApi {
    client: HttpsClient,
    /// Ends with `/`; request paths are appended after `v1`.
    base: String,
    secret: SecretString,
    /// Per call, connection and body included.
    timeout: Duration,
}

impl fmt::Debug for StripeApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeApi")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct SessionObject {
    id: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

impl StripeApi {
    /// # Errors
    /// When `base` is not an absolute http(s) URL.
    pub fn new(base: &str, secret: SecretString, timeout: Duration) -> Result<Self, InvalidBase> {
        let mut base = base.to_owned();
        if !base.ends_with('/') {
            base.push('/');
        }
        let uri: hyper::Uri =
            base.parse().map_err(|e| InvalidBase(format!("{base:?} is not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(InvalidBase(format!("{base:?} is not an absolute http or https URL")));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self { client, base, secret, timeout })
    }

    /// The Checkout Sessions endpoint (no credentials in it).
    pub fn sessions_url(&self) -> String {
        format!("{}v1/checkout/sessions", self.base)
    }

    /// `POST /v1/checkout/sessions` with the trip's idempotency key.
    ///
    /// # Errors
    /// See [`StripeError`].
    pub async fn create_checkout_session(
        &self,
        cmd: &CreateSession,
        urls: &CheckoutUrls,
    ) -> Result<Session, StripeError> {
        match self.post_session(cmd, urls, ParamSet::Current).await {
            Err(error) if error.is_parameter_mismatch() => {
                // Perhaps created by the version before, with its parameters: ask once more
                // with those. A real conflict (another amount) is a conflict with both.
                match self.post_session(cmd, urls, ParamSet::Previous).await {
                    Ok(session) => {
                        info!(trip_id = %cmd.trip_id, "session created with the previous parameters");
                        Ok(session)
                    }
                    Err(_) => Err(error),
                }
            }
            other => other,
        }
    }

    /// One `POST /v1/checkout/sessions` with the parameter set `set`.
    async fn post_session(
        &self,
        cmd: &CreateSession,
        urls: &CheckoutUrls,
        set: ParamSet,
    ) -> Result<Session, StripeError> {
        let request = checkout_params(cmd, urls, set).build();
        debug_assert!(matches!(request.method, StripeMethod::Post));
        let uri = format!("{}v1{}", self.base, request.path);
        let form = metadata_in_order(&request.body.unwrap_or_default());
        let http_request = self
            .request(hyper::Method::POST, uri)?
            .header("Idempotency-Key", idempotency_key(&cmd.trip_id))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(StripeError::transport)?;
        let answer = self.exchange(http_request).await?;
        if (200..300).contains(&answer.status) {
            let session: SessionObject = serde_json::from_slice(&answer.body)
                .map_err(|e| StripeError::BadResponse(format!("session object: {e}")))?;
            if !is_session_id(&session.id) {
                let shown: String = session.id.chars().take(80).collect();
                return Err(StripeError::BadResponse(format!(
                    "the session id {shown:?} is not a Checkout Session id"
                )));
            }
            return Ok(Session { id: session.id, replayed: answer.replayed });
        }
        Err(answer.error())
    }

    /// One page of `GET /v1/events`, newest first.
    ///
    /// # Errors
    /// See [`StripeError`].
    pub async fn list_events(&self, query: &EventQuery<'_>) -> Result<EventPage, StripeError> {
        let uri = format!("{}v1/events?{}", self.base, query.encode());
        let http_request = self
            .request(hyper::Method::GET, uri)?
            .body(Full::new(Bytes::new()))
            .map_err(StripeError::transport)?;
        let answer = self.exchange(http_request).await?;
        if (200..300).contains(&answer.status) {
            return serde_json::from_slice(&answer.body)
                .map_err(|e| StripeError::BadResponse(format!("event list: {e}")));
        }
        Err(answer.error())
    }

    /// A request to Stripe with the headers every call carries: the key, the user agent and
    /// the API version.
    fn request(
        &self,
        method: hyper::Method,
        uri: String,
    ) -> Result<hyper::http::request::Builder, StripeError> {
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", self.secret.expose_secret())).map_err(
                |_| StripeError::transport("STRIPE_SECRET_KEY is not a valid header value"),
            )?;
        authorization.set_sensitive(true);
        Ok(hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, authorization)
            .header(USER_AGENT, concat!("payment-worker/", env!("CARGO_PKG_VERSION")))
            .header("Stripe-Version", api_version()))
    }

    /// Sends a request and reads the whole answer within the timeout.
    async fn exchange(&self, request: hyper::Request<Full<Bytes>>) -> Result<Answer, StripeError> {
        let exchange = async {
            let response = self.client.request(request).await.map_err(StripeError::transport)?;
            let status = response.status().as_u16();
            let header = |name: &str| {
                response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
            };
            let span = Span::current();
            span.record("http.response.status_code", status);
            if let Some(request_id) = header("request-id") {
                span.record("stripe.request_id", request_id.as_str());
            }
            let should_retry = header("stripe-should-retry").and_then(|v| v.parse().ok());
            let replayed = header("idempotent-replayed").is_some_and(|v| v == "true");
            // Seconds only: Stripe does not send the HTTP-date form.
            let retry_after = header("retry-after")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body =
                response.into_body().collect().await.map_err(StripeError::transport)?.to_bytes();
            Ok(Answer { status, should_retry, retry_after, replayed, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| StripeError::Timeout(self.timeout))?
    }
}

/// Stripe's answer to one request.
struct Answer {
    status: u16,
    should_retry: Option<bool>,
    retry_after: Option<Duration>,
    replayed: bool,
    body: Bytes,
}

impl Answer {
    /// The error a non-2xx answer stands for.
    fn error(self) -> StripeError {
        let detail = serde_json::from_slice::<ErrorBody>(&self.body).ok().map(|b| b.error);
        StripeError::Api {
            status: self.status,
            should_retry: self.should_retry,
            retry_after: self.retry_after,
            replayed: self.replayed,
            kind: detail.as_ref().and_then(|d| d.kind.clone()),
            code: detail.as_ref().and_then(|d| d.code.clone()),
            message: detail
                .and_then(|d| d.message)
                .unwrap_or_else(|| String::from_utf8_lossy(&self.body).chars().take(200).collect()),
        }
    }
}

/// The filters of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventQuery<'a> {
    /// `types[]`: at most 20.
    pub types: &'a [&'a str],
    /// `created[gte]`, seconds since the Unix epoch.
    pub created_gte: i64,
    /// `delivery_success`: `Some(false)` lists events whose webhooks are pending or failed.
    pub delivery_success: Option<bool>,
    /// 1 to 100.
    pub limit: u8,
    /// The last event id of the previous page.
    pub starting_after: Option<&'a str>,
}

impl EventQuery<'_> {
    /// The query string, form-encoded as Stripe reads it.
    pub fn encode(&self) -> String {
        let mut pairs: Vec<(&str, String)> =
            self.types.iter().map(|t| ("types%5B%5D", form_value(t))).collect();
        pairs.push(("created%5Bgte%5D", self.created_gte.to_string()));
        if let Some(delivered) = self.delivery_success {
            pairs.push(("delivery_success", delivered.to_string()));
        }
        pairs.push(("limit", self.limit.to_string()));
        if let Some(after) = self.starting_after {
            pairs.push(("starting_after", form_value(after)));
        }
        pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
    }
}

/// Percent-encodes a query value: letters, digits and `-._~` stay as they are.
fn form_value(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One page of events, each kept as Stripe sent it.
#[derive(Debug, Deserialize)]
pub struct EventPage {
    pub data: Vec<serde_json::Value>,
    pub has_more: bool,
}

/// The client span of one Checkout Session call, with its trace ids recorded for the logs.
fn client_span(api: &StripeApi, trip_id: &str) -> Span {
    let span = info_span!(
        "stripe",
        otel.name = "POST",
        otel.kind = "client",
        otel.status_code = Empty,
        otel.status_description = Empty,
        http.request.method = "POST",
        url.full = %api.sessions_url(),
        http.response.status_code = Empty,
        stripe.request_id = Empty,
        stripe.idempotency_key = %idempotency_key(trip_id),
        stripe.replayed = Empty,
        payment.failure_class = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    trace::record_ids(&span, None);
    span
}

/// Records a call's `result` on its span; the label it is counted under.
fn record_result(span: &Span, result: &Result<Session, StripeError>) -> &'static str {
    let label = match result {
        Ok(session) if session.replayed => "replayed",
        Ok(_) => "created",
        Err(e) => e.metric_label(),
    };
    match result {
        Ok(session) => {
            span.record("stripe.replayed", session.replayed);
        }
        Err(e) => {
            span.record("payment.failure_class", label);
            trace::failed(span, e);
        }
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_and_restricted_keys_tell_their_mode() {
        assert_eq!(key_livemode("sk_live_abc"), Some(true));
        assert_eq!(key_livemode("rk_live_abc"), Some(true));
        assert_eq!(key_livemode("sk_test_abc"), Some(false));
        assert_eq!(key_livemode("rk_test_abc"), Some(false));
        assert_eq!(key_livemode("whatever"), None);
    }

    fn api(status: u16, should_retry: Option<bool>, kind: Option<&str>) -> StripeError {
        StripeError::Api {
            status,
            should_retry,
            retry_after: None,
            replayed: false,
            kind: kind.map(str::to_owned),
            code: None,
            message: "m".into(),
        }
    }

    #[test]
    fn a_transport_failure_keeps_its_source_and_shows_the_chain() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = StripeError::transport(refused);
        let source = std::error::Error::source(&error).expect("the cause is kept");
        assert_eq!(source.to_string(), "refused");
        assert_eq!(error.to_string(), "connecting to Stripe failed: refused");
        assert_eq!(crate::error_chain(&error), "connecting to Stripe failed: refused");
    }

    #[test]
    fn classifies_transient_failures() {
        assert!(StripeError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(StripeError::transport("reset").is_transient());
        for status in [409, 429, 500, 502, 503] {
            assert!(api(status, None, None).is_transient(), "{status}");
        }
        for status in [400, 401, 402, 404] {
            assert!(!api(status, None, None).is_transient(), "{status}");
        }
        assert!(!api(500, Some(false), None).is_transient(), "Stripe-Should-Retry: false wins");
        assert!(api(400, Some(true), None).is_transient(), "Stripe-Should-Retry: true wins");
        let conflict = api(400, None, Some("idempotency_error"));
        assert!(conflict.is_parameter_mismatch() && !conflict.is_transient());
        assert_eq!(conflict.metric_label(), "idempotency_conflict");
        let concurrent = api(409, Some(true), Some("idempotency_error"));
        assert!(concurrent.is_transient() && !concurrent.is_parameter_mismatch());
    }

    #[test]
    fn tells_stripe_failing_from_answers_about_the_request() {
        assert_eq!(StripeError::Timeout(Duration::from_secs(1)).signal(), Signal::Failed);
        assert_eq!(StripeError::transport("reset").signal(), Signal::Failed);
        for status in [500, 502, 503, 504] {
            assert_eq!(api(status, None, None).signal(), Signal::Failed, "{status}");
            assert_eq!(api(status, Some(true), None).signal(), Signal::Failed, "{status}");
        }
        assert_eq!(api(429, None, None).signal(), Signal::Throttled);
        assert_eq!(api(429, Some(true), None).signal(), Signal::Throttled);
        assert_eq!(api(500, Some(false), None).signal(), Signal::Answered, "a saved 500");
        for status in [400, 401, 402, 404, 409, 424] {
            assert_eq!(api(status, None, None).signal(), Signal::Answered, "{status}");
        }
        assert_eq!(api(400, None, Some("idempotency_error")).signal(), Signal::Answered);
        assert_eq!(StripeError::BadResponse("x".into()).signal(), Signal::Answered);
    }

    #[test]
    fn retry_after_counts_only_on_429_and_503() {
        for (status, honoured) in
            [(429, true), (503, true), (400, false), (500, false), (409, false)]
        {
            let mut error = api(status, None, None);
            if let StripeError::Api { retry_after, .. } = &mut error {
                *retry_after = Some(Duration::from_secs(60));
            }
            assert_eq!(error.retry_after().is_some(), honoured, "{status}");
        }
    }

    #[test]
    fn a_replayed_answer_is_an_answer_whatever_its_status() {
        for (status, should_retry) in [(500, None), (503, Some(true)), (502, Some(false))] {
            let mut error = api(status, should_retry, Some("api_error"));
            if let StripeError::Api { replayed, .. } = &mut error {
                *replayed = true;
            }
            assert_eq!(error.signal(), Signal::Answered, "{status} {should_retry:?}");
            assert!(!error.is_transient(), "{status}: the same key gets the same answer");
            assert!(error.is_replayed_server_error(), "{status}");
        }
        assert!(!api(500, None, None).is_replayed_server_error(), "not replayed");
    }

    #[tokio::test]
    async fn a_call_aborted_mid_way_leaves_no_request_in_flight() {
        let metrics = Arc::new(Metrics::new(&crate::metrics::Program::default()));
        let (started, call) = {
            let (started, metrics) = (tokio::sync::Notify::new(), metrics.clone());
            let started = Arc::new(started);
            let signal = started.clone();
            let call = tokio::spawn(async move {
                let _in_flight = InFlight::start(&metrics);
                signal.notify_one();
                std::future::pending::<()>().await;
            });
            (started, call)
        };
        started.notified().await;
        assert_eq!(metrics.stripe_in_flight.get(), 1);
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        assert_eq!(metrics.stripe_in_flight.get(), 0, "the guard counted the call out");
    }

    #[test]
    fn only_a_checkout_session_id_is_a_session_id() {
        for id in ["cs_test_a1B2", "cs_live_b1Z9_x", "cs_test_standin_000001_0a1b2c3d"] {
            assert!(is_session_id(id), "{id}");
        }
        let long = format!("cs_{}", "a".repeat(253));
        for id in [
            "",
            "cs_",
            "cs_test_\u{7}",
            "cs_test_a b",
            "cs_test_é",
            "pi_123",
            "cs_test/../x",
            &long,
        ] {
            assert!(!is_session_id(id), "{id:?}");
        }
    }

    #[test]
    fn the_same_command_gives_the_same_form_bytes() {
        let payload = serde_json::json!({"tripID": "t-1", "userID": "u-1", "driverID": "d-1",
            "amount": 1234, "currency": "USD", "packageSlug": "sedan"});
        let cmd =
            CreateSession::decode(&crate::contract::Envelope::encode("u-1", &payload)).unwrap();
        let urls = CheckoutUrls { success: "https://a/s".into(), cancel: "https://a/c".into() };
        let form = |_| checkout_form(&cmd, &urls, ParamSet::Current);
        let first = form(0);
        let decoded: Vec<String> = first
            .split('&')
            .map(|field| {
                field.split('=').next().unwrap_or("").replace("%5B", "[").replace("%5D", "]")
            })
            .collect();
        let keys: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let session_metadata: Vec<&str> =
            keys.iter().copied().filter(|k| k.starts_with("metadata[")).collect();
        assert_eq!(
            session_metadata,
            [
                "metadata[driver_id]",
                "metadata[package_slug]",
                "metadata[trip_id]",
                "metadata[user_id]"
            ]
        );
        let intent_metadata: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| k.starts_with("payment_intent_data[metadata]["))
            .collect();
        assert_eq!(
            intent_metadata,
            [
                "payment_intent_data[metadata][driver_id]",
                "payment_intent_data[metadata][trip_id]",
                "payment_intent_data[metadata][user_id]"
            ],
            "the trip, not the package, on the PaymentIntent"
        );
        // Every HashMap has a seed of its own, so unordered metadata would differ here.
        for attempt in 1..64 {
            assert_eq!(form(attempt), first, "attempt {attempt}");
        }
        let previous = checkout_form(&cmd, &urls, ParamSet::Previous);
        assert!(!previous.contains("payment_intent_data"), "{previous}");
    }

    #[test]
    fn an_event_query_is_encoded_as_stripe_reads_it() {
        let query = EventQuery {
            types: &["checkout.session.completed", "checkout.session.expired"],
            created_gte: 1_700_000_000,
            delivery_success: Some(false),
            limit: 100,
            starting_after: Some("evt_1 &x"),
        };
        assert_eq!(
            query.encode(),
            "types%5B%5D=checkout.session.completed&types%5B%5D=checkout.session.expired\
             &created%5Bgte%5D=1700000000&delivery_success=false&limit=100\
             &starting_after=evt_1%20%26x"
        );
        let every = EventQuery { delivery_success: None, starting_after: None, ..query };
        assert_eq!(
            every.encode(),
            "types%5B%5D=checkout.session.completed&types%5B%5D=checkout.session.expired\
             &created%5Bgte%5D=1700000000&limit=100"
        );
    }

    #[test]
    fn rejects_a_base_that_is_not_a_url() {
        for base in ["", "stripe", "ftp://x/", "/v1"] {
            assert!(
                StripeApi::new(base, "sk".to_owned().into(), Duration::from_secs(1)).is_err(),
                "{base}"
            );
        }
        let api =
            StripeApi::new("http://127.0.0.1:1", "sk".to_owned().into(), Duration::from_secs(1))
                .unwrap();
        assert_eq!(api.base, "http://127.0.0.1:1/");
        assert!(!format!("{api:?}").contains("sk"));
    }
}
