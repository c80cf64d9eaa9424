//! The run settings: every setting has a flag and an environment variable, and a default
//! wherever one is safe. Bad values stop the program at start with the setting's name.

pub mod broker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use crate::broker::topology::MAX_RETRY_SCHEDULE;
use crate::consumer::ReconnectPolicy;
use crate::http::HttpLimits;
use crate::settings::broker::secret_setting;
use crate::stripe::breaker::BreakerSettings;
use crate::stripe::pacer::PacerSettings;
use crate::stripe::{CheckoutUrls, STRIPE_API};

/// A setting with a value the worker cannot use. Printed as `invalid SETTING (--flag): reason`,
/// never with the value itself (it may be a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {setting}{}: {reason}", flag.map(|f| format!(" (--{f})")).unwrap_or_default())]
pub struct ConfigError {
    /// The environment variable.
    pub setting: &'static str,
    /// The flag, without its dashes; `None` for a variable without one (OpenTelemetry's).
    pub flag: Option<&'static str>,
    pub reason: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, flag: &'static str, reason: impl Into<String>) -> Self {
        Self { setting, flag: Some(flag), reason: reason.into() }
    }

    /// A setting read only from the environment.
    pub fn env_only(setting: &'static str, reason: impl Into<String>) -> Self {
        Self { setting, flag: None, reason: reason.into() }
    }
}

/// The settings of `payment-worker run`.
#[derive(Args, Clone)]
pub struct RunArgs {
    /// Stripe secret key. Unset: mock mode (fake `cs_test_mock_session_<trip>` sessions).
    #[arg(long, env = "STRIPE_SECRET_KEY", hide_env_values = true)]
    stripe_secret_key: Option<String>,

    /// A file holding STRIPE_SECRET_KEY (a mounted secret); not both.
    #[arg(long, env = "STRIPE_SECRET_KEY_FILE")]
    stripe_secret_key_file: Option<PathBuf>,

    /// Stripe API base URL.
    #[arg(long, env = "STRIPE_API_BASE", default_value = STRIPE_API, value_parser = parse_http_url)]
    pub stripe_api_base: String,

    /// Timeout of one Stripe call (connection and answer), e.g. `10s`, `500ms`.
    #[arg(long, env = "STRIPE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub stripe_timeout: Duration,

    /// The rider-facing app; the default success and cancel URLs derive from it.
    #[arg(long, env = "APP_URL", default_value = "http://localhost:3000", value_parser = parse_http_url)]
    pub app_url: String,

    /// Where Stripe sends the rider after paying [default: APP_URL?payment=success].
    #[arg(long, env = "STRIPE_SUCCESS_URL", value_parser = parse_http_url)]
    pub stripe_success_url: Option<String>,

    /// Where Stripe sends the rider after cancelling [default: APP_URL?payment=cancel].
    #[arg(long, env = "STRIPE_CANCEL_URL", value_parser = parse_http_url)]
    pub stripe_cancel_url: Option<String>,

    /// Deliveries processed at once (the channel's prefetch), 1 to 65535.
    #[arg(long, env = "PREFETCH", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Address of the HTTP server (health, readiness, metrics).
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// How long a graceful stop (SIGTERM, SIGINT) waits for in-flight work.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Consecutive failed broker sessions before the worker exits non-zero.
    #[arg(long, env = "RECONNECT_MAX_ATTEMPTS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub reconnect_max_attempts: u32,

    /// First delay before reconnecting; it doubles, with jitter, up to RECONNECT_MAX_DELAY.
    #[arg(long, env = "RECONNECT_MIN_DELAY", default_value = "200ms", value_parser = parse_duration)]
    pub reconnect_min_delay: Duration,

    /// Longest delay between reconnect attempts.
    #[arg(long, env = "RECONNECT_MAX_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub reconnect_max_delay: Duration,

    /// Stripe webhook signing secrets (`whsec_…`), comma-separated during key rotation.
    /// Unset: `POST /webhook/stripe` answers 503.
    #[arg(long, env = "STRIPE_WEBHOOK_KEY", hide_env_values = true)]
    stripe_webhook_key: Option<String>,

    /// A file holding STRIPE_WEBHOOK_KEY (a mounted secret); not both.
    #[arg(long, env = "STRIPE_WEBHOOK_KEY_FILE")]
    stripe_webhook_key_file: Option<PathBuf>,

