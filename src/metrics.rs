//! Every metric payment-worker exports, defined in one place.
//!
//! Names carry the `payment_worker_` prefix, counters end in `_total`, durations are in
//! seconds, and label values come from bounded sets (never a trip id).

use prometheus::core::Collector;
use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    /// The outbox's decisions: `payment.event.success` published, or not again (duplicate).
    pub success_events: IntCounterVec,
    /// Event ids the ledger holds.
    pub ledger_event_ids: IntGauge,
    /// When a reconciliation run last finished, as read from the ledger.
    pub reconcile_last_success: Gauge,
    /// Events the last reconciliation run listed (undelivered ones unless `--all`), by type.
    pub reconcile_events: IntGaugeVec,
    /// Events the last reconciliation run handed to the outbox: paid, and not yet published.
    pub reconcile_published: IntGauge,
    /// HTTP connections closed at accept because `HTTP_MAX_CONNECTIONS` were open.
    pub http_connections_refused: IntCounter,
    pub ready: IntGauge,
}

/// What the metrics say about the program itself, given by whoever builds them, so that the
/// metrics import no consumer, broker or Stripe client types.
#[derive(Debug, Default)]
pub struct Program<'a> {
    /// The `stripe_api_version` label of `payment_worker_build_info`.
    pub stripe_api_version: &'a str,
    /// Counters kept elsewhere (the trace exporter's, built before any `Metrics`), served here
    /// too.
    pub counters: &'a [IntCounter],
    /// Every kind of publish failure, shown at zero from the start.
    pub publish_failure_kinds: &'a [&'a str],
}

