//! `POST /webhook/stripe` with signatures computed by the real algorithm.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use payment_worker::webhook::sign;
use serde_json::json;
use testkit::amqp::inner;
use testkit::http_request;

use testkit::world::{RunningWorker, World};

const SECRET: &str = "whsec_test_current";
const OLD_SECRET: &str = "whsec_test_previous";
const SUCCESS: &str = "payment_success";
const FINANCE: &str = "finance_payment_success";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn event(id: &str, kind: &str, payment_status: &str, metadata: serde_json::Value) -> Vec<u8> {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2026-09-30.endive",
        "type": kind,
        "data": { "object": {
            "id": "cs_test_1",
            "object": "checkout.session",
            "amount_total": 4523,
            "currency": "usd",
            "payment_status": payment_status,
            "metadata": metadata,
        }}
    })
    .to_string()
    .into_bytes()
}

fn trip_metadata() -> serde_json::Value {
    json!({"trip_id": "t1", "user_id": "u1", "driver_id": "d1", "package_slug": "sedan"})
}

async fn post(worker: &RunningWorker, body: &[u8], signature: Option<&str>) -> (u16, String) {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(signature) = signature {
        headers.push(("Stripe-Signature", signature));
    }
    http_request(worker.http, "POST", "/webhook/stripe", &headers, body)
        .await
        .expect("the worker answers")
}

async fn signed(worker: &RunningWorker, body: &[u8]) -> (u16, String) {
    post(worker, body, Some(&sign(SECRET, now(), body))).await
}

async fn start(world: &World) -> RunningWorker {
    world
        .start_worker(&[
            "--stripe-webhook-key",
            &format!("{OLD_SECRET}, {SECRET}"),
            "--webhook-max-body",
            "4096",
        ])
        .await
}

