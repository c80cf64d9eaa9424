//! W3C trace context across the broker: the Go services put `traceparent` (and `tracestate`,
//! `baggage`) in the AMQP headers, and an event payment-worker publishes on behalf of a
//! message continues that trace.

use lapin::BasicProperties;
use lapin::types::FieldTable;

use crate::headers::{long_string, string};

/// The longest `tracestate` and `baggage` passed on, as the W3C specifications bound them
/// (32 members of at most 256 characters; 8192 bytes): anything longer is not a valid trace
/// context and is left behind.
const MAX_TRACE_HEADER: [(&str, usize); 2] = [("tracestate", 32 * 257), ("baggage", 8192)];

/// The trace headers of a message published on behalf of `incoming`: its `traceparent`
/// continued with a new span id, its non-empty `tracestate` and `baggage` copied when within
/// their bounds. `None` when `incoming` carries no valid `traceparent`.
pub fn continued(incoming: &BasicProperties) -> Option<FieldTable> {
    let incoming = incoming.headers().as_ref()?;
    let parent = string(incoming, "traceparent").and_then(|p| continue_trace(&p))?;
    let mut headers = FieldTable::default();
    headers.insert("traceparent".into(), long_string(&parent));
    for (key, max) in MAX_TRACE_HEADER {
        if let Some(value) = string(incoming, key).filter(|v| !v.is_empty() && v.len() <= max) {
            headers.insert(key.into(), long_string(&value));
        }
    }
    Some(headers)
}

/// A `traceparent` for a child span of `parent`: same trace id and flags, a new span id.
/// `None` when `parent` is not a valid version-00 traceparent.
pub fn continue_trace(parent: &str) -> Option<String> {
    let parts: Vec<&str> = parent.trim().split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    match parts.as_slice() {
        [version, trace, span, flags]
            if hex(version, 2)
                && *version != "ff"
                && hex(trace, 32)
                && hex(span, 16)
                && hex(flags, 2)
                && trace.bytes().any(|b| b != b'0')
                && span.bytes().any(|b| b != b'0') =>
        {
            let child = loop {
                let id: u64 = rand::random();
                if id != 0 {
                    break id;
                }
            };
            Some(format!("00-{trace}-{child:016x}-{flags}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_with_a_new_span() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = continue_trace(parent).unwrap();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
        assert_eq!(child.len(), parent.len());
        for bad in [
            "",
            "00-abc-def-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(continue_trace(bad), None, "{bad}");
        }
    }
}
