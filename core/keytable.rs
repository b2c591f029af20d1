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

use crate::bucket::{adjust_on, available_on, take_on, BucketParams};
use crate::clock::Clock;
use crate::error::CoreError;
use crate::sync::{AtomicU64, Ordering};
use crate::words::Words;
use crate::Lane;

const MAGIC: u64 = 0x7469_6572_714b_4559; // "tierqKEY"
const VERSION: u64 = 1;
/// Header: magic, version, capacity, entries claimed, then reserved words.
const HEADER: usize = 8;
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_CAPACITY: usize = 2;
const H_USED: usize = 3;
/// Per entry: tag, one TAT per bucket kind, one spare word (keeps entries
/// 32 bytes, two per cache line).
const ENTRY: usize = 4;
/// Bucket kinds per key: requests per minute, tokens per minute.
pub const RPM: usize = 0;
pub const TPM: usize = 1;
/// Largest table, in keys (32 MiB of words).
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
}
