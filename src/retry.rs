//! What a message carries between attempts, and how its copies are made.
//!
//! Retry state travels in headers of payment-worker's own (never `x-death`, which RabbitMQ 4
//! ignores when published by a client and which trips dead-letter cycle detection when copied
//! back in). A retry copy or a parked copy is the original body byte for byte with the
//! original properties, minus the broker's dead-letter headers, plus these headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::headers::{int, long_string, string};

/// Attempts made so far (failed ones); absent on a first delivery.
pub const ATTEMPT: &str = "payment-attempt";
/// When the first attempt started, Unix milliseconds.
pub const FIRST_SEEN_AT: &str = "payment-first-seen-at";
/// When the first attempt failed, Unix milliseconds.
pub const FIRST_FAILURE_AT: &str = "payment-first-failure-at";
/// The last failure, at most [`MAX_ERROR_LEN`] bytes.
pub const LAST_ERROR: &str = "payment-last-error";
/// The exchange and routing key the command first arrived with.
pub const ORIGINAL_EXCHANGE: &str = "payment-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "payment-original-routing-key";
/// The delay tier a retry copy waits in (`"1s"`), and when it was published there.
pub const RETRY_TIER: &str = "payment-retry-tier";
pub const RETRY_PUBLISHED_AT: &str = "payment-retry-published-at";
/// How often the command went back to the work queue without an attempt spent, because Stripe
/// was failing or rate-limiting.
pub const DEFERRALS: &str = "payment-deferrals";
/// Why and when a message was parked.
pub const PARK_REASON: &str = "payment-park-reason";
pub const PARK_DETAIL: &str = "payment-park-detail";
pub const PARKED_AT: &str = "payment-parked-at";

/// Longest error text carried in a header.
pub const MAX_ERROR_LEN: usize = 512;

/// Why a message was parked: a bounded set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParkReason {
    /// The body is not a valid `payment.cmd.create_session`.
    InvalidMessage,
    /// The message arrived with a routing key the worker does not handle.
    UnexpectedRoutingKey,
    /// Stripe refused the request for good (a 4xx other than 409 and 429).
    StripeRejected,
    /// The trip's idempotency key was used with other parameters: the same trip with another
    /// amount. A second session for one trip is never created.
    IdempotencyConflict,
    /// Stripe answered with something that is not a session.
    StripeBadResponse,
    /// Every attempt failed with a transient error.
    RetriesExhausted,
    /// The retry copy could not be published (no wait queue took it).
    RetryUnroutable,
}

impl ParkReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidMessage => "invalid_message",
            Self::UnexpectedRoutingKey => "unexpected_routing_key",
            Self::StripeRejected => "stripe_rejected",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::StripeBadResponse => "stripe_bad_response",
            Self::RetriesExhausted => "retries_exhausted",
            Self::RetryUnroutable => "retry_unroutable",
        }
    }
}

/// The retry state read from a delivery's headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryState {
    /// Failed attempts before this delivery.
    pub attempts: u32,
    pub first_seen_at: Option<u64>,
    pub first_failure_at: Option<u64>,
    pub original_exchange: Option<String>,
    pub original_routing_key: Option<String>,
    pub retry_tier: Option<String>,
    pub retry_published_at: Option<u64>,
    pub deferrals: u32,
}

impl RetryState {
    pub fn from_properties(properties: &BasicProperties) -> Self {
        let Some(headers) = properties.headers() else {
            return Self::default();
        };
        Self {
            attempts: int(headers, ATTEMPT).and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
            first_seen_at: int(headers, FIRST_SEEN_AT).and_then(|n| u64::try_from(n).ok()),
            first_failure_at: int(headers, FIRST_FAILURE_AT).and_then(|n| u64::try_from(n).ok()),
            original_exchange: string(headers, ORIGINAL_EXCHANGE),
            original_routing_key: string(headers, ORIGINAL_ROUTING_KEY),
            retry_tier: string(headers, RETRY_TIER),
            retry_published_at: int(headers, RETRY_PUBLISHED_AT)
                .and_then(|n| u64::try_from(n).ok()),
            deferrals: int(headers, DEFERRALS).and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        }
    }

    /// How long the retry copy spent in the broker, from its publish to now; `None` when the
    /// publish time makes no sense (more than a second ahead of this clock, or older than a
    /// day, past any schedule).
    pub fn time_in_broker(&self, now_ms: u64) -> Option<Duration> {
        let at = self.retry_published_at?;
        let spent = now_ms.checked_sub(at).or_else(|| (at - now_ms <= 1_000).then_some(0))?;
        (spent <= 24 * 3_600_000).then(|| Duration::from_millis(spent))
    }
}

