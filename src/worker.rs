//! The consumer: one broker connection at a time, deliveries handled concurrently up to the
//! prefetch, every delivery settled only after its replacement is confirmed.
//!
//! For each `payment.cmd.create_session` delivery exactly one of these happens:
//!
//! * **succeeded**: the Checkout Session exists, `payment.event.session_created` is confirmed,
//!   the command is acked;
//! * **retried**: a transient failure; a copy with the next delay as TTL is confirmed into its
//!   wait queue (which dead-letters it back to the work queue), the command is acked; when
//!   the failure was the broker nacking the event, the session then starts over;
//! * **parked**: a permanent failure or the last attempt; a copy is confirmed into the parking
//!   queue, the command is acked;
//! * **requeued**: not even the parked copy was accepted; the command is nacked back;
//! * **deferred**: Stripe was failing or rate-limiting, or the circuit was open; a copy with
//!   the attempt count unchanged is confirmed back to the work queue (through the first wait
//!   queue when its own call failed), the command is acked;
//! * **abandoned**: the channel failed mid-way; the connection ends and the broker redelivers.
//!
//! Stripe calls are idempotent by trip, so whatever is done twice is harmless.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::{BrokerAccess, Pool, PoolError};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, error, info, info_span, warn};

use crate::breaker::{Signal, State};
use crate::broker::{PublishError, Publisher, persistent_json};
use crate::contract::{CreateSession, InvalidMessage};
use crate::decision::{Action, Class, decide, within_budget};
use crate::error_chain;
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::retry::{self, FailedAttempt, Origin, ParkReason, RetryState};
use crate::stripe::{CallError, CheckoutUrls, Gateway, StripeError};
use crate::topology::{Delay, Topology, TopologyError};
use crate::trace;

/// How long a stop or a lost session waits for the broker to answer a cancel or a close.
const BROKER_REPLY_ON_STOP: Duration = Duration::from_secs(5);

/// How often a broker that did not answer is probed ([`BrokerAccess::probe`]) between reconnects.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// How long a requeued command is held before it goes back, so that a broker refusing every
/// replacement does not turn into a hot loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

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
    /// count unchanged went back to the work queue (or through the first wait queue) and the
    /// command was acked.
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

/// Reconnecting after the broker session is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Consecutive failed broker connections before the worker gives up and exits non-zero.
    pub max_attempts: usize,
}

impl ReconnectPolicy {
    fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_jitter()
            .with_max_times(self.max_attempts)
            .build()
    }
}

/// Everything the worker needs besides the broker and Stripe.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Deliveries in flight at once (`basic.qos`).
    pub prefetch: u16,
    /// How long a graceful stop waits for in-flight deliveries.
    pub shutdown_grace: Duration,
    pub reconnect: ReconnectPolicy,
    pub urls: CheckoutUrls,
    /// How long a payment may keep being deferred since it first arrived before it is parked
    /// `stripe_unavailable` (see [`within_budget`]).
    pub wait_budget: Duration,
}

/// Why the worker stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Topology(TopologyError),
    #[error("gave up after {attempts} failed broker sessions in a row; last: {last}")]
    ReconnectBudgetSpent { attempts: usize, last: String },
}

/// What a broker connection holds once it is set up.
struct Opened {
    publisher: Publisher,
    /// The consume channel.
    channel: Channel,
    consumer: Consumer,
}

/// How one broker connection ended.
enum ConnectionEnd {
    /// Asked to stop; in-flight work was drained.
    Stopped,
    /// The connection failed; `consumed` tells whether it had got as far as consuming, and
    /// `answered` whether the broker answered at all (else a cheap probe may find it back
    /// before the backoff delay ends).
    Lost { consumed: bool, answered: bool, cause: String },
    /// The broker refused the topology in a way retrying cannot fix.
    Fatal(TopologyError),
}

/// The long-running consumer.
pub struct Worker {
    topology: Arc<Topology>,
    gateway: Arc<Gateway>,
    pool: Pool,
    broker: BrokerAccess,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    settings: WorkerSettings,
}

