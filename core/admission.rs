//! A pool's admission: slots (a concurrency limit, fixed or learned by the
//! controller in `limit.rs`), three lanes of waiters, an optional token bucket
//! and the dispatch rule that hands a freed slot to the next waiter (strict
//! priority, or `default_min_share` anti-starvation; flex last, and only
//! from idle capacity: below the limit minus both headrooms).
//!
//! The limit is a word of the block, so every worker of a host obeys one.
//! Lowering it preempts nothing: a release frees its slot instead of handing
//! it on while more are held than the limit. Raising it hands the new slots
//! to waiters at once (`fill`).
//!
//! All mutable state is one fixed block of 64-bit atomic words (`block.rs`:
//! its layout, and where it lives); the settings it runs by are
//! `settings.rs`'s.
//!
//! Shared pools: each waiter's ring cell records its owner (worker index and
//! that worker's generation). Whoever decides a waiter owned by another
//! process (grant, eviction, expiry) posts the outcome to the owner's mailbox
//! and wakes it. Every worker counts the slots it holds in its own word,
//! `generation << 32 | held`; when a worker dies, `reclaim_worker` retires
//! its generation and takes its count in one CAS, tombstones its waiters and
//! passes its slots on. A grant racing that CAS either lands in the old
//! generation's count (and is reclaimed) or sees the new generation and
//! passes the slot on itself: never both, never neither.

use crate::block::{self, at, wk, State, DEPTH_BITS, HELD_COUNT, LANES, LINE, MAGIC};
use crate::bucket;
use crate::clock::Clock;
use crate::crash::crash_point;
use crate::error::CoreError;
use crate::fair::{self, FairLane};
use crate::lanes::Ring;
use crate::limit::{self, EngineSample, LimitMode, PoolView, Signal, FP_SHIFT};
use crate::mailbox::{self, Mailbox, OUT_EVICTED, OUT_EXPIRED, OUT_GRANT};
use crate::settings::{Fairness, PoolSettings};
use crate::sync::{spin, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use crate::Lane;

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedCode {
    /// Queue full (or evicted by a priority arrival at a full queue, or a
    /// flex waiter evicted by any non-flex arrival).
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

/// A waiter's name: its lane ticket and lane, packed (`pos << 2 | lane`).
pub type WaiterId = u64;

#[inline]
pub fn waiter_id(lane: Lane, pos: u64) -> WaiterId {
    pos << 2 | lane as u64
}
#[inline]
pub fn waiter_lane(id: WaiterId) -> Lane {
    match id & 3 {
        0 => Lane::Priority,
        1 => Lane::Default,
        _ => Lane::Flex,
    }
}
#[inline]
fn waiter_pos(id: WaiterId) -> u64 {
    id >> 2
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
    /// Not admitted; nothing is held. `evicted`: a default waiter this
    /// arrival pushed out before the lane turned out to have no free cell
    /// (a race with another arrival); it is shed too, and its owner must hear.
    Shed { code: ShedCode, retry_after_ns: u64, evicted: Option<WaiterId> },
}

/// What a request asks of its lane beyond a slot: which flow queues it may
/// join (`Pool::hand`), its service (`fair::service`: charge over weight)
/// and its own max wait, if shorter than the lane's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub hand: (u32, u32),
    pub service: u64,
    pub max_wait_ns: Option<u64>,
}

/// Where an admitted or refused request stood: the flow queue it joined
/// (or was charged to) and, when it had to queue, its predicted wait (None
/// while the pool has no drain estimate yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub queue: u32,
    pub predicted_ns: Option<u64>,
    /// The shed a limit in shadow mode decided and did not apply
    /// (`enforce = false`): the request went on as if let through.
    pub shadowed: Option<ShedCode>,
}

/// `Pool::audit` over the words it reads (`seq(i)`, `held(i)` of worker
/// i; `me`: the caller's own index, inside its own call); public for the
/// loom model of it racing a worker's steps.
#[doc(hidden)]
pub fn untaken_slots<'a>(
    workers: usize,
    me: Option<usize>,
    seq: impl Fn(usize) -> &'a AtomicU64,
    held: impl Fn(usize) -> &'a AtomicU64,
    in_flight: &AtomicU64,
    withheld: &AtomicU64,
    mailed: impl Fn() -> u64,
) -> Option<u64> {
    let seqs = || (0..workers).map(|i| seq(i).load(SeqCst)).collect::<Vec<_>>();
    let before = seqs();
    if before.iter().enumerate().any(|(i, s)| s & 1 == 1 && me != Some(i)) {
        return None;
    }
    let in_use = in_flight.load(SeqCst);
    let withheld = withheld.load(SeqCst);
    // A grant in a mailbox is a slot on its way: its message is its only record.
    let held: u64 = (0..workers).map(|i| held(i).load(SeqCst) & HELD_COUNT).sum::<u64>() + mailed();
    if seqs() != before {
        return None;
    }
    debug_assert!(in_use >= withheld + held, "{in_use} in use, {withheld} withheld, {held} held: counted twice");
    Some(in_use.saturating_sub(withheld + held))
}

/// One lane's count in the DEPTH word (shifted to its place).
const LANE_DEPTH: u64 = (1 << DEPTH_BITS) - 1;
/// The priority lane's count in the DEPTH word.
const PRIORITY_DEPTH: u64 = LANE_DEPTH;
/// The priority and default lanes' counts: what is ahead of a flex waiter
/// and, without headroom, of a priority or default arrival.
const SOLD_DEPTH: u64 = (1 << (2 * DEPTH_BITS)) - 1;
/// The flex lane's count in the DEPTH word.
const FLEX_DEPTH: u64 = LANE_DEPTH << (2 * DEPTH_BITS);
const SHARE_ONE: u64 = 1_000_000;
/// Re-checks of a full queue before shedding (see `admit`).
const FULL_RETRIES: u32 = 4;
/// A request with its own deadline is refused at join unless its predicted
/// wait plus a margin fits: the margin is learned per lane (`wait_observed`)
/// as the 99th percentile of the prediction's relative error (realized -
/// predicted) / predicted over the recent queued requests, within
/// [0, `MARGIN_MAX`], in 1/`MARGIN_ONE`ths. It starts at a third (the fixed
/// margin before it was learned: the prediction is off by about 15% either
/// way at p50, so one admitted just under its deadline missed it as often as
/// not without one) and moves by the frugal streaming quantile rule (Ma,
/// Muthukrishnan, Sandler 2013): up `MARGIN_UP` when an error is above it,
/// down `MARGIN_DOWN` otherwise, so it settles where
/// `MARGIN_DOWN / (MARGIN_UP + MARGIN_DOWN)` (1%) of the errors are above it.
/// `core/tests/fair_sim.rs`, 8 seeds, learned against the fixed third:
/// misses 0.38% -> 0.49% of the admitted with a deadline (admitted 0.77x);
/// with engine stalls (150 ms every 5 s) 1.34% -> 0.93% (admitted 0.64x).
/// The 95th percentile admitted more (1.19x) and missed 1.91%.
const MARGIN_ONE: u64 = 1 << 10;
const MARGIN_START: u64 = MARGIN_ONE / 3;
/// At most the prediction again: a prediction off by more than 2x is no
/// prediction, and refusing on it refuses nearly everyone.
const MARGIN_MAX: u64 = MARGIN_ONE;
const MARGIN_DOWN: u64 = 1;
const MARGIN_UP: u64 = 99;
/// Retry-After when the pool has never drained under load: one second.
const UNKNOWN_DRAIN_NS: u64 = 1_000_000_000;
/// Handoffs closer together than this (10k a second) sample the clock on
/// one in `SAMPLE_EVERY`; slower ones read it on every handoff.
const FAST_DRAIN_NS: u64 = 100_000;
const SAMPLE_EVERY: u64 = 8;
/// Snapshots a reclaim tries before it leaves a dead worker's untaken step
/// unsettled (every try found some worker inside a step).
const AUDIT_TRIES: u32 = 10_000;
/// This process's place in a shared pool.
#[derive(Clone)]
struct Shared {
    /// Worker index, or None for the supervisor (it holds nothing and owns
    /// no waiters; it only reclaims).
    index: Option<usize>,
    /// Owner word of this process's waiters (`generation << 8 | index + 1`);
    /// 0 for the supervisor, which matches no cell.
    me: u64,
    generation: u64,
    workers: usize,
    mailbox_cap: usize,
    /// eventfd per worker index (-1: no wake-up, tests drain by hand).
    #[cfg_attr(loom, allow(dead_code))]
    wake_fds: Vec<i32>,
}

/// How a slot taken for a waiter was handed over.
enum Hand {
    /// The waiter is this process's: the caller resolves it.
    Mine,
    /// Posted to its owner's mailbox; the owner now holds the slot.
    Posted,
    /// Its owner died: the slot is held by nobody and must be passed on.
    OwnerGone,
}

/// A worker's mark of a call that moves slots (`Pool::moving`).
struct Moving<'a>(Option<&'a AtomicU64>);

impl Drop for Moving<'_> {
    fn drop(&mut self) {
        // A unit test's simulated kill unwinds; a SIGKILL runs nothing.
        #[cfg(all(test, not(loom)))]
        if std::thread::panicking() {
            return;
        }
        if let Some(seq) = self.0 {
            seq.fetch_add(1, SeqCst);
        }
    }
}

/// What one dispatch did.
enum Grant {
    /// No free slot, or nobody waiting.
    Nothing,
    /// A waiter of this process got a slot.
    Mine(WaiterId),
    /// Another process's waiter got it (posted to its mailbox).
    Other,
}

/// What a mailbox message says happened to a waiter of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    Shed(ShedCode),
}

/// One pool: slots, lanes, bucket.
pub struct Pool {
    settings: PoolSettings,
    clock: Clock,
    state: State,
    cap: usize,
    share_fp: u64,
    /// `Some(n)` for a fixed limit: read from here, not the block (and a
    /// release hands its slot on without checking the count).
    fixed: Option<u64>,
    /// Owner word written into this process's ring cells (0 on the heap).
    me: u64,
    shared: Option<Box<Shared>>,
    /// `settings.fairness == Tokens`.
    fair_on: bool,
    /// Where each lane's fair state and the workers' lines start.
    fair_at: [usize; LANES],
    workers_at: usize,
    /// The anonymous flow's hand (`admit` without an `Ask`).
    anon: Ask,
}

impl Pool {
    pub fn new(settings: PoolSettings, clock: Clock) -> Self {
        let state = State::heap(&settings);
        let pool = Self::with_state(settings, clock, state, None);
        pool.init(0, 0);
        pool
    }

    fn with_state(settings: PoolSettings, clock: Clock, state: State, shared: Option<Box<Shared>>) -> Self {
        let cap = settings.ring_cap();
        let share_fp = (settings.default_min_share * SHARE_ONE as f64).round() as u64;
        let me = shared.as_ref().map_or(0, |s| s.me);
        let fixed = match settings.limit {
            LimitMode::Fixed(n) => Some(n as u64),
            LimitMode::Adaptive { .. } => None,
        };
        let fair_on = settings.fairness == Fairness::Tokens;
        let fair_at = Lane::ALL.map(|l| block::fair_base(&settings, l as usize));
        let workers_at = block::worker_line(&settings, 0);
        let anon = Ask { hand: fair::hand(b"", settings.fair_queues), service: fair::service(1, 100), max_wait_ns: None };
        Pool { settings, clock, state, cap, share_fp, fixed, me, shared, fair_on, fair_at, workers_at, anon }
    }

    /// Fills a fresh (zeroed) block; its header (and MAGIC) last.
    fn init(&self, workers: usize, mailbox_cap: usize) {
        for lane in Lane::ALL {
            self.ring(lane).init();
        }
        self.w(at::LIMIT).store((self.settings.limit.initial() as u64) << FP_SHIFT, SeqCst);
        self.w(at::WIN_MIN).store(u64::MAX, SeqCst);
        self.w(at::SLOW_START).store(self.fixed.is_none() as u64, SeqCst);
        for lane in Lane::ALL {
            self.w(at::MARGIN[lane as usize]).store(MARGIN_START, SeqCst);
        }
        self.state.seal(&self.settings, workers, mailbox_cap);
    }

