//! The Python face of the core (`tierq._core`). The only file that imports
//! pyo3: it converts arguments, maps `CoreError` to `ValueError` in one place,
//! and never waits or blocks while holding the GIL (every call is nanoseconds).

use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::admission::{Admit, Ask, Outcome, Pool, ShedCode};
use crate::fair;
use crate::settings::{self, Kind, PoolSettings, PoolSpec, Value};
use crate::limit::LimitMode;
use crate::clock::{Clock, ManualClock};
use crate::error::CoreError;
use crate::keytable::{KeyTable, BUDGET, RAMP, RPM, TPM};
use crate::ledger;
use crate::{bucket, Lane};

create_exception!(
    _core,
    SettingsError,
    PyValueError,
    "A bad setting or argument; `key` names it (e.g. \"max_wait_ms.default\") and `reason` says why."
);

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        match e {
            CoreError::InvalidArgument { name, ref reason } => Python::attach(|py| {
                let err = SettingsError::new_err(e.to_string());
                let value = err.value(py);
                // Setting attributes on a fresh exception instance cannot fail.
                let _ = value.setattr("key", name);
                let _ = value.setattr("reason", reason.as_str());
                err
            }),
            CoreError::Layout(_) => PyValueError::new_err(e.to_string()),
            CoreError::Os(_) | CoreError::Ledger(_) => PyOSError::new_err(e.to_string()),
        }
    }
}

fn lane_of(lane: u8) -> PyResult<Lane> {
    Lane::from_index(lane.into()).ok_or_else(|| {
        let each = Lane::ALL.map(|l| format!("{} ({})", l as usize, l.as_str())).join(" or ");
        CoreError::arg("lane", format!("must be {each}, got {lane}")).into()
    })
}

/// A `{lane name: value}` dict, in lane order (`TIERS`).
fn per_lane<'py, T: IntoPyObject<'py> + Copy>(py: Python<'py>, v: [T; 3]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for lane in Lane::ALL {
        d.set_item(lane.as_str(), v[lane as usize])?;
    }
    Ok(d)
}

fn cost_of(cost: i64) -> PyResult<u64> {
    if cost < 1 {
        return Err(CoreError::arg("cost", format!("must be at least 1, got {cost}")).into());
    }
    Ok(cost as u64)
}

fn clock_of(clock: Option<&Bound<'_, PyManualClock>>) -> Clock {
    clock.map_or(Clock::Monotonic, |c| Clock::Manual(c.get().0.clone()))
}

/// A clock that moves only when told to; pass it as `clock=` to make timing exact in tests.
#[pyclass(name = "ManualClock", module = "tierq._core", frozen)]
pub struct PyManualClock(Arc<ManualClock>);

#[pymethods]
impl PyManualClock {
    #[new]
    #[pyo3(signature = (start_ns = 1_000_000_000))]
    fn new(start_ns: u64) -> Self {
        PyManualClock(Arc::new(ManualClock::new(start_ns)))
    }
    fn now_ns(&self) -> u64 {
        self.0.now_ns()
    }
    fn advance_ns(&self, ns: u64) -> u64 {
        self.0.advance_ns(ns)
    }
    /// Moves the clock forward by `seconds` (float); returns the new time in ns.
    fn advance(&self, seconds: f64) -> PyResult<u64> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(CoreError::arg("seconds", format!("must be a non-negative number, got {seconds}")).into());
        }
        Ok(self.0.advance_ns((seconds * 1e9).round() as u64))
    }
}

/// GCRA token bucket: `try_take` returns None when taken, else the exact wait in seconds.
#[pyclass(name = "TokenBucket", module = "tierq._core", frozen)]
pub struct PyTokenBucket(bucket::TokenBucket);

#[pymethods]
impl PyTokenBucket {
    #[new]
    #[pyo3(signature = (rate, burst = None, priority_reserve = 0.0, clock = None))]
    fn new(rate: f64, burst: Option<f64>, priority_reserve: f64, clock: Option<&Bound<'_, PyManualClock>>) -> PyResult<Self> {
        let burst = burst.unwrap_or(rate.max(1.0));
        Ok(PyTokenBucket(bucket::TokenBucket::new(rate, burst, priority_reserve, clock_of(clock))?))
    }

    #[pyo3(signature = (cost = 1, tier = "default"))]
    fn try_take(&self, cost: i64, tier: &str) -> PyResult<Option<f64>> {
        let lane = Lane::parse(tier)?;
        Ok(match self.0.try_take(cost_of(cost)?, lane) {
            Ok(()) => None,
            Err(u64::MAX) => Some(f64::INFINITY),
            Err(wait_ns) => Some(wait_ns as f64 / 1e9),
        })
    }

    /// Takes `delta` more tokens unchecked (> 0) or refunds them (< 0).
    fn adjust(&self, delta: i64) {
        self.0.adjust(delta)
    }

    fn available(&self) -> f64 {
        self.0.available()
    }
}

/// One pool's admission state. `tierq.Admission` wraps this with futures; the
/// outcome of `admit` is a tuple so the hot path allocates nothing else.
#[pyclass(name = "AdmissionCore", module = "tierq._core", frozen)]
pub struct PyAdmissionCore(Pool);

const NONE: i64 = -1;

fn opt(id: Option<u64>) -> i64 {
    id.map_or(NONE, |v| v as i64)
}

/// A bad value as an error shows it: as it would read in TOML (the
/// configuration file passes its values through unchanged).
fn shown(v: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(b) = v.cast::<pyo3::types::PyBool>() {
        return Ok(if b.is_true() { "true" } else { "false" }.to_string());
    }
    if let Ok(s) = v.cast::<PyString>() {
        let text = format!("\"{}\"", s.to_str()?.replace('\\', "\\\\").replace('"', "\\\""));
        return Ok(if text.chars().count() <= 60 { text } else { text.chars().take(57).collect::<String>() + "...\"" });
    }
    if v.is_instance_of::<PyDict>() {
        return Ok("a table".to_string());
    }
    if v.is_instance_of::<pyo3::types::PyList>() || v.is_instance_of::<pyo3::types::PyTuple>() {
        return Ok("an array".to_string());
    }
    Ok(v.str()?.to_string())
}

fn int_arg(name: &'static str, v: &Bound<'_, PyAny>) -> PyResult<i64> {
    if !v.is_instance_of::<pyo3::types::PyBool>() {
        if let Ok(n) = v.extract::<i64>() {
            return Ok(n);
        }
    }
    Err(CoreError::arg(name, format!("expected an integer, got {}", shown(v)?)).into())
}

fn num_arg(name: &'static str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
    if !(v.is_instance_of::<pyo3::types::PyBool>() || v.is_instance_of::<PyString>()) {
        if let Ok(x) = v.extract::<f64>() {
            return Ok(x);
        }
    }
    Err(CoreError::arg(name, format!("expected a number, got {}", shown(v)?)).into())
}

