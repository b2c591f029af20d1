//! One lane of the waiter queue: a bounded lock-free MPMC ring (Vyukov's
//! sequence-per-cell design) extended with tombstones, so a waiter can leave
//! from anywhere in the line (cancelled, expired, evicted) with one CAS.
//!
//! A waiter is named by its ticket `pos`, the lane position it took at the
//! tail. Each cell is one word, `pos << 2 | state`: the ticket the cell belongs
//! to and whether it is EMPTY (free for that ticket's producer), WAITING, or a
//! TOMB (left the line; skipped and reclaimed when the head passes it). Every
//! transition of a waiter is a CAS on its cell, so "granted", "cancelled",
//! "expired" and "evicted" are decided exactly once.
//!
//! The ring lives in caller-provided atomics (no heap pointers) so a pool's
//! state can be one fixed block mapped into shared memory. Each cell also
//! records its waiter's owner (a worker process and its generation; 0 in a
//! single-process pool), so whoever decides a waiter knows whom to tell,
//! its fairness tag (flow queue and service, `fair.rs`) and its own deadline.
//! The ring stays the arrival order; a fair pop takes the oldest waiting
//! ticket of one flow queue from the middle of it (`take_first`) with the
//! same CAS as a cancel, and the head reclaims the tombstone when it passes.

use crate::sync::{AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release, Ordering::SeqCst};

const EMPTY: u64 = 0;
const WAITING: u64 = 1;
const TOMB: u64 = 2;

#[inline]
const fn cell(pos: u64, state: u64) -> u64 {
    pos << 2 | state
}

#[inline]
const fn split(word: u64) -> (u64, u64) {
    (word >> 2, word & 3)
}

/// A ring that a lane's producers and consumers share. All fields are views
/// into the pool's state block.
pub(crate) struct Ring<'a> {
    /// Where consumers start looking: a hint, never past the oldest ticket
    /// not yet reclaimed (H). Whoever reclaims ticket h stores h + 1, with a
    /// plain store, not a CAS: a store that lands late may move it back, and
    /// consumers then skip the reclaimed cells again (`skip_reclaimed`). The
    /// cells are the truth; producers never read the head. Release stores,
    /// Acquire loads: a consumer that reads h also sees the reclaim that put
    /// ticket h into cell h % cap, so it never finds an older lap's ticket there.
    pub head: &'a AtomicU64,
    /// Next ticket to hand out; only moves forward, by CAS, and never more than
    /// `cells.len()` past H.
    pub tail: &'a AtomicU64,
    /// `cells[pos % cap]` = `cell(pos, state)` for the ticket that owns it.
    pub cells: &'a [AtomicU64],
    /// `enqueued_ns[pos % cap]`: when ticket `pos` joined; written before the
    /// cell is published as WAITING, read only after seeing it WAITING.
    pub enqueued_ns: &'a [AtomicU64],
    /// `owners[pos % cap]`: the owner word of ticket `pos`; same publication
    /// rule as `enqueued_ns`. Read it only after seeing the cell WAITING and
    /// trust it only if a CAS from that WAITING word then succeeds.
    pub owners: &'a [AtomicU64],
    /// `tags[pos % cap]`: ticket `pos`'s fairness tag (`fair::tag`); same
    /// publication and trust rule as `owners`.
    pub tags: &'a [AtomicU64],
    /// `dues[pos % cap]`: when ticket `pos` passes its own deadline (clock
    /// ns; 0: it has none, the lane's max wait applies); same rule.
    pub dues: &'a [AtomicU64],
    /// `homes[pos % cap]`: ticket `pos`'s home replicas, bit r for replica
    /// r (0: none, a pool of one engine); same publication and trust rule
    /// as `owners`.
    pub homes: &'a [AtomicU64],
}

/// A waiter taken out of the line: its ticket, owner and fairness tag.
pub(crate) type Taken = (u64, u64, u64);

/// The push could not take a cell: every cell holds a waiter or a tombstone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RingFull;

impl<'a> Ring<'a> {
    #[inline]
    fn cap(&self) -> u64 {
        self.cells.len() as u64
    }
    #[inline]
    fn idx(&self, pos: u64) -> usize {
        (pos & (self.cap() - 1)) as usize
    }

