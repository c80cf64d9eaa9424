//! The trip system's wire format, read and written the way its Go services do.
//!
//! Every body is an envelope `{"ownerId": …, "data": <base64 of the inner JSON>}`. Decoding
//! follows Go's `encoding/json`: object keys match case-insensitively (the last matching key
//! wins), unknown keys are ignored, a JSON `null` leaves a string empty, a value of the wrong
//! JSON type is an error. Encoding follows `json.Marshal`: struct field order, `omitempty`,
//! and `<`, `>`, `&`, U+2028, U+2029 escaped inside strings.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::money::{Currency, MinorUnits, MoneyError};

/// Longest trip or user id accepted: it goes into an idempotency key (255 characters at most)
/// and Stripe metadata (500 at most).
pub const MAX_ID_LEN: usize = 200;

/// The longest metadata value Stripe accepts, in characters.
pub const MAX_METADATA_LEN: usize = 500;

/// Why a message cannot be processed, ever. Such a message is parked, never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("body is not a JSON object: {0}")]
    NotJsonObject(String),
    #[error("envelope field `{field}`: {problem}")]
    Envelope { field: &'static str, problem: String },
    #[error("`data` is not standard padded base64: {0}")]
    Base64(String),
    #[error("payload field `{field}`: {problem}")]
    Payload { field: &'static str, problem: String },
    #[error("payload field `amount`: {0}")]
    Amount(MoneyError),
    #[error("payload field `currency`: {0}")]
    Currency(MoneyError),
}

/// The decoded envelope: the owner (the rider) and the inner payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub owner_id: String,
    pub data: Vec<u8>,
}

impl Envelope {
    /// # Errors
    /// When the body is not a JSON object, `data` is missing, `null`, not a string, or not
    /// standard padded base64, or `ownerId` is not a string.
    pub fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
        let object = json_object(body).map_err(InvalidMessage::NotJsonObject)?;
        let owner_id = go_string(&object, "ownerId")
            .map_err(|problem| InvalidMessage::Envelope { field: "ownerId", problem })?;
        let data = match go_field(&object, "data") {
            None | Some(Value::Null) => {
                return Err(InvalidMessage::Envelope {
                    field: "data",
                    problem: "missing or null".into(),
                });
            }
            Some(Value::String(text)) => {
                // Go's decoder skips \r and \n inside base64 text.
                let decoded = if text.contains(['\r', '\n']) {
                    let clean: String =
                        text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
                    STANDARD.decode(clean)
                } else {
                    STANDARD.decode(text)
                };
                decoded.map_err(|e| InvalidMessage::Base64(e.to_string()))?
            }
            Some(other) => {
                return Err(InvalidMessage::Envelope {
                    field: "data",
                    problem: format!("expected a base64 string, found {}", json_type(other)),
                });
            }
        };
        Ok(Self { owner_id, data })
    }

    /// The envelope bytes around an inner payload, as the Go services write them.
    pub fn encode(owner_id: &str, payload: &impl Serialize) -> Vec<u8> {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "ownerId")]
            owner_id: &'a str,
            data: String,
        }
        let data = STANDARD.encode(go_json(payload));
        go_json(&Wire { owner_id, data })
    }
}

/// `payment.cmd.create_session`, parsed: every value in it is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSession {
    /// The rider: the envelope's `ownerId`, or the payload's `userID` when that is empty.
    pub owner_id: String,
    pub trip_id: String,
    pub user_id: String,
    /// May be empty: the Go service sent it as it was.
    pub driver_id: String,
    pub amount: MinorUnits,
    pub currency: Currency,
    pub package_slug: Option<String>,
}

/// A string field of the payload, as Go's `encoding/json` would read it.
fn string_field(
    payload: &Map<String, Value>,
    field: &'static str,
) -> Result<String, InvalidMessage> {
    go_string(payload, field).map_err(|problem| InvalidMessage::Payload { field, problem })
}

/// A string that reaches Stripe's metadata, a header or a log line: no control characters,
/// and no longer than Stripe takes.
fn text_field(payload: &Map<String, Value>, field: &'static str) -> Result<String, InvalidMessage> {
    let value = string_field(payload, field)?;
    let problem = if value.chars().any(char::is_control) {
        "contains a control character".to_owned()
    } else if value.chars().count() > MAX_METADATA_LEN {
        format!("longer than Stripe's {MAX_METADATA_LEN} characters for metadata")
    } else {
        return Ok(value);
    };
    Err(InvalidMessage::Payload { field, problem })
}

/// An id: text that is not blank and at most [`MAX_ID_LEN`] bytes.
fn id_field(payload: &Map<String, Value>, field: &'static str) -> Result<String, InvalidMessage> {
    let value = text_field(payload, field)?;
    let problem = if value.trim().is_empty() {
        "empty".to_owned()
    } else if value.len() > MAX_ID_LEN {
        format!("longer than {MAX_ID_LEN} bytes")
    } else {
        return Ok(value);
    };
    Err(InvalidMessage::Payload { field, problem })
}