/// A setting's Python value, type-checked against its declared `Kind`.
fn value_of(f: &'static settings::Field, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    Ok(match f.kind {
        Kind::Int => Value::Int(int_arg(f.name, v)?),
        Kind::Number => Value::Number(num_arg(f.name, v)?),
        Kind::IntOrAuto => {
            if let Ok(s) = v.cast::<PyString>() {
                if s.to_str()? == "auto" {
                    return Ok(Value::Auto);
                }
            }
            match int_arg(f.name, v) {
                Ok(n) => Value::Int(n),
                Err(_) => {
                    let reason = format!("expected an integer or \"auto\", got {}", shown(v)?);
                    return Err(CoreError::arg(f.name, reason).into());
                }
            }
        }
        Kind::Choice(choices) => {
            let given = v.cast::<PyString>().ok().map(|s| s.to_str().map(str::to_owned)).transpose()?;
            match given.as_deref().and_then(|g| choices.iter().find(|c| **c == g)) {
                Some(c) => Value::Choice(c),
                None => {
                    let one_of = choices.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(" or ");
                    return Err(CoreError::arg(f.name, format!("expected {one_of}, got {}", shown(v)?)).into());
                }
            }
        }
        Kind::Bool => match v.cast::<pyo3::types::PyBool>() {
            Ok(b) => Value::Bool(b.is_true()),
            Err(_) => return Err(CoreError::arg(f.name, format!("expected true or false, got {}", shown(v)?)).into()),
        },
        Kind::LaneMs => {
            let Ok(d) = v.cast::<PyDict>() else {
                let ms = num_arg(f.name, v)?;
                return Ok(Value::LaneMs([Some(ms); 3]));
            };
            let mut lanes = [None; 3];
            for (k, ms) in d.iter() {
                let name = k.extract::<String>();
                let Some(lane) = name.as_deref().ok().and_then(|l| Lane::parse(l).ok()) else {
                    let shown = match name {
                        Ok(l) => format!("{l:?}"),
                        Err(_) => k.repr()?.to_string(),
                    };
                    let mut names = Lane::ALL.map(|l| format!("{:?}", l.as_str()));
                    names.sort();
                    let reason = format!("unknown lane {shown} (lanes are {} and {})", names[..2].join(", "), names[2]);
                    return Err(CoreError::arg(f.name, reason).into());
                };
                lanes[lane as usize] = Some(num_arg(lane.max_wait_key(), &ms)?);
            }
            Value::LaneMs(lanes)
        }
    })
}

/// One declared setting (`PoolSettings.FIELDS`): how it is written, its
/// default and range as the docs write them, and whether it is a
/// `[models.admission]` key.
#[pyclass(name = "SettingField", module = "tierq._core", frozen)]
pub struct PySettingField(&'static settings::Field);

#[pymethods]
impl PySettingField {
    #[getter]
    fn name(&self) -> &'static str {
        self.0.name
    }
    /// "int", "number", "int_or_auto", "lane_ms", "choice" or "bool".
    #[getter]
    fn kind(&self) -> &'static str {
        self.0.kind.as_str()
    }
    #[getter]
    fn default(&self) -> String {
        self.0.default_text()
    }
    #[getter]
    fn range(&self) -> &'static str {
        self.0.range
    }
    #[getter]
    fn toml(&self) -> bool {
        self.0.toml
    }
    #[getter]
    fn doc(&self) -> &'static str {
        self.0.doc
    }
    fn __repr__(&self) -> String {
        format!("SettingField({:?}, {})", self.0.name, self.0.kind.as_str())
    }
}

/// A pool's validated settings: what `AdmissionCore`, `Admission` and the
/// shared-memory constructors take. Every argument is optional; the
/// defaults and the allowed ranges live in the core, and a bad value raises
/// `SettingsError` naming its key.
#[pyclass(name = "PoolSettings", module = "tierq._core", frozen)]
pub struct PyPoolSettings(PoolSettings);

#[pymethods]
impl PyPoolSettings {
    /// Every keyword is optional (None: the default) and one of `FIELDS`.
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut spec = PoolSpec::default();
        for (k, v) in kwargs.into_iter().flat_map(|d| d.iter()) {
            let name = k.cast::<PyString>()?.to_str()?.to_owned();
            let Some(f) = settings::field(&name) else {
                return Err(PyTypeError::new_err(format!("PoolSettings() got an unexpected keyword argument '{name}'")));
            };
            if !v.is_none() {
                spec.set(f.name, value_of(f, &v)?)?;
            }
        }
        Ok(PyPoolSettings(spec.validate()?))
    }

    /// The declared settings, in order (`settings.rs`).
    #[classattr]
    #[allow(non_snake_case)]
    fn FIELDS(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyTuple>> {
        let items = settings::FIELDS.iter().map(|f| Bound::new(py, PySettingField(f))).collect::<PyResult<Vec<_>>>()?;
        pyo3::types::PyTuple::new(py, items)
    }

    /// "fixed" or "adaptive".
    #[getter]
    fn limit_mode(&self) -> &'static str {
        self.0.limit.as_str()
    }
    #[getter]
    fn limit_min(&self) -> u32 {
        self.0.limit.min()
    }
    /// The most slots the limit can reach (a fixed limit's n): size
    /// connection pools by this.
    #[getter]
    fn limit_max(&self) -> u32 {
        self.0.limit.max()
    }
    #[getter]
    fn limit_initial(&self) -> u32 {
        self.0.limit.initial()
    }
    #[getter]
    fn queue_depth(&self) -> u32 {
        self.0.queue_depth
    }
    /// `{lane: ms}` for each lane (`TIERS`).
    #[getter]
    fn max_wait_ms<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        per_lane(py, self.0.max_wait_ns.map(|ns| ns as f64 / 1e6))
    }
    #[getter]
    fn priority_headroom(&self) -> u32 {
        self.0.priority_headroom
    }
    #[getter]
    fn flex_headroom(&self) -> f64 {
        self.0.flex_headroom
    }
    #[getter]
    fn flex_priority_reserve(&self) -> u32 {
        self.0.flex_priority_reserve
    }
    #[getter]
    fn default_min_share(&self) -> f64 {
        self.0.default_min_share
    }
    #[getter]
    fn engine_interval_ms(&self) -> f64 {
        self.0.engine_interval_ns as f64 / 1e6
    }
    /// "tokens" or "off".
    #[getter]
    fn fairness(&self) -> &'static str {
        self.0.fairness.as_str()
    }
    #[getter]
    fn fair_queues(&self) -> u32 {
        self.0.fair_queues
    }
    /// false: the rate limit runs in shadow mode (counted, not applied).
    #[getter]
    fn enforce(&self) -> bool {
        self.0.enforce
    }

    fn __repr__(&self) -> String {
        let limit = match self.0.limit {
            LimitMode::Fixed(n) => format!("max_concurrency={n}"),
            LimitMode::Adaptive { min, max, initial } => {
                format!("max_concurrency=\"auto\", min_concurrency={min}, max_concurrency_limit={max}, initial_concurrency={initial}")
            }
        };
        format!("PoolSettings({limit}, queue_depth={}, ...)", self.0.queue_depth)
    }
}

#[pymethods]
impl PyAdmissionCore {
    #[new]
    #[pyo3(signature = (settings, clock = None))]
    fn new(settings: &Bound<'_, PyPoolSettings>, clock: Option<&Bound<'_, PyManualClock>>) -> Self {
        PyAdmissionCore(Pool::new(settings.get().0.clone(), clock_of(clock)))
    }

