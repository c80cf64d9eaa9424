//! What a message carries between attempts, and how its copies are made.
//!
//! Retry state travels in headers of payment-worker's own (never `x-death`, which RabbitMQ 4
//! ignores when published by a client and which trips dead-letter cycle detection when copied
//! back in). A retry copy or a parked copy is the original body byte for byte with the
//! original properties, minus the broker's dead-letter headers, plus these headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::broker::headers::{entry_len, int, long_string, string};
use crate::broker::topology::Delay;
use crate::delivery::outcome::ParkReason;

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
/// How long the command had waited since it first arrived when it was parked, milliseconds.
pub const WAITED_MS: &str = "payment-waited-ms";

/// The original headers a copy had to leave out, named, with their size.
pub const DROPPED_HEADERS: &str = "payment-dropped-headers";
/// The publisher's login, which the broker checks against whoever publishes: a copy published
/// by the worker carries it as this header instead of in `user_id`.
pub const ORIGINAL_USER_ID: &str = "payment-original-user-id";

/// Longest error text carried in a header.
pub const MAX_ERROR_LEN: usize = 512;

/// The most a copy carries of the original's headers, encoded. A copy adds its own headers,
/// and a wait queue adds `x-death`, and the whole header frame must fit the connection's
/// `frame_max` (128 KiB on RabbitMQ by default): a copy the broker cannot take would close the
/// connection and bring the message back again and again, holding up the queue.
pub const MAX_CARRIED_HEADERS: usize = 32 * 1024;

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

    /// The retry state of a delivery that came `via` an exchange and routing key, trusted only
    /// when it came through the default exchange into the work queue: dead-lettered by a wait
    /// queue, deferred by a worker, or replayed by an operator. A command from anywhere else
    /// (the trip exchange) starts at attempt 1 whatever its headers say; the copies made of it
    /// overwrite them.
    pub fn arrived(via: (&str, &str), work_queue: &str, properties: &BasicProperties) -> Self {
        let (exchange, routing_key) = via;
        if exchange.is_empty() && routing_key == work_queue {
            Self::from_properties(properties)
        } else {
            Self::default()
        }
    }

    /// Where the command first came from: as recorded on its copies, else `via` (the
    /// exchange and routing key it came with now).
    pub fn origin(&self, via: (&str, &str)) -> Origin {
        let (exchange, routing_key) = via;
        Origin {
            exchange: self.original_exchange.clone().unwrap_or_else(|| exchange.to_owned()),
            routing_key: self
                .original_routing_key
                .clone()
                .unwrap_or_else(|| routing_key.to_owned()),
        }
    }

    /// The tier a retry copy waited in and how long it spent in the broker, only for a tier
    /// of `delays`: a forged header cannot grow the metric's label set.
    pub fn retry_delay<'d>(&self, delays: &'d [Delay], now_ms: u64) -> Option<(&'d str, Duration)> {
        let tier = self.retry_tier.as_deref()?;
        let label = delays.iter().map(Delay::label).find(|label| *label == tier)?;
        Some((label, self.time_in_broker(now_ms)?))
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

/// One attempt, as the copy that replaces the message records it.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    pub origin: &'a Origin,
    /// The state the message arrived with.
    pub state: &'a RetryState,
    /// This attempt's number, 1-based.
    pub number: u32,
    /// When this attempt started, and now (when its replacement is made), Unix milliseconds.
    pub started_ms: u64,
    pub now_ms: u64,
    /// What went wrong; empty for an attempt that succeeded.
    pub error: &'a str,
}

