//! One delivery: its retry state read from headers, the attempt, the replacement confirmed,
//! then the settle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, error, info, info_span, warn};

use crate::broker::publish::{PublishError, Publisher, persistent_json};
use crate::broker::topology::{Delay, Topology};
use crate::contract::{CreateSession, InvalidMessage};
use crate::delivery::copies::{self, Attempt, Origin, RetryState};
use crate::delivery::decision::{Action, Class, decide, within_budget};
use crate::delivery::outcome::{Outcome, ParkReason};
use crate::delivery::plan::{Copy, Plan, plan};
use crate::metrics::Metrics;
use crate::stripe::breaker::Signal;
use crate::stripe::{CallError, CheckoutUrls, Gateway, StripeError};
use crate::trace;

use super::session::requeue;

/// What one broker connection shares among its delivery tasks.
pub(super) struct Handler {
    pub(super) topology: Arc<Topology>,
    pub(super) gateway: Arc<Gateway>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) urls: CheckoutUrls,
    pub(super) wait_budget: Duration,
    pub(super) publisher: Publisher,
    /// Cancelled when a publish finds the channel broken: the connection must start over.
    pub(super) connection_failed: CancellationToken,
    /// Cancelled once a delivery whose event or copy the broker nacked is settled: the
    /// session starts over on a new channel (see [`Failure::nacked`]).
    pub(super) nacked: CancellationToken,
}

/// Why an attempt, or the publish of its replacement, did not succeed; `detail` is recorded
/// on the replacement.
struct Failure {
    class: Class,
    detail: String,
    /// The broker nacked the result event or a copy. A channel that began publishing to a
    /// quorum queue while its leader was being elected can go on being refused by it
    /// (RabbitMQ 3.10), so the session starts over once this delivery is settled.
    nacked: bool,
}

impl Failure {
    fn new(class: Class, detail: impl Into<String>) -> Self {
        Self { class, detail: detail.into(), nacked: false }
    }
}

impl Handler {
    pub(super) async fn handle(&self, delivery: Delivery) {
        let started = Instant::now();
        let started_ms = copies::now_ms();
        let state = RetryState::arrived(
            (delivery.exchange.as_str(), delivery.routing_key.as_str()),
            &self.topology.work_queue.name,
            &delivery.properties,
        );
        let attempt = state.attempts.saturating_add(1);
        self.observe_retry_delay(&state, started_ms);
        let origin = state.origin((delivery.exchange.as_str(), delivery.routing_key.as_str()));
        let command = CreateSession::decode(&delivery.data);
        let trip_id = match &command {
            Ok(command) => command.trip_id.clone(),
            Err(_) => CreateSession::trip_id_hint(&delivery.data).unwrap_or_default(),
        };
        let span = self.consumer_span(&delivery, &trip_id, attempt);

        let outcome_span = span.clone();
        async {
            let failure =
                self.attempt(&origin, command, &delivery.properties, attempt > 1).await.err();
            if let Some(failure) = &failure {
                trace::failed(&outcome_span, &failure.detail);
            }
            let event_nacked = failure.as_ref().is_some_and(|f| f.nacked);
            let attempted = Attempt {
                origin: &origin,
                state: &state,
                number: attempt,
                started_ms,
                now_ms: started_ms,
                error: "",
            };
            let (outcome, copy_nacked) = self.conclude(&delivery, attempted, failure).await;
            outcome_span.record("payment.outcome", outcome.as_str());
            if let Outcome::Parked(reason) = outcome {
                outcome_span.record("payment.park_reason", reason.as_str());
            }
            self.settle(&delivery, outcome).await;
            if event_nacked || copy_nacked {
                self.nacked.cancel();
            }
            self.record(outcome, attempt, started, state.first_seen_at.unwrap_or(started_ms));
        }
        .instrument(span)
        .await;
    }

    /// The consumer span of one delivery, continuing the trace the command carries.
    fn consumer_span(&self, delivery: &Delivery, trip_id: &str, attempt: u32) -> Span {
        let queue = &self.topology.work_queue.name;
        let span = info_span!(
            "command",
            otel.name = %format_args!("process {queue}"),
            otel.kind = "consumer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = %queue,
            messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
            messaging.message.id = Empty,
            payment.attempt = attempt,
            payment.outcome = Empty,
            payment.park_reason = Empty,
            trip.id = %trip_id,
            trip_id = %trip_id,
            attempt,
            delivery_tag = delivery.delivery_tag,
            trace_id = Empty,
            span_id = Empty,
        );
        if let Some(id) = delivery.properties.message_id() {
            span.record("messaging.message.id", id.as_str());
        }
        trace::continue_from(&span, &delivery.properties);
        span
    }

