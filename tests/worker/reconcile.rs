//! One `payment.event.success` per Stripe event, whoever receives it, and `payment-worker
//! reconcile` for the events whose webhooks failed.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use payment_worker::webhook::sign;
use serde_json::{Value, json};
use testkit::amqp::{Received, command};
use testkit::http_request;
use testkit::stripe::{Behaviour, SECRET_KEY};

use testkit::world::{EVENTS, RunningWorker, World, metric};

const SECRET: &str = "whsec_test_reconcile";
const SUCCESS: &str = "payment_success";
const FINANCE: &str = "finance_payment_success";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Delivers `event` as Stripe would (signed with `SECRET`); marks it delivered on a 2xx.
async fn deliver(world: &World, worker: &RunningWorker, event: &Value) -> u16 {
    let status = post(worker, event).await;
    if (200..300).contains(&status) {
        world.stripe.mark_delivered(event["id"].as_str().unwrap());
    }
    status
}

/// Delivers `event` signed with `SECRET`, and Stripe never hears the answer (a timeout on its
/// side): the event stays undelivered.
async fn post(worker: &RunningWorker, event: &Value) -> u16 {
    let body = event.to_string();
    let signature = sign(SECRET, now(), body.as_bytes());
    let headers = [("Stripe-Signature", signature.as_str())];
    let (status, _) =
        http_request(worker.http, "POST", "/webhook/stripe", &headers, body.as_bytes())
            .await
            .expect("the worker answers");
    status
}

async fn start(world: &World, webhook_secret: &str) -> RunningWorker {
    world.start_worker(&["--stripe-webhook-key", webhook_secret]).await
}

/// Runs `payment-worker reconcile` against the world: `(exit code, stdout, stderr)`.
async fn reconcile(world: &World, extra: &[&str]) -> (i32, String, String) {
    reconcile_on(&world.vhost.uri(), world, extra).await
}

/// The same against the broker at `uri`.
async fn reconcile_on(uri: &str, world: &World, extra: &[&str]) -> (i32, String, String) {
    let base = world.stripe.base_url();
    let mut args = vec![
        "reconcile",
        "--stripe-secret-key",
        SECRET_KEY,
        "--stripe-api-base",
        &base,
        "--stripe-timeout",
        "2s",
    ];
    args.extend_from_slice(extra);
    testkit::cli::run(env!("CARGO_BIN_EXE_payment-worker"), uri, &args).await
}

/// Deliveries the replicas dropped as duplicates: at their webhooks, or in their outboxes.
async fn duplicates(workers: &[&RunningWorker]) -> f64 {
    let mut sum = 0.0;
    for worker in workers {
        for sample in [
            r#"payment_worker_webhook_requests_total{result="duplicate"}"#,
            r#"payment_worker_success_events_total{result="duplicate"}"#,
        ] {
            sum += metric(worker.http, sample).await;
        }
    }
    sum
}

/// Whether the replicas count at least `count` duplicates within 10 s.
async fn duplicates_within(workers: &[&RunningWorker], count: f64) -> bool {
    testkit::eventually(Duration::from_secs(10), || async {
        (duplicates(workers).await >= count).then_some(())
    })
    .await
    .is_some()
}

/// Riders pay for `count` trips: each is sent, its session created by the worker, then paid.
async fn paid_trips(world: &World, prefix: &str, count: usize) -> Vec<Value> {
    let trips: Vec<String> = (0..count).map(|i| format!("{prefix}-{i:03}")).collect();
    for trip in &trips {
        world.client.send_command(&command(trip, &format!("rider-{trip}"), 1250.0, "USD")).await;
    }
    let created = world.client.take(EVENTS, count, Duration::from_secs(20)).await;
    assert_eq!(created.len(), count, "every session was created");
    trips.iter().map(|trip| world.stripe.complete_session(trip)).collect()
}

fn message_ids(messages: &[Received]) -> BTreeSet<String> {
    messages
        .iter()
        .filter_map(|m| m.properties.message_id().as_ref().map(|id| id.to_string()))
        .collect()
}

