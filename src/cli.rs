//! The command line: settings every subcommand shares, and the subcommands. The run settings
//! are in [`crate::config`]; each operator command owns its arguments in [`crate::ops`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

use crate::config::{ConfigError, RunArgs};
use crate::ops::parked::ParkedCommand;
use crate::ops::send::SendArgs;
use crate::ops::topology::TopologyCommand;
use crate::topology::{Topology, TopologyError};

#[derive(Parser)]
#[command(
    name = "payment-worker",
    version,
    about = "Creates Stripe Checkout Sessions for trip commands from RabbitMQ, with retries that live in the broker"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct GlobalArgs {
    /// Broker URI, credentials included (never logged).
    #[arg(
        long,
        env = "RABBITMQ_URI",
        default_value = "amqp://guest:guest@rabbitmq:5672/%2f",
        hide_env_values = true,
        global = true
    )]
    rabbitmq_uri: String,

    /// Topology profile file (see topology/); the built-in default profile when unset.
    #[arg(long, env = "PAYMENT_TOPOLOGY", global = true)]
    pub topology: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the worker: consume commands, create sessions, publish events.
    #[command(args_override_self = true)]
    Run(Box<RunArgs>),
    /// Show the topology, or check a live broker against it.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Inspect, replay or purge parked messages.
    #[command(subcommand)]
    Parked(ParkedCommand),
    /// Publish one `payment.cmd.create_session`, as trip-service would.
    Send(SendArgs),
}

impl GlobalArgs {
    /// The broker URI, checked. Validated here rather than by clap, whose error messages
    /// quote the rejected value (and with it the password).
    ///
    /// # Errors
    /// An error naming RABBITMQ_URI, without the URI itself.
    pub fn broker_uri(&self) -> Result<SecretString, ConfigError> {
        crate::broker::validate_uri(&self.rabbitmq_uri)
            .map_err(|reason| ConfigError::new("RABBITMQ_URI", "rabbitmq-uri", reason))?;
        Ok(SecretString::from(self.rabbitmq_uri.clone()))
    }

    /// The topology profile: the file named, or the built-in default.
    ///
    /// # Errors
    /// See [`Topology::load`].
    pub fn load_topology(&self) -> Result<Topology, TopologyError> {
        Topology::load(self.topology.as_deref())
    }
}
