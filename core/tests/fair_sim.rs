//! A discrete-event run of the real pool (manual clock, no threads, no
//! sockets): an engine of 8 slots, a greedy flow of 40 streams back to back,
//! nine polite flows arriving at random (Poisson, about 0.4x capacity in
//! all), as bench/fairness's greedy cells, and the same with the polite flows
//! strictly ahead (priority lane, the greedy one in the default lane: the
//! mark). Deterministic (seeded), so a change of the fair order shows as a
//! change of the polite flows' wait, free of the machine's noise:
//! `cargo test --release --test fair_sim -- --nocapture` prints it.
#![cfg(not(loom))]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use tierq_core::{fair, Admit, Ask, Clock, Lane, ManualClock, Pool, PoolSpec, WaiterId};

const SLOTS: i64 = 8;
const GREEDY_STREAMS: usize = 40;
const POLITE: usize = 9;
const MS: u64 = 1_000_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn tokens(&mut self) -> u64 {
        16 + self.next() % 33
    }
}

#[derive(Clone, Copy)]
struct Req {
    flow: usize, // 0 = greedy, 1.. = polite
    lane: Lane,
    queue: u32,
    tokens: u64,
    arrived: u64,
}

enum Ev {
    PoliteArrival(usize),
    Done(Req),
}

#[derive(Default)]
struct Events {
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    bodies: HashMap<u64, Ev>,
    seq: u64,
}
impl Events {
    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq)));
        self.bodies.insert(self.seq, ev);
    }
    fn pop(&mut self) -> Option<(u64, Ev)> {
        let Reverse((at, id)) = self.heap.pop()?;
        Some((at, self.bodies.remove(&id).unwrap()))
    }
}

/// Polite waits (ns) over `secs` simulated seconds after a warm-up.
fn run(seed: u64, mark: bool, secs: u64) -> Vec<u64> {
    let clock = Arc::new(ManualClock::new(1));
    let spec = PoolSpec { max_concurrency: Some(SLOTS), queue_depth: 1024, max_wait_ms: [600_000.0, 600_000.0, 600_000.0], ..PoolSpec::default() };
    let pool = Pool::new(spec.validate().unwrap(), Clock::Manual(clock.clone()));
    let mut rng = Rng(seed | 1);
    let hands: Vec<(u32, u32)> = (0..=POLITE).map(|f| pool.hand(format!("key_{seed:04}_{f:02}_{:08x}", rng.next() as u32).as_bytes())).collect();
    // Service: 20 ms to the first token, 200 tokens/s (the bench's sim).
    let service_ns = |tokens: u64| 20 * MS + tokens * 5 * MS;
    let capacity = SLOTS as f64 / (service_ns(32) as f64 / 1e9);
    let polite_rate = 0.4 * capacity / POLITE as f64; // per flow, req/s
    let mut ev = Events::default();
    let mut waiting: HashMap<WaiterId, Req> = HashMap::new();
    let mut waits = Vec::new();

    let warm = 5_000 * MS;
    let end = warm + secs * 1000 * MS;
    let charge = |tokens: u64| fair::service(tokens + 10, 100);

    // One request asks; returns the requests that start now.
    let admit = |r: Req, waiting: &mut HashMap<WaiterId, Req>| -> (Vec<Req>, u32) {
        let ask = Ask { hand: hands[r.flow], service: charge(r.tokens), max_wait_ns: None };
        let (got, placed) = pool.admit_ask(r.lane, 1, &ask);
        let r = Req { queue: placed.queue, ..r };
        let mut start = vec![];
        match got {
            Admit::Now => start.push(r),
            Admit::Queued { waiter, granted, .. } => {
                waiting.insert(waiter, r);
                if let Some(g) = granted {
                    start.push(waiting.remove(&g).unwrap());
                }
            }
            Admit::Shed { .. } => panic!("shed"),
        }
        (start, placed.queue)
    };
    let begin = |r: Req, now: u64, ev: &mut Events, waits: &mut Vec<u64>| {
        if r.flow != 0 && r.arrived >= warm && r.arrived < end {
            waits.push(now - r.arrived);

        }
        ev.push(now + service_ns(r.tokens), Ev::Done(r));
    };
    let greedy_lane = Lane::Default;
    let polite_lane = if mark { Lane::Priority } else { Lane::Default };
    for _ in 0..GREEDY_STREAMS {
        let r = Req { flow: 0, lane: greedy_lane, queue: 0, tokens: rng.tokens(), arrived: 0 };
        for s in admit(r, &mut waiting).0 {
            begin(s, 0, &mut ev, &mut waits);
        }
    }
    for f in 1..=POLITE {
        let at = (-(1.0 - rng.unit()).ln() / polite_rate * 1e9) as u64;
        ev.push(at, Ev::PoliteArrival(f));
    }
    while let Some((at, body)) = ev.pop() {
        if at > end + 20_000 * MS {
            break;
        }
        clock.advance_ns(at - clock.now_ns().min(at));
        let now = at;
        match body {
            Ev::PoliteArrival(f) => {
                if now < end {
                    let next = now + (-(1.0 - rng.unit()).ln() / polite_rate * 1e9) as u64;
                    ev.push(next, Ev::PoliteArrival(f));
                }
                let r = Req { flow: f, lane: polite_lane, queue: 0, tokens: rng.tokens(), arrived: now };
                for s in admit(r, &mut waiting).0 {
                    begin(s, now, &mut ev, &mut waits);
                }
            }
            Ev::Done(r) => {
                pool.settle(r.lane, r.queue, charge(r.tokens), charge(r.tokens));
                if let Some(g) = pool.release() {
                    let w = waiting.remove(&g).unwrap();
                    begin(w, now, &mut ev, &mut waits);
                }
                if r.flow == 0 && now < end {
                    let n = Req { flow: 0, lane: greedy_lane, queue: 0, tokens: rng.tokens(), arrived: now };
                    for s in admit(n, &mut waiting).0 {
                        begin(s, now, &mut ev, &mut waits);
                    }
                }
            }
        }
    }
    waits
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize] as f64 / 1e6
}

