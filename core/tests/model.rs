//! proptest: random operation sequences run against the real pool and a plain
//! sequential model of DESIGN.md's admission rules; every outcome, grant and
//! counter must agree. Adaptive pools get random limit changes in between:
//! the limit never leaves its bounds, no grant takes the count above the
//! limit in force, a fixed limit is never exceeded, and no slot leaks.
#![cfg(not(loom))]

use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;
use tierq_core::{Admit, Clock, Lane, ManualClock, Pool, PoolSpec, ShedCode};

#[derive(Debug, Clone)]
enum Op {
    Admit(Lane),
    /// Release the n-th held slot (mod holders).
    Release(usize),
    /// Cancel the n-th live waiter (mod waiters).
    Cancel(usize),
    AdvanceMs(u64),
    Expire,
    /// Set the limit to this many slots (clamped to the bounds; a no-op
    /// for a fixed limit).
    SetLimit(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop_oneof![Just(Lane::Priority), Just(Lane::Default), Just(Lane::Flex)].prop_map(Op::Admit),
        3 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => (0u64..40).prop_map(Op::AdvanceMs),
        1 => Just(Op::Expire),
        1 => (0u64..7).prop_map(Op::SetLimit),
    ]
}

/// One ring cell in the model: a live waiter or a tombstone awaiting the head.
#[derive(Debug, Clone, Copy)]
struct Entry {
    ticket: u64,
    joined_ms: u64,
    live: bool,
}

/// The rules, written the plain way.
struct Model {
    /// The limit in force.
    limit: usize,
    /// (min, max) for an adaptive limit; None when fixed.
    bounds: Option<(usize, usize)>,
    /// Slots only priority may take (`priority_headroom`).
    headroom: usize,
    /// Slots only priority may take while a flex request waits
    /// (`flex_priority_reserve`; the larger of it and `headroom` then).
    reserve: usize,
    /// `flex_headroom`: a share of the limit, at least one slot, that flex
    /// may not take beyond `headroom`.
    flex_share: f64,
    queue_depth: usize,
    ring_cap: usize,
    max_wait_ms: [u64; 3],
    in_flight: usize,
    lanes: [VecDeque<Entry>; 3],
    next_ticket: [u64; 3],
    now_ms: u64,
}

fn id(lane: usize, ticket: u64) -> u64 {
    ticket << 2 | lane as u64
}

