//! `send`: one `payment.cmd.create_session`, published as trip-service would.

use std::process::ExitCode;

use clap::Args;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde::Serialize;

use super::{OpsError, bounded, close, connect, print_json, within};
use crate::broker::publish::{Publisher, persistent_json};
use crate::contract::Envelope;
use crate::settings::broker::GlobalArgs;

#[derive(Args, Clone)]
pub struct SendArgs {
    /// The trip to pay for: the session's idempotency key and `trip_id` metadata.
    #[arg(long)]
    pub trip_id: String,
    /// The rider who pays (`user_id` metadata).
    #[arg(long)]
    pub user_id: String,
    /// The driver who accepted the trip (`driver_id` metadata); none if left out.
    #[arg(long, default_value = "")]
    pub driver_id: String,
    /// Amount in minor units (cents).
    #[arg(long)]
    pub amount_cents: i64,
    /// ISO 4217 currency code.
    #[arg(long, default_value = "USD")]
    pub currency: String,
    /// The ride package (`package_slug` metadata on the session).
    #[arg(long)]
    pub package_slug: Option<String>,
    /// A W3C traceparent to start the trace with.
    #[arg(long)]
    pub traceparent: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl SendArgs {
    /// Publishes the command on the trip exchange and waits for the broker's confirm.
    ///
    /// # Errors
    /// When the broker is unreachable, the exchange missing, or nothing is bound to take it.
    pub async fn exec(self, global: &GlobalArgs) -> Result<ExitCode, OpsError> {
        let topology = global.load_topology()?;
        let connection = connect(global).await?;
        let sent = async {
            let publisher =
                bounded("opening a publish channel", Publisher::open(&connection)).await?;
            let exchange = &topology.exchanges.trip;
            let routing_key = &topology.routing_keys.create_session;
            let body = self.body();
            let publish = publisher.publish(exchange, routing_key, &body, self.properties());
            within(&format!("publishing trip {}", self.trip_id), publish)
                .await?
                .map_err(|source| OpsError::Send { trip: self.trip_id.clone(), source })
        }
        .await;
        close(connection).await;
        sent?;
        if self.json {
            print_json(&serde_json::json!({"sent": true, "trip_id": self.trip_id}));
        } else {
            println!("sent payment.cmd.create_session for trip {}", self.trip_id);
        }
        Ok(ExitCode::SUCCESS)
    }

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

    /// Persistent JSON, with the trace to start if one was given.
    fn properties(&self) -> lapin::BasicProperties {
        let Some(traceparent) = &self.traceparent else { return persistent_json() };
        let mut headers = FieldTable::default();
        let value = AMQPValue::LongString(LongString::from(traceparent.as_str()));
        headers.insert("traceparent".into(), value);
        persistent_json().with_headers(headers)
    }
}
