//! Logs and traces.
//!
//! Logs are JSON lines (or text) on stderr; a line written while a payment is handled carries
//! its `trace_id` and `span_id` among the span's fields, so logs and traces join. Text lines
//! leave out the OpenTelemetry attributes (`otel.*`, `messaging.*`, `trip.id`, every name with
//! a dot), which the spans carry for the exporter alongside the plain fields a person reads
//! (`trip_id`, `attempt`), so each fact is shown once.
//!
//! Traces are OpenTelemetry spans, exported with OTLP over HTTP/protobuf when the standard
//! variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is appended) or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), `OTEL_EXPORTER_OTLP_PROTOCOL` (only
//! `http/protobuf`), `OTEL_SERVICE_NAME` (default `payment-worker`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`. A batch
//! exporter on the tokio runtime sends them through the binary's one HTTP stack (hyper, rustls
//! with ring); the batch is flushed on a graceful stop, for at most [`FLUSH_WITHIN`]. With
//! neither endpoint set there is no exporter and no OpenTelemetry layer: spans cost what
//! `tracing` spans cost.
//!
//! A collector that is down, refuses, answers errors or hangs never slows the payments: the
//! exporter is [`Guarded`], so after a failed export the next batches are dropped unsent for
//! a backoff that grows while exports keep failing, counted in
//! `payment_worker_trace_spans_dropped_total`, with a warning at most once a minute.

use std::fmt;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::runtime;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use prometheus::IntCounter;
use tracing::field::{Field, Visit};
use tracing::{Level, warn};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::settings::ConfigError;
use crate::settings::broker::LogFormat;

/// The service name when `OTEL_SERVICE_NAME` does not give one.
pub const SERVICE_NAME: &str = "payment-worker";

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a graceful stop waits for the last spans to go out: inside Kubernetes' grace
/// period together with `SHUTDOWN_GRACE` and the HTTP drain.
pub const FLUSH_WITHIN: Duration = Duration::from_secs(2);

/// The first and the longest pause in exporting after a failed export.
const PAUSE_FIRST: Duration = Duration::from_secs(1);
const PAUSE_MAX: Duration = Duration::from_secs(60);

/// How often a failing exporter may say so in the log.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Exports that failed (refused, an error status, no answer within the timeout).
pub static EXPORT_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "payment_worker_trace_export_failures_total",
        "OTLP span exports that failed (refused, error status, or no answer in time)",
    )
    .expect("a valid metric definition")
});

/// Spans given up: in a failed export, or dropped unsent while exporting pauses.
pub static SPANS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "payment_worker_trace_spans_dropped_total",
        "Spans not exported: in a failed export, or dropped while exporting pauses after one",
    )
    .expect("a valid metric definition")
});

/// What was installed; flush it before the process ends.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether spans are to be exported: an OTLP endpoint is set. The protocol, if set, must be
/// `http/protobuf`.
///
/// # Errors
/// Another protocol, named by its variable.
pub fn export_requested() -> Result<bool, ConfigError> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Ok(protocol) = std::env::var(name)
            && !protocol.trim().is_empty()
            && protocol.trim() != "http/protobuf"
        {
            return Err(ConfigError::env_only(name, "only http/protobuf is supported"));
        }
    }
    Ok(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

impl Telemetry {
    /// Installs the global subscriber: logs in `format` filtered by `RUST_LOG`, and spans to
    /// OTLP when an endpoint is set.
    ///
    /// # Errors
    /// An unsupported OTLP protocol, or an exporter that cannot be built.
    pub fn init(format: LogFormat) -> Result<Self, ConfigError> {
        let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
        let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let logs = match format {
            LogFormat::Json => logs
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_filter(filter)
                .boxed(),
            LogFormat::Text => logs.fmt_fields(PlainFields).with_filter(filter).boxed(),
        };
        let provider = export_requested()?.then(provider).transpose()?;
        let spans = provider.as_ref().map(|provider| {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(SERVICE_NAME))
                // The worker's own spans, whatever RUST_LOG says about logs.
                .with_filter(Targets::new().with_target("payment_worker", Level::INFO))
        });
        tracing_subscriber::registry().with(logs).with(spans).init();
        Ok(Self { provider })
    }

    /// Sends the spans still batched, for at most [`FLUSH_WITHIN`]; a graceful stop calls it
    /// last. Returns `false` when the flush is still running then: the process should exit
    /// without waiting for it (dropping the runtime would).
    pub async fn shutdown(self) -> bool {
        let Some(provider) = self.provider else { return true };
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        let Ok(flushed) = tokio::time::timeout(FLUSH_WITHIN, flush).await else {
            eprintln!("payment-worker: spans not flushed within {FLUSH_WITHIN:?}; dropped");
            return false;
        };
        let failure = match flushed {
            Ok(result) => result.err().map(|e| e.to_string()),
            Err(panicked) => Some(panicked.to_string()),
        };
        if let Some(e) = failure {
            eprintln!("payment-worker: flushing spans: {e}");
        }
        true
    }
}

