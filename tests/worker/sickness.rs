//! A sick payment or a sick Stripe? Sick payments follow their own schedule while the others
//! flow; a brownout keeps every payment going; nothing is parked that is not sick.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use testkit::amqp::{Client, Received, command, inner};
use testkit::stripe::Behaviour;

use testkit::world::{EVENTS, PARKED, RunningWorker, World, metric};

fn trip_of(message: &Received) -> String {
    inner(&message.body)["tripID"].as_str().unwrap().to_owned()
}

const OPENED: &str = r#"payment_worker_stripe_circuit_transitions_total{to="open"}"#;

async fn openings(worker: &RunningWorker) -> f64 {
    metric(worker.http, OPENED).await
}

/// Sends `trips` at once and waits for their events.
async fn send_all(world: &World, trips: &[String]) -> Vec<Received> {
    for trip in trips {
        world.client.send_command(&command(trip, "u", 1500.0, "USD")).await;
    }
    world.client.take(EVENTS, trips.len(), Duration::from_secs(20)).await
}

/// Takes `count` events as they come, on a connection of its own, while the test goes on.
fn collect(
    world: &World,
    count: usize,
    within: Duration,
) -> tokio::task::JoinHandle<Vec<Received>> {
    let uri = world.vhost.uri();
    tokio::spawn(async move { Client::connect(&uri).await.take(EVENTS, count, within).await })
}