#[test]
fn polite_flows_beside_a_greedy_one_wait_about_as_long_as_strictly_ahead_of_it() {
    let mut ratios = vec![];
    // FAIR_SIM_SEEDS=200 for the figures of docs/architecture.md.
    let seeds: u64 = std::env::var("FAIR_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    for seed in 1..=seeds {
        let mut fair = run(seed, false, 120);
        let mut mark = run(seed, true, 120);
        let (f50, f99, m50, m99) = (pct(&mut fair, 50.0), pct(&mut fair, 99.0), pct(&mut mark, 50.0), pct(&mut mark, 99.0));
        println!("seed {seed}: polite wait ms fair p50 {f50:.1} p99 {f99:.1} | mark p50 {m50:.1} p99 {m99:.1} | p99 ratio {:.2}", f99 / m99);
        ratios.push(f99 / m99);
    }
    ratios.sort_by(f64::total_cmp);
    let (median, max) = (ratios[ratios.len() / 2], ratios[ratios.len() - 1]);
    println!("p99 ratio median {median:.2}, p90 {:.2}, max {max:.2}", ratios[ratios.len() * 9 / 10]);
    // Measured: median 0.95, max 1.02 (16 seeds of 120 s; 200 seeds:
    // median 0.90, p90 1.02, max 1.19) with a newcomer's lift one request
    // below the floor, not below the newcomer before it; lifted to the
    // floor, median 1.04, max 1.56 (seed 16: p99 197 ms against the mark's
    // 127; 200 seeds: 1.08, 1.28, 1.56): the owner rule of `choose` (a flow
    // keeps to the queue it owns, so a polite flow's second request waits
    // behind its first) let a backlogged request go between the two; before
    // the owner rule (it started its other queue at the floor) 1.12 and
    // 1.30; before the lift to the floor and the tie of `choose` by
    // counter, 1.70 and 1.98.
    assert!(median <= 1.25, "polite p99 wait {median:.2}x the mark's (median of 16 seeds)");
    assert!(max <= 1.25, "polite p99 wait {max:.2}x the mark's (worst of 16 seeds)");
}

