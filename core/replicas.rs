//! A pool's replicas: the engines that serve one model, each with its own
//! slots in flight and its own learned limit (the rules of `limit.rs`, per
//! replica). The pool (`admission.rs`) keeps one pair of lanes and a limit
//! that is the sum of the replicas' limits; when it grants a slot, the
//! holder takes a replica here (`pick`), and gives it back (`release`)
//! before the pool's slot.
//!
//! Why every grant finds a replica with room: the replicas' counts move only
//! while a pool slot is held (taken after the pool's, given back before it),
//! so the replicas hold fewer than the pool while a holder has not picked,
//! and the pool's limit is never above the sum of the replicas' (Python
//! lowers the pool first, `Replicas::capacity`, and raises it after). Fewer
//! held than the sum of the limits means some replica is below its own. A
//! limit lowered under a holder between its grant and its pick is the one
//! case with none: it goes to the least loaded replica over its limit
//! (counted in `over`), as a request in flight is never cut either.
//!
//! A replica's words (`WORDS` each, two cache lines) are atomics only, in
//! this process's heap or in a named shared-memory region of their own beside
//! the pool's block (`create_shared` / `attach_shared`: every worker of a host
//! maps it, so a replica's count and limit hold host-wide). Its own region and
//! not more lines of the pool's block: the pool's layout (and its version)
//! stays as it is for a pool of one engine, and a region's header says how
//! many replicas and workers it was made for, checked on attach.
//!
//! Region layout (version 1): a header of `HEADER` words (magic, version,
//! replicas, workers, the over count, the limit mode's bounds, the pool's
//! slots withheld for the replicas: `claim_withheld`), then `WORDS`
//! per replica, then per worker one word per replica: the slots that worker
//! holds there, so a dead worker's are given back (`reclaim_worker`). A pick
//! counts the replica first and the worker's hold after; a release the other
//! way round: a worker killed between the two leaves the replica one slot
//! short (never one over) until the next start.

use crate::clock::Clock;
use crate::error::CoreError;
use crate::limit::{self, EngineSample, LimitMode, PoolView, FP_SHIFT};
use crate::sync::AtomicU64;
use crate::sync::Ordering::{Relaxed, SeqCst};
use crate::words::Words;

/// At most this many replicas in a pool: a replica order is one u64 of
/// 4-bit replica numbers, best first.
pub const MAX_REPLICAS: usize = 16;

/// Words per replica.
pub const WORDS: usize = 16;
/// Words of the header.
pub const HEADER: usize = 8;
const MAGIC: u64 = 0x7469_6572_7152_4550; // "tierqREP"
const VERSION: u64 = 1;

mod h {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 1;
    pub const N: usize = 2;
    pub const WORKERS: usize = 3;
    /// Picks that found no replica with room (a limit lowered under a holder).
    pub const OVER: usize = 4;
    /// The limit mode's bounds (fixed: both n), checked on attach.
    pub const MIN: usize = 5;
    pub const MAX: usize = 6;
    /// The pool's slots withheld for the replicas' sum in force (an ejected
    /// replica's, a slow start's): claimed by CAS (`claim_withheld`), so
    /// workers moving it at once agree on what each withholds or restores.
    /// A region made before this word had it 0, as a new one does.
    pub const WITHHELD: usize = 7;
}

/// A replica passes the load bound while its load, with this request, is at
/// most `BOUND_NUM / BOUND_DEN` times its share of the pool's load with this
/// request (rounded up to a whole request): bounded-load consistent hashing
/// (Mirrokni, Thorup and Zadimoghaddam, 2018) with c = 1.25, weighted by the
/// replica's limit.
pub const BOUND_NUM: u64 = 5;
pub const BOUND_DEN: u64 = 4;

/// The grant rule's look-ahead: a slot freed on replica r (`Pool::release_from`)
/// goes to the oldest of its lane's first `HOME_LOOK_AHEAD` waiters with r
/// among its homes (the first of its order; a hot prefix's first two,
/// tierq.routing), the lanes' order kept (priority
/// strictly first: a lane's look-ahead sees only its own waiters), and at
/// most `HOME_SKIPS` grants in a row pass over a lane's front waiter; else
/// the front goes, as without replicas. At saturation a freed slot is the
/// only room, so without it whoever is in front takes r whatever its home.
pub const HOME_LOOK_AHEAD: u32 = 8;
pub const HOME_SKIPS: u64 = 8;

/// Tries of a pick whose CAS lost to another picker before it gives up on
/// the order and takes the least loaded.
const PICK_TRIES: u32 = 64;

