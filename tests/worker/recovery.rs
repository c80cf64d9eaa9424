//! Each recovery on its own, with the observable it relies on.

use std::time::Duration;

use testkit::amqp::{command, inner};
use testkit::proxy::FaultProxy;
use testkit::stripe::Behaviour;
use testkit::{eventually, http_get};

use testkit::world::{EVENTS, PARKED, RunningWorker, WAIT_QUEUES, WORK, World};

async fn metric(worker: &RunningWorker, name: &str) -> f64 {
    testkit::world::metric(worker.http, name).await
}

async fn ready(worker: &RunningWorker) -> bool {
    matches!(http_get(worker.http, "/readyz").await, Some((200, _)))
}

/// A worker whose broker connection goes through a fault proxy.
async fn behind_proxy(world: &World, extra: &[&str]) -> (FaultProxy, RunningWorker) {
    let host: std::net::SocketAddr = testkit::vhost::broker_host().parse().unwrap();
    let proxy = FaultProxy::start(host).await;
    let uri = format!("amqp://guest:guest@{}/{}", proxy.addr(), world.vhost.name());
    let mut args = vec![
        "--rabbitmq-uri",
        &uri,
        "--reconnect-min-delay",
        "300ms",
        "--reconnect-max-delay",
        "1s",
    ];
    args.extend_from_slice(extra);
    let worker = world.start_worker(&args).await;
    (proxy, worker)
}

#[tokio::test]
async fn a_cut_connection_is_recovered_without_a_restart() {
    let world = World::new("recover-cut").await;
    let (proxy, worker) = behind_proxy(&world, &[]).await;
    assert_eq!(metric(&worker, "payment_worker_broker_reconnects_total").await, 0.0);

    // Hold the connection down long enough for readiness to be seen failing.
    proxy.set_delay(Duration::from_secs(3600));
    proxy.cut_all();
    let unready =
        eventually(Duration::from_secs(5), || async { (!ready(&worker).await).then_some(()) })
            .await;
    assert!(unready.is_some(), "/readyz answers 503 while disconnected");
    assert_eq!(http_get(worker.http, "/healthz").await.unwrap().0, 200, "/healthz stays 200");
    proxy.set_delay(Duration::ZERO);
    proxy.cut_all();

    let back =
        eventually(Duration::from_secs(15), || async { ready(&worker).await.then_some(()) }).await;
    assert!(back.is_some(), "ready again after reconnecting");
    assert!(metric(&worker, "payment_worker_broker_reconnects_total").await >= 1.0);
    world.client.send_command(&command("after-cut", "u", 100.0, "USD")).await;
    let events = world.client.take(EVENTS, 1, Duration::from_secs(10)).await;
    assert_eq!(inner(&events[0].body)["tripID"], "after-cut");
    assert!(!worker.is_finished());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn the_worker_exits_when_the_reconnect_budget_is_spent() {
    let world = World::new("recover-budget").await;
    let (proxy, worker) = behind_proxy(&world, &["--reconnect-max-attempts", "2"]).await;
    drop(proxy); // The broker is gone for good: every connection attempt is refused.
    let result = tokio::time::timeout(Duration::from_secs(20), worker.join())
        .await
        .expect("the worker gives up");
    let error = result.unwrap_err().to_string();
    assert!(error.contains("gave up after") && error.contains("failed broker sessions"), "{error}");
}

#[tokio::test]
async fn a_deleted_work_queue_is_declared_again_and_consumed() {
    let world = World::new("recover-queue").await;
    let worker = world.start_worker(&["--reconnect-min-delay", "200ms"]).await;
    let channel = world.client.connection.create_channel().await.unwrap();
    channel.queue_delete(WORK.into(), Default::default()).await.unwrap();
    // The broker cancels the consumer; the worker opens a new session and declares again.
    let back = eventually(Duration::from_secs(15), || async {
        (metric(&worker, "payment_worker_broker_reconnects_total").await >= 1.0
            && ready(&worker).await)
            .then_some(())
    })
    .await;
    assert!(back.is_some(), "the session restarted");
    world.client.send_command(&command("after-delete", "u", 100.0, "USD")).await;
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(10)).await.len(), 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_channel_closed_by_the_broker_loses_nothing() {
    let world = World::new("recover-channel").await;
    let worker = world.start_worker(&["--reconnect-min-delay", "200ms"]).await;
    // Someone deletes the retry exchange: the next retry publish gets 404 and its channel closes.
    let channel = world.client.connection.create_channel().await.unwrap();
    channel.exchange_delete("payment_retry".into(), Default::default()).await.unwrap();
    world.stripe.script("c-1", [Behaviour::unavailable()]);
    world.client.send_command(&command("c-1", "u", 100.0, "USD")).await;

    let events = world.client.take(EVENTS, 1, Duration::from_secs(15)).await;
    assert_eq!(
        events.len(),
        1,
        "the command was redelivered and completed after the session restarted"
    );
    assert!(metric(&worker, "payment_worker_channel_errors_total").await >= 1.0);
    assert!(metric(&worker, "payment_worker_broker_reconnects_total").await >= 1.0);
    assert_eq!(world.stripe.created_for("c-1").len(), 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_deleted_wait_queue_is_declared_again_when_a_retry_finds_it_missing() {
    let world = World::new("recover-wait").await;
    let worker = world.start_worker(&[]).await;
    let channel = world.client.connection.create_channel().await.unwrap();
    channel.queue_delete(WAIT_QUEUES[0].into(), Default::default()).await.unwrap();
    world.stripe.script("w-1", [Behaviour::unavailable()]);
    world.client.send_command(&command("w-1", "u", 100.0, "USD")).await;

    let events = world.client.take(EVENTS, 1, Duration::from_secs(15)).await;
    assert_eq!(events.len(), 1, "retried through the wait queue declared again");
    assert_eq!(world.client.depth(PARKED).await, 0, "not parked as retry_unroutable");
    assert_eq!(world.client.depth(WAIT_QUEUES[0]).await, 0);
    assert_eq!(metric(&worker, "payment_worker_broker_reconnects_total").await, 0.0);
    assert_eq!(world.stripe.created_for("w-1").len(), 1);
    worker.stop().await.unwrap();
}
