//! `make bench`: payment-worker measured side by side with its baselines, on one broker, in
//! one run. Every figure is a median of several runs with min and max; the ratios matter more
//! than the absolute numbers on a shared machine. Results print as Markdown (BENCHMARKS.md).
//!
//! BENCH_RUNS (default 3) sets the number of runs per figure; BENCH_N the command count of the
//! throughput runs (default 20000); BENCH_SECTIONS which sections run (default
//! `1,2,3,4,5,6,7,8,9`); BENCH_POD_LOG a file the worker processes log into (at info level).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use payment_worker::contract::CreateSession;
use payment_worker::stripe::{CheckoutUrls, StripeApi};
use testkit::amqp::{Client, command, inner};
use testkit::names::{EVENTS, PARKED, WORK};
use testkit::node::RabbitNode;
use testkit::pod::{Launch, Pod, ready_within};
use testkit::stats::{env_usize, percentile};
use testkit::stripe::{Behaviour, Outage, SECRET_KEY, StripeStandin};
use testkit::vhost::Vhost;

const WORKER: &str = env!("CARGO_BIN_EXE_payment-worker");
/// For the sections that measure the worker itself against a stand-in without a rate limit:
/// the pacer's per-second limit starts high instead of at Stripe's 25 a second (it would
/// grow while it is the bottleneck, but slowly).
const UNPACED: &[&str] = &["--stripe-initial-rps", "100000"];

/// Median, min and max of a sample.
#[derive(Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self { median: values[values.len() / 2], min: values[0], max: values[values.len() - 1] }
    }

    fn show(&self, unit: &str) -> String {
        format!("{:.1}{unit} ({:.1}–{:.1})", self.median, self.min, self.max)
    }
}

async fn start_pod(
    uri: &str,
    stripe: Option<&StripeStandin>,
    prefetch: usize,
    extra: &[&str],
    env: &[(&str, String)],
) -> (Pod, Duration) {
    let level = if std::env::var_os("BENCH_POD_LOG").is_some() { "info" } else { "warn" };
    let mut launch = Launch::new(WORKER, testkit::world::run_args(uri, stripe))
        .args(["--prefetch", &prefetch.to_string()])
        .args(["--log-format", "text", "--queue-depth-interval", "60s"])
        .args(extra)
        .env("RUST_LOG", level);
    for (key, value) in env {
        launch = launch.env(key, value);
    }
    // BENCH_POD_LOG=path appends the pods' logs there.
    if let Ok(path) = std::env::var("BENCH_POD_LOG") {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        launch = launch.log(file.expect("BENCH_POD_LOG is writable"));
    }
    let started = Instant::now();
    let pod = launch.start(READY_WITHIN).await;
    (pod, started.elapsed())
}

/// How long a worker may take to become ready (a broker cold start included).
const READY_WITHIN: Duration = Duration::from_secs(60);

/// (CPU seconds, peak RSS MiB, current RSS MiB) of a process, from /proc.
fn usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks / 100.0, kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0)
}

async fn connect(uri: &str) -> Connection {
    Connection::connect(uri, ConnectionProperties::default()).await.unwrap()
}

/// Declares the topology the way the worker does, without running it.
async fn declare(uri: &str) {
    let topology = payment_worker::broker::topology::Topology::load(None).unwrap();
    let connection = connect(uri).await;
    topology.declare(&connection.create_channel().await.unwrap()).await.unwrap();
    let _ = connection.close(200, "declared".into()).await;
}

