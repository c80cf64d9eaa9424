//! Operator subcommands, one file each: [`topology`] (`show`, `check`), [`parked`] (`list`,
//! `replay`, `purge`) and [`send`]. Each owns its arguments, its run and its output; this
//! module holds what they share.
//!
//! All of them are safe against production: `topology check` changes nothing and `parked list`
//! leaves the parking queue as it was (see [`parked::walk_parked`]); `parked replay` publishes
//! each copy with confirms before removing the parked one (an interruption at worst leaves a
//! message in both places, and idempotency by trip makes a double replay harmless); `parked
//! purge` needs `--yes`. Every wait on the broker is bounded by [`BROKER_WAIT`].

pub mod parked;
pub mod send;
pub mod topology;

use std::io::Write as _;
use std::time::Duration;

use lapin::{Channel, Connection};
use serde::Serialize;

use crate::broker::connect::BrokerConnection;
use crate::broker::publish::PublishError;
use crate::broker::topology::TopologyError;
use crate::settings::ConfigError;
use crate::settings::broker::GlobalArgs;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The broker refused, or could not be reached, while doing `what`.
    #[error("{what}: {reason}")]
    Broker { what: String, reason: String },
    /// `replay` or `purge` without saying which messages.
    #[error("choose what to take: --trip ID (repeatable), --reason REASON, or --all")]
    NoSelection,
    #[error("replaying to {queue}: {source}; the message stays parked")]
    Replay { queue: String, source: PublishError },
    #[error("keeping a message in {queue}: {source}; it stays parked as it was")]
    Keep { queue: String, source: PublishError },
    #[error("sending trip {trip}: {source}")]
    Send { trip: String, source: PublishError },
    /// The broker did not answer within [`BROKER_WAIT`].
    #[error("no answer from the broker within {} s while {what}", BROKER_WAIT.as_secs())]
    TimedOut { what: String },
}

/// How long an operator command waits for any one answer of the broker (a channel, a read, a
/// confirm, a close) before it gives up and says what it waited for.
pub const BROKER_WAIT: Duration = Duration::from_secs(15);

/// Waits at most [`BROKER_WAIT`] for `operation`; a time-out names `what`.
///
/// # Errors
/// [`OpsError::TimedOut`].
pub async fn within<F: Future>(what: &str, operation: F) -> Result<F::Output, OpsError> {
    tokio::time::timeout(BROKER_WAIT, operation)
        .await
        .map_err(|_| OpsError::TimedOut { what: what.to_owned() })
}

/// A broker operation bounded by [`BROKER_WAIT`], its error explained by [`describe`].
///
/// # Errors
/// The broker's refusal or a time-out, both naming `what`.
pub async fn bounded<T>(
    what: &str,
    operation: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, OpsError> {
    within(what, operation).await?.map_err(|e| describe(&e, what))
}

/// Explains a broker error in an operator's words.
pub fn describe(error: &lapin::Error, what: &str) -> OpsError {
    let reason = match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.get_id() {
            404 => format!("not found on the broker ({})", amqp.get_message()),
            403 => format!("permission refused ({})", amqp.get_message()),
            406 => format!("refused ({})", amqp.get_message()),
            _ => amqp.get_message().to_string(),
        },
        lapin::ErrorKind::IOError(io) => format!("broker unreachable ({io})"),
        _ => error.to_string(),
    };
    OpsError::Broker { what: what.to_owned(), reason }
}

/// Connects to the broker named by the global settings.
///
/// # Errors
/// When RABBITMQ_URI is invalid, the broker cannot be reached or refuses the credentials.
pub async fn connect(global: &GlobalArgs) -> Result<BrokerConnection, OpsError> {
    let broker = global.broker()?;
    broker.connect("payment-worker-cli").await.map_err(|e| OpsError::Broker {
        what: format!("connecting to {}", broker.describe()),
        reason: e.to_string(),
    })
}

async fn channel(connection: &Connection) -> Result<Channel, OpsError> {
    bounded("opening a channel", connection.create_channel()).await
}

/// Closes the connection, waiting at most [`BROKER_WAIT`] for the broker's answer: what the
/// command did is done by then, and dropping the connection ends it all the same.
async fn close(connection: BrokerConnection) {
    let _ = within("closing the connection", connection.close(200, "done".into())).await;
}

/// Prints `value` as one JSON line.
pub fn print_json(value: &impl Serialize) {
    let mut stdout = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut stdout, value);
    let _ = writeln!(stdout);
}
