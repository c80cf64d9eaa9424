//! The exchanges, queues and bindings payment-worker relies on, read from a profile file.
//!
//! A profile (`topology/*.toml`) names things and picks queue types; [`Topology::plan`] turns
//! it into the exact declarations, so the worker, `topology show` and `topology check` all
//! agree on one list. The default profile is `topology/default.toml`, built into the binary.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use serde::{Deserialize, Serialize};

/// The built-in default profile.
pub const DEFAULT_PROFILE: &str = include_str!("../../topology/default.toml");

/// The longest retry schedule accepted (the delays added up). Stripe may prune an idempotency
/// key once it is 24 hours old, after which a retry would create a second session; the other
/// 12 hours are the margin for time spent waiting in the work queue (a backlog, an outage).
pub const MAX_RETRY_SCHEDULE: Duration = Duration::from_secs(12 * 3600);

/// A topology profile, as written in its file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// A name for logs and `topology show`.
    pub profile: String,
    pub exchanges: Exchanges,
    pub routing_keys: RoutingKeys,
    pub work_queue: WorkQueue,
    pub retry: Retry,
    pub parking: Parking,
    /// The trip system's queues that receive payment-worker's events.
    #[serde(default)]
    pub event_queues: Vec<EventQueue>,
    /// How `payment.event.success` is published once per Stripe event.
    #[serde(default)]
    pub success: Success,
}

/// `payment.event.success` once per Stripe event id: webhooks and reconciliation hand each
/// event to the outbox; one replica at a time (single active consumer) publishes it unless
/// the ledger, a stream bound to the success routing key, already holds its id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Success {
    pub outbox: String,
    pub outbox_queue_type: QueueType,
    pub ledger: String,
    /// How long the ledger keeps an event id (`x-max-age`): the window inside which a second
    /// delivery of an event publishes nothing. Stripe keeps events 30 days.
    pub ledger_max_age: String,
}

