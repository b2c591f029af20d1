//! A pool's admission settings: `PoolSpec` as written (TOML keys, the
//! `PoolSettings(...)` keyword arguments), its defaults and bounds, and
//! `validate`, the one place that decides what is allowed and names the bad
//! key in its error (`CoreError::InvalidArgument`, `SettingsError` in Python).

use crate::bucket::BucketParams;
use crate::error::CoreError;
use crate::limit::LimitMode;
use crate::Lane;

/// A pool's settings as written (TOML keys, `PoolSettings(...)` keyword
/// arguments), before any check. `None` means "the default"; the defaults
/// live here and nowhere else (`Default`). `validate` is the one place that
/// decides what is allowed; its errors name the key.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    /// `Some(n)`: a fixed limit of n. `None`: adaptive.
    pub max_concurrency: Option<i64>,
    /// Adaptive bounds and start; only with an adaptive limit.
    pub min_concurrency: Option<i64>,
    pub max_concurrency_limit: Option<i64>,
    pub initial_concurrency: Option<i64>,
    pub queue_depth: i64,
    /// Per lane, indexed by `Lane as usize` (priority, default), in ms.
    pub max_wait_ms: [f64; 2],
    pub rate: Option<f64>,
    pub burst: Option<f64>,
    pub priority_reserve: f64,
    pub default_min_share: f64,
    pub priority_headroom: i64,
    /// How often the engine's metrics are scraped (the upstream's
    /// `metrics_interval_ms`); samples closer than half of it to the last one
    /// applied are dropped, so N workers scraping one engine act as one.
    pub engine_interval_ms: f64,
}

/// Adaptive defaults (docs/configuration.md): at least 2 slots, so a
/// priority headroom of 1 is allowed and a back-off never serialises the
/// upstream; at most 1024, which bounds the mailboxes sized for it; a start
/// of 4, below any engine's batch, so the first requests never queue inside
/// an engine (where priority buys nothing); slow start takes it from there
/// (x1.5 a sample or window: 256 in 11 engine samples).
pub const DEFAULT_MIN_CONCURRENCY: i64 = 2;
pub const DEFAULT_MAX_CONCURRENCY_LIMIT: i64 = 1024;
pub const DEFAULT_INITIAL_CONCURRENCY: i64 = 4;
/// Most slots a pool may have, fixed or as an adaptive bound.
pub const MAX_SLOTS: i64 = 1_000_000;
/// Most waiters a pool may queue.
pub const MAX_QUEUE_DEPTH: i64 = 1 << 24;

impl Default for PoolSpec {
    fn default() -> Self {
        PoolSpec {
            max_concurrency: None,
            min_concurrency: None,
            max_concurrency_limit: None,
            initial_concurrency: None,
            queue_depth: 1024,
            max_wait_ms: [60_000.0, 30_000.0],
            rate: None,
            burst: None,
            priority_reserve: 0.2,
            default_min_share: 0.0,
            priority_headroom: 0,
            engine_interval_ms: 100.0,
        }
    }
}

impl PoolSpec {
    /// A fixed limit of `n` with the other settings at their defaults.
    pub fn fixed(n: i64) -> Self {
        PoolSpec { max_concurrency: Some(n), ..PoolSpec::default() }
    }