mod at {
    /// Slots this replica holds (host-wide when shared). Invariant: moves
    /// only while the holder holds a pool slot; at most the replica's limit
    /// but for the `over` case (module doc).
    pub const IN_FLIGHT: usize = 0;
    /// The replica's limit, in 1/1024ths of a slot (`limit.rs`).
    pub const LIMIT: usize = 1;
    /// The replica's health (tierq.health), one word the request path
    /// writes and `pick` reads: 0 in rotation at its whole limit; `OUT`
    /// out of rotation (`pick` skips it, its limit leaves the pool's
    /// capacity); n in 1..OUT in rotation at most n slots (a slow start
    /// after an ejection). Zeroed words: in rotation.
    pub const HEALTH: usize = 2;
    pub const OUT: u64 = u64::MAX;
    /// Sequences waiting inside the engine at its last metrics sample: load.
    pub const WAITING: usize = 3;
    /// When the last engine sample was applied (ns; 0: never).
    pub const ENGINE_AT: usize = 4;
    pub const HOLD: usize = 5;
    pub const CUT_AT: usize = 6;
    /// Nonzero once a signal lowered the limit: slow start is over.
    pub const CUT: usize = 7;
    pub const WIN_SUM: usize = 8;
    pub const WIN_N: usize = 9;
    /// The window's fastest sample; 0 stands for none yet (u64::MAX when set
    /// by `new`, a shared block starts zeroed and `new` initialises it).
    pub const WIN_MIN: usize = 10;
    pub const WIN_START: usize = 11;
    pub const FLOOR: usize = 12;
    pub const RECENT: usize = 13;
    pub const BACKOFF_AT: usize = 14;
    /// Grants made to this replica, ever (stats).
    pub const GRANTS: usize = 15;
}

/// How a pick reads the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The first replica in the order with room (round robin: the caller
    /// rotates the order).
    First,
    /// The first in the order with room whose load is within the bound,
    /// else the least loaded with room (prefix affinity).
    Bounded,
    /// The least loaded with room; the order breaks ties.
    LeastLoaded,
    /// The less loaded of the order's first two with room (a hot prefix's
    /// two homes, tierq.routing: two choices), else the first in the order
    /// with room.
    TwoHomes,
}

impl Rule {
    pub fn from_u8(v: u8) -> Result<Rule, CoreError> {
        match v {
            0 => Ok(Rule::First),
            1 => Ok(Rule::Bounded),
            2 => Ok(Rule::LeastLoaded),
            3 => Ok(Rule::TwoHomes),
            _ => Err(CoreError::InvalidArgument { name: "rule", reason: format!("expected 0 - 3, got {v}") }),
        }
    }
}

/// One replica as `stats` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStats {
    pub in_flight: u64,
    pub limit: u64,
    /// Its learned (or fixed) limit before a slow start's cap.
    pub learned: u64,
    pub waiting: u64,
    pub down: bool,
    pub grants: u64,
}

#[derive(Clone)]
pub struct Replicas {
    words: Words,
    n: usize,
    workers: usize,
    /// This process's worker index in a shared region (its holds are counted).
    worker: Option<usize>,
    mode: LimitMode,
    engine_interval_ns: u64,
    clock: Clock,
}

fn words_for(n: usize, workers: usize) -> usize {
    HEADER + n * WORDS + workers * MAX_REPLICAS
}

fn check_n(n: usize) -> Result<(), CoreError> {
    if n == 0 || n > MAX_REPLICAS {
        return Err(CoreError::InvalidArgument { name: "replicas", reason: format!("expected 1 - {MAX_REPLICAS}, got {n}") });
    }
    Ok(())
}

impl Replicas {
    /// `n` replicas on this process's heap, each limit at `mode`'s start.
    pub fn new(n: usize, mode: LimitMode, engine_interval_ns: u64, clock: Clock) -> Result<Replicas, CoreError> {
        check_n(n)?;
        let r = Replicas { words: Words::heap(words_for(n, 0)), n, workers: 0, worker: None, mode, engine_interval_ns, clock };
        r.init();
        Ok(r)
    }

    fn init(&self) {
        for i in 0..self.n {
            self.w(i, at::LIMIT).store((self.mode.initial() as u64) << FP_SHIFT, SeqCst);
            self.w(i, at::WIN_MIN).store(u64::MAX, SeqCst);
        }
        let hw = |i: usize| &self.words.get()[i];
        hw(h::VERSION).store(VERSION, SeqCst);
        hw(h::N).store(self.n as u64, SeqCst);
        hw(h::WORKERS).store(self.workers as u64, SeqCst);
        hw(h::MIN).store(self.mode.min() as u64, SeqCst);
        hw(h::MAX).store(self.mode.max() as u64, SeqCst);
        // Magic last: an attach that sees it sees the rest.
        hw(h::MAGIC).store(MAGIC, SeqCst);
    }

    /// Creates the shared region `name` (which must not exist) for `n`
    /// replicas and `workers` workers; the supervisor's handle (it reclaims).
    #[cfg(not(loom))]
    pub fn create_shared(name: &str, n: usize, workers: usize, mode: LimitMode, engine_interval_ns: u64, clock: Clock) -> Result<Replicas, CoreError> {
        check_n(n)?;
        if workers == 0 || workers > crate::block::MAX_WORKERS {
            return Err(CoreError::InvalidArgument { name: "workers", reason: format!("expected 1 - {}, got {workers}", crate::block::MAX_WORKERS) });
        }
        let region = crate::shm::Region::create(name, words_for(n, workers))?;
        let r = Replicas { words: Words::shm(region), n, workers, worker: None, mode, engine_interval_ns, clock };
        r.init();
        Ok(r)
    }