    /// Creates the shared state block `name` for `workers` processes; returns
    /// the supervisor's handle (it reclaims dead workers; it never admits).
    #[staticmethod]
    fn create_shared(name: &str, workers: usize, wake_fds: Vec<i32>, settings: &Bound<'_, PyPoolSettings>) -> PyResult<Self> {
        Ok(PyAdmissionCore(Pool::create_shared(name, settings.get().0.clone(), workers, wake_fds, Clock::Monotonic)?))
    }

    /// Maps the shared block `name` as worker `worker` (None: supervisor),
    /// checking it was made with the same settings. `wake_fds[i]` is worker
    /// i's eventfd, written when another process decides one of its waiters.
    #[staticmethod]
    fn attach_shared(name: &str, worker: Option<usize>, wake_fds: Vec<i32>, settings: &Bound<'_, PyPoolSettings>) -> PyResult<Self> {
        Ok(PyAdmissionCore(Pool::attach_shared(name, settings.get().0.clone(), worker, wake_fds, Clock::Monotonic)?))
    }

    /// This pool's state under new settings (a reload; the queue is kept):
    /// the new handle and this process's waiters it granted slots.
    fn retuned(&self, settings: &Bound<'_, PyPoolSettings>) -> PyResult<(Self, Vec<u64>)> {
        let (pool, granted) = self.0.retuned(settings.get().0.clone())?;
        Ok((PyAdmissionCore(pool), granted))
    }

    /// The limit in force (whole slots).
    #[getter]
    fn limit(&self) -> u64 {
        self.0.limit()
    }

    /// An engine metrics sample; returns this process's waiters granted.
    #[pyo3(signature = (running, waiting, kv_usage_ppm = None))]
    fn observe_engine(&self, running: u64, waiting: u64, kv_usage_ppm: Option<u32>) -> Vec<u64> {
        self.0.observe_engine(running, waiting, kv_usage_ppm)
    }

    /// A time-to-first-token sample (ns); returns this process's waiters granted.
    fn observe_latency(&self, ns: u64) -> Vec<u64> {
        self.0.observe_latency(ns)
    }

    /// An upstream overload answer; returns this process's waiters granted.
    fn observe_overload(&self) -> Vec<u64> {
        self.0.observe_overload()
    }

    /// Sets an adaptive limit to `n` slots (a pool of replicas: the sum of
    /// theirs); returns this process's waiters granted if it rose.
    fn set_limit(&self, n: u64) -> Vec<u64> {
        self.0.set_limit(n)
    }

    /// Removes a shared block's name (live mappings stay valid).
    #[staticmethod]
    fn unlink_shared(name: &str) -> PyResult<()> {
        Ok(Pool::unlink_shared(name)?)
    }

    /// Takes this worker's mailbox: `[(waiter, outcome)]`, outcome 0 granted
    /// (the slot is now held here) or 1 + a SHED_CODES index.
    fn drain(&self) -> Vec<(u64, u8)> {
        let mut out = Vec::new();
        self.0.drain_mailbox(|id, o| {
            out.push((id, match o {
                Outcome::Granted => 0,
                Outcome::Shed(code) => 1 + code as u8,
            }))
        });
        out
    }

    /// Settles dead worker `worker`: `(slots, waiters, granted)`, where
    /// `granted` are waiters of this process handed a freed slot.
    fn reclaim(&self, worker: usize) -> PyResult<(u64, u64, Vec<u64>)> {
        let mut granted = Vec::new();
        let (slots, waiters) = self.0.reclaim_worker(worker, |id| granted.push(id))?;
        Ok((slots, waiters, granted))
    }

    /// Slots worker `worker` holds (shared pools).
    fn held_by(&self, worker: usize) -> u64 {
        self.0.held_by(worker)
    }

    /// A request's ask, checked: `(queue_a, queue_b, service, max_wait_ns
    /// or -1)` for `admit`. `flow`'s UTF-8 bytes are hashed to its two
    /// queues; `weight` 0.01 to 100; `charge` >= 0 (0 counts as 1);
    /// `max_wait_ms` a positive integer or None.
    #[pyo3(signature = (flow = "", weight = 1.0, charge = 1, max_wait_ms = None))]
    fn ask(&self, flow: &str, weight: f64, charge: i64, max_wait_ms: Option<i64>) -> PyResult<(u32, u32, u64, i64)> {
        let centi = fair::weight_centi(weight)?;
        if charge < 0 {
            return Err(CoreError::arg("charge", format!("must be at least 0, got {charge}")).into());
        }
        let wait = match max_wait_ms {
            None => NONE,
            Some(ms) if (1..=86_400_000).contains(&ms) => ms * 1_000_000,
            Some(ms) => return Err(CoreError::arg("max_wait_ms", format!("must be a positive integer of at most 86400000, got {ms}")).into()),
        };
        let (a, b) = self.0.hand(flow.as_bytes());
        Ok((a, b, fair::service(charge as u64, centi), wait))
    }

    /// `(0, -1, -1, -1, queue, -1, shadow)` admitted now; `(1, waiter,
    /// evicted, granted, queue, predicted_ns, shadow)` queued; `(2, code,
    /// retry_after_ns, evicted, queue, predicted_ns, shadow)` shed (code
    /// indexes SHED_CODES; `evicted` as when queued: a waiter pushed out on
    /// the way, to shed too). `predicted_ns` is -1 when unknown (no drain
    /// measured yet). `shadow`: the SHED_CODES index of a shed the pool's
    /// rate limit decided in shadow mode and did not apply, else -1. `cost`
    /// 0 takes nothing from the bucket (nor can the bucket refuse it). The
    /// ask's four values come from `ask` (default: the anonymous flow).
    /// `home`: the request's home replicas as a mask (bit r: replica r;
    /// 0: none), for the replica grant rule (`release(home)`).
    #[pyo3(signature = (lane, cost, queue_a = None, queue_b = 0, service = 0, max_wait_ns = -1, home = 0))]
    #[allow(clippy::too_many_arguments)]
    fn admit(&self, lane: u8, cost: i64, queue_a: Option<u32>, queue_b: u32, service: u64, max_wait_ns: i64, home: u64) -> PyResult<(u8, i64, i64, i64, u32, i64, i64)> {
        let lane = lane_of(lane)?;
        // 0: takes nothing from the bucket (a request that a limit in shadow
        // mode before this one refused: enforcing, it never came this far).
        let cost = if cost == 0 { 0 } else { cost_of(cost)? };
        let (decided, placed) = match queue_a {
            None => self.0.admit_home(lane, cost, &self.0.ask_anonymous(), home),
            Some(a) => {
                let q = self.0.settings().fair_queues;
                let ask = Ask {
                    hand: (a.min(q - 1), queue_b.min(q - 1)),
                    service: service.clamp(1, fair::MAX_SERVICE),
                    max_wait_ns: (max_wait_ns > 0).then_some(max_wait_ns as u64),
                };
                self.0.admit_home(lane, cost, &ask, home)
            }
        };
        let predicted = opt(placed.predicted_ns);
        let shadow = placed.shadowed.map_or(NONE, |c| c as i64);
        Ok(match decided {
            Admit::Now => (0, NONE, NONE, NONE, placed.queue, NONE, shadow),
            Admit::Queued { waiter, evicted, granted } => (1, waiter as i64, opt(evicted), opt(granted), placed.queue, predicted, shadow),
            Admit::Shed { code, retry_after_ns, evicted } => {
                (2, code as i64, retry_after_ns.min(i64::MAX as u64) as i64, opt(evicted), placed.queue, predicted, shadow)
            }
        })
    }

