//! A pool's concurrency limit and the controller that moves it.
//!
//! The limit is one word of the pool's state block, in 1/1024ths of a slot
//! (`FP_ONE`): slots are whole, but the latency gradient moves it by
//! fractions, which must add up rather than round away. Every change is a
//! compare-and-swap around one of the pure functions below, so the rules are
//! tested here on plain numbers and the pool only supplies the inputs.
//!
//! Three signals feed it (DESIGN.md, "Slots"):
//! - **Engine metrics** (vLLM, SGLang, the sim): hold the engine's own waiting
//!   queue at zero. Waiting requests there mean the gateway let through more
//!   than the engine runs, so the limit is cut to what the engine does run of
//!   ours; then held a few samples while the excess drains; it grows only
//!   while the pool is saturated, the engine queue is empty and KV cache has
//!   room. This is TCP Vegas' idea with the queue measured instead of inferred.
//! - **Time to first token** (an opaque upstream): a gradient of the latency
//!   floor over the recent mean, applied once per window, in the manner of
//!   Netflix's Gradient2 and Envoy's adaptive concurrency filter.
//! - **Overload answers** (429/503 before anything reached the client): a
//!   multiplicative decrease, once per back-off window (AIMD's decrease).

/// Fixed-point shift of the limit word: `limit = word >> FP_SHIFT`.
pub const FP_SHIFT: u32 = 10;
pub const FP_ONE: u64 = 1 << FP_SHIFT;

/// How the limit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    /// Exactly `n` slots, never moved (`max_concurrency = n`).
    Fixed(u32),
    /// Learned within `[min, max]`, starting at `initial`.
    Adaptive { min: u32, max: u32, initial: u32 },
}

impl LimitMode {
    pub fn min(self) -> u32 {
        match self {
            LimitMode::Fixed(n) => n,
            LimitMode::Adaptive { min, .. } => min,
        }
    }
    /// The most slots the limit can ever be: what rings and mailboxes are sized for.
    pub fn max(self) -> u32 {
        match self {
            LimitMode::Fixed(n) => n,
            LimitMode::Adaptive { max, .. } => max,
        }
    }
    pub fn initial(self) -> u32 {
        match self {
            LimitMode::Fixed(n) => n,
            LimitMode::Adaptive { initial, .. } => initial,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            LimitMode::Fixed(_) => "fixed",
            LimitMode::Adaptive { .. } => "adaptive",
        }
    }
    /// Clamps a limit word to the bounds.
    #[inline]
    pub fn clamp_fp(self, fp: u64) -> u64 {
        fp.clamp((self.min() as u64) << FP_SHIFT, (self.max() as u64) << FP_SHIFT)
    }
}

/// Which signal moved the limit last (the `limit_signal` stat).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    None = 0,
    Engine = 1,
    Latency = 2,
    Backoff = 3,
}

impl Signal {
    pub fn from_word(w: u64) -> Signal {
        match w {
            1 => Signal::Engine,
            2 => Signal::Latency,
            3 => Signal::Backoff,
            _ => Signal::None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::None => "none",
            Signal::Engine => "engine",
            Signal::Latency => "latency",
            Signal::Backoff => "backoff",
        }
    }
}

/// What the pool looks like when a signal is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolView {
    /// Slots held host-wide.
    pub in_flight: u64,
    /// Waiters in tierq's lanes.
    pub waiters: u64,
}

impl PoolView {
    /// The limit is what holds requests back: every slot taken or a line formed.
    pub fn saturated(self, limit: u64) -> bool {
        self.waiters > 0 || self.in_flight >= limit
    }
}

// ------------------------------------------------------------------ engine

/// One scrape of the engine's own metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSample {
    /// Sequences the engine is running (vllm:num_requests_running).
    pub running: u64,
    /// Sequences queued inside the engine (vllm:num_requests_waiting).
    pub waiting: u64,
    /// KV cache usage in millionths, when the engine reports it.
    pub kv_usage_ppm: Option<u32>,
}

/// Slow start (TCP's): until a signal first lowers the limit, a signal that
/// would raise it multiplies it by this instead (engine sample or latency
/// window, while saturated). From the default start of 4, a 256-sequence
/// engine is reached in 11 samples (1.1 s), and an overshoot is at most half
/// the limit, queued in the engine for one sample.
pub const SLOW_START_NUM: u64 = 3;
pub const SLOW_START_DEN: u64 = 2;

#[inline]
fn slow_start_fp(fp: u64) -> u64 {
    // At least one slot more, so a limit of 1 still starts.
    (fp / SLOW_START_DEN * SLOW_START_NUM).max(fp + FP_ONE)
}