    /// Maps the region `name` as worker `worker` (None: the supervisor),
    /// checking it was made for `n` replicas under the same limit bounds.
    #[cfg(not(loom))]
    pub fn attach_shared(name: &str, n: usize, worker: Option<usize>, mode: LimitMode, engine_interval_ns: u64, clock: Clock) -> Result<Replicas, CoreError> {
        let region = crate::shm::Region::attach(name)?;
        let w = region.words();
        let word = |i: usize| w.get(i).map(|x| x.load(SeqCst));
        if word(h::MAGIC) != Some(MAGIC) || word(h::VERSION) != Some(VERSION) {
            return Err(CoreError::Layout(format!("{name}: not a tierq replica region (version {VERSION})")));
        }
        let workers = word(h::WORKERS).unwrap_or(0) as usize;
        if word(h::N) != Some(n as u64) || w.len() != words_for(n, workers) {
            return Err(CoreError::Layout(format!("{name}: made for {:?} replicas, not {n}", word(h::N))));
        }
        if word(h::MIN) != Some(mode.min() as u64) || word(h::MAX) != Some(mode.max() as u64) {
            return Err(CoreError::Layout(format!("{name}: made with other limit bounds")));
        }
        if worker.is_some_and(|i| i >= workers) {
            return Err(CoreError::InvalidArgument { name: "worker", reason: format!("expected 0 - {}, got {worker:?}", workers - 1) });
        }
        Ok(Replicas { words: Words::shm(region), n, workers, worker, mode, engine_interval_ns, clock })
    }

    /// Removes a region's name (live mappings stay valid).
    #[cfg(not(loom))]
    pub fn unlink_shared(name: &str) -> Result<(), CoreError> {
        crate::shm::Region::unlink(name)
    }

    #[inline]
    fn w(&self, r: usize, word: usize) -> &AtomicU64 {
        &self.words.get()[HEADER + r * WORDS + word]
    }

    #[inline]
    fn held(&self, worker: usize, r: usize) -> &AtomicU64 {
        &self.words.get()[HEADER + self.n * WORDS + worker * MAX_REPLICAS + r]
    }

    /// Slots worker `worker` holds on each replica.
    pub fn held_by(&self, worker: usize) -> Vec<u64> {
        if worker >= self.workers {
            return Vec::new();
        }
        (0..self.n).map(|r| self.held(worker, r).load(SeqCst)).collect()
    }

