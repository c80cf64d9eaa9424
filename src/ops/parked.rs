//! `parked list`, `parked replay` and `parked purge`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use super::{OpsError, bounded, channel, close, connect, print_json, within};
use crate::broker::headers;
use crate::broker::publish::Publisher;
use crate::broker::topology::{QueueType, Topology};
use crate::contract::{CreateSession, Envelope};
use crate::delivery::copies::{self, RetryState};
use crate::settings::broker::GlobalArgs;

#[derive(Subcommand)]
pub enum ParkedCommand {
    /// List parked messages without consuming them.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Move parked messages back to the work queue, attempt counter reset. Messages that first
    /// arrived more than 23 h ago are refused (Stripe may have forgotten the trip's
    /// idempotency key, so a replay could create a second session) unless
    /// --allow-new-session is given.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Replay messages older than 23 h too, knowing a trip may get a second session.
        #[arg(long)]
        allow_new_session: bool,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove parked messages for good.
    Purge {
        #[command(flatten)]
        filter: Filter,
        /// Confirms the removal; without it nothing is removed.
        #[arg(long)]
        yes: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// Which parked messages a replay or purge takes.
#[derive(Args, Debug, Clone, Default)]
pub struct Filter {
    /// Only this trip (repeatable).
    #[arg(long = "trip")]
    pub trip_ids: Vec<String>,
    /// Only messages parked for this reason (e.g. retries_exhausted).
    #[arg(long)]
    pub reason: Option<String>,
    /// Every parked message.
    #[arg(long)]
    pub all: bool,
    /// At most this many.
    #[arg(long)]
    pub limit: Option<usize>,
    /// A replay refuses messages that first arrived before this (Unix milliseconds).
    #[arg(skip)]
    pub arrived_after_ms: Option<u64>,
}

impl Filter {
    /// # Errors
    /// When it would select nothing explicitly: `--all`, `--trip` or `--reason` is needed.
    pub fn validate(&self) -> Result<(), OpsError> {
        if !self.all && self.trip_ids.is_empty() && self.reason.is_none() {
            return Err(OpsError::NoSelection);
        }
        Ok(())
    }

    /// Whether a replay must refuse `entry`: it first arrived before `arrived_after_ms`. A
    /// message whose headers do not say when (published to the parking queue by hand) is not
    /// refused: nothing is known to be old.
    fn refuses(&self, entry: &ParkedEntry) -> bool {
        let after = self.arrived_after_ms;
        after.is_some_and(|after| entry.first_arrived_ms().is_some_and(|at| at < after))
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
pub enum Operation {
    /// Only look.
    List,
    /// Back to the work queue, attempt counter reset.
    Replay,
    /// Remove.
    Purge,
}

impl ParkedCommand {
    /// # Errors
    /// When the selection is empty, the profile cannot be loaded, or the broker fails.
    pub async fn exec(self, global: &GlobalArgs) -> Result<ExitCode, OpsError> {
        let (action, filter, dry_run, json) = self.selection();
        filter.validate()?;
        let topology = global.load_topology()?;
        let connection = connect(global).await?;
        let verb = match (action, dry_run) {
            (Operation::List, _) => "parked",
            (Operation::Replay, true) => "would replay",
            (Operation::Replay, false) => "replayed",
            (Operation::Purge, true) => "would purge",
            (Operation::Purge, false) => "purged",
        };
        let walked = walk_parked(&connection, &topology, action, &filter, dry_run, |entry| {
            if json {
                print_json(entry);
            } else if action == Operation::List {
                println!("{}", entry.line());
            } else {
                println!("{verb} {}", entry.line());
            }
        })
        .await;
        close(connection).await;
        Ok(summarize(&walked?, action, verb, dry_run, json))
    }

    /// What the command does, to which messages, whether only as a dry run, and as JSON.
    fn selection(self) -> (Operation, Filter, bool, bool) {
        match self {
            Self::List { limit, json } => (
                Operation::List,
                Filter { all: true, limit: Some(limit), ..Filter::default() },
                true,
                json,
            ),
            Self::Replay { mut filter, dry_run, json, allow_new_session } => {
                if !allow_new_session {
                    let window = REPLAY_WINDOW.as_millis() as u64;
                    filter.arrived_after_ms = Some(copies::now_ms().saturating_sub(window));
                }
                (Operation::Replay, filter, dry_run, json)
            }
            Self::Purge { filter, yes, json } => (Operation::Purge, filter, !yes, json),
        }
    }
}

/// Tells what a walk did (on stderr, beside the entries on stdout) and what it exits with:
/// failure when a replay refused any message.
fn summarize(
    walked: &Walked,
    action: Operation,
    verb: &str,
    dry_run: bool,
    json: bool,
) -> ExitCode {
    let Walked { taken: count, present, refused } = walked;
    for entry in refused {
        eprintln!(
            "refused {}: it first arrived more than {} h ago; Stripe may have forgotten the \
             trip's idempotency key, so a replay could create a second session for a trip \
             the rider may have paid. Check the trip in Stripe, then replay it with \
             --allow-new-session",
            entry.line(),
            REPLAY_WINDOW.as_secs() / 3600,
        );
    }
    if !json {
        eprintln!("{count} message(s) {verb}");
        if action == Operation::List && count < present {
            eprintln!("{} more parked, not shown: raise --limit", present - count);
        }
        if action == Operation::Purge && dry_run && *count > 0 {
            eprintln!("nothing removed: add --yes to purge them");
        }
    }
    if refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{} message(s) refused, still parked", refused.len());
        ExitCode::FAILURE
    }
}

/// How old (since it first arrived) a parked message may be for a replay without
/// `--allow-new-session`: inside Stripe's 24 h idempotency window, with an hour to spare.
pub const REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(23 * 3600);

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
    /// When the command first arrived (its first attempt).
    pub first_seen_at_ms: Option<u64>,
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
            // Parked by the broker (a quorum work queue's delivery limit) rather than by a
            // worker: its dead-letter headers say why.
            reason: headers::string(&headers, copies::PARK_REASON)
                .or_else(|| headers::string(&headers, "x-first-death-reason"))
                .unwrap_or_else(|| "unknown".into()),
            detail: headers::string(&headers, copies::PARK_DETAIL)
                .or_else(|| {
                    let queue = headers::string(&headers, "x-first-death-queue")?;
                    Some(format!("dead-lettered by the broker from {queue}"))
                })
                .unwrap_or_default(),
            attempts: state.attempts,
            first_seen_at_ms: state.first_seen_at,
            first_failure_at_ms: state.first_failure_at,
            parked_at_ms: headers::int(&headers, copies::PARKED_AT)
                .and_then(|n| u64::try_from(n).ok()),
        }
    }

