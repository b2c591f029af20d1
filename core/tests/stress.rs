//! Multi-thread stress tests: threads really race (each test asserts the
//! interleaving it needed happened), and nothing is lost or handed out twice.
#![cfg(not(loom))]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use tierq_core::{Admit, Clock, Lane, ManualClock, Pool, PoolSettings, PoolSpec, TokenBucket};

const THREADS: usize = 4;

/// Counts how often consecutive entries of a shared log come from different
/// threads: proof that the threads' operations interleaved.
fn switches(log: &[usize]) -> usize {
    log.windows(2).filter(|w| w[0] != w[1]).count()
}

#[test]
fn n_threads_racing_for_c_tokens_get_exactly_c() {
    // On a loaded 2-core machine threads may run one after another; repeat
    // until a round shows real interleaving, checking exactness every round.
    let mut interleaved = 0;
    for _round in 0..20 {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        // No refill during the race: time stands still on the manual clock.
        let bucket = Arc::new(TokenBucket::new(1.0, 200_000.0, 0.0, Clock::Manual(clock)).unwrap());
        let barrier = Arc::new(Barrier::new(THREADS));
        // Each success takes a global sequence number, so the merged order
        // shows whether the threads' takes really interleaved.
        let seq = Arc::new(AtomicU64::new(0));
        let per_thread: Vec<Vec<u64>> = (0..THREADS)
            .map(|_| {
                let (bucket, barrier, seq) = (bucket.clone(), barrier.clone(), seq.clone());
                thread::spawn(move || {
                    barrier.wait();
                    let mut mine = Vec::new();
                    for _ in 0..100_000 {
                        if bucket.try_take(1, Lane::Priority).is_ok() {
                            mine.push(seq.fetch_add(1, SeqCst));
                        }
                    }
                    mine
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let taken: usize = per_thread.iter().map(Vec::len).sum();
        assert_eq!(taken, 200_000, "tokens handed out per thread: {:?}", per_thread.iter().map(Vec::len).collect::<Vec<_>>());
        let mut log = vec![0usize; taken];
        for (t, seqs) in per_thread.iter().enumerate() {
            for &n in seqs {
                log[n as usize] = t;
            }
        }
        interleaved += switches(&log);
        if interleaved > 20 {
            break;
        }
    }
    assert!(interleaved > 20, "the threads barely interleaved in 20 rounds ({interleaved} switches)");
}

/// How a waiter ended; written once by whoever decided it.
const PENDING: u8 = 0;
const GRANTED: u8 = 1;
const SHED: u8 = 2;

struct Harness {
    pool: Pool,
    max: u32,
    /// Indexed by waiter id; ids are `ticket << 2 | lane`, tickets < TICKETS.
    fate: Vec<AtomicU8>,
    holding: AtomicU64,
    max_holding: AtomicU64,
    holds: AtomicU64,
    contended: AtomicBool,
}

const TICKETS: usize = 1 << 16;

impl Harness {
    fn decide(&self, id: u64, fate: u8) {
        let prev = self.fate[id as usize].swap(fate, SeqCst);
        assert_eq!(prev, PENDING, "waiter {id} decided twice");
    }
    fn hold(&self) {
        let now = self.holding.fetch_add(1, SeqCst) + 1;
        self.max_holding.fetch_max(now, SeqCst);
        assert!(now <= self.max as u64, "{now} slots held, max {}", self.max);
        self.holds.fetch_add(1, SeqCst);
        // Hold the slot long enough for other threads to pile up behind it.
        thread::yield_now();
        self.holding.fetch_sub(1, SeqCst);
        if let Some(next) = self.pool.release() {
            self.contended.store(true, SeqCst);
            self.decide(next, GRANTED);
        }
    }
}

#[test]
fn pool_never_exceeds_slots_and_every_waiter_ends_exactly_once() {
    let settings = PoolSpec { max_concurrency: Some(3), queue_depth: 16, max_wait_ms: [60_000.0, 60_000.0, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap();
    stress(settings, false);
}

/// The same with a thread moving an adaptive limit (1 to 3) all along: the
/// bound holds, every waiter a raise grants is decided once, nothing leaks.
#[test]
fn a_moving_limit_never_exceeds_its_bound_and_leaks_nothing() {
    let settings = PoolSpec {
        min_concurrency: Some(1),
        max_concurrency_limit: Some(3),
        initial_concurrency: Some(2),
        queue_depth: 16,
        max_wait_ms: [60_000.0, 60_000.0, 600_000.0],
        ..PoolSpec::default()
    }
    .validate()
    .unwrap();
    stress(settings, true);
}

fn stress(settings: PoolSettings, move_limit: bool) {
    let max = settings.limit.max();
    let h = Arc::new(Harness {
        pool: Pool::new(settings, Clock::Monotonic),
        max,
        fate: (0..TICKETS * 4).map(|_| AtomicU8::new(PENDING)).collect(),
        holding: AtomicU64::new(0),
        max_holding: AtomicU64::new(0),
        holds: AtomicU64::new(0),
        contended: AtomicBool::new(false),
    });
    let barrier = Arc::new(Barrier::new(THREADS));
    let done = Arc::new(AtomicBool::new(false));
    let mover = move_limit.then(|| {
        let (h, done) = (h.clone(), done.clone());
        thread::spawn(move || {
            let (mut rng, mut moves) = (0x2545_f491_4f6c_dd1du64, 0u64);
            while !done.load(SeqCst) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                for g in h.pool.set_limit(1 + rng % max as u64) {
                    h.decide(g, GRANTED);
                }
                moves += 1;
                thread::yield_now();
            }
            moves
        })
    });
    let ended: Vec<(u64, u64, u64)> = (0..THREADS)
        .map(|t| {
            let (h, barrier) = (h.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let (mut served, mut shed, mut cancelled) = (0, 0, 0);
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ t as u64;
                for i in 0..5000 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let lane = if rng % 3 == 0 { Lane::Priority } else { Lane::Default };
                    match h.pool.admit(lane, 1) {
                        Admit::Now => {
                            h.hold();
                            served += 1;
                        }
                        Admit::Shed { .. } => shed += 1,
                        Admit::Queued { waiter, evicted, granted } => {
                            if let Some(e) = evicted {
                                h.decide(e, SHED);
                            }
                            if let Some(g) = granted {
                                h.decide(g, GRANTED);
                            }
                            let give_up = i % 7 == 0;
                            let mut spins = 0u32;
                            loop {
                                match h.fate[waiter as usize].load(SeqCst) {
                                    GRANTED => {
                                        h.hold();
                                        served += 1;
                                        break;
                                    }
                                    SHED => {
                                        shed += 1;
                                        break;
                                    }
                                    _ => {}
                                }
                                spins += 1;
                                if give_up && spins > 50 && h.pool.cancel(waiter) {
                                    cancelled += 1;
                                    break;
                                }
                                thread::yield_now();
                            }
                        }
                    }
                }
                (served, shed, cancelled)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|j| j.join().unwrap())
        .collect();
    done.store(true, SeqCst);
    if let Some(m) = mover {
        assert!(m.join().unwrap() > 0);
        assert!(h.pool.stats().limit_changes > 0, "the limit never moved");
    }

    let stats = h.pool.stats();
    assert_eq!(stats.in_flight, 0, "slot leaked: {stats:?}");
    assert_eq!(stats.depth, [0, 0, 0], "waiter leaked: {stats:?}");
    let served: u64 = ended.iter().map(|e| e.0).sum();
    let shed: u64 = ended.iter().map(|e| e.1).sum();
    let cancelled: u64 = ended.iter().map(|e| e.2).sum();
    assert_eq!(served + shed + cancelled, (THREADS * 5000) as u64);
    assert_eq!(served, h.holds.load(SeqCst));
    assert_eq!(served, stats.admitted.iter().sum::<u64>());
    assert_eq!(shed, stats.shed.iter().sum::<u64>());
    assert_eq!(cancelled, stats.cancelled);
    assert_eq!(h.max_holding.load(SeqCst), max as u64, "slots were never all busy at once");
    assert!(h.contended.load(SeqCst), "no release ever handed a slot to a waiter");
}

#[test]
fn concurrent_waiters_are_each_granted_once() {
    // Producers queue behind the one slot while a releaser hands it on; every
    // ticket must come out of the pool exactly once. `held` counts slots the
    // pool has handed out and nobody has released yet (an admit granted now, a
    // grant, a hand-off), so the releaser only ever releases a held slot.
    let settings = PoolSpec { max_concurrency: Some(1), queue_depth: 4096, max_wait_ms: [60_000.0, 60_000.0, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap();
    let pool = Arc::new(Pool::new(settings, Clock::Monotonic));
    assert_eq!(pool.admit(Lane::Default, 1), Admit::Now);
    let held = Arc::new(AtomicU64::new(1));
    let granted = Arc::new(Mutex::new(Vec::new()));
    let queued = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let record = |outcome: Admit, held: &AtomicU64, queued: &Mutex<Vec<u64>>, granted: &Mutex<Vec<u64>>| match outcome {
        Admit::Now => {
            held.fetch_add(1, SeqCst);
        }
        Admit::Queued { waiter, evicted: None, granted: g } => {
            queued.lock().unwrap().push(waiter);
            if let Some(g) = g {
                granted.lock().unwrap().push(g);
                held.fetch_add(1, SeqCst);
            }
        }
        other => panic!("unexpected {other:?}"),
    };
    let producers: Vec<_> = (0..3)
        .map(|t| {
            let (pool, queued, granted, held) = (pool.clone(), queued.clone(), granted.clone(), held.clone());
            thread::spawn(move || {
                for _ in 0..1000 {
                    let lane = if t == 0 { Lane::Priority } else { Lane::Default };
                    record(pool.admit(lane, 1), &held, &queued, &granted);
                }
            })
        })
        .collect();
    let releaser = {
        let (pool, granted, queued, done, held) = (pool.clone(), granted.clone(), queued.clone(), done.clone(), held.clone());
        thread::spawn(move || {
            let mut handoffs = 0;
            // Each grant hands the one slot on; keep releasing until all are through.
            while !(done.load(SeqCst) && pool.stats().depth == [0, 0, 0]) {
                if held.fetch_update(SeqCst, SeqCst, |h| h.checked_sub(1)).is_ok() {
                    if let Some(next) = pool.release() {
                        granted.lock().unwrap().push(next);
                        held.fetch_add(1, SeqCst);
                        handoffs += 1;
                    }
                } else {
                    // Nothing held: take a slot so the next release has one.
                    record(pool.admit(Lane::Default, 1), &held, &queued, &granted);
                }
            }
            handoffs
        })
    };
    for p in producers {
        p.join().unwrap();
    }
    done.store(true, SeqCst);
    let handoffs = releaser.join().unwrap();
    assert!(handoffs > 100, "releases rarely met a waiter ({handoffs})");
    let granted = granted.lock().unwrap();
    let unique: HashSet<_> = granted.iter().collect();
    assert_eq!(unique.len(), granted.len(), "a waiter was granted twice");
    let queued: HashSet<_> = queued.lock().unwrap().iter().copied().collect();
    assert_eq!(unique.len(), queued.len(), "granted {} of {} waiters", unique.len(), queued.len());
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "release() without a held slot")]
fn release_without_a_held_slot_is_caught_in_debug_builds() {
    let settings = PoolSpec { max_concurrency: Some(2), queue_depth: 4, max_wait_ms: [1000.0, 1000.0, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap();
    Pool::new(settings, Clock::Monotonic).release();
}

#[test]
#[cfg(not(debug_assertions))]
fn release_without_a_held_slot_does_not_wrap_the_count() {
    let settings = PoolSpec { max_concurrency: Some(2), queue_depth: 4, max_wait_ms: [1000.0, 1000.0, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap();
    let pool = Pool::new(settings, Clock::Monotonic);
    assert_eq!(pool.release(), None);
    assert_eq!(pool.stats().in_flight, 0);
    assert_eq!(pool.admit(Lane::Default, 1), Admit::Now);
}