/// A lone flow with requests of one size, random arrivals and releases on
/// 2 slots, 200 hands: the line it forms is served in its arrival order but
/// for few grants, each of which goes before one older waiter at most.
/// Measured: none of 277,149 (it keeps to the queue it owns while it has
/// waiters); 1,822 (0.66%) when it spread over its two queues by joining
/// the shorter, before the owner rule.
#[test]
fn a_lone_flow_of_equal_requests_is_served_in_arrival_order() {
    let mut total = (0usize, 0usize, 0usize);
    for seed in 1..=200u64 {
        let clock = Arc::new(ManualClock::new(1));
        let spec = PoolSpec { max_concurrency: Some(2), queue_depth: 64, max_wait_ms: [600_000.0, 600_000.0, 600_000.0], ..PoolSpec::default() };
        let pool = Pool::new(spec.validate().unwrap(), Clock::Manual(clock));
        let mut rng = Rng(seed * 0x9e37_79b9 | 1);
        let hand = pool.hand(format!("lone-{seed}").as_bytes());
        let mut held = 0usize;
        let mut next = 0u64;
        let mut ids: HashMap<WaiterId, u64> = HashMap::new();
        let mut served: Vec<u64> = vec![];
        let svc = fair::service(40, 100);
        let grant = |g: WaiterId, ids: &mut HashMap<WaiterId, u64>, served: &mut Vec<u64>| served.push(ids.remove(&g).unwrap());
        for _ in 0..3000 {
            if rng.next() % 2 == 0 && ids.len() < 60 {
                let ask = Ask { hand, service: svc, max_wait_ns: None };
                match pool.admit_ask(Lane::Default, 1, &ask).0 {
                    Admit::Now => {
                        assert!(ids.is_empty(), "seed {seed}: admitted at once past waiters");
                        held += 1;
                    }
                    Admit::Queued { waiter, granted, .. } => {
                        ids.insert(waiter, next);
                        if let Some(g) = granted {
                            grant(g, &mut ids, &mut served);
                            held += 1;
                        }
                    }
                    Admit::Shed { .. } => panic!("shed"),
                }
                next += 1;
            } else if held > 0 {
                held -= 1;
                if let Some(g) = pool.release() {
                    grant(g, &mut ids, &mut served);
                    held += 1;
                }
            }
        }
        // How far each grant came before an older waiter of the flow: the
        // older ones still waiting when it was served.
        let mut overtaken = 0usize;
        let mut worst = 0usize;
        for (i, &a) in served.iter().enumerate() {
            let older_later = served[i + 1..].iter().filter(|&&b| b < a).count();
            overtaken += (older_later > 0) as usize;
            worst = worst.max(older_later);
        }
        total.0 += overtaken;
        total.1 = total.1.max(worst);
        total.2 += served.len();
    }
    println!("lone flow: {} of {} grants went before an older waiter of the flow, at most {} older ones", total.0, total.2, total.1);
    // Measured: 1,822 of 277,149 (0.66%), each before one older waiter (not
    // none, a cause not traced here). Before `choose` broke ties by counter
    // and the lift went to the floor: 63,893 (23%), up to 2.
    assert!(total.1 <= 1 && total.0 * 100 < total.2, "{total:?}");
}

