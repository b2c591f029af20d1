//! Retry-After of a shed request and `priority_headroom`, on a manual clock:
//! every wait is exact, and a small event-driven simulation checks the hint
//! against the wait a client that honours it actually lives.
#![cfg(not(loom))]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use tierq_core::{Admit, Clock, Lane, LimitMode, ManualClock, Pool, PoolSpec, ShedCode, WaiterId};

const MS: u64 = 1_000_000;

fn pool(max: i64, depth: i64, wait_default_ms: f64, wait_priority_ms: f64, headroom: i64) -> (Pool, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_000 * MS));
    let s = PoolSpec { max_concurrency: Some(max), queue_depth: depth, max_wait_ms: [wait_priority_ms, wait_default_ms, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, priority_headroom: headroom, ..PoolSpec::default() }.validate()
        .unwrap();
    (Pool::new(s, Clock::Manual(clock.clone())), clock)
}

fn queued(a: Admit) -> WaiterId {
    match a {
        Admit::Queued { waiter, granted: None, evicted: None } => waiter,
        other => panic!("expected to queue, got {other:?}"),
    }
}

/// One slot held, `n` defaults queued, and two releases 10 ms apart: the
/// drain interval is 10 ms. Returns the pool with `n - 2 + refill` waiters.
fn drained_every_10ms(depth: i64, wait_default_ms: f64) -> (Pool, Arc<ManualClock>) {
    let (p, clock) = pool(1, depth, wait_default_ms, 60_000.0, 0);
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    for _ in 0..depth {
        queued(p.admit(Lane::Default, 1));
    }
    for _ in 0..2 {
        clock.advance_ns(10 * MS);
        assert!(p.release().is_some());
    }
    // Refill the queue behind the two granted.
    for _ in 0..2 {
        queued(p.admit(Lane::Default, 1));
    }
    (p, clock)
}

#[test]
fn shed_at_a_full_queue_advertises_the_line_ahead_and_the_line_at_return() {
    let (p, _) = drained_every_10ms(4, 30_000.0);
    // 4 waiters ahead + this one, 10 ms apart: 50 ms to clear, and as much
    // again queued behind the line that forms meanwhile.
    assert_eq!(p.admit(Lane::Default, 1), Admit::Shed { code: ShedCode::ServerOverloaded, retry_after_ns: 100 * MS, evicted: None });
}

#[test]
fn retry_after_of_a_line_is_capped_at_the_lanes_max_wait() {
    // The same line of 50 ms, but nobody waits more than 30 ms in it.
    let (p, _) = drained_every_10ms(4, 30.0);
    assert_eq!(p.retry_after_ns(Lane::Default), 60 * MS);
}

#[test]
fn priority_retry_after_counts_only_priority_waiters() {
    let (p, _) = drained_every_10ms(4, 30_000.0);
    // A priority arrival at the full queue evicts the newest default.
    assert!(matches!(p.admit(Lane::Priority, 1), Admit::Queued { evicted: Some(_), .. }));
    assert_eq!(p.depth(), [1, 3, 0]);
    assert_eq!(p.retry_after_ns(Lane::Priority), 2 * 2 * 10 * MS);
    assert_eq!(p.retry_after_ns(Lane::Default), 2 * 5 * 10 * MS);
}

#[test]
fn retry_after_before_any_drain_under_load_is_one_second_per_line() {
    let (p, _) = pool(1, 1, 30_000.0, 60_000.0, 0);
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    queued(p.admit(Lane::Default, 1));
    assert_eq!(p.admit(Lane::Default, 1), Admit::Shed { code: ShedCode::ServerOverloaded, retry_after_ns: 2_000 * MS, evicted: None });
}

#[test]
fn rate_limited_retry_after_stays_exact() {
    let clock = Arc::new(ManualClock::new(1_000 * MS));
    let s = PoolSpec { max_concurrency: Some(8), queue_depth: 8, max_wait_ms: [60_000.0, 30_000.0, 600_000.0], rate: Some(10.0), burst: Some(1.0), priority_reserve: 0.0, default_min_share: 0.0, priority_headroom: 2, ..PoolSpec::default() }.validate().unwrap();
    let p = Pool::new(s, Clock::Manual(clock.clone()));
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    clock.advance_ns(30 * MS);
    assert_eq!(p.admit(Lane::Default, 1), Admit::Shed { code: ShedCode::RateLimitExceeded, retry_after_ns: 70 * MS, evicted: None });
}