/// Samples with no increase after a cut: the cut's excess is draining.
pub const ENGINE_HOLD_SAMPLES: u32 = 3;
/// No increase while the KV cache is at least this full (millionths): the
/// engine would preempt or queue the next sequence.
pub const KV_FULL_PPM: u32 = 900_000;

/// The engine rule's outcome: the new limit word, the hold count and the
/// last cut's level (0: never cut) to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStep {
    pub fp: u64,
    pub hold: u32,
    pub cut_at: u64,
}

/// The engine rule. `hold` and `cut_at` are what the previous step left.
///
/// - The engine queues (`waiting > 0`):
///   - while more of ours are in flight than the limit (a cut is draining),
///     that queue is our own excess: hold, do not cut again;
///   - while it runs nothing, the sample caught it between two steps (or
///     stalled, its KV cache preempted): it says nothing about how many it
///     runs, so hold rather than cut to the minimum;
///   - else cut to what the engine runs of ours, `in_flight - waiting`, and
///     no higher than its `running` count; always by at least one slot.
///     Then hold for `ENGINE_HOLD_SAMPLES` samples.
/// - Its queue is empty: after a hold, with KV room (or no KV figure), and
///   only while the pool is saturated (else the limit is not what holds
///   requests back and nothing was learned), grow: by half during slow start
///   (`slow_start`: no signal has lowered the limit yet), then by one slot
///   near the last cut, by half the gap below it (coming back after a
///   back-off), and by a sixteenth far above it (the engine grew).
pub fn engine_step(mode: LimitMode, fp: u64, s: EngineSample, view: PoolView, hold: u32, cut_at: u64, slow_start: bool) -> EngineStep {
    let limit = fp >> FP_SHIFT;
    let keep = EngineStep { fp, hold: hold.saturating_sub(1), cut_at };
    if s.waiting > 0 {
        if view.in_flight > limit || s.running == 0 {
            return EngineStep { fp, hold: ENGINE_HOLD_SAMPLES, cut_at };
        }
        let ours_running = view.in_flight.saturating_sub(s.waiting).min(s.running);
        let target = ours_running.min(limit.saturating_sub(1));
        let fp = mode.clamp_fp(target << FP_SHIFT);
        return EngineStep { fp, hold: ENGINE_HOLD_SAMPLES, cut_at: fp >> FP_SHIFT };
    }
    if hold > 0 || s.kv_usage_ppm.is_some_and(|kv| kv >= KV_FULL_PPM) || !view.saturated(limit) {
        return keep;
    }
    if slow_start {
        return EngineStep { fp: mode.clamp_fp(slow_start_fp(fp)), hold: 0, cut_at };
    }
    let near = (cut_at / 8).max(2);
    let step = if limit < cut_at {
        ((cut_at - limit) / 2).max(1)
    } else if limit - cut_at <= near {
        1
    } else {
        (limit / 16).max(1)
    };
    // Whole slots: a fraction left by the gradient is kept.
    EngineStep { fp: mode.clamp_fp(fp + (step << FP_SHIFT)), hold: 0, cut_at }
}

// ----------------------------------------------------------------- latency

/// A latency window closes after this many samples once `WINDOW_MIN_NS` has
/// passed, or at `WINDOW_MAX_NS` with any samples: windows of a busy pool
/// are 100 ms, a quiet one still decides once a second.
pub const WINDOW_SAMPLES: u64 = 8;
pub const WINDOW_MIN_NS: u64 = 100_000_000;
pub const WINDOW_MAX_NS: u64 = 1_000_000_000;
/// Recent latency up to `TOLERANCE` times the floor counts as no queueing:
/// time to first token varies with prompt length even on an idle engine.
pub const TOLERANCE: f64 = 1.5;
/// Each window moves the limit this share of the way to the gradient's target.
pub const SMOOTHING: f64 = 0.25;
/// A window whose minimum is above the floor lifts the floor by this share
/// of the gap: the floor follows a backend that got slower for good in tens
/// of windows, while a queue (which lasts a few) barely moves it.
pub const FLOOR_DRIFT: u64 = 16;

/// The floor after a window whose fastest sample was `window_min` ns.
pub fn next_floor(floor: u64, window_min: u64) -> u64 {
    if floor == 0 || window_min <= floor {
        window_min
    } else {
        floor + (window_min - floor) / FLOOR_DRIFT
    }
}

