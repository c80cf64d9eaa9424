//! OpenTelemetry spans over OTLP/HTTP, received by a collector inside the test that decodes
//! them with the official protobuf definitions (`testkit::otlp`).

use std::time::Duration;

use testkit::amqp::command;
use testkit::otlp::{Collector, Span, SpanKind, StatusCode, attribute, hex};
use testkit::pod::{Launch, Pod};
use testkit::stripe::Behaviour;

use testkit::world::{EVENTS, World, metric};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// The worker binary with `env`, on `world`; its JSON log lines go to `log`, if given.
async fn pod(world: &World, env: &[(&str, String)], log: Option<&std::path::Path>) -> Pod {
    let args = world.args(&[]);
    let mut launch =
        Launch::new(env!("CARGO_BIN_EXE_payment-worker"), &args[1..]).env("LOG_FORMAT", "json");
    if let Some(path) = log {
        launch = launch.log(std::fs::File::create(path).unwrap());
    }
    for (key, value) in env {
        launch = launch.env(key, value);
    }
    launch.start(Duration::from_secs(20)).await
}

async fn stop(mut pod: Pod) {
    let pid = pod.child.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), pod.child.wait()).await;
    assert!(matches!(status, Ok(Ok(s)) if s.success()), "a graceful stop: {status:?}");
}

/// A payment that fails twice (409) and then succeeds: one trace under the incoming parent,
/// three consumer spans each the child of what published its delivery, the Stripe calls with
/// their statuses, the producer spans, and the event's traceparent naming its producer span.
#[tokio::test]
async fn one_trace_from_the_trip_service_through_every_retry_to_the_event() {
    let world = World::new("otlp").await;
    let collector = Collector::start("127.0.0.1:0").await;
    let endpoint = collector.endpoint();
    let log = std::env::temp_dir().join(format!("pw-otlp-{}.log", world.vhost.name()));
    let worker = pod(
        &world,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000".into()),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test".into()),
        ],
        Some(&log),
    )
    .await;
    world.stripe.script("traced", [Behaviour::conflict(), Behaviour::conflict()]);
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    world
        .client
        .publish(
            "trip",
            "payment.cmd.create_session",
            &command("traced", "u", 100.0, "USD"),
            &[("traceparent", &traceparent)],
        )
        .await;
    let events = world.client.take(EVENTS, 1, Duration::from_secs(20)).await;
    assert_eq!(events.len(), 1);
    // The batch is far from due: a graceful stop must flush it.
    stop(worker).await;

    let spans = collector.spans();
    let services = collector.services();
    assert!(services.iter().all(|s| s == "payment-worker"), "{services:?}");
    let in_trace: Vec<&Span> = spans.iter().filter(|s| hex(&s.trace_id) == TRACE).collect();
    let by_id = |id: &[u8]| in_trace.iter().copied().find(|s| s.span_id == id);
    let kind = |k: SpanKind| -> Vec<&Span> {
        let mut found: Vec<&Span> =
            in_trace.iter().copied().filter(|s| s.kind == k as i32).collect();
        found.sort_by_key(|s| s.start_time_unix_nano);
        found
    };

    let consumers = kind(SpanKind::Consumer);
    assert_eq!(consumers.len(), 3, "three attempts: {consumers:#?}");
    for (i, consumer) in consumers.iter().enumerate() {
        assert_eq!(consumer.name, "process payment_trip_response");
        assert_eq!(attribute(consumer, "messaging.system").as_deref(), Some("rabbitmq"));
        assert_eq!(attribute(consumer, "trip.id").as_deref(), Some("traced"));
        assert_eq!(attribute(consumer, "payment.attempt"), Some((i + 1).to_string()));
    }
    assert_eq!(hex(&consumers[0].parent_span_id), PARENT, "the trip-service's span is the parent");
    let outcomes: Vec<Option<String>> =
        consumers.iter().map(|c| attribute(c, "payment.outcome")).collect();
    assert_eq!(
        outcomes,
        [Some("retried".into()), Some("retried".into()), Some("succeeded".into())]
    );
    let failed = consumers[0].status.as_ref().map(|s| s.code);
    assert_eq!(failed, Some(StatusCode::Error as i32), "a failed attempt is an error");

    let clients = kind(SpanKind::Client);
    let statuses: Vec<Option<String>> =
        clients.iter().map(|s| attribute(s, "http.response.status_code")).collect();
    assert_eq!(statuses, [Some("409".into()), Some("409".into()), Some("200".into())]);
    for (client, consumer) in clients.iter().zip(&consumers) {
        assert_eq!(client.parent_span_id, consumer.span_id, "the Stripe call is the attempt's");
        assert!(attribute(client, "stripe.request_id").is_some_and(|id| id.starts_with("req_")));
        let url = attribute(client, "url.full").unwrap();
        assert!(url.ends_with("/v1/checkout/sessions") && !url.contains("sk_"), "{url}");
    }
    assert_eq!(
        attribute(clients[0], "payment.failure_class").as_deref(),
        Some("idempotency_conflict")
    );

    let producers = kind(SpanKind::Producer);
    let copies: Vec<Option<String>> =
        producers.iter().map(|s| attribute(s, "payment.copy")).collect();
    assert_eq!(copies, [Some("retry".into()), Some("retry".into()), Some("event".into())]);
    // Each retry's next attempt is the child of the retry's producer span.
    assert_eq!(consumers[1].parent_span_id, producers[0].span_id);
    assert_eq!(consumers[2].parent_span_id, producers[1].span_id);
    for producer in &producers {
        assert!(
            by_id(&producer.parent_span_id).is_some_and(|p| p.kind == SpanKind::Consumer as i32)
        );
    }
    // The gateway's span will be the child of the event's producer span.
    let event_parent = events[0].header_string("traceparent").expect("the event's traceparent");
    assert_eq!(event_parent, format!("00-{TRACE}-{}-01", hex(&producers[2].span_id)));

    // The log line of the success names the trace and the attempt's span.
    let logs = std::fs::read_to_string(&log).unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("session created, event published"))
        .expect("the success is logged");
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["span"]["trace_id"], TRACE, "{line}");
    assert_eq!(line["span"]["span_id"], hex(&consumers[2].span_id), "{line}");
    let _ = std::fs::remove_file(&log);
}