impl Metrics {
    /// # Panics
    /// Never in practice: the definitions below are valid and each is registered once, where
    /// it is built.
    pub fn new(program: &Program<'_>) -> Self {
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
            .register_in(&registry),
            command_duration: HistogramVec::new(
                HistogramOpts::new(
                    "payment_worker_command_duration_seconds",
                    "Time from a command's first attempt to its final outcome, retries included",
                )
                .buckets(seconds(0.01, 2.0, 14)),
                &["outcome"],
            )
            .register_in(&registry),
            attempt_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "payment_worker_attempt_duration_seconds",
                    "Time one attempt took: decode, Stripe call, publish and ack",
                )
                .buckets(seconds(0.001, 2.0, 15)),
            )
            .register_in(&registry),
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
            .register_in(&registry),
            stripe_requests: IntCounterVec::new(
                Opts::new(
                    "payment_worker_stripe_requests_total",
                    "Checkout Session requests to Stripe by result (created, replayed, \
                     transport, timeout, rate_limited, server_error, client_error, \
                     idempotency_conflict, bad_response)",
                ),
                &["result"],
            )
            .register_in(&registry),
            stripe_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "payment_worker_stripe_request_duration_seconds",
                    "Latency of Checkout Session requests to Stripe",
                )
                .buckets(seconds(0.005, 2.0, 13)),
            )
            .register_in(&registry),
            stripe_in_flight: IntGauge::new(
                "payment_worker_stripe_requests_in_flight",
                "Checkout Session requests waiting for Stripe's answer",
            )
            .register_in(&registry),
            stripe_circuit_state: IntGaugeVec::new(
                Opts::new(
                    "payment_worker_stripe_circuit_state",
                    "1 for the Stripe circuit breaker's current state (closed, open, half_open), \
                     0 for the others",
                ),
                &["state"],
            )
            .register_in(&registry),
            stripe_circuit_transitions: IntCounterVec::new(
                Opts::new(
                    "payment_worker_stripe_circuit_transitions_total",
                    "Stripe circuit breaker transitions, by the state entered",
                ),
                &["to"],
            )
            .register_in(&registry),
            stripe_rate_limit: Gauge::new(
                "payment_worker_stripe_rate_limit",
                "The adaptive Stripe request rate of this replica, in requests per second",
            )
            .register_in(&registry),
            intake_paused_seconds: Counter::new(
                "payment_worker_intake_paused_seconds_total",
                "Time the consumer was cancelled because the Stripe circuit was open",
            )
            .register_in(&registry),
            broker_connected: IntGauge::new(
                "payment_worker_broker_connected",
                "1 while the worker holds a broker connection with its consumer running",
            )
            .register_in(&registry),
            broker_reconnects: IntCounter::new(
                "payment_worker_broker_reconnects_total",
                "Broker sessions lost and started again",
            )
            .register_in(&registry),
            channel_errors: IntCounter::new(
                "payment_worker_channel_errors_total",
                "Broker sessions ended by a channel or connection failure, or restarted after a nacked event or copy",
            )
            .register_in(&registry),
            publish_failures: IntCounterVec::new(
                Opts::new(
                    "payment_worker_publish_failures_total",
                    "Publishes not confirmed by the broker, by kind (nacked, returned, channel)",
                ),
                &["kind"],
            )
            .register_in(&registry),
            queue_messages: IntGaugeVec::new(
                Opts::new(
                    "payment_worker_queue_messages",
                    "Messages ready in the work, wait and parking queues, polled from the broker; \
                     role is work, wait or parked",
                ),
                &["queue", "role"],
            )
            .register_in(&registry),
            retry_tier_seconds: prometheus::GaugeVec::new(
                Opts::new(
                    "payment_worker_retry_tier_seconds",
                    "The configured delay of each retry tier",
                ),
                &["tier"],
            )
            .register_in(&registry),
            webhook_requests: IntCounterVec::new(
                Opts::new(
                    "payment_worker_webhook_requests_total",
                    "Stripe webhook requests by result",
                ),
                &["result"],
            )
            .register_in(&registry),
            success_events: IntCounterVec::new(
                Opts::new(
                    "payment_worker_success_events_total",
                    "Stripe events taken from the outbox, by result: published as \
                     payment.event.success, or a duplicate of one already published",
                ),
                &["result"],
            )
            .register_in(&registry),
            ledger_event_ids: IntGauge::new(
                "payment_worker_ledger_event_ids",
                "Stripe event ids the ledger holds (published within its max age)",
            )
            .register_in(&registry),
            reconcile_last_success: Gauge::new(
                "payment_worker_reconcile_last_success_timestamp_seconds",
                "When a reconciliation run last finished, as recorded in the ledger",
            )
            .register_in(&registry),
            reconcile_events: IntGaugeVec::new(
                Opts::new(
                    "payment_worker_reconcile_events",
                    "Events the last reconciliation run listed, by type",
                ),
                &["type"],
            )
            .register_in(&registry),
            reconcile_published: IntGauge::new(
                "payment_worker_reconcile_published",
                "Paid events the last reconciliation run found unpublished and published",
            )
            .register_in(&registry),
            http_connections_refused: IntCounter::new(
                "payment_worker_http_connections_refused_total",
                "HTTP connections closed at once because HTTP_MAX_CONNECTIONS were open",
            )
            .register_in(&registry),
            ready: IntGauge::new("payment_worker_ready", "1 while /readyz answers 200")
                .register_in(&registry),
            registry,
        };
        let build_info = IntGaugeVec::new(
            Opts::new("payment_worker_build_info", "Always 1; labels name the build"),
            &["version", "stripe_api_version"],
        )
        .register_in(&metrics.registry);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), program.stripe_api_version])
            .set(1);
        // The exporter's counters live with the exporter, which is built before any Metrics.
        for counter in program.counters {
            metrics
                .registry
                .register(Box::new(counter.clone()))
                .expect("each metric is registered once per registry");
        }
        // Every kind at zero from the start, so rate() and dashboards see the series before
        // the first failure.
        for kind in program.publish_failure_kinds {
            metrics.publish_failures.with_label_values(&[kind]).reset();
        }
        for result in ["published", "duplicate"] {
            metrics.success_events.with_label_values(&[result]).reset();
        }
        metrics
    }

    /// Shows what the last reconciliation run found: when it finished (Unix seconds), the
    /// events of each type (the caller names the types, a bounded set), what it published.
    pub fn record_reconciled(&self, finished_at: f64, found: &[(&str, u64)], published: u64) {
        self.reconcile_last_success.set(finished_at);
        for (kind, count) in found {
            self.reconcile_events.with_label_values(&[kind]).set(*count as i64);
        }
        self.reconcile_published.set(published as i64);
    }

    /// Records how a delivery ended. Attempts past the schedule's `max_attempts` share one
    /// label value (`"5+"` for 4 attempts), so no header can grow the label set.
    /// `reason`: the park reason, or `""`.
    pub fn record_outcome(&self, outcome: &str, reason: &str, attempt: u32, max_attempts: u32) {
        let attempt = if attempt > max_attempts {
            format!("{}+", max_attempts.saturating_add(1))
        } else {
            attempt.to_string()
        };
        self.commands.with_label_values(&[outcome, &attempt, reason]).inc();
    }

    /// Shows `state` (`closed`, `open` or `half_open`) as the circuit breaker's current state.
    pub fn set_circuit_state(&self, state: &str) {
        for label in ["closed", "open", "half_open"] {
            let value = i64::from(label == state);
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

/// Registers a metric where it is built, and hands it to the field that keeps it.
trait RegisterIn<C> {
    fn register_in(self, registry: &Registry) -> C;
}

impl<C: Collector + Clone + 'static> RegisterIn<C> for prometheus::Result<C> {
    fn register_in(self, registry: &Registry) -> C {
        let metric = self.expect("a valid metric definition");
        registry.register(Box::new(metric.clone())).expect("each metric is registered once");
        metric
    }
}