impl Model {
    fn flex_slots(&self) -> usize {
        ((self.flex_share * self.limit as f64).ceil() as usize).max(1)
    }
    /// The reserve at this limit: cut so that flex keeps a slot beyond it
    /// and the flex headroom.
    fn reserve_now(&self) -> usize {
        self.reserve.min(self.limit.saturating_sub(1 + self.flex_slots()))
    }
    /// Flex is served only below the limit minus what priority keeps minus
    /// the flex headroom.
    fn flex_limit(&self) -> usize {
        self.limit.saturating_sub(self.headroom.max(self.reserve_now()) + self.flex_slots())
    }
    /// Slots a default may not take now.
    fn hr(&self) -> usize {
        if self.reserve > self.headroom && self.lane_depth(2) > 0 { self.headroom.max(self.reserve_now()) } else { self.headroom }
    }
    fn depth(&self) -> usize {
        self.lanes.iter().map(|l| l.iter().filter(|e| e.live).count()).sum()
    }
    fn lane_depth(&self, lane: usize) -> u32 {
        self.lanes[lane].iter().filter(|e| e.live).count() as u32
    }
    fn reap(&mut self, lane: usize) {
        while self.lanes[lane].front().is_some_and(|e| !e.live) {
            self.lanes[lane].pop_front();
        }
    }
    fn pop_next(&mut self, allow_default: bool, allow_flex: bool) -> Option<u64> {
        let lanes: &[usize] = match (allow_default, allow_flex) {
            (false, _) => &[0],
            (true, false) => &[0, 1],
            (true, true) => &[0, 1, 2],
        };
        for &lane in lanes {
            self.reap(lane);
            if let Some(e) = self.lanes[lane].pop_front() {
                return Some(id(lane, e.ticket));
            }
        }
        None
    }
    fn admit(&mut self, lane: Lane) -> (Option<ShedCode>, Option<u64>, Option<u64>) {
        let l = lane as usize;
        // Defaults never take the headroom; with headroom, only priority
        // waiters are ahead of a priority arrival. Flex waiters are never
        // ahead of the others; every waiter is ahead of a flex arrival.
        let sold = (self.lane_depth(0) + self.lane_depth(1)) as usize;
        let (limit, ahead) = match lane {
            Lane::Priority if self.headroom > 0 || self.reserve > 0 => (self.limit, self.lane_depth(0) as usize),
            Lane::Priority => (self.limit, sold),
            Lane::Default => (self.limit - self.hr(), sold),
            Lane::Flex => (self.flex_limit(), self.depth()),
        };
        if ahead == 0 && self.in_flight < limit {
            self.in_flight += 1;
            return (None, None, None);
        }
        let mut evicted = None;
        if self.depth() >= self.queue_depth {
            // The newest flex waiter goes first, then (for priority) the
            // newest default one; none for an arrival that would find its
            // own ring full.
            let victims: &[usize] = match lane {
                Lane::Priority => &[2, 1],
                Lane::Default => &[2],
                Lane::Flex => &[],
            };
            let room = self.lanes[l].len() < self.ring_cap;
            let victim = victims.iter().copied().find(|&v| room && self.lanes[v].iter().any(|e| e.live));
            match victim {
                Some(v) => {
                    let e = self.lanes[v].iter_mut().rev().find(|e| e.live).unwrap();
                    e.live = false;
                    evicted = Some(id(v, e.ticket));
                    self.reap(v);
                }
                None => return (Some(ShedCode::ServerOverloaded), None, None),
            }
        }
        if self.lanes[l].len() >= self.ring_cap {
            return (Some(ShedCode::ServerOverloaded), evicted, None);
        }
        let ticket = self.next_ticket[l];
        self.next_ticket[l] += 1;
        self.lanes[l].push_back(Entry { ticket, joined_ms: self.now_ms, live: true });
        (None, evicted, self.dispatch())
    }
    /// A free slot, if any, to the next waiter the rule allows.
    fn dispatch(&mut self) -> Option<u64> {
        if self.in_flight >= self.limit {
            return None;
        }
        let next = self.pop_next(self.in_flight < self.limit - self.hr(), self.in_flight < self.flex_limit());
        if next.is_some() {
            self.in_flight += 1;
        }
        next
    }
    fn release(&mut self) -> Option<u64> {
        // Over a lowered limit, the slot is freed, not handed on.
        if self.headroom > 0 || self.reserve > 0 || self.in_flight > self.limit {
            self.in_flight -= 1;
            return self.dispatch();
        }
        // Handed straight on to priority or default only; flex is decided
        // by a dispatch once the slot is free.
        let next = self.pop_next(true, false);
        if next.is_none() {
            self.in_flight -= 1;
            return self.dispatch();
        }
        next
    }
    /// A new limit; if it rose, every new slot goes to a waiter at once.
    fn set_limit(&mut self, n: usize) -> Vec<u64> {
        let Some((min, max)) = self.bounds else { return vec![] };
        let old = self.limit;
        self.limit = n.clamp(min, max);
        let mut granted = vec![];
        if self.limit > old {
            while let Some(id) = self.dispatch() {
                granted.push(id);
            }
        }
        granted
    }
    fn live_ids(&self) -> Vec<u64> {
        (0..3).flat_map(|l| self.lanes[l].iter().filter(|e| e.live).map(move |e| id(l, e.ticket))).collect()
    }
    fn cancel(&mut self, target: u64) {
        let l = (target & 3) as usize;
        for e in self.lanes[l].iter_mut() {
            if id(l, e.ticket) == target {
                e.live = false;
            }
        }
        self.reap(l);
    }
    fn expire(&mut self) -> Vec<u64> {
        let mut out = vec![];
        for l in 0..3 {
            loop {
                self.reap(l);
                match self.lanes[l].front() {
                    Some(e) if e.joined_ms + self.max_wait_ms[l] <= self.now_ms => {
                        out.push(id(l, e.ticket));
                        self.lanes[l].pop_front();
                    }
                    _ => break,
                }
            }
        }
        out
    }
}