/// The gradient rule, applied once per window: `gradient = clamp(TOLERANCE *
/// floor / recent, 0.5, 1)`. Below 1 (a queue formed upstream) the target is
/// `limit * gradient`; at 1 it is `limit + sqrt(limit)`, a probe upward (the
/// square root is Envoy's headroom). Unlike Gradient2, the allowance is not
/// added to a falling limit: at a small limit it outweighs the cut and holds
/// the limit above a backend that queues. The limit moves `SMOOTHING` of the
/// way to the target, and grows only while the pool is saturated: an idle
/// pool's latency says nothing about more load. During slow start a window
/// within tolerance multiplies the limit by 1.5 instead.
pub fn gradient_step(mode: LimitMode, fp: u64, floor_ns: u64, recent_ns: u64, view: PoolView, slow_start: bool) -> u64 {
    if floor_ns == 0 || recent_ns == 0 {
        return fp;
    }
    let limit = fp as f64 / FP_ONE as f64;
    let gradient = (TOLERANCE * floor_ns as f64 / recent_ns as f64).clamp(0.5, 1.0);
    if slow_start && gradient >= 1.0 {
        return if view.saturated(fp >> FP_SHIFT) { mode.clamp_fp(slow_start_fp(fp)) } else { fp };
    }
    let target = if gradient < 1.0 { limit * gradient } else { limit + limit.sqrt() };
    let next = limit + (target - limit) * SMOOTHING;
    let mut next_fp = (next * FP_ONE as f64) as u64;
    if !view.saturated(fp >> FP_SHIFT) {
        next_fp = next_fp.min(fp);
    }
    mode.clamp_fp(next_fp)
}

// ----------------------------------------------------------------- backoff

/// Back-off: the limit times 9/10 per overload.
pub const BACKOFF_NUM: u64 = 9;
pub const BACKOFF_DEN: u64 = 10;
/// One back-off per window of at least this long (or the latency floor, if
/// longer): the 429s of one overload arrive together and count once.
pub const BACKOFF_MIN_NS: u64 = 100_000_000;