    /// Creates the shared block `name` for `workers` processes and returns
    /// the supervisor's view of it (it reclaims; it does not admit).
    #[cfg(not(loom))]
    /// `wake_fds` as for `attach_shared` (empty: none).
    pub fn create_shared(name: &str, settings: PoolSettings, workers: usize, wake_fds: Vec<i32>, clock: Clock) -> Result<Pool, CoreError> {
        use crate::block::MAX_WORKERS;
        if !(1..=MAX_WORKERS).contains(&workers) {
            return Err(CoreError::arg("workers", format!("must be in 1..={MAX_WORKERS}, got {workers}")));
        }
        let wake_fds = if wake_fds.is_empty() { vec![-1; workers] } else { wake_fds };
        if wake_fds.len() != workers {
            return Err(CoreError::arg("wake_fds", format!("need one per worker ({workers}), got {}", wake_fds.len())));
        }
        let (state, mailbox_cap) = State::create(name, &settings, workers)?;
        let shared = Shared { index: None, me: 0, generation: 0, workers, mailbox_cap, wake_fds };
        let pool = Self::with_state(settings, clock, state, Some(Box::new(shared)));
        pool.init(workers, mailbox_cap);
        Ok(pool)
    }

    /// Maps the shared block `name` as worker `index` (None: supervisor),
    /// after checking magic, version, size, settings and worker count.
    /// `wake_fds[i]` is worker i's eventfd (inherited from the supervisor).
    #[cfg(not(loom))]
    pub fn attach_shared(
        name: &str,
        settings: PoolSettings,
        index: Option<usize>,
        wake_fds: Vec<i32>,
        clock: Clock,
    ) -> Result<Pool, CoreError> {
        let (state, workers, mailbox_cap) = State::attach(name, &settings)?;
        let w = state.words();
        if wake_fds.len() != workers {
            return Err(CoreError::arg("wake_fds", format!("need one per worker ({workers}), got {}", wake_fds.len())));
        }
        let (me, generation) = match index {
            None => (0, 0),
            Some(i) if i < workers => {
                let held = w[block::worker_line(&settings, i) + wk::HELD].load(SeqCst);
                if held & HELD_COUNT != 0 {
                    return Err(CoreError::Layout(format!("{name}: worker {i} still holds {} slots; reclaim it first", held & HELD_COUNT)));
                }
                let g = held >> 32;
                (g << 8 | (i as u64 + 1), g)
            }
            Some(i) => return Err(CoreError::arg("worker", format!("must be below {workers}, got {i}"))),
        };
        let shared = Shared { index, me, generation, workers, mailbox_cap, wake_fds };
        Ok(Self::with_state(settings, clock, state, Some(Box::new(shared))))
    }

    /// Removes a shared block's name (mappings stay valid until dropped).
    #[cfg(not(loom))]
    pub fn unlink_shared(name: &str) -> Result<(), CoreError> {
        State::unlink(name)
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    #[inline]
    fn w(&self, i: usize) -> &AtomicU64 {
        &self.state.words()[i]
    }

    #[inline]
    fn ring(&self, lane: Lane) -> Ring<'_> {
        let l = lane as usize;
        let base = block::ring_base(self.cap, l);
        let words = self.state.words();
        let array = |k: usize| &words[base + k * self.cap..base + (k + 1) * self.cap];
        Ring {
            head: self.w(at::HEAD[l]),
            tail: self.w(at::TAIL[l]),
            cells: array(0),
            enqueued_ns: array(1),
            owners: array(2),
            tags: array(3),
            dues: array(4),
            homes: array(5),
        }
    }

