//! The chaos suite: real `payment-worker` pods (child processes, competing consumers) on a
//! RabbitMQ node of the suite's own, behind a fault proxy, with a Stripe stand-in that fails
//! most payments' first call (65 %, a 503, a 429, a dropped connection or a lost answer, and
//! as often again their second). While trips flow, pods are SIGKILLed (preferably while
//! retries wait in the wait queues) and replaced, one is stopped with SIGTERM, the broker is
//! restarted (`stop_app`/`start_app`, and SIGKILL plus a cold start), the workers' connections
//! are cut and delayed, and Stripe goes down for 10 s at a time (503s, then dropped
//! connections) while trips still arrive. Then every trip is accounted for: nothing is parked
//! but the trips scripted to fail for good.
//!
//! `chaos_bounded` runs in `make test`. `chaos_soak` is the long run (`make chaos`), sized by
//! CHAOS_TRIPS, CHAOS_SECONDS (how long trips are published), CHAOS_KILLS,
//! CHAOS_BROKER_RESTARTS, CHAOS_CUTS, CHAOS_STRIPE_OUTAGES and CHAOS_PODS. With
//! `CHAOS_CLUSTER=3` the broker is a three-node cluster (quorum profile, a fault proxy per
//! node, the pods given every node): a broker restart becomes a node's SIGKILL (the work
//! queue's leader's when it can be found) or `stop_app`/`start_app`, with the others up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use testkit::amqp::{command, inner};
use testkit::cluster::RabbitCluster;
use testkit::names::{EVENTS, PARKED, WAIT_QUEUES, WORK};
use testkit::node::RabbitNode;
use testkit::pod::Launch;
use testkit::proxy::FaultProxy;
use testkit::stats::{env_usize, percentile};
use testkit::stripe::{Behaviour, Outage, RandomFailures, StripeStandin};
use tokio::process::Child;

#[derive(Debug, Clone)]
struct Params {
    trips: usize,
    publish_for: Duration,
    kills: usize,
    broker_restarts: usize,
    cuts: usize,
    stripe_outages: usize,
    pods: usize,
    /// Nodes of the broker: 1, or a cluster.
    nodes: usize,
}

/// One fault the suite injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL a pod (preferably while retries wait) and start a replacement.
    Kill,
    /// SIGTERM a pod under load; it must exit 0.
    Sigterm,
    /// SIGKILL the broker node and cold-start it.
    BrokerKill,
    /// `stop_app`/`start_app` on the broker node.
    BrokerApp,
    /// Cut every worker connection at the proxy.
    Cut,
    /// 200 ms of latency on every worker connection for 3 s.
    Delay,
    /// Stripe down for 10 s: 503s, then dropped connections.
    StripeOutage,
}

