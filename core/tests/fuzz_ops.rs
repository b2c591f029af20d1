//! The fuzz harness for the admission core, shared by the libFuzzer targets in
//! `fuzz/` and the plain corpus replay in `core/tests/fuzz_corpus.rs`: input
//! bytes decode into pool settings and a sequence of operations, run against a
//! `Pool` on a manual clock next to a plain sequential model; any broken
//! invariant panics with the operation that broke it.
//!
//! Included by `#[path]`, not a crate: one copy, no feature in the core, and
//! the stable test build never needs the fuzzer.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tierq_core::{Admit, BucketParams, Clock, Decision, Lane, ManualClock, Pool, PoolSettings, PoolSpec, ShedCode, TokenBucket};

/// Reads the input a byte at a time; a short input reads as zeros.
pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, at: 0 }
    }
    pub fn done(&self) -> bool {
        self.at >= self.data.len()
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    pub fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| acc << 8 | self.u8() as u64)
    }
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.u8() as usize % from.len()]
    }
}

/// Operations of `admission_ops`, one or two bytes each.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Admit(Lane, u64),
    /// Release the n-th held slot (no-op when none is held).
    Release,
    /// Cancel the n-th live waiter (mod live waiters).
    Cancel(u8),
    /// Cancel (and ask the deadline of) a waiter already decided: must be refused.
    CancelDecided(u8),
    AdvanceNs(u64),
    Expire,
    /// An explicit dispatch (Python calls it after cancels): must grant only
    /// what the rule says, which in a settled pool is nothing.
    Dispatch,
}

const ADVANCE_UNIT_NS: [u64; 4] = [1, 1_000, 1_000_000, 50_000_000];

pub fn decode_op(b: &mut Bytes) -> Op {
    let k = b.u8();
    match k % 8 {
        0 | 1 => Op::Admit(if k & 8 == 0 { Lane::Priority } else { Lane::Default }, (k >> 4) as u64 & 3),
        2 => Op::Release,
        3 => Op::Cancel(b.u8()),
        4 => Op::AdvanceNs(b.u8() as u64 * ADVANCE_UNIT_NS[(k >> 3) as usize & 3]),
        5 => Op::Expire,
        6 => Op::CancelDecided(b.u8()),
        _ => Op::Dispatch,
    }
}

/// Pool settings from the first four bytes: small pools, so the fuzzer
/// reaches full queues, full rings and evictions in a few operations.
pub fn decode_settings(b: &mut Bytes, fairness: &str) -> PoolSettings {
    let max_concurrency = 1 + b.u8() as i64 % 4;
    let queue_depth = b.u8() as i64 % 7;
    let waits = [0.0, 0.005, 1.0, 50.0, 200.0];
    let (wait_default, wait_priority) = (b.pick(&waits), b.pick(&waits));
    let k = b.u8();
    let default_min_share = [0.0, 0.0, 0.25, 0.5, 1.0][k as usize % 5];
    let (rate, burst, reserve) = match (k / 5) % 4 {
        0 | 1 => (None, None, 0.2),
        2 => (Some([1.0, 10.0, 1000.0][(k / 20) as usize % 3]), Some([1.0, 2.0, 5.0][(k / 60) as usize % 3]), 0.0),
        _ => (Some([1.0, 10.0, 1000.0][(k / 20) as usize % 3]), Some([1.0, 2.0, 5.0][(k / 60) as usize % 3]), 0.5),
    };
    PoolSpec { max_concurrency: Some(max_concurrency), queue_depth: queue_depth, max_wait_ms: [wait_priority, wait_default, 600_000.0], rate: rate, burst: burst, priority_reserve: reserve, default_min_share: default_min_share, fairness: fairness.into(), ..PoolSpec::default() }.validate()
        .expect("decoded settings are valid")
}

/// One ring cell in the model: a live waiter or a tombstone awaiting the head.
#[derive(Debug, Clone, Copy)]
struct Entry {
    ticket: u64,
    joined_ns: u64,
    live: bool,
}