/// bench/fairness's deadline-priority cell on the real pool: four flows of
/// 6 streams back to back in the priority lane, and from the same flows
/// Poisson arrivals (half the capacity in all) in six groups with their own
/// max wait at 0.2x-2x the lane's typical wait (its p50 without deadlines).
/// With `learn`, every queued request's realized wait is reported to the
/// pool (`Pool::wait_observed`, as the gateway does), so the refusal margin
/// is learned; without, it stays at its start (a third: the fixed margin
/// before). With `stalls`, the engine completes nothing for 150 ms every
/// 5 s (a GC pause, a preemption, a batch of long prefills): the drain rate
/// the prediction uses is then wrong for a while.
fn deadline_cell(seed: u64, typical_ns: Option<u64>, secs: u64, learn: bool, stalls: bool) -> Cell {
    let clock = Arc::new(ManualClock::new(1));
    let spec = PoolSpec { max_concurrency: Some(SLOTS), queue_depth: 1024, max_wait_ms: [60_000.0, 30_000.0, 30_000.0], ..PoolSpec::default() };
    let pool = Pool::new(spec.validate().unwrap(), Clock::Manual(clock.clone()));
    let mut rng = Rng(seed * 2 + 1);
    let hands: Vec<(u32, u32)> = (0..4).map(|f| pool.hand(format!("key_{seed:04}_{f:02}_{:08x}", rng.next() as u32).as_bytes())).collect();
    let service_ns = |tokens: u64| 20 * MS + tokens * 5 * MS;
    let capacity = SLOTS as f64 / (service_ns(32) as f64 / 1e9);
    const FACTORS: [f64; 6] = [0.2, 0.5, 0.8, 1.2, 1.6, 2.0];
    let rate = 0.5 * capacity / FACTORS.len() as f64;
    let charge = |tokens: u64| fair::service(tokens + 10, 100);
    // Per waiter: (flow, group or usize::MAX, tokens, arrived, predicted, deadline).
    type W = (usize, usize, u64, u64, Option<u64>, Option<u64>);
    let mut waiting: HashMap<WaiterId, W> = HashMap::new();
    let mut ev = Events::default();
    let (warm, end) = (5_000 * MS, 5_000 * MS + secs * 1000 * MS);
    let (mut admitted, mut missed, mut errors, mut waits) = (0usize, 0usize, vec![], vec![]);
    let mut refused = 0usize;
    let observe = |predicted: Option<u64>, waited: u64| {
        if let (true, Some(p)) = (learn, predicted) {
            pool.wait_observed(Lane::Priority, p, waited);
        }
    };
    const STALL_EVERY: u64 = 5_000 * MS;
    const STALL: u64 = 150 * MS;
    let stall_phase = (seed * 977 % 5_000) * MS;
    let deadline_of = |g: usize| typical_ns.map(|t| (FACTORS[g] * t as f64) as u64);
    // Starts a request: (flow, group, tokens, arrived, queue) -> Done event.
    let start = |w: W, queue: u32, now: u64, ev: &mut Events, errors: &mut Vec<u64>, waits: &mut Vec<u64>, missed: &mut usize| {
        let (flow, group, tokens, arrived, predicted, deadline) = w;
        observe(predicted, now - arrived);
        if arrived >= warm && arrived < end {
            let wait = now - arrived;
            waits.push(wait);
            if let Some(p) = predicted {
                errors.push(wait.abs_diff(p));
            }
            if deadline.is_some_and(|d| wait > d) {
                *missed += 1;
            }

        }
        ev.push(now + service_ns(tokens), Ev::Done(Req { flow: flow + 100 * (group != usize::MAX) as usize, lane: Lane::Priority, queue, tokens, arrived: group as u64 }));
    };
    let mut queues: HashMap<WaiterId, u32> = HashMap::new();
    let admit = |w: W, now: u64, ev: &mut Events, waiting: &mut HashMap<WaiterId, W>, queues: &mut HashMap<WaiterId, u32>, errors: &mut Vec<u64>, waits: &mut Vec<u64>, missed: &mut usize, admitted: &mut usize, refused: &mut usize| {
        let ask = Ask { hand: hands[w.0], service: charge(w.2), max_wait_ns: w.5 };
        let (got, placed) = pool.admit_ask(Lane::Priority, 1, &ask);
        let w = (w.0, w.1, w.2, w.3, placed.predicted_ns, w.5);
        let counted = w.5.is_some() && w.3 >= warm && w.3 < end;
        match got {
            Admit::Now => {
                *admitted += counted as usize;
                start(w, placed.queue, now, ev, errors, waits, missed)
            }
            Admit::Queued { waiter, granted, .. } => {
                *admitted += counted as usize;
                waiting.insert(waiter, w);
                queues.insert(waiter, placed.queue);
                if let Some(g) = granted {
                    let (w, q) = (waiting.remove(&g).unwrap(), queues.remove(&g).unwrap());
                    start(w, q, now, ev, errors, waits, missed);
                }
            }
            Admit::Shed { .. } => *refused += counted as usize,
        }
    };
    for f in 0..4 {
        for _ in 0..6 {
            let t = rng.tokens();
            admit((f, usize::MAX, t, 0, None, None), 0, &mut ev, &mut waiting, &mut queues, &mut errors, &mut waits, &mut missed, &mut admitted, &mut refused);
        }
    }
    if typical_ns.is_some() {
        for g in 0..FACTORS.len() {
            ev.push((-(1.0 - rng.unit()).ln() / rate * 1e9) as u64, Ev::PoliteArrival(g));
        }
    }
    while let Some((at, body)) = ev.pop() {
        if at > end + 20_000 * MS {
            break;
        }
        clock.advance_ns(at - clock.now_ns().min(at));
        let mut gone = vec![];
        pool.expire_due(|id| gone.push(id));
        for id in gone {
            let w = waiting.remove(&id).unwrap();
            queues.remove(&id);
            observe(w.4, at - w.3);
            if w.3 >= warm && w.3 < end {
                missed += 1;

            }
            if w.1 == usize::MAX {
                panic!("a backlog request expired");
            }
        }
        match body {
            Ev::PoliteArrival(g) => {
                if at < end {
                    ev.push(at + (-(1.0 - rng.unit()).ln() / rate * 1e9) as u64, Ev::PoliteArrival(g));
                }
                let t = rng.tokens();
                admit((g % 4, g, t, at, None, deadline_of(g)), at, &mut ev, &mut waiting, &mut queues, &mut errors, &mut waits, &mut missed, &mut admitted, &mut refused);
            }
            Ev::Done(r) if stalls && (at + STALL_EVERY - stall_phase) % STALL_EVERY < STALL => {
                let resume = at + STALL - (at + STALL_EVERY - stall_phase) % STALL_EVERY;
                ev.push(resume, Ev::Done(r));
            }
            Ev::Done(r) => {
                pool.settle(Lane::Priority, r.queue, charge(r.tokens), charge(r.tokens));
                if let Some(g) = pool.release() {
                    let (w, q) = (waiting.remove(&g).unwrap(), queues.remove(&g).unwrap());
                    start(w, q, at, &mut ev, &mut errors, &mut waits, &mut missed);
                }
                if r.flow < 100 && at < end {
                    let t = rng.tokens();
                    admit((r.flow, usize::MAX, t, at, None, None), at, &mut ev, &mut waiting, &mut queues, &mut errors, &mut waits, &mut missed, &mut admitted, &mut refused);
                }
            }
        }
    }
    let p50 = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    Cell { admitted, missed, refused, error_p50: p50(&mut errors), wait_p50: p50(&mut waits), margin: pool.deadline_margin(Lane::Priority) }
}

