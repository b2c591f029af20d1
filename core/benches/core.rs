//! Criterion benches of the admission core, each against a lock-based baseline
//! with the same rules in the same run: a `Mutex<u64>` TAT running the same
//! GCRA `decide`, and a `Mutex`-protected pool with two `VecDeque` lanes. At the
//! end the (tierq, baseline, ratio) table is printed from criterion's estimates.
//!
//! Full: `cargo bench --bench core`.
//! Smoke (CI): `cargo bench --bench core -- --warm-up-time 0.1 --measurement-time 0.2 --sample-size 10`.
//! Fairness on against off, interleaved pairs: `TIERQ_FAIR_AB=400 cargo bench --bench core`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{Bencher, Criterion};
use tierq_core::bucket::{decide, BucketParams, Decision};
use tierq_core::clock::monotonic_ns;
use tierq_core::{Admit, Ask, Clock, Lane, Pool, PoolSpec, TokenBucket};

// ---------------------------------------------------------------- baselines --

/// The same GCRA rule as `tierq_core::TokenBucket`, with the TAT behind a lock.
struct MutexBucket {
    params: BucketParams,
    tat: Mutex<u64>,
}

impl MutexBucket {
    fn new(rate: f64, burst: f64, reserve: f64) -> Self {
        MutexBucket { params: BucketParams::new(rate, burst, reserve).unwrap(), tat: Mutex::new(0) }
    }
    fn try_take(&self, cost: u64, lane: Lane) -> Result<(), u64> {
        let now = monotonic_ns();
        let mut tat = self.tat.lock().unwrap();
        match decide(*tat, now, cost, lane, &self.params) {
            Decision::Take { new_tat } => {
                *tat = new_tat;
                Ok(())
            }
            Decision::NotUntil { wait_ns } => Err(wait_ns),
        }
    }
}

/// The pool's slot and lane rules (fast path, FIFO lanes, strict priority,
/// newest-default eviction, full-queue shed) as the obvious locked design.
struct MutexPool {
    inner: Mutex<PoolInner>,
}

struct PoolInner {
    max_concurrency: u32,
    queue_depth: usize,
    in_flight: u32,
    next_id: u64,
    /// (waiter id, enqueued ns), indexed by `Lane as usize`.
    lanes: [VecDeque<(u64, u64)>; 2],
}

#[derive(Debug, PartialEq)]
enum MutexAdmit {
    Now,
    Queued(u64),
    Shed,
}

impl MutexPool {
    fn new(max_concurrency: u32, queue_depth: usize) -> Self {
        let lanes = [VecDeque::with_capacity(queue_depth), VecDeque::with_capacity(queue_depth)];
        MutexPool { inner: Mutex::new(PoolInner { max_concurrency, queue_depth, in_flight: 0, next_id: 0, lanes }) }
    }
    fn admit(&self, lane: Lane) -> MutexAdmit {
        let now = monotonic_ns();
        let mut p = self.inner.lock().unwrap();
        let waiting = p.lanes[0].len() + p.lanes[1].len();
        if waiting == 0 && p.in_flight < p.max_concurrency {
            p.in_flight += 1;
            return MutexAdmit::Now;
        }
        if waiting >= p.queue_depth {
            if lane == Lane::Default || p.lanes[Lane::Default as usize].pop_back().is_none() {
                return MutexAdmit::Shed;
            }
        }
        let id = p.next_id;
        p.next_id += 1;
        p.lanes[lane as usize].push_back((id, now));
        MutexAdmit::Queued(id)
    }
    fn release(&self) -> Option<u64> {
        let mut p = self.inner.lock().unwrap();
        for lane in [Lane::Priority, Lane::Default] {
            if let Some((id, _)) = p.lanes[lane as usize].pop_front() {
                return Some(id); // the slot passes straight to the waiter
            }
        }
        p.in_flight -= 1;
        None
    }
}

// ------------------------------------------------------------------ harness --

