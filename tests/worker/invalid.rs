//! Bad input is parked at once with its reason: never retried, never sent to Stripe.

use std::time::Duration;

use testkit::amqp::envelope;

use testkit::world::{EVENTS, PARKED, WORK, World};

#[tokio::test]
async fn invalid_commands_are_parked_at_once_without_calling_stripe() {
    let world = World::new("invalid").await;
    let worker = world.start_worker(&[]).await;
    let payload = |json: &str| envelope("u", json.as_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"{not json".to_vec(), "not a JSON object"),
        ("bad base64", br#"{"ownerId":"u","data":"%%%"}"#.to_vec(), "base64"),
        ("null data", br#"{"ownerId":"u","data":null}"#.to_vec(), "data"),
        ("nested data", br#"{"ownerId":"u","data":{"tripID":"t"}}"#.to_vec(), "data"),
        ("missing trip", payload(r#"{"userID":"u","amount":100,"currency":"USD"}"#), "tripID"),
        ("missing user", payload(r#"{"tripID":"t","amount":100,"currency":"USD"}"#), "userID"),
        (
            "negative",
            payload(r#"{"tripID":"t","userID":"u","amount":-100,"currency":"USD"}"#),
            "amount",
        ),
        (
            "huge",
            payload(r#"{"tripID":"t","userID":"u","amount":1e12,"currency":"USD"}"#),
            "amount",
        ),
        (
            "NaN as text",
            payload(r#"{"tripID":"t","userID":"u","amount":"NaN","currency":"USD"}"#),
            "amount",
        ),
        (
            "bad currency",
            payload(r#"{"tripID":"t","userID":"u","amount":100,"currency":"XXQ"}"#),
            "currency",
        ),
        // Control characters cannot go into the Idempotency-Key header or a log line.
        (
            "newline in trip",
            payload(r#"{"tripID":"t\nforged","userID":"u","amount":100,"currency":"USD"}"#),
            "tripID",
        ),
        (
            "escape in user",
            payload(r#"{"tripID":"t","userID":"u\u001b[31m","amount":100,"currency":"USD"}"#),
            "userID",
        ),
        (
            "NUL in driver",
            payload(
                r#"{"tripID":"t","userID":"u","driverID":"d\u0000","amount":100,"currency":"USD"}"#,
            ),
            "driverID",
        ),
        (
            "DEL in package",
            payload(
                r#"{"tripID":"t","userID":"u","amount":100,"currency":"USD","packageSlug":"s\u007f"}"#,
            ),
            "packageSlug",
        ),
        // Stripe takes metadata values of at most 500 characters.
        (
            "long driver",
            payload(&format!(
                r#"{{"tripID":"t","userID":"u","driverID":"{}","amount":100,"currency":"USD"}}"#,
                "d".repeat(501)
            )),
            "driverID",
        ),
    ];
    for (_, body, _) in &cases {
        world.client.send_command(body).await;
    }
    let parked = world.client.take(PARKED, cases.len(), Duration::from_secs(5)).await;
    assert_eq!(parked.len(), cases.len(), "every invalid command parked within 5s");
    for ((name, body, expect), message) in cases.iter().zip(&parked) {
        assert_eq!(&message.body, body, "{name}: original body kept");
        assert_eq!(
            message.header_string("payment-park-reason").as_deref(),
            Some("invalid_message"),
            "{name}"
        );
        let detail = message.header_string("payment-park-detail").unwrap();
        assert!(detail.contains(expect), "{name}: {detail:?} should mention {expect}");
        assert_eq!(message.header_int("payment-attempt"), Some(1), "{name}: never retried");
    }
    assert!(world.stripe.seen().is_empty(), "zero Stripe calls");
    assert!(world.client.take(EVENTS, 1, Duration::from_millis(200)).await.is_empty());
    assert!(!worker.is_finished(), "the worker survives bad input");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_message_with_an_unexpected_routing_key_is_parked() {
    let world = World::new("routing-key").await;
    let worker = world.start_worker(&[]).await;
    let body = testkit::amqp::command("t", "u", 100.0, "USD");
    // Straight into the work queue through the default exchange.
    world.client.publish("", WORK, &body, &[]).await;
    let parked = world.client.take(PARKED, 1, Duration::from_secs(5)).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        parked[0].header_string("payment-park-reason").as_deref(),
        Some("unexpected_routing_key")
    );
    assert_eq!(parked[0].header_string("payment-original-routing-key").as_deref(), Some(WORK));
    assert!(world.stripe.seen().is_empty());
    worker.stop().await.unwrap();
}
