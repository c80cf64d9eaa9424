//! The copy plan: where the replacement a decision calls for goes, and what it carries. Pure;
//! the handler publishes what it says and settles the delivery once the broker confirms it.

use lapin::BasicProperties;

use crate::broker::topology::Topology;
use crate::delivery::copies::Attempt;
use crate::delivery::decision::{Action, Class};
use crate::delivery::outcome::Outcome;

/// What carrying out an [`Action`] takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan<'t> {
    /// Nothing to publish: the delivery ends so.
    Settle(Outcome),
    /// A copy to publish, confirmed, before the delivery is acked.
    Publish(Box<Copy<'t>>),
}

/// A replacement copy: its destination, its properties (the body is the original's, byte for
/// byte), the outcome once it is confirmed, and the failure class if the broker returns it
/// unroutable (a nack is always [`Class::CopyRefused`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Copy<'t> {
    pub exchange: &'t str,
    pub routing_key: &'t str,
    pub properties: BasicProperties,
    pub outcome: Outcome,
    pub unroutable: Class,
}

impl Copy<'_> {
    /// What the copy is, as its producer span names it.
    pub fn name(&self) -> &'static str {
        match self.outcome {
            Outcome::Retried => "retry",
            Outcome::Parked(_) => "parked",
            _ => "deferred",
        }
    }
}

/// The plan for `action` on a delivery with `original` properties after `failed`.
pub fn plan<'a>(
    action: &'a Action,
    failed: &Attempt<'_>,
    original: &BasicProperties,
    topology: &'a Topology,
) -> Plan<'a> {
    let copy = |exchange, routing_key, properties, outcome, unroutable| {
        Plan::Publish(Box::new(Copy { exchange, routing_key, properties, outcome, unroutable }))
    };
    match action {
        Action::Ack => Plan::Settle(Outcome::Succeeded),
        Action::Requeue => Plan::Settle(Outcome::Requeued),
        Action::Abandon => Plan::Settle(Outcome::Abandoned),
        Action::Retry(delay) => copy(
            topology.retry.exchange.as_str(),
            delay.label(),
            failed.retry_properties(original, delay.label(), delay.millis()),
            Outcome::Retried,
            Class::RetryUnroutable,
        ),
        Action::Park(reason) => copy(
            "",
            topology.parking.queue.as_str(),
            failed.parked_properties(original, *reason),
            Outcome::Parked(*reason),
            Class::CopyRefused,
        ),
        Action::Defer => copy(
            "",
            topology.work_queue.name.as_str(),
            failed.deferred_properties(original),
            Outcome::Deferred,
            Class::CopyRefused,
        ),
        Action::DeferFor(delay) => copy(
            topology.retry.exchange.as_str(),
            delay.label(),
            failed.deferred_properties(original).with_expiration(delay.millis().to_string().into()),
            Outcome::Deferred,
            Class::CopyRefused,
        ),
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::AMQPValue;

    use super::*;
    use crate::delivery::copies::{ATTEMPT, DEFERRALS, Origin, PARK_REASON, RetryState};
    use crate::delivery::outcome::ParkReason;

    fn header(properties: &BasicProperties, name: &str) -> Option<AMQPValue> {
        properties.headers().as_ref()?.inner().get(name).cloned()
    }

    #[test]
    fn each_action_has_its_copy_or_none() {
        let topology = Topology::load(None).unwrap();
        let origin =
            Origin { exchange: "trip".into(), routing_key: "payment.cmd.create_session".into() };
        let state = RetryState { attempts: 1, ..RetryState::default() };
        let failed = Attempt {
            origin: &origin,
            state: &state,
            number: 2,
            started_ms: 1_000,
            now_ms: 2_000,
            error: "Stripe answered 503",
        };
        let original = BasicProperties::default();
        let first = topology.retry.delays[0].clone();
        let second = topology.retry.delays[1].clone();
        for (action, outcome) in [
            (Action::Ack, Outcome::Succeeded),
            (Action::Requeue, Outcome::Requeued),
            (Action::Abandon, Outcome::Abandoned),
        ] {
            assert_eq!(plan(&action, &failed, &original, &topology), Plan::Settle(outcome));
        }

        let retry = Action::Retry(second.clone());
        let retried = copy(&retry, &failed, &original, &topology);
        assert_eq!(
            (retried.exchange, retried.routing_key, retried.outcome, retried.unroutable),
            (topology.retry.exchange.as_str(), "2s", Outcome::Retried, Class::RetryUnroutable)
        );
        assert_eq!(retried.properties.expiration().as_ref().unwrap().as_str(), "2000");
        assert_eq!(header(&retried.properties, ATTEMPT), Some(AMQPValue::LongLongInt(2)));
        assert_eq!(retried.name(), "retry");

        let park = Action::Park(ParkReason::RetriesExhausted);
        let parked = copy(&park, &failed, &original, &topology);
        assert_eq!(
            (parked.exchange, parked.routing_key, parked.unroutable),
            ("", topology.parking.queue.as_str(), Class::CopyRefused)
        );
        assert_eq!(parked.outcome, Outcome::Parked(ParkReason::RetriesExhausted));
        assert!(matches!(header(&parked.properties, PARK_REASON), Some(AMQPValue::LongString(r))
            if r.to_string() == "retries_exhausted"));
        assert_eq!(parked.name(), "parked");

        // A deferral spends no attempt: the count the message came with travels on.
        let deferred = copy(&Action::Defer, &failed, &original, &topology);
        assert_eq!(
            (deferred.exchange, deferred.routing_key, deferred.outcome, deferred.unroutable),
            ("", topology.work_queue.name.as_str(), Outcome::Deferred, Class::CopyRefused)
        );
        assert_eq!(header(&deferred.properties, ATTEMPT), Some(AMQPValue::LongLongInt(1)));
        assert_eq!(header(&deferred.properties, DEFERRALS), Some(AMQPValue::LongLongInt(1)));
        assert!(deferred.properties.expiration().is_none(), "straight back, no wait");
        assert_eq!(deferred.name(), "deferred");

        let defer_for = Action::DeferFor(first);
        let waiting = copy(&defer_for, &failed, &original, &topology);
        assert_eq!(
            (waiting.exchange, waiting.routing_key, waiting.outcome),
            (topology.retry.exchange.as_str(), "1s", Outcome::Deferred)
        );
        assert_eq!(waiting.properties.expiration().as_ref().unwrap().as_str(), "1000");
        assert_eq!(header(&waiting.properties, ATTEMPT), Some(AMQPValue::LongLongInt(1)));
    }

    /// The copy `action` calls for; panics on an action that publishes none.
    fn copy<'a>(
        action: &'a Action,
        failed: &Attempt<'_>,
        original: &BasicProperties,
        topology: &'a Topology,
    ) -> Copy<'a> {
        match plan(action, failed, original, topology) {
            Plan::Publish(copy) => *copy,
            settle => panic!("{action:?}: {settle:?}"),
        }
    }
}
