//! A pool's block: the fixed run of 64-bit atomic words that holds all of
//! its mutable state, and its layout. A header of counters, each hot one on
//! its own cache line, then the three rings, then the three lanes' fair state
//! (`fair.rs`), then (shared pools only) one line and one mailbox per worker. No pointers live in it: it is either on the
//! heap (one process) or in a named shared-memory region mapped by every
//! worker process of a host, which `create`/`attach` check by magic, layout
//! version, size and the settings it was made for. What the words mean to
//! admission is `admission.rs`'s business.

use crate::bucket::BucketParams;
use crate::fair;
#[cfg(not(loom))]
use crate::error::CoreError;
use crate::settings::{Fairness, PoolSettings};
use crate::sync::{AtomicU64, Ordering::SeqCst};
use crate::words::Words;

// The layout, in words. Each hot field starts its own 64-byte line.
pub(crate) const LINE: usize = 8;
// Version 4: the limit lives in the block (lines 12-14), settings take two
// lines (10-11) and name the limit's mode; a version-3 process would read
// its limit from its own settings and overrun a lowered one.
// Version 5: a worker's line has its SEQ word; a version-4 worker would not
// mark its steps and a reclaim's audit would take one in progress for a leak.
// Version 6: each ring cell has a fairness tag and an own deadline beside
// it, and each lane its fair state after the rings; a version-5 process
// would read the workers' lines where the fair state now is.
// Version 7: a third lane (flex). DEPTH holds three 21-bit counts where it
// held two 32-bit ones, the flex ring's head and tail take lines 15-16 (the
// rings start at line 17), a third fair state follows the rings, and the
// settings name flex's max wait and headroom; a version-6 process would read
// a flex waiter's count as part of the default lane's and the rings a line early.
// Version 8: each flow queue has a fifth word, its owner (`fair::OWNER`); a
// version-7 process would read queue q's words 4q.. where they are now 5q..
// Version 9: each lane's fair state has a third word before its bitmap,
// the last newcomer's lift (`fair::LIFTED`); a version-8 process would read
// it as the bitmap's first word and every queue's words one word early.
// Version 10: each ring cell has its waiter's home replica beside it (a
// sixth array) and each lane a SKIPS word after its head; a version-9
// process would read the next lane's cells where this lane's homes now are.
// Version 11: a cell's home word is a mask of its waiter's home replicas
// (bit r: replica r; a hot prefix has two), not one replica plus one; a
// version-10 process would read a waiter at home on replica 0 as at home on
// none and one at home on 2 as at home on 1.
pub(crate) const MAGIC: u64 = 0x7469_6572_715f_000b; // "tierq_" + layout version 11
/// Worker indices fit the low byte of an owner word (0 = no worker).
pub const MAX_WORKERS: usize = 255;
pub(crate) mod at {
    use super::LINE;
    // Line 0: immutable header, checked when a process attaches. MAGIC is
    // written last by the creator, so a reader that sees it sees the rest.
    pub const MAGIC: usize = 0;
    pub const WORDS: usize = 1;
    pub const WORKERS: usize = 2;
    pub const MAILBOX_CAP: usize = 3;
    pub const RING_CAP: usize = 4;
    /// Slots in use. A grant (a CAS from n to n + 1, or a release handing
    /// its slot on at n) happens only while n is below (at or below, for a
    /// hand-off) the limit read just before: never above the limit in
    /// force, and never above a fixed limit. A lowered limit preempts
    /// nothing, so the count may stay above it until releases drain it.
    pub const IN_FLIGHT: usize = LINE;
    /// Live waiters: priority in bits 0-20, default in 21-41, flex in
    /// 42-62 (`DEPTH_BITS` each); their sum never exceeds queue_depth, which
    /// is below 2^21, so no count carries into the next.
    pub const DEPTH: usize = 2 * LINE;
    /// Bucket TAT (ns); see bucket.rs.
    pub const TAT: usize = 3 * LINE;
    pub const HEAD: [usize; 3] = [4 * LINE, 6 * LINE, 15 * LINE];
    pub const TAIL: [usize; 3] = [5 * LINE, 7 * LINE, 16 * LINE];
    // Line 8: counters only read by stats (monotonic, Relaxed).
    pub const ADMITTED: [usize; 3] = [8 * LINE, 8 * LINE + 1, 9 * LINE + 6];
    pub const SHED: [usize; 3] = [8 * LINE + 2, 8 * LINE + 3, 8 * LINE + 4];
    pub const CANCELLED: usize = 8 * LINE + 5;
    /// Fixed-point (1e6 = one dispatch) share owed to the default lane.
    pub const SHARE_CREDIT: usize = 8 * LINE + 6;
    /// Requests refused at join because their predicted wait exceeded their
    /// own deadline (also counted in SHED's queue_timeout).
    pub const DEADLINE_REFUSED: usize = 8 * LINE + 7;
    // Line 9: drain-rate estimate for honest Retry-After.
    pub const LAST_RELEASE: usize = 9 * LINE;
    /// EWMA of the time between slot releases while waiters queued (ns).
    pub const RELEASE_INTERVAL: usize = 9 * LINE + 1;
    /// Handoffs since the clock was last read for the estimate (a hint:
    /// racing releases may lose a count).
    pub const UNSAMPLED: usize = 9 * LINE + 2;
    /// Slots taken for nobody by `withhold` and not yet `restore`d: counted
    /// in IN_FLIGHT, so the slots requests may use are the limit minus
    /// these. A block made before this word had it 0, as a new block does.
    pub const WITHHELD: usize = 9 * LINE + 3;
    /// Slots `withhold` asked for that were busy: each release takes one
    /// of these (into WITHHELD) before passing its slot on.
    pub const OWED: usize = 9 * LINE + 4;
    /// Bucket refusals not applied (`enforce = false`, shadow mode): each
    /// is a `rate_limit_exceeded` shed enforcing would have made. A block
    /// made before this word had it 0, as a new block does.
    pub const SHADOW_RATE: usize = 9 * LINE + 5;
    /// Lines 10-11: the settings the block was made for (attach compares them).
    pub const SETTINGS: usize = 10 * LINE;
    pub const SETTINGS_WORDS: usize = 14;
    // Line 12: the limit. Read by every admission, written only when it moves.
    /// The limit in 1/1024ths of a slot (`limit::FP_SHIFT`); always within
    /// the mode's [min, max], and exactly n << 10 for Fixed(n) (then never
    /// written after init). Moved only by CAS around a `limit` rule.
    pub const LIMIT: usize = 12 * LINE;
    /// `limit::Signal` that last changed the whole-slot limit (Relaxed, a hint).
    pub const SIGNAL: usize = 12 * LINE + 1;
    /// Times the whole-slot limit changed (monotonic, Relaxed).
    pub const CHANGES: usize = 12 * LINE + 2;
    /// Clock ns of the last back-off applied (0: never); a back-off wins
    /// its window by CAS on it, so one overload counts once.
    pub const BACKOFF_AT: usize = 12 * LINE + 3;
    /// 1 during slow start (`limit::SLOW_START_NUM`): no signal has lowered
    /// the limit yet; set at init for an adaptive limit, cleared (never set
    /// again) by the first decrease.
    pub const SLOW_START: usize = 12 * LINE + 4;
    // Line 13: the engine signal.
    /// Clock ns of the last engine sample applied (0: never). A sample
    /// applies only by CAS from a stamp at least half the engine interval
    /// old, so workers scraping the same engine act as one.
    pub const ENGINE_AT: usize = 13 * LINE;
    /// Engine samples left to hold after a cut. Written only by the sample
    /// that won ENGINE_AT (plain store).
    pub const HOLD: usize = 13 * LINE + 1;
    /// The limit the last engine cut set (0: never cut); same writer as HOLD.
    pub const CUT_AT: usize = 13 * LINE + 2;
    /// Per lane: the deadline refusal's margin, a high quantile of the
    /// wait prediction's recent relative error (`Pool::wait_observed`), in
    /// 1/1024ths of the prediction; racy load/store (an estimate). Set to
    /// its start at init; a block made before these words had them 0.
    pub const MARGIN: [usize; 3] = [13 * LINE + 3, 13 * LINE + 4, 13 * LINE + 5];
    // Line 14: the latency estimate (racy load/store: an estimate; samples
    // that race a window's close may land in the next one or be lost).
    /// Latency floor (ns, 0: none yet): the lowest window minimum, drifting
    /// up slowly (`limit::next_floor`).
    pub const FLOOR: usize = 14 * LINE;
    /// Mean latency of the last closed window (ns).
    pub const RECENT: usize = 14 * LINE + 1;
    /// The open window: sum and count of samples (fetch_add), its minimum
    /// (fetch_min; u64::MAX when empty) and its start (clock ns, 0 before
    /// the first sample). Closing is a CAS on the start.
    pub const WIN_SUM: usize = 14 * LINE + 2;
    pub const WIN_N: usize = 14 * LINE + 3;
    pub const WIN_MIN: usize = 14 * LINE + 4;
    pub const WIN_START: usize = 14 * LINE + 5;
    // Lines 15-16: the flex ring's head and tail (HEAD[2], TAIL[2]).
    /// Per lane: cells, enqueued_ns, owners, tags, dues, homes (`ring_cap` words
    /// each); then per lane its fair state (`fair::lane_words`); then the
    /// workers' lines and mailboxes.
    pub const RINGS: usize = 17 * LINE;
    pub const RING_ARRAYS: usize = 6;
    /// Per lane, the word after its head (HEAD[l] + 1): grants in a row
    /// that passed over the lane's front waiter for one at the freed
    /// replica's home (`Pool::release_from`); at `HOME_SKIPS` the front goes
    /// next. A hint (racing grants may each add one).
    pub const SKIPS: [usize; 3] = [4 * LINE + 1, 6 * LINE + 1, 15 * LINE + 1];
}
/// Offsets within a worker's line (shared pools).
pub(crate) mod wk {
    /// `generation << 32 | slots held`: slots granted to this worker's
    /// requests and not yet released. Only a reclaim changes the generation.
    pub const HELD: usize = 0;
    /// Mailbox: "owner signalled" flag and producers' probe cursor.
    pub const SIGNALLED: usize = 1;
    pub const CURSOR: usize = 2;
    /// Odd while this worker is inside a call that moves slots (IN_FLIGHT,
    /// WITHHELD, a HELD word); +1 on entry and +1 on leaving, by this worker
    /// only (one thread at a time per index: the GIL). A reclaim makes a
    /// dead worker's odd value even; it never goes back. Read by `audit`.
    pub const SEQ: usize = 3;
}
/// Bits per lane's count in the DEPTH word.
pub(crate) const DEPTH_BITS: u32 = 21;
/// The lanes in the block: rings, fair states, DEPTH counts.
pub(crate) const LANES: usize = crate::Lane::ALL.len();