/// The tracer provider: OTLP over HTTP/protobuf through hyper and rustls (ring), batched on
/// the tokio runtime; the resource from the environment, `service.name` defaulting to
/// payment-worker; the sampler from `OTEL_TRACES_SAMPLER` (the SDK's default reads it).
fn provider() -> Result<SdkTracerProvider, ConfigError> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(HyperClient::new(connector, EXPORT_TIMEOUT, None))
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| {
            ConfigError::env_only("OTEL_EXPORTER_OTLP_ENDPOINT", format!("no exporter: {e}"))
        })?;
    let processor = BatchSpanProcessor::builder(Guarded::new(exporter), runtime::Tokio).build();
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
}

/// An exporter that pauses after a failure instead of encoding and sending every batch to a
/// collector that cannot take it: while paused, batches are dropped unsent and counted. The
/// pause starts at `PAUSE_FIRST` and doubles, up to `PAUSE_MAX`, while exports fail; one
/// success ends it. Failures are warned about at most once per `WARN_EVERY`.
#[derive(Debug)]
pub struct Guarded<E> {
    inner: E,
    state: Mutex<Pause>,
}

#[derive(Debug, Default)]
struct Pause {
    until: Option<Instant>,
    next: Option<Duration>,
    warned_at: Option<Instant>,
}

impl<E> Guarded<E> {
    pub fn new(inner: E) -> Self {
        Self { inner, state: Mutex::new(Pause::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Pause> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<E: SpanExporter> SpanExporter for Guarded<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        if self.state().until.is_some_and(|until| Instant::now() < until) {
            SPANS_DROPPED.inc_by(spans);
            return Ok(());
        }
        let result = self.inner.export(batch).await;
        let mut state = self.state();
        match &result {
            Ok(()) => *state = Pause { warned_at: state.warned_at, ..Pause::default() },
            Err(e) => {
                EXPORT_FAILURES.inc();
                SPANS_DROPPED.inc_by(spans);
                let pause = state.next.unwrap_or(PAUSE_FIRST);
                let now = Instant::now();
                state.until = Some(now + pause);
                state.next = Some((pause * 2).min(PAUSE_MAX));
                if state.warned_at.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                    state.warned_at = Some(now);
                    warn!(
                        error = %e,
                        paused_ms = pause.as_millis() as u64,
                        "exporting spans failed; spans are dropped while exporting pauses \
                         (payment_worker_trace_spans_dropped_total)"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The fields of a text log line: those a person reads, without the OpenTelemetry attributes
/// (every name with a dot), written as the default formatter writes them.
struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor { writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let first = current.fields.is_empty();
        let mut visitor = PlainVisitor { writer: current.as_writer(), first, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.contains('.') {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{separator}{value:?}")
        } else {
            write!(self.writer, "{separator}{}={value:?}", name.trim_start_matches("r#"))
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::PlainFields;

    /// What one payment's log line reads at LOG_FORMAT=text.
    fn text_line(log: impl FnOnce()) -> String {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let buffer = Arc::clone(&buffer);
            move || BufferWriter(Arc::clone(&buffer))
        };
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(PlainFields)
            .with_writer(writer)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(buffer.lock().unwrap().clone()).unwrap()
    }

    struct BufferWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for BufferWriter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_text_line_shows_each_fact_once_without_the_otel_attributes() {
        let line = text_line(|| {
            let span = tracing::info_span!(
                "payment",
                otel.name = "process payment.cmd.create_session",
                otel.kind = "consumer",
                otel.status_code = tracing::field::Empty,
                messaging.system = "rabbitmq",
                messaging.destination.name = "payment_trip_response",
                trip.id = "t-1",
                trip_id = "t-1",
                payment.attempt = 2,
                attempt = 2,
                trace_id = tracing::field::Empty,
            );
            let _entered = span.enter();
            span.record("otel.status_code", "OK");
            span.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
            tracing::info!(session = "cs_1", "session created");
        });
        assert_eq!(
            line.trim(),
            "INFO payment{trip_id=\"t-1\" attempt=2 trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"}: \
             payment_worker::telemetry::tests: session created session=\"cs_1\"",
            "{line}"
        );
    }
}
