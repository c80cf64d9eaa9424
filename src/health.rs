//! Liveness and readiness, as `/healthz` and `/readyz` report them.

use std::sync::{Arc, Mutex};

use prometheus::IntGauge;

/// Whether the worker can do its job right now: what it is doing, or why it cannot.
#[derive(Clone)]
pub struct Readiness {
    /// `Ok(what it is doing)` when ready, else the short reason `/readyz` reports.
    state: Arc<Mutex<Result<String, String>>>,
    /// Mirrors the state as `payment_worker_ready`.
    gauge: IntGauge,
}

impl Readiness {
    /// Starts not ready.
    pub fn new(gauge: IntGauge) -> Self {
        gauge.set(0);
        Self { state: Arc::new(Mutex::new(Err("starting".into()))), gauge }
    }

    /// Ready, doing `what` (such as which queue it consumes on which node).
    pub fn set_ready(&self, what: impl Into<String>) {
        *self.lock() = Ok(what.into());
        self.gauge.set(1);
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.lock() = Err(reason.into());
        self.gauge.set(0);
    }

    /// What the worker is doing when ready.
    ///
    /// # Errors
    /// The reason the worker is not ready.
    pub fn check(&self) -> Result<String, String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Result<String, String>> {
        // The state is a plain value: a panic while holding the lock cannot corrupt it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