impl Default for Success {
    fn default() -> Self {
        Self {
            outbox: "payment_success_outbox".into(),
            outbox_queue_type: QueueType::Classic,
            ledger: "payment_success_ledger".into(),
            ledger_max_age: "31D".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Exchanges {
    /// Topic exchange carrying commands and events.
    pub trip: String,
    /// Topic exchange the trip system's queues dead-letter to.
    pub dead_letter: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingKeys {
    pub create_session: String,
    pub session_created: String,
    pub payment_success: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkQueue {
    pub name: String,
    /// Also used for the event queues: all of them belong to the trip system.
    pub queue_type: QueueType,
    /// Quorum only: deliveries of one message before the broker gives up on it (RabbitMQ 4
    /// sets 20 when none is declared, and dead-letters past it). When set, what exceeds it is
    /// dead-lettered into the parking queue instead of the trip system's `dlx`, whose
    /// consumer drops payment messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Direct exchange; a retry copy is published with its delay's label as routing key.
    pub exchange: String,
    pub queue_prefix: String,
    pub queue_type: QueueType,
    /// Delays before attempts 2, 3, …; one wait queue each.
    pub delays: Vec<Delay>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Parking {
    pub queue: String,
    pub queue_type: QueueType,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventQueue {
    pub name: String,
    pub routing_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

/// One retry delay, kept with the label it was written as (`"1s"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Delay {
    label: String,
    duration: Duration,
}

impl Delay {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The duration in whole milliseconds, as `expiration` and `x-message-ttl` want it.
    pub fn millis(&self) -> u64 {
        u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX)
    }
}

impl TryFrom<String> for Delay {
    type Error = String;

    fn try_from(label: String) -> Result<Self, Self::Error> {
        let duration =
            humantime::parse_duration(&label).map_err(|e| format!("retry delay {label:?}: {e}"))?;
        if duration < Duration::from_millis(1) {
            return Err(format!("retry delay {label:?} is shorter than 1ms"));
        }
        Ok(Self { label, duration })
    }
}

impl From<Delay> for String {
    fn from(delay: Delay) -> Self {
        delay.label
    }
}

/// What is wrong with a profile, or with the broker's view of it.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read topology file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("topology file {path} is not a valid profile: {message}")]
    Parse { path: String, message: String },
    #[error("topology profile {profile:?}: {message}")]
    Invalid { profile: String, message: String },
    #[error(
        "{object} exists on the broker with different arguments: {broker}. payment-worker \
         would declare it with {wanted}. Queue and exchange arguments cannot change in place: \
         drain and delete the old one, or pick a profile (PAYMENT_TOPOLOGY) that matches it"
    )]
    Inequivalent { object: String, wanted: String, broker: String },
    #[error("declaring {object}: {source}")]
    Broker { object: String, source: lapin::Error },
}

impl TopologyError {
    /// Whether retrying the declaration later could succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Broker { .. })
    }
}

impl Topology {
    /// Reads a profile file, or the built-in default when `path` is `None`.
    ///
    /// # Errors
    /// When the file cannot be read, does not parse, or describes an impossible topology.
    pub fn load(path: Option<&Path>) -> Result<Self, TopologyError> {
        let (text, name) = match path {
            None => (DEFAULT_PROFILE.to_owned(), "(built-in default)".to_owned()),
            Some(path) => {
                let name = path.display().to_string();
                let read = |source| TopologyError::Read { path: name.clone(), source };
                let bytes = crate::read_setting_file(path).map_err(read)?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    read(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
                })?;
                (text, name)
            }
        };
        Self::parse(&text, &name)
    }

    /// # Errors
    /// When the text does not parse or describes an impossible topology.
    pub fn parse(text: &str, name: &str) -> Result<Self, TopologyError> {
        let topology: Self = toml::from_str(text)
            .map_err(|e| TopologyError::Parse { path: name.to_owned(), message: e.to_string() })?;
        topology.validate()?;
        Ok(topology)
    }

    fn validate(&self) -> Result<(), TopologyError> {
        let invalid =
            |message: String| TopologyError::Invalid { profile: self.profile.clone(), message };
        self.check_schedule()
            .and_then(|()| self.check_names())
            .and_then(|()| self.check_work_queue())
            .and_then(|()| self.check_success())
            .map_err(invalid)
    }

    /// The retry schedule: at least one delay, none twice, inside the idempotency window.
    fn check_schedule(&self) -> Result<(), String> {
        if self.retry.delays.is_empty() {
            return Err("retry.delays is empty: list at least one delay".into());
        }
        let mut labels = BTreeSet::new();
        for delay in &self.retry.delays {
            if !labels.insert(delay.label()) {
                return Err(format!("retry delay {:?} is listed twice", delay.label()));
            }
        }
        let total: Duration = self.retry.delays.iter().map(Delay::duration).sum();
        if total > MAX_RETRY_SCHEDULE {
            return Err(format!(
                "retry.delays add up to {}, more than {}: Stripe may forget a trip's \
                 idempotency key after 24 hours, and a later retry would create a second session",
                humantime::format_duration(total),
                humantime::format_duration(MAX_RETRY_SCHEDULE)
            ));
        }
        Ok(())
    }

    /// Every queue and exchange the plan declares has a name the broker takes, once.
    fn check_names(&self) -> Result<(), String> {
        let plan = self.plan();
        let mut names = BTreeSet::new();
        for queue in &plan.queues {
            if queue.name.is_empty() || queue.name.len() > 255 {
                return Err(format!("queue name {:?} must be 1 to 255 bytes", queue.name));
            }
            if !names.insert(&queue.name) {
                return Err(format!("queue {:?} is named twice", queue.name));
            }
        }
        for exchange in &plan.exchanges {
            if exchange.name.is_empty() || exchange.name.starts_with("amq.") {
                return Err(format!(
                    "exchange name {:?} must be non-empty and not start with amq.",
                    exchange.name
                ));
            }
        }
        if self.parking.queue == "dead_letter_queue" {
            return Err("parking.queue must not be the trip system's dead_letter_queue: its \
                        consumer drops payment messages"
                .into());
        }
        Ok(())
    }

    /// A delivery limit is at least 1, and only on a quorum work queue.
    fn check_work_queue(&self) -> Result<(), String> {
        match (self.work_queue.delivery_limit, self.work_queue.queue_type) {
            (Some(0), _) => Err("work_queue.delivery_limit must be at least 1".into()),
            (Some(_), QueueType::Classic) => Err("work_queue.delivery_limit needs queue_type = \
                                                  \"quorum\": classic queues refuse \
                                                  x-delivery-limit"
                .into()),
            _ => Ok(()),
        }
    }

    /// The ledger's age is one RabbitMQ takes.
    fn check_success(&self) -> Result<(), String> {
        let age = &self.success.ledger_max_age;
        let (digits, unit) = age.split_at(age.len().saturating_sub(1));
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || !matches!(unit, "Y" | "M" | "D" | "h" | "m" | "s")
        {
            return Err(format!(
                "success.ledger_max_age {age:?} is not a RabbitMQ age: a number and one of \
                 Y, M, D, h, m, s (\"31D\")"
            ));
        }
        Ok(())
    }

    /// How many times a command is tried before it is parked.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.retry.delays.len()).unwrap_or(u32::MAX).saturating_add(1)
    }

