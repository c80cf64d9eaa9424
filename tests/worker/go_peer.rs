//! The wire contract against a peer nobody here wrote: Go's `encoding/json` and
//! `amqp091-go` publish the commands (as trip-service does) and decode the events (as the
//! api-gateway does). Payloads are generated across the space the Go side accepts: unicode
//! and HTML-sensitive characters, keys in any case and repeated (the last one wins),
//! unknown fields, fractional amounts, currencies of every exponent.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use testkit::gopeer::{self, GoCommand};
use testkit::stats::env_usize;

use testkit::world::{EVENTS, PARKED, World};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Currencies of exponent 2, 0 and 3, spelled as a publisher might.
const CURRENCIES: [(&str, u32); 10] = [
    ("USD", 2),
    ("usd", 2),
    ("Eur", 2),
    ("GBP", 2),
    ("JPY", 0),
    ("krw", 0),
    ("VND", 0),
    ("BHD", 3),
    ("kwd", 3),
    ("JOD", 3),
];

/// One generated command: its fields and how its payload is spelled.
#[derive(Debug, Clone)]
struct Case {
    trip: String,
    user: String,
    driver: String,
    amount: f64,
    currency: usize,
    package: String,
    /// Per field, how its key is cased.
    casing: Vec<u8>,
    /// A decoy value under a differently cased key before the real one.
    decoy: bool,
    unknown: Vec<(String, Value)>,
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _.:/<>&\"\\\\éßø日本語🚗\u{2028}-]{1,24}"
}

fn case() -> impl Strategy<Value = Case> {
    let amount = (1u32..5_000_000, prop::sample::select(vec![0.0, 0.25, 0.5, 0.78, 0.999]))
        .prop_map(|(whole, fraction)| f64::from(whole) + fraction);
    let unknown = prop::collection::vec(
        prop::sample::select(vec![
            ("surge".to_owned(), serde_json::json!(1.5)),
            ("notes".to_owned(), serde_json::json!("front door")),
            ("fare".to_owned(), serde_json::json!({"base": 300, "perKm": [1, 2]})),
            ("tripIDs".to_owned(), serde_json::json!(["not", "the", "trip"])),
            ("x".to_owned(), Value::Null),
        ]),
        0..3,
    );
    (
        (text(), text(), prop::option::of(text()), amount, 0..CURRENCIES.len()),
        (prop::option::of(text()), prop::collection::vec(0u8..4, 6), any::<bool>(), unknown),
    )
        .prop_map(
            |((trip, user, driver, amount, currency), (package, casing, decoy, unknown))| Case {
                trip,
                user,
                driver: driver.unwrap_or_default(),
                amount,
                currency,
                package: package.unwrap_or_default(),
                casing,
                decoy,
                unknown,
            },
        )
}

fn cased(key: &str, how: u8) -> String {
    match how {
        0 => key.to_owned(),
        1 => key.to_lowercase(),
        2 => key.to_uppercase(),
        _ => key
            .chars()
            .enumerate()
            .map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
            .collect(),
    }
}

impl Case {
    /// The payload JSON, written by hand: keys may repeat.
    fn payload(&self, trip: &str) -> String {
        let mut fields: Vec<(String, Value)> = Vec::new();
        if self.decoy {
            fields.push(("TripId".into(), Value::from("decoy")));
        }
        let values = [
            ("tripID", Value::from(trip)),
            ("userID", Value::from(self.user.as_str())),
            ("driverID", Value::from(self.driver.as_str())),
            ("amount", serde_json::json!(self.amount)),
            ("currency", Value::from(CURRENCIES[self.currency].0)),
            ("packageSlug", Value::from(self.package.as_str())),
        ];
        for ((key, value), how) in values.into_iter().zip(&self.casing) {
            fields.push((cased(key, *how), value));
        }
        fields.extend(self.unknown.iter().cloned());
        let members: Vec<String> =
            fields.iter().map(|(k, v)| format!("{}:{v}", Value::from(k.as_str()))).collect();
        format!("{{{}}}", members.join(","))
    }
}

