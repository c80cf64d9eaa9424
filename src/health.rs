//! Liveness and readiness, as `/healthz` and `/readyz` report them.

use std::sync::{Arc, Mutex};

use prometheus::IntGauge;

/// Whether the worker can do its job right now, and if not, why.
#[derive(Clone)]
pub struct Readiness {
    /// `None` when ready, else the short reason `/readyz` reports.
    state: Arc<Mutex<Option<String>>>,
    /// Mirrors the state as `payment_worker_ready`.
    gauge: IntGauge,
}

impl Readiness {
    /// Starts not ready.
    pub fn new(gauge: IntGauge) -> Self {
        gauge.set(0);
        Self { state: Arc::new(Mutex::new(Some("starting".into()))), gauge }
    }

    pub fn set_ready(&self) {
        *self.lock() = None;
        self.gauge.set(1);
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.lock() = Some(reason.into());
        self.gauge.set(0);
    }

    /// `Ok` when ready, else the reason.
    ///
    /// # Errors
    /// The reason the worker is not ready.
    pub fn check(&self) -> Result<(), String> {
        match &*self.lock() {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // The state is a plain value: a panic while holding the lock cannot corrupt it.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
