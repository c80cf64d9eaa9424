//! Flow control in front of Stripe: the evidence and circuit breaker
//! ([`crate::stripe::breaker`]) and the pacer ([`crate::stripe::pacer`]) of one replica, shared
//! by all its deliveries.
//!
//! The policy is [`Controller`], pure (it takes the time), so a simulation drives it with a
//! clock of its own (the tests below). [`FlowControl`] puts it behind a mutex for the worker:
//! a call asks for a [`Permit`]: the breaker must admit it (while half-open, callers other
//! than the probe wait for the probe's answer), then the pacer hands it a slot and the caller
//! sleeps until then. It still holds its delivery unacked meanwhile: flow control, not retry;
//! a crash redelivers it. The answer goes back through [`Permit::finish`].
//!
//! The breaker's state is published on a `watch` channel: the consumer loop cancels its
//! consumer while the circuit is open and fetches one message for the probe when the
//! cool-down has passed.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::stripe::breaker::{Admission, Breaker, BreakerSettings, Caller, Signal, Spread, State};
use crate::stripe::pacer::{Pacer, PacerSettings, Slot, Turn};

/// The breaker and the pacer, fed the same answers.
#[derive(Debug)]
pub struct Controller {
    breaker: Breaker,
    pacer: Pacer,
}

/// The breaker's answer to a call that asks to go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Admitted (`probe`: as the half-open probe); then ask [`Controller::turn`] for a slot.
    Go { probe: bool },
    /// A probe is out: ask again once the state changes.
    Wait,
    /// No call: the circuit is open (or half-open and this payment is no probe).
    Refused,
}

/// What a call that went out must hand back with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub probe: bool,
    pub slot: Slot,
}

impl Controller {
    pub fn new(breaker: BreakerSettings, pacer: PacerSettings, now: Instant) -> Self {
        Self { breaker: Breaker::new(breaker), pacer: Pacer::new(pacer, now) }
    }

    pub fn state(&self) -> State {
        self.breaker.state()
    }

    /// Requests per second, as adapted to 429s.
    pub fn rate(&self) -> f64 {
        self.pacer.rate()
    }

    /// Whether a call about a payment (`suspect`: it spent an attempt) may go out.
    pub fn admit(&mut self, now: Instant, suspect: bool) -> Gate {
        match self.breaker.admit(now, suspect) {
            Admission::Call => Gate::Go { probe: false },
            Admission::Probe => Gate::Go { probe: true },
            Admission::Wait => Gate::Wait,
            Admission::Refused { .. } => Gate::Refused,
        }
    }

    /// How many replicas share the account's limit: see [`Pacer::set_replicas`].
    pub fn set_replicas(&mut self, replicas: u32, join: Option<Duration>) {
        self.pacer.set_replicas(replicas, join);
    }

    /// A slot for an admitted call, now or later: see [`Pacer::take`].
    pub fn turn(&mut self, now: Instant, waited: Option<bool>) -> Turn {
        self.pacer.take(now, waited)
    }

    /// A probe admitted but not made.
    pub fn abandon(&mut self, probe: bool) {
        if probe {
            self.breaker.abandon_probe();
        }
    }

    /// Records the answer to a call: `signal`, and the `Retry-After` it carried (the client
    /// passes one only on a 429 or a 503). For a Stripe-wide failure,
    /// says how widespread it is.
    pub fn finish(
        &mut self,
        now: Instant,
        ticket: Ticket,
        signal: Signal,
        retry_after: Option<Duration>,
        caller: Caller,
    ) -> Spread {
        match signal {
            Signal::Throttled => {
                if self.pacer.on_rate_limited(now, ticket.slot.at, caller.payment) {
                    debug!(rate = self.pacer.rate(), "Stripe rate limit: slowing down");
                }
            }
            Signal::Answered => self.pacer.on_answer(now, ticket.slot),
            Signal::Failed => self.pacer.on_failure(now, ticket.slot.at),
        }
        if let Some(wait) = retry_after {
            self.pacer.hold_until(now, wait, caller.payment);
        }
        self.breaker.record(now, signal, ticket.probe, caller)
    }
}

/// The controller of one replica, shared by its deliveries.
pub struct FlowControl {
    controller: Mutex<Controller>,
    /// The breaker's state for the consumer loop and for callers waiting on a probe.
    circuit: watch::Sender<State>,
    metrics: Arc<Metrics>,
}

