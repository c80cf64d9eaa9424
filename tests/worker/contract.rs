//! The happy path, byte for byte against the trip system's contract.

use std::time::Duration;

use testkit::amqp::{command, inner};

use testkit::world::{EVENTS, World};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn a_command_becomes_a_session_and_a_contract_exact_event() {
    let world = World::new("happy").await;
    let worker = world.start_worker(&[]).await;

    let body = command("trip-1", "user-42", 4523.78, "USD");
    world
        .client
        .publish(
            "trip",
            "payment.cmd.create_session",
            &body,
            &[("traceparent", TRACEPARENT), ("tracestate", "vendor=1")],
        )
        .await;
    let events = world.client.take(EVENTS, 1, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 1, "no session_created event");
    let event = &events[0];

    // Stripe saw exactly one well-formed Checkout Session request.
    let created = world.stripe.created_for("trip-1");
    assert_eq!(created.len(), 1);
    let params = &created[0].params;
    for (key, value) in [
        ("mode", "payment"),
        ("line_items[0][price_data][currency]", "usd"),
        ("line_items[0][price_data][unit_amount]", "4524"),
        ("line_items[0][price_data][product_data][name]", "Ride Payment"),
        ("line_items[0][quantity]", "1"),
        ("metadata[trip_id]", "trip-1"),
        ("metadata[user_id]", "user-42"),
        ("metadata[driver_id]", "driver-of-trip-1"),
        ("metadata[package_slug]", "sedan"),
        ("success_url", "http://localhost:3000?payment=success"),
        ("cancel_url", "http://localhost:3000?payment=cancel"),
    ] {
        assert_eq!(params.get(key).map(String::as_str), Some(value), "{key}");
    }
    let seen = world.stripe.seen_for("trip-1");
    assert_eq!(seen[0].idempotency_key.as_deref(), Some("payment-worker:checkout-session:trip-1"));
    assert!(seen[0].stripe_version.is_some(), "Stripe-Version is pinned");

    // The event, byte for byte.
    let text = String::from_utf8(event.body.clone()).unwrap();
    assert!(text.starts_with(r#"{"ownerId":"user-42","data":""#), "{text}");
    let data = serde_json::to_string(&inner(&event.body)).unwrap();
    assert_eq!(
        data,
        format!(
            r#"{{"tripID":"trip-1","sessionID":"{}","amount":45.24,"currency":"USD"}}"#,
            created[0].id
        )
    );
    let props = &event.properties;
    assert_eq!(props.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some("payment.event.session_created:trip-1")
    );
    assert_eq!(event.exchange, "trip");
    assert_eq!(event.routing_key, "payment.event.session_created");
    let traceparent = event.header_string("traceparent").expect("trace continued");
    assert!(traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{traceparent}");
    assert_ne!(traceparent, TRACEPARENT, "a new span id");
    assert_eq!(event.header_string("tracestate").as_deref(), Some("vendor=1"));

    assert_eq!(world.client.depth(testkit::world::WORK).await, 0);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn major_units_follow_the_currency_exponent() {
    let world = World::new("currencies").await;
    let worker = world.start_worker(&[]).await;
    for (trip, amount, currency) in
        [("t-jpy", 1500.0, "JPY"), ("t-kwd", 1500.0, "KWD"), ("t-usd", 4500.0, "usd")]
    {
        world.client.send_command(&command(trip, "u", amount, currency)).await;
    }
    let events = world.client.take(EVENTS, 3, Duration::from_secs(10)).await;
    let mut amounts: Vec<String> = events
        .iter()
        .map(|e| {
            let v = inner(&e.body);
            format!(
                "{} {} {}",
                v["tripID"].as_str().unwrap(),
                v["amount"],
                v["currency"].as_str().unwrap()
            )
        })
        .collect();
    amounts.sort();
    assert_eq!(amounts, ["t-jpy 1500 JPY", "t-kwd 1.5 KWD", "t-usd 45 usd"]);
    let jpy = world.stripe.created_for("t-jpy");
    assert_eq!(jpy[0].params["line_items[0][price_data][unit_amount]"], "1500");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_redelivered_command_gets_the_same_session_back() {
    let world = World::new("redelivery").await;
    let worker = world.start_worker(&[]).await;
    let body = command("trip-twice", "u", 999.0, "USD");
    world.client.send_command(&body).await;
    world.client.send_command(&body).await;
    let events = world.client.take(EVENTS, 2, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 2);
    assert_eq!(inner(&events[0].body)["sessionID"], inner(&events[1].body)["sessionID"]);
    assert_eq!(world.stripe.created_for("trip-twice").len(), 1, "one Stripe session per trip");
    assert!(world.stripe.seen_for("trip-twice").iter().any(|s| s.replayed));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn mock_mode_makes_deterministic_sessions_without_stripe() {
    let world = World::new("mock").await;
    let worker = world.spawn_with(world.mock_args(&[])).await;
    testkit::world::wait_ready(worker.http).await;

    world.client.send_command(&command("trip-mock", "u", 100.0, "USD")).await;
    let events = world.client.take(EVENTS, 1, Duration::from_secs(10)).await;
    assert_eq!(inner(&events[0].body)["sessionID"], "cs_test_mock_session_trip-mock");
    assert!(world.stripe.seen().is_empty());
    worker.stop().await.unwrap();
}
