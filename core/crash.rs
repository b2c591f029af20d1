//! Crash points: marks between two atomic steps of a slot's way through a
//! shared pool, where a worker killed by SIGKILL leaves the block. Unit tests
//! arm one (`arm`) and the call panics there, so a reclaim can be tried on
//! exactly that state; in every other build a point is nothing.

/// The crash point `$name` (see the module's note).
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(all(test, not(loom)))]
        crate::crash::point($name);
    };
}
pub(crate) use crash_point;

#[cfg(all(test, not(loom)))]
use std::cell::Cell;

#[cfg(all(test, not(loom)))]
thread_local! {
    /// (point, hits to let pass first), armed by a test on its own thread.
    static ARMED: Cell<Option<(&'static str, u32)>> = const { Cell::new(None) };
}

#[cfg(all(test, not(loom)))]
pub fn arm(name: &'static str, skip: u32) {
    ARMED.with(|a| a.set(Some((name, skip))));
}

#[cfg(all(test, not(loom)))]
pub fn disarm() {
    ARMED.with(|a| a.set(None));
}

#[cfg(all(test, not(loom)))]
pub fn point(name: &'static str) {
    ARMED.with(|a| match a.get() {
        Some((n, 0)) if n == name => {
            a.set(None);
            panic!("worker killed at {name}");
        }
        Some((n, skip)) if n == name => a.set(Some((n, skip - 1))),
        _ => {}
    });
}
