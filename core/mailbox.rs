//! A worker's mailbox: outcomes (grant, eviction, expiry) that another
//! process decided for this worker's waiters. Lives in the pool's shared
//! block: a bounded array of one-word messages plus a "signalled" flag.
//!
//! Each message is posted with ONE compare-and-swap into an empty cell and
//! taken with ONE swap, so a process killed at any instruction never leaves a
//! half-written message or a cell that blocks the rest (a Vyukov ring would,
//! with a producer dead between claiming and publishing). Order among
//! messages does not matter: each names a different waiter.
//!
//! Wake-up without polling: a producer that flips `signalled` from 0 to 1
//! must wake the owner (eventfd); the owner, woken, first clears the flag,
//! then sweeps every cell. A message posted before the clear is seen by the
//! sweep; one posted after it finds the flag 0 and wakes the owner again.

use crate::sync::{AtomicU64, Ordering::SeqCst};

/// A message: `waiter << 16 | generation(14 bits) << 2 | outcome`. Never 0.
pub const OUT_GRANT: u64 = 1;
pub const OUT_EVICTED: u64 = 2;
pub const OUT_EXPIRED: u64 = 3;
const GEN_MASK: u64 = (1 << 14) - 1;
/// Waiter ids must fit in the 48 bits above the tag.
pub const MAX_WAITER: u64 = (1 << 48) - 1;

#[inline]
pub fn pack(waiter: u64, generation: u64, outcome: u64) -> u64 {
    debug_assert!(waiter <= MAX_WAITER && (1..=3).contains(&outcome));
    waiter << 16 | (generation & GEN_MASK) << 2 | outcome
}

/// (waiter, generation low bits, outcome)
#[inline]
pub fn unpack(msg: u64) -> (u64, u64, u64) {
    (msg >> 16, (msg >> 2) & GEN_MASK, msg & 3)
}

#[inline]
pub fn same_generation(a: u64, b: u64) -> bool {
    a & GEN_MASK == b & GEN_MASK
}

/// Views into the shared block; see module docs.
pub struct Mailbox<'a> {
    /// 1 once a producer has signalled the owner and the owner has not yet
    /// started its sweep; a producer that sets it from 0 must wake the owner.
    pub signalled: &'a AtomicU64,
    /// Where producers start probing for an empty cell (spreads them out).
    pub cursor: &'a AtomicU64,
    /// 0 = empty, else one packed message.
    pub cells: &'a [AtomicU64],
}

/// The mailbox had no empty cell; the message was not posted.
#[derive(Debug, PartialEq, Eq)]
pub struct MailboxFull;

impl<'a> Mailbox<'a> {
    /// Posts `msg` (non-zero). `Ok(true)`: the caller must wake the owner.
    pub fn post(&self, msg: u64) -> Result<bool, MailboxFull> {
        debug_assert_ne!(msg, 0);
        let mask = self.cells.len() as u64 - 1;
        let start = self.cursor.fetch_add(1, SeqCst);
        for k in 0..self.cells.len() as u64 {
            let c = &self.cells[((start + k) & mask) as usize];
            if c.load(SeqCst) == 0 && c.compare_exchange(0, msg, SeqCst, SeqCst).is_ok() {
                return Ok(self.signalled.swap(1, SeqCst) == 0);
            }
        }
        Err(MailboxFull)
    }

    /// The owner's side, after being woken (and once at start): clears the
    /// flag, then takes every message present. Returns how many it took.
    pub fn drain(&self, mut on_msg: impl FnMut(u64)) -> usize {
        // An RMW, not a store: a producer's swap of the flag is then either
        // before ours (we read-from it, so its message is visible to the
        // sweep) or after (it reads our 0 and wakes us again). A plain store
        // would need SeqCst's store-load order, which loom (rightly) does
        // not grant.
        self.signalled.swap(0, SeqCst);
        let mut n = 0;
        for c in self.cells {
            if c.load(SeqCst) != 0 {
                let msg = c.swap(0, SeqCst);
                if msg != 0 {
                    n += 1;
                    on_msg(msg);
                }
            }
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn message_round_trips_through_its_packing() {
        let m = pack(MAX_WAITER, 0x1_2345, OUT_EXPIRED);
        assert_eq!(unpack(m), (MAX_WAITER, 0x1_2345 & GEN_MASK, OUT_EXPIRED));
        assert!(same_generation(0x1_2345, unpack(m).1));
    }

    #[test]
    fn post_signals_once_until_drained_and_full_box_refuses() {
        let flag = AtomicU64::new(0);
        let cursor = AtomicU64::new(0);
        let cells: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
        let mb = Mailbox { signalled: &flag, cursor: &cursor, cells: &cells };
        assert_eq!(mb.post(11), Ok(true));
        assert_eq!(mb.post(12), Ok(false), "already signalled, not yet drained");
        mb.post(13).unwrap();
        mb.post(14).unwrap();
        assert_eq!(mb.post(15), Err(MailboxFull));
        let mut got = vec![];
        assert_eq!(mb.drain(|m| got.push(m)), 4);
        got.sort();
        assert_eq!(got, vec![11, 12, 13, 14]);
        assert_eq!(mb.post(16), Ok(true), "drained: the next post wakes again");
    }
}