/// The gaps between the calls Stripe saw about `trip`, in seconds.
fn gaps(world: &World, trip: &str) -> Vec<f64> {
    let seen = world.stripe.seen_for(trip);
    seen.windows(2).map(|w| (w[1].at - w[0].at).as_secs_f64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_burst_keeps_the_circuit_closed_and_every_payment_on_its_own_schedule() {
    let world = World::new("mixed-burst").await;
    let worker = world.start_worker(&["--stripe-timeout", "1s"]).await;

    // Cold: a fast payment behind ten slow but healthy ones is not paced behind them.
    let slow: Vec<String> = (0..10).map(|i| format!("slow-{i}")).collect();
    for trip in &slow {
        world.stripe.script(trip, [Behaviour::Slow(Duration::from_millis(600))]);
        world.client.send_command(&command(trip, "u", 1500.0, "USD")).await;
    }
    let sent = Instant::now();
    world.client.send_command(&command("fast", "u", 1500.0, "USD")).await;
    let events = world.client.take(EVENTS, 11, Duration::from_secs(10)).await;
    let fast = events.iter().find(|e| trip_of(e) == "fast").expect("the fast payment");
    let waited = fast.at - sent;
    assert!(waited < Duration::from_millis(500), "the fast payment waited {waited:?}");

    // Serving: answers in the window, then a burst in which seven payments are sick.
    let warm: Vec<String> = (0..20).map(|i| format!("warm-{i}")).collect();
    assert_eq!(send_all(&world, &warm).await.len(), warm.len());
    let transient: [(&str, Vec<Behaviour>); 5] = [
        ("t-503", vec![Behaviour::unavailable()]),
        ("t-drop", vec![Behaviour::Drop]),
        ("t-timeout", vec![Behaviour::Slow(Duration::from_secs(2))]),
        ("t-503-drop", vec![Behaviour::unavailable(), Behaviour::Drop]),
        (
            "t-three",
            vec![
                Behaviour::Drop,
                Behaviour::Fail {
                    status: 502,
                    kind: "api_error",
                    saved: false,
                    should_retry: None,
                },
                Behaviour::unavailable(),
            ],
        ),
    ];
    for (trip, script) in &transient {
        world.stripe.script(trip, script.clone());
    }
    world.stripe.script("always-503", (0..20).map(|_| Behaviour::unavailable()));
    // A 500 saved under the key and replayed, without Stripe-Should-Retry.
    world.stripe.script(
        "replayed-500",
        [Behaviour::Fail { status: 500, kind: "api_error", saved: true, should_retry: None }],
    );
    let mut burst: Vec<String> = (0..23).map(|i| format!("healthy-{i}")).collect();
    let sick = transient.iter().map(|(t, _)| *t).chain(["always-503", "replayed-500"]);
    for (i, trip) in sick.enumerate() {
        burst.insert(i * 4 + 1, trip.to_owned());
    }
    for trip in &burst {
        world.client.send_command(&command(trip, "u", 1500.0, "USD")).await;
    }
    let healthy = burst.len() - 2;
    let events = world.client.take(EVENTS, healthy, Duration::from_secs(30)).await;
    assert_eq!(events.len(), healthy, "every payment but the two always failing");
    let parked = world.client.take(PARKED, 2, Duration::from_secs(20)).await;

    assert_eq!(openings(&worker).await, 0.0, "the circuit never opened");
    for (trip, script) in &transient {
        let calls = world.stripe.seen_for(trip).len();
        assert_eq!(calls, script.len() + 1, "{trip}: one call per attempt");
        assert_eq!(world.stripe.created_for(trip).len(), 1, "{trip}: one session");
    }
    // The schedule, from one call to the next: 1 s, 2 s, 4 s (a timeout adds its 1 s).
    for (trip, expected) in [("t-503", &[1.0][..]), ("t-drop", &[1.0]), ("t-503-drop", &[1.0, 2.0])]
        .into_iter()
        .chain([("t-three", &[1.0, 2.0, 4.0][..])])
    {
        let gaps = gaps(&world, trip);
        assert_eq!(gaps.len(), expected.len(), "{trip}: {gaps:?}");
        for (gap, want) in gaps.iter().zip(expected) {
            assert!((gap - want).abs() <= 0.5, "{trip}: {gaps:?}, expected {expected:?}");
        }
    }
    let reasons: HashMap<String, Option<String>> =
        parked.iter().map(|p| (trip_of(p), p.header_string("payment-park-reason"))).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons["always-503"].as_deref(), Some("retries_exhausted"));
    assert_eq!(world.stripe.seen_for("always-503").len(), 4, "parked after exactly 4 calls");
    assert_eq!(reasons["replayed-500"].as_deref(), Some("stripe_replayed_error"));
    assert!(world.stripe.seen_for("replayed-500").len() <= 2, "parked after at most 2 calls");
    worker.stop().await.unwrap();
}

/// Half of all Stripe calls failing at random (429, 503, dropped connections) for 30 s while
/// 10 payments a second arrive, two replicas: the payments keep being tried at the rate
/// Stripe takes, and nearly all complete before Stripe heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_brownout_keeps_payments_flowing() {
    let world = World::new("brownout").await;
    let first = world.start_worker(&["--stripe-timeout", "1s"]).await;
    let second = world.start_worker(&["--stripe-timeout", "1s"]).await;
    world.stripe.set_brownout(Some(0.5));
    let started = Instant::now();
    let trips: Vec<String> = (0..300).map(|i| format!("brownout-{i:03}")).collect();
    let collector = collect(&world, trips.len(), Duration::from_secs(60));
    let publisher = {
        let (uri, trips) = (world.vhost.uri(), trips.clone());
        tokio::spawn(async move {
            let client = Client::connect(&uri).await;
            let mut sent = HashMap::new();
            for trip in trips {
                sent.insert(trip.clone(), Instant::now());
                client.send_command(&command(&trip, "u", 1500.0, "USD")).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sent
        })
    };
    let heal = started + Duration::from_secs(30);
    tokio::time::sleep_until(heal.into()).await;
    world.stripe.set_brownout(None);
    let sent = publisher.await.unwrap();

    let mut events = collector.await.unwrap();
    events.extend(world.client.take(EVENTS, usize::MAX, Duration::from_millis(500)).await);
    let early: Vec<&String> =
        trips.iter().filter(|t| sent[*t] + Duration::from_secs(10) < heal).collect();
    let done_early =
        early.iter().filter(|t| events.iter().any(|e| &trip_of(e) == **t && e.at < heal)).count();
    let calls = world.stripe.seen().len();
    println!(
        "brownout: {done_early} of {} payments sent 10 s before the heal done before it; \
         {calls} calls for {} payments ({:.2} each); circuit opened {} and {} times",
        early.len(),
        trips.len(),
        calls as f64 / trips.len() as f64,
        openings(&first).await,
        openings(&second).await,
    );
    assert!(done_early * 10 >= early.len() * 9, "{done_early} of {} done early", early.len());
    let mut done: Vec<String> = events.iter().map(trip_of).collect();
    done.sort();
    done.dedup();
    assert_eq!(done.len(), trips.len(), "nothing lost");
    assert_eq!(events.len(), trips.len(), "nothing doubled");
    for trip in &trips {
        assert_eq!(world.stripe.created_for(trip).len(), 1, "{trip}: one session");
    }
    assert_eq!(world.client.depth(PARKED).await, 0, "nothing parked");
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

/// Three payments failing on every call among 20 healthy ones a second: the healthy ones
/// are served as if nothing happened, the three follow their schedule and are parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_payments_among_healthy_traffic_are_parked_and_the_others_flow() {
    let world = World::new("poison").await;
    let worker = world.start_worker(&["--stripe-timeout", "1s"]).await;
    let poison = ["poison-503", "poison-drop", "poison-502"];
    world.stripe.script(poison[0], (0..20).map(|_| Behaviour::unavailable()));
    world.stripe.script(poison[1], (0..20).map(|_| Behaviour::Drop));
    world.stripe.script(
        poison[2],
        (0..20).map(|_| Behaviour::Fail {
            status: 502,
            kind: "api_error",
            saved: false,
            should_retry: None,
        }),
    );
    let mut trips: Vec<String> = (0..300).map(|i| format!("healthy-{i:03}")).collect();
    for (i, trip) in poison.iter().enumerate() {
        trips.insert(40 + i * 60, (*trip).to_owned());
    }
    let collector = collect(&world, 300, Duration::from_secs(40));
    let mut sent = HashMap::new();
    for trip in &trips {
        sent.insert(trip.clone(), Instant::now());
        world.client.send_command(&command(trip, "u", 1500.0, "USD")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = collector.await.unwrap();
    assert_eq!(events.len(), 300);
    let mut latencies: Vec<Duration> = events.iter().map(|e| e.at - sent[&trip_of(e)]).collect();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!("poison: healthy p99 {p99:?}, max {:?}", latencies.last().unwrap());
    assert!(p99 < Duration::from_secs(1), "healthy p99 {p99:?}");

    let parked = world.client.take(PARKED, 3, Duration::from_secs(20)).await;
    let mut parked_trips: Vec<String> = parked.iter().map(trip_of).collect();
    parked_trips.sort();
    let mut expected: Vec<String> = poison.iter().map(|p| (*p).to_owned()).collect();
    expected.sort();
    assert_eq!(parked_trips, expected);
    for message in &parked {
        assert_eq!(
            message.header_string("payment-park-reason").as_deref(),
            Some("retries_exhausted")
        );
    }
    for trip in poison {
        assert_eq!(world.stripe.seen_for(trip).len(), 4, "{trip}: four attempts");
    }
    assert_eq!(openings(&worker).await, 0.0, "the circuit never opened");
    worker.stop().await.unwrap();
}
