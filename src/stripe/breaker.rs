//! Whose failure is it? The evidence about Stripe's health and the circuit breaker, one per
//! replica.
//!
//! A pure state machine: every method takes the current time, so the unit tests (and the
//! controller's simulation in [`crate::stripe::flow`]) drive it with a clock of their own.
//!
//! **Evidence.** Only a payment's first answer counts, and only while it is on its first
//! attempt (deferrals keep it there; a payment that spent an attempt is a *suspect*): the
//! window holds the first answer of each of the last `window` distinct payments, none older
//! than [`HORIZON`]. A payment failing again and again is evidence about that payment, never
//! more evidence about Stripe; a 429 is the pacer's business and is no evidence at all.
//!
//! **Grades.** A Stripe-wide failure (timeout, connection error, 5xx) is
//!
//! * *isolated* while most payments get answers: the window holds fewer than `min_calls`
//!   payments, or less than `failure_ratio` of them failed. The payment spends an attempt, as
//!   a 409 does: a sick payment follows its 1 s / 2 s / 4 s schedule and is parked after its
//!   last attempt.
//! * *widespread* when at least `failure_ratio` of at least `min_calls` payments failed (a
//!   brownout), or `consecutive` payments failed and none was answered (an outage from cold),
//!   or Stripe has answered no call for [`OUTAGE_RUN`] while `consecutive` distinct payments,
//!   retries included, failed (an outage that the window's answers from before it would hide
//!   while too few calls go out to outweigh them: the pacer slows down as calls fail, and at
//!   the end of a burst most calls are retries). No attempt is spent: the payment is deferred
//!   and tried again at the rate Stripe accepts ([`crate::stripe::pacer`] throttles).
//!
//! **Circuit.** The full stop is for when nearly nothing gets through: the breaker opens when
//! at least `open_ratio` (by default all) of the newest `min_calls` payments failed, or
//! `consecutive` failed and none was answered, or Stripe has answered none of the last
//! `min_calls` calls, over at least [`OUTAGE_RUN`], while `consecutive` distinct payments
//! failed among them (an outage that begins among healthy traffic: the window's answers from
//! before it would otherwise hold the circuit closed until `min_calls` new payments had
//! failed, while the deferred ones are called again and again). Any answer ends such a run,
//! a 429 included (Stripe's front door answered): in a brownout twenty failed calls in a row
//! are rare. Open, no call goes through until `cooldown` has passed; each failed probe
//! doubles it up to `max_cooldown` (by default the same: recovery is at most one cool-down
//! after Stripe heals). Half-open, exactly one call, the probe, goes through; a payment that
//! already spent an attempt is not taken as a probe (its failure would say nothing about
//! Stripe) unless [`MAX_PROBE_SKIPS`] were skipped already, and then its failure re-opens
//! the circuit without lengthening the cool-down. A probe that Stripe answers (a session, a
//! 429, any error that is not Stripe-wide) closes the breaker and empties the window.
//!
//! Answers of calls admitted before the breaker opened, which arrive while it is open or
//! half-open, change nothing: only the probe decides.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long an answer stays evidence.
pub const HORIZON: Duration = Duration::from_secs(10);

/// How long Stripe must have answered none of `min_calls` calls (from `consecutive` payments)
/// before the circuit opens although the window still holds answers from before: longer than
/// a second of flapping, short against a real outage.
pub const OUTAGE_RUN: Duration = Duration::from_secs(2);

/// Suspect payments passed over for the probe in one half-open period, at most; then one
/// is taken, so a queue holding only suspects cannot keep the circuit open for ever.
pub const MAX_PROBE_SKIPS: u32 = 10;

