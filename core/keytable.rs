//! Per-key rate buckets shared by every worker of a host: a fixed-size table
//! of GCRA TAT words (the same `bucket::decide` rule and CAS loop as a
//! `TokenBucket`), in a shared-memory region made before fork, so a key
//! limited to 60 requests a minute gets 60 in total, not 60 per worker.
//!
//! Open addressing by a hash of the key's public id; an entry's `tag` word is
//! claimed with one CAS from 0 and never released, so a key keeps its entry
//! (and its buckets) for the region's life. A full table is an answer
//! (`None`), not an error: the caller decides (tierq falls back to a
//! per-process bucket and says so in the log).
//!
//! Each entry also holds a key's downgrade counters (tierq.downgrades): its
//! priority spend of the UTC day (nano-USD) and its priority tokens of the
//! current and the previous ramp step. A counter is one word, its period's tag
//! in the high bits and the count below, so moving to a new period and
//! counting in it is one CAS: nothing is counted in the wrong day or step.

use crate::bucket::{adjust_on, available_on, take_on, BucketParams};
use crate::clock::Clock;
use crate::error::CoreError;
use crate::sync::{AtomicU64, Ordering};
use crate::words::Words;
use crate::Lane;

const MAGIC: u64 = 0x7469_6572_714b_4559; // "tierqKEY"
const VERSION: u64 = 2;
/// Header: magic, version, capacity, entries claimed, then reserved words.
const HEADER: usize = 8;
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_CAPACITY: usize = 2;
const H_USED: usize = 3;
/// Per entry: tag, one TAT per bucket kind, a spare word, the budget counter,
/// two ramp counters (the steps of even and odd number) and a spare word
/// (64 bytes, one cache line).
const ENTRY: usize = 8;
const E_BUDGET: usize = 4;
const E_RAMP: usize = 5;
/// Bucket kinds per key: requests per minute, tokens per minute.
pub const RPM: usize = 0;
pub const TPM: usize = 1;
/// Counter kinds per key: the priority budget's spend of a day, the
/// priority tokens of a ramp step.
pub const BUDGET: usize = 0;
pub const RAMP: usize = 1;
/// Bits of a counter word that tag its period (the rest is the count), per
/// kind: a day in 16 bits (179 years before a tag repeats) and a count up to
/// 2^48 nano-USD (281,474 USD); a minute step in 24 bits (31 years) and up to
/// 2^40 tokens (over the 10^12 a key's limits allow).
const TAG_BITS: [u32; 2] = [16, 24];
/// Largest table, in keys (64 MiB of words).
pub const MAX_CAPACITY: usize = 1 << 20;

/// The tag of a key id: never 0 (0 marks a free entry). Public ids
/// (`[a-z0-9]{1,12}`) map injectively (bijective base 37 fits in 63 bits),
/// so two keys never share buckets; any other string gets a 64-bit FNV-1a
/// hash with the top bit set (a collision between two such ids, 2^-63 per
/// pair, would make them share buckets).
pub fn key_tag(id: &str) -> u64 {
    let b = id.as_bytes();
    if (1..=12).contains(&b.len()) && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return b.iter().fold(0u64, |t, &c| {
            let d = if c.is_ascii_digit() { c - b'0' + 1 } else { c - b'a' + 11 };
            t * 37 + d as u64
        });
    }
    let h = b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &c| (h ^ c as u64).wrapping_mul(0x0100_0000_01b3));
    h | 1 << 63
}

/// splitmix64's finalizer: spreads consecutive tags over the table.
#[inline]
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The table: `capacity` entries (a power of two) after the header.
pub struct KeyTable {
    words: Words,
    capacity: usize,
    clock: Clock,
}

fn capacity_for(keys: usize) -> Result<usize, CoreError> {
    if !(1..=MAX_CAPACITY).contains(&keys) {
        return Err(CoreError::arg("capacity", format!("must be 1 to {MAX_CAPACITY} keys, got {keys}")));
    }
    Ok(keys.next_power_of_two())
}

impl KeyTable {
    /// A table in this process's heap (one process; tests and loom).
    pub fn new(keys: usize, clock: Clock) -> Result<KeyTable, CoreError> {
        let capacity = capacity_for(keys)?;
        let t = KeyTable { words: Words::heap(HEADER + capacity * ENTRY), capacity, clock };
        t.init();
        Ok(t)
    }

    fn init(&self) {
        let w = self.words();
        w[H_VERSION].store(VERSION, Ordering::Relaxed);
        w[H_CAPACITY].store(self.capacity as u64, Ordering::Relaxed);
        // Magic last: an attach that sees it sees the rest.
        w[H_MAGIC].store(MAGIC, Ordering::Release);
    }