    /// Fills fresh state: cell i belongs to ticket i, empty.
    pub(crate) fn init(&self) {
        self.head.store(0, Release);
        self.tail.store(0, SeqCst);
        for (i, c) in self.cells.iter().enumerate() {
            c.store(cell(i as u64, EMPTY), SeqCst);
        }
    }

    /// Joins the back of the line at `now` for `owner`, with its fairness
    /// `tag` and own deadline `due` (0: none); returns the ticket.
    pub(crate) fn push(&self, now: u64, owner: u64, tag: u64, due: u64, home: u64) -> Result<u64, RingFull> {
        loop {
            let t = self.tail.load(SeqCst);
            let i = self.idx(t);
            let (pos, state) = split(self.cells[i].load(SeqCst));
            if pos == t && state == EMPTY {
                if self.tail.compare_exchange_weak(t, t + 1, SeqCst, SeqCst).is_ok() {
                    crate::crash::crash_point!("push.taken");
                    // Relaxed: the SeqCst store of the cell below publishes both.
                    self.enqueued_ns[i].store(now, Relaxed);
                    self.owners[i].store(owner, Relaxed);
                    self.tags[i].store(tag, Relaxed);
                    self.dues[i].store(due, Relaxed);
                    self.homes[i].store(home, Relaxed);
                    self.cells[i].store(cell(t, WAITING), SeqCst);
                    return Ok(t);
                }
            } else if pos < t && self.tail.load(SeqCst) == t {
                // The cell still holds the previous lap's ticket: the ring is full.
                return Err(RingFull);
            }
            // Otherwise our view of `tail` was stale; look again.
        }
    }

    /// True when the cell at the tail still holds the previous lap's ticket
    /// (a waiter or a tombstone): a `push` now would fail with `RingFull`.
    pub(crate) fn is_full(&self) -> bool {
        let t = self.tail.load(SeqCst);
        split(self.cells[self.idx(t)].load(SeqCst)).0 < t
    }

    /// The head hint fell behind: cell `h % cap` holds `pos`, a later lap's
    /// ticket, so ticket `pos - cap` is reclaimed. A reclaim only ever takes
    /// H (its CAS succeeds from ticket h's word at a head hint h <= H, so
    /// h = H), so tickets are reclaimed in order and every one up to
    /// `pos - cap` is gone: the hint may jump past all of them at once.
    #[inline]
    fn skip_reclaimed(&self, pos: u64) {
        self.head.store(pos - self.cap() + 1, Release);
    }

    /// Takes the waiter at the front, reclaiming tombstones on the way; returns
    /// its ticket, owner and tag. `None` when nothing is published (a producer
    /// that took a ticket but has not published yet dispatches for itself
    /// right after publishing).
    pub(crate) fn pop(&self) -> Option<Taken> {
        loop {
            let h = self.head.load(Acquire);
            let i = self.idx(h);
            let word = self.cells[i].load(SeqCst);
            let (pos, state) = split(word);
            if pos == h {
                if state == EMPTY {
                    return None;
                }
                // Valid once the CAS below succeeds from this same word.
                let owner = self.owners[i].load(SeqCst);
                let tag = self.tags[i].load(SeqCst);
                if self.cells[i].compare_exchange(word, cell(h + self.cap(), EMPTY), SeqCst, SeqCst).is_ok() {
                    // The CAS decided ticket h; the head only has to follow
                    // (see `head`), so a store, not a second locked RMW.
                    self.head.store(h + 1, Release);
                    if state == WAITING {
                        return Some((h, owner, tag));
                    }
                }
            } else if pos > h {
                self.skip_reclaimed(pos);
            }
        }
    }

    /// Reclaims tombstones at the front so they stop holding ring cells.
    pub(crate) fn reap(&self) {
        loop {
            let h = self.head.load(Acquire);
            let i = self.idx(h);
            let word = self.cells[i].load(SeqCst);
            let (pos, state) = split(word);
            if pos == h && state == TOMB {
                if self.cells[i].compare_exchange(word, cell(h + self.cap(), EMPTY), SeqCst, SeqCst).is_ok() {
                    self.head.store(h + 1, Release);
                }
            } else if pos > h {
                self.skip_reclaimed(pos);
            } else {
                return;
            }
        }
    }