    /// Largest accepted age of a webhook signature's timestamp.
    #[arg(long, env = "STRIPE_WEBHOOK_TOLERANCE", default_value = "300s", value_parser = parse_duration)]
    pub stripe_webhook_tolerance: Duration,

    /// Largest webhook body accepted, in bytes; a larger one is answered 413 unread.
    #[arg(long, env = "WEBHOOK_MAX_BODY", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1024..))]
    pub webhook_max_body: u32,

    /// Webhook requests handled at once; one more is answered 503 before its body is read
    /// (Stripe retries it).
    #[arg(long, env = "WEBHOOK_MAX_CONCURRENT", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub webhook_max_concurrent: u32,

    /// HTTP connections open at once; one more is closed as soon as it is accepted.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub http_max_connections: u32,

    /// How long a client may take to send a request's headers (idle connections included).
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// How long a client may take to send a webhook body.
    #[arg(long, env = "HTTP_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_body_timeout: Duration,

    /// How long a payment may keep being deferred (Stripe down or rate-limiting) since it
    /// first arrived before it is parked `stripe_unavailable`; at most 12h, inside Stripe's
    /// 24 h idempotency window.
    #[arg(long, env = "STRIPE_WAIT_BUDGET", default_value = "6h", value_parser = parse_duration)]
    stripe_wait_budget: Duration,

    /// Per-replica ceiling of Stripe requests per second (this replica's share of the
    /// account's limit). Unset: no ceiling; the rate adapts to Stripe's 429s.
    #[arg(long, env = "STRIPE_MAX_RPS", value_parser = parse_rate)]
    pub stripe_max_rps: Option<f64>,

    /// The Stripe account's limit of requests per second, shared by every replica: each
    /// replica's ceiling is this divided by the consumers of the work queue, in whole calls
    /// (read every second; a replica not consuming yet counts itself in). With others, a
    /// replica sends its calls evenly spaced, and a joining one waits 1.5 s before its first.
    /// Unset: each replica finds its share from Stripe's 429s.
    #[arg(long, env = "STRIPE_ACCOUNT_RPS", value_parser = parse_rate)]
    pub stripe_account_rps: Option<f64>,

    /// Stripe requests per second until the first 429: the burst a cold replica may send at
    /// once (Stripe's documented limit for Checkout Sessions is 25 a second).
    #[arg(long, env = "STRIPE_INITIAL_RPS", default_value_t = 25.0, value_parser = parse_rate)]
    pub stripe_initial_rps: f64,

    /// The adaptive Stripe rate never goes below this many requests per second.
    #[arg(long, env = "STRIPE_MIN_RPS", default_value_t = 1.0, value_parser = parse_rate)]
    pub stripe_min_rps: f64,

    /// Requests per second the rate grows by for each second it is the bottleneck.
    #[arg(long, env = "STRIPE_RATE_INCREASE", default_value_t = 2.0, value_parser = parse_rate)]
    pub stripe_rate_increase: f64,

    /// The most a 429 leaves of the rate (it is cut to what Stripe accepted in the last
    /// second, and at least by this factor; at most once a second), between 0 and 1.
    #[arg(long, env = "STRIPE_RATE_DECREASE", default_value_t = 0.9, value_parser = parse_fraction)]
    pub stripe_rate_decrease: f64,

    /// Adaptive throttling's K: while Stripe fails, calls per call it accepts over the last
    /// 10 s before calls are held back to K times the accepted rate; at least 1.
    #[arg(long, env = "STRIPE_THROTTLE_K", default_value_t = 2.0, value_parser = parse_multiplier)]
    pub stripe_throttle_k: f64,

    /// Payments failing Stripe-wide with none answered that count as an outage before the
    /// window holds STRIPE_BREAKER_MIN_CALLS payments; also the distinct payments (retries
    /// included) whose failures over 2 s with no answer are Stripe's.
    #[arg(long, env = "STRIPE_BREAKER_CONSECUTIVE", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub stripe_breaker_consecutive: u32,

    /// How many recent payments (the first answer of each, on its first attempt, at most
    /// 10 s old) the failure shares are computed over.
    #[arg(long, env = "STRIPE_BREAKER_WINDOW", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub stripe_breaker_window: u32,

    /// Payments the window must hold before a failure share counts.
    #[arg(long, env = "STRIPE_BREAKER_MIN_CALLS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub stripe_breaker_min_calls: u32,

