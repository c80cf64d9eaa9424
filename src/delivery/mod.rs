//! The delivery policy, pure and apart from the I/O: what a message carries between attempts,
//! what happens to it, and how it ended.
//!
//! - [`copies`]: the retry headers, the retry state read from them, and the copies that
//!   replace a message (retry, deferred, parked).
//! - [`decision`]: what happens to a delivery, as one pure function of what went wrong.
//! - [`plan`]: where the replacement a decision calls for goes, and what it carries.
//! - [`outcome`]: how a delivery ended ([`outcome::Outcome`]) and why one was parked
//!   ([`outcome::ParkReason`]).

pub mod copies;
pub mod decision;
pub mod outcome;
pub mod plan;