fn pool(max_concurrency: i64) -> Pool {
    let s = PoolSpec { max_concurrency: Some(max_concurrency), queue_depth: 1024, max_wait_ms: [60_000.0, 30_000.0, 30_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap();
    Pool::new(s, Clock::Monotonic)
}

/// Runs `op` on `threads` threads at once, `iters` times each, and returns the
/// wall time: criterion's "time per iteration" is then the time for every
/// thread to do one op concurrently (per-op latency under contention).
fn on_threads(b: &mut Bencher<'_>, threads: usize, op: &(dyn Fn() + Sync)) {
    b.iter_custom(|iters| {
        let barrier = Barrier::new(threads + 1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let t0 = Instant::now();
                        for _ in 0..iters {
                            op();
                        }
                        t0.elapsed()
                    })
                })
                .collect();
            barrier.wait();
            handles.into_iter().map(|h| h.join().unwrap()).max().unwrap_or(Duration::ZERO)
        })
    });
}

// Every take succeeds (1e9 tokens/s, 1e9 burst), so each op is a full
// load + decide + CAS, never the early refusal.
const RATE: f64 = 1e9;

fn bench_bucket(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("bucket_decision/{threads}t"));
        let ours = TokenBucket::new(RATE, RATE, 0.2, Clock::Monotonic).unwrap();
        g.bench_function("tierq", |b| on_threads(b, threads, &|| assert!(black_box(&ours).try_take(1, Lane::Default).is_ok())));
        let base = MutexBucket::new(RATE, RATE, 0.2);
        g.bench_function("baseline", |b| on_threads(b, threads, &|| assert!(black_box(&base).try_take(1, Lane::Default).is_ok())));
        g.finish();
    }
}

fn bench_admit_release(c: &mut Criterion) {
    let mut g = c.benchmark_group("admit_release_uncontended/1t");
    let ours = pool(64);
    g.bench_function("tierq", |b| {
        b.iter(|| {
            assert_eq!(black_box(&ours).admit(Lane::Default, 1), Admit::Now);
            assert_eq!(ours.release(), None);
        })
    });
    let base = MutexPool::new(64, 1024);
    g.bench_function("baseline", |b| {
        b.iter(|| {
            assert_eq!(black_box(&base).admit(Lane::Default), MutexAdmit::Now);
            assert_eq!(base.release(), None);
        })
    });
    g.finish();
}

/// Slots held by "requests" in the queue benches, shared by the bench threads.
/// A thread only calls `release` for a slot it took from here, and puts back
/// every slot the pool hands out (an admit granted now, or a handoff), so the
/// bench never releases a slot nobody holds (the core does not guard that).
struct Held(AtomicU64);

impl Held {
    fn put(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    fn take(&self) {
        while self.0.fetch_update(Relaxed, Relaxed, |h| h.checked_sub(1)).is_err() {
            // Another thread is between taking a slot and handing it on.
            std::hint::spin_loop();
        }
    }
}

/// Queue push + pop: every slot is held, so each admit queues a waiter and
/// each release hands a slot straight to the head waiter. On 2 threads a
/// release may hand off to the other thread's waiter.
fn bench_queue(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("queue_push_pop/{threads}t"));
        let ours = pool(1);
        assert_eq!(ours.admit(Lane::Priority, 1), Admit::Now);
        let held = Held(AtomicU64::new(1));
        g.bench_function("tierq", |b| {
            on_threads(b, threads, &|| {
                match black_box(&ours).admit(Lane::Default, 1) {
                    Admit::Now | Admit::Queued { granted: Some(_), .. } => held.put(),
                    Admit::Queued { granted: None, .. } => {}
                    other => panic!("expected to queue, got {other:?}"),
                }
                held.take();
                if ours.release().is_some() {
                    held.put();
                }
            })
        });
        let stats = ours.stats();
        assert_eq!((stats.in_flight, stats.depth), (1, [0, 0, 0]), "the bench leaked a slot or a waiter");
        assert_eq!(held.0.load(Relaxed), 1);

        let base = MutexPool::new(1, 1024);
        assert_eq!(base.admit(Lane::Priority), MutexAdmit::Now);
        let held = Held(AtomicU64::new(1));
        g.bench_function("baseline", |b| {
            on_threads(b, threads, &|| {
                match black_box(&base).admit(Lane::Default) {
                    MutexAdmit::Now => held.put(),
                    MutexAdmit::Queued(_) => {}
                    MutexAdmit::Shed => panic!("expected to queue"),
                }
                held.take();
                if base.release().is_some() {
                    held.put();
                }
            })
        });
        assert_eq!(held.0.load(Relaxed), 1);
        g.finish();
    }
}