    /// Share of the window's payments failing Stripe-wide from which failures are Stripe's
    /// (deferred, no attempt spent) rather than each payment's own; above 0, at most 1.
    #[arg(long, env = "STRIPE_BREAKER_FAILURE_RATIO", default_value_t = 0.3, value_parser = parse_ratio)]
    pub stripe_breaker_failure_ratio: f64,

    /// Share of the newest STRIPE_BREAKER_MIN_CALLS payments failing Stripe-wide that opens
    /// the circuit (nearly nothing gets through); at least STRIPE_BREAKER_FAILURE_RATIO, at
    /// most 1.
    #[arg(long, env = "STRIPE_BREAKER_OPEN_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub stripe_breaker_open_ratio: f64,

    /// How long the circuit stays open before one probe.
    #[arg(long, env = "STRIPE_BREAKER_COOLDOWN", default_value = "5s", value_parser = parse_duration)]
    pub stripe_breaker_cooldown: Duration,

    /// The longest cool-down: each failed probe doubles it up to this (the default, the same
    /// as the cool-down, keeps recovery within one cool-down of Stripe's return).
    #[arg(long, env = "STRIPE_BREAKER_MAX_COOLDOWN", default_value = "5s", value_parser = parse_duration)]
    pub stripe_breaker_max_cooldown: Duration,

    /// How often queue depths are read from the broker for metrics.
    #[arg(long, env = "QUEUE_DEPTH_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub queue_depth_interval: Duration,
}

impl RunArgs {
    /// The Stripe secret key; `None` means mock mode.
    ///
    /// # Errors
    /// When the key is set but blank.
    pub fn stripe_secret_key(&self) -> Result<Option<SecretString>, ConfigError> {
        stripe_secret_key(self.stripe_secret_key.as_deref(), self.stripe_secret_key_file.as_deref())
    }

