//! A circuit breaker over Stripe-wide failures, one per replica.
//!
//! A pure state machine: every method takes the current time, so the unit tests drive it with
//! a clock of their own. [`crate::flow`] owns one behind a mutex and publishes its state.
//!
//! * **Closed**: calls go through. Each answer is recorded in a sliding window of the last
//!   `window` calls. The breaker opens when Stripe-wide failures of `consecutive` different
//!   payments come in a row, or when the window holds at least `min_calls` answers of which
//!   at least `failure_ratio` are Stripe-wide failures. One payment failing again and again
//!   counts once in a row: alone, it is that payment's problem, not Stripe's.
//! * **Open**: no call goes through until the cool-down has passed. The first cool-down is
//!   `cooldown`; each failed probe doubles it, up to `max_cooldown`.
//! * **Half-open**: exactly one call (the probe) goes through; other callers wait for its
//!   answer. A probe that Stripe answers (a session, or any error that is not Stripe-wide)
//!   closes the breaker and empties the window; a Stripe-wide failure opens it again.
//!
//! Answers of calls admitted before the breaker opened, which arrive while it is open or
//! half-open, change nothing: only the probe decides.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When the breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// How many recent answers the failure ratio is computed over.
    pub window: usize,
    /// Answers the window must hold before the ratio can open the breaker.
    pub min_calls: usize,
    /// Share of Stripe-wide failures in the window that opens the breaker, in (0, 1].
    pub failure_ratio: f64,
    /// Stripe-wide failures of different payments in a row that open the breaker whatever
    /// the window says.
    pub consecutive: usize,
    /// The first cool-down after the breaker opens.
    pub cooldown: Duration,
    /// The longest cool-down, reached by doubling while probes keep failing.
    pub max_cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window: 20,
            min_calls: 10,
            failure_ratio: 0.5,
            consecutive: 5,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(60),
        }
    }
}

/// What one answer says about Stripe as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Stripe answered: a session, or an error about this request.
    Answered,
    /// Stripe could not be reached or failed as a whole: a timeout, a connection error, a 5xx.
    Failed,
    /// Stripe asked to slow down (429): the rate limiter's business, not the breaker's.
    /// As a probe's answer it closes the breaker: Stripe is up.
    Throttled,
}

/// The breaker's state, as the rest of the worker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// No call until `until`.
    Open {
        until: Instant,
    },
    /// One probe is (or may be) out.
    HalfOpen,
}

impl State {
    /// A bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// The answer to "may I call Stripe now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Call, as usual.
    Call,
    /// Call: this is the half-open probe. Its answer must be recorded with `probe = true`, or
    /// the probe given back with [`Breaker::abandon_probe`].
    Probe,
    /// A probe is out; ask again once it has answered.
    Wait,
    /// The breaker is open until `until`.
    Refused { until: Instant },
}

/// How a recorded Stripe-wide failure stands among its neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// No other payment failed Stripe-wide since the last answer, and the breaker is closed:
    /// treated like a failure of this payment.
    Isolated,
    /// Part of a run of Stripe-wide failures of several payments, or the breaker is (now)
    /// open: Stripe's fault.
    Widespread,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed,
    Open { until: Instant, cooldown: Duration },
    HalfOpen { probing: bool, cooldown: Duration },
}