/// Where a command first came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub exchange: String,
    pub routing_key: String,
}

/// One failed attempt, as recorded on the copy that replaces the message.
#[derive(Debug, Clone)]
pub struct FailedAttempt<'a> {
    pub origin: &'a Origin,
    /// The state the message arrived with.
    pub state: &'a RetryState,
    /// This attempt's number, 1-based.
    pub number: u32,
    /// When this attempt started and when it failed, Unix milliseconds.
    pub started_ms: u64,
    pub now_ms: u64,
    pub error: &'a str,
}

impl FailedAttempt<'_> {
    /// Properties for the copy of `original` that waits `delay_ms` in the wait queue of `tier`
    /// before the next attempt.
    pub fn retry_properties(
        &self,
        original: &BasicProperties,
        tier: &str,
        delay_ms: u64,
    ) -> BasicProperties {
        let mut headers = self.headers(original);
        headers.insert(RETRY_TIER.into(), long_string(tier));
        headers.insert(RETRY_PUBLISHED_AT.into(), AMQPValue::LongLongInt(ms_i64(self.now_ms)));
        persistent(original)
            .with_headers(headers)
            .with_expiration(ShortString::from(delay_ms.to_string()))
    }

    /// Properties for the parked copy of `original`.
    pub fn parked_properties(
        &self,
        original: &BasicProperties,
        reason: ParkReason,
    ) -> BasicProperties {
        let mut headers = self.headers(original);
        headers.insert(PARK_REASON.into(), long_string(reason.as_str()));
        headers.insert(PARK_DETAIL.into(), long_string(&truncate(self.error)));
        headers.insert(PARKED_AT.into(), AMQPValue::LongLongInt(ms_i64(self.now_ms)));
        persistent(original).with_headers(headers)
    }

    /// Properties for the copy of `original` that goes back to the work queue without an
    /// attempt spent: the attempt count travels unchanged, the deferral count goes up, and the
    /// retry tier is dropped (this copy did not wait in a wait queue).
    pub fn deferred_properties(&self, original: &BasicProperties) -> BasicProperties {
        let mut headers = carried_headers(original, &[RETRY_TIER, RETRY_PUBLISHED_AT]);
        let first_seen = self.state.first_seen_at.unwrap_or(self.started_ms);
        headers.insert(FIRST_SEEN_AT.into(), AMQPValue::LongLongInt(ms_i64(first_seen)));
        let deferrals = i64::from(self.state.deferrals.saturating_add(1));
        headers.insert(DEFERRALS.into(), AMQPValue::LongLongInt(deferrals));
        headers.insert(LAST_ERROR.into(), long_string(&truncate(self.error)));
        headers.insert(ORIGINAL_EXCHANGE.into(), long_string(&self.origin.exchange));
        headers.insert(ORIGINAL_ROUTING_KEY.into(), long_string(&self.origin.routing_key));
        persistent(original).with_headers(headers)
    }

    fn headers(&self, original: &BasicProperties) -> FieldTable {
        let mut headers = carried_headers(original, &[]);
        let first_seen = self.state.first_seen_at.unwrap_or(self.started_ms);
        let first_failure = self.state.first_failure_at.unwrap_or(self.now_ms);
        headers.insert(ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(self.number)));
        headers.insert(FIRST_SEEN_AT.into(), AMQPValue::LongLongInt(ms_i64(first_seen)));
        headers.insert(FIRST_FAILURE_AT.into(), AMQPValue::LongLongInt(ms_i64(first_failure)));
        headers.insert(LAST_ERROR.into(), long_string(&truncate(self.error)));
        headers.insert(ORIGINAL_EXCHANGE.into(), long_string(&self.origin.exchange));
        headers.insert(ORIGINAL_ROUTING_KEY.into(), long_string(&self.origin.routing_key));
        headers
    }
}

/// The original's properties, persistent, without a TTL (dead-lettering drops it anyway).
fn persistent(original: &BasicProperties) -> BasicProperties {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(v) = original.content_type() {
        properties = properties.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        properties = properties.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        properties = properties.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        properties = properties.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        properties = properties.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        properties = properties.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        properties = properties.with_type(v.clone());
    }
    if let Some(v) = original.user_id() {
        properties = properties.with_user_id(v.clone());
    }
    if let Some(v) = original.app_id() {
        properties = properties.with_app_id(v.clone());
    }
    properties
}

