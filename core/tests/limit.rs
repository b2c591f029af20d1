//! The adaptive limit through a real pool on the manual clock: each signal's
//! rule as the pool applies it (dedup, windows, back-off windows), what a
//! moved limit does to waiters, and the bounds. No test sleeps.
#![cfg(not(loom))]

use std::sync::Arc;

use tierq_core::limit::{BACKOFF_MIN_NS, ENGINE_HOLD_SAMPLES, WINDOW_MIN_NS, WINDOW_SAMPLES};
use tierq_core::{Admit, Clock, Lane, LimitMode, ManualClock, Pool, PoolSpec, Signal};

const MS: u64 = 1_000_000;
/// The pool's engine interval (the default, 100 ms).
const TICK: u64 = 100 * MS;

fn adaptive(min: i64, max: i64, initial: i64) -> (Pool, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_000_000_000));
    let s = PoolSpec {
        min_concurrency: Some(min),
        max_concurrency_limit: Some(max),
        initial_concurrency: Some(initial),
        queue_depth: 256,
        ..PoolSpec::default()
    }
    .validate()
    .unwrap();
    (Pool::new(s, Clock::Manual(clock.clone())), clock)
}

/// Admits `n` (all default lane): the first `limit` get slots, the rest queue.
fn load(pool: &Pool, n: usize) -> Vec<u64> {
    let mut queued = vec![];
    for _ in 0..n {
        match pool.admit(Lane::Default, 1) {
            Admit::Now => {}
            Admit::Queued { waiter, granted: None, .. } => queued.push(waiter),
            other => panic!("{other:?}"),
        }
    }
    queued
}

#[test]
fn defaults_are_adaptive_from_4_within_2_and_1024() {
    let s = PoolSpec::default().validate().unwrap();
    assert_eq!(s.limit, LimitMode::Adaptive { min: 2, max: 1024, initial: 4 });
    let pool = Pool::new(s, Clock::Monotonic);
    assert_eq!(pool.limit(), 4);
    assert_eq!(pool.stats().limit_signal, Signal::None);
}

#[test]
fn an_engine_queue_cuts_then_holds_then_saturation_grows() {
    let (pool, clock) = adaptive(2, 64, 16);
    let queued = load(&pool, 24);
    assert_eq!((pool.stats().in_flight, queued.len()), (16, 8));
    // The engine runs 10 of our 16 and queues 6: it runs 10.
    assert!(pool.observe_engine(10, 6, None).is_empty());
    assert_eq!(pool.limit(), 10);
    assert_eq!(pool.stats().limit_signal, Signal::Engine);
    // Lowering preempts nothing, and releases free slots (no hand-off)
    // until the count is under the new limit.
    for _ in 0..6 {
        assert_eq!(pool.release(), None);
    }
    assert_eq!(pool.stats().in_flight, 10);
    assert_eq!(pool.stats().depth, [0, 8, 0]);
    // Now a release hands on.
    assert_eq!(pool.release(), Some(queued[0]));
    // Held after the cut, though saturated and the engine queue is empty.
    for _ in 0..ENGINE_HOLD_SAMPLES {
        clock.advance_ns(TICK);
        assert!(pool.observe_engine(10, 0, None).is_empty());
        assert_eq!(pool.limit(), 10);
    }
    // Then it grows by one, and the new slot goes to the next waiter.
    clock.advance_ns(TICK);
    assert_eq!(pool.observe_engine(10, 0, None), vec![queued[1]]);
    assert_eq!(pool.limit(), 11);
    assert_eq!(pool.stats().in_flight, 11);
    assert_eq!(pool.stats().limit_changes, 2);
}

#[test]
fn the_engine_queue_of_a_draining_cut_is_not_cut_again() {
    let (pool, clock) = adaptive(2, 64, 16);
    load(&pool, 20);
    pool.observe_engine(8, 8, None);
    assert_eq!(pool.limit(), 8);
    // 16 still in flight, the engine still queues our excess: hold.
    clock.advance_ns(TICK);
    pool.observe_engine(8, 8, None);
    assert_eq!(pool.limit(), 8);
}