#[test]
fn priority_headroom_keeps_slots_from_default_requests() {
    let (p, _) = pool(4, 8, 30_000.0, 60_000.0, 2);
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    // Two slots in use: the rest are the headroom.
    let d = queued(p.admit(Lane::Default, 1));
    assert_eq!(p.stats().in_flight, 2);
    // Priority takes the headroom at once, with a default waiting.
    assert_eq!(p.admit(Lane::Priority, 1), Admit::Now);
    assert_eq!(p.admit(Lane::Priority, 1), Admit::Now);
    assert_eq!(p.stats().in_flight, 4);
    // Full: the next priority waits, and goes before the default.
    let pr = queued(p.admit(Lane::Priority, 1));
    assert_eq!(p.release(), Some(pr));
    // 4 in flight; a release leaves 3, still not below 4 - 2: the default waits.
    assert_eq!(p.release(), None);
    assert_eq!(p.stats().in_flight, 3);
    assert_eq!(p.depth(), [0, 1, 0]);
    // At 2 in use it still may not: it would be the third.
    assert_eq!(p.release(), None);
    assert_eq!(p.stats().in_flight, 2);
    // One release more and the slot passes to it.
    assert_eq!(p.release(), Some(d));
    assert_eq!(p.stats().in_flight, 2);
    assert_eq!(p.depth(), [0, 0, 0]);
}

#[test]
fn priority_headroom_must_leave_defaults_a_slot() {
    let with = |max_concurrency, headroom| PoolSpec { max_concurrency, priority_headroom: headroom, ..PoolSpec::default() }.validate();
    assert!(with(Some(4), 3).is_ok());
    assert!(with(Some(4), 4).is_err());
    assert!(with(Some(4), -1).is_err());
    // Adaptive: below the minimum the limit can fall to.
    assert!(with(None, 1).is_ok());
    let err = with(None, 2).unwrap_err().to_string();
    assert!(err.starts_with("priority_headroom: must be at least 0 and below min_concurrency (2)"), "{err}");
}

/// xorshift: reproducible service times.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A new request (client index).
    Arrive(usize),
    /// A client back after its advertised wait.
    Retry(usize),
    /// A request's service ends: its slot is released.
    Done,
    Expire,
}

/// Events at (time, sequence) on a manual clock.
struct Sim {
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
}
impl Sim {
    fn at(&mut self, t: u64, e: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, e)));
    }
}