    /// Creates the shared region `name` (which must not exist) for `keys` keys
    /// (rounded up to a power of two).
    #[cfg(not(loom))]
    pub fn create_shared(name: &str, keys: usize, clock: Clock) -> Result<KeyTable, CoreError> {
        let capacity = capacity_for(keys)?;
        let region = crate::shm::Region::create(name, HEADER + capacity * ENTRY)?;
        let t = Self::from_region(region, capacity, clock);
        t.init();
        Ok(t)
    }

    /// Maps the existing region `name`, checking it is a key table.
    #[cfg(not(loom))]
    pub fn attach_shared(name: &str, clock: Clock) -> Result<KeyTable, CoreError> {
        let region = crate::shm::Region::attach(name)?;
        let w = region.words();
        if w.len() < HEADER || w[H_MAGIC].load(Ordering::Acquire) != MAGIC || w[H_VERSION].load(Ordering::Relaxed) != VERSION {
            return Err(CoreError::Layout(format!("{name}: not a tierq key table (version {VERSION})")));
        }
        let capacity = w[H_CAPACITY].load(Ordering::Relaxed) as usize;
        if !capacity.is_power_of_two() || capacity > MAX_CAPACITY || w.len() != HEADER + capacity * ENTRY {
            return Err(CoreError::Layout(format!("{name}: {} words for {capacity} keys", w.len())));
        }
        Ok(Self::from_region(region, capacity, clock))
    }

    #[cfg(not(loom))]
    fn from_region(region: crate::shm::Region, capacity: usize, clock: Clock) -> KeyTable {
        KeyTable { words: Words::shm(region), capacity, clock }
    }

    /// Removes a region's name (live mappings stay valid).
    #[cfg(not(loom))]
    pub fn unlink_shared(name: &str) -> Result<(), CoreError> {
        crate::shm::Region::unlink(name)
    }

    #[inline]
    fn words(&self) -> &[AtomicU64] {
        self.words.get()
    }

    /// Keys the table holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries claimed so far (by any process).
    pub fn used(&self) -> usize {
        self.words()[H_USED].load(Ordering::Relaxed) as usize
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The entry of key `id`: found, or claimed now with one CAS. `None` when
    /// every entry belongs to other keys.
    pub fn entry(&self, id: &str) -> Option<usize> {
        let tag = key_tag(id);
        let w = self.words();
        let mask = self.capacity - 1;
        let start = mix(tag) as usize & mask;
        for k in 0..self.capacity {
            let e = (start + k) & mask;
            let t = &w[HEADER + e * ENTRY];
            let seen = t.load(Ordering::Acquire);
            if seen == tag {
                return Some(e);
            }
            if seen == 0 {
                // The TAT words of a free entry are 0 (a full bucket), so
                // claiming the tag is the whole of creating the key's buckets.
                match t.compare_exchange(0, tag, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        w[H_USED].fetch_add(1, Ordering::Relaxed);
                        return Some(e);
                    }
                    // Another process claimed it, maybe for this same key.
                    Err(other) if other == tag => return Some(e),
                    Err(_) => {}
                }
            }
        }
        None
    }

    fn tat(&self, entry: usize, kind: usize) -> &AtomicU64 {
        debug_assert!(entry < self.capacity && kind < 2);
        &self.words()[HEADER + entry * ENTRY + 1 + kind]
    }

    /// Takes `cost` tokens from `entry`'s bucket `kind` (RPM or TPM) with
    /// settings `p`, or returns the exact wait in ns (`u64::MAX`: never fits).
    #[inline]
    pub fn try_take(&self, entry: usize, kind: usize, cost: u64, p: &BucketParams) -> Result<(), u64> {
        take_on(self.tat(entry, kind), self.clock.now_ns(), cost, Lane::Priority, p)
    }

    /// Takes (`delta` > 0, unchecked) or refunds (`delta` < 0) tokens.
    pub fn adjust(&self, entry: usize, kind: usize, delta: i64, p: &BucketParams) {
        adjust_on(self.tat(entry, kind), self.clock.now_ns(), delta, p)
    }

    /// Tokens in the bucket now (fractional).
    pub fn available(&self, entry: usize, kind: usize, p: &BucketParams) -> f64 {
        available_on(self.tat(entry, kind), self.clock.now_ns(), p)
    }

