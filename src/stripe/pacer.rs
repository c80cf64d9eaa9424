//! How fast to call Stripe, one per replica: a per-second limit like Stripe's own, adapted to
//! its 429s (AIMD), and throttled in proportion to what Stripe accepts when it fails.
//!
//! Stripe counts requests per second (25 Checkout Session requests a second, in test and live
//! mode), so the pacer does too: a call may go out when fewer than `rate` calls went out in
//! the last second (for a fractional rate, `⌈rate⌉` calls in `⌈rate⌉ / rate` seconds). A cold
//! worker therefore sends a burst of up to `initial` calls at once, Stripe's documented limit,
//! and is paced only once that is spent.
//!
//! * **Increase**, only while the rate is the bottleneck (a call had to wait because the
//!   second was full, not for a throttle or a `Retry-After`, or took its last slot): by `increase` requests per
//!   second for each second of such calls; below half the rate before the last cut (after
//!   a 429 storm cut it to the floor), by one request per call: the rate doubles each second,
//!   as TCP's slow start does. A slow Stripe never fills the second (calls are
//!   bounded by the deliveries in flight), so the rate does not grow past what is sent.
//! * **Decrease** on a 429 while calls went out at the rate: to what passed Stripe's limiter
//!   in the last second (every answer but the 429s), and at least by the factor `decrease`,
//!   at most once a second (a 429 for a call sent less than a second after the last cut still
//!   reflects the old rate). A 429 while sending below the rate (a brownout's, another
//!   client's) cuts nothing: the payment is deferred all the same. Two replicas sharing one account each find
//!   their share at the first cut.
//! * **Throttle** (client-side adaptive throttling, Google SRE book, "Handling Overload"):
//!   where the book rejects a request locally with probability
//!   `max(0, (calls − k × accepted) / (calls + 1))` over a sliding window, here (the last
//!   [`HORIZON`]) the rate is multiplied by one minus that share: the caller waits for a
//!   slot instead of being turned away, since its delivery can wait unacked. In a brownout
//!   where half the calls fail, `k = 2` holds nothing back; at 70 % failing it lets 60 % of
//!   the rate through; when nothing gets through, the calls fall to `min` a second until the
//!   breaker opens. One failure with no answer yet halves the rate, not more. 429s count on
//!   neither side: they are the limit's business.
//! * `Retry-After` on a 429 or 503 holds every call back until it has passed (at most 60 s).
//!   It is about the rate, not one payment: the payment that armed the last hold cannot arm
//!   the next one, so one payment answered `Retry-After` again and again cannot hold up all
//!   the others; another payment's, or a success in between, can.
//!
//! * **Shares** (`STRIPE_ACCOUNT_RPS`): with the account's limit set, the rate never goes
//!   above an equal part of it for each replica counted ([`Pacer::set_replicas`]), in whole
//!   calls a second (12 each for two replicas on 25: a part of 12.5 would send 13 in some
//!   seconds, and two such seconds meeting make 26). When the parts leave no call of the
//!   limit spare (one replica on 25), a window lasts 20 ms longer than its second, since Stripe
//!   counts a call when it arrives; a spare call absorbs that instead. With other replicas
//!   counted, calls go out evenly, `1 / rate` apart: bursts of a whole part each second would
//!   meet in one of Stripe's seconds when one arrives late. The spacing keeps its beat: a
//!   caller woken a millisecond late does not push the calls after it back, which would
//!   lose a call every few seconds (the window still holds the part). A replica joining others waits
//!   before its first call until they have counted it. A 429 at the part with no cut in the
//!   10 s before it is arrival jitter: the rate doubles straight back to the part.
//!
//! A pure state machine like [`crate::stripe::breaker`]: methods take the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use crate::stripe::breaker::HORIZON;

/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long after a cut a 429 still reflects the rate before the cut; also how far back
/// "what Stripe accepted" looks.
const ROUND: Duration = Duration::from_secs(1);

/// How much longer than its second a window of calls lasts when the replicas' parts of the
/// account's limit add up to all of it, which keeps their rates right at it. Stripe counts a
/// call when it arrives, a little after it was sent: a window closing exactly a second after
/// the sends would let the next second's first calls arrive while Stripe still counts the
/// last ones, and a whole burst would be answered 429 at the boundary. (Adapting from 429s
/// alone, the rate settles below the limit after the first cut.)
const ARRIVAL_MARGIN: Duration = Duration::from_millis(20);

