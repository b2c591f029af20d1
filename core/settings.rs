//! A pool's admission settings: `FIELDS`, the one declaration of every
//! setting (name, how it is written, default, range, a line of doc) that the
//! Python side, the stub, the docs and the example are checked against;
//! `PoolSpec`, the settings as written, its defaults and bounds; and
//! `validate`, the one place that decides what is allowed and names the bad
//! key in its error (`CoreError::InvalidArgument`, `SettingsError` in Python).
//!
//! Adding a setting: one `Field` in `FIELDS`, its `PoolSpec` field and arm in
//! `PoolSpec::set`, its check in `validate`; then the lines the declaration
//! test (tests/test_settings_declared.py) asks for in `_core.pyi`,
//! docs/configuration.md and examples/tierq.toml.

use crate::bucket::BucketParams;
use crate::error::CoreError;
use crate::fair;
use crate::limit::LimitMode;
use crate::Lane;

/// A pool's settings as written (TOML keys, `PoolSettings(...)` keyword
/// arguments), before any check. `None` means "the default"; the defaults
/// are `FIELDS`' fallbacks and nowhere else. `validate` is the one place that
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
    /// Per lane, indexed by `Lane as usize` (priority, default, flex), in ms.
    pub max_wait_ms: [f64; 3],
    pub rate: Option<f64>,
    pub burst: Option<f64>,
    pub priority_reserve: f64,
    /// false: the token bucket's sheds are counted (shadow mode), not applied.
    pub enforce: bool,
    pub default_min_share: f64,
    pub priority_headroom: i64,
    /// Share of the limit flex may not take (besides the priority headroom).
    pub flex_headroom: f64,
    /// Slots a default request may not take while a flex request waits.
    pub flex_priority_reserve: i64,
    /// How often the engine's metrics are scraped (the upstream's
    /// `metrics_interval_ms`); samples closer than half of it to the last one
    /// applied are dropped, so N workers scraping one engine act as one.
    pub engine_interval_ms: f64,
    /// `"tokens"` (weighted fair queuing inside each lane, `fair.rs`) or
    /// `"off"` (first come, first served, as before fairness).
    pub fairness: String,
    /// Flow queues per lane (`fair.rs`).
    pub fair_queues: i64,
}

/// How a lane orders its waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fairness {
    /// The waiting flow queue with the least service goes next (VTC).
    Tokens,
    /// First come, first served.
    Off,
}

impl Fairness {
    pub fn as_str(self) -> &'static str {
        match self {
            Fairness::Tokens => "tokens",
            Fairness::Off => "off",
        }
    }
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
/// Most waiters a pool may queue: the three lanes' counts share one word
/// (`block::DEPTH_BITS` bits each).
pub const MAX_QUEUE_DEPTH: i64 = (1 << crate::block::DEPTH_BITS) - 1;

/// How a setting is written (TOML, or a Python keyword argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    /// An integer or a float.
    Number,
    /// An integer, or `"auto"`.
    IntOrAuto,
    /// Milliseconds: one number for every lane, or a table of lane to number
    /// (a lane left out keeps its default).
    LaneMs,
    /// One of these strings.
    Choice(&'static [&'static str]),
    /// `true` or `false`.
    Bool,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Int => "int",
            Kind::Number => "number",
            Kind::IntOrAuto => "int_or_auto",
            Kind::LaneMs => "lane_ms",
            Kind::Choice(_) => "choice",
            Kind::Bool => "bool",
        }
    }
}

/// A setting's value as written, of its field's `Kind`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(i64),
    Number(f64),
    /// `"auto"` (`Kind::IntOrAuto`).
    Auto,
    /// Per lane, indexed by `Lane as usize`; `None` keeps that lane's value.
    LaneMs([Option<f64>; 3]),
    /// One of its `Kind::Choice` strings.
    Choice(&'static str),
    Bool(bool),
}

/// What applies to a setting not given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fallback {
    /// This value (a fresh `PoolSpec` holds it).
    Value(Value),
    /// With an adaptive limit, this value (`validate` applies it).
    Adaptive(i64),
    /// Nothing; the text says what that means.
    Absent(&'static str),
}

/// One setting, declared once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub fallback: Fallback,
    /// What `validate` allows, as docs/configuration.md writes it.
    pub range: &'static str,
    /// A key of `[models.admission]`; false for a setting tierq derives
    /// from other configuration.
    pub toml: bool,
    pub doc: &'static str,
}