/// One deadline cell's outcome: of the requests with a deadline, admitted,
/// missed (of the admitted) and refused at join; over every queued request
/// the p50 of |realized - predicted| wait and the p50 wait (ns); the margin
/// at the end.
struct Cell {
    admitted: usize,
    missed: usize,
    refused: usize,
    error_p50: u64,
    wait_p50: u64,
    margin: f64,
}

/// Today's fixed margin against the learned one, same seeds: (admitted,
/// missed, refused, median relative error) summed over seeds 1..=8.
fn deadline_cells(learn: bool, stalls: bool) -> (usize, usize, usize, f64) {
    let (mut adm, mut miss, mut refused, mut rel) = (0, 0, 0, vec![]);
    for seed in 1..=8u64 {
        let typical = deadline_cell(seed, None, 30, false, stalls).wait_p50;
        let c = deadline_cell(seed, Some(typical), 60, learn, stalls);
        println!("learn {learn} stalls {stalls} seed {seed}: typical {} ms, admitted {}, missed {} ({:.2}%), refused {}, prediction error p50 {} ms of p50 wait {} ms ({:.0}%), margin {:.3}",
                 typical / MS, c.admitted, c.missed, 100.0 * c.missed as f64 / c.admitted as f64, c.refused, c.error_p50 / MS, c.wait_p50 / MS, 100.0 * c.error_p50 as f64 / c.wait_p50 as f64, c.margin);
        adm += c.admitted;
        miss += c.missed;
        refused += c.refused;
        rel.push(c.error_p50 as f64 / c.wait_p50 as f64);
    }
    rel.sort_by(f64::total_cmp);
    let r = rel[rel.len() / 2];
    println!("learn {learn} stalls {stalls}: missed {miss} of {adm} admitted ({:.2}%), refused {refused}, prediction error median {:.0}%", 100.0 * miss as f64 / adm as f64, 100.0 * r);
    (adm, miss, refused, r)
}