    /// Counts how the delivery ended; for a payment done for good, the time since it first
    /// arrived (`first_seen_ms`).
    fn record(&self, outcome: Outcome, attempt: u32, started: Instant, first_seen_ms: u64) {
        let reason = outcome.park_reason().map_or("", ParkReason::as_str);
        let max_attempts = self.topology.max_attempts();
        self.metrics.record_outcome(outcome.as_str(), reason, attempt, max_attempts);
        self.metrics.attempt_duration.observe(started.elapsed().as_secs_f64());
        if matches!(outcome, Outcome::Succeeded | Outcome::Parked(_)) {
            let total = Duration::from_millis(copies::now_ms().saturating_sub(first_seen_ms));
            self.metrics
                .command_duration
                .with_label_values(&[outcome.as_str()])
                .observe(total.as_secs_f64());
        }
    }

    /// How long a retry copy really waited in the broker, for the tiers the topology has.
    fn observe_retry_delay(&self, state: &RetryState, now_ms: u64) {
        if let Some((tier, spent)) = state.retry_delay(&self.topology.retry.delays, now_ms) {
            self.metrics.retry_delay.with_label_values(&[tier]).observe(spent.as_secs_f64());
        }
    }

    /// Decides what the attempt's `failure` (`None`: success) calls for and carries it out;
    /// each replacement the broker refuses leads to the next decision, ending in an outcome.
    /// `true` with it: the broker nacked a copy on the way.
    async fn conclude(
        &self,
        delivery: &Delivery,
        attempt: Attempt<'_>,
        failure: Option<Failure>,
    ) -> (Outcome, bool) {
        let delays = &self.topology.retry.delays;
        let (mut action, mut detail) = match failure {
            None => (decide(attempt.number, None, delays), String::new()),
            Some(f) => (decide(attempt.number, Some(f.class), delays), f.detail),
        };
        if matches!(action, Action::Defer | Action::DeferFor(_)) {
            let since = copies::now_ms().saturating_sub(attempt.first_seen_ms());
            let waited = Duration::from_millis(since);
            action = within_budget(action, waited, self.wait_budget);
            if matches!(action, Action::Park(_)) {
                detail = format!(
                    "deferred for {}s since it first arrived, past STRIPE_WAIT_BUDGET ({}s); \
                     last: {detail}",
                    waited.as_secs(),
                    self.wait_budget.as_secs()
                );
            }
        }
        let mut nacked = false;
        loop {
            let failed = Attempt { now_ms: copies::now_ms(), error: &detail, ..attempt.clone() };
            match self.execute(delivery, &action, &failed).await {
                Ok(outcome) => return (outcome, nacked),
                Err(refused) => {
                    nacked |= refused.nacked;
                    action = decide(attempt.number, Some(refused.class), delays);
                    detail = refused.detail;
                }
            }
        }
    }

    /// Checks the message, creates the Checkout Session and publishes the event.
    /// `suspect`: an earlier attempt of this payment failed (see [`Gateway::create_session`]).
    async fn attempt(
        &self,
        origin: &Origin,
        command: Result<CreateSession, InvalidMessage>,
        incoming: &BasicProperties,
        suspect: bool,
    ) -> Result<(), Failure> {
        let expected = &self.topology.routing_keys.create_session;
        if &origin.routing_key != expected {
            return Err(Failure::new(
                Class::Permanent(ParkReason::UnexpectedRoutingKey),
                format!("routing key {:?} is not {expected:?}", origin.routing_key),
            ));
        }
        let command = command.map_err(|invalid| {
            Failure::new(Class::Permanent(ParkReason::InvalidMessage), invalid.to_string())
        })?;
        let session = self
            .gateway
            .create_session(&command, &self.urls, suspect)
            .await
            .map_err(call_failure)?;
        let body = command.session_created(&session.id);
        let properties = event_properties(
            format!("{}:{}", self.topology.routing_keys.session_created, command.trip_id),
            incoming,
        );
        let routing_key = &self.topology.routing_keys.session_created;
        let exchange = &self.topology.exchanges.trip;
        let span = trace::producer_span(exchange, routing_key, "event");
        match self.publish(exchange, routing_key, &body, properties, span).await {
            Ok(()) => {
                info!(
                    outcome = "succeeded",
                    session_id = %session.id,
                    replayed = session.replayed,
                    "session created, event published",
                );
                Ok(())
            }
            Err(e) if e.is_channel_failure() => Err(Failure::new(Class::Channel, e.to_string())),
            Err(e) => Err(Failure {
                nacked: matches!(e, PublishError::Nacked),
                ..Failure::new(Class::Transient, format!("publishing {routing_key}: {e}"))
            }),
        }
    }

