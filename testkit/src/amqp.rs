//! The trip system's side of the broker, for tests: publish commands, read what comes out.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// A command body as trip-service writes it.
pub fn command(trip_id: &str, user_id: &str, amount: f64, currency: &str) -> Vec<u8> {
    let payload = serde_json::json!({
        "tripID": trip_id,
        "userID": user_id,
        "driverID": format!("driver-of-{trip_id}"),
        "amount": amount,
        "currency": currency,
        "packageSlug": "sedan",
    });
    envelope(user_id, payload.to_string().as_bytes())
}

/// `{"ownerId": owner, "data": base64(payload)}`.
pub fn envelope(owner: &str, payload: &[u8]) -> Vec<u8> {
    serde_json::json!({ "ownerId": owner, "data": STANDARD.encode(payload) })
        .to_string()
        .into_bytes()
}

/// The inner payload of an envelope body, as JSON.
///
/// # Panics
/// When the body is not an envelope.
pub fn inner(body: &[u8]) -> serde_json::Value {
    let outer: serde_json::Value = serde_json::from_slice(body).expect("an envelope");
    let data = STANDARD.decode(outer["data"].as_str().expect("data is a string")).expect("base64");
    serde_json::from_slice(&data).expect("inner JSON")
}

/// A connection and a confirm-mode channel on a test's vhost.
pub struct Client {
    pub connection: Connection,
    pub channel: Channel,
}

/// A message read from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub exchange: String,
    pub routing_key: String,
    pub at: Instant,
}

impl Received {
    pub fn header_string(&self, key: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    /// An integer header, whichever integer type it was sent as (the eight the worker reads).
    pub fn header_int(&self, key: &str) -> Option<i64> {
        match self.properties.headers().as_ref()?.inner().get(key)? {
            AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
            AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
            AMQPValue::ShortInt(n) => Some(i64::from(*n)),
            AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
            AMQPValue::LongInt(n) => Some(i64::from(*n)),
            AMQPValue::LongUInt(n) => Some(i64::from(*n)),
            AMQPValue::LongLongInt(n) => Some(*n),
            AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
            _ => None,
        }
    }
}

impl Client {
    /// # Panics
    /// When the broker cannot be reached.
    pub async fn connect(uri: &str) -> Self {
        let connection = Connection::connect(uri, ConnectionProperties::default())
            .await
            .expect("connect to the test broker");
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        Self { connection, channel }
    }

    /// Publishes as trip-service does (persistent JSON), with optional headers, and waits for
    /// the broker's confirm.
    ///
    /// # Panics
    /// When the broker does not confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), AMQPValue::LongString(LongString::from(*v)));
        }
        self.publish_headers(exchange, routing_key, body, table).await;
    }

    /// The same with headers of any AMQP type.
    ///
    /// # Panics
    /// When the broker does not confirm.
    pub async fn publish_headers(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        table: FieldTable,
    ) {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(table);
        self.publish_properties(exchange, routing_key, body, properties).await;
    }

    /// The same with properties of the test's choosing.
    ///
    /// # Panics
    /// When the broker does not confirm.
    pub async fn publish_properties(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        if let Err(e) = self.try_publish(exchange, routing_key, body, properties).await {
            panic!("{e}");
        }
    }

    /// Publishes and waits for the confirm; `Err` says why it was not confirmed.
    ///
    /// # Errors
    /// A channel error, or a nack.
    pub async fn try_publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), String> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .map_err(|e| format!("publish: {e}"))?;
        let confirmation = confirm.await.map_err(|e| format!("confirm: {e}"))?;
        if confirmation.is_ack() { Ok(()) } else { Err("broker refused the test message".into()) }
    }

    /// Publishes a command to `trip` with `payment.cmd.create_session`.
    pub async fn send_command(&self, body: &[u8]) {
        self.publish("trip", "payment.cmd.create_session", body, &[]).await;
    }

    /// Takes one message from `queue`, if any.
    ///
    /// # Panics
    /// On a broker error (a missing queue, for instance).
    pub async fn get(&self, queue: &str) -> Option<Received> {
        self.try_get(queue).await.expect("basic.get")
    }

    /// The same, with the broker's error.
    ///
    /// # Errors
    /// A missing queue, a queue whose node is down, a closed channel.
    pub async fn try_get(&self, queue: &str) -> Result<Option<Received>, lapin::Error> {
        let Some(message) =
            self.channel.basic_get(queue.into(), BasicGetOptions::default()).await?
        else {
            return Ok(None);
        };
        let delivery = message.delivery;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(Some(Received {
            body: delivery.data,
            properties: delivery.properties,
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            at: Instant::now(),
        }))
    }

    /// Takes messages from `queue` until `count` have arrived or `timeout` passes.
    pub async fn take(&self, queue: &str, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count && Instant::now() < deadline {
            match self.get(queue).await {
                Some(message) => out.push(message),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        out
    }

    /// Messages ready in `queue`.
    ///
    /// # Panics
    /// When the queue does not exist.
    pub async fn depth(&self, queue: &str) -> u32 {
        self.try_depth(queue).await.unwrap_or_else(|| panic!("queue {queue} does not exist"))
    }

    /// Messages ready in `queue`, or `None` when it does not exist (yet).
    ///
    /// # Panics
    /// When no channel can be opened.
    pub async fn try_depth(&self, queue: &str) -> Option<u32> {
        queue_depth(&self.connection, queue).await
    }
}

/// Messages ready in `queue`, read with a passive declaration on a channel of its own (a
/// missing queue closes that channel); `None` when the queue does not exist or the connection
/// is gone.
pub async fn queue_depth(connection: &Connection, queue: &str) -> Option<u32> {
    let channel = connection.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = channel.close(200, "depth read".into()).await;
    Some(declared.message_count())
}