fn completed(trip: &str, livemode: bool, payment_status: &str) -> Value {
    json!({
        "id": format!("cs_test_{trip}"),
        "object": "checkout.session",
        "payment_status": payment_status,
        "amount_total": 990,
        "currency": "usd",
        "livemode": livemode,
        "metadata": {"trip_id": trip, "user_id": format!("rider-{trip}"), "driver_id": "d"},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_through_two_replicas_a_restart_and_reconcile_is_published_once() {
    let world = World::new("once-per-event").await;
    let first = start(&world, SECRET).await;
    let second = start(&world, SECRET).await;
    let event = paid_trips(&world, "once", 1).await.remove(0);
    let id = event["id"].as_str().unwrap().to_owned();

    // Stripe never hears the answers (its requests time out), so it delivers the event again
    // and again, and keeps it undelivered.
    assert_eq!(post(&first, &event).await, 200);
    let published = world.client.take(SUCCESS, 1, Duration::from_secs(10)).await;
    assert_eq!(message_ids(&published), BTreeSet::from([id.clone()]));
    // To the other replica, which never saw it. It is seen as a duplicate by that replica's
    // webhook, or by the outbox of whichever replica is its active consumer.
    assert_eq!(post(&second, &event).await, 200);
    assert!(duplicates_within(&[&first, &second], 1.0).await, "the second delivery");
    // To the first after a restart: it remembers nothing in memory.
    first.stop().await.unwrap();
    let restarted = start(&world, SECRET).await;
    let before = duplicates(&[&second]).await;
    assert_eq!(post(&restarted, &event).await, 200);
    assert!(duplicates_within(&[&second, &restarted], before + 1.0).await, "the third delivery");
    // And reconcile finds it undelivered.
    let (code, stdout, stderr) = reconcile(&world, &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("published 0, already published 1"), "{stdout}");

    let later = world.client.take(SUCCESS, usize::MAX, Duration::from_secs(2)).await;
    assert!(later.is_empty(), "published again: {:?}", message_ids(&later));
    assert_eq!(world.client.take(FINANCE, usize::MAX, Duration::from_secs(1)).await.len(), 1);
    second.stop().await.unwrap();
    restarted.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn riders_who_paid_while_the_webhook_refused_everything_are_marked_paid_once() {
    let world = World::new("reconcile-outage").await;
    // The endpoint's secret was rotated on one side only: every delivery fails.
    let worker = start(&world, "whsec_rotated_elsewhere").await;
    let events = paid_trips(&world, "refused", 50).await;
    for event in &events {
        assert_eq!(deliver(&world, &worker, event).await, 400);
    }
    assert!(world.client.take(SUCCESS, 1, Duration::from_millis(500)).await.is_empty());

    // Pages of 20: the window holds three.
    let (code, stdout, stderr) = reconcile(&world, &["--page-size", "20"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("50 events (undelivered, created in the last 3days, 3 pages)"),
        "{stdout}"
    );
    assert!(stdout.contains("published 50, already published 0"), "{stdout}");
    let queries = world.stripe.event_queries();
    assert!(queries[0].contains("delivery_success=false"), "{queries:?}");
    assert!(queries[0].contains("types%5B%5D=checkout.session.completed"), "{queries:?}");
    assert!(queries[1].contains("starting_after=evt_"), "{queries:?}");

    let published = world.client.take(SUCCESS, 50, Duration::from_secs(20)).await;
    let expected: BTreeSet<String> =
        events.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(message_ids(&published), expected, "each paid trip once, by its event id");
    let trips: BTreeSet<String> = published
        .iter()
        .map(|m| testkit::amqp::inner(&m.body)["tripID"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(trips.len(), 50);

    // They are still undelivered at Stripe: a second run finds them and publishes nothing.
    let (code, stdout, _) = reconcile(&world, &["--page-size", "20"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("published 0, already published 50"), "{stdout}");
    assert!(world.client.take(SUCCESS, 1, Duration::from_secs(2)).await.is_empty());

    // The replicas show the last run, read from the ledger.
    let shown = testkit::eventually(Duration::from_secs(10), || async {
        let last =
            metric(worker.http, "payment_worker_reconcile_last_success_timestamp_seconds").await;
        let found = metric(
            worker.http,
            r#"payment_worker_reconcile_events{type="checkout.session.completed"}"#,
        )
        .await;
        let published = metric(worker.http, "payment_worker_reconcile_published").await;
        (last > (now() - 60) as f64 && found == 50.0 && published == 0.0).then_some(())
    })
    .await;
    assert!(shown.is_some(), "the reconcile metrics follow the ledger");
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_failing_mid_listing_is_retried_and_the_run_finishes() {
    let world = World::new("reconcile-flaky").await;
    let worker = start(&world, SECRET).await;
    for i in 0..25 {
        world.stripe.add_event(
            "checkout.session.completed",
            completed(&format!("flaky-{i}"), false, "paid"),
            false,
        );
    }
    world.stripe.script_events([
        Behaviour::Succeed,
        Behaviour::RetryAfter { status: 429, seconds: 1 },
        Behaviour::unavailable(),
        Behaviour::Drop,
        Behaviour::Fail { status: 500, kind: "api_error", saved: false, should_retry: None },
    ]);
    let (code, stdout, stderr) = reconcile(&world, &["--page-size", "10"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("published 25"), "{stdout}");
    assert!(stderr.contains("asking again"), "the retries are told: {stderr}");
    assert_eq!(world.client.take(SUCCESS, 25, Duration::from_secs(10)).await.len(), 25);

    // Stripe that stays down ends the run non-zero, naming it.
    world.stripe.script_events((0..5).map(|_| Behaviour::unavailable()));
    let (code, stdout, stderr) = reconcile(&world, &["--stripe-attempts", "2"]).await;
    assert_ne!(code, 0, "{stdout}");
    assert!(stderr.contains("Stripe stayed unreachable"), "{stderr}");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn other_mode_unpaid_expired_and_failed_events_publish_nothing_and_are_counted() {
    let world = World::new("reconcile-kinds").await;
    let worker = start(&world, SECRET).await;
    world.stripe.add_event("checkout.session.completed", completed("live", true, "paid"), true);
    world.stripe.add_event(
        "checkout.session.completed",
        completed("later", false, "unpaid"),
        false,
    );
    world.stripe.add_event("checkout.session.expired", completed("gone", false, "unpaid"), false);
    world.stripe.add_event(
        "checkout.session.async_payment_failed",
        completed("declined", false, "unpaid"),
        false,
    );
    let (code, stdout, stderr) = reconcile(&world, &["--all", "--dry-run"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    for part in [
        "4 events (all,",
        "checkout.session.async_payment_failed=1",
        "checkout.session.completed=2",
        "checkout.session.expired=1",
        "would publish 0",
        "unpaid 1",
        "other mode 1",
    ] {
        assert!(stdout.contains(part), "{part:?} in {stdout}");
    }
    assert!(world.client.take(SUCCESS, 1, Duration::from_secs(1)).await.is_empty());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_window_past_stripes_retention_and_an_unreachable_broker_are_refused() {
    let world = World::new("reconcile-refused").await;
    let (code, _, stderr) = reconcile(&world, &["--since", "31d"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid --since: at most 30d"), "{stderr}");

    let dead = format!("amqp://guest:guest@{}/%2f", testkit::free_loopback_addr());
    let (code, _, stderr) = reconcile_on(&dead, &world, &[]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("connecting to"), "{stderr}");
}