/// The amount: a JSON number (the contract's float), in minor units.
fn amount_field(payload: &Map<String, Value>) -> Result<MinorUnits, InvalidMessage> {
    let amount = match go_field(payload, "amount") {
        None | Some(Value::Null) => return Err(InvalidMessage::Amount(MoneyError::NotFinite)),
        Some(Value::Number(n)) => {
            n.as_f64().ok_or(InvalidMessage::Amount(MoneyError::NotFinite))?
        }
        Some(other) => {
            return Err(InvalidMessage::Payload {
                field: "amount",
                problem: format!("expected a number, found {}", json_type(other)),
            });
        }
    };
    MinorUnits::from_wire(amount).map_err(InvalidMessage::Amount)
}

impl CreateSession {
    /// Decodes a whole message body.
    ///
    /// # Errors
    /// On anything the envelope or payload rules reject; see [`InvalidMessage`].
    pub fn decode(body: &[u8]) -> Result<Self, InvalidMessage> {
        let envelope = Envelope::decode(body)?;
        let payload = json_object(&envelope.data).map_err(|problem| InvalidMessage::Payload {
            field: "data",
            problem: format!("inner payload is not a JSON object: {problem}"),
        })?;
        let trip_id = id_field(&payload, "tripID")?;
        let user_id = id_field(&payload, "userID")?;
        let driver_id = text_field(&payload, "driverID")?;
        let amount = amount_field(&payload)?;
        let currency =
            string_field(&payload, "currency")?.parse().map_err(InvalidMessage::Currency)?;
        let package_slug = Some(text_field(&payload, "packageSlug")?).filter(|s| !s.is_empty());
        let owner_id =
            if envelope.owner_id.is_empty() { user_id.clone() } else { envelope.owner_id };
        Ok(Self { owner_id, trip_id, user_id, driver_id, amount, currency, package_slug })
    }

    /// The trip id of a body that may not decode as a whole, for logs and for finding parked
    /// messages: `None` when there is no readable `tripID` at all.
    pub fn trip_id_hint(body: &[u8]) -> Option<String> {
        let envelope = Envelope::decode(body).ok()?;
        let payload = json_object(&envelope.data).ok()?;
        go_string(&payload, "tripID").ok().filter(|id| !id.is_empty())
    }

    /// The `payment.event.session_created` body for this command and a Stripe session id.
    pub fn session_created(&self, session_id: &str) -> Vec<u8> {
        #[derive(Serialize)]
        struct SessionCreated<'a> {
            #[serde(rename = "tripID")]
            trip_id: &'a str,
            #[serde(rename = "sessionID")]
            session_id: &'a str,
            amount: serde_json::Number,
            currency: &'a str,
        }
        Envelope::encode(
            &self.owner_id,
            &SessionCreated {
                trip_id: &self.trip_id,
                session_id,
                amount: self.currency.major_units(self.amount),
                currency: self.currency.as_received(),
            },
        )
    }
}

/// `payment.event.success` (`PaymentStatusUpdateData`): the payload trip-service and
/// platform-service read. Empty and zero fields are omitted, as Go's `omitempty` does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentSucceeded {
    #[serde(rename = "tripID")]
    pub trip_id: String,
    #[serde(rename = "userID")]
    pub user_id: String,
    #[serde(rename = "driverID")]
    pub driver_id: String,
    #[serde(rename = "amountCents", skip_serializing_if = "is_zero")]
    pub amount_cents: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub currency: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub region: String,
    #[serde(rename = "packageSlug", skip_serializing_if = "String::is_empty")]
    pub package_slug: String,
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// JSON as Go's `json.Marshal` writes it: compact, with HTML-sensitive characters escaped.
/// The replaced characters can only occur inside strings, so replacing them is safe.
pub fn go_json(value: &impl Serialize) -> Vec<u8> {
    let text = serde_json::to_string(value).expect("serializing plain structs cannot fail");
    if !text.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return text.into_bytes();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out.into_bytes()
}

fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("found {}", json_type(&other))),
        Err(e) => Err(e.to_string()),
    }
}