fn fair_pool(max_concurrency: i64, fairness: &str) -> Pool {
    let s = PoolSpec { max_concurrency: Some(max_concurrency), queue_depth: 1024, fairness: fairness.into(), ..PoolSpec::default() }.validate().unwrap();
    Pool::new(s, Clock::Monotonic)
}

const FLOWS: [&[u8]; 2] = [b"key_polite_0001", b"key_greedy_0002"];

/// One admit + release of flow 0 with fairness on: the flow id hashed to its
/// hand, as `AdmissionCore.ask` does, the queue chosen and charged.
fn admit_release_on(p: &Pool) {
    let ask = Ask { hand: p.hand(black_box(FLOWS[0])), service: 100, max_wait_ns: None };
    assert_eq!(black_box(p).admit_ask(Lane::Default, 1, &ask).0, Admit::Now);
    assert_eq!(p.release(), None);
}

/// The same with fairness off: `admit` of the anonymous flow (FIFO).
fn admit_release_off(p: &Pool) {
    assert_eq!(black_box(p).admit(Lane::Default, 1), Admit::Now);
    assert_eq!(p.release(), None);
}

/// A pool of one slot, held, with one waiter of each flow queued, so every
/// pop of `push_pop` chooses between two active queues.
fn push_pop_pool(fairness: &str) -> Pool {
    let p = fair_pool(1, fairness);
    assert_eq!(p.admit(Lane::Priority, 1), Admit::Now);
    for f in FLOWS {
        let ask = Ask { hand: p.hand(f), service: 100, max_wait_ns: None };
        assert!(matches!(p.admit_ask(Lane::Default, 1, &ask).0, Admit::Queued { granted: None, .. }));
    }
    p
}

/// One push (a queued arrival) and one pop (the release handing the slot to
/// a waiter). Fairness on alternates the two flows by `turn` (a plain
/// counter: the bench's own choice of flow must not cost a locked RMW that
/// only the "on" side pays); off is `admit` of the anonymous flow.
fn push_pop(p: &Pool, on: bool, turn: usize) {
    let queued = if on {
        let ask = Ask { hand: p.hand(black_box(FLOWS[turn & 1])), service: 100, max_wait_ns: None };
        black_box(p).admit_ask(Lane::Default, 1, &ask).0
    } else {
        black_box(p).admit(Lane::Default, 1)
    };
    assert!(matches!(queued, Admit::Queued { granted: None, .. }));
    assert!(p.release().is_some(), "handed to a waiter");
}

fn check_push_pop(p: &Pool) {
    let st = p.stats();
    assert_eq!((st.in_flight, st.depth), (1, [0, 2, 0]), "the bench leaked a slot or a waiter");
}

/// Fairness on (`"tokens"`) against off (today's FIFO), in the same run.
fn bench_fairness(c: &mut Criterion) {
    let mut g = c.benchmark_group("fairness_admit_release/1t");
    let on = fair_pool(64, "tokens");
    g.bench_function("on", |b| b.iter(|| admit_release_on(&on)));
    let off = fair_pool(64, "off");
    g.bench_function("off", |b| b.iter(|| admit_release_off(&off)));
    g.finish();

    let mut g = c.benchmark_group("fairness_push_pop/1t");
    for (name, fairness) in [("on", "tokens"), ("off", "off")] {
        let p = push_pop_pool(fairness);
        let mut turn = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                turn += 1;
                push_pop(&p, fairness != "off", turn)
            })
        });
        check_push_pop(&p);
    }
    g.finish();
}