/// Leave to call Stripe once. Dropped without [`Permit::finish`] (the delivery was cancelled),
/// a probe is handed to the next caller.
pub struct Permit<'a> {
    flow: &'a FlowControl,
    probe: bool,
    /// The slot taken; `None` until then, and again once the answer is recorded.
    slot: Option<Slot>,
}

impl FlowControl {
    pub fn new(breaker: BreakerSettings, pacer: PacerSettings, metrics: Arc<Metrics>) -> Self {
        let controller = Controller::new(breaker, pacer, Instant::now());
        metrics.stripe_rate_limit.set(controller.rate());
        metrics.set_circuit_state(State::Closed.as_str());
        Self {
            controller: Mutex::new(controller),
            circuit: watch::Sender::new(State::Closed),
            metrics,
        }
    }

    /// How many replicas consume the work queue, for their shares of the account's limit
    /// (`STRIPE_ACCOUNT_RPS`); nothing changes without it. `join`: see
    /// [`Pacer::set_replicas`].
    pub fn set_replicas(&self, replicas: u32, join: Option<Duration>) {
        let mut controller = self.controller();
        controller.set_replicas(replicas, join);
        self.metrics.stripe_rate_limit.set(controller.rate());
    }

    /// The breaker's state, now and as it changes.
    pub fn circuit(&self) -> watch::Receiver<State> {
        self.circuit.subscribe()
    }

    /// Waits until a call about a payment (`suspect`: it spent an attempt) may go out.
    /// `None`: the circuit is open, no call may be made.
    pub async fn admit(&self, suspect: bool) -> Option<Permit<'_>> {
        let probe = loop {
            let mut changes = self.circuit.subscribe();
            let gate = self.controller().admit(Instant::now(), suspect);
            self.publish_state();
            match gate {
                Gate::Go { probe } => break probe,
                Gate::Refused => return None,
                Gate::Wait => {
                    // The probe's answer changes the state; a closed sender cannot happen
                    // while `self` is borrowed.
                    let _ = changes.changed().await;
                }
            }
        };
        // Dropped on the way (the circuit opened, the delivery was cancelled): a probe is
        // handed to the next caller.
        let mut permit = Permit { flow: self, probe, slot: None };
        let mut waited = None;
        loop {
            let turn = self.controller().turn(Instant::now(), waited);
            match turn {
                Turn::Go(slot) => {
                    permit.slot = Some(slot);
                    return Some(permit);
                }
                Turn::Later { at, paced } => {
                    waited = Some(waited.unwrap_or(false) || paced);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    // The circuit may have opened while this call waited for its slot.
                    if !probe && *self.circuit.borrow() != State::Closed {
                        return None;
                    }
                }
            }
        }
    }

    fn controller(&self) -> MutexGuard<'_, Controller> {
        self.controller.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the breaker's state if it changed (only then are the consumer loop and the
    /// waiting callers woken); logs and counts the transition.
    fn publish_state(&self) {
        let state = self.controller().state();
        let changed = self.circuit.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
        if !changed {
            return;
        }
        self.metrics.set_circuit_state(state.as_str());
        self.metrics.stripe_circuit_transitions.with_label_values(&[state.as_str()]).inc();
        match state {
            State::Open { until } => warn!(
                circuit = "open",
                retry_in_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                "Stripe is failing: circuit open, consumption paused; payments wait in the work queue"
            ),
            State::HalfOpen => info!(circuit = "half_open", "probing Stripe with one payment"),
            State::Closed => {
                info!(circuit = "closed", "Stripe answered: circuit closed, consuming again")
            }
        }
    }
}

impl Permit<'_> {
    /// Records Stripe's answer to a call about `caller` with the controller: what it says
    /// about Stripe (`signal`), and how long Stripe asked to wait. For a Stripe-wide failure,
    /// says how widespread it is.
    pub fn finish(
        mut self,
        signal: Signal,
        retry_after: Option<Duration>,
        caller: Caller,
    ) -> Spread {
        let Some(slot) = self.slot.take() else { return Spread::Widespread };
        let ticket = Ticket { probe: self.probe, slot };
        let spread = {
            let mut controller = self.flow.controller();
            let spread = controller.finish(Instant::now(), ticket, signal, retry_after, caller);
            self.flow.metrics.stripe_rate_limit.set(controller.rate());
            spread
        };
        self.probe = false;
        self.flow.publish_state();
        spread
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.flow.controller().abandon(true);
            // The state stays half-open; wake the callers waiting for the probe all the same.
            self.flow.circuit.send_modify(|_| ());
        }
    }
}