/// Every setting, in the order the docs list them.
pub const FIELDS: &[Field] = &[
    Field {
        name: "max_concurrency",
        kind: Kind::IntOrAuto,
        fallback: Fallback::Absent("absent: adaptive"),
        range: "1 - 1,000,000, or `\"auto\"`",
        toml: true,
        doc: "requests in flight to the upstream: an integer fixes the limit, absent or \"auto\" learns it",
    },
    Field {
        name: "min_concurrency",
        kind: Kind::Int,
        fallback: Fallback::Adaptive(DEFAULT_MIN_CONCURRENCY),
        range: "1 - 1,000,000, adaptive only",
        toml: true,
        doc: "the adaptive limit never goes below it",
    },
    Field {
        name: "max_concurrency_limit",
        kind: Kind::Int,
        fallback: Fallback::Adaptive(DEFAULT_MAX_CONCURRENCY_LIMIT),
        range: "`min_concurrency` - 1,000,000, adaptive only",
        toml: true,
        doc: "the adaptive limit never goes above it",
    },
    Field {
        name: "initial_concurrency",
        kind: Kind::Int,
        fallback: Fallback::Adaptive(DEFAULT_INITIAL_CONCURRENCY),
        range: "`min_concurrency` - `max_concurrency_limit`, adaptive only",
        toml: true,
        doc: "where the adaptive limit starts (clamped to its bounds when not given)",
    },
    Field {
        name: "queue_depth",
        kind: Kind::Int,
        fallback: Fallback::Value(Value::Int(1024)),
        range: "0 - 2,097,151",
        toml: true,
        doc: "waiters in all three lanes together",
    },
    Field {
        name: "max_wait_ms",
        kind: Kind::LaneMs,
        fallback: Fallback::Value(Value::LaneMs([Some(60_000.0), Some(30_000.0), Some(600_000.0)])),
        range: "0 - 86,400,000",
        toml: true,
        doc: "longest wait in each lane before a queue_timeout (flex: resource_unavailable); one number sets every lane",
    },
    Field {
        name: "rate",
        kind: Kind::Number,
        fallback: Fallback::Absent("none (no rate limit)"),
        range: "> 0",
        toml: true,
        doc: "admissions per second (token bucket)",
    },
    Field {
        name: "burst",
        kind: Kind::Number,
        fallback: Fallback::Absent("`rate`"),
        range: ">= 1, needs `rate`",
        toml: true,
        doc: "the token bucket's size",
    },
    Field {
        name: "priority_reserve",
        kind: Kind::Number,
        fallback: Fallback::Value(Value::Number(0.2)),
        range: ">= 0, < 1",
        toml: true,
        doc: "share of the bucket only priority requests may take",
    },
    Field {
        name: "enforce",
        kind: Kind::Bool,
        fallback: Fallback::Value(Value::Bool(true)),
        range: "`true` or `false`, needs `rate`",
        toml: true,
        doc: "false: shadow mode, the rate limit's sheds are counted (tierq_shadow_decisions_total) and not applied; the queue's own bounds still apply",
    },
    Field {
        name: "default_min_share",
        kind: Kind::Number,
        fallback: Fallback::Value(Value::Number(0.0)),
        range: "0 - 1",
        toml: true,
        doc: "share of dispatches kept for the default lane while both lanes wait (0: strict priority)",
    },
    Field {
        name: "priority_headroom",
        kind: Kind::Int,
        fallback: Fallback::Value(Value::Int(0)),
        range: "0 - (`max_concurrency` or `min_concurrency`) - 1",
        toml: true,
        doc: "slots a default request may not take",
    },
    Field {
        name: "flex_headroom",
        kind: Kind::Number,
        fallback: Fallback::Value(Value::Number(0.1)),
        range: "0 - 0.5",
        toml: true,
        doc: "share of the limit (at least one slot), beyond priority_headroom or flex_priority_reserve, that a flex request may not take",
    },
    Field {
        name: "flex_priority_reserve",
        kind: Kind::Int,
        fallback: Fallback::Value(Value::Int(2)),
        range: "0 or more; cut to (`max_concurrency` or `max_concurrency_limit`) - 1, and at a limit L to L - 1 - the flex headroom's slots",
        toml: true,
        doc: "slots a default request may not take while a flex request waits (the larger of it and priority_headroom applies), so priority finds them though flex fills the rest; flex stays below the limit minus it minus the flex headroom; 0 on a model without priority",
    },
    Field {
        name: "fairness",
        kind: Kind::Choice(&["tokens", "off"]),
        fallback: Fallback::Value(Value::Choice("tokens")),
        range: "`\"tokens\"` or `\"off\"`",
        toml: true,
        doc: "inside a lane: the flow with the least service (tokens over weight) goes next; \"off\": first come, first served",
    },
    Field {
        name: "fair_queues",
        kind: Kind::Int,
        fallback: Fallback::Value(Value::Int(fair::DEFAULT_QUEUES as i64)),
        range: "1 - 4,096",
        toml: true,
        doc: "flow queues per lane; each flow hashes to two and joins the shorter",
    },
    Field {
        name: "engine_interval_ms",
        kind: Kind::Number,
        fallback: Fallback::Value(Value::Number(100.0)),
        range: "1 - 60,000",
        toml: false,
        doc: "how often the engine's metrics are read: the upstream's metrics_interval_ms",
    },
];

