//! Wiring: configuration in, a running worker with its HTTP server out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::connect::{BrokerAccess, Pool};
use crate::broker::publish::PublishError;
use crate::broker::topology::{QueueType, Topology};
use crate::consumer::{Worker, WorkerError, WorkerSettings};
use crate::health::Readiness;
use crate::http::{HttpLimits, HttpState, router, serve};
use crate::ledger::Ledger;
use crate::metrics::{Metrics, Program};
use crate::settings::broker::GlobalArgs;
use crate::settings::{ConfigError, RunArgs};
use crate::stripe::flow::FlowControl;
use crate::stripe::{Gateway, StripeApi, key_livemode};
use crate::telemetry::{EXPORT_FAILURES, SPANS_DROPPED};
use crate::webhook::{Webhook, WebhookSettings};

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Topology(#[from] crate::broker::topology::TopologyError),
    #[error("cannot listen on HTTP_ADDR {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A worker ready to run, its HTTP listener already bound.
pub struct App {
    listener: TcpListener,
    worker: Worker,
    http: HttpState,
    webhook: Arc<Webhook>,
    http_limits: HttpLimits,
    topology: Arc<Topology>,
    pool: Pool,
    ledger: Arc<Ledger>,
    depth_interval: Duration,
    /// The gateway whose rate shares the account's limit (`STRIPE_ACCOUNT_RPS`), if set.
    shared: Option<Arc<Gateway>>,
}

impl App {
    /// Checks the configuration, loads the topology and binds the HTTP port. Connects to
    /// nothing yet: the broker may come up after the worker.
    ///
    /// # Errors
    /// On invalid settings (named in the message), an unreadable or invalid topology file,
    /// or an HTTP address that cannot be bound.
    pub async fn build(global: &GlobalArgs, args: &RunArgs) -> Result<Self, StartError> {
        let broker = global.broker()?;
        let topology = Arc::new(global.load_topology()?);
        let metrics = program_metrics();
        let (gateway, livemode) = gateway(args, &metrics)?;
        let webhook_secrets = args.webhook_secrets()?;
        let listener = TcpListener::bind(args.http_addr)
            .await
            .map_err(|source| StartError::Bind { addr: args.http_addr, source })?;
        let readiness = Readiness::new(metrics.ready.clone());
        // The consumer session, the outbox's session, and the webhook and depth poller briefly.
        let pool = broker.pool("payment-worker", 3);
        info!(broker = %broker.describe(), profile = %topology.profile, http_addr = %args.http_addr, "starting");
        warn_without_failover(&broker, &topology);
        let settings = worker_settings(args)?;
        let ledger = Arc::new(Ledger::new(&topology.success.ledger, Some(metrics.clone())));
        let webhook = Arc::new(Webhook::new(
            WebhookSettings {
                secrets: webhook_secrets,
                tolerance: args.stripe_webhook_tolerance,
                max_concurrent: args.webhook_max_concurrent as usize,
                livemode,
            },
            topology.clone(),
            pool.clone(),
            ledger.clone(),
            metrics.clone(),
        ));
        let gateway = Arc::new(gateway);
        let shared =
            args.stripe_account_rps.filter(|_| !gateway.is_mock()).map(|_| gateway.clone());
        let worker = Worker::new(
            topology.clone(),
            gateway,
            pool.clone(),
            broker,
            metrics.clone(),
            readiness.clone(),
            settings,
        );
        Ok(Self {
            listener,
            worker,
            http: HttpState { readiness, metrics },
            webhook,
            http_limits: args.http_limits(),
            topology,
            pool,
            ledger,
            depth_interval: args.queue_depth_interval,
            shared,
        })
    }

    /// The address the HTTP server listens on (useful with port 0).
    ///
    /// # Panics
    /// If the bound socket has no address, which a bound TCP listener always has.
    pub fn http_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Runs until `shutdown` is cancelled and in-flight work is drained, or the worker fails.
    ///
    /// # Errors
    /// See [`WorkerError`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let stop_http = CancellationToken::new();
        let server = {
            let stop = stop_http.clone();
            let app = router(self.http.clone(), self.webhook.clone(), self.http_limits);
            let metrics = self.http.metrics.clone();
            tokio::spawn(serve(self.listener, app, self.http_limits, metrics, stop))
        };
        let poller = tokio::spawn(poll_queue_depths(
            self.pool.clone(),
            self.topology.clone(),
            self.http.metrics.clone(),
            self.depth_interval,
            stop_http.clone(),
        ));
        let relay = tokio::spawn(crate::outbox::relay(
            self.ledger,
            self.pool.clone(),
            self.topology.clone(),
            self.http.metrics.clone(),
            self.http.readiness.clone(),
            stop_http.clone(),
        ));
        let shares = self.shared.map(|gateway| {
            let queue = self.topology.work_queue.name.clone();
            let (pool, readiness) = (self.pool.clone(), self.http.readiness.clone());
            tokio::spawn(poll_replicas(pool, queue, gateway, readiness, stop_http.clone()))
        });
        let result = self.worker.run(shutdown).await;
        stop_http.cancel();
        if let Some(shares) = shares {
            let _ = shares.await;
        }
        let _ = poller.await;
        let _ = server.await;
        let _ = relay.await;
        result
    }
}