/// The controller driven by a simulated clock through scripted answer sequences, with the
/// worker's own decisions ([`crate::delivery::decision::decide`]) and retry schedule (1 s,
/// 2 s, 4 s): what each kind of trouble costs in calls, and which phases the circuit goes
/// through.
#[cfg(test)]
mod simulation {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::*;
    use crate::broker::topology::Delay;
    use crate::delivery::decision::{Action, Class, decide};

    /// How long Stripe takes to answer.
    const LATENCY: Duration = Duration::from_millis(50);
    /// How long a deferred copy takes to come round the work queue.
    const REQUEUE: Duration = Duration::from_millis(5);
    /// A caller waiting for the probe asks again this often.
    const RECHECK: Duration = Duration::from_millis(10);
    /// Deliveries in flight at once (`PREFETCH`'s default).
    const PREFETCH: usize = 16;

    #[derive(Clone, Copy, PartialEq)]
    enum Answer {
        Ok,
        Fail,
        Limited,
    }

    /// Who is failing: `answer(seconds since start, payment, its call number)`.
    struct Scenario {
        name: &'static str,
        /// Payments a second, for `seconds`.
        rate: u64,
        seconds: u64,
        /// Stripe is in trouble (for the calls counted "while down") in this span.
        trouble: (f64, f64),
        answer: fn(f64, usize, u32) -> Answer,
    }

    #[derive(Debug, Default)]
    struct Run {
        payments: usize,
        calls: usize,
        calls_in_trouble: usize,
        done: usize,
        /// Payments sent more than 10 s before the trouble ended, done before it ended.
        done_before_heal: usize,
        sent_before_heal: usize,
        parked: Vec<usize>,
        calls_of_parked: Vec<u32>,
        openings: usize,
        phases: Vec<&'static str>,
        /// Seconds from arrival to the session, for payments that arrived while healthy.
        healthy_latency: Vec<f64>,
    }

