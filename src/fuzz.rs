//! Fuzzing with property tests: every reader of bytes a peer controls, run on its seed corpus
//! (`fuzz/corpus/<target>/`), on mutations of the seeds, and on arbitrary input. Each input
//! must be answered without a panic and without allocating more than a bounded multiple of
//! its size.
//!
//! `make test` runs `FUZZ_CASES` (256) generated inputs per target; `make fuzz` runs each
//! target for `FUZZ_SECONDS`. A failure prints the smallest input proptest shrank it to; add
//! it to the corpus with the fix.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use secrecy::SecretString;

use crate::contract::CreateSession;
use crate::delivery::copies::{self, Attempt, MAX_CARRIED_HEADERS, Origin, RetryState};
use crate::delivery::outcome::ParkReason;
use crate::webhook;

/// The most an input may make its reader allocate at once: a fixed allowance and a multiple
/// of its size (a JSON document becomes a tree several times its size).
fn allocation_bound(input_len: usize) -> usize {
    256 * 1024 + 64 * input_len
}

// --- The allocation meter: the live bytes of each thread, and their peak. ---

struct Metered;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn size(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Metered {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            track(size(layout.size()));
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(pointer, layout) };
        track(-size(layout.size()));
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            track(size(new_size) - size(layout.size()));
        }
        moved
    }
}

#[global_allocator]
static METERED: Metered = Metered;

/// The most `f` had allocated at once on this thread beyond what was live before it.
fn peak_allocation(f: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    f();
    usize::try_from(PEAK.with(Cell::get) - base).unwrap_or(0)
}

fn bounded(input_len: usize, f: impl FnOnce()) -> Result<(), TestCaseError> {
    let peak = peak_allocation(f);
    let bound = allocation_bound(input_len);
    prop_assert!(peak <= bound, "{peak} bytes allocated for {input_len} bytes of input");
    Ok(())
}

// --- Running a target. ---

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the seed corpus {} is empty", dir.display());
    files.iter().map(|f| std::fs::read(f).expect("a corpus file")).collect()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `check` on `strategy`'s inputs: `FUZZ_CASES` of them, or for `FUZZ_SECONDS` when set.
fn fuzz<S: Strategy>(strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let cases = u32::try_from(env_number("FUZZ_CASES", 256)).unwrap_or(u32::MAX);
    let until = Instant::now() + Duration::from_secs(env_number("FUZZ_SECONDS", 0));
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    loop {
        let mut runner = TestRunner::new(config.clone());
        if let Err(failure) = runner.run(&strategy, &check) {
            panic!("{failure}");
        }
        if Instant::now() >= until {
            break;
        }
    }
}

