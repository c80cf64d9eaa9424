//! Transient failures retried through the broker's wait queues; permanent ones parked.

use std::time::{Duration, Instant};

use testkit::amqp::{Received, command, inner};
use testkit::stripe::Behaviour;

use testkit::world::{EVENTS, PARKED, World};

fn trip_of(message: &Received) -> String {
    inner(&message.body)["tripID"].as_str().unwrap().to_owned()
}

fn assert_between(elapsed: Duration, low: f64, high: f64, what: &str) {
    let secs = elapsed.as_secs_f64();
    assert!(secs >= low && secs <= high, "{what}: took {secs:.2}s, expected {low}..{high}s");
}

#[tokio::test]
async fn one_two_and_three_transient_failures_succeed_after_their_delays() {
    let world = World::new("transient").await;
    // Stripe-wide failures (503, dropped connections, 502) of a few payments while the
    // others get answers: each is that payment's failure and spends an attempt. (Failures
    // across most payments are Stripe's: see flow.rs and sickness.rs.)
    world.stripe.script("fail-1", [Behaviour::unavailable()]);
    world.stripe.script("fail-2", [Behaviour::Drop, Behaviour::unavailable()]);
    world.stripe.script(
        "fail-3",
        [
            Behaviour::Drop,
            Behaviour::Fail { status: 502, kind: "api_error", saved: false, should_retry: None },
            Behaviour::unavailable(),
        ],
    );
    let worker = world.start_worker(&[]).await;

    let start = Instant::now();
    let healthy: Vec<String> = (0..20).map(|i| format!("healthy-{i}")).collect();
    for trip in ["fail-1", "fail-2", "fail-3"].into_iter().chain(healthy.iter().map(String::as_str))
    {
        world.client.send_command(&command(trip, "u", 2500.0, "EUR")).await;
    }
    let events = world.client.take(EVENTS, 23, Duration::from_secs(20)).await;
    for t in ["fail-1", "fail-2", "fail-3", "healthy-0", "healthy-19"] {
        eprintln!(
            "DBG {t}: {:?}",
            world.stripe.seen_for(t).iter().map(|s| (s.at - start, s.status)).collect::<Vec<_>>()
        );
    }
    assert_eq!(events.len(), 23, "every trip eventually succeeds");
    for event in &events {
        let elapsed = event.at - start;
        match trip_of(event).as_str() {
            "fail-1" => assert_between(elapsed, 0.9, 3.0, "1 failure (1s)"),
            "fail-2" => assert_between(elapsed, 2.9, 5.5, "2 failures (1s + 2s)"),
            "fail-3" => assert_between(elapsed, 6.9, 10.0, "3 failures (1s + 2s + 4s)"),
            trip => assert!(trip.starts_with("healthy-"), "unexpected trip {trip}"),
        }
    }
    for (trip, failures) in [("fail-1", 1), ("fail-2", 2), ("fail-3", 3)] {
        assert_eq!(world.stripe.created_for(trip).len(), 1, "{trip}: one session");
        let seen = world.stripe.seen_for(trip);
        assert_eq!(seen.len(), failures + 1, "{trip}: one request per attempt");
        let keys: Vec<_> = seen.iter().map(|s| s.idempotency_key.clone().unwrap()).collect();
        assert!(keys.iter().all(|k| k == &keys[0]), "{trip}: the same key every time");
    }
    for wait in testkit::names::WAIT_QUEUES.into_iter().chain([PARKED]) {
        assert_eq!(world.client.depth(wait).await, 0, "{wait} is empty");
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_fourth_failure_parks_the_original_body() {
    let world = World::new("exhausted").await;
    world.stripe.script("doomed", std::iter::repeat_n(Behaviour::unavailable(), 4));
    let worker = world.start_worker(&[]).await;
    let body = command("doomed", "u", 100.0, "USD");
    let start = Instant::now();
    world
        .client
        .publish(
            "trip",
            "payment.cmd.create_session",
            &body,
            &[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
        )
        .await;

    let parked = world.client.take(PARKED, 1, Duration::from_secs(15)).await;
    assert_eq!(parked.len(), 1);
    let parked = &parked[0];
    assert_between(parked.at - start, 6.9, 11.0, "parked after 1s + 2s + 4s");
    assert_eq!(parked.body, body, "the original body, byte for byte");
    assert_eq!(parked.header_string("payment-park-reason").as_deref(), Some("retries_exhausted"));
    assert_eq!(parked.header_int("payment-attempt"), Some(4));
    assert_eq!(parked.header_string("payment-original-exchange").as_deref(), Some("trip"));
    assert_eq!(
        parked.header_string("payment-original-routing-key").as_deref(),
        Some("payment.cmd.create_session")
    );
    assert!(parked.header_string("payment-last-error").unwrap().contains("503"));
    assert!(parked.header_int("payment-first-failure-at").is_some());
    assert!(parked.header_int("payment-parked-at").is_some());
    assert!(parked.header_string("traceparent").is_some(), "original headers are kept");
    assert!(
        parked
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .all(|k| !k.as_str().starts_with("x-")),
        "x-death is stripped"
    );
    assert_eq!(world.stripe.seen_for("doomed").len(), 4, "4 attempts in all");
    assert!(world.client.take(EVENTS, 1, Duration::from_millis(300)).await.is_empty());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_short_retry_is_not_held_up_by_a_long_one() {
    let world = World::new("head-of-line").await;
    world.stripe.script("slow-lane", std::iter::repeat_n(Behaviour::unavailable(), 3));
    // Right after slow-lane's 503s, another payment's 503: two sick payments, not an outage.
    world.stripe.script("fast-lane", [Behaviour::unavailable()]);
    let worker = world.start_worker(&[]).await;
    let healthy: Vec<String> = (0..10).map(|i| format!("healthy-{i}")).collect();
    for trip in &healthy {
        world.client.send_command(&command(trip, "u", 100.0, "USD")).await;
    }
    assert_eq!(world.client.take(EVENTS, 10, Duration::from_secs(10)).await.len(), 10);

    world.client.send_command(&command("slow-lane", "u", 100.0, "USD")).await;
    // Wait until slow-lane sits in the 4 s wait queue, then send the other trip.
    let in_4s = testkit::eventually(Duration::from_secs(10), || async {
        (world.client.depth("payment_wait_4s").await == 1).then_some(())
    })
    .await;
    assert!(in_4s.is_some(), "slow-lane never reached the 4s wait queue");
    let sent = Instant::now();
    world.client.send_command(&command("fast-lane", "u", 100.0, "USD")).await;

    let first = world.client.take(EVENTS, 1, Duration::from_secs(10)).await;
    assert_eq!(trip_of(&first[0]), "fast-lane", "the 1s retry overtook the 4s one");
    assert_between(first[0].at - sent, 0.9, 2.9, "1s retry while a 4s retry waits");
    let second = world.client.take(EVENTS, 1, Duration::from_secs(10)).await;
    assert_eq!(trip_of(&second[0]), "slow-lane");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_lost_answer_is_retried_into_the_same_session() {
    let world = World::new("lost-answer").await;
    // Stripe creates the session but answers after the worker's timeout.
    world.stripe.script("late", [Behaviour::Slow(Duration::from_secs(3))]);
    let worker = world.start_worker(&["--stripe-timeout", "500ms"]).await;
    world.client.send_command(&command("late", "u", 100.0, "USD")).await;

    let events = world.client.take(EVENTS, 1, Duration::from_secs(15)).await;
    assert_eq!(events.len(), 1);
    let created = world.stripe.created_for("late");
    assert_eq!(created.len(), 1, "no second session");
    assert_eq!(inner(&events[0].body)["sessionID"], created[0].id.as_str());
    let seen = world.stripe.seen_for("late");
    assert!(seen.iter().any(|s| s.replayed), "the retry got the saved answer back");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn permanent_stripe_failures_park_at_once() {
    let world = World::new("permanent").await;
    world.stripe.script("refused", [Behaviour::invalid_request()]);
    world.stripe.script("poisoned", [Behaviour::saved_server_error()]);
    let worker = world.start_worker(&[]).await;
    world.client.send_command(&command("refused", "u", 100.0, "USD")).await;
    world.client.send_command(&command("poisoned", "u", 100.0, "USD")).await;

    let parked = world.client.take(PARKED, 2, Duration::from_secs(5)).await;
    assert_eq!(parked.len(), 2, "parked without waiting for retries");
    for message in &parked {
        assert_eq!(
            message.header_string("payment-park-reason").as_deref(),
            Some("stripe_rejected")
        );
        assert_eq!(message.header_int("payment-attempt"), Some(1));
    }
    assert_eq!(world.stripe.seen_for("refused").len(), 1);
    assert_eq!(
        world.stripe.seen_for("poisoned").len(),
        1,
        "Stripe-Should-Retry: false is honoured"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_same_trip_with_another_amount_never_gets_a_second_session() {
    let world = World::new("conflict").await;
    let worker = world.start_worker(&[]).await;
    world.client.send_command(&command("trip-x", "u", 1000.0, "USD")).await;
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(10)).await.len(), 1);
    world.client.send_command(&command("trip-x", "u", 2000.0, "USD")).await;

    let parked = world.client.take(PARKED, 1, Duration::from_secs(5)).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        parked[0].header_string("payment-park-reason").as_deref(),
        Some("idempotency_conflict")
    );
    assert_eq!(world.stripe.created_for("trip-x").len(), 1);
    worker.stop().await.unwrap();
}

/// A 500 Stripe saved under the trip's key (no `Stripe-Should-Retry`) is replayed, marked
/// `Idempotent-Replayed: true`, to every retry: the replay is an answer, so the payment is
/// parked with a reason of its own after at most two calls, and healthy payments around it
/// are not held up (the replays never count as Stripe failing).
#[tokio::test]
async fn a_replayed_server_error_is_parked_at_once() {
    let world = World::new("replayed-500").await;
    let worker = world.start_worker(&[]).await;
    let saved = Behaviour::Fail { status: 500, kind: "api_error", saved: true, should_retry: None };
    world.stripe.script("replayed", [saved]);
    world.client.send_command(&command("replayed", "u", 100.0, "USD")).await;
    for i in 0..20 {
        world.client.send_command(&command(&format!("healthy-{i}"), "u", 100.0, "USD")).await;
    }
    let parked = world.client.take(PARKED, 1, Duration::from_secs(15)).await;
    assert_eq!(parked.len(), 1, "the replayed 500 is parked");
    assert_eq!(trip_of(&parked[0]), "replayed");
    assert_eq!(
        parked[0].header_string("payment-park-reason").as_deref(),
        Some("stripe_replayed_error")
    );
    let calls = world.stripe.seen_for("replayed").len();
    assert!((1..=2).contains(&calls), "{calls} calls");
    assert_eq!(world.client.take(EVENTS, 20, Duration::from_secs(15)).await.len(), 20);
    worker.stop().await.unwrap();
}

/// A rolling upgrade with payments mid-retry: the previous version created their sessions
/// (saved by Stripe under each trip's key with the previous parameters, without the trip's
/// metadata on the PaymentIntent) and lost the answers. This version's request differs, Stripe
/// answers `idempotency_error`, and the worker asks once more with the previous parameters:
/// the same session, nothing parked, nothing doubled. A real conflict (another amount) is
/// still parked.
#[tokio::test]
async fn an_upgrade_mid_retry_gets_the_sessions_the_previous_version_created() {
    use payment_worker::contract::CreateSession;
    use payment_worker::stripe::{CheckoutUrls, ParamSet, checkout_form, idempotency_key};

    let world = World::new("upgrade").await;
    let urls = CheckoutUrls {
        success: "http://localhost:3000?payment=success".into(),
        cancel: "http://localhost:3000?payment=cancel".into(),
    };
    let stand_in: std::net::SocketAddr = world
        .stripe
        .base_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let trips: Vec<String> = (0..5).map(|i| format!("upgrade-{i}")).collect();
    let previous_version = |trip: &str, amount: f64| {
        let body = command(trip, "u", amount, "USD");
        let cmd = CreateSession::decode(&body).unwrap();
        (checkout_form(&cmd, &urls, ParamSet::Previous), idempotency_key(trip))
    };
    for trip in trips.iter().map(String::as_str).chain(["upgrade-other-amount"]) {
        let (form, key) = previous_version(trip, 25.0);
        let authorization = format!("Bearer {}", testkit::stripe::SECRET_KEY);
        let headers = [
            ("Authorization", authorization.as_str()),
            ("Idempotency-Key", key.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ];
        let answer = testkit::http_request(
            stand_in,
            "POST",
            "/v1/checkout/sessions",
            &headers,
            form.as_bytes(),
        )
        .await;
        assert_eq!(
            answer.map(|(status, _)| status),
            Some(200),
            "{trip}: created by the old version"
        );
    }
    let created_before: Vec<String> =
        trips.iter().map(|t| world.stripe.created_for(t)[0].id.clone()).collect();

    let worker = world.start_worker(&[]).await;
    for trip in &trips {
        world.client.send_command(&command(trip, "u", 25.0, "USD")).await;
    }
    world.client.send_command(&command("upgrade-other-amount", "u", 30.0, "USD")).await;
    let events = world.client.take(EVENTS, trips.len(), Duration::from_secs(15)).await;
    assert_eq!(events.len(), trips.len());
    for (trip, session) in trips.iter().zip(&created_before) {
        let event = events.iter().find(|e| &trip_of(e) == trip).expect("its event");
        assert_eq!(inner(&event.body)["sessionID"], session.as_str(), "{trip}: the old session");
        assert_eq!(world.stripe.created_for(trip).len(), 1, "{trip}: one session");
        assert_eq!(world.stripe.seen_for(trip).len(), 3, "{trip}: old, new, previous again");
    }
    let parked = world.client.take(PARKED, 1, Duration::from_secs(10)).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(trip_of(&parked[0]), "upgrade-other-amount");
    assert_eq!(
        parked[0].header_string("payment-park-reason").as_deref(),
        Some("idempotency_conflict")
    );
    assert!(world.client.take(PARKED, 1, Duration::from_millis(300)).await.is_empty());

    // New payments carry the trip on the PaymentIntent.
    world.client.send_command(&command("upgrade-new", "u", 25.0, "USD")).await;
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(10)).await.len(), 1);
    let params = &world.stripe.created_for("upgrade-new")[0].params;
    for key in ["trip_id", "user_id"] {
        let field = format!("payment_intent_data[metadata][{key}]");
        assert!(params.contains_key(&field), "{field} in {params:?}");
    }
    worker.stop().await.unwrap();
}
