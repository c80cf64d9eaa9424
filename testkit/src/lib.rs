//! Test fixtures for payment-worker.
//!
//! - [`vhost::Vhost`]: a RabbitMQ virtual host of a test's own on the local broker, deleted
//!   when dropped, so tests run in parallel and leave nothing behind.
//! - [`stripe::StripeStandin`]: a local server that behaves like Stripe's Checkout Sessions
//!   endpoint: form-encoded parameters, Idempotency-Key replay, `idempotency_error` on a
//!   changed request, and scripted failures.
//! - [`amqp`]: publishing commands and reading queues the way the trip system would.
//! - [`node`]: a RabbitMQ node of a test's own, to stop and kill freely.
//! - [`cluster::RabbitCluster`]: three such nodes joined into a cluster.
//! - [`otlp::Collector`]: an OTLP/HTTP collector decoding spans with the official protobufs.
//! - [`proxy::FaultProxy`]: a TCP proxy that cuts and delays connections.
//! - [`pod::Pod`]: the worker binary as a child process, ready when `/readyz` says so,
//!   started by [`pod::Launch`].
//! - [`cli`]: the operator commands, run as an operator would.
//! - [`gopeer`]: the Go services' side of the wire (trip-service, api-gateway), built from
//!   `tests/go/gopeer` with Go's own `encoding/json` and `amqp091-go`.
//! - [`tls::TestPki`]: a CA, server and client certificates made for one test run.
//! - [`names`]: the default profile's queue names.
//! - [`stats`]: sizes from the environment and percentiles, for the long runs.
//! - [`world::World`]: a test's vhost, broker client and Stripe stand-in, with workers started
//!   on them in this process or as the binary; the worker tests and the node tests share it.

pub mod amqp;
pub mod cli;
pub mod cluster;
pub mod gopeer;
pub mod names;
pub mod node;
pub mod otlp;
pub mod pod;
pub mod proxy;
pub mod stats;
pub mod stripe;
pub mod tls;
pub mod vhost;
pub mod world;

/// A plain HTTP/1.0 GET on loopback: `(status, body)`, or `None` when nothing answers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, &[], b"").await
}

/// A plain HTTP/1.0 request on loopback: `(status, body)`, or `None` when nothing answers.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.ok()?;
    // A server may refuse an oversized body before reading it; the answer still counts.
    let _ = stream.write_all(body).await;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A loopback address with a port that was free a moment ago, for a child process to bind.
///
/// # Panics
/// When no port can be bound.
pub fn free_loopback_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("bound address")
}

/// A loopback port that accepts connections and never says a word (a hung node, a load
/// balancer whose backends are down, a collector that never answers): its address, and the
/// task that holds the connections until it is dropped or aborted.
pub async fn silent_listener() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("a bound listener has an address");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}