    /// A deterministic coin: `true` with probability `p` for this payment's call.
    fn coin(payment: usize, call: u32, p: f64) -> bool {
        let mut x = (payment as u64) << 32 | u64::from(call);
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        (x >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
    }

    enum Event {
        /// Into the work queue.
        Arrive(usize),
        /// Delivered.
        Handle(usize),
        /// Admitted (as the probe?), asking the pacer for a slot (how it waited so far).
        Turn(usize, bool, Option<bool>),
        Answer(usize, Ticket),
    }

    /// Events in time order, first scheduled first among equals.
    #[derive(Default)]
    struct Schedule {
        events: Vec<Option<Event>>,
        order: BinaryHeap<Reverse<(Duration, usize)>>,
    }

    impl Schedule {
        fn push(&mut self, at: Duration, event: Event) {
            self.events.push(Some(event));
            self.order.push(Reverse((at, self.events.len() - 1)));
        }

        fn pop(&mut self) -> Option<(Duration, Event)> {
            let Reverse((at, index)) = self.order.pop()?;
            Some((at, self.events[index].take().expect("each event once")))
        }
    }

    struct Payment {
        name: String,
        arrived: Duration,
        attempt: u32,
        calls: u32,
    }

    fn simulate(scenario: &Scenario) -> Run {
        let delays: Vec<Delay> =
            ["1s", "2s", "4s"].iter().map(|d| Delay::try_from((*d).to_owned()).unwrap()).collect();
        let base = Instant::now();
        let mut controller =
            Controller::new(BreakerSettings::default(), PacerSettings::default(), base);
        let mut payments = Vec::new();
        let mut queue = Schedule::default();
        let interval = Duration::from_secs(1) / scenario.rate as u32;
        for i in 0..(scenario.rate * scenario.seconds) as usize {
            let arrived = interval * i as u32;
            payments.push(Payment { name: format!("p{i}"), arrived, attempt: 1, calls: 0 });
            queue.push(arrived, Event::Arrive(i));
        }
        let mut run = Run { payments: payments.len(), phases: vec!["closed"], ..Run::default() };
        let (from, to) = scenario.trouble;
        let secs = |d: Duration| d.as_secs_f64();
        let note_phase = |run: &mut Run, state: State| {
            if *run.phases.last().unwrap() != state.as_str() {
                run.phases.push(state.as_str());
                if matches!(state, State::Open { .. }) {
                    run.openings += 1;
                }
            }
        };
        let (mut in_flight, mut work_queue) = (0, std::collections::VecDeque::new());
        while let Some((t, event)) = queue.pop() {
            assert!(t < Duration::from_secs(600), "{}: still running after 600 s", scenario.name);
            let now = base + t;
            match event {
                Event::Arrive(i) => work_queue.push_back(i),
                Event::Handle(i) => {
                    let suspect = payments[i].attempt > 1;
                    let gate = controller.admit(now, suspect);
                    note_phase(&mut run, controller.state());
                    match gate {
                        Gate::Go { probe } => queue.push(t, Event::Turn(i, probe, None)),
                        Gate::Wait => queue.push(t + RECHECK, Event::Handle(i)),
                        Gate::Refused => {
                            // Deferred; while the circuit is open nothing is consumed.
                            in_flight -= 1;
                            let at = match controller.state() {
                                State::Open { until } => until - base,
                                _ => t + REQUEUE,
                            };
                            queue.push(at, Event::Arrive(i));
                        }
                    }
                }
                Event::Turn(i, probe, waited) => match controller.turn(now, waited) {
                    Turn::Go(slot) => {
                        run.calls += 1;
                        if (from..to).contains(&secs(t)) {
                            run.calls_in_trouble += 1;
                        }
                        payments[i].calls += 1;
                        queue.push(t + LATENCY, Event::Answer(i, Ticket { probe, slot }));
                    }
                    Turn::Later { at, paced } => {
                        if !probe && controller.state() != State::Closed {
                            // The circuit opened while this call waited: deferred.
                            controller.abandon(probe);
                            in_flight -= 1;
                            queue.push(t + REQUEUE, Event::Arrive(i));
                        } else {
                            let waited = Some(waited.unwrap_or(false) || paced);
                            queue.push(at - base, Event::Turn(i, probe, waited));
                        }
                    }
                },
                Event::Answer(i, ticket) => {
                    let payment = &mut payments[i];
                    let sent = secs(ticket.slot.at - base);
                    let answer = (scenario.answer)(sent, i, payment.calls);
                    let signal = match answer {
                        Answer::Ok => Signal::Answered,
                        Answer::Fail => Signal::Failed,
                        Answer::Limited => Signal::Throttled,
                    };
                    let caller = Caller { payment: &payment.name, suspect: payment.attempt > 1 };
                    let spread = controller.finish(now, ticket, signal, None, caller);
                    note_phase(&mut run, controller.state());
                    let class = match answer {
                        Answer::Ok => None,
                        Answer::Fail => Some(Class::StripeWide(spread)),
                        Answer::Limited => Some(Class::RateLimited),
                    };
                    in_flight -= 1;
                    match decide(payment.attempt, class, &delays) {
                        Action::Ack => {
                            run.done += 1;
                            let arrived = secs(payment.arrived);
                            if arrived < to - 10.0 {
                                run.sent_before_heal += 1;
                                if secs(t) < to {
                                    run.done_before_heal += 1;
                                }
                            }
                            if !(from - 1.0..to + 1.0).contains(&arrived) {
                                run.healthy_latency.push(secs(t - payment.arrived));
                            }
                        }
                        Action::Retry(delay) => {
                            payment.attempt += 1;
                            let wait = Duration::from_millis(delay.millis());
                            queue.push(t + wait, Event::Arrive(i));
                        }
                        Action::Defer => queue.push(t + REQUEUE, Event::Arrive(i)),
                        Action::DeferFor(delay) => {
                            let wait = Duration::from_millis(delay.millis());
                            queue.push(t + wait, Event::Arrive(i));
                        }
                        Action::Park(_) => {
                            run.parked.push(i);
                            run.calls_of_parked.push(payment.calls);
                        }
                        other => panic!("{}: unexpected {other:?}", scenario.name),
                    }
                }
            }
            while in_flight < PREFETCH
                && let Some(i) = work_queue.pop_front()
            {
                in_flight += 1;
                queue.push(t, Event::Handle(i));
            }
        }
        run
    }

    fn p99(latencies: &[f64]) -> f64 {
        let mut sorted = latencies.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() * 99 / 100).copied().unwrap_or(0.0)
    }

