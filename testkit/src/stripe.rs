//! A local stand-in for Stripe's `POST /v1/checkout/sessions` and `GET /v1/events`.
//!
//! It behaves as Stripe documents: form-encoded parameters; a request with an
//! `Idempotency-Key` it has seen replays the saved answer (marked `Idempotent-Replayed: true`)
//! when the parameters are the same, and is a 400 `idempotency_error` when they differ;
//! validation failures, 429s, dropped connections and answers marked
//! `Stripe-Should-Retry: true` are not saved; a 500 after execution began is saved and
//! replayed. Failures are scripted per trip (read from `metadata[trip_id]`), or Stripe-wide:
//! an outage switch (503s, dropped connections, hangs) and a requests-per-second limit
//! answering 429 as Stripe does, decided before the idempotency layer.
//!
//! Events are kept as Stripe keeps them: [`StripeStandin::complete_session`] pays a created
//! session and records its `checkout.session.completed` event, pending until a test marks
//! its webhook delivered. `GET /v1/events` lists them newest first with `type`/`types[]`,
//! `created[gte]`, `delivery_success`, `limit` (1–100, 10 by default), `starting_after` and
//! `has_more`; its failures are scripted apart ([`StripeStandin::script_events`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the stand-in does with the next request for a trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Create the session and answer 200.
    Succeed,
    /// Answer with an error status. `saved`: stored under the idempotency key and replayed
    /// (as Stripe does for a 500 once execution began). `should_retry`: the
    /// `Stripe-Should-Retry` header, if any.
    Fail { status: u16, kind: &'static str, saved: bool, should_retry: Option<bool> },
    /// Close the connection without answering; nothing is saved.
    Drop,
    /// Create and save the session, then answer only after this long (the client has
    /// usually given up by then: the session exists, the answer is lost).
    Slow(Duration),
    /// Answer 200 with a session object whose `id` is this (a broken or hostile Stripe);
    /// nothing is created or saved.
    Answer(&'static str),
    /// Answer this error status with `Retry-After: seconds`; nothing is saved.
    RetryAfter { status: u16, seconds: u64 },
}

impl Behaviour {
    /// A 503 before execution began: not saved, `Stripe-Should-Retry: true`.
    pub fn unavailable() -> Self {
        Self::Fail { status: 503, kind: "api_error", saved: false, should_retry: Some(true) }
    }

    /// A 409: another request with the same key is in flight. A failure of this payment that
    /// may pass, not of Stripe as a whole.
    pub fn conflict() -> Self {
        Self::Fail {
            status: 409,
            kind: "idempotency_error",
            saved: false,
            should_retry: Some(true),
        }
    }

    /// A 429 rate limit: never saved.
    pub fn rate_limited() -> Self {
        Self::Fail { status: 429, kind: "rate_limit_error", saved: false, should_retry: None }
    }

    /// A 500 after execution began: saved and replayed for this key.
    pub fn saved_server_error() -> Self {
        Self::Fail { status: 500, kind: "api_error", saved: true, should_retry: Some(false) }
    }

    /// A permanent 400 (such as an amount below the currency's minimum).
    pub fn invalid_request() -> Self {
        Self::Fail { status: 400, kind: "invalid_request_error", saved: true, should_retry: None }
    }
}

/// A Stripe-wide outage: every request fails this way, before anything else is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// 503 `api_error` with `Stripe-Should-Retry: true`.
    Unavailable,
    /// The connection is closed without an answer.
    Dropped,
    /// No answer for this long (longer than the client waits), then a 503.
    Hang(Duration),
}

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub idempotency_key: Option<String>,
    pub params: BTreeMap<String, String>,
    pub stripe_version: Option<String>,
    pub status: u16,
    pub replayed: bool,
    pub at: Instant,
}

/// A session the stand-in created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub id: String,
    pub trip_id: String,
    pub idempotency_key: Option<String>,
    pub params: BTreeMap<String, String>,
}

/// An answer saved under an idempotency key.
#[derive(Clone)]
struct Saved {
    params: BTreeMap<String, String>,
    status: u16,
    body: String,
    should_retry: Option<bool>,
}