impl Worker {
    pub fn new(
        topology: Arc<Topology>,
        gateway: Arc<Gateway>,
        pool: Pool,
        broker: BrokerAccess,
        metrics: Arc<Metrics>,
        readiness: Readiness,
        settings: WorkerSettings,
    ) -> Self {
        Self { topology, gateway, pool, broker, metrics, readiness, settings }
    }

    /// Consumes until `shutdown` is cancelled, reconnecting after every lost connection.
    ///
    /// # Errors
    /// When the broker refuses the topology (406), or the reconnect budget is spent.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let mut backoff = self.settings.reconnect.backoff();
        let mut failures = 0;
        loop {
            let end = self.connection(&shutdown).await;
            self.metrics.broker_connected.set(0);
            match end {
                ConnectionEnd::Stopped => return Ok(()),
                ConnectionEnd::Fatal(e) => {
                    self.readiness.set_not_ready("topology refused by the broker");
                    return Err(WorkerError::Topology(e));
                }
                ConnectionEnd::Lost { consumed, answered, cause } => {
                    self.readiness.set_not_ready(format!("broker session lost: {cause}"));
                    if consumed {
                        backoff = self.settings.reconnect.backoff();
                        failures = 0;
                    }
                    failures += 1;
                    let Some(delay) = backoff.next() else {
                        return Err(WorkerError::ReconnectBudgetSpent {
                            attempts: failures,
                            last: cause,
                        });
                    };
                    warn!(
                        cause = %cause,
                        retry_in_ms = delay.as_millis() as u64,
                        "broker session lost, reconnecting",
                    );
                    self.metrics.broker_reconnects.inc();
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = self.wait_to_reconnect(delay, answered) => {}
                    }
                }
            }
        }
    }

    /// Waits `delay` before the next connection. When the broker did not answer at all,
    /// a probe of its nodes every [`PROBE_INTERVAL`] ends the wait as soon as one
    /// answers: the worker is back within a fraction of a second of the broker, and a broker
    /// that answers but refuses (credentials, TLS, topology) is not hammered with handshakes.
    async fn wait_to_reconnect(&self, delay: Duration, answered: bool) {
        let until = tokio::time::Instant::now() + delay;
        if answered {
            return tokio::time::sleep_until(until).await;
        }
        while tokio::time::Instant::now() < until {
            let probe = self.broker.probe(PROBE_INTERVAL);
            if let Ok(true) = tokio::time::timeout_at(until, probe).await {
                return;
            }
            tokio::time::sleep_until(until.min(tokio::time::Instant::now() + PROBE_INTERVAL)).await;
        }
    }

    /// One broker connection, from connecting to its end: open, consume, then drain (asked to
    /// stop) or abandon (lost).
    async fn connection(&self, shutdown: &CancellationToken) -> ConnectionEnd {
        let connection = match self.pool.get().await {
            Ok(connection) => connection,
            Err(e) => {
                let answered = match &e {
                    PoolError::Backend(e) => e.answered,
                    _ => true,
                };
                let cause = format!("connecting: {}", error_chain(&e));
                return ConnectionEnd::Lost { consumed: false, answered, cause };
            }
        };
        let opened = match self.open(&connection).await {
            Ok(opened) => opened,
            Err(end) => {
                close(&connection).await;
                return end;
            }
        };
        info!(
            queue = %self.topology.work_queue.name,
            node = %connection.node(),
            prefetch = self.settings.prefetch,
            profile = %self.topology.profile,
            "consuming",
        );
        self.readiness.set_ready(format!(
            "consuming {} on {}",
            self.topology.work_queue.name,
            connection.node()
        ));
        self.metrics.broker_connected.set(1);

        let connection_failed = CancellationToken::new();
        let handler = Arc::new(Handler {
            topology: self.topology.clone(),
            gateway: self.gateway.clone(),
            metrics: self.metrics.clone(),
            urls: self.settings.urls.clone(),
            wait_budget: self.settings.wait_budget,
            publisher: opened.publisher,
            connection_failed: connection_failed.clone(),
            event_refused: CancellationToken::new(),
        });
        let mut tasks = Tasks { handler, set: JoinSet::new(), in_flight: HashMap::new() };
        let mut intake = Intake::Consuming(opened.consumer);
        let cause = self
            .consume(&opened.channel, &mut intake, &mut tasks, shutdown, &connection_failed)
            .await;

        if let Intake::Paused { since } = intake {
            self.metrics.intake_paused_seconds.inc_by(since.elapsed().as_secs_f64());
        }
        self.readiness.set_not_ready(match &cause {
            None => "shutting down".to_owned(),
            Some(cause) => format!("broker session lost: {cause}"),
        });
        match cause {
            None => {
                take_what_was_sent(&opened.channel, intake, &mut tasks).await;
                self.drain(&mut tasks).await;
                close(&connection).await;
                ConnectionEnd::Stopped
            }
            Some(cause) => {
                self.metrics.channel_errors.inc();
                tasks.set.abort_all();
                // Closing the connection hands every unacked delivery back to the broker.
                close(&connection).await;
                ConnectionEnd::Lost { consumed: true, answered: false, cause }
            }
        }
    }

    /// Declares the topology and opens the publish and consume channels and the consumer.
    async fn open(&self, connection: &Connection) -> Result<Opened, ConnectionEnd> {
        let lost = |cause: String| ConnectionEnd::Lost { consumed: false, answered: true, cause };
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lost(format!("opening a channel: {e}")))?;
        if let Err(e) = self.topology.declare(&channel).await {
            return Err(if e.is_transient() {
                lost(e.to_string())
            } else {
                ConnectionEnd::Fatal(e)
            });
        }
        let _ = channel.close(200, "topology declared".into()).await;
        let publisher = Publisher::open(connection)
            .await
            .map_err(|e| lost(format!("opening the publish channel: {e}")))?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| lost(format!("opening the consume channel: {e}")))?;
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| lost(format!("basic.qos: {e}")))?;
        let consumer = self.start_consumer(&channel).await.map_err(lost)?;
        Ok(Opened { publisher, channel, consumer })
    }

    /// Takes deliveries until asked to stop (`None`) or the connection fails (the cause), and
    /// follows the Stripe circuit meanwhile.
    async fn consume(
        &self,
        channel: &Channel,
        intake: &mut Intake,
        tasks: &mut Tasks,
        shutdown: &CancellationToken,
        connection_failed: &CancellationToken,
    ) -> Option<String> {
        let mut circuit = self.gateway.circuit();
        let event_refused = tasks.handler.event_refused.clone();
        // The task handling the message fetched to probe Stripe, while it runs.
        let mut probe = None;
        loop {
            let probe_at = intake.probe_at(probe.is_some(), circuit.as_ref());
            // `biased`, in this order: a stop or a failed connection wins over new work, and
            // finished tasks are collected (and a panicked one's message handed back) before
            // more deliveries are taken, so the in-flight set never outgrows the prefetch.
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                () = connection_failed.cancelled() => {
                    return Some("a channel failed while publishing".to_owned());
                }
                () = event_refused.cancelled() => {
                    return Some("the broker refused an event; starting over on a new channel".to_owned());
                }
                Some(id) = tasks.join_next(), if !tasks.set.is_empty() => {
                    if probe == Some(id) {
                        probe = None;
                    }
                }
                state = circuit_changed(&mut circuit) => {
                    if let Err(cause) = self.steer(channel, intake, state).await {
                        return Some(cause);
                    }
                }
                next = intake.next(), if intake.has_consumer() => match next {
                    Some(Ok(delivery)) => {
                        tasks.spawn(delivery);
                    }
                    Some(Err(e)) => return Some(format!("consumer: {e}")),
                    None if matches!(intake, Intake::Draining(_)) => {
                        *intake = Intake::Paused { since: Instant::now() };
                        let state = circuit.as_ref().map(|c| *c.borrow());
                        if let Err(cause) = self.steer(channel, intake, state).await {
                            return Some(cause);
                        }
                    }
                    None => {
                        let queue = &self.topology.work_queue.name;
                        return Some(format!("the broker cancelled the consumer on {queue}"));
                    }
                },
                () = sleep_until(probe_at), if probe_at.is_some() => {
                    match self.fetch_probe(channel).await {
                        Ok(Some(delivery)) => probe = Some(tasks.spawn(delivery)),
                        // Nothing waits: consume again, the first delivery probes.
                        Ok(None) => match self.start_consumer(channel).await {
                            Ok(consumer) => intake.resume(consumer, &self.metrics),
                            Err(cause) => return Some(cause),
                        },
                        Err(cause) => return Some(cause),
                    }
                }
            }
        }
    }

    /// One message from the work queue to probe Stripe with, if any waits.
    async fn fetch_probe(&self, channel: &Channel) -> Result<Option<Delivery>, String> {
        let queue = &self.topology.work_queue.name;
        channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .map(|message| message.map(|m| m.delivery))
            .map_err(|e| format!("basic.get on {queue}: {e}"))
    }

    /// Waits for the in-flight deliveries, at most `SHUTDOWN_GRACE`; what is left is aborted
    /// and comes back from the broker.
    async fn drain(&self, tasks: &mut Tasks) {
        info!(
            in_flight = tasks.set.len(),
            grace_ms = self.settings.shutdown_grace.as_millis() as u64,
            "stopping: draining in-flight deliveries"
        );
        let drained = tokio::time::timeout(self.settings.shutdown_grace, async {
            while tasks.set.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                left = tasks.set.len(),
                "shutdown grace spent; the broker will redeliver what is left"
            );
            tasks.set.abort_all();
        }
    }

    /// Starts a consumer on the work queue.
    async fn start_consumer(&self, channel: &Channel) -> Result<Consumer, String> {
        channel
            .basic_consume(
                self.topology.work_queue.name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consuming {}: {e}", self.topology.work_queue.name))
    }

    /// Follows the circuit: cancels the consumer when it opens (payments then wait in the
    /// work queue, where other replicas can take them), consumes again when it closes.
    async fn steer(
        &self,
        channel: &Channel,
        intake: &mut Intake,
        circuit: Option<State>,
    ) -> Result<(), String> {
        match (circuit, &*intake) {
            (Some(State::Open { .. }), Intake::Consuming(consumer)) => {
                let consumer = consumer.clone();
                channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                    .map_err(|e| format!("basic.cancel: {e}"))?;
                *intake = Intake::Draining(consumer);
            }
            (Some(State::Closed), Intake::Paused { .. }) => {
                let consumer = self.start_consumer(channel).await?;
                intake.resume(consumer, &self.metrics);
            }
            _ => {}
        }
        Ok(())
    }
}