fn wid(lane: usize, ticket: u64) -> u64 {
    ticket << 2 | lane as u64
}

/// The lanes this model drives: flex (served from idle capacity, never
/// work conserving) has its own sequential model in tests/model.rs.
const LANES: [Lane; 2] = [Lane::Priority, Lane::Default];

/// The plain sequential model plus the bookkeeping the invariants need.
struct Model {
    s: PoolSettings,
    ring_cap: usize,
    share_fp: u64,
    /// Fair order inside a lane: the pool's pick is any live waiter of the
    /// lane the rule names (its order is the proptest flow model's concern);
    /// otherwise first come, first served, exactly.
    fair: bool,
    credit: u64,
    in_flight: u32,
    lanes: [VecDeque<Entry>; 2],
    next_ticket: [u64; 2],
    /// Every waiter ever queued and its fate; `None` while it waits.
    fate: BTreeMap<u64, Option<&'static str>>,
    admitted: [u64; 2],
    shed: [u64; 3],
    cancelled: u64,
    /// Bucket TAT, exact (u128: no saturation to hide an overflow).
    tat: u128,
    now: u64,
}

impl Model {
    fn live(&self, lane: usize) -> u32 {
        self.lanes[lane].iter().filter(|e| e.live).count() as u32
    }
    fn depth(&self) -> u32 {
        self.live(0) + self.live(1)
    }
    fn reap(&mut self, lane: usize) {
        while self.lanes[lane].front().is_some_and(|e| !e.live) {
            self.lanes[lane].pop_front();
        }
    }
    fn decide(&mut self, id: u64, fate: &'static str) {
        match self.fate.get_mut(&id) {
            Some(slot @ None) => *slot = Some(fate),
            Some(Some(before)) => panic!("waiter {id} decided twice: {before}, then {fate}"),
            None => panic!("waiter {id} decided ({fate}) but never queued"),
        }
    }
    /// The dispatch rule: strict priority, except that `default_min_share`
    /// of dispatches made while both lanes wait go to the default lane.
    fn pop_next(&mut self, got: Option<u64>) -> Option<u64> {
        let mut order = [0, 1];
        if self.share_fp > 0 && self.live(0) > 0 && self.live(1) > 0 {
            self.credit += self.share_fp;
            if self.credit >= 1_000_000 {
                self.credit -= 1_000_000;
                order = [1, 0];
            }
        }
        for lane in order {
            self.reap(lane);
            // While tombstones crowd the ring (3/4 of its cells), the fair
            // pool takes the front too, and like `pop` leaves the tombstones
            // behind it; a fair pick elsewhere reaps the front after it.
            let crowded = self.lanes[lane].len() >= self.ring_cap * 3 / 4;
            let picked = got.filter(|&id| self.fair && !crowded && (id & 3) as usize == lane);
            if let Some(e) = picked.and_then(|id| self.lanes[lane].iter_mut().find(|e| e.live && wid(lane, e.ticket) == id)) {
                e.live = false;
                let id = wid(lane, e.ticket);
                self.reap(lane);
                self.decide(id, "granted");
                self.admitted[lane] += 1;
                return Some(id);
            }
            if let Some(e) = self.lanes[lane].pop_front() {
                let id = wid(lane, e.ticket);
                self.decide(id, "granted");
                self.admitted[lane] += 1;
                return Some(id);
            }
        }
        None
    }
    fn bucket_take(&mut self, lane: Lane, cost: u64) -> Result<(), u64> {
        let Some(p) = self.s.bucket else { return Ok(()) };
        let limit = match lane {
            Lane::Priority => p.tau_ns as u128,
            Lane::Default | Lane::Flex => (p.tau_ns as u128 - p.reserve_ns as u128).max(p.interval_ns as u128),
        };
        let need = cost as u128 * p.interval_ns as u128;
        if need > limit {
            return Err(u64::MAX);
        }
        let now = self.now as u128;
        let new_tat = self.tat.max(now) + need;
        if new_tat - now <= limit {
            self.tat = new_tat;
            Ok(())
        } else {
            Err((new_tat - now - limit) as u64)
        }
    }
    fn bucket_refund(&mut self, cost: u64) {
        if let Some(p) = self.s.bucket {
            let shift = cost as u128 * p.interval_ns as u128;
            self.tat = self.tat.saturating_sub(shift).max((self.now as u128).min(self.tat));
        }
    }
}

