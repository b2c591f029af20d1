//! loom models: every interleaving of the core's racy paths, checked
//! exhaustively. Run with `RUSTFLAGS="--cfg loom" cargo test --release --test loom`.
#![cfg(loom)]

use std::sync::Arc as StdArc;

use loom::sync::Arc;
use loom::thread;
use tierq_core::{Admit, Clock, Lane, ManualClock, Pool, PoolSpec, TokenBucket};

fn pool(max_concurrency: i64, queue_depth: i64) -> Pool {
    let s = PoolSpec { max_concurrency: Some(max_concurrency), queue_depth: queue_depth, max_wait_ms: [1000.0, 1000.0, 600_000.0], rate: None, burst: None, priority_reserve: 0.2, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap();
    Pool::new(s, Clock::Manual(StdArc::new(ManualClock::new(1))))
}

#[test]
fn bucket_last_token_goes_to_exactly_one_thread() {
    loom::model(|| {
        let b = Arc::new(TokenBucket::new(1.0, 1.0, 0.0, Clock::Manual(StdArc::new(ManualClock::new(1)))).unwrap());
        let b2 = b.clone();
        let t = thread::spawn(move || b2.try_take(1, Lane::Priority).is_ok());
        let mine = b.try_take(1, Lane::Priority).is_ok();
        let theirs = t.join().unwrap();
        assert!(mine ^ theirs, "mine={mine} theirs={theirs}");
    });
}

#[test]
fn waiter_joining_while_slot_frees_is_never_stranded() {
    loom::model(|| {
        let p = Arc::new(pool(1, 2));
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let p2 = p.clone();
        let joiner = thread::spawn(move || p2.admit(Lane::Default, 1));
        let released = p.release();
        let joined = joiner.join().unwrap();
        match joined {
            Admit::Now => assert_eq!(released, None),
            Admit::Queued { waiter, granted, .. } => {
                let grants = [granted, released].iter().filter(|g| **g == Some(waiter)).count();
                assert_eq!(grants, 1, "granted={granted:?} released={released:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let s = p.stats();
        assert_eq!((s.in_flight, s.depth), (1, [0, 0, 0]));
    });
}

#[test]
fn cancel_and_release_race_decides_the_waiter_once() {
    loom::model(|| {
        let p = Arc::new(pool(1, 2));
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let Admit::Queued { waiter, granted: None, .. } = p.admit(Lane::Priority, 1) else { panic!() };
        let p2 = p.clone();
        let canceller = thread::spawn(move || p2.cancel(waiter));
        let released = p.release();
        let cancelled = canceller.join().unwrap();
        let s = p.stats();
        if cancelled {
            assert_eq!((released, s.in_flight), (None, 0));
        } else {
            assert_eq!((released, s.in_flight), (Some(waiter), 1));
        }
        assert_eq!(s.depth, [0, 0, 0]);
    });
}

#[test]
fn two_producers_are_both_queued_and_granted_in_turn() {
    loom::model(|| {
        let p = Arc::new(pool(1, 2));
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let p2 = p.clone();
        let t = thread::spawn(move || p2.admit(Lane::Default, 1));
        let a = p.admit(Lane::Default, 1);
        let b = t.join().unwrap();
        let (Admit::Queued { waiter: wa, .. }, Admit::Queued { waiter: wb, .. }) = (a, b) else { panic!("{a:?} {b:?}") };
        assert_ne!(wa, wb);
        let first = p.release().unwrap();
        let second = p.release().unwrap();
        assert_eq!(first.min(second), wa.min(wb));
        assert_eq!(first.max(second), wa.max(wb));
        assert_eq!(p.release(), None);
        assert_eq!(p.stats().in_flight, 0);
    });
}

#[test]
fn priority_eviction_races_a_cancel_of_the_same_default_waiter() {
    loom::model(|| {
        let p = Arc::new(pool(1, 1));
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let Admit::Queued { waiter: victim, .. } = p.admit(Lane::Default, 1) else { panic!() };
        let p2 = p.clone();
        let canceller = thread::spawn(move || p2.cancel(victim));
        let arrival = p.admit(Lane::Priority, 1);
        let cancelled = canceller.join().unwrap();
        match arrival {
            Admit::Queued { evicted, .. } => {
                // Either the cancel won and the place was simply free, or the
                // eviction won and the cancel found the waiter gone.
                assert_eq!(evicted.is_some(), !cancelled);
            }
            Admit::Shed { .. } => panic!("a place was always available"),
            Admit::Now => panic!("the slot is held"),
        }
        assert_eq!(p.stats().depth, [1, 0, 0]);
    });
}

/// Two releases pop at once, past a tombstone and across the ring's wrap.
/// The head is a hint moved by plain stores, so one release's store can land
/// after the other's and move it back: each waiter must still be granted
/// exactly once, and the ring must keep working from wherever the head ends.
#[test]
fn two_releases_racing_past_a_tombstone_grant_each_waiter_once() {
    // The release path does more atomic steps than when this model was written
    // (flex reserve, deadline margin and replica-home changes of 293fce5..4cabc37):
    // run unbounded, one execution passed loom's default 1,000 branches. Bounded
    // as the fair models below are: at most 3 preemptions, room for the longer path.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.max_branches = 10_000;
    model.check(|| {
        // The ring's own pops (fairness off): with fair pops, the reads of
        // the flow queues' words take the model past loom's branch limit;
        // the fair take is modelled apart (`a_fair_pop_*` below).
        let s = PoolSpec { max_concurrency: Some(2), queue_depth: 3, max_wait_ms: [1000.0, 1000.0, 600_000.0], fairness: "off".into(), ..PoolSpec::default() }.validate().unwrap();
        let p = Arc::new(Pool::new(s, Clock::Manual(StdArc::new(ManualClock::new(1)))));
        assert_eq!(p.settings().ring_cap(), 8);
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        // Tickets 0..6 come and go, so the race runs over tickets 6, 7, 8,
        // and 8 reuses cell 0.
        for _ in 0..6 {
            let Admit::Queued { waiter, granted: None, .. } = p.admit(Lane::Default, 1) else { panic!() };
            assert_eq!(p.release(), Some(waiter));
        }
        let ids: Vec<_> = (0..3)
            .map(|_| match p.admit(Lane::Default, 1) {
                Admit::Queued { waiter, granted: None, .. } => waiter,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(p.cancel(ids[1]));
        let p2 = p.clone();
        let t = thread::spawn(move || p2.release());
        let mine = p.release();
        let theirs = t.join().unwrap();
        let mut got = [mine.unwrap(), theirs.unwrap()];
        got.sort();
        assert_eq!(got, [ids[0], ids[2]]);
        assert_eq!(p.stats().depth, [0, 0, 0]);
        // Whatever the head was left at, the next waiter is granted once.
        let Admit::Queued { waiter, granted: None, .. } = p.admit(Lane::Default, 1) else { panic!() };
        assert_eq!(p.release(), Some(waiter));
        assert_eq!((p.release(), p.release()), (None, None));
        assert_eq!(p.stats().in_flight, 0);
    });
}

/// Two workers post to a third's mailbox while it sweeps after a wake-up.
/// Every message is taken exactly once, and one still in the box after the
/// sweep always has a wake-up pending (the eventfd, modelled as a counter),
/// so the owner never sleeps on mail.
#[test]
fn mailbox_delivers_each_message_once_and_never_sleeps_on_mail() {
    use loom::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use tierq_core::mailbox::Mailbox;

    struct Box3 {
        signalled: AtomicU64,
        cursor: AtomicU64,
        cells: [AtomicU64; 2],
        eventfd: AtomicU64,
    }
    impl Box3 {
        fn mb(&self) -> Mailbox<'_> {
            Mailbox { signalled: &self.signalled, cursor: &self.cursor, cells: &self.cells }
        }
        fn post(&self, msg: u64) {
            if self.mb().post(msg).unwrap() {
                self.eventfd.fetch_add(1, SeqCst);
            }
        }
    }
    loom::model(|| {
        let b = Arc::new(Box3 {
            signalled: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
            cells: [AtomicU64::new(0), AtomicU64::new(0)],
            eventfd: AtomicU64::new(0),
        });
        let producers: Vec<_> = [5u64, 9]
            .into_iter()
            .map(|m| {
                let b = b.clone();
                thread::spawn(move || b.post(m))
            })
            .collect();
        // The owner: woken (or not yet), reads the eventfd, then sweeps.
        let mut got = vec![];
        let woken = b.eventfd.swap(0, SeqCst);
        if woken > 0 {
            b.mb().drain(|m| got.push(m));
        }
        for p in producers {
            p.join().unwrap();
        }
        let left = b.cells.iter().filter(|c| c.load(SeqCst) != 0).count();
        if left > 0 {
            assert!(b.eventfd.load(SeqCst) > 0, "mail left with no wake-up pending: got {got:?}");
        }
        b.mb().drain(|m| got.push(m));
        got.sort();
        assert_eq!(got, vec![5, 9]);
    });
}

#[test]
fn key_table_same_key_claimed_twice_shares_one_entry_and_last_entry_goes_to_one_key() {
    use tierq_core::KeyTable;
    loom::model(|| {
        let t = Arc::new(KeyTable::new(1, Clock::Manual(StdArc::new(ManualClock::new(1)))).unwrap());
        let (t2, t3) = (t.clone(), t.clone());
        let a = thread::spawn(move || t2.entry("samekey"));
        let b = thread::spawn(move || t3.entry("samekey"));
        let other = t.entry("otherkey");
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        match other {
            Some(0) => assert_eq!((a, b), (None, None)),
            None => assert_eq!((a, b), (Some(0), Some(0))),
            o => panic!("{o:?}"),
        }
        assert_eq!(t.used(), 1);
    });
}

fn adaptive(min: i64, max: i64, initial: i64) -> Pool {
    let s = PoolSpec {
        min_concurrency: Some(min),
        max_concurrency_limit: Some(max),
        initial_concurrency: Some(initial),
        queue_depth: 2,
        max_wait_ms: [1000.0, 1000.0, 600_000.0],
        ..PoolSpec::default()
    }
    .validate()
    .unwrap();
    Pool::new(s, Clock::Manual(StdArc::new(ManualClock::new(1))))
}

#[test]
fn a_limit_lowered_while_a_slot_is_released_hands_it_on_or_frees_it_never_both() {
    loom::model(|| {
        let p = Arc::new(adaptive(1, 2, 2));
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let Admit::Queued { waiter, granted: None, .. } = p.admit(Lane::Default, 1) else { panic!() };
        let p2 = p.clone();
        let lowering = thread::spawn(move || p2.set_limit(1));
        let released = p.release();
        assert!(lowering.join().unwrap().is_empty());
        let s = p.stats();
        assert_eq!(s.limit, 1);
        match released {
            // Handed on before the lower limit was seen: nothing preempted.
            Some(w) => assert_eq!((w, s.in_flight, s.depth), (waiter, 2, [0, 0, 0])),
            // Freed under the lower limit: the waiter waits.
            None => assert_eq!((s.in_flight, s.depth), (1, [0, 1, 0])),
        }
    });
}

#[test]
fn a_limit_raised_while_a_slot_is_released_grants_the_waiter_once() {
    loom::model(|| {
        let p = Arc::new(adaptive(1, 2, 1));
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let Admit::Queued { waiter, granted: None, .. } = p.admit(Lane::Default, 1) else { panic!() };
        let p2 = p.clone();
        let raising = thread::spawn(move || p2.set_limit(2));
        let released = p.release();
        let filled = raising.join().unwrap();
        let grants = filled.iter().filter(|&&w| w == waiter).count() + usize::from(released == Some(waiter));
        assert_eq!(grants, 1, "filled={filled:?} released={released:?}");
        let s = p.stats();
        assert_eq!((s.in_flight, s.depth, s.limit), (1, [0, 0, 0], 2));
    });
}

/// A reclaim's audit (`untaken_slots`) racing a live worker that takes a
/// slot, counts it, uncounts it and frees it, each step marked in its SEQ
/// word as `Pool::moving` does: whatever it reads, the audit never finds a
/// slot to free (that would be a slot counted in use by a request, freed
/// under it). Killed inside the step instead, the worker's slot is found.
#[test]
fn an_audit_racing_a_workers_step_never_frees_a_slot_in_use() {
    use loom::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use tierq_core::admission::untaken_slots;

    struct Words {
        seq: AtomicU64,
        held: AtomicU64,
        in_flight: AtomicU64,
        withheld: AtomicU64,
    }
    let audit = |w: &Words| untaken_slots(1, None, |_| &w.seq, |_| &w.held, &w.in_flight, &w.withheld, || 0);
    loom::model(move || {
        let w = Arc::new(Words { seq: AtomicU64::new(0), held: AtomicU64::new(0), in_flight: AtomicU64::new(0), withheld: AtomicU64::new(0) });
        let worker = {
            let w = w.clone();
            thread::spawn(move || {
                w.seq.fetch_add(1, SeqCst);
                w.in_flight.fetch_add(1, SeqCst);
                w.held.fetch_add(1, SeqCst);
                w.seq.fetch_add(1, SeqCst);
                w.seq.fetch_add(1, SeqCst);
                w.held.fetch_sub(1, SeqCst);
                w.in_flight.fetch_sub(1, SeqCst);
                w.seq.fetch_add(1, SeqCst);
            })
        };
        if let Some(n) = audit(&w) {
            assert_eq!(n, 0, "an audit took a live worker's step for a leak");
        }
        worker.join().unwrap();
        assert_eq!(audit(&w), Some(0));
    });
    // Killed after taking the slot: once its reclaim evens its SEQ, the audit finds it.
    loom::model(move || {
        let w = Words { seq: AtomicU64::new(1), held: AtomicU64::new(0), in_flight: AtomicU64::new(1), withheld: AtomicU64::new(0) };
        assert_eq!(audit(&w), None, "inside a step");
        w.seq.store(2, SeqCst);
        assert_eq!(audit(&w), Some(1));
    });
}

fn ask(p: &Pool, flow: &str) -> tierq_core::Ask {
    tierq_core::Ask { hand: p.hand(flow.as_bytes()), service: 100, max_wait_ns: None }
}

/// The first-waiter bookkeeping of a flow queue (`fair::FairLane::join` /
/// `leave`, and the fair pop's scan that clears the bits of emptied
/// queues): a leave empties the queue and a scan clears its active bit
/// while a join refills it. Whatever the order, the queue ends with its
/// one waiter counted and its bit set, so the fair pop sees it. Eight other
/// queues were emptied first, so the scan keeps their bits and clears this
/// one's (`STALE_KEPT`).
#[test]
fn a_queue_emptied_and_tidied_while_it_is_joined_stays_active_for_its_new_waiter() {
    use loom::sync::atomic::AtomicU64;
    use tierq_core::fair::{lane_words, tag, FairLane};
    loom::model(|| {
        let words: Arc<Vec<AtomicU64>> = Arc::new((0..lane_words(16)).map(|_| AtomicU64::new(0)).collect());
        let f = FairLane::new(&words, 16);
        for q in 0..8 {
            f.join(q, 0, 0, 1);
            f.leave(tag(q, 100, false));
        }
        f.join(10, 0, 0, 1);
        let w2 = words.clone();
        let t = thread::spawn(move || FairLane::new(&w2, 16).join(10, 1, 0, 1));
        f.leave(tag(10, 100, false));
        let _ = f.least(None);
        t.join().unwrap();
        assert_eq!(f.queue_state(10).1, 1);
        assert_eq!((f.active(), f.least(None)), (1, Some(10)));
    });
}

/// Two flows whose hands share a queue join it at once, each racing the
/// other for its OWNER word (`fair::FairLane::join`, a plain store after the
/// count): the owner is a hint only, so whichever queues they end in, each
/// waiter is granted exactly once and none is lost.
#[test]
fn two_flows_racing_into_a_shared_queue_are_each_granted_once() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let p = Arc::new(pool(1, 4));
        let q = p.settings().fair_queues;
        // Hands chosen to share queue 0 (one more queue each).
        let a = tierq_core::Ask { hand: (0, 1), service: 100, max_wait_ns: None };
        let b = tierq_core::Ask { hand: (0, q - 1), service: 100, max_wait_ns: None };
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let p2 = p.clone();
        let joiner = thread::spawn(move || p2.admit_ask(Lane::Default, 1, &b).0);
        let (Admit::Queued { waiter: wa, granted: None, .. }, _) = p.admit_ask(Lane::Default, 1, &a) else { panic!() };
        let Admit::Queued { waiter: wb, granted: None, .. } = joiner.join().unwrap() else { panic!() };
        let mut got = [p.release().unwrap(), p.release().unwrap()];
        got.sort();
        let mut want = [wa, wb];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(p.release(), None);
        let s = p.stats();
        assert_eq!((s.in_flight, s.depth, s.fair_flows_active), (0, [0, 0, 0], [0, 0, 0]));
    });
}

/// A release's fair pop races another flow's join: each waiter is granted
/// exactly once, in some order, and none is lost.
#[test]
fn a_fair_pop_racing_another_flows_join_grants_each_waiter_once() {
    loom::model(|| {
        let p = Arc::new(pool(1, 2));
        let (a, b) = (ask(&p, "flow-a"), ask(&p, "flow-b"));
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let (Admit::Queued { waiter: wa, granted: None, .. }, _) = p.admit_ask(Lane::Default, 1, &a) else { panic!() };
        let p2 = p.clone();
        let joiner = thread::spawn(move || p2.admit_ask(Lane::Default, 1, &b).0);
        let first = p.release();
        let Admit::Queued { waiter: wb, granted, .. } = joiner.join().unwrap() else { panic!() };
        assert_eq!(granted, None, "the slot was held or handed on");
        let second = p.release();
        let mut got = [first.unwrap(), second.unwrap()];
        got.sort();
        let mut want = [wa, wb];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(p.release(), None);
        let s = p.stats();
        assert_eq!((s.in_flight, s.depth, s.fair_flows_active), (0, [0, 0, 0], [0, 0, 0]));
    });
}

/// A release's fair pop and a cancel race for the waiter the fair order
/// picks: decided once; the other waiter is granted if the cancel won.
/// Bounded to 3 preemptions: unbounded, the fair pop's reads of every
/// active queue's words made it run for more than 15 minutes.
#[test]
fn a_fair_pop_and_a_cancel_of_the_picked_waiter_decide_it_once() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let p = Arc::new(pool(1, 2));
        let (a, b) = (ask(&p, "flow-a"), ask(&p, "flow-b"));
        assert_eq!(p.admit(Lane::Default, 1), Admit::Now);
        let (Admit::Queued { waiter: wa, .. }, _) = p.admit_ask(Lane::Default, 1, &a) else { panic!() };
        let (Admit::Queued { waiter: wb, .. }, _) = p.admit_ask(Lane::Default, 1, &b) else { panic!() };
        let p2 = p.clone();
        let canceller = thread::spawn(move || p2.cancel(wa));
        let granted = p.release();
        let cancelled = canceller.join().unwrap();
        if cancelled {
            assert_eq!(granted, Some(wb));
        } else {
            assert_eq!(granted, Some(wa), "the older of two equal queues goes first");
            assert_eq!(p.release(), Some(wb));
        }
        assert_eq!(p.release(), None);
        let s = p.stats();
        assert_eq!((s.in_flight, s.depth, s.fair_flows_active), (0, [0, 0, 0], [0, 0, 0]));
    });
}

