//! Coexisting with the Go services' declarations, and both topology profiles.

use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use testkit::amqp::{command, inner};
use testkit::stripe::Behaviour;

use testkit::world::{EVENTS, PARKED, WORK, World, repo_path};

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

/// RabbitMQ 4 gives quorum queues a delivery limit of 20 and dead-letters what exceeds it; the
/// quorum profile states its work queue's limit and sends what exceeds it to the parking
/// queue, where `parked list` says why (on 3.10, as on 4).
#[tokio::test]
async fn the_quorum_work_queue_parks_what_exceeds_its_delivery_limit() {
    let world = World::new("quorum-limit").await;
    let profile = repo_path("topology/quorum.toml");
    let worker = world.start_worker(&["--topology", profile.to_str().unwrap()]).await;
    worker.stop().await.unwrap();
    // A command that keeps coming back (a consumer that dies with it, again and again).
    world.client.send_command(&command("q-poison", "u", 100.0, "USD")).await;
    let channel = &world.client.channel;
    let mut deliveries = 0;
    while let Some(message) =
        channel.basic_get(WORK.into(), BasicGetOptions::default()).await.unwrap()
    {
        deliveries += 1;
        let requeue = BasicNackOptions { requeue: true, ..Default::default() };
        message.delivery.acker.nack(requeue).await.unwrap();
        assert!(deliveries <= 25, "never dead-lettered");
    }
    assert_eq!(deliveries, 21, "the limit, 20, and the delivery past it");
    let parked = world.client.take(PARKED, 1, Duration::from_secs(5)).await;
    assert_eq!(parked.len(), 1, "exceeded, it is parked, not sent to dlx");
    assert_eq!(inner(&parked[0].body)["tripID"], "q-poison");
    assert!(matches!(world.client.try_depth("dead_letter_queue").await, None | Some(0)));
    // Put it back as it was and read it as an operator would.
    let copy = parked[0].properties.clone();
    world.client.publish_properties("", PARKED, &parked[0].body, copy).await;
    let (code, out, _) = testkit::cli::run(
        env!("CARGO_BIN_EXE_payment-worker"),
        &world.vhost.uri(),
        &["--topology", profile.to_str().unwrap(), "parked", "list"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("q-poison") && out.contains("reason=delivery_limit"), "{out}");
}
