//! AMQP header values: read whatever type a peer sent them as, written as Go's AMQP client
//! writes strings.

use lapin::types::{AMQPValue, FieldTable, LongString};

/// A string header, whichever string type it was sent as.
pub fn string(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// An integer header, whichever integer type it was sent as.
pub fn int(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(key)? {
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

/// A string as a header value (a long string, as Go's client sends strings).
pub fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The bytes one header (name and value) takes in an AMQP field table.
pub fn entry_len(name: &str, value: &AMQPValue) -> usize {
    1 + name.len() + 1 + value_len(value)
}

/// The bytes a value takes after its type tag.
fn value_len(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(a) => 4 + a.as_slice().len(),
        AMQPValue::FieldArray(a) => {
            4 + a.as_slice().iter().map(|v| 1 + value_len(v)).sum::<usize>()
        }
        AMQPValue::FieldTable(t) => {
            4 + t.inner().iter().map(|(k, v)| entry_len(k.as_str(), v)).sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::generation::gen_field_table;
    use lapin::types::{DecimalValue, FieldArray};

    use super::*;

    /// The sizes agree with what lapin writes on the wire.
    #[test]
    fn entry_len_is_the_encoded_size() {
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongLongInt(1));
        inner.insert("s".into(), AMQPValue::ShortString("abc".into()));
        let values = [
            AMQPValue::Boolean(true),
            AMQPValue::ShortInt(-2),
            AMQPValue::LongUInt(7),
            AMQPValue::Double(0.5),
            AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 150 }),
            AMQPValue::Timestamp(3),
            long_string("héllo"),
            AMQPValue::ByteArray(vec![1, 2, 3].into()),
            AMQPValue::FieldArray(FieldArray::from(vec![long_string("a"), AMQPValue::Void])),
            AMQPValue::FieldTable(inner),
        ];
        for value in values {
            let mut table = FieldTable::default();
            table.insert("key".into(), value.clone());
            let wire = cookie_factory::gen_simple(gen_field_table(&table), Vec::new()).unwrap();
            assert_eq!(wire.len(), 4 + entry_len("key", &value), "{value:?}");
        }
    }
}
