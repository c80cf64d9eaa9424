//! What happens to a delivery: one pure function from what went wrong, the attempt number and
//! the retry schedule to one action. The handler in [`crate::consumer`] only carries it out.
//!
//! | what went wrong | action |
//! |---|---|
//! | nothing | ack (the event is confirmed) |
//! | the message or Stripe's answer is wrong for good | park with the reason |
//! | a failure of this payment that may pass (409, 424, an event publish refused), or an isolated Stripe-wide failure | retry in the next tier, an attempt spent; park as `retries_exhausted` after the last |
//! | a Stripe-wide failure in a brownout or outage, or as the circuit opens | defer for the first retry delay: through its wait queue, no attempt spent |
//! | a 429 | defer for the first retry delay |
//! | the circuit is open (no call made) | defer: back to the work queue at once, no attempt spent |
//! | the retry copy was returned unroutable (after the wait queue was declared again) | park as `retry_unroutable` |
//! | a copy was nacked, or the parked or deferred copy returned | requeue (nack) after a pause |
//! | the channel failed | abandon: the broker redelivers |
//! | a deferral of a payment first seen longer ago than the wait budget | park as `stripe_unavailable` ([`within_budget`]) |
//!
//! "Defer" is how an outage or a rate limit costs a payment nothing: a copy with the same
//! attempt count, confirmed before the ack, goes back to the work queue, where it waits while
//! the circuit is open (the consumer is cancelled) or is paced when it comes round. A payment
//! whose own call just failed Stripe-wide or was answered 429 waits the first retry delay
//! (1 s) in its wait queue on the way: a brownout costs it a second per failed call, and
//! failed calls cannot come straight back to fail again as fast as the broker turns them
//! round.

use std::time::Duration;

use crate::broker::topology::Delay;
use crate::delivery::outcome::ParkReason;
use crate::stripe::breaker::Spread;

/// Why an attempt, or the publish of its replacement, did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Wrong for good: the message, or Stripe's answer about it.
    Permanent(ParkReason),
    /// This payment failed in a way that may pass.
    Transient,
    /// Stripe failed as a whole (timeout, connection, 5xx); `Spread` says whether alone.
    StripeWide(Spread),
    /// Stripe answered 429.
    RateLimited,
    /// The circuit breaker is open: Stripe was not called.
    CircuitOpen,
    /// The retry copy came back unroutable, even after its wait queue was declared again.
    RetryUnroutable,
    /// The broker did not take a copy: it nacked it (a quorum queue without a leader, a
    /// queue at its limit), or the parked or deferred copy came back unroutable.
    CopyRefused,
    /// The channel or connection failed: nothing more can be published or acked.
    Channel,
}

/// What to do with the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Success: ack.
    Ack,
    /// Publish a retry copy into the wait queue of this delay, then ack.
    Retry(Delay),
    /// Publish a copy with the attempt count unchanged to the work queue, then ack.
    Defer,
    /// Publish a copy with the attempt count unchanged into this delay's wait queue, then ack.
    DeferFor(Delay),
    /// Publish a parked copy, then ack.
    Park(ParkReason),
    /// Nack with requeue after a pause.
    Requeue,
    /// Do nothing; the broker redelivers when the session ends.
    Abandon,
}

/// The action for attempt number `attempt` (1-based) that ended with `failure` (`None`: it
/// succeeded), under a schedule of `delays` (one per retry: `delays.len() + 1` attempts).
pub fn decide(attempt: u32, failure: Option<Class>, delays: &[Delay]) -> Action {
    let Some(class) = failure else { return Action::Ack };
    match class {
        Class::Permanent(reason) => Action::Park(reason),
        Class::Transient | Class::StripeWide(Spread::Isolated) => {
            let next = usize::try_from(attempt).ok().and_then(|a| a.checked_sub(1));
            match next.and_then(|i| delays.get(i)) {
                Some(delay) => Action::Retry(delay.clone()),
                None => Action::Park(ParkReason::RetriesExhausted),
            }
        }
        Class::StripeWide(Spread::Widespread) | Class::RateLimited => {
            delays.first().map_or(Action::Defer, |first| Action::DeferFor(first.clone()))
        }
        Class::CircuitOpen => Action::Defer,
        Class::RetryUnroutable => Action::Park(ParkReason::RetryUnroutable),
        Class::CopyRefused => Action::Requeue,
        Class::Channel => Action::Abandon,
    }
}