#[test]
fn deadlines_in_the_priority_lane_are_kept_or_refused_at_join() {
    for stalls in [false, true] {
        let fixed = deadline_cells(false, stalls);
        let (adm, miss, refused, rel) = deadline_cells(true, stalls);
        println!("stalls {stalls}: learned / fixed margin: admitted {:.3}x, missed {:.3}x, refused {:.3}x",
                 adm as f64 / fixed.0 as f64, miss as f64 / fixed.1.max(1) as f64, refused as f64 / fixed.2.max(1) as f64);
        assert!(miss * 100 <= adm, "stalls {stalls}: {miss} of {adm} admitted with a deadline missed it");
        assert!(rel <= 0.20, "stalls {stalls}: prediction error p50 {rel}");
    }
}
/// Flow ids `"{prefix}-{i}"`, one per weight, each searched (by the core's
/// own hash) so that its hand shares a queue with the hand of the flow
/// before it: 2 flows, one shared queue; 3 flows, a chain of two.
fn colliding_flows(pool: &Pool, prefix: &str, n: usize) -> Vec<(u32, u32)> {
    let mut hands: Vec<(u32, u32)> = vec![pool.hand(format!("{prefix}-0").as_bytes())];
    let mut i = 1;
    while hands.len() < n {
        let h = pool.hand(format!("{prefix}-{i}").as_bytes());
        let prev = *hands.last().unwrap();
        let shares = |x: u32| x == prev.0 || x == prev.1;
        let new = |x: u32| hands.iter().all(|o| x != o.0 && x != o.1);
        // One queue shared with the flow before, the other its own.
        if (shares(h.0) && new(h.1)) || (shares(h.1) && new(h.0)) {
            // and no more than that one with any older flow
            if hands[..hands.len() - 1].iter().all(|o| ![o.0, o.1].contains(&h.0) && ![o.0, o.1].contains(&h.1)) {
                hands.push(h);
            }
        }
        i += 1;
    }
    hands
}

