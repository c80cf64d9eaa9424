//! A three-node cluster of the test's own, quorum profile: a node dies under load with
//! retries waiting, then the whole cluster restarts. Nothing is lost or doubled.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use testkit::amqp::{Client, Received, command, inner};
use testkit::cluster::RabbitCluster;
use testkit::eventually;
use testkit::stripe::Behaviour;

use crate::helpers::{
    EVENTS, PARKED, RunningWorker, WAIT_QUEUES, WORK, World, repo_path, wait_ready,
};

fn trip(event: &Received) -> String {
    inner(&event.body)["tripID"].as_str().expect("a trip id").to_owned()
}

async fn send(client: &Client, world: &World, trips: impl Iterator<Item = usize>) -> Vec<String> {
    let mut sent = Vec::new();
    for i in trips {
        let id = format!("cl-{i}");
        if i % 4 == 0 {
            // A failure of this payment that may pass: a retry waits in a wait queue.
            world.stripe.script(&id, [Behaviour::conflict()]);
        }
        let body = command(&id, "u", 100.0, "USD");
        let published = client.send_command(&body);
        tokio::time::timeout(Duration::from_secs(30), published)
            .await
            .unwrap_or_else(|_| panic!("{id}: the cluster did not confirm within 30 s"));
        sent.push(id);
    }
    sent
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_node_killed_under_load_then_a_whole_cluster_restart_lose_nothing() {
    let cluster = tokio::task::block_in_place(|| RabbitCluster::start("cl", 3));
    let world = World::new("cluster").await;
    let profile = repo_path("topology/quorum.toml");
    let args = world
        .args_on(&cluster.uris(), &["--topology", profile.to_str().unwrap(), "--prefetch", "8"]);
    let workers: Vec<RunningWorker> =
        vec![world.spawn_with(args.clone()).await, world.spawn_with(args).await];
    for worker in &workers {
        wait_ready(worker.http).await;
    }
    // Quorum queues declared an instant before a node dies can come back empty (3.10).
    tokio::time::sleep(Duration::from_secs(2)).await;

    let leader = tokio::task::block_in_place(|| cluster.leader_of(WORK));
    let survivor = &cluster.nodes[(leader + 1) % 3];
    let client = Client::connect(&survivor.uri()).await;
    let mut trips = send(&client, &world, 0..40).await;
    let waiting = eventually(Duration::from_secs(10), || async {
        (client.try_depth(WAIT_QUEUES[0]).await? > 0).then_some(())
    })
    .await;
    assert!(waiting.is_some(), "retries wait in the wait queue when the node dies");

    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.nodes[leader].kill());
    let after: Vec<String> = send(&client, &world, 40..80).await;
    // How long payments stopped: from the kill to the first event of a command sent after it.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let resumed = loop {
        let batch = client.take(EVENTS, 100, Duration::from_millis(100)).await;
        let first_after = batch.iter().find(|e| after.contains(&trip(e))).map(|e| e.at);
        events.extend(batch);
        if let Some(at) = first_after {
            break Some(at.duration_since(killed));
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    println!("cluster: payments resumed {resumed:?} after the SIGKILL of the work queue's leader");
    assert!(resumed.is_some_and(|d| d < Duration::from_secs(20)), "{resumed:?}");
    trips.extend(after);

    // The node comes back and rejoins.
    tokio::task::block_in_place(|| {
        cluster.nodes[leader].launch();
        cluster.nodes[leader].wait_for_port();
    });
    events.extend(client.take(EVENTS, 200, Duration::from_secs(30)).await);

    // The whole cluster at once.
    drop(client);
    println!("cluster: {} events before the whole-cluster restart", events.len());
    tokio::task::block_in_place(|| cluster.restart_all());
    println!("cluster: restarted");
    let client = Client::connect(&cluster.nodes[0].uri()).await;
    trips.extend(send(&client, &world, 80..100).await);
    println!("cluster: sent after the restart");
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        events.extend(client.take(EVENTS, 500, Duration::from_millis(500)).await);
        let seen: std::collections::HashSet<String> = events.iter().map(trip).collect();
        let missing: Vec<&String> = trips.iter().filter(|t| !seen.contains(*t)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
    };
    assert!(missing.is_empty(), "every trip has its event; missing: {missing:?}");

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
    assert_eq!(client.depth(PARKED).await, 0, "nothing parked");
    for queue in WAIT_QUEUES {
        assert_eq!(client.depth(queue).await, 0, "{queue} is empty");
    }
    for worker in workers {
        worker.stop().await.unwrap();
    }
}