/// Deferrals spend no attempt, so only time bounds them: a payment that would be deferred
/// again after waiting longer than `budget` since it first arrived is parked
/// `stripe_unavailable` instead, well before Stripe may forget its idempotency key. Any other
/// action is returned as it is.
pub fn within_budget(action: Action, waited: Duration, budget: Duration) -> Action {
    match action {
        Action::Defer | Action::DeferFor(_) if waited > budget => {
            Action::Park(ParkReason::StripeUnavailable)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deferral_past_the_budget_parks() {
        let (hour, budget) = (Duration::from_secs(3600), Duration::from_secs(6 * 3600));
        assert_eq!(within_budget(Action::Defer, hour, budget), Action::Defer);
        assert_eq!(within_budget(Action::Defer, budget, budget), Action::Defer);
        assert_eq!(
            within_budget(Action::Defer, budget + hour, budget),
            Action::Park(ParkReason::StripeUnavailable)
        );
        let retry = Action::Retry(Delay::try_from("1s".to_owned()).unwrap());
        assert_eq!(within_budget(retry.clone(), budget + hour, budget), retry, "only deferrals");
        assert_eq!(within_budget(Action::Ack, budget + hour, budget), Action::Ack);
        let later = Action::DeferFor(Delay::try_from("1s".to_owned()).unwrap());
        assert_eq!(within_budget(later.clone(), hour, budget), later);
        assert_eq!(
            within_budget(later, budget + hour, budget),
            Action::Park(ParkReason::StripeUnavailable)
        );
    }

    fn delays() -> Vec<Delay> {
        ["1s", "2s", "4s"].iter().map(|d| Delay::try_from((*d).to_owned()).unwrap()).collect()
    }

    fn delay(label: &str) -> Delay {
        Delay::try_from(label.to_owned()).unwrap()
    }

    fn retry(label: &str) -> Action {
        Action::Retry(delay(label))
    }

    #[test]
    fn every_row_of_the_table() {
        use Action::*;
        use ParkReason::*;
        let isolated = Class::StripeWide(Spread::Isolated);
        let widespread = Class::StripeWide(Spread::Widespread);
        let rows: Vec<(u32, Option<Class>, Action)> = vec![
            (1, None, Ack),
            (4, None, Ack),
            (1, Some(Class::Permanent(InvalidMessage)), Park(InvalidMessage)),
            (2, Some(Class::Permanent(StripeRejected)), Park(StripeRejected)),
            (1, Some(Class::Permanent(IdempotencyConflict)), Park(IdempotencyConflict)),
            (1, Some(Class::Permanent(StripeBadResponse)), Park(StripeBadResponse)),
            (1, Some(Class::Permanent(UnexpectedRoutingKey)), Park(UnexpectedRoutingKey)),
            (1, Some(Class::Transient), retry("1s")),
            (2, Some(Class::Transient), retry("2s")),
            (3, Some(Class::Transient), retry("4s")),
            (4, Some(Class::Transient), Park(RetriesExhausted)),
            (9, Some(Class::Transient), Park(RetriesExhausted)),
            (1, Some(isolated), retry("1s")),
            (3, Some(isolated), retry("4s")),
            (4, Some(isolated), Park(RetriesExhausted)),
            (1, Some(widespread), DeferFor(delay("1s"))),
            (4, Some(widespread), DeferFor(delay("1s"))),
            (1, Some(Class::RateLimited), DeferFor(delay("1s"))),
            (4, Some(Class::RateLimited), DeferFor(delay("1s"))),
            (1, Some(Class::CircuitOpen), Defer),
            (4, Some(Class::CircuitOpen), Defer),
            (1, Some(Class::RetryUnroutable), Park(RetryUnroutable)),
            (2, Some(Class::CopyRefused), Requeue),
            (1, Some(Class::Channel), Abandon),
            (4, Some(Class::Channel), Abandon),
        ];
        for (attempt, class, expected) in rows {
            assert_eq!(decide(attempt, class, &delays()), expected, "attempt {attempt}, {class:?}");
        }
    }

    #[test]
    fn the_schedule_sets_the_number_of_attempts() {
        let long: Vec<Delay> = ["1s", "2s", "4s", "30s", "2m", "10m"]
            .iter()
            .map(|d| Delay::try_from((*d).to_owned()).unwrap())
            .collect();
        assert_eq!(decide(4, Some(Class::Transient), &long), retry("30s"));
        assert_eq!(decide(6, Some(Class::Transient), &long), retry("10m"));
        assert_eq!(
            decide(7, Some(Class::Transient), &long),
            Action::Park(ParkReason::RetriesExhausted)
        );
        assert_eq!(
            decide(0, Some(Class::Transient), &long),
            Action::Park(ParkReason::RetriesExhausted)
        );
    }
}