    /// Gives back every slot dead worker `worker` held (the supervisor, before
    /// the pool's reclaim passes its pool slots on). Returns how many.
    pub fn reclaim_worker(&self, worker: usize) -> Result<u64, CoreError> {
        if worker >= self.workers {
            return Err(CoreError::InvalidArgument { name: "worker", reason: format!("no worker {worker} in this region") });
        }
        let mut total = 0;
        for r in 0..self.n {
            let h = self.held(worker, r).swap(0, SeqCst);
            if h > 0 {
                let word = self.w(r, at::IN_FLIGHT);
                let mut cur = word.load(SeqCst);
                while let Err(seen) = word.compare_exchange_weak(cur, cur.saturating_sub(h), SeqCst, SeqCst) {
                    cur = seen;
                }
                total += h;
            }
        }
        Ok(total)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn check(&self, r: usize) -> Result<(), CoreError> {
        if r < self.n {
            Ok(())
        } else {
            Err(CoreError::InvalidArgument { name: "replica", reason: format!("expected 0 - {}, got {r}", self.n - 1) })
        }
    }

    /// A replica's limit in force, in whole slots.
    pub fn limit(&self, r: usize) -> u64 {
        let learned = self.learned(r);
        match self.w(r, at::HEALTH).load(SeqCst) {
            0 | at::OUT => learned,
            cap => learned.min(cap),
        }
    }

    /// A replica's own limit, fixed or learned, before its health's cap.
    pub fn learned(&self, r: usize) -> u64 {
        match self.mode {
            LimitMode::Fixed(n) => n as u64,
            LimitMode::Adaptive { .. } => self.w(r, at::LIMIT).load(SeqCst) >> FP_SHIFT,
        }
    }

    fn up(&self, r: usize) -> bool {
        self.w(r, at::HEALTH).load(SeqCst) != at::OUT
    }

    /// The pool's limit: the sum of the limits of the replicas in rotation
    /// (at least 1 while all are out, so one request still probes).
    pub fn capacity(&self) -> u64 {
        let sum: u64 = (0..self.n).filter(|&r| self.up(r)).map(|r| self.limit(r)).sum();
        sum.max(1)
    }

    /// Takes a replica or leaves it out of rotation (the health seam).
    pub fn set_down(&self, r: usize, down: bool) -> Result<(), CoreError> {
        self.check(r)?;
        self.w(r, at::HEALTH).store(if down { at::OUT } else { 0 }, SeqCst);
        Ok(())
    }

    /// A replica's health in one store: out of rotation (`down`), or in it
    /// at most `cap` slots (0: its whole limit; a slow start ramps `cap`).
    /// The caller then sets the pool's limit to `capacity`.
    pub fn set_health(&self, r: usize, down: bool, cap: u64) -> Result<(), CoreError> {
        self.check(r)?;
        let word = if down { at::OUT } else { cap.min(at::OUT - 1) };
        self.w(r, at::HEALTH).store(word, SeqCst);
        Ok(())
    }

    /// A replica's load figure: its slots held plus the engine's own queue.
    fn load(&self, r: usize) -> u64 {
        self.w(r, at::IN_FLIGHT).load(SeqCst).saturating_add(self.w(r, at::WAITING).load(Relaxed))
    }

    /// The replicas an order names, best first: each 4-bit number below
    /// `n`, once, then any it left out in index order.
    fn ranked(&self, order: u64) -> ([u8; MAX_REPLICAS], usize) {
        let mut out = [0u8; MAX_REPLICAS];
        let mut seen = 0u32;
        let mut k = 0;
        for i in 0..self.n {
            let r = ((order >> (4 * i)) & 0xF) as usize;
            if r < self.n && seen & (1 << r) == 0 {
                seen |= 1 << r;
                out[k] = r as u8;
                k += 1;
            }
        }
        for r in 0..self.n {
            if seen & (1 << r) == 0 {
                out[k] = r as u8;
                k += 1;
            }
        }
        (out, k)
    }

    /// Takes one slot on a replica for a holder of a pool slot: by `rule`
    /// over `order` (module doc). Returns the replica; `release` names it.
    pub fn pick(&self, order: u64, rule: Rule) -> usize {
        self.pick_avoiding(order, rule, 0)
    }

    /// `pick`, passing over the replicas in `avoid` (bit r: replica r) while
    /// any other is in rotation: a request sent again after a try failed
    /// on one (tierq.health) goes to another, with room if one has it, else
    /// over the least loaded one's limit (counted in `over`: the pool's slot
    /// it holds keeps the pool within its limit).
    pub fn pick_avoiding(&self, order: u64, rule: Rule, avoid: u64) -> usize {
        let (all, k) = self.ranked(order);
        let mut kept = [0u8; MAX_REPLICAS];
        let mut m = 0;
        for &r in &all[..k] {
            if avoid & (1 << r) == 0 && self.up(r as usize) {
                kept[m] = r;
                m += 1;
            }
        }
        // Every other replica avoided or out: the order as it is.
        let ranked = if m == 0 { &all[..k] } else { &kept[..m] };
        for _ in 0..PICK_TRIES {
            let Some(r) = self.choose(ranked, rule) else { break };
            let word = self.w(r, at::IN_FLIGHT);
            let cur = word.load(SeqCst);
            if cur < self.limit(r) && word.compare_exchange(cur, cur + 1, SeqCst, SeqCst).is_ok() {
                self.took(r);
                return r;
            }
            crate::sync::spin();
        }
        // None with room: the least loaded in rotation (or of all), over its limit.
        self.words.get()[h::OVER].fetch_add(1, Relaxed);
        let any_up = ranked.iter().any(|&r| self.up(r as usize));
        let r = self.least_loaded(ranked, |r| !any_up || self.up(r)).unwrap_or(ranked[0] as usize);
        self.w(r, at::IN_FLIGHT).fetch_add(1, SeqCst);
        self.took(r);
        r
    }

    /// After a replica's count rose: the grant counted, and this worker's hold.
    fn took(&self, r: usize) {
        self.w(r, at::GRANTS).fetch_add(1, Relaxed);
        if let Some(worker) = self.worker {
            self.held(worker, r).fetch_add(1, SeqCst);
        }
    }

    fn room(&self, r: usize) -> bool {
        self.up(r) && self.w(r, at::IN_FLIGHT).load(SeqCst) < self.limit(r)
    }

    fn choose(&self, ranked: &[u8], rule: Rule) -> Option<usize> {
        match rule {
            Rule::First => ranked.iter().map(|&r| r as usize).find(|&r| self.room(r)),
            Rule::LeastLoaded => self.least_loaded(ranked, |r| self.room(r)),
            Rule::TwoHomes => self
                .least_loaded(&ranked[..ranked.len().min(2)], |r| self.room(r))
                .or_else(|| ranked.iter().map(|&r| r as usize).find(|&r| self.room(r))),
            Rule::Bounded => {
                let (mut load, mut lim) = (0u64, 0u64);
                for r in (0..self.n).filter(|&r| self.up(r)) {
                    load = load.saturating_add(self.load(r));
                    lim += self.limit(r);
                }
                let lim = lim.max(1);
                ranked.iter().map(|&r| r as usize).find(|&r| {
                    // load_r + 1 <= ceil(c * (load + 1) * limit_r / lim)
                    let share = (BOUND_NUM * (load + 1) * self.limit(r)).div_ceil(BOUND_DEN * lim);
                    self.room(r) && self.load(r) < share
                }).or_else(|| self.least_loaded(ranked, |r| self.room(r)))
            }
        }
    }

    /// The replica with the least load per slot of its limit among those
    /// `ok` admits; ties go to the earlier in the order.
    fn least_loaded(&self, ranked: &[u8], ok: impl Fn(usize) -> bool) -> Option<usize> {
        let mut best: Option<(usize, u64, u64)> = None;
        for r in ranked.iter().map(|&r| r as usize).filter(|&r| ok(r)) {
            let (load, lim) = (self.load(r), self.limit(r).max(1));
            match best {
                Some((_, bl, bm)) if (load as u128) * (bm as u128) >= (bl as u128) * (lim as u128) => {}
                _ => best = Some((r, load, lim)),
            }
        }
        best.map(|(r, _, _)| r)
    }

    /// Gives back a slot `pick` took on replica `r` (before the pool's).
    pub fn release(&self, r: usize) -> Result<(), CoreError> {
        self.check(r)?;
        if let Some(worker) = self.worker {
            // The hold first: killed before the count drops, the replica is
            // one short, never one over.
            let held = self.held(worker, r);
            let mut h = held.load(SeqCst);
            while h > 0 {
                match held.compare_exchange_weak(h, h - 1, SeqCst, SeqCst) {
                    Ok(_) => break,
                    Err(seen) => h = seen,
                }
            }
        }
        let word = self.w(r, at::IN_FLIGHT);
        let mut cur = word.load(SeqCst);
        loop {
            if cur == 0 {
                debug_assert!(false, "replica release without a slot");
                return Err(CoreError::InvalidArgument { name: "replica", reason: format!("replica {r} holds no slot") });
            }
            match word.compare_exchange_weak(cur, cur - 1, SeqCst, SeqCst) {
                Ok(_) => return Ok(()),
                Err(seen) => cur = seen,
            }
        }
    }

    fn view(&self, r: usize, pool_waiters: u64) -> PoolView {
        PoolView { in_flight: self.w(r, at::IN_FLIGHT).load(SeqCst), waiters: pool_waiters }
    }

    /// Moves replica `r`'s limit by `rule` (a CAS loop); true if its whole
    /// slots changed (the caller then sets the pool's limit to `capacity`).
    fn move_limit(&self, r: usize, rule: impl Fn(u64) -> u64) -> bool {
        let word = self.w(r, at::LIMIT);
        let mut cur = word.load(SeqCst);
        let next = loop {
            let next = self.mode.clamp_fp(rule(cur));
            if next == cur {
                return false;
            }
            match word.compare_exchange_weak(cur, next, SeqCst, SeqCst) {
                Ok(_) => break next,
                Err(seen) => cur = seen,
            }
        };
        if next < cur {
            self.w(r, at::CUT).store(1, Relaxed);
        }
        next >> FP_SHIFT != cur >> FP_SHIFT
    }

    fn slow_start(&self, r: usize) -> bool {
        self.w(r, at::CUT).load(Relaxed) == 0
    }

    /// One sample of replica `r`'s engine metrics (`limit::engine_step`, as
    /// `Pool::observe_engine` for a pool of one engine); `pool_waiters`: the
    /// pool's waiters (saturation). The engine's waiting count is kept as
    /// load. True if the limit's whole slots changed.
    pub fn observe_engine(&self, r: usize, running: u64, waiting: u64, kv_usage_ppm: Option<u32>, pool_waiters: u64) -> Result<bool, CoreError> {
        self.check(r)?;
        self.w(r, at::WAITING).store(waiting, Relaxed);
        if matches!(self.mode, LimitMode::Fixed(_)) {
            return Ok(false);
        }
        let now = self.clock.now_ns().max(1);
        let stamp = self.w(r, at::ENGINE_AT);
        let last = stamp.load(SeqCst);
        if last != 0 && now.saturating_sub(last) < self.engine_interval_ns / 2 {
            return Ok(false);
        }
        if stamp.compare_exchange(last, now, SeqCst, SeqCst).is_err() {
            return Ok(false);
        }
        let sample = EngineSample { running, waiting, kv_usage_ppm };
        let view = self.view(r, pool_waiters);
        let hold = self.w(r, at::HOLD).load(Relaxed) as u32;
        let cut_at = self.w(r, at::CUT_AT).load(Relaxed);
        let slow = self.slow_start(r);
        let step = limit::engine_step(self.mode, self.w(r, at::LIMIT).load(SeqCst), sample, view, hold, cut_at, slow);
        let changed = self.move_limit(r, |_| step.fp);
        self.w(r, at::HOLD).store(step.hold as u64, Relaxed);
        self.w(r, at::CUT_AT).store(step.cut_at, Relaxed);
        Ok(changed)
    }

    /// One time to first token (ns) of a response from replica `r`
    /// (`limit::gradient_step` once a window closes, as the pool's).
    pub fn observe_latency(&self, r: usize, ns: u64, pool_waiters: u64) -> Result<bool, CoreError> {
        self.check(r)?;
        if matches!(self.mode, LimitMode::Fixed(_)) {
            return Ok(false);
        }
        let ns = ns.max(1);
        let now = self.clock.now_ns().max(1);
        self.w(r, at::WIN_SUM).fetch_add(ns, Relaxed);
        let n = self.w(r, at::WIN_N).fetch_add(1, Relaxed) + 1;
        self.w(r, at::WIN_MIN).fetch_min(ns, Relaxed);
        let start_word = self.w(r, at::WIN_START);
        let start = start_word.load(SeqCst);
        if start == 0 {
            let _ = start_word.compare_exchange(0, now, SeqCst, SeqCst);
            return Ok(false);
        }
        let age = now.saturating_sub(start);
        let due = (n >= limit::WINDOW_SAMPLES && age >= limit::WINDOW_MIN_NS) || age >= limit::WINDOW_MAX_NS;
        if !due || start_word.compare_exchange(start, now, SeqCst, SeqCst).is_err() {
            return Ok(false);
        }
        let sum = self.w(r, at::WIN_SUM).swap(0, Relaxed);
        let n = self.w(r, at::WIN_N).swap(0, Relaxed);
        let window_min = self.w(r, at::WIN_MIN).swap(u64::MAX, Relaxed);
        if n == 0 || window_min == u64::MAX {
            return Ok(false);
        }
        let recent = (sum / n).max(1);
        let floor = limit::next_floor(self.w(r, at::FLOOR).load(Relaxed), window_min);
        self.w(r, at::FLOOR).store(floor, Relaxed);
        self.w(r, at::RECENT).store(recent, Relaxed);
        let view = self.view(r, pool_waiters);
        let slow = self.slow_start(r);
        Ok(self.move_limit(r, |fp| limit::gradient_step(self.mode, fp, floor, recent, view, slow)))
    }

    /// Replica `r` answered overloaded: `limit::backoff_step`, once per
    /// back-off window (as the pool's).
    pub fn observe_overload(&self, r: usize) -> Result<bool, CoreError> {
        self.check(r)?;
        if matches!(self.mode, LimitMode::Fixed(_)) {
            return Ok(false);
        }
        let now = self.clock.now_ns().max(1);
        let window = limit::BACKOFF_MIN_NS.max(self.w(r, at::FLOOR).load(Relaxed));
        let stamp = self.w(r, at::BACKOFF_AT);
        let last = stamp.load(SeqCst);
        if last != 0 && now.saturating_sub(last) < window {
            return Ok(false);
        }
        if stamp.compare_exchange(last, now, SeqCst, SeqCst).is_err() {
            return Ok(false);
        }
        Ok(self.move_limit(r, |fp| limit::backoff_step(self.mode, fp)))
    }

    pub fn stats(&self) -> Vec<ReplicaStats> {
        (0..self.n).map(|r| ReplicaStats {
            in_flight: self.w(r, at::IN_FLIGHT).load(SeqCst),
            limit: self.limit(r),
            learned: self.learned(r),
            waiting: self.w(r, at::WAITING).load(Relaxed),
            down: !self.up(r),
            grants: self.w(r, at::GRANTS).load(Relaxed),
        }).collect()
    }

    /// The pool's slots withheld for the replicas' sum as last claimed
    /// (`claim_withheld`).
    pub fn withheld(&self) -> u64 {
        self.words.get()[h::WITHHELD].load(SeqCst)
    }

    /// Moves the claim on the pool's withheld slots from `from` to `to` if it
    /// is still `from`; true if it did. The caller withholds before claiming
    /// more and claims less before restoring (tierq.admission.ReplicaPool),
    /// so the pool's withheld slots are never fewer than the claim: workers
    /// racing on one change each see it claimed once, and a worker killed in
    /// between leaves the pool a slot short, never one over.
    pub fn claim_withheld(&self, from: u64, to: u64) -> bool {
        self.words.get()[h::WITHHELD].compare_exchange(from, to, SeqCst, SeqCst).is_ok()
    }

    /// Picks that found no replica with room (module doc).
    pub fn over(&self) -> u64 {
        self.words.get()[h::OVER].load(Relaxed)
    }
}

/// An order of replica numbers, best first, as one word (4 bits each).
pub fn order_word(order: &[u8]) -> u64 {
    order.iter().take(MAX_REPLICAS).enumerate().fold(0, |w, (i, &r)| w | ((r as u64 & 0xF) << (4 * i)))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn fixed(n: usize, slots: u32) -> Replicas {
        Replicas::new(n, LimitMode::Fixed(slots), 100_000_000, Clock::Manual(std::sync::Arc::new(ManualClock::new(1)))).unwrap()
    }

    #[test]
    fn an_order_word_reads_back_best_first_and_fills_in_what_it_left_out() {
        let r = fixed(4, 2);
        let (ranked, k) = r.ranked(order_word(&[2, 0, 2, 9]));
        assert_eq!(&ranked[..k], &[2, 0, 1, 3]);
    }

    #[test]
    fn the_first_replica_in_the_order_is_taken_while_it_is_within_the_bound() {
        let r = fixed(4, 4);
        let order = order_word(&[2, 1, 0, 3]);
        assert_eq!(r.pick(order, Rule::Bounded), 2);
        r.release(2).unwrap();
        // Sequential requests of one prefix stay home.
        for _ in 0..10 {
            assert_eq!(r.pick(order, Rule::Bounded), 2);
            r.release(2).unwrap();
        }
    }

    #[test]
    fn a_hot_prefix_spills_past_its_home_at_the_load_bound() {
        let r = fixed(4, 4);
        let order = order_word(&[2, 1, 0, 3]);
        // 16 slots: with one held, home (1 held) is at ceil(1.25 * 2 * 4 / 16) = 1.
        assert_eq!(r.pick(order, Rule::Bounded), 2);
        assert_eq!(r.pick(order, Rule::Bounded), 1);
        let mut on = [0u64; 4];
        for _ in 0..14 {
            on[r.pick(order, Rule::Bounded)] += 1;
        }
        let s = r.stats();
        // Every slot taken, none above its limit, none over.
        assert!(s.iter().all(|x| x.in_flight == 4), "{s:?}");
        assert_eq!(r.over(), 0);
    }

    #[test]
    fn the_bound_lets_home_take_more_as_the_pool_fills() {
        let r = fixed(4, 4);
        // 8 held, two on each replica.
        for i in 0..8u8 {
            r.pick(order_word(&[i % 4]), Rule::First);
        }
        // Home (0) may hold ceil(1.25 * 9 * 4 / 16) = 3, then ceil(1.25 * 10 * 4 / 16) = 4.
        let order = order_word(&[0, 1, 2, 3]);
        assert_eq!(r.pick(order, Rule::Bounded), 0);
        assert_eq!(r.pick(order, Rule::Bounded), 0);
        // Full at its limit: the next in the order within the bound.
        assert_eq!(r.pick(order, Rule::Bounded), 1);
    }

    #[test]
    fn least_loaded_counts_the_engines_own_queue() {
        let r = fixed(3, 4);
        r.observe_engine(0, 1, 3, None, 0).unwrap();
        r.observe_engine(1, 1, 1, None, 0).unwrap();
        r.observe_engine(2, 1, 2, None, 0).unwrap();
        assert_eq!(r.pick(order_word(&[0, 1, 2]), Rule::LeastLoaded), 1);
        // 1 is at 2 now (1 held + 1 waiting); 2 at 2 too: the order's earlier.
        assert_eq!(r.pick(order_word(&[2, 1, 0]), Rule::LeastLoaded), 2);
    }

    #[test]
    fn two_homes_take_the_less_loaded_of_the_first_two_then_the_order() {
        let r = fixed(4, 2);
        let order = order_word(&[2, 1, 0, 3]);
        // Both idle: the first; then the other (less loaded); then either.
        assert_eq!(r.pick(order, Rule::TwoHomes), 2);
        assert_eq!(r.pick(order, Rule::TwoHomes), 1);
        assert_eq!(r.pick(order, Rule::TwoHomes), 2);
        assert_eq!(r.pick(order, Rule::TwoHomes), 1);
        // Both homes full: the next in the order with room, never the least
        // loaded of the rest (3 is idle, 0 too: 0 comes first).
        assert_eq!(r.pick(order, Rule::TwoHomes), 0);
        assert_eq!(r.pick(order, Rule::TwoHomes), 0);
        assert_eq!(r.pick(order, Rule::TwoHomes), 3);
        assert_eq!(r.over(), 0);
        assert!(Rule::from_u8(4).is_err());
    }

    #[test]
    fn first_skips_a_full_replica_and_a_down_one() {
        let r = fixed(3, 1);
        r.set_down(1, true).unwrap();
        assert_eq!(r.capacity(), 2);
        assert_eq!(r.pick(order_word(&[0, 1, 2]), Rule::First), 0);
        assert_eq!(r.pick(order_word(&[0, 1, 2]), Rule::First), 2);
    }

    #[test]
    fn with_no_replica_with_room_the_least_loaded_goes_over_and_is_counted() {
        let r = fixed(2, 1);
        r.pick(0, Rule::First);
        r.pick(0, Rule::First);
        let third = r.pick(order_word(&[1, 0]), Rule::Bounded);
        assert_eq!(third, 1);
        assert_eq!(r.over(), 1);
        assert_eq!(r.stats()[1].in_flight, 2);
    }

    #[test]
    fn each_replica_learns_its_own_limit_from_its_engine() {
        let clock = std::sync::Arc::new(ManualClock::new(1));
        let mode = LimitMode::Adaptive { min: 2, max: 64, initial: 4 };
        let r = Replicas::new(2, mode, 100_000_000, Clock::Manual(clock.clone())).unwrap();
        assert_eq!(r.capacity(), 8);
        // Replica 0 saturated with an empty engine queue: slow start grows it.
        for _ in 0..4 {
            r.pick(order_word(&[0]), Rule::First);
        }
        assert!(r.observe_engine(0, 4, 0, Some(100_000), 5).unwrap());
        assert_eq!(r.limit(0), 6);
        clock.advance_ns(100_000_000);
        // Replica 1's engine queues what it was sent: cut to what it runs.
        r.pick(order_word(&[1]), Rule::First);
        r.pick(order_word(&[1]), Rule::First);
        r.pick(order_word(&[1]), Rule::First);
        assert!(r.observe_engine(1, 2, 1, None, 5).unwrap());
        assert_eq!(r.limit(1), 2);
        assert_eq!(r.capacity(), 8);
        assert_eq!(r.limit(0), 6);
    }

    #[test]
    fn workers_on_one_region_share_the_counts_and_a_dead_ones_holds_come_back() {
        let name = format!("/tierq-test-replicas-{}", std::process::id());
        let _ = Replicas::unlink_shared(&name);
        let mode = LimitMode::Fixed(2);
        let sup = Replicas::create_shared(&name, 2, 2, mode, 1, Clock::Monotonic).unwrap();
        let w0 = Replicas::attach_shared(&name, 2, Some(0), mode, 1, Clock::Monotonic).unwrap();
        let w1 = Replicas::attach_shared(&name, 2, Some(1), mode, 1, Clock::Monotonic).unwrap();
        assert!(Replicas::attach_shared(&name, 3, Some(0), mode, 1, Clock::Monotonic).is_err());
        assert!(Replicas::attach_shared(&name, 2, Some(0), LimitMode::Fixed(3), 1, Clock::Monotonic).is_err());
        // Replica 0 full through both workers' picks: the next goes to 1.
        assert_eq!(w0.pick(order_word(&[0, 1]), Rule::First), 0);
        assert_eq!(w1.pick(order_word(&[0, 1]), Rule::First), 0);
        assert_eq!(w0.pick(order_word(&[0, 1]), Rule::First), 1);
        assert_eq!(sup.held_by(0), vec![1, 1]);
        assert_eq!(sup.held_by(1), vec![1, 0]);
        // Worker 0 dies holding two: the supervisor gives them back.
        assert_eq!(sup.reclaim_worker(0).unwrap(), 2);
        let s = sup.stats();
        assert_eq!((s[0].in_flight, s[1].in_flight), (1, 0));
        w1.release(0).unwrap();
        assert_eq!(sup.stats()[0].in_flight, 0);
        Replicas::unlink_shared(&name).unwrap();
    }

    #[test]
    fn a_slow_start_cap_bounds_the_replica_and_the_pools_capacity() {
        let r = fixed(2, 4);
        r.set_health(1, false, 1).unwrap();
        assert_eq!(r.limit(1), 1);
        assert_eq!(r.capacity(), 5);
        assert_eq!(r.pick(order_word(&[1, 0]), Rule::First), 1);
        // Its one slot taken: the next goes to the other replica.
        assert_eq!(r.pick(order_word(&[1, 0]), Rule::First), 0);
        r.set_health(1, false, 3).unwrap();
        assert_eq!(r.capacity(), 7);
        // A cap above the learned limit is the learned limit; 0 lifts it.
        r.set_health(1, false, 9).unwrap();
        assert_eq!(r.limit(1), 4);
        r.set_health(1, false, 2).unwrap();
        assert_eq!((r.stats()[1].limit, r.stats()[1].learned), (2, 4));
        r.set_health(1, false, 0).unwrap();
        assert_eq!(r.stats()[1].limit, 4);
        r.set_health(1, true, 2).unwrap();
        assert!(r.stats()[1].down);
        assert_eq!(r.capacity(), 4);
    }

    #[test]
    fn a_retry_avoids_the_replica_that_failed_while_another_is_in_rotation() {
        let r = fixed(3, 2);
        // Least loaded would take replica 0 again (all idle, first in order).
        assert_eq!(r.pick_avoiding(order_word(&[0, 1, 2]), Rule::LeastLoaded, 0b001), 1);
        assert_eq!(r.pick_avoiding(order_word(&[0, 1, 2]), Rule::First, 0b011), 2);
        // The others full: over the least loaded one's limit, not back to 0.
        r.pick(order_word(&[2]), Rule::First);
        r.pick(order_word(&[1]), Rule::First);
        assert_eq!(r.pick_avoiding(order_word(&[0, 1, 2]), Rule::Bounded, 0b001), 1);
        assert_eq!(r.over(), 1);
        // Every other one out of rotation: the avoided replica is what is left.
        r.set_down(1, true).unwrap();
        r.set_down(2, true).unwrap();
        assert_eq!(r.pick_avoiding(order_word(&[0, 1, 2]), Rule::First, 0b001), 0);
    }

    #[test]
    fn the_health_word_reads_back_as_a_model_of_it_says_seeded() {
        // 500 random health changes over 4 replicas (limit 6): each one's
        // limit in force, down flag and the pool's capacity agree with a
        // plain model (out; in at its whole limit; in at most cap).
        let r = fixed(4, 6);
        let mut model = [(false, 0u64); 4];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..500 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = (seed % 4) as usize;
            let (down, cap) = ((seed >> 8) % 3 == 0, (seed >> 16) % 9);
            if (seed >> 24) % 4 == 0 {
                r.set_down(i, down).unwrap();
                model[i] = (down, 0);
            } else {
                r.set_health(i, down, cap).unwrap();
                model[i] = (down, cap);
            }
            let s = r.stats();
            let mut sum = 0;
            for (k, &(down, cap)) in model.iter().enumerate() {
                let want = if down || cap == 0 { 6 } else { cap.min(6) };
                assert_eq!(s[k].down, down, "replica {k}");
                assert_eq!((s[k].limit, s[k].learned), (want, 6), "replica {k} {model:?}");
                sum += if down { 0 } else { want };
            }
            assert_eq!(r.capacity(), sum.max(1), "{model:?}");
            // A pick never lands on a replica out of rotation while one is in.
            if sum > 0 {
                let got = r.pick(order_word(&[i as u8, 0, 1, 2, 3]), Rule::First);
                assert!(!model[got].0, "picked {got} out of rotation: {model:?}");
                r.release(got).unwrap();
            }
        }
    }

    #[test]
    fn a_release_without_a_slot_is_refused() {
        let r = fixed(2, 1);
        assert!(r.release(5).is_err());
        assert!(Replicas::new(17, LimitMode::Fixed(1), 1, Clock::Manual(std::sync::Arc::new(ManualClock::new(1)))).is_err());
    }

    #[test]
    fn the_withheld_claim_moves_only_from_what_it_is() {
        let r = fixed(2, 2);
        assert_eq!(r.withheld(), 0);
        assert!(r.claim_withheld(0, 2));
        // A second worker that read 0 too loses: it sees 2 claimed already.
        assert!(!r.claim_withheld(0, 2));
        assert_eq!(r.withheld(), 2);
        assert!(r.claim_withheld(2, 0));
        assert_eq!(r.withheld(), 0);
        // Beside the header's other words: the bounds still read back.
        assert_eq!(r.words.get()[h::MIN].load(SeqCst), 2);
    }
}
