//! The operator subcommands against a real broker.

use std::process::Stdio;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use testkit::amqp::{command, inner};
use testkit::stripe::Behaviour;

use testkit::world::{EVENTS, PARKED, WORK, World, repo_path};

/// Runs the binary against the world's vhost: `(exit code, stdout, stderr)`.
async fn cli(world: &World, args: &[&str]) -> (i32, String, String) {
    cli_on(&world.vhost.uri(), args).await
}

async fn cli_on(uri: &str, args: &[&str]) -> (i32, String, String) {
    testkit::cli::run(env!("CARGO_BIN_EXE_payment-worker"), uri, args).await
}

/// A transient-looking 400 that Stripe does not save, so a replay after it succeeds.
fn rejected_once() -> Behaviour {
    Behaviour::Fail { status: 400, kind: "invalid_request_error", saved: false, should_retry: None }
}

/// Parks `trips` through the worker (Stripe refuses each once), plus one undecodable body.
async fn park(world: &World, trips: &[&str]) {
    let worker = world.start_worker(&[]).await;
    for trip in trips {
        world.stripe.script(trip, [rejected_once()]);
        world.client.send_command(&command(trip, &format!("rider-{trip}"), 1234.0, "USD")).await;
    }
    world.client.send_command(b"{broken").await;
    let parked = testkit::eventually(Duration::from_secs(10), || async {
        (world.client.depth(PARKED).await as usize == trips.len() + 1).then_some(())
    })
    .await;
    assert!(parked.is_some(), "messages were not parked");
    worker.stop().await.unwrap();
}

async fn parked_bodies(world: &World) -> Vec<Vec<u8>> {
    let all = world.client.take(PARKED, usize::MAX, Duration::from_millis(500)).await;
    all.into_iter().map(|m| m.body).collect()
}

