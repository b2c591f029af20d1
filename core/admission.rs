//! A pool's admission: slots (`max_concurrency`), two lanes of waiters, an
//! optional token bucket and the dispatch rule that hands a freed slot to the
//! next waiter (strict priority, or `default_min_share` anti-starvation).
//!
//! All mutable state is one fixed block of 64-bit atomic words (`State`):
//! a header of counters, each hot one on its own cache line, then the two
//! rings. No pointers live in it, so the block can be mapped into shared
//! memory and used by several processes at once.

use crate::bucket::{self, BucketParams};
use crate::clock::Clock;
use crate::error::CoreError;
use crate::lanes::Ring;
use crate::sync::{spin, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use crate::Lane;

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedCode {
    /// Queue full (or evicted by a priority arrival at a full queue).
    ServerOverloaded = 0,
    /// Waited longer than its lane's `max_wait`.
    QueueTimeout = 1,
    /// The token bucket had nothing for this lane.
    RateLimitExceeded = 2,
}

impl ShedCode {
    pub const ALL: [ShedCode; 3] = [ShedCode::ServerOverloaded, ShedCode::QueueTimeout, ShedCode::RateLimitExceeded];
    pub fn as_str(self) -> &'static str {
        match self {
            ShedCode::ServerOverloaded => "server_overloaded",
            ShedCode::QueueTimeout => "queue_timeout",
            ShedCode::RateLimitExceeded => "rate_limit_exceeded",
        }
    }
}

/// A waiter's name: its lane ticket and lane, packed (`pos << 1 | lane`).
pub type WaiterId = u64;

#[inline]
pub fn waiter_id(lane: Lane, pos: u64) -> WaiterId {
    pos << 1 | lane as u64
}
#[inline]
pub fn waiter_lane(id: WaiterId) -> Lane {
    if id & 1 == 0 { Lane::Priority } else { Lane::Default }
}

/// What `admit` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// A slot is held now; release it with `release`.
    Now,
    /// Waiting in line as `waiter`. `evicted`: a default waiter this arrival
    /// pushed out (it is shed, `server_overloaded`). `granted`: a waiter (maybe
    /// this one) that got a free slot while we were joining.
    Queued { waiter: WaiterId, evicted: Option<WaiterId>, granted: Option<WaiterId> },
    /// Not admitted; nothing is held.
    Shed { code: ShedCode, retry_after_ns: u64 },
}

/// Validated pool settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub max_concurrency: u32,
    pub queue_depth: u32,
    /// Indexed by `Lane as usize`.
    pub max_wait_ns: [u64; 2],
    pub bucket: Option<BucketParams>,
    pub default_min_share: f64,
}

impl Settings {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        max_concurrency: i64,
        queue_depth: i64,
        max_wait_ms_default: f64,
        max_wait_ms_priority: f64,
        rate: Option<f64>,
        burst: Option<f64>,
        priority_reserve: f64,
        default_min_share: f64,
    ) -> Result<Self, CoreError> {
        if !(1..=1_000_000).contains(&max_concurrency) {
            return Err(CoreError::arg("max_concurrency", format!("must be in 1..=1000000, got {max_concurrency}")));
        }
        if !(0..=1 << 24).contains(&queue_depth) {
            return Err(CoreError::arg("queue_depth", format!("must be in 0..=16777216, got {queue_depth}")));
        }
        let wait = |name, ms: f64| {
            if ms.is_finite() && ms >= 0.0 && ms <= 86_400_000.0 {
                Ok((ms * 1e6).round() as u64)
            } else {
                Err(CoreError::arg(name, format!("must be between 0 and 86400000 ms, got {ms}")))
            }
        };
        let max_wait_ns = [wait("max_wait_ms.priority", max_wait_ms_priority)?, wait("max_wait_ms.default", max_wait_ms_default)?];
        if !(default_min_share.is_finite() && (0.0..=1.0).contains(&default_min_share)) {
            return Err(CoreError::arg("default_min_share", format!("must be in [0, 1], got {default_min_share}")));
        }
        let bucket = match (rate, burst) {
            (None, None) => None,
            (None, Some(_)) => return Err(CoreError::arg("burst", "needs a rate")),
            (Some(r), b) => Some(BucketParams::new(r, b.unwrap_or(r.max(1.0)), priority_reserve)?),
        };
        if !(priority_reserve.is_finite() && (0.0..1.0).contains(&priority_reserve)) {
            return Err(CoreError::arg("priority_reserve", format!("must be in [0, 1), got {priority_reserve}")));
        }
        Ok(Settings { max_concurrency: max_concurrency as u32, queue_depth: queue_depth as u32, max_wait_ns, bucket, default_min_share })
    }

    /// Cells per lane ring: room for the whole queue in one lane plus as many
    /// tombstones again (cancelled waiters wait for the head to pass them).
    pub fn ring_cap(&self) -> usize {
        ((self.queue_depth as usize).max(1) * 2).next_power_of_two().max(8)
    }
}

