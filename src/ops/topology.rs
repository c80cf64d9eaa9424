//! `topology show` and `topology check`.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use lapin::Connection;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use serde_json::{Value, json};

use super::{OpsError, channel, close, connect, describe, print_json, within};
use crate::broker::topology::{ExchangeDecl, QueueDecl, Topology};
use crate::settings::broker::GlobalArgs;

#[derive(Subcommand)]
pub enum TopologyCommand {
    /// Print the exchanges, queues, bindings and retry schedule the worker declares.
    Show {
        #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
        format: ShowFormat,
        /// The vhost named in `--format definitions`.
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Compare a live broker with the topology without changing it; exits 1 on any
    /// difference.
    Check {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShowFormat {
    /// For people.
    Text,
    /// RabbitMQ definitions JSON, for `rabbitmqctl import_definitions`.
    Definitions,
}

impl TopologyCommand {
    /// # Errors
    /// When the profile cannot be loaded or the broker cannot be reached.
    pub async fn exec(self, global: &GlobalArgs) -> Result<ExitCode, OpsError> {
        let topology = global.load_topology()?;
        match self {
            Self::Show { format: ShowFormat::Text, .. } => print!("{}", show_text(&topology)),
            Self::Show { format: ShowFormat::Definitions, vhost } => {
                let definitions = show_definitions(&topology, &vhost);
                println!("{definitions:#}");
            }
            Self::Check { json } => {
                let connection = connect(global).await?;
                let lines = check(&connection, &topology).await;
                close(connection).await;
                let lines = lines?;
                for line in &lines {
                    if json {
                        print_json(line);
                    } else {
                        println!(
                            "{:<10} {:<60} {}",
                            line.status.as_str(),
                            line.object,
                            line.detail
                        );
                    }
                }
                if !lines.iter().all(|l| l.status.is_fine()) {
                    eprintln!(
                        "payment-worker: the broker differs from profile {:?}",
                        topology.profile
                    );
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `topology show`: the declarations, readable.
pub fn show_text(topology: &Topology) -> String {
    let plan = topology.plan();
    let mut out = String::new();
    let _ = writeln!(out, "profile: {}", topology.profile);
    let delays: Vec<&str> = topology.retry.delays.iter().map(|d| d.label()).collect();
    let _ = writeln!(
        out,
        "retry schedule: {} ({} attempts, then {})",
        delays.join(", "),
        topology.max_attempts(),
        topology.parking.queue
    );
    let _ = writeln!(out, "\nexchanges:");
    for exchange in &plan.exchanges {
        let _ = writeln!(out, "  {:<32} {} durable", exchange.name, exchange.kind);
    }
    let _ = writeln!(out, "\nqueues (durable):");
    for queue in &plan.queues {
        let _ = writeln!(out, "  {:<32} {}", queue.name, queue.describe_arguments());
    }
    let _ = writeln!(out, "\nbindings:");
    for binding in &plan.bindings {
        let _ = writeln!(
            out,
            "  {:<16} --[{}]--> {}",
            binding.exchange, binding.routing_key, binding.queue
        );
    }
    out
}

/// `topology show --format definitions`: RabbitMQ definitions for `rabbitmqctl
/// import_definitions`, in vhost `vhost`.
pub fn show_definitions(topology: &Topology, vhost: &str) -> Value {
    let plan = topology.plan();
    let exchanges: Vec<Value> = plan
        .exchanges
        .iter()
        .map(|e| {
            json!({"name": e.name, "vhost": vhost, "type": e.kind.to_string(), "durable": true,
                   "auto_delete": false, "internal": false, "arguments": {}})
        })
        .collect();
    let queues: Vec<Value> = plan
        .queues
        .iter()
        .map(|q| {
            let arguments: serde_json::Map<String, Value> =
                q.arguments.iter().map(|(k, v)| (k.clone(), v.json())).collect();
            json!({"name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                   "arguments": arguments})
        })
        .collect();
    let bindings: Vec<Value> = plan
        .bindings
        .iter()
        .map(|b| {
            json!({"source": b.exchange, "vhost": vhost, "destination": b.queue,
                   "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}})
        })
        .collect();
    json!({
        "vhosts": [{"name": vhost}],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    })
}

/// What `topology check` found for one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// It exists with the profile's arguments.
    Present,
    /// It does not exist.
    Missing,
    /// It exists with other arguments (or of another type).
    Differs,
    /// It cannot be checked over AMQP (bindings).
    Unchecked,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Present => "present",
            Self::Missing => "missing",
            Self::Differs => "differs",
            Self::Unchecked => "unchecked",
        }
    }

    /// Whether the line agrees with the profile as far as can be told.
    pub fn is_fine(self) -> bool {
        matches!(self, Self::Present | Self::Unchecked)
    }
}

/// One object's state on the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckLine {
    pub object: String,
    pub status: CheckStatus,
    pub detail: String,
}

/// `topology check`: compares the broker with the profile. Exchanges and queues are probed
/// passively first; one that exists is then declared again with the profile's exact arguments,
/// which the broker accepts without change when they match and refuses (naming the argument)
/// when they differ, so nothing on the broker changes either way. AMQP cannot list bindings,
/// so they are reported unchecked.
///
/// # Errors
/// When the broker cannot be reached or refuses a probe for another reason than a missing
/// object (a permission, for instance).
pub async fn check(
    connection: &Connection,
    topology: &Topology,
) -> Result<Vec<CheckLine>, OpsError> {
    let plan = topology.plan();
    let mut lines = Vec::new();
    for exchange in &plan.exchanges {
        lines.push(check_exchange(connection, exchange).await?);
    }
    for queue in &plan.queues {
        lines.push(check_queue(connection, queue).await?);
    }
    for binding in &plan.bindings {
        lines.push(CheckLine {
            object: binding.to_string(),
            status: CheckStatus::Unchecked,
            detail: "AMQP cannot list bindings; the worker declares them at start".into(),
        });
    }
    Ok(lines)
}

/// One exchange of the plan, on a channel of its own (a refused declaration closes it).
async fn check_exchange(
    connection: &Connection,
    exchange: &ExchangeDecl,
) -> Result<CheckLine, OpsError> {
    let object = format!("exchange {}", exchange.name);
    let channel = channel(connection).await?;
    let declare = |options| {
        channel.exchange_declare(
            exchange.name.as_str().into(),
            exchange.kind.lapin(),
            options,
            FieldTable::default(),
        )
    };
    let what = format!("checking {object}");
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let probe = within(&what, declare(passive)).await?;
    if let Some(missing) = absent(probe, &object)? {
        return Ok(missing);
    }
    let active = ExchangeDeclareOptions { durable: true, ..Default::default() };
    let result = within(&what, declare(active)).await?;
    let line = verdict(object, result.err(), format!("{} durable", exchange.kind))?;
    let _ = within(&what, channel.close(200, "checked".into())).await;
    Ok(line)
}

/// One queue of the plan, on a channel of its own.
async fn check_queue(connection: &Connection, queue: &QueueDecl) -> Result<CheckLine, OpsError> {
    let object = format!("queue {}", queue.name);
    let channel = channel(connection).await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let what = format!("checking {object}");
    let name = queue.name.as_str();
    let probe =
        within(&what, channel.queue_declare(name.into(), passive, FieldTable::default())).await?;
    if let Some(missing) = absent(probe.map(|_| ()), &object)? {
        return Ok(missing);
    }
    let active = QueueDeclareOptions { durable: true, ..Default::default() };
    let result =
        within(&what, channel.queue_declare(name.into(), active, queue.field_table())).await?;
    let line = verdict(object, result.err(), queue.describe_arguments())?;
    let _ = within(&what, channel.close(200, "checked".into())).await;
    Ok(line)
}

/// The line for an object a passive probe did not find; `None` when it exists.
///
/// # Errors
/// Any failure other than 404, such as a refused permission.
fn absent(probe: Result<(), lapin::Error>, object: &str) -> Result<Option<CheckLine>, OpsError> {
    match probe {
        Ok(()) => Ok(None),
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404) => {
            Ok(Some(CheckLine {
                object: object.to_owned(),
                status: CheckStatus::Missing,
                detail: String::new(),
            }))
        }
        Err(e) => Err(describe(&e, object)),
    }
}

/// The line for an object the profile's declaration was tried on.
///
/// # Errors
/// A refused permission: that says nothing about whether the object matches.
fn verdict(
    object: String,
    error: Option<lapin::Error>,
    wanted: String,
) -> Result<CheckLine, OpsError> {
    Ok(match error {
        None => CheckLine { object, status: CheckStatus::Present, detail: wanted },
        Some(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 403) =>
        {
            return Err(describe(&e, &object));
        }
        Some(e) => {
            let broker = match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
                _ => e.to_string(),
            };
            CheckLine {
                object,
                status: CheckStatus::Differs,
                detail: format!("{broker}; the profile wants {wanted}"),
            }
        }
    })
}
