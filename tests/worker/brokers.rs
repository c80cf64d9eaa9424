//! Reaching the broker: several URIs (a cluster's nodes), secrets read from files, a broker
//! that refuses the result event or a retry copy.

use std::time::{Duration, Instant};

use testkit::amqp::command;
use testkit::http_get;
use testkit::stripe::{Behaviour, SECRET_KEY};

use testkit::world::{EVENTS, PARKED, WAIT_QUEUES, World, metric, wait_ready};

#[tokio::test]
async fn a_node_that_refuses_or_hangs_is_passed_over_at_once() {
    let world = World::new("nodes").await;
    let refused = testkit::free_loopback_addr();
    let (silent, _task) = testkit::silent_listener().await;
    let vhost = world.vhost.name();
    let uris = format!(
        "amqp://guest:guest@{refused}/{vhost}, amqp://guest:guest@{silent}/{vhost},{}",
        world.vhost.uri()
    );
    // However the rotation starts, the worker tries the live node within one connect timeout
    // of the silent one.
    let started = Instant::now();
    let worker =
        world.spawn_worker(&["--rabbitmq-uri", &uris, "--rabbitmq-connect-timeout", "1s"]).await;
    wait_ready(worker.http).await;
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let (_, body) = http_get(worker.http, "/readyz").await.unwrap();
    let live = testkit::vhost::broker_host();
    assert!(body.contains(&format!("on amqp://guest@{live}")), "{body}");
    world.client.send_command(&command("nodes-1", "u", 100.0, "USD")).await;
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(10)).await.len(), 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn secrets_are_read_from_files() {
    let world = World::new("secret-files").await;
    let dir = std::env::temp_dir().join(format!("pw-secrets-{}", world.vhost.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let (uri_file, key_file) = (dir.join("rabbitmq-uri"), dir.join("stripe-secret-key"));
    // As Kubernetes mounts them: a trailing newline is not part of the secret.
    std::fs::write(&uri_file, format!("{}\n", world.vhost.uri())).unwrap();
    std::fs::write(&key_file, format!("{SECRET_KEY}\n")).unwrap();
    let args: Vec<String> = [
        "payment-worker",
        "--rabbitmq-uri-file",
        uri_file.to_str().unwrap(),
        "run",
        "--http-addr",
        "127.0.0.1:0",
        "--stripe-secret-key-file",
        key_file.to_str().unwrap(),
        "--stripe-api-base",
        &world.stripe.base_url(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let worker = world.spawn_with(args).await;
    wait_ready(worker.http).await;
    world.client.send_command(&command("from-files", "u", 100.0, "USD")).await;
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(10)).await.len(), 1);
    assert_eq!(world.stripe.created_for("from-files").len(), 1, "the real key reached Stripe");
    worker.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A node that accepts TCP and never speaks AMQP has not answered: the worker waits out its
/// backoff between attempts (and so spends its reconnect budget at the pace it logs) instead
/// of taking the accept for the broker's return.
#[tokio::test]
async fn a_silent_node_does_not_cut_the_backoff_short() {
    let world = World::new("silent-backoff").await;
    let (silent, _task) = testkit::silent_listener().await;
    let uri = format!("amqp://guest:guest@{silent}/{}", world.vhost.name());
    let started = Instant::now();
    let worker = world
        .spawn_worker(&[
            "--rabbitmq-uri",
            &uri,
            "--rabbitmq-connect-timeout",
            "200ms",
            "--reconnect-min-delay",
            "1s",
            "--reconnect-max-delay",
            "1s",
            "--reconnect-max-attempts",
            "3",
        ])
        .await;
    let ended = tokio::time::timeout(Duration::from_secs(30), worker.join()).await;
    let elapsed = started.elapsed();
    let Ok(Err(error)) = ended else { panic!("the worker did not give up within 30 s") };
    let error = error.to_string();
    assert!(error.contains("4 failed broker sessions") && error.contains("no answer"), "{error}");
    // Four sessions of 0.2 s with three delays of at least 1 s between them, not four back to
    // back.
    assert!(elapsed >= Duration::from_millis(3_000), "gave up after {elapsed:?}");
}

#[tokio::test]
async fn a_refused_event_spends_an_attempt_and_starts_a_new_session() {
    let world = World::new("refused-event").await;
    let worker = world.start_worker(&[]).await;
    // The gateway's queue refuses everything (a policy, as an operator would set one): the
    // broker nacks every session_created event.
    let vhost = world.vhost.name();
    refuse_publishes(vhost, EVENTS);
    world.client.send_command(&command("refused", "u", 100.0, "USD")).await;

    let parked = world.client.take(PARKED, 1, Duration::from_secs(20)).await;
    assert_eq!(parked.len(), 1, "parked after its last attempt");
    assert_eq!(
        parked[0].header_string("payment-park-reason").as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(world.stripe.seen_for("refused").len(), 4, "one call per attempt");
    assert_eq!(world.stripe.created_for("refused").len(), 1, "one session, replayed");
    // Each refusal ends the session once the delivery is settled: the last one may end just
    // after its parked copy is seen.
    let restarts = testkit::eventually(Duration::from_secs(5), || async {
        let restarts = metric(worker.http, "payment_worker_channel_errors_total").await;
        (restarts >= 4.0).then_some(restarts)
    })
    .await;
    let now = metric(worker.http, "payment_worker_channel_errors_total").await;
    assert!(restarts.is_some(), "a new session after each refused event, 5 s on: {now}");

    // Once the queue accepts again, payments flow on the current session.
    testkit::vhost::rabbitmqctl(&["clear_policy", "-p", vhost, "refuse"]);
    wait_ready(worker.http).await;
    world.client.send_command(&command("accepted", "u", 100.0, "USD")).await;
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(10)).await.len(), 1);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_nacked_retry_copy_is_handed_back_not_parked() {
    let world = World::new("nacked-retry").await;
    let worker = world.start_worker(&[]).await;
    // The first wait queue refuses everything, as a quorum queue does while it has no
    // leader: the broker nacks the retry copy of a payment whose first call failed.
    let vhost = world.vhost.name();
    refuse_publishes(vhost, WAIT_QUEUES[0]);
    world.stripe.script("held", [Behaviour::unavailable()]);
    world.client.send_command(&command("held", "u", 100.0, "USD")).await;

    // The delivery goes back to the work queue, comes round on a new session, and its next
    // call succeeds: a broker that could not take the copy costs the payment nothing.
    let events = world.client.take(EVENTS, 1, Duration::from_secs(20)).await;
    assert_eq!(events.len(), 1, "the payment went through once the call succeeded");
    assert!(
        world.client.take(PARKED, 1, Duration::from_secs(1)).await.is_empty(),
        "nothing parked"
    );
    assert_eq!(world.stripe.created_for("held").len(), 1, "one session");
    let restarts = metric(worker.http, "payment_worker_channel_errors_total").await;
    assert!(restarts >= 1.0, "a new session after the nacked copy: {restarts}");
    testkit::vhost::rabbitmqctl(&["clear_policy", "-p", vhost, "refuse"]);
    worker.stop().await.unwrap();
}

/// A policy (named `refuse`, as an operator would set one) under which `queue` in `vhost`
/// refuses every publish: the broker nacks whatever is routed to it.
fn refuse_publishes(vhost: &str, queue: &str) {
    let policy = r#"{"max-length":0,"overflow":"reject-publish"}"#;
    let pattern = format!("^{queue}$");
    testkit::vhost::rabbitmqctl(&[
        "set_policy",
        "-p",
        vhost,
        "refuse",
        &pattern,
        policy,
        "--apply-to",
        "queues",
    ]);
}