    /// When the command first arrived, as far as its headers tell (older copies carry only
    /// the first failure's time, or the parking time).
    pub fn first_arrived_ms(&self) -> Option<u64> {
        self.first_seen_at_ms.or(self.first_failure_at_ms).or(self.parked_at_ms)
    }

    /// One line for people. Every value comes from a publisher or a header, so control
    /// characters are shown escaped: nothing printed can forge a line or reach the terminal.
    pub fn line(&self) -> String {
        let when = |ms: Option<u64>| ms.map_or_else(|| "-".to_owned(), format_ms);
        let line = format!(
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
        );
        printable(&line)
    }
}

/// The latest time shown as a date: 9999-12-31T23:59:59.999Z.
const LAST_SHOWN_MS: u64 = 253_402_300_799_999;

/// A Unix-milliseconds header as an RFC 3339 time, or the raw number when no date can be.
fn format_ms(ms: u64) -> String {
    if ms > LAST_SHOWN_MS {
        return format!("(not a time: {ms})");
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`, …).
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Walks the parking queue once: every message present at the start is fetched without
/// auto-ack; those the filter and action take are replayed or purged (a replay refuses, and
/// keeps, those the filter says are too old) (a replayed copy is
/// confirmed before the parked one is acked). `report` is called with each taken message.
///
/// The others are kept in a way that spends no delivery count, where the queue keeps one: a
/// classic queue gets them back with one `basic.nack(multiple, requeue)` on the last tag
/// not settled (never on a tag already acked, which would close the channel), which puts them
/// back in their places. A quorum queue counts every such return against its delivery limit
/// (RabbitMQ 4.0–4.2 by default, any version under a `delivery-limit` policy) and drops or
/// dead-letters a message past it, so there each kept message is published again to the
/// parking queue, confirmed, and only then acked: the walk goes through every message, so
/// the order is kept, and every copy starts with a count of zero.
///
/// # Errors
/// When the broker is unreachable, the queue missing, a publish not confirmed, or an answer
/// does not come within [`BROKER_WAIT`](super::BROKER_WAIT) (the messages not yet handled
/// stay parked).
pub async fn walk_parked(
    connection: &Connection,
    topology: &Topology,
    action: Operation,
    filter: &Filter,
    dry_run: bool,
    mut report: impl FnMut(&ParkedEntry),
) -> Result<Walked, OpsError> {
    let queue = &topology.parking.queue;
    let channel = channel(connection).await?;
    let present = parked_count(&channel, queue).await?;
    let rotate = topology.parking.queue_type == QueueType::Quorum;
    // Replays publish, and so does a walk that keeps messages by rotating them.
    let publisher = if rotate || (action == Operation::Replay && !dry_run) {
        Some(bounded("opening a publish channel", Publisher::open(connection)).await?)
    } else {
        None
    };
    let mut taken = 0;
    let mut refused = Vec::new();
    // The last delivery tag fetched and not settled: what one nack at the end hands back.
    let mut unsettled = None;
    let reading = format!("reading {queue}");
    // Only the messages present at the start: a message put back is never read twice.
    for _ in 0..present {
        let full = filter.limit.is_some_and(|limit| taken >= limit);
        if full && !rotate {
            break;
        }
        let Some(delivery) = fetch(&channel, queue, &reading).await? else { break };
        let entry = ParkedEntry::from_message(&delivery.data, &delivery.properties);
        let wanted = !full && (action == Operation::List || filter.matches(&entry));
        let refuse = wanted && action == Operation::Replay && filter.refuses(&entry);
        let take = wanted && !refuse;
        let removes = take && action != Operation::List && !dry_run;
        if !dispose(publisher.as_ref(), topology, action, removes, &delivery).await? {
            unsettled = Some(delivery.delivery_tag);
        }
        if take {
            taken += 1;
            report(&entry);
        }
        if refuse {
            refused.push(entry);
        }
    }
    if let Some(tag) = unsettled {
        // Hands back every message fetched and not settled above, in its original place.
        let hand_back = BasicNackOptions { multiple: true, requeue: true };
        bounded("handing back the messages not taken", channel.basic_nack(tag, hand_back)).await?;
    }
    let _ = within("closing the channel", channel.close(200, "done".into())).await;
    Ok(Walked { taken, present: present as usize, refused })
}

/// The next message of `queue`, unsettled; `None` when it is empty.
async fn fetch(
    channel: &Channel,
    queue: &str,
    reading: &str,
) -> Result<Option<lapin::message::Delivery>, OpsError> {
    let get = channel.basic_get(queue.into(), BasicGetOptions { no_ack: false });
    Ok(bounded(reading, get).await?.map(|message| message.delivery))
}

/// Settles one fetched message when it can: `removes` (a purge or replay takes it) replays
/// it if the walk replays, then acks it; a message kept in a quorum parking queue is
/// published again to its back, confirmed, then acked (see [`walk_parked`]). `false`: left
/// unsettled, for the walk's closing nack to put back.
async fn dispose(
    publisher: Option<&Publisher>,
    topology: &Topology,
    action: Operation,
    removes: bool,
    delivery: &lapin::message::Delivery,
) -> Result<bool, OpsError> {
    let rotate = topology.parking.queue_type == QueueType::Quorum;
    let what = if removes {
        if let Some(publisher) = publisher.filter(|_| action == Operation::Replay) {
            replay(publisher, topology, delivery).await?;
        }
        "removing the parked copy"
    } else if let Some(publisher) = publisher.filter(|_| rotate) {
        keep(publisher, &topology.parking.queue, delivery).await?;
        "removing the kept copy"
    } else {
        return Ok(false);
    };
    bounded(what, delivery.acker.ack(BasicAckOptions::default())).await?;
    Ok(true)
}

/// What a walk of the parking queue took, of how many present at its start, and what a
/// replay refused (kept parked: too old to replay safely).
#[derive(Debug, Clone)]
pub struct Walked {
    pub taken: usize,
    pub present: usize,
    pub refused: Vec<ParkedEntry>,
}

/// How many messages the parking queue holds (a passive declaration, which changes nothing).
async fn parked_count(channel: &Channel, queue: &str) -> Result<u32, OpsError> {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let declare = channel.queue_declare(queue.into(), passive, FieldTable::default());
    Ok(bounded(&format!("queue {queue}"), declare).await?.message_count())
}

/// Publishes a parked message back to the work queue and waits for the broker's confirm.
async fn replay(
    publisher: &Publisher,
    topology: &Topology,
    parked: &lapin::message::Delivery,
) -> Result<(), OpsError> {
    let queue = &topology.work_queue.name;
    let publish = publisher.publish("", queue, &parked.data, replay_properties(&parked.properties));
    within(&format!("confirming the replayed copy in {queue}"), publish)
        .await?
        .map_err(|source| OpsError::Replay { queue: queue.clone(), source })
}

/// Publishes a parked message again, unchanged, to the back of the parking queue and waits
/// for the broker's confirm: a copy whose delivery count starts at zero.
async fn keep(
    publisher: &Publisher,
    queue: &str,
    parked: &lapin::message::Delivery,
) -> Result<(), OpsError> {
    let publish = publisher.publish("", queue, &parked.data, parked.properties.clone());
    within(&format!("confirming the kept copy in {queue}"), publish)
        .await?
        .map_err(|source| OpsError::Keep { queue: queue.to_owned(), source })
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
                || name == copies::ORIGINAL_EXCHANGE
                || name == copies::ORIGINAL_ROUTING_KEY;
            if keep {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    parked.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_values_cannot_forge_lines_or_times() {
        let entry = ParkedEntry {
            trip_id: Some("t\nFAKE parked line\u{1b}[2J".into()),
            rider: Some("r\r".into()),
            amount: None,
            currency: None,
            reason: "invalid_message".into(),
            detail: "tab\there".into(),
            attempts: 1,
            first_seen_at_ms: None,
            first_failure_at_ms: Some(1 << 62),
            parked_at_ms: Some(1_764_000_000_000),
        };
        let line = entry.line();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains(r"t\nFAKE parked line\u{1b}[2J"), "{line}");
        assert!(line.contains("(not a time: 4611686018427387904)"), "{line}");
        assert!(line.contains("2025-11-24T"), "{line}");
    }
}