#[tokio::test]
async fn commands_from_go_and_events_read_by_go_agree_on_every_field() {
    let world = World::new("go-peer").await;
    let mut runner = TestRunner::new(Config {
        rng_seed: proptest::test_runner::RngSeed::Fixed(7),
        ..Config::default()
    });
    let count = env_usize("GO_PEER_CASES", 64);
    let cases: Vec<Case> =
        (0..count).map(|_| case().new_tree(&mut runner).expect("a case").current()).collect();
    // Each trip id made unique by its index; the generated text follows.
    let trips: Vec<String> =
        cases.iter().enumerate().map(|(i, c)| format!("g{i}-{}", c.trip)).collect();
    let commands: Vec<GoCommand> = cases
        .iter()
        .zip(&trips)
        .map(|(case, trip)| GoCommand {
            owner_id: case.user.clone(),
            payload: case.payload(trip),
            traceparent: TRACEPARENT.into(),
        })
        .collect();

    let worker = world.start_worker(&["--prefetch", "32"]).await;
    let decoded = gopeer::trip_service(&world.vhost.uri(), &commands).await;
    let events =
        gopeer::api_gateway(&world.vhost.uri(), EVENTS, count, Duration::from_secs(60)).await;
    assert_eq!(world.client.depth(PARKED).await, 0, "every generated command is valid");
    let events: HashMap<&str, _> = events.iter().map(|e| (e.payload.trip_id.as_str(), e)).collect();

    for ((case, command), go) in cases.iter().zip(&commands).zip(&decoded) {
        let context = format!("{case:?}\npayload {}\nGo read {go:?}", command.payload);
        assert!(go.accepted, "{context}");
        let go = &go.payload;
        // What the worker sent Stripe is what Go read.
        let created = world.stripe.created_for(&go.trip_id);
        assert_eq!(created.len(), 1, "one session for {:?}\n{context}", go.trip_id);
        let params = &created[0].params;
        let param = |key: &str| params.get(key).map(String::as_str).unwrap_or_default();
        assert_eq!(param("metadata[user_id]"), go.user_id, "{context}");
        assert_eq!(param("metadata[driver_id]"), go.driver_id, "{context}");
        assert_eq!(param("metadata[package_slug]"), go.package_slug, "{context}");
        let unit_amount: i64 = param("line_items[0][price_data][unit_amount]").parse().unwrap();
        assert_eq!(unit_amount, go.amount.round() as i64, "{context}");
        assert_eq!(
            param("line_items[0][price_data][currency]"),
            go.currency.to_ascii_lowercase(),
            "{context}"
        );
        // And what the gateway read back is what it should show.
        let event =
            events.get(go.trip_id.as_str()).unwrap_or_else(|| panic!("no event\n{context}"));
        assert_eq!(event.owner_id, case.user, "{context}");
        assert_eq!(event.payload.session_id, created[0].id, "{context}");
        assert_eq!(event.payload.currency, go.currency, "echoed as received\n{context}");
        let exponent = CURRENCIES[case.currency].1;
        let major = unit_amount as f64 / 10f64.powi(exponent as i32);
        assert_eq!(event.payload.amount, major, "{context}");
        assert!(event.traceparent.starts_with(&TRACEPARENT[..36]), "{context}");
    }
    worker.stop().await.unwrap();
}

/// What Go's decoder rejects, the worker parks as `invalid_message`: never a Stripe call.
#[tokio::test]
async fn payloads_go_rejects_are_parked_as_invalid() {
    let world = World::new("go-peer-invalid").await;
    let payloads = [
        r#"{"tripID":"r-1","userID":"u","amount":"4523","currency":"USD"}"#,
        r#"{"tripID":42,"userID":"u","amount":4523,"currency":"USD"}"#,
        r#"{"tripID":"r-3","userID":true,"amount":4523,"currency":"USD"}"#,
        r#"{"tripID":"r-4","userID":"u","amount":4523,"currency":["USD"]}"#,
        r#"{"tripID":"r-5","userID":"u","amount":1e400,"currency":"USD"}"#,
        r#"["r-6","u",4523,"USD"]"#,
        r#"{"tripID":"r-7","userID":"u","amount":4523,"currency":"USD""#,
    ];
    let commands: Vec<GoCommand> = payloads
        .iter()
        .map(|p| GoCommand {
            owner_id: "u".into(),
            payload: (*p).into(),
            traceparent: TRACEPARENT.into(),
        })
        .collect();
    let worker = world.start_worker(&[]).await;
    let decoded = gopeer::trip_service(&world.vhost.uri(), &commands).await;
    for (payload, go) in payloads.iter().zip(&decoded) {
        assert!(!go.accepted, "Go accepts {payload}");
    }
    let parked = world.client.take(PARKED, payloads.len(), Duration::from_secs(15)).await;
    assert_eq!(parked.len(), payloads.len());
    for message in &parked {
        assert_eq!(
            message.header_string("payment-park-reason").as_deref(),
            Some("invalid_message")
        );
    }
    assert!(world.stripe.seen().is_empty(), "no Stripe call for what cannot be read");
    worker.stop().await.unwrap();
}
