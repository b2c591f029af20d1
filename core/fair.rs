//! Weighted fair queuing inside one lane: the Virtual Token Counter of Sheng
//! et al. (OSDI 2024) over a fixed number of flow queues, in caller-provided
//! atomics so a lane's fair state is part of the pool's block (heap or shared
//! memory). The waiters themselves stay in the lane's ring (`lanes.rs`, the
//! arrival order); each ticket records its queue beside it (`tag`), and a
//! fair pop takes the oldest waiting ticket of the queue with the least
//! counter (`Ring::take_first`). Memory: `5 * queues` words per lane, three
//! more and the bitmap, so a pool's block grows with `queue_depth +
//! fair_queues`, not their product.
//!
//! The rules, each in one place:
//! - a flow id (bytes) hashes with a fixed-key hash to a hand of two queues
//!   (`hand`); it joins the one of them it owns (`owner`: the queue's
//!   waiters are its own), else the one with fewer waiters (an empty one
//!   first), on a tie the one with the lower counter (`choose`), as
//!   Kubernetes' API Priority and Fairness shuffle-shards;
//! - service is a request's charge divided by its weight (`service`), added
//!   to its queue's counter when it is dispatched (`charge`) and corrected
//!   with the real charge when it ends (`correct`);
//! - a queue that becomes active (0 -> 1 waiters) is lifted to one of its
//!   first request's service below the lane's floor (the counter last
//!   dispatched at), or below the least active counter if one is below it,
//!   but not below the newcomer before it, so idle time banks no credit
//!   past that one request (`join`, `lift_target`);
//! - the active queue with the least counter goes next (`least`).
//!
//! Counts and the active bitmap are hints for the choice, never for safety:
//! who gets a waiter is decided by the CAS on its ring cell, and a fair pop
//! that finds nothing falls back to the ring's FIFO pop, so no waiter is
//! ever lost to a stale hint (see `Pool::pop_lane`).

use crate::error::CoreError;
use crate::sync::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};

/// Flow queues per lane unless configured (`fair_queues`).
pub const DEFAULT_QUEUES: u32 = 64;
/// Most flow queues a lane may have (the tag keeps 12 bits for the index).
pub const MAX_QUEUES: u32 = 4096;
/// Service units per unit of charge at weight 1 (weights are in hundredths,
/// so the smallest weight, 0.01, costs 100x).
pub const WEIGHT_ONE: u64 = 100;
/// Weights allowed: 0.01 to 100, in hundredths.
pub const MIN_WEIGHT_CENTI: u32 = 1;
pub const MAX_WEIGHT_CENTI: u32 = 10_000;
/// Largest service a tag can carry (48 bits).
pub const MAX_SERVICE: u64 = (1 << 48) - 1;

const QUEUE_MASK: u64 = 0xfff;
/// Active bits of emptied queues a fair pop's scan leaves set (`scan`).
const STALE_KEPT: u32 = 8;
/// Tag bit: this waiter carries its own deadline (counted in `PERSONAL`).
const TAG_DEADLINE: u64 = 1 << 15;

// A lane's words. Queue q's five words (`QUEUE_WORDS`) start at the bitmap's end + 5q.
const FLOOR: usize = 0;
const PERSONAL: usize = 1;
/// The counter the last newcomer was lifted to (a plain store; a hint).
const LIFTED: usize = 2;
const BITMAP: usize = 3;
/// Per queue, in order (OWNER last):
/// COUNTER: virtual service received (service units); only grows, except
///   by a correction (`correct`) that takes back an estimate's excess.
/// BASE: COUNTER minus the local service not yet exported (`export`);
///   lifts and imports move it with the counter, so they are never exported.
/// WAITING: live waiters tagged with this queue, moved +1 before the ticket
///   is published and -1 after its cell left WAITING, so it never goes
///   below the waiters that are published (a hint otherwise).
/// HINT: a ticket position at or below the oldest waiting ticket of this
///   queue (a plain store; see `Ring::take_first`).
const COUNTER: usize = 0;
const BASE: usize = 1;
const WAITING: usize = 2;
const HINT: usize = 3;
/// OWNER: the fingerprint (`owner`) of the flow whose waiter made this
///   queue active (0 -> 1 waiters), a plain store by that joiner; kept
///   while the queue has waiters, read only with WAITING > 0. A hint for
///   `choose`, like the counts: two flows sharing a queue mix their
///   service in its counter, so a flow keeps to the queue it owns.
const OWNER: usize = 4;
const QUEUE_WORDS: usize = 5;
/// A newcomer's credit, in its own requests' service (`lift_target`).
const LIFT_CREDIT: u64 = 1;