/// `bounds`: Some((min, max)) for an adaptive limit starting at `limit`.
fn run(ops: Vec<Op>, limit: usize, bounds: Option<(usize, usize)>, queue_depth: usize, (headroom, reserve): (usize, usize), flex_share: f64) -> Result<(), TestCaseError> {
    let clock = Arc::new(ManualClock::new(0));
    let spec = match bounds {
        None => PoolSpec { max_concurrency: Some(limit as i64), ..PoolSpec::default() },
        Some((min, max)) => PoolSpec {
            min_concurrency: Some(min as i64),
            max_concurrency_limit: Some(max as i64),
            initial_concurrency: Some(limit as i64),
            ..PoolSpec::default()
        },
    };
    let settings = PoolSpec {
        queue_depth: queue_depth as i64,
        max_wait_ms: [80.0, 50.0, 120.0],
        priority_headroom: headroom as i64,
        flex_priority_reserve: reserve as i64,
        flex_headroom: flex_share,
        // The model is first come, first served inside a lane: today's
        // order, kept as `fairness = "off"`. The fair order has its own
        // model below (`fair_pool_keeps_the_invariants_and_the_service_bound`).
        fairness: "off".into(),
        ..spec
    }
    .validate()
    .unwrap();
    let ring_cap = settings.ring_cap();
    let pool = Pool::new(settings, Clock::Manual(clock.clone()));
    let mut m = Model {
        limit,
        bounds,
        headroom,
        reserve,
        flex_share,
        queue_depth,
        ring_cap,
        max_wait_ms: [80, 50, 120],
        in_flight: 0,
        lanes: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
        next_ticket: [0, 0, 0],
        now_ms: 0,
    };
    for op in ops {
        match op {
            Op::Admit(lane) => {
                let want = m.admit(lane);
                let decided = pool.admit(lane, 1);
                let got = match decided {
                    Admit::Now => (None, None, None),
                    Admit::Queued { evicted, granted, .. } => (None, evicted, granted),
                    Admit::Shed { code, .. } => (Some(code), None, None),
                };
                prop_assert_eq!(got, want, "admit {:?}", lane);
                if decided == Admit::Now || got.2.is_some() {
                    // A grant never takes the count over the limit in force.
                    prop_assert!(pool.stats().in_flight as usize <= m.limit, "granted over the limit");
                }
            }
            Op::SetLimit(n) => {
                let granted = pool.set_limit(n);
                prop_assert_eq!(granted.clone(), m.set_limit(n as usize));
                if !granted.is_empty() {
                    prop_assert!(pool.stats().in_flight as usize <= m.limit, "granted over the limit");
                }
            }
            Op::Release(_) if m.in_flight == 0 => {}
            Op::Release(_) => {
                let granted = pool.release();
                prop_assert_eq!(granted, m.release());
                if granted.is_some() {
                    prop_assert!(pool.stats().in_flight as usize <= m.limit, "handed on over the limit");
                }
            }
            Op::Cancel(n) => {
                let live = m.live_ids();
                if !live.is_empty() {
                    let target = live[n % live.len()];
                    prop_assert!(pool.cancel(target));
                    prop_assert!(!pool.cancel(target), "cancelled twice");
                    m.cancel(target);
                }
            }
            Op::AdvanceMs(ms) => {
                clock.advance_ns(ms * 1_000_000);
                m.now_ms += ms;
            }
            Op::Expire => {
                let mut got = vec![];
                pool.expire_due(|id| got.push(id));
                prop_assert_eq!(got, m.expire());
            }
        }
        let s = pool.stats();
        prop_assert_eq!(s.in_flight as usize, m.in_flight);
        prop_assert_eq!(s.depth, [m.lane_depth(0), m.lane_depth(1), m.lane_depth(2)]);
        // Flex never holds a slot above the flex limit of the limit it was
        // granted under: with no flex waiter left behind a free flex slot.
        prop_assert!(s.depth[2] == 0 || s.in_flight as usize >= m.flex_limit() || s.depth[0] + s.depth[1] > 0 || m.in_flight > m.limit,
            "a flex waiter left waiting beside an idle slot");
        prop_assert_eq!(s.limit as usize, m.limit);
        match bounds {
            None => prop_assert!(s.in_flight as usize <= limit, "a fixed limit exceeded"),
            Some((min, max)) => prop_assert!((min..=max).contains(&(s.limit as usize)), "limit out of bounds"),
        }
    }
    // No slot leaks: with every waiter gone, releasing what is held empties the pool.
    for id in m.live_ids() {
        prop_assert!(pool.cancel(id));
        m.cancel(id);
    }
    for _ in 0..m.in_flight {
        prop_assert_eq!(pool.release(), None);
    }
    let s = pool.stats();
    prop_assert_eq!((s.in_flight, s.depth), (0, [0, 0, 0]));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_the_sequential_model(
        ops in prop::collection::vec(op(), 1..200),
        (max_concurrency, headroom, reserve) in (1usize..6).prop_flat_map(|m| (Just(m), 0..m, 0..m)),
        queue_depth in 0usize..6,
        flex_share in prop_oneof![Just(0.0), Just(0.1), Just(0.25), Just(0.5)],
    ) {
        run(ops, max_concurrency, None, queue_depth, (headroom, reserve), flex_share)?;
    }

    #[test]
    fn a_moving_limit_matches_the_model(
        ops in prop::collection::vec(op(), 1..200),
        (min, max, initial, headroom) in (1usize..4)
            .prop_flat_map(|min| (Just(min), min..6))
            .prop_flat_map(|(min, max)| (Just(min), Just(max), min..=max, (0..min, 0..min))),
        queue_depth in 0usize..6,
        flex_share in prop_oneof![Just(0.0), Just(0.1), Just(0.25), Just(0.5)],
    ) {
        run(ops, initial, Some((min, max)), queue_depth, headroom, flex_share)?;
    }
}

