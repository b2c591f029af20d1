//! GCRA token bucket: the whole state is one theoretical arrival time (TAT) in
//! an atomic word, so a decision is a load, a pure function and one
//! compare-and-swap. Priority requests may drain the bucket to zero; default
//! requests only take while it holds more than the priority reserve.

use crate::clock::Clock;
use crate::error::CoreError;
use crate::sync::{AtomicU64, Ordering};
use crate::Lane;

/// Immutable bucket settings, in nanoseconds of "bucket time".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketParams {
    /// Emission interval: the time one token takes to refill (1e9 / rate).
    pub interval_ns: u64,
    /// Burst tolerance: `burst` tokens' worth of refill time.
    pub tau_ns: u64,
    /// The part of `tau_ns` only the priority lane may use.
    pub reserve_ns: u64,
}

impl BucketParams {
    /// `rate` tokens per second, `burst` tokens of capacity, `priority_reserve`
    /// the share of `burst` that default requests must leave in the bucket.
    pub fn new(rate: f64, burst: f64, priority_reserve: f64) -> Result<Self, CoreError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(CoreError::arg("rate", format!("must be a positive number, got {rate}")));
        }
        if !(burst.is_finite() && burst >= 1.0) {
            return Err(CoreError::arg("burst", format!("must be at least 1, got {burst}")));
        }
        if !(priority_reserve.is_finite() && (0.0..1.0).contains(&priority_reserve)) {
            return Err(CoreError::arg(
                "priority_reserve",
                format!("must be in [0, 1), got {priority_reserve}"),
            ));
        }
        let interval = 1e9 / rate;
        if !(1.0..=1e18).contains(&interval) {
            return Err(CoreError::arg("rate", format!("out of range, got {rate}")));
        }
        let interval_ns = interval.round() as u64;
        // The burst's refill time must fit the nanosecond clock: `as u64`
        // saturates, and a saturated tau let any cost through (even u64::MAX).
        let tau = (burst * interval_ns as f64).round();
        if tau > 1e18 {
            return Err(CoreError::arg("burst", format!("burst / rate must be at most 1e9 s, got {burst} / {rate}")));
        }
        let tau_ns = tau as u64;
        let reserve_ns = (priority_reserve * tau_ns as f64).round() as u64;
        Ok(BucketParams { interval_ns, tau_ns, reserve_ns })
    }
}

/// What a bucket decides: take now, or the exact wait until the same request
/// would be allowed (governor's `NotUntil`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Taken; the new TAT to store.
    Take { new_tat: u64 },
    /// Refused; retry in `wait_ns`. `u64::MAX` when `cost` can never fit.
    NotUntil { wait_ns: u64 },
}

/// The pure GCRA rule. `tat` is the stored theoretical arrival time.
#[inline]
pub fn decide(tat: u64, now: u64, cost: u64, lane: Lane, p: &BucketParams) -> Decision {
    let limit = match lane {
        Lane::Priority => p.tau_ns,
        // At least one token: a reserve that leaves the default lane less than
        // a whole token must not shut that lane out for good (burst 1, reserve 0.2).
        // Flex spends the rate as default does: the reserve is priority's.
        Lane::Default | Lane::Flex => (p.tau_ns - p.reserve_ns).max(p.interval_ns),
    };
    let need = cost.saturating_mul(p.interval_ns);
    if need > limit {
        return Decision::NotUntil { wait_ns: u64::MAX };
    }
    let new_tat = tat.max(now).saturating_add(need);
    let ahead = new_tat - now;
    if ahead <= limit {
        Decision::Take { new_tat }
    } else {
        Decision::NotUntil { wait_ns: ahead - limit }
    }
}

/// Runs `decide` against an atomic TAT word until the CAS lands.
#[inline]
pub(crate) fn take_on(word: &AtomicU64, now: u64, cost: u64, lane: Lane, p: &BucketParams) -> Result<(), u64> {
    let mut tat = word.load(Ordering::Acquire);
    loop {
        match decide(tat, now, cost, lane, p) {
            Decision::NotUntil { wait_ns } => return Err(wait_ns),
            Decision::Take { new_tat } => {
                match word.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Ok(()),
                    Err(seen) => tat = seen,
                }
            }
        }
    }
}

/// Takes (`delta` > 0, unchecked) or gives back (`delta` < 0) tokens; a refund
/// never fills the bucket past full.
pub(crate) fn adjust_on(word: &AtomicU64, now: u64, delta: i64, p: &BucketParams) {
    let shift = delta.unsigned_abs().saturating_mul(p.interval_ns);
    let mut tat = word.load(Ordering::Acquire);
    loop {
        let new_tat = if delta >= 0 {
            tat.max(now).saturating_add(shift)
        } else {
            tat.saturating_sub(shift).max(now.min(tat))
        };
        match word.compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(seen) => tat = seen,
        }
    }
}

