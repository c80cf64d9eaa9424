//! Operator subcommands, one file each: [`topology`] (`show`, `check`), [`parked`] (`list`,
//! `replay`, `purge`) and [`send`]. Each owns its arguments, its run and its output; this
//! module holds what they share.
//!
//! All of them are safe against production: `topology check` and `parked list` change
//! nothing; `parked replay` publishes each copy with confirms before removing the parked one
//! (an interruption at worst leaves a message in both places, and idempotency by trip makes a
//! double replay harmless); `parked purge` needs `--yes`.

pub mod parked;
pub mod send;
pub mod topology;

use std::io::Write as _;

use lapin::{Channel, Connection};
use serde::Serialize;

use crate::access::BrokerConnection;
use crate::broker::PublishError;
use crate::cli::GlobalArgs;
use crate::config::ConfigError;
use crate::topology::TopologyError;

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
    #[error("sending trip {trip}: {source}")]
    Send { trip: String, source: PublishError },
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
    connection.create_channel().await.map_err(|e| describe(&e, "opening a channel"))
}

async fn close(connection: BrokerConnection) {
    let _ = connection.close(200, "done".into()).await;
}

/// Prints `value` as one JSON line.
pub fn print_json(value: &impl Serialize) {
    let mut stdout = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut stdout, value);
    let _ = writeln!(stdout);
}