// State block layout, in words. Each hot field starts its own 64-byte line.
const LINE: usize = 8;
const MAGIC: u64 = 0x7469_6572_715f_0001; // "tierq_" + layout version 1
mod at {
    use super::LINE;
    // Line 0: immutable header, checked when a process attaches.
    pub const MAGIC: usize = 0;
    pub const WORDS: usize = 1;
    /// Slots in use; never above max_concurrency.
    pub const IN_FLIGHT: usize = LINE;
    /// Live waiters: priority in the low 32 bits, default in the high 32;
    /// their sum never exceeds queue_depth.
    pub const DEPTH: usize = 2 * LINE;
    /// Bucket TAT (ns); see bucket.rs.
    pub const TAT: usize = 3 * LINE;
    pub const HEAD: [usize; 2] = [4 * LINE, 6 * LINE];
    pub const TAIL: [usize; 2] = [5 * LINE, 7 * LINE];
    // Line 8: counters only read by stats (monotonic, Relaxed).
    pub const ADMITTED: [usize; 2] = [8 * LINE, 8 * LINE + 1];
    pub const SHED: [usize; 3] = [8 * LINE + 2, 8 * LINE + 3, 8 * LINE + 4];
    pub const CANCELLED: usize = 8 * LINE + 5;
    /// Fixed-point (1e6 = one dispatch) share owed to the default lane.
    pub const SHARE_CREDIT: usize = 8 * LINE + 6;
    // Line 9: drain-rate estimate for honest Retry-After.
    pub const LAST_RELEASE: usize = 9 * LINE;
    /// EWMA of the time between slot releases while waiters queued (ns).
    pub const RELEASE_INTERVAL: usize = 9 * LINE + 1;
    pub const RINGS: usize = 10 * LINE;
}
const SHARE_ONE: u64 = 1_000_000;
/// Re-checks of a full queue before shedding (see `admit`).
const FULL_RETRIES: u32 = 4;
/// Retry-After when the pool has never drained under load: one second.
const UNKNOWN_DRAIN_NS: u64 = 1_000_000_000;

/// The pool's fixed block of atomic words.
pub struct State {
    words: Box<[AtomicU64]>,
}

impl State {
    pub fn words_for(s: &Settings) -> usize {
        at::RINGS + 4 * s.ring_cap()
    }
    fn new(s: &Settings) -> Self {
        let n = Self::words_for(s);
        let words: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(0)).collect();
        words[at::MAGIC].store(MAGIC, SeqCst);
        words[at::WORDS].store(n as u64, SeqCst);
        State { words }
    }
}

/// One pool: slots, lanes, bucket.
pub struct Pool {
    settings: Settings,
    clock: Clock,
    state: State,
    cap: usize,
    share_fp: u64,
}

impl Pool {
    pub fn new(settings: Settings, clock: Clock) -> Self {
        let state = State::new(&settings);
        let cap = settings.ring_cap();
        let share_fp = (settings.default_min_share * SHARE_ONE as f64).round() as u64;
        let pool = Pool { settings, clock, state, cap, share_fp };
        pool.ring(Lane::Priority).init();
        pool.ring(Lane::Default).init();
        pool
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    #[inline]
    fn w(&self, i: usize) -> &AtomicU64 {
        &self.state.words[i]
    }

    #[inline]
    fn ring(&self, lane: Lane) -> Ring<'_> {
        let l = lane as usize;
        let base = at::RINGS + l * 2 * self.cap;
        Ring {
            head: self.w(at::HEAD[l]),
            tail: self.w(at::TAIL[l]),
            cells: &self.state.words[base..base + self.cap],
            enqueued_ns: &self.state.words[base + self.cap..base + 2 * self.cap],
        }
    }

    #[inline]
    fn depth_unit(lane: Lane) -> u64 {
        match lane {
            Lane::Priority => 1,
            Lane::Default => 1 << 32,
        }
    }

    /// (priority, default) live waiters.
    #[inline]
    pub fn depth(&self) -> (u32, u32) {
        let d = self.w(at::DEPTH).load(SeqCst);
        (d as u32, (d >> 32) as u32)
    }

    fn reserve_depth(&self, lane: Lane) -> bool {
        let word = self.w(at::DEPTH);
        let mut d = word.load(SeqCst);
        loop {
            if (d as u32 as u64) + (d >> 32) >= self.settings.queue_depth as u64 {
                return false;
            }
            match word.compare_exchange_weak(d, d + Self::depth_unit(lane), SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(seen) => d = seen,
            }
        }
    }

