//! The ledger: the Stripe event ids `payment.event.success` was published for, kept in the
//! broker.
//!
//! The ledger is a RabbitMQ stream bound to the trip exchange with the success routing key,
//! so every confirmed `payment.event.success` is in it, `message-id` (the Stripe event id)
//! included, in the same publish: no second write can be lost between the event and its
//! record. Every replica (in its outbox session, [`crate::outbox`]) and every `reconcile` run
//! tails it from the first message the stream keeps (`x-max-age`, 31 days by default) into a
//! set of ids.
//!
//! A tail lags the stream by the time a message takes to reach it. [`Ledger::sync`] closes
//! that gap: it appends a marker of its own and waits until the tail has read it, so every
//! id appended before is known. The outbox ([`crate::outbox`]) syncs before it decides on the
//! first event of each session, and decides alone (single active consumer) afterwards.
//!
//! Three kinds of messages are in the stream: success events (their `message-id` is
//! recorded), sync markers (header [`MARKER`]) and reconciliation summaries (header
//! [`RECONCILED`], read into the reconcile metrics).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::oneshot;
use tracing::debug;

use crate::broker::headers::{long_string, string};
use crate::broker::publish::{PublishError, Publisher, consumer, persistent_json};
use crate::metrics::Metrics;
use crate::stripe::EVENT_TYPES;

/// The header of a sync marker: its token.
pub const MARKER: &str = "payment-worker-ledger-marker";
/// The header of a reconciliation summary (its body is the summary's JSON).
pub const RECONCILED: &str = "payment-worker-reconciled";

/// Messages the tail holds unacknowledged at once.
const PREFETCH: u16 = 500;

/// Why the ledger could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("appending a sync marker to the ledger: {0}")]
    Marker(#[from] PublishError),
    #[error("the ledger's tail read nothing for {0:?} before it reached its sync marker")]
    Timeout(Duration),
}

/// What a reconciliation run found, as recorded in the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reconciled {
    /// When the run finished, seconds since the Unix epoch.
    pub finished_at: u64,
    /// Events listed, by type.
    pub events: std::collections::BTreeMap<String, u64>,
    /// Events handed to the outbox because the ledger did not hold them.
    pub published: u64,
}

/// The set of published event ids, as far as the tail has read.
pub struct Ledger {
    stream: String,
    ids: Mutex<HashSet<String>>,
    markers: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// Messages the tail has read, for telling a slow tail from a stuck one.
    read: AtomicU64,
    metrics: Option<Arc<Metrics>>,
}