    /// What a scenario must show.
    struct Expect {
        /// Stripe calls per payment, at most.
        calls_per_payment: f64,
        /// Calls that went out while Stripe was in trouble, at most.
        calls_in_trouble: usize,
        /// The payments parked (each after this many calls).
        parked: &'static [(usize, u32)],
        /// Payments sent more than 10 s before the trouble ended, done before it: at least.
        done_before_heal: f64,
        /// Times the circuit opened.
        openings: std::ops::RangeInclusive<usize>,
        /// The p99 seconds to a session of payments that arrived outside the trouble (after
        /// an outage, behind its backlog), at most.
        healthy_p99: f64,
    }

    fn in_trouble(t: f64) -> bool {
        (10.0..40.0).contains(&t)
    }

    #[test]
    fn every_kind_of_trouble_costs_what_the_table_says() {
        let none: &[(usize, u32)] = &[];
        let table: Vec<(Scenario, Expect)> = vec![
            (
                Scenario {
                    name: "outage",
                    rate: 10,
                    seconds: 50,
                    trouble: (10.0, 40.0),
                    answer: |t, _, _| if in_trouble(t) { Answer::Fail } else { Answer::Ok },
                },
                Expect {
                    calls_per_payment: 1.1,
                    calls_in_trouble: 40,
                    parked: none,
                    done_before_heal: 0.0,
                    openings: 5..=7,
                    healthy_p99: 12.0,
                },
            ),
            (
                Scenario {
                    name: "outage at 4/s",
                    rate: 4,
                    seconds: 40,
                    trouble: (5.0, 35.0),
                    answer: |t, _, _| {
                        if (5.0..35.0).contains(&t) { Answer::Fail } else { Answer::Ok }
                    },
                },
                Expect {
                    calls_per_payment: 1.2,
                    calls_in_trouble: 30,
                    parked: none,
                    done_before_heal: 0.0,
                    openings: 5..=7,
                    healthy_p99: 12.0,
                },
            ),
            (
                // A quarter of the payments fail their first call and a quarter of those
                // their second too (spending attempts: too few for a brownout), and Stripe
                // goes down just after the last payment arrived, while mostly retries are in
                // flight.
                Scenario {
                    name: "outage among retries",
                    rate: 10,
                    seconds: 20,
                    trouble: (20.0, 30.0),
                    answer: |t, p, c| {
                        if (20.0..30.0).contains(&t) || (c <= 2 && coin(p, c, 0.25)) {
                            Answer::Fail
                        } else {
                            Answer::Ok
                        }
                    },
                },
                Expect {
                    calls_per_payment: 1.5,
                    calls_in_trouble: 25,
                    parked: none,
                    done_before_heal: 0.95,
                    openings: 1..=3,
                    healthy_p99: 4.0,
                },
            ),
            (
                Scenario {
                    name: "brownout 30%",
                    rate: 10,
                    seconds: 50,
                    trouble: (10.0, 40.0),
                    answer: |t, p, c| {
                        if in_trouble(t) && coin(p, c, 0.3) { Answer::Fail } else { Answer::Ok }
                    },
                },
                Expect {
                    calls_per_payment: 1.35,
                    calls_in_trouble: 500,
                    parked: none,
                    done_before_heal: 0.99,
                    openings: 0..=0,
                    healthy_p99: 0.1,
                },
            ),
            (
                Scenario {
                    name: "brownout 50%",
                    rate: 10,
                    seconds: 50,
                    trouble: (10.0, 40.0),
                    answer: |t, p, c| {
                        if in_trouble(t) && coin(p, c, 0.5) { Answer::Fail } else { Answer::Ok }
                    },
                },
                Expect {
                    calls_per_payment: 1.7,
                    calls_in_trouble: 650,
                    parked: none,
                    done_before_heal: 0.99,
                    openings: 0..=0,
                    healthy_p99: 0.1,
                },
            ),
            (
                Scenario {
                    name: "brownout 70%",
                    rate: 10,
                    seconds: 50,
                    trouble: (10.0, 40.0),
                    answer: |t, p, c| {
                        if in_trouble(t) && coin(p, c, 0.7) { Answer::Fail } else { Answer::Ok }
                    },
                },
                Expect {
                    calls_per_payment: 2.0,
                    calls_in_trouble: 650,
                    parked: none,
                    done_before_heal: 0.8,
                    openings: 0..=1,
                    healthy_p99: 10.0,
                },
            ),
            (
                Scenario {
                    name: "brownout 75%, a third 429",
                    rate: 10,
                    seconds: 50,
                    trouble: (10.0, 40.0),
                    answer: |t, p, c| {
                        if in_trouble(t) && coin(p, c, 0.75) {
                            if coin(p, c + 1000, 0.33) { Answer::Limited } else { Answer::Fail }
                        } else {
                            Answer::Ok
                        }
                    },
                },
                Expect {
                    calls_per_payment: 1.4,
                    calls_in_trouble: 250,
                    parked: none,
                    done_before_heal: 0.45,
                    openings: 0..=0,
                    healthy_p99: 20.0,
                },
            ),
            (
                Scenario {
                    name: "poison pair",
                    rate: 20,
                    seconds: 30,
                    trouble: (0.0, 0.0),
                    answer: |_, p, _| if p == 100 || p == 301 { Answer::Fail } else { Answer::Ok },
                },
                Expect {
                    calls_per_payment: 1.02,
                    calls_in_trouble: 0,
                    parked: &[(100, 4), (301, 4)],
                    done_before_heal: 0.0,
                    openings: 0..=0,
                    healthy_p99: 0.1,
                },
            ),
            (
                Scenario {
                    name: "flapping 1 s up, 1 s down",
                    rate: 10,
                    seconds: 50,
                    trouble: (10.0, 40.0),
                    answer: |t, _, _| {
                        if in_trouble(t) && (t as u64) % 2 == 1 { Answer::Fail } else { Answer::Ok }
                    },
                },
                Expect {
                    calls_per_payment: 1.8,
                    calls_in_trouble: 700,
                    parked: none,
                    done_before_heal: 0.99,
                    openings: 0..=0,
                    healthy_p99: 0.1,
                },
            ),
            (
                Scenario {
                    name: "429 storm",
                    rate: 10,
                    seconds: 50,
                    trouble: (10.0, 20.0),
                    answer: |t, _, _| {
                        if (10.0..20.0).contains(&t) { Answer::Limited } else { Answer::Ok }
                    },
                },
                Expect {
                    calls_per_payment: 1.15,
                    calls_in_trouble: 60,
                    parked: none,
                    done_before_heal: 0.0,
                    openings: 0..=0,
                    healthy_p99: 10.0,
                },
            ),
        ];
        for (scenario, expect) in &table {
            let run = simulate(scenario);
            let per_payment = run.calls as f64 / run.payments as f64;
            let before = run.done_before_heal as f64 / run.sent_before_heal.max(1) as f64;
            println!(
                "{:<26} {:>4} payments {:>5} calls ({per_payment:.2}/payment) {:>4} in \
                 trouble, {:>3.0}% done before the heal, parked {:?}, p99 {:.2} s, opened {}",
                scenario.name,
                run.payments,
                run.calls,
                run.calls_in_trouble,
                before * 100.0,
                run.parked.iter().zip(&run.calls_of_parked).collect::<Vec<_>>(),
                p99(&run.healthy_latency),
                run.openings,
            );
            let name = scenario.name;
            assert_eq!(run.done + run.parked.len(), run.payments, "{name}: every payment ends");
            assert!(per_payment <= expect.calls_per_payment, "{name}: {per_payment} calls each");
            assert!(run.calls_in_trouble <= expect.calls_in_trouble, "{name}: calls in trouble");
            let parked: Vec<(usize, u32)> =
                run.parked.iter().copied().zip(run.calls_of_parked.iter().copied()).collect();
            assert_eq!(parked, expect.parked, "{name}: parked");
            assert!(before >= expect.done_before_heal, "{name}: {before} done before the heal");
            assert!(expect.openings.contains(&run.openings), "{name}: opened {}", run.openings);
            assert_eq!(run.phases.last(), Some(&"closed"), "{name}: closed at the end");
            assert!(p99(&run.healthy_latency) <= expect.healthy_p99, "{name}: healthy p99");
        }
    }
}