    /// Removes waiter `pos` if it is still waiting. False: it was already
    /// granted, expired or evicted (its fate is decided elsewhere).
    #[cfg(test)]
    pub(crate) fn remove(&self, pos: u64) -> bool {
        self.remove_owned(pos).is_some()
    }

    /// Removes waiter `pos` if it is still waiting; returns its owner and tag.
    pub(crate) fn remove_owned(&self, pos: u64) -> Option<(u64, u64)> {
        let i = self.idx(pos);
        if self.cells[i].load(SeqCst) != cell(pos, WAITING) {
            return None;
        }
        let owner = self.owners[i].load(SeqCst);
        let tag = self.tags[i].load(SeqCst);
        let c = &self.cells[i];
        c.compare_exchange(cell(pos, WAITING), cell(pos, TOMB), SeqCst, SeqCst).is_ok().then_some((owner, tag))
    }

    /// Takes the oldest waiting ticket of flow queue `queue` at or after
    /// `from` (its queue's hint), with the same CAS as a cancel (as a pop's,
    /// when it is the front: then nothing is left to reclaim). Returns it
    /// (ticket, owner, tag) and the queue's next hint: the ticket after it,
    /// or, when nothing was found, the tail it looked up to; in both cases no
    /// further than the first ticket it found taken but not yet published
    /// (that one's queue is not known yet). So the hint never passes a
    /// ticket of `queue` that is or may become waiting: every ticket below
    /// it was seen published (with another queue, or no longer waiting), and
    /// tickets never come back. A hint stored late may move it back, which
    /// only costs a longer look next time.
    pub(crate) fn take_first(&self, from: u64, queue: u32) -> (Option<Taken>, u64) {
        let (h, t) = self.live_span();
        let mut unpublished = t;
        let mut p = from.max(h);
        while p < t {
            let i = self.idx(p);
            let word = self.cells[i].load(SeqCst);
            let (pos, state) = split(word);
            if pos == p && state == EMPTY {
                unpublished = unpublished.min(p);
            } else if pos == p && state == WAITING {
                let tag = self.tags[i].load(SeqCst);
                if crate::fair::tag_queue(tag) == queue {
                    let owner = self.owners[i].load(SeqCst);
                    // At the head hint, ticket p is H itself (h <= H, and a
                    // cell still holding p means H <= p): reclaim it in the
                    // same CAS, as `pop` does, rather than leave a tombstone
                    // for a second CAS to reclaim.
                    let next = if p == h { cell(p + self.cap(), EMPTY) } else { cell(p, TOMB) };
                    if self.cells[i].compare_exchange(word, next, SeqCst, SeqCst).is_ok() {
                        if p == h {
                            self.head.store(p + 1, Release);
                        }
                        return (Some((p, owner, tag)), unpublished.min(p + 1));
                    }
                    // Decided meanwhile (granted, cancelled): look at it again.
                    continue;
                }
            }
            p += 1;
        }
        (None, unpublished)
    }

    /// The replica grant rule's look-ahead (core/replicas.rs): among the
    /// first `k` waiting tickets from the head, the oldest one of whose
    /// homes is `home` (a replica plus one), taken with one CAS as a cancel is (a
    /// tombstone the head reclaims when it passes). None when the front
    /// waiter is itself at home (the caller's pop takes it, as today) or
    /// none of the `k` is: the caller pops as it would without a home.
    pub(crate) fn take_home(&self, home: u64, k: u32) -> Option<Taken> {
        let bit = match home {
            1..=64 => 1u64 << (home - 1),
            _ => return None,
        };
        let (h, t) = self.live_span();
        let mut seen = 0u32;
        let mut p = h;
        while p < t && seen < k {
            let i = self.idx(p);
            let word = self.cells[i].load(SeqCst);
            let (pos, state) = split(word);
            if pos == p && state == WAITING {
                if self.homes[i].load(SeqCst) & bit != 0 {
                    if seen == 0 {
                        return None;
                    }
                    let owner = self.owners[i].load(SeqCst);
                    let tag = self.tags[i].load(SeqCst);
                    if self.cells[i].compare_exchange(word, cell(p, TOMB), SeqCst, SeqCst).is_ok() {
                        return Some((p, owner, tag));
                    }
                    // Decided meanwhile (granted, cancelled): look at it again.
                    continue;
                }
                seen += 1;
            }
            p += 1;
        }
        None
    }

