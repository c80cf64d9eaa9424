//! Every metric payment-worker exports, defined in one place.
//!
//! Names carry the `payment_worker_` prefix, counters end in `_total`, durations are in
//! seconds, and label values come from bounded sets (never a trip id).

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::breaker::State;
use crate::retry::ParkReason;

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event was published and the command acked.
    Succeeded,
    /// A retry copy was published to a wait queue and the command acked.
    Retried,
    /// A parked copy was published and the command acked.
    Parked(ParkReason),
    /// Stripe was failing, rate-limiting or behind an open circuit: a copy with the attempt
    /// count unchanged went back to the work queue and the command was acked.
    Deferred,
    /// No replacement could be published; the command was handed back to the broker.
    Requeued,
    /// The channel failed; the broker redelivers the command by itself.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Retried => "retried",
            Self::Parked(_) => "parked",
            Self::Deferred => "deferred",
            Self::Requeued => "requeued",
            Self::Abandoned => "abandoned",
        }
    }
}

/// The worker's metrics and the registry that serves them.
pub struct Metrics {
    registry: Registry,
    /// Commands by outcome, attempt number and park reason.
    pub commands: IntCounterVec,
    /// From the first attempt of a command to its final outcome.
    pub command_duration: HistogramVec,
    /// One attempt: decode, Stripe, publish, ack.
    pub attempt_duration: Histogram,
    /// Time a retry copy really spent in the broker, per tier.
    pub retry_delay: HistogramVec,
    pub stripe_requests: IntCounterVec,
    pub stripe_duration: Histogram,
    pub stripe_in_flight: IntGauge,
    /// 1 for the circuit breaker's current state (closed, open, half_open), 0 for the others.
    pub stripe_circuit_state: IntGaugeVec,
    pub stripe_circuit_transitions: IntCounterVec,
    /// The adaptive Stripe request rate, requests per second.
    pub stripe_rate_limit: Gauge,
    /// Time the consumer spent cancelled because the circuit was open.
    pub intake_paused_seconds: Counter,
    pub broker_connected: IntGauge,
    pub broker_reconnects: IntCounter,
    pub channel_errors: IntCounter,
    pub publish_failures: IntCounterVec,
    /// Messages waiting in the work, wait and parking queues.
    pub queue_messages: IntGaugeVec,
    /// The configured delay of each retry tier, for comparing with `retry_delay`.
    pub retry_tier_seconds: prometheus::GaugeVec,
    pub webhook_requests: IntCounterVec,
    pub ready: IntGauge,
}

