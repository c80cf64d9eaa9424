//! Nothing a publisher sends is trusted: forged retry headers neither change a command's
//! attempt count nor grow the metrics' label sets.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use testkit::amqp::{command, inner};
use testkit::stripe::Behaviour;

use testkit::world::{EVENTS, PARKED, WORK, World};

fn forged(attempt: i64, published_at: i64, via_default_exchange: bool) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert("payment-attempt".into(), AMQPValue::LongLongInt(attempt));
    headers.insert("payment-retry-tier".into(), AMQPValue::LongString(LongString::from("1s")));
    headers.insert("payment-retry-published-at".into(), AMQPValue::LongLongInt(published_at));
    if via_default_exchange {
        for (key, value) in [
            ("payment-original-exchange", "trip"),
            ("payment-original-routing-key", "payment.cmd.create_session"),
        ] {
            headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
        }
    }
    headers
}

#[tokio::test]
async fn forged_retry_headers_start_at_attempt_one_and_bound_the_labels() {
    let world = World::new("forged").await;
    let worker = world.start_worker(&[]).await;
    // Thirty commands from the trip exchange, each claiming another attempt and a retry
    // published in 1970 or far in the future.
    for i in 0..30 {
        let body = command(&format!("f-{i}"), "u", 100.0, "USD");
        let at = if i % 2 == 0 { 1 } else { i64::MAX / 2 };
        let headers = forged(i + 2, at, false);
        world.client.publish_headers("trip", "payment.cmd.create_session", &body, headers).await;
    }
    // One that fails for good, claiming to be past the schedule.
    world.stripe.script("f-doomed", [Behaviour::invalid_request()]);
    let body = command("f-doomed", "u", 100.0, "USD");
    let headers = forged(3, 1, false);
    world.client.publish_headers("trip", "payment.cmd.create_session", &body, headers).await;
    // And one through the default exchange (the way retries come back), claiming attempt 99.
    let body = command("f-deep", "u", 100.0, "USD");
    world.client.publish_headers("", WORK, &body, forged(98, 1, true)).await;

    assert_eq!(world.client.take(EVENTS, 31, Duration::from_secs(20)).await.len(), 31);
    let parked = world.client.take(PARKED, 1, Duration::from_secs(5)).await;
    assert_eq!(parked[0].header_int("payment-attempt"), Some(1), "the forged count is ignored");

    let (_, scrape) = testkit::http_get(worker.http, "/metrics").await.unwrap();
    let attempts: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("payment_worker_commands_total{"))
        .filter_map(|l| l.split("attempt=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(attempts, ["1", "5+"].into_iter().collect(), "{scrape}");
    assert!(
        scrape.contains(r#"payment_worker_retry_delay_seconds_count{tier="1s"} 0"#)
            || !scrape.contains("payment_worker_retry_delay_seconds_count"),
        "nonsense publish times are not observed:\n{scrape}"
    );
    worker.stop().await.unwrap();
}

/// Headers of about `bytes` in all: 4 KiB values and one for the rest.
fn bulky_headers(bytes: usize) -> FieldTable {
    let mut headers = FieldTable::default();
    for i in 0..=bytes / 4096 {
        let len = if i < bytes / 4096 { 4096 } else { bytes % 4096 };
        headers.insert(format!("x-bulk-{i}").into(), AMQPValue::LongString("b".repeat(len).into()));
    }
    headers.insert("traceparent".into(), AMQPValue::LongString(TRACEPARENT.into()));
    headers
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A command with headers close to the broker's frame size fails its first attempt: its retry
/// copy cannot carry them all, so it carries what fits and says what it dropped, and the
/// commands behind it are not held up.
#[tokio::test]
async fn oversized_headers_neither_block_the_queue_nor_lose_the_command() {
    let world = World::new("bulky").await;
    let worker = world.start_worker(&["--prefetch", "1"]).await;
    world.stripe.script("bulky", [Behaviour::unavailable()]);
    world.stripe.script("bulky-doomed", [Behaviour::invalid_request()]);
    for trip in ["bulky", "bulky-doomed"] {
        let body = command(trip, "u", 100.0, "USD");
        world
            .client
            .publish_headers("trip", "payment.cmd.create_session", &body, bulky_headers(130_200))
            .await;
    }
    // Trace context far beyond the W3C bounds is not passed on to the event.
    let mut baggage = FieldTable::default();
    baggage.insert("traceparent".into(), AMQPValue::LongString(TRACEPARENT.into()));
    baggage.insert("baggage".into(), AMQPValue::LongString("k=v,".repeat(32_000).into()));
    let body = command("bulky-baggage", "u", 100.0, "USD");
    world.client.publish_headers("trip", "payment.cmd.create_session", &body, baggage).await;
    for i in 0..20 {
        world.client.send_command(&command(&format!("behind-{i}"), "u", 100.0, "USD")).await;
    }

    let events = world.client.take(EVENTS, 22, Duration::from_secs(30)).await;
    assert_eq!(events.len(), 22, "the 20 behind, the bulky one after its retry, the baggage");
    let traced = events.iter().find(|e| inner(&e.body)["tripID"] == "bulky-baggage");
    let traced = traced.expect("the event of the command with the baggage");
    assert_eq!(traced.header_string("baggage"), None);
    assert!(traced.header_string("traceparent").is_some());
    let parked = world.client.take(PARKED, 1, Duration::from_secs(5)).await;
    assert_eq!(parked.len(), 1, "the doomed one is parked, not lost");
    let dropped = parked[0].header_string("payment-dropped-headers").expect("the fact recorded");
    assert!(dropped.contains("x-bulk-"), "{dropped}");
    assert_eq!(parked[0].header_string("traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(parked[0].header_string("payment-park-reason").as_deref(), Some("stripe_rejected"));
    assert_eq!(world.stripe.created_for("bulky").len(), 1);
    worker.stop().await.unwrap();
}

/// trip-service may set `user_id` (the broker checks it against its login). A copy the worker
/// publishes under its own login must not carry it, or the broker closes the channel on every
/// retry and the command comes back forever.
#[tokio::test]
async fn a_command_with_the_publishers_user_id_is_retried_and_parked_like_any_other() {
    let world = World::new("user-id").await;
    let trip_service = testkit::vhost::User::new(&world.vhost, "trip-service");
    let publisher = testkit::amqp::Client::connect(&trip_service.uri()).await;
    let worker = world.start_worker(&[]).await;
    world.stripe.script("uid-retried", [Behaviour::unavailable()]);
    world.stripe.script("uid-parked", [Behaviour::invalid_request()]);
    for trip in ["uid-retried", "uid-parked"] {
        let properties = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_user_id(trip_service.name().into());
        publisher
            .publish_properties(
                "trip",
                "payment.cmd.create_session",
                &command(trip, "u", 100.0, "USD"),
                properties,
            )
            .await;
    }
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(15)).await.len(), 1);
    let parked = world.client.take(PARKED, 1, Duration::from_secs(5)).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        parked[0].header_string("payment-original-user-id").as_deref(),
        Some(trip_service.name())
    );
    let (_, scrape) = testkit::http_get(worker.http, "/metrics").await.unwrap();
    assert!(scrape.contains("payment_worker_broker_reconnects_total 0"), "{scrape}");
    drop(publisher);
    worker.stop().await.unwrap();
}

/// A 200 from "Stripe" whose session id is empty, binary or not a session's is a broken
/// answer: parked `stripe_bad_response` after that one call, never sent to the rider.
#[tokio::test]
async fn a_session_id_that_is_not_one_is_parked_not_published() {
    let world = World::new("bad-session-id").await;
    let worker = world.start_worker(&[]).await;
    let broken = [("s-empty", ""), ("s-control", "cs_test_\u{7}\n"), ("s-other", "pi_3Abc")];
    for (trip, id) in broken {
        world.stripe.script(trip, [Behaviour::Answer(id)]);
        world.client.send_command(&command(trip, "u", 100.0, "USD")).await;
    }
    world.client.send_command(&command("s-fine", "u", 100.0, "USD")).await;
    let parked = world.client.take(PARKED, 3, Duration::from_secs(10)).await;
    assert_eq!(parked.len(), 3);
    for message in &parked {
        let trip = inner(&message.body)["tripID"].as_str().unwrap().to_owned();
        assert_eq!(
            message.header_string("payment-park-reason").as_deref(),
            Some("stripe_bad_response"),
            "{trip}"
        );
        assert_eq!(world.stripe.seen_for(&trip).len(), 1, "{trip}: one call, no retry");
    }
    let events = world.client.take(EVENTS, 2, Duration::from_secs(3)).await;
    assert_eq!(events.len(), 1, "only the good session is published");
    assert_eq!(inner(&events[0].body)["tripID"], "s-fine");
    worker.stop().await.unwrap();
}

/// A publisher's `payment-attempt` does not survive a deferral: the deferred copy carries the
/// worker's own count, so the command still gets its whole schedule.
#[tokio::test]
async fn a_deferral_writes_the_workers_own_attempt_count() {
    let world = World::new("forged-deferral").await;
    let worker = world.start_worker(&[]).await;
    let trip = "fd-1";
    let conflict = Behaviour::conflict;
    world.stripe.script(
        trip,
        [Behaviour::rate_limited(), conflict(), conflict(), conflict(), Behaviour::Succeed],
    );
    let body = command(trip, "u", 100.0, "USD");
    world
        .client
        .publish_headers("trip", "payment.cmd.create_session", &body, forged(3, 1, false))
        .await;
    let events = world.client.take(EVENTS, 1, Duration::from_secs(30)).await;
    let parked = world.client.depth(PARKED).await;
    assert_eq!(events.len(), 1, "the schedule was cut short: {parked} parked");
    assert_eq!(world.stripe.seen_for(trip).len(), 5, "a 429, three 409s, then the session");
    worker.stop().await.unwrap();
}