#[test]
fn an_idle_pool_does_not_grow_and_a_full_kv_cache_holds() {
    let (pool, clock) = adaptive(2, 64, 16);
    load(&pool, 4);
    for _ in 0..10 {
        clock.advance_ns(TICK);
        pool.observe_engine(4, 0, Some(100_000));
    }
    assert_eq!(pool.limit(), 16);
    load(&pool, 20);
    for _ in 0..10 {
        clock.advance_ns(TICK);
        pool.observe_engine(16, 0, Some(950_000));
    }
    assert_eq!(pool.limit(), 16);
    // Room again, never cut: slow start takes it half again, and the 8 waiting get in.
    clock.advance_ns(TICK);
    assert_eq!(pool.observe_engine(16, 0, Some(500_000)).len(), 8);
    assert_eq!(pool.limit(), 24);
}

#[test]
fn slow_start_grows_by_half_until_the_first_cut_then_by_slots() {
    let (pool, clock) = adaptive(2, 1024, 16);
    load(&pool, 270);
    let mut seen = vec![];
    for _ in 0..5 {
        clock.advance_ns(TICK);
        pool.observe_engine(pool.limit(), 0, None);
        seen.push(pool.limit());
    }
    assert_eq!(seen, [24, 36, 54, 81, 121]);
    // The engine (100 sequences) queues 21 of our 121: cut to what it runs.
    clock.advance_ns(TICK);
    pool.observe_engine(100, 21, None);
    assert_eq!(pool.limit(), 100);
    // Slow start is over: after the hold, one slot a sample near the cut.
    for _ in 0..ENGINE_HOLD_SAMPLES + 2 {
        clock.advance_ns(TICK);
        for _ in 0..pool.stats().in_flight.saturating_sub(100) {
            pool.release();
        }
        pool.observe_engine(100, 0, None);
    }
    assert_eq!(pool.limit(), 102);
}

#[test]
fn any_decrease_ends_slow_start() {
    let (pool, clock) = adaptive(2, 64, 8);
    load(&pool, 40);
    pool.observe_overload();
    assert_eq!(pool.limit(), 7);
    clock.advance_ns(TICK);
    pool.observe_engine(7, 0, None);
    assert_eq!(pool.limit(), 8, "grew by one slot, not by half");
}

#[test]
fn samples_closer_than_half_the_interval_count_once() {
    let (pool, clock) = adaptive(2, 64, 16);
    load(&pool, 16);
    // Three workers scrape the same engine at once: one cut, not three.
    for _ in 0..3 {
        pool.observe_engine(12, 4, None);
        clock.advance_ns(TICK / 4);
    }
    assert_eq!(pool.limit(), 12);
    assert_eq!(pool.stats().limit_changes, 1);
    // Half an interval after the applied one, a sample counts again.
    clock.advance_ns(TICK / 4);
    for _ in 0..12 {
        pool.release();
    }
    pool.observe_engine(2, 2, None);
    assert!(pool.limit() < 12);
}

/// Feeds `n` latency samples of `ms`, `gap_ms` apart.
fn latencies(pool: &Pool, clock: &ManualClock, n: usize, ms: u64, gap_ms: u64) {
    for _ in 0..n {
        pool.observe_latency(ms * MS);
        clock.advance_ns(gap_ms * MS);
    }
}

