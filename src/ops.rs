//! Operator subcommands: `topology show|check`, `parked list|replay|purge`, `send`.
//!
//! All of them are safe against production: `topology check` and `parked list` change
//! nothing; `parked replay` publishes each copy with confirms before removing the parked one
//! (an interruption at worst leaves a message in both places, and idempotency by trip makes a
//! double replay harmless); `parked purge` needs `--yes`.

use std::fmt::Write as _;
use std::io::Write as _;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{Value, json};

use crate::broker::{Publisher, redacted_uri};
use crate::contract::{CreateSession, Envelope};
use crate::retry::{self, RetryState};
use crate::topology::{ExchangeType, Topology};

/// An operator command failed; the message says what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpsError(pub String);

type Result<T> = std::result::Result<T, OpsError>;

/// Explains a broker error in an operator's words.
pub fn describe(error: &lapin::Error, what: &str) -> OpsError {
    let text = match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.get_id() {
            404 => format!("{what}: not found on the broker ({})", amqp.get_message()),
            403 => format!("{what}: permission refused ({})", amqp.get_message()),
            406 => format!("{what}: refused ({})", amqp.get_message()),
            _ => format!("{what}: {}", amqp.get_message()),
        },
        lapin::ErrorKind::IOError(io) => format!("{what}: broker unreachable ({io})"),
        _ => format!("{what}: {error}"),
    };
    OpsError(text)
}

/// Connects for an operator command.
///
/// # Errors
/// When the broker cannot be reached or refuses the credentials.
pub async fn connect(uri: &SecretString) -> Result<Connection> {
    let properties =
        ConnectionProperties::default().with_connection_name("payment-worker-cli".into());
    Connection::connect(uri.expose_secret(), properties)
        .await
        .map_err(|e| describe(&e, &format!("connecting to {}", redacted_uri(uri))))
}

// ---------------------------------------------------------------------------------------------
// topology show / check

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

/// One object's state on the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckLine {
    pub object: String,
    /// `present`, `missing` or `differs`.
    pub status: &'static str,
    pub detail: String,
}

/// `topology check`: compares the broker with the profile. Exchanges and queues are probed
/// passively first; one that exists is then declared again with the profile's exact arguments,
/// which the broker accepts without change when they match and refuses (naming the argument)
/// when they differ, so nothing on the broker changes either way. AMQP cannot list bindings,
/// so they are reported unchecked.
///
/// # Errors
/// When the broker cannot be reached.
pub async fn check(connection: &Connection, topology: &Topology) -> Result<Vec<CheckLine>> {
    let plan = topology.plan();
    let mut lines = Vec::new();
    for exchange in &plan.exchanges {
        let object = format!("exchange {}", exchange.name);
        let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
        let kind = match exchange.kind {
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Direct => ExchangeKind::Direct,
        };
        let channel = channel(connection).await?;
        let probe = channel
            .exchange_declare(
                exchange.name.as_str().into(),
                kind.clone(),
                passive,
                FieldTable::default(),
            )
            .await;
        if let Some(missing) = absent(probe, &object)? {
            lines.push(missing);
            continue;
        }
        let active = ExchangeDeclareOptions { durable: true, ..Default::default() };
        let result = channel
            .exchange_declare(exchange.name.as_str().into(), kind, active, FieldTable::default())
            .await;
        lines.push(verdict(object, result.err(), format!("{} durable", exchange.kind)));
        let _ = channel.close(200, "checked".into()).await;
    }
    for queue in &plan.queues {
        let object = format!("queue {}", queue.name);
        let channel = self::channel(connection).await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let probe =
            channel.queue_declare(queue.name.as_str().into(), passive, FieldTable::default()).await;
        if let Some(missing) = absent(probe.map(|_| ()), &object)? {
            lines.push(missing);
            continue;
        }
        let active = QueueDeclareOptions { durable: true, ..Default::default() };
        let result =
            channel.queue_declare(queue.name.as_str().into(), active, queue.field_table()).await;
        lines.push(verdict(object, result.err(), queue.describe_arguments()));
        let _ = channel.close(200, "checked".into()).await;
    }
    for binding in &plan.bindings {
        lines.push(CheckLine {
            object: binding.to_string(),
            status: "unchecked",
            detail: "AMQP cannot list bindings; the worker declares them at start".into(),
        });
    }
    Ok(lines)
}

/// The line for an object a passive probe did not find; `None` when it exists.
///
/// # Errors
/// Any failure other than 404, such as a refused permission.
fn absent(probe: std::result::Result<(), lapin::Error>, object: &str) -> Result<Option<CheckLine>> {
    match probe {
        Ok(()) => Ok(None),
        Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404) => {
            Ok(Some(CheckLine {
                object: object.to_owned(),
                status: "missing",
                detail: String::new(),
            }))
        }
        Err(e) => Err(describe(&e, object)),
    }
}