#[derive(Default)]
struct State {
    scripts: HashMap<String, VecDeque<Behaviour>>,
    saved: HashMap<String, Saved>,
    created: Vec<Created>,
    seen: Vec<Seen>,
    delay: Duration,
    /// Unscripted requests fail with this probability, at most `max_per_trip` times per trip.
    random: Option<RandomFailures>,
    random_failures: HashMap<String, u32>,
    outage: Option<Outage>,
    /// Every unscripted request fails with this probability (a brownout).
    brownout: Option<f64>,
    /// Requests a second allowed, and when the requests of the last second were let through.
    rate_limit: Option<(usize, VecDeque<Instant>)>,
    /// Events, oldest first.
    events: Vec<Event>,
    /// Behaviours for the next `GET /v1/events` requests.
    event_scripts: VecDeque<Behaviour>,
    /// The query strings of the `GET /v1/events` requests answered 200.
    event_queries: Vec<String>,
}

/// An event as the stand-in keeps it.
#[derive(Debug, Clone)]
struct Event {
    id: String,
    created: i64,
    kind: String,
    body: serde_json::Value,
    /// Whether a webhook delivery of it succeeded.
    delivered: bool,
}

/// Failures for unscripted trips, drawn at random.
#[derive(Debug, Clone, Copy)]
pub struct RandomFailures {
    pub rate: f64,
    pub max_per_trip: u32,
    /// How long a `Slow` answer takes (longer than the worker's timeout: the answer is lost).
    pub slow: Duration,
}

/// The running stand-in; stops when dropped.
pub struct StripeStandin {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for StripeStandin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The secret key the stand-in accepts.
pub const SECRET_KEY: &str = "sk_test_standin";

impl StripeStandin {
    /// Starts on a free loopback port.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound address");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(state.clone(), request));
                    let _ =
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Self { addr, state, server }
    }

    /// The base URL to give the worker as `STRIPE_API_BASE`.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Queues behaviours for the next requests about `trip_id`; once they are used up,
    /// requests succeed.
    pub fn script(&self, trip_id: &str, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.lock().scripts.entry(trip_id.to_owned()).or_default().extend(behaviours);
    }