    /// The webhook signing secrets; empty when unset.
    ///
    /// # Errors
    /// When the setting is set but holds no secret.
    pub fn webhook_secrets(&self) -> Result<Vec<SecretString>, ConfigError> {
        let Some((list, setting, flag)) = secret_setting(
            self.stripe_webhook_key.as_deref(),
            self.stripe_webhook_key_file.as_deref(),
            ("STRIPE_WEBHOOK_KEY", "stripe-webhook-key"),
            ("STRIPE_WEBHOOK_KEY_FILE", "stripe-webhook-key-file"),
        )?
        else {
            return Ok(Vec::new());
        };
        let secrets: Vec<SecretString> = list
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| SecretString::from(s.to_owned()))
            .collect();
        if secrets.is_empty() {
            return Err(ConfigError::new(
                setting,
                flag,
                "set but empty; unset it to disable the webhook",
            ));
        }
        Ok(secrets)
    }

    pub fn checkout_urls(&self) -> CheckoutUrls {
        CheckoutUrls {
            success: self
                .stripe_success_url
                .clone()
                .unwrap_or_else(|| format!("{}?payment=success", self.app_url)),
            cancel: self
                .stripe_cancel_url
                .clone()
                .unwrap_or_else(|| format!("{}?payment=cancel", self.app_url)),
        }
    }

    /// The circuit breaker's settings.
    ///
    /// # Errors
    /// When they contradict each other; the message names the settings.
    pub fn breaker_settings(&self) -> Result<BreakerSettings, ConfigError> {
        if self.stripe_breaker_min_calls > self.stripe_breaker_window {
            return Err(ConfigError::new(
                "STRIPE_BREAKER_MIN_CALLS",
                "stripe-breaker-min-calls",
                format!(
                    "{} is more than STRIPE_BREAKER_WINDOW ({}), so the failure ratio could \
                     never open the circuit",
                    self.stripe_breaker_min_calls, self.stripe_breaker_window
                ),
            ));
        }
        if self.stripe_breaker_open_ratio < self.stripe_breaker_failure_ratio {
            return Err(ConfigError::new(
                "STRIPE_BREAKER_OPEN_RATIO",
                "stripe-breaker-open-ratio",
                format!(
                    "{} is below STRIPE_BREAKER_FAILURE_RATIO ({}): the circuit would open on \
                     failures still counted as the payments' own",
                    self.stripe_breaker_open_ratio, self.stripe_breaker_failure_ratio
                ),
            ));
        }
        if self.stripe_breaker_cooldown > self.stripe_breaker_max_cooldown {
            return Err(ConfigError::new(
                "STRIPE_BREAKER_COOLDOWN",
                "stripe-breaker-cooldown",
                format!(
                    "{:?} is longer than STRIPE_BREAKER_MAX_COOLDOWN ({:?})",
                    self.stripe_breaker_cooldown, self.stripe_breaker_max_cooldown
                ),
            ));
        }
        Ok(BreakerSettings {
            window: self.stripe_breaker_window as usize,
            min_calls: self.stripe_breaker_min_calls as usize,
            failure_ratio: self.stripe_breaker_failure_ratio,
            open_ratio: self.stripe_breaker_open_ratio,
            consecutive: self.stripe_breaker_consecutive as usize,
            cooldown: self.stripe_breaker_cooldown,
            max_cooldown: self.stripe_breaker_max_cooldown,
        })
    }

    /// The adaptive rate's settings.
    ///
    /// # Errors
    /// When they contradict each other; the message names the settings.
    pub fn pacer_settings(&self) -> Result<PacerSettings, ConfigError> {
        if let Some(max) = self.stripe_max_rps
            && max < self.stripe_min_rps
        {
            return Err(ConfigError::new(
                "STRIPE_MAX_RPS",
                "stripe-max-rps",
                format!("{max} is below STRIPE_MIN_RPS ({})", self.stripe_min_rps),
            ));
        }
        Ok(PacerSettings {
            initial: self.stripe_initial_rps,
            min: self.stripe_min_rps,
            max: self.stripe_max_rps,
            account: self.stripe_account_rps,
            increase: self.stripe_rate_increase,
            decrease: self.stripe_rate_decrease,
            k: self.stripe_throttle_k,
        })
    }

    /// How long a payment may keep being deferred.
    ///
    /// # Errors
    /// Longer than 12 hours: a payment could outlive its idempotency key.
    pub fn stripe_wait_budget(&self) -> Result<Duration, ConfigError> {
        if self.stripe_wait_budget > MAX_RETRY_SCHEDULE {
            return Err(ConfigError::new(
                "STRIPE_WAIT_BUDGET",
                "stripe-wait-budget",
                "longer than 12h: with the retry schedule (at most 12h) a payment could outlive \
                 its Stripe idempotency key (24h) and get a second session",
            ));
        }
        Ok(self.stripe_wait_budget)
    }

    /// The HTTP server's bounds.
    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            max_connections: self.http_max_connections as usize,
            header_timeout: self.http_header_timeout,
            body_timeout: self.http_body_timeout,
            max_body: self.webhook_max_body as usize,
        }
    }

    pub fn reconnect_policy(&self) -> ReconnectPolicy {
        ReconnectPolicy {
            min_delay: self.reconnect_min_delay,
            max_delay: self.reconnect_max_delay.max(self.reconnect_min_delay),
            max_attempts: self.reconnect_max_attempts as usize,
        }
    }
}

/// A duration written like `500ms`, `10s`, `1m 30s`; zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(text).map_err(|e| format!("{e} (write it like 500ms or 10s)"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(duration)
}

/// `STRIPE_SECRET_KEY` or `STRIPE_SECRET_KEY_FILE`; `None` when neither is set.
///
/// # Errors
/// When both are set, the file cannot be read, or the key is blank.
pub fn stripe_secret_key(
    value: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, ConfigError> {
    let Some((key, setting, flag)) = secret_setting(
        value,
        file,
        ("STRIPE_SECRET_KEY", "stripe-secret-key"),
        ("STRIPE_SECRET_KEY_FILE", "stripe-secret-key-file"),
    )?
    else {
        return Ok(None);
    };
    let text = key.expose_secret();
    if text.trim().is_empty() || text.chars().any(char::is_control) {
        return Err(ConfigError::new(
            setting,
            flag,
            "blank or contains control characters; unset it for mock mode",
        ));
    }
    Ok(Some(key))
}

/// Requests per second: a finite number above zero, at most 100,000.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 100_000.0 => Ok(rate),
        _ => Err("must be a number of requests per second above 0 and at most 100000".into()),
    }
}

/// A factor strictly between 0 and 1.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f < 1.0 => Ok(f),
        _ => Err("must be a number between 0 and 1 (exclusive), e.g. 0.7".into()),
    }
}