    /// Checks every setting; the error names the first bad key.
    pub fn validate(&self) -> Result<PoolSettings, CoreError> {
        let slots = |name, v: i64| {
            if (1..=MAX_SLOTS).contains(&v) {
                Ok(v as u32)
            } else {
                Err(CoreError::arg(name, format!("must be between 1 and {MAX_SLOTS}, got {v}")))
            }
        };
        let limit = match self.max_concurrency {
            Some(n) => {
                for (name, v) in [
                    ("min_concurrency", self.min_concurrency),
                    ("max_concurrency_limit", self.max_concurrency_limit),
                    ("initial_concurrency", self.initial_concurrency),
                ] {
                    if v.is_some() {
                        return Err(CoreError::arg(name, "only for an adaptive limit (max_concurrency absent or \"auto\")"));
                    }
                }
                LimitMode::Fixed(slots("max_concurrency", n)?)
            }
            None => {
                let min = slots("min_concurrency", self.min_concurrency.unwrap_or(DEFAULT_MIN_CONCURRENCY))?;
                let max = slots("max_concurrency_limit", self.max_concurrency_limit.unwrap_or(DEFAULT_MAX_CONCURRENCY_LIMIT))?;
                if max < min {
                    return Err(CoreError::arg(
                        "max_concurrency_limit",
                        format!("must be at least min_concurrency ({min}), got {max}"),
                    ));
                }
                let initial = match self.initial_concurrency {
                    Some(v) if !(min as i64..=max as i64).contains(&v) => {
                        return Err(CoreError::arg(
                            "initial_concurrency",
                            format!("must be between min_concurrency ({min}) and max_concurrency_limit ({max}), got {v}"),
                        ))
                    }
                    Some(v) => v as u32,
                    None => (DEFAULT_INITIAL_CONCURRENCY as u32).clamp(min, max),
                };
                LimitMode::Adaptive { min, max, initial }
            }
        };
        if !(0..=MAX_QUEUE_DEPTH).contains(&self.queue_depth) {
            return Err(CoreError::arg("queue_depth", format!("must be between 0 and {MAX_QUEUE_DEPTH}, got {}", self.queue_depth)));
        }
        let wait = |name, ms: f64| {
            if ms.is_finite() && (0.0..=86_400_000.0).contains(&ms) {
                Ok((ms * 1e6).round() as u64)
            } else {
                Err(CoreError::arg(name, format!("must be between 0 and 86400000 ms, got {ms}")))
            }
        };
        let max_wait_ns = [
            wait("max_wait_ms.priority", self.max_wait_ms[Lane::Priority as usize])?,
            wait("max_wait_ms.default", self.max_wait_ms[Lane::Default as usize])?,
        ];
        if !(self.priority_reserve.is_finite() && (0.0..1.0).contains(&self.priority_reserve)) {
            return Err(CoreError::arg(
                "priority_reserve",
                format!("must be at least 0 and below 1 (a share of burst kept for priority), got {}", self.priority_reserve),
            ));
        }
        let bucket = match (self.rate, self.burst) {
            (None, None) => None,
            (None, Some(_)) => return Err(CoreError::arg("burst", "needs rate (burst is the token bucket's size)")),
            (Some(r), b) => Some(BucketParams::new(r, b.unwrap_or(r.max(1.0)), self.priority_reserve)?),
        };
        if !(self.default_min_share.is_finite() && (0.0..=1.0).contains(&self.default_min_share)) {
            return Err(CoreError::arg("default_min_share", format!("must be between 0 and 1, got {}", self.default_min_share)));
        }
        let floor = limit.min() as i64;
        if !(0..floor).contains(&self.priority_headroom) {
            let bound = match limit {
                LimitMode::Fixed(_) => "max_concurrency",
                LimitMode::Adaptive { .. } => "min_concurrency",
            };
            return Err(CoreError::arg(
                "priority_headroom",
                format!("must be at least 0 and below {bound} ({floor}): defaults need a slot, got {}", self.priority_headroom),
            ));
        }
        let ms = self.engine_interval_ms;
        if !(ms.is_finite() && (1.0..=60_000.0).contains(&ms)) {
            return Err(CoreError::arg("engine_interval_ms", format!("must be between 1 and 60000, got {ms}")));
        }
        Ok(PoolSettings {
            limit,
            queue_depth: self.queue_depth as u32,
            max_wait_ns,
            bucket,
            default_min_share: self.default_min_share,
            priority_headroom: self.priority_headroom as u32,
            engine_interval_ns: (ms * 1e6).round() as u64,
        })
    }
}

/// Validated pool settings (made by `PoolSpec::validate`).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub limit: LimitMode,
    pub queue_depth: u32,
    /// Indexed by `Lane as usize`.
    pub max_wait_ns: [u64; 2],
    pub bucket: Option<BucketParams>,
    pub default_min_share: f64,
    /// Slots a default request may not take: defaults are admitted only while
    /// fewer than `limit - priority_headroom` slots are in use, so a priority
    /// arrival finds a free slot instead of waiting for one to end. Below the
    /// limit's minimum, so defaults always have a slot.
    pub priority_headroom: u32,
    pub engine_interval_ns: u64,
}

impl PoolSettings {
    /// Cells per lane ring: room for the whole queue in one lane plus as many
    /// tombstones again (cancelled waiters wait for the head to pass them).
    pub fn ring_cap(&self) -> usize {
        ((self.queue_depth as usize).max(1) * 2).next_power_of_two().max(8)
    }
}