    /// Delays every answer by `delay` (a slow but healthy Stripe).
    pub fn set_latency(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Makes unscripted requests fail at random: a 503, a 429, a dropped connection or an
    /// answer slower than the client waits, each equally likely.
    pub fn set_random_failures(&self, random: RandomFailures) {
        self.lock().random = Some(random);
    }

    /// Starts (`Some(share)`) or ends (`None`) a brownout: every unscripted request fails
    /// with probability `share`, as a 429, a 503 or a dropped connection, equally likely,
    /// however often its trip failed before.
    pub fn set_brownout(&self, share: Option<f64>) {
        self.lock().brownout = share;
    }

    /// Starts (`Some`) or ends (`None`) a Stripe-wide outage.
    pub fn set_outage(&self, outage: Option<Outage>) {
        self.lock().outage = outage;
    }

    /// Allows at most `per_second` requests in any second (`None`: no limit); the others are
    /// answered 429 `rate_limit`, as Stripe does, and not saved under their idempotency key.
    pub fn set_rate_limit(&self, per_second: Option<usize>) {
        self.lock().rate_limit = per_second.map(|n| (n, VecDeque::new()));
    }

    /// Pays the session created for `trip_id` and records its `checkout.session.completed`
    /// event (undelivered); returns the event as a webhook would carry it.
    ///
    /// # Panics
    /// When no session was created for the trip.
    pub fn complete_session(&self, trip_id: &str) -> serde_json::Value {
        let created = self.created_for(trip_id).pop().expect("a session for the trip");
        let param = |key: &str| created.params.get(key).cloned().unwrap_or_default();
        let amount: i64 = param("line_items[0][price_data][unit_amount]").parse().unwrap_or(0);
        let session = serde_json::json!({
            "id": created.id,
            "object": "checkout.session",
            "payment_status": "paid",
            "status": "complete",
            "amount_total": amount,
            "currency": param("line_items[0][price_data][currency]"),
            "livemode": false,
            "metadata": {
                "trip_id": param("metadata[trip_id]"),
                "user_id": param("metadata[user_id]"),
                "driver_id": param("metadata[driver_id]"),
            },
        });
        self.add_event("checkout.session.completed", session, false)
    }

    /// Records an event of `kind` about `object` (`livemode` as given); returns it.
    pub fn add_event(
        &self,
        kind: &str,
        object: serde_json::Value,
        livemode: bool,
    ) -> serde_json::Value {
        let mut state = self.lock();
        let id = format!("evt_standin_{:06}_{}", state.events.len() + 1, random_suffix());
        let created = unix_now();
        let body = serde_json::json!({
            "id": id,
            "object": "event",
            "api_version": "2025-03-31.basil",
            "created": created,
            "livemode": livemode,
            "pending_webhooks": 1,
            "type": kind,
            "data": { "object": object },
        });
        state.events.push(Event {
            id,
            created,
            kind: kind.to_owned(),
            body: body.clone(),
            delivered: false,
        });
        body
    }

    /// Marks the event's webhook delivered (a 2xx answer), as Stripe does.
    pub fn mark_delivered(&self, event_id: &str) {
        if let Some(event) = self.lock().events.iter_mut().find(|e| e.id == event_id) {
            event.delivered = true;
        }
    }

    /// Queues behaviours for the next `GET /v1/events` requests (`Fail`, `RetryAfter`,
    /// `Drop`); then they are answered.
    pub fn script_events(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.lock().event_scripts.extend(behaviours);
    }

    /// The query strings of the event listings answered so far.
    pub fn event_queries(&self) -> Vec<String> {
        self.lock().event_queries.clone()
    }

    /// Sessions created so far.
    pub fn created(&self) -> Vec<Created> {
        self.lock().created.clone()
    }

    /// Sessions created for one trip.
    pub fn created_for(&self, trip_id: &str) -> Vec<Created> {
        self.lock().created.iter().filter(|c| c.trip_id == trip_id).cloned().collect()
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Requests seen about one trip.
    pub fn seen_for(&self, trip_id: &str) -> Vec<Seen> {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.params.get("metadata[trip_id]").map(String::as_str) == Some(trip_id))
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

async fn handle(state: Arc<Mutex<State>>, request: Request<Incoming>) -> Answer {
    let lock = || state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let header =
        |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let key = header("idempotency-key");
    let stripe_version = header("stripe-version");
    let authorized = header("authorization").as_deref() == Some(&format!("Bearer {SECRET_KEY}"));
    let route_ok =
        request.method() == hyper::Method::POST && request.uri().path() == "/v1/checkout/sessions";
    if authorized && request.method() == hyper::Method::GET && request.uri().path() == "/v1/events"
    {
        let query = request.uri().query().unwrap_or_default().to_owned();
        return list_events(&state, &query);
    }
    let form =
        header("content-type").is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let params: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let trip_id = params.get("metadata[trip_id]").cloned().unwrap_or_default();
    let record = |status: u16, replayed: bool| {
        lock().seen.push(Seen {
            idempotency_key: key.clone(),
            params: params.clone(),
            stripe_version: stripe_version.clone(),
            status,
            replayed,
            at: Instant::now(),
        });
    };
    let delay = lock().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let outage = lock().outage;
    match outage {
        None => {}
        Some(Outage::Dropped) => {
            record(0, false);
            return Err(std::io::Error::other("outage: connection dropped"));
        }
        Some(Outage::Unavailable | Outage::Hang(_)) => {
            if let Some(Outage::Hang(wait)) = outage {
                tokio::time::sleep(wait).await;
            }
            record(503, false);
            return Ok(error(503, "api_error", None, "outage", Some(true)));
        }
    }
    if !authorized {
        record(401, false);
        return Ok(error(401, "invalid_request_error", None, "Invalid API Key provided", None));
    }
    if !route_ok {
        record(404, false);
        return Ok(error(404, "invalid_request_error", None, "Unrecognized request URL", None));
    }
    if rate_limited(&mut lock()) {
        record(429, false);
        return Ok(error(
            429,
            "invalid_request_error",
            Some("rate_limit"),
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
            None,
        ));
    }
    if !form {
        record(400, false);
        return Ok(error(400, "invalid_request_error", None, "Expected a form-encoded body", None));
    }
    // Replays first: Stripe answers a seen key before doing anything else.
    if let Some(key) = &key {
        let saved = lock().saved.get(key).cloned();
        if let Some(Saved { params: saved_params, status, body, should_retry }) = saved {
            if saved_params != params {
                record(400, false);
                return Ok(error(
                    400,
                    "idempotency_error",
                    None,
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                    None,
                ));
            }
            record(status, true);
            return Ok(json(status, body, true, should_retry));
        }
    }
    if let Some(problem) = validate(&params) {
        record(400, false);
        return Ok(error(400, "invalid_request_error", Some("parameter_missing"), &problem, None));
    }

    let behaviour = {
        let mut state = lock();
        match state.scripts.get_mut(&trip_id).and_then(VecDeque::pop_front) {
            Some(scripted) => scripted,
            None => random_behaviour(&mut state, &trip_id),
        }
    };
    match behaviour {
        Behaviour::Drop => {
            record(0, false);
            Err(std::io::Error::other("scripted: connection dropped"))
        }
        Behaviour::Fail { status, kind, saved, should_retry } => {
            let body = error_body(kind, None, &format!("scripted {status}"));
            if saved && let Some(key) = &key {
                lock().saved.insert(
                    key.clone(),
                    Saved { params: params.clone(), status, body: body.clone(), should_retry },
                );
            }
            record(status, false);
            Ok(json(status, body, false, should_retry))
        }
        Behaviour::RetryAfter { status, seconds } => {
            let kind = if status == 429 { "rate_limit_error" } else { "invalid_request_error" };
            let body = error_body(kind, None, &format!("scripted {status}"));
            record(status, false);
            let mut response = json(status, body, false, None);
            response.headers_mut().insert("retry-after", seconds.into());
            Ok(response)
        }
        Behaviour::Answer(id) => {
            record(200, false);
            Ok(json(200, session_body(id, &params), false, None))
        }
        Behaviour::Succeed | Behaviour::Slow(_) => {
            let body = {
                let mut state = lock();
                let id =
                    format!("cs_test_standin_{:06}_{}", state.created.len() + 1, random_suffix());
                let body = session_body(&id, &params);
                state.created.push(Created {
                    id,
                    trip_id: trip_id.clone(),
                    idempotency_key: key.clone(),
                    params: params.clone(),
                });
                if let Some(key) = &key {
                    state.saved.insert(
                        key.clone(),
                        Saved {
                            params: params.clone(),
                            status: 200,
                            body: body.clone(),
                            should_retry: None,
                        },
                    );
                }
                body
            };
            // Seen when it arrived: a client that gives up before the answer cancels this.
            record(200, false);
            if let Behaviour::Slow(wait) = behaviour {
                tokio::time::sleep(wait).await;
            }
            Ok(json(200, body, false, None))
        }
    }
}

/// `GET /v1/events`: a scripted failure, or a page of the events that match, newest first.
fn list_events(state: &Mutex<State>, query: &str) -> Answer {
    let mut state = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match state.event_scripts.pop_front() {
        Some(Behaviour::Fail { status, kind, should_retry, .. }) => {
            let body = error_body(kind, None, &format!("scripted {status}"));
            return Ok(json(status, body, false, should_retry));
        }
        Some(Behaviour::RetryAfter { status, seconds }) => {
            let mut response =
                json(status, error_body("rate_limit_error", None, "scripted"), false, None);
            response.headers_mut().insert("retry-after", seconds.into());
            return Ok(response);
        }
        Some(Behaviour::Drop) => return Err(std::io::Error::other("scripted: connection dropped")),
        _ => {}
    }
    let mut types = Vec::new();
    let (mut gte, mut delivered, mut limit, mut after) = (i64::MIN, None, 10usize, None);
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "type" | "types[]" => types.push(value.into_owned()),
            "created[gte]" => gte = value.parse().unwrap_or(i64::MIN),
            "delivery_success" => delivered = value.parse::<bool>().ok(),
            "limit" => limit = value.parse().unwrap_or(10),
            "starting_after" => after = Some(value.into_owned()),
            _ => {}
        }
    }
    if !(1..=100).contains(&limit) || types.len() > 20 {
        return Ok(json(
            400,
            error_body("invalid_request_error", None, "limit must be 1 to 100, types[] at most 20"),
            false,
            None,
        ));
    }
    state.event_queries.push(query.to_owned());
    let matching: Vec<&Event> = state
        .events
        .iter()
        .rev()
        .filter(|e| types.is_empty() || types.contains(&e.kind))
        .filter(|e| e.created >= gte)
        .filter(|e| delivered.is_none_or(|d| d == e.delivered))
        .collect();
    let start = match &after {
        Some(id) => matching.iter().position(|e| &e.id == id).map_or(matching.len(), |i| i + 1),
        None => 0,
    };
    let page: Vec<serde_json::Value> =
        matching.iter().skip(start).take(limit).map(|e| e.body.clone()).collect();
    let has_more = matching.len() > start + page.len();
    let body = serde_json::json!({
        "object": "list",
        "url": "/v1/events",
        "has_more": has_more,
        "data": page,
    });
    Ok(json(200, body.to_string(), false, None))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether a request now is over the limit; counts it when it is not.
fn rate_limited(state: &mut State) -> bool {
    let Some((per_second, recent)) = &mut state.rate_limit else { return false };
    let now = Instant::now();
    while recent.front().is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1)) {
        recent.pop_front();
    }
    if recent.len() >= *per_second {
        return true;
    }
    recent.push_back(now);
    false
}