/// The slot count in a worker's HELD word (the generation is above it).
pub(crate) const HELD_COUNT: u64 = 0xffff_ffff;

/// First word of lane `lane`'s ring (cells, enqueued_ns, owners, tags,
/// dues, homes: `ring_cap` words each).
#[inline]
pub(crate) fn ring_base(ring_cap: usize, lane: usize) -> usize {
    at::RINGS + lane * at::RING_ARRAYS * ring_cap
}

/// First word of lane `lane`'s fair state (`fair::lane_words` words).
pub(crate) fn fair_base(s: &PoolSettings, lane: usize) -> usize {
    ring_base(s.ring_cap(), LANES) + lane * fair::lane_words(s.fair_queues)
}

/// First word of worker `worker`'s line (fields: `wk`).
pub(crate) fn worker_line(s: &PoolSettings, worker: usize) -> usize {
    fair_base(s, LANES) + worker * LINE
}

/// First word of worker `worker`'s mailbox (`mailbox_cap` words), the
/// workers' lines starting at `lines`.
#[inline]
pub(crate) fn mailbox_base(lines: usize, workers: usize, mailbox_cap: usize, worker: usize) -> usize {
    lines + workers * LINE + worker * mailbox_cap
}

/// A block's size for `s` and `workers` processes (0: heap, one process),
/// and its mailboxes' size.
fn layout(s: &PoolSettings, workers: usize) -> (usize, usize) {
    let mailbox_cap = if workers == 0 {
        0
    } else {
        // Room for every waiter a worker can own plus every grant in flight.
        ((s.queue_depth as usize + s.limit.max() as usize) * 2).next_power_of_two().max(64)
    };
    let words = worker_line(s, 0) + workers * (LINE + mailbox_cap);
    (words, mailbox_cap)
}

