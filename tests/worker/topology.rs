//! Coexisting with the Go services' declarations, and both topology profiles.

use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use testkit::amqp::{command, inner};
use testkit::stripe::Behaviour;

use crate::helpers::{EVENTS, WORK, World, repo_path};

/// Declares the work queue and exchanges exactly as the Go services do.
async fn declare_like_go(world: &World) {
    let channel = world.client.connection.create_channel().await.unwrap();
    for exchange in ["trip", "dlx"] {
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let mut arguments = FieldTable::default();
    arguments
        .insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from("dlx")));
    for queue in [WORK, EVENTS] {
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                arguments.clone(),
            )
            .await
            .expect("the Go declaration is accepted");
    }
}

#[tokio::test]
async fn the_go_services_and_the_worker_start_in_any_order() {
    let world = World::new("go-first").await;
    declare_like_go(&world).await;
    let worker = world.start_worker(&[]).await;
    // And the Go side restarting after the worker declared is accepted too.
    declare_like_go(&world).await;
    world.client.send_command(&command("t-go", "u", 100.0, "USD")).await;
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(10)).await.len(), 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_queue_with_other_arguments_stops_the_worker_with_a_clear_error() {
    let world = World::new("inequivalent").await;
    let channel = world.client.connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("elsewhere")),
    );
    channel
        .queue_declare(
            WORK.into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            arguments,
        )
        .await
        .unwrap();
    let worker = world.spawn_worker(&[]).await;
    let error = tokio::time::timeout(Duration::from_secs(20), worker.join())
        .await
        .expect("the worker stops")
        .unwrap_err();
    let message = error.to_string();
    for expected in
        ["payment_trip_response", "x-dead-letter-exchange", "PAYMENT_TOPOLOGY", "\"dlx\""]
    {
        assert!(message.contains(expected), "{message} should mention {expected}");
    }
}

#[tokio::test]
async fn the_quorum_profile_retries_and_parks_too() {
    let world = World::new("quorum").await;
    world.stripe.script("q-retry", [Behaviour::unavailable()]);
    world.stripe.script("q-park", [Behaviour::invalid_request()]);
    let profile = repo_path("topology/quorum.toml");
    let worker = world.start_worker(&["--topology", profile.to_str().unwrap()]).await;
    world.client.send_command(&command("q-ok", "u", 100.0, "USD")).await;
    world.client.send_command(&command("q-retry", "u", 100.0, "USD")).await;
    world.client.send_command(&command("q-park", "u", 100.0, "USD")).await;
    let events = world.client.take(EVENTS, 2, Duration::from_secs(10)).await;
    let mut trips: Vec<String> =
        events.iter().map(|e| inner(&e.body)["tripID"].as_str().unwrap().to_owned()).collect();
    trips.sort();
    assert_eq!(trips, ["q-ok", "q-retry"]);
    assert_eq!(world.client.take("payment_parked", 1, Duration::from_secs(5)).await.len(), 1);
    // The wait queues really are quorum queues with at-least-once dead-lettering.
    let listing = testkit::vhost::rabbitmqctl(&[
        "list_queues",
        "-p",
        world.vhost.name(),
        "name",
        "type",
        "arguments",
    ]);
    let wait =
        listing.lines().find(|l| l.starts_with("payment_wait_1s")).expect("wait queue listed");
    assert!(
        wait.contains("quorum")
            && wait.contains("at-least-once")
            && wait.contains("reject-publish"),
        "{wait}"
    );
    worker.stop().await.unwrap();
}