/// When failures are Stripe's and when the circuit opens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// Distinct payments whose first answers the shares are computed over.
    pub window: usize,
    /// Payments the window must hold before a share counts.
    pub min_calls: usize,
    /// Share of the window's payments failing Stripe-wide from which failures are Stripe's
    /// (deferred, no attempt spent), in (0, 1].
    pub failure_ratio: f64,
    /// Share of the newest `min_calls` payments failing that opens the circuit, in
    /// [`failure_ratio`, 1].
    pub open_ratio: f64,
    /// Payments failing with none answered that count as an outage before the window fills.
    pub consecutive: usize,
    /// The first cool-down after the breaker opens.
    pub cooldown: Duration,
    /// The longest cool-down, reached by doubling while probes keep failing.
    pub max_cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window: 50,
            min_calls: 20,
            failure_ratio: 0.3,
            open_ratio: 1.0,
            consecutive: 5,
            cooldown: Duration::from_secs(5),
            max_cooldown: Duration::from_secs(5),
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
    /// The breaker is open until `until` (or half-open, and this payment is no probe).
    Refused { until: Instant },
}

/// How a recorded Stripe-wide failure stands among its neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Most payments get answers: treated like a failure of this payment.
    Isolated,
    /// A brownout or an outage, or the breaker is (now) open: Stripe's fault.
    Widespread,
}

/// One payment's standing in an answer: whether its calls are evidence about Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    /// The trip id.
    pub payment: &'a str,
    /// It spent an attempt already: its failures are evidence about it, not about Stripe.
    pub suspect: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed,
    Open { until: Instant, cooldown: Duration },
    HalfOpen { probing: bool, cooldown: Duration, skipped: u32, suspect_probe: bool },
}

/// The first answer of one payment.
#[derive(Debug)]
struct Entry {
    at: Instant,
    payment: String,
    failed: bool,
}

