//! Whether the connection takes deliveries, as the Stripe circuit allows.

use std::time::Instant;

use futures_util::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::stripe::breaker::State;

/// Whether the connection takes deliveries, as the Stripe circuit allows.
pub(super) enum Intake {
    /// A consumer is running.
    Consuming(Consumer),
    /// `basic.cancel` was sent because the circuit opened; what the broker had already sent is
    /// read (and deferred) until the stream ends.
    Draining(Consumer),
    /// No consumer: the circuit is open. Messages wait in the work queue.
    Paused { since: Instant },
}

impl Intake {
    pub(super) fn has_consumer(&self) -> bool {
        !matches!(self, Self::Paused { .. })
    }

    pub(super) async fn next(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        match self {
            Self::Consuming(consumer) | Self::Draining(consumer) => consumer.next().await,
            Self::Paused { .. } => std::future::pending().await,
        }
    }

    /// Consuming again with `consumer`; the time paused is counted.
    pub(super) fn resume(&mut self, consumer: Consumer, metrics: &Metrics) {
        if let Self::Paused { since } = self {
            metrics.intake_paused_seconds.inc_by(since.elapsed().as_secs_f64());
        }
        *self = Self::Consuming(consumer);
    }

    /// When to fetch one message to probe Stripe with: once the cool-down has passed, while
    /// paused and no probe is running.
    pub(super) fn probe_at(
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
pub(super) async fn circuit_changed(circuit: &mut Option<watch::Receiver<State>>) -> Option<State> {
    let Some(receiver) = circuit else { return std::future::pending().await };
    if receiver.changed().await.is_err() {
        *circuit = None;
        return None;
    }
    Some(*receiver.borrow_and_update())
}

pub(super) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