    /// The delay to wait after failed attempt number `attempt` (1-based), if any is left.
    pub fn delay_after(&self, attempt: u32) -> Option<&Delay> {
        let index = usize::try_from(attempt).ok()?.checked_sub(1)?;
        self.retry.delays.get(index)
    }

    /// The wait queue for one delay.
    pub fn wait_queue(&self, delay: &Delay) -> String {
        format!("{}{}", self.retry.queue_prefix, delay.label())
    }

    /// Every declaration, in the order they must be made.
    pub fn plan(&self) -> Plan {
        let contract_queue = |name: &str| QueueDecl {
            name: name.to_owned(),
            arguments: with_type(
                self.work_queue.queue_type,
                vec![("x-dead-letter-exchange", Arg::Str(self.exchanges.dead_letter.clone()))],
            ),
        };
        let exchanges = vec![
            ExchangeDecl { name: self.exchanges.trip.clone(), kind: ExchangeType::Topic },
            ExchangeDecl { name: self.exchanges.dead_letter.clone(), kind: ExchangeType::Topic },
            ExchangeDecl { name: self.retry.exchange.clone(), kind: ExchangeType::Direct },
        ];
        let work_queue = match self.work_queue.delivery_limit {
            None => contract_queue(&self.work_queue.name),
            Some(limit) => self.limited_work_queue(limit),
        };
        let mut queues = vec![work_queue];
        let mut bindings = vec![BindingDecl {
            exchange: self.exchanges.trip.clone(),
            queue: self.work_queue.name.clone(),
            routing_key: self.routing_keys.create_session.clone(),
        }];
        for delay in &self.retry.delays {
            let (queue, binding) = self.wait_queue_plan(delay);
            queues.push(queue);
            bindings.push(binding);
        }
        queues.push(QueueDecl {
            name: self.parking.queue.clone(),
            arguments: with_type(self.parking.queue_type, vec![]),
        });
        for event_queue in &self.event_queues {
            queues.push(contract_queue(&event_queue.name));
            bindings.push(BindingDecl {
                exchange: self.exchanges.trip.clone(),
                queue: event_queue.name.clone(),
                routing_key: event_queue.routing_key.clone(),
            });
        }
        let (outbox, ledger, ledger_binding) = self.success_plan();
        queues.extend([outbox, ledger]);
        bindings.push(ledger_binding);
        Plan { exchanges, queues, bindings }
    }

