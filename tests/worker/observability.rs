//! Metrics a real Prometheus accepts and scrapes, and health that means something.

use std::process::Stdio;
use std::time::Duration;

use payment_worker::webhook::sign;
use testkit::amqp::command;
use testkit::stripe::Behaviour;
use testkit::{eventually, http_get, http_request};
use tokio::io::AsyncWriteExt;

use testkit::world::{EVENTS, PARKED, World, repo_path};

const WEBHOOK_SECRET: &str = "whsec_test_dashboard";

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A query string value, percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Handles one success, one retried success, one parked and one deferred command.
async fn drive_every_outcome(world: &World) {
    world.stripe.script("o-retry", [Behaviour::unavailable()]);
    world.stripe.script("o-park", [Behaviour::invalid_request()]);
    world.stripe.script("o-defer", [Behaviour::rate_limited()]);
    for trip in ["o-ok", "o-retry", "o-park", "o-defer"] {
        world.client.send_command(&command(trip, "u", 100.0, "USD")).await;
    }
    assert_eq!(world.client.take(EVENTS, 3, Duration::from_secs(10)).await.len(), 3);
    assert_eq!(world.client.take(PARKED, 1, Duration::from_secs(5)).await.len(), 1);
}

fn tool(name: &str) -> tokio::process::Command {
    assert!(
        std::process::Command::new("which").arg(name).output().is_ok_and(|o| o.status.success()),
        "{name} is not installed: `make test` installs Debian's prometheus package"
    );
    tokio::process::Command::new(name)
}