/// The declared setting `name`.
pub fn field(name: &str) -> Option<&'static Field> {
    FIELDS.iter().find(|f| f.name == name)
}

impl Field {
    /// The default as docs/configuration.md writes it.
    pub fn default_text(&self) -> String {
        match self.fallback {
            Fallback::Value(Value::Int(n)) | Fallback::Adaptive(n) => format!("`{n}`"),
            Fallback::Value(Value::Number(x)) => format!("`{x:?}`"),
            Fallback::Value(Value::LaneMs([p, d, f])) => {
                let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
                format!("`{{ default = {}, priority = {}, flex = {} }}`", ms(d), ms(p), ms(f))
            }
            Fallback::Value(Value::Auto) => "`\"auto\"`".to_string(),
            Fallback::Value(Value::Choice(c)) => format!("`{c:?}`"),
            Fallback::Value(Value::Bool(b)) => format!("`{b}`"),
            Fallback::Absent(text) => text.to_string(),
        }
    }
}

impl Default for PoolSpec {
    /// Every `Fallback::Value` of `FIELDS`; the rest absent.
    fn default() -> Self {
        let mut spec = PoolSpec {
            max_concurrency: None,
            min_concurrency: None,
            max_concurrency_limit: None,
            initial_concurrency: None,
            queue_depth: 0,
            max_wait_ms: [0.0; 3],
            rate: None,
            burst: None,
            priority_reserve: 0.0,
            enforce: true,
            default_min_share: 0.0,
            priority_headroom: 0,
            flex_headroom: 0.0,
            flex_priority_reserve: 0,
            engine_interval_ms: 0.0,
            fairness: String::new(),
            fair_queues: 0,
        };
        for f in FIELDS {
            if let Fallback::Value(v) = f.fallback {
                // Of the field's own kind (a unit test checks): cannot fail.
                let _ = spec.set(f.name, v);
            }
        }
        spec
    }
}

impl PoolSpec {
    /// A fixed limit of `n` with the other settings at their defaults.
    pub fn fixed(n: i64) -> Self {
        PoolSpec { max_concurrency: Some(n), ..PoolSpec::default() }
    }

