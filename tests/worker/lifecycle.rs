//! Stopping: a graceful stop finishes in-flight work; a killed process loses nothing.

use std::time::Duration;

use testkit::amqp::{command, inner};
use testkit::stripe::Behaviour;

use crate::spawn_binary;
use testkit::world::{EVENTS, WORK, World};

#[tokio::test]
async fn a_graceful_stop_finishes_in_flight_work_and_redelivers_nothing() {
    let world = World::new("graceful").await;
    world.stripe.set_latency(Duration::from_millis(800));
    let worker = world.start_worker(&[]).await;
    for i in 0..5 {
        world.client.send_command(&command(&format!("g-{i}"), "u", 100.0, "USD")).await;
    }
    // Once all five are delivered (each now waits on the slow Stripe), stop.
    let delivered = testkit::eventually(Duration::from_secs(5), || async {
        (world.client.depth(WORK).await == 0).then_some(())
    })
    .await;
    assert!(delivered.is_some());
    worker.stop().await.expect("clean stop");

    let events = world.client.take(EVENTS, 5, Duration::from_secs(2)).await;
    assert_eq!(events.len(), 5, "in-flight work was finished before exiting");
    assert_eq!(world.client.depth(WORK).await, 0, "nothing handed back for redelivery");
    assert_eq!(world.stripe.created().len(), 5);
}

#[tokio::test]
async fn a_worker_killed_while_its_retry_waits_loses_nothing() {
    let world = World::new("killed").await;
    // One 5 s delay, so there is time to see the original acked before the kill.
    let profile = std::env::temp_dir().join(format!("{}.toml", world.vhost.name()));
    let text = payment_worker::broker::topology::DEFAULT_PROFILE
        .replace(r#"["1s", "2s", "4s"]"#, r#"["5s"]"#);
    std::fs::write(&profile, text).unwrap();
    let profile_arg = profile.to_str().unwrap().to_owned();
    world.stripe.script("k-1", [Behaviour::unavailable()]);
    let mut first = spawn_binary(&world, &["--topology", &profile_arg]).await;
    world.client.send_command(&command("k-1", "u", 100.0, "USD")).await;

    // Once the retry copy sits in the wait queue and the original is acked, kill the worker
    // outright: from here the trip exists only in the broker's wait queue.
    let waiting = testkit::eventually(Duration::from_secs(20), || async {
        let in_wait = world.client.try_depth("payment_wait_5s").await == Some(1);
        let unacked = testkit::vhost::rabbitmqctl(&[
            "list_queues",
            "-p",
            world.vhost.name(),
            "name",
            "messages_unacknowledged",
        ]);
        let acked =
            unacked.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [WORK, "0"]);
        (in_wait && acked).then_some(())
    })
    .await;
    assert!(waiting.is_some(), "the retry copy never reached the wait queue");
    first.child.start_kill().expect("SIGKILL");
    first.child.wait().await.expect("reaped");
    assert!(world.client.take(EVENTS, 1, Duration::from_millis(100)).await.is_empty());

    // The retry survives in the broker; a new worker completes the trip once.
    let mut second = spawn_binary(&world, &["--topology", &profile_arg]).await;
    let events = world.client.take(EVENTS, 1, Duration::from_secs(20)).await;
    assert_eq!(events.len(), 1);
    assert_eq!(world.stripe.created_for("k-1").len(), 1, "one Stripe session");
    assert_eq!(inner(&events[0].body)["sessionID"], world.stripe.created_for("k-1")[0].id.as_str());
    assert!(
        world.client.take(EVENTS, 1, Duration::from_secs(2)).await.is_empty(),
        "no duplicate event"
    );
    second.child.start_kill().unwrap();
    second.child.wait().await.unwrap();
    let _ = std::fs::remove_file(&profile);
}