fn verdict(object: String, error: Option<lapin::Error>, wanted: String) -> CheckLine {
    match error {
        None => CheckLine { object, status: "present", detail: wanted },
        Some(e) => {
            let broker = match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
                _ => e.to_string(),
            };
            CheckLine {
                object,
                status: "differs",
                detail: format!("{broker}; the profile wants {wanted}"),
            }
        }
    }
}

async fn channel(connection: &Connection) -> Result<Channel> {
    connection.create_channel().await.map_err(|e| describe(&e, "opening a channel"))
}

// ---------------------------------------------------------------------------------------------
// parked list / replay / purge

/// A parked message, as `parked list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedEntry {
    pub trip_id: Option<String>,
    pub rider: Option<String>,
    /// Minor units, when the command decodes.
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub reason: String,
    pub detail: String,
    pub attempts: u32,
    pub first_failure_at_ms: Option<u64>,
    pub parked_at_ms: Option<u64>,
}

impl ParkedEntry {
    fn from_message(body: &[u8], properties: &BasicProperties) -> Self {
        let state = RetryState::from_properties(properties);
        let headers = properties.headers().clone().unwrap_or_default();
        let command = CreateSession::decode(body).ok();
        Self {
            trip_id: command
                .as_ref()
                .map(|c| c.trip_id.clone())
                .or_else(|| CreateSession::trip_id_hint(body)),
            rider: command
                .as_ref()
                .map(|c| c.owner_id.clone())
                .or_else(|| Envelope::decode(body).ok().map(|e| e.owner_id)),
            amount: command.as_ref().map(|c| c.amount.get()),
            currency: command.as_ref().map(|c| c.currency.as_received().to_owned()),
            reason: retry::string(&headers, retry::PARK_REASON).unwrap_or_else(|| "unknown".into()),
            detail: retry::string(&headers, retry::PARK_DETAIL).unwrap_or_default(),
            attempts: state.attempts,
            first_failure_at_ms: state.first_failure_at,
            parked_at_ms: retry::int(&headers, retry::PARKED_AT)
                .and_then(|n| u64::try_from(n).ok()),
        }
    }

    /// One line for people.
    pub fn line(&self) -> String {
        let when = |ms: Option<u64>| ms.map_or_else(|| "-".to_owned(), format_ms);
        format!(
            "{:<24} rider={:<16} amount={:<12} reason={:<22} attempts={} first_failure={} parked_at={}  {}",
            self.trip_id.as_deref().unwrap_or("(undecodable)"),
            self.rider.as_deref().unwrap_or("-"),
            match (&self.amount, &self.currency) {
                (Some(a), Some(c)) => format!("{a} {c}"),
                _ => "-".into(),
            },
            self.reason,
            self.attempts,
            when(self.first_failure_at_ms),
            when(self.parked_at_ms),
            self.detail
        )
    }
}

fn format_ms(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Which parked messages a replay or purge takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub trip_ids: Vec<String>,
    pub reason: Option<String>,
    pub all: bool,
    /// At most this many.
    pub limit: Option<usize>,
}

impl Filter {
    /// # Errors
    /// When it would select nothing explicitly: `--all`, `--trip` or `--reason` is needed.
    pub fn validate(&self) -> Result<()> {
        if !self.all && self.trip_ids.is_empty() && self.reason.is_none() {
            return Err(OpsError(
                "choose what to take: --trip ID (repeatable), --reason REASON, or --all".into(),
            ));
        }
        Ok(())
    }

    fn matches(&self, entry: &ParkedEntry) -> bool {
        let trip = self.trip_ids.is_empty()
            || entry.trip_id.as_ref().is_some_and(|t| self.trip_ids.contains(t));
        let reason = self.reason.as_ref().is_none_or(|r| r == &entry.reason);
        trip && reason
    }
}

/// What to do with each matching parked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Only look.
    List,
    /// Back to the work queue, attempt counter reset.
    Replay,
    /// Remove.
    Purge,
}