impl Params {
    fn from_env(defaults: Params) -> Params {
        let get = env_usize;
        Params {
            trips: get("CHAOS_TRIPS", defaults.trips),
            publish_for: Duration::from_secs(get(
                "CHAOS_SECONDS",
                defaults.publish_for.as_secs() as usize,
            ) as u64),
            kills: get("CHAOS_KILLS", defaults.kills),
            broker_restarts: get("CHAOS_BROKER_RESTARTS", defaults.broker_restarts),
            cuts: get("CHAOS_CUTS", defaults.cuts),
            stripe_outages: get("CHAOS_STRIPE_OUTAGES", defaults.stripe_outages),
            pods: get("CHAOS_PODS", defaults.pods),
            nodes: get("CHAOS_CLUSTER", defaults.nodes),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_bounded() {
    run(Params {
        trips: 300,
        publish_for: Duration::from_secs(30),
        kills: 3,
        broker_restarts: 2,
        cuts: 2,
        stripe_outages: 1,
        pods: 2,
        nodes: 1,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long soak run: make chaos"]
async fn chaos_soak() {
    let params = Params::from_env(Params {
        trips: 10_000,
        publish_for: Duration::from_secs(600),
        kills: 20,
        broker_restarts: 3,
        cuts: 10,
        stripe_outages: 3,
        pods: 3,
        nodes: 1,
    });
    run(params).await;
}

struct Harness {
    nodes: Vec<RabbitNode>,
    /// One fault proxy per node; the pods reach the nodes through them.
    proxies: Vec<FaultProxy>,
    stripe: StripeStandin,
    logs: PathBuf,
    started: usize,
}

impl Harness {
    /// Starts a worker process and waits until it is ready.
    async fn spawn_pod(&mut self) -> Child {
        self.started += 1;
        let log =
            std::fs::File::create(self.logs.join(format!("pod-{}.log", self.started))).unwrap();
        let uris: Vec<String> =
            self.proxies.iter().map(|p| format!("amqp://guest:guest@{}/%2f", p.addr())).collect();
        let args = testkit::world::run_args(&uris.join(","), Some(&self.stripe));
        let mut launch = Launch::new(env!("CARGO_BIN_EXE_payment-worker"), args);
        if self.nodes.len() > 1 {
            let profile = testkit::world::repo_path("topology/quorum.toml");
            launch = launch.args([OsString::from("--topology"), profile.into_os_string()]);
        }
        launch
            .args(["--stripe-timeout", "1s", "--shutdown-grace", "10s"])
            .args([
                "--reconnect-min-delay",
                "100ms",
                "--reconnect-max-delay",
                "2s",
                "--reconnect-max-attempts",
                "200",
            ])
            .args(["--prefetch", "16", "--log-format", "text"])
            .log(log)
            .start(Duration::from_secs(30))
            .await
            .child
    }
}

/// What the observers saw.
#[derive(Default)]
struct Observed {
    published: BTreeMap<String, Instant>,
    /// trip → session ids of every event copy, and when the first arrived.
    events: HashMap<String, (Vec<String>, Instant)>,
}

async fn connect(uri: &str) -> Option<Connection> {
    Connection::connect(uri, ConnectionProperties::default()).await.ok()
}

/// The first of `uris` that answers, starting after the one used last.
async fn connect_any(uris: &[String], turn: &mut usize) -> Option<Connection> {
    for _ in 0..uris.len() {
        *turn = (*turn + 1) % uris.len();
        if let Some(connection) = connect(&uris[*turn]).await {
            return Some(connection);
        }
    }
    None
}

/// Publishes the trips evenly over `duration`, straight to the node (not through the proxy),
/// reconnecting across broker restarts; a trip counts as published once confirmed.
async fn publish_trips(
    uris: Vec<String>,
    trips: Vec<String>,
    duration: Duration,
    observed: Arc<Mutex<Observed>>,
) {
    let gap = duration / u32::try_from(trips.len().max(1)).unwrap();
    let mut next = 0;
    let mut session = None;
    let mut turn = 0;
    while next < trips.len() {
        if session.is_none() {
            let Some(connection) = connect_any(&uris, &mut turn).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let Ok(channel) = connection.create_channel().await else { continue };
            if channel.confirm_select(ConfirmSelectOptions::default()).await.is_err() {
                continue;
            }
            session = Some((connection, channel));
        }
        let (_, channel) = session.as_ref().unwrap();
        let trip = &trips[next];
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let published = async {
            let confirm = channel
                .basic_publish(
                    "trip".into(),
                    "payment.cmd.create_session".into(),
                    BasicPublishOptions::default(),
                    &command(trip, "rider", 1500.0, "USD"),
                    properties,
                )
                .await
                .ok()?;
            confirm.await.ok().filter(|c| c.is_ack())
        }
        .await;
        if published.is_some() {
            observed.lock().unwrap().published.entry(trip.clone()).or_insert_with(Instant::now);
            next += 1;
            tokio::time::sleep(gap).await;
        } else {
            session = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Records every `session_created` event, reconnecting across broker restarts.
async fn observe_events(uris: Vec<String>, observed: Arc<Mutex<Observed>>) {
    let mut turn = 0;
    loop {
        let Some(connection) = connect_any(&uris, &mut turn).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(channel) = connection.create_channel().await else { continue };
        let Ok(mut consumer) = channel
            .basic_consume(
                EVENTS.into(),
                "chaos-observer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while let Some(Ok(delivery)) = consumer.next().await {
            let event = inner(&delivery.data);
            let trip = event["tripID"].as_str().unwrap_or_default().to_owned();
            let session = event["sessionID"].as_str().unwrap_or_default().to_owned();
            observed
                .lock()
                .unwrap()
                .events
                .entry(trip)
                .or_insert_with(|| (Vec::new(), Instant::now()))
                .0
                .push(session);
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
    }
}

async fn depth(uris: &[String], queue: &str) -> Option<u32> {
    let connection = connect_any(uris, &mut 0).await?;
    let depth = testkit::amqp::queue_depth(&connection, queue).await;
    let _ = connection.close(200, "depth".into()).await;
    depth
}

async fn parked_trips(uris: &[String]) -> BTreeSet<String> {
    let mut answering = None;
    for uri in uris {
        if let Some(connection) = connect(uri).await {
            let _ = connection.close(200, "probe".into()).await;
            answering = Some(uri);
            break;
        }
    }
    let client = testkit::amqp::Client::connect(answering.expect("a broker node answers")).await;
    let parked = client.take(PARKED, usize::MAX, Duration::from_millis(500)).await;
    parked
        .iter()
        .map(|m| inner(&m.body)["tripID"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn run(params: Params) {
    let run_started = Instant::now();
    let logs = std::env::temp_dir().join(format!("pw-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let nodes = if params.nodes > 1 {
        tokio::task::block_in_place(|| RabbitCluster::start("chaos", params.nodes)).nodes
    } else {
        vec![RabbitNode::start("chaos")]
    };
    let mut proxies = Vec::new();
    for node in &nodes {
        proxies.push(FaultProxy::start(node.addr()).await);
    }
    let stripe = StripeStandin::start().await;
    // Most payments fail their first call (a 503, a 429, a dropped connection, a lost answer),
    // some their second too: the flow control must tell this from an outage and still lose,
    // double and park nothing.
    stripe.set_random_failures(RandomFailures {
        rate: 0.65,
        max_per_trip: 2,
        slow: Duration::from_millis(1500),
    });
    let trips: Vec<String> = (0..params.trips).map(|i| format!("chaos-{i:05}")).collect();
    // One trip in fifty fails for good; only those may end up parked.
    let doomed: BTreeSet<String> = trips.iter().step_by(50).cloned().collect();
    for trip in &doomed {
        stripe.script(trip, [Behaviour::invalid_request()]);
    }
    let mut harness = Harness { nodes, proxies, stripe, logs: logs.clone(), started: 0 };
    let mut pods = Vec::new();
    for _ in 0..params.pods {
        pods.push(harness.spawn_pod().await);
    }
    // Let the topology settle before the broker is touched (quorum and mnesia both need it).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let uris: Vec<String> = harness.nodes.iter().map(RabbitNode::uri).collect();
    let observed = Arc::new(Mutex::new(Observed::default()));
    let publisher = tokio::spawn(publish_trips(
        uris.clone(),
        trips.clone(),
        params.publish_for,
        observed.clone(),
    ));
    let observer = tokio::spawn(observe_events(uris.clone(), observed.clone()));

    // The faults, spread over the publishing window in a shuffled order.
    let mut faults: Vec<Fault> = Vec::new();
    faults.extend(std::iter::repeat_n(Fault::Kill, params.kills));
    faults.extend(
        (0..params.broker_restarts)
            .map(|i| if i % 2 == 0 { Fault::BrokerKill } else { Fault::BrokerApp }),
    );
    faults.extend(std::iter::repeat_n(Fault::Cut, params.cuts));
    faults.extend(std::iter::repeat_n(Fault::StripeOutage, params.stripe_outages));
    faults.push(Fault::Sigterm);
    faults.push(Fault::Delay);
    shuffle(&mut faults);
    early_outages(&mut faults);
    let gap = params.publish_for / u32::try_from(faults.len() + 1).unwrap();
    let (mut kills, mut restarts, mut sigterms, mut outages) = (0, 0, 0, 0);
    for fault in faults {
        tokio::time::sleep(gap).await;
        match fault {
            Fault::Kill => {
                // Prefer a moment when retries wait in the broker.
                let _ = testkit::eventually(Duration::from_secs(3), || async {
                    let mut waiting = 0;
                    for queue in WAIT_QUEUES {
                        waiting += depth(&uris, queue).await.unwrap_or(0);
                    }
                    (waiting > 0).then_some(())
                })
                .await;
                let victim = rand::random_range(0..pods.len());
                let mut pod = pods.swap_remove(victim);
                pod.start_kill().unwrap();
                let _ = pod.wait().await;
                kills += 1;
                pods.push(harness.spawn_pod().await);
            }
            Fault::Sigterm => {
                let mut pod = pods.remove(0);
                let pid = pod.id().unwrap().to_string();
                std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
                let status = tokio::time::timeout(Duration::from_secs(20), pod.wait()).await;
                assert!(
                    matches!(status, Ok(Ok(s)) if s.success()),
                    "SIGTERM under load exits 0: {status:?}"
                );
                sigterms += 1;
                pods.push(harness.spawn_pod().await);
            }
            Fault::BrokerKill => {
                let nodes = &harness.nodes;
                tokio::task::block_in_place(|| {
                    if nodes.len() == 1 {
                        nodes[0].kill_and_restart();
                    } else {
                        // A node of the cluster dies (the work queue's leader if known) and
                        // comes back a few seconds later; the others carry on.
                        let victim = leader_of_work_queue(nodes);
                        nodes[victim].kill();
                        std::thread::sleep(Duration::from_secs(3));
                        nodes[victim].launch();
                        nodes[victim].wait_for_port();
                    }
                });
                restarts += 1;
            }
            Fault::BrokerApp => {
                let node = &harness.nodes[rand::random_range(0..harness.nodes.len())];
                tokio::task::block_in_place(|| node.restart_app(Duration::from_secs(2)));
                restarts += 1;
            }
            Fault::Cut => harness.proxies.iter().for_each(FaultProxy::cut_all),
            Fault::Delay => {
                harness.proxies.iter().for_each(|p| p.set_delay(Duration::from_millis(200)));
                tokio::time::sleep(Duration::from_secs(3)).await;
                harness.proxies.iter().for_each(|p| p.set_delay(Duration::ZERO));
            }
            Fault::StripeOutage => {
                harness.stripe.set_outage(Some(Outage::Unavailable));
                tokio::time::sleep(Duration::from_secs(5)).await;
                harness.stripe.set_outage(Some(Outage::Dropped));
                tokio::time::sleep(Duration::from_secs(5)).await;
                harness.stripe.set_outage(None);
                outages += 1;
            }
        }
    }
    publisher.await.unwrap();

    // Drain: every trip gets its event or is parked, and the wait queues empty.
    let expected_events = trips.len() - doomed.len();
    let drained = testkit::eventually(Duration::from_secs(180), || {
        let observed = observed.clone();
        let uris = uris.clone();
        async move {
            let done = observed.lock().unwrap().events.len() >= expected_events;
            if !done {
                return None;
            }
            for queue in WAIT_QUEUES.iter().chain([WORK].iter()) {
                if depth(&uris, queue).await != Some(0) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    // A settled moment: late duplicates arrive, then the pods stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for mut pod in pods {
        let _ = pod.start_kill();
        let _ = pod.wait().await;
    }
    observer.abort();

    let parked = parked_trips(&uris).await;
    let observed = observed.lock().unwrap();
    let created = harness.stripe.created();
    let mut sessions_per_trip: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for session in &created {
        sessions_per_trip.entry(session.trip_id.as_str()).or_default().insert(session.id.as_str());
    }
    let duplicate_sessions: usize = sessions_per_trip.values().map(|s| s.len() - 1).sum();
    let lost: Vec<&String> = trips
        .iter()
        .filter(|t| !observed.events.contains_key(*t) && !parked.contains(*t))
        .collect();
    let duplicate_events: usize =
        observed.events.values().map(|(copies, _)| copies.len() - 1).sum();
    let inconsistent: Vec<&String> = observed
        .events
        .iter()
        .filter(|(_, (copies, _))| copies.iter().collect::<BTreeSet<_>>().len() > 1)
        .map(|(trip, _)| trip)
        .collect();
    let latencies: Vec<f64> = observed
        .events
        .iter()
        .filter_map(|(trip, (_, at))| {
            Some(at.duration_since(*observed.published.get(trip)?).as_secs_f64())
        })
        .collect();
    println!(
        "chaos: trips={} pods={} kills={kills} sigterms={sigterms} broker_restarts={restarts} connection_cuts={} stripe_outages={outages} stripe_sessions={} duplicate_sessions={duplicate_sessions} lost={} duplicate_events={duplicate_events} parked={} p50={:.3}s p99={:.3}s wall={:.0}s",
        trips.len(),
        params.pods,
        harness.proxies.iter().map(FaultProxy::cuts).sum::<u64>(),
        created.len(),
        lost.len(),
        parked.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        run_started.elapsed().as_secs_f64(),
    );
    let log_hint = format!("pod logs in {}", logs.display());
    assert!(drained.is_some(), "the system did not drain within 180 s; {log_hint}");
    assert_eq!(duplicate_sessions, 0, "a trip got two Stripe sessions; {log_hint}");
    assert!(lost.is_empty(), "lost trips: {lost:?}; {log_hint}");
    assert!(inconsistent.is_empty(), "events with different session ids: {inconsistent:?}");
    assert_eq!(parked, doomed, "only the trips scripted to fail for good are parked; {log_hint}");
    let _ = std::fs::remove_dir_all(&logs);
}

/// The node leading the work queue, or a random one when no node says.
fn leader_of_work_queue(nodes: &[RabbitNode]) -> usize {
    testkit::cluster::leader(nodes, WORK).unwrap_or_else(|| rand::random_range(0..nodes.len()))
}

/// Moves each Stripe outage out of the last third of the faults: Stripe goes down while trips
/// still arrive. At the end of the run only a few retries are in flight, and a payment failing
/// alone through an outage cannot be told from a sick one: it is parked after its last attempt
/// (the breaker needs five distinct payments failing with no answer; `src/stripe/breaker.rs`).
fn early_outages(faults: &mut [Fault]) {
    let late = faults.len() * 2 / 3;
    for i in late..faults.len() {
        if faults[i] != Fault::StripeOutage {
            continue;
        }
        let early: Vec<usize> = (0..late).filter(|&j| faults[j] != Fault::StripeOutage).collect();
        if !early.is_empty() {
            faults.swap(i, early[rand::random_range(0..early.len())]);
        }
    }
}

fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        items.swap(i, rand::random_range(0..=i));
    }
}