impl Metrics {
    /// # Panics
    /// Never in practice: the definitions below are valid and registered once.
    pub fn new() -> Self {
        let registry = Registry::new();
        let seconds = |start: f64, factor: f64, count: usize| {
            prometheus::exponential_buckets(start, factor, count).expect("valid buckets")
        };
        let metrics = Self {
            commands: IntCounterVec::new(
                Opts::new(
                    "payment_worker_commands_total",
                    "Create-session commands handled, by outcome (succeeded, retried, parked, \
                     deferred, requeued, abandoned), attempt number and park reason",
                ),
                &["outcome", "attempt", "reason"],
            )
            .expect("valid metric"),
            command_duration: HistogramVec::new(
                HistogramOpts::new(
                    "payment_worker_command_duration_seconds",
                    "Time from a command's first attempt to its final outcome, retries included",
                )
                .buckets(seconds(0.01, 2.0, 14)),
                &["outcome"],
            )
            .expect("valid metric"),
            attempt_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "payment_worker_attempt_duration_seconds",
                    "Time one attempt took: decode, Stripe call, publish and ack",
                )
                .buckets(seconds(0.001, 2.0, 15)),
            )
            .expect("valid metric"),
            retry_delay: HistogramVec::new(
                HistogramOpts::new(
                    "payment_worker_retry_delay_seconds",
                    "Time a retry copy actually spent in the broker, from its publish to its \
                     return, by delay tier",
                )
                .buckets(vec![
                    0.25, 0.5, 0.9, 1.0, 1.1, 1.5, 2.0, 2.2, 3.0, 4.0, 4.4, 6.0, 8.0, 16.0, 32.0,
                    64.0,
                ]),
                &["tier"],
            )
            .expect("valid metric"),
            stripe_requests: IntCounterVec::new(
                Opts::new(
                    "payment_worker_stripe_requests_total",
                    "Checkout Session requests to Stripe by result (created, replayed, \
                     transport, timeout, rate_limited, server_error, client_error, \
                     idempotency_conflict, bad_response)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            stripe_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "payment_worker_stripe_request_duration_seconds",
                    "Latency of Checkout Session requests to Stripe",
                )
                .buckets(seconds(0.005, 2.0, 13)),
            )
            .expect("valid metric"),
            stripe_in_flight: IntGauge::new(
                "payment_worker_stripe_requests_in_flight",
                "Checkout Session requests waiting for Stripe's answer",
            )
            .expect("valid metric"),
            stripe_circuit_state: IntGaugeVec::new(
                Opts::new(
                    "payment_worker_stripe_circuit_state",
                    "1 for the Stripe circuit breaker's current state (closed, open, half_open), \
                     0 for the others",
                ),
                &["state"],
            )
            .expect("valid metric"),
            stripe_circuit_transitions: IntCounterVec::new(
                Opts::new(
                    "payment_worker_stripe_circuit_transitions_total",
                    "Stripe circuit breaker transitions, by the state entered",
                ),
                &["to"],
            )
            .expect("valid metric"),
            stripe_rate_limit: Gauge::new(
                "payment_worker_stripe_rate_limit",
                "The adaptive Stripe request rate of this replica, in requests per second",
            )
            .expect("valid metric"),
            intake_paused_seconds: Counter::new(
                "payment_worker_intake_paused_seconds_total",
                "Time the consumer was cancelled because the Stripe circuit was open",
            )
            .expect("valid metric"),
            broker_connected: IntGauge::new(
                "payment_worker_broker_connected",
                "1 while the worker holds a broker connection with its consumer running",
            )
            .expect("valid metric"),
            broker_reconnects: IntCounter::new(
                "payment_worker_broker_reconnects_total",
                "Broker sessions lost and started again",
            )
            .expect("valid metric"),
            channel_errors: IntCounter::new(
                "payment_worker_channel_errors_total",
                "Channel or connection failures seen by the worker",
            )
            .expect("valid metric"),
            publish_failures: IntCounterVec::new(
                Opts::new(
                    "payment_worker_publish_failures_total",
                    "Publishes not confirmed by the broker, by kind (nacked, returned, channel)",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            queue_messages: IntGaugeVec::new(
                Opts::new(
                    "payment_worker_queue_messages",
                    "Messages ready in the work, wait and parking queues, polled from the broker; \
                     role is work, wait or parked",
                ),
                &["queue", "role"],
            )
            .expect("valid metric"),
            retry_tier_seconds: prometheus::GaugeVec::new(
                Opts::new(
                    "payment_worker_retry_tier_seconds",
                    "The configured delay of each retry tier",
                ),
                &["tier"],
            )
            .expect("valid metric"),
            webhook_requests: IntCounterVec::new(
                Opts::new(
                    "payment_worker_webhook_requests_total",
                    "Stripe webhook requests by result",
                ),
                &["result"],
            )
            .expect("valid metric"),
            ready: IntGauge::new("payment_worker_ready", "1 while /readyz answers 200")
                .expect("valid metric"),
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new("payment_worker_build_info", "Always 1; labels name the build"),
            &["version", "stripe_api_version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), &crate::stripe::api_version()])
            .set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.commands.clone()),
            Box::new(metrics.command_duration.clone()),
            Box::new(metrics.attempt_duration.clone()),
            Box::new(metrics.retry_delay.clone()),
            Box::new(metrics.stripe_requests.clone()),
            Box::new(metrics.stripe_duration.clone()),
            Box::new(metrics.stripe_in_flight.clone()),
            Box::new(metrics.stripe_circuit_state.clone()),
            Box::new(metrics.stripe_circuit_transitions.clone()),
            Box::new(metrics.stripe_rate_limit.clone()),
            Box::new(metrics.intake_paused_seconds.clone()),
            Box::new(metrics.broker_connected.clone()),
            Box::new(metrics.broker_reconnects.clone()),
            Box::new(metrics.channel_errors.clone()),
            Box::new(metrics.publish_failures.clone()),
            Box::new(metrics.queue_messages.clone()),
            Box::new(metrics.retry_tier_seconds.clone()),
            Box::new(metrics.webhook_requests.clone()),
            Box::new(metrics.ready.clone()),
            Box::new(build_info),
        ];
        for collector in collectors {
            metrics.registry.register(collector).expect("each metric is registered once");
        }
        metrics
    }

    /// Records how a delivery ended.
    pub fn record_outcome(&self, outcome: Outcome, attempt: u32) {
        let reason = match outcome {
            Outcome::Parked(reason) => reason.as_str(),
            _ => "",
        };
        self.commands.with_label_values(&[outcome.as_str(), &attempt.to_string(), reason]).inc();
    }

    /// Shows `state` as the circuit breaker's current state.
    pub fn set_circuit_state(&self, state: State) {
        for label in ["closed", "open", "half_open"] {
            let value = i64::from(label == state.as_str());
            self.stripe_circuit_state.with_label_values(&[label]).set(value);
        }
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding to memory cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