pub fn backoff_step(mode: LimitMode, fp: u64) -> u64 {
    mode.clamp_fp(fp / BACKOFF_DEN * BACKOFF_NUM + fp % BACKOFF_DEN * BACKOFF_NUM / BACKOFF_DEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: LimitMode = LimitMode::Adaptive { min: 2, max: 64, initial: 16 };

    fn fp(n: u64) -> u64 {
        n << FP_SHIFT
    }
    fn sample(running: u64, waiting: u64) -> EngineSample {
        EngineSample { running, waiting, kv_usage_ppm: None }
    }
    fn view(in_flight: u64, waiters: u64) -> PoolView {
        PoolView { in_flight, waiters }
    }

    #[test]
    fn an_engine_queue_cuts_to_what_the_engine_runs_of_ours() {
        // 16 of ours in flight, the engine runs 8 and queues 8.
        let s = engine_step(M, fp(16), sample(8, 8), view(16, 30), 0, 0, false);
        assert_eq!(s, EngineStep { fp: fp(8), hold: ENGINE_HOLD_SAMPLES, cut_at: 8 });
        // Its running count bounds the cut when other clients queue there too.
        assert_eq!(engine_step(M, fp(16), sample(6, 2), view(16, 0), 0, 0, false).fp, fp(6));
        // Always at least one slot, never below min.
        assert_eq!(engine_step(M, fp(16), sample(40, 1), view(3, 0), 0, 0, false).fp, fp(2));
        assert_eq!(engine_step(M, fp(5), sample(40, 1), view(5, 0), 0, 0, false).fp, fp(4));
    }

    #[test]
    fn an_engine_caught_running_nothing_is_not_a_reason_to_cut() {
        let s = engine_step(M, fp(16), sample(0, 5), view(16, 3), 0, 0, false);
        assert_eq!(s, EngineStep { fp: fp(16), hold: ENGINE_HOLD_SAMPLES, cut_at: 0 });
    }

    #[test]
    fn a_draining_cut_is_not_cut_again() {
        // After a cut to 8, 16 are still in flight: the queue is our excess.
        let s = engine_step(M, fp(8), sample(8, 8), view(16, 10), 0, 8, false);
        assert_eq!(s, EngineStep { fp: fp(8), hold: ENGINE_HOLD_SAMPLES, cut_at: 8 });
    }

    #[test]
    fn after_a_cut_the_limit_holds_then_grows_only_while_saturated() {
        let mut st = EngineStep { fp: fp(8), hold: ENGINE_HOLD_SAMPLES, cut_at: 8 };
        for _ in 0..ENGINE_HOLD_SAMPLES {
            st = engine_step(M, st.fp, sample(8, 0), view(8, 5), st.hold, st.cut_at, false);
            assert_eq!(st.fp, fp(8));
        }
        assert_eq!(st.hold, 0);
        // Not saturated: nothing learned.
        assert_eq!(engine_step(M, st.fp, sample(5, 0), view(5, 0), 0, 8, false).fp, fp(8));
        // Saturated, near the last cut: one slot.
        assert_eq!(engine_step(M, st.fp, sample(8, 0), view(8, 0), 0, 8, false).fp, fp(9));
        // KV nearly full: hold.
        let kv = EngineSample { kv_usage_ppm: Some(950_000), ..sample(8, 0) };
        assert_eq!(engine_step(M, st.fp, kv, view(8, 3), 0, 8, false).fp, fp(8));
        let kv = EngineSample { kv_usage_ppm: Some(500_000), ..sample(8, 0) };
        assert_eq!(engine_step(M, st.fp, kv, view(8, 3), 0, 8, false).fp, fp(9));
    }

    #[test]
    fn growth_is_faster_far_from_the_last_cut() {
        // Below the last cut (a back-off took it there): half the gap.
        assert_eq!(engine_step(M, fp(10), sample(10, 0), view(10, 1), 0, 30, false).fp, fp(20));
        // Far above it: a sixteenth.
        assert_eq!(engine_step(M, fp(48), sample(48, 0), view(48, 1), 0, 20, false).fp, fp(51));
        // Slow start: half again, never past max; not while not saturated.
        assert_eq!(engine_step(M, fp(12), sample(12, 0), view(12, 1), 0, 0, true).fp, fp(18));
        assert_eq!(engine_step(M, fp(1), sample(1, 0), view(1, 1), 0, 0, true).fp, fp(2));
        assert_eq!(engine_step(M, fp(50), sample(50, 0), view(50, 1), 0, 0, true).fp, fp(64));
        assert_eq!(engine_step(M, fp(12), sample(5, 0), view(5, 0), 0, 0, true).fp, fp(12));
        // Never past max.
        assert_eq!(engine_step(M, fp(64), sample(64, 0), view(64, 1), 0, 20, false).fp, fp(64));
    }

    #[test]
    fn gradient_cuts_when_latency_rises_and_grows_when_it_falls_back() {
        let sat = view(16, 4);
        // Latency at 3x the floor: gradient 0.5.
        let down = gradient_step(M, fp(16), 100, 300, sat, false);
        assert!(down < fp(16), "{down}");
        // Within tolerance: grows by the smoothed allowance.
        let up = gradient_step(M, fp(16), 100, 140, sat, false);
        assert_eq!(up, fp(17));
        // Not saturated: never up, still down.
        assert_eq!(gradient_step(M, fp(16), 100, 140, view(3, 0), false), fp(16));
        assert!(gradient_step(M, fp(16), 100, 300, view(3, 0), false) < fp(16));
        // Slow start: within tolerance, half again; beyond it, the cut as ever.
        assert_eq!(gradient_step(M, fp(16), 100, 140, sat, true), fp(24));
        assert_eq!(gradient_step(M, fp(16), 100, 300, sat, true), down);
        assert_eq!(gradient_step(M, fp(16), 100, 140, view(3, 0), true), fp(16));
        // Bounds.
        assert_eq!(gradient_step(M, fp(2), 100, 10_000, sat, false), fp(2));
        assert_eq!(gradient_step(M, fp(64), 100, 100, sat, false), fp(64));
    }

    #[test]
    fn the_floor_drops_at_once_and_rises_slowly() {
        assert_eq!(next_floor(0, 500), 500);
        assert_eq!(next_floor(500, 300), 300);
        assert_eq!(next_floor(300, 1900), 400);
    }

    #[test]
    fn backoff_is_a_tenth_and_stops_at_min() {
        assert_eq!(backoff_step(M, fp(20)), fp(18));
        assert_eq!(backoff_step(M, fp(2)), fp(2));
        let mut f = fp(64);
        for _ in 0..100 {
            f = backoff_step(M, f);
        }
        assert_eq!(f, fp(2));
    }

    #[test]
    fn fixed_bounds_pin_every_rule() {
        let fixed = LimitMode::Fixed(8);
        assert_eq!(engine_step(fixed, fp(8), sample(1, 50), view(8, 9), 0, 0, false).fp, fp(8));
        assert_eq!(gradient_step(fixed, fp(8), 1, 1_000_000, view(8, 9), false), fp(8));
        assert_eq!(backoff_step(fixed, fp(8)), fp(8));
    }
}