// ------------------------------------------------------------ fair order --

use std::collections::{HashMap, HashSet};
use tierq_core::{fair, Ask};

fn fair_pool(limit: i64, queue_depth: i64) -> (Pool, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1));
    let s = PoolSpec { max_concurrency: Some(limit), queue_depth, max_wait_ms: [80.0, 50.0, 600_000.0], ..PoolSpec::default() }.validate().unwrap();
    (Pool::new(s, Clock::Manual(clock.clone())), clock)
}

#[derive(Debug, Clone)]
enum FairOp {
    /// Flow (0..4), lane, charge, weight (index into WEIGHTS).
    Admit(usize, Lane, u64, usize),
    /// Release the n-th held slot, settling it at this real charge.
    Release(usize, u64),
    Cancel(usize),
    AdvanceMs(u64),
    Expire,
}

const WEIGHTS: [u32; 3] = [100, 200, 400];

fn fair_op() -> impl Strategy<Value = FairOp> {
    let lane = prop_oneof![1 => Just(Lane::Priority), 3 => Just(Lane::Default), 1 => Just(Lane::Flex)];
    prop_oneof![
        5 => (0usize..4, lane, 0u64..50, 0usize..3).prop_map(|(f, l, c, w)| FairOp::Admit(f, l, c, w)),
        3 => (any::<usize>(), 0u64..80).prop_map(|(n, c)| FairOp::Release(n, c)),
        1 => any::<usize>().prop_map(FairOp::Cancel),
        1 => (0u64..40).prop_map(FairOp::AdvanceMs),
        1 => Just(FairOp::Expire),
    ]
}

/// A held slot: its lane, queue and the service charged for it.
type Held = (Lane, u32, u64);

