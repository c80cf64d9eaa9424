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
//! * **requeued**: the broker would not take the copy (it nacked it, or not even the parked
//!   copy was routable); the command is nacked back after a pause, and after a nack the
//!   session starts over;
//! * **deferred**: Stripe was failing or rate-limiting, or the circuit was open; a copy with
//!   the attempt count unchanged is confirmed back to the work queue (through the first wait
//!   queue when its own call failed), the command is acked;
//! * **abandoned**: the channel failed mid-way; the connection ends and the broker redelivers.
//!
//! Stripe calls are idempotent by trip, so whatever is done twice is harmless.
//!
//! - this module: the reconnecting loop ([`Worker::run`]) and the settings;
//! - `session`: one broker connection: open, consume, drain, close;
//! - `intake`: whether the connection takes deliveries, as the Stripe circuit allows;
//! - `handler`: one delivery: read its retry state, attempt, settle after the replacement
//!   is confirmed.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::broker::connect::{BrokerAccess, Pool, PoolError};
use crate::broker::topology::{Topology, TopologyError};
use crate::error_chain;
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::stripe::{CheckoutUrls, Gateway};

mod handler;
mod intake;
mod session;

pub use handler::event_properties;

/// How long a stop or a lost session waits for the broker to answer a cancel or a close.
const BROKER_REPLY_ON_STOP: Duration = Duration::from_secs(5);

/// How often a broker that did not answer is checked ([`BrokerAccess::answers`]) between
/// reconnects.
const ANSWER_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// How long a requeued command is held before it goes back, so that a broker refusing every
/// replacement does not turn into a hot loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

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
    /// `stripe_unavailable` (see [`crate::delivery::decision::within_budget`]).
    pub wait_budget: Duration,
}

/// Why the worker stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Topology(TopologyError),
    #[error("gave up after {attempts} failed broker sessions in a row; last: {last}")]
    ReconnectBudgetSpent { attempts: usize, last: SessionError },
}

/// Why a broker session ended without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No node gave a connection.
    #[error("connecting: {}", error_chain(.0))]
    Connect(PoolError),
    /// Declaring the topology failed in a way a new session may not see again.
    #[error(transparent)]
    Declare(TopologyError),
    /// A broker operation of the session failed: `doing` says which.
    #[error("{doing}: {source}")]
    Broker { doing: String, source: lapin::Error },
    /// A publish found its channel broken.
    #[error("a channel failed while publishing")]
    PublishChannel,
    /// The broker nacked a result event or a copy: the session starts over on a new channel.
    #[error("the broker refused a publish; starting over on a new channel")]
    Nacked,
    /// The broker cancelled the consumer (the work queue was deleted, or the node is going
    /// down).
    #[error("the broker cancelled the consumer on {queue}")]
    ConsumerCancelled { queue: String },
}

impl SessionError {
    fn broker(doing: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let doing = doing.into();
        move |source| Self::Broker { doing, source }
    }
}

/// How one broker connection ended.
enum ConnectionEnd {
    /// Asked to stop; in-flight work was drained.
    Stopped,
    /// The connection failed; `consumed` tells whether it had got as far as consuming, and
    /// `answered` whether the broker answered at all (else a cheap check may find it back
    /// before the backoff delay ends).
    Lost { consumed: bool, answered: bool, cause: SessionError },
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
    /// a check of its nodes every [`ANSWER_CHECK_INTERVAL`] ends the wait as soon as one
    /// answers: the worker is back within a fraction of a second of the broker, and a broker
    /// that answers but refuses (credentials, TLS, topology) is not hammered with handshakes.
    async fn wait_to_reconnect(&self, delay: Duration, answered: bool) {
        let until = tokio::time::Instant::now() + delay;
        if answered {
            return tokio::time::sleep_until(until).await;
        }
        while tokio::time::Instant::now() < until {
            let answers = self.broker.answers(ANSWER_CHECK_INTERVAL);
            if let Ok(true) = tokio::time::timeout_at(until, answers).await {
                return;
            }
            tokio::time::sleep_until(
                until.min(tokio::time::Instant::now() + ANSWER_CHECK_INTERVAL),
            )
            .await;
        }
    }
}