/// Fills the work queue with `n` commands (trip ids `prefix-i`).
async fn preload(uri: &str, n: usize, prefix: &str) {
    let connection = connect(uri).await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut confirms = Vec::with_capacity(512);
    for i in 0..n {
        let body = command(&format!("{prefix}-{i}"), "rider", 1500.0, "USD");
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        confirms.push(
            channel
                .basic_publish(
                    "trip".into(),
                    "payment.cmd.create_session".into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await
                .unwrap(),
        );
        if confirms.len() == 512 {
            for confirm in confirms.drain(..) {
                confirm.await.unwrap();
            }
        }
    }
    for confirm in confirms {
        confirm.await.unwrap();
    }
    let _ = connection.close(200, "loaded".into()).await;
}

/// Waits until `queue` holds `n` messages; returns when that happened.
async fn wait_depth(uri: &str, queue: &str, n: u32, timeout: Duration) -> Instant {
    let connection = connect(uri).await;
    let deadline = Instant::now() + timeout;
    loop {
        if testkit::amqp::queue_depth(&connection, queue).await.unwrap_or(0) >= n {
            let _ = connection.close(200, "done".into()).await;
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{queue} never reached {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Commands per second through the real worker: the work queue preloaded with `n`, then a
/// worker started; timed from its readiness to the last event.
async fn worker_throughput(
    n: usize,
    prefetch: usize,
    latency: Duration,
    env: &[(&str, String)],
) -> (f64, (f64, f64)) {
    let vhost = Vhost::new("bench");
    let stripe = StripeStandin::start().await;
    stripe.set_latency(latency);
    declare(&vhost.uri()).await;
    preload(&vhost.uri(), n, "w").await;
    let (pod, _) = start_pod(&vhost.uri(), Some(&stripe), prefetch, UNPACED, env).await;
    let (cpu0, _, _) = usage(pod.child.id().unwrap());
    let start = Instant::now();
    let done = wait_depth(&vhost.uri(), EVENTS, n as u32, Duration::from_secs(600)).await;
    let (cpu1, peak, _) = usage(pod.child.id().unwrap());
    drop(pod);
    (
        n as f64 / done.duration_since(start).as_secs_f64(),
        ((cpu1 - cpu0) * 10_000.0 / n as f64, peak),
    )
}

/// The same through a bare lapin loop doing only what is unavoidable per message: consume,
/// publish one event with a confirm, ack. Deliveries are handled concurrently up to the
/// prefetch, as the worker does.
async fn bare_throughput(n: usize, prefetch: usize) -> f64 {
    let vhost = Vhost::new("bench-bare");
    declare(&vhost.uri()).await;
    preload(&vhost.uri(), n, "b").await;
    let connection = connect(&vhost.uri()).await;
    let publish = connection.create_channel().await.unwrap();
    publish.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let consume = connection.create_channel().await.unwrap();
    consume.basic_qos(u16::try_from(prefetch).unwrap(), BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume
        .basic_consume(
            WORK.into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    let body = command("bare", "rider", 1500.0, "USD");
    for _ in 0..n {
        let Some(Ok(delivery)) = consumer.next().await else { break };
        let (publish, body) = (publish.clone(), body.clone());
        tokio::spawn(async move {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            let confirm = publish
                .basic_publish(
                    "trip".into(),
                    "payment.event.session_created".into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &body,
                    properties,
                )
                .await
                .unwrap();
            confirm.await.unwrap();
            delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
        });
    }
    wait_depth(&vhost.uri(), EVENTS, n as u32, Duration::from_secs(600)).await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = connection.close(200, "done".into()).await;
    rate
}

/// A consumer built the way the Go service was: prefetch 1, one message at a time, sleeping
/// 1 s, 2 s, 4 s in process before retrying a failed Stripe call.
async fn go_style(uri: &str, stripe: &StripeStandin, n: usize) {
    let api =
        StripeApi::new(&stripe.base_url(), SECRET_KEY.to_owned().into(), Duration::from_secs(10))
            .unwrap();
    let urls = CheckoutUrls {
        success: "http://localhost:3000?payment=success".into(),
        cancel: "http://localhost:3000?payment=cancel".into(),
    };
    let connection = connect(uri).await;
    let publish = connection.create_channel().await.unwrap();
    publish.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let consume = connection.create_channel().await.unwrap();
    consume.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume
        .basic_consume(
            WORK.into(),
            "go".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..n {
        let Some(Ok(delivery)) = consumer.next().await else { break };
        let cmd = CreateSession::decode(&delivery.data).unwrap();
        let mut session = api.create_checkout_session(&cmd, &urls).await;
        for delay in [1, 2, 4] {
            if session.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(delay)).await;
            session = api.create_checkout_session(&cmd, &urls).await;
        }
        let body = cmd.session_created(&session.unwrap().id);
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        publish
            .basic_publish(
                "trip".into(),
                "payment.event.session_created".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        delivery.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Seconds to finish `n` commands, a fifth of them failing their first Stripe call: the worker
/// against the Go-style consumer.
async fn retry_comparison(n: usize) -> (f64, f64) {
    let mut out = Vec::new();
    for go in [false, true] {
        let vhost = Vhost::new("bench-retry");
        let stripe = StripeStandin::start().await;
        for i in (0..n).step_by(5) {
            stripe.script(&format!("r-{i}"), [Behaviour::unavailable()]);
        }
        declare(&vhost.uri()).await;
        preload(&vhost.uri(), n, "r").await;
        let start = Instant::now();
        if go {
            go_style(&vhost.uri(), &stripe, n).await;
        } else {
            let (pod, _) = start_pod(&vhost.uri(), Some(&stripe), 16, UNPACED, &[]).await;
            wait_depth(&vhost.uri(), EVENTS, n as u32, Duration::from_secs(600)).await;
            drop(pod);
        }
        out.push(start.elapsed().as_secs_f64());
    }
    (out[0], out[1])
}

/// Payments a second as a share of Stripe's limit, and the share of calls answered 429:
/// `replicas` pods at prefetch 32 against a stand-in allowing `limit` requests a second, with
/// `n` payments waiting in the work queue.
async fn rate_limited_goodput(
    n: usize,
    replicas: usize,
    limit: usize,
    env: &[(&str, String)],
) -> (f64, f64) {
    let vhost = Vhost::new("bench-rate");
    let stripe = StripeStandin::start().await;
    stripe.set_rate_limit(Some(limit));
    declare(&vhost.uri()).await;
    preload(&vhost.uri(), n, "g").await;
    let start = Instant::now();
    let mut pods = Vec::new();
    for _ in 0..replicas {
        pods.push(start_pod(&vhost.uri(), Some(&stripe), 32, &[], env).await.0);
    }
    let done = wait_depth(&vhost.uri(), EVENTS, n as u32, Duration::from_secs(600)).await;
    let seen = stripe.seen();
    let limited = seen.iter().filter(|s| s.status == 429).count();
    let rate = n as f64 / done.duration_since(start).as_secs_f64();
    if std::env::var_os("BENCH_TIMELINE").is_some() {
        print_timeline(replicas, start, done, &seen);
    }
    (rate / limit as f64, limited as f64 / seen.len() as f64)
}

/// BENCH_TIMELINE=1: where a rate-limited run's time went, on stderr: Stripe's answers per
/// half second from the start, accepted and 429, and when the last was accepted.
fn print_timeline(replicas: usize, start: Instant, done: Instant, seen: &[testkit::stripe::Seen]) {
    let since = |at: Instant| at.duration_since(start).as_secs_f64();
    let last = seen.iter().filter(|s| s.status != 429).map(|s| s.at).max().unwrap_or(start);
    eprintln!(
        "{replicas} pod(s): last accepted call at {:.2} s, every event at {:.2} s",
        since(last),
        since(done)
    );
    let halves = (since(done) * 2.0) as usize + 1;
    let (mut accepted, mut limited) = (vec![0; halves], vec![0; halves]);
    for s in seen {
        let half = ((since(s.at) * 2.0) as usize).min(halves - 1);
        if s.status == 429 {
            limited[half] += 1;
        } else {
            accepted[half] += 1;
        }
    }
    eprintln!("accepted per 0.5 s: {accepted:?}\n429 per 0.5 s:      {limited:?}");
}

/// A 30 s outage (503s) with `n` payments arriving at its start, one pod, Stripe allowing 100
/// requests a second (live mode): Stripe calls a second while down, and seconds from Stripe's
/// return to the backlog drained.
async fn outage_recovery(n: usize) -> (f64, f64) {
    let vhost = Vhost::new("bench-outage");
    let stripe = StripeStandin::start().await;
    stripe.set_rate_limit(Some(100));
    declare(&vhost.uri()).await;
    let (pod, _) = start_pod(&vhost.uri(), Some(&stripe), 16, &[], &[]).await;
    stripe.set_outage(Some(Outage::Unavailable));
    let down = Instant::now();
    preload(&vhost.uri(), n, "o").await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down.elapsed())).await;
    let calls = stripe.seen().len();
    stripe.set_outage(None);
    let up = Instant::now();
    let done = wait_depth(&vhost.uri(), EVENTS, n as u32, Duration::from_secs(600)).await;
    drop(pod);
    (calls as f64 / up.duration_since(down).as_secs_f64(), done.duration_since(up).as_secs_f64())
}

/// Per tier: the time between a trip's failed request and its next one, with all three tiers
/// busy at once (trips failing 1, 2 and 3 times, interleaved).
async fn delay_accuracy(per_tier: usize) -> Vec<(String, Vec<f64>)> {
    let vhost = Vhost::new("bench-delay");
    let stripe = StripeStandin::start().await;
    for i in 0..per_tier * 3 {
        let failures = 1 + i % 3;
        // Failures of single payments (409): a Stripe-wide failure of every payment would be
        // an outage, deferred rather than retried.
        stripe.script(&format!("d-{i}"), std::iter::repeat_n(Behaviour::conflict(), failures));
    }
    declare(&vhost.uri()).await;
    let (pod, _) = start_pod(&vhost.uri(), Some(&stripe), 64, UNPACED, &[]).await;
    let client = testkit::amqp::Client::connect(&vhost.uri()).await;
    // Spread over 6 s, so the 1 s tier keeps working while 4 s retries wait.
    for i in 0..per_tier * 3 {
        client.send_command(&command(&format!("d-{i}"), "rider", 1500.0, "USD")).await;
        tokio::time::sleep(Duration::from_secs(6) / u32::try_from(per_tier * 3).unwrap()).await;
    }
    wait_depth(&vhost.uri(), EVENTS, (per_tier * 3) as u32, Duration::from_secs(120)).await;
    drop(pod);
    let mut tiers: HashMap<usize, Vec<f64>> = HashMap::new();
    let mut by_trip: HashMap<String, Vec<Instant>> = HashMap::new();
    for seen in stripe.seen() {
        let trip = seen.params.get("metadata[trip_id]").cloned().unwrap_or_default();
        by_trip.entry(trip).or_default().push(seen.at);
    }
    for times in by_trip.values_mut() {
        times.sort();
        for (tier, pair) in times.windows(2).enumerate() {
            tiers.entry(tier).or_default().push(pair[1].duration_since(pair[0]).as_secs_f64());
        }
    }
    ["1s", "2s", "4s"]
        .iter()
        .enumerate()
        .map(|(i, label)| (label.to_string(), tiers.remove(&i).unwrap_or_default()))
        .collect()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the command line.
    let runs = env_usize("BENCH_RUNS", 3);
    let sections = std::env::var("BENCH_SECTIONS").unwrap_or_else(|_| "1,2,3,4,5,6,7,8,9".into());
    let section = |n: &str| sections.split(',').any(|s| s.trim() == n);
    let n = env_usize("BENCH_N", 20_000);
    println!("# payment-worker benchmarks\n");
    println!(
        "{} runs per figure (median, min–max); {} commands per throughput run; machine: {} cores, {}.\n",
        runs,
        n,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model()
    );

    // 1. Happy path against the broker ceiling.
    let mut resources = Vec::new();
    if section("1") {
        println!(
            "## 1. Happy-path throughput against the bare lapin loop (Stripe stand-in answering at once)\n"
        );
        println!(
            "| prefetch | payment-worker (cmd/s) | bare loop (cmd/s) | ratio |\n|---|---|---|---|"
        );
        for prefetch in [16, 64, 256] {
            let (mut worker, mut bare) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let (rate, usage) = worker_throughput(n, prefetch, Duration::ZERO, &[]).await;
                worker.push(rate);
                resources.push(usage);
                bare.push(bare_throughput(n, prefetch).await);
            }
            let (w, b) = (Stat::of(worker), Stat::of(bare));
            println!(
                "| {prefetch} | {} | {} | {:.0}% |",
                w.show(""),
                b.show(""),
                100.0 * w.median / b.median
            );
        }
    }

    // 2. Under Stripe latency.
    if section("2") {
        println!("\n## 2. Throughput under Stripe latency (cmd/s)\n");
        println!(
            "| Stripe latency | prefetch 16 | prefetch 64 | prefetch 256 | prefetch 1024 |\n|---|---|---|---|---|"
        );
        for latency_ms in [50u64, 300] {
            let mut cells = Vec::new();
            for prefetch in [16usize, 64, 256, 1024] {
                let expected = prefetch as f64 * 1000.0 / latency_ms as f64;
                let count = ((expected * 8.0) as usize).clamp(500, n);
                let mut rates = Vec::new();
                for _ in 0..runs {
                    rates.push(
                        worker_throughput(count, prefetch, Duration::from_millis(latency_ms), &[])
                            .await
                            .0,
                    );
                }
                cells.push(Stat::of(rates).show(""));
            }
            println!("| {latency_ms} ms | {} |", cells.join(" | "));
        }
    }

    // 3. What broker-level retry buys.
    if section("3") {
        let retry_n = env_usize("BENCH_RETRY_N", 100);
        println!("\n## 3. {retry_n} commands, 20% failing their first Stripe call\n");
        let (mut ours, mut go) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (a, b) = retry_comparison(retry_n).await;
            ours.push(a);
            go.push(b);
        }
        let (ours, go) = (Stat::of(ours), Stat::of(go));
        println!(
            "| consumer | time to finish (s) |\n|---|---|\n| payment-worker (broker-level retry, prefetch 16) | {} |\n| Go-style (prefetch 1, in-process sleep 1/2/4 s) | {} |\n\nGo-style takes {:.0}× as long.",
            ours.show(""),
            go.show(""),
            go.median / ours.median
        );
    }

    // 4. Retry delay accuracy.
    if section("4") {
        println!("\n## 4. Retry delay accuracy, all tiers busy at once\n");
        println!("| tier | retries | p50 (s) | p99 (s) | max (s) |\n|---|---|---|---|---|");
        for (tier, delays) in delay_accuracy(60).await {
            println!(
                "| {tier} | {} | {:.3} | {:.3} | {:.3} |",
                delays.len(),
                percentile(&delays, 0.5),
                percentile(&delays, 0.99),
                percentile(&delays, 1.0)
            );
        }
    }

    // 5. Resources (CPU and peak memory come from section 1's runs).
    if section("5") && !resources.is_empty() {
        println!("\n## 5. Resources of the worker process\n");
        let cpu = Stat::of(resources.iter().map(|r| r.0).collect());
        let peak = Stat::of(resources.iter().map(|r| r.1).collect());
        let (mut idle, mut startup) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let vhost = Vhost::new("bench-res");
            let (pod, ready_after) = start_pod(&vhost.uri(), None, 16, &[], &[]).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            idle.push(usage(pod.child.id().unwrap()).2);
            startup.push(ready_after.as_secs_f64() * 1000.0);
            drop(pod);
        }
        println!("| measure | value |\n|---|---|");
        println!("| CPU seconds per 10,000 commands (happy path) | {} |", cpu.show(" s"));
        println!("| peak resident memory under load | {} |", peak.show(" MiB"));
        println!("| idle resident memory | {} |", Stat::of(idle).show(" MiB"));
        println!("| process start to ready | {} |", Stat::of(startup).show(" ms"));
    }

    // 6. Recovery.
    if section("6") {
        println!("\n## 6. Recovery\n");
        let (mut replace, mut broker) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let vhost = Vhost::new("bench-res");
            let (mut pod, _) = start_pod(&vhost.uri(), None, 16, &[], &[]).await;
            let killed = Instant::now();
            pod.child.start_kill().unwrap();
            let _ = pod.child.wait().await;
            let (_replacement, _) = start_pod(&vhost.uri(), None, 16, &[], &[]).await;
            replace.push(killed.elapsed().as_secs_f64() * 1000.0);
        }
        let node = RabbitNode::start("bench");
        for _ in 0..runs {
            let (pod, _) = start_pod(&node.uri(), None, 16, &[], &[]).await;
            tokio::task::block_in_place(|| node.kill_and_restart());
            let back = Instant::now();
            assert!(ready_within(pod.http, READY_WITHIN).await, "the worker never came back");
            broker.push(back.elapsed().as_secs_f64() * 1000.0);
            drop(pod);
        }
        println!("| measure | value |\n|---|---|");
        println!(
            "| SIGKILL of a pod to its replacement consuming | {} |",
            Stat::of(replace).show(" ms")
        );
        println!(
            "| broker back up (after SIGKILL and cold start) to consuming again | {} |",
            Stat::of(broker).show(" ms")
        );
    }

    if section("7") {
        flow_control(runs).await;
    }

    if section("9") {
        sick_payments_and_sick_stripe(runs).await;
    }

    // 8. What exporting spans costs.
    if section("8") {
        println!("\n## 8. Tracing: spans exported over OTLP/HTTP, or not (prefetch 64)\n");
        let collector = testkit::otlp::Collector::start("127.0.0.1:0").await;
        // A collector that accepts and never answers, and an address that refuses.
        let (silent, _silent) = testkit::silent_listener().await;
        let silent_endpoint = format!("http://{silent}");
        let refusing_endpoint = format!("http://{}", testkit::free_loopback_addr());
        let cases = [
            ("not exported (variables unset)", None),
            ("exported to a local collector", Some(collector.endpoint())),
            ("collector refusing connections", Some(refusing_endpoint)),
            ("collector accepting, never answering", Some(silent_endpoint)),
        ];
        let mut rates = vec![Vec::new(); cases.len()];
        let mut cpus = vec![Vec::new(); cases.len()];
        for _ in 0..runs {
            for (i, (_, endpoint)) in cases.iter().enumerate() {
                let env: Vec<(&str, String)> =
                    endpoint.iter().map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e.clone())).collect();
                let (rate, (cpu, _)) = worker_throughput(n, 64, Duration::ZERO, &env).await;
                rates[i].push(rate);
                cpus[i].push(cpu);
            }
        }
        println!("| spans | cmd/s | CPU seconds per 10,000 commands |\n|---|---|---|");
        let mut medians = Vec::new();
        for (((name, _), rate), cpu) in cases.iter().zip(rates).zip(cpus) {
            let rate = Stat::of(rate);
            medians.push(rate.median);
            println!("| {name} | {} | {} |", rate.show(""), Stat::of(cpu).show(" s"));
        }
        println!(
            "\nAgainst no export: a local collector keeps {:.0}% of the throughput, a refusing \
             one {:.0}%, a hanging one {:.0}%; the collector received {} spans.",
            100.0 * medians[1] / medians[0],
            100.0 * medians[2] / medians[0],
            100.0 * medians[3] / medians[0],
            collector.spans().len()
        );
    }
}

/// 7. Flow control in front of Stripe.
async fn flow_control(runs: usize) {
    println!("\n## 7. Flow control: Stripe's rate limit and outages\n");
    println!(
        "| pods (prefetch 32) | 750 payments against a 25/s limit: goodput, share of the limit | calls answered 429 |\n|---|---|---|"
    );
    let shared = [("STRIPE_ACCOUNT_RPS", "25".to_owned())];
    for (replicas, env) in
        [(1, &[][..]), (2, &[]), (3, &[]), (1, &shared), (2, &shared), (3, &shared)]
    {
        let (mut goodput, mut limited) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (share, rejected) = rate_limited_goodput(750, replicas, 25, env).await;
            goodput.push(share * 100.0);
            limited.push(rejected * 100.0);
        }
        let setting = if env.is_empty() { "" } else { ", `STRIPE_ACCOUNT_RPS=25`" };
        println!(
            "| {replicas}{setting} | {} | {} |",
            Stat::of(goodput).show("%"),
            Stat::of(limited).show("%")
        );
    }
    let (mut down, mut drain) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (calls, seconds) = outage_recovery(1000).await;
        down.push(calls);
        drain.push(seconds);
    }
    println!(
        "\n| 30 s outage, 1,000 payments waiting, 1 pod, Stripe allowing 100/s | value |\n|---|---|"
    );
    println!("| Stripe calls a second while down | {} |", Stat::of(down).show(""));
    println!("| Stripe's return to the backlog drained | {} |", Stat::of(drain).show(" s"));
}

