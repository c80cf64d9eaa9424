//! An OpenTelemetry collector on loopback: receives OTLP over HTTP (`POST /v1/traces`) and
//! decodes every request with the official protobuf definitions (`opentelemetry-proto`), so
//! what the worker sends is checked against the specification, not against itself.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
pub use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use tokio::net::TcpListener;

/// What the collector received.
#[derive(Default)]
struct Received {
    /// Every span, with its resource's `service.name`.
    spans: Vec<(String, Span)>,
    requests: usize,
}

/// The running collector; stops when dropped.
pub struct Collector {
    pub addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Listens on `addr` (`127.0.0.1:0` for any port).
    ///
    /// # Panics
    /// When the address cannot be bound.
    pub async fn start(addr: &str) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind the collector");
        let addr = listener.local_addr().expect("a bound address");
        let received = Arc::new(Mutex::new(Received::default()));
        let shared = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let received = shared.clone();
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let received = received.clone();
                    async move {
                        let path_ok = request.uri().path() == "/v1/traces";
                        let body = request.into_body().collect().await?.to_bytes();
                        let export = ExportTraceServiceRequest::decode(body)
                            .ok()
                            .filter(|_| path_ok)
                            .expect("an ExportTraceServiceRequest on /v1/traces");
                        let mut received = received.lock().unwrap();
                        received.requests += 1;
                        for resource in export.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "service.name")
                                .and_then(|a| string(a.value.as_ref()?.value.as_ref()?))
                                .unwrap_or_default();
                            for scope in resource.scope_spans {
                                for span in scope.spans {
                                    received.spans.push((service.clone(), span));
                                }
                            }
                        }
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                tokio::spawn(async move {
                    let _ =
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Self { addr, received, task }
    }

    /// `http://addr`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received.lock().unwrap().spans.iter().map(|(_, s)| s.clone()).collect()
    }

    /// The `service.name` of every span received so far.
    pub fn services(&self) -> Vec<String> {
        self.received.lock().unwrap().spans.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Export requests received so far.
    pub fn requests(&self) -> usize {
        self.received.lock().unwrap().requests
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An attribute of `span`, as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|a| a.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => string(other).unwrap_or_else(|| format!("{other:?}")),
    })
}

fn string(value: &Value) -> Option<String> {
    match value {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Bytes as lower-case hex (trace and span ids).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