/// Runs one `admission_ops` input twice, first come first served and fair;
/// panics on the first broken invariant.
pub fn run_admission(data: &[u8]) {
    run_admission_with(data, "off");
    run_admission_with(data, "tokens");
}

fn run_admission_with(data: &[u8], fairness: &str) {
    let mut b = Bytes::new(data);
    let settings = decode_settings(&mut b, fairness);
    let clock = Arc::new(ManualClock::new(1_000_000_000));
    let pool = Pool::new(settings.clone(), Clock::Manual(clock.clone()));
    let mut m = Model {
        ring_cap: settings.ring_cap(),
        share_fp: (settings.default_min_share * 1e6).round() as u64,
        fair: fairness != "off",
        s: settings,
        credit: 0,
        in_flight: 0,
        lanes: [VecDeque::new(), VecDeque::new()],
        next_ticket: [0, 0],
        fate: BTreeMap::new(),
        admitted: [0, 0],
        shed: [0; 3],
        cancelled: 0,
        tat: 0,
        now: clock.now_ns(),
    };
    let mut n_ops = 0;
    // FUZZ_TRACE=1 prints each operation and the model's lanes (debugging a crash).
    let trace = std::env::var_os("FUZZ_TRACE").is_some();
    while !b.done() && n_ops < 4096 {
        n_ops += 1;
        let op = decode_op(&mut b);
        if trace {
            eprintln!("{op:?}  in_flight {} lanes {:?}", m.in_flight, m.lanes.iter().map(|l| l.iter().map(|e| (e.ticket, e.live)).collect::<Vec<_>>()).collect::<Vec<_>>());
        }
        step(&pool, &clock, &mut m, op);
        check(&pool, &m, op);
    }
    // Wind down: every slot released hands itself on until no one waits;
    // then every waiter ever queued has been decided exactly once.
    while m.in_flight > 0 {
        step(&pool, &clock, &mut m, Op::Release);
        check(&pool, &m, Op::Release);
    }
    let undecided: Vec<_> = m.fate.iter().filter(|(_, f)| f.is_none()).map(|(id, _)| *id).collect();
    assert!(undecided.is_empty(), "waiters never decided: {undecided:?}");
    assert_eq!(pool.stats().depth, [0, 0, 0]);
}

fn grant(m: &mut Model, got: Option<u64>, what: &str) {
    let strict_ok = |m: &Model, id: u64| m.share_fp > 0 || id & 3 == 0 || m.live(0) == 0;
    if let Some(id) = got {
        // Checked before the model pops: the pool must never pass over a
        // waiting priority request for a default one under strict priority.
        assert!(strict_ok(m, id), "{what}: default waiter {id} granted while {} priority waiting", m.live(0));
    }
    let want = m.pop_next(got);
    assert_eq!(got, want, "{what}: granted");
}