/// What a block is made for beyond its sizes: the settings every worker must
/// share (queue depth, max waits, the bucket, the minimum share, fairness).
/// The limit's mode and bounds, the priority headroom and the engine interval
/// are each worker's own and a reload may change them (`Pool::retuned`), so
/// they are not part of it: a worker started after a reload still attaches.
/// The first four words stay (zero) so the header keeps its places.
pub(crate) fn fingerprint(s: &PoolSettings) -> [u64; at::SETTINGS_WORDS] {
    let b = s.bucket.unwrap_or(BucketParams { interval_ns: 0, tau_ns: 0, reserve_ns: 0 });
    [
        // Bit 1: shadow mode (0 when enforcing, so a block made before
        // the flag reads as enforcing).
        (!s.enforce as u64) << 1,
        0,
        0,
        0,
        s.queue_depth as u64,
        s.max_wait_ns[0],
        s.max_wait_ns[1],
        s.max_wait_ns[2],
        b.interval_ns,
        b.tau_ns,
        b.reserve_ns,
        s.default_min_share.to_bits(),
        (s.fairness == Fairness::Tokens) as u64 | (s.fair_queues as u64) << 1,
        s.flex_headroom.to_bits(),
    ]
}

/// The pool's fixed block of atomic words (a clone maps the same words).
#[derive(Clone)]
pub struct State {
    words: Words,
}

