//! A three-node cluster of the test's own, quorum profile: a node dies under load with
//! retries waiting, then the whole cluster restarts. Nothing is lost or doubled.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use testkit::amqp::{Client, Received, command, inner};
use testkit::cluster::RabbitCluster;
use testkit::stripe::Behaviour;

use testkit::world::{
    EVENTS, PARKED, RunningWorker, WAIT_QUEUES, WORK, World, repo_path, wait_ready,
};

fn trip(event: &Received) -> String {
    inner(&event.body)["tripID"].as_str().expect("a trip id").to_owned()
}

/// The trip-service and the gateway of the test, on one node: a node's death can close its
/// channel or refuse a publish while queues elect new leaders, so it starts over on a new
/// connection and publishes again what was not confirmed.
struct Peer {
    uri: String,
    client: Option<Client>,
}

impl Peer {
    fn new(uri: String) -> Self {
        Self { uri, client: None }
    }

    async fn client(&mut self) -> &Client {
        if self.client.as_ref().is_none_or(|c| !c.channel.status().connected()) {
            self.client = Some(Client::connect(&self.uri).await);
        }
        self.client.as_ref().expect("just connected")
    }

    /// Sends trips `range` (one in four failing its first Stripe call, so retries wait in
    /// the wait queues); each is confirmed before the next.
    async fn send(&mut self, world: &World, range: std::ops::Range<usize>) -> Vec<String> {
        let mut sent = Vec::new();
        for i in range {
            let id = format!("cl-{i}");
            if i % 4 == 0 {
                world.stripe.script(&id, [Behaviour::conflict()]);
            }
            let body = command(&id, "u", 100.0, "USD");
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let client = self.client().await;
                let publish = client.try_publish(
                    "trip",
                    "payment.cmd.create_session",
                    &body,
                    properties.clone(),
                );
                match tokio::time::timeout(Duration::from_secs(10), publish).await {
                    Ok(Ok(())) => break,
                    _ if Instant::now() > deadline => panic!("{id} never confirmed"),
                    _ => {
                        self.client = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            sent.push(id);
        }
        sent
    }

    /// Events that arrive within `wait`.
    async fn events(&mut self, wait: Duration) -> Vec<Received> {
        let deadline = Instant::now() + wait;
        let mut events = Vec::new();
        while Instant::now() < deadline {
            match self.client().await.try_get(EVENTS).await {
                Ok(Some(event)) => events.push(event),
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => {
                    self.client = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        events
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_node_killed_under_load_then_a_whole_cluster_restart_lose_nothing() {
    let cluster = tokio::task::block_in_place(|| RabbitCluster::start("cl", 3));
    let world = World::new("cluster").await;
    let profile = repo_path("topology/quorum.toml");
    let args = crate::args_on(
        &world,
        &cluster.uris(),
        &["--topology", profile.to_str().unwrap(), "--prefetch", "8"],
    );
    let workers: Vec<RunningWorker> =
        vec![world.spawn_with(args.clone()).await, world.spawn_with(args).await];
    for worker in &workers {
        wait_ready(worker.http).await;
    }
    // Quorum queues declared an instant before a node dies can come back empty (3.10).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let leader = tokio::task::block_in_place(|| cluster.leader_of(WORK));
    let mut peer = Peer::new(cluster.nodes[(leader + 1) % 3].uri());
    let mut trips = peer.send(&world, 0..40).await;
    let mut waiting = false;
    for _ in 0..100 {
        if peer.client().await.try_depth(WAIT_QUEUES[0]).await.unwrap_or(0) > 0 {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waiting, "retries wait in the wait queue when the node dies");

    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.nodes[leader].kill());
    let after = peer.send(&world, 40..80).await;
    // How long payments stopped: from the kill to the first event of a command sent after it.
    let mut events = Vec::new();
    let mut resumed = None;
    while resumed.is_none() && killed.elapsed() < Duration::from_secs(40) {
        let batch = peer.events(Duration::from_millis(100)).await;
        resumed = batch.iter().find(|e| after.contains(&trip(e))).map(|e| e.at - killed);
        events.extend(batch);
    }
    println!("cluster: payments resumed {resumed:?} after the SIGKILL of the work queue's leader");
    assert!(resumed.is_some_and(|d| d < Duration::from_secs(20)), "{resumed:?}");
    trips.extend(after);

    // The node comes back and rejoins.
    tokio::task::block_in_place(|| {
        cluster.nodes[leader].launch();
        cluster.nodes[leader].wait_for_port();
    });
    events.extend(peer.events(Duration::from_secs(5)).await);

    // The whole cluster at once.
    peer.client = None;
    tokio::task::block_in_place(|| cluster.restart_all());
    trips.extend(peer.send(&world, 80..100).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        events.extend(peer.events(Duration::from_millis(500)).await);
        let seen: HashSet<String> = events.iter().map(trip).collect();
        let missing: Vec<&String> = trips.iter().filter(|t| !seen.contains(*t)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
    };
    if !missing.is_empty() {
        let client = peer.client().await;
        let mut depths = Vec::new();
        for queue in [WORK, PARKED].into_iter().chain(WAIT_QUEUES) {
            depths.push((queue, client.try_depth(queue).await));
        }
        let calls: Vec<usize> = missing.iter().map(|t| world.stripe.seen_for(t).len()).collect();
        // What was parked, and why: the trip, the reason and its detail.
        let parked: Vec<(Option<String>, Option<String>, Option<String>)> = client
            .take(PARKED, 50, Duration::from_secs(1))
            .await
            .iter()
            .map(|m| {
                let trip = inner(&m.body)["tripID"].as_str().map(str::to_owned);
                (
                    trip,
                    m.header_string("payment-park-reason"),
                    m.header_string("payment-park-detail"),
                )
            })
            .collect();
        panic!(
            "every trip has its event; missing: {missing:?} (Stripe calls {calls:?}, {depths:?}); \
             parked: {parked:?}"
        );
    }

    // One session per trip; every event of a trip carries it.
    let mut sessions: HashMap<String, String> = HashMap::new();
    for event in &events {
        let session = inner(&event.body)["sessionID"].as_str().unwrap().to_owned();
        let trip = trip(event);
        let first = sessions.entry(trip.clone()).or_insert_with(|| session.clone());
        assert_eq!(*first, session, "{trip} got two sessions");
    }
    for trip in &trips {
        assert_eq!(world.stripe.created_for(trip).len(), 1, "{trip}: one session");
    }
    let client = peer.client().await;
    assert_eq!(client.depth(PARKED).await, 0, "nothing parked");
    for queue in WAIT_QUEUES {
        assert_eq!(client.depth(queue).await, 0, "{queue} is empty");
    }
    for worker in workers {
        let stopped = tokio::time::timeout(Duration::from_secs(60), worker.stop()).await;
        assert!(matches!(stopped, Ok(Ok(()))), "a worker stops within its grace: {stopped:?}");
    }
}
