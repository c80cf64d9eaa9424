//! Publishing that waits for the broker's word, and consumers on channels of their own.

use std::fmt;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};

/// Properties of every message payment-worker writes on its own: `application/json`,
/// persistent (`delivery_mode: 2`), as the Go services write theirs.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2)
}

/// Why a publish was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused the message (`basic.nack`).
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// No queue is bound for the routing key (`basic.return`, 312 NO_ROUTE).
    #[error(
        "unroutable: exchange '{exchange}' has no queue bound for '{routing_key}' ({code} {text})"
    )]
    Returned { exchange: String, routing_key: String, code: u16, text: String },
    /// The channel or the connection failed: the publish may or may not have happened.
    #[error("publish channel failed: {0}")]
    Channel(#[from] lapin::Error),
}

impl PublishError {
    /// A failed channel or connection ends the whole session: nothing more can be published
    /// on it, and the deliveries it held come back by themselves.
    pub fn is_channel_failure(&self) -> bool {
        matches!(self, Self::Channel(_))
    }

    /// Every value of [`PublishError::kind`].
    pub const KINDS: [&'static str; 3] = ["nacked", "returned", "channel"];

    /// A bounded label for `payment_worker_publish_failures_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Nacked => "nacked",
            Self::Returned { .. } => "returned",
            Self::Channel(_) => "channel",
        }
    }
}

/// A channel in confirm mode. Every publish is `mandatory` and waits for the broker's confirm;
/// a nack or a return is an error, never a silent success.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher").field("channel", &self.channel.id()).finish()
    }
}

impl Publisher {
    /// Opens a new channel on `connection` and puts it in confirm mode.
    ///
    /// # Errors
    /// When the channel cannot be opened.
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { channel })
    }

    /// Publishes and waits until the broker has taken responsibility for the message.
    ///
    /// # Errors
    /// See [`PublishError`].
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                properties,
            )
            .await?;
        match confirm.await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Returned {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            Confirmation::NotRequested => unreachable!("the channel is in confirm mode"),
        }
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

/// A consumer of `queue` on a channel of its own (which it keeps open), with at most
/// `prefetch` deliveries unacknowledged and the consume `arguments`.
///
/// # Errors
/// Which step the broker refused, and why.
pub async fn consumer(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    arguments: FieldTable,
) -> Result<Consumer, String> {
    let channel =
        connection.create_channel().await.map_err(|e| format!("opening a channel: {e}"))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("basic.qos: {e}"))?;
    channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), arguments)
        .await
        .map_err(|e| format!("consuming {queue}: {e}"))
}