    #[inline]
    fn unreserve_depth(&self, lane: Lane) {
        self.w(at::DEPTH).fetch_sub(Self::depth_unit(lane), SeqCst);
    }

    #[inline]
    fn try_take_slot(&self) -> bool {
        let word = self.w(at::IN_FLIGHT);
        let mut n = word.load(SeqCst);
        loop {
            if n >= self.settings.max_concurrency as u64 {
                return false;
            }
            match word.compare_exchange_weak(n, n + 1, SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(seen) => n = seen,
            }
        }
    }

    #[inline]
    fn count(&self, i: usize) {
        self.w(i).fetch_add(1, Relaxed);
    }

    /// Decides an arrival for `lane` costing `cost` bucket tokens.
    pub fn admit(&self, lane: Lane, cost: u64) -> Admit {
        let now = self.clock.now_ns();
        if let Some(p) = &self.settings.bucket {
            if let Err(wait) = bucket::take_on(self.w(at::TAT), now, cost, lane, p) {
                self.count(at::SHED[ShedCode::RateLimitExceeded as usize]);
                return Admit::Shed { code: ShedCode::RateLimitExceeded, retry_after_ns: wait };
            }
        }
        // Fast path: nobody waiting and a slot free.
        if self.w(at::DEPTH).load(SeqCst) == 0 && self.try_take_slot() {
            self.count(at::ADMITTED[lane as usize]);
            return Admit::Now;
        }
        let mut evicted = None;
        let mut attempt = 0;
        while !self.reserve_depth(lane) {
            // Full. A priority arrival takes the place of the newest default waiter.
            if lane == Lane::Priority {
                if let Some(pos) = self.ring(Lane::Default).remove_newest() {
                    // The victim's depth unit moves to this arrival's lane.
                    self.w(at::DEPTH).fetch_sub(Self::depth_unit(Lane::Default) - 1, SeqCst);
                    self.count(at::SHED[ShedCode::ServerOverloaded as usize]);
                    self.ring(Lane::Default).reap();
                    evicted = Some(waiter_id(Lane::Default, pos));
                    break;
                }
            }
            // A waiter that is leaving right now (cancel, expiry) has left its
            // cell but not yet given back its place: wait those few
            // instructions out rather than shed while a place is freeing.
            attempt += 1;
            if attempt > FULL_RETRIES {
                return self.shed_full(lane, cost);
            }
            spin();
        }
        let pos = match self.ring(lane).push(now) {
            Ok(pos) => pos,
            Err(_) => {
                self.unreserve_depth(lane);
                return self.shed_full(lane, cost);
            }
        };
        // A slot may have freed while we joined; whoever holds it now is us.
        let granted = self.dispatch();
        Admit::Queued { waiter: waiter_id(lane, pos), evicted, granted }
    }

    fn shed_full(&self, lane: Lane, cost: u64) -> Admit {
        if let Some(p) = &self.settings.bucket {
            // Not admitted, so it does not spend the rate either.
            bucket::adjust_on(self.w(at::TAT), self.clock.now_ns(), -(cost.min(i64::MAX as u64) as i64), p);
        }
        self.count(at::SHED[ShedCode::ServerOverloaded as usize]);
        Admit::Shed { code: ShedCode::ServerOverloaded, retry_after_ns: self.retry_after_ns(lane) }
    }

    /// Takes the next waiter by the dispatch rule, without touching slots.
    fn pop_next(&self) -> Option<WaiterId> {
        let (p, d) = self.depth();
        let mut order = [Lane::Priority, Lane::Default];
        if self.share_fp > 0 && p > 0 && d > 0 {
            let credit = self.w(at::SHARE_CREDIT).fetch_add(self.share_fp, Relaxed) + self.share_fp;
            if credit >= SHARE_ONE {
                self.w(at::SHARE_CREDIT).fetch_sub(SHARE_ONE, Relaxed);
                order = [Lane::Default, Lane::Priority];
            }
        }
        for lane in order {
            if let Some(pos) = self.ring(lane).pop() {
                self.unreserve_depth(lane);
                self.count(at::ADMITTED[lane as usize]);
                return Some(waiter_id(lane, pos));
            }
        }
        None
    }

    fn any_published(&self) -> bool {
        self.ring(Lane::Priority).has_published() || self.ring(Lane::Default).has_published()
    }