/// Words a lane's fair state needs for `queues` flow queues.
pub const fn lane_words(queues: u32) -> usize {
    BITMAP + (queues as usize).div_ceil(64) + QUEUE_WORDS * queues as usize
}

/// The two queues a flow may join. The flow id is read eight bytes at a
/// time (little-endian, so every architecture agrees; a last partial word
/// is read overlapping the one before it, the length being in the start
/// value), each word folded in with one multiply, then a splitmix64
/// finalizer, and the queues are taken by multiply-shift, not `%`: no
/// per-process seed, so every worker and host puts a flow in the same two
/// queues. FNV-1a (a dependent multiply per byte) and two 64-bit divisions
/// cost about 15 ns of a 15-byte key's admission; this is 4 multiplies.
pub fn hand(flow: &[u8], queues: u32) -> (u32, u32) {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    #[inline]
    fn word(b: &[u8]) -> u64 {
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    #[inline]
    fn mix(h: u64, w: u64) -> u64 {
        let h = (h ^ w).wrapping_mul(K);
        h ^ h >> 29
    }
    let len = flow.len();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (len as u64).wrapping_mul(K);
    let mut at = 0;
    while at + 8 <= len {
        h = mix(h, word(&flow[at..at + 8]));
        at += 8;
    }
    if at < len {
        let last = if len >= 8 {
            word(&flow[len - 8..])
        } else {
            flow.iter().enumerate().fold(0u64, |w, (i, &b)| w | (b as u64) << (8 * i))
        };
        h = mix(h, last);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let n = queues.max(1) as u64;
    if n == 1 {
        return (0, 0);
    }
    // Lemire's multiply-shift: the top of a 32-bit half times n is in 0..n.
    let a = ((h & 0xffff_ffff) * n) >> 32;
    let mut b = ((h >> 32) * (n - 1)) >> 32;
    if b >= a {
        b += 1;
    }
    (a as u32, b as u32)
}

/// A flow's fingerprint for a queue's OWNER word: its hand, ordered (both
/// queues + 1, so never 0, the word of a queue nobody joined yet). The hand
/// is what reaches the core of a flow (`Ask::hand`, from `hand`'s 64-bit
/// hash); two flows with the same ordered hand (1 in 4,032 pairs at 64
/// queues) share both queues and count as one owner.
#[inline]
pub fn owner(hand: (u32, u32)) -> u64 {
    (hand.0 as u64 + 1) << 32 | (hand.1 as u64 + 1)
}

/// A weight (0.01 to 100) in hundredths; the error names `weight`.
pub fn weight_centi(weight: f64) -> Result<u32, CoreError> {
    let centi = (weight * 100.0).round();
    if weight.is_finite() && (MIN_WEIGHT_CENTI as f64..=MAX_WEIGHT_CENTI as f64).contains(&centi) {
        Ok(centi as u32)
    } else {
        Err(CoreError::arg("weight", format!("must be between 0.01 and 100, got {weight}")))
    }
}

/// A request's service: its charge (0 counts as 1) over its weight, in
/// service units (`WEIGHT_ONE` per unit of charge at weight 1).
#[inline]
pub fn service(charge: u64, weight_centi: u32) -> u64 {
    let w = weight_centi.clamp(MIN_WEIGHT_CENTI, MAX_WEIGHT_CENTI) as u64;
    (charge.max(1).saturating_mul(WEIGHT_ONE * WEIGHT_ONE) / w).clamp(1, MAX_SERVICE)
}

/// The word recorded beside a ticket: its queue, its service and whether it
/// has its own deadline.
#[inline]
pub fn tag(queue: u32, service: u64, own_deadline: bool) -> u64 {
    service.min(MAX_SERVICE) << 16 | (own_deadline as u64) << 15 | (queue as u64 & QUEUE_MASK)
}
#[inline]
pub fn tag_queue(tag: u64) -> u32 {
    (tag & QUEUE_MASK) as u32
}
#[inline]
pub fn tag_service(tag: u64) -> u64 {
    tag >> 16
}
#[inline]
pub fn tag_has_deadline(tag: u64) -> bool {
    tag & TAG_DEADLINE != 0
}

/// One lane's fair state: views into the pool's block (`lane_words` words).
pub struct FairLane<'a> {
    words: &'a [AtomicU64],
    queues: u32,
    /// Where queue 0's words start (after the bitmap).
    qbase: usize,
}

impl<'a> FairLane<'a> {
    /// `words` must be `lane_words(queues)` long and start zeroed (a zeroed
    /// block is the initial state: every counter 0, nobody waiting).
    pub fn new(words: &'a [AtomicU64], queues: u32) -> Self {
        debug_assert_eq!(words.len(), lane_words(queues));
        FairLane { words, queues, qbase: BITMAP + (queues as usize).div_ceil(64) }
    }

    pub fn queues(&self) -> u32 {
        self.queues
    }

    #[inline]
    fn q(&self, queue: u32, field: usize) -> &AtomicU64 {
        &self.words[self.qbase + queue as usize * QUEUE_WORDS + field]
    }
    #[inline]
    fn bits(&self, k: usize) -> &AtomicU64 {
        &self.words[BITMAP + k]
    }
    #[inline]
    fn waiting(&self, queue: u32) -> u64 {
        self.q(queue, WAITING).load(SeqCst)
    }

    /// The queue of `hand` this flow owns (it has waiters there and made
    /// the queue active: OWNER is its fingerprint) if only one is; else the
    /// queue with fewer waiters (so an empty one before another flow's);
    /// on a tie the one with the lower counter (the first if equal), read
    /// only then. Owned first: a flow whose hand shares a queue with a
    /// backlogged flow goes to its other queue, not into a counter that
    /// mixes the two flows' service (weights 1:2 got +22%/-11% of their
    /// shares so, `core/tests/fair_sim.rs`); so a flow with waiters keeps
    /// to one queue, its requests in their arrival order, and its service
    /// is its own queue's counter. A flow with nobody waiting, arriving to
    /// two idle queues, takes the one it was served less from, so its two
    /// queues stay level. The price: a polite flow's second request waits
    /// behind its first, where it used to start its other queue at the
    /// floor (docs/architecture.md).
    #[inline]
    pub fn choose(&self, hand: (u32, u32)) -> u32 {
        if hand.0 == hand.1 {
            return hand.0;
        }
        let (a, b) = (self.waiting(hand.0), self.waiting(hand.1));
        let me = owner(hand);
        let mine = |q: u32, n: u64| n > 0 && self.q(q, OWNER).load(Relaxed) == me;
        match (mine(hand.0, a), mine(hand.1, b)) {
            (true, false) => return hand.0,
            (false, true) => return hand.1,
            _ => {}
        }
        if a != b {
            return if a < b { hand.0 } else { hand.1 };
        }
        if self.q(hand.1, COUNTER).load(SeqCst) < self.q(hand.0, COUNTER).load(SeqCst) {
            hand.1
        } else {
            hand.0
        }
    }

    /// Calls `f(queue, counter)` for each queue that has waiters now.
    fn each_active(&self, f: impl FnMut(u32, u64)) {
        self.scan(false, f)
    }

    /// `each_active`; with `tidy`, also clears the bit of each queue found
    /// with nobody waiting past the first `STALE_KEPT` such. A leave never
    /// clears its queue's bit (see `leave`), so the fair pop's scan does,
    /// once more than `STALE_KEPT` are stale: a scan reads at most that
    /// many idle queues' words more, and a queue joined again before then
    /// costs no RMW of the bitmap.
    #[inline]
    fn scan(&self, tidy: bool, mut f: impl FnMut(u32, u64)) {
        let mut stale = 0;
        for k in 0..(self.queues as usize).div_ceil(64) {
            let mut bits = self.bits(k).load(SeqCst);
            while bits != 0 {
                let q = (k * 64) as u32 + bits.trailing_zeros();
                let bit = bits & bits.wrapping_neg();
                bits &= bits - 1;
                if self.waiting(q) > 0 {
                    f(q, self.q(q, COUNTER).load(SeqCst));
                    continue;
                }
                stale += 1;
                if tidy && stale > STALE_KEPT {
                    self.bits(k).fetch_and(!bit, SeqCst);
                    // A joiner that counted itself before our clear may have
                    // seen the bit still set and left it: set it again for
                    // it. (SeqCst: its increment precedes this re-read, or
                    // our clear precedes its bit check, which then sets the
                    // bit itself.)
                    if self.waiting(q) > 0 {
                        self.bits(k).fetch_or(bit, SeqCst);
                    }
                }
            }
        }
    }

    /// The least counter among the active queues other than `except`.
    #[inline]
    fn least_active_counter(&self, except: u32) -> Option<u64> {
        let mut least = None;
        self.each_active(|q, c| {
            if q != except && least.map_or(true, |l| c < l) {
                least = Some(c);
            }
        });
        least
    }

    /// The counter an idle `queue` is lifted to when it becomes active, for
    /// a first waiter of `service`: one such request's service below the
    /// lane's floor (the counter the last dispatch was made at, the start of
    /// the service last begun, as start-time fair queuing's virtual time),
    /// or below the least active counter if one is below the floor (a
    /// correction moved it down); never below where the newcomer before it
    /// started (LIFTED) unless that is past the floor. A backlogged flow's
    /// queues are at or above the floor, so a newcomer goes before them;
    /// the credit of one request lets a polite flow's second request, which
    /// waits behind its first in the queue it owns, go before them too
    /// (where without it a backlogged flow's request went between the two);
    /// and newcomers, each starting at or above the one before, tie or keep
    /// their arrival order (a credit taken from each one's own floor made
    /// a later newcomer overtake an earlier one: worse, not better).
    /// `core/tests/fair_sim.rs`, 200 seeds: polite p99 beside a greedy flow
    /// / the mark's, median 1.08 -> 0.90, worst 1.56 -> 1.19. Credit banked
    /// by idle time: at most one request's service plus the distance from
    /// the floor to the least active counter (itself within one request's);
    /// a flow that stays backlogged never takes it (weights: unchanged).
    #[inline]
    fn lift_target(&self, queue: u32, service: u64) -> u64 {
        let floor = self.words[FLOOR].load(Relaxed);
        let top = self.least_active_counter(queue).map_or(floor, |least| least.min(floor));
        let credited = top.saturating_sub(service.saturating_mul(LIFT_CREDIT));
        credited.max(self.words[LIFTED].load(Relaxed).min(top))
    }

    /// Raises `queue`'s counter to `target` if below; the lift is not
    /// service, so BASE moves with it (never exported).
    fn lift(&self, queue: u32, target: u64) {
        // Mostly already there: a load, not a locked RMW, decides that.
        if self.q(queue, COUNTER).load(SeqCst) >= target {
            return;
        }
        let prev = self.q(queue, COUNTER).fetch_max(target, SeqCst);
        if prev < target {
            self.q(queue, BASE).fetch_add(target - prev, SeqCst);
        }
    }

    /// The counter `queue` would start from if a request of `service`
    /// joined now: lifted (`lift_target`) when it has nobody waiting.
    /// Also the lift target when it computed one (`queue` idle), for the
    /// join that follows (`join_lifted`).
    #[inline]
    fn start_counter(&self, queue: u32, service: u64) -> (u64, Option<u64>) {
        let own = self.q(queue, COUNTER).load(SeqCst);
        if self.waiting(queue) > 0 {
            return (own, None);
        }
        let target = self.lift_target(queue, service);
        (own.max(target), Some(target))
    }

    /// A waiter of `service` joins `queue`: called before it takes its
    /// ticket, `tail` being the lane's tail read before this call. The first
    /// waiter of an idle queue lifts its counter (`lift_target`; the target
    /// is stored as LIFTED, a plain store: a racing newcomer may start a
    /// little lower, one credit at most) and moves the queue's
    /// hint to `tail`: with nobody counted in the queue, every ticket of it
    /// still to come is taken after this count, so at or after `tail`; and
    /// becomes its owner (`owner`: `who`, the joiner's fingerprint). A plain
    /// store: two first joiners racing (one saw 0, one 1 before the store)
    /// only mislead one `choose`, which decides no waiter's fate.
    pub fn join(&self, queue: u32, tail: u64, who: u64, service: u64) {
        self.join_lifted(queue, tail, who, service, None)
    }

    /// `join` with the lift target `ahead_lifted` computed for this arrival
    /// just before (`Some`), so the active bitmap is not scanned for it a
    /// second time: the same value in a sequential run (nothing between the
    /// two calls touches this lane's counters), and with racing dispatches
    /// as stale as `join`'s own read (the floor moved by one dispatch at
    /// most in those few instructions: a hint, one credit at most).
    #[inline]
    pub fn join_lifted(&self, queue: u32, tail: u64, who: u64, service: u64, lifted: Option<u64>) {
        if self.q(queue, WAITING).fetch_add(1, SeqCst) == 0 {
            self.q(queue, OWNER).store(who, Relaxed);
            let target = lifted.unwrap_or_else(|| self.lift_target(queue, service));
            self.words[LIFTED].store(target, Relaxed);
            self.lift(queue, target);
            self.set_hint(queue, tail);
        }
        // Set unless a leave left it set (see `leave`): then a load only.
        let (k, bit) = (queue as usize / 64, 1u64 << (queue % 64));
        if self.bits(k).load(SeqCst) & bit == 0 {
            self.bits(k).fetch_or(bit, SeqCst);
        }
    }

    /// A waiter tagged `tag` left the line (granted, cancelled, expired,
    /// evicted or reclaimed): called once, by whoever decided it. The
    /// queue's active bit stays set even when it empties: a queue that
    /// empties is mostly joined again before the next fair pop (a flow
    /// alternating over its hand does so on every request), and clearing
    /// and setting the bit were two locked RMWs of each push + pop. Scans
    /// skip a queue with nobody waiting, and the fair pop's scan clears its
    /// bit (`scan`), so stale bits last until the next fair pop.
    #[inline]
    pub fn leave(&self, tag: u64) {
        self.q(tag_queue(tag), WAITING).fetch_sub(1, SeqCst);
    }

    /// A waiter with its own deadline joins (before it is published) or
    /// leaves the lane (fairness on or off).
    pub fn deadline_joined(&self) {
        self.words[PERSONAL].fetch_add(1, SeqCst);
    }
    pub fn deadline_left(&self) {
        self.words[PERSONAL].fetch_sub(1, SeqCst);
    }

    /// Live waiters of this lane that carry their own deadline (a count
    /// that may lag by the ones joining or leaving right now).
    pub fn personal(&self) -> u64 {
        self.words[PERSONAL].load(SeqCst)
    }

    /// The active queue with the least counter, skipping `skip`. On a tie
    /// the queue with the lower hint (its oldest waiter came first, as far
    /// as the hints know) goes first: newcomers lifted to the floor tie and go
    /// in arrival order, and so, mostly, does a lone flow spread over its two
    /// queues (`core/tests/fair_sim.rs`).
    #[inline]
    pub fn least(&self, skip: Option<u32>) -> Option<u32> {
        let mut best: Option<(u64, u64, u32)> = None;
        self.scan(true, |q, c| {
            if Some(q) == skip {
                return;
            }
            let key = (c, self.hint(q), q);
            if best.map_or(true, |b| key < b) {
                best = Some(key);
            }
        });
        best.map(|(_, _, q)| q)
    }

    /// Charges a dispatched request's (estimated) service to `queue`, and
    /// moves the floor up to the counter it was dispatched at.
    #[inline]
    pub fn charge(&self, queue: u32, service: u64) {
        let prev = self.q(queue, COUNTER).fetch_add(service, SeqCst);
        let floor = &self.words[FLOOR];
        // Racy load and store: the floor is where an idle queue restarts, an
        // estimate; a locked RMW on every dispatch is not worth it.
        if prev > floor.load(Relaxed) {
            floor.store(prev, Relaxed);
        }
    }

    /// Replaces a charged estimate by the real service of the request.
    pub fn correct(&self, queue: u32, estimate: u64, real: u64) {
        let c = self.q(queue, COUNTER);
        if real >= estimate {
            c.fetch_add(real - estimate, SeqCst);
        } else {
            // Never below 0: the estimate was added before (saturating for a
            // block whose counters an import moved by a negative amount).
            let _ = c.fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(estimate - real)));
        }
    }

    /// The requests a request of `service` joining `queue` now would see
    /// served before it under the fair order: the ones ahead of it in its
    /// queue, and from every other active queue those whose counter, moved
    /// on by one such request each, stays at or below the counter its own
    /// turn comes at. Requests of other queues are taken to cost what this
    /// one does (their own sizes are not known before they are served). An
    /// other queue is counted for every turn it gets below this one's, not
    /// only for its waiters now: a backlogged flow's queue is refilled while
    /// this one waits (its clients send again as they are served), and
    /// counting its waiters alone made the prediction short (bench/fairness:
    /// error p50 32% of the wait; `core/tests/fair_sim.rs`: 27% of the
    /// admitted with a deadline missed it, 13% counted so). A turn at this
    /// one's counter is counted only for a waiter there now (older, it wins
    /// the tie on its hint; a refill would lose it).
    pub fn ahead(&self, queue: u32, service: u64) -> u64 {
        self.ahead_lifted(queue, service).0
    }

    /// `ahead`, and the lift target it computed if `queue` was idle (for
    /// `join_lifted`).
    #[inline]
    pub fn ahead_lifted(&self, queue: u32, service: u64) -> (u64, Option<u64>) {
        let mine = self.waiting(queue);
        let (start, lifted) = self.start_counter(queue, service);
        let turn = start.saturating_add(mine.saturating_mul(service));
        let mut ahead = mine;
        self.each_active(|q, c| {
            if q != queue && c <= turn {
                let s = service.max(1);
                // Its turns below ours, refilled or not; at ours, a tie its
                // waiters now win on their older hints (a refill would lose).
                ahead += (turn - c).div_ceil(s).max(self.waiting(q).min((turn - c) / s + 1));
            }
        });
        (ahead, lifted)
    }

    /// Queues with waiters now.
    pub fn active(&self) -> u32 {
        let mut n = 0;
        self.each_active(|_, _| n += 1);
        n
    }

    /// `f(queue, service)` for each queue whose local service (charges and
    /// corrections, not lifts or imports) moved since the last export.
    pub fn export(&self, mut f: impl FnMut(u32, i64)) {
        for q in 0..self.queues {
            let c = self.q(q, COUNTER).load(SeqCst);
            let b = self.q(q, BASE).load(SeqCst);
            let d = c.wrapping_sub(b) as i64;
            if d != 0 {
                self.q(q, BASE).fetch_add(d as u64, SeqCst);
                f(q, d);
            }
        }
    }

    /// Adds service another host gave `queue`'s flows (from its `export`):
    /// counted for fairness here, never exported again.
    pub fn import(&self, queue: u32, service: i64) {
        if queue >= self.queues || service == 0 {
            return;
        }
        if service > 0 {
            self.q(queue, BASE).fetch_add(service as u64, SeqCst);
            self.q(queue, COUNTER).fetch_add(service as u64, SeqCst);
        } else {
            let _ = self.q(queue, COUNTER).fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(service.unsigned_abs())));
            self.q(queue, BASE).fetch_sub(service.unsigned_abs(), SeqCst);
        }
    }

    /// Takes back `n` waiters counted in `queue` (and, with `own`, `n`
    /// with their own deadline) that were never published: their worker
    /// died between `join` and the ring (a reclaim's recount).
    pub fn forget(&self, queue: u32, n: u64) {
        if n > 0 && queue < self.queues {
            self.q(queue, WAITING).fetch_sub(n, SeqCst);
        }
    }
    pub fn forget_deadlines(&self, n: u64) {
        if n > 0 {
            self.words[PERSONAL].fetch_sub(n, SeqCst);
        }
    }

    /// `queue`'s counter and waiters (tests, stats).
    pub fn queue_state(&self, queue: u32) -> (u64, u64) {
        (self.q(queue, COUNTER).load(SeqCst), self.waiting(queue))
    }

    /// Where a fair pop of `queue` starts looking in the ring.
    #[inline]
    pub fn hint(&self, queue: u32) -> u64 {
        self.q(queue, HINT).load(Relaxed)
    }
    /// Moves `queue`'s hint to `pos` (see `Ring::take_first` for why a plain
    /// store). Relaxed: whether a hint is safe depends only on its value
    /// (every value stored is at or below every ticket of the queue waiting
    /// then or later, and stays so, as tickets never come back), so any
    /// value a load reads is; a SeqCst store was an `xchg`, a locked RMW.
    #[inline]
    pub fn set_hint(&self, queue: u32, pos: u64) {
        self.q(queue, HINT).store(pos, Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn lane(queues: u32) -> Vec<AtomicU64> {
        (0..lane_words(queues)).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn a_flow_hashes_to_the_same_two_distinct_queues_everywhere() {
        let a = hand(b"key_abc123", 64);
        assert_eq!(a, hand(b"key_abc123", 64), "no per-process seed");
        assert_ne!(a.0, a.1);
        assert!(a.0 < 64 && a.1 < 64);
        assert_eq!(hand(b"anything", 1), (0, 0));
        // Known values: a change of the hash moves flows to other queues,
        // which hosts of one cluster must agree on (a rolling upgrade across
        // a change serves some flows unfairly, never wrongly, until every
        // host runs the new one), so it is pinned.
        assert_eq!(hand(b"", 64), hand(b"", 64));
        assert_eq!([hand(b"key_abc123", 64), hand(b"", 64), hand(b"seven77", 64)], [(12, 6), (42, 61), (60, 45)]);
        assert_eq!(hand(b"key_greedy_0002", 4096), (1137, 3542));
        let spread: std::collections::HashSet<u32> = (0..1000).map(|i| hand(format!("k{i}").as_bytes(), 64).0).collect();
        assert_eq!(spread.len(), 64, "1000 flows cover every queue");
        // Even over the queues, first and second choices alike: 64,000
        // key-like ids, each queue within 15% of 1,000 either way.
        let mut firsts = [0u32; 64];
        let mut seconds = [0u32; 64];
        for i in 0..64_000 {
            let (a, b) = hand(format!("key_{i:010}").as_bytes(), 64);
            firsts[a as usize] += 1;
            seconds[b as usize] += 1;
        }
        for n in firsts.iter().chain(&seconds) {
            assert!((850..=1150).contains(n), "{firsts:?} {seconds:?}");
        }
    }

    #[test]
    fn service_is_charge_over_weight_and_weights_outside_the_range_are_refused() {
        assert_eq!(service(7, 100), 700);
        assert_eq!(service(0, 100), 100, "0 counts as 1");
        assert_eq!(service(7, 200), 350);
        assert_eq!(service(1, 1), 10_000);
        assert_eq!(weight_centi(1.0).unwrap(), 100);
        assert_eq!(weight_centi(0.01).unwrap(), 1);
        assert_eq!(weight_centi(100.0).unwrap(), 10_000);
        for bad in [0.0, 0.004, 100.01, f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(weight_centi(bad).unwrap_err().to_string().split(':').next(), Some("weight"), "{bad}");
        }
        let t = tag(4095, MAX_SERVICE, true);
        assert_eq!((tag_queue(t), tag_service(t), tag_has_deadline(t)), (4095, MAX_SERVICE, true));
    }

    #[test]
    fn a_flow_joins_the_shorter_queue_of_its_hand() {
        let w = lane(8);
        let f = FairLane::new(&w, 8);
        assert_eq!(f.choose((3, 5)), 3);
        f.join(3, 0, 0, 100);
        assert_eq!(f.choose((3, 5)), 5);
        f.join(5, 0, 0, 100);
        assert_eq!(f.choose((3, 5)), 3, "a tie goes to the first");
        f.charge(3, 10);
        assert_eq!(f.choose((3, 5)), 5, "a tie goes to the queue served less");
        assert_eq!(f.choose((5, 3)), 5);
    }

    #[test]
    fn a_flow_keeps_to_the_queue_it_owns_and_others_keep_out_of_it() {
        let w = lane(8);
        let f = FairLane::new(&w, 8);
        let (a, b) = ((3, 5), (3, 6)); // their hands share queue 3
        assert_eq!(f.choose(a), 3);
        f.join(3, 0, owner(a), 100);
        assert_eq!(f.choose(a), 3, "its own queue, though its other one is empty");
        assert_eq!(f.choose(b), 6, "not into the queue another flow owns");
        f.join(6, 0, owner(b), 100);
        f.join(6, 0, owner(b), 100);
        assert_eq!(f.choose(b), 6, "its own, though longer than a's");
        assert_eq!(f.choose((6, 3)), 3, "a flow owning neither: the shorter");
        assert_ne!(owner((6, 3)), owner((3, 6)), "the hand is ordered");
        // Emptied, a queue's owner word is stale and not trusted: b may
        // take queue 3 on the usual rule, and then owns it.
        f.leave(tag(3, 1, false));
        assert_eq!(f.choose(a), 3, "both empty: the usual rule (counters tie: the first)");
        f.leave(tag(6, 1, false));
        f.leave(tag(6, 1, false));
        f.join(3, 0, owner(b), 100);
        assert_eq!((f.choose(b), f.choose(a)), (3, 5), "b owns queue 3 now: a keeps out");
    }

    #[test]
    fn the_least_counter_goes_next_and_an_idle_queue_is_lifted_to_it() {
        let w = lane(8);
        let f = FairLane::new(&w, 8);
        f.join(1, 0, 0, 100);
        f.join(2, 0, 0, 100);
        assert_eq!(f.least(None), Some(1), "tie: lowest index");
        f.charge(1, 500);
        assert_eq!(f.least(None), Some(2));
        f.charge(2, 300);
        assert_eq!(f.least(None), Some(2));
        assert_eq!(f.least(Some(2)), Some(1));
        f.charge(2, 300);
        assert_eq!(f.least(None), Some(1));
        // Queue 6 was idle all along: it starts one request of its own
        // (100) below the floor (300, where queue 2's second dispatch
        // began), not at 0, so it banked nothing but that and the distance
        // to the least active counter (500), and goes first rather than tie
        // with queue 1; a second request of its flow (charged 100) goes
        // before queue 1 too.
        f.join(6, 0, 0, 100);
        assert_eq!(f.queue_state(6), (200, 1));
        assert_eq!(f.least(None), Some(6), "a newcomer does not lose a tie to a backlogged queue");
        // A newcomer of a larger request right after it is not lifted below
        // it (it would overtake an older newcomer): they tie at 200, and go
        // in arrival order (hints: 6's is 0, 5's is 1).
        f.join(5, 1, 0, 250);
        assert_eq!(f.queue_state(5), (200, 1));
        assert_eq!(f.least(None), Some(6));
        f.charge(6, 100);
        assert_eq!(f.least(None), Some(5));
        assert_eq!(w[FLOOR].load(SeqCst), 300, "a dispatch below the floor leaves it");
        // Everyone leaves; a newcomer starts a request below the floor (the
        // counter the last dispatch was made at, 300, queue 2's second), at
        // the last newcomer's 200 here.
        for t in [tag(1, 0, false), tag(2, 0, false), tag(6, 0, false), tag(5, 0, false)] {
            f.leave(t);
        }
        assert_eq!(f.least(None), None);
        f.join(7, 0, 0, 100);
        assert_eq!(f.queue_state(7).0, 200);
        // The floor moves on (a dispatch at 700): the next newcomer starts
        // at 600, above the last one's 200; never past the floor.
        f.charge(7, 500);
        f.charge(7, 100);
        f.join(4, 0, 0, 100);
        assert_eq!(f.queue_state(4).0, 600);
        f.leave(tag(4, 0, false));
        assert_eq!(f.active(), 1);
    }

    #[test]
    fn a_correction_replaces_the_estimate() {
        let w = lane(4);
        let f = FairLane::new(&w, 4);
        f.charge(0, 100);
        f.correct(0, 100, 250);
        assert_eq!(f.queue_state(0).0, 250);
        f.correct(0, 250, 50);
        assert_eq!(f.queue_state(0).0, 50);
    }

    #[test]
    fn export_reports_local_service_once_and_import_is_never_exported() {
        let w = lane(4);
        let f = FairLane::new(&w, 4);
        f.charge(1, 100);
        f.correct(1, 100, 130);
        f.import(2, 1000);
        f.join(3, 0, 0, 100); // a lift (to the floor, 0 here) is not service either
        let mut got = vec![];
        f.export(|q, s| got.push((q, s)));
        assert_eq!(got, vec![(1, 130)]);
        got.clear();
        f.export(|q, s| got.push((q, s)));
        assert!(got.is_empty(), "nothing moved since");
        f.correct(1, 130, 100);
        f.export(|q, s| got.push((q, s)));
        assert_eq!(got, vec![(1, -30)], "a correction down is exported as negative service");
        assert_eq!(f.queue_state(2).0, 1000, "imported service counts for fairness");
        f.import(2, -400);
        assert_eq!(f.queue_state(2).0, 600);
        got.clear();
        f.export(|q, s| got.push((q, s)));
        assert!(got.is_empty());
    }

    #[test]
    fn the_prediction_counts_the_waiters_served_before_a_newcomer() {
        let w = lane(8);
        let f = FairLane::new(&w, 8);
        // Queue 0: a greedy flow, 10 waiters, far ahead in service.
        for _ in 0..10 {
            f.join(0, 0, 0, 100);
        }
        f.charge(0, 10_000);
        // Queue 1: 2 waiters at counter 0.
        f.join(1, 0, 0, 100);
        f.join(1, 0, 0, 100);
        f.q(1, COUNTER).store(0, SeqCst);
        // A newcomer in queue 2 starts at the floor (0): queue 1 goes first
        // on the tie (one turn at counter 0 <= 0), the greedy queue's
        // counter is past its turn.
        assert_eq!(f.ahead(2, 100), 1);
        // A newcomer behind the two in queue 1 waits for them and one turn
        // of nobody else (the greedy queue is far ahead).
        assert_eq!(f.ahead(1, 100), 2);
        // A newcomer of the greedy queue waits for its own 10, and for
        // queue 1's turns below its own (its counter 0 up to the greedy
        // turn's 11,000 at 100 each: 110, its 2 waiters refilled as they go).
        assert_eq!(f.ahead(0, 100), 120);
    }

    #[test]
    fn a_queue_left_by_its_last_waiter_is_inactive_and_deadlines_are_counted() {
        let w = lane(128);
        let f = FairLane::new(&w, 128);
        f.deadline_joined();
        f.join(100, 0, 0, 100);
        f.join(100, 0, 0, 100);
        assert_eq!((f.active(), f.personal()), (1, 1));
        f.leave(tag(100, 5, true));
        f.deadline_left();
        assert_eq!((f.active(), f.personal()), (1, 0));
        f.leave(tag(100, 5, false));
        assert_eq!((f.active(), f.least(None)), (0, None));
        assert_ne!(w[BITMAP + 1].load(SeqCst), 0, "an emptied queue's bit stays set for its next join");
    }

    #[test]
    fn a_fair_pops_scan_clears_the_bits_of_emptied_queues_past_the_few_it_keeps() {
        let w = lane(64);
        let f = FairLane::new(&w, 64);
        for q in 0..20 {
            f.join(q, 0, 0, 100);
        }
        f.join(40, 0, 0, 100);
        for q in 0..20 {
            f.leave(tag(q, 1, false));
        }
        assert_eq!(w[BITMAP].load(SeqCst).count_ones(), 21, "leaves clear nothing");
        assert_eq!(f.ahead(40, 1), 1, "idle queues are skipped by every scan");
        assert_eq!(w[BITMAP].load(SeqCst).count_ones(), 21, "only the fair pop's scan tidies");
        assert_eq!(f.least(None), Some(40));
        let bits = w[BITMAP].load(SeqCst);
        assert_eq!(bits.count_ones(), STALE_KEPT + 1, "{bits:#x}");
        assert_ne!(bits & 1 << 40, 0);
        f.join(3, 0, 0, 100);
        assert_eq!(f.least(None), Some(3), "a rejoined queue's bit was kept: nothing to set");
    }
}