/// Random flows, weights, charges, settles, cancels and expiries on a fair
/// pool: no grant takes the count over the limit, every waiter is decided
/// exactly once (granted, cancelled, expired or evicted), the depth is the
/// live waiters, and once everything is released no waiter is left behind
/// and no flow queue is left counted active.
fn run_fair(ops: Vec<FairOp>, limit: i64, queue_depth: i64) -> Result<(), TestCaseError> {
    let (pool, clock) = fair_pool(limit, queue_depth);
    let flows: Vec<(u32, u32)> = (0..4).map(|i| pool.hand(format!("key-{i}").as_bytes())).collect();
    let mut held: Vec<Held> = Vec::new();
    // Live waiters: id -> (lane, service charged at dispatch).
    let mut live: HashMap<u64, (Lane, u64)> = HashMap::new();
    let mut decided: HashSet<u64> = HashSet::new();
    let grant = |id: u64, live: &mut HashMap<u64, (Lane, u64)>, decided: &mut HashSet<u64>, held: &mut Vec<Held>| -> Result<(), TestCaseError> {
        prop_assert!(decided.insert(id), "waiter {} decided twice", id);
        let (lane, svc) = live.remove(&id).ok_or_else(|| TestCaseError::fail(format!("granted {id}, not waiting")))?;
        held.push((lane, u32::MAX, svc));
        Ok(())
    };
    let shed = |id: u64, live: &mut HashMap<u64, (Lane, u64)>, decided: &mut HashSet<u64>| -> Result<(), TestCaseError> {
        prop_assert!(decided.insert(id), "waiter {} decided twice", id);
        prop_assert!(live.remove(&id).is_some(), "shed {} not waiting", id);
        Ok(())
    };
    for op in ops {
        match op {
            FairOp::Admit(f, lane, charge, w) => {
                let svc = fair::service(charge, WEIGHTS[w]);
                let ask = Ask { hand: flows[f], service: svc, max_wait_ns: None };
                let (decided_now, placed) = pool.admit_ask(lane, 1, &ask);
                prop_assert!(placed.queue == flows[f].0 || placed.queue == flows[f].1, "joined a queue outside its hand");
                match decided_now {
                    Admit::Now => held.push((lane, placed.queue, svc)),
                    Admit::Queued { waiter, evicted, granted } => {
                        live.insert(waiter, (lane, svc));
                        if let Some(v) = evicted {
                            shed(v, &mut live, &mut decided)?;
                        }
                        if let Some(g) = granted {
                            grant(g, &mut live, &mut decided, &mut held)?;
                        }
                    }
                    Admit::Shed { evicted, .. } => {
                        if let Some(v) = evicted {
                            shed(v, &mut live, &mut decided)?;
                        }
                    }
                }
            }
            FairOp::Release(_, _) if held.is_empty() => {}
            FairOp::Release(n, real) => {
                let (lane, queue, svc) = held.swap_remove(n % held.len());
                if queue != u32::MAX {
                    pool.settle(lane, queue, svc, real.max(1) * 100);
                }
                if let Some(g) = pool.release() {
                    grant(g, &mut live, &mut decided, &mut held)?;
                }
            }
            FairOp::Cancel(n) => {
                let mut ids: Vec<u64> = live.keys().copied().collect();
                ids.sort();
                if !ids.is_empty() {
                    let id = ids[n % ids.len()];
                    prop_assert!(pool.cancel(id));
                    prop_assert!(!pool.cancel(id), "cancelled twice");
                    shed(id, &mut live, &mut decided)?;
                }
            }
            FairOp::AdvanceMs(ms) => {
                clock.advance_ns(ms * 1_000_000);
            }
            FairOp::Expire => {
                let mut gone = vec![];
                pool.expire_due(|id| gone.push(id));
                for id in gone {
                    shed(id, &mut live, &mut decided)?;
                }
            }
        }
        let s = pool.stats();
        prop_assert!(s.in_flight as i64 <= limit, "granted over the limit");
        prop_assert_eq!(s.in_flight as usize, held.len());
        let lane_live = |l: Lane| live.values().filter(|(ll, _)| *ll == l).count() as u32;
        prop_assert_eq!(s.depth, [lane_live(Lane::Priority), lane_live(Lane::Default), lane_live(Lane::Flex)]);
    }
    // No lost waiter: releasing every slot grants every waiter left, once.
    while let Some((lane, queue, svc)) = held.pop() {
        if queue != u32::MAX {
            pool.settle(lane, queue, svc, svc);
        }
        if let Some(g) = pool.release() {
            grant(g, &mut live, &mut decided, &mut held)?;
        }
    }
    // Flex waits on: a pool of one slot keeps it as flex's headroom.
    prop_assert!(live.values().all(|(l, _)| *l == Lane::Flex) && (live.is_empty() || limit == 1), "waiters left behind: {:?}", live);
    for id in live.keys() {
        prop_assert!(pool.cancel(*id));
    }
    let s = pool.stats();
    prop_assert_eq!((s.in_flight, s.depth, s.fair_flows_active), (0, [0, 0, 0], [0, 0, 0]));
    Ok(())
}

