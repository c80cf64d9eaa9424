//! The outbox: `payment.event.success` published once per Stripe event id, whoever received
//! the event (any replica's webhook, a replica restarted since, a `reconcile` run).
//!
//! Receivers hand each paid event to the outbox queue, confirmed, exactly as it will be
//! published (body, `message-id` = the Stripe event id, trace context). The queue has a
//! single active consumer: one replica at a time takes from it, in order. For each message it
//! asks the ledger ([`crate::ledger`]) whether the event id was published; if not, it
//! publishes the event to the trip exchange (mandatory, confirmed), which also appends it to
//! the ledger, and only then acks the outbox message. The first message of each consumer
//! session waits for [`Ledger::sync`], so a replica that just became the active consumer
//! knows every id its predecessor published.
//!
//! A crash between the confirm and the ack redelivers the message to the next active
//! consumer, which finds the id in the ledger: one `payment.event.success` per event id
//! within the ledger's max age. A publish the broker refuses is tried again in place, every
//! second up to every 30 s, until it is confirmed or the worker stops (the message is then
//! redelivered): the events behind it wait, none is dropped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::connect::Pool;
use crate::broker::publish::{Publisher, consumer};
use crate::broker::topology::Topology;
use crate::health::Readiness;
use crate::ledger::Ledger;
use crate::metrics::Metrics;

/// How long one publish, or one ledger sync, may take.
pub const OUTBOX_WAIT: Duration = Duration::from_secs(10);
/// Outbox messages held unacknowledged at once (they are decided one at a time).
const PREFETCH: u16 = 16;
/// The longest pause between two tries of a refused publish.
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// Tails the ledger and consumes the outbox, on one connection, until `stop`; a new
/// connection after each failure.
pub async fn relay(
    ledger: Arc<Ledger>,
    pool: Pool,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    stop: CancellationToken,
) {
    // The worker declares the outbox and the ledger; the first session waits for that.
    while readiness.check().is_err() {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let relay = Relay { ledger, topology, metrics };
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return,
            result = relay.connection(&pool, &stop) => result,
        };
        match result {
            Ok(()) => return,
            Err(reason) => warn!(
                queue = %relay.topology.success.outbox,
                error = %reason,
                "outbox session ended; starting a new one"
            ),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

struct Relay {
    ledger: Arc<Ledger>,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
}

impl Relay {
    /// One connection: the ledger's tail and the outbox consumer on it, until either ends.
    /// `Ok` when stopped; `Err` when the connection failed.
    async fn connection(&self, pool: &Pool, stop: &CancellationToken) -> Result<(), String> {
        let connection = pool.get().await.map_err(|e| format!("connecting: {e}"))?;
        tokio::select! {
            lost = self.ledger.read_on(&connection) => Err(lost),
            result = self.session(&connection, stop) => result,
        }
    }

    /// One consumer session.
    async fn session(
        &self,
        connection: &lapin::Connection,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        let queue = &self.topology.success.outbox;
        let publisher = Publisher::open(connection)
            .await
            .map_err(|e| format!("opening the publish channel: {e}"))?;
        let mut consumer = consumer(connection, queue, PREFETCH, FieldTable::default()).await?;
        let mut synced = false;
        loop {
            let delivery = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                delivery = consumer.next() => delivery,
            };
            let delivery = delivery
                .ok_or_else(|| format!("{queue} was deleted"))?
                .map_err(|e| format!("reading {queue}: {e}"))?;
            if !synced {
                self.ledger.sync(&publisher, OUTBOX_WAIT).await.map_err(|e| e.to_string())?;
                synced = true;
            }
            if !self.decide(&publisher, &delivery, stop).await? {
                return Ok(());
            }
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| format!("acknowledging an outbox message: {e}"))?;
        }
    }

    /// Publishes one outbox message unless its event id is in the ledger. `Ok(false)`: asked
    /// to stop before it was confirmed (it stays unacked and is redelivered).
    async fn decide(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        stop: &CancellationToken,
    ) -> Result<bool, String> {
        let event_id = delivery.properties.message_id().as_ref().map(|id| id.to_string());
        if let Some(id) = &event_id
            && self.ledger.contains(id)
        {
            info!(event_id = %id, "payment success already published for this Stripe event");
            self.metrics.success_events.with_label_values(&["duplicate"]).inc();
            return Ok(true);
        }
        let (exchange, routing_key) =
            (&self.topology.exchanges.trip, &self.topology.routing_keys.payment_success);
        let mut pause = Duration::from_secs(1);
        loop {
            let publish = publisher.publish(
                exchange,
                routing_key,
                &delivery.data,
                delivery.properties.clone(),
            );
            let failure = match tokio::time::timeout(OUTBOX_WAIT, publish).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) if e.is_channel_failure() => return Err(e.to_string()),
                Ok(Err(e)) => {
                    self.metrics.publish_failures.with_label_values(&[e.kind()]).inc();
                    e.to_string()
                }
                Err(_) => format!("not confirmed within {OUTBOX_WAIT:?}"),
            };
            error!(
                event_id = event_id.as_deref().unwrap_or_default(),
                error = %failure,
                retry_in_ms = pause.as_millis() as u64,
                "payment success not confirmed; the outbox tries it again"
            );
            tokio::select! {
                () = stop.cancelled() => return Ok(false),
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
        if let Some(id) = &event_id {
            self.ledger.insert(id);
        }
        self.metrics.success_events.with_label_values(&["published"]).inc();
        Ok(true)
    }
}
