//! One broker connection: open the channels and the consumer, take deliveries while
//! following the circuit, then drain (asked to stop) or abandon (lost), and close.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::connect::PoolError;
use crate::broker::publish::Publisher;
use crate::stripe::breaker::State;

use super::handler::Handler;
use super::intake::{Intake, circuit_changed, sleep_until};
use super::{BROKER_REPLY_ON_STOP, ConnectionEnd, REQUEUE_PAUSE, SessionError, Worker};

/// What a broker connection holds once it is set up.
struct Opened {
    publisher: Publisher,
    /// The consume channel.
    channel: Channel,
    consumer: Consumer,
}

impl Worker {
    /// One broker connection, from connecting to its end: open, consume, then drain (asked to
    /// stop) or abandon (lost).
    pub(super) async fn connection(&self, shutdown: &CancellationToken) -> ConnectionEnd {
        let connection = match self.pool.get().await {
            Ok(connection) => connection,
            Err(e) => {
                let answered = match &e {
                    PoolError::Backend(e) => e.answered,
                    _ => true,
                };
                return ConnectionEnd::Lost {
                    consumed: false,
                    answered,
                    cause: SessionError::Connect(e),
                };
            }
        };
        let opened = match self.open(&connection).await {
            Ok(opened) => opened,
            Err(end) => {
                close(&connection).await;
                return end;
            }
        };
        self.announce(connection.node());

        let connection_failed = CancellationToken::new();
        let mut tasks = self.tasks(opened.publisher, &connection_failed);
        let mut intake = Intake::Consuming(opened.consumer);
        let cause = self
            .consume(&opened.channel, &mut intake, &mut tasks, shutdown, &connection_failed)
            .await;
        self.finish(cause, intake, tasks, &opened.channel, &connection).await
    }

    /// Says the session is consuming: a log line, readiness, the connected gauge.
    fn announce(&self, node: &str) {
        info!(
            queue = %self.topology.work_queue.name,
            node = %node,
            prefetch = self.settings.prefetch,
            profile = %self.topology.profile,
            "consuming",
        );
        self.readiness
            .set_ready(format!("consuming {} on {}", self.topology.work_queue.name, node));
        self.metrics.broker_connected.set(1);
    }

    /// The delivery tasks of a session publishing with `publisher`.
    fn tasks(&self, publisher: Publisher, connection_failed: &CancellationToken) -> Tasks {
        let handler = Arc::new(Handler {
            topology: self.topology.clone(),
            gateway: self.gateway.clone(),
            metrics: self.metrics.clone(),
            urls: self.settings.urls.clone(),
            wait_budget: self.settings.wait_budget,
            publisher,
            connection_failed: connection_failed.clone(),
            nacked: CancellationToken::new(),
        });
        Tasks { handler, set: JoinSet::new(), in_flight: HashMap::new() }
    }

    /// Ends the session: on a stop (`cause` is `None`), takes what the broker had sent,
    /// drains and closes; on a failure, aborts the tasks and closes, which hands every unacked
    /// delivery back to the broker.
    async fn finish(
        &self,
        cause: Option<SessionError>,
        intake: Intake,
        mut tasks: Tasks,
        channel: &Channel,
        connection: &Connection,
    ) -> ConnectionEnd {
        if let Intake::Paused { since } = intake {
            self.metrics.intake_paused_seconds.inc_by(since.elapsed().as_secs_f64());
        }
        self.readiness.set_not_ready(match &cause {
            None => "shutting down".to_owned(),
            Some(cause) => format!("broker session lost: {cause}"),
        });
        match cause {
            None => {
                take_what_was_sent(channel, intake, &mut tasks).await;
                self.drain(&mut tasks).await;
                close(connection).await;
                ConnectionEnd::Stopped
            }
            Some(cause) => {
                self.metrics.channel_errors.inc();
                tasks.set.abort_all();
                // Closing the connection hands every unacked delivery back to the broker.
                close(connection).await;
                ConnectionEnd::Lost { consumed: true, answered: false, cause }
            }
        }
    }