impl Ledger {
    /// A ledger over the stream `stream`; `metrics` receive the reconciliation summaries.
    pub fn new(stream: &str, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            stream: stream.to_owned(),
            ids: Mutex::new(HashSet::new()),
            markers: Mutex::new(HashMap::new()),
            read: AtomicU64::new(0),
            metrics,
        }
    }

    /// Whether a success event for `event_id` is known to be published.
    pub fn contains(&self, event_id: &str) -> bool {
        self.ids().contains(event_id)
    }

    /// Records an id whose success event the broker just confirmed (the tail will read it
    /// too).
    pub fn insert(&self, event_id: &str) {
        let mut ids = self.ids();
        if ids.insert(event_id.to_owned())
            && let Some(metrics) = &self.metrics
        {
            metrics.ledger_event_ids.set(ids.len() as i64);
        }
    }

    /// Appends a marker and waits until the tail has read it: every id in the stream before
    /// the marker is then known. A tail still reading a long ledger may take longer than
    /// `within` in all; only `within` without it reading anything is a time-out.
    ///
    /// # Errors
    /// The marker was not confirmed within `within`, or the tail read nothing for `within`
    /// before it reached the marker.
    pub async fn sync(&self, publisher: &Publisher, within: Duration) -> Result<(), SyncError> {
        let token = format!("{:032x}", rand::random::<u128>());
        let (reached, wait) = oneshot::channel();
        self.markers().insert(token.clone(), reached);
        let mut headers = FieldTable::default();
        headers.insert(MARKER.into(), long_string(&token));
        let appended = tokio::time::timeout(
            within,
            publisher.publish("", &self.stream, b"", persistent_json().with_headers(headers)),
        )
        .await;
        let result = match appended {
            Err(_) => Err(SyncError::Timeout(within)),
            Ok(Err(e)) => Err(SyncError::Marker(e)),
            Ok(Ok(())) => self.reach(wait, within).await,
        };
        self.markers().remove(&token);
        result
    }

    /// Waits for the marker while the tail keeps reading.
    async fn reach(
        &self,
        mut wait: oneshot::Receiver<()>,
        within: Duration,
    ) -> Result<(), SyncError> {
        let mut seen = self.read.load(Ordering::Relaxed);
        loop {
            match tokio::time::timeout(within, &mut wait).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(_)) => return Err(SyncError::Timeout(within)),
                Err(_) => {
                    let now = self.read.load(Ordering::Relaxed);
                    if now == seen {
                        return Err(SyncError::Timeout(within));
                    }
                    seen = now;
                }
            }
        }
    }

    /// Reads the stream from its first message until the connection fails; returns why.
    pub async fn read_on(&self, connection: &lapin::Connection) -> String {
        match self.read(connection).await {
            Err(cause) => cause,
            Ok(never) => match never {},
        }
    }

    async fn read(
        &self,
        connection: &lapin::Connection,
    ) -> Result<std::convert::Infallible, String> {
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        let mut consumer = consumer(connection, &self.stream, PREFETCH, arguments).await?;
        debug!(stream = %self.stream, "reading the ledger");
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery.map_err(|e| format!("reading {}: {e}", self.stream))?;
            self.note(&delivery.properties, &delivery.data);
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| format!("acknowledging: {e}"))?;
        }
        Err(format!("the stream {} was deleted", self.stream))
    }

    /// Takes in one message of the stream.
    fn note(&self, properties: &lapin::BasicProperties, body: &[u8]) {
        self.read.fetch_add(1, Ordering::Relaxed);
        let header = |name: &str| properties.headers().as_ref().and_then(|h| string(h, name));
        if let Some(token) = header(MARKER) {
            if let Some(reached) = self.markers().remove(&token) {
                let _ = reached.send(());
            }
        } else if header(RECONCILED).is_some() {
            if let (Some(metrics), Ok(summary)) =
                (&self.metrics, serde_json::from_slice::<Reconciled>(body))
            {
                let found =
                    EVENT_TYPES.map(|kind| (kind, summary.events.get(kind).copied().unwrap_or(0)));
                metrics.record_reconciled(summary.finished_at as f64, &found, summary.published);
            }
        } else if let Some(id) = properties.message_id() {
            self.insert(id.as_str());
        }
    }

    fn ids(&self) -> MutexGuard<'_, HashSet<String>> {
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn markers(&self) -> MutexGuard<'_, HashMap<String, oneshot::Sender<()>>> {
        self.markers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;

    use super::*;

    fn with_header(name: &str, value: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(name.into(), long_string(value));
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn the_tail_tells_events_markers_and_summaries_apart() {
        let metrics = Arc::new(Metrics::new(&crate::metrics::Program::default()));
        let ledger = Ledger::new("ledger", Some(metrics.clone()));
        ledger.note(&BasicProperties::default().with_message_id("evt_1".into()), b"{}");
        ledger.note(&BasicProperties::default(), b"{}");
        assert!(ledger.contains("evt_1"));
        assert_eq!(metrics.ledger_event_ids.get(), 1, "an event without an id is no id");

        let (reached, mut wait) = oneshot::channel();
        ledger.markers().insert("m1".into(), reached);
        ledger.note(&with_header(MARKER, "m2"), b"");
        assert!(wait.try_recv().is_err(), "another replica's marker");
        ledger.note(&with_header(MARKER, "m1"), b"");
        assert!(wait.try_recv().is_ok(), "its own marker");

        let summary = Reconciled {
            finished_at: 1_700_000_000,
            events: [("checkout.session.completed".to_owned(), 7)].into(),
            published: 2,
        };
        let body = serde_json::to_vec(&summary).unwrap();
        ledger.note(&with_header(RECONCILED, "1").with_message_id("not-an-event".into()), &body);
        assert!(!ledger.contains("not-an-event"), "a summary is no published event");
        assert_eq!(metrics.reconcile_last_success.get(), 1_700_000_000.0);
        assert_eq!(metrics.reconcile_published.get(), 2);
        let completed = metrics.reconcile_events.with_label_values(&["checkout.session.completed"]);
        assert_eq!(completed.get(), 7);
        let expired = metrics.reconcile_events.with_label_values(&["checkout.session.expired"]);
        assert_eq!(expired.get(), 0);
        assert_eq!(ledger.read.load(Ordering::Relaxed), 5, "every message counts as read");
    }
}
