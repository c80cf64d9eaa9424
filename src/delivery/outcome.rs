//! How a delivery ended, and why one was parked: bounded sets, used as metric labels.

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event was published and the command acked.
    Succeeded,
    /// A retry copy was published to a wait queue and the command acked.
    Retried,
    /// A parked copy was published and the command acked.
    Parked(ParkReason),
    /// Stripe was failing, rate-limiting or behind an open circuit: a copy with the attempt
    /// count unchanged went back to the work queue (or through the first wait queue) and the
    /// command was acked.
    Deferred,
    /// No replacement could be published; the command was handed back to the broker.
    Requeued,
    /// The channel failed; the broker redelivers the command by itself.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Retried => "retried",
            Self::Parked(_) => "parked",
            Self::Deferred => "deferred",
            Self::Requeued => "requeued",
            Self::Abandoned => "abandoned",
        }
    }

    /// Why the message was parked, for a parked one.
    pub fn park_reason(self) -> Option<ParkReason> {
        match self {
            Self::Parked(reason) => Some(reason),
            _ => None,
        }
    }
}

/// Why a message was parked: a bounded set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParkReason {
    /// The body is not a valid `payment.cmd.create_session`.
    InvalidMessage,
    /// The message arrived with a routing key the worker does not handle.
    UnexpectedRoutingKey,
    /// Stripe refused the request for good (a 4xx other than 409 and 429).
    StripeRejected,
    /// The trip's idempotency key was used with other parameters: the same trip with another
    /// amount. A second session for one trip is never created.
    IdempotencyConflict,
    /// Stripe answered with something that is not a session.
    StripeBadResponse,
    /// Stripe replays a server error it saved under the trip's idempotency key: every retry
    /// with the key gets the same answer.
    StripeReplayedError,
    /// Deferred (Stripe down or rate-limiting) for longer than the wait budget.
    StripeUnavailable,
    /// Every attempt failed with a transient error.
    RetriesExhausted,
    /// The retry copy could not be published (no wait queue took it).
    RetryUnroutable,
}

impl ParkReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidMessage => "invalid_message",
            Self::UnexpectedRoutingKey => "unexpected_routing_key",
            Self::StripeRejected => "stripe_rejected",
            Self::IdempotencyConflict => "idempotency_conflict",
            Self::StripeBadResponse => "stripe_bad_response",
            Self::StripeReplayedError => "stripe_replayed_error",
            Self::StripeUnavailable => "stripe_unavailable",
            Self::RetriesExhausted => "retries_exhausted",
            Self::RetryUnroutable => "retry_unroutable",
        }
    }
}