#[tokio::test]
async fn promtool_accepts_a_scrape_with_every_outcome() {
    let world = World::new("promtool").await;
    let worker = world.start_worker(&[]).await;
    drive_every_outcome(&world).await;
    // Give the depth poller one round.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, scrape) = http_get(worker.http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for expected in [
        r#"payment_worker_commands_total{attempt="1",outcome="succeeded",reason=""} 2"#,
        r#"payment_worker_commands_total{attempt="1",outcome="deferred",reason=""} 1"#,
        r#"payment_worker_commands_total{attempt="1",outcome="retried",reason=""} 1"#,
        r#"payment_worker_commands_total{attempt="2",outcome="succeeded",reason=""} 1"#,
        r#"payment_worker_commands_total{attempt="1",outcome="parked",reason="stripe_rejected"} 1"#,
        r#"payment_worker_retry_delay_seconds_count{tier="1s"} 1"#,
        r#"payment_worker_stripe_requests_total{result="server_error"} 1"#,
        r#"payment_worker_stripe_requests_total{result="created"} 3"#,
        r#"payment_worker_stripe_requests_total{result="rate_limited"} 1"#,
        r#"payment_worker_stripe_circuit_state{state="closed"} 1"#,
        r#"payment_worker_stripe_circuit_state{state="open"} 0"#,
        "payment_worker_stripe_rate_limit ",
        "payment_worker_stripe_requests_in_flight 0",
        r#"payment_worker_queue_messages{queue="payment_parked",role="parked"}"#,
        r#"payment_worker_retry_tier_seconds{tier="4s"} 4"#,
        "payment_worker_broker_connected 1",
        "payment_worker_ready 1",
        "payment_worker_build_info{",
    ] {
        assert!(scrape.contains(expected), "missing {expected}\n{scrape}");
    }
    assert!(!scrape.contains("o-ok"), "a trip id leaked into a label");

    let mut promtool = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(scrape.as_bytes()).await.unwrap();
    let output = promtool.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_retry_counters() {
    let world = World::new("prometheus").await;
    let worker = world.start_worker(&["--stripe-webhook-key", WEBHOOK_SECRET]).await;
    let dir = std::env::temp_dir().join(format!(
        "pw-prometheus-{}-{}",
        std::process::id(),
        worker.http.port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: payment-worker\n    static_configs:\n      - targets: ['{}']\n",
        worker.http
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let web = testkit::free_loopback_addr();
    let mut prometheus = tool("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Let Prometheus see the counters at zero first, then drive retries.
    let scraped = eventually(Duration::from_secs(20), || async {
        let (_, body) = http_get(web, "/api/v1/query?query=payment_worker_ready").await?;
        body.contains(r#""value""#).then_some(())
    })
    .await;
    assert!(scraped.is_some(), "Prometheus never scraped the worker");
    // Failures of single payments: several payments failing Stripe-wide at once would be
    // deferred as an outage, not retried.
    for i in 0..3 {
        let trip = format!("p-{i}");
        world.stripe.script(&trip, [Behaviour::conflict()]);
        world.client.send_command(&command(&trip, "u", 100.0, "USD")).await;
    }
    assert_eq!(world.client.take(EVENTS, 3, Duration::from_secs(10)).await.len(), 3);

    let query =
        "/api/v1/query?query=sum(payment_worker_commands_total%7Boutcome%3D%22retried%22%7D)";
    let retried = eventually(Duration::from_secs(20), || async {
        let (_, body) = http_get(web, query).await?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let value = json["data"]["result"][0]["value"][1].as_str()?.parse::<f64>().ok()?;
        (value >= 3.0).then_some(value)
    })
    .await;
    assert_eq!(retried, Some(3.0), "Prometheus shows the three retries");

    // The rest of a day's work: a parked command and a webhook delivery. Then every query of
    // the Grafana dashboard must return data.
    world.stripe.script("p-park", [Behaviour::invalid_request()]);
    world.client.send_command(&command("p-park", "u", 100.0, "USD")).await;
    assert_eq!(world.client.take(PARKED, 1, Duration::from_secs(10)).await.len(), 1);
    let event = serde_json::json!({
        "id": "evt_dashboard", "type": "checkout.session.completed",
        "data": {"object": {"id": "cs_test_1", "payment_status": "paid", "amount_total": 100,
            "metadata": {"trip_id": "p-0", "user_id": "u"}}}
    })
    .to_string();
    let signature = sign(WEBHOOK_SECRET, unix_now(), event.as_bytes());
    let headers = [("Stripe-Signature", signature.as_str())];
    let answer = http_request(worker.http, "POST", "/webhook/stripe", &headers, event.as_bytes());
    assert_eq!(answer.await.map(|(status, _)| status), Some(200));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("helm/payment-worker/files/dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            // As Grafana sends it with "All" selected.
            let promql = expr
                .replace("$namespace", ".*")
                .replace("$pod", ".*")
                .replace("$__rate_interval", "1m");
            let path = format!("/api/v1/query?query={}", percent_encode(&promql));
            let series = eventually(Duration::from_secs(20), || async {
                let (_, body) = http_get(web, &path).await?;
                let json: serde_json::Value = serde_json::from_str(&body).ok()?;
                let count = json["data"]["result"].as_array()?.len();
                (count > 0).then_some(count)
            })
            .await;
            assert!(series.is_some(), "dashboard panel {:?}: no data for {expr}", panel["title"]);
        }
    }
    let _ = prometheus.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_follows_the_broker_session() {
    let world = World::new("readiness").await;
    let dead = testkit::free_loopback_addr();
    let worker =
        world.spawn_worker(&["--rabbitmq-uri", &format!("amqp://guest:guest@{dead}/%2f")]).await;
    assert_eq!(http_get(worker.http, "/healthz").await.unwrap().0, 200, "alive without a broker");
    let (status, body) = http_get(worker.http, "/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.starts_with("not ready:"), "{body}");
    worker.stop().await.unwrap();

    let worker = world.start_worker(&[]).await;
    let (status, body) = http_get(worker.http, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("ready: consuming payment_trip_response on amqp://guest@"), "{body}");
    assert!(!body.contains("guest:guest"), "{body}");
    worker.stop().await.unwrap();
}