impl Attempt<'_> {
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
        let waited = self.now_ms.saturating_sub(self.first_seen_ms());
        headers.insert(WAITED_MS.into(), AMQPValue::LongLongInt(ms_i64(waited)));
        persistent(original).with_headers(headers)
    }

    /// When the command first arrived, Unix milliseconds: its first attempt's start.
    pub fn first_seen_ms(&self) -> u64 {
        self.state.first_seen_at.unwrap_or(self.started_ms)
    }

    /// Properties for the copy of `original` that goes back to the work queue without an
    /// attempt spent: the attempt count and first failure time travel unchanged (the worker's
    /// own, from [`Attempt::state`], never a publisher's header of the same name), the
    /// deferral count goes up, and the retry tier is dropped (this copy did not wait in a wait
    /// queue).
    pub fn deferred_properties(&self, original: &BasicProperties) -> BasicProperties {
        let own = [RETRY_TIER, RETRY_PUBLISHED_AT, ATTEMPT, FIRST_FAILURE_AT];
        let mut headers = carried_headers(original, &own);
        headers.insert(ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(self.state.attempts)));
        if let Some(first_failure) = self.state.first_failure_at {
            let first_failure = AMQPValue::LongLongInt(ms_i64(first_failure));
            headers.insert(FIRST_FAILURE_AT.into(), first_failure);
        }
        let first_seen = self.first_seen_ms();
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
        let first_seen = self.first_seen_ms();
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

/// The original's properties, persistent, without a TTL (dead-lettering drops it anyway) and
/// without `user_id` (see [`ORIGINAL_USER_ID`]).
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
    if let Some(v) = original.app_id() {
        properties = properties.with_app_id(v.clone());
    }
    properties
}