#[tokio::test]
async fn a_paid_checkout_becomes_payment_success_exactly_as_the_contract_says() {
    let world = World::new("webhook-paid").await;
    let worker = start(&world).await;
    let body = event("evt_paid_1", "checkout.session.completed", "paid", trip_metadata());
    assert_eq!(signed(&worker, &body).await, (200, "ok".into()));

    for queue in [SUCCESS, FINANCE] {
        let messages = world.client.take(queue, 1, Duration::from_secs(5)).await;
        assert_eq!(messages.len(), 1, "{queue}");
        let message = &messages[0];
        assert!(String::from_utf8_lossy(&message.body).starts_with(r#"{"ownerId":"u1","data":""#));
        assert_eq!(
            serde_json::to_string(&inner(&message.body)).unwrap(),
            r#"{"tripID":"t1","userID":"u1","driverID":"d1","amountCents":4523,"currency":"usd","region":"unspecified","packageSlug":"sedan"}"#
        );
        assert_eq!(
            message.properties.message_id().as_ref().map(|m| m.as_str()),
            Some("evt_paid_1")
        );
        assert_eq!(message.properties.delivery_mode(), &Some(2));
        assert_eq!(
            message.properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(message.routing_key, "payment.event.success");
    }

    // Stripe delivers the same event again: not published twice.
    assert_eq!(signed(&worker, &body).await, (200, "ok".into()));
    assert!(
        world.client.take(SUCCESS, 1, Duration::from_millis(300)).await.is_empty(),
        "duplicate published"
    );

    // Asynchronous payment methods succeed later, with their own event.
    let later =
        event("evt_async_1", "checkout.session.async_payment_succeeded", "paid", trip_metadata());
    assert_eq!(signed(&worker, &later).await.0, 200);
    assert_eq!(world.client.take(SUCCESS, 1, Duration::from_secs(5)).await.len(), 1);

    let (_, metrics) = testkit::http_get(worker.http, "/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"payment_worker_webhook_requests_total{result="published"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"payment_worker_webhook_requests_total{result="duplicate"} 1"#));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn bad_signatures_are_refused_and_publish_nothing() {
    let world = World::new("webhook-signatures").await;
    let worker = start(&world).await;
    let body = event("evt_sig", "checkout.session.completed", "paid", trip_metadata());
    let good = sign(SECRET, now(), &body);
    let good_v1 = good.split("v1=").nth(1).unwrap().to_owned();
    let cases: Vec<(&str, Vec<u8>, Option<String>)> = vec![
        ("wrong secret", body.clone(), Some(sign("whsec_wrong", now(), &body))),
        ("tampered body", body.replace_amount(), Some(good.clone())),
        ("stale timestamp", body.clone(), Some(sign(SECRET, now() - 301, &body))),
        ("missing header", body.clone(), None),
        ("malformed header", body.clone(), Some("v1=nothex,t=abc".into())),
    ];
    for (name, payload, signature) in &cases {
        let answer = post(&worker, payload, signature.as_deref()).await;
        assert_eq!(answer, (400, "Invalid signature".into()), "{name}");
    }
    // Several v1 entries, one of them valid; and the previous secret during rotation.
    let several = format!("t={},v1={},v1={good_v1}", now(), "ab".repeat(32));
    assert_eq!(post(&worker, &body, Some(&several)).await.0, 200, "one valid v1 among several");
    let rotated = event("evt_rotated", "checkout.session.completed", "paid", trip_metadata());
    assert_eq!(
        post(&worker, &rotated, Some(&sign(OLD_SECRET, now(), &rotated))).await.0,
        200,
        "previous secret"
    );
    assert_eq!(
        world.client.take(SUCCESS, 3, Duration::from_secs(3)).await.len(),
        2,
        "only the two valid ones"
    );

    // Oversized bodies are refused unread.
    let huge = vec![b' '; 8192];
    assert_eq!(post(&worker, &huge, Some(&sign(SECRET, now(), &huge))).await.0, 413);
    worker.stop().await.unwrap();
}

trait ReplaceAmount {
    fn replace_amount(&self) -> Vec<u8>;
}

impl ReplaceAmount for Vec<u8> {
    fn replace_amount(&self) -> Vec<u8> {
        String::from_utf8_lossy(self).replace("4523", "1").into_bytes()
    }
}

#[tokio::test]
async fn payloads_are_read_leniently_and_only_paid_sessions_publish() {
    let world = World::new("webhook-payloads").await;
    let worker = start(&world).await;
    // Another API version: extra fields, and fields payment-worker does not need missing.
    let other_version = json!({
        "id": "evt_other_version",
        "type": "checkout.session.completed",
        "api_version": "2019-02-19",
        "brand_new_field": {"x": 1},
        "data": { "object": {
            "id": "cs_old", "payment_status": "paid", "amount_total": 100, "currency": "eur",
            "metadata": {"trip_id": "t-old", "user_id": "u-old", "region": "eu-west"},
            "another_new_field": true
        }}
    })
    .to_string()
    .into_bytes();
    assert_eq!(signed(&worker, &other_version).await, (200, "ok".into()));
    let published = world.client.take(SUCCESS, 1, Duration::from_secs(5)).await;
    assert_eq!(
        serde_json::to_string(&inner(&published[0].body)).unwrap(),
        r#"{"tripID":"t-old","userID":"u-old","driverID":"","amountCents":100,"currency":"eur","region":"eu-west"}"#
    );

    let quiet = [
        event("evt_unpaid", "checkout.session.completed", "unpaid", trip_metadata()),
        event("evt_no_meta", "checkout.session.completed", "paid", json!({"driver_id": "d"})),
        event("evt_other", "customer.created", "paid", trip_metadata()),
    ];
    for body in &quiet {
        assert_eq!(signed(&worker, body).await, (200, "ok".into()));
    }
    let broken = json!({"id": "evt_broken", "type": "checkout.session.completed", "data": {"object": "nope"}}).to_string().into_bytes();
    assert_eq!(signed(&worker, &broken).await, (400, "Invalid payload".into()));
    assert!(
        world.client.take(SUCCESS, 1, Duration::from_millis(500)).await.is_empty(),
        "nothing else published"
    );
    let (_, metrics) = testkit::http_get(worker.http, "/metrics").await.unwrap();
    for result in ["unpaid", "missing_metadata", "ignored_type", "invalid_payload"] {
        assert!(
            metrics.contains(&format!(
                r#"payment_worker_webhook_requests_total{{result="{result}"}} 1"#
            )),
            "{result}"
        );
    }
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn an_unconfigured_webhook_answers_503() {
    let world = World::new("webhook-unset").await;
    let worker = world.start_worker(&[]).await;
    let body = event("evt", "checkout.session.completed", "paid", trip_metadata());
    assert_eq!(signed(&worker, &body).await, (503, "Stripe webhook not configured".into()));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_broker_answers_500_so_stripe_retries() {
    let world = World::new("webhook-no-broker").await;
    let dead = testkit::free_loopback_addr();
    let uri = format!("amqp://guest:guest@{dead}/%2f");
    let worker =
        world.spawn_worker(&["--rabbitmq-uri", &uri, "--stripe-webhook-key", SECRET]).await;
    let body = event("evt_lost", "checkout.session.completed", "paid", trip_metadata());
    let answer = tokio::time::timeout(Duration::from_secs(15), signed(&worker, &body))
        .await
        .expect("answers in time");
    assert_eq!(answer.0, 500);
    let (_, ready) = testkit::http_get(worker.http, "/readyz").await.unwrap();
    assert!(ready.contains("not ready"), "{ready}");
    worker.stop().await.unwrap();
    // Nothing reached the real vhost either.
    assert_eq!(world.client.try_depth(SUCCESS).await, None, "no topology, no half-published event");
}

#[tokio::test]
async fn a_signature_header_with_thousands_of_entries_neither_stalls_the_worker_nor_passes() {
    let world = World::new("webhook-flood").await;
    let worker =
        world.start_worker(&["--stripe-webhook-key", SECRET, "--webhook-max-body", "262144"]).await;
    let body = vec![b'x'; 250 * 1024];
    let mut header = format!("t={}", now());
    for _ in 0..50_000 {
        header.push_str(",v1=00");
    }
    let http = worker.http;
    let flood = tokio::spawn(async move {
        let headers = [("Stripe-Signature", header.as_str())];
        http_request(http, "POST", "/webhook/stripe", &headers, &body).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(2), testkit::http_get(http, "/healthz"));
    assert!(matches!(health.await, Ok(Some((200, _)))), "/healthz answered while it was verified");
    assert!(started.elapsed() < Duration::from_secs(2));
    let answer = tokio::time::timeout(Duration::from_secs(10), flood).await;
    assert!(matches!(answer, Ok(Ok(Some((400, _))))), "refused as a bad signature: {answer:?}");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_deliveries_of_one_event_publish_once() {
    let world = World::new("webhook-race").await;
    let worker = start(&world).await;
    let body = event("evt_race", "checkout.session.completed", "paid", trip_metadata());
    let signature = sign(SECRET, now(), &body);
    let mut deliveries = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (body, signature, http) = (body.clone(), signature.clone(), worker.http);
        deliveries.spawn(async move {
            let headers = [("Stripe-Signature", signature.as_str())];
            http_request(http, "POST", "/webhook/stripe", &headers, &body).await
        });
    }
    while let Some(answer) = deliveries.join_next().await {
        assert_eq!(answer.unwrap().map(|(status, _)| status), Some(200));
    }
    let published = world.client.take(SUCCESS, usize::MAX, Duration::from_secs(1)).await;
    assert_eq!(published.len(), 1, "one payment.event.success for one event id");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_signed_event_id_longer_than_a_message_id_is_answered_not_dropped() {
    let world = World::new("webhook-long-id").await;
    let worker = start(&world).await;
    let long = format!("evt_{}", "x".repeat(300));
    let body = event(&long, "checkout.session.completed", "paid", trip_metadata());
    let (status, _) = signed(&worker, &body).await;
    assert_eq!(status, 400, "an id that cannot be a message-id is an invalid payload");
    assert!(world.client.take(SUCCESS, 1, Duration::from_millis(300)).await.is_empty());
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_signed_negative_amount_is_an_invalid_payload() {
    let world = World::new("webhook-negative").await;
    let worker = start(&world).await;
    let body =
        String::from_utf8(event("evt_neg", "checkout.session.completed", "paid", trip_metadata()))
            .unwrap()
            .replace("\"amount_total\":4523", "\"amount_total\":-4523");
    let (status, _) = signed(&worker, body.as_bytes()).await;
    assert_eq!(status, 400);
    assert!(world.client.take(SUCCESS, 1, Duration::from_millis(300)).await.is_empty());
    worker.stop().await.unwrap();
}

/// Reads until the server closes the connection or `within` passes: the bytes it sent, and
/// whether it closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buffer = [0_u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&seen).into_owned(), true),
            Ok(Ok(n)) => seen.extend_from_slice(&buffer[..n]),
            Err(_) => return (String::from_utf8_lossy(&seen).into_owned(), false),
        }
    }
}

async fn open(worker: &RunningWorker, first_bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(worker.http).await.unwrap();
    stream.write_all(first_bytes).await.unwrap();
    stream
}

const STALLED_HEAD: &[u8] =
    b"POST /webhook/stripe HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n";

fn stalled_body_head(length: usize) -> Vec<u8> {
    format!(
        "POST /webhook/stripe HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n\r\n{{\"id\":"
    )
    .into_bytes()
}

/// Slow or many clients cannot hold the webhook port: headers and bodies have deadlines,
/// webhook requests beyond the cap are answered 503 before their bodies are read (Stripe
/// retries those), connections beyond the cap are closed at once, and payments go on.
#[tokio::test]
async fn slow_or_many_clients_are_bounded_and_payments_go_on() {
    let world = World::new("webhook-bounds").await;
    let worker = world
        .start_worker(&[
            "--stripe-webhook-key",
            SECRET,
            "--http-header-timeout",
            "1s",
            "--http-body-timeout",
            "3s",
            "--webhook-max-concurrent",
            "4",
            "--http-max-connections",
            "40",
        ])
        .await;

    // Slow loris: headers never finished, and connections that send nothing at all.
    let mut loris = Vec::new();
    for i in 0..10 {
        loris.push(open(&worker, if i % 2 == 0 { STALLED_HEAD } else { b"" }).await);
    }
    // Bodies that stall: 4 are admitted and time out, the other 8 are answered 503 unread.
    let mut bodies = Vec::new();
    for _ in 0..12 {
        bodies.push(open(&worker, &stalled_body_head(200_000)).await);
    }
    let mut busy = 0;
    let mut cut = 0;
    for stream in &mut bodies {
        let (answer, closed) = read_until_closed(stream, Duration::from_secs(5)).await;
        if answer.starts_with("HTTP/1.1 503") && answer.contains("retry-after: 1") {
            busy += 1;
        } else {
            assert!(closed, "a stalled body is cut off: {answer:?}");
            cut += 1;
        }
    }
    assert_eq!((busy, cut), (8, 4), "4 admitted and cut off at the body deadline, 8 busy");
    for stream in &mut loris {
        let (answer, closed) = read_until_closed(stream, Duration::from_secs(5)).await;
        assert!(closed, "a slow client is closed at the header deadline: {answer:?}");
    }

    // More connections than the cap: the ones past it are closed at once, and counted.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(open(&worker, b"").await);
    }
    let mut extra = open(&worker, b"").await;
    let (_, closed) = read_until_closed(&mut extra, Duration::from_secs(1)).await;
    assert!(closed, "the connection past the cap is closed at once");
    drop(held);

    // The consumer never noticed, and the webhook answers again.
    world.client.send_command(&testkit::amqp::command("bounds-1", "u", 100.0, "USD")).await;
    assert_eq!(
        world.client.take(testkit::world::EVENTS, 1, Duration::from_secs(10)).await.len(),
        1
    );
    let served = testkit::eventually(Duration::from_secs(5), || async {
        let body = event("evt_bounds", "checkout.session.completed", "paid", trip_metadata());
        (signed(&worker, &body).await.0 == 200).then_some(())
    })
    .await;
    assert!(served.is_some(), "the webhook serves again once the slow clients are gone");
    let refused =
        testkit::world::metric(worker.http, "payment_worker_http_connections_refused_total").await;
    assert!(refused >= 1.0, "{refused}");
    let busy_metric = testkit::world::metric_sum(
        worker.http,
        "payment_worker_webhook_requests_total",
        "result=\"busy\"",
    )
    .await;
    assert_eq!(busy_metric, 8.0);
    worker.stop().await.unwrap();
}

/// The rest of the Checkout lifecycle is seen: an expired session and a failed asynchronous
/// payment are answered, counted by result and publish nothing; a live event reaching a
/// worker with a test key is answered and ignored, however often it comes.
#[tokio::test]
async fn expired_and_failed_sessions_are_counted_and_the_other_mode_is_ignored() {
    let world = World::new("webhook-lifecycle").await;
    let worker = start(&world).await;
    let expired = event("evt_expired", "checkout.session.expired", "unpaid", trip_metadata());
    let failed =
        event("evt_failed", "checkout.session.async_payment_failed", "unpaid", trip_metadata());
    for body in [&expired, &failed] {
        assert_eq!(signed(&worker, body).await, (200, "ok".into()));
    }
    let mut live: serde_json::Value = serde_json::from_slice(&event(
        "evt_live",
        "checkout.session.completed",
        "paid",
        trip_metadata(),
    ))
    .unwrap();
    live["livemode"] = json!(true);
    let live = live.to_string().into_bytes();
    for _ in 0..3 {
        assert_eq!(signed(&worker, &live).await, (200, "ok".into()));
    }
    assert!(
        world.client.take(SUCCESS, 1, Duration::from_millis(500)).await.is_empty(),
        "nothing published"
    );
    // The same event in test mode is a payment.
    let mut test_mode: serde_json::Value = serde_json::from_slice(&live).unwrap();
    test_mode["livemode"] = json!(false);
    assert_eq!(signed(&worker, test_mode.to_string().as_bytes()).await, (200, "ok".into()));
    assert_eq!(world.client.take(SUCCESS, 1, Duration::from_secs(5)).await.len(), 1);
    let (_, metrics) = testkit::http_get(worker.http, "/metrics").await.unwrap();
    for (result, count) in [("session_expired", 1), ("async_payment_failed", 1), ("other_mode", 3)]
    {
        let sample =
            format!(r#"payment_worker_webhook_requests_total{{result="{result}"}} {count}"#);
        assert!(metrics.contains(&sample), "{sample}");
    }
    worker.stop().await.unwrap();
}