fn step(pool: &Pool, clock: &ManualClock, m: &mut Model, op: Op) {
    match op {
        Op::Admit(lane, cost) => {
            let l = lane as usize;
            let got = pool.admit(lane, cost);
            if let Err(wait) = m.bucket_take(lane, cost) {
                m.shed[ShedCode::RateLimitExceeded as usize] += 1;
                assert_eq!(got, Admit::Shed { code: ShedCode::RateLimitExceeded, retry_after_ns: wait, evicted: None }, "{op:?}");
                return;
            }
            if m.depth() == 0 && m.in_flight < m.s.limit.max() {
                m.in_flight += 1;
                m.admitted[l] += 1;
                assert_eq!(got, Admit::Now, "{op:?}");
                return;
            }
            let mut evicted = None;
            if m.depth() >= m.s.queue_depth {
                // A priority arrival evicts the newest default waiter, unless its
                // own ring has no free cell (it would be shed anyway).
                let room = m.lanes[l].len() < m.ring_cap;
                let newest = if lane == Lane::Priority && room { m.lanes[1].iter_mut().rev().find(|e| e.live) } else { None };
                match newest {
                    Some(e) => {
                        e.live = false;
                        let id = wid(1, e.ticket);
                        evicted = Some(id);
                        m.reap(1);
                        m.decide(id, "evicted");
                        m.shed[ShedCode::ServerOverloaded as usize] += 1;
                    }
                    None => {
                        m.bucket_refund(cost);
                        m.shed[ShedCode::ServerOverloaded as usize] += 1;
                        assert!(matches!(got, Admit::Shed { code: ShedCode::ServerOverloaded, evicted: None, .. }), "{op:?}: {got:?}");
                        return;
                    }
                }
            }
            if m.lanes[l].len() >= m.ring_cap {
                // Every cell holds a waiter or a tombstone behind a live head.
                m.bucket_refund(cost);
                m.shed[ShedCode::ServerOverloaded as usize] += 1;
                match got {
                    Admit::Shed { code: ShedCode::ServerOverloaded, evicted: got_evicted, .. } => {
                        assert!(evicted.is_none(), "{op:?}: waiter {evicted:?} evicted for an arrival then shed itself");
                        assert_eq!(got_evicted, None, "{op:?}: evicted");
                    }
                    other => panic!("{op:?}: lane ring full, got {other:?}"),
                }
                return;
            }
            let ticket = m.next_ticket[l];
            m.next_ticket[l] += 1;
            let id = wid(l, ticket);
            m.lanes[l].push_back(Entry { ticket, joined_ns: m.now, live: true });
            m.fate.insert(id, None);
            let Admit::Queued { waiter, evicted: got_evicted, granted } = got else {
                panic!("{op:?}: expected to queue as {id}, got {got:?}");
            };
            assert_eq!(waiter, id, "{op:?}: ticket");
            assert_eq!(got_evicted, evicted, "{op:?}: evicted");
            if m.in_flight < m.s.limit.max() {
                m.in_flight += 1;
                grant(m, granted, "admit");
            } else {
                assert_eq!(granted, None, "{op:?}: granted with every slot in use");
            }
        }
        Op::Release => {
            if m.in_flight == 0 {
                return;
            }
            // The freed slot passes to the next waiter; with none, the pop
            // still reclaims the tombstones at the front of both lanes.
            let got = pool.release();
            grant(m, got, "release");
            if got.is_none() {
                m.in_flight -= 1;
            }
        }
        Op::Cancel(n) => {
            let live: Vec<u64> = (0..2).flat_map(|l| m.lanes[l].iter().filter(|e| e.live).map(move |e| wid(l, e.ticket))).collect();
            if live.is_empty() {
                return;
            }
            let id = live[n as usize % live.len()];
            assert!(pool.deadline_ns(id).is_some(), "live waiter {id} has no deadline");
            assert!(pool.cancel(id), "live waiter {id} refused cancel");
            assert!(!pool.cancel(id), "waiter {id} cancelled twice");
            let l = (id & 3) as usize;
            for e in m.lanes[l].iter_mut().filter(|e| wid(l, e.ticket) == id) {
                e.live = false;
            }
            m.reap(l);
            m.decide(id, "cancelled");
            m.cancelled += 1;
        }
        Op::CancelDecided(n) => {
            let gone: Vec<u64> = m.fate.iter().filter(|(_, f)| f.is_some()).map(|(id, _)| *id).collect();
            if let Some(&id) = gone.get(n as usize % gone.len().max(1)) {
                assert!(!pool.cancel(id), "waiter {id} ({:?}) cancelled after it was decided", m.fate[&id]);
                assert_eq!(pool.deadline_ns(id), None, "decided waiter {id} still has a deadline");
            }
        }
        Op::AdvanceNs(ns) => {
            clock.advance_ns(ns);
            m.now += ns;
        }
        Op::Expire => {
            let mut got = vec![];
            pool.expire_due(|id| got.push(id));
            let mut want = vec![];
            for l in 0..2 {
                loop {
                    m.reap(l);
                    match m.lanes[l].front() {
                        Some(e) if e.joined_ns.saturating_add(m.s.max_wait_ns[l]) <= m.now => {
                            want.push(wid(l, e.ticket));
                            m.lanes[l].pop_front();
                        }
                        _ => break,
                    }
                }
            }
            assert_eq!(got, want, "expired");
            for id in want {
                m.decide(id, "expired");
                m.shed[ShedCode::QueueTimeout as usize] += 1;
            }
            // Whoever is left is still in time.
            for l in 0..2 {
                for e in m.lanes[l].iter().filter(|e| e.live) {
                    assert!(e.joined_ns + m.s.max_wait_ns[l] > m.now, "waiter {} past its max wait survived expiry", wid(l, e.ticket));
                }
            }
        }
        Op::Dispatch => {
            let got = pool.dispatch();
            if m.in_flight < m.s.limit.max() {
                grant(m, got, "dispatch");
                if got.is_some() {
                    m.in_flight += 1;
                }
            } else {
                assert_eq!(got, None, "dispatch granted with no free slot");
            }
        }
    }
}