/// Flows of `weights` (hundredths), each `STREAMS` requests back to back in
/// the default lane of an 8-slot engine, hands colliding as
/// `colliding_flows`; returns each flow's share of the service (tokens
/// charged, dispatched after a 5 s warm-up, over `secs` seconds) divided by
/// its weight's share of the total weight (1.0: exact).
fn weighted_shares(seed: u64, weights: &[u32], secs: u64) -> Vec<f64> {
    const STREAMS: usize = 16;
    let clock = Arc::new(ManualClock::new(1));
    let spec = PoolSpec { max_concurrency: Some(SLOTS), queue_depth: 1024, max_wait_ms: [600_000.0, 600_000.0, 600_000.0], ..PoolSpec::default() };
    let pool = Pool::new(spec.validate().unwrap(), Clock::Manual(clock.clone()));
    let hands = colliding_flows(&pool, &format!("weights-{seed}"), weights.len());
    let mut rng = Rng(seed | 1);
    let service_ns = |tokens: u64| 20 * MS + tokens * 5 * MS;
    let charge = |tokens: u64| tokens + 10;
    let warm = 5_000 * MS;
    let end = warm + secs * 1000 * MS;
    let mut served = vec![0u64; weights.len()];
    let mut ev = Events::default();
    let mut waiting: HashMap<WaiterId, Req> = HashMap::new();
    let admit = |r: Req, waiting: &mut HashMap<WaiterId, Req>| -> Vec<Req> {
        let ask = Ask { hand: hands[r.flow], service: fair::service(charge(r.tokens), weights[r.flow]), max_wait_ns: None };
        let (got, placed) = pool.admit_ask(Lane::Default, 1, &ask);
        let r = Req { queue: placed.queue, ..r };
        match got {
            Admit::Now => vec![r],
            Admit::Queued { waiter, granted, .. } => {
                waiting.insert(waiter, r);
                granted.map(|g| waiting.remove(&g).unwrap()).into_iter().collect()
            }
            Admit::Shed { .. } => panic!("shed"),
        }
    };
    let mut begin = |r: Req, now: u64, ev: &mut Events| {
        if now >= warm && now < end {
            served[r.flow] += charge(r.tokens);
        }
        ev.push(now + service_ns(r.tokens), Ev::Done(r));
    };
    // Streams start interleaved, one of each flow in turn.
    for _ in 0..STREAMS {
        for f in 0..weights.len() {
            let r = Req { flow: f, lane: Lane::Default, queue: 0, tokens: rng.tokens(), arrived: 0 };
            for s in admit(r, &mut waiting) {
                begin(s, 0, &mut ev);
            }
        }
    }
    while let Some((at, body)) = ev.pop() {
        if at >= end {
            break;
        }
        clock.advance_ns(at - clock.now_ns().min(at));
        let Ev::Done(r) = body else { unreachable!() };
        let w = weights[r.flow];
        pool.settle(Lane::Default, r.queue, fair::service(charge(r.tokens), w), fair::service(charge(r.tokens), w));
        if let Some(g) = pool.release() {
            let next = waiting.remove(&g).unwrap();
            begin(next, at, &mut ev);
        }
        let n = Req { flow: r.flow, lane: Lane::Default, queue: 0, tokens: rng.tokens(), arrived: at };
        for s in admit(n, &mut waiting) {
            begin(s, at, &mut ev);
        }
    }
    let total: u64 = served.iter().sum();
    let wsum: u32 = weights.iter().sum();
    served.iter().zip(weights).map(|(&s, &w)| (s as f64 / total as f64) / (w as f64 / wsum as f64)).collect()
}

/// Weights 1:2 and 1:2:4 under saturation, with hands that share a queue
/// (the bench's full run had two keys in one queue and missed the target:
/// w1 -2.0%, w2 -11.5%, w4 +6.2%): each flow's share within 5% of its
/// weight's, as the bench's target, for each of four seeds.
#[test]
fn weighted_shares_hold_when_two_flows_hands_share_a_queue() {
    for seed in 1..=4 {
        for weights in [&[100, 200][..], &[100, 200, 400][..]] {
            let got = weighted_shares(seed, weights, 60);
            println!("seed {seed} weights {weights:?}: share / weight's share {got:.3?}");
            for (w, g) in weights.iter().zip(&got) {
                assert!((g - 1.0).abs() <= 0.05, "seed {seed}, weights {weights:?}: weight {w} got {:+.1}% of its share ({got:.3?})", (g - 1.0) * 100.0);
            }
        }
    }
}
