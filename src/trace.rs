//! W3C trace context across the broker: the Go services put `traceparent` (and `tracestate`,
//! `baggage`) in the AMQP headers, and what payment-worker publishes on behalf of a message
//! continues that trace.
//!
//! When spans are exported ([`crate::telemetry`]), a consumer span's parent is the incoming
//! `traceparent`, and every message published inside a producer span carries that span's
//! context ([`stamp`]): the gateway's span is the child of the producer span, and a retry
//! copy's next attempt is the child of the retry's. When they are not, an event continues the
//! incoming trace with a new span id ([`continued`]) and copies keep the original's headers.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tracing::{Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::broker::headers::{long_string, string};
use crate::broker::publish::{PublishError, Publisher};
use crate::metrics::Metrics;

/// Makes the trace context in `properties`' headers the parent of `span` (when spans are
/// exported; otherwise nothing happens), then records the span's ids in its `trace_id` and
/// `span_id` fields for the log lines written inside it.
pub fn continue_from(span: &Span, properties: &BasicProperties) {
    if let Some(headers) = properties.headers() {
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(headers))
        });
        let _ = span.set_parent(parent);
    }
    let incoming = properties.headers().as_ref().and_then(|h| string(h, "traceparent"));
    record_ids(span, incoming.as_deref());
}

/// Records `span`'s trace and span ids in its `trace_id` and `span_id` fields; without
/// exported spans, the trace id of `traceparent`, if any, so logs still join the platform's
/// traces.
pub fn record_ids(span: &Span, traceparent: Option<&str>) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
        span.record("span_id", tracing::field::display(span_context.span_id()));
    } else if let Some(trace_id) = traceparent.and_then(trace_id) {
        span.record("trace_id", trace_id);
    }
}

/// `properties` with the current span's trace context as `traceparent` (and `tracestate`),
/// when spans are exported; unchanged otherwise.
pub fn stamp(properties: BasicProperties) -> BasicProperties {
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return properties;
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(&mut headers));
    });
    properties.with_headers(headers)
}

/// A producer span: one publish of `copy` (`event`, `retry`, `parked`, `deferred`) to
/// `exchange` with `routing_key`, named and attributed as the OpenTelemetry messaging
/// conventions say.
pub fn producer_span(exchange: &str, routing_key: &str, copy: &'static str) -> Span {
    let destination = if exchange.is_empty() { "(default)" } else { exchange };
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {destination}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = %destination,
        messaging.rabbitmq.destination.routing_key = %routing_key,
        payment.copy = copy,
        payment.park_reason = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    record_ids(&span, None);
    span
}

/// Publishes with `publisher` inside `span`, a producer span ([`producer_span`]) whose
/// context the message carries ([`stamp`]); a failure marks the span failed and is counted in
/// `payment_worker_publish_failures_total`. The one traced publish of the consumer and the
/// webhook.
///
/// # Errors
/// See [`Publisher::publish`].
pub async fn publish(
    publisher: &Publisher,
    (exchange, routing_key): (&str, &str),
    body: &[u8],
    properties: BasicProperties,
    span: Span,
    metrics: &Metrics,
) -> Result<(), PublishError> {
    let properties = span.in_scope(|| stamp(properties));
    let result =
        publisher.publish(exchange, routing_key, body, properties).instrument(span.clone()).await;
    if let Err(e) = &result {
        failed(&span, e);
        metrics.publish_failures.with_label_values(&[e.kind()]).inc();
    }
    result
}

/// Marks `span` failed: error status with `reason`.
pub fn failed(span: &Span, reason: &dyn std::fmt::Display) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", tracing::field::display(reason));
}

/// The trace id of a valid version-00 `traceparent`.
fn trace_id(traceparent: &str) -> Option<&str> {
    parse(traceparent).map(|(trace, _)| trace)
}

/// Reads W3C headers out of an AMQP header table.
struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// Writes W3C headers into an AMQP header table, as long strings (as the Go services do).
struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.into(), long_string(&value));
    }
}

/// The longest `tracestate` and `baggage` passed on, as the W3C specifications bound them
/// (32 members of at most 256 characters; 8192 bytes): anything longer is not a valid trace
/// context and is left behind.
const MAX_TRACE_HEADER: [(&str, usize); 2] = [("tracestate", 32 * 257), ("baggage", 8192)];

/// The trace headers of a message published on behalf of `incoming`: its `traceparent`
/// continued with a new span id, its non-empty `tracestate` and `baggage` copied when within
/// their bounds. `None` when `incoming` carries no valid `traceparent`.
pub fn continued(incoming: &BasicProperties) -> Option<FieldTable> {
    let incoming = incoming.headers().as_ref()?;
    let parent = string(incoming, "traceparent").and_then(|p| continue_trace(&p))?;
    let mut headers = FieldTable::default();
    headers.insert("traceparent".into(), long_string(&parent));
    for (key, max) in MAX_TRACE_HEADER {
        if let Some(value) = string(incoming, key).filter(|v| !v.is_empty() && v.len() <= max) {
            headers.insert(key.into(), long_string(&value));
        }
    }
    Some(headers)
}

/// A `traceparent` for a child span of `parent`: same trace id and flags, a new span id.
/// `None` when `parent` is not a valid version-00 traceparent.
pub fn continue_trace(parent: &str) -> Option<String> {
    let (trace, flags) = parse(parent)?;
    let child = loop {
        let id: u64 = rand::random();
        if id != 0 {
            break id;
        }
    };
    Some(format!("00-{trace}-{child:016x}-{flags}"))
}

/// The trace id and flags of a valid version-00 `traceparent`.
fn parse(parent: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = parent.trim().split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    match parts.as_slice() {
        [version, trace, span, flags]
            if hex(version, 2)
                && *version != "ff"
                && hex(trace, 32)
                && hex(span, 16)
                && hex(flags, 2)
                && trace.bytes().any(|b| b != b'0')
                && span.bytes().any(|b| b != b'0') =>
        {
            Some((trace, flags))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_with_a_new_span() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = continue_trace(parent).unwrap();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
        assert_eq!(child.len(), parent.len());
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(continue_trace(bad), None, "{bad}");
        }
    }
}