/// The breaker. See the module documentation.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    /// First answers, oldest first; at most `settings.window`, none older than [`HORIZON`].
    window: VecDeque<Entry>,
    /// The payments in `window`.
    seen: HashSet<String>,
    /// Since Stripe last answered any call: the payments that failed (on any attempt), the
    /// failed calls, and when the first of them failed.
    run: HashSet<String>,
    run_calls: usize,
    run_since: Option<Instant>,
    inner: Inner,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            window: VecDeque::new(),
            seen: HashSet::new(),
            run: HashSet::new(),
            run_calls: 0,
            run_since: None,
            inner: Inner::Closed,
        }
    }

    pub fn state(&self) -> State {
        match self.inner {
            Inner::Closed => State::Closed,
            Inner::Open { until, .. } => State::Open { until },
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// Whether a call about a payment (`suspect`: it spent an attempt) may go out now; turns
    /// an expired open breaker half-open.
    pub fn admit(&mut self, now: Instant, suspect: bool) -> Admission {
        if let Inner::Open { until, cooldown } = self.inner {
            if now < until {
                return Admission::Refused { until };
            }
            self.inner =
                Inner::HalfOpen { probing: false, cooldown, skipped: 0, suspect_probe: false };
        }
        match self.inner {
            Inner::Closed => Admission::Call,
            Inner::HalfOpen { probing: true, .. } => Admission::Wait,
            Inner::HalfOpen { probing: false, cooldown, skipped, .. } => {
                if suspect && skipped < MAX_PROBE_SKIPS {
                    self.inner = Inner::HalfOpen {
                        probing: false,
                        cooldown,
                        skipped: skipped + 1,
                        suspect_probe: false,
                    };
                    return Admission::Refused { until: now };
                }
                self.inner =
                    Inner::HalfOpen { probing: true, cooldown, skipped, suspect_probe: suspect };
                Admission::Probe
            }
            Inner::Open { .. } => unreachable!("an open breaker was handled above"),
        }
    }

    /// The probe was admitted but made no call (its delivery was cancelled): the next caller
    /// probes instead.
    pub fn abandon_probe(&mut self) {
        if let Inner::HalfOpen { cooldown, skipped, .. } = self.inner {
            self.inner =
                Inner::HalfOpen { probing: false, cooldown, skipped, suspect_probe: false };
        }
    }

    /// Records the answer to a call about `caller`. For a Stripe-wide failure, says how
    /// widespread it is.
    pub fn record(&mut self, now: Instant, signal: Signal, probe: bool, caller: Caller) -> Spread {
        if probe {
            return self.record_probe(now, signal);
        }
        if self.inner != Inner::Closed {
            // A call admitted before the breaker opened: the probe decides, not this.
            return Spread::Widespread;
        }
        self.expire(now);
        let failed = match signal {
            Signal::Throttled => {
                // Stripe's front door answered: no outage, though no evidence either way.
                self.end_run();
                return Spread::Isolated;
            }
            Signal::Answered => {
                self.end_run();
                false
            }
            Signal::Failed => true,
        };
        if failed {
            self.run_since.get_or_insert(now);
            self.run_calls += 1;
            self.run.insert(caller.payment.to_owned());
        }
        if !caller.suspect && self.seen.insert(caller.payment.to_owned()) {
            self.window.push_back(Entry { at: now, payment: caller.payment.to_owned(), failed });
            if self.window.len() > self.settings.window {
                self.pop();
            }
        }
        if !failed {
            return Spread::Isolated;
        }
        let (grade, open) = self.grade();
        if open || self.outage_run(now) {
            self.open(now, self.settings.cooldown);
            return Spread::Widespread;
        }
        if self.silent(now) {
            return Spread::Widespread;
        }
        grade
    }

    /// Stripe answered nothing over [`OUTAGE_RUN`] while `consecutive` payments failed: an
    /// outage, though too few calls went out (the pacer slows down as calls fail, and most
    /// may be retries) to tell it from a brownout by `min_calls` of them.
    fn silent(&self, now: Instant) -> bool {
        self.run.len() >= self.settings.consecutive
            && self
                .run_since
                .is_some_and(|since| now.saturating_duration_since(since) >= OUTAGE_RUN)
    }

    /// Stripe answered none of `min_calls` calls over [`OUTAGE_RUN`], `consecutive` payments
    /// failing among them.
    fn outage_run(&self, now: Instant) -> bool {
        self.run_calls >= self.settings.min_calls && self.silent(now)
    }

    fn end_run(&mut self) {
        self.run.clear();
        self.run_calls = 0;
        self.run_since = None;
    }

    /// What the window says: the grade of a Stripe-wide failure now, and whether the circuit
    /// should open (the newest `min_calls` payments failed at least `open_ratio` of the time,
    /// or `consecutive` payments failed and none was answered).
    fn grade(&self) -> (Spread, bool) {
        let calls = self.window.len();
        let failures = self.window.iter().filter(|e| e.failed).count();
        if failures >= self.settings.consecutive && failures == calls {
            return (Spread::Widespread, true);
        }
        if calls < self.settings.min_calls {
            return (Spread::Isolated, false);
        }
        let newest = self.window.iter().rev().take(self.settings.min_calls);
        let newest_failed = newest.filter(|e| e.failed).count() as f64;
        if newest_failed >= self.settings.open_ratio * self.settings.min_calls as f64 {
            (Spread::Widespread, true)
        } else if failures as f64 >= self.settings.failure_ratio * calls as f64 {
            (Spread::Widespread, false)
        } else {
            (Spread::Isolated, false)
        }
    }

    fn expire(&mut self, now: Instant) {
        while self.window.front().is_some_and(|e| now.saturating_duration_since(e.at) > HORIZON) {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some(entry) = self.window.pop_front() {
            self.seen.remove(&entry.payment);
        }
    }

    fn record_probe(&mut self, now: Instant, signal: Signal) -> Spread {
        let Inner::HalfOpen { cooldown, suspect_probe, .. } = self.inner else {
            return Spread::Widespread;
        };
        match signal {
            Signal::Failed => {
                // A suspect's failure may be its own: it re-opens, it does not lengthen.
                let next = if suspect_probe {
                    cooldown
                } else {
                    cooldown.saturating_mul(2).min(self.settings.max_cooldown)
                };
                self.open(now, next);
                Spread::Widespread
            }
            Signal::Answered | Signal::Throttled => {
                self.inner = Inner::Closed;
                self.window.clear();
                self.seen.clear();
                self.end_run();
                Spread::Isolated
            }
        }
    }

    fn open(&mut self, now: Instant, cooldown: Duration) {
        self.end_run();
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

    fn fresh(payment: &str) -> Caller<'_> {
        Caller { payment, suspect: false }
    }

    fn breaker() -> (Breaker, Instant) {
        (Breaker::new(BreakerSettings::default()), Instant::now())
    }

    /// Records `n` fresh payments' answers, failing where `fail(i)`; returns the spreads of
    /// the failures.
    fn feed(b: &mut Breaker, now: Instant, n: usize, fail: impl Fn(usize) -> bool) -> Vec<Spread> {
        (0..n)
            .filter_map(|i| {
                let signal = if fail(i) { Signal::Failed } else { Signal::Answered };
                let spread = b.record(now, signal, false, fresh(&payment()));
                fail(i).then_some(spread)
            })
            .collect()
    }

    #[test]
    fn five_payments_failing_with_none_answered_open_it() {
        let (mut b, t0) = breaker();
        let spreads = feed(&mut b, t0, 5, |_| true);
        assert_eq!(spreads[..4], [Spread::Isolated; 4], "too few to tell");
        assert_eq!(spreads[4], Spread::Widespread);
        assert_eq!(b.state(), State::Open { until: t0 + 5 * SECOND });
        assert_eq!(b.admit(t0 + SECOND, false), Admission::Refused { until: t0 + 5 * SECOND });
    }

    #[test]
    fn a_few_sick_payments_among_answered_ones_are_their_own_problem() {
        let (mut b, t0) = breaker();
        // 7 failing among 30, in the worst order: all of them last.
        let spreads = feed(&mut b, t0, 30, |i| i >= 23);
        assert!(spreads.iter().all(|s| *s == Spread::Isolated), "{spreads:?}");
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn one_payment_failing_again_and_again_is_evidence_once() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 20, |_| false);
        for _ in 0..100 {
            let poison = Caller { payment: "poison", suspect: false };
            assert_eq!(b.record(t0, Signal::Failed, false, poison), Spread::Isolated);
            let suspect = Caller { payment: "retried", suspect: true };
            assert_eq!(b.record(t0, Signal::Failed, false, suspect), Spread::Isolated);
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_brownout_is_widespread_and_keeps_the_circuit_closed() {
        let (mut b, t0) = breaker();
        let spreads = feed(&mut b, t0, 200, |i| i % 2 == 0);
        assert!(spreads[50..].iter().all(|s| *s == Spread::Widespread));
        assert_eq!(b.state(), State::Closed, "half the calls get through: no full stop");
    }

    #[test]
    fn nearly_nothing_getting_through_opens_it() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 50, |_| false);
        let spreads = feed(&mut b, t0, 19, |_| true);
        assert_eq!(b.state(), State::Closed, "19 of the newest 20 failed");
        assert_eq!(*spreads.last().unwrap(), Spread::Widespread);
        let spreads = feed(&mut b, t0, 1, |_| true);
        assert_eq!(b.state(), State::Open { until: t0 + 5 * SECOND }, "the newest 20 failed");
        assert_eq!(*spreads.last().unwrap(), Spread::Widespread);
    }

    #[test]
    fn an_outage_among_answered_payments_opens_it_after_two_seconds_without_an_answer() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 50, |_| false);
        // Four new payments a second, all failing, each called again a second later: the
        // window still holds the 50 answers.
        let quarter = Duration::from_millis(250);
        let mut failing = Vec::new();
        for i in 0..8u32 {
            let now = t0 + quarter * i;
            failing.push(payment());
            b.record(now, Signal::Failed, false, fresh(failing.last().unwrap()));
            if let Some(again) = failing.len().checked_sub(5).map(|k| &failing[k]) {
                b.record(now, Signal::Failed, false, fresh(again));
            }
            assert_eq!(b.state(), State::Closed, "{} ms without an answer", 250 * i);
        }
        // Twenty calls, none answered, but in under two seconds.
        for again in &failing {
            b.record(t0 + quarter * 7, Signal::Failed, false, fresh(again));
        }
        assert_eq!(b.state(), State::Closed, "under two seconds");
        let spread = b.record(t0 + quarter * 8, Signal::Failed, false, fresh(&payment()));
        assert_eq!(spread, Spread::Widespread);
        assert_eq!(b.state(), State::Open { until: t0 + 7 * SECOND });
    }

    #[test]
    fn an_outage_seen_mostly_through_retries_is_widespread_after_two_seconds() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 50, |_| false);
        // Two calls a second (the pacer has slowed down), most of them retries of payments
        // that spent an attempt: the window keeps its answers and the run its 20 calls away.
        let half = Duration::from_millis(500);
        let spreads: Vec<Spread> = (0..8u32)
            .map(|i| {
                let payment = payment();
                let caller = Caller { payment: &payment, suspect: i % 3 != 0 };
                b.record(t0 + half * i, Signal::Failed, false, caller)
            })
            .collect();
        assert_eq!(spreads[..4], [Spread::Isolated; 4], "under two seconds: {spreads:?}");
        assert_eq!(spreads[4..], [Spread::Widespread; 4], "two seconds, five payments");
        assert_eq!(b.state(), State::Closed, "eight calls: too few to open");
        // Flapping is no outage: an answer ends the run.
        b.record(t0 + half * 8, Signal::Answered, false, fresh(&payment()));
        let spread = b.record(t0 + half * 9, Signal::Failed, false, fresh(&payment()));
        assert_eq!(spread, Spread::Isolated);
    }

    #[test]
    fn a_429_ends_an_outage_run() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 50, |_| false);
        // Five deferred payments called again and again (the window keeps its answers).
        let five: Vec<String> = (0..5).map(|_| payment()).collect();
        let tenth = Duration::from_millis(100);
        let fail = |b: &mut Breaker, i: u32| {
            b.record(t0 + tenth * i, Signal::Failed, false, fresh(&five[i as usize % 5]));
        };
        for i in 1..=19 {
            fail(&mut b, i);
        }
        b.record(t0 + tenth * 20, Signal::Throttled, false, fresh(&payment()));
        for i in 21..=39 {
            fail(&mut b, i);
        }
        assert_eq!(b.state(), State::Closed, "19 failures on either side of a 429");
        fail(&mut b, 40);
        assert_eq!(b.state(), State::Closed, "20 since the 429, in 1.9 s");
        fail(&mut b, 41);
        assert!(matches!(b.state(), State::Open { .. }), "21 since the 429, over 2 s");
    }

    #[test]
    fn a_second_without_answers_or_one_payment_failing_for_long_is_no_outage() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 50, |_| false);
        let tenth = Duration::from_millis(100);
        let mut now = t0;
        for _ in 0..10 {
            // Flapping: ten payments fail for a second, then one is answered.
            for _ in 0..10 {
                now += tenth;
                b.record(now, Signal::Failed, false, fresh(&payment()));
            }
            b.record(now, Signal::Answered, false, fresh(&payment()));
        }
        assert_eq!(b.state(), State::Closed, "no two seconds without an answer");
        for _ in 0..100 {
            now += tenth;
            b.record(now, Signal::Failed, false, Caller { payment: "poison", suspect: false });
            b.record(now, Signal::Failed, false, Caller { payment: "retried", suspect: true });
        }
        assert_eq!(b.state(), State::Closed, "ten seconds of one payment failing");
    }

    #[test]
    fn old_answers_are_no_evidence() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 50, |_| false);
        let later = t0 + HORIZON + SECOND;
        let spreads = feed(&mut b, later, 5, |_| true);
        assert_eq!(spreads[4], Spread::Widespread, "the old answers expired");
        assert!(matches!(b.state(), State::Open { .. }));
    }

    #[test]
    fn rate_limits_neither_open_nor_heal_it() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 4, |_| true);
        for _ in 0..100 {
            b.record(t0, Signal::Throttled, false, fresh(&payment()));
        }
        assert_eq!(b.state(), State::Closed);
        feed(&mut b, t0, 1, |_| true);
        assert!(matches!(b.state(), State::Open { .. }), "the 429s were no evidence");
    }

    #[test]
    fn one_probe_per_cooldown_and_the_cooldown_doubles_up_to_the_cap() {
        let settings = BreakerSettings { max_cooldown: 60 * SECOND, ..Default::default() };
        let (mut b, t0) = (Breaker::new(settings), Instant::now());
        feed(&mut b, t0, 5, |_| true);
        let mut now = t0;
        for expected in [5, 10, 20, 40, 60, 60] {
            let State::Open { until } = b.state() else { panic!("open") };
            assert_eq!(until - now, expected * SECOND);
            let early = until - Duration::from_millis(1);
            assert!(matches!(b.admit(early, false), Admission::Refused { .. }));
            now = until;
            assert_eq!(b.admit(now, false), Admission::Probe);
            assert_eq!(b.state(), State::HalfOpen);
            assert_eq!(b.admit(now, false), Admission::Wait, "only one probe");
            b.record(now, Signal::Failed, true, fresh(&payment()));
        }
        let State::Open { until } = b.state() else { panic!("open") };
        assert_eq!(b.admit(until, false), Admission::Probe);
        b.record(until, Signal::Answered, true, fresh(&payment()));
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(until, false), Admission::Call);
        // Closed again with an empty window and the first cool-down.
        feed(&mut b, until, 5, |_| true);
        assert_eq!(b.state(), State::Open { until: until + 5 * SECOND });
    }

    #[test]
    fn suspects_are_passed_over_for_the_probe_and_their_failure_does_not_lengthen_it() {
        let settings = BreakerSettings { max_cooldown: 60 * SECOND, ..Default::default() };
        let (mut b, t0) = (Breaker::new(settings), Instant::now());
        feed(&mut b, t0, 5, |_| true);
        let now = t0 + 5 * SECOND;
        for _ in 0..MAX_PROBE_SKIPS {
            assert_eq!(b.admit(now, true), Admission::Refused { until: now });
        }
        assert_eq!(b.admit(now, true), Admission::Probe, "only suspects wait: one is taken");
        b.record(now, Signal::Failed, true, Caller { payment: "sick", suspect: true });
        assert_eq!(b.state(), State::Open { until: now + 5 * SECOND }, "not doubled");
        // A fresh payment probes at once.
        let now = now + 5 * SECOND;
        assert_eq!(b.admit(now, false), Admission::Probe);
        b.record(now, Signal::Failed, true, fresh("fresh"));
        assert_eq!(b.state(), State::Open { until: now + 10 * SECOND }, "doubled");
    }

    #[test]
    fn a_throttled_probe_closes_it() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 5, |_| true);
        assert_eq!(b.admit(t0 + 5 * SECOND, false), Admission::Probe);
        b.record(t0 + 5 * SECOND, Signal::Throttled, true, fresh(&payment()));
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn late_answers_change_nothing_and_an_abandoned_probe_is_handed_on() {
        let (mut b, t0) = breaker();
        feed(&mut b, t0, 5, |_| true);
        let open = b.state();
        assert_eq!(b.record(t0, Signal::Answered, false, fresh(&payment())), Spread::Widespread);
        assert_eq!(b.record(t0, Signal::Failed, false, fresh(&payment())), Spread::Widespread);
        assert_eq!(b.state(), open, "a late answer neither closes nor extends it");
        let later = t0 + 5 * SECOND;
        assert_eq!(b.admit(later, false), Admission::Probe);
        b.abandon_probe();
        assert_eq!(b.admit(later, false), Admission::Probe, "the next caller probes");
        b.record(later, Signal::Answered, false, fresh(&payment()));
        assert_eq!(b.state(), State::HalfOpen, "only the probe's answer closes it");
    }
}
