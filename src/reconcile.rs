//! `payment-worker reconcile`: the Checkout events whose webhooks did not succeed, listed from
//! Stripe's Events API and taken through the webhook's own path.
//!
//! One run lists the events of [`EVENT_TYPES`] created within `--since` (72 h by default, at
//! most Stripe's 30 days), only those whose delivery did not succeed unless `--all`, page by
//! page (`starting_after`, `has_more`), paced as the worker paces Stripe and retrying a 429, a
//! 5xx or a lost answer with backoff. Each event is read as a verified webhook's is
//! ([`crate::webhook::read_event`]: the paid check, the trip's metadata) and a paid one is
//! handed to the outbox with the Stripe event id as `message-id`, so it becomes the same
//! `payment.event.success` the webhook would have published, once: the ledger is read to
//! its end first, and an event it holds is counted, not handed on. A rerun is always safe.
//!
//! The run ends with a summary line on stdout, and (unless `--dry-run`) appends the summary
//! to the ledger, where every replica reads it into the `payment_worker_reconcile_*` metrics:
//! a CronJob's pod is not scraped. It fails, naming the cause, only when Stripe or the broker
//! stays unreachable.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use clap::Args;
use lapin::types::FieldTable;
use secrecy::ExposeSecret as _;
use serde_json::Value;

use crate::broker::headers::long_string;
use crate::broker::publish::{Publisher, persistent_json};
use crate::broker::topology::Topology;
use crate::ledger::{Ledger, RECONCILED, Reconciled};
use crate::ops::{BROKER_WAIT, OpsError, bounded, connect};
use crate::settings::broker::GlobalArgs;
use crate::settings::{ConfigError, parse_duration, parse_http_url, parse_rate, stripe_secret_key};
use crate::stripe::pacer::{Pacer, PacerSettings, Turn};
use crate::stripe::{
    EVENT_TYPES, EventPage, EventQuery, STRIPE_API, StripeApi, StripeError, key_livemode,
};
use crate::webhook::{Reply, read_event, success_message};

/// How long Stripe keeps events.
pub const MAX_SINCE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Args, Clone)]
pub struct ReconcileArgs {
    /// Events created within this long before now, e.g. `72h`, `7d`; at most 30 days (Stripe
    /// keeps events that long).
    #[arg(long, default_value = "72h", value_parser = parse_duration)]
    pub since: Duration,
    /// Every event of those types, not only those whose webhook delivery did not succeed.
    #[arg(long)]
    pub all: bool,
    /// Print what would be published; publish nothing and record no summary.
    #[arg(long)]
    pub dry_run: bool,
    /// Events asked for per page, 1 to 100.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub page_size: u8,
    /// Tries of one page when Stripe answers 429 or 5xx or not at all, with backoff from 1 s
    /// to 30 s between them, before the run gives up.
    #[arg(long, env = "RECONCILE_STRIPE_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub stripe_attempts: u32,
    /// Stripe secret key (`sk_…` or a restricted `rk_…` with Events read); required.
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,
    /// A file holding STRIPE_SECRET_KEY (a mounted secret); not both.
    #[arg(long, env = "STRIPE_SECRET_KEY_FILE")]
    stripe_secret_key_file: Option<PathBuf>,
    /// Stripe API base URL.
    #[arg(long, env = "STRIPE_API_BASE", default_value = STRIPE_API, value_parser = parse_http_url)]
    stripe_api_base: String,
    /// Timeout of one Stripe call.
    #[arg(long, env = "STRIPE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    stripe_timeout: Duration,
    /// The most Stripe requests a second this run sends.
    #[arg(long, env = "STRIPE_MAX_RPS", value_parser = parse_rate)]
    stripe_max_rps: Option<f64>,
}

/// Why a run did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Topology(#[from] crate::broker::topology::TopologyError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("Stripe stayed unreachable: {0}")]
    Stripe(StripeError),
    #[error("Stripe refused to list events: {0}")]
    Refused(StripeError),
    #[error("the ledger could not be read to its end: {0}")]
    Ledger(String),
}