impl State {
    pub fn words_for(s: &PoolSettings) -> usize {
        layout(s, 0).0
    }

    /// A zeroed block for one process.
    pub(crate) fn heap(s: &PoolSettings) -> Self {
        State { words: Words::heap(Self::words_for(s)) }
    }

    /// Creates the zeroed shared block `name` for `workers` processes;
    /// returns it and its mailboxes' size.
    #[cfg(not(loom))]
    pub(crate) fn create(name: &str, s: &PoolSettings, workers: usize) -> Result<(Self, usize), CoreError> {
        let (words, mailbox_cap) = layout(s, workers);
        let region = crate::shm::Region::create(name, words)?;
        Ok((State { words: Words::shm(region) }, mailbox_cap))
    }

    /// Maps the shared block `name` after checking magic, version, size and
    /// the settings it was made for; returns it, its worker count and its
    /// mailboxes' size.
    #[cfg(not(loom))]
    pub(crate) fn attach(name: &str, s: &PoolSettings) -> Result<(Self, usize, usize), CoreError> {
        let region = crate::shm::Region::attach(name)?;
        let w = region.words();
        let bad = |what: String| Err(CoreError::Layout(format!("{name}: {what}")));
        let magic = w[at::MAGIC].load(SeqCst);
        if w.len() < at::RINGS || magic != MAGIC {
            return bad(format!("magic/version {magic:#x}, expected {MAGIC:#x}"));
        }
        let workers = w[at::WORKERS].load(SeqCst) as usize;
        let (words, mailbox_cap) = layout(s, workers);
        if w[at::WORDS].load(SeqCst) as usize != w.len() || w.len() != words {
            return bad(format!("{} words, expected {words} for these settings", w.len()));
        }
        if w[at::MAILBOX_CAP].load(SeqCst) as usize != mailbox_cap || w[at::RING_CAP].load(SeqCst) as usize != s.ring_cap() {
            return bad("ring or mailbox size differs".into());
        }
        let seen: Vec<u64> = (0..at::SETTINGS_WORDS).map(|i| w[at::SETTINGS + i].load(SeqCst)).collect();
        if seen != fingerprint(s) {
            return bad("created with different admission settings".into());
        }
        Ok((State { words: Words::shm(region) }, workers, mailbox_cap))
    }

    /// Removes a shared block's name (mappings stay valid until dropped).
    #[cfg(not(loom))]
    pub(crate) fn unlink(name: &str) -> Result<(), CoreError> {
        crate::shm::Region::unlink(name)
    }

    /// Whether settings `next` fit the block made for `s` and `workers`: the
    /// same words in the same places (queue depth, flow queues, mailboxes).
    #[cfg(not(loom))]
    pub(crate) fn fits(s: &PoolSettings, next: &PoolSettings, workers: usize) -> bool {
        s.queue_depth == next.queue_depth && s.fair_queues == next.fair_queues && layout(s, workers) == layout(next, workers)
    }

    /// Writes the header of a block whose other words are filled: what
    /// `attach` checks, and MAGIC last, so a reader that sees it sees the rest.
    pub(crate) fn seal(&self, s: &PoolSettings, workers: usize, mailbox_cap: usize) {
        let w = self.words();
        for (i, v) in fingerprint(s).into_iter().enumerate() {
            w[at::SETTINGS + i].store(v, SeqCst);
        }
        w[at::WORKERS].store(workers as u64, SeqCst);
        w[at::MAILBOX_CAP].store(mailbox_cap as u64, SeqCst);
        w[at::RING_CAP].store(s.ring_cap() as u64, SeqCst);
        w[at::WORDS].store(w.len() as u64, SeqCst);
        w[at::MAGIC].store(MAGIC, SeqCst);
    }

    #[inline]
    pub(crate) fn words(&self) -> &[AtomicU64] {
        self.words.get()
    }
}