fn check(pool: &Pool, m: &Model, op: Op) {
    let s = pool.stats();
    assert!(s.in_flight <= s.limit, "after {op:?}: in_flight {} > max {}", s.in_flight, s.limit);
    assert!(s.depth[0] + s.depth[1] <= m.s.queue_depth, "after {op:?}: depth {:?} > queue_depth {}", s.depth, m.s.queue_depth);
    assert_eq!(s.in_flight, m.in_flight, "after {op:?}: in_flight");
    assert_eq!(s.depth, [m.live(0), m.live(1), 0], "after {op:?}: depth");
    assert_eq!(s.admitted, [m.admitted[0], m.admitted[1], 0], "after {op:?}: admitted");
    assert_eq!(s.shed, m.shed, "after {op:?}: shed");
    assert_eq!(s.cancelled, m.cancelled, "after {op:?}: cancelled");
    // Work conserving: nobody waits while a slot is free.
    assert!(s.depth == [0, 0, 0] || s.in_flight == s.limit, "after {op:?}: {:?} waiting with a free slot", s.depth);
    // Every waiter ever queued is waiting or was decided once, and the
    // counters add up: queued = granted (from the line) + shed + cancelled + waiting.
    let (mut waiting, mut decided) = (0u64, [0u64; 4]);
    for fate in m.fate.values() {
        match fate {
            None => waiting += 1,
            Some("granted") => decided[0] += 1,
            Some("evicted") => decided[1] += 1,
            Some("expired") => decided[2] += 1,
            Some(_) => decided[3] += 1,
        }
    }
    assert_eq!(waiting, (s.depth[0] + s.depth[1]) as u64, "after {op:?}: waiting");
    assert_eq!(decided[2], s.shed[ShedCode::QueueTimeout as usize], "after {op:?}: expired");
    assert_eq!(decided[3], s.cancelled, "after {op:?}: cancelled");
    assert!(decided[1] <= s.shed[ShedCode::ServerOverloaded as usize], "after {op:?}: evicted");
    assert!(decided[0] <= s.admitted[0] + s.admitted[1], "after {op:?}: granted");
    for l in 0..2 {
        for e in m.lanes[l].iter().filter(|e| e.live) {
            let id = wid(l, e.ticket);
            assert_eq!(pool.deadline_ns(id), Some(e.joined_ns + m.s.max_wait_ns[l]), "after {op:?}: deadline of {id}");
        }
    }
    let _ = LANES;
}