/// A multiplier of at least 1.
fn parse_multiplier(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(k) if k.is_finite() && (1.0..=100.0).contains(&k) => Ok(k),
        _ => Err("must be a number from 1 to 100, e.g. 2".into()),
    }
}

/// A share above 0 and at most 1.
fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err("must be a number above 0 and at most 1, e.g. 0.5".into()),
    }
}

pub fn parse_http_url(text: &str) -> Result<String, String> {
    let uri: hyper::Uri = text.parse().map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err("must be an absolute http:// or https:// URL".into());
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn run(args: &[&str]) -> Result<RunArgs, String> {
        let mut argv = vec!["payment-worker", "run"];
        argv.extend_from_slice(args);
        let checked = |run: &RunArgs| -> Result<(), ConfigError> {
            run.stripe_secret_key()?;
            run.breaker_settings()?;
            run.pacer_settings()?;
            Ok(())
        };
        match Cli::try_parse_from(argv) {
            Ok(Cli { global, command: Command::Run(run) }) => {
                global.broker().map_err(|e| e.to_string())?;
                checked(&run).map_err(|e| e.to_string())?;
                Ok(*run)
            }
            Ok(_) => unreachable!("argv starts with `run`"),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn defaults_follow_the_go_service() {
        let args = run(&[]).unwrap();
        assert_eq!(args.prefetch, 16);
        assert_eq!(args.stripe_timeout, Duration::from_secs(10));
        assert_eq!(args.shutdown_grace, Duration::from_secs(20));
        let urls = args.checkout_urls();
        assert_eq!(urls.success, "http://localhost:3000?payment=success");
        assert_eq!(urls.cancel, "http://localhost:3000?payment=cancel");
        assert!(args.stripe_secret_key().unwrap().is_none());
        assert_eq!(args.breaker_settings().unwrap(), BreakerSettings::default());
        assert_eq!(args.pacer_settings().unwrap(), PacerSettings::default());
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (args, name) in [
            (&["--stripe-timeout", "soon"][..], "STRIPE_TIMEOUT"),
            (&["--stripe-timeout", "0s"][..], "STRIPE_TIMEOUT"),
            (&["--prefetch", "0"][..], "PREFETCH"),
            (&["--app-url", "localhost"][..], "APP_URL"),
            (&["--stripe-api-base", "ftp://x"][..], "STRIPE_API_BASE"),
            (&["--http-addr", "nowhere"][..], "HTTP_ADDR"),
            (&["--rabbitmq-uri", "http://x"][..], "RABBITMQ_URI"),
            (&["--stripe-secret-key", " "][..], "STRIPE_SECRET_KEY"),
            (&["--stripe-max-rps", "0"][..], "STRIPE_MAX_RPS"),
            (&["--stripe-max-rps", "0.5"][..], "STRIPE_MAX_RPS"),
            (&["--stripe-account-rps", "0"][..], "STRIPE_ACCOUNT_RPS"),
            (&["--stripe-initial-rps", "fast"][..], "STRIPE_INITIAL_RPS"),
            (&["--stripe-min-rps=-1"][..], "STRIPE_MIN_RPS"),
            (&["--stripe-rate-decrease", "1"][..], "STRIPE_RATE_DECREASE"),
            (&["--stripe-breaker-failure-ratio", "0"][..], "STRIPE_BREAKER_FAILURE_RATIO"),
            (&["--stripe-breaker-consecutive", "0"][..], "STRIPE_BREAKER_CONSECUTIVE"),
            (&["--stripe-breaker-min-calls", "60"][..], "STRIPE_BREAKER_MIN_CALLS"),
            (&["--stripe-breaker-open-ratio", "0.2"][..], "STRIPE_BREAKER_OPEN_RATIO"),
            (&["--stripe-throttle-k", "0.5"][..], "STRIPE_THROTTLE_K"),
            (&["--stripe-breaker-cooldown", "2m"][..], "STRIPE_BREAKER_COOLDOWN"),
            (&["--stripe-breaker-max-cooldown", "0s"][..], "STRIPE_BREAKER_MAX_COOLDOWN"),
        ] {
            let err = run(args).err().unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(err.contains(name), "{err} should name {name}");
        }
    }

    #[test]
    fn secrets_never_reach_error_messages() {
        let err = run(&["--rabbitmq-uri", "amqp://u:hunter2@:notaport/"]).err().unwrap();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