    /// Replaces the service a request of `queue` in `lane` was charged at
    /// dispatch (`estimate`, from `ask`) by its real `charge` at `weight`.
    fn settle(&self, lane: u8, queue: u32, estimate: u64, charge: i64, weight: f64) -> PyResult<()> {
        let centi = fair::weight_centi(weight)?;
        if charge < 0 {
            return Err(CoreError::arg("charge", format!("must be at least 0, got {charge}")).into());
        }
        self.0.settle(lane_of(lane)?, queue, estimate, fair::service(charge as u64, centi));
        Ok(())
    }

    /// `[(lane, queue, service)]`: service given here since the last export.
    fn fair_service_export(&self) -> Vec<(u8, u32, i64)> {
        let mut out = Vec::new();
        self.0.fair_export(|lane, q, d| out.push((lane as u8, q, d)));
        out
    }

    /// Adds other hosts' service (`[(lane, queue, service)]`, their export).
    fn fair_service_import(&self, items: Vec<(u8, u32, i64)>) -> PyResult<()> {
        for (lane, q, d) in items {
            self.0.fair_import(lane_of(lane)?, q, d);
        }
        Ok(())
    }

    /// Frees a slot; returns the waiter it passed to, if any. `home`: the
    /// replica the holder ran on plus one (0: none): the waiter is chosen by
    /// the replica grant rule (core/replicas.rs `HOME_LOOK_AHEAD`).
    #[pyo3(signature = (home = 0))]
    fn release(&self, home: u64) -> Option<u64> {
        self.0.release_from(home)
    }

    /// Hands free slots to waiters; returns the waiter granted, if any.
    fn dispatch(&self) -> Option<u64> {
        self.0.dispatch()
    }

    /// Takes `n` slots out of use (free ones now, busy ones as released);
    /// returns how many were free.
    fn withhold(&self, n: u64) -> u64 {
        self.0.withhold(n)
    }

    /// Puts back up to `n` owed or withheld slots; returns (how many,
    /// waiters of this process granted on the way).
    fn restore(&self, n: u64) -> (u64, Vec<u64>) {
        let mut granted = Vec::new();
        let back = self.0.restore(n, |id| granted.push(id));
        (back, granted)
    }

    fn cancel(&self, waiter: u64) -> bool {
        self.0.cancel(waiter)
    }

    fn expire_due(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.0.expire_due(|id| out.push(id));
        out
    }

    /// A request queued in `lane` with predicted wait `predicted_ns` left the
    /// line after `waited_ns` (granted or shed at its deadline): moves the
    /// lane's learned deadline refusal margin.
    fn wait_observed(&self, lane: u8, predicted_ns: u64, waited_ns: u64) -> PyResult<()> {
        self.0.wait_observed(lane_of(lane)?, predicted_ns, waited_ns);
        Ok(())
    }

    /// `lane`'s learned deadline refusal margin, a share of the prediction.
    fn deadline_margin(&self, lane: u8) -> PyResult<f64> {
        Ok(self.0.deadline_margin(lane_of(lane)?))
    }

    fn deadline_ns(&self, waiter: u64) -> Option<u64> {
        self.0.deadline_ns(waiter)
    }

    fn retry_after_ns(&self, lane: u8) -> PyResult<u64> {
        Ok(self.0.retry_after_ns(lane_of(lane)?))
    }

    fn now_ns(&self) -> u64 {
        self.0.clock().now_ns()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.0.stats();
        let lanes = |v: [u64; 3]| per_lane(py, v);
        let shed = PyDict::new(py);
        for code in ShedCode::ALL {
            shed.set_item(code.as_str(), s.shed[code as usize])?;
        }
        let out = PyDict::new(py);
        out.set_item("depth", lanes(s.depth.map(u64::from))?)?;
        out.set_item("in_flight", s.in_flight)?;
        out.set_item("withheld", s.withheld)?;
        out.set_item("owed", s.owed)?;
        out.set_item("flex_kept", s.flex_kept)?;
        out.set_item("limit", s.limit)?;
        out.set_item("limit_mode", s.limit_mode.as_str())?;
        out.set_item("limit_signal", s.limit_signal.as_str())?;
        out.set_item("limit_min", s.limit_mode.min())?;
        out.set_item("limit_max", s.limit_mode.max())?;
        out.set_item("limit_changes", s.limit_changes)?;
        out.set_item("limit_floor_ms", s.latency_floor_ns as f64 / 1e6)?;
        out.set_item("limit_recent_ms", s.latency_recent_ns as f64 / 1e6)?;
        out.set_item("admitted", lanes(s.admitted)?)?;
        out.set_item("shed", shed)?;
        out.set_item("cancelled", s.cancelled)?;
        out.set_item("fairness", s.fairness.as_str())?;
        out.set_item("fair_flows_active", lanes(s.fair_flows_active.map(u64::from))?)?;
        out.set_item("deadline_refused", s.deadline_refused)?;
        out.set_item("deadline_margin", per_lane(py, Lane::ALL.map(|l| self.0.deadline_margin(l)))?)?;
        out.set_item("shadow_rate_limited", s.shadow_rate_limited)?;
        out.set_item("enforce", self.0.settings().enforce)?;
        Ok(out)
    }
}

/// Per-key buckets in one table, shared by every worker that maps it
/// (`create` in the supervisor before fork, `attach` in each worker).
/// A pool's replicas (core/replicas.rs): each its slots held and its own
/// limit, learned with the pool's rules under `settings` (one replica's).
#[pyclass(name = "Replicas", module = "tierq._core", frozen)]
pub struct PyReplicas(crate::replicas::Replicas);

#[pymethods]
impl PyReplicas {
    #[new]
    #[pyo3(signature = (n, settings, clock = None))]
    fn new(n: usize, settings: &Bound<'_, PyPoolSettings>, clock: Option<&Bound<'_, PyManualClock>>) -> PyResult<Self> {
        let s = &settings.get().0;
        Ok(PyReplicas(crate::replicas::Replicas::new(n, s.limit, s.engine_interval_ns, clock_of(clock))?))
    }

    /// Creates the shared region `name` for `n` replicas and `workers`
    /// workers (`settings`: one replica's); the supervisor's handle.
    #[staticmethod]
    fn create_shared(name: &str, n: usize, workers: usize, settings: &Bound<'_, PyPoolSettings>) -> PyResult<Self> {
        let s = &settings.get().0;
        Ok(PyReplicas(crate::replicas::Replicas::create_shared(name, n, workers, s.limit, s.engine_interval_ns, Clock::Monotonic)?))
    }