/// Settings that turn the breaker's grading off: every Stripe-wide failure is the payment's
/// own (an attempt spent), the circuit never opens, nothing is throttled.
const NO_BREAKER: &[&str] = &[
    "--stripe-breaker-window",
    "1000",
    "--stripe-breaker-min-calls",
    "1000",
    "--stripe-breaker-consecutive",
    "1000",
    "--stripe-throttle-k",
    "100",
];

/// What one flow-control scenario gave.
struct Sickness {
    /// Of the payments sent during the trouble (10 s or more before its end), the share done
    /// before it ended; for poison runs, of the healthy payments, the share done.
    done: f64,
    p50: f64,
    p99: f64,
    calls_per_payment: f64,
    openings: f64,
    parked: u32,
}

/// One kind of trouble: `rate` payments a second for `seconds`, of which every
/// `poison_every`-th fails on every call (503); `brownout`: that share of all other calls
/// fails (429, 503, dropped connection) until the payments stop.
struct Trouble {
    name: &'static str,
    brownout: Option<f64>,
    poison_every: Option<usize>,
    rate: u64,
    seconds: u64,
}

/// Two pods (prefetch 16, 1 s Stripe timeout) through `trouble`. Times are from a payment's
/// publish to its event, for the payments that are not poison.
async fn sickness_run(trouble: &Trouble, extra: &[&str]) -> Sickness {
    let Trouble { brownout, poison_every, rate, seconds, .. } = *trouble;
    let vhost = Vhost::new("bench-sick");
    let stripe = StripeStandin::start().await;
    declare(&vhost.uri()).await;
    let mut args = vec!["--stripe-timeout", "1s"];
    args.extend_from_slice(extra);
    let mut pods = Vec::new();
    for _ in 0..2 {
        pods.push(start_pod(&vhost.uri(), Some(&stripe), 16, &args, &[]).await.0);
    }
    let n = (rate * seconds) as usize;
    let trips: Vec<String> = (0..n).map(|i| format!("sick-{i:05}")).collect();
    let poison: Vec<&String> = match poison_every {
        Some(every) => trips.iter().skip(every / 2).step_by(every).collect(),
        None => Vec::new(),
    };
    for trip in &poison {
        stripe.script(trip, (0..20).map(|_| Behaviour::unavailable()));
    }
    stripe.set_brownout(brownout);
    let healthy = n - poison.len();
    let collector = {
        let uri = vhost.uri();
        tokio::spawn(async move {
            // What is not done 30 s after the last payment was sent is not coming (parked).
            let within = Duration::from_secs(seconds + 30);
            Client::connect(&uri).await.take(EVENTS, healthy, within).await
        })
    };
    let client = Client::connect(&vhost.uri()).await;
    let mut sent = HashMap::new();
    let started = Instant::now();
    for (i, trip) in trips.iter().enumerate() {
        tokio::time::sleep_until((started + Duration::from_secs(i as u64) / rate as u32).into())
            .await;
        sent.insert(trip.clone(), Instant::now());
        client.send_command(&command(trip, "u", 1500.0, "USD")).await;
    }
    let end = Instant::now();
    stripe.set_brownout(None);
    let events = collector.await.expect("collector");
    let at: HashMap<String, Instant> = events
        .iter()
        .map(|e| (inner(&e.body)["tripID"].as_str().unwrap_or_default().to_owned(), e.at))
        .collect();
    let mut latencies: Vec<f64> = at
        .iter()
        .filter_map(|(trip, done)| Some(done.duration_since(*sent.get(trip)?).as_secs_f64()))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let done = if brownout.is_some() {
        let early: Vec<&String> = trips
            .iter()
            .filter(|t| sent[*t] + Duration::from_secs(10) < end && !poison.contains(t))
            .collect();
        let before = early.iter().filter(|t| at.get(**t).is_some_and(|d| *d < end)).count();
        before as f64 / early.len().max(1) as f64
    } else {
        at.len() as f64 / healthy as f64
    };
    if !poison.is_empty() {
        let parked = testkit::eventually(Duration::from_secs(60), || async {
            (client.depth(PARKED).await as usize >= poison.len()).then_some(())
        });
        parked.await;
    }
    let mut openings = 0.0;
    for pod in &pods {
        let (_, body) = testkit::http_get(pod.http, "/metrics").await.unwrap_or_default();
        let sample = r#"payment_worker_stripe_circuit_transitions_total{to="open"} "#;
        openings +=
            body.lines().find_map(|l| l.strip_prefix(sample)?.parse::<f64>().ok()).unwrap_or(0.0);
    }
    Sickness {
        done,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        calls_per_payment: stripe.seen().len() as f64 / n as f64,
        openings,
        parked: client.depth(PARKED).await,
    }
}