/// Seeds, seeds with bytes flipped, inserted, cut or repeated, and arbitrary bytes.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
        (any::<prop::sample::Index>(), 1usize..32).prop_map(|(at, len)| Edit::Cut(at, len)),
        (any::<prop::sample::Index>(), 1usize..64, 1usize..64)
            .prop_map(|(at, len, times)| Edit::Repeat(at, len, times)),
    ];
    prop_oneof![
        3 => (prop::sample::select(seeds), prop::collection::vec(edit, 0..6)).prop_map(
            |(mut input, edits)| {
                for edit in edits {
                    edit.apply(&mut input);
                }
                input
            }
        ),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Set(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Cut(prop::sample::Index, usize),
    /// Repeats a stretch: deep nesting and long runs.
    Repeat(prop::sample::Index, usize, usize),
}

impl Edit {
    fn apply(self, input: &mut Vec<u8>) {
        let at = |index: prop::sample::Index, len: usize| index.index(len.max(1)).min(len);
        match self {
            Self::Set(index, byte) => {
                if !input.is_empty() {
                    let i = at(index, input.len() - 1);
                    input[i] = byte;
                }
            }
            Self::Insert(index, bytes) => {
                let i = at(index, input.len());
                input.splice(i..i, bytes);
            }
            Self::Cut(index, len) => {
                let i = at(index, input.len());
                input.drain(i..(i + len).min(input.len()));
            }
            Self::Repeat(index, len, times) => {
                let i = at(index, input.len());
                let stretch = input[i..(i + len).min(input.len())].to_vec();
                let repeated = stretch.repeat(times);
                input.splice(i..i, repeated);
            }
        }
    }
}

// --- The targets. ---

/// The envelope and payload decoder, and the trip id hint used for logs.
#[test]
fn envelope() {
    let seeds = corpus("envelope");
    for seed in &seeds {
        CreateSession::decode(seed).ok();
    }
    fuzz(mutated(seeds), |body| {
        bounded(body.len(), || {
            let decoded = CreateSession::decode(&body);
            CreateSession::trip_id_hint(&body);
            if let Ok(command) = decoded {
                assert!(!command.trip_id.trim().is_empty());
                assert!(command.amount.get() > 0);
                assert!(!command.trip_id.chars().any(char::is_control));
                command.session_created("cs_test_1");
            }
        })
    });
}

/// The webhook's event reader (after the signature passed).
#[test]
fn webhook_event() {
    let seeds = corpus("webhook_event");
    fuzz(mutated(seeds), |body| {
        bounded(body.len(), || {
            webhook::read_event(&body).ok();
        })
    });
}

/// The `Stripe-Signature` parser and check, on any header and body.
#[test]
fn webhook_signature() {
    let seeds = corpus("webhook_signature");
    let secrets = [SecretString::from("whsec_fuzz"), SecretString::from("whsec_other")];
    let tolerance = Duration::from_secs(300);
    let header = mutated(seeds).prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let now = prop_oneof![Just(1_700_000_000_i64), any::<i64>()];
    fuzz((header, prop::collection::vec(any::<u8>(), 0..256), now), |(header, body, now)| {
        bounded(header.len() + body.len(), || {
            let verdict = webhook::verify(&header, &body, &secrets, tolerance, now);
            if verdict.is_ok() {
                // Only a real signature passes: the fuzzer cannot forge HMAC-SHA256.
                assert!(header.contains("v1="));
            }
        })?;
        // A correct signature of the same body always passes.
        let signed = webhook::sign("whsec_fuzz", now, &body);
        prop_assert!(webhook::verify(&signed, &body, &secrets, tolerance, now).is_ok());
        Ok(())
    });
}

fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        "\\PC{0,40}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| AMQPValue::ByteArray(b.into())),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|values| AMQPValue::FieldArray(FieldArray::from(values))),
            prop::collection::vec(("[a-z-]{1,12}", inner), 0..4).prop_map(|entries| {
                let mut table = FieldTable::default();
                for (key, value) in entries {
                    table.insert(key.into(), value);
                }
                AMQPValue::FieldTable(table)
            }),
        ]
    })
}

/// Header names the worker reads, and others.
fn header_name(seeds: Vec<String>) -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(seeds), "[a-z-]{1,20}", "x-death|x-first-death-queue"]
}

/// The retry-header reader, and the copies made from whatever headers arrived: the worker's
/// own headers always win, and a copy never carries more than its share.
#[test]
fn retry_headers() {
    let names: Vec<String> = corpus("retry_headers")
        .iter()
        .flat_map(|file| {
            String::from_utf8_lossy(file).lines().map(str::to_owned).collect::<Vec<_>>()
        })
        .filter(|line| !line.is_empty())
        .collect();
    let table = prop::collection::vec((header_name(names), amqp_value()), 0..24);
    let big = prop::option::of(1usize..200_000);
    fuzz((table, big, any::<u64>()), |(entries, big, now_ms)| {
        let mut headers = FieldTable::default();
        for (key, value) in entries {
            headers.insert(key.into(), value);
        }
        if let Some(len) = big {
            headers.insert("x-big".into(), AMQPValue::LongString(vec![b'b'; len].into()));
        }
        let input_len: usize = headers
            .inner()
            .iter()
            .map(|(k, v)| crate::broker::headers::entry_len(k.as_str(), v))
            .sum();
        let original = BasicProperties::default().with_headers(headers);
        bounded(input_len, || {
            let state = RetryState::from_properties(&original);
            state.time_in_broker(now_ms);
            let origin = Origin { exchange: "trip".into(), routing_key: "k".into() };
            let failed = Attempt {
                origin: &origin,
                state: &state,
                number: state.attempts.saturating_add(1),
                started_ms: now_ms,
                now_ms,
                error: "fuzz",
            };
            let number = failed.number;
            for (copy, attempts) in [
                (failed.retry_properties(&original, "1s", 1000), number),
                (failed.parked_properties(&original, ParkReason::RetriesExhausted), number),
                (failed.deferred_properties(&original), state.attempts),
            ] {
                let headers = copy.headers().as_ref().expect("a copy has headers");
                let carried: usize = headers
                    .inner()
                    .iter()
                    .map(|(k, v)| crate::broker::headers::entry_len(k.as_str(), v))
                    .sum();
                let own = 16 * (copies::MAX_ERROR_LEN + 64);
                assert!(carried <= MAX_CARRIED_HEADERS + own, "{carried} bytes of headers");
                assert_eq!(RetryState::from_properties(&copy).attempts, attempts);
            }
        })
    });
}