    /// Tickets between the head hint and the tail: live waiters and the
    /// tombstones the head has not reclaimed yet.
    pub(crate) fn span(&self) -> u64 {
        let (h, t) = self.live_span();
        t - h
    }

    /// Tickets that may be waiting: from the head hint (no further back than
    /// one ring behind the tail, however far a late store moved it) to the tail.
    fn live_span(&self) -> (u64, u64) {
        let h = self.head.load(Acquire);
        let t = self.tail.load(SeqCst);
        (h.max(t.saturating_sub(self.cap())), t)
    }

    /// Calls `on_waiting(tag)` for every waiting ticket and returns the
    /// tickets taken at the tail and not published (their cell still EMPTY
    /// for them). Only meaningful while no producer is inside `push` (a
    /// reclaim's quiet snapshot): then an unpublished ticket is a dead one.
    pub(crate) fn census(&self, mut on_waiting: impl FnMut(u64)) -> Vec<u64> {
        let (h, t) = self.live_span();
        let mut unpublished = Vec::new();
        for p in h..t {
            let i = self.idx(p);
            match split(self.cells[i].load(SeqCst)) {
                (pos, WAITING) if pos == p => on_waiting(self.tags[i].load(SeqCst)),
                (pos, EMPTY) if pos == p => unpublished.push(p),
                _ => {}
            }
        }
        unpublished
    }

    /// Turns unpublished ticket `pos` (its producer died between taking it
    /// and publishing it) into a tombstone, so the head can pass it; true if
    /// it did. A head stuck at it would otherwise stop the lane for good.
    pub(crate) fn bury(&self, pos: u64) -> bool {
        self.cells[self.idx(pos)].compare_exchange(cell(pos, EMPTY), cell(pos, TOMB), SeqCst, SeqCst).is_ok()
    }

    /// Removes every waiting ticket whose owner is `owner` (a dead worker);
    /// calls `on_removed` per ticket with its tag.
    pub(crate) fn remove_all_of(&self, owner: u64, mut on_removed: impl FnMut(u64, u64)) {
        let (h, t) = self.live_span();
        for p in h..t {
            let i = self.idx(p);
            if self.cells[i].load(SeqCst) == cell(p, WAITING) && self.owners[i].load(SeqCst) == owner {
                if let Some((o, tag)) = self.remove_owned(p) {
                    // The owner read again under the CAS's trust rule.
                    debug_assert_eq!(o, owner);
                    on_removed(p, tag);
                }
            }
        }
    }

    /// Expires every waiter whose own deadline (`dues`) is at or before
    /// `now`, anywhere in the line (own deadlines are not in join order);
    /// `on_expired` gets the ticket, owner and tag.
    pub(crate) fn expire_own(&self, now: u64, mut on_expired: impl FnMut(u64, u64, u64)) {
        let (h, t) = self.live_span();
        for p in h..t {
            let i = self.idx(p);
            if self.cells[i].load(SeqCst) != cell(p, WAITING) {
                continue;
            }
            let due = self.dues[i].load(SeqCst);
            if due != 0 && due <= now {
                // A due read from a later ticket of this cell fails the CAS.
                if let Some((owner, tag)) = self.remove_owned(p) {
                    on_expired(p, owner, tag);
                }
            }
        }
    }

    /// True while a published waiter or tombstone sits at the front, i.e. a
    /// `pop` would make progress (also when the head lags: it would move it).
    pub(crate) fn has_published(&self) -> bool {
        let h = self.head.load(Acquire);
        let (pos, state) = split(self.cells[self.idx(h)].load(SeqCst));
        pos > h || (pos == h && state != EMPTY)
    }

    /// Removes the newest waiting ticket (scanning back from the tail);
    /// returns it, its owner and tag.
    pub(crate) fn remove_newest(&self) -> Option<Taken> {
        let (h, t) = self.live_span();
        let mut p = t;
        while p > h {
            p -= 1;
            if let Some((owner, tag)) = self.remove_owned(p) {
                return Some((p, owner, tag));
            }
        }
        None
    }

