//! Time for the core, injected: the host's monotonic clock in production, a
//! manual clock that tests advance by hand so no test sleeps to prove timing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A clock the tests drive. Time only moves when `advance` or `set` is called.
#[derive(Debug, Default)]
pub struct ManualClock {
    /// Nanoseconds since the clock's origin; only ever increases.
    now_ns: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        ManualClock { now_ns: AtomicU64::new(start_ns) }
    }
    pub fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::Acquire)
    }
    pub fn advance_ns(&self, ns: u64) -> u64 {
        self.now_ns.fetch_add(ns, Ordering::AcqRel).saturating_add(ns)
    }
    /// Moves the clock to `ns` unless that would move it backwards.
    pub fn set_ns(&self, ns: u64) {
        self.now_ns.fetch_max(ns, Ordering::AcqRel);
    }
}

/// The clock a pool or bucket reads. An enum, not a trait object: the hot path
/// pays one branch, and `Monotonic` is the same timeline in every process on the
/// host (CLOCK_MONOTONIC), which shared-memory admission state relies on.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    Monotonic,
    Manual(Arc<ManualClock>),
}

impl Clock {
    #[inline]
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Monotonic => monotonic_ns(),
            Clock::Manual(c) => c.now_ns(),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds; never 0, so 0 can mean "never" in state words.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always
    // available on Linux and the call only writes into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64).max(1)
}