    /// A quorum work queue with a delivery limit: past it, a command dead-letters into the
    /// parking queue, at least once.
    fn limited_work_queue(&self, limit: u32) -> QueueDecl {
        QueueDecl {
            name: self.work_queue.name.clone(),
            arguments: with_type(
                self.work_queue.queue_type,
                vec![
                    ("x-delivery-limit", Arg::Int(i64::from(limit))),
                    ("x-dead-letter-exchange", Arg::Str(String::new())),
                    ("x-dead-letter-routing-key", Arg::Str(self.parking.queue.clone())),
                    ("x-dead-letter-strategy", Arg::Str("at-least-once".into())),
                    ("x-overflow", Arg::Str("reject-publish".into())),
                ],
            ),
        }
    }

    /// The success path's outbox (one active consumer), its ledger stream and the ledger's
    /// binding to the success events.
    fn success_plan(&self) -> (QueueDecl, QueueDecl, BindingDecl) {
        let outbox = QueueDecl {
            name: self.success.outbox.clone(),
            arguments: with_type(
                self.success.outbox_queue_type,
                vec![("x-single-active-consumer", Arg::Bool(true))],
            ),
        };
        let ledger = QueueDecl {
            name: self.success.ledger.clone(),
            arguments: vec![
                ("x-max-age".to_owned(), Arg::Str(self.success.ledger_max_age.clone())),
                ("x-queue-type".to_owned(), Arg::Str("stream".into())),
            ],
        };
        let binding = BindingDecl {
            exchange: self.exchanges.trip.clone(),
            queue: self.success.ledger.clone(),
            routing_key: self.routing_keys.payment_success.clone(),
        };
        (outbox, ledger, binding)
    }

    /// The wait queue of one delay and its binding to the retry exchange.
    fn wait_queue_plan(&self, delay: &Delay) -> (QueueDecl, BindingDecl) {
        let mut arguments = vec![
            ("x-dead-letter-exchange", Arg::Str(String::new())),
            ("x-dead-letter-routing-key", Arg::Str(self.work_queue.name.clone())),
            ("x-message-ttl", Arg::Int(i64::try_from(delay.millis()).unwrap_or(i64::MAX))),
        ];
        if self.retry.queue_type == QueueType::Quorum {
            arguments.push(("x-dead-letter-strategy", Arg::Str("at-least-once".into())));
            arguments.push(("x-overflow", Arg::Str("reject-publish".into())));
        }
        let queue = QueueDecl {
            name: self.wait_queue(delay),
            arguments: with_type(self.retry.queue_type, arguments),
        };
        let binding = BindingDecl {
            exchange: self.retry.exchange.clone(),
            queue: self.wait_queue(delay),
            routing_key: delay.label().to_owned(),
        };
        (queue, binding)
    }

    /// Declares the wait queue of `delay` and its binding again, for a retry copy that found
    /// no queue (someone deleted it while the worker ran).
    ///
    /// # Errors
    /// As [`Topology::declare`].
    pub async fn declare_wait_queue(
        &self,
        channel: &Channel,
        delay: &Delay,
    ) -> Result<(), TopologyError> {
        let (queue, binding) = self.wait_queue_plan(delay);
        declare_queue(channel, &queue).await?;
        bind(channel, &binding).await
    }

    /// Declares everything in [`Topology::plan`] on `channel`: durable exchanges and queues
    /// with exactly the planned arguments, then the bindings. Declaring what already exists
    /// with the same arguments changes nothing.
    ///
    /// # Errors
    /// [`TopologyError::Inequivalent`] when an object exists with other arguments (the broker
    /// then closes the channel), [`TopologyError::Broker`] on any other broker failure.
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
        let plan = self.plan();
        for exchange in &plan.exchanges {
            channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    exchange.kind.lapin(),
                    ExchangeDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| classify(exchange.to_string(), exchange.kind.to_string(), e))?;
        }
        for queue in &plan.queues {
            declare_queue(channel, queue).await?;
        }
        for binding in &plan.bindings {
            bind(channel, binding).await?;
        }
        Ok(())
    }
}

async fn declare_queue(channel: &Channel, queue: &QueueDecl) -> Result<(), TopologyError> {
    channel
        .queue_declare(
            queue.name.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            queue.field_table(),
        )
        .await
        .map(|_| ())
        .map_err(|e| classify(queue.to_string(), queue.describe_arguments(), e))
}