/// Runs one `bucket` input: a `TokenBucket` on a manual clock against the GCRA
/// rule computed exactly in u128, and `decide` on raw states.
pub fn run_bucket(data: &[u8]) {
    let mut b = Bytes::new(data);
    let rate = [0.001, 0.5, 1.0, 3.0, 10.0, 1000.0, 1e6, 1e9][b.u8() as usize % 8];
    let burst = [1.0, 1.5, 2.0, 5.0, 100.0, 1e6, 1e12, 1e30][b.u8() as usize % 8];
    let reserve = [0.0, 0.1, 0.2, 0.5, 0.999][b.u8() as usize % 5];
    let Ok(p) = BucketParams::new(rate, burst, reserve) else { return };
    assert!(p.reserve_ns <= p.tau_ns && p.interval_ns >= 1, "{p:?}");
    let clock = Arc::new(ManualClock::new(1 + b.u64() % (1 << 62)));
    let bucket = TokenBucket::new(rate, burst, reserve, Clock::Manual(clock.clone())).unwrap();
    assert_eq!(bucket.params(), &p);
    let limit = |lane: Lane| match lane {
        Lane::Priority => p.tau_ns as u128,
        Lane::Default | Lane::Flex => (p.tau_ns as u128 - p.reserve_ns as u128).max(p.interval_ns as u128),
    };
    // The exact rule; None when the exact TAT would not fit a u64 (the
    // core saturates there, which only a burst of ~1e10 s reaches).
    let exact = |tat: u128, now: u128, cost: u64, lane: Lane| -> Option<Result<u128, u64>> {
        let need = cost as u128 * p.interval_ns as u128;
        if need > limit(lane) {
            return Some(Err(u64::MAX));
        }
        let new_tat = tat.max(now) + need;
        if new_tat > u64::MAX as u128 {
            return None;
        }
        Some(if new_tat - now <= limit(lane) { Ok(new_tat) } else { Err((new_tat - now - limit(lane)) as u64) })
    };
    let mut tat: u128 = 0;
    let mut n = 0;
    while !b.done() && n < 4096 {
        n += 1;
        let k = b.u8();
        let lane = if k & 1 == 0 { Lane::Priority } else { Lane::Default };
        match k >> 1 & 3 {
            0 => {
                let cost = [0, 1, 1, 2, 3, 7, 1000, u64::MAX][b.u8() as usize % 8];
                let now = clock.now_ns() as u128;
                let got = bucket.try_take(cost, lane);
                match exact(tat, now, cost, lane) {
                    Some(Ok(new_tat)) => {
                        assert_eq!(got, Ok(()), "take {cost} {lane:?} at tat {tat} now {now}");
                        tat = new_tat;
                    }
                    Some(Err(wait)) => assert_eq!(got, Err(wait), "take {cost} {lane:?} at tat {tat} now {now}"),
                    None => return,
                }
            }
            1 => {
                let ns = (b.u8() as u64) << (b.u8() % 48);
                clock.advance_ns(ns);
            }
            2 => {
                let delta = (b.u8() as i8) as i64;
                bucket.adjust(delta);
                let now = clock.now_ns() as u128;
                let shift = delta.unsigned_abs() as u128 * p.interval_ns as u128;
                tat = if delta >= 0 { tat.max(now) + shift } else { tat.saturating_sub(shift).max(now.min(tat)) };
                if tat > u64::MAX as u128 {
                    return;
                }
            }
            _ => {
                // `decide` on an arbitrary state: a refusal's wait is exact (taking
                // after waiting it succeeds, one ns earlier fails).
                let (t, now, cost) = (b.u64() >> 2, b.u64() >> 2, b.u8() as u64 % 8);
                match (tierq_core::bucket::decide(t, now, cost, lane, &p), exact(t as u128, now as u128, cost, lane)) {
                    (Decision::Take { new_tat }, Some(Ok(want))) => assert_eq!(new_tat as u128, want),
                    (Decision::NotUntil { wait_ns }, Some(Err(want))) => {
                        assert_eq!(wait_ns, want);
                        if wait_ns != u64::MAX {
                            let later = now + wait_ns;
                            assert!(matches!(tierq_core::bucket::decide(t, later, cost, lane, &p), Decision::Take { .. }));
                            assert!(matches!(tierq_core::bucket::decide(t, later - 1, cost, lane, &p), Decision::NotUntil { wait_ns: 1 }));
                        }
                    }
                    (_, None) => {}
                    (got, want) => panic!("decide({t}, {now}, {cost}, {lane:?}) = {got:?}, exact {want:?}"),
                }
            }
        }
        let avail = bucket.available();
        assert!((0.0..=(p.tau_ns as f64 / p.interval_ns as f64) + 1e-9).contains(&avail), "available {avail}");
    }
}