/// What a run saw.
#[derive(Debug, Default)]
struct Tally {
    events: BTreeMap<String, u64>,
    published: u64,
    already: u64,
    unpaid: u64,
    missing_metadata: u64,
    other_mode: u64,
    pages: u64,
}

impl ReconcileArgs {
    /// Runs once.
    ///
    /// # Errors
    /// See [`ReconcileError`].
    pub async fn exec(self, global: &GlobalArgs) -> Result<ExitCode, ReconcileError> {
        if self.since > MAX_SINCE {
            return Err(ConfigError::env_only(
                "--since",
                "at most 30d: Stripe keeps events for 30 days",
            )
            .into());
        }
        let key = stripe_secret_key(
            self.stripe_secret_key.as_deref(),
            self.stripe_secret_key_file.as_deref(),
        )?
        .ok_or_else(|| {
            ConfigError::new("STRIPE_SECRET_KEY", "stripe-secret-key", "required by reconcile")
        })?;
        let livemode = key_livemode(key.expose_secret());
        let stripe = StripeApi::new(&self.stripe_api_base, key, self.stripe_timeout)
            .map_err(|e| ConfigError::new("STRIPE_API_BASE", "stripe-api-base", e.to_string()))?;
        let topology = global.load_topology()?;
        let connection = connect(global).await?;
        let channel = bounded("opening a channel", connection.create_channel()).await?;
        crate::ops::within("declaring the topology", topology.declare(&channel))
            .await?
            .map_err(OpsError::from)?;
        let publisher = bounded("opening a publish channel", Publisher::open(&connection)).await?;
        let ledger = Ledger::new(&topology.success.ledger, None);
        let run =
            Run { args: &self, stripe, topology: &topology, publisher, ledger: &ledger, livemode };
        let tally = tokio::select! {
            tally = run.reconcile() => tally?,
            lost = ledger.read_on(&connection) => return Err(ReconcileError::Ledger(lost)),
        };
        println!("{}", summary(&self, &tally));
        let _ = crate::ops::within("closing the connection", connection.close(200, "done".into()))
            .await;
        Ok(ExitCode::SUCCESS)
    }
}

struct Run<'a> {
    args: &'a ReconcileArgs,
    stripe: StripeApi,
    topology: &'a Topology,
    publisher: Publisher,
    ledger: &'a Ledger,
    livemode: Option<bool>,
}