/// A grant handed to another worker by mail alone (`Pool::hand_to`'s post,
/// `Pool::drain_mailbox`): the granter uncounts the slot and posts one
/// message, the owner takes it and counts the slot, each inside a step, as
/// a reclaim's audit reads the block. Wherever it looks, the slot is held,
/// or in the mailbox (which the audit counts), or inside a step: the audit
/// never frees it. Bounded to 3 preemptions (three threads).
#[test]
fn an_audit_racing_a_grant_by_mail_never_frees_the_slot() {
    use loom::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use tierq_core::admission::untaken_slots;
    use tierq_core::mailbox::{pack, Mailbox, OUT_GRANT};

    struct Words {
        seq: [AtomicU64; 2],
        held: [AtomicU64; 2],
        in_flight: AtomicU64,
        withheld: AtomicU64,
        signalled: AtomicU64,
        cursor: AtomicU64,
        cells: [AtomicU64; 2],
    }
    impl Words {
        fn mb(&self) -> Mailbox<'_> {
            Mailbox { signalled: &self.signalled, cursor: &self.cursor, cells: &self.cells }
        }
        fn audit(&self) -> Option<u64> {
            untaken_slots(2, None, |i| &self.seq[i], |i| &self.held[i], &self.in_flight, &self.withheld, || {
                self.cells.iter().filter(|c| c.load(SeqCst) != 0).count() as u64
            })
        }
    }
    let z = || AtomicU64::new(0);
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(move || {
        // Worker 0 holds the one slot; worker 1 has a waiter it is granted.
        let w = Arc::new(Words { seq: [z(), z()], held: [AtomicU64::new(1), z()], in_flight: AtomicU64::new(1), withheld: z(), signalled: z(), cursor: z(), cells: [z(), z()] });
        let granter = {
            let w = w.clone();
            thread::spawn(move || {
                w.seq[0].fetch_add(1, SeqCst);
                w.held[0].fetch_sub(1, SeqCst);
                w.mb().post(pack(7, 0, OUT_GRANT)).unwrap();
                w.seq[0].fetch_add(1, SeqCst);
            })
        };
        let owner = {
            let w = w.clone();
            thread::spawn(move || {
                w.seq[1].fetch_add(1, SeqCst);
                let n = w.mb().drain(|_| {
                    w.held[1].fetch_add(1, SeqCst);
                });
                w.seq[1].fetch_add(1, SeqCst);
                n
            })
        };
        if let Some(n) = w.audit() {
            assert_eq!(n, 0, "an audit freed a slot on its way by mail");
        }
        granter.join().unwrap();
        let took = owner.join().unwrap();
        assert_eq!(w.audit(), Some(0));
        let mailed = w.cells.iter().filter(|c| c.load(SeqCst) != 0).count();
        assert_eq!(took + mailed, 1, "the grant is taken once or still waits in the mailbox");
    });
}