    /// The word that holds counter `kind` (BUDGET, RAMP) for `period`: the
    /// budget has one (only today counts), the ramp two (this step and the
    /// one before, by the step's parity).
    fn counter(&self, entry: usize, kind: usize, period: u64) -> &AtomicU64 {
        debug_assert!(entry < self.capacity && kind < 2);
        let at = if kind == BUDGET { E_BUDGET } else { E_RAMP + (period & 1) as usize };
        &self.words()[HEADER + entry * ENTRY + at]
    }

    /// Counter `kind` of `entry` in `period` (0 if the word holds another period).
    pub fn count(&self, entry: usize, kind: usize, period: u64) -> u64 {
        let c = Packed::of(kind);
        let w = self.counter(entry, kind, period).load(Ordering::Acquire);
        if c.tag(w) == c.tag_of(period) { c.count(w) } else { 0 }
    }

    /// Counts `cost` in `period` if the count stays at or below `limit`: the
    /// count after it, or `Err(count now)` (nothing counted). A word holding an
    /// older period starts this one from 0; one holding a later period (the
    /// caller's clock is behind another process's) counts in that one.
    pub fn count_take(&self, entry: usize, kind: usize, period: u64, cost: u64, limit: u64) -> Result<u64, u64> {
        let c = Packed::of(kind);
        let word = self.counter(entry, kind, period);
        let mut w = word.load(Ordering::Acquire);
        loop {
            let (tag, now) = if c.tag(w) == c.tag_of(period) || (w != 0 && c.later(c.tag(w), c.tag_of(period))) {
                (c.tag(w), c.count(w))
            } else {
                (c.tag_of(period), 0)
            };
            let after = now.saturating_add(cost);
            if after > limit.min(c.max) {
                return Err(now);
            }
            match word.compare_exchange_weak(w, c.pack(tag, after), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(after),
                Err(seen) => w = seen,
            }
        }
    }

    /// Adds `delta` (negative: gives back, never below 0) to counter `kind`
    /// in `period`, unchecked: a settlement, a refund, or a count rebuilt at
    /// start-up. A word holding an older period starts this one from 0; one
    /// already in a later period is left alone (a late settlement of a
    /// request counted in a day or step that is over).
    pub fn count_add(&self, entry: usize, kind: usize, period: u64, delta: i64) {
        let c = Packed::of(kind);
        let word = self.counter(entry, kind, period);
        let mut w = word.load(Ordering::Acquire);
        loop {
            let now = if c.tag(w) == c.tag_of(period) {
                c.count(w)
            } else if w != 0 && c.later(c.tag(w), c.tag_of(period)) {
                return;
            } else {
                0
            };
            let after = if delta < 0 { now.saturating_sub(delta.unsigned_abs()) } else { now.saturating_add(delta as u64).min(c.max) };
            match word.compare_exchange_weak(w, c.pack(period, after), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => w = seen,
            }
        }
    }
}

/// How one kind of counter packs its period tag and count into a word.
#[derive(Clone, Copy)]
struct Packed {
    /// Bits of the count (below the tag).
    shift: u32,
    tag_mask: u64,
    /// The largest count.
    max: u64,
}

impl Packed {
    fn of(kind: usize) -> Packed {
        let tag_bits = TAG_BITS[kind];
        let shift = 64 - tag_bits;
        Packed { shift, tag_mask: (1u64 << tag_bits) - 1, max: (1u64 << shift) - 1 }
    }

    #[inline]
    fn tag_of(self, period: u64) -> u64 {
        period & self.tag_mask
    }

    #[inline]
    fn tag(self, w: u64) -> u64 {
        w >> self.shift
    }

    #[inline]
    fn count(self, w: u64) -> u64 {
        w & self.max
    }

    #[inline]
    fn pack(self, period: u64, count: u64) -> u64 {
        self.tag_of(period) << self.shift | count.min(self.max)
    }