impl Run<'_> {
    async fn reconcile(&self) -> Result<Tally, ReconcileError> {
        self.ledger
            .sync(&self.publisher, BROKER_WAIT)
            .await
            .map_err(|e| ReconcileError::Ledger(e.to_string()))?;
        let since = unix_now().saturating_sub(self.args.since.as_secs());
        let mut pacer = Pacer::new(
            PacerSettings { max: self.args.stripe_max_rps, ..PacerSettings::default() },
            Instant::now(),
        );
        let mut tally = Tally::default();
        let mut after: Option<String> = None;
        loop {
            let query = EventQuery {
                types: &EVENT_TYPES,
                created_gte: i64::try_from(since).unwrap_or(i64::MAX),
                delivery_success: (!self.args.all).then_some(false),
                limit: self.args.page_size,
                starting_after: after.as_deref(),
            };
            let page = self.page(&query, &mut pacer).await?;
            tally.pages += 1;
            for event in &page.data {
                self.take(event, &mut tally).await?;
            }
            match page.data.last().and_then(|e| e["id"].as_str()) {
                Some(last) if page.has_more => after = Some(last.to_owned()),
                _ => break,
            }
        }
        if !self.args.dry_run {
            self.record(&tally).await?;
        }
        Ok(tally)
    }

    /// One page, paced, with backoff on what may pass.
    async fn page(
        &self,
        query: &EventQuery<'_>,
        pacer: &mut Pacer,
    ) -> Result<EventPage, ReconcileError> {
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_secs(1))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(self.args.stripe_attempts.saturating_sub(1) as usize)
            .with_jitter()
            .build();
        loop {
            let slot = loop {
                match pacer.take(Instant::now(), None) {
                    Turn::Go(slot) => break slot,
                    Turn::Later { at, .. } => {
                        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    }
                }
            };
            let error = match self.stripe.list_events(query).await {
                Ok(page) => {
                    pacer.on_answer(Instant::now(), slot);
                    return Ok(page);
                }
                Err(error) => error,
            };
            let now = Instant::now();
            match &error {
                StripeError::Api { status: 429, .. } => {
                    pacer.on_rate_limited(now, slot.at, "events");
                }
                _ => pacer.on_failure(now, slot.at),
            }
            if !error.is_transient() {
                return Err(ReconcileError::Refused(error));
            }
            let Some(delay) = delays.next() else { return Err(ReconcileError::Stripe(error)) };
            let wait = error.retry_after().map_or(delay, |after| after.max(delay));
            eprintln!("reconcile: {error}; asking again in {:.1} s", wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
    }

    /// One listed event, through the webhook's path.
    async fn take(&self, event: &Value, tally: &mut Tally) -> Result<(), ReconcileError> {
        let kind = event["type"].as_str().unwrap_or_default();
        *tally.events.entry(kind.to_owned()).or_default() += 1;
        if let (Some(expected), Some(livemode)) = (self.livemode, event["livemode"].as_bool())
            && expected != livemode
        {
            tally.other_mode += 1;
            return Ok(());
        }
        let body = serde_json::to_vec(event).unwrap_or_default();
        let paid = match read_event(&body) {
            Ok(paid) => paid,
            Err(Reply::Unpaid) => {
                tally.unpaid += 1;
                return Ok(());
            }
            Err(Reply::MissingMetadata) => {
                tally.missing_metadata += 1;
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        if !paid.event_id.is_empty() && self.ledger.contains(&paid.event_id) {
            tally.already += 1;
            return Ok(());
        }
        if self.args.dry_run {
            println!(
                "would publish payment.event.success for {} (trip {}, {} {})",
                paid.event_id,
                paid.success.trip_id,
                paid.success.amount_cents,
                paid.success.currency
            );
        } else {
            let (body, properties) = success_message(&paid.event_id, &paid.success, None);
            let outbox = &self.topology.success.outbox;
            crate::ops::within("handing an event to the outbox", async {
                self.publisher.publish("", outbox, &body, properties).await
            })
            .await?
            .map_err(|source| OpsError::Broker {
                what: format!("handing {} to {outbox}", paid.event_id),
                reason: source.to_string(),
            })?;
            self.ledger.insert(&paid.event_id);
        }
        tally.published += 1;
        Ok(())
    }

    /// Appends the run's summary to the ledger, for the replicas' metrics.
    async fn record(&self, tally: &Tally) -> Result<(), ReconcileError> {
        let summary = Reconciled {
            finished_at: unix_now(),
            events: tally.events.clone(),
            published: tally.published,
        };
        let body = serde_json::to_vec(&summary).unwrap_or_default();
        let mut headers = FieldTable::default();
        headers.insert(RECONCILED.into(), long_string("1"));
        let properties = persistent_json().with_headers(headers);
        let ledger = &self.topology.success.ledger;
        crate::ops::within("recording the run in the ledger", async {
            self.publisher.publish("", ledger, &body, properties).await
        })
        .await?
        .map_err(|source| OpsError::Broker {
            what: format!("recording the run in {ledger}"),
            reason: source.to_string(),
        })?;
        Ok(())
    }
}

/// The line a run ends with.
fn summary(args: &ReconcileArgs, tally: &Tally) -> String {
    let listed: u64 = tally.events.values().sum();
    let by_type: Vec<String> = tally.events.iter().map(|(kind, n)| format!("{kind}={n}")).collect();
    let which = if args.all { "all" } else { "undelivered" };
    let verb = if args.dry_run { "would publish" } else { "published" };
    format!(
        "reconcile: {listed} events ({which}, created in the last {}, {} pages){}{}; {verb} {}, \
         already published {}, unpaid {}, without trip metadata {}, other mode {}",
        humantime::format_duration(args.since),
        tally.pages,
        if by_type.is_empty() { "" } else { ": " },
        by_type.join(", "),
        tally.published,
        tally.already,
        tally.unpaid,
        tally.missing_metadata,
        tally.other_mode,
    )
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