/// The original's headers without the broker's dead-letter bookkeeping and without `skip`,
/// at most [`MAX_CARRIED_HEADERS`] of them: when they weigh more, the smallest are kept (the
/// trace context first) and the rest are named in [`DROPPED_HEADERS`].
fn carried_headers(original: &BasicProperties, skip: &[&str]) -> FieldTable {
    let mut carried: Vec<(&ShortString, &AMQPValue, usize)> = original
        .headers()
        .iter()
        .flat_map(|headers| headers.inner())
        .filter(|(key, _)| {
            let name = key.as_str();
            !(name.starts_with("x-death")
                || name.starts_with("x-first-death-")
                || name.starts_with("x-last-death-")
                || skip.contains(&name))
        })
        .map(|(key, value)| (key, value, entry_len(key.as_str(), value)))
        .collect();
    let mut dropped = Vec::new();
    if carried.iter().map(|(.., len)| len).sum::<usize>() > MAX_CARRIED_HEADERS {
        let trace_first = |key: &ShortString| !matches!(key.as_str(), "traceparent" | "tracestate");
        carried.sort_by_key(|(key, _, len)| (trace_first(key), *len));
        let mut room = MAX_CARRIED_HEADERS;
        carried.retain(|(key, _, len)| {
            let fits = *len <= room;
            if fits {
                room -= len;
            } else {
                dropped.push((key.as_str(), *len));
            }
            fits
        });
    }
    let mut headers = FieldTable::default();
    for (key, value, _) in carried {
        headers.insert(key.clone(), value.clone());
    }
    if !dropped.is_empty() {
        let names: Vec<&str> = dropped.iter().map(|(name, _)| *name).collect();
        let bytes: usize = dropped.iter().map(|(_, len)| len).sum();
        let note = format!("{} headers, {bytes} bytes: {}", names.len(), names.join(", "));
        headers.insert(DROPPED_HEADERS.into(), long_string(&truncate(&note)));
    }
    if let Some(user) = original.user_id() {
        headers.insert(ORIGINAL_USER_ID.into(), long_string(user.as_str()));
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

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (name, value) in pairs {
            headers.insert((*name).into(), value.clone());
        }
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn retry_state_is_trusted_only_from_the_default_exchange_into_the_work_queue() {
        let properties = with_headers(&[
            (ATTEMPT, AMQPValue::LongLongInt(3)),
            (RETRY_TIER, long_string("4s")),
            (DEFERRALS, AMQPValue::LongLongInt(2)),
        ]);
        let work = "payment_trip_response";
        let back = RetryState::arrived(("", work), work, &properties);
        assert_eq!((back.attempts, back.deferrals), (3, 2), "a wait queue, a deferral, a replay");
        assert_eq!(back.retry_tier.as_deref(), Some("4s"));
        for via in [("trip", "payment.cmd.create_session"), ("", "another_queue"), ("trip", work)] {
            assert_eq!(
                RetryState::arrived(via, work, &properties),
                RetryState::default(),
                "{via:?}: a publisher's headers start nothing"
            );
        }
    }

    #[test]
    fn only_the_topologys_tiers_become_retry_delay_labels() {
        let delays = crate::broker::topology::Topology::load(None).unwrap().retry.delays;
        let waited = |tier: &str| RetryState {
            retry_tier: Some(tier.into()),
            retry_published_at: Some(10_000),
            ..RetryState::default()
        };
        assert_eq!(
            waited("2s").retry_delay(&delays, 12_100),
            Some(("2s", Duration::from_millis(2_100)))
        );
        assert_eq!(waited("forged-tier").retry_delay(&delays, 12_100), None);
        assert_eq!(RetryState::default().retry_delay(&delays, 12_100), None, "no tier");
        assert_eq!(waited("1s").retry_delay(&delays, 10_000 + 2 * 86_400_000), None, "too old");
    }

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
    ) -> Attempt<'a> {
        Attempt { origin, state, number, started_ms: now_ms - 1, now_ms, error }
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
    fn a_deferred_copy_writes_the_workers_own_attempt_not_the_publishers() {
        let mut forged = FieldTable::default();
        forged.insert(ATTEMPT.into(), AMQPValue::LongLongInt(3));
        forged.insert(FIRST_FAILURE_AT.into(), AMQPValue::LongLongInt(1));
        forged.insert(DEFERRALS.into(), AMQPValue::LongLongInt(7));
        let published = original().with_headers(forged);
        // The trust rule gave this delivery a fresh state: it came from the trip exchange.
        let (origin, fresh) = (origin(), RetryState::default());
        let deferred = failed(&origin, &fresh, 1, 10, "429").deferred_properties(&published);
        let state = RetryState::from_properties(&deferred);
        assert_eq!(state.attempts, 0, "every command starts at attempt 1");
        assert_eq!(state.first_failure_at, None);
        assert_eq!(state.deferrals, 1);
    }

    #[test]
    fn a_copy_carries_at_most_its_share_of_the_original_headers() {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), long_string("00-abc-def-01"));
        headers.insert("small".into(), AMQPValue::LongLongInt(7));
        for i in 0..40 {
            headers.insert(format!("x-bulk-{i:02}").into(), long_string(&"b".repeat(4096)));
        }
        let bulky = BasicProperties::default().with_headers(headers).with_user_id("trip".into());
        let (origin, state) = (origin(), RetryState::default());
        let copy = failed(&origin, &state, 1, 42, "boom").retry_properties(&bulky, "1s", 1000);
        let headers = copy.headers().as_ref().unwrap();
        let carried: Vec<_> =
            headers.inner().keys().filter(|k| k.as_str().starts_with("x-bulk-")).collect();
        assert_eq!(carried.len(), 7, "7 of 4 KiB fit in 32 KiB with the small ones");
        assert_eq!(string(headers, "traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(int(headers, "small"), Some(7));
        let dropped = string(headers, DROPPED_HEADERS).unwrap();
        assert!(dropped.starts_with("33 headers, 135663 bytes: x-bulk-07, "), "{dropped}");
        assert_eq!(copy.user_id(), &None, "the broker checks user_id against the publisher");
        assert_eq!(string(headers, ORIGINAL_USER_ID).as_deref(), Some("trip"));
        let state = RetryState::from_properties(&copy);
        assert_eq!(state.attempts, 1, "the worker's own headers are always there");
    }

    #[test]
    fn long_errors_are_cut_on_a_character_boundary() {
        let text = "é".repeat(400);
        let cut = truncate(&text);
        assert!(cut.len() <= MAX_ERROR_LEN);
        assert!(cut.ends_with("..."));
    }
}