    /// Maps the shared region `name` as worker `worker` (None: supervisor).
    #[staticmethod]
    #[pyo3(signature = (name, n, worker, settings))]
    fn attach_shared(name: &str, n: usize, worker: Option<usize>, settings: &Bound<'_, PyPoolSettings>) -> PyResult<Self> {
        let s = &settings.get().0;
        Ok(PyReplicas(crate::replicas::Replicas::attach_shared(name, n, worker, s.limit, s.engine_interval_ns, Clock::Monotonic)?))
    }

    #[staticmethod]
    fn unlink_shared(name: &str) -> PyResult<()> {
        Ok(crate::replicas::Replicas::unlink_shared(name)?)
    }

    /// Gives back what dead worker `worker` held on every replica; how many.
    fn reclaim(&self, worker: usize) -> PyResult<u64> {
        Ok(self.0.reclaim_worker(worker)?)
    }

    /// Slots worker `worker` holds on each replica.
    fn held_by(&self, worker: usize) -> Vec<u64> {
        self.0.held_by(worker)
    }

    #[getter]
    fn count(&self) -> usize {
        self.0.len()
    }

    /// The pool's limit: the sum of the limits of the replicas in rotation.
    #[getter]
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }

    /// Takes a slot on a replica for a holder of a pool slot: `order` is
    /// 4-bit replica numbers best first, `rule` 0 first with room, 1 within
    /// the load bound, 2 least loaded. Returns the replica.
    fn pick(&self, order: u64, rule: u8) -> PyResult<usize> {
        Ok(self.0.pick(order, crate::replicas::Rule::from_u8(rule)?))
    }

    fn release(&self, replica: usize) -> PyResult<()> {
        Ok(self.0.release(replica)?)
    }

    fn set_down(&self, replica: usize, down: bool) -> PyResult<()> {
        Ok(self.0.set_down(replica, down)?)
    }

    /// Out of rotation (`down`), or in it at most `cap` slots (0: its whole
    /// limit): tierq.health's ejection and slow start, in one store.
    fn set_health(&self, replica: usize, down: bool, cap: u64) -> PyResult<()> {
        Ok(self.0.set_health(replica, down, cap)?)
    }

    /// `pick`, passing over the replicas whose bits are set in `avoid` while
    /// another is in rotation (a request sent again after a failed try).
    fn pick_avoiding(&self, order: u64, rule: u8, avoid: u64) -> PyResult<usize> {
        Ok(self.0.pick_avoiding(order, crate::replicas::Rule::from_u8(rule)?, avoid))
    }

    /// One engine sample of `replica`; true if its limit changed.
    #[pyo3(signature = (replica, running, waiting, kv_usage_ppm, pool_waiters))]
    fn observe_engine(&self, replica: usize, running: u64, waiting: u64, kv_usage_ppm: Option<u32>, pool_waiters: u64) -> PyResult<bool> {
        Ok(self.0.observe_engine(replica, running, waiting, kv_usage_ppm, pool_waiters)?)
    }

    fn observe_latency(&self, replica: usize, ns: u64, pool_waiters: u64) -> PyResult<bool> {
        Ok(self.0.observe_latency(replica, ns, pool_waiters)?)
    }

    fn observe_overload(&self, replica: usize) -> PyResult<bool> {
        Ok(self.0.observe_overload(replica)?)
    }

    /// Picks that found no replica with room (a limit lowered under a holder).
    #[getter]
    fn over(&self) -> u64 {
        self.0.over()
    }

    /// The pool's slots withheld for the replicas' sum, as last claimed.
    #[getter]
    fn withheld(&self) -> u64 {
        self.0.withheld()
    }

    /// Moves that claim from `was` to `now` if it is still `was`; true if so.
    fn claim_withheld(&self, was: u64, now: u64) -> bool {
        self.0.claim_withheld(was, now)
    }

    /// Per replica: in_flight, limit (in force), learned (before a slow start's
    /// cap), waiting (the engine's), down, grants.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.0.stats().into_iter().map(|r| {
            let d = PyDict::new(py);
            d.set_item("in_flight", r.in_flight)?;
            d.set_item("limit", r.limit)?;
            d.set_item("learned", r.learned)?;
            d.set_item("waiting", r.waiting)?;
            d.set_item("down", r.down)?;
            d.set_item("grants", r.grants)?;
            Ok(d)
        }).collect()
    }
}

#[pyclass(name = "SharedKeyBuckets", module = "tierq._core", frozen)]
pub struct PySharedKeyBuckets(Arc<KeyTable>);

#[pymethods]
impl PySharedKeyBuckets {
    /// A table in this process only (tests; one worker needs no sharing).
    #[new]
    #[pyo3(signature = (capacity = 4096, clock = None))]
    fn new(capacity: usize, clock: Option<&Bound<'_, PyManualClock>>) -> PyResult<Self> {
        Ok(PySharedKeyBuckets(Arc::new(KeyTable::new(capacity, clock_of(clock))?)))
    }

    /// Creates the shared table `name` for `capacity` keys (rounded up to a power of two).
    #[staticmethod]
    #[pyo3(signature = (name, capacity = 4096, clock = None))]
    fn create(name: &str, capacity: usize, clock: Option<&Bound<'_, PyManualClock>>) -> PyResult<Self> {
        Ok(PySharedKeyBuckets(Arc::new(KeyTable::create_shared(name, capacity, clock_of(clock))?)))
    }

    #[staticmethod]
    #[pyo3(signature = (name, clock = None))]
    fn attach(name: &str, clock: Option<&Bound<'_, PyManualClock>>) -> PyResult<Self> {
        Ok(PySharedKeyBuckets(Arc::new(KeyTable::attach_shared(name, clock_of(clock))?)))
    }

    /// Removes a shared table's name (live mappings stay valid).
    #[staticmethod]
    fn unlink(name: &str) -> PyResult<()> {
        Ok(KeyTable::unlink_shared(name)?)
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Keys that have an entry (in any process).
    fn used(&self) -> usize {
        self.0.used()
    }

    /// Key `key_id`'s bucket `kind` ("rpm" or "tpm") with `rate` tokens a
    /// second and `burst` capacity; None when the table has no room for the key.
    fn bucket(&self, key_id: &str, kind: &str, rate: f64, burst: f64) -> PyResult<Option<PySharedBucket>> {
        let kind = match kind {
            "rpm" => RPM,
            "tpm" => TPM,
            other => return Err(CoreError::arg("kind", format!("must be \"rpm\" or \"tpm\", got {other:?}")).into()),
        };
        let params = bucket::BucketParams::new(rate, burst, 0.0)?;
        Ok(self.0.entry(key_id).map(|entry| PySharedBucket { table: self.0.clone(), entry, kind, params }))
    }

    /// Key `key_id`'s downgrade counter `kind` ("budget": nano-USD a day,
    /// "ramp": priority tokens a step); None when the table has no room for the key.
    fn counter(&self, key_id: &str, kind: &str) -> PyResult<Option<PySharedCounter>> {
        let kind = match kind {
            "budget" => BUDGET,
            "ramp" => RAMP,
            other => return Err(CoreError::arg("kind", format!("must be \"budget\" or \"ramp\", got {other:?}")).into()),
        };
        Ok(self.0.entry(key_id).map(|entry| PySharedCounter { table: self.0.clone(), entry, kind }))
    }
}

/// One downgrade counter of a `SharedKeyBuckets` table: a count per period
/// (a UTC day, a ramp step), moved to a new period in the same CAS that counts.
#[pyclass(name = "SharedCounter", module = "tierq._core", frozen)]
pub struct PySharedCounter {
    table: Arc<KeyTable>,
    entry: usize,
    kind: usize,
}

#[pymethods]
impl PySharedCounter {
    /// Counts `cost` in `period` if the count stays at or below `limit`;
    /// False (nothing counted) if it would not.
    fn take(&self, period: u64, cost: u64, limit: u64) -> bool {
        self.table.count_take(self.entry, self.kind, period, cost, limit).is_ok()
    }