    /// Whether tag `a` (a word's) is a later period than tag `b` (modulo the tag's range:
    /// within half of it).
    #[inline]
    fn later(self, a: u64, b: u64) -> bool {
        let d = a.wrapping_sub(b) & self.tag_mask;
        d != 0 && d <= self.tag_mask / 2
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Arc;

    #[test]
    fn public_ids_get_distinct_nonzero_tags_and_other_strings_a_hash() {
        let ids = ["a", "0", "z", "aa", "a0", "0a", "zzzzzzzzzzzz", "000000000000", "abc123def456"];
        let tags: std::collections::HashSet<u64> = ids.iter().map(|i| key_tag(i)).collect();
        assert_eq!(tags.len(), ids.len());
        assert!(tags.iter().all(|&t| t != 0 && t < 1 << 63));
        assert!(key_tag("Not-A-Public-Id") >= 1 << 63);
        assert_ne!(key_tag(""), 0);
    }

    #[test]
    fn a_key_keeps_its_entry_and_a_full_table_answers_none() {
        let t = KeyTable::new(3, Clock::Monotonic).unwrap();
        assert_eq!(t.capacity(), 4);
        let a = t.entry("aaaaaaaaaaaa").unwrap();
        assert_eq!(t.entry("aaaaaaaaaaaa"), Some(a));
        let others: Vec<usize> = ["b", "c", "d"].iter().map(|k| t.entry(k).unwrap()).collect();
        assert!(!others.contains(&a));
        assert_eq!(t.used(), 4);
        assert_eq!(t.entry("e"), None);
        assert_eq!(t.entry("c"), Some(others[1]), "known keys still found when full");
        assert!(KeyTable::new(0, Clock::Monotonic).is_err());
    }

    #[test]
    fn buckets_of_an_entry_follow_the_gcra_rule_per_kind() {
        let c = Arc::new(ManualClock::new(1_000_000_000));
        let t = KeyTable::new(16, Clock::Manual(c.clone())).unwrap();
        let p = BucketParams::new(5.0 / 60.0, 5.0, 0.0).unwrap();
        let e = t.entry("k1").unwrap();
        for _ in 0..5 {
            assert_eq!(t.try_take(e, RPM, 1, &p), Ok(()));
        }
        assert_eq!(t.try_take(e, RPM, 1, &p), Err(12_000_000_000), "one request refills in 12 s");
        assert!((t.available(e, TPM, &p) - 5.0).abs() < 1e-9, "the other kind is untouched");
        t.adjust(e, RPM, -1, &p);
        assert_eq!(t.try_take(e, RPM, 1, &p), Ok(()));
        c.advance_ns(12_000_000_000);
        assert_eq!(t.try_take(e, RPM, 1, &p), Ok(()));
        let other = t.entry("k2").unwrap();
        assert_eq!(t.try_take(other, RPM, 5, &p), Ok(()), "another key has its own bucket");
    }

    #[test]
    fn a_budget_counts_within_its_limit_per_day_and_a_new_day_starts_from_zero() {
        let t = KeyTable::new(4, Clock::Monotonic).unwrap();
        let e = t.entry("k1").unwrap();
        let day = 20_429;
        assert_eq!(t.count_take(e, BUDGET, day, 600, 1000), Ok(600));
        assert_eq!(t.count_take(e, BUDGET, day, 401, 1000), Err(600), "over the limit: nothing counted");
        assert_eq!(t.count_take(e, BUDGET, day, 400, 1000), Ok(1000), "exactly the limit fits");
        t.count_add(e, BUDGET, day, -250);
        assert_eq!(t.count(e, BUDGET, day), 750, "a settlement below its estimate gives back");
        assert_eq!(t.count(e, BUDGET, day + 1), 0, "the next day has spent nothing");
        assert_eq!(t.count_take(e, BUDGET, day + 1, 10, 1000), Ok(10));
        t.count_add(e, BUDGET, day, 500);
        assert_eq!(t.count(e, BUDGET, day + 1), 10, "a late settlement of yesterday is left out");
        t.count_add(e, BUDGET, day + 1, -100);
        assert_eq!(t.count(e, BUDGET, day + 1), 0, "never below zero");
        t.count_add(e, BUDGET, day + 2, 1 << 60);
        assert_eq!(t.count(e, BUDGET, day + 2), (1 << 48) - 1, "saturates at the word's count");
        assert_eq!(t.count_take(e, BUDGET, day + 1, 1, u64::MAX), Err((1 << 48) - 1),
                   "a worker whose clock is behind counts in the later day the word holds");
    }

    #[test]
    fn ramp_steps_keep_this_step_and_the_one_before_apart() {
        let t = KeyTable::new(4, Clock::Monotonic).unwrap();
        let e = t.entry("k2").unwrap();
        let step = 29_418_000;
        assert_eq!(t.count_take(e, RAMP, step, 700, u64::MAX), Ok(700));
        assert_eq!(t.count_take(e, RAMP, step + 1, 300, 1000), Ok(300));
        assert_eq!((t.count(e, RAMP, step), t.count(e, RAMP, step + 1)), (700, 300));
        assert_eq!(t.count_take(e, RAMP, step + 2, 5, 1000), Ok(5), "step + 2 reuses step's word");
        assert_eq!(t.count(e, RAMP, step), 0, "and step is gone");
        assert_eq!(t.count(e, RAMP, step + 1), 300);
        assert_eq!(t.count(e, BUDGET, 0), 0, "the budget is a word of its own");
    }
}