/// Tokens in the bucket at `now` (fractional).
pub(crate) fn available_on(word: &AtomicU64, now: u64, p: &BucketParams) -> f64 {
    let used = word.load(Ordering::Acquire).saturating_sub(now);
    p.tau_ns.saturating_sub(used) as f64 / p.interval_ns as f64
}

/// A standalone bucket (per-key limits, or a library user's own shedder).
#[derive(Debug)]
pub struct TokenBucket {
    params: BucketParams,
    clock: Clock,
    /// Theoretical arrival time in ns on `clock`; `<= now` means the bucket is full.
    tat: AtomicU64,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, priority_reserve: f64, clock: Clock) -> Result<Self, CoreError> {
        Ok(TokenBucket { params: BucketParams::new(rate, burst, priority_reserve)?, clock, tat: AtomicU64::new(0) })
    }
    pub fn params(&self) -> &BucketParams {
        &self.params
    }
    /// Takes `cost` tokens for `lane`, or returns the exact wait in ns.
    #[inline]
    pub fn try_take(&self, cost: u64, lane: Lane) -> Result<(), u64> {
        take_on(&self.tat, self.clock.now_ns(), cost, lane, &self.params)
    }
    pub fn adjust(&self, delta: i64) {
        adjust_on(&self.tat, self.clock.now_ns(), delta, &self.params)
    }
    pub fn available(&self) -> f64 {
        available_on(&self.tat, self.clock.now_ns(), &self.params)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Arc;

    fn manual(rate: f64, burst: f64, reserve: f64) -> (TokenBucket, Arc<ManualClock>) {
        let c = Arc::new(ManualClock::new(1_000_000_000));
        (TokenBucket::new(rate, burst, reserve, Clock::Manual(c.clone())).unwrap(), c)
    }

    #[test]
    fn full_bucket_allows_burst_then_refuses_with_exact_wait() {
        let (b, _) = manual(10.0, 5.0, 0.0);
        for _ in 0..5 {
            assert_eq!(b.try_take(1, Lane::Default), Ok(()));
        }
        // Next token refills 100 ms after the first was taken.
        assert_eq!(b.try_take(1, Lane::Default), Err(100_000_000));
    }

    #[test]
    fn retry_after_is_exact_on_the_manual_clock() {
        let (b, c) = manual(10.0, 5.0, 0.0);
        for _ in 0..5 {
            b.try_take(1, Lane::Default).unwrap();
        }
        let wait = b.try_take(1, Lane::Default).unwrap_err();
        c.advance_ns(wait - 1);
        assert_eq!(b.try_take(1, Lane::Default), Err(1));
        c.advance_ns(1);
        assert_eq!(b.try_take(1, Lane::Default), Ok(()));
    }

    #[test]
    fn default_lane_leaves_the_priority_reserve() {
        let (b, _) = manual(10.0, 10.0, 0.2);
        for _ in 0..8 {
            assert_eq!(b.try_take(1, Lane::Default), Ok(()));
        }
        assert!(b.try_take(1, Lane::Default).is_err());
        assert_eq!(b.try_take(1, Lane::Priority), Ok(()));
        assert_eq!(b.try_take(1, Lane::Priority), Ok(()));
        assert!(b.try_take(1, Lane::Priority).is_err());
    }

    #[test]
    fn cost_above_one_and_cost_that_never_fits() {
        let (b, _) = manual(100.0, 10.0, 0.0);
        assert_eq!(b.try_take(7, Lane::Default), Ok(()));
        assert_eq!(b.try_take(4, Lane::Default), Err(10_000_000));
        assert_eq!(b.try_take(11, Lane::Priority), Err(u64::MAX));
    }

    #[test]
    fn refund_never_overfills() {
        let (b, _) = manual(10.0, 5.0, 0.0);
        b.try_take(3, Lane::Default).unwrap();
        b.adjust(-100);
        assert!((b.available() - 5.0).abs() < 1e-9);
        b.adjust(2);
        assert!((b.available() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn bad_settings_name_the_argument() {
        let e = BucketParams::new(-1.0, 1.0, 0.0).unwrap_err();
        assert!(e.to_string().starts_with("rate:"));
        assert!(BucketParams::new(1.0, 0.5, 0.0).unwrap_err().to_string().starts_with("burst:"));
        assert!(BucketParams::new(1.0, 2.0, 1.0).unwrap_err().to_string().starts_with("priority_reserve:"));
        assert!(BucketParams::new(f64::NAN, 2.0, 0.0).is_err());
    }
}