/// The breaker. See the module documentation.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    /// The last answers, `true` for a Stripe-wide failure; at most `settings.window`.
    window: VecDeque<bool>,
    /// The payments whose Stripe-wide failures came in a row since the last answer, each
    /// once.
    streak: Vec<String>,
    inner: Inner,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self { settings, window: VecDeque::new(), streak: Vec::new(), inner: Inner::Closed }
    }

    pub fn state(&self) -> State {
        match self.inner {
            Inner::Closed => State::Closed,
            Inner::Open { until, .. } => State::Open { until },
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// Whether a call may go out now; turns an expired open breaker half-open.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.inner {
            Inner::Closed => Admission::Call,
            Inner::Open { until, cooldown } if now >= until => {
                self.inner = Inner::HalfOpen { probing: true, cooldown };
                Admission::Probe
            }
            Inner::Open { until, .. } => Admission::Refused { until },
            Inner::HalfOpen { probing: false, cooldown } => {
                self.inner = Inner::HalfOpen { probing: true, cooldown };
                Admission::Probe
            }
            Inner::HalfOpen { probing: true, .. } => Admission::Wait,
        }
    }

    /// The probe was admitted but made no call (its delivery was cancelled): the next caller
    /// probes instead.
    pub fn abandon_probe(&mut self) {
        if let Inner::HalfOpen { cooldown, .. } = self.inner {
            self.inner = Inner::HalfOpen { probing: false, cooldown };
        }
    }

    /// Records the answer to a call about `payment`. For a Stripe-wide failure, says how
    /// widespread it is.
    pub fn record(&mut self, now: Instant, signal: Signal, probe: bool, payment: &str) -> Spread {
        if probe {
            return self.record_probe(now, signal);
        }
        if self.inner != Inner::Closed {
            // A call admitted before the breaker opened: the probe decides, not this.
            return Spread::Widespread;
        }
        let failed = match signal {
            Signal::Throttled => return Spread::Isolated,
            Signal::Answered => false,
            Signal::Failed => true,
        };
        self.window.push_back(failed);
        if self.window.len() > self.settings.window {
            self.window.pop_front();
        }
        if !failed {
            self.streak.clear();
            return Spread::Isolated;
        }
        if !self.streak.iter().any(|p| p == payment) {
            self.streak.push(payment.to_owned());
        }
        let failures = self.window.iter().filter(|f| **f).count();
        let ratio_trips = self.window.len() >= self.settings.min_calls
            && failures as f64 >= self.settings.failure_ratio * self.window.len() as f64;
        if self.streak.len() >= self.settings.consecutive || ratio_trips {
            self.open(now, self.settings.cooldown);
            return Spread::Widespread;
        }
        if self.streak.len() >= 2 { Spread::Widespread } else { Spread::Isolated }
    }

    fn record_probe(&mut self, now: Instant, signal: Signal) -> Spread {
        let Inner::HalfOpen { cooldown, .. } = self.inner else {
            return Spread::Widespread;
        };
        match signal {
            Signal::Failed => {
                let longer = cooldown.saturating_mul(2).min(self.settings.max_cooldown);
                self.open(now, longer);
                Spread::Widespread
            }
            Signal::Answered | Signal::Throttled => {
                self.inner = Inner::Closed;
                self.window.clear();
                self.streak.clear();
                Spread::Isolated
            }
        }
    }

    fn open(&mut self, now: Instant, cooldown: Duration) {
        self.inner = Inner::Open { until: now + cooldown, cooldown };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// A payment id not used before.
    fn payment() -> String {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        format!("trip-{}", NEXT.fetch_add(1, Ordering::Relaxed))
    }

    fn breaker() -> (Breaker, Instant) {
        (Breaker::new(BreakerSettings::default()), Instant::now())
    }

    #[test]
    fn five_failures_in_a_row_open_it() {
        let (mut b, t0) = breaker();
        assert_eq!(
            b.record(t0, Signal::Failed, false, &payment()),
            Spread::Isolated,
            "the first is alone"
        );
        for _ in 0..3 {
            assert_eq!(b.record(t0, Signal::Failed, false, &payment()), Spread::Widespread);
            assert_eq!(b.state(), State::Closed);
        }
        assert_eq!(b.record(t0, Signal::Failed, false, &payment()), Spread::Widespread);
        assert_eq!(b.state(), State::Open { until: t0 + 5 * SECOND });
        assert_eq!(b.admit(t0 + SECOND), Admission::Refused { until: t0 + 5 * SECOND });
    }

    #[test]
    fn one_payment_failing_again_and_again_is_that_payments_problem() {
        let (mut b, t0) = breaker();
        for _ in 0..9 {
            assert_eq!(b.record(t0, Signal::Failed, false, "poison"), Spread::Isolated);
            assert_eq!(b.state(), State::Closed);
        }
        assert_eq!(b.record(t0, Signal::Failed, false, "other"), Spread::Widespread);
    }

    #[test]
    fn half_the_window_failing_opens_it() {
        let (mut b, t0) = breaker();
        for i in 0..9 {
            let signal = if i % 2 == 0 { Signal::Failed } else { Signal::Answered };
            b.record(t0, signal, false, &payment());
        }
        assert_eq!(b.state(), State::Closed, "9 answers are fewer than min_calls");
        b.record(t0, Signal::Failed, false, &payment());
        assert!(matches!(b.state(), State::Open { .. }), "6 of 10 failed");
    }

    #[test]
    fn a_fifth_of_calls_failing_keeps_it_closed() {
        let (mut b, t0) = breaker();
        for i in 0..1000 {
            let signal = if i % 5 == 0 { Signal::Failed } else { Signal::Answered };
            assert_ne!(b.record(t0, signal, false, &payment()), Spread::Widespread);
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn rate_limits_neither_open_nor_heal_it() {
        let (mut b, t0) = breaker();
        for _ in 0..4 {
            b.record(t0, Signal::Failed, false, &payment());
        }
        for _ in 0..100 {
            b.record(t0, Signal::Throttled, false, &payment());
        }
        assert_eq!(b.state(), State::Closed);
        b.record(t0, Signal::Failed, false, &payment());
        assert!(matches!(b.state(), State::Open { .. }), "the streak survived the 429s");
    }

    #[test]
    fn one_probe_per_cooldown_and_the_cooldown_doubles_up_to_the_cap() {
        let (mut b, t0) = breaker();
        for _ in 0..5 {
            b.record(t0, Signal::Failed, false, &payment());
        }
        let mut now = t0;
        for expected in [5, 10, 20, 40, 60, 60] {
            let State::Open { until } = b.state() else { panic!("open") };
            assert_eq!(until - now, expected * SECOND);
            assert!(matches!(b.admit(until - Duration::from_millis(1)), Admission::Refused { .. }));
            now = until;
            assert_eq!(b.admit(now), Admission::Probe);
            assert_eq!(b.state(), State::HalfOpen);
            assert_eq!(b.admit(now), Admission::Wait, "only one probe");
            b.record(now, Signal::Failed, true, &payment());
        }
        let State::Open { until } = b.state() else { panic!("open") };
        assert_eq!(b.admit(until), Admission::Probe);
        b.record(until, Signal::Answered, true, &payment());
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(until), Admission::Call);
        // Closed again with an empty window and the first cool-down.
        for _ in 0..5 {
            b.record(until, Signal::Failed, false, &payment());
        }
        assert_eq!(b.state(), State::Open { until: until + 5 * SECOND });
    }

    #[test]
    fn a_throttled_probe_closes_it() {
        let (mut b, t0) = breaker();
        for _ in 0..5 {
            b.record(t0, Signal::Failed, false, &payment());
        }
        assert_eq!(b.admit(t0 + 5 * SECOND), Admission::Probe);
        b.record(t0 + 5 * SECOND, Signal::Throttled, true, &payment());
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn late_answers_change_nothing_and_an_abandoned_probe_is_handed_on() {
        let (mut b, t0) = breaker();
        for _ in 0..5 {
            b.record(t0, Signal::Failed, false, &payment());
        }
        let open = b.state();
        assert_eq!(b.record(t0, Signal::Answered, false, &payment()), Spread::Widespread);
        assert_eq!(b.record(t0, Signal::Failed, false, &payment()), Spread::Widespread);
        assert_eq!(b.state(), open, "a late answer neither closes nor extends it");
        let later = t0 + 5 * SECOND;
        assert_eq!(b.admit(later), Admission::Probe);
        b.abandon_probe();
        assert_eq!(b.admit(later), Admission::Probe, "the next caller probes");
        b.record(later, Signal::Answered, false, &payment());
        assert_eq!(b.state(), State::HalfOpen, "only the probe's answer closes it");
    }
}