    /// Gives a free slot, if any, to the next waiter. At most one grant.
    pub fn dispatch(&self) -> Option<WaiterId> {
        loop {
            if !self.try_take_slot() {
                return None;
            }
            if let Some(id) = self.pop_next() {
                return Some(id);
            }
            self.w(at::IN_FLIGHT).fetch_sub(1, SeqCst);
            // A waiter published after our pop but before our give-back saw no
            // free slot; the SeqCst order makes one of us see the other.
            if !self.any_published() {
                return None;
            }
        }
    }

    /// Frees a slot. If someone waits, the slot passes straight to them and
    /// their id is returned; the caller resolves that waiter.
    pub fn release(&self) -> Option<WaiterId> {
        if let Some(id) = self.pop_next() {
            self.note_release();
            return Some(id);
        }
        if self.w(at::IN_FLIGHT).fetch_sub(1, SeqCst) == 0 {
            // A release without a held slot is a caller bug; undo it rather
            // than wrap the count and lock the pool.
            self.w(at::IN_FLIGHT).fetch_add(1, SeqCst);
            return None;
        }
        if self.any_published() { self.dispatch() } else { None }
    }

    /// Tracks the drain rate while the pool is saturated.
    fn note_release(&self) {
        let now = self.clock.now_ns();
        // A plain load and store: racing releases may lose a sample, which an
        // estimate can afford; a locked swap on every release cannot be.
        let last = self.w(at::LAST_RELEASE).load(Relaxed);
        self.w(at::LAST_RELEASE).store(now, Relaxed);
        if last == 0 || now <= last {
            return;
        }
        let dt = now - last;
        let ewma = self.w(at::RELEASE_INTERVAL).load(Relaxed);
        let next = if ewma == 0 { dt } else { ewma - ewma / 8 + dt / 8 };
        self.w(at::RELEASE_INTERVAL).store(next.max(1), Relaxed);
    }

    /// Removes a waiting `id` (its client left). False when it already left
    /// the line: granted (the caller then owns a slot) or shed.
    pub fn cancel(&self, id: WaiterId) -> bool {
        let lane = waiter_lane(id);
        let ring = self.ring(lane);
        if ring.remove(id >> 1) {
            self.unreserve_depth(lane);
            self.count(at::CANCELLED);
            ring.reap();
            true
        } else {
            false
        }
    }

    /// Sheds every waiter past its lane's max wait; calls `on_expired` per id.
    pub fn expire_due(&self, mut on_expired: impl FnMut(WaiterId)) {
        let now = self.clock.now_ns();
        for lane in [Lane::Priority, Lane::Default] {
            let Some(deadline) = now.checked_sub(self.settings.max_wait_ns[lane as usize]) else { continue };
            self.ring(lane).expire(deadline, |pos| {
                self.unreserve_depth(lane);
                self.count(at::SHED[ShedCode::QueueTimeout as usize]);
                on_expired(waiter_id(lane, pos));
            });
        }
    }

    /// When waiter `id` will pass its max wait (clock ns), if still waiting.
    pub fn deadline_ns(&self, id: WaiterId) -> Option<u64> {
        let lane = waiter_lane(id);
        self.ring(lane).enqueued_at(id >> 1).map(|t| t.saturating_add(self.settings.max_wait_ns[lane as usize]))
    }

    /// An honest wait for a new arrival in `lane`: the waiters ahead of it
    /// times the observed interval between slot releases under load.
    pub fn retry_after_ns(&self, lane: Lane) -> u64 {
        let (p, d) = self.depth();
        let ahead = match lane {
            Lane::Priority => p as u64,
            Lane::Default => p as u64 + d as u64,
        } + 1;
        match self.w(at::RELEASE_INTERVAL).load(Relaxed) {
            0 => UNKNOWN_DRAIN_NS,
            interval => interval.saturating_mul(ahead),
        }
    }

    pub fn stats(&self) -> Stats {
        let (p, d) = self.depth();
        Stats {
            depth: [p, d],
            in_flight: self.w(at::IN_FLIGHT).load(SeqCst) as u32,
            max_concurrency: self.settings.max_concurrency,
            admitted: at::ADMITTED.map(|i| self.w(i).load(Relaxed)),
            shed: at::SHED.map(|i| self.w(i).load(Relaxed)),
            cancelled: self.w(at::CANCELLED).load(Relaxed),
        }
    }

    /// The block's words (for attach checks and tests of the layout).
    pub fn state_words(&self) -> usize {
        debug_assert_eq!(self.w(at::MAGIC).load(Relaxed), MAGIC);
        self.w(at::WORDS).load(Relaxed) as usize
    }
}

/// A consistent-enough snapshot of a pool's counters. Arrays index by `Lane`
/// and by `ShedCode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub depth: [u32; 2],
    pub in_flight: u32,
    pub max_concurrency: u32,
    pub admitted: [u64; 2],
    pub shed: [u64; 3],
    pub cancelled: u64,
}