/// Reads the ready message count of the work, wait, parking and outbox queues every `interval`, with
/// passive declarations (which change nothing), for `payment_worker_queue_messages`.
async fn poll_queue_depths(
    pool: Pool,
    topology: Arc<Topology>,
    metrics: Arc<Metrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut queues = vec![
        (topology.work_queue.name.clone(), "work"),
        (topology.parking.queue.clone(), "parked"),
        (topology.success.outbox.clone(), "outbox"),
    ];
    for delay in &topology.retry.delays {
        queues.push((topology.wait_queue(delay), "wait"));
        metrics
            .retry_tier_seconds
            .with_label_values(&[delay.label()])
            .set(delay.duration().as_secs_f64());
    }
    // The first reading waits one interval: the worker declares the queues meanwhile.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Ok(connection) = pool.get().await else { continue };
        let Ok(channel) = connection.create_channel().await else { continue };
        for (queue, role) in &queues {
            let declared = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(q) => metrics
                    .queue_messages
                    .with_label_values(&[queue.as_str(), role])
                    .set(i64::from(q.message_count())),
                Err(e) => {
                    // A missing queue closes the channel; try again next tick.
                    debug!(queue = %queue, error = %e, "queue depth unavailable");
                    break;
                }
            }
        }
        let _ = channel.close(200, "depths read".into()).await;
    }
}

/// How often the replicas sharing the account's limit are counted.
const REPLICA_POLL: Duration = Duration::from_secs(1);

/// How long the first Stripe call of a replica joining others waits: within a
/// [`REPLICA_POLL`] of its consuming each of the others has counted it and cut its rate to the
/// new share, and half a second later their last second's calls at the old share have thinned
/// out enough that its first calls fit beside them.
const JOIN_WAIT: Duration = REPLICA_POLL.saturating_add(Duration::from_millis(500));

/// Counts the replicas every [`REPLICA_POLL`], the first time at once, and tells the gateway,
/// whose rate takes that share of `STRIPE_ACCOUNT_RPS`: the consumers of the work queue (a
/// passive declaration, which changes nothing), and this replica too while it is not
/// consuming yet, so that a replica joining others starts at its share, not with a burst the
/// size of the whole limit, and only once they have counted it ([`JOIN_WAIT`]). A reading that
/// fails or takes longer than the interval changes nothing; the next one tries again.
async fn poll_replicas(
    pool: Pool,
    queue: String,
    gateway: Arc<Gateway>,
    readiness: Readiness,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(REPLICA_POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let reading = async {
            let connection = pool.get().await.ok()?;
            let channel = connection.create_channel().await.ok()?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            let declared =
                channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
            let _ = channel.close(200, "replicas counted".into()).await;
            declared.ok().map(|q| q.consumer_count())
        };
        match tokio::time::timeout(REPLICA_POLL, reading).await {
            Ok(Some(consumers)) => {
                let joining = readiness.check().is_err();
                let join = joining.then_some(JOIN_WAIT);
                gateway.set_replicas(consumers.saturating_add(u32::from(joining)), join);
            }
            _ => debug!(queue = %queue, "the work queue's consumers could not be counted"),
        }
    }
}

/// The worker's metrics, with the program's own series (its Stripe API version, the
/// telemetry counters, every publish failure kind at zero).
fn program_metrics() -> Arc<Metrics> {
    Arc::new(Metrics::new(&Program {
        stripe_api_version: &crate::stripe::api_version(),
        counters: &[EXPORT_FAILURES.clone(), SPANS_DROPPED.clone()],
        publish_failure_kinds: &PublishError::KINDS,
    }))
}

/// The consumer's settings from the run's.
fn worker_settings(args: &RunArgs) -> Result<WorkerSettings, StartError> {
    Ok(WorkerSettings {
        prefetch: args.prefetch,
        shutdown_grace: args.shutdown_grace,
        reconnect: args.reconnect_policy(),
        urls: args.checkout_urls(),
        wait_budget: args.stripe_wait_budget()?,
    })
}

/// The Stripe gateway the settings ask for, behind flow control (or mock mode without a key),
/// said in a log line; and the mode of the key (`Some(true)`: live), if it has a known form.
fn gateway(args: &RunArgs, metrics: &Arc<Metrics>) -> Result<(Gateway, Option<bool>), StartError> {
    let breaker = args.breaker_settings()?;
    let pacer = args.pacer_settings()?;
    let secret_key = args.stripe_secret_key()?;
    let livemode = secret_key.as_ref().and_then(|k| key_livemode(k.expose_secret()));
    let gateway = match secret_key {
        Some(secret) => Gateway::stripe(
            StripeApi::new(&args.stripe_api_base, secret, args.stripe_timeout).map_err(|e| {
                ConfigError::new("STRIPE_API_BASE", "stripe-api-base", e.to_string())
            })?,
            FlowControl::new(breaker, pacer, metrics.clone()),
            metrics.clone(),
        ),
        None => Gateway::mock(metrics.clone()),
    };
    if gateway.is_mock() {
        warn!(
            "MOCK MODE: STRIPE_SECRET_KEY is unset, sessions are fake \
             (cs_test_mock_session_<trip id>) and can never be paid"
        );
    } else {
        info!(
            stripe_api_base = %args.stripe_api_base,
            timeout_ms = args.stripe_timeout.as_millis() as u64,
            initial_rps = pacer.initial,
            max_rps = ?pacer.max,
            account_rps = ?pacer.account,
            breaker_consecutive = breaker.consecutive,
            breaker_cooldown_ms = breaker.cooldown.as_millis() as u64,
            "Stripe mode"
        );
    }
    Ok((gateway, livemode))
}

/// Several nodes with classic queues: a warning that there is no failover.
fn warn_without_failover(broker: &BrokerAccess, topology: &Topology) {
    if broker.node_count() > 1 && topology.work_queue.queue_type == QueueType::Classic {
        warn!(
            nodes = broker.node_count(),
            profile = %topology.profile,
            "several broker nodes with classic queues: a classic queue lives on one node, \
             and while that node is down every node refuses it (NOT_FOUND, home node down), \
             so payments stop until it returns. For failover use quorum queues: \
             PAYMENT_TOPOLOGY=topology/quorum.toml on a fresh cluster"
        );
    }
}