/// The original's headers without the broker's dead-letter bookkeeping and without `skip`.
fn carried_headers(original: &BasicProperties, skip: &[&str]) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(original) = original.headers() {
        for (key, value) in original.inner() {
            let name = key.as_str();
            if !(name.starts_with("x-death")
                || name.starts_with("x-first-death-")
                || name.starts_with("x-last-death-")
                || skip.contains(&name))
            {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Cuts `text` to [`MAX_ERROR_LEN`] bytes on a character boundary.
pub fn truncate(text: &str) -> String {
    if text.len() <= MAX_ERROR_LEN {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_LEN - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original() -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), long_string("00-abc-def-01"));
        headers.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        headers.insert("x-first-death-queue".into(), long_string("q"));
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(headers)
            .with_expiration("1000".into())
    }

    fn origin() -> Origin {
        Origin { exchange: "trip".into(), routing_key: "payment.cmd.create_session".into() }
    }

    fn failed<'a>(
        origin: &'a Origin,
        state: &'a RetryState,
        number: u32,
        now_ms: u64,
        error: &'a str,
    ) -> FailedAttempt<'a> {
        FailedAttempt { origin, state, number, started_ms: now_ms - 1, now_ms, error }
    }

    #[test]
    fn retry_copy_keeps_the_original_and_drops_x_death() {
        let (origin, state) = (origin(), RetryState::default());
        let props =
            failed(&origin, &state, 1, 42, "boom").retry_properties(&original(), "1s", 1000);
        let headers = props.headers().as_ref().unwrap();
        assert_eq!(string(headers, "traceparent").as_deref(), Some("00-abc-def-01"));
        assert!(!headers.contains_key("x-death"));
        assert!(!headers.contains_key("x-first-death-queue"));
        assert_eq!(props.expiration().as_ref().map(|e| e.as_str()), Some("1000"));
        assert_eq!(props.delivery_mode(), &Some(2));
        let state = RetryState::from_properties(&props);
        assert_eq!(state.attempts, 1);
        assert_eq!(state.first_failure_at, Some(42));
        assert_eq!(state.retry_tier.as_deref(), Some("1s"));
        assert_eq!(state.original_routing_key.as_deref(), Some("payment.cmd.create_session"));
        assert_eq!(state.time_in_broker(1042), Some(Duration::from_secs(1)));
        assert_eq!(state.time_in_broker(41), Some(Duration::ZERO), "a little clock skew");
        assert_eq!(state.time_in_broker(42 + 25 * 3_600_000), None, "older than a day");
        let ahead = RetryState { retry_published_at: Some(10_000), ..RetryState::default() };
        assert_eq!(ahead.time_in_broker(0), None, "far ahead of this clock");
    }

    #[test]
    fn the_first_failure_time_survives_later_attempts() {
        let (origin, fresh) = (origin(), RetryState::default());
        let first = failed(&origin, &fresh, 1, 10, "a").retry_properties(&original(), "1s", 1000);
        let state = RetryState::from_properties(&first);
        let parked = failed(&origin, &state, 4, 99, "b")
            .parked_properties(&first, ParkReason::RetriesExhausted);
        let headers = parked.headers().as_ref().unwrap();
        assert_eq!(int(headers, FIRST_FAILURE_AT), Some(10));
        assert_eq!(int(headers, FIRST_SEEN_AT), Some(9));
        assert_eq!(int(headers, ATTEMPT), Some(4));
        assert_eq!(string(headers, PARK_REASON).as_deref(), Some("retries_exhausted"));
        assert_eq!(parked.expiration(), &None, "a parked copy never expires");
    }

    #[test]
    fn a_deferred_copy_keeps_the_attempt_count() {
        let (origin, fresh) = (origin(), RetryState::default());
        let retried = failed(&origin, &fresh, 2, 10, "a").retry_properties(&original(), "2s", 2000);
        let state = RetryState::from_properties(&retried);
        let deferred = failed(&origin, &state, 3, 50, "503").deferred_properties(&retried);
        let again = RetryState::from_properties(&deferred);
        assert_eq!(again.attempts, 2, "no attempt spent");
        assert_eq!(again.deferrals, 1);
        assert_eq!(again.first_seen_at, Some(9));
        assert_eq!(again.retry_tier, None, "not observed as a retry delay");
        assert_eq!(again.retry_published_at, None);
        assert_eq!(again.original_exchange.as_deref(), Some("trip"));
        assert_eq!(deferred.expiration(), &None);
        let twice = failed(&origin, &again, 3, 60, "429").deferred_properties(&deferred);
        assert_eq!(RetryState::from_properties(&twice).deferrals, 2);
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let text = "é".repeat(400);
        let cut = truncate(&text);
        assert!(cut.len() <= MAX_ERROR_LEN);
        assert!(cut.ends_with("..."));
    }
}