/// Sustained overload (`load` x capacity, default lane only): every shed
/// client sleeps its Retry-After and retries once. Returns, per retry that
/// got in, (wait from the 429 until admitted) / advertised, and how many
/// retries were shed again.
fn honoured_retries(load: f64) -> (Vec<f64>, usize) {
    let (p, clock) = pool(8, 32, 200.0, 1_000.0, 0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut sim = Sim { events: BinaryHeap::new(), seq: 0 };
    let gap = (1e9 / (200.0 * load)) as u64; // capacity: 8 slots / 40 ms mean = 200/s
    let start = clock.now_ns();
    for c in 0..2_000 {
        sim.at(start + c as u64 * gap, Ev::Arrive(c));
    }
    let mut shed: HashMap<usize, (u64, u64)> = HashMap::new(); // client -> (429 at, advertised)
    let mut waiting: HashMap<WaiterId, usize> = HashMap::new();
    let mut is_retry: HashMap<usize, bool> = HashMap::new();
    let (mut ratios, mut again) = (Vec::new(), 0);
    let mut admitted = |c: usize, t: u64, sim: &mut Sim, shed: &mut HashMap<usize, (u64, u64)>| {
        if let Some((at, advertised)) = shed.remove(&c) {
            ratios.push((t - at) as f64 / advertised as f64);
        }
        sim.at(t + (20 + rng.below(41)) * MS, Ev::Done); // service 20-60 ms
    };
    while let Some(Reverse((t, _, ev))) = sim.events.pop() {
        clock.set_ns(t);
        match ev {
            Ev::Arrive(c) | Ev::Retry(c) => {
                let retry = matches!(ev, Ev::Retry(_));
                is_retry.insert(c, retry);
                match p.admit(Lane::Default, 1) {
                    Admit::Now => admitted(c, t, &mut sim, &mut shed),
                    Admit::Queued { waiter, granted, .. } => {
                        assert_eq!(granted, None, "nobody waits while a slot is free here");
                        waiting.insert(waiter, c);
                        sim.at(t + 200 * MS + 1, Ev::Expire);
                    }
                    Admit::Shed { retry_after_ns, .. } if !retry => {
                        shed.insert(c, (t, retry_after_ns));
                        sim.at(t + retry_after_ns, Ev::Retry(c));
                    }
                    Admit::Shed { .. } => again += 1,
                }
            }
            Ev::Done => {
                if let Some(w) = p.release() {
                    let c = waiting.remove(&w).unwrap();
                    admitted(c, t, &mut sim, &mut shed);
                }
            }
            Ev::Expire => {
                let mut expired = vec![];
                p.expire_due(|w| expired.push(w));
                for w in expired {
                    let c = waiting.remove(&w).unwrap();
                    if is_retry[&c] {
                        again += 1;
                    } else {
                        // As the gateway does: the hint is read when the waiter is shed.
                        let ra = p.retry_after_ns(Lane::Default);
                        shed.insert(c, (t, ra));
                        sim.at(t + ra, Ev::Retry(c));
                    }
                }
            }
        }
    }
    (ratios, again)
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn a_client_that_honours_retry_after_is_admitted_within_2x_of_it_under_sustained_overload() {
    for load in [2.0, 4.0] {
        let (mut ratios, again) = honoured_retries(load);
        assert!(ratios.len() >= 100, "load {load}: only {} retries got in ({again} shed again)", ratios.len());
        let within = ratios.iter().filter(|r| (1.0..=2.0).contains(*r)).count() as f64 / ratios.len() as f64;
        let (p50, p90) = (quantile(&mut ratios, 0.5), quantile(&mut ratios, 0.9));
        // Never admitted before the sleep ended (ratio >= 1, by construction),
        // and the queue after it adds at most about one more line.
        eprintln!("load {load}: {} retries got in, {again} shed again; actual/advertised p50 {p50:.2} p90 {p90:.2}, {within:.3} within 2x", ratios.len());
        assert!(within >= 0.95, "load {load}: {within:.3} within 2x (p50 {p50:.2}, p90 {p90:.2})");
        assert!((1.0..=1.7).contains(&p50), "load {load}: p50 {p50:.2}");
    }
}

#[test]
fn shadow_mode_counts_every_rate_shed_enforcing_makes_and_applies_none() {
    // The same arrivals (every 7 ms, a priority one in three) at 50/s with a
    // burst of 4, on two pools differing only in `enforce`, each releasing
    // what it admitted 20 ms later: shadow admits all and counts, as
    // `rate_limit_exceeded` decisions it did not apply, exactly the sheds
    // enforcing made, arrival for arrival (its bucket took nothing for them).
    let make = |enforce: bool| {
        let clock = Arc::new(ManualClock::new(1_000 * MS));
        let s = PoolSpec { max_concurrency: Some(1000), queue_depth: 8, rate: Some(50.0), burst: Some(4.0), enforce, ..PoolSpec::default() }.validate().unwrap();
        (Pool::new(s, Clock::Manual(clock.clone())), clock)
    };
    let (on, on_clock) = make(true);
    let (shadow, shadow_clock) = make(false);
    let mut held = [Vec::new(), Vec::new()];
    for i in 0..600u64 {
        for c in [&on_clock, &shadow_clock] {
            c.advance_ns(7 * MS);
        }
        let now = on_clock.now_ns();
        for (k, p) in [&on, &shadow].into_iter().enumerate() {
            while held[k].first().is_some_and(|&t| t <= now) {
                held[k].remove(0);
                p.release();
            }
        }
        let lane = if i % 3 == 0 { Lane::Priority } else { Lane::Default };
        let enforced = on.admit_ask(lane, 1, &on.ask_anonymous()).0;
        let (tried, placed) = shadow.admit_ask(lane, 1, &shadow.ask_anonymous());
        assert_eq!(tried, Admit::Now, "shadow mode sheds nothing (arrival {i})");
        held[1].push(now + 20 * MS);
        match enforced {
            Admit::Now => {
                held[0].push(now + 20 * MS);
                assert_eq!(placed.shadowed, None, "arrival {i}");
            }
            Admit::Shed { code: ShedCode::RateLimitExceeded, .. } => {
                assert_eq!(placed.shadowed, Some(ShedCode::RateLimitExceeded), "arrival {i}")
            }
            other => panic!("arrival {i}: {other:?}"),
        }
    }
    let (a, b) = (on.stats(), shadow.stats());
    let shed = a.shed[ShedCode::RateLimitExceeded as usize];
    assert!(shed > 100, "the load must be over the rate: {shed} shed");
    assert_eq!(b.shadow_rate_limited, shed);
    assert_eq!(b.shed, [0, 0, 0]);
    assert_eq!(a.shadow_rate_limited, 0);
    assert_eq!(b.admitted.iter().sum::<u64>(), 600);
}

#[test]
fn a_shadowed_request_the_queue_sheds_gives_back_no_tokens_it_never_took() {
    // One slot, no queue: the second arrival is over the rate (shadowed) and
    // then finds no slot nor place (shed server_overloaded). Enforcing would
    // have taken nothing for it, so nothing is refunded: the bucket still
    // refuses the third arrival, with the same wait as before.
    let clock = Arc::new(ManualClock::new(1_000 * MS));
    let s = PoolSpec { max_concurrency: Some(1), queue_depth: 0, rate: Some(10.0), burst: Some(1.0), priority_reserve: 0.0, enforce: false, ..PoolSpec::default() }.validate().unwrap();
    let p = Pool::new(s, Clock::Manual(clock.clone()));
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    let (second, placed) = p.admit_ask(Lane::Default, 1, &p.ask_anonymous());
    assert!(matches!(second, Admit::Shed { code: ShedCode::ServerOverloaded, .. }), "{second:?}");
    assert_eq!(placed.shadowed, Some(ShedCode::RateLimitExceeded));
    p.release();
    let (third, placed) = p.admit_ask(Lane::Default, 1, &p.ask_anonymous());
    assert_eq!(third, Admit::Now);
    assert_eq!(placed.shadowed, Some(ShedCode::RateLimitExceeded), "a refund of the untaken token would have let it through");
    assert_eq!(p.stats().shadow_rate_limited, 2);
    assert_eq!(p.stats().shed, [1, 0, 0]);
}

#[test]
fn a_cost_zero_request_is_not_the_buckets_to_decide_even_in_its_priority_reserve() {
    // Priority drains the bucket into the reserve, where a default request of
    // any cost is refused; a cost-0 one (refused before by a limit in shadow
    // mode) is neither refused nor counted, enforcing or not.
    for enforce in [true, false] {
        let clock = Arc::new(ManualClock::new(1_000 * MS));
        let s = PoolSpec { max_concurrency: Some(100), queue_depth: 8, rate: Some(1.0), burst: Some(10.0), priority_reserve: 0.5, enforce, ..PoolSpec::default() }.validate().unwrap();
        let p = Pool::new(s, Clock::Manual(clock.clone()));
        for _ in 0..7 {
            assert_eq!(p.admit(Lane::Priority, 1), Admit::Now);
        }
        let (one, placed) = p.admit_ask(Lane::Default, 1, &p.ask_anonymous());
        assert_eq!(enforce, matches!(one, Admit::Shed { code: ShedCode::RateLimitExceeded, .. }), "{one:?}");
        assert_eq!(placed.shadowed.is_some(), !enforce);
        let (zero, placed) = p.admit_ask(Lane::Default, 0, &p.ask_anonymous());
        assert_eq!((zero, placed.shadowed), (Admit::Now, None));
        let st = p.stats();
        assert_eq!(st.shed[ShedCode::RateLimitExceeded as usize] + st.shadow_rate_limited, 1);
    }
}

fn flex_pool(max: i64, reserve: i64, flex_headroom: f64) -> Pool {
    let s = PoolSpec { max_concurrency: Some(max), queue_depth: 8, flex_headroom, flex_priority_reserve: reserve, fairness: "off".into(), ..PoolSpec::default() }
        .validate()
        .unwrap();
    Pool::new(s, Clock::Manual(Arc::new(ManualClock::new(1_000 * MS))))
}

#[test]
fn while_flex_waits_the_reserve_is_kept_from_defaults_and_flex_for_priority() {
    // Limit 4, flex headroom one slot, reserve 1: flex runs below 4 - 1 - 1 = 2,
    // and while it waits defaults run below 3.
    let p = flex_pool(4, 1, 0.25);
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    assert_eq!(p.admit(Lane::Flex, 1), Admit::Now);
    let f = queued(p.admit(Lane::Flex, 1));
    // 2 in flight and a flex request waits: the 3rd slot (the flex
    // headroom) is a default's, the 4th (the reserve) priority's.
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    let d = queued(p.admit(Lane::Default, 1));
    assert_eq!(p.stats().in_flight, 3);
    assert_eq!(p.admit(Lane::Priority, 1), Admit::Now);
    assert_eq!(p.stats().in_flight, 4);
    // One ends: 3 held, the default still may not have the 4th.
    assert_eq!(p.release(), None);
    assert_eq!((p.stats().in_flight, p.depth()), (3, [0, 1, 1]));
    // Another ends: 2 held, the default goes before the flex waiter.
    assert_eq!(p.release(), Some(d));
    assert_eq!((p.stats().in_flight, p.depth()), (3, [0, 0, 1]));
    // Flex goes only below 2.
    assert_eq!(p.release(), None);
    assert_eq!((p.stats().in_flight, p.depth()), (2, [0, 0, 1]));
    assert_eq!(p.release(), Some(f));
    assert_eq!((p.stats().in_flight, p.depth()), (2, [0, 0, 0]));
    // No flex waiting: defaults take every slot, the last one included.
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    assert_eq!((p.stats().in_flight, p.depth()), (4, [0, 0, 0]));
}

#[test]
fn the_flex_headroom_comes_on_top_of_the_reserve_so_defaults_keep_a_slot_flex_cannot_take() {
    // Reserve 2 on a limit of 6 with a one-slot flex headroom: flex stops at
    // 6 - 2 - 1 = 3, defaults (while flex waits) at 4, priority at 6.
    let p = flex_pool(6, 2, 0.1);
    for _ in 0..3 {
        assert_eq!(p.admit(Lane::Flex, 1), Admit::Now);
    }
    queued(p.admit(Lane::Flex, 1));
    assert_eq!(p.stats().in_flight, 3);
    // A default arrival finds the flex headroom free; the next one waits.
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    queued(p.admit(Lane::Default, 1));
    // Priority takes both reserved slots.
    assert_eq!(p.admit(Lane::Priority, 1), Admit::Now);
    assert_eq!(p.admit(Lane::Priority, 1), Admit::Now);
    assert_eq!((p.stats().in_flight, p.depth()), (6, [0, 1, 1]));
}

#[test]
fn the_reserve_is_cut_to_leave_defaults_a_slot_and_refused_below_zero() {
    let with = |max_concurrency, reserve| PoolSpec { max_concurrency, flex_priority_reserve: reserve, ..PoolSpec::default() }.validate();
    assert_eq!(with(Some(1), 1).unwrap().flex_priority_reserve, 0);
    assert_eq!(with(Some(4), 9).unwrap().flex_priority_reserve, 3);
    assert_eq!(with(None, 1).unwrap().flex_priority_reserve, 1);
    assert_eq!(PoolSpec::default().validate().unwrap().flex_priority_reserve, 2);
    let err = with(Some(4), -1).unwrap_err().to_string();
    assert!(err.starts_with("flex_priority_reserve: must be at least 0"), "{err}");
    // In force at a limit, it leaves flex a slot beyond it and the flex
    // headroom (one slot here): 0 at 2 slots, 1 at 3, all 3 from 5 on.
    let s = with(Some(4), 9).unwrap();
    assert_eq!([2, 3, 4, 5, 40].map(|l| s.reserve_at(l)), [0, 1, 2, 3, 3]);
    // An adaptive pool keeps the default of 2 for the limits it may reach
    // (cut to its maximum less one): 0 in force at its minimum of 2, 1 at 3.
    let adaptive = PoolSpec::default().validate().unwrap();
    assert!(matches!(adaptive.limit, LimitMode::Adaptive { min: 2, .. }));
    assert_eq!([2, 3, 20].map(|l| adaptive.reserve_at(l)), [0, 1, 2]);
}

#[test]
fn on_a_pool_too_small_for_the_reserve_flex_keeps_a_slot() {
    // Two slots, reserve 1, a one-slot flex headroom: the reserve in force
    // is 0, so flex runs below 1 and defaults may take the second slot.
    let p = flex_pool(2, 1, 0.1);
    assert_eq!(p.admit(Lane::Flex, 1), Admit::Now);
    queued(p.admit(Lane::Flex, 1));
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    assert_eq!((p.stats().in_flight, p.depth()), (2, [0, 0, 1]));
    // Three slots, reserve 2: 1 in force; flex below 1, defaults below 2.
    let p = flex_pool(3, 2, 0.1);
    assert_eq!(p.admit(Lane::Flex, 1), Admit::Now);
    queued(p.admit(Lane::Flex, 1));
    assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
    queued(p.admit(Lane::Default, 1));
    assert_eq!(p.admit(Lane::Priority, 1), Admit::Now);
    assert_eq!((p.stats().in_flight, p.depth()), (3, [0, 1, 1]));
}