/// Fairness on against off, interleaved: `pairs` pairs of back-to-back
/// blocks (on then off, off then on, alternating), each block `BLOCK`
/// operations timed as one (a few hundred microseconds, so most blocks run
/// within one time slice), and the on/off ratio taken per pair. On a shared
/// machine the load moves over seconds; two blocks microseconds apart see
/// the same load, so the median of the pairs' ratios, with its 95% confidence
/// interval from the order statistics (ranks n/2 +- 0.98 sqrt n), decides
/// where two criterion groups run seconds apart do not. Beside it, each
/// side's 10th percentile block (the blocks least disturbed) and their ratio.
/// `TIERQ_FAIR_AB=pairs`.
fn fairness_ab(pairs: usize) {
    const BLOCK: usize = 2_000;
    fn time(mut f: impl FnMut(usize)) -> f64 {
        let t = Instant::now();
        for i in 0..BLOCK {
            f(i);
        }
        t.elapsed().as_nanos() as f64 / BLOCK as f64
    }
    fn sorted(mut v: Vec<f64>) -> Vec<f64> {
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    fn at(v: &[f64], p: f64) -> f64 {
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
    fn report(label: &str, on_ns: Vec<f64>, off_ns: Vec<f64>) {
        let ratios = sorted(on_ns.iter().zip(&off_ns).map(|(a, b)| a / b).collect());
        let n = ratios.len();
        let half = 0.98 * (n as f64).sqrt();
        let lo = ratios[((n as f64 / 2.0 - half).floor().max(0.0)) as usize];
        let hi = ratios[((n as f64 / 2.0 + half).ceil() as usize).min(n - 1)];
        let (on_s, off_s) = (sorted(on_ns), sorted(off_ns));
        let verdict = if hi <= 1.3 { "met" } else if lo > 1.3 { "missed" } else { "not decided" };
        println!(
            "| {label} | {:.1} / {:.1} ns | {:.1} / {:.1} ns | {:.3}x | {lo:.3}x - {hi:.3}x | {:.3}x | <= 1.3x: {verdict} |",
            at(&on_s, 0.1), at(&on_s, 0.5), at(&off_s, 0.1), at(&off_s, 0.5), at(&ratios, 0.5),
            at(&on_s, 0.1) / at(&off_s, 0.1)
        );
    }
    let (on, off) = (fair_pool(64, "tokens"), fair_pool(64, "off"));
    let (pon, poff) = (push_pop_pool("tokens"), push_pop_pool("off"));
    let mut turn = 0usize;
    let (mut ar, mut pp) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    // Warm-up: blocks of each, not counted.
    for _ in 0..200 {
        time(|_| admit_release_on(&on));
        time(|_| admit_release_off(&off));
        time(|_| { turn += 1; push_pop(&pon, true, turn) });
        time(|i| push_pop(&poff, false, i));
    }
    for k in 0..pairs {
        // The order alternates so neither side always runs second.
        if k % 2 == 0 {
            ar.0.push(time(|_| admit_release_on(&on)));
            ar.1.push(time(|_| admit_release_off(&off)));
            pp.0.push(time(|_| { turn += 1; push_pop(&pon, true, turn) }));
            pp.1.push(time(|i| push_pop(&poff, false, i)));
        } else {
            ar.1.push(time(|_| admit_release_off(&off)));
            ar.0.push(time(|_| admit_release_on(&on)));
            pp.1.push(time(|i| push_pop(&poff, false, i)));
            pp.0.push(time(|_| { turn += 1; push_pop(&pon, true, turn) }));
        }
    }
    check_push_pop(&pon);
    check_push_pop(&poff);
    println!("\n| fairness, interleaved ({pairs} pairs of {BLOCK}) | on p10 / p50 | off p10 / p50 | on / off, median pair | its 95% CI | p10 / p10 | target |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    report("admit + release, uncontended", ar.0, ar.1);
    report("push + pop, two flows waiting", pp.0, pp.1);
}

/// The two primitives that bound push + pop, measured in the same run: one
/// CLOCK_MONOTONIC read and one uncontended locked RMW (`lock xadd` on x86;
/// every ordering of an RMW is the same instruction there).
fn bench_floor(c: &mut Criterion) {
    let mut g = c.benchmark_group("floor/1t");
    g.bench_function("clock_read", |b| b.iter(monotonic_ns));
    let word = AtomicU64::new(0);
    g.bench_function("atomic_rmw", |b| b.iter(|| black_box(&word).fetch_add(1, Relaxed)));
    g.finish();
}

/// Locked instructions in one push + pop of the queue bench: the core's
/// depth reserve, tail CAS, cell publish (a SeqCst store is an `xchg`), cell
/// CAS, depth release and admitted count, plus the bench's own two (`Held`).
const PUSH_POP_RMWS: f64 = 8.0;
/// Clock reads per push + pop: the join time, and one in 8 handoffs.
const PUSH_POP_CLOCKS: f64 = 1.125;

// ----------------------------------------------------------------- summary --

/// Criterion's median point estimate (ns) for `group/name`, if it ran.
fn median_ns(group: &str, name: &str) -> Option<f64> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"));
    let path = target.join("criterion").join(group.replace('/', "_")).join(name).join("new").join("estimates.json");
    let json = std::fs::read_to_string(path).ok()?;
    // No JSON parser among the dev-dependencies: the file is small and flat
    // enough to find `"median":{...,"point_estimate":X`.
    let after = &json[json.find("\"median\"")?..];
    let after = &after[after.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    after[..after.find([',', '}'])?].trim().parse().ok()
}

fn summary() {
    let rows = [
        ("bucket_decision/1t", "bucket decision, 1 thread", 50.0),
        ("bucket_decision/2t", "bucket decision, 2 threads on one bucket", 50.0),
        ("admit_release_uncontended/1t", "pool admit + release, uncontended", f64::NAN),
        ("queue_push_pop/1t", "queue push + pop (queued, then handoff), 1 thread", 100.0),
        ("queue_push_pop/2t", "queue push + pop (queued, then handoff), 2 threads", f64::NAN),
    ];
    println!("\n| bench | tierq (median) | Mutex baseline (median) | speed-up | target |");
    println!("|---|---:|---:|---:|---|");
    for (group, label, target) in rows {
        let (Some(ours), Some(base)) = (median_ns(group, "tierq"), median_ns(group, "baseline")) else { continue };
        let verdict = if target.is_nan() {
            "-".to_string()
        } else if ours <= target {
            format!("<= {target} ns: met")
        } else {
            format!("<= {target} ns: missed")
        };
        println!("| {label} | {ours:.1} ns | {base:.1} ns | {:.2}x | {verdict} |", base / ours);
    }
    println!("\n| fairness, same run | on (tokens) | off (FIFO) | on / off | target |");
    println!("|---|---:|---:|---:|---|");
    for (group, label) in [("fairness_admit_release/1t", "admit + release, uncontended"), ("fairness_push_pop/1t", "push + pop, two flows waiting")] {
        let (Some(on), Some(off)) = (median_ns(group, "on"), median_ns(group, "off")) else { continue };
        let ratio = on / off;
        let verdict = if ratio <= 1.3 { "<= 1.3x: met" } else { "<= 1.3x: missed" };
        println!("| {label} | {on:.1} ns | {off:.1} ns | {ratio:.2}x | {verdict} |");
    }
    if let (Some(clock), Some(rmw)) = (median_ns("floor/1t", "clock_read"), median_ns("floor/1t", "atomic_rmw")) {
        let floor = PUSH_POP_CLOCKS * clock + PUSH_POP_RMWS * rmw;
        println!(
            "\nfloor of queue push + pop, 1 thread: {PUSH_POP_CLOCKS} clock reads x {clock:.1} ns \
             + {PUSH_POP_RMWS} locked RMWs x {rmw:.1} ns = {floor:.0} ns"
        );
    }
}

fn main() {
    // One side alone for a profiler (perf record): `TIERQ_FAIR_PROFILE=on|off`,
    // push + pop for about 3 s.
    if let Ok(side) = std::env::var("TIERQ_FAIR_PROFILE") {
        let p = push_pop_pool(if side == "on" { "tokens" } else { "off" });
        let t = Instant::now();
        let mut turn = 0usize;
        while t.elapsed() < Duration::from_secs(3) {
            for _ in 0..10_000 {
                turn += 1;
                push_pop(&p, side == "on", turn);
            }
        }
        check_push_pop(&p);
        return;
    }
    if let Some(pairs) = std::env::var("TIERQ_FAIR_AB").ok().and_then(|v| v.parse().ok()) {
        fairness_ab(pairs);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench_bucket(&mut c);
    bench_admit_release(&mut c);
    bench_queue(&mut c);
    bench_fairness(&mut c);
    bench_floor(&mut c);
    c.final_summary();
    summary();
}