    /// Declares the topology and opens the publish and consume channels and the consumer.
    async fn open(&self, connection: &Connection) -> Result<Opened, ConnectionEnd> {
        let lost = |cause| ConnectionEnd::Lost { consumed: false, answered: true, cause };
        let channel = connection
            .create_channel()
            .await
            .map_err(SessionError::broker("opening a channel"))
            .map_err(lost)?;
        if let Err(e) = self.topology.declare(&channel).await {
            return Err(if e.is_transient() {
                lost(SessionError::Declare(e))
            } else {
                ConnectionEnd::Fatal(e)
            });
        }
        let _ = channel.close(200, "topology declared".into()).await;
        let publisher = Publisher::open(connection)
            .await
            .map_err(SessionError::broker("opening the publish channel"))
            .map_err(lost)?;
        let channel = connection
            .create_channel()
            .await
            .map_err(SessionError::broker("opening the consume channel"))
            .map_err(lost)?;
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(SessionError::broker("basic.qos"))
            .map_err(lost)?;
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
    ) -> Option<SessionError> {
        let mut circuit = self.gateway.circuit();
        let nacked = tasks.handler.nacked.clone();
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
                    return Some(SessionError::PublishChannel);
                }
                () = nacked.cancelled() => {
                    return Some(SessionError::Nacked);
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
                next = intake.next(), if intake.has_consumer() => {
                    let state = circuit.as_ref().map(|c| *c.borrow());
                    if let Err(cause) = self.take(channel, intake, tasks, next, state).await {
                        return Some(cause);
                    }
                }
                () = sleep_until(probe_at), if probe_at.is_some() => {
                    match self.probe(channel, intake, tasks).await {
                        Ok(task) => probe = task,
                        Err(cause) => return Some(cause),
                    }
                }
            }
        }
    }

    /// Hands the consumer's `next` delivery to a task. A consumer drained after its
    /// cancellation pauses the intake and follows the `circuit` again; any other end of the
    /// consumer ends the session.
    async fn take(
        &self,
        channel: &Channel,
        intake: &mut Intake,
        tasks: &mut Tasks,
        next: Option<Result<Delivery, lapin::Error>>,
        circuit: Option<State>,
    ) -> Result<(), SessionError> {
        match next {
            Some(Ok(delivery)) => {
                tasks.spawn(delivery);
                Ok(())
            }
            Some(Err(e)) => Err(SessionError::broker("consumer")(e)),
            None if matches!(intake, Intake::Draining(_)) => {
                *intake = Intake::Paused { since: Instant::now() };
                self.steer(channel, intake, circuit).await
            }
            None => {
                let queue = self.topology.work_queue.name.clone();
                Err(SessionError::ConsumerCancelled { queue })
            }
        }
    }

    /// Probes Stripe with one message from the work queue: the task handling it. When none
    /// waits, consumes again instead, and the first delivery probes.
    async fn probe(
        &self,
        channel: &Channel,
        intake: &mut Intake,
        tasks: &mut Tasks,
    ) -> Result<Option<tokio::task::Id>, SessionError> {
        match self.fetch_probe(channel).await? {
            Some(delivery) => Ok(Some(tasks.spawn(delivery))),
            None => {
                intake.resume(self.start_consumer(channel).await?, &self.metrics);
                Ok(None)
            }
        }
    }

    /// One message from the work queue to probe Stripe with, if any waits.
    async fn fetch_probe(&self, channel: &Channel) -> Result<Option<Delivery>, SessionError> {
        let queue = &self.topology.work_queue.name;
        channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .map(|message| message.map(|m| m.delivery))
            .map_err(SessionError::broker(format!("basic.get on {queue}")))
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
    async fn start_consumer(&self, channel: &Channel) -> Result<Consumer, SessionError> {
        channel
            .basic_consume(
                self.topology.work_queue.name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(SessionError::broker(format!("consuming {}", self.topology.work_queue.name)))
    }

    /// Follows the circuit: cancels the consumer when it opens (payments then wait in the
    /// work queue, where other replicas can take them), consumes again when it closes.
    async fn steer(
        &self,
        channel: &Channel,
        intake: &mut Intake,
        circuit: Option<State>,
    ) -> Result<(), SessionError> {
        match (circuit, &*intake) {
            (Some(State::Open { .. }), Intake::Consuming(consumer)) => {
                let consumer = consumer.clone();
                channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                    .map_err(SessionError::broker("basic.cancel"))?;
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

pub(super) async fn requeue(acker: &lapin::Acker) {
    tokio::time::sleep(REQUEUE_PAUSE).await;
    if let Err(e) = acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await {
        warn!(error = %e, "nack failed; the broker redelivers when the channel closes");
    }
}
