//! The Go side of the trip system as a real peer: `tests/go/gopeer`, built with the Go
//! toolchain and `github.com/rabbitmq/amqp091-go` from Debian's packages (`make tools`
//! installs them), offline, with `GO111MODULE=off`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Where Debian installs Go library sources.
const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// A command as trip-service hands it to `shared/messaging`.
#[derive(Debug, Clone, Serialize)]
pub struct GoCommand {
    #[serde(rename = "ownerId")]
    pub owner_id: String,
    /// The inner payload JSON, sent as it is.
    pub payload: String,
    pub traceparent: String,
}

/// `PaymentTripResponseData` as Go's `encoding/json` decoded it.
#[derive(Debug, Clone, Deserialize)]
pub struct GoTripResponse {
    #[serde(rename = "tripID")]
    pub trip_id: String,
    #[serde(rename = "userID")]
    pub user_id: String,
    #[serde(rename = "driverID")]
    pub driver_id: String,
    pub amount: f64,
    pub currency: String,
    #[serde(rename = "packageSlug", default)]
    pub package_slug: String,
}

/// How Go decoded one command's payload.
#[derive(Debug, Clone, Deserialize)]
pub struct GoDecoded {
    pub accepted: bool,
    #[serde(default)]
    pub error: String,
    pub payload: GoTripResponse,
}

/// `PaymentEventSessionCreatedData` as the api-gateway decoded it.
#[derive(Debug, Clone, Deserialize)]
pub struct GoSessionCreated {
    #[serde(rename = "tripID")]
    pub trip_id: String,
    #[serde(rename = "sessionID")]
    pub session_id: String,
    pub amount: f64,
    pub currency: String,
}

/// One event as the api-gateway received it.
#[derive(Debug, Clone, Deserialize)]
pub struct GoEvent {
    #[serde(rename = "ownerId")]
    pub owner_id: String,
    pub traceparent: String,
    pub payload: GoSessionCreated,
}

/// The built peer.
///
/// # Panics
/// When Go or the AMQP library is missing (run `make tools`), or the build fails.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let root = crate::world::repo_path("");
        let out = root.join("target").join("gopeer");
        let binary = out.join("gopeer");
        let built = std::process::Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg("./tests/go/gopeer")
            .current_dir(root)
            .env("GO111MODULE", "off")
            .env("GOPATH", DEBIAN_GOPATH)
            .env("GOPROXY", "off")
            .env("GOCACHE", out.join("cache"))
            .output()
            .expect("the Go toolchain (golang-go); `make tools` installs it");
        assert!(
            built.status.success(),
            "building tests/go/gopeer failed (`make tools` installs golang-go and \
             golang-github-rabbitmq-amqp091-go-dev):\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        binary
    })
}

/// How long the Go peer may take beyond what it is asked to wait for.
const PEER_WITHIN: Duration = Duration::from_secs(60);

/// Publishes `commands` as trip-service does; returns how Go decoded each payload.
///
/// # Panics
/// When the peer fails (a refused publish, a broker error).
pub async fn trip_service(uri: &str, commands: &[GoCommand]) -> Vec<GoDecoded> {
    let mut child = Command::new(binary())
        .args(["trip-service", "-uri", uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start gopeer");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = Vec::new();
    for command in commands {
        lines.extend(serde_json::to_vec(command).expect("a command line"));
        lines.push(b'\n');
    }
    stdin.write_all(&lines).await.expect("write to gopeer");
    drop(stdin);
    let output = tokio::time::timeout(PEER_WITHIN, child.wait_with_output())
        .await
        .expect("gopeer trip-service did not end within PEER_WITHIN")
        .expect("gopeer trip-service");
    decode_lines(&output)
}

/// Consumes `count` messages from `queue` as the api-gateway does.
///
/// # Panics
/// When an event does not decode in Go, or fewer than `count` arrive within `timeout`.
pub async fn api_gateway(uri: &str, queue: &str, count: usize, timeout: Duration) -> Vec<GoEvent> {
    let output = Command::new(binary())
        .args(["api-gateway", "-uri", uri, "-queue", queue])
        .args(["-n", &count.to_string(), "-timeout", &format!("{}ms", timeout.as_millis())])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(timeout + PEER_WITHIN, output)
        .await
        .expect("gopeer api-gateway did not end within its timeout and PEER_WITHIN")
        .expect("gopeer api-gateway");
    decode_lines(&output)
}

fn decode_lines<T: for<'de> Deserialize<'de>>(output: &std::process::Output) -> Vec<T> {
    assert!(
        output.status.success(),
        "gopeer failed: {}\nprinted so far:\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    output
        .stdout
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).expect("a gopeer line"))
        .collect()
}