async fn bind(channel: &Channel, binding: &BindingDecl) -> Result<(), TopologyError> {
    channel
        .queue_bind(
            binding.queue.as_str().into(),
            binding.exchange.as_str().into(),
            binding.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError::Broker { object: binding.to_string(), source })
}

fn with_type(queue_type: QueueType, mut arguments: Vec<(&str, Arg)>) -> Vec<(String, Arg)> {
    // Classic queues are declared without `x-queue-type`, exactly as the Go services do.
    if queue_type == QueueType::Quorum {
        arguments.push(("x-queue-type", Arg::Str("quorum".into())));
    }
    let mut arguments: Vec<(String, Arg)> =
        arguments.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    arguments.sort_by(|a, b| a.0.cmp(&b.0));
    arguments
}

/// Turns a declaration failure into an error that says what to do about it.
fn classify(object: String, wanted: String, source: lapin::Error) -> TopologyError {
    if let lapin::ErrorKind::ProtocolError(amqp) = source.kind()
        && amqp.get_id() == 406
    {
        return TopologyError::Inequivalent {
            object,
            wanted,
            broker: amqp.get_message().to_string(),
        };
    }
    TopologyError::Broker { object, source }
}

/// Every declaration a topology makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub exchanges: Vec<ExchangeDecl>,
    pub queues: Vec<QueueDecl>,
    pub bindings: Vec<BindingDecl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Topic,
    Direct,
}

impl ExchangeType {
    /// The same kind, as lapin names it.
    pub fn lapin(self) -> ExchangeKind {
        match self {
            Self::Topic => ExchangeKind::Topic,
            Self::Direct => ExchangeKind::Direct,
        }
    }
}

impl fmt::Display for ExchangeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Topic => "topic",
            Self::Direct => "direct",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeDecl {
    pub name: String,
    pub kind: ExchangeType,
}

impl fmt::Display for ExchangeDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exchange '{}'", self.name)
    }
}

/// A queue argument value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl Arg {
    fn amqp(&self) -> AMQPValue {
        match self {
            Self::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            Self::Int(i) => AMQPValue::LongLongInt(*i),
            Self::Bool(b) => AMQPValue::Boolean(*b),
        }
    }

    /// The value as JSON, for definitions files.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Self::Str(s) => s.clone().into(),
            Self::Int(i) => (*i).into(),
            Self::Bool(b) => (*b).into(),
        }
    }
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => write!(f, "{s:?}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A durable queue and its exact arguments, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDecl {
    pub name: String,
    pub arguments: Vec<(String, Arg)>,
}

impl QueueDecl {
    pub fn field_table(&self) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in &self.arguments {
            table.insert(key.as_str().into(), value.amqp());
        }
        table
    }

    /// `{x-dead-letter-exchange: "dlx"}`, or `no arguments`.
    pub fn describe_arguments(&self) -> String {
        if self.arguments.is_empty() {
            return "no arguments".into();
        }
        let inner: Vec<String> = self.arguments.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{{{}}}", inner.join(", "))
    }
}

impl fmt::Display for QueueDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "queue '{}'", self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingDecl {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
}