/// Walks the parking queue once: every message is fetched without auto-ack; those the filter
/// and action take are replayed or purged (replayed copies are confirmed before the parked one
/// is acked); all others are handed back at the end, which puts them back in their places.
/// `report` is called with each taken message.
///
/// # Errors
/// When the broker is unreachable, the queue missing, or a publish not confirmed (the messages
/// not yet handled stay parked).
pub async fn walk_parked(
    connection: &Connection,
    topology: &Topology,
    action: Action,
    filter: &Filter,
    dry_run: bool,
    mut report: impl FnMut(&ParkedEntry),
) -> Result<usize> {
    let queue = &topology.parking.queue;
    let channel = channel(connection).await?;
    let declared = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .map_err(|e| describe(&e, &format!("queue {queue}")))?;
    let publisher = if action == Action::Replay && !dry_run {
        Some(
            Publisher::open(connection)
                .await
                .map_err(|e| describe(&e, "opening a publish channel"))?,
        )
    } else {
        None
    };
    let mut taken = 0;
    let mut last_tag = None;
    // Only the messages present at the start: a message put back is never read twice.
    for _ in 0..declared.message_count() {
        if filter.limit.is_some_and(|limit| taken >= limit) {
            break;
        }
        let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|e| describe(&e, &format!("reading {queue}")))?
        else {
            break;
        };
        let delivery = message.delivery;
        last_tag = Some(delivery.delivery_tag);
        let entry = ParkedEntry::from_message(&delivery.data, &delivery.properties);
        let take = action == Action::List || filter.matches(&entry);
        if !take {
            continue;
        }
        taken += 1;
        if action != Action::List && !dry_run {
            if let Some(publisher) = &publisher {
                publisher
                    .publish(
                        "",
                        &topology.work_queue.name,
                        &delivery.data,
                        replay_properties(&delivery.properties),
                    )
                    .await
                    .map_err(|e| {
                        OpsError(format!(
                            "replaying to {}: {e}; the message stays parked",
                            topology.work_queue.name
                        ))
                    })?;
            }
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| describe(&e, "removing the parked copy"))?;
        }
        report(&entry);
    }
    if let Some(tag) = last_tag {
        // Hands back every message not acked above, in its original place.
        let _ = channel.basic_nack(tag, BasicNackOptions { multiple: true, requeue: true }).await;
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(taken)
}

/// The properties of a replayed copy: the original's, with the retry bookkeeping removed (the
/// attempt counter starts again) but the original exchange and routing key kept, so the
/// worker still recognises the command.
fn replay_properties(parked: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(original) = parked.headers() {
        for (key, value) in original.inner() {
            let name = key.as_str();
            let keep = !name.starts_with("payment-")
                || name == retry::ORIGINAL_EXCHANGE
                || name == retry::ORIGINAL_ROUTING_KEY;
            if keep {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    parked.clone().with_headers(headers)
}

// ---------------------------------------------------------------------------------------------
// send

/// A `payment.cmd.create_session` to publish.
#[derive(Debug, Clone)]
pub struct SendCommand {
    pub trip_id: String,
    pub user_id: String,
    pub driver_id: String,
    pub amount_cents: i64,
    pub currency: String,
    pub package_slug: Option<String>,
}

impl SendCommand {
    /// The body, as trip-service writes it.
    pub fn body(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Payload<'a> {
            #[serde(rename = "tripID")]
            trip_id: &'a str,
            #[serde(rename = "userID")]
            user_id: &'a str,
            #[serde(rename = "driverID")]
            driver_id: &'a str,
            amount: f64,
            currency: &'a str,
            #[serde(rename = "packageSlug", skip_serializing_if = "Option::is_none")]
            package_slug: Option<&'a str>,
        }
        Envelope::encode(
            &self.user_id,
            &Payload {
                trip_id: &self.trip_id,
                user_id: &self.user_id,
                driver_id: &self.driver_id,
                amount: self.amount_cents as f64,
                currency: &self.currency,
                package_slug: self.package_slug.as_deref(),
            },
        )
    }
}

/// Publishes one command on the trip exchange and waits for the broker's confirm.
///
/// # Errors
/// When the broker is unreachable, the exchange missing, or nothing is bound to take it.
pub async fn send(
    connection: &Connection,
    topology: &Topology,
    command: &SendCommand,
    traceparent: Option<&str>,
) -> Result<()> {
    let publisher =
        Publisher::open(connection).await.map_err(|e| describe(&e, "opening a publish channel"))?;
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(traceparent) = traceparent {
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString(LongString::from(traceparent)));
        properties = properties.with_headers(headers);
    }
    publisher
        .publish(
            &topology.exchanges.trip,
            &topology.routing_keys.create_session,
            &command.body(),
            properties,
        )
        .await
        .map_err(|e| OpsError(format!("sending trip {}: {e}", command.trip_id)))
}

/// Prints `value` as one JSON line.
pub fn print_json(value: &impl Serialize) {
    let mut stdout = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut stdout, value);
    let _ = writeln!(stdout);
}