/// Without the OTLP variables nothing is sent, not even to the default endpoint.
#[tokio::test]
async fn without_the_variables_no_span_leaves_the_process() {
    let world = World::new("otlp-off").await;
    let collector = Collector::start("127.0.0.1:4318").await;
    let worker = pod(&world, &[], None).await;
    world.client.send_command(&command("untraced", "u", 100.0, "USD")).await;
    assert_eq!(world.client.take(EVENTS, 1, Duration::from_secs(10)).await.len(), 1);
    stop(worker).await;
    assert_eq!(collector.requests(), 0);
}

/// Sends `count` commands and waits for their events.
async fn pay(world: &World, prefix: &str, count: usize) {
    for i in 0..count {
        world.client.send_command(&command(&format!("{prefix}-{i}"), "u", 100.0, "USD")).await;
    }
    let events = world.client.take(EVENTS, count, Duration::from_secs(30)).await;
    assert_eq!(events.len(), count, "payments go on whatever the collector does");
}

/// A collector that hangs cannot hold the stop: the last flush has a deadline inside the
/// grace period, and the worker exits with its own status.
#[tokio::test]
async fn a_hanging_collector_does_not_outlast_the_stop() {
    let world = World::new("otlp-hang").await;
    let (silent, _collector) = testkit::silent_listener().await;
    let endpoint = format!("http://{silent}");
    let worker = pod(
        &world,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint), ("SHUTDOWN_GRACE", "2s".into())],
        None,
    )
    .await;
    pay(&world, "hang", 200).await;
    let started = std::time::Instant::now();
    stop(worker).await;
    // The grace (2 s, nothing in flight), the HTTP drain (at most 3 s) and the flush (2 s).
    assert!(started.elapsed() < Duration::from_secs(10), "stopped after {:?}", started.elapsed());
}

/// A collector that refuses: the failures are counted, the spans given up are counted, and
/// the log says so once, not once per batch.
#[tokio::test]
async fn a_refusing_collector_is_counted_and_warned_about_once() {
    let world = World::new("otlp-refused").await;
    let refused = format!("http://{}", testkit::free_loopback_addr());
    let log = std::env::temp_dir().join(format!("pw-otlp-{}.log", world.vhost.name()));
    let worker = pod(
        &world,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", refused),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("RUST_LOG", "warn".into()),
        ],
        Some(&log),
    )
    .await;
    for round in 0..3 {
        pay(&world, &format!("refused-{round}"), 100).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let failures = metric(worker.http, "payment_worker_trace_export_failures_total").await;
    let dropped = metric(worker.http, "payment_worker_trace_spans_dropped_total").await;
    stop(worker).await;
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(failures >= 1.0, "{failures}");
    assert!(dropped >= 300.0, "at least the 900 spans' first batches: {dropped}");
    let warnings = text.lines().filter(|l| l.contains("exporting spans failed")).count();
    assert_eq!(warnings, 1, "warned once in the run, at RUST_LOG=warn:\n{text}");
}