/// Flows backlogged together, each in a flow queue of its own (an `Ask`
/// whose hand names one queue twice), requests of random charges and
/// weights, joined in a random interleaving behind one held slot, then
/// served one at a time: while every flow still waits, any two flows'
/// service (charge over weight, as charged) differs by at most twice the
/// largest single request's service. (With exact charges the counters of
/// two backlogged queues stay within one request's service, since the
/// least is served next; settles correct a counter after the fact, by up to
/// the corrections of the requests in flight.)
fn run_bound(backlogs: Vec<Vec<(u64, usize)>>, order: Vec<usize>) -> Result<(), TestCaseError> {
    let (pool, _clock) = fair_pool(1, 512);
    let holder = Ask { hand: (60, 60), service: 100, max_wait_ns: None };
    prop_assert_eq!(pool.admit_ask(Lane::Default, 1, &holder).0, Admit::Now);
    let mut left: Vec<usize> = backlogs.iter().map(|b| b.len()).collect();
    let mut next = vec![0usize; backlogs.len()];
    let mut flow_of: HashMap<u64, (usize, u64)> = HashMap::new();
    let mut max_svc = 0;
    // Join in the random interleaving, then whatever is left in flow order.
    let mut arrivals: Vec<usize> = order.into_iter().map(|o| o % backlogs.len()).collect();
    arrivals.extend((0..backlogs.len()).flat_map(|f| std::iter::repeat(f).take(backlogs[f].len())));
    for f in arrivals {
        if next[f] == backlogs[f].len() {
            continue;
        }
        let (charge, w) = backlogs[f][next[f]];
        next[f] += 1;
        let svc = fair::service(charge, WEIGHTS[w]);
        max_svc = max_svc.max(svc);
        let ask = Ask { hand: (f as u32, f as u32), service: svc, max_wait_ns: None };
        let (Admit::Queued { waiter, granted: None, .. }, _) = pool.admit_ask(Lane::Default, 1, &ask) else {
            return Err(TestCaseError::fail("the slot is held: it must queue"));
        };
        flow_of.insert(waiter, (f, svc));
    }
    let mut served = vec![0u64; backlogs.len()];
    while let Some(g) = pool.release() {
        let (f, svc) = flow_of.remove(&g).ok_or_else(|| TestCaseError::fail("granted an unknown waiter"))?;
        served[f] += svc;
        left[f] -= 1;
        if left.iter().all(|&n| n > 0) {
            let (lo, hi) = (served.iter().min().unwrap(), served.iter().max().unwrap());
            prop_assert!(hi - lo <= 2 * max_svc, "service gap {} > 2 x {} ({:?})", hi - lo, max_svc, served);
        }
    }
    prop_assert!(flow_of.is_empty(), "waiters left behind");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn fair_pool_keeps_the_invariants_with_flows_weights_and_settles(
        ops in prop::collection::vec(fair_op(), 1..250),
        limit in 1i64..4,
        queue_depth in 1i64..12,
    ) {
        run_fair(ops, limit, queue_depth)?;
    }

    #[test]
    fn backlogged_flows_stay_within_twice_one_requests_service(
        backlogs in prop::collection::vec(prop::collection::vec((0u64..100, 0usize..3), 1..30), 2..4),
        order in prop::collection::vec(any::<usize>(), 0..90),
    ) {
        run_bound(backlogs, order)?;
    }
}