/// A 429 at the share with no cut for this long before it is taken for arrival jitter.
const QUIET: Duration = Duration::from_secs(10);

/// Where the rate starts and how it moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacerSettings {
    /// Requests per second until the first 429: the burst a cold worker may send at once.
    pub initial: f64,
    /// The rate never goes below this.
    pub min: f64,
    /// The rate never goes above this (an operator's share of the account's limit).
    pub max: Option<f64>,
    /// The account's limit, shared by every replica: the rate never goes above it divided by
    /// the replicas calling ([`Pacer::set_replicas`]).
    pub account: Option<f64>,
    /// Requests per second added for each second the rate is the bottleneck.
    pub increase: f64,
    /// The most a 429 leaves of the rate, in (0, 1).
    pub decrease: f64,
    /// Calls allowed per call Stripe accepts before the throttle holds calls back, ≥ 1.
    pub k: f64,
}

impl Default for PacerSettings {
    fn default() -> Self {
        Self {
            initial: 25.0,
            min: 1.0,
            max: None,
            account: None,
            increase: 2.0,
            decrease: 0.9,
            k: 2.0,
        }
    }
}

/// A slot taken: when the call went out, and whether the rate (not a throttle or a hold) was
/// the bottleneck for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub at: Instant,
    pub paced: bool,
}

/// The answer to "may this call go out now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Yes: the slot is taken.
    Go(Slot),
    /// No: ask again at `at`. `paced`: the rate (not a throttle or a hold) is the reason.
    Later { at: Instant, paced: bool },
}

/// The pacer. See the module documentation.
#[derive(Debug)]
pub struct Pacer {
    settings: PacerSettings,
    /// Requests per second now, as adapted to 429s.
    rate: f64,
    /// Below this rate, growth doubles the rate each second (TCP's slow-start threshold):
    /// half the rate before the last cut.
    threshold: f64,
    /// When the last slots go out, oldest first (the last `2 × ⌈rate⌉`).
    slots: VecDeque<Instant>,
    /// No slot before this (`Retry-After`).
    not_before: Instant,
    /// When the rate was last cut, and the payment whose 429 cut it.
    last_cut: Option<(Instant, String)>,
    /// The payment whose `Retry-After` set the last hold, until an answer comes in between.
    held_by: Option<String>,
    /// Answers of the last [`ROUND`] by send time, `true` for a 429.
    recent: VecDeque<(Instant, bool)>,
    /// When a call last found the rate the bottleneck (it waited for it, or filled the
    /// window).
    last_paced: Option<Instant>,
    /// Answers of the last [`HORIZON`] that say something about Stripe's health, `true` when
    /// Stripe accepted the call.
    health: VecDeque<(Instant, bool)>,
    /// This replica's share of the account's limit, once the replicas are known.
    share: Option<f64>,
    /// How much longer than its second a window lasts: [`ARRIVAL_MARGIN`] when the shares
    /// add up to the account's whole limit, else nothing.
    margin: Duration,
    /// Joining other replicas: how long the first call waits, from when it asks.
    join: Option<Duration>,
    /// Other replicas share the account's limit: calls go out evenly, `1 / rate` apart.
    spread: bool,
    /// When the last slot was due on that even spacing: the next is due `1 / rate` after it,
    /// so a caller woken a little late does not push every later call back.
    due: Option<Instant>,
}

impl Pacer {
    pub fn new(settings: PacerSettings, now: Instant) -> Self {
        let share = settings.account;
        let rate = clamp(settings.initial, &settings, share);
        Self {
            settings,
            rate,
            threshold: 0.0,
            slots: VecDeque::new(),
            not_before: now,
            last_cut: None,
            held_by: None,
            recent: VecDeque::new(),
            last_paced: None,
            health: VecDeque::new(),
            share,
            margin: if share.is_some() { ARRIVAL_MARGIN } else { Duration::ZERO },
            join: None,
            spread: false,
            due: None,
        }
    }