// ---- replicas ------------------------------------------------------------------------

/// Random picks, releases and engine queues on a pool's `Replicas` (fixed
/// limits), each pick made only while the pool would grant (fewer held than
/// the replicas' limits summed), checked after every operation against a
/// plain model of the grant rule: the same replica chosen, the same counts,
/// none over its limit. Bytes: replicas (1-16), slots (1-8), then ops.
pub fn run_replicas(data: &[u8]) {
    use tierq_core::replicas::{order_word, Replicas, Rule};
    let mut b = Bytes::new(data);
    let n = (b.u8() % 16) as usize + 1;
    let limit = (b.u8() % 8) as u64 + 1;
    let real = Replicas::new(n, tierq_core::LimitMode::Fixed(limit as u32), 1,
                             Clock::Manual(Arc::new(ManualClock::new(1)))).unwrap();
    let mut held = vec![0u64; n];
    let mut waiting = vec![0u64; n];
    let mut holders: Vec<usize> = Vec::new();
    while !b.done() {
        match b.u8() % 3 {
            0 => {
                let rule = b.u8() % 3;
                // An order: each of n slots a replica number, as a caller may send
                // (repeats and numbers out of range are the core's to skip).
                let order: Vec<u8> = (0..n).map(|_| b.u8() % 16).collect();
                if holders.len() as u64 >= limit * n as u64 {
                    continue;
                }
                let mut ranked: Vec<u8> = Vec::new();
                for &r in &order {
                    if (r as usize) < n && !ranked.contains(&r) {
                        ranked.push(r);
                    }
                }
                for r in 0..n as u8 {
                    if !ranked.contains(&r) {
                        ranked.push(r);
                    }
                }
                let load = |r: usize| held[r] + waiting[r];
                let room = |r: usize| held[r] < limit;
                let least = || ranked.iter().map(|&r| r as usize).filter(|&r| room(r))
                    .fold(None, |best: Option<usize>, r| match best { Some(b) if load(b) <= load(r) => Some(b), _ => Some(r) });
                let want = match rule {
                    0 => ranked.iter().map(|&r| r as usize).find(|&r| room(r)),
                    2 => least(),
                    _ => {
                        let total: u64 = (0..n).map(load).sum();
                        ranked.iter().map(|&r| r as usize)
                            .find(|&r| room(r) && load(r) < (5 * (total + 1) * limit).div_ceil(4 * limit * n as u64))
                            .or_else(least)
                    }
                }.expect("the pool had a slot, so some replica has room");
                let got = real.pick(order_word(&order), Rule::from_u8(rule).unwrap());
                assert_eq!(got, want, "order {order:?} rule {rule} held {held:?} waiting {waiting:?}");
                held[got] += 1;
                holders.push(got);
            }
            1 => {
                let i = b.u8() as usize;
                if !holders.is_empty() {
                    let r = holders.swap_remove(i % holders.len());
                    real.release(r).unwrap();
                    held[r] -= 1;
                }
            }
            _ => {
                let r = b.u8() as usize % n;
                let w = (b.u8() % 8) as u64;
                real.observe_engine(r, 1, w, None, 0).unwrap();
                waiting[r] = w;
            }
        }
        for (r, s) in real.stats().iter().enumerate() {
            assert_eq!(s.in_flight, held[r], "replica {r}");
            assert!(s.in_flight <= limit, "replica {r} over its limit");
        }
        assert_eq!(real.over(), 0);
    }
}