    /// Adds `delta` (negative gives back, never below 0) in `period`, unchecked.
    fn add(&self, period: u64, delta: i64) {
        self.table.count_add(self.entry, self.kind, period, delta)
    }

    /// The count in `period`.
    fn count(&self, period: u64) -> u64 {
        self.table.count(self.entry, self.kind, period)
    }
}

/// One bucket of a `SharedKeyBuckets` table; the same calls as `TokenBucket`.
#[pyclass(name = "SharedBucket", module = "tierq._core", frozen)]
pub struct PySharedBucket {
    table: Arc<KeyTable>,
    entry: usize,
    kind: usize,
    params: bucket::BucketParams,
}

#[pymethods]
impl PySharedBucket {
    #[pyo3(signature = (cost = 1, tier = "default"))]
    fn try_take(&self, cost: i64, tier: &str) -> PyResult<Option<f64>> {
        // Per-key buckets keep no priority reserve: the tier is checked, not used.
        Lane::parse(tier)?;
        Ok(match self.table.try_take(self.entry, self.kind, cost_of(cost)?, &self.params) {
            Ok(()) => None,
            Err(u64::MAX) => Some(f64::INFINITY),
            Err(wait_ns) => Some(wait_ns as f64 / 1e9),
        })
    }

    /// Takes `delta` more tokens unchecked (> 0) or refunds them (< 0).
    fn adjust(&self, delta: i64) {
        self.table.adjust(self.entry, self.kind, delta, &self.params)
    }

    fn available(&self) -> f64 {
        self.table.available(self.entry, self.kind, &self.params)
    }
}

// ---------------------------------------------------------------- the ledger's writer

/// A row's cost in femto-USD. Any cost a request has fits 64 bits (18,446
/// USD): that conversion is one C call, the 128-bit one (abi3) several Python calls.
fn femto_arg(v: &Bound<'_, PyAny>) -> PyResult<u128> {
    match v.extract::<u64>() {
        Ok(v) => Ok(u128::from(v)),
        Err(_) => v.extract::<u128>(),
    }
}

/// The ledger's SQLite writer (`tierq.ledger.Ledger` drives it): `push` queues a
/// row and returns its sequence number; after each committed batch the fd is
/// readable and `drain` tells which rows are settled.
#[pyclass(name = "LedgerWriter", module = "tierq._core", frozen)]
pub struct PyLedgerWriter(ledger::Writer);

#[pymethods]
impl PyLedgerWriter {
    /// Opens (creates) the ledger file and starts its threads; the GIL is
    /// released meanwhile (an open may wait on another writer's lock).
    #[new]
    #[pyo3(signature = (path, durability = "process"))]
    fn new(py: Python<'_>, path: std::path::PathBuf, durability: &str) -> PyResult<Self> {
        let durability = ledger::Durability::parse(durability)?;
        Ok(PyLedgerWriter(py.detach(|| ledger::Writer::open(&path, durability))?))
    }

    /// Queues one row (nanoseconds under a short lock: the GIL is kept) and
    /// returns `(sequence number, wake owed)`: true when the writer sleeps and
    /// this is the first push since; the caller then calls `wake()` once (the
    /// event loop does it after its current callbacks, so the rows they push
    /// share one wake-up). `push` itself never makes a system call.
    #[pyo3(signature = (request_id, ts, key_id, model, endpoint, requested_tier, applied_tier,
                        prompt_tokens, completion_tokens, cost_femto, status, partial, code,
                        queue_ms, latency_ms, upstream, fairness_id, tier_reason))]
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        request_id: String,
        ts: f64,
        key_id: String,
        model: String,
        endpoint: String,
        requested_tier: Option<String>,
        applied_tier: String,
        prompt_tokens: i64,
        completion_tokens: i64,
        cost_femto: &Bound<'_, PyAny>,
        status: String,
        partial: bool,
        code: Option<String>,
        queue_ms: f64,
        latency_ms: f64,
        upstream: Option<String>,
        fairness_id: Option<String>,
        tier_reason: Option<String>,
    ) -> PyResult<(u64, bool)> {
        let cost_femto = femto_arg(cost_femto)?;
        Ok(self.0.push(ledger::Row {
            request_id, ts, key_id, model, endpoint, requested_tier, applied_tier, prompt_tokens,
            completion_tokens, cost_femto, status, partial, code, queue_ms, latency_ms, upstream,
            fairness_id, tier_reason,
        })?)
    }

    /// Wakes the writer (what a push owes when it returns true): one futex
    /// call, made without the GIL.
    fn wake(&self, py: Python<'_>) {
        py.detach(|| self.0.wake())
    }

    /// Clears the fd; returns `(settled, failures, lags_us)`: every row up to
    /// `settled` is committed except the `(first, last, message)` ranges, and
    /// one lag (µs, oldest row's push to commit) per batch.
    fn drain(&self) -> (u64, Vec<(u64, u64, String)>, Vec<u64>) {
        let d = self.0.drain();
        (d.settled, d.failures.into_iter().map(|f| (f.first, f.last, f.message)).collect(), d.lags_us)
    }

    fn settled(&self) -> u64 {
        self.0.settled()
    }

    fn last_pushed(&self) -> u64 {
        self.0.last_pushed()
    }

    #[getter]
    fn fd(&self) -> i32 {
        self.0.notify_fd()
    }

    #[getter]
    fn pending(&self) -> usize {
        self.0.pending()
    }

    /// `(batches, rows_committed, commit_errors, checkpoints)`.
    fn stats(&self) -> (u64, u64, u64, u64) {
        let s = self.0.stats();
        (s.batches, s.rows_committed, s.commit_errors, s.checkpoints)
    }

    /// Commits everything queued and stops the threads; blocks without the GIL.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.0.close())
    }
}

// ---------------------------------------------------------------- a request's end (crate::finish)

/// One of a key's buckets as Python holds it (`TokenBucket` or `SharedBucket`).
fn key_bucket<'a>(v: &'a Bound<'_, PyAny>) -> PyResult<crate::finish::Bucket<'a>> {
    if let Ok(b) = v.cast::<PyTokenBucket>() {
        return Ok(crate::finish::Bucket::Local(&b.get().0));
    }
    let b = v.cast::<PySharedBucket>().map_err(|_| PyTypeError::new_err("a key bucket must be a TokenBucket or a SharedBucket"))?;
    let b = b.get();
    Ok(crate::finish::Bucket::Shared { table: &b.table, entry: b.entry, kind: b.kind, params: &b.params })
}