    /// Carries out `action`: publishes the replacement it calls for. `Err` when the broker
    /// refused the replacement.
    async fn execute(
        &self,
        delivery: &Delivery,
        action: &Action,
        failed: &Attempt<'_>,
    ) -> Result<Outcome, Failure> {
        let copy = match plan(action, failed, &delivery.properties, &self.topology) {
            Plan::Settle(Outcome::Abandoned) => {
                warn!(error = %failed.error, "publish channel failed; the broker will redeliver");
                return Ok(Outcome::Abandoned);
            }
            Plan::Settle(outcome) => return Ok(outcome),
            Plan::Publish(copy) => *copy,
        };
        let span = trace::producer_span(copy.exchange, copy.routing_key, copy.name());
        let Copy { exchange, routing_key, properties, outcome, unroutable } = copy;
        if let Outcome::Parked(reason) = outcome {
            span.record("payment.park_reason", reason.as_str());
        }
        let mut published =
            self.publish(exchange, routing_key, &delivery.data, properties.clone(), span).await;
        if let (Action::Retry(delay), Err(PublishError::Returned { .. })) = (action, &published) {
            published = self.redeclare_and_retry(delay, &delivery.data, properties).await;
        }
        match published {
            Ok(()) => {
                log_confirmed(outcome, routing_key, failed.error);
                Ok(outcome)
            }
            Err(e) if e.is_channel_failure() => Ok(Outcome::Abandoned),
            Err(e) => {
                let nacked = matches!(e, PublishError::Nacked);
                let class = if nacked { Class::CopyRefused } else { unroutable };
                if class == Class::CopyRefused {
                    error!(
                        outcome = "requeued",
                        error = %e,
                        "the broker refused the replacement; handing the message back",
                    );
                }
                Err(Failure {
                    nacked,
                    ..Failure::new(
                        class,
                        format!("{}; the {} copy was refused: {e}", failed.error, outcome.as_str()),
                    )
                })
            }
        }
    }

    /// A retry copy found no wait queue bound (someone deleted it while the worker ran):
    /// declares it again and publishes the copy once more.
    async fn redeclare_and_retry(
        &self,
        delay: &Delay,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let queue = self.topology.wait_queue(delay);
        warn!(queue = %queue, "a retry copy found no wait queue; declaring it again");
        if let Err(e) = self.topology.declare_wait_queue(self.publisher.channel(), delay).await {
            warn!(queue = %queue, error = %e, "declaring the wait queue again failed");
        }
        let exchange = &self.topology.retry.exchange;
        let span = trace::producer_span(exchange, delay.label(), "retry");
        self.publish(exchange, delay.label(), body, properties, span).await
    }

    /// Acks once the replacement is confirmed, or hands the message back.
    async fn settle(&self, delivery: &Delivery, outcome: Outcome) {
        match outcome {
            Outcome::Succeeded | Outcome::Retried | Outcome::Parked(_) | Outcome::Deferred => {
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    // The replacement is already confirmed; the broker redelivers the original
                    // and idempotency makes the second pass harmless.
                    warn!(error = %e, "ack failed after the replacement was confirmed");
                    self.metrics.channel_errors.inc();
                    self.connection_failed.cancel();
                }
            }
            Outcome::Requeued => requeue(&delivery.acker).await,
            Outcome::Abandoned => {}
        }
    }

    /// Publishes on the connection's confirm channel, inside `span` ([`trace::publish`]). A
    /// broken channel also ends the connection, since nothing more can be published or acked
    /// on it.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        span: Span,
    ) -> Result<(), PublishError> {
        let target = (exchange, routing_key);
        let result =
            trace::publish(&self.publisher, target, body, properties, span, &self.metrics).await;
        if result.as_ref().is_err_and(PublishError::is_channel_failure) {
            self.connection_failed.cancel();
        }
        result
    }
}