fn replicas(n: usize, slots: u32) -> tierq_core::replicas::Replicas {
    tierq_core::replicas::Replicas::new(n, tierq_core::LimitMode::Fixed(slots), 1, Clock::Manual(StdArc::new(ManualClock::new(1)))).unwrap()
}

#[test]
fn two_pickers_never_share_a_replicas_last_slot() {
    use tierq_core::replicas::{order_word, Rule};
    loom::model(|| {
        let r = Arc::new(replicas(2, 1));
        let r2 = r.clone();
        let t = thread::spawn(move || r2.pick(order_word(&[0, 1]), Rule::Bounded));
        let mine = r.pick(order_word(&[0, 1]), Rule::Bounded);
        let theirs = t.join().unwrap();
        assert_ne!(mine, theirs);
        assert_eq!(r.over(), 0);
        assert!(r.stats().iter().all(|s| s.in_flight == 1));
    });
}

#[test]
fn a_release_racing_a_pick_never_lets_a_replica_over_its_limit() {
    use tierq_core::replicas::{order_word, Rule};
    loom::model(|| {
        let r = Arc::new(replicas(2, 1));
        assert_eq!(r.pick(order_word(&[0, 1]), Rule::First), 0);
        let r2 = r.clone();
        let t = thread::spawn(move || r2.release(0).unwrap());
        let got = r.pick(order_word(&[0, 1]), Rule::First);
        t.join().unwrap();
        assert_eq!(r.over(), 0);
        let s = r.stats();
        assert!(s.iter().all(|x| x.in_flight <= 1), "{s:?}");
        assert_eq!(s[got].in_flight, 1);
    });
}