    /// Sets the declared setting `name` to `v` as written (`validate` checks
    /// the range). An unknown name, or a value not of its `Kind`, is an error
    /// naming the key.
    pub fn set(&mut self, name: &str, v: Value) -> Result<(), CoreError> {
        let Some(f) = field(name) else {
            return Err(CoreError::arg("setting", format!("unknown setting {name:?}")));
        };
        match (f.name, v) {
            ("max_concurrency", Value::Int(n)) => self.max_concurrency = Some(n),
            ("max_concurrency", Value::Auto) => self.max_concurrency = None,
            ("min_concurrency", Value::Int(n)) => self.min_concurrency = Some(n),
            ("max_concurrency_limit", Value::Int(n)) => self.max_concurrency_limit = Some(n),
            ("initial_concurrency", Value::Int(n)) => self.initial_concurrency = Some(n),
            ("queue_depth", Value::Int(n)) => self.queue_depth = n,
            ("max_wait_ms", Value::LaneMs(lanes)) => {
                for (lane, ms) in lanes.into_iter().enumerate() {
                    if let Some(ms) = ms {
                        self.max_wait_ms[lane] = ms;
                    }
                }
            }
            ("rate", Value::Number(x)) => self.rate = Some(x),
            ("burst", Value::Number(x)) => self.burst = Some(x),
            ("priority_reserve", Value::Number(x)) => self.priority_reserve = x,
            ("enforce", Value::Bool(b)) => self.enforce = b,
            ("default_min_share", Value::Number(x)) => self.default_min_share = x,
            ("priority_headroom", Value::Int(n)) => self.priority_headroom = n,
            ("flex_headroom", Value::Number(x)) => self.flex_headroom = x,
            ("flex_priority_reserve", Value::Int(n)) => self.flex_priority_reserve = n,
            ("engine_interval_ms", Value::Number(x)) => self.engine_interval_ms = x,
            ("fairness", Value::Choice(c)) => self.fairness = c.to_string(),
            ("fair_queues", Value::Int(n)) => self.fair_queues = n,
            (name, v) => return Err(CoreError::arg(f.name, format!("{v:?} is not a value of {name} ({})", f.kind.as_str()))),
        }
        Ok(())
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
        let mut max_wait_ns = [0; 3];
        for lane in Lane::ALL {
            max_wait_ns[lane as usize] = wait(lane.max_wait_key(), self.max_wait_ms[lane as usize])?;
        }
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
        if !self.enforce && bucket.is_none() {
            return Err(CoreError::arg("enforce", "false needs rate (shadow mode tries the rate limit without applying it)"));
        }
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
        if self.flex_priority_reserve < 0 {
            return Err(CoreError::arg("flex_priority_reserve", format!("must be at least 0, got {}", self.flex_priority_reserve)));
        }
        // Cut to the limit's maximum less one; at a smaller limit
        // `PoolSettings::reserve_at` cuts it further, so that defaults and
        // flex keep a slot (an adaptive limit below the reserve near its
        // minimum uses what it has, rather than the minimum's for good).
        let flex_priority_reserve = self.flex_priority_reserve.min(limit.max() as i64 - 1) as u32;
        if !(self.flex_headroom.is_finite() && (0.0..=0.5).contains(&self.flex_headroom)) {
            return Err(CoreError::arg("flex_headroom", format!("must be between 0 and 0.5 (a share of the limit), got {}", self.flex_headroom)));
        }
        let ms = self.engine_interval_ms;
        if !(ms.is_finite() && (1.0..=60_000.0).contains(&ms)) {
            return Err(CoreError::arg("engine_interval_ms", format!("must be between 1 and 60000, got {ms}")));
        }
        let fairness = match self.fairness.as_str() {
            "tokens" => Fairness::Tokens,
            "off" => Fairness::Off,
            other => return Err(CoreError::arg("fairness", format!("must be \"tokens\" or \"off\", got {other:?}"))),
        };
        if !(1..=fair::MAX_QUEUES as i64).contains(&self.fair_queues) {
            return Err(CoreError::arg("fair_queues", format!("must be between 1 and {}, got {}", fair::MAX_QUEUES, self.fair_queues)));
        }
        Ok(PoolSettings {
            fairness,
            fair_queues: self.fair_queues as u32,
            limit,
            queue_depth: self.queue_depth as u32,
            max_wait_ns,
            bucket,
            enforce: self.enforce,
            default_min_share: self.default_min_share,
            priority_headroom: self.priority_headroom as u32,
            flex_headroom: self.flex_headroom,
            flex_priority_reserve,
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
    pub max_wait_ns: [u64; 3],
    pub bucket: Option<BucketParams>,
    /// false: a bucket refusal is counted (`at::SHADOW_RATE`) and the
    /// request goes on as if the bucket had let it through, taking nothing
    /// from it (what enforcing would have left there).
    pub enforce: bool,
    pub default_min_share: f64,
    /// Slots a default request may not take: defaults are admitted only while
    /// fewer than `limit - priority_headroom` slots are in use, so a priority
    /// arrival finds a free slot instead of waiting for one to end. Below the
    /// limit's minimum, so defaults always have a slot.
    pub priority_headroom: u32,
    /// Share of the limit (0 to 0.5) a flex request may not take beyond the
    /// priority headroom, at least one slot (`flex_headroom_slots`): flex is
    /// dispatched only below `limit - priority_headroom - that`, so it never
    /// holds the slot a default arrival needs.
    pub flex_headroom: f64,
    /// Slots a default request may not take while a flex request waits
    /// (the larger of it and `priority_headroom` applies then): flex fills
    /// what defaults leave, so this keeps priority's slots free of both.
    /// Flex stays below `limit - max(priority_headroom, this) - flex
    /// headroom`. Below the limit's maximum; in force at a limit as
    /// `reserve_at` cuts it.
    pub flex_priority_reserve: u32,
    pub engine_interval_ns: u64,
    pub fairness: Fairness,
    pub fair_queues: u32,
}

impl PoolSettings {
    /// Cells per lane ring: room for the whole queue in one lane plus as many
    /// tombstones again (cancelled waiters wait for the head to pass them).
    pub fn ring_cap(&self) -> usize {
        ((self.queue_depth as usize).max(1) * 2).next_power_of_two().max(8)
    }

    /// Slots of a limit of `limit` a flex request may not take beyond the
    /// priority headroom: the share rounded up, at least one.
    pub fn flex_headroom_slots(&self, limit: u64) -> u64 {
        ((self.flex_headroom * limit as f64).ceil() as u64).max(1)
    }

    /// The reserve in force at a limit of `limit`: `flex_priority_reserve`,
    /// less what would leave flex no slot beyond it and the flex headroom
    /// (an adaptive limit near its minimum; 0 when the limit is too small).
    /// Flex runs below `limit - max(priority_headroom, this) - flex
    /// headroom`, so the flex headroom stays the defaults' however large the
    /// reserve is.
    #[inline]
    pub fn reserve_at(&self, limit: u64) -> u64 {
        (self.flex_priority_reserve as u64).min(limit.saturating_sub(1 + self.flex_headroom_slots(limit)))
    }

    /// Whether defaults may ever be kept from a free slot (a headroom, or a
    /// reserve while flex waits): then a release frees its slot and
    /// `dispatch`'s CAS decides who gets it, rather than handing it on.
    #[inline]
    pub fn may_reserve(&self) -> bool {
        self.priority_headroom > 0 || self.flex_priority_reserve > 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A value of `kind` (what a caller writing that kind would pass).
    fn sample(kind: Kind) -> Value {
        match kind {
            Kind::Int => Value::Int(3),
            Kind::Number => Value::Number(0.5),
            Kind::IntOrAuto => Value::Int(3),
            Kind::LaneMs => Value::LaneMs([Some(1.0), None, None]),
            Kind::Choice(choices) => Value::Choice(choices[choices.len() - 1]),
            Kind::Bool => Value::Bool(false),
        }
    }

    #[test]
    fn every_declared_setting_takes_a_value_of_its_kind_and_its_fallback() {
        for f in FIELDS {
            let mut spec = PoolSpec::default();
            assert_eq!(spec.set(f.name, sample(f.kind)), Ok(()), "{}", f.name);
            if let Fallback::Value(v) = f.fallback {
                assert_eq!(spec.set(f.name, v), Ok(()), "{}: its fallback is not of its kind", f.name);
            }
        }
        PoolSpec::default().validate().expect("the declared defaults are valid");
    }

    #[test]
    fn a_setting_changes_only_its_own_field() {
        for f in FIELDS {
            let mut spec = PoolSpec::default();
            spec.set(f.name, sample(f.kind)).unwrap();
            let moved = FIELDS.iter().filter(|g| {
                let mut other = PoolSpec::default();
                other.set(g.name, sample(g.kind)).unwrap();
                other == spec
            });
            assert_eq!(moved.map(|g| g.name).collect::<Vec<_>>(), vec![f.name]);
        }
    }

    #[test]
    fn an_unknown_setting_or_a_value_of_another_kind_is_an_error_naming_it() {
        let mut spec = PoolSpec::default();
        assert!(matches!(spec.set("max_concurency", Value::Int(1)), Err(CoreError::InvalidArgument { name: "setting", .. })));
        assert!(matches!(spec.set("queue_depth", Value::Number(1.0)), Err(CoreError::InvalidArgument { name: "queue_depth", .. })));
        assert_eq!(spec, PoolSpec::default());
    }

    #[test]
    fn defaults_read_as_the_docs_write_them() {
        let text = |name| field(name).unwrap().default_text();
        assert_eq!(text("max_wait_ms"), "`{ default = 30000, priority = 60000, flex = 600000 }`");
        assert_eq!(text("priority_reserve"), "`0.2`");
        assert_eq!(text("min_concurrency"), format!("`{DEFAULT_MIN_CONCURRENCY}`"));
        assert_eq!(text("rate"), "none (no rate limit)");
    }
}
