//! Flow control in front of Stripe: the circuit breaker ([`crate::breaker`]) and the adaptive
//! rate ([`crate::pacer`]) of one replica, shared by all its deliveries.
//!
//! A call asks for a [`Permit`]: the breaker must admit it (while half-open, callers other
//! than the probe wait for the probe's answer), then the pacer hands it a slot and the caller
//! sleeps until then. It still holds its delivery unacked meanwhile: flow control, not retry;
//! a crash redelivers it. The answer goes back through [`Permit::finish`], which feeds both.
//!
//! The breaker's state is published on a `watch` channel: the consumer loop cancels its
//! consumer while the circuit is open and fetches one message for the probe when the
//! cool-down has passed.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::breaker::{Admission, Breaker, BreakerSettings, Signal, Spread, State};
use crate::metrics::Metrics;
use crate::pacer::{Pacer, PacerSettings, Slot};
use crate::stripe::StripeError;

/// The breaker and the pacer of one replica.
pub struct FlowControl {
    breaker: Mutex<Breaker>,
    pacer: Mutex<Pacer>,
    /// The breaker's state for the consumer loop and for callers waiting on a probe.
    circuit: watch::Sender<State>,
    metrics: Arc<Metrics>,
}

/// Leave to call Stripe once. Dropped without [`Permit::finish`] (the delivery was cancelled),
/// a probe is handed to the next caller.
pub struct Permit<'a> {
    flow: &'a FlowControl,
    probe: bool,
    slot: Slot,
    finished: bool,
}

impl FlowControl {
    pub fn new(breaker: BreakerSettings, pacer: PacerSettings, metrics: Arc<Metrics>) -> Self {
        let pacer = Pacer::new(pacer, Instant::now());
        metrics.stripe_rate_limit.set(pacer.rate());
        metrics.set_circuit_state(State::Closed);
        Self {
            breaker: Mutex::new(Breaker::new(breaker)),
            pacer: Mutex::new(pacer),
            circuit: watch::Sender::new(State::Closed),
            metrics,
        }
    }

    /// The breaker's state, now and as it changes.
    pub fn circuit(&self) -> watch::Receiver<State> {
        self.circuit.subscribe()
    }

    /// Waits until a call may go out. `None`: the circuit is open, no call may be made.
    pub async fn admit(&self) -> Option<Permit<'_>> {
        let probe = loop {
            let mut changes = self.circuit.subscribe();
            let admission = self.breaker().admit(Instant::now());
            self.publish_state();
            match admission {
                Admission::Call => break false,
                Admission::Probe => break true,
                Admission::Refused { .. } => return None,
                Admission::Wait => {
                    // The probe's answer changes the state; a closed sender cannot happen
                    // while `self` is borrowed.
                    let _ = changes.changed().await;
                }
            }
        };
        let slot = self.pacer().reserve(Instant::now());
        let permit = Permit { flow: self, probe, slot, finished: false };
        if slot.waited {
            tokio::time::sleep_until(tokio::time::Instant::from_std(slot.at)).await;
            // The circuit may have opened while this call waited for its slot.
            if !probe && *self.circuit.borrow() != State::Closed {
                return None;
            }
        }
        Some(permit)
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pacer(&self) -> MutexGuard<'_, Pacer> {
        self.pacer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the breaker's state if it changed (only then are the consumer loop and the
    /// waiting callers woken); logs and counts the transition.
    fn publish_state(&self) {
        let state = self.breaker().state();
        let changed = self.circuit.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
        if !changed {
            return;
        }
        self.metrics.set_circuit_state(state);
        self.metrics.stripe_circuit_transitions.with_label_values(&[state.as_str()]).inc();
        match state {
            State::Open { until } => warn!(
                circuit = "open",
                retry_in_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                "Stripe is failing: circuit open, consumption paused; payments wait in the work queue"
            ),
            State::HalfOpen => info!(circuit = "half_open", "probing Stripe with one payment"),
            State::Closed => {
                info!(circuit = "closed", "Stripe answered: circuit closed, consuming again")
            }
        }
    }
}

impl Permit<'_> {
    /// Records Stripe's answer to a call about `payment` (the trip) with the breaker and the
    /// pacer. For a Stripe-wide failure, says whether it stood alone.
    pub fn finish(mut self, result: Result<(), &StripeError>, payment: &str) -> Spread {
        self.finished = true;
        let now = Instant::now();
        let signal = result.map_or_else(StripeError::signal, |()| Signal::Answered);
        {
            let mut pacer = self.flow.pacer();
            match signal {
                Signal::Throttled => {
                    if pacer.on_rate_limited(now, self.slot.at) {
                        debug!(rate = pacer.rate(), "Stripe rate limit: slowing down");
                    }
                }
                // Only answers show that Stripe takes the rate; a failing Stripe says nothing.
                Signal::Answered => pacer.on_answer(self.slot),
                Signal::Failed => {}
            }
            if let Some(wait) = result.err().and_then(StripeError::retry_after) {
                pacer.hold_until(now, wait, payment);
            }
            self.flow.metrics.stripe_rate_limit.set(pacer.rate());
        }
        let spread = self.flow.breaker().record(now, signal, self.probe, payment);
        self.flow.publish_state();
        spread
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.finished {
            self.flow.breaker().abandon_probe();
            // The state stays half-open; wake the callers waiting for the probe all the same.
            self.flow.circuit.send_modify(|_| ());
        }
    }
}
