//! A world per test: its own vhost, its own Stripe stand-in, workers started on demand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use payment_worker::app::App;
use payment_worker::cli::{Cli, Command};
use payment_worker::consumer::WorkerError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::Client;
use crate::http_get;
use crate::pod::{Launch, Pod, ready_within};
use crate::stripe::{SECRET_KEY, StripeStandin};
use crate::vhost::Vhost;

pub use crate::names::{EVENTS, PARKED, WAIT_QUEUES, WORK};

pub struct World {
    pub stripe: StripeStandin,
    pub client: Client,
    // Last: dropped after the connections above are closed.
    pub vhost: Vhost,
}

/// A worker running in this process.
pub struct RunningWorker {
    pub http: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), WorkerError>>,
}

impl RunningWorker {
    /// Asks the worker to stop and waits for it.
    pub async fn stop(self) -> Result<(), WorkerError> {
        self.shutdown.cancel();
        self.handle.await.expect("worker task")
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub async fn join(self) -> Result<(), WorkerError> {
        self.handle.await.expect("worker task")
    }
}

/// A path in the repository (testkit's parent directory).
///
/// # Panics
/// Never: testkit lives in the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").join(relative)
}

impl World {
    pub async fn new(test: &str) -> Self {
        let vhost = Vhost::new(test);
        let client = Client::connect(&vhost.uri()).await;
        let stripe = StripeStandin::start().await;
        Self { stripe, client, vhost }
    }

    /// The command-line arguments of a worker on this world's vhost and Stripe stand-in.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        self.args_with(Some(&self.stripe), extra)
    }

    /// The same without a Stripe key: mock mode.
    pub fn mock_args(&self, extra: &[&str]) -> Vec<String> {
        self.args_with(None, extra)
    }

    fn args_with(&self, stripe: Option<&StripeStandin>, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["payment-worker".to_owned()];
        args.extend(run_args(&self.vhost.uri(), stripe));
        args.extend(
            ["--http-addr", "127.0.0.1:0", "--queue-depth-interval", "200ms"].map(String::from),
        );
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// Starts a worker in this process; returns once it has started (not necessarily ready).
    pub async fn spawn_worker(&self, extra: &[&str]) -> RunningWorker {
        self.spawn_with(self.args(extra)).await
    }

    /// Starts a worker with exactly these arguments.
    pub async fn spawn_with(&self, args: Vec<String>) -> RunningWorker {
        let cli = Cli::try_parse_from(args).expect("valid test arguments");
        let Command::Run(run) = cli.command else { panic!("not a run command") };
        let app = App::build(&cli.global, &run).await.expect("worker builds");
        let http = app.http_addr();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run(shutdown.clone()));
        RunningWorker { http, shutdown, handle }
    }

    /// Starts a worker and waits until `/readyz` says ready.
    pub async fn start_worker(&self, extra: &[&str]) -> RunningWorker {
        let worker = self.spawn_worker(extra).await;
        wait_ready(worker.http).await;
        worker
    }
}

/// The arguments of `payment-worker run` on the broker at `uri` (several, comma-separated,
/// for a cluster's nodes), in Stripe mode against `stripe` or else in mock mode: the one
/// builder of the worker's arguments for the tests, the chaos suite and the bench.
pub fn run_args(uri: &str, stripe: Option<&StripeStandin>) -> Vec<String> {
    let mut args = vec!["--rabbitmq-uri".to_owned(), uri.to_owned(), "run".to_owned()];
    if let Some(stripe) = stripe {
        args.extend(["--stripe-secret-key".to_owned(), SECRET_KEY.to_owned()]);
        args.extend(["--stripe-api-base".to_owned(), stripe.base_url()]);
    }
    args
}

/// Starts the real binary (`binary`: its path, `CARGO_BIN_EXE_payment-worker` where cargo
/// builds it) as a "pod" on this world and waits until it is ready.
pub async fn spawn_binary(binary: &str, world: &World, extra: &[&str]) -> Pod {
    let args = world.args(extra);
    Launch::new(binary, &args[1..]).env("LOG_FORMAT", "text").start(READY_WITHIN).await
}

/// The value of one sample (`name` with its labels, as exported) of a worker's metrics; 0 when
/// absent.
pub async fn metric(http: SocketAddr, sample: &str) -> f64 {
    let (_, body) = http_get(http, "/metrics").await.unwrap_or_default();
    body.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every sample of the metric `name` with the label `label` (`key="value"`).
pub async fn metric_sum(http: SocketAddr, name: &str, label: &str) -> f64 {
    let (_, body) = http_get(http, "/metrics").await.unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How long a worker may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(20);

pub async fn wait_ready(http: SocketAddr) {
    assert!(ready_within(http, READY_WITHIN).await, "worker at {http} never became ready");
}
