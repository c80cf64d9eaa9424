//! An adaptive request rate for Stripe, one per replica: AIMD over requests per second.
//!
//! Stripe limits a *rate* (25 Checkout Session requests a second in test mode, 100 requests a
//! second per live account) and answers fast, so bounding concurrency cannot keep a worker
//! under it: one call at a time at 20 ms is already 50 a second. Calls are therefore paced:
//! each gets a slot `1 / rate` after the previous one, without bursts.
//!
//! * **Increase**, only while the pacer is the bottleneck (a call had to wait for its slot):
//!   until the first 429 the rate grows by one request per second for every call (it doubles
//!   each second, like TCP's slow start), afterwards by `increase` requests per second each
//!   second.
//! * **Decrease** on a 429: the rate is multiplied by `decrease`, at most once a second
//!   (Stripe counts requests per second): a 429 for a call sent less than a second after the
//!   last cut still reflects the old rate.
//! * `Retry-After` on a 429 or 503 holds every slot back until it has passed (at most 60 s).
//!   It is about the rate, not one payment: the payment that armed the last hold cannot arm
//!   the next one, so one payment answered `Retry-After` again and again cannot hold up all
//!   the others; another payment's, or a success in between, can.
//!
//! A pure state machine like [`crate::breaker`]: methods take the time.

use std::time::{Duration, Instant};

/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long after a cut a 429 still reflects the rate before the cut.
const CUT_ROUND: Duration = Duration::from_secs(1);

/// Where the rate starts and how it moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacerSettings {
    /// Requests per second at start.
    pub initial: f64,
    /// The rate never goes below this.
    pub min: f64,
    /// The rate never goes above this (an operator's share of the account's limit).
    pub max: Option<f64>,
    /// Requests per second added each second of saturated calls, after the first 429.
    pub increase: f64,
    /// The factor a 429 multiplies the rate by, in (0, 1).
    pub decrease: f64,
}

impl Default for PacerSettings {
    fn default() -> Self {
        Self { initial: 10.0, min: 1.0, max: None, increase: 2.0, decrease: 0.7 }
    }
}

/// A reserved slot: when the call may go out, and whether it had to wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub at: Instant,
    pub waited: bool,
}

/// The pacer. See the module documentation.
#[derive(Debug)]
pub struct Pacer {
    settings: PacerSettings,
    /// Requests per second now.
    rate: f64,
    /// The earliest time the next slot can be handed out.
    next: Instant,
    /// No 429 seen yet: grow fast.
    slow_start: bool,
    /// When the rate was last cut.
    last_cut: Option<Instant>,
    /// The payment whose `Retry-After` set the last hold, until an answer comes in between.
    held_by: Option<String>,
}

impl Pacer {
    pub fn new(settings: PacerSettings, now: Instant) -> Self {
        let rate = clamp(settings.initial, &settings);
        Self { settings, rate, next: now, slow_start: true, last_cut: None, held_by: None }
    }

    /// Requests per second now.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Reserves the next slot.
    pub fn reserve(&mut self, now: Instant) -> Slot {
        let at = self.next.max(now);
        self.next = at + Duration::from_secs_f64(1.0 / self.rate);
        Slot { at, waited: at > now }
    }

    /// Stripe answered a call (not a 429, not a failure of Stripe's). Grows the rate if the
    /// call had waited for its slot.
    pub fn on_answer(&mut self, slot: Slot) {
        self.held_by = None;
        if !slot.waited {
            return;
        }
        let step = if self.slow_start { 1.0 } else { self.settings.increase / self.rate };
        self.rate = clamp(self.rate + step, &self.settings);
    }

    /// A 429 for a call sent at `sent`. Returns whether the rate was cut.
    pub fn on_rate_limited(&mut self, now: Instant, sent: Instant) -> bool {
        self.slow_start = false;
        if self.last_cut.is_some_and(|cut| sent < cut + CUT_ROUND) {
            return false;
        }
        self.rate = clamp(self.rate * self.settings.decrease, &self.settings);
        self.last_cut = Some(now);
        // Slots already handed out keep their time; the next ones follow the new rate.
        self.next = self.next.max(now + Duration::from_secs_f64(1.0 / self.rate));
        true
    }