/// The value of `name` as Go would bind it: the last key equal to it ignoring case.
fn go_field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.iter().rev().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// A Go `string` field: absent or `null` is empty, any other non-string is an error.
fn go_string(object: &Map<String, Value>, name: &str) -> Result<String, String> {
    match go_field(object, name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("expected a string, found {}", json_type(other))),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(owner: &str, payload: &str) -> Vec<u8> {
        format!(r#"{{"ownerId":"{owner}","data":"{}"}}"#, STANDARD.encode(payload)).into_bytes()
    }

    const PAYLOAD: &str = r#"{"tripID":"t1","userID":"u1","driverID":"d1","amount":4523.78,"currency":"USD","packageSlug":"sedan"}"#;

    #[test]
    fn decodes_the_contract_example() {
        let cmd = CreateSession::decode(&envelope("u1", PAYLOAD)).unwrap();
        assert_eq!(cmd.trip_id, "t1");
        assert_eq!(cmd.user_id, "u1");
        assert_eq!(cmd.driver_id, "d1");
        assert_eq!(cmd.amount.get(), 4524);
        assert_eq!(cmd.currency.as_received(), "USD");
        assert_eq!(cmd.package_slug.as_deref(), Some("sedan"));
        assert_eq!(cmd.owner_id, "u1");
    }

    #[test]
    fn keys_match_case_insensitively_and_the_last_wins() {
        let payload =
            r#"{"TRIPID":"a","tripid":"b","UserId":"u","AMOUNT":100,"Currency":"jpy","extra":[1]}"#;
        let cmd = CreateSession::decode(&envelope("", payload)).unwrap();
        assert_eq!(cmd.trip_id, "b");
        assert_eq!(cmd.owner_id, "u", "empty ownerId falls back to the user id");
        assert_eq!(cmd.package_slug, None);
        assert_eq!(cmd.currency.exponent(), 0);
    }

    #[test]
    fn rejects_what_go_rejects_or_cannot_be_charged() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "JSON"),
            (b"[1]", "JSON object"),
            (br#"{"ownerId":"u"}"#, "data"),
            (br#"{"ownerId":"u","data":null}"#, "data"),
            (br#"{"ownerId":"u","data":{"tripID":"t"}}"#, "base64"),
            (br#"{"ownerId":"u","data":"!!!"}"#, "base64"),
            (br#"{"ownerId":7,"data":"e30="}"#, "ownerId"),
        ];
        for (body, expect) in cases {
            let err = CreateSession::decode(body).unwrap_err().to_string();
            assert!(err.contains(expect), "{err} should mention {expect}");
        }
        let payloads = [
            (r#"{"userID":"u","amount":1,"currency":"USD"}"#, "tripID"),
            (r#"{"tripID":" ","userID":"u","amount":1,"currency":"USD"}"#, "tripID"),
            (r#"{"tripID":"t","amount":1,"currency":"USD"}"#, "userID"),
            (r#"{"tripID":1,"userID":"u","amount":1,"currency":"USD"}"#, "tripID"),
            (r#"{"tripID":"t","userID":"u","amount":-5,"currency":"USD"}"#, "amount"),
            (r#"{"tripID":"t","userID":"u","amount":1e300,"currency":"USD"}"#, "amount"),
            (r#"{"tripID":"t","userID":"u","amount":"12","currency":"USD"}"#, "amount"),
            (r#"{"tripID":"t","userID":"u","currency":"USD"}"#, "amount"),
            (r#"{"tripID":"t","userID":"u","amount":1,"currency":"DOLLARS"}"#, "currency"),
            (r#"{"tripID":"t","userID":"u","amount":1}"#, "currency"),
            ("[]", "JSON object"),
        ];
        for (payload, expect) in payloads {
            let err = CreateSession::decode(&envelope("u", payload)).unwrap_err().to_string();
            assert!(err.contains(expect), "{payload}: {err} should mention {expect}");
        }
        let bad_amount =
            envelope("u", r#"{"tripID":"t-9","userID":"u","amount":0,"currency":"USD"}"#);
        assert!(CreateSession::decode(&bad_amount).is_err());
        assert_eq!(CreateSession::trip_id_hint(&bad_amount).as_deref(), Some("t-9"));
        assert_eq!(CreateSession::trip_id_hint(b"{broken"), None);
        let long = "x".repeat(MAX_ID_LEN + 1);
        let payload = format!(r#"{{"tripID":"{long}","userID":"u","amount":1,"currency":"USD"}}"#);
        assert!(CreateSession::decode(&envelope("u", &payload)).is_err());
    }

    #[test]
    fn session_created_matches_the_contract_bytes() {
        let cmd = CreateSession::decode(&envelope("user-42", PAYLOAD)).unwrap();
        let body = cmd.session_created("cs_test_1");
        let outer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(outer["ownerId"], "user-42");
        let inner = STANDARD.decode(outer["data"].as_str().unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(inner).unwrap(),
            r#"{"tripID":"t1","sessionID":"cs_test_1","amount":45.24,"currency":"USD"}"#
        );
        assert!(String::from_utf8(body).unwrap().starts_with(r#"{"ownerId":"user-42","data":""#));
    }

    #[test]
    fn base64_may_carry_line_breaks_as_go_allows() {
        let data = STANDARD.encode(PAYLOAD);
        let (head, tail) = data.split_at(20);
        let body = format!(r#"{{"ownerId":"u1","data":"{head}\r\n{tail}"}}"#);
        assert_eq!(CreateSession::decode(body.as_bytes()).unwrap().trip_id, "t1");
    }

    #[test]
    fn success_omits_empty_fields_and_escapes_like_go() {
        let event = PaymentSucceeded {
            trip_id: "t<1>".into(),
            user_id: "u&1".into(),
            driver_id: String::new(),
            amount_cents: 0,
            currency: String::new(),
            region: "unspecified".into(),
            package_slug: String::new(),
        };
        assert_eq!(
            String::from_utf8(go_json(&event)).unwrap(),
            r#"{"tripID":"t\u003c1\u003e","userID":"u\u00261","driverID":"","region":"unspecified"}"#
        );
    }
}
