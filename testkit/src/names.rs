//! The queue names of the default topology profile, as the tests and benchmarks read them.

/// The work queue (`payment_trip_response`).
pub const WORK: &str = "payment_trip_response";
/// The api-gateway's queue of `payment.event.session_created`.
pub const EVENTS: &str = "notify_payment_session_created";
/// The parking queue.
pub const PARKED: &str = "payment_parked";
/// The wait queues of the default schedule (1 s, 2 s, 4 s).
pub const WAIT_QUEUES: [&str; 3] = ["payment_wait_1s", "payment_wait_2s", "payment_wait_4s"];