    /// How many replicas call Stripe on the account (at least this one): with the account's
    /// limit set, each takes an equal share of it in whole calls a second (a fraction only
    /// when the replicas outnumber the limit), and this rate falls to its share at once.
    /// `join`: this replica is joining others that already call, so its first call waits
    /// that long from when it asks, until they have counted it and made room (otherwise its
    /// first calls meet a window they still fill at their old shares). Alone, it waits for
    /// nothing.
    pub fn set_replicas(&mut self, replicas: u32, join: Option<Duration>) {
        let Some(account) = self.settings.account else { return };
        if replicas <= 1 {
            self.join = None;
        } else if join.is_some() {
            self.join = join;
        }
        let replicas = f64::from(replicas.max(1));
        let part = account / replicas;
        let share = if part >= 1.0 { part.floor() } else { part };
        let spare = account - share * replicas >= 1.0;
        self.share = Some(share);
        self.spread = replicas > 1.0;
        self.margin = if spare { Duration::ZERO } else { ARRIVAL_MARGIN };
        self.rate = self.clamp(self.rate);
    }

    fn clamp(&self, rate: f64) -> f64 {
        clamp(rate, &self.settings, self.share)
    }

    /// Requests per second now, as adapted to 429s.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The rate calls may go out at now: the adapted rate, less the share adaptive
    /// throttling would reject, `max(0, (calls − k × accepted) / (calls + 1))` over the last
    /// [`HORIZON`], and never below `min`.
    pub fn allowed(&mut self, now: Instant) -> f64 {
        while self
            .health
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > HORIZON)
        {
            self.health.pop_front();
        }
        let calls = self.health.len() as f64;
        let accepted = self.health.iter().filter(|(_, ok)| *ok).count() as f64;
        let reject = ((calls - self.settings.k * accepted) / (calls + 1.0)).max(0.0);
        self.clamp(self.rate * (1.0 - reject)).min(self.rate)
    }

    /// Takes a slot now if one is free; else says when to ask again. Nothing is booked
    /// ahead: a caller told to wait asks again, at the rate of that moment, so calls held at
    /// a low rate go as soon as the rate grows. `waited`: how the caller waited so far (`None`:
    /// it did not; `Some(paced)`: it was told [`Turn::Later`], for the rate if `paced`).
    pub fn take(&mut self, now: Instant, waited: Option<bool>) -> Turn {
        if let Some(join) = self.join.take() {
            self.not_before = self.not_before.max(now + join);
        }
        let allowed = self.allowed(now);
        let per_window = allowed.ceil().max(1.0);
        let window = Duration::from_secs_f64(per_window / allowed) + self.margin;
        let n = per_window as usize;
        let full = (self.slots.len() >= n).then(|| self.slots[self.slots.len() - n] + window);
        let gap = window / n as u32;
        let spaced = self.due.filter(|_| self.spread).map(|due| due + gap);
        let rated = full.max(spaced);
        let free = rated.unwrap_or(now).max(self.not_before);
        if free > now {
            let paced = rated.is_some_and(|f| f >= self.not_before) && allowed >= self.rate;
            return Turn::Later { at: free, paced };
        }
        self.slots.push_back(now);
        // Less than a gap late (a late wake-up, a window that freed a little later), the
        // spacing keeps its beat; later than that (no call was waiting), it starts from now.
        self.due = Some(spaced.filter(|due| now < *due + gap).unwrap_or(now));
        // Twice what the window needs: a rate that grew (at most doubled) still finds its
        // last second's slots.
        while self.slots.len() > 2 * n {
            self.slots.pop_front();
        }
        // This call filled the window: demand reached the rate, whoever asked first.
        let filled = self.slots.len() >= n && self.slots[self.slots.len() - n] + window > now;
        let paced = waited == Some(true) || filled;
        if paced {
            self.last_paced = Some(now);
        }
        Turn::Go(Slot { at: now, paced })
    }

    /// Stripe answered a call (not a 429, not a failure of Stripe's). Grows the rate if the
    /// rate was what the call waited for.
    pub fn on_answer(&mut self, now: Instant, slot: Slot) {
        self.held_by = None;
        self.note(now, slot.at, false);
        self.health.push_back((now, true));
        if slot.paced {
            let step =
                if self.rate < self.threshold { 1.0 } else { self.settings.increase / self.rate };
            self.rate = self.clamp(self.rate + step);
        }
    }

    /// Stripe failed a call (sent at `sent`) as a whole: the throttle counts it, and it
    /// passed the rate limiter.
    pub fn on_failure(&mut self, now: Instant, sent: Instant) {
        self.note(now, sent, false);
        self.health.push_back((now, false));
    }

    /// A 429 for a call about `payment` sent at `sent`. Returns whether the rate was cut.
    /// It says something about this replica's rate only if calls were going out at that rate
    /// within a second of it (a 429 while sending below the rate is someone else's, or a
    /// brownout's). The payment whose 429 made the last cut cannot make the next: one payment
    /// answered 429 again and again (contention on one object, `lock_timeout`) says nothing
    /// new about the account's rate.
    pub fn on_rate_limited(&mut self, now: Instant, sent: Instant, payment: &str) -> bool {
        self.note(now, sent, true);
        let at_the_rate = self.last_paced.is_some_and(|paced| paced + ROUND >= sent);
        if !at_the_rate {
            return false;
        }
        if let Some((cut, by)) = &self.last_cut
            && (sent < *cut + ROUND || by == payment)
        {
            return false;
        }
        let accepted = self.recent.iter().filter(|(_, limited)| !limited).count() as f64;
        let cut = (self.rate * self.settings.decrease).min(accepted / ROUND.as_secs_f64());
        // At its share of the account's limit, a rare 429 is arrival jitter, not too many
        // calls: the rate doubles straight back to the share. 429s that keep coming (another
        // client on the account) are met as usual.
        let rare = self.last_cut.as_ref().is_none_or(|(cut, _)| now >= *cut + QUIET);
        let at_share = self.share.is_some_and(|share| self.rate >= share);
        self.threshold = if rare && at_share { self.rate } else { self.rate / 2.0 };
        self.rate = self.clamp(cut);
        self.last_cut = Some((now, payment.to_owned()));
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
        self.not_before = self.not_before.max(now + retry_after.min(MAX_RETRY_AFTER));
        true
    }

    /// Remembers an answer to a call sent at `sent` for the last round's count.
    fn note(&mut self, now: Instant, sent: Instant, limited: bool) {
        self.recent.push_back((sent, limited));
        let since = now.checked_sub(ROUND).unwrap_or(now);
        self.recent.retain(|(at, _)| *at >= since);
    }
}

