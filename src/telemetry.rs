//! Logs and traces.
//!
//! Logs are JSON lines (or text) on stderr; a line written while a payment is handled carries
//! its `trace_id` and `span_id` among the span's fields, so logs and traces join.
//!
//! Traces are OpenTelemetry spans, exported with OTLP over HTTP/protobuf when the standard
//! variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is appended) or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), `OTEL_EXPORTER_OTLP_PROTOCOL` (only
//! `http/protobuf`), `OTEL_SERVICE_NAME` (default `payment-worker`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`. A batch
//! exporter on the tokio runtime sends them through the binary's one HTTP stack (hyper, rustls
//! with ring); the batch is flushed on a graceful stop. With neither endpoint set there is no
//! exporter and no OpenTelemetry layer: spans cost what `tracing` spans cost.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::runtime;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::cli::LogFormat;
use crate::config::ConfigError;

/// The service name when `OTEL_SERVICE_NAME` does not give one.
pub const SERVICE_NAME: &str = "payment-worker";

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

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
            LogFormat::Text => logs.with_filter(filter).boxed(),
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

    /// Sends the spans still batched; a graceful stop calls it last.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = flushed {
                eprintln!("payment-worker: flushing spans: {e}");
            }
        }
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
    let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
}