/// A request's end in one call (tierq.outcome `Exchange.finish`): the ledger
/// row queued on `writer`, the key's buckets settled, the access line
/// formatted. The names a row may carry are tierq.ledger's, given once.
#[pyclass(name = "Finisher", module = "tierq._core", frozen)]
pub struct PyFinisher {
    writer: Py<PyLedgerWriter>,
    names: crate::finish::Names,
}

#[pymethods]
impl PyFinisher {
    #[new]
    fn new(writer: Py<PyLedgerWriter>, statuses: Vec<String>, tiers: Vec<String>, reasons: Vec<String>) -> Self {
        PyFinisher { writer, names: crate::finish::Names { statuses, tiers, reasons } }
    }

    /// The row's fields as `LedgerWriter.push` takes them; then the key's
    /// `(rpm bucket, delta, tpm bucket, delta)` (buckets None: no limit), and
    /// the access line's `(ts, echo, method, path, status, duration_s, remote,
    /// shadow, config)` or None. Returns `(sequence number, wake owed, line)`;
    /// the line None when none was asked or Python must format it. A bad row
    /// raises ValueError and changes nothing.
    #[pyo3(signature = (request_id, ts, key_id, model, endpoint, requested_tier, applied_tier,
                        prompt_tokens, completion_tokens, cost_femto, status, partial, code,
                        queue_ms, latency_ms, upstream, fairness_id, tier_reason,
                        rpm, rpm_delta, tpm, tpm_delta, access))]
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        request_id: String,
        ts: f64,
        key_id: String,
        model: String,
        endpoint: String,
        requested_tier: Option<String>,
        applied_tier: String,
        prompt_tokens: i64,
        completion_tokens: i64,
        cost_femto: &Bound<'_, PyAny>,
        status: String,
        partial: bool,
        code: Option<String>,
        queue_ms: f64,
        latency_ms: f64,
        upstream: Option<String>,
        fairness_id: Option<String>,
        tier_reason: Option<String>,
        rpm: Option<&Bound<'_, PyAny>>,
        rpm_delta: i64,
        tpm: Option<&Bound<'_, PyAny>>,
        tpm_delta: i64,
        access: Option<(f64, String, String, String, i64, f64, Option<String>, Option<String>, Option<String>)>,
    ) -> PyResult<(u64, bool, Option<String>)> {
        let cost_femto = femto_arg(cost_femto)?;
        let row = ledger::Row {
            request_id, ts, key_id, model, endpoint, requested_tier, applied_tier, prompt_tokens,
            completion_tokens, cost_femto, status, partial, code, queue_ms,
            latency_ms, upstream, fairness_id, tier_reason,
        };
        let settle = crate::finish::Settlement {
            rpm: rpm.map(key_bucket).transpose()?.map(|b| (b, rpm_delta)),
            tpm: tpm.map(key_bucket).transpose()?.map(|b| (b, tpm_delta)),
        };
        let line = access.as_ref().map(|(ts, echo, method, path, status, duration_s, remote, shadow, config)| {
            crate::finish::Access {
                ts: *ts, echo, method, path, status: *status, duration_s: *duration_s,
                remote: remote.as_deref(), shadow: shadow.as_deref(), config: config.as_deref(),
            }
        });
        let done = crate::finish::finish(&self.writer.get().0, &self.names, row, settle, line)?;
        Ok((done.seq, done.wake, done.line))
    }
}

#[pymodule]
#[pyo3(name = "_core")]
fn tierq_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyManualClock>()?;
    m.add_class::<PyTokenBucket>()?;
    m.add_class::<PyPoolSettings>()?;
    m.add_class::<PySettingField>()?;
    m.add_class::<PyAdmissionCore>()?;
    m.add_class::<PyReplicas>()?;
    m.add("SettingsError", m.py().get_type::<SettingsError>())?;
    m.add_class::<PySharedKeyBuckets>()?;
    m.add_class::<PySharedBucket>()?;
    m.add_class::<PySharedCounter>()?;
    m.add_class::<PySseRewriter>()?; // the stream rewrite section below
    m.add_function(wrap_pyfunction!(access_json, m)?)?; // the access line section below
    m.add("SHED_CODES", ShedCode::ALL.map(ShedCode::as_str).to_vec())?;
    // The tier names in lane order: tierq.tiers.Tier is made of them.
    m.add("TIERS", pyo3::types::PyTuple::new(m.py(), Lane::ALL.map(Lane::as_str))?)?;
    m.add_class::<PyLedgerWriter>()?;
    m.add_class::<PyFinisher>()?; // a request's end section above
    m.add_class::<PyUpstreamCore>()?; // the upstream client section below
    m.add("LEDGER_SCHEMA", ledger::SCHEMA)?;
    m.add("LEDGER_ADDED_COLUMNS", ledger::ADDED_COLUMNS.to_vec())?;
    m.add("LEDGER_CHECKPOINT_ROWS", ledger::CHECKPOINT_ROWS)?;
    m.add("SQLITE_VERSION", ledger::sqlite_version())?;
    Ok(())
}

// ------------------------------------------------------------------ the stream rewrite (crate::sse)

/// What one read of a stream produced: (the client's bytes, the tokens they
/// deliver, the state: 0 open, 1 `[DONE]`, 2 an event over the bound, and the
/// events handed back as (offset in those bytes, tokens before it, payload), or None).
type SseBatch<'py> = (Bound<'py, PyBytes>, u64, u8, Option<Vec<(usize, u64, Bound<'py, PyBytes>)>>);

fn sse_batch<'py>(py: Python<'py>, b: &crate::sse::Batch) -> SseBatch<'py> {
    let handed = (!b.handed.is_empty()).then(|| {
        b.handed.iter().map(|h| (h.at, h.tokens_before, PyBytes::new(py, &h.payload))).collect()
    });
    (PyBytes::new(py, &b.out), b.tokens, b.state() as u8, handed)
}

/// One stream's SSE rewrite: `feed` each upstream read, `close` at the end of the body.
#[pyclass(name = "SseRewriter", module = "tierq._core")]
pub struct PySseRewriter(crate::sse::Rewriter);

#[pymethods]
impl PySseRewriter {
    #[new]
    fn new(tier: &str, keep_usage: bool, max_event_bytes: usize) -> Self {
        PySseRewriter(crate::sse::Rewriter::new(tier, keep_usage, max_event_bytes))
    }

    fn feed<'py>(&mut self, py: Python<'py>, chunk: &[u8]) -> SseBatch<'py> {
        sse_batch(py, self.0.feed(chunk))
    }

    fn close<'py>(&mut self, py: Python<'py>) -> SseBatch<'py> {
        sse_batch(py, self.0.close())
    }
}

// ------------------------------------------------------------------ the access line (crate::access)

/// An exact str's (or str subclass's, such as a Tier's) text; None for anything else.
fn text<'a>(v: &'a Bound<'_, PyAny>) -> Option<&'a str> {
    v.cast::<PyString>().ok()?.to_str().ok()
}