    #[inline]
    fn fair(&self, lane: Lane) -> FairLane<'_> {
        let base = self.fair_at[lane as usize];
        FairLane::new(&self.state.words()[base..base + fair::lane_words(self.settings.fair_queues)], self.settings.fair_queues)
    }

    #[inline]
    fn worker_word(&self, worker: usize, field: usize) -> &AtomicU64 {
        self.w(self.workers_at + worker * LINE + field)
    }

    fn mailbox(&self, sh: &Shared, worker: usize) -> Mailbox<'_> {
        let base = block::mailbox_base(self.workers_at, sh.workers, sh.mailbox_cap, worker);
        Mailbox {
            signalled: self.worker_word(worker, wk::SIGNALLED),
            cursor: self.worker_word(worker, wk::CURSOR),
            cells: &self.state.words()[base..base + sh.mailbox_cap],
        }
    }

    /// Counts one more slot held by this worker (shared pools only).
    #[inline]
    fn hold_mine(&self) {
        if let Some(Shared { index: Some(i), .. }) = self.shared.as_deref() {
            self.worker_word(*i, wk::HELD).fetch_add(1, SeqCst);
        }
    }

    #[inline]
    fn unhold_mine(&self) {
        if let Some(Shared { index: Some(i), .. }) = self.shared.as_deref() {
            self.worker_word(*i, wk::HELD).fetch_sub(1, SeqCst);
        }
    }

    /// Marks this worker inside a call that moves slots until the guard
    /// drops (see `wk::SEQ`); nested calls keep the outer mark.
    #[inline]
    fn moving(&self) -> Moving<'_> {
        if let Some(Shared { index: Some(i), .. }) = self.shared.as_deref() {
            let seq = self.worker_word(*i, wk::SEQ);
            if seq.load(Relaxed) & 1 == 0 {
                seq.fetch_add(1, SeqCst);
                return Moving(Some(seq));
            }
        }
        Moving(None)
    }

    /// Splits an owner word into (worker index, generation), if it names one.
    fn owner_of(sh: &Shared, owner: u64) -> Option<(usize, u64)> {
        let i = (owner & 0xff) as usize;
        (i >= 1 && i <= sh.workers).then_some((i - 1, owner >> 8))
    }

    /// Whether `worker` still runs generation `generation`.
    #[inline]
    fn lives(&self, worker: usize, generation: u64) -> bool {
        self.worker_word(worker, wk::HELD).load(SeqCst) >> 32 == generation & HELD_COUNT
    }

    /// Posts an outcome to `worker`'s mailbox and wakes it; true if posted.
    /// Waits out a full mailbox while its owner lives (it is draining);
    /// gives up if the owner's generation ends first (none is posted then).
    /// A grant's message is the slot's only record until the owner takes it
    /// and counts it as held (`drain_mailbox`): one CAS hands the slot over,
    /// so a poster killed before it has handed nothing (the audit frees the
    /// slot) and one killed after it has handed it whole.
    fn post(&self, sh: &Shared, worker: usize, generation: u64, id: WaiterId, outcome: u64) -> bool {
        let msg = mailbox::pack(id.min(mailbox::MAX_WAITER), generation, outcome);
        let mb = self.mailbox(sh, worker);
        loop {
            if !self.lives(worker, generation) {
                return false;
            }
            crash_point!("post.before");
            match mb.post(msg) {
                Ok(true) => {
                    crash_point!("post.unwoken");
                    #[cfg(not(loom))]
                    crate::shm::wake(sh.wake_fds[worker]);
                    return true;
                }
                Ok(false) => return true,
                Err(_) => {
                    #[cfg(not(loom))]
                    std::thread::yield_now();
                    spin();
                }
            }
        }
    }

    /// Hands a slot taken for waiter `id` to its owner. `counted`: the slot
    /// is already counted as this worker's (a release passing it on).
    #[inline]
    fn hand_to(&self, id: WaiterId, owner: u64, counted: bool) -> Hand {
        let Some(sh) = self.shared.as_deref() else { return Hand::Mine };
        if owner == sh.me && sh.index.is_some() {
            if !counted {
                self.hold_mine();
            }
            return Hand::Mine;
        }
        if counted {
            self.unhold_mine();
            crash_point!("hand.unheld");
        }
        match Self::owner_of(sh, owner) {
            Some((worker, generation)) if self.post(sh, worker, generation, id, OUT_GRANT) => Hand::Posted,
            _ => Hand::OwnerGone,
        }
    }

    /// Tells the owner of a shed waiter; `Some(id)` when that is us.
    #[inline]
    fn route_shed(&self, id: WaiterId, owner: u64, outcome: u64) -> Option<WaiterId> {
        let Some(sh) = self.shared.as_deref() else { return Some(id) };
        if owner == sh.me && sh.index.is_some() {
            return Some(id);
        }
        if let Some((worker, generation)) = Self::owner_of(sh, owner) {
            self.post(sh, worker, generation, id, outcome);
        }
        None
    }

    #[inline]
    fn depth_unit(lane: Lane) -> u64 {
        1 << (DEPTH_BITS * lane as u32)
    }

    #[inline]
    fn split_depth(d: u64) -> [u32; LANES] {
        Lane::ALL.map(|l| (d >> (DEPTH_BITS * l as u32) & LANE_DEPTH) as u32)
    }

    /// Live waiters per lane (priority, default, flex).
    #[inline]
    pub fn depth(&self) -> [u32; LANES] {
        Self::split_depth(self.w(at::DEPTH).load(SeqCst))
    }

    fn reserve_depth(&self, lane: Lane) -> bool {
        let word = self.w(at::DEPTH);
        let mut d = word.load(SeqCst);
        loop {
            if Self::split_depth(d).iter().map(|&n| n as u64).sum::<u64>() >= self.settings.queue_depth as u64 {
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

    /// Takes a slot if fewer than `limit` are in use; returns how many were.
    #[inline]
    fn try_take_slot(&self, limit: u64) -> Option<u64> {
        let word = self.w(at::IN_FLIGHT);
        let mut n = word.load(SeqCst);
        loop {
            if n >= limit {
                return None;
            }
            match word.compare_exchange_weak(n, n + 1, SeqCst, SeqCst) {
                Ok(_) => return Some(n),
                Err(seen) => n = seen,
            }
        }
    }

    #[inline]
    fn count(&self, i: usize) {
        self.w(i).fetch_add(1, Relaxed);
    }

    /// Decides an arrival for `lane` costing `cost` bucket tokens, of the
    /// anonymous flow, service 1, no deadline of its own.
    pub fn admit(&self, lane: Lane, cost: u64) -> Admit {
        self.admit_ask(lane, cost, &self.anon).0
    }

    /// The anonymous flow's ask: service 1, no deadline of its own.
    pub fn ask_anonymous(&self) -> Ask {
        self.anon
    }

    /// The two flow queues flow id `flow` may join (`fair::hand`).
    pub fn hand(&self, flow: &[u8]) -> (u32, u32) {
        fair::hand(flow, self.settings.fair_queues)
    }

    /// Decides an arrival for `lane` costing `cost` bucket tokens, asking
    /// `ask`. A request with its own max wait whose predicted wait exceeds
    /// it is refused at once (`queue_timeout`, nothing held or queued).
    pub fn admit_ask(&self, lane: Lane, cost: u64, ask: &Ask) -> (Admit, Placed) {
        self.admit_home(lane, cost, ask, 0)
    }

    /// `admit_ask` for a request whose home replicas are the bits of
    /// `homes` (bit r: replica r; 0: none, a pool of one engine or a routing
    /// without homes; a hot prefix has two, tierq.routing): a waiter keeps
    /// them beside its ticket for the replica grant rule (`release_from`).
    pub fn admit_home(&self, lane: Lane, cost: u64, ask: &Ask, homes: u64) -> (Admit, Placed) {
        let _moving = self.moving();
        let fair = self.fair(lane);
        let queue = if self.fair_on { fair.choose(ask.hand) } else { ask.hand.0 };
        let mut placed = Placed { queue, predicted_ns: None, shadowed: None };
        // The clock is read at most once, and only when the bucket or a join
        // needs it: a CLOCK_MONOTONIC read costs about three atomic RMWs.
        let mut now = None;
        let mut cost = cost;
        // Cost 0 (a request another limit in shadow mode refused before it
        // came here) is not the bucket's to decide: even a bucket drained into
        // its priority reserve, which refuses a default request of any cost,
        // must not count it.
        if let Some(p) = self.settings.bucket.as_ref().filter(|_| cost > 0) {
            let t = self.clock.now_ns();
            now = Some(t);
            if let Err(wait) = bucket::take_on(self.w(at::TAT), t, cost, lane, p) {
                if self.settings.enforce {
                    self.count(at::SHED[ShedCode::RateLimitExceeded as usize]);
                    return (Admit::Shed { code: ShedCode::RateLimitExceeded, retry_after_ns: wait, evicted: None }, placed);
                }
                // Shadow mode: counted, not applied. Enforcing would have
                // taken nothing from the bucket, so nothing is taken and
                // nothing is given back if the queue sheds it later.
                self.count(at::SHADOW_RATE);
                placed.shadowed = Some(ShedCode::RateLimitExceeded);
                cost = 0;
            }
        }
        // Fast path: nobody waiting ahead of this arrival and a slot free for
        // its lane. With headroom, defaults may wait while slots are free for
        // priority, so only priority waiters are ahead of a priority arrival.
        // Flex waits while slots are free for the others (its headroom), so
        // it is never ahead of them; everyone is ahead of a flex arrival.
        let (limit, ahead) = match lane {
            Lane::Priority if self.settings.may_reserve() => (self.limit(), PRIORITY_DEPTH),
            Lane::Priority => (self.limit(), SOLD_DEPTH),
            Lane::Default => (self.default_limit(), SOLD_DEPTH),
            Lane::Flex => (self.flex_limit(), u64::MAX),
        };
        if self.w(at::DEPTH).load(SeqCst) & ahead == 0 && self.try_take_slot(limit).is_some() {
            crash_point!("admit.taken");
            self.hold_mine();
            self.count(at::ADMITTED[lane as usize]);
            if self.fair_on {
                fair.charge(queue, ask.service);
            }
            return (Admit::Now, placed);
        }
        // Its place under the lane's order, and the wait that means at the
        // measured drain rate: refused now if that misses its own deadline.
        let interval = self.w(at::RELEASE_INTERVAL).load(Relaxed);
        let lane_wait = self.settings.max_wait_ns[lane as usize];
        let deadline = ask.max_wait_ns.map(|w| w.min(lane_wait));
        // The lift target the prediction computed for an idle queue, passed
        // to the join (one scan of the active bitmap fewer).
        let mut lifted = None;
        if interval != 0 {
            let depth = self.depth();
            let [p, d, _] = depth;
            let before = match lane {
                Lane::Priority => 0,
                Lane::Default => p as u64,
                Lane::Flex => p as u64 + d as u64,
            } + if self.fair_on {
                let (n, lift) = fair.ahead_lifted(queue, ask.service);
                lifted = lift;
                n
            } else {
                depth[lane as usize] as u64
            };
            let predicted = interval.saturating_mul(before + 1);
            placed.predicted_ns = Some(predicted);
            let margined = self.margined(lane, predicted);
            if let Some(w) = deadline.filter(|&w| margined > w) {
                self.count(at::DEADLINE_REFUSED);
                self.refund(cost);
                self.count(at::SHED[ShedCode::QueueTimeout as usize]);
                // Honest: once the line ahead has drained by what it misses
                // by, the same request would fit (at least one release away).
                let retry_after_ns = margined.saturating_sub(w).max(interval);
                return (Admit::Shed { code: ShedCode::QueueTimeout, retry_after_ns, evicted: None }, placed);
            }
        }
        let mut evicted = None;
        let mut attempt = 0;
        while !self.reserve_depth(lane) {
            // Full. A priority or default arrival takes the place of the
            // newest flex waiter; a priority one, failing that, of the newest
            // default waiter. Not when every cell of the arrival's ring is
            // taken (a live head with tombstones behind it): the arrival would
            // be shed anyway, and the victim with it.
            let victims: &[Lane] = match lane {
                Lane::Priority => &[Lane::Flex, Lane::Default],
                Lane::Default => &[Lane::Flex],
                Lane::Flex => &[],
            };
            if !victims.is_empty() && !self.ring(lane).is_full() {
                if let Some(id) = victims.iter().find_map(|&v| self.evict_newest(v, lane)) {
                    evicted = id;
                    break;
                }
            }
            // A waiter that is leaving right now (cancel, expiry) has left its
            // cell but not yet given back its place: wait those few
            // instructions out rather than shed while a place is freeing.
            attempt += 1;
            if attempt > FULL_RETRIES {
                return (self.shed_full(lane, cost, None), placed);
            }
            spin();
        }
        // Read after the place is reserved, if not read above: a join time
        // taken late only makes the max wait count from a little later, so a
        // waiter is still never shed early.
        let now = now.unwrap_or_else(|| self.clock.now_ns());
        // Its own deadline is kept apart only when shorter than the lane's.
        let due = deadline.filter(|&w| w < lane_wait).map_or(0, |w| now.saturating_add(w).max(1));
        let tag = fair::tag(queue, ask.service, due != 0);
        crash_point!("admit.reserved");
        // Counted in its queue before it is published, so a waiter that is
        // published is always counted (`fair::WAITING`).
        self.joined(lane, queue, fair::owner(ask.hand), ask.service, due != 0, lifted);
        crash_point!("admit.joined");
        let pos = match self.ring(lane).push(now, self.me, tag, due, homes) {
            Ok(pos) => pos,
            Err(_) => {
                self.left(lane, tag);
                self.unreserve_depth(lane);
                return (self.shed_full(lane, cost, evicted), placed);
            }
        };
        // A slot may have freed while we joined; whoever holds it now is us.
        let granted = self.dispatch();
        (Admit::Queued { waiter: waiter_id(lane, pos), evicted, granted }, placed)
    }

    /// Removes the newest waiter of `victim` for an arrival of `lane` at a
    /// full queue: the victim's depth unit moves to the arrival's lane.
    /// `Some(evicted)` if one was removed (`evicted` as `Admit` carries it).
    fn evict_newest(&self, victim: Lane, lane: Lane) -> Option<Option<WaiterId>> {
        let (pos, owner, tag) = self.ring(victim).remove_newest()?;
        self.left(victim, tag);
        self.w(at::DEPTH).fetch_sub(Self::depth_unit(victim) - Self::depth_unit(lane), SeqCst);
        self.count(at::SHED[ShedCode::ServerOverloaded as usize]);
        self.ring(victim).reap();
        Some(self.route_shed(waiter_id(victim, pos), owner, OUT_EVICTED))
    }

    /// A waiter of `queue` (of the flow `who`, `fair::owner`) is about to
    /// be published in `lane`.
    #[inline]
    fn joined(&self, lane: Lane, queue: u32, who: u64, service: u64, own_deadline: bool, lifted: Option<u64>) {
        let fair = self.fair(lane);
        if own_deadline {
            fair.deadline_joined();
        }
        if self.fair_on {
            fair.join_lifted(queue, self.w(at::TAIL[lane as usize]).load(SeqCst), who, service, lifted);
        }
    }

    /// A waiter tagged `tag` left `lane` (decided by its cell's CAS).
    #[inline]
    fn left(&self, lane: Lane, tag: u64) {
        let fair = self.fair(lane);
        if fair::tag_has_deadline(tag) {
            fair.deadline_left();
        }
        if self.fair_on {
            fair.leave(tag);
        }
    }

    /// Gives back a refused request's bucket tokens: not admitted, so it
    /// does not spend the rate either.
    fn refund(&self, cost: u64) {
        if let Some(p) = &self.settings.bucket {
            bucket::adjust_on(self.w(at::TAT), self.clock.now_ns(), -(cost.min(i64::MAX as u64) as i64), p);
        }
    }

    fn shed_full(&self, lane: Lane, cost: u64, evicted: Option<WaiterId>) -> Admit {
        self.refund(cost);
        self.count(at::SHED[ShedCode::ServerOverloaded as usize]);
        Admit::Shed { code: ShedCode::ServerOverloaded, retry_after_ns: self.retry_after_ns(lane), evicted }
    }

    /// Takes the next waiter by the dispatch rule, without touching slots;
    /// returns it and its owner. `allow_default`: the slot may go to a
    /// default waiter (false while only the priority headroom is free).
    /// `allow_flex`: to a flex waiter, once no other waits (false unless
    /// the slot is below the limit minus both headrooms).
    fn pop_next(&self, allow_default: bool, allow_flex: bool, home: u64) -> Option<(WaiterId, u64)> {
        if !allow_default {
            return self.pop_lane(Lane::Priority, home);
        }
        let [p, d, _] = self.depth();
        let mut order = [Lane::Priority, Lane::Default];
        if self.share_fp > 0 && p > 0 && d > 0 {
            let credit = self.w(at::SHARE_CREDIT).fetch_add(self.share_fp, Relaxed) + self.share_fp;
            if credit >= SHARE_ONE {
                self.w(at::SHARE_CREDIT).fetch_sub(SHARE_ONE, Relaxed);
                order = [Lane::Default, Lane::Priority];
            }
        }
        order.into_iter().find_map(|lane| self.pop_lane(lane, home)).or_else(|| allow_flex.then(|| self.pop_lane(Lane::Flex, home)).flatten())
    }

    #[inline]
    fn pop_lane(&self, lane: Lane, home: u64) -> Option<(WaiterId, u64)> {
        let ring = self.ring(lane);
        // The replica grant rule (core/replicas.rs, `HOME_LOOK_AHEAD`): a
        // slot freed on replica `home - 1` goes to the oldest of the lane's
        // next waiters with it among their homes, at most `HOME_SKIPS` grants in a
        // row past the front; else the lane's next waiter as without it.
        let skips = self.w(at::SKIPS[lane as usize]);
        let homed = (home != 0 && skips.load(Relaxed) < crate::replicas::HOME_SKIPS)
            .then(|| ring.take_home(home, crate::replicas::HOME_LOOK_AHEAD))
            .flatten();
        if homed.is_none() && skips.load(Relaxed) != 0 {
            skips.store(0, Relaxed);
        }
        let (pos, owner, _) = if let Some(taken) = homed {
            skips.fetch_add(1, Relaxed);
            self.left(lane, taken.2);
            if self.fair_on {
                self.fair(lane).charge(fair::tag_queue(taken.2), fair::tag_service(taken.2));
            }
            taken
        } else if self.fair_on {
            // While tombstones left by fair picks crowd the ring (a waiter
            // of a queue far ahead holds the head), the oldest goes next, so
            // they never fill it and shed arrivals the queue has room for.
            let crowded = ring.span() >= self.cap as u64 * 3 / 4;
            let fair = (!crowded).then(|| self.pop_fair(lane, &ring)).flatten();
            let taken = fair.or_else(|| ring.pop())?;
            self.left(lane, taken.2);
            self.fair(lane).charge(fair::tag_queue(taken.2), fair::tag_service(taken.2));
            taken
        } else {
            let taken = ring.pop()?;
            self.left(lane, taken.2);
            taken
        };
        self.unreserve_depth(lane);
        self.count(at::ADMITTED[lane as usize]);
        Some((waiter_id(lane, pos), owner))
    }

    /// The oldest waiter of the active flow queue with the least counter
    /// (or, if that one turns out to have nobody published, of the next
    /// least). None: the caller takes the ring's front instead, so a stale
    /// count or bitmap never strands a waiter.
    fn pop_fair(&self, lane: Lane, ring: &Ring<'_>) -> Option<crate::lanes::Taken> {
        let fair = self.fair(lane);
        let mut skip = None;
        for _ in 0..2 {
            let q = fair.least(skip)?;
            let (taken, hint) = ring.take_first(fair.hint(q), q);
            fair.set_hint(q, hint);
            if taken.is_some() {
                ring.reap();
                return taken;
            }
            skip = Some(q);
        }
        None
    }

    /// A waiter that a free slot could go to may be in a ring. With headroom,
    /// a default waiter counts only while in-flight is below the default
    /// limit; a flex waiter only while it is below the flex limit.
    fn any_published(&self) -> bool {
        self.ring(Lane::Priority).has_published()
            || (self.ring(Lane::Default).has_published()
                && (!self.settings.may_reserve() || self.w(at::IN_FLIGHT).load(SeqCst) < self.default_limit()))
            || (self.ring(Lane::Flex).has_published() && self.w(at::IN_FLIGHT).load(SeqCst) < self.flex_limit())
    }

    /// Gives a free slot, if any, to the next waiter. At most one grant;
    /// `Some` only when that waiter is this process's.
    pub fn dispatch(&self) -> Option<WaiterId> {
        self.dispatch_home(0)
    }

    /// `dispatch` for a slot freed on replica `home - 1` (0: none): the
    /// replica grant rule's look-ahead (`pop_lane`).
    fn dispatch_home(&self, home: u64) -> Option<WaiterId> {
        let _moving = self.moving();
        match self.dispatch_one(home) {
            Grant::Mine(id) => Some(id),
            Grant::Other | Grant::Nothing => None,
        }
    }

    fn dispatch_one(&self, home: u64) -> Grant {
        loop {
            let limit = self.limit();
            let Some(before) = self.try_take_slot(limit) else { return Grant::Nothing };
            crash_point!("dispatch.taken");
            // The CAS fixed how many slots others hold: the rule is exact.
            let below_default = before < limit - self.headroom_at(limit);
            if let Some((id, owner)) = self.pop_next(below_default, before < self.flex_limit_of(limit), home) {
                crash_point!("dispatch.popped");
                return match self.hand_to(id, owner, false) {
                    Hand::Mine => Grant::Mine(id),
                    Hand::Posted => Grant::Other,
                    Hand::OwnerGone if self.settings.may_reserve() || waiter_lane(id) == Lane::Flex => {
                        // Free it and take it again, so the rule is re-decided.
                        self.w(at::IN_FLIGHT).fetch_sub(1, SeqCst);
                        continue;
                    }
                    Hand::OwnerGone => self.pass_on().map_or(Grant::Other, Grant::Mine),
                };
            }
            self.w(at::IN_FLIGHT).fetch_sub(1, SeqCst);
            // A waiter published after our pop but before our give-back saw no
            // free slot; the SeqCst order makes one of us see the other.
            if !self.any_published() {
                return Grant::Nothing;
            }
        }
    }

    /// Gives every free slot to a waiter (after the limit rose); returns
    /// this process's waiters granted. Others' are posted to their mailboxes.
    fn fill(&self) -> Vec<WaiterId> {
        let _moving = self.moving();
        let mut mine = Vec::new();
        loop {
            match self.dispatch_one(0) {
                Grant::Mine(id) => mine.push(id),
                Grant::Other => {}
                Grant::Nothing => return mine,
            }
        }
    }

    /// The limit in force, in whole slots.
    #[inline]
    pub fn limit(&self) -> u64 {
        match self.fixed {
            Some(n) => n,
            None => self.w(at::LIMIT).load(SeqCst) >> FP_SHIFT,
        }
    }

    /// In-flight count below which a slot may go to a default request
    /// (the limit is at least its minimum, which is above the headroom).
    #[inline]
    fn default_limit(&self) -> u64 {
        let limit = self.limit();
        limit - self.headroom_at(limit)
    }

    /// Slots a default request may not take now at a limit of `limit`:
    /// `priority_headroom`, or while a flex request waits the larger
    /// reserve in force (`PoolSettings::reserve_at`; flex fills every slot
    /// defaults leave, so without it a priority arrival finds the engine
    /// full whenever defaults took the flex headroom).
    #[inline]
    fn headroom_at(&self, limit: u64) -> u64 {
        let (ph, reserve) = (self.settings.priority_headroom as u64, self.settings.flex_priority_reserve as u64);
        if reserve > ph && self.w(at::DEPTH).load(SeqCst) & FLEX_DEPTH != 0 {
            ph.max(self.settings.reserve_at(limit))
        } else {
            ph
        }
    }

    /// In-flight count below which a slot may go to a flex request: the
    /// limit minus both headrooms (0 when they take it all).
    #[inline]
    fn flex_limit(&self) -> u64 {
        self.flex_limit_of(self.limit())
    }

    /// Flex runs only while it waits, so the reserve is always in force for
    /// it, and the flex headroom comes on top of it: defaults keep slots
    /// flex cannot take however large the reserve is.
    #[inline]
    fn flex_limit_of(&self, limit: u64) -> u64 {
        let kept = (self.settings.priority_headroom as u64).max(self.settings.reserve_at(limit));
        limit.saturating_sub(kept + self.settings.flex_headroom_slots(limit))
    }

    /// Whether a releasing slot may pass straight to a waiter: not while
    /// more are held than a lowered limit allows (the slot is freed instead).
    #[inline]
    fn may_hand_on(&self) -> bool {
        // Fixed limits check too: a reload may have lowered one (`retuned`).
        self.w(at::IN_FLIGHT).load(SeqCst) <= self.limit()
    }

    /// Frees a slot. If someone waits, the slot passes straight to them; if
    /// that waiter is this process's, its id is returned and the caller
    /// resolves it (another process's is told through its mailbox).
    pub fn release(&self) -> Option<WaiterId> {
        self.release_from(0)
    }

    /// `release` of a slot whose holder ran on replica `home - 1` (0: none):
    /// the waiter it passes to is chosen by the replica grant rule
    /// (`pop_lane`), so a freed replica goes to a waiter whose home it is.
    pub fn release_from(&self, home: u64) -> Option<WaiterId> {
        let _moving = self.moving();
        // A slot owed to `withhold` stays taken and becomes withheld. One
        // load when nothing is owed, the common case.
        // The held count drops before WITHHELD rises: a worker killed
        // between the two leaks the slot, where the other order would count
        // it twice (withheld, and held for its reclaim to pass on) and let
        // one request too many in for good. Killed just after taking the
        // debt, it loses that debt; the cluster agent's next plan sees the
        // pool one slot short of its lease and withholds again.
        if self.w(at::OWED).load(SeqCst) != 0 && Self::take_one(self.w(at::OWED)) {
            crash_point!("release.owed");
            self.unhold_mine();
            crash_point!("release.owed_unheld");
            self.w(at::WITHHELD).fetch_add(1, SeqCst);
            return None;
        }
        if self.settings.may_reserve() {
            // Whether a default waiter may have this slot depends on how many
            // others are held, which only a CAS on the count settles: free the
            // slot and let `dispatch` take it again.
            if self.w(at::DEPTH).load(SeqCst) != 0 {
                self.note_release();
            }
        } else if let Some((id, owner)) = self.may_hand_on().then(|| self.pop_next(true, false, home)).flatten() {
            // Never straight to flex: whether it may have the slot depends on
            // how many others are held, which only `dispatch`'s CAS settles.
            crash_point!("release.popped");
            self.note_release();
            return match self.hand_to(id, owner, true) {
                Hand::Mine => Some(id),
                Hand::Posted => None,
                Hand::OwnerGone => self.pass_on(),
            };
        }
        self.unhold_mine();
        crash_point!("release.unheld");
        if self.w(at::IN_FLIGHT).fetch_sub(1, SeqCst) == 0 {
            // A release without a held slot is a caller bug; undo it rather
            // than wrap the count and lock the pool. Debug builds (every test)
            // stop here, so the guard cannot hide an accounting bug.
            self.w(at::IN_FLIGHT).fetch_add(1, SeqCst);
            debug_assert!(false, "release() without a held slot");
            return None;
        }
        if self.any_published() { self.dispatch_home(home) } else { None }
    }

    /// A taken slot that nobody holds (its owner died): the next waiter gets
    /// it, or it is freed.
    fn pass_on(&self) -> Option<WaiterId> {
        if self.settings.may_reserve() || !self.may_hand_on() {
            self.w(at::IN_FLIGHT).fetch_sub(1, SeqCst);
            return if self.any_published() { self.dispatch() } else { None };
        }
        loop {
            let Some((id, owner)) = self.pop_next(true, false, 0) else {
                self.w(at::IN_FLIGHT).fetch_sub(1, SeqCst);
                return if self.any_published() { self.dispatch() } else { None };
            };
            match self.hand_to(id, owner, false) {
                Hand::Mine => return Some(id),
                Hand::Posted => return None,
                Hand::OwnerGone => continue,
            }
        }
    }

    /// Takes `n` slots out of use, so requests can use only the limit minus
    /// the slots withheld (a cluster host keeps to its lease of the
    /// cluster's limit this way; see tierq.cluster). Free slots are taken at
    /// once; the rest are owed, and each release pays one off before a waiter
    /// gets its slot. A request in flight is never cut. Returns how many were
    /// taken at once.
    pub fn withhold(&self, n: u64) -> u64 {
        let _moving = self.moving();
        let mut taken = 0;
        // Counted one by one: a worker killed in the loop leaks at most the
        // slot it just took, not every slot taken so far.
        while taken < n && self.try_take_slot(self.limit()).is_some() {
            crash_point!("withhold.taken");
            self.w(at::WITHHELD).fetch_add(1, SeqCst);
            taken += 1;
        }
        if taken < n {
            self.w(at::OWED).fetch_add(n - taken, SeqCst);
        }
        taken
    }

    /// Puts back up to `n` slots: owed ones are forgiven first, then each
    /// withheld slot goes to the next waiter (or is freed) as a released
    /// slot would. `on_granted` gets the waiters of this process granted on
    /// the way. Returns how many were put back.
    pub fn restore(&self, n: u64, mut on_granted: impl FnMut(WaiterId)) -> u64 {
        let _moving = self.moving();
        let mut back = 0;
        while back < n && Self::take_one(self.w(at::OWED)) {
            back += 1;
        }
        while back < n && Self::take_one(self.w(at::WITHHELD)) {
            crash_point!("restore.taken");
            // The slot is taken and held by no worker, as a dead owner's is.
            if let Some(id) = self.pass_on() {
                on_granted(id);
            }
            back += 1;
        }
        back
    }

    /// Decrements a count word unless it is 0; true if it did.
    fn take_one(word: &AtomicU64) -> bool {
        let mut cur = word.load(SeqCst);
        loop {
            if cur == 0 {
                return false;
            }
            match word.compare_exchange_weak(cur, cur - 1, SeqCst, SeqCst) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    /// (withheld, owed) slots now (see `withhold`).
    pub fn withheld(&self) -> (u64, u64) {
        (self.w(at::WITHHELD).load(SeqCst), self.w(at::OWED).load(SeqCst))
    }

    /// Settles a dead worker: retires its generation and takes its held
    /// count in one CAS, tombstones its waiters, then passes each slot it
    /// held on (as a release would). Then `audit` frees any slot it had
    /// taken and not yet counted (killed between the two steps). Returns
    /// (slots, waiters) reclaimed; `on_granted` gets any waiter of *this*
    /// process granted on the way. Call it only once the worker's process
    /// is gone.
    pub fn reclaim_worker(&self, worker: usize, mut on_granted: impl FnMut(WaiterId)) -> Result<(u64, u64), CoreError> {
        let Some(sh) = self.shared.as_deref() else { return Err(CoreError::arg("worker", "not a shared pool")) };
        if worker >= sh.workers || sh.index == Some(worker) {
            return Err(CoreError::arg("worker", format!("cannot reclaim worker {worker}")));
        }
        let _moving = self.moving();
        let word = self.worker_word(worker, wk::HELD);
        let mut cur = word.load(SeqCst);
        let (generation, held) = loop {
            let next = ((cur >> 32) + 1) << 32;
            match word.compare_exchange_weak(cur, next, SeqCst, SeqCst) {
                Ok(_) => break (cur >> 32, cur & HELD_COUNT),
                Err(seen) => cur = seen,
            }
        };
        let owner = generation << 8 | (worker as u64 + 1);
        // Grants posted to it and never taken: slots it never counted, now
        // nobody's (a grant posted after this sweep is its successor's first
        // drain's, which passes a stale grant on in the same way).
        let mut mailed = 0;
        self.mailbox(sh, worker).drain(|msg| mailed += (mailbox::unpack(msg).2 == OUT_GRANT) as u64);
        let mut waiters = 0;
        for lane in Lane::ALL {
            let ring = self.ring(lane);
            ring.remove_all_of(owner, |_, tag| {
                self.left(lane, tag);
                self.unreserve_depth(lane);
                self.count(at::CANCELLED);
                waiters += 1;
            });
            ring.reap();
        }
        for _ in 0..held + mailed {
            if let Some(id) = self.pass_on() {
                on_granted(id);
            }
        }
        // Killed inside a step: nothing more of it will happen.
        let seq = self.worker_word(worker, wk::SEQ);
        let s = seq.load(SeqCst);
        if s & 1 == 1 {
            seq.store(s + 1, SeqCst);
        }
        let mut leaked = 0;
        let mut recounted = false;
        for _ in 0..AUDIT_TRIES {
            if !recounted {
                recounted = self.recount(sh);
            }
            if recounted {
                if let Some(n) = self.audit(sh) {
                    leaked = n;
                    break;
                }
            }
            #[cfg(not(loom))]
            std::thread::yield_now();
            spin();
        }
        if leaked > 0 || recounted {
            self.w(at::IN_FLIGHT).fetch_sub(leaked, SeqCst);
            self.fill().into_iter().for_each(&mut on_granted);
        }
        // Killed between posting to a worker and waking it: its mail would
        // wait for the next wake-up. A spare wake-up costs one drain.
        #[cfg(not(loom))]
        for (i, &fd) in sh.wake_fds.iter().enumerate() {
            if i != worker {
                crate::shm::wake(fd);
            }
        }
        Ok((held + mailed + leaked, waiters))
    }

    /// Slots counted in use that no worker holds and none withholds: taken
    /// by a dead worker that was killed before it counted them (or after it
    /// uncounted one and before it freed it). Reads every worker's SEQ, the
    /// counts, then the SEQs again: equal and even (this process's own
    /// aside), no step ran in between, so the counts were read at one
    /// instant where every live worker's slots are in its HELD word (SeqCst:
    /// a step's first change follows its odd SEQ in the one order of all
    /// SeqCst operations). None: some worker was inside a step; try again.
    fn audit(&self, sh: &Shared) -> Option<u64> {
        untaken_slots(
            sh.workers,
            sh.index,
            |i| self.worker_word(i, wk::SEQ),
            |i| self.worker_word(i, wk::HELD),
            self.w(at::IN_FLIGHT),
            self.w(at::WITHHELD),
            || (0..sh.workers).map(|i| self.mailed_grants(sh, i)).sum(),
        )
    }

    /// Takes back what a worker killed while joining a lane left counted
    /// for a waiter it never published: its place (DEPTH), its flow queue's
    /// count and its own-deadline count, each beyond what the ring holds,
    /// and buries a ticket it took and never published (a head stuck there
    /// would stop the lane). Counts only from a quiet snapshot, as `audit`:
    /// every step counter (but ours) even and unchanged around the census,
    /// so every live worker's joins and leaves are whole; `cancel` and
    /// `expire_due` are steps for this. False: some worker was inside a step.
    fn recount(&self, sh: &Shared) -> bool {
        let seqs = || (0..sh.workers).map(|i| self.worker_word(i, wk::SEQ).load(SeqCst)).collect::<Vec<_>>();
        let before = seqs();
        if before.iter().enumerate().any(|(i, s)| s & 1 == 1 && sh.index != Some(i)) {
            return false;
        }
        let queues = self.settings.fair_queues as usize;
        let mut found = Vec::new();
        for lane in Lane::ALL {
            let (mut waiting, mut own) = (0u64, 0u64);
            let mut per_queue = vec![0u64; queues];
            let unpublished = self.ring(lane).census(|tag| {
                waiting += 1;
                own += fair::tag_has_deadline(tag) as u64;
                if let Some(n) = per_queue.get_mut(fair::tag_queue(tag) as usize) {
                    *n += 1;
                }
            });
            let depth = self.depth()[lane as usize] as u64;
            let fair = self.fair(lane);
            let counted: Vec<u64> = (0..queues as u32).map(|q| fair.queue_state(q).1).collect();
            found.push((lane, depth.saturating_sub(waiting), fair.personal().saturating_sub(own), per_queue, counted, unpublished));
        }
        if seqs() != before {
            return false;
        }
        for (lane, depth, own, per_queue, counted, unpublished) in found {
            let ring = self.ring(lane);
            for p in unpublished {
                ring.bury(p);
            }
            ring.reap();
            self.w(at::DEPTH).fetch_sub(depth * Self::depth_unit(lane), SeqCst);
            let fair = self.fair(lane);
            fair.forget_deadlines(own);
            if self.fair_on {
                for (q, (&c, &w)) in counted.iter().zip(&per_queue).enumerate() {
                    fair.forget(q as u32, c.saturating_sub(w));
                }
            }
        }
        true
    }

    /// Grants in `worker`'s mailbox not yet taken (any generation).
    fn mailed_grants(&self, sh: &Shared, worker: usize) -> u64 {
        let mb = self.mailbox(sh, worker);
        mb.cells.iter().filter(|c| { let m = c.load(SeqCst); m != 0 && mailbox::unpack(m).2 == OUT_GRANT }).count() as u64
    }

    /// Takes every message in this worker's mailbox: waiters of ours that
    /// another process granted or shed. Messages for an earlier generation
    /// of this index (a dead predecessor) are dropped: its reclaim settled them.
    pub fn drain_mailbox(&self, mut on: impl FnMut(WaiterId, Outcome)) -> usize {
        let Some(sh) = self.shared.as_deref() else { return 0 };
        let Some(index) = sh.index else { return 0 };
        // A grant taken from its cell and not yet counted as held is inside
        // this step, so an audit never takes it for a leak.
        let _moving = self.moving();
        let mut n = 0;
        self.mailbox(sh, index).drain(|msg| {
            let (id, generation, outcome) = mailbox::unpack(msg);
            if !mailbox::same_generation(generation, sh.generation) {
                // A grant posted to our predecessor as it was reclaimed: a
                // slot nobody holds, passed on as its reclaim would have.
                if outcome == OUT_GRANT {
                    if let Some(mine) = self.pass_on() {
                        n += 1;
                        on(mine, Outcome::Granted);
                    }
                }
                return;
            }
            if outcome == OUT_GRANT {
                crash_point!("drain.taken");
                self.hold_mine();
            }
            n += 1;
            on(
                id,
                match outcome {
                    OUT_GRANT => Outcome::Granted,
                    OUT_EVICTED => Outcome::Shed(ShedCode::ServerOverloaded),
                    _ => Outcome::Shed(ShedCode::QueueTimeout),
                },
            );
        });
        n
    }

    /// Slots worker `worker` holds now, counting grants in its mailbox
    /// that it has not taken yet (shared pools; 0 otherwise).
    pub fn held_by(&self, worker: usize) -> u64 {
        match self.shared.as_deref() {
            Some(sh) if worker < sh.workers => (self.worker_word(worker, wk::HELD).load(SeqCst) & HELD_COUNT) + self.mailed_grants(sh, worker),
            _ => 0,
        }
    }

    /// (worker index, workers) of this process in a shared pool.
    pub fn worker(&self) -> Option<(Option<usize>, usize)> {
        self.shared.as_deref().map(|sh| (sh.index, sh.workers))
    }

    /// Moves the limit by `rule` (old word -> new word, clamped to the
    /// bounds) in one CAS loop; returns what `rule` said alongside and, if
    /// the limit rose, this process's waiters given the new slots (other
    /// processes' are posted to their mailboxes). A lowered limit preempts
    /// nothing: releases free slots until the count is under it.
    fn move_limit<T>(&self, signal: Signal, rule: impl Fn(u64) -> (u64, T)) -> (T, Vec<WaiterId>) {
        let word = self.w(at::LIMIT);
        let mut cur = word.load(SeqCst);
        let (next, extra) = loop {
            let (next, extra) = rule(cur);
            let next = self.settings.limit.clamp_fp(next);
            if next == cur {
                return (extra, Vec::new());
            }
            match word.compare_exchange_weak(cur, next, SeqCst, SeqCst) {
                Ok(_) => break (next, extra),
                Err(seen) => cur = seen,
            }
        };
        if next >> FP_SHIFT == cur >> FP_SHIFT {
            if next < cur {
                self.w(at::SLOW_START).store(0, Relaxed);
            }
            return (extra, Vec::new());
        }
        if next < cur {
            self.w(at::SLOW_START).store(0, Relaxed);
        }
        self.w(at::SIGNAL).store(signal as u64, Relaxed);
        self.count(at::CHANGES);
        let granted = if next > cur { self.fill() } else { Vec::new() };
        (extra, granted)
    }

    fn slow_start(&self) -> bool {
        self.w(at::SLOW_START).load(Relaxed) != 0
    }

    fn view(&self) -> PoolView {
        let waiters = self.depth().iter().map(|&n| n as u64).sum();
        PoolView { in_flight: self.w(at::IN_FLIGHT).load(SeqCst), waiters }
    }

    /// This pool's words (its lanes, waiters, slots, bucket and limit)
    /// under new settings, for a reload: the queue is kept. Settings that
    /// place or size the words (queue depth, flow queues, mailboxes) must
    /// not change: an error names `queue_depth`. A fixed limit takes its new
    /// value, an adaptive one is clamped to its new bounds (or starts at its
    /// initial value, coming from a fixed one); a lowered limit preempts
    /// nothing. Returns the new pool and this process's waiters granted
    /// slots the new settings free; this handle should no longer admit.
    #[cfg(not(loom))]
    pub fn retuned(&self, settings: PoolSettings) -> Result<(Pool, Vec<WaiterId>), CoreError> {
        let workers = self.shared.as_ref().map_or(0, |s| s.workers);
        if !State::fits(&self.settings, &settings, workers) {
            return Err(CoreError::arg("queue_depth", "queue_depth, fair_queues and (with several workers) the mailboxes sized by max_concurrency cannot change without a restart".to_string()));
        }
        if self.shared.is_some() && crate::block::fingerprint(&self.settings) != crate::block::fingerprint(&settings) {
            // Every worker and every worker started later attaches with these.
            return Err(CoreError::arg("queue_depth", "a shared pool's queue_depth, max_wait_ms, bucket, default_min_share and fairness cannot change without a restart".to_string()));
        }
        let word = self.w(at::LIMIT);
        match (self.settings.limit, settings.limit) {
            (_, LimitMode::Fixed(n)) => word.store((n as u64) << FP_SHIFT, SeqCst),
            (LimitMode::Fixed(_), LimitMode::Adaptive { initial, .. }) => {
                word.store((initial as u64) << FP_SHIFT, SeqCst);
                self.w(at::SLOW_START).store(1, SeqCst);
            }
            (LimitMode::Adaptive { .. }, next @ LimitMode::Adaptive { .. }) => {
                let mut cur = word.load(SeqCst);
                while let Err(seen) = word.compare_exchange_weak(cur, next.clamp_fp(cur), SeqCst, SeqCst) {
                    cur = seen;
                }
            }
        }
        let pool = Self::with_state(settings, self.clock.clone(), self.state.clone(), self.shared.clone());
        let granted = pool.fill();
        Ok((pool, granted))
    }

    /// Sets an adaptive limit to `n` slots (clamped to its bounds); the
    /// controller moves on from there. A no-op for a fixed limit. Returns
    /// this process's waiters granted if it rose.
    pub fn set_limit(&self, n: u64) -> Vec<WaiterId> {
        if self.fixed.is_some() {
            return Vec::new();
        }
        self.move_limit(Signal::None, |_| (n.min(u64::MAX >> FP_SHIFT) << FP_SHIFT, ())).1
    }

    /// One sample of the engine's metrics (`limit::engine_step`): `running`
    /// and `waiting` sequences, KV cache usage in millionths if known. A
    /// sample closer than half the engine interval to the last one applied
    /// (by any process) is dropped. Returns this process's waiters granted.
    pub fn observe_engine(&self, running: u64, waiting: u64, kv_usage_ppm: Option<u32>) -> Vec<WaiterId> {
        if self.fixed.is_some() {
            return Vec::new();
        }
        let now = self.clock.now_ns().max(1);
        let stamp = self.w(at::ENGINE_AT);
        let last = stamp.load(SeqCst);
        if last != 0 && now.saturating_sub(last) < self.settings.engine_interval_ns / 2 {
            return Vec::new();
        }
        if stamp.compare_exchange(last, now, SeqCst, SeqCst).is_err() {
            return Vec::new();
        }
        let sample = EngineSample { running, waiting, kv_usage_ppm };
        let view = self.view();
        let hold = self.w(at::HOLD).load(Relaxed) as u32;
        let cut_at = self.w(at::CUT_AT).load(Relaxed);
        let (step, granted) = self.move_limit(Signal::Engine, |fp| {
            let step = limit::engine_step(self.settings.limit, fp, sample, view, hold, cut_at, self.slow_start());
            (step.fp, step)
        });
        self.w(at::HOLD).store(step.hold as u64, Relaxed);
        self.w(at::CUT_AT).store(step.cut_at, Relaxed);
        granted
    }

    /// One time-to-first-token sample (ns) of a response from an upstream
    /// without engine metrics. Samples gather in windows; the sample that
    /// closes one applies `limit::gradient_step`. Returns this process's
    /// waiters granted.
    pub fn observe_latency(&self, ns: u64) -> Vec<WaiterId> {
        if self.fixed.is_some() {
            return Vec::new();
        }
        let ns = ns.max(1);
        let now = self.clock.now_ns().max(1);
        self.w(at::WIN_SUM).fetch_add(ns, Relaxed);
        let n = self.w(at::WIN_N).fetch_add(1, Relaxed) + 1;
        self.w(at::WIN_MIN).fetch_min(ns, Relaxed);
        let start_word = self.w(at::WIN_START);
        let start = start_word.load(SeqCst);
        if start == 0 {
            let _ = start_word.compare_exchange(0, now, SeqCst, SeqCst);
            return Vec::new();
        }
        let age = now.saturating_sub(start);
        let due = (n >= limit::WINDOW_SAMPLES && age >= limit::WINDOW_MIN_NS) || age >= limit::WINDOW_MAX_NS;
        if !due || start_word.compare_exchange(start, now, SeqCst, SeqCst).is_err() {
            return Vec::new();
        }
        let sum = self.w(at::WIN_SUM).swap(0, Relaxed);
        let n = self.w(at::WIN_N).swap(0, Relaxed);
        let window_min = self.w(at::WIN_MIN).swap(u64::MAX, Relaxed);
        if n == 0 || window_min == u64::MAX {
            return Vec::new();
        }
        let recent = (sum / n).max(1);
        let floor = limit::next_floor(self.w(at::FLOOR).load(Relaxed), window_min);
        self.w(at::FLOOR).store(floor, Relaxed);
        self.w(at::RECENT).store(recent, Relaxed);
        let view = self.view();
        let slow_start = self.slow_start();
        self.move_limit(Signal::Latency, |fp| (limit::gradient_step(self.settings.limit, fp, floor, recent, view, slow_start), ())).1
    }

    /// The upstream said it is overloaded (429/503 before anything reached
    /// the client): `limit::backoff_step`, at most once per back-off window
    /// (`BACKOFF_MIN_NS`, or the latency floor if longer).
    pub fn observe_overload(&self) -> Vec<WaiterId> {
        if self.fixed.is_some() {
            return Vec::new();
        }
        let now = self.clock.now_ns().max(1);
        let window = limit::BACKOFF_MIN_NS.max(self.w(at::FLOOR).load(Relaxed));
        let stamp = self.w(at::BACKOFF_AT);
        let last = stamp.load(SeqCst);
        if last != 0 && now.saturating_sub(last) < window {
            return Vec::new();
        }
        if stamp.compare_exchange(last, now, SeqCst, SeqCst).is_err() {
            return Vec::new();
        }
        self.move_limit(Signal::Backoff, |fp| (limit::backoff_step(self.settings.limit, fp), ())).1
    }

    /// `predicted` plus `lane`'s learned margin of it (`wait_observed`).
    #[inline]
    fn margined(&self, lane: Lane, predicted: u64) -> u64 {
        let m = self.w(at::MARGIN[lane as usize]).load(Relaxed).min(MARGIN_MAX);
        predicted.saturating_add(((predicted as u128 * m as u128) >> 10) as u64)
    }

    /// A request queued in `lane` with a predicted wait (`Placed::predicted_ns`)
    /// left the line after `waited_ns`: granted, or shed when its max wait or
    /// own deadline passed (then its wait is at least that). Moves the lane's
    /// refusal margin one step toward `99th percentile of the relative
    /// error. Plain load and store: racing observations may lose a step,
    /// which an estimate can afford; a locked RMW per grant it need not pay.
    pub fn wait_observed(&self, lane: Lane, predicted_ns: u64, waited_ns: u64) {
        if predicted_ns == 0 {
            return;
        }
        let w = self.w(at::MARGIN[lane as usize]);
        let m = w.load(Relaxed).min(MARGIN_MAX);
        let over = waited_ns.saturating_sub(predicted_ns) as u128 * MARGIN_ONE as u128 / predicted_ns as u128;
        let next = if over > m as u128 { (m + MARGIN_UP).min(MARGIN_MAX) } else { m.saturating_sub(MARGIN_DOWN) };
        w.store(next, Relaxed);
    }

    /// `lane`'s learned refusal margin, as a share of the prediction.
    pub fn deadline_margin(&self, lane: Lane) -> f64 {
        self.w(at::MARGIN[lane as usize]).load(Relaxed).min(MARGIN_MAX) as f64 / MARGIN_ONE as f64
    }

    /// Tracks the drain rate while the pool is saturated.
    ///
    /// Plain loads and stores throughout: racing releases may lose a sample
    /// or a count, which an estimate can afford; a locked RMW on every
    /// release cannot be. While handoffs come faster than `FAST_DRAIN_NS`
    /// apart, the clock is read on one in `SAMPLE_EVERY` of them and the
    /// interval averaged over those since the last read: the read costs
    /// ~40 ns, a visible share of a handoff only when handoffs are that fast.
    fn note_release(&self) {
        let ewma = self.w(at::RELEASE_INTERVAL).load(Relaxed);
        let since = self.w(at::UNSAMPLED).load(Relaxed) + 1;
        if ewma != 0 && ewma < FAST_DRAIN_NS && since < SAMPLE_EVERY {
            self.w(at::UNSAMPLED).store(since, Relaxed);
            return;
        }
        self.w(at::UNSAMPLED).store(0, Relaxed);
        let now = self.clock.now_ns();
        let last = self.w(at::LAST_RELEASE).load(Relaxed);
        self.w(at::LAST_RELEASE).store(now, Relaxed);
        if last == 0 || now <= last {
            return;
        }
        let dt = (now - last) / since;
        let ewma = self.w(at::RELEASE_INTERVAL).load(Relaxed);
        let next = if ewma == 0 { dt } else { ewma - ewma / 8 + dt / 8 };
        self.w(at::RELEASE_INTERVAL).store(next.max(1), Relaxed);
    }

    /// Removes a waiting `id` (its client left). False when it already left
    /// the line: granted (the caller then owns a slot) or shed.
    pub fn cancel(&self, id: WaiterId) -> bool {
        // A step: between its cell's CAS and `left`, the counts are ahead of
        // the ring, which a reclaim's recount must not read as an orphan.
        let _moving = self.moving();
        let lane = waiter_lane(id);
        let ring = self.ring(lane);
        if let Some((_, tag)) = ring.remove_owned(waiter_pos(id)) {
            self.left(lane, tag);
            self.unreserve_depth(lane);
            self.count(at::CANCELLED);
            ring.reap();
            true
        } else {
            false
        }
    }

    /// Sheds every waiter past its lane's max wait or its own deadline;
    /// calls `on_expired` per id.
    pub fn expire_due(&self, mut on_expired: impl FnMut(WaiterId)) {
        let _moving = self.moving(); // as `cancel`
        let now = self.clock.now_ns();
        for lane in Lane::ALL {
            let mut expired = |pos, owner, tag| {
                self.left(lane, tag);
                self.unreserve_depth(lane);
                self.count(at::SHED[ShedCode::QueueTimeout as usize]);
                if let Some(id) = self.route_shed(waiter_id(lane, pos), owner, OUT_EXPIRED) {
                    on_expired(id);
                }
            };
            match now.checked_sub(self.settings.max_wait_ns[lane as usize]) {
                Some(deadline) => self.ring(lane).expire(deadline, &mut expired),
                // Nobody can be due yet (a clock younger than the max wait:
                // the manual clock of tests), but the tombstones at the head
                // go as they would on any expiry pass.
                None => self.ring(lane).reap(),
            }
            // Own deadlines are not in join order: the whole line is looked
            // at, only while some waiter of the lane has one.
            if self.fair(lane).personal() > 0 {
                self.ring(lane).expire_own(now, &mut expired);
            }
        }
    }

    /// When waiter `id` will pass its max wait or own deadline (clock ns),
    /// if still waiting.
    pub fn deadline_ns(&self, id: WaiterId) -> Option<u64> {
        let lane = waiter_lane(id);
        self.ring(lane).enqueued_at(waiter_pos(id)).map(|(at, due)| match due {
            0 => at.saturating_add(self.settings.max_wait_ns[lane as usize]),
            due => due,
        })
    }

    /// Replaces the estimated service charged for a request of `queue` in
    /// `lane` (its `Ask::service`) by the real one (`fair::service` of its
    /// real charge). A no-op with fairness off.
    pub fn settle(&self, lane: Lane, queue: u32, estimate: u64, real: u64) {
        if self.fair_on && queue < self.settings.fair_queues {
            self.fair(lane).correct(queue, estimate, real);
        }
    }

    /// Per (lane, queue): the service its flows got here since the last
    /// export (may be negative after corrections); for the cluster's lease
    /// sync, which adds it on the other hosts with `fair_import`.
    pub fn fair_export(&self, mut f: impl FnMut(Lane, u32, i64)) {
        for lane in Lane::ALL {
            self.fair(lane).export(|q, d| f(lane, q, d));
        }
    }

    /// Adds service another host gave a queue's flows (its `fair_export`).
    pub fn fair_import(&self, lane: Lane, queue: u32, service: i64) {
        self.fair(lane).import(queue, service);
    }

    /// (counter, waiters) of a flow queue (tests, diagnostics).
    pub fn fair_queue(&self, lane: Lane, queue: u32) -> (u64, u64) {
        self.fair(lane).queue_state(queue.min(self.settings.fair_queues - 1))
    }

    /// Retry-After for a request shed from `lane` (full queue, evicted, or
    /// past its max wait): how long a client should sleep so that its retry
    /// gets in, if the load that shed it holds. What the client lives is the
    /// sleep *plus* the queue its retry then joins, so the sleep covers two
    /// lines: the one ahead of an arrival now (its waiters times the observed
    /// interval between slot releases under load) must clear, and the retry
    /// then queues behind the line that formed meanwhile, as long under the
    /// same load. Neither line is longer than the lane's max wait (a waiter
    /// still in line then is shed, not served). A retry that gets in has then
    /// waited 1x to 1.5x the hint; counting one line only gave ~2x.
    /// A flex request counts every waiter ahead of it: it is served only
    /// once they are, at the rate slots free up.
    pub fn retry_after_ns(&self, lane: Lane) -> u64 {
        let [p, d, f] = self.depth();
        let ahead = match lane {
            Lane::Priority => p as u64,
            Lane::Default => p as u64 + d as u64,
            Lane::Flex => p as u64 + d as u64 + f as u64,
        } + 1;
        let line = match self.w(at::RELEASE_INTERVAL).load(Relaxed) {
            0 => UNKNOWN_DRAIN_NS,
            interval => interval.saturating_mul(ahead).min(self.settings.max_wait_ns[lane as usize].max(interval)),
        };
        line.saturating_mul(2)
    }

    pub fn stats(&self) -> Stats {
        let (withheld, owed) = self.withheld();
        Stats {
            depth: self.depth(),
            in_flight: (self.w(at::IN_FLIGHT).load(SeqCst) as u32).saturating_sub(withheld as u32),
            withheld: withheld as u32,
            owed: owed as u32,
            flex_kept: { let limit = self.limit(); (limit - self.flex_limit_of(limit)) as u32 },
            limit: self.limit() as u32,
            limit_mode: self.settings.limit,
            limit_signal: Signal::from_word(self.w(at::SIGNAL).load(Relaxed)),
            limit_changes: self.w(at::CHANGES).load(Relaxed),
            latency_floor_ns: self.w(at::FLOOR).load(Relaxed),
            latency_recent_ns: self.w(at::RECENT).load(Relaxed),
            admitted: at::ADMITTED.map(|i| self.w(i).load(Relaxed)),
            shed: at::SHED.map(|i| self.w(i).load(Relaxed)),
            cancelled: self.w(at::CANCELLED).load(Relaxed),
            fairness: self.settings.fairness,
            fair_flows_active: Lane::ALL.map(|l| if self.fair_on { self.fair(l).active() } else { 0 }),
            deadline_refused: self.w(at::DEADLINE_REFUSED).load(Relaxed),
            shadow_rate_limited: self.w(at::SHADOW_RATE).load(Relaxed),
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
    pub depth: [u32; LANES],
    /// Requests holding a slot (withheld slots not counted).
    pub in_flight: u32,
    /// The limit in force (whole slots) and its mode (bounds).
    pub limit: u32,
    pub limit_mode: LimitMode,
    /// What moved the limit last, and how many times it moved.
    pub limit_signal: Signal,
    pub limit_changes: u64,
    /// The latency signal's floor and last window's mean (0: no sample yet).
    pub latency_floor_ns: u64,
    pub latency_recent_ns: u64,
    /// Slots taken out of use by `withhold`.
    pub withheld: u32,
    /// Slots `withhold` still waits for (busy when asked).
    pub owed: u32,
    /// Slots of the limit in force a flex request may not take: priority's
    /// reserve (or headroom) and the flex headroom (`flex_limit_of`).
    pub flex_kept: u32,
    pub admitted: [u64; LANES],
    pub shed: [u64; 3],
    pub cancelled: u64,
    pub fairness: Fairness,
    /// Per lane: flow queues with waiters (0 with fairness off).
    pub fair_flows_active: [u32; LANES],
    /// Refused at join: predicted wait past their own deadline.
    pub deadline_refused: u64,
    /// Bucket refusals counted and not applied (`enforce = false`).
    pub shadow_rate_limited: u64,
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::crash;
    use crate::settings::PoolSpec;
    use std::sync::Arc;

    /// One slot (held), a deep queue, time on a manual clock.
    fn saturated() -> (Pool, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_000_000_000));
        let s = PoolSpec { max_concurrency: Some(1), queue_depth: 1024, max_wait_ms: [1e6, 1e6, 600_000.0], rate: None, burst: None, priority_reserve: 0.0, default_min_share: 0.0, ..PoolSpec::default() }.validate().unwrap();
        let pool = Pool::new(s, Clock::Manual(clock.clone()));
        assert_eq!(pool.admit(Lane::Priority, 1), Admit::Now);
        (pool, clock)
    }

    /// The drain estimate, read through the hint: with nobody waiting in the
    /// priority lane its Retry-After is two lines of one waiter each.
    fn drain_interval(pool: &Pool) -> u64 {
        pool.retry_after_ns(Lane::Priority) / 2
    }

    /// One handoff `gap_ns` after the previous one, a new waiter behind it.
    fn handoff(pool: &Pool, clock: &ManualClock, gap_ns: u64) {
        assert!(matches!(pool.admit(Lane::Default, 1), Admit::Queued { granted: None, .. }));
        clock.advance_ns(gap_ns);
        assert!(pool.release().is_some());
    }

    /// Queues a waiter in `lane` whose home is replica `home - 1`.
    fn wait_at_home(pool: &Pool, lane: Lane, home: u64) -> WaiterId {
        wait_at_homes(pool, lane, 1 << (home - 1))
    }

    /// Queues a waiter in `lane` at home on the replicas of mask `homes`.
    fn wait_at_homes(pool: &Pool, lane: Lane, homes: u64) -> WaiterId {
        match pool.admit_home(lane, 1, &pool.ask_anonymous(), homes).0 {
            Admit::Queued { waiter, granted: None, .. } => waiter,
            other => panic!("expected to queue, got {other:?}"),
        }
    }

    #[test]
    fn a_slot_freed_on_a_replica_goes_to_the_next_waiter_whose_home_it_is() {
        let (pool, _clock) = saturated();
        let w: Vec<WaiterId> = [1, 2, 3, 2].iter().map(|&h| wait_at_home(&pool, Lane::Default, h)).collect();
        assert_eq!(pool.release_from(3), Some(w[2]));
        assert_eq!(pool.release_from(2), Some(w[1]), "the oldest at home 2");
        // Nobody's home: the front, as without replicas.
        assert_eq!(pool.release_from(9), Some(w[0]));
        assert_eq!(pool.release(), Some(w[3]));
        // Priority strictly first: a default waiter at home does not pass it.
        let p = wait_at_home(&pool, Lane::Priority, 1);
        let _d = wait_at_home(&pool, Lane::Default, 2);
        assert_eq!(pool.release_from(2), Some(p));
    }

    #[test]
    fn a_hot_prefixs_waiter_is_at_home_on_both_its_replicas() {
        let (pool, _clock) = saturated();
        // Replica 0's, a hot prefix's (replicas 1 and 2), replica 2's.
        let w: Vec<WaiterId> = [0b001, 0b110, 0b100].iter().map(|&m| wait_at_homes(&pool, Lane::Default, m)).collect();
        assert_eq!(pool.release_from(3), Some(w[1]), "replica 2: the oldest with it among its homes");
        assert_eq!(pool.release_from(2), Some(w[0]), "replica 1: nobody's left, the front");
        assert_eq!(pool.release_from(3), Some(w[2]));
    }

    #[test]
    fn the_home_rule_passes_the_front_a_bounded_number_of_times_seeded() {
        // 64 rounds of random homes (4 replicas) and random freed replicas:
        // every grant is within the look-ahead, and the front is passed at
        // most HOME_SKIPS grants in a row.
        let (pool, _clock) = saturated();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut line: Vec<(WaiterId, u64)> = Vec::new();
        let (mut passed, mut most_passed, mut homed) = (0u64, 0u64, 0u64);
        for _ in 0..64 {
            for _ in 0..(next() % 3) {
                let h = next() % 4 + 1;
                line.push((wait_at_home(&pool, Lane::Default, h), h));
            }
            let freed = next() % 4 + 1;
            let Some(g) = pool.release_from(freed) else {
                // Nobody waited: the slot is free again; hold it once more.
                assert_eq!(pool.admit(Lane::Default, 1), Admit::Now);
                continue;
            };
            let at = line.iter().position(|&(w, _)| w == g).expect("a waiter in line");
            assert!(at < crate::replicas::HOME_LOOK_AHEAD as usize, "granted {at} places behind the front");
            if at > 0 {
                assert_eq!(line[at].1, freed, "only a waiter at home passes the front");
                passed += 1;
                homed += 1;
            } else {
                homed += (line[0].1 == freed) as u64;
                passed = 0;
            }
            most_passed = most_passed.max(passed);
            line.remove(at);
        }
        assert!(most_passed <= crate::replicas::HOME_SKIPS, "{most_passed}");
        assert!(homed > 16, "the rule took a waiter at home {homed} times of 64");
    }

    #[test]
    fn slow_handoffs_move_the_drain_estimate_on_every_release() {
        let (pool, clock) = saturated();
        assert_eq!(drain_interval(&pool), UNKNOWN_DRAIN_NS);
        handoff(&pool, &clock, 1_000_000);
        handoff(&pool, &clock, 1_000_000);
        assert_eq!(drain_interval(&pool), 1_000_000);
        handoff(&pool, &clock, 9_000_000);
        // 1 ms * 7/8 + 9 ms / 8: the one release counted at once.
        assert_eq!(drain_interval(&pool), 2_000_000);
    }

    #[test]
    fn fast_handoffs_sample_the_clock_and_still_track_the_drain_rate() {
        let (pool, clock) = saturated();
        for _ in 0..100 {
            handoff(&pool, &clock, 1_000);
        }
        assert_eq!(drain_interval(&pool), 1_000);
        for _ in 0..400 {
            handoff(&pool, &clock, 2_000);
        }
        let interval = drain_interval(&pool);
        assert!((1_950..=2_000).contains(&interval), "{interval}");
        // Slowing past FAST_DRAIN_NS goes back to a read per release.
        for _ in 0..80 {
            handoff(&pool, &clock, 1_000_000);
        }
        let interval = drain_interval(&pool);
        assert!((990_000..=1_000_000).contains(&interval), "{interval}");
    }

    #[test]
    fn withheld_slots_are_kept_from_requests_and_restored_to_the_next_waiter() {
        let s = PoolSpec { max_concurrency: Some(3), queue_depth: 16, max_wait_ms: [1e6, 1e6, 600_000.0], ..PoolSpec::default() }.validate().unwrap();
        let pool = Pool::new(s, Clock::Manual(Arc::new(ManualClock::new(1))));
        assert_eq!(pool.admit(Lane::Default, 1), Admit::Now);
        // Two slots free: asking for three takes those two and owes one.
        assert_eq!(pool.withhold(3), 2);
        let st = pool.stats();
        assert_eq!((st.in_flight, st.withheld, st.owed), (1, 2, 1));
        let Admit::Queued { waiter, granted: None, .. } = pool.admit(Lane::Priority, 1) else {
            panic!("a request must wait while the free slots are withheld")
        };
        // The busy slot pays the debt instead of going to the waiter.
        assert_eq!(pool.release(), None);
        let st = pool.stats();
        assert_eq!((st.in_flight, st.withheld, st.owed), (0, 3, 0));
        let mut granted = Vec::new();
        assert_eq!(pool.restore(1, |id| granted.push(id)), 1);
        assert_eq!(granted, vec![waiter]);
        assert_eq!(pool.restore(5, |id| granted.push(id)), 2, "only two more were withheld");
        assert_eq!(granted.len(), 1);
        assert_eq!(pool.stats().in_flight, 1);
        assert_eq!(pool.release(), None);
        let st = pool.stats();
        assert_eq!((st.in_flight, st.withheld, st.owed), (0, 0, 0));
    }

    /// Worker 0 of a two-worker block (`a`) dies at one crash point; the
    /// supervisor reclaims it and worker 1 (`b`) settles everything it knows
    /// of. What is left tells what the death cost.
    struct Killed {
        /// Slots the reclaim settled (held by a, or taken and not counted).
        reclaimed: u64,
        /// Slots counted in use that nobody holds or withholds.
        leaked: u64,
        /// Slots counted as b's for a grant b never heard of.
        stuck: u64,
        /// b's waiters that left the line without b being told.
        unanswered: usize,
        /// (withheld, owed) afterwards.
        withheld: (u64, u64),
        /// Waiters counted per lane, and flow queues counted active, after
        /// everyone left (a count beyond the ring is a dead join's).
        depth: [u32; 3],
        flows: [u32; 3],
        /// With the pool idle afterwards, a waiter queued behind a busy slot
        /// still gets it (no ticket a dead worker never published stops a lane).
        lanes_flow: bool,
    }

    struct Block {
        name: String,
        sup: Pool,
    }
    impl Drop for Block {
        fn drop(&mut self) {
            let _ = Pool::unlink_shared(&self.name);
        }
    }

    /// `setup` runs on (a, b) and returns b's slots held and waiters queued;
    /// `fatal` runs on a with `point` armed (after `skip` passes) and must reach it.
    fn killed_at(
        point: &'static str,
        skip: u32,
        spec: PoolSpec,
        setup: impl FnOnce(&Pool, &Pool, &Pool) -> (u32, Vec<WaiterId>),
        fatal: impl FnOnce(&Pool),
    ) -> Killed {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!("/tierq-unit-{}-crash-{}", std::process::id(), N.fetch_add(1, SeqCst));
        let s = spec.validate().unwrap();
        let sup = Pool::create_shared(&name, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
        let blk = Block { name, sup };
        let attach = |i| Pool::attach_shared(&blk.name, s.clone(), Some(i), vec![-1; 2], Clock::Monotonic).unwrap();
        let (a, b) = (attach(0), attach(1));
        let (mut holds, mut pending) = setup(&blk.sup, &a, &b);
        crash::arm(point, skip);
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fatal(&a)));
        crash::disarm();
        assert!(died.is_err(), "{point} was never reached");
        drop(a);
        let (reclaimed, _) = blk.sup.reclaim_worker(0, |_| panic!("the supervisor owns no waiter")).unwrap();
        loop {
            b.drain_mailbox(|id, outcome| {
                pending.retain(|&w| w != id);
                holds += (outcome == Outcome::Granted) as u32;
            });
            if holds == 0 {
                break;
            }
            holds -= 1;
            if let Some(id) = b.release() {
                pending.retain(|&w| w != id);
                holds += 1;
            }
        }
        // Still queued: b cancels them. Gone from the line: nobody told b.
        let unanswered = pending.into_iter().filter(|&w| !b.cancel(w)).count();
        let (withheld, owed) = blk.sup.withheld();
        let raw = blk.sup.w(at::IN_FLIGHT).load(SeqCst);
        let stuck = blk.sup.held_by(1);
        assert!(raw >= withheld + stuck, "{point}: {raw} in use, {withheld} withheld, {stuck} held: a slot counted twice");
        let st = blk.sup.stats();
        let (depth, flows) = (st.depth, st.fair_flows_active);
        let lanes_flow = raw > 0 || withheld > 0 || {
            let all = b.limit();
            (0..all).all(|_| b.admit(Lane::Default, 1) == Admit::Now) && {
                let Admit::Queued { waiter, .. } = b.admit(Lane::Default, 1) else { panic!("{point}: b must queue") };
                let handed = b.release() == Some(waiter);
                (0..all).for_each(|_| assert_eq!(b.release(), None));
                handed
            }
        };
        Killed { reclaimed, leaked: raw - withheld - stuck, stuck, unanswered, withheld: (withheld, owed), depth, flows, lanes_flow }
    }

    fn spec(n: i64) -> PoolSpec {
        PoolSpec { max_concurrency: Some(n), queue_depth: 16, max_wait_ms: [1e6, 1e6, 600_000.0], ..PoolSpec::default() }
    }

    /// b holds the one slot of a fixed-1 pool and has one waiter queued.
    fn b_waits(b: &Pool) -> WaiterId {
        let Admit::Queued { waiter, granted: None, .. } = b.admit(Lane::Default, 1) else { panic!("b must queue") };
        waiter
    }

    // Window by window (docs/architecture.md): a worker killed between two
    // atomic steps leaks no slot (its reclaim's audit frees one taken and not
    // counted), and no window counts a slot twice (which would let one
    // request too many in for good); killed while joining a lane, its
    // reclaim's recount takes back the counts and buries the ticket. What
    // stays open: another worker's waiter popped and never told.

    #[test]
    fn killed_between_taking_a_slot_and_counting_it_leaks_nothing() {
        let k = killed_at("admit.taken", 0, spec(2), |_, _, _| (0, vec![]), |a| {
            a.admit(Lane::Default, 1);
        });
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 0));
    }

    #[test]
    fn killed_between_uncounting_a_slot_and_freeing_it_leaks_nothing() {
        let k = killed_at("release.unheld", 0, spec(2), |_, a, _| {
            assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
            (0, vec![])
        }, |a| {
            a.release();
        });
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 0));
    }

    #[test]
    fn killed_after_taking_a_debt_loses_the_debt_not_a_slot() {
        let k = killed_at("release.owed", 0, spec(1), |sup, a, _| {
            assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
            assert_eq!(sup.withhold(1), 0);
            (0, vec![])
        }, |a| {
            a.release();
        });
        // The slot a held was passed on by its reclaim (freed); the debt is gone.
        assert_eq!((k.reclaimed, k.leaked, k.withheld), (1, 0, (0, 0)));
    }

    #[test]
    fn killed_while_paying_a_debt_never_counts_the_slot_twice() {
        let k = killed_at("release.owed_unheld", 0, spec(1), |sup, a, _| {
            assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
            assert_eq!(sup.withhold(1), 0);
            (0, vec![])
        }, |a| {
            a.release();
        });
        // Neither held nor withheld yet: the audit frees it, the debt is gone.
        assert_eq!((k.reclaimed, k.leaked, k.withheld), (1, 0, (0, 0)));
    }

    #[test]
    fn killed_after_popping_a_waiter_of_another_worker_frees_the_slot_and_loses_the_waiter() {
        let k = killed_at("release.popped", 0, spec(1), |_, a, b| {
            assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
            (0, vec![b_waits(b)])
        }, |a| {
            a.release();
        });
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 1));
    }

    #[test]
    fn killed_handing_a_held_slot_to_another_worker_frees_it_and_loses_the_waiter() {
        let k = killed_at("hand.unheld", 0, spec(1), |_, a, b| {
            assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
            (0, vec![b_waits(b)])
        }, |a| {
            a.release();
        });
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 1));
    }

    // Regression (#18 item 3): a grant was counted in the owner's HELD word
    // before it was mailed, so a worker killed between the two left the slot
    // counted as b's for a grant b never heard of, out of use until b
    // restarted. The message is now the slot's one record until b counts it.
    #[test]
    fn killed_before_mailing_a_grant_frees_the_slot_and_loses_the_waiter() {
        let k = killed_at("post.before", 0, spec(1), |_, a, b| {
            assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
            (0, vec![b_waits(b)])
        }, |a| {
            a.release();
        });
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 1));
    }

    #[test]
    fn killed_after_mailing_a_grant_before_waking_its_owner_hands_the_slot_whole() {
        let k = killed_at("post.unwoken", 0, spec(1), |_, a, b| {
            assert_eq!(a.admit(Lane::Default, 1), Admit::Now);
            (0, vec![b_waits(b)])
        }, |a| {
            a.release();
        });
        // b drains the grant (the reclaim wakes every live worker) and holds it.
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (0, 0, 0, 0));
    }

    #[test]
    fn killed_between_taking_a_grant_from_its_mailbox_and_counting_it_leaks_nothing() {
        let k = killed_at("drain.taken", 0, spec(1), |_, a, b| {
            assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
            let Admit::Queued { granted: None, .. } = a.admit(Lane::Default, 1) else { panic!("a must queue") };
            assert_eq!(b.release(), None, "the slot is mailed to a");
            assert_eq!(b.held_by(0), 1, "a grant in the mailbox counts as the owner's");
            (0, vec![])
        }, |a| {
            a.drain_mailbox(|_, _| {});
        });
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 0));
    }

    #[test]
    fn a_grant_left_in_a_dead_workers_mailbox_is_passed_on_by_its_reclaim() {
        let k = killed_at("none", 0, spec(2), |_, a, b| {
            assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
            assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
            let Admit::Queued { granted: None, .. } = a.admit(Lane::Default, 1) else { panic!("a must queue") };
            let w = b_waits(b);
            assert_eq!(b.release(), None, "a's waiter came first: its grant is mailed");
            (1, vec![w])
        }, |_| {
            panic!("worker killed between two calls, its mail not drained");
        });
        // The mailed slot went on to b's waiter; nothing stuck or lost.
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 0));
    }

    // A worker killed while joining a lane, before its waiter is published:
    // its place, its flow queue's count and a ticket it took would stay
    // counted (a queue that looks active forever, lifting newcomers to its
    // stale counter; a head stuck at the ticket, stopping the lane). The
    // reclaim recounts them against the ring.
    fn killed_joining(point: &'static str) -> Killed {
        killed_at(point, 0, spec(1), |_, _, b| {
            assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
            (1, vec![])
        }, |a| {
            let ask = Ask { hand: a.hand(b"key_joining"), service: 100, max_wait_ns: Some(60_000_000_000) };
            a.admit_ask(Lane::Default, 1, &ask);
        })
    }

    #[test]
    fn killed_between_reserving_a_place_and_joining_a_flow_queue_leaves_no_count() {
        let k = killed_joining("admit.reserved");
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.depth, k.flows, k.lanes_flow), (0, 0, 0, [0, 0, 0], [0, 0, 0], true));
    }

    #[test]
    fn killed_between_joining_a_flow_queue_and_taking_a_ticket_leaves_no_count() {
        let k = killed_joining("admit.joined");
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.depth, k.flows, k.lanes_flow), (0, 0, 0, [0, 0, 0], [0, 0, 0], true));
    }

    #[test]
    fn killed_between_taking_a_ticket_and_publishing_it_buries_the_ticket() {
        let k = killed_joining("push.taken");
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.depth, k.flows, k.lanes_flow), (0, 0, 0, [0, 0, 0], [0, 0, 0], true));
    }

    fn adaptive_1() -> PoolSpec {
        PoolSpec {
            max_concurrency: None,
            min_concurrency: Some(1),
            max_concurrency_limit: Some(4),
            initial_concurrency: Some(1),
            ..spec(1)
        }
    }

    #[test]
    fn killed_between_taking_a_raised_limits_slot_and_popping_leaks_nothing() {
        let k = killed_at("dispatch.taken", 0, adaptive_1(), |_, _, b| {
            assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
            (1, vec![b_waits(b)])
        }, |a| {
            a.set_limit(2);
        });
        // The audit's freed slot went to b's waiter.
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 0));
    }

    #[test]
    fn killed_between_popping_for_a_raised_limit_and_handing_on_frees_the_slot_and_loses_the_waiter() {
        let k = killed_at("dispatch.popped", 0, adaptive_1(), |_, _, b| {
            assert_eq!(b.admit(Lane::Default, 1), Admit::Now);
            (1, vec![b_waits(b)])
        }, |a| {
            a.set_limit(2);
        });
        assert_eq!((k.reclaimed, k.leaked, k.stuck, k.unanswered), (1, 0, 0, 1));
    }

    #[test]
    fn killed_inside_withhold_frees_the_slot_it_just_took() {
        let k = killed_at("withhold.taken", 1, spec(3), |_, _, _| (0, vec![]), |a| {
            a.withhold(3);
        });
        assert_eq!((k.reclaimed, k.leaked, k.withheld), (1, 0, (1, 0)));
    }

    #[test]
    fn killed_inside_restore_hands_the_slot_it_just_took_on() {
        let k = killed_at("restore.taken", 0, spec(1), |_, a, b| {
            assert_eq!(a.withhold(1), 1);
            (0, vec![b_waits(b)])
        }, |a| {
            a.restore(1, |_| {});
        });
        // The audit's freed slot went to b's waiter.
        assert_eq!((k.reclaimed, k.leaked, k.withheld, k.unanswered), (1, 0, (0, 0), 0));
    }

    #[test]
    fn a_reclaim_leaves_an_untaken_slot_while_another_dead_worker_is_unreclaimed() {
        let name = format!("/tierq-unit-{}-two-dead", std::process::id());
        let s = spec(2).validate().unwrap();
        let sup = Pool::create_shared(&name, s.clone(), 2, vec![], Clock::Monotonic).unwrap();
        let blk = Block { name, sup };
        for i in 0..2 {
            let w = Pool::attach_shared(&blk.name, s.clone(), Some(i), vec![-1; 2], Clock::Monotonic).unwrap();
            crash::arm("admit.taken", 0);
            assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.admit(Lane::Default, 1))).is_err());
            crash::disarm();
        }
        // Worker 1 still looks inside a step: no snapshot can be trusted.
        assert_eq!(blk.sup.reclaim_worker(0, |_| {}).unwrap(), (0, 0));
        assert_eq!(blk.sup.w(at::IN_FLIGHT).load(SeqCst), 2);
        assert_eq!(blk.sup.reclaim_worker(1, |_| {}).unwrap(), (2, 0), "both untaken slots are freed");
        assert_eq!(blk.sup.stats().in_flight, 0);
    }

    #[test]
    fn restore_forgives_what_is_owed_first() {
        let s = PoolSpec { max_concurrency: Some(2), queue_depth: 16, max_wait_ms: [1e6, 1e6, 600_000.0], ..PoolSpec::default() }.validate().unwrap();
        let pool = Pool::new(s, Clock::Manual(Arc::new(ManualClock::new(1))));
        assert_eq!(pool.admit(Lane::Default, 1), Admit::Now);
        assert_eq!(pool.admit(Lane::Default, 1), Admit::Now);
        assert_eq!(pool.withhold(1), 0);
        assert_eq!(pool.restore(1, |_| panic!("nothing waits")), 1);
        assert_eq!(pool.stats().owed, 0);
        assert_eq!(pool.release(), None);
        assert_eq!((pool.stats().in_flight, pool.stats().withheld), (1, 0));
    }
}