#[tokio::test]
async fn list_shows_parked_messages_and_changes_nothing() {
    let world = World::new("ops-list").await;
    park(&world, &["l-1", "l-2", "l-3"]).await;
    let (code, text, _) = cli(&world, &["parked", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        text.contains("l-2") && text.contains("rider-l-2") && text.contains("1234 USD"),
        "{text}"
    );
    assert!(text.contains("(undecodable)") && text.contains("invalid_message"), "{text}");
    let (code, json, _) = cli(&world, &["parked", "list", "--json"]).await;
    assert_eq!(code, 0);
    let entries: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(entries.len(), 4);
    let l1 = entries.iter().find(|e| e["trip_id"] == "l-1").unwrap();
    assert_eq!(l1["reason"], "stripe_rejected");
    assert_eq!(l1["attempts"], 1);
    assert_eq!(l1["amount"], 1234);
    assert!(l1["parked_at_ms"].is_u64());
    let listed: Vec<String> =
        entries.iter().map(|e| e["trip_id"].as_str().unwrap_or("broken").to_owned()).collect();

    // Listing twice changes nothing, order included.
    let (_, again, _) = cli(&world, &["parked", "list", "--json"]).await;
    assert_eq!(again, json);
    let bodies = parked_bodies(&world).await;
    let trips: Vec<String> = bodies
        .iter()
        .map(|b| {
            serde_json::from_slice::<serde_json::Value>(b)
                .ok()
                .map_or("broken".into(), |_| inner(b)["tripID"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(trips, listed, "the queue holds what was listed, in the listed order");
}

#[tokio::test]
async fn replay_by_trip_moves_only_that_trip_and_the_worker_completes_it() {
    let world = World::new("ops-replay").await;
    park(&world, &["r-1", "r-2"]).await;
    let (code, _, stderr) = cli(&world, &["parked", "replay"]).await;
    assert_ne!(code, 0, "replay without a filter is refused");
    assert!(stderr.contains("--all"), "{stderr}");

    let (code, out, _) = cli(&world, &["parked", "replay", "--trip", "r-2", "--dry-run"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("would replay r-2"), "{out}");
    assert_eq!(world.client.depth(PARKED).await, 3, "a dry run changes nothing");

    let (code, out, _) = cli(&world, &["parked", "replay", "--trip", "r-2"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("replayed r-2"), "{out}");
    assert_eq!(world.client.depth(PARKED).await, 2);
    let replayed = world.client.get(WORK).await.expect("r-2 is back in the work queue");
    assert_eq!(inner(&replayed.body)["tripID"], "r-2");
    assert_eq!(replayed.header_int("payment-attempt"), None, "attempt counter reset");
    world
        .client
        .publish(
            "",
            WORK,
            &replayed.body,
            &[
                ("payment-original-exchange", "trip"),
                ("payment-original-routing-key", "payment.cmd.create_session"),
            ],
        )
        .await;

    let worker = world.start_worker(&[]).await;
    let events = world.client.take(EVENTS, 1, Duration::from_secs(10)).await;
    assert_eq!(inner(&events[0].body)["tripID"], "r-2");
    assert_eq!(world.stripe.created_for("r-2").len(), 1);
    assert_eq!(world.client.depth(PARKED).await, 2, "r-1 and the broken one stay parked");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn purge_needs_yes_and_removes_only_what_matches() {
    let world = World::new("ops-purge").await;
    park(&world, &["p-1"]).await;
    let (code, _, stderr) = cli(&world, &["parked", "purge", "--reason", "invalid_message"]).await;
    assert_eq!(code, 0);
    assert!(stderr.contains("--yes"), "{stderr}");
    assert_eq!(world.client.depth(PARKED).await, 2);
    let (code, out, _) =
        cli(&world, &["parked", "purge", "--reason", "invalid_message", "--yes"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("purged (undecodable)"), "{out}");
    let left = parked_bodies(&world).await;
    assert_eq!(left.len(), 1);
    assert_eq!(inner(&left[0])["tripID"], "p-1");
}

#[tokio::test]
async fn a_replay_killed_midway_loses_nothing() {
    let world = World::new("ops-kill").await;
    let worker = world.start_worker(&[]).await;
    worker.stop().await.unwrap();
    let trips: Vec<String> = (0..400).map(|i| format!("k-{i:03}")).collect();
    for trip in &trips {
        world
            .client
            .publish(
                "",
                PARKED,
                &command(trip, "u", 100.0, "USD"),
                &[("payment-park-reason", "retries_exhausted")],
            )
            .await;
    }
    for delay_ms in [40, 120, 250] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_payment-worker"))
            .args(["--rabbitmq-uri", &world.vhost.uri(), "parked", "replay", "--all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let _ = child.start_kill();
        let _ = child.wait().await;
        // Let the broker requeue what the killed connection held.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let parked = world.client.depth(PARKED).await as usize;
        let work = world.client.depth(WORK).await as usize;
        assert!(
            parked + work >= trips.len(),
            "after a kill at {delay_ms}ms: {parked} parked + {work} queued < {}",
            trips.len()
        );
    }
    let mut seen: Vec<String> = Vec::new();
    for queue in [PARKED, WORK] {
        for message in world.client.take(queue, usize::MAX, Duration::from_millis(500)).await {
            seen.push(inner(&message.body)["tripID"].as_str().unwrap().to_owned());
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, trips, "every trip is still parked or back in the work queue");
}

#[tokio::test]
async fn check_passes_on_a_fresh_declaration_and_names_a_differing_argument() {
    let world = World::new("ops-check").await;
    let (code, out, _) = cli(&world, &["topology", "check"]).await;
    assert_eq!(code, 1, "an empty vhost lacks everything");
    assert!(out.contains("missing") && out.contains("queue payment_trip_response"), "{out}");

    let worker = world.start_worker(&[]).await;
    worker.stop().await.unwrap();
    let (code, out, _) = cli(&world, &["topology", "check"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("differs") && !out.contains("missing"), "{out}");

    // Someone redeclares a wait queue with another TTL.
    let channel = world.client.connection.create_channel().await.unwrap();
    channel.queue_delete("payment_wait_2s".into(), Default::default()).await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(5000));
    channel
        .queue_declare(
            "payment_wait_2s".into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            arguments,
        )
        .await
        .unwrap();
    let (code, out, _) = cli(&world, &["topology", "check", "--json"]).await;
    assert_eq!(code, 1);
    let differs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["status"] == "differs")
        .collect();
    assert_eq!(differs.len(), 1, "{out}");
    assert_eq!(differs[0]["object"], "queue payment_wait_2s");
    assert!(differs[0]["detail"].as_str().unwrap().contains("x-message-ttl"), "{out}");
}

#[tokio::test]
async fn definitions_import_into_a_fresh_vhost_and_the_worker_accepts_them() {
    let world = World::new("ops-definitions").await;
    let (code, definitions, _) = cli(
        &world,
        &["topology", "show", "--format", "definitions", "--vhost", world.vhost.name()],
    )
    .await;
    assert_eq!(code, 0);
    let file = std::env::temp_dir().join(format!("{}.json", world.vhost.name()));
    std::fs::write(&file, &definitions).unwrap();
    testkit::vhost::rabbitmqctl(&["import_definitions", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    // The import is asynchronous: wait until check passes.
    let imported = testkit::eventually(Duration::from_secs(15), || async {
        (cli(&world, &["topology", "check"]).await.0 == 0).then_some(())
    })
    .await;
    assert!(imported.is_some(), "the imported topology matches the profile");

    let worker = world.start_worker(&[]).await;
    let (code, out, _) =
        cli(&world, &["send", "--trip-id", "d-1", "--user-id", "u-1", "--amount-cents", "4523"])
            .await;
    assert_eq!(code, 0);
    assert!(out.contains("d-1"), "{out}");
    let events = world.client.take(EVENTS, 1, Duration::from_secs(10)).await;
    assert_eq!(inner(&events[0].body)["amount"], 45.23);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn errors_name_what_went_wrong() {
    let world = World::new("ops-errors").await;
    let (code, _, stderr) = cli(&world, &["parked", "list"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("payment_parked") && stderr.contains("not found"), "{stderr}");
    let dead = testkit::free_loopback_addr();
    let (code, _, stderr) =
        cli_on(&format!("amqp://guest:guest@{dead}/%2f"), &["parked", "list"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("unreachable") || stderr.contains("connecting"), "{stderr}");
    let (code, _, stderr) =
        cli(&world, &["send", "--trip-id", "x", "--user-id", "u", "--amount-cents", "1"]).await;
    assert_ne!(code, 0, "no trip exchange yet");
    assert!(stderr.contains("trip"), "{stderr}");
}

#[tokio::test]
async fn forged_parked_messages_are_shown_escaped_and_never_crash_the_cli() {
    let world = World::new("ops-forged").await;
    let worker = world.start_worker(&[]).await;
    worker.stop().await.unwrap();
    // A parked copy whose trip id carries a newline and a terminal escape, with a first
    // failure time past any calendar.
    let payload = "{\"tripID\":\"t\\nFAKE parked line\\u001b[2J\",\"userID\":\"u\",\"amount\":1,\"currency\":\"USD\"}";
    let body = testkit::amqp::envelope("u", payload.as_bytes());
    let mut headers = FieldTable::default();
    headers.insert("payment-first-failure-at".into(), AMQPValue::LongLongInt(1 << 62));
    headers.insert("payment-parked-at".into(), AMQPValue::LongLongInt(i64::MAX));
    world.client.publish_headers("", PARKED, &body, headers).await;

    let (code, out, stderr) = cli(&world, &["parked", "list"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(out.lines().count(), 1, "one message, one line: {out:?}");
    assert!(!out.trim_end().chars().any(char::is_control), "escaped: {out:?}");
    assert!(out.contains("(not a time: 4611686018427387904)"), "{out}");
    let (code, _, stderr) = cli(&world, &["parked", "replay", "--all"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(world.client.depth(PARKED).await, 0);
    assert_eq!(world.client.depth(WORK).await, 1, "replayed once, not lost");
}

#[tokio::test]
async fn check_without_configure_permission_says_so() {
    let world = World::new("ops-perm").await;
    world.start_worker(&[]).await.stop().await.unwrap();
    let user = format!("{}-reader", world.vhost.name());
    testkit::vhost::rabbitmqctl(&["add_user", &user, "pw"]);
    testkit::vhost::rabbitmqctl(&[
        "set_permissions",
        "-p",
        world.vhost.name(),
        &user,
        "^$",
        ".*",
        ".*",
    ]);
    let uri = format!("amqp://{user}:pw@{}/{}", testkit::vhost::broker_host(), world.vhost.name());
    let (code, out, stderr) = cli_on(&uri, &["topology", "check"]).await;
    testkit::vhost::rabbitmqctl(&["delete_user", &user]);
    assert_ne!(code, 0);
    assert!(stderr.contains("permission refused"), "{out}{stderr}");
    assert!(!out.contains("differs"), "a refused permission is not a difference: {out}");
}

/// Parks `trips` directly (as a worker would have), in this order.
async fn park_directly(world: &World, trips: &[&str]) {
    for trip in trips {
        let body = command(trip, "u", 100.0, "USD");
        world
            .client
            .publish("", PARKED, &body, &[("payment-park-reason", "retries_exhausted")])
            .await;
    }
}

/// The trip ids in the parking queue, in order, emptying it.
async fn parked_trips(world: &World) -> Vec<String> {
    let all = world.client.take(PARKED, usize::MAX, Duration::from_millis(500)).await;
    all.iter().map(|m| inner(&m.body)["tripID"].as_str().unwrap().to_owned()).collect()
}

/// The broker's log lines about this vhost that say a channel was closed for settling a
/// delivery tag it did not know.
fn unknown_tag_errors(world: &World) -> Vec<String> {
    let location = testkit::vhost::rabbitmq_diagnostics(&["log_location"]);
    let path = location.lines().next().expect("the broker's log file").trim().to_owned();
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    // "Channel error on connection … vhost: 'NAME' …", then "… unknown delivery tag N".
    let vhost = format!("vhost: '{}'", world.vhost.name());
    let lines: Vec<&str> = log.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0].contains(&vhost) && w[1].contains("unknown delivery tag"))
        .map(|w| w[1].to_owned())
        .collect()
}

/// A replay that takes the last message of the queue hands back only what it did not take:
/// no tag is settled twice, so the broker never closes the channel under the command (which
/// could leave it waiting for ever).
#[tokio::test]
async fn a_replay_settles_each_delivery_tag_once() {
    let world = World::new("ops-tags").await;
    world.start_worker(&[]).await.stop().await.unwrap();
    park_directly(&world, &["t-1", "t-2", "t-3"]).await;
    let (code, out, stderr) = cli(&world, &["parked", "replay", "--trip", "t-3"]).await;
    assert_eq!(code, 0, "{out}{stderr}");
    let (code, _, stderr) = cli(&world, &["parked", "replay", "--all", "--limit", "1"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(world.client.depth(WORK).await, 2, "t-3 and t-1 replayed");
    assert_eq!(parked_trips(&world).await, ["t-2"]);
    let errors = unknown_tag_errors(&world);
    assert!(errors.is_empty(), "the broker closed a channel: {errors:?}");
}

/// On a quorum parking queue every message handed back counts against a delivery limit
/// (RabbitMQ 4.0–4.2 counts `basic.nack(requeue)`, and applies a limit of 20); looking at
/// parked payments, however often, must never make the broker drop them. The limit is set
/// low here with a policy, as an operator (or RabbitMQ 4's default) would.
#[tokio::test]
async fn browsing_a_quorum_parking_queue_spends_no_delivery_count() {
    let world = World::new("ops-quorum-browse").await;
    let profile = repo_path("topology/quorum.toml");
    let profile = profile.to_str().unwrap();
    world.start_worker(&["--topology", profile]).await.stop().await.unwrap();
    testkit::vhost::rabbitmqctl(&[
        "set_policy",
        "-p",
        world.vhost.name(),
        "--apply-to",
        "queues",
        "parked-limit",
        "^payment_parked$",
        r#"{"delivery-limit": 3}"#,
    ]);
    let trips = ["b-1", "b-2", "b-3", "b-4", "b-5"];
    park_directly(&world, &trips).await;
    let quorum = |args: &[&str]| {
        let mut all = vec!["--topology", profile];
        all.extend_from_slice(args);
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for round in 0..5 {
        for args in [
            quorum(&["parked", "list"]),
            quorum(&["parked", "list", "--limit", "2"]),
            quorum(&["parked", "replay", "--all", "--dry-run"]),
            quorum(&["parked", "purge", "--reason", "retries_exhausted"]),
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, _, stderr) = cli(&world, &args).await;
            assert_eq!(code, 0, "round {round}, {args:?}: {stderr}");
        }
        assert_eq!(world.client.depth(PARKED).await, 5, "round {round}: a parked payment dropped");
    }
    let args = quorum(&["parked", "replay", "--trip", "b-4"]);
    let (code, _, stderr) = cli(&world, &args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(world.client.depth(WORK).await, 1, "b-4 replayed");
    assert_eq!(parked_trips(&world).await, ["b-1", "b-2", "b-3", "b-5"], "the order is kept");
    assert!(unknown_tag_errors(&world).is_empty());
}

/// A parked payment that first arrived two days ago may have outlived its idempotency key at
/// Stripe: a replay could create a second session. `parked replay` refuses it, says why and
/// exits non-zero, unless `--allow-new-session`; one parked today is replayed as ever.
#[tokio::test]
async fn a_replay_refuses_a_payment_older_than_its_idempotency_key() {
    let world = World::new("ops-old").await;
    world.start_worker(&[]).await.stop().await.unwrap();
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as i64;
    for (trip, age_ms) in [("old-trip", 2 * 24 * 3_600_000), ("new-trip", 3_600_000)] {
        let mut headers = FieldTable::default();
        let first_seen = AMQPValue::LongLongInt(now_ms - age_ms);
        headers.insert("payment-first-seen-at".into(), first_seen);
        headers.insert(
            "payment-park-reason".into(),
            AMQPValue::LongString("stripe_unavailable".into()),
        );
        let body = command(trip, "u", 100.0, "USD");
        world.client.publish_headers("", PARKED, &body, headers).await;
    }

    let (code, out, stderr) = cli(&world, &["parked", "replay", "--all"]).await;
    assert_ne!(code, 0, "a refusal is not a success: {stderr}");
    assert!(out.contains("new-trip") && !out.contains("old-trip"), "{out}");
    assert!(
        stderr.contains("refused")
            && stderr.contains("old-trip")
            && stderr.contains("--allow-new-session"),
        "{stderr}"
    );
    assert_eq!(world.client.depth(PARKED).await, 1, "the old one is still parked");
    assert_eq!(world.client.depth(WORK).await, 1, "the new one is replayed");

    let (code, out, stderr) =
        cli(&world, &["parked", "replay", "--all", "--allow-new-session"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("old-trip"), "{out}");
    assert_eq!(world.client.depth(PARKED).await, 0);
    assert_eq!(world.client.depth(WORK).await, 2);
}