fn random_behaviour(state: &mut State, trip_id: &str) -> Behaviour {
    if let Some(share) = state.brownout
        && rand::random::<f64>() < share
    {
        return match rand::random_range(0..3) {
            0 => Behaviour::rate_limited(),
            1 => Behaviour::unavailable(),
            _ => Behaviour::Drop,
        };
    }
    let Some(random) = state.random else { return Behaviour::Succeed };
    let used = state.random_failures.entry(trip_id.to_owned()).or_default();
    if *used >= random.max_per_trip || rand::random::<f64>() >= random.rate {
        return Behaviour::Succeed;
    }
    *used += 1;
    match rand::random_range(0..4) {
        0 => Behaviour::unavailable(),
        1 => Behaviour::rate_limited(),
        2 => Behaviour::Drop,
        _ => Behaviour::Slow(random.slow),
    }
}

fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// What Stripe would refuse before executing anything.
fn validate(params: &BTreeMap<String, String>) -> Option<String> {
    for required in [
        "mode",
        "success_url",
        "line_items[0][price_data][currency]",
        "line_items[0][price_data][unit_amount]",
        "line_items[0][price_data][product_data][name]",
        "line_items[0][quantity]",
    ] {
        if !params.contains_key(required) {
            return Some(format!("Missing required param: {required}."));
        }
    }
    match params["line_items[0][price_data][unit_amount]"].parse::<i64>() {
        Ok(n) if (1..=99_999_999).contains(&n) => None,
        _ => Some("Invalid integer: unit_amount".into()),
    }
}