    /// Expires waiters at the front that joined at or before `deadline`
    /// (= now - max_wait), calling `on_expired` for each. Stops at the first
    /// live waiter that is still in time: the line is FIFO, so those behind
    /// it joined later. `on_expired` gets the ticket, its owner and tag.
    pub(crate) fn expire(&self, deadline: u64, mut on_expired: impl FnMut(u64, u64, u64)) {
        loop {
            self.reap();
            let h = self.head.load(Acquire);
            let i = self.idx(h);
            let (pos, state) = split(self.cells[i].load(SeqCst));
            if pos > h {
                // A late head store moved it back after `reap`: go round.
                self.skip_reclaimed(pos);
                continue;
            }
            if pos != h || state != WAITING {
                return;
            }
            if self.enqueued_ns[i].load(SeqCst) > deadline {
                return;
            }
            if let Some((owner, tag)) = self.remove_owned(h) {
                on_expired(h, owner, tag);
            }
        }
    }

    /// The waiter's join time and own deadline (0: none), if `pos` is
    /// still waiting.
    pub(crate) fn enqueued_at(&self, pos: u64) -> Option<(u64, u64)> {
        let i = self.idx(pos);
        let waiting = cell(pos, WAITING);
        // Cell, times, cell again: tickets never repeat, so an unchanged cell
        // means the times read belong to `pos`.
        if self.cells[i].load(SeqCst) != waiting {
            return None;
        }
        let at = self.enqueued_ns[i].load(SeqCst);
        let due = self.dues[i].load(SeqCst);
        (self.cells[i].load(SeqCst) == waiting).then_some((at, due))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    struct Owned {
        head: AtomicU64,
        tail: AtomicU64,
        cells: Vec<AtomicU64>,
        enq: Vec<AtomicU64>,
        own: Vec<AtomicU64>,
        tags: Vec<AtomicU64>,
        dues: Vec<AtomicU64>,
        homes: Vec<AtomicU64>,
    }
    impl Owned {
        fn new(cap: usize) -> Self {
            let o = Owned {
                head: AtomicU64::new(0),
                tail: AtomicU64::new(0),
                cells: (0..cap).map(|_| AtomicU64::new(0)).collect(),
                enq: (0..cap).map(|_| AtomicU64::new(0)).collect(),
                own: (0..cap).map(|_| AtomicU64::new(0)).collect(),
                tags: (0..cap).map(|_| AtomicU64::new(0)).collect(),
                dues: (0..cap).map(|_| AtomicU64::new(0)).collect(),
                homes: (0..cap).map(|_| AtomicU64::new(0)).collect(),
            };
            o.ring().init();
            o
        }
        fn ring(&self) -> Ring<'_> {
            Ring { head: &self.head, tail: &self.tail, cells: &self.cells, enqueued_ns: &self.enq, owners: &self.own, tags: &self.tags, dues: &self.dues, homes: &self.homes }
        }
    }