// ---- replicas ----------------------------------------------------------------------
// Random picks, releases and engine queues against a plain model of the grant
// rule (docs/gateway.md, "Routing among replicas"): each pick made only while
// the pool would have a slot (fewer held than the replicas' limits summed),
// as the pool guarantees; every choice agrees, no replica goes over its limit.

use tierq_core::replicas::{order_word, Replicas, Rule};
use tierq_core::LimitMode;

#[derive(Debug, Clone)]
enum RepOp {
    /// Pick with this order (a permutation seed) and rule (0, 1, 2).
    Pick(u64, u8),
    /// Release the n-th held slot (mod holders).
    Release(usize),
    /// The engine of replica r reports this many waiting.
    Waiting(usize, u64),
}

fn rep_op() -> impl Strategy<Value = RepOp> {
    prop_oneof![
        4 => (any::<u64>(), 0u8..3).prop_map(|(s, r)| RepOp::Pick(s, r)),
        3 => any::<usize>().prop_map(RepOp::Release),
        1 => (0usize..16, 0u64..4).prop_map(|(r, w)| RepOp::Waiting(r, w)),
    ]
}

fn permutation(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..n as u8).collect();
    for i in (1..n).rev() {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (seed >> 33) as usize % (i + 1));
    }
    v
}

fn model_pick(held: &[u64], waiting: &[u64], limit: u64, order: &[u8], rule: u8) -> usize {
    let n = held.len();
    let load = |r: usize| held[r] + waiting[r];
    let room = |r: usize| held[r] < limit;
    let least = || {
        let mut best: Option<usize> = None;
        for &r in order {
            let r = r as usize;
            if room(r) && best.is_none_or(|b| load(r) * limit < load(b) * limit) {
                best = Some(r);
            }
        }
        best
    };
    let choice = match rule {
        0 => order.iter().map(|&r| r as usize).find(|&r| room(r)),
        2 => least(),
        _ => {
            let total: u64 = (0..n).map(load).sum();
            let lim = limit * n as u64;
            order.iter().map(|&r| r as usize)
                .find(|&r| room(r) && load(r) < (5 * (total + 1) * limit).div_ceil(4 * lim))
                .or_else(least)
        }
    };
    choice.expect("the pool had a slot, so some replica has room")
}

fn run_replicas(n: usize, limit: u32, ops: Vec<RepOp>) -> Result<(), TestCaseError> {
    let real = Replicas::new(n, LimitMode::Fixed(limit), 1, Clock::Manual(Arc::new(ManualClock::new(1)))).unwrap();
    let mut held = vec![0u64; n];
    let mut waiting = vec![0u64; n];
    let mut holders: Vec<usize> = Vec::new();
    for op in ops {
        match op {
            RepOp::Pick(seed, rule) => {
                if holders.len() as u64 >= real.capacity() {
                    continue; // the pool would not grant
                }
                let order = permutation(n, seed);
                let want = model_pick(&held, &waiting, limit as u64, &order, rule);
                let got = real.pick(order_word(&order), Rule::from_u8(rule).unwrap());
                prop_assert_eq!(got, want, "order {:?} rule {} held {:?} waiting {:?}", order, rule, held, waiting);
                held[got] += 1;
                holders.push(got);
            }
            RepOp::Release(i) => {
                if holders.is_empty() {
                    continue;
                }
                let r = holders.swap_remove(i % holders.len());
                real.release(r).unwrap();
                held[r] -= 1;
            }
            RepOp::Waiting(r, w) => {
                let r = r % n;
                real.observe_engine(r, 1, w, None, 0).unwrap();
                waiting[r] = w;
            }
        }
        let stats = real.stats();
        for (r, s) in stats.iter().enumerate() {
            prop_assert_eq!(s.in_flight, held[r]);
            prop_assert!(s.in_flight <= limit as u64);
        }
        prop_assert_eq!(real.over(), 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replica_picks_follow_the_grant_rule_and_never_go_over(
        n in 1usize..6, limit in 1u32..5, ops in proptest::collection::vec(rep_op(), 1..120),
    ) {
        run_replicas(n, limit, ops)?;
    }
}