/// On a stop, cancels the consumer and takes what the broker had already sent, so it is finished
/// with the rest of the in-flight work instead of being handed back for redelivery. A broker that
/// does not answer must not hold up the stop: each wait is bounded by [`BROKER_REPLY_ON_STOP`],
/// and the close that follows cancels the consumer anyway.
async fn take_what_was_sent(channel: &Channel, intake: Intake, tasks: &mut Tasks) {
    let mut consumer = match intake {
        Intake::Consuming(consumer) => {
            let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
            if !matches!(tokio::time::timeout(BROKER_REPLY_ON_STOP, cancel).await, Ok(Ok(()))) {
                return;
            }
            consumer
        }
        Intake::Draining(consumer) => consumer,
        Intake::Paused { .. } => return,
    };
    // After cancel-ok the broker sends nothing more, and the stream ends once it is read.
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(BROKER_REPLY_ON_STOP, consumer.next()).await
    {
        tasks.spawn(delivery);
    }
}

/// Whether the connection takes deliveries, as the Stripe circuit allows.
enum Intake {
    /// A consumer is running.
    Consuming(Consumer),
    /// `basic.cancel` was sent because the circuit opened; what the broker had already sent is
    /// read (and deferred) until the stream ends.
    Draining(Consumer),
    /// No consumer: the circuit is open. Messages wait in the work queue.
    Paused { since: Instant },
}

