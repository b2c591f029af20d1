//! The Python face of the core (`tierq._core`). The only file that imports
//! pyo3: it converts arguments, maps `CoreError` to `ValueError` in one place,
//! and never waits or blocks while holding the GIL (every call is nanoseconds).

use std::sync::Arc;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::admission::{Admit, Outcome, Pool, Settings, ShedCode};
use crate::clock::{Clock, ManualClock};
use crate::error::CoreError;
use crate::keytable::{KeyTable, RPM, TPM};
use crate::{bucket, Lane};

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        match e {
            CoreError::InvalidArgument { .. } | CoreError::Layout(_) => PyValueError::new_err(e.to_string()),
            CoreError::Os(_) => PyOSError::new_err(e.to_string()),
        }
    }
}

fn lane_of(lane: u8) -> PyResult<Lane> {
    match lane {
        0 => Ok(Lane::Priority),
        1 => Ok(Lane::Default),
        _ => Err(CoreError::arg("lane", format!("must be 0 (priority) or 1 (default), got {lane}")).into()),
    }
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

#[pymethods]
impl PyAdmissionCore {
    #[new]
    #[pyo3(signature = (max_concurrency = 64, queue_depth = 1024, max_wait_ms_default = 30000.0,
                        max_wait_ms_priority = 60000.0, rate = None, burst = None,
                        priority_reserve = 0.2, default_min_share = 0.0, clock = None, priority_headroom = 0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_concurrency: i64,
        queue_depth: i64,
        max_wait_ms_default: f64,
        max_wait_ms_priority: f64,
        rate: Option<f64>,
        burst: Option<f64>,
        priority_reserve: f64,
        default_min_share: f64,
        clock: Option<&Bound<'_, PyManualClock>>,
        priority_headroom: i64,
    ) -> PyResult<Self> {
        let s = Settings::new(
            max_concurrency, queue_depth, max_wait_ms_default, max_wait_ms_priority,
            rate, burst, priority_reserve, default_min_share,
        )?
        .with_priority_headroom(priority_headroom)?;
        Ok(PyAdmissionCore(Pool::new(s, clock_of(clock))))
    }

    /// Creates the shared state block `name` for `workers` processes; returns
    /// the supervisor's handle (it reclaims dead workers; it never admits).
    #[staticmethod]
    #[pyo3(signature = (name, workers, wake_fds, max_concurrency = 64, queue_depth = 1024, max_wait_ms_default = 30000.0,
                        max_wait_ms_priority = 60000.0, rate = None, burst = None,
                        priority_reserve = 0.2, default_min_share = 0.0, priority_headroom = 0))]
    #[allow(clippy::too_many_arguments)]
    fn create_shared(
        name: &str,
        workers: usize,
        wake_fds: Vec<i32>,
        max_concurrency: i64,
        queue_depth: i64,
        max_wait_ms_default: f64,
        max_wait_ms_priority: f64,
        rate: Option<f64>,
        burst: Option<f64>,
        priority_reserve: f64,
        default_min_share: f64,
        priority_headroom: i64,
    ) -> PyResult<Self> {
        let s = Settings::new(
            max_concurrency, queue_depth, max_wait_ms_default, max_wait_ms_priority,
            rate, burst, priority_reserve, default_min_share,
        )?
        .with_priority_headroom(priority_headroom)?;
        Ok(PyAdmissionCore(Pool::create_shared(name, s, workers, wake_fds, Clock::Monotonic)?))
    }

    /// Maps the shared block `name` as worker `worker` (None: supervisor),
    /// checking it was made with the same settings. `wake_fds[i]` is worker
    /// i's eventfd, written when another process decides one of its waiters.
    #[staticmethod]
    #[pyo3(signature = (name, worker, wake_fds, max_concurrency = 64, queue_depth = 1024, max_wait_ms_default = 30000.0,
                        max_wait_ms_priority = 60000.0, rate = None, burst = None,
                        priority_reserve = 0.2, default_min_share = 0.0, priority_headroom = 0))]
    #[allow(clippy::too_many_arguments)]
    fn attach_shared(
        name: &str,
        worker: Option<usize>,
        wake_fds: Vec<i32>,
        max_concurrency: i64,
        queue_depth: i64,
        max_wait_ms_default: f64,
        max_wait_ms_priority: f64,
        rate: Option<f64>,
        burst: Option<f64>,
        priority_reserve: f64,
        default_min_share: f64,
        priority_headroom: i64,
    ) -> PyResult<Self> {
        let s = Settings::new(
            max_concurrency, queue_depth, max_wait_ms_default, max_wait_ms_priority,
            rate, burst, priority_reserve, default_min_share,
        )?
        .with_priority_headroom(priority_headroom)?;
        Ok(PyAdmissionCore(Pool::attach_shared(name, s, worker, wake_fds, Clock::Monotonic)?))
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

    /// `(0, -1, -1, -1)` admitted now; `(1, waiter, evicted, granted)` queued;
    /// `(2, code, retry_after_ns, evicted)` shed (code indexes SHED_CODES;
    /// `evicted` as when queued: a waiter pushed out on the way, to shed too).
    fn admit(&self, lane: u8, cost: i64) -> PyResult<(u8, i64, i64, i64)> {
        Ok(match self.0.admit(lane_of(lane)?, cost_of(cost)?) {
            Admit::Now => (0, NONE, NONE, NONE),
            Admit::Queued { waiter, evicted, granted } => (1, waiter as i64, opt(evicted), opt(granted)),
            Admit::Shed { code, retry_after_ns, evicted } => {
                (2, code as i64, retry_after_ns.min(i64::MAX as u64) as i64, opt(evicted))
            }
        })
    }

    /// Frees a slot; returns the waiter it passed to, if any.
    fn release(&self) -> Option<u64> {
        self.0.release()
    }

    /// Hands free slots to waiters; returns the waiter granted, if any.
    fn dispatch(&self) -> Option<u64> {
        self.0.dispatch()
    }

    fn cancel(&self, waiter: u64) -> bool {
        self.0.cancel(waiter)
    }

    fn expire_due(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.0.expire_due(|id| out.push(id));
        out
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
        let lanes = |v: [u64; 2]| -> PyResult<Bound<'py, PyDict>> {
            let d = PyDict::new(py);
            d.set_item("priority", v[0])?;
            d.set_item("default", v[1])?;
            Ok(d)
        };
        let shed = PyDict::new(py);
        for code in ShedCode::ALL {
            shed.set_item(code.as_str(), s.shed[code as usize])?;
        }
        let out = PyDict::new(py);
        out.set_item("depth", lanes([s.depth[0] as u64, s.depth[1] as u64])?)?;
        out.set_item("in_flight", s.in_flight)?;
        out.set_item("max_concurrency", s.max_concurrency)?;
        out.set_item("admitted", lanes(s.admitted)?)?;
        out.set_item("shed", shed)?;
        out.set_item("cancelled", s.cancelled)?;
        Ok(out)
    }
}

/// Per-key buckets in one table, shared by every worker that maps it
/// (`create` in the supervisor before fork, `attach` in each worker).
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

#[pymodule]
#[pyo3(name = "_core")]
fn tierq_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyManualClock>()?;
    m.add_class::<PyTokenBucket>()?;
    m.add_class::<PyAdmissionCore>()?;
    m.add_class::<PySharedKeyBuckets>()?;
    m.add_class::<PySharedBucket>()?;
    m.add_class::<PySseRewriter>()?; // the stream rewrite section below
    m.add("SHED_CODES", ShedCode::ALL.map(ShedCode::as_str).to_vec())?;
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