/// Logs a replacement the broker confirmed.
fn log_confirmed(outcome: Outcome, tier: &str, error: &str) {
    match outcome {
        Outcome::Retried => {
            info!(
                outcome = "retried",
                tier,
                error = %error,
                "attempt failed, retry scheduled in the broker",
            )
        }
        Outcome::Parked(reason) => {
            warn!(
                outcome = "parked",
                reason = reason.as_str(),
                error = %error,
                "message parked",
            )
        }
        _ => {
            debug!(
                outcome = "deferred",
                error = %error,
                "Stripe is the problem: back to the work queue, no attempt spent",
            )
        }
    }
}

/// The class of a failed Stripe call.
fn call_failure(error: CallError) -> Failure {
    let CallError::Stripe { error, spread } = error else {
        return Failure::new(Class::CircuitOpen, error.to_string());
    };
    let class = match error.signal() {
        Signal::Throttled => Class::RateLimited,
        Signal::Failed => Class::StripeWide(spread),
        Signal::Answered if error.is_replayed_server_error() => {
            Class::Permanent(ParkReason::StripeReplayedError)
        }
        Signal::Answered if error.is_transient() => Class::Transient,
        Signal::Answered if error.is_parameter_mismatch() => {
            Class::Permanent(ParkReason::IdempotencyConflict)
        }
        Signal::Answered if matches!(error, StripeError::BadResponse(_)) => {
            Class::Permanent(ParkReason::StripeBadResponse)
        }
        Signal::Answered => Class::Permanent(ParkReason::StripeRejected),
    };
    Failure::new(class, error.to_string())
}

/// Properties of an event published on behalf of `incoming`: persistent JSON with a
/// deterministic message id, continuing the incoming W3C trace.
pub fn event_properties(message_id: String, incoming: &BasicProperties) -> BasicProperties {
    let properties = persistent_json().with_message_id(message_id.into());
    match trace::continued(incoming) {
        Some(headers) => properties.with_headers(headers),
        None => properties,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stripe::breaker::Spread;

    fn api(status: u16, should_retry: Option<bool>, replayed: bool, kind: &str) -> StripeError {
        StripeError::Api {
            status,
            should_retry,
            retry_after: None,
            replayed,
            kind: Some(kind.into()),
            code: None,
            message: "scripted".into(),
        }
    }

    fn class(error: StripeError, spread: Spread) -> Class {
        call_failure(CallError::Stripe { error, spread }).class
    }

    #[test]
    fn each_stripe_failure_has_its_class() {
        use Spread::{Isolated, Widespread};
        assert_eq!(call_failure(CallError::CircuitOpen).class, Class::CircuitOpen);
        for spread in [Isolated, Widespread] {
            let wide = Class::StripeWide(spread);
            assert_eq!(class(StripeError::transport("reset"), spread), wide);
            assert_eq!(class(StripeError::Timeout(Duration::from_secs(10)), spread), wide);
            assert_eq!(class(api(503, None, false, "api_error"), spread), wide);
            assert_eq!(class(api(500, Some(true), false, "api_error"), spread), wide);
        }
        let park = |reason| Class::Permanent(reason);
        assert_eq!(class(api(429, None, false, "rate_limit_error"), Isolated), Class::RateLimited);
        // Stripe's saved answer under this key: it will not change, so it parks at once.
        assert_eq!(
            class(api(500, None, true, "api_error"), Widespread),
            park(ParkReason::StripeReplayedError)
        );
        // A 409 (a concurrent request with the key) may pass; a 400 idempotency_error is a
        // request that changed.
        assert_eq!(
            class(api(409, Some(true), false, "idempotency_error"), Isolated),
            Class::Transient
        );
        assert_eq!(
            class(api(400, None, false, "idempotency_error"), Isolated),
            park(ParkReason::IdempotencyConflict)
        );
        assert_eq!(
            class(StripeError::BadResponse("no id".into()), Isolated),
            park(ParkReason::StripeBadResponse)
        );
        assert_eq!(
            class(api(400, None, false, "invalid_request_error"), Isolated),
            park(ParkReason::StripeRejected)
        );
        assert_eq!(
            class(api(500, Some(false), false, "api_error"), Isolated),
            park(ParkReason::StripeRejected),
            "a 5xx Stripe says not to retry"
        );
    }
}