#[test]
fn the_latency_gradient_follows_latency_down_and_back_up() {
    let (pool, clock) = adaptive(2, 64, 32);
    load(&pool, 64);
    // The floor: 100 ms.
    latencies(&pool, &clock, 40, 100, 20);
    let before = pool.limit();
    assert!(before >= 32, "{before}");
    let s = pool.stats();
    assert_eq!(s.latency_floor_ns, 100 * MS);
    assert_eq!(s.limit_signal, Signal::Latency);
    // Latency triples (a queue upstream): the limit comes down, window by window.
    let mut last = before;
    for _ in 0..6 {
        latencies(&pool, &clock, WINDOW_SAMPLES as usize, 300, WINDOW_MIN_NS / MS / WINDOW_SAMPLES + 1);
        assert!(pool.limit() <= last);
        last = pool.limit();
    }
    assert!(last < before * 2 / 3, "{before} -> {last}");
    assert_eq!(pool.stats().latency_recent_ns, 300 * MS);
    // Back to the floor while saturated: it climbs again, granting waiters.
    let waiting_before = pool.stats().depth[1];
    latencies(&pool, &clock, 80, 100, 20);
    assert!(pool.limit() > last, "{last} -> {}", pool.limit());
    assert!(pool.stats().depth[1] <= waiting_before);
}

#[test]
fn the_floor_follows_a_backend_that_got_slower_for_good() {
    let (pool, clock) = adaptive(2, 64, 16);
    latencies(&pool, &clock, 20, 100, 20);
    assert_eq!(pool.stats().latency_floor_ns, 100 * MS);
    latencies(&pool, &clock, 2000, 400, 20);
    let floor = pool.stats().latency_floor_ns;
    assert!(floor > 300 * MS, "{floor}");
}

#[test]
fn a_burst_of_overloads_backs_off_once_per_window() {
    let (pool, clock) = adaptive(2, 64, 40);
    for _ in 0..50 {
        pool.observe_overload();
    }
    assert_eq!(pool.limit(), 36);
    assert_eq!(pool.stats().limit_signal, Signal::Backoff);
    clock.advance_ns(BACKOFF_MIN_NS);
    pool.observe_overload();
    assert_eq!(pool.limit(), 32);
    // Down to min, never below.
    for _ in 0..100 {
        clock.advance_ns(BACKOFF_MIN_NS);
        pool.observe_overload();
    }
    assert_eq!(pool.limit(), 2);
}

#[test]
fn a_fixed_limit_never_moves() {
    let clock = Arc::new(ManualClock::new(1));
    let pool = Pool::new(PoolSpec::fixed(4).validate().unwrap(), Clock::Manual(clock.clone()));
    load(&pool, 8);
    for _ in 0..20 {
        clock.advance_ns(TICK);
        assert!(pool.observe_engine(1, 50, None).is_empty());
        assert!(pool.observe_engine(4, 0, None).is_empty());
        pool.observe_latency(1);
        pool.observe_latency(1_000_000 * MS);
        pool.observe_overload();
        assert!(pool.set_limit(100).is_empty());
    }
    let s = pool.stats();
    assert_eq!((s.limit, s.in_flight, s.limit_changes), (4, 4, 0));
}

#[test]
fn raising_the_limit_grants_every_new_slot_at_once() {
    let (pool, _clock) = adaptive(2, 64, 4);
    let queued = load(&pool, 10);
    assert_eq!(pool.set_limit(7), queued[..3].to_vec());
    assert_eq!(pool.stats().in_flight, 7);
    // Bounds: clamped.
    pool.set_limit(1000);
    assert_eq!(pool.limit(), 64);
    assert_eq!(pool.stats().in_flight, 10);
    pool.set_limit(0);
    assert_eq!(pool.limit(), 2);
}

#[test]
fn headroom_follows_the_moving_limit() {
    let clock = Arc::new(ManualClock::new(1));
    let s = PoolSpec { initial_concurrency: Some(4), priority_headroom: 1, ..PoolSpec::default() }.validate().unwrap();
    let pool = Pool::new(s, Clock::Manual(clock));
    // Defaults take limit - 1 = 3.
    assert_eq!(load(&pool, 4).len(), 1);
    assert_eq!(pool.admit(Lane::Priority, 1), Admit::Now);
    pool.set_limit(6);
    // Two more slots: one for the waiting default (6 - 1 = 5), one kept.
    assert_eq!(pool.stats().in_flight, 5);
    assert_eq!(pool.admit(Lane::Priority, 1), Admit::Now);
    assert!(matches!(pool.admit(Lane::Default, 1), Admit::Queued { .. }));
}