fn session_body(id: &str, params: &BTreeMap<String, String>) -> String {
    let get = |k: &str| params.get(k).cloned().unwrap_or_default();
    let metadata: serde_json::Map<String, serde_json::Value> = params
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((key.to_owned(), serde_json::Value::String(v.clone())))
        })
        .collect();
    let amount: i64 = get("line_items[0][price_data][unit_amount]").parse().unwrap_or(0);
    serde_json::json!({
        "id": id,
        "object": "checkout.session",
        "amount_subtotal": amount,
        "amount_total": amount,
        "cancel_url": get("cancel_url"),
        "client_reference_id": params.get("client_reference_id"),
        "created": 1_764_000_000,
        "currency": get("line_items[0][price_data][currency]"),
        "expires_at": 1_764_086_400,
        "livemode": false,
        "metadata": metadata,
        "mode": get("mode"),
        "payment_status": "unpaid",
        "status": "open",
        "success_url": get("success_url"),
        "url": format!("https://checkout.stripe.com/c/pay/{id}"),
    })
    .to_string()
}

fn error_body(kind: &str, code: Option<&str>, message: &str) -> String {
    serde_json::json!({ "error": { "type": kind, "code": code, "message": message } }).to_string()
}

fn error(
    status: u16,
    kind: &str,
    code: Option<&str>,
    message: &str,
    should_retry: Option<bool>,
) -> Response<Full<Bytes>> {
    json(status, error_body(kind, code, message), false, should_retry)
}

fn json(
    status: u16,
    body: String,
    replayed: bool,
    should_retry: Option<bool>,
) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("request-id", format!("req_{}", random_suffix()));
    if replayed {
        response = response.header("idempotent-replayed", "true");
    }
    if let Some(retry) = should_retry {
        response = response.header("stripe-should-retry", retry.to_string());
    }
    response
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
