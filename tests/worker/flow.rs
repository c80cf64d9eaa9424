//! Holding back, not giving up: Stripe outages and rate limits park nothing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use testkit::amqp::{Client, Received, command, inner};
use testkit::stripe::{Behaviour, Outage};

use crate::spawn_binary;
use testkit::world::{EVENTS, PARKED, World, metric, metric_sum};

fn trip_of(message: &Received) -> String {
    inner(&message.body)["tripID"].as_str().unwrap().to_owned()
}

/// Every trip has exactly one Stripe session, and each of its events names it.
fn assert_one_session_per_trip(world: &World, trips: &[String], events: &[Received]) {
    for trip in trips {
        let created = world.stripe.created_for(trip);
        assert_eq!(created.len(), 1, "{trip}: exactly one session");
        for event in events.iter().filter(|e| &trip_of(e) == trip) {
            assert_eq!(inner(&event.body)["sessionID"], created[0].id.as_str(), "{trip}");
        }
    }
}

fn distinct_trips(events: &[Received]) -> BTreeSet<String> {
    events.iter().map(trip_of).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_outage_parks_nothing_and_the_backlog_completes_after_it() {
    let world = World::new("outage").await;
    let worker = world.start_worker(&["--stripe-timeout", "1s"]).await;
    // Four payments a second for 40 s: 5 s healthy, 30 s down (10 s of 503s, 10 s of dropped
    // connections, 10 s without an answer), 5 s healthy again.
    let trips: Vec<String> = (0..160).map(|i| format!("outage-{i:03}")).collect();
    let publisher = {
        let (uri, trips) = (world.vhost.uri(), trips.clone());
        tokio::spawn(async move {
            let client = Client::connect(&uri).await;
            for trip in trips {
                client.send_command(&command(&trip, "u", 1500.0, "USD")).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let down = Instant::now();
    for outage in [Outage::Unavailable, Outage::Dropped, Outage::Hang(Duration::from_secs(3))] {
        world.stripe.set_outage(Some(outage));
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    world.stripe.set_outage(None);
    let up = Instant::now();
    let opened =
        metric(worker.http, r#"payment_worker_stripe_circuit_transitions_total{to="open"}"#).await;
    publisher.await.unwrap();

    let mut events = world.client.take(EVENTS, trips.len(), Duration::from_secs(25)).await;
    let done = events.iter().map(|e| e.at).max().unwrap();
    events.extend(world.client.take(EVENTS, usize::MAX, Duration::from_millis(500)).await);
    let calls_while_down = world
        .stripe
        .seen()
        .iter()
        .filter(|s| s.at > down + Duration::from_secs(1) && s.at < up)
        .count();
    println!(
        "outage: {} trips, circuit opened {opened} times, {calls_while_down} Stripe calls in \
         the 29 s down, all done {:.1} s after Stripe's return",
        trips.len(),
        done.saturating_duration_since(up).as_secs_f64()
    );
    assert!(opened >= 1.0, "the circuit opened");
    assert_eq!(distinct_trips(&events).len(), trips.len(), "every payment completed");
    assert!(done < up + Duration::from_secs(20), "all done within 20 s of Stripe's return");
    assert_one_session_per_trip(&world, &trips, &events);
    assert_eq!(world.client.depth(PARKED).await, 0, "nothing parked");
    assert!(
        calls_while_down <= 2 * 29,
        "{calls_while_down} calls to a Stripe that was down: at most 2 a second"
    );
    assert!(
        metric_sum(worker.http, "payment_worker_commands_total", r#"outcome="deferred""#).await
            > 0.0,
        "deliveries were deferred, not retried"
    );
    assert_eq!(
        metric(worker.http, r#"payment_worker_stripe_circuit_state{state="closed"}"#).await,
        1.0,
        "closed again"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_payments_against_a_25_per_second_limit_park_nothing() {
    let world = World::new("rate-limit").await;
    world.stripe.set_rate_limit(Some(25));
    let trips: Vec<String> = (0..600).map(|i| format!("burst-{i:03}")).collect();
    // The topology exists before the burst: a first worker declares it, then stops.
    world.start_worker(&[]).await.stop().await.unwrap();
    for trip in &trips {
        world.client.send_command(&command(trip, "u", 1500.0, "USD")).await;
    }
    let started = Instant::now();
    let first = world.start_worker(&["--prefetch", "32"]).await;
    let second = world.start_worker(&["--prefetch", "32"]).await;

    let events = world.client.take(EVENTS, trips.len(), Duration::from_secs(60)).await;
    let elapsed = events.iter().map(|e| e.at).max().unwrap() - started;
    let seen = world.stripe.seen();
    let limited = seen.iter().filter(|s| s.status == 429).count();
    let share = limited as f64 / seen.len() as f64;
    println!(
        "rate limit: {} payments in {:.1} s ({:.1}/s against 25/s), {limited} of {} calls \
         answered 429 ({:.1}%)",
        events.len(),
        elapsed.as_secs_f64(),
        events.len() as f64 / elapsed.as_secs_f64(),
        seen.len(),
        share * 100.0
    );
    assert_eq!(distinct_trips(&events).len(), trips.len(), "every payment completed");
    assert_eq!(world.client.depth(PARKED).await, 0, "nothing parked");
    assert!(elapsed.as_secs_f64() <= 1.4 * 600.0 / 25.0, "done within 1.4 x 600/25 s");
    assert!(share < 0.3, "429s are under 30% of calls");
    assert_one_session_per_trip(&world, &trips, &events);
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}

#[tokio::test]
async fn failures_of_single_payments_never_open_the_circuit() {
    let world = World::new("per-payment").await;
    let trips: Vec<String> = (0..50).map(|i| format!("single-{i:02}")).collect();
    // One trip in five fails its first call with a 503; one fails every call.
    for trip in trips.iter().step_by(5) {
        world.stripe.script(trip, [Behaviour::unavailable()]);
    }
    world.stripe.script("always-failing", std::iter::repeat_n(Behaviour::unavailable(), 20));
    let worker = world.start_worker(&[]).await;
    for trip in trips.iter().chain(["always-failing".to_owned()].iter()) {
        world.client.send_command(&command(trip, "u", 1500.0, "USD")).await;
    }

    let events = world.client.take(EVENTS, trips.len(), Duration::from_secs(20)).await;
    assert_eq!(distinct_trips(&events).len(), trips.len());
    assert_one_session_per_trip(&world, &trips, &events);
    let parked = world.client.take(PARKED, 1, Duration::from_secs(15)).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(trip_of(&parked[0]), "always-failing");
    assert_eq!(
        parked[0].header_string("payment-park-reason").as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(parked[0].header_int("payment-attempt"), Some(4), "four attempts, as ever");
    assert_eq!(world.stripe.seen_for("always-failing").len(), 4);
    assert_eq!(
        metric(worker.http, r#"payment_worker_stripe_circuit_transitions_total{to="open"}"#).await,
        0.0,
        "the circuit never opened"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_replica_killed_while_its_circuit_is_open_loses_nothing() {
    let world = World::new("open-kill").await;
    world.stripe.set_outage(Some(Outage::Unavailable));
    let mut first = spawn_binary(&world, &[]).await;
    let http = first.http;
    let trips: Vec<String> = (0..10).map(|i| format!("held-{i}")).collect();
    for trip in &trips {
        world.client.send_command(&command(trip, "u", 1500.0, "USD")).await;
    }
    let open = r#"payment_worker_stripe_circuit_state{state="open"}"#;
    let opened = testkit::eventually(Duration::from_secs(10), || async {
        (metric(http, open).await == 1.0).then_some(())
    })
    .await;
    assert!(opened.is_some(), "the circuit opened");
    assert_eq!(
        testkit::http_get(http, "/readyz").await.map(|(status, _)| status),
        Some(200),
        "ready while the circuit is open: Stripe is down, not the pod"
    );
    first.child.start_kill().expect("SIGKILL");
    first.child.wait().await.expect("reaped");

    // The replacement starts closed, and opens on its own first failures.
    let mut second = spawn_binary(&world, &[]).await;
    let http = second.http;
    let transitions = r#"payment_worker_stripe_circuit_transitions_total{to="open"}"#;
    let reopened = testkit::eventually(Duration::from_secs(10), || async {
        (metric(http, transitions).await == 1.0).then_some(())
    })
    .await;
    assert!(reopened.is_some(), "the replacement opened its circuit once, from closed");
    world.stripe.set_outage(None);

    // A payment whose event was confirmed as the first replica died is redelivered and gets
    // its event again (the same message id): count trips, not events.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    let mut done = BTreeSet::new();
    while done.len() < trips.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        events.extend(world.client.take(EVENTS, trips.len() - done.len(), left).await);
        done = distinct_trips(&events);
    }
    let missing: Vec<&String> = trips.iter().filter(|t| !done.contains(*t)).collect();
    let calls: Vec<usize> = missing.iter().map(|t| world.stripe.seen_for(t).len()).collect();
    assert!(
        missing.is_empty(),
        "nothing lost; missing {missing:?} after {calls:?} Stripe calls, {} parked",
        world.client.depth(PARKED).await
    );
    assert_one_session_per_trip(&world, &trips, &events);
    assert_eq!(world.client.depth(PARKED).await, 0, "nothing parked");
    second.child.start_kill().unwrap();
    second.child.wait().await.unwrap();
}

/// `Retry-After` is about the rate, not one payment: a 400 that carries one holds nobody, and
/// one payment answered 429 with `Retry-After` again and again holds the others once at
/// most, not for every one of its calls.
#[tokio::test]
async fn one_payments_retry_after_does_not_hold_the_others() {
    let world = World::new("retry-after").await;
    let worker = world.start_worker(&[]).await;
    world.stripe.script("ra-400", [Behaviour::RetryAfter { status: 400, seconds: 60 }]);
    world.client.send_command(&command("ra-400", "u", 100.0, "USD")).await;
    let parked = world.client.take(PARKED, 1, Duration::from_secs(10)).await;
    assert_eq!(parked.len(), 1, "the 400 is parked as any 400");
    let started = Instant::now();
    for i in 0..10 {
        world.client.send_command(&command(&format!("ra-a-{i}"), "u", 100.0, "USD")).await;
    }
    let events = world.client.take(EVENTS, 10, Duration::from_secs(20)).await;
    assert_eq!(events.len(), 10);
    assert!(started.elapsed() < Duration::from_secs(10), "a 400's Retry-After held the others");

    // One payment 429'd with Retry-After on every call: the first hold is taken (as
    // Stripe asked), its later ones are not.
    world
        .stripe
        .script("ra-429", (0..200).map(|_| Behaviour::RetryAfter { status: 429, seconds: 2 }));
    world.client.send_command(&command("ra-429", "u", 100.0, "USD")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    for i in 0..10 {
        world.client.send_command(&command(&format!("ra-b-{i}"), "u", 100.0, "USD")).await;
    }
    let events = world.client.take(EVENTS, 10, Duration::from_secs(20)).await;
    assert_eq!(events.len(), 10);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "one payment's repeated Retry-After held the others: {:?}",
        started.elapsed()
    );
    assert!(world.stripe.seen_for("ra-429").len() >= 2, "it kept being tried");
    worker.stop().await.unwrap();
}

/// Deferrals spend no attempt, so only time bounds them: a payment Stripe keeps answering 429
/// is parked `stripe_unavailable` once it has waited longer than `STRIPE_WAIT_BUDGET` since it
/// first arrived, with the time it waited in a header; the others complete.
#[tokio::test]
async fn a_payment_deferred_past_the_wait_budget_is_parked() {
    let world = World::new("wait-budget").await;
    let worker = world.start_worker(&["--stripe-wait-budget", "2s"]).await;
    world.stripe.script("always-429", (0..500).map(|_| Behaviour::rate_limited()));
    world.client.send_command(&command("always-429", "u", 100.0, "USD")).await;
    for i in 0..5 {
        world.client.send_command(&command(&format!("wb-{i}"), "u", 100.0, "USD")).await;
    }
    let parked = world.client.take(PARKED, 1, Duration::from_secs(20)).await;
    assert_eq!(parked.len(), 1, "parked once past the budget");
    assert_eq!(trip_of(&parked[0]), "always-429");
    assert_eq!(
        parked[0].header_string("payment-park-reason").as_deref(),
        Some("stripe_unavailable")
    );
    let waited = parked[0].header_int("payment-waited-ms").unwrap_or(0);
    assert!((2_000..20_000).contains(&waited), "waited {waited} ms");
    assert_eq!(parked[0].header_int("payment-attempt"), Some(1), "still its first attempt");
    assert_eq!(world.client.take(EVENTS, 5, Duration::from_secs(20)).await.len(), 5);
    worker.stop().await.unwrap();
}