    #[test]
    fn fifo_within_a_lane() {
        let o = Owned::new(8);
        let r = o.ring();
        for n in 0..5 {
            assert_eq!(r.push(n, 0, 0, 0, 0), Ok(n));
        }
        assert_eq!((0..5).map(|_| r.pop().unwrap().0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert_eq!(r.pop(), None);
    }

    #[test]
    fn removed_waiter_is_skipped_and_reclaimed() {
        let o = Owned::new(4);
        let r = o.ring();
        for n in 0..4 {
            r.push(n, 0, 0, 0, 0).unwrap();
        }
        assert_eq!(r.push(9, 0, 0, 0, 0), Err(RingFull));
        assert!(r.remove(0));
        assert!(!r.remove(0), "a waiter leaves exactly once");
        r.reap();
        assert_eq!(r.push(9, 0, 0, 0, 0), Ok(4), "the reclaimed cell is reused");
        assert!(r.remove(2));
        assert_eq!(r.pop(), Some((1, 0, 0)));
        assert_eq!(r.pop(), Some((3, 0, 0)));
        assert_eq!(r.pop(), Some((4, 0, 0)));
        assert_eq!(r.pop(), None);
    }

    #[test]
    fn remove_newest_takes_the_back_of_the_line() {
        let o = Owned::new(8);
        let r = o.ring();
        for n in 0..3 {
            r.push(n, 0, 0, 0, 0).unwrap();
        }
        assert!(r.remove(2));
        assert_eq!(r.remove_newest(), Some((1, 0, 0)));
        assert_eq!(r.pop(), Some((0, 0, 0)));
        assert_eq!(r.remove_newest(), None);
    }

    #[test]
    fn expire_stops_at_first_waiter_in_time() {
        let o = Owned::new(8);
        let r = o.ring();
        for at in [10, 20, 30] {
            r.push(at, 0, 0, 0, 0).unwrap();
        }
        let mut gone = vec![];
        r.expire(20, |p, _, _| gone.push(p));
        assert_eq!(gone, vec![0, 1]);
        assert_eq!(r.enqueued_at(2), Some((30, 0)));
        assert_eq!(r.pop(), Some((2, 0, 0)));
    }

    #[test]
    fn owner_travels_with_its_ticket() {
        let o = Owned::new(4);
        let r = o.ring();
        for (n, owner) in [7u64, 8, 7, 9].into_iter().enumerate() {
            assert_eq!(r.push(n as u64, owner, 0, 0, 0), Ok(n as u64));
        }
        let mut gone = vec![];
        r.remove_all_of(7, |p, _| gone.push(p));
        assert_eq!(gone, vec![0, 2]);
        assert_eq!(r.remove_newest(), Some((3, 9, 0)));
        assert_eq!(r.pop(), Some((1, 8, 0)));
        assert_eq!(r.pop(), None);
    }

    #[test]
    fn head_moved_back_by_a_late_store_grants_nothing_twice() {
        let o = Owned::new(8);
        let r = o.ring();
        // Two laps in, so the stale cells hold later tickets, not empty ones.
        for n in 0..11 {
            r.push(n, 0, 0, 0, 0).unwrap();
            if n < 9 {
                assert_eq!(r.pop(), Some((n, 0, 0)));
            }
        }
        assert!(r.remove(10));
        for stale in [0, 3, 8] {
            // A releaser that reclaimed ticket `stale - 1` long ago stores now.
            o.head.store(stale, Release);
            assert!(r.has_published(), "a lagging head is work for pop");
            assert_eq!(r.enqueued_at(9), Some((9, 0)));
        }
        assert_eq!(r.remove_newest(), Some((9, 0, 0)));
        o.head.store(2, Release);
        r.expire(u64::MAX, |p, _, _| panic!("expired {p}"));
        assert_eq!(r.pop(), None);
        assert_eq!(o.head.load(Acquire), 11, "tombstones reclaimed, head caught up");
        assert_eq!(r.push(11, 0, 0, 0, 0), Ok(11));
        o.head.store(5, Release);
        assert_eq!(r.pop(), Some((11, 0, 0)));
        assert_eq!(r.pop(), None);
    }

    #[test]
    fn granted_waiter_cannot_be_removed() {
        let o = Owned::new(4);
        let r = o.ring();
        r.push(0, 0, 0, 0, 0).unwrap();
        assert_eq!(r.pop(), Some((0, 0, 0)));
        assert!(!r.remove(0));
        assert_eq!(r.enqueued_at(0), None);
    }

    #[test]
    fn a_fair_take_picks_the_oldest_of_its_queue_from_the_middle_of_the_line() {
        use crate::fair::tag;
        let o = Owned::new(16);
        let r = o.ring();
        // Arrival order: queue 1, 1, 2, 1, 2.
        for (n, q) in [1u32, 1, 2, 1, 2].into_iter().enumerate() {
            r.push(n as u64, 0, tag(q, 10, false), 0, 0).unwrap();
        }
        assert_eq!(r.take_first(0, 2), (Some((2, 0, tag(2, 10, false))), 3));
        assert_eq!(r.take_first(3, 2), (Some((4, 0, tag(2, 10, false))), 5));
        assert_eq!(r.take_first(5, 2), (None, 5), "nothing more of queue 2: the hint goes to the tail");
        assert_eq!(r.span(), 5, "the tombstones wait for the head");
        assert_eq!(r.pop().map(|t| t.0), Some(0));
        assert_eq!(r.pop().map(|t| t.0), Some(1));
        assert_eq!(r.pop().map(|t| t.0), Some(3), "the head skips the taken tickets");
        r.reap();
        assert_eq!(r.span(), 0);
    }

    #[test]
    fn a_fair_take_never_moves_the_hint_past_a_ticket_not_yet_published() {
        use crate::fair::tag;
        let o = Owned::new(8);
        let r = o.ring();
        r.push(0, 0, tag(1, 1, false), 0, 0).unwrap();
        // A producer took ticket 1 and has not published it yet.
        o.tail.store(2, SeqCst);
        o.cells[2].store(cell(2, EMPTY), SeqCst);
        o.tail.store(3, SeqCst);
        o.cells[2].store(cell(2, WAITING), SeqCst);
        o.tags[2].store(tag(1, 1, false), SeqCst);
        // Ticket 2 is published (queue 1) but ticket 1 is not.
        let (got, hint) = r.take_first(1, 1);
        assert_eq!(got.map(|t| t.0), Some(2));
        assert_eq!(hint, 1, "ticket 1 may turn out to be queue 1's");
    }

    #[test]
    fn own_deadlines_expire_anywhere_in_the_line() {
        let o = Owned::new(8);
        let r = o.ring();
        r.push(10, 0, 0, 0, 0).unwrap();
        r.push(11, 0, 0, 50, 0).unwrap();
        r.push(12, 0, 0, 40, 0).unwrap();
        r.push(13, 0, 0, 90, 0).unwrap();
        let mut gone = vec![];
        r.expire_own(50, |p, _, _| gone.push(p));
        assert_eq!(gone, vec![1, 2]);
        assert_eq!(r.enqueued_at(3), Some((13, 90)));
        assert_eq!(r.enqueued_at(0), Some((10, 0)));
    }

    #[test]
    fn a_waiter_with_two_homes_is_at_home_on_either() {
        let o = Owned::new(8);
        let r = o.ring();
        // Ticket 1 is at home on replicas 1 and 3 (a hot prefix), 0 nowhere.
        r.push(0, 0, 0, 0, 0).unwrap();
        r.push(1, 0, 0, 0, 0b1010).unwrap();
        r.push(2, 0, 0, 0, 0b1000).unwrap();
        assert_eq!(r.take_home(3, 4), None, "replica 2: nobody's");
        assert_eq!(r.take_home(0, 4), None, "0: no replica");
        assert_eq!(r.take_home(99, 4), None, "beyond any mask");
        assert_eq!(r.take_home(4, 4).map(|t| t.0), Some(1), "replica 3: the oldest of 1 and 2");
        assert_eq!(r.take_home(4, 4).map(|t| t.0), Some(2));
        assert_eq!(r.pop().map(|t| t.0), Some(0));
    }

    #[test]
    fn a_home_look_ahead_takes_the_oldest_at_home_within_k_and_leaves_the_front() {
        let o = Owned::new(8);
        let r = o.ring();
        // Homes as masks: replica 0, 1, 2, 2, 3 (take_home names one plus one).
        for (n, homes) in [(0u64, 0b1u64), (1, 0b10), (2, 0b100), (3, 0b100), (4, 0b1000)] {
            r.push(n, 0, 0, 0, homes).unwrap();
        }
        // The front's home: the plain pop takes it, as without a home.
        assert_eq!(r.take_home(1, 4), None);
        // Within the first 3 waiters: ticket 2, the oldest at home 3.
        assert_eq!(r.take_home(3, 3).map(|t| t.0), Some(2));
        // Home 4 is the fourth waiter left: beyond a look-ahead of 3.
        assert_eq!(r.take_home(4, 3), None);
        assert_eq!(r.take_home(4, 4).map(|t| t.0), Some(4));
        // The rest in arrival order, the tombstones skipped.
        assert_eq!(r.pop().map(|t| t.0), Some(0));
        assert_eq!(r.pop().map(|t| t.0), Some(1));
        assert_eq!(r.pop().map(|t| t.0), Some(3));
        assert_eq!(r.pop(), None);
    }
}