async fn sick_payments_and_sick_stripe(runs: usize) {
    println!(
        "\n## 9. A sick Stripe or sick payments: flow control as shipped, and without grading\n"
    );
    println!(
        "Two pods. Brownouts: 10 payments a second for 40 s, that share of all calls failing \
         (429, 503, dropped connection) until the last is sent; \"done\" is the share of those \
         sent 10 s or more before the end that completed before it. Poison: 20 payments a \
         second for 15 s, that share failing on every call (503); \"done\" is the share of the \
         healthy ones completed. Times are publish to event, poison excluded. Without grading: \
         every Stripe-wide failure spends an attempt, the circuit never opens, nothing is \
         throttled.\n"
    );
    println!(
        "| trouble | flow control | done | p50 | p99 | Stripe calls per payment | circuit openings | parked |\n|---|---|---|---|---|---|---|---|"
    );
    let brownout = |name, share| Trouble {
        name,
        brownout: Some(share),
        poison_every: None,
        rate: 10,
        seconds: 40,
    };
    let poison =
        |name, every| Trouble { name, brownout: None, poison_every: every, rate: 20, seconds: 15 };
    let cases = [
        brownout("brownout 25%", 0.25),
        brownout("brownout 50%", 0.5),
        brownout("brownout 75%", 0.75),
        poison("poison 0%", None),
        poison("poison 1%", Some(100)),
        poison("poison 5%", Some(20)),
    ];
    for trouble in &cases {
        for (mode, extra) in [("as shipped", &[][..]), ("without grading", NO_BREAKER)] {
            let mut rows = Vec::new();
            for _ in 0..runs {
                rows.push(sickness_run(trouble, extra).await);
            }
            let stat = |f: fn(&Sickness) -> f64| Stat::of(rows.iter().map(f).collect());
            println!(
                "| {} | {mode} | {} | {} | {} | {} | {} | {} |",
                trouble.name,
                stat(|r| r.done * 100.0).show("%"),
                stat(|r| r.p50).show(" s"),
                stat(|r| r.p99).show(" s"),
                stat(|r| r.calls_per_payment).show(""),
                stat(|r| r.openings).show(""),
                stat(|r| f64::from(r.parked)).show(""),
            );
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