impl fmt::Display for BindingDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "binding {} -[{}]-> {}", self.exchange, self.routing_key, self.queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quorum() -> Topology {
        Topology::parse(include_str!("../../topology/quorum.toml"), "quorum.toml").unwrap()
    }

    #[test]
    fn default_profile_matches_the_contract() {
        let topology = Topology::load(None).unwrap();
        let plan = topology.plan();
        let work = &plan.queues[0];
        assert_eq!(work.name, "payment_trip_response");
        assert_eq!(work.arguments, vec![("x-dead-letter-exchange".into(), Arg::Str("dlx".into()))]);
        assert_eq!(topology.max_attempts(), 4);
        let wait: Vec<_> =
            plan.queues.iter().filter(|q| q.name.starts_with("payment_wait_")).collect();
        assert_eq!(wait.len(), 3);
        assert_eq!(wait[0].name, "payment_wait_1s");
        assert!(wait[2].arguments.contains(&("x-message-ttl".into(), Arg::Int(4000))));
        assert!(wait[0].arguments.contains(&(
            "x-dead-letter-routing-key".into(),
            Arg::Str("payment_trip_response".into())
        )));
        assert!(plan.queues.iter().any(|q| q.name == "notify_payment_session_created"));
        assert!(!plan.queues.iter().any(|q| q.name == "dead_letter_queue"));
    }

    #[test]
    fn quorum_profile_dead_letters_at_least_once() {
        let plan = quorum().plan();
        for queue in &plan.queues {
            if queue.name == "payment_success_ledger" {
                // A stream: replicated as a quorum queue is.
                assert!(
                    queue.arguments.contains(&("x-queue-type".into(), Arg::Str("stream".into())))
                );
                continue;
            }
            assert!(
                queue.arguments.contains(&("x-queue-type".into(), Arg::Str("quorum".into()))),
                "{} is not quorum",
                queue.name
            );
        }
        let wait = plan.queues.iter().find(|q| q.name == "payment_wait_2s").unwrap();
        assert!(wait.arguments.contains(&("x-overflow".into(), Arg::Str("reject-publish".into()))));
        assert!(
            wait.arguments
                .contains(&("x-dead-letter-strategy".into(), Arg::Str("at-least-once".into())))
        );
    }

    #[test]
    fn delays_map_to_attempts() {
        let topology = Topology::load(None).unwrap();
        assert_eq!(topology.delay_after(0), None);
        assert_eq!(topology.delay_after(1).unwrap().millis(), 1000);
        assert_eq!(topology.delay_after(3).unwrap().label(), "4s");
        assert_eq!(topology.delay_after(4), None);
    }

    #[test]
    fn the_extended_profile_adds_a_longer_tier_within_the_idempotency_window() {
        let text = include_str!("../../topology/extended.toml");
        let extended = Topology::parse(text, "extended.toml").unwrap();
        let default = Topology::load(None).unwrap();
        assert_eq!(extended.max_attempts(), 7);
        assert_eq!(extended.delay_after(6).unwrap().label(), "10m");
        let total: Duration = extended.retry.delays.iter().map(Delay::duration).sum();
        assert!(total < MAX_RETRY_SCHEDULE);
        // The same queues as the default profile, plus three wait queues.
        let names =
            |t: &Topology| t.plan().queues.into_iter().map(|q| q.name).collect::<BTreeSet<_>>();
        let added: Vec<String> = names(&extended).difference(&names(&default)).cloned().collect();
        assert_eq!(added, ["payment_wait_10m", "payment_wait_2m", "payment_wait_30s"]);
        assert!(names(&default).is_subset(&names(&extended)));
    }

    #[test]
    fn bad_profiles_fail_with_the_reason() {
        let base = DEFAULT_PROFILE;
        let cases = [
            (base.replace(r#"["1s", "2s", "4s"]"#, "[]"), "retry.delays is empty"),
            (base.replace(r#"["1s", "2s", "4s"]"#, r#"["1s", "1s"]"#), "listed twice"),
            (base.replace(r#"["1s", "2s", "4s"]"#, r#"["soon"]"#), "soon"),
            (
                base.replace(r#"queue = "payment_parked""#, r#"queue = "dead_letter_queue""#),
                "dead_letter_queue",
            ),
            (base.replace(r#"queue_type = "classic""#, r#"queue_type = "stream""#), "stream"),
            (base.replace("profile = ", "colour = "), "colour"),
            (base.replace(r#"["1s", "2s", "4s"]"#, r#"["1s", "6h", "7h"]"#), "idempotency key"),
        ];
        for (text, expect) in cases {
            let err = Topology::parse(&text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(expect), "{err} should mention {expect}");
        }
    }
}