impl Intake {
    fn has_consumer(&self) -> bool {
        !matches!(self, Self::Paused { .. })
    }

    async fn next(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        match self {
            Self::Consuming(consumer) | Self::Draining(consumer) => consumer.next().await,
            Self::Paused { .. } => std::future::pending().await,
        }
    }

    /// Consuming again with `consumer`; the time paused is counted.
    fn resume(&mut self, consumer: Consumer, metrics: &Metrics) {
        if let Self::Paused { since } = self {
            metrics.intake_paused_seconds.inc_by(since.elapsed().as_secs_f64());
        }
        *self = Self::Consuming(consumer);
    }

    /// When to fetch one message to probe Stripe with: once the cool-down has passed, while
    /// paused and no probe is running.
    fn probe_at(
        &self,
        probing: bool,
        circuit: Option<&watch::Receiver<State>>,
    ) -> Option<tokio::time::Instant> {
        if probing || !matches!(self, Self::Paused { .. }) {
            return None;
        }
        match *circuit?.borrow() {
            State::Open { until } => Some(tokio::time::Instant::from_std(until)),
            State::HalfOpen => Some(tokio::time::Instant::now()),
            State::Closed => None,
        }
    }
}

/// The next state of the circuit; never returns in mock mode, which has none.
async fn circuit_changed(circuit: &mut Option<watch::Receiver<State>>) -> Option<State> {
    let Some(receiver) = circuit else { return std::future::pending().await };
    if receiver.changed().await.is_err() {
        *circuit = None;
        return None;
    }
    Some(*receiver.borrow_and_update())
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The delivery tasks of one connection.
struct Tasks {
    handler: Arc<Handler>,
    set: JoinSet<()>,
    /// The acker of each task's delivery, so a handler that panicked still hands its
    /// message back.
    in_flight: HashMap<tokio::task::Id, lapin::Acker>,
}

impl Tasks {
    fn spawn(&mut self, delivery: Delivery) -> tokio::task::Id {
        let acker = delivery.acker.clone();
        let handler = self.handler.clone();
        let id = self.set.spawn(async move { handler.handle(delivery).await }).id();
        self.in_flight.insert(id, acker);
        id
    }

    /// Collects a finished task; requeues the delivery of one that panicked.
    async fn join_next(&mut self) -> Option<tokio::task::Id> {
        let (id, panicked) = match self.set.join_next_with_id().await? {
            Ok((id, ())) => (id, false),
            Err(e) => (e.id(), e.is_panic()),
        };
        if let Some(acker) = self.in_flight.remove(&id)
            && panicked
        {
            error!("a delivery handler panicked; handing its message back to the broker");
            tokio::spawn(async move { requeue(&acker).await });
        }
        Some(id)
    }
}

/// Closes the connection, waiting at most [`BROKER_REPLY_ON_STOP`] for the broker's word;
/// dropping it then closes the socket, which hands back whatever was unacked all the same.
async fn close(connection: &Connection) {
    if connection.status().connected() {
        let close = connection.close(200, "payment-worker connection ended".into());
        let _ = tokio::time::timeout(BROKER_REPLY_ON_STOP, close).await;
    }
}

async fn requeue(acker: &lapin::Acker) {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    if let Err(e) = acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await {
        warn!(error = %e, "nack failed; the broker redelivers when the channel closes");
    }
}

/// What one broker connection shares among its delivery tasks.
struct Handler {
    topology: Arc<Topology>,
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    urls: CheckoutUrls,
    wait_budget: Duration,
    publisher: Publisher,
    /// Cancelled when a publish finds the channel broken: the connection must start over.
    connection_failed: CancellationToken,
    /// Cancelled once a delivery whose event the broker refused is settled: the session
    /// starts over on a new channel (see [`Failure::refused_event`]).
    event_refused: CancellationToken,
}

/// Why an attempt, or the publish of its replacement, did not succeed; `detail` is recorded
/// on the replacement.
struct Failure {
    class: Class,
    detail: String,
    /// The broker nacked the result event. A channel that began publishing to a quorum
    /// queue while its leader was being elected can go on being refused by it (RabbitMQ
    /// 3.10), so the session starts over once this delivery is settled.
    refused_event: bool,
}

impl Failure {
    fn new(class: Class, detail: impl Into<String>) -> Self {
        Self { class, detail: detail.into(), refused_event: false }
    }
}

impl Handler {
    async fn handle(&self, delivery: Delivery) {
        let started = Instant::now();
        let started_ms = retry::now_ms();
        let state = self.retry_state(&delivery);
        let attempt = state.attempts.saturating_add(1);
        self.observe_retry_delay(&state, started_ms);
        let origin = Origin {
            exchange: state
                .original_exchange
                .clone()
                .unwrap_or_else(|| delivery.exchange.to_string()),
            routing_key: state
                .original_routing_key
                .clone()
                .unwrap_or_else(|| delivery.routing_key.to_string()),
        };
        let command = CreateSession::decode(&delivery.data);
        let trip_id = match &command {
            Ok(command) => command.trip_id.clone(),
            Err(_) => CreateSession::trip_id_hint(&delivery.data).unwrap_or_default(),
        };
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

        let outcome_span = span.clone();
        async {
            let failure =
                self.attempt(&origin, command, &delivery.properties, attempt > 1).await.err();
            if let Some(failure) = &failure {
                trace::failed(&outcome_span, &failure.detail);
            }
            let refused_event = failure.as_ref().is_some_and(|f| f.refused_event);
            let attempted = FailedAttempt {
                origin: &origin,
                state: &state,
                number: attempt,
                started_ms,
                now_ms: started_ms,
                error: "",
            };
            let outcome = self.conclude(&delivery, attempted, failure).await;
            outcome_span.record("payment.outcome", outcome.as_str());
            if let Outcome::Parked(reason) = outcome {
                outcome_span.record("payment.park_reason", reason.as_str());
            }
            self.settle(&delivery, outcome).await;
            if refused_event {
                self.event_refused.cancel();
            }
            self.metrics.record_outcome(outcome, attempt, self.topology.max_attempts());
            self.metrics.attempt_duration.observe(started.elapsed().as_secs_f64());
            if matches!(outcome, Outcome::Succeeded | Outcome::Parked(_)) {
                let first_seen = state.first_seen_at.unwrap_or(started_ms);
                let total = Duration::from_millis(retry::now_ms().saturating_sub(first_seen));
                self.metrics
                    .command_duration
                    .with_label_values(&[outcome.as_str()])
                    .observe(total.as_secs_f64());
            }
        }
        .instrument(span)
        .await;
    }

    /// The retry state the delivery carries, trusted only when it came through the default
    /// exchange into the work queue: dead-lettered by a wait queue, deferred by a worker, or
    /// replayed by an operator. A command from anywhere else (the trip exchange) starts at
    /// attempt 1 whatever its headers say; the copies made of it overwrite them.
    fn retry_state(&self, delivery: &Delivery) -> RetryState {
        let came_back = delivery.exchange.as_str().is_empty()
            && delivery.routing_key.as_str() == self.topology.work_queue.name;
        if came_back {
            RetryState::from_properties(&delivery.properties)
        } else {
            RetryState::default()
        }
    }

    /// How long a retry copy really waited in the broker. Only known tiers become label
    /// values: a forged header cannot grow the label set.
    fn observe_retry_delay(&self, state: &RetryState, now_ms: u64) {
        if let (Some(tier), Some(spent)) = (&state.retry_tier, state.time_in_broker(now_ms))
            && self.topology.retry.delays.iter().any(|d| d.label() == tier)
        {
            self.metrics
                .retry_delay
                .with_label_values(&[tier.as_str()])
                .observe(spent.as_secs_f64());
        }
    }

    /// Decides what the attempt's `failure` (`None`: success) calls for and carries it out;
    /// each replacement the broker refuses leads to the next decision, ending in an outcome.
    async fn conclude(
        &self,
        delivery: &Delivery,
        attempt: FailedAttempt<'_>,
        failure: Option<Failure>,
    ) -> Outcome {
        let delays = &self.topology.retry.delays;
        let (mut action, mut detail) = match failure {
            None => (decide(attempt.number, None, delays), String::new()),
            Some(f) => (decide(attempt.number, Some(f.class), delays), f.detail),
        };
        if matches!(action, Action::Defer | Action::DeferFor(_)) {
            let since = retry::now_ms().saturating_sub(attempt.first_seen_ms());
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
        loop {
            let failed =
                FailedAttempt { now_ms: retry::now_ms(), error: &detail, ..attempt.clone() };
            match self.execute(delivery, &action, &failed).await {
                Ok(outcome) => return outcome,
                Err(refused) => {
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
                refused_event: matches!(e, PublishError::Nacked),
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
        failed: &FailedAttempt<'_>,
    ) -> Result<Outcome, Failure> {
        let original = &delivery.properties;
        let (exchange, routing_key, properties, outcome, refused) = match action {
            Action::Ack => return Ok(Outcome::Succeeded),
            Action::Requeue => return Ok(Outcome::Requeued),
            Action::Abandon => {
                warn!(error = %failed.error, "publish channel failed; the broker will redeliver");
                return Ok(Outcome::Abandoned);
            }
            Action::Retry(delay) => (
                self.topology.retry.exchange.as_str(),
                delay.label(),
                failed.retry_properties(original, delay.label(), delay.millis()),
                Outcome::Retried,
                Class::RetryRefused,
            ),
            Action::Park(reason) => (
                "",
                self.topology.parking.queue.as_str(),
                failed.parked_properties(original, *reason),
                Outcome::Parked(*reason),
                Class::ParkRefused,
            ),
            Action::Defer => (
                "",
                self.topology.work_queue.name.as_str(),
                failed.deferred_properties(original),
                Outcome::Deferred,
                Class::DeferRefused,
            ),
            Action::DeferFor(delay) => (
                self.topology.retry.exchange.as_str(),
                delay.label(),
                failed
                    .deferred_properties(original)
                    .with_expiration(delay.millis().to_string().into()),
                Outcome::Deferred,
                Class::DeferRefused,
            ),
        };
        let span = trace::producer_span(exchange, routing_key, copy_name(outcome));
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
                match outcome {
                    Outcome::Retried => {
                        info!(
                            outcome = "retried",
                            tier = routing_key,
                            error = %failed.error,
                            "attempt failed, retry scheduled in the broker",
                        )
                    }
                    Outcome::Parked(reason) => {
                        warn!(
                            outcome = "parked",
                            reason = reason.as_str(),
                            error = %failed.error,
                            "message parked",
                        )
                    }
                    _ => {
                        debug!(
                            outcome = "deferred",
                            error = %failed.error,
                            "Stripe is the problem: back to the work queue, no attempt spent",
                        )
                    }
                }
                Ok(outcome)
            }
            Err(e) if e.is_channel_failure() => Ok(Outcome::Abandoned),
            Err(e) => {
                if matches!(refused, Class::ParkRefused | Class::DeferRefused) {
                    error!(
                        outcome = "requeued",
                        error = %e,
                        "the broker refused the replacement; handing the message back",
                    );
                }
                Err(Failure::new(
                    refused,
                    format!("{}; the {} copy was refused: {e}", failed.error, outcome.as_str()),
                ))
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

    /// Publishes on the connection's confirm channel, inside `span` (a producer span whose
    /// trace context the message carries). A failure is counted; a broken channel also ends
    /// the connection, since nothing more can be published or acked on it.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        span: Span,
    ) -> Result<(), PublishError> {
        let properties = span.in_scope(|| trace::stamp(properties));
        let result = self
            .publisher
            .publish(exchange, routing_key, body, properties)
            .instrument(span.clone())
            .await;
        if let Err(e) = &result {
            trace::failed(&span, e);
            self.metrics.publish_failures.with_label_values(&[e.kind()]).inc();
            if e.is_channel_failure() {
                self.connection_failed.cancel();
            }
        }
        result
    }
}

/// What a replacement copy is, in a producer span.
fn copy_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Retried => "retry",
        Outcome::Parked(_) => "parked",
        _ => "deferred",
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