    /// Stripe said, answering a call about `payment`, when to come back: no slot before then,
    /// unless this payment set the last hold (then it says nothing new about the rate).
    /// Returns whether the hold was taken.
    pub fn hold_until(&mut self, now: Instant, retry_after: Duration, payment: &str) -> bool {
        if self.held_by.as_deref() == Some(payment) {
            return false;
        }
        self.held_by = Some(payment.to_owned());
        self.next = self.next.max(now + retry_after.min(MAX_RETRY_AFTER));
        true
    }
}

fn clamp(rate: f64, settings: &PacerSettings) -> f64 {
    let rate = rate.max(settings.min);
    settings.max.map_or(rate, |max| rate.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn slots_are_spaced_by_the_rate_without_bursts() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings { initial: 10.0, ..Default::default() }, t0);
        let slots: Vec<Slot> = (0..3).map(|_| p.reserve(t0)).collect();
        assert_eq!(slots[0], Slot { at: t0, waited: false });
        assert_eq!(slots[1], Slot { at: t0 + ms(100), waited: true });
        assert_eq!(slots[2], Slot { at: t0 + ms(200), waited: true });
        // After an idle second the next call goes at once: no credit is saved up.
        let later = t0 + ms(1300);
        assert_eq!(p.reserve(later), Slot { at: later, waited: false });
        assert_eq!(p.reserve(later).at, later + ms(100));
    }

    #[test]
    fn grows_only_while_it_is_the_bottleneck() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings::default(), t0);
        p.on_answer(Slot { at: t0, waited: false });
        assert_eq!(p.rate(), 10.0);
        for _ in 0..10 {
            p.on_answer(Slot { at: t0, waited: true });
        }
        assert_eq!(p.rate(), 20.0, "slow start: +1 per saturated call doubles it per second");
    }

    #[test]
    fn a_429_cuts_once_per_round_then_growth_is_additive() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings { initial: 20.0, ..Default::default() }, t0);
        assert!(p.on_rate_limited(t0 + ms(10), t0));
        assert!((p.rate() - 14.0).abs() < 1e-9);
        assert!(!p.on_rate_limited(t0 + ms(20), t0 + ms(5)), "sent before the cut: ignored");
        assert!(!p.on_rate_limited(t0 + ms(600), t0 + ms(500)), "within a second: ignored");
        assert!(p.on_rate_limited(t0 + ms(1200), t0 + ms(1100)), "a second later: counts");
        assert!((p.rate() - 9.8).abs() < 1e-9);
        let before = p.rate();
        // One second of saturated calls adds `increase` (2) requests per second, roughly.
        let calls = before.round() as usize;
        for _ in 0..calls {
            p.on_answer(Slot { at: t0, waited: true });
        }
        assert!((p.rate() - (before + 2.0)).abs() < 0.3, "{} after {before}", p.rate());
    }

    #[test]
    fn bounds_and_retry_after_hold() {
        let t0 = Instant::now();
        let settings =
            PacerSettings { initial: 50.0, min: 2.0, max: Some(8.0), ..Default::default() };
        let mut p = Pacer::new(settings, t0);
        assert_eq!(p.rate(), 8.0, "the ceiling caps the initial rate");
        for i in 0..20 {
            p.on_rate_limited(t0 + ms(i * 1000), t0 + ms(i * 1000));
        }
        assert_eq!(p.rate(), 2.0, "never below the floor");
        let now = t0 + ms(30_000);
        assert!(p.hold_until(now, Duration::from_secs(3600), "t-1"));
        assert_eq!(p.reserve(now).at, now + MAX_RETRY_AFTER, "Retry-After is capped");
    }

    #[test]
    fn one_payment_cannot_arm_the_hold_again_and_again() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings { initial: 10.0, ..Default::default() }, t0);
        let hold = Duration::from_secs(5);
        assert!(p.hold_until(t0, hold, "poison"));
        let later = t0 + ms(6_000);
        assert!(!p.hold_until(later, hold, "poison"), "the same payment again: no new hold");
        assert_eq!(p.reserve(later).at, later, "the others go on");
        assert!(p.hold_until(later, hold, "other"), "another payment's Retry-After counts");
        p.on_answer(Slot { at: later, waited: false });
        assert!(
            p.hold_until(later + ms(6_000), hold, "poison"),
            "after an answer, it counts again"
        );
    }
}