fn opt_text<'a>(v: &'a Bound<'_, PyAny>) -> Option<Option<&'a str>> {
    if v.is_none() { Some(None) } else { text(v).map(Some) }
}

/// A float that is exactly a float (an int renders without ".0": Python's path).
fn float(v: &Bound<'_, PyAny>) -> Option<f64> {
    v.cast_exact::<pyo3::types::PyFloat>().ok().map(|f| f.value())
}

fn int(v: &Bound<'_, PyAny>) -> Option<i64> {
    v.cast_exact::<pyo3::types::PyInt>().ok()?.extract().ok()
}

/// tierq.logs' captured access line (`_Captured`) as its JSON text, without the
/// newline; `cost` the row's cost as `format(cost, "f")` writes it, `shadow` the
/// decisions joined. None: a line Python formats (see core/access.rs).
#[pyfunction]
fn access_json(captured: &Bound<'_, pyo3::types::PyTuple>, cost: Option<&str>,
               shadow: Option<&str>) -> Option<String> {
    let py = captured.py();
    let c: Vec<Bound<'_, PyAny>> = captured.iter().collect();
    // Its twelfth, a line the core already formatted, is the caller's.
    let [ts, rid, echo, method, path, status, duration_s, remote, row, _, config, ..] = c.as_slice()
    else {
        return None;
    };
    let fields: Vec<Bound<'_, PyAny>>;
    let row = if row.is_none() {
        None
    } else {
        fields = [pyo3::intern!(py, "model"), pyo3::intern!(py, "key_id"),
                  pyo3::intern!(py, "requested_tier"), pyo3::intern!(py, "applied_tier"),
                  pyo3::intern!(py, "status"), pyo3::intern!(py, "code"),
                  pyo3::intern!(py, "queue_ms"), pyo3::intern!(py, "prompt_tokens"),
                  pyo3::intern!(py, "completion_tokens"), pyo3::intern!(py, "fairness_id"),
                  pyo3::intern!(py, "tier_reason")]
            .into_iter()
            .map(|name| row.getattr(name).ok())
            .collect::<Option<_>>()?;
        let [model, key_id, requested, tier, outcome, code, queue_ms, prompt, completion, fairness,
             reason] = fields.as_slice()
        else {
            return None;
        };
        Some(crate::access::RowFields {
            model: text(model)?, key_id: text(key_id)?, requested_tier: opt_text(requested)?,
            tier: text(tier)?, outcome: text(outcome)?, code: opt_text(code)?,
            queue_ms: float(queue_ms)?, prompt_tokens: int(prompt)?,
            completion_tokens: int(completion)?, cost: cost?, fairness_id: opt_text(fairness)?,
            tier_reason: opt_text(reason)?,
        })
    };
    crate::access::json_line(&crate::access::Line {
        ts: float(ts)?, request_id: text(rid)?, echo: text(echo)?, method: text(method)?,
        path: text(path)?, status: int(status)?, duration_s: float(duration_s)?,
        remote: opt_text(remote)?, row, shadow, config: opt_text(config)?,
    })
}

// ------------------------------------------------------------------ the upstream client (crate::upstream)

/// Every upstream's HTTP client in one process (`tierq.upstream_core` drives
/// it): `add_client` per upstream, `send` per request, and on each wake-up of
/// `fd` one `drain` of the events, as `(request id, kind, a, b)`:
/// kind 0 the head (a: status, b: (headers as (name, value) pairs, sse)),
/// 1 the whole body (a: bytes), 2 a stream's rewritten read (a: the
/// `SseRewriter.feed` tuple, b: whether it is the last), 3 a failure
/// (a: 0 connect, 1 timeout, 2 body, 3 protocol; b: the message).
#[pyclass(name = "UpstreamCore", module = "tierq._core", frozen)]
pub struct PyUpstreamCore(crate::upstream::Upstreams);

fn seconds(name: &'static str, s: f64) -> PyResult<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s)
        .map_err(|_| CoreError::arg(name, format!("must be a duration in seconds, got {s}")).into())
}

#[pymethods]
impl PyUpstreamCore {
    /// Starts the client's runtime (`threads` threads); the GIL is released.
    #[new]
    #[pyo3(signature = (threads = 1))]
    fn new(py: Python<'_>, threads: usize) -> PyResult<Self> {
        Ok(PyUpstreamCore(py.detach(|| crate::upstream::Upstreams::new(threads))?))
    }

    /// An upstream's client; returns its index for `send`.
    #[pyo3(signature = (connect_timeout_s, read_timeout_s, total_timeout_s, max_connections, ca_pem = None))]
    fn add_client(
        &self,
        py: Python<'_>,
        connect_timeout_s: f64,
        read_timeout_s: Option<f64>,
        total_timeout_s: Option<f64>,
        max_connections: usize,
        ca_pem: Option<Vec<u8>>,
    ) -> PyResult<usize> {
        let spec = crate::upstream::ClientSpec {
            connect_timeout: seconds("connect_timeout_s", connect_timeout_s)?,
            read_timeout: read_timeout_s.map(|s| seconds("read_timeout_s", s)).transpose()?,
            total_timeout: total_timeout_s.map(|s| seconds("total_timeout_s", s)).transpose()?,
            max_connections,
            ca_pem,
        };
        // Loading the system roots reads files: without the GIL.
        Ok(py.detach(|| self.0.add_client(&spec))?)
    }

    /// POSTs `body` to `url`; `stream`: (tier, keep_usage, max_event_bytes) to
    /// rewrite a 2xx event-stream answer. Returns the request's id.
    #[pyo3(signature = (client, url, headers, body, stream = None))]
    fn send(
        &self,
        client: usize,
        url: &str,
        headers: Vec<(String, String)>,
        body: &[u8],
        stream: Option<(String, bool, usize)>,
    ) -> PyResult<u64> {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let stream = stream.map(|(tier, keep_usage, max_event_bytes)| crate::upstream::StreamSpec {
            tier,
            keep_usage,
            max_event_bytes,
        });
        Ok(self.0.send(client, url, &headers, body.to_vec(), stream)?)
    }

    /// The client wrote `bytes` more of request `id`'s chunks.
    fn ack(&self, id: u64, bytes: u64) {
        self.0.ack(id, bytes)
    }

    /// Drops request `id`, closing its connection (a no-op once it is over).
    fn cancel(&self, id: u64) {
        self.0.cancel(id)
    }

    /// Clears the fd; returns every queued event (see the class doc).
    fn drain<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        use crate::upstream::Event;
        let events = self.0.drain();
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let t = match e {
                Event::Head { id, status, headers, sse } => (id, 0u8, status, (headers, sse)).into_pyobject(py)?,
                Event::Body { id, body } => (id, 1u8, PyBytes::new(py, &body), py.None()).into_pyobject(py)?,
                Event::Chunk { id, batch, end } => (id, 2u8, sse_batch(py, &batch), end).into_pyobject(py)?,
                Event::Failed { id, failure, message } => (id, 3u8, failure as u8, message).into_pyobject(py)?,
            };
            out.push(t.into_any());
        }
        Ok(out)
    }

    #[getter]
    fn fd(&self) -> i32 {
        self.0.notify_fd()
    }

    /// Requests sent and not yet over.
    #[getter]
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
}
