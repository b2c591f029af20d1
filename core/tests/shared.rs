//! Shared pools across workers: the attach checks, mail between workers,
//! strict priority across them, reclaim of a dead worker, and stress with
//! workers as threads and as forked processes (one killed with SIGKILL).
#![cfg(not(loom))]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use tierq_core::{Admit, Clock, CoreError, Lane, LimitMode, Outcome, Pool, PoolSettings, PoolSpec, ShedCode};

fn settings(max: i64, depth: i64) -> PoolSettings {
    PoolSpec { max_concurrency: Some(max), queue_depth: depth, max_wait_ms: [60_000.0, 60_000.0, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap()
}

/// A unique region name per test, removed when the guard drops.
struct Name(String);
impl Name {
    fn new(tag: &str) -> Name {
        static N: AtomicU64 = AtomicU64::new(0);
        Name(format!("/tierq-test-{}-{tag}-{}", std::process::id(), N.fetch_add(1, SeqCst)))
    }
}
impl Drop for Name {
    fn drop(&mut self) {
        let _ = Pool::unlink_shared(&self.0);
    }
}

fn attach(name: &Name, s: &PoolSettings, worker: usize, workers: usize) -> Pool {
    Pool::attach_shared(&name.0, s.clone(), Some(worker), vec![-1; workers], Clock::Monotonic).unwrap()
}

fn drain(p: &Pool) -> Vec<(u64, Outcome)> {
    let mut v = vec![];
    p.drain_mailbox(|id, o| v.push((id, o)));
    v
}

#[test]
fn attach_refuses_other_settings_sizes_and_names() {
    let name = Name::new("attach");
    let s = settings(2, 8);
    let _sup = Pool::create_shared(&name.0, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
    assert!(matches!(Pool::create_shared(&name.0, s.clone(), 2, vec![], Clock::Monotonic), Err(CoreError::Os(_))), "exists");
    // Another limit (same sizes) attaches: each worker's own, a reload changes it.
    assert!(Pool::attach_shared(&name.0, settings(3, 8), None, vec![-1; 2], Clock::Monotonic).is_ok());
    let other = PoolSpec { max_concurrency: Some(2), queue_depth: 8, max_wait_ms: [60_000.0, 60_000.0, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.5, ..PoolSpec::default() }.validate().unwrap();
    let e = Pool::attach_shared(&name.0, other, Some(0), vec![-1; 2], Clock::Monotonic).err().unwrap();
    assert!(matches!(e, CoreError::Layout(_)), "{e}");
    let deeper = settings(2, 100);
    assert!(matches!(Pool::attach_shared(&name.0, deeper, Some(0), vec![-1; 2], Clock::Monotonic), Err(CoreError::Layout(_))));
    assert!(matches!(Pool::attach_shared(&name.0, s.clone(), Some(2), vec![-1; 2], Clock::Monotonic), Err(CoreError::InvalidArgument { .. })));
    assert!(Pool::attach_shared("/tierq-test-no-such-region", s.clone(), Some(0), vec![-1; 2], Clock::Monotonic).is_err());
    assert!(Pool::attach_shared("no-slash", s, Some(0), vec![-1; 2], Clock::Monotonic).is_err());
}

#[test]
fn grant_decided_in_one_worker_reaches_the_owner_through_its_mailbox() {
    let name = Name::new("mail");
    let s = settings(1, 8);
    let _sup = Pool::create_shared(&name.0, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
    let (a, b) = (attach(&name, &s, 0, 2), attach(&name, &s, 1, 2));
    assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
    let Admit::Queued { waiter, granted: None, .. } = b.admit(Lane::Default, 1) else { panic!() };
    assert_eq!((a.held_by(0), a.held_by(1)), (1, 0));
    assert_eq!(a.release(), None, "the waiter is b's, not a's");
    assert_eq!((a.held_by(0), a.held_by(1)), (0, 1), "the slot moved to b");
    assert_eq!(drain(&b), vec![(waiter, Outcome::Granted)]);
    assert_eq!(drain(&b), vec![], "each message is taken once");
    assert_eq!(b.release(), None);
    assert_eq!((b.stats().in_flight, b.held_by(1)), (0, 0));
}

#[test]
fn priority_waiter_in_one_worker_goes_ahead_of_defaults_queued_in_another() {
    let name = Name::new("prio");
    let s = settings(1, 8);
    let _sup = Pool::create_shared(&name.0, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
    let (a, b) = (attach(&name, &s, 0, 2), attach(&name, &s, 1, 2));
    assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
    let defaults: Vec<u64> = (0..3)
        .map(|_| match b.admit(Lane::Default, 1) {
            Admit::Queued { waiter, .. } => waiter,
            other => panic!("{other:?}"),
        })
        .collect();
    let Admit::Queued { waiter: prio, .. } = a.admit(Lane::Priority, 1) else { panic!() };
    assert_eq!(b.release(), None, "b's slot goes to a's priority waiter");
    assert_eq!(drain(&a), vec![(prio, Outcome::Granted)]);
    assert_eq!(a.release(), None);
    assert_eq!(drain(&b), vec![(defaults[0], Outcome::Granted)]);
}

#[test]
fn eviction_and_expiry_decided_elsewhere_are_mailed_as_sheds() {
    let name = Name::new("shed");
    let s = PoolSpec { max_concurrency: Some(1), queue_depth: 1, max_wait_ms: [60_000.0, 10.0, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap();
    let _sup = Pool::create_shared(&name.0, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
    let (a, b) = (attach(&name, &s, 0, 2), attach(&name, &s, 1, 2));
    assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
    let Admit::Queued { waiter: victim, .. } = b.admit(Lane::Default, 1) else { panic!() };
    let Admit::Queued { waiter: prio, evicted: None, .. } = a.admit(Lane::Priority, 1) else { panic!() };
    assert_eq!(drain(&b), vec![(victim, Outcome::Shed(ShedCode::ServerOverloaded))]);
    assert_eq!(a.cancel(prio), true);
    let Admit::Queued { waiter: late, .. } = b.admit(Lane::Default, 1) else { panic!() };
    thread::sleep(Duration::from_millis(20));
    let mut expired = vec![];
    a.expire_due(|id| expired.push(id));
    assert_eq!(expired, vec![], "not a's waiter");
    assert_eq!(drain(&b), vec![(late, Outcome::Shed(ShedCode::QueueTimeout))]);
}

#[test]
fn reclaim_of_a_dead_worker_frees_its_slots_and_tombstones_its_waiters() {
    let name = Name::new("reclaim");
    let s = settings(2, 8);
    let sup = Pool::create_shared(&name.0, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
    let (a, b) = (attach(&name, &s, 0, 2), attach(&name, &s, 1, 2));
    assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
    assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
    let Admit::Queued { .. } = b.admit(Lane::Priority, 1) else { panic!() };
    let Admit::Queued { waiter: mine, .. } = a.admit(Lane::Default, 1) else { panic!() };
    drop(b); // "killed": it never releases
    assert_eq!(sup.reclaim_worker(1, |_| panic!("the supervisor owns no waiters")).unwrap(), (2, 1));
    // One slot went to a's waiter (through the mailbox), the other is free.
    assert_eq!(drain(&a), vec![(mine, Outcome::Granted)]);
    let st = a.stats();
    assert_eq!((st.in_flight, st.depth, st.cancelled), (1, [0, 0, 0], 1));
    // A new generation attaches at the same index; mail for the old one is ignored.
    let b2 = attach(&name, &s, 1, 2);
    assert_eq!(b2.admit(Lane::Default, 1), Admit::Now);
    assert_eq!((a.release(), b2.release()), (None, None));
    assert_eq!(a.stats().in_flight, 0);
}

#[test]
fn grant_to_a_worker_that_died_meanwhile_passes_the_slot_on() {
    let name = Name::new("gone");
    let s = settings(1, 8);
    let sup = Pool::create_shared(&name.0, s.clone(), 3, vec![], Clock::Monotonic).unwrap();
    let (a, b, c) = (attach(&name, &s, 0, 3), attach(&name, &s, 1, 3), attach(&name, &s, 2, 3));
    assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
    let Admit::Queued { .. } = b.admit(Lane::Default, 1) else { panic!() };
    let Admit::Queued { waiter: cw, .. } = c.admit(Lane::Default, 1) else { panic!() };
    // b's generation ends, but (as if the reclaim raced) its waiter is still
    // in line: a release must skip it rather than strand the slot.
    drop(b);
    sup.reclaim_worker(1, |_| {}).unwrap();
    assert_eq!(a.release(), None);
    assert_eq!(drain(&c), vec![(cw, Outcome::Granted)]);
    assert_eq!((a.held_by(0), a.held_by(1), a.held_by(2)), (0, 0, 1));
}

#[test]
fn eventfd_is_written_once_per_drain_cycle() {
    let name = Name::new("efd");
    let s = settings(1, 8);
    // SAFETY: plain syscall; the fd is closed at the end of the test.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(efd >= 0);
    let _sup = Pool::create_shared(&name.0, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
    let a = Pool::attach_shared(&name.0, s.clone(), Some(0), vec![-1, efd], Clock::Monotonic).unwrap();
    let b = Pool::attach_shared(&name.0, s.clone(), Some(1), vec![-1, efd], Clock::Monotonic).unwrap();
    let read = || {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local.
        let n = unsafe { libc::read(efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        if n == 8 { v } else { 0 }
    };
    assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
    b.admit(Lane::Default, 1);
    b.admit(Lane::Default, 1);
    assert_eq!(read(), 0, "nothing decided yet");
    a.release();
    assert_eq!(read(), 1);
    assert_eq!(drain(&b).len(), 1);
    b.release(); // b's own waiter: no mail, no wake
    assert_eq!(read(), 0);
    // SAFETY: closing our own fd.
    unsafe { libc::close(efd) };
}

/// Counters in an anonymous shared mapping, so forked children update them.
struct Shm {
    ptr: *mut AtomicU64,
    words: usize,
}
unsafe impl Send for Shm {}
unsafe impl Sync for Shm {}
impl Shm {
    fn new(words: usize) -> Shm {
        // SAFETY: anonymous shared mapping, zero-filled, checked for failure.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), words * 8, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(p, libc::MAP_FAILED);
        Shm { ptr: p as *mut AtomicU64, words }
    }
    fn w(&self) -> &[AtomicU64] {
        // SAFETY: the mapping lives as long as `self` and is atomics-only.
        unsafe { std::slice::from_raw_parts(self.ptr, self.words) }
    }
}
impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.words * 8) };
    }
}

// Shared counter words.
/// Slots held per the harness, 16 bits per worker, so one atomic add keeps
/// both the total and each worker's share (a killed worker's share is then
/// exact: it is counted after the core grants and uncounted before release).
const HOLDING: usize = 0;
const MAX_HOLDING: usize = 1;
const HOLDS: usize = 2;
const STOP: usize = 3;
const CROSS: usize = 4;
const FATE: usize = 8;
const TICKETS: usize = 1 << 15;

/// One worker's loop: admit, wait for its own waiter through its mailbox
/// (polling: this is a test), hold briefly, release. Marks each waiter's fate
/// exactly once in `c`.
fn worker_loop(p: &Pool, c: &[AtomicU64], me: usize, max: u64, rounds: usize, seed: u64, hold_us: u64) -> (u64, u64) {
    let unit = 1u64 << (16 * me);
    let (mut served, mut shed) = (0u64, 0u64);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let decide = |id: u64, fate: u64| {
        let prev = c[FATE + id as usize].swap(fate, SeqCst);
        assert_eq!(prev, 0, "waiter {id} decided twice");
    };
    let hold = |granted_remote: bool| {
        let fields = c[HOLDING].fetch_add(unit, SeqCst) + unit;
        let now: u64 = (0..4).map(|i| (fields >> (16 * i)) & 0xffff).sum();
        c[MAX_HOLDING].fetch_max(now, SeqCst);
        assert!(now <= max, "{now} slots held, max {max}");
        if granted_remote {
            c[CROSS].fetch_add(1, SeqCst);
        }
        c[HOLDS].fetch_add(1, SeqCst);
        if hold_us > 0 {
            thread::sleep(Duration::from_micros(hold_us));
        } else {
            thread::yield_now();
        }
        c[HOLDING].fetch_sub(unit, SeqCst);
    };
    // Release and follow local hand-offs until the slot leaves this worker.
    let release = |mine: &mut HashSet<u64>| {
        let mut next = p.release();
        while let Some(id) = next {
            assert!(mine.remove(&id), "granted a waiter that is not ours");
            decide(id, 1);
            hold(false);
            next = p.release();
        }
    };
    let mut mine = HashSet::new();
    for _ in 0..rounds {
        if c[STOP].load(SeqCst) != 0 {
            break;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let lane = if rng % 3 == 0 { Lane::Priority } else { Lane::Default };
        match p.admit(lane, 1) {
            Admit::Now => {
                hold(false);
                served += 1;
                release(&mut mine);
            }
            Admit::Shed { .. } => shed += 1,
            Admit::Queued { waiter, evicted, granted } => {
                if let Some(e) = evicted {
                    assert!(mine.remove(&e));
                    decide(e, 2);
                }
                mine.insert(waiter);
                if let Some(g) = granted {
                    assert!(mine.remove(&g));
                    decide(g, 1);
                    hold(false);
                    served += 1;
                    release(&mut mine);
                }
            }
        }
        // Wait for our waiters to be decided (by anyone) before the next round.
        let t0 = Instant::now();
        while !mine.is_empty() {
            for (id, o) in drain_all(p) {
                assert!(mine.remove(&id), "mail for a waiter that is not ours");
                match o {
                    Outcome::Granted => {
                        decide(id, 1);
                        hold(true);
                        served += 1;
                        release(&mut mine);
                    }
                    Outcome::Shed(_) => {
                        decide(id, 2);
                        shed += 1;
                    }
                }
            }
            thread::yield_now();
            assert!(t0.elapsed() < Duration::from_secs(20), "waiters stranded: {mine:?}");
        }
    }
    (served, shed)
}

fn drain_all(p: &Pool) -> Vec<(u64, Outcome)> {
    drain(p)
}

#[test]
fn workers_as_threads_never_exceed_slots_and_decide_each_waiter_once() {
    let name = Name::new("threads");
    let workers = 4;
    let s = settings(3, 16);
    let sup = Pool::create_shared(&name.0, s.clone(), workers, vec![], Clock::Monotonic).unwrap();
    let c = Arc::new(Shm::new(FATE + 4 * TICKETS));
    let barrier = Arc::new(Barrier::new(workers));
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            let (c, barrier, s) = (c.clone(), barrier.clone(), s.clone());
            let p = attach(&name, &s, i, workers);
            thread::spawn(move || {
                barrier.wait();
                worker_loop(&p, c.w(), i, 3, 2000, i as u64, 0)
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap().0).sum();
    let st = sup.stats();
    assert_eq!((st.in_flight, st.depth), (0, [0, 0, 0]));
    assert_eq!(c.w()[HOLDS].load(SeqCst), total);
    assert!(c.w()[CROSS].load(SeqCst) > 0, "no grant ever crossed workers");
    assert_eq!(c.w()[MAX_HOLDING].load(SeqCst), 3);
}

/// Forks `workers` children running `worker_loop`; returns their pids.
/// `max`: the most slots the harness may ever see held at once.
#[allow(clippy::too_many_arguments)]
fn fork_workers(name: &Name, s: &PoolSettings, c: &Arc<Shm>, workers: usize, rounds: usize, hold_us: u64, skip: &[usize], max: u64) -> Vec<(usize, libc::pid_t)> {
    (0..workers)
        .filter(|i| !skip.contains(i))
        .map(|i| {
            // SAFETY: the child only runs this crate's code and exits with
            // _exit; glibc keeps malloc usable after fork.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let p = attach(name, s, i, workers);
                    worker_loop(&p, c.w(), i, max, rounds, i as u64 + 99, hold_us);
                }))
                .map_or(1, |_| 0);
                // SAFETY: ends the child without running the parent's atexit/test harness.
                unsafe { libc::_exit(code) };
            }
            (i, pid)
        })
        .collect()
}

fn wait_ok(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

fn adaptive(min: i64, max: i64, initial: i64, depth: i64) -> PoolSettings {
    PoolSpec {
        min_concurrency: Some(min),
        max_concurrency_limit: Some(max),
        initial_concurrency: Some(initial),
        queue_depth: depth,
        max_wait_ms: [60_000.0, 60_000.0, 600_000.0],
        ..PoolSpec::default()
    }
    .validate()
    .unwrap()
}

#[test]
fn a_limit_set_through_one_worker_is_the_limit_of_every_worker() {
    let name = Name::new("limit");
    let s = adaptive(2, 16, 16, 8);
    let sup = Pool::create_shared(&name.0, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
    // The limit's mode is each worker's own (a reload may change it): a fixed
    // 16 (same sizes) attaches; another max wait (same sizes) may not.
    let fixed = PoolSpec { max_concurrency: Some(16), queue_depth: 8, max_wait_ms: [60_000.0, 60_000.0, 600_000.0], ..PoolSpec::default() }.validate().unwrap();
    assert_eq!(fixed.limit, LimitMode::Fixed(16));
    assert!(Pool::attach_shared(&name.0, fixed, None, vec![-1; 2], Clock::Monotonic).is_ok());
    let waits = PoolSpec { max_wait_ms: [30_000.0, 60_000.0, 600_000.0], ..PoolSpec::default() };
    let waits = PoolSpec { min_concurrency: Some(2), max_concurrency_limit: Some(16), initial_concurrency: Some(16), queue_depth: 8, ..waits }.validate().unwrap();
    assert!(matches!(Pool::attach_shared(&name.0, waits, None, vec![-1; 2], Clock::Monotonic), Err(CoreError::Layout(_))));
    let (a, b) = (attach(&name, &s, 0, 2), attach(&name, &s, 1, 2));
    assert!(a.set_limit(3).is_empty());
    assert_eq!((b.limit(), sup.limit(), sup.stats().limit), (3, 3, 3));
    for _ in 0..3 {
        assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
    }
    let Admit::Queued { waiter, granted: None, .. } = b.admit(Lane::Default, 1) else { panic!() };
    assert!(matches!(a.admit(Lane::Default, 1), Admit::Queued { granted: None, .. }));
    // Raised by a: the slot goes to the first waiter, b's, through b's mailbox.
    assert!(a.set_limit(4).is_empty());
    assert_eq!(drain(&b), vec![(waiter, Outcome::Granted)]);
    assert_eq!((sup.stats().in_flight, a.held_by(1)), (4, 4));
    // Lowered by b: releases free slots, a's waiter stays queued.
    assert!(b.set_limit(2).is_empty());
    assert_eq!(b.release(), None);
    assert_eq!(b.release(), None);
    assert_eq!((sup.stats().in_flight, sup.stats().depth), (2, [0, 1, 0]));
    assert_eq!(drain(&a), vec![]);
}

#[test]
fn a_lowered_limit_holds_across_processes() {
    let name = Name::new("lowered");
    let workers = 4;
    let s = adaptive(2, 8, 8, 16);
    let sup = Pool::create_shared(&name.0, s.clone(), workers, vec![], Clock::Monotonic).unwrap();
    sup.set_limit(2);
    let c = Arc::new(Shm::new(FATE + 4 * TICKETS));
    for (i, pid) in fork_workers(&name, &s, &c, workers, 1500, 0, &[], 2) {
        assert_eq!(wait_ok(pid), 0, "worker {i} failed (held more than the lowered limit?)");
    }
    let st = sup.stats();
    assert_eq!((st.in_flight, st.depth, st.limit), (0, [0, 0, 0], 2));
    assert!(c.w()[CROSS].load(SeqCst) > 0, "no grant ever crossed processes");
    assert_eq!(c.w()[MAX_HOLDING].load(SeqCst), 2);
}

#[test]
fn workers_as_processes_never_exceed_slots_and_decide_each_waiter_once() {
    let name = Name::new("procs");
    let workers = 4;
    let s = settings(3, 16);
    let sup = Pool::create_shared(&name.0, s.clone(), workers, vec![], Clock::Monotonic).unwrap();
    let c = Arc::new(Shm::new(FATE + 4 * TICKETS));
    for (i, pid) in fork_workers(&name, &s, &c, workers, 1500, 0, &[], s.limit.max() as u64) {
        assert_eq!(wait_ok(pid), 0, "worker {i} failed");
    }
    let st = sup.stats();
    assert_eq!((st.in_flight, st.depth), (0, [0, 0, 0]));
    assert!(c.w()[CROSS].load(SeqCst) > 0, "no grant ever crossed processes");
    assert!(c.w()[MAX_HOLDING].load(SeqCst) <= 3);
    assert!((0..workers).all(|i| sup.held_by(i) == 0));
}

#[test]
fn worker_killed_with_sigkill_under_load_leaks_no_slot() {
    let name = Name::new("kill");
    let workers = 3;
    let s = settings(2, 16);
    let sup = Pool::create_shared(&name.0, s.clone(), workers, vec![], Clock::Monotonic).unwrap();
    let c = Arc::new(Shm::new(FATE + 4 * TICKETS));
    let pids = fork_workers(&name, &s, &c, workers, usize::MAX, 200, &[], s.limit.max() as u64);
    // Under load: every worker's loop is turning (polled, not slept on, so a
    // slow machine only makes it take longer).
    wait_until(|| c.w()[HOLDS].load(SeqCst) >= 100, "100 holds before the kill");
    let (victim, vpid) = pids[0];
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vpid, libc::SIGKILL) };
    let status = wait_ok(vpid);
    assert!(libc::WIFSIGNALED(status));
    // The victim's share of the harness count died with it; drop it before the
    // reclaim hands the victim's slots to others. (Subtracting the
    // reclaimed `slots` instead was flaky: a kill between the core's grant and
    // the harness count, or between the uncount and the release, skews it.)
    let share = (c.w()[HOLDING].load(SeqCst) >> (16 * victim)) & 0xffff;
    c.w()[HOLDING].fetch_sub(share << (16 * victim), SeqCst);
    let (slots, waiters) = sup.reclaim_worker(victim, |_| panic!()).unwrap();
    // Restart it, as the supervisor would, and let everyone run a little more.
    let restarted = fork_workers(&name, &s, &c, workers, usize::MAX, 200, &[1, 2], s.limit.max() as u64);
    let before = c.w()[HOLDS].load(SeqCst);
    wait_until(|| c.w()[HOLDS].load(SeqCst) >= before + 100, "100 more holds after the reclaim");
    c.w()[STOP].store(1, SeqCst);
    for (i, pid) in pids[1..].iter().chain(&restarted) {
        assert_eq!(wait_ok(*pid), 0, "worker {i} failed");
    }
    let st = sup.stats();
    assert_eq!((st.in_flight, st.depth), (0, [0, 0, 0]), "reclaimed {slots} slots, {waiters} waiters");
}

/// Polls `cond` (a state the test waits for, never a fixed sleep); panics
/// naming `what` after a minute, far beyond any loaded machine's delay.
fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "not reached in 60 s: {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

// ---- per-key buckets shared across workers ------------------------------

use tierq_core::keytable::{KeyTable, RPM, TPM};
use tierq_core::BucketParams;

struct TableName(String);
impl Drop for TableName {
    fn drop(&mut self) {
        let _ = KeyTable::unlink_shared(&self.0);
    }
}

fn table_name(tag: &str) -> TableName {
    TableName(Name::new(tag).0.clone())
}

/// Tries `tries` times to take one token from key `id`'s rpm bucket; returns how many it got.
fn hammer(t: &KeyTable, id: &str, p: &BucketParams, tries: usize) -> u64 {
    let mut got = 0;
    for _ in 0..tries {
        let e = t.entry(id).expect("room for the key");
        if t.try_take(e, RPM, 1, p).is_ok() {
            got += 1;
        }
    }
    got
}

#[test]
fn key_table_attach_refuses_a_pool_block_and_keeps_entries_across_processes() {
    let name = table_name("keys-attach");
    let t = KeyTable::create_shared(&name.0, 100, Clock::Monotonic).unwrap();
    assert_eq!(t.capacity(), 128);
    let other = KeyTable::attach_shared(&name.0, Clock::Monotonic).unwrap();
    let e = t.entry("abc").unwrap();
    assert_eq!(other.entry("abc"), Some(e), "the same key finds the same entry in every mapping");
    assert_eq!(other.used(), 1);
    let p = BucketParams::new(1.0, 3.0, 0.0).unwrap();
    assert_eq!(t.try_take(e, TPM, 3, &p), Ok(()));
    assert!(other.try_take(e, TPM, 1, &p).is_err(), "tpm drained through the other mapping");
    assert_eq!(other.try_take(e, RPM, 1, &p), Ok(()), "rpm is its own bucket");
    let pool = Name::new("keys-notatable");
    let _sup = Pool::create_shared(&pool.0, settings(1, 4), 1, vec![], Clock::Monotonic).unwrap();
    assert!(matches!(KeyTable::attach_shared(&pool.0, Clock::Monotonic), Err(CoreError::Layout(_))));
    assert!(KeyTable::create_shared(&name.0, 10, Clock::Monotonic).is_err(), "exists");
}

#[test]
fn threads_racing_on_one_keys_bucket_get_exactly_the_burst() {
    let name = table_name("keys-threads");
    let _sup = KeyTable::create_shared(&name.0, 64, Clock::Monotonic).unwrap();
    // 1000 a minute: one token per 60 ms. The bound allows exactly the refill
    // the run's duration earns, so a slow host cannot make it flaky.
    let p = BucketParams::new(1000.0 / 60.0, 1000.0, 0.0).unwrap();
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let t0 = Instant::now();
    let got: u64 = (0..threads)
        .map(|_| {
            let (name, barrier) = (name.0.clone(), barrier.clone());
            thread::spawn(move || {
                let t = KeyTable::attach_shared(&name, Clock::Monotonic).unwrap();
                barrier.wait();
                hammer(&t, "racedkey0001", &p, 5000)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    let refill = (t0.elapsed().as_nanos() as u64 / p.interval_ns) + 1;
    assert!(got >= 1000 && got <= 1000 + refill, "got {got}, burst 1000, refill at most {refill}");
}

#[test]
fn forked_workers_racing_on_one_keys_bucket_get_exactly_the_burst() {
    let name = table_name("keys-procs");
    let sup = KeyTable::create_shared(&name.0, 64, Clock::Monotonic).unwrap();
    // 60 a minute: one refill per second, so a run under a second gets exactly the burst.
    let p = BucketParams::new(1.0, 60.0, 0.0).unwrap();
    let c = Arc::new(Shm::new(8));
    let workers = 4;
    let t0 = Instant::now();
    let pids: Vec<libc::pid_t> = (0..workers)
        .map(|_| {
            // SAFETY: the child only runs this crate's code and exits with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let t = KeyTable::attach_shared(&name.0, Clock::Monotonic).unwrap();
                    // Start together: spin until every child has attached.
                    c.w()[1].fetch_add(1, SeqCst);
                    while c.w()[1].load(SeqCst) < workers as u64 {
                        std::hint::spin_loop();
                    }
                    let got = hammer(&t, "racedkey0002", &p, 2000);
                    c.w()[0].fetch_add(got, SeqCst);
                }))
                .map_or(1, |_| 0);
                // SAFETY: ends the child without running the parent's test harness.
                unsafe { libc::_exit(code) };
            }
            pid
        })
        .collect();
    for pid in pids {
        assert_eq!(wait_ok(pid), 0);
    }
    let got = c.w()[0].load(SeqCst);
    let refill = t0.elapsed().as_secs();
    assert!(got >= 60 && got <= 60 + refill, "got {got} across {workers} processes, burst 60, refill {refill}");
    assert_eq!(sup.used(), 1, "one entry for the one key");
}

/// A child process attached as `worker` that queues `n` requests of `flow`,
/// says so (`c[0]` += 1), then serves them as they are granted (by mail from
/// the others, or to itself on its own release): each grant appends `tag`
/// to the log (`c[2..]`, `c[1]` the next place) before the slot is released.
fn fair_child(name: &Name, s: &PoolSettings, c: &Arc<Shm>, worker: usize, flow: &str, n: usize, tag: u64) -> libc::pid_t {
    // SAFETY: the child only runs this crate's code and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid != 0 {
        return pid;
    }
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let p = attach(name, s, worker, 3);
        let ask = tierq_core::Ask { hand: p.hand(flow.as_bytes()), service: 100, max_wait_ns: None };
        for _ in 0..n {
            assert!(matches!(p.admit_ask(Lane::Default, 1, &ask).0, Admit::Queued { granted: None, .. }));
        }
        c.w()[0].fetch_add(1, SeqCst);
        let log = |c: &Shm| {
            let at = c.w()[1].fetch_add(1, SeqCst) as usize;
            c.w()[2 + at].store(tag, SeqCst);
        };
        let mut served = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while served < n {
            assert!(Instant::now() < deadline, "worker {worker} starved: {served} of {n}");
            for (_, outcome) in drain(&p) {
                assert_eq!(outcome, Outcome::Granted);
                let mut granted = true;
                while granted {
                    log(c);
                    served += 1;
                    granted = p.release().is_some();
                }
            }
            thread::yield_now();
        }
    }))
    .map_or(1, |_| 0);
    // SAFETY: ends the child without running the parent's test harness.
    unsafe { libc::_exit(code) };
}

#[test]
fn a_greedy_flow_in_one_process_cannot_starve_a_polite_flow_in_another() {
    let name = Name::new("fair");
    let s = settings(1, 64);
    let sup = Pool::create_shared(&name.0, s.clone(), 3, vec![], Clock::Monotonic).unwrap();
    let (greedy, polite) = ("key-greedy", "key-polite");
    let (g, p) = (sup.hand(greedy.as_bytes()), sup.hand(polite.as_bytes()));
    assert!(g.0 != p.0 && g.0 != p.1 && g.1 != p.0 && g.1 != p.1, "the two keys share a queue: pick other names");
    let holder = attach(&name, &s, 0, 3);
    // The holder's own service goes to a queue of neither key.
    let free = (0..64).find(|q| ![g.0, g.1, p.0, p.1].contains(q)).unwrap();
    let ask = tierq_core::Ask { hand: (free, free), service: 100, max_wait_ns: None };
    assert_eq!(holder.admit_ask(Lane::Default, 1, &ask).0, Admit::Now);
    let c = Arc::new(Shm::new(64));
    let wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.w()[0].load(SeqCst) < n {
            assert!(Instant::now() < deadline);
            thread::yield_now();
        }
    };
    // The greedy key's 20 requests queue first, in process 1; the polite
    // key's one after them, in process 2.
    let pid_g = fair_child(&name, &s, &c, 1, greedy, 20, 1);
    wait_for(1);
    let pid_p = fair_child(&name, &s, &c, 2, polite, 1, 2);
    wait_for(2);
    // The greedy key keeps to the one queue it owns (`fair::owner`), the
    // polite key has its own.
    assert_eq!(sup.stats().fair_flows_active, [0, 2, 0]);
    assert_eq!(holder.release(), None, "the slot went to another process's waiter");
    assert_eq!(wait_ok(pid_g), 0);
    assert_eq!(wait_ok(pid_p), 0);
    let order: Vec<u64> = (0..21).map(|i| c.w()[2 + i].load(SeqCst)).collect();
    assert_eq!(order.iter().filter(|&&t| t == 1).count(), 20);
    // First come, first served would serve it 21st.
    let at = order.iter().position(|&t| t == 2).unwrap();
    assert!(at <= 2, "the polite key was served {}th: {order:?}", at + 1);
    let st = sup.stats();
    assert_eq!((st.in_flight, st.depth, st.fair_flows_active), (0, [0, 0, 0], [0, 0, 0]));
}

#[test]
fn threads_racing_on_one_keys_budget_count_exactly_its_limit_and_nothing_in_another_day() {
    use tierq_core::keytable::{BUDGET, RAMP};
    let name = table_name("keys-budget");
    let _sup = KeyTable::create_shared(&name.0, 64, Clock::Monotonic).unwrap();
    let (threads, day, limit) = (4, 20_429u64, 3_000u64);
    let barrier = Arc::new(Barrier::new(threads));
    let got: u64 = (0..threads)
        .map(|_| {
            let (name, barrier) = (name.0.clone(), barrier.clone());
            thread::spawn(move || {
                let t = KeyTable::attach_shared(&name, Clock::Monotonic).unwrap();
                let e = t.entry("budgetkey001").unwrap();
                barrier.wait();
                // Costs 1 to 3, so the last ones that would cross the limit are refused.
                (0..2000u64).filter(|i| t.count_take(e, BUDGET, day, 1 + i % 3, limit).is_ok()).map(|i| 1 + i % 3).sum::<u64>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    let t = KeyTable::attach_shared(&name.0, Clock::Monotonic).unwrap();
    let e = t.entry("budgetkey001").unwrap();
    assert_eq!(t.count(e, BUDGET, day), got, "every cost counted once");
    assert!(got <= limit && got >= limit - 2, "counted {got} of {limit}: never past it");
    assert_eq!(t.count(e, BUDGET, day + 1), 0);
    assert_eq!(t.count(e, RAMP, day), 0);
}

#[test]
fn shadow_mode_is_part_of_the_blocks_settings_and_its_count_is_host_wide() {
    // A worker that would enforce may not attach to a block made in shadow mode
    // (nor the other way round): the bit is in the settings fingerprint.
    let name = Name::new("shadow");
    let spec = |enforce| PoolSpec { max_concurrency: Some(8), queue_depth: 8, rate: Some(0.001), burst: Some(2.0), priority_reserve: 0.0, enforce, ..PoolSpec::default() }.validate().unwrap();
    let (shadow, enforcing) = (spec(false), spec(true));
    let _sup = Pool::create_shared(&name.0, shadow.clone(), 2, vec![], Clock::Monotonic).unwrap();
    let e = Pool::attach_shared(&name.0, enforcing, Some(0), vec![-1; 2], Clock::Monotonic).err().unwrap();
    assert!(matches!(e, CoreError::Layout(_)), "{e}");
    let (a, b) = (attach(&name, &shadow, 0, 2), attach(&name, &shadow, 1, 2));
    // One bucket of 2 for both workers: 3 arrivals on each, 4 over the rate,
    // counted once each in the block and none shed.
    for _ in 0..3 {
        for p in [&a, &b] {
            assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        }
    }
    for p in [&a, &b] {
        let st = p.stats();
        assert_eq!((st.shadow_rate_limited, st.shed), (4, [0, 0, 0]));
    }
}