/// `rate` within the floor, the ceiling and this replica's `share` of the account's limit
/// (the ceilings win over the floor).
fn clamp(rate: f64, settings: &PacerSettings, share: Option<f64>) -> f64 {
    let rate = rate.max(settings.min);
    let rate = settings.max.map_or(rate, |max| rate.min(max));
    share.map_or(rate, |share| rate.min(share))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A caller that asks at `now` and again whenever it is told to: the slot it gets.
    fn next(p: &mut Pacer, now: Instant) -> Slot {
        let (mut at, mut waited) = (now, None);
        loop {
            match p.take(at, waited) {
                Turn::Go(slot) => return slot,
                Turn::Later { at: later, paced } => {
                    at = later;
                    waited = Some(waited.unwrap_or(false) || paced);
                }
            }
        }
    }

    #[test]
    fn a_cold_burst_goes_at_once_then_one_second_holds_at_most_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings::default(), t0);
        let slots: Vec<Slot> = (0..30).map(|_| next(&mut p, t0)).collect();
        assert!(slots[..25].iter().all(|s| s.at == t0), "25 at once");
        assert!(slots[25..].iter().all(|s| s.at == t0 + ms(1000) && s.paced), "then a second");
        // After an idle second the next burst goes at once.
        let later = t0 + ms(3000);
        assert_eq!(next(&mut p, later).at, later);
    }

    #[test]
    fn a_fractional_rate_spreads_its_calls() {
        let t0 = Instant::now();
        let settings = PacerSettings { initial: 1.5, ..Default::default() };
        let mut p = Pacer::new(settings, t0);
        let at: Vec<Duration> = (0..6).map(|_| next(&mut p, t0).at - t0).collect();
        // 2 calls per 1.333 s.
        assert_eq!(at[0..2], [ms(0), ms(0)]);
        assert!(at[2].abs_diff(ms(1333)) < ms(2) && at[4].abs_diff(ms(2667)) < ms(2), "{at:?}");
    }

    #[test]
    fn grows_only_while_the_rate_is_the_bottleneck() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings { initial: 10.0, ..Default::default() }, t0);
        // Eight calls a second (a slow Stripe bounds what is sent) never fill a second of
        // ten: no growth, however many there are.
        for i in 0..100 {
            let now = t0 + ms(i * 125);
            let slot = next(&mut p, now);
            assert!(!slot.paced);
            p.on_answer(now, slot);
        }
        assert_eq!(p.rate(), 10.0);
        // A second of calls that waited for the rate adds `increase`.
        let now = t0 + ms(20_000);
        let slots: Vec<Slot> = (0..20).map(|_| next(&mut p, now)).collect();
        for slot in slots.iter().filter(|s| s.paced) {
            p.on_answer(now, *slot);
        }
        assert!((p.rate() - 12.0).abs() < 0.3, "{}", p.rate());
    }

    #[test]
    fn a_429_cuts_to_what_stripe_accepted_once_per_round_and_only_at_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings::default(), t0);
        // Below the rate, a 429 is not this replica's rate (a brownout's, another client's).
        let slot = next(&mut p, t0);
        p.on_answer(t0, slot);
        assert!(!p.on_rate_limited(t0 + ms(10), t0, "x"), "one call of 25: no cut");
        // 25 sent at once, 12 accepted, 13 answered 429 (another replica shares the account).
        let burst = t0 + ms(1500);
        let slots: Vec<Slot> = (0..25).map(|_| next(&mut p, burst)).collect();
        for (i, slot) in slots.iter().take(12).enumerate() {
            p.on_answer(burst + ms(50 + i as u64), *slot);
        }
        assert!(p.on_rate_limited(burst + ms(70), burst, "a"));
        assert_eq!(p.rate(), 12.0, "what Stripe accepted");
        let same_round = p.on_rate_limited(burst + ms(80), burst + ms(10), "b");
        assert!(!same_round, "the same round: no second cut");
        // A second later, at the new rate: a small overshoot is cut by the factor, but not
        // by the payment that made the last cut.
        let later = burst + ms(2000);
        let slots: Vec<Slot> = (0..12).map(|_| next(&mut p, later)).collect();
        for (i, slot) in slots.iter().enumerate() {
            p.on_answer(later + ms(i as u64), *slot);
        }
        assert!(!p.on_rate_limited(later + ms(20), later, "a"), "nor the same payment");
        let before = p.rate();
        assert!(before > 12.0, "the full second grew it: {before}");
        assert!(p.on_rate_limited(later + ms(20), later, "c"));
        assert!((p.rate() - before * 0.9).abs() < 1e-9, "{before} × 0.9: {}", p.rate());
    }

    #[test]
    fn after_a_storm_the_rate_doubles_back_to_half_of_what_it_was() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings::default(), t0);
        for _ in 0..25 {
            next(&mut p, t0);
        }
        assert!(p.on_rate_limited(t0, t0, "storm"), "nothing accepted: to the floor");
        assert_eq!(p.rate(), 1.0);
        // Sixteen deliveries in flight, each asking again when told to, answered at once.
        let mut asking: Vec<(Instant, Option<bool>)> = vec![(t0, None); 16];
        loop {
            let i = (0..asking.len()).min_by_key(|i| asking[*i].0).unwrap();
            let (at, waited) = asking[i];
            if at > t0 + ms(5000) {
                break;
            }
            asking[i] = match p.take(at, waited) {
                Turn::Go(slot) => {
                    p.on_answer(at, slot);
                    (at, None)
                }
                Turn::Later { at, paced } => (at, Some(waited.unwrap_or(false) || paced)),
            };
        }
        assert!(p.rate() >= 12.5, "back above half of 25 in 5 s: {}", p.rate());
        assert!(p.rate() < 16.0, "then additive: {}", p.rate());
    }

    #[test]
    fn the_throttle_follows_what_stripe_accepts() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings::default(), t0);
        p.on_failure(t0, t0);
        assert_eq!(p.allowed(t0), 12.5, "one failure, nothing accepted yet: half");
        // Half the calls failing: k = 2 holds nothing back.
        let mut p = Pacer::new(PacerSettings::default(), t0);
        for i in 0..100 {
            let now = t0 + ms(i * 50);
            if i % 2 == 0 {
                p.on_failure(now, now);
            } else {
                p.on_answer(now, Slot { at: now, paced: false });
            }
        }
        assert_eq!(p.allowed(t0 + ms(5000)), 25.0);
        // 70 % failing: (100 − 2 × 30) / 101 of the rate is held back.
        let mut p = Pacer::new(PacerSettings::default(), t0);
        for i in 0..100 {
            let now = t0 + ms(i * 50);
            if i % 10 < 7 {
                p.on_failure(now, now);
            } else {
                p.on_answer(now, Slot { at: now, paced: false });
            }
        }
        let allowed = p.allowed(t0 + ms(5000));
        assert!((allowed - 25.0 * (1.0 - 40.0 / 101.0)).abs() < 1e-9, "{allowed}");
        // Then nothing gets through: the floor, once the last answers are forgotten.
        for i in 0..500 {
            p.on_failure(t0 + ms(5000 + i * 10), t0 + ms(5000 + i * 10));
        }
        assert!(p.allowed(t0 + ms(10_000)) < 3.0);
        assert_eq!(p.allowed(t0 + ms(15_500)), 1.0);
        assert_eq!(p.allowed(t0 + ms(30_000)), 25.0, "forgotten after the horizon");
    }

    /// `calls` asking at the start of each of `seconds` after `t0`, each answered.
    fn answer_each_second(p: &mut Pacer, t0: Instant, seconds: std::ops::Range<u64>, calls: usize) {
        for second in seconds {
            for _ in 0..calls {
                let slot = next(p, t0 + ms(second * 1000));
                p.on_answer(slot.at, slot);
            }
        }
    }

    #[test]
    fn replicas_share_the_accounts_limit() {
        let t0 = Instant::now();
        let settings = PacerSettings { account: Some(25.0), ..Default::default() };
        let mut p = Pacer::new(settings, t0);
        assert_eq!(p.rate(), 25.0, "alone until the replicas are counted");
        let burst: Vec<Slot> = (0..26).map(|_| next(&mut p, t0)).collect();
        assert_eq!(burst[25].at, t0 + ms(1000) + ARRIVAL_MARGIN, "a window a little over 1 s");
        p.set_replicas(2, None);
        assert_eq!(p.rate(), 12.0, "halved at once, in whole calls");
        // A full second of calls that waited for the rate grows nothing past the share.
        answer_each_second(&mut p, t0, 0..5, 20);
        assert_eq!(p.rate(), 12.0);
        // One call of the limit is spare: windows of exactly a second.
        let t1 = t0 + ms(10_000);
        let window: Vec<Slot> = (0..13).map(|_| next(&mut p, t1)).collect();
        assert_eq!(window[12].at, t1 + ms(1000), "12 a second, the spare call absorbs arrival");
        let gap = window[1].at - window[0].at;
        assert!(gap.abs_diff(ms(83)) < ms(1), "with others, calls go out evenly: {gap:?}");
        p.set_replicas(3, None);
        assert_eq!(p.rate(), 8.0);
        p.set_replicas(5, None);
        assert_eq!(p.rate(), 5.0);
        let t2 = t0 + ms(20_000);
        let window: Vec<Slot> = (0..6).map(|_| next(&mut p, t2)).collect();
        assert_eq!(window[5].at, t2 + ms(1000) + ARRIVAL_MARGIN, "no call spare: the margin");
        p.set_replicas(50, None);
        assert_eq!(p.rate(), 0.5, "more replicas than calls: a part of a call");
        // A replica gone: the share grows back, and the rate grows into it.
        p.set_replicas(1, None);
        answer_each_second(&mut p, t0, 30..60, 40);
        assert_eq!(p.rate(), 25.0);
        p.set_replicas(0, None);
        assert_eq!(p.rate(), 25.0, "no consumer counted: this one alone");
        // Joining others: the first call waits, from when it asks; alone, nothing waits.
        let t3 = t0 + ms(90_000);
        p.set_replicas(1, Some(ms(1500)));
        assert_eq!(next(&mut p, t3).at, t3);
        p.set_replicas(2, Some(ms(1500)));
        p.set_replicas(2, None);
        let t4 = t3 + ms(5000);
        assert_eq!(next(&mut p, t4).at, t4 + ms(1500), "joining waits to be counted");
        assert!(next(&mut p, t4 + ms(1500)).at < t4 + ms(1600), "once");
        p.set_replicas(2, Some(ms(1500)));
        p.set_replicas(1, None);
        assert_eq!(next(&mut p, t4 + ms(9000)).at, t4 + ms(9000), "the others gone: no wait");
        // Without the account's limit, the count changes nothing.
        let mut alone = Pacer::new(PacerSettings::default(), t0);
        alone.set_replicas(4, None);
        assert_eq!(alone.rate(), 25.0);
    }

    #[test]
    fn late_wake_ups_do_not_slow_a_shared_rate() {
        let t0 = Instant::now();
        let settings = PacerSettings { account: Some(25.0), ..Default::default() };
        let mut p = Pacer::new(settings, t0);
        p.set_replicas(2, None);
        // Callers that wake 1.5 ms after the time they were told, as a timer does.
        let mut sent = Vec::new();
        let (mut at, mut waited) = (t0, None);
        while at < t0 + ms(30_000) {
            match p.take(at, waited) {
                Turn::Go(slot) => {
                    sent.push(slot.at);
                    p.on_answer(slot.at, slot);
                    waited = None;
                }
                Turn::Later { at: later, paced } => {
                    at = later + Duration::from_micros(1500);
                    waited = Some(waited.unwrap_or(false) || paced);
                }
            }
        }
        // 12 a second all the way (a drift of 1.5 ms a call would have made it 11.8), and
        // never 13 in a second.
        assert!(sent.len() >= 359, "{} calls in 30 s", sent.len());
        assert!(sent.windows(13).all(|w| w[12] - w[0] >= ms(1000)), "13 within a second");
    }

    #[test]
    fn at_its_share_a_rare_429_is_jitter_and_the_rate_doubles_back() {
        let t0 = Instant::now();
        let settings = PacerSettings { account: Some(25.0), ..Default::default() };
        let mut p = Pacer::new(settings, t0);
        p.set_replicas(2, None);
        answer_each_second(&mut p, t0, 0..3, 12);
        // A 429 at the share, then two calls that waited for the rate: how much it grew.
        let cut_and_grow = |p: &mut Pacer, second: u64, payment: &str| {
            let at = t0 + ms(second * 1000);
            let slot = next(p, at);
            assert!(p.on_rate_limited(at + ms(30), slot.at, payment));
            let cut = p.rate();
            assert!(cut < 12.0, "{cut}");
            for _ in 0..2 {
                let slot = next(p, at + ms(40));
                assert!(slot.paced);
                p.on_answer(slot.at, slot);
            }
            p.rate() - cut
        };
        cut_and_grow(&mut p, 3, "a");
        assert_eq!(p.rate(), 12.0, "one a call: doubling straight back to the share");
        answer_each_second(&mut p, t0, 4..6, 12);
        // Another within 10 s is not jitter: the rate grows back as after any cut.
        let grown = cut_and_grow(&mut p, 6, "b");
        assert!(grown < 1.0, "by the increase: {grown}");
    }

    #[test]
    fn bounds_and_retry_after_hold() {
        let t0 = Instant::now();
        let settings =
            PacerSettings { initial: 50.0, min: 2.0, max: Some(8.0), ..Default::default() };
        let mut p = Pacer::new(settings, t0);
        assert_eq!(p.rate(), 8.0, "the ceiling caps the initial rate");
        for i in 0..20 {
            let now = t0 + ms(i * 1000);
            for _ in 0..8 {
                next(&mut p, now);
            }
            p.on_rate_limited(now, now, &format!("t-{i}"));
        }
        assert_eq!(p.rate(), 2.0, "never below the floor");
        let now = t0 + ms(30_000);
        assert!(p.hold_until(now, Duration::from_secs(3600), "t-1"));
        let slot = next(&mut p, now);
        assert_eq!(slot.at, now + MAX_RETRY_AFTER, "Retry-After is capped");
        assert!(!slot.paced, "a hold is not the rate");
    }

    #[test]
    fn one_payment_cannot_arm_the_hold_again_and_again() {
        let t0 = Instant::now();
        let mut p = Pacer::new(PacerSettings::default(), t0);
        let hold = Duration::from_secs(5);
        assert!(p.hold_until(t0, hold, "poison"));
        let later = t0 + ms(6_000);
        assert!(!p.hold_until(later, hold, "poison"), "the same payment again: no new hold");
        assert_eq!(next(&mut p, later).at, later, "the others go on");
        assert!(p.hold_until(later, hold, "other"), "another payment's Retry-After counts");
        p.on_answer(later, Slot { at: later, paced: false });
        assert!(
            p.hold_until(later + ms(6_000), hold, "poison"),
            "after an answer, it counts again"
        );
    }
}
