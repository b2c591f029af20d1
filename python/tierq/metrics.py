"""Per-process metrics and their Prometheus / status-page renderings.

The hot path only bumps integers: `GatewayMetrics.observe()` is a few dict
lookups and list increments (fixed buckets, latencies as integer microseconds).
Rendering works from `WorkerSnapshot`s, plain data, so one process or many
render the same way: `render_prometheus([snap])` for one, every worker's
latest snapshot (`snapshot_to_json` / `snapshot_from_json`, exchanged by
`tierq.workers.SnapshotBoard`) for a host (see docs/operations.md).
"""

from __future__ import annotations

import dataclasses
import os
import time

import orjson
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from tierq.fairness import FlowLine, flows_json, merge
from tierq.shadow import DECISIONS as SHADOW_DECISIONS
from tierq.tiers import Tier, TierReason

__all__ = [
    "LAG_BUCKETS_S",
    "LATENCY_BUCKETS_S",
    "METRIC_NAMES",
    "SERIES_STEP_S",
    "SERIES_WINDOWS",
    "GatewayMetrics",
    "Histogram",
    "PoolSnapshot",
    "REPLICA_STATES",
    "WorkerSnapshot",
    "render_prometheus",
    "replica_line",
    "snapshot_from_json",
    "snapshot_to_json",
    "status_json",
]

# The tiers' names as plain str, in lane order: the labels and the status JSON's
# keys (orjson takes only exact str as a dict key, not a Tier).
TIERS: Final = tuple(tier.value for tier in Tier)
# Why a request was downgraded (tierq.downgrades), as plain str the same way.
REASONS: Final = tuple(reason.value for reason in TierReason)
# Upper bounds in seconds (Prometheus `le`), +Inf implied. Covers a cached
# embedding (5 ms) to a long generation (2 min).
LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                            10.0, 30.0, 60.0, 120.0)
LAG_BUCKETS_S: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                        0.1, 0.25, 1.0)
# The status page's chart: one point per 2 s, six minutes kept.
SERIES_STEP_S: Final = 2
SERIES_WINDOWS: Final = 180
_US: Final = 1_000_000
_FEMTO: Final = 10**15  # femto-USD per USD (tierq.pricing's unit)
# The wait prediction's error histograms, by direction: their names in `hist`.
_PREDICTION: Final = {"under": "wait_prediction_under", "over": "wait_prediction_over"}


class Histogram:
    """Fixed buckets, integer counts, sum in integer microseconds.

    Not locked: increments happen on one thread (the event loop; the ledger's
    lag too, observed when its batches settle); a scrape may see a sum one
    observation ahead of the counts, which Prometheus tolerates.
    """

    __slots__ = ("bounds", "_bounds_us", "counts", "sum_us")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._bounds_us = tuple(round(b * _US) for b in bounds)
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum_us = 0

    def observe_us(self, us: int) -> None:
        self.counts[bisect_left(self._bounds_us, us)] += 1
        self.sum_us += us

    def observe(self, seconds: float) -> None:
        self.observe_us(max(0, round(seconds * _US)))

    def data(self) -> HistogramData:
        return HistogramData(self.bounds, tuple(self.counts), self.sum_us)


@dataclass(frozen=True, slots=True)
class HistogramData:
    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket, last is +Inf
    sum_us: int

    def __add__(self, other: HistogramData) -> HistogramData:
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms with different buckets")
        return HistogramData(self.bounds, tuple(a + b for a, b in zip(self.counts, other.counts)),
                             self.sum_us + other.sum_us)

    @property
    def count(self) -> int:
        return sum(self.counts)


# One status-chart window per tier: requests served, latency sum (us), TTFT
# count and sum (us), sheds.
_N, _LAT, _TTFT_N, _TTFT, _SHED = range(5)


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """One pool's admission state: the core's `stats()` plus its static shape."""

    model: str
    upstream: str
    priority: bool
    queue_capacity: int
    stats: Mapping[str, Any]  # Admission.stats(): depth, in_flight, admitted, shed, ...
    # This process's tierq.fairness.FlowBoard.data(): per-process even when the
    # admission state is shared, so the workers' lines are summed.
    flows: tuple[FlowLine, ...] = ()
    # With several endpoints, one per replica (`replica_line`): its endpoint,
    # the core's slots held, limit, engine queue and grants, this process's
    # view of its health, and its engine's prefix-cache counters when scraped.
    replicas: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """Everything one worker process contributes to /metrics and /status.json."""

    pid: int
    time: float
    ready: bool
    pools: tuple[PoolSnapshot, ...]
    requests: Mapping[tuple[str, str, str], int]  # (model, tier, status) -> n
    sheds: Mapping[tuple[str, str, str], int]  # (model, tier, code) -> n
    upstream_errors: Mapping[tuple[str, str, str], int]  # (model, upstream, code) -> n
    histograms: Mapping[tuple[str, str], HistogramData]  # (name, tier) -> data
    # (model, tier) -> femto-USD billed (served and partial answers, as the ledger's cost)
    costs: Mapping[tuple[str, str], int] = field(default_factory=dict)
    ledger_pending: int = 0
    ledger_rows: int = 0
    ledger_errors: int = 0
    ledger_lag: HistogramData | None = None
    # A PostgreSQL ledger's spool: rows waiting there for PostgreSQL (None: no
    # spool, a SQLite ledger), and 1 while rows go to the spool instead.
    ledger_spool: int | None = None
    ledger_spooling: bool = False
    # (window start, tier) -> [n, latency_us, ttft_n, ttft_us, shed]
    series: Mapping[tuple[int, str], tuple[int, ...]] = field(default_factory=dict)
    # model -> ((window start, concurrency limit), ...): the limit over time
    limits: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    # tierq.cluster.Cluster.status() of a [cluster] host; None when alone
    cluster: Mapping[str, Any] | None = None
    # x-tierq-fairness-id headers ignored (sent by untrusted keys)
    fairness_ignored: int = 0
    # tierq.shadow decision -> n: what limits in shadow mode decided, not applied
    shadow: Mapping[str, int] = field(default_factory=dict)
    # (model, reason) -> n: requests downgraded (served default by their key's
    # ramp rule or priority budget, tierq.downgrades), counted at their outcome
    downgrades: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # (model, upstream, reason) -> n: tries sent again on another replica
    # after one failed before any byte reached the client (reason: the
    # tierq.health outcome, "failed" or "unreachable")
    retries: Mapping[tuple[str, str, str], int] = field(default_factory=dict)
    # The config in force: its file's sha256 ("" for the embedded default) and
    # when it was loaded (epoch s); reloads by result ("applied", "error").
    config_sha256: str = ""
    config_loaded: float = 0.0
    reloads: Mapping[str, int] = field(default_factory=dict)


#: A replica's health states (tierq.health.ReplicaState's values), each a
#: `tierq_replica_health{state}` sample.
REPLICA_STATES: Final = ("healthy", "slow_start", "ejected")

#: The results a config reload counts (`tierq_config_reload_total{result}`).
RELOAD_RESULTS: Final = ("applied", "error")


class GatewayMetrics:
    """The per-process counters the request path bumps, one `observe()` per decision."""

    def __init__(self) -> None:
        self.reloads: dict[str, int] = {r: 0 for r in RELOAD_RESULTS}
        self.requests: dict[tuple[str, str, str], int] = {}
        self.sheds: dict[tuple[str, str, str], int] = {}
        self.upstream_errors: dict[tuple[str, str, str], int] = {}
        self.costs: dict[tuple[str, str], int] = {}
        self.hist: dict[tuple[str, str], Histogram] = {
            (name, tier): Histogram(LATENCY_BUCKETS_S)
            for name in ("ttft", "latency", "queue_wait", *_PREDICTION.values())
            for tier in TIERS
        }
        self.fairness_ignored = 0
        self.shadow: dict[str, int] = {}
        self.downgrades: dict[tuple[str, str], int] = {}
        self.retries: dict[tuple[str, str, str], int] = {}
        # tier -> (latency, queue_wait, ttft): one lookup on the hot path.
        self._tier_hist = {t: (self.hist["latency", t], self.hist["queue_wait", t],
                               self.hist["ttft", t]) for t in TIERS}
        self._series: deque[tuple[int, dict[str, list[int]]]] = deque(maxlen=SERIES_WINDOWS)
        self._window: dict[str, list[int]] = {}
        self._window_end = 0.0  # the current window's end, unix seconds
        self._limits: dict[str, deque[tuple[int, int]]] = {}

    def observe(self, model: str, upstream: str, tier: Tier, status: str, code: str | None,
                queue_s: float, latency_s: float, ttft_s: float | None,
                cost_femto: int = 0) -> None:
        """One request decision (the same one that becomes a ledger row);
        `cost_femto` its billed cost, the ledger row's, in femto-USD."""
        k: tuple[str, str, str] = (model, tier, status)
        requests = self.requests
        requests[k] = requests.get(k, 0) + 1
        if cost_femto:
            c = (model, tier)
            self.costs[c] = self.costs.get(c, 0) + cost_femto
        now = time.time()
        if now >= self._window_end:
            self._rotate(now)
        window = self._window
        w = window.get(tier)
        if w is None:
            w = window[tier] = [0] * 5
        if status == "shed":
            k = (model, tier, code or "")
            self.sheds[k] = self.sheds.get(k, 0) + 1
            w[_SHED] += 1
            return
        if status != "served":
            if status == "failed" and code is not None and code.startswith("upstream_"):
                k = (model, upstream, code)
                self.upstream_errors[k] = self.upstream_errors.get(k, 0) + 1
            return
        # Times are non-negative (monotonic clock); int() truncates to the microsecond.
        lat_us = int(latency_s * 1e6)
        h_lat, h_queue, h_ttft = self._tier_hist[tier]
        h_lat.observe_us(lat_us)
        h_queue.observe_us(int(queue_s * 1e6))
        w[_N] += 1
        w[_LAT] += lat_us
        if ttft_s is not None:
            ttft_us = int(ttft_s * 1e6)
            h_ttft.observe_us(ttft_us)
            w[_TTFT_N] += 1
            w[_TTFT] += ttft_us

    def observe_shadow(self, decisions: Iterable[str]) -> None:
        """A request's decisions (tierq.shadow) that limits in shadow mode made
        and did not apply: counted with its outcome, once each."""
        shadow = self.shadow
        for d in decisions:
            shadow[d] = shadow.get(d, 0) + 1

    def observe_downgrade(self, model: str, reason: str) -> None:
        """A request its key's ramp rule or budget served default (applied, not
        shadow): counted with its outcome, once."""
        k = (model, reason)
        self.downgrades[k] = self.downgrades.get(k, 0) + 1

    def observe_retry(self, model: str, upstream: str, reason: str) -> None:
        """A request sent again on another replica (tierq.app), once per move."""
        k = (model, upstream, reason)
        self.retries[k] = self.retries.get(k, 0) + 1

    def observe_prediction(self, tier: Tier, predicted_s: float, realized_s: float) -> None:
        """An admitted request's predicted wait in line (the core's, at join)
        against the wait it had: the error, by whether it waited longer ("under":
        the prediction was short) or not ("over")."""
        error = realized_s - predicted_s
        self.hist[_PREDICTION["under" if error > 0 else "over"], tier].observe(abs(error))

    def record_limits(self, limits: Iterable[tuple[str, int]], now: float | None = None) -> None:
        """Each pool's concurrency limit now: the last value seen in a chart
        window is that window's point (tierq.capacity.LimitWatch calls this)."""
        start = int(time.time() if now is None else now) // SERIES_STEP_S * SERIES_STEP_S
        for model, limit in limits:
            points = self._limits.get(model)
            if points is None:
                points = self._limits[model] = deque(maxlen=SERIES_WINDOWS)
            if points and points[-1][0] == start:
                points[-1] = (start, limit)
            else:
                points.append((start, limit))

    def _rotate(self, now: float) -> None:
        start = int(now) // SERIES_STEP_S * SERIES_STEP_S
        self._window = {}
        self._window_end = start + SERIES_STEP_S
        self._series.append((start, self._window))

    def snapshot(self, pools: Iterable[PoolSnapshot], *, ready: bool,
                 ledger: Any = None, cluster: Mapping[str, Any] | None = None,
                 config: tuple[str, float] = ("", 0.0)) -> WorkerSnapshot:
        """A copy of this process's numbers (cheap: a few hundred integers)."""
        series = {(start, tier): tuple(v) for start, w in self._series for tier, v in w.items()}
        lag = getattr(ledger, "lag", None)
        return WorkerSnapshot(
            pid=os.getpid(), time=time.time(), ready=ready, pools=tuple(pools),
            requests=dict(self.requests), sheds=dict(self.sheds),
            upstream_errors=dict(self.upstream_errors),
            histograms={k: h.data() for k, h in self.hist.items()},
            costs=dict(self.costs),
            ledger_pending=int(getattr(ledger, "pending", 0) or 0),
            ledger_rows=int(getattr(ledger, "rows_committed", 0) or 0),
            ledger_errors=int(getattr(ledger, "commit_errors", 0) or 0),
            ledger_lag=lag.data() if isinstance(lag, Histogram) else None,
            ledger_spool=_opt_int(getattr(ledger, "spool_rows", None)),
            ledger_spooling=getattr(ledger, "mode", None) == "spool",
            series=series,
            limits={model: tuple(points) for model, points in self._limits.items()},
            cluster=cluster,
            fairness_ignored=self.fairness_ignored,
            shadow=dict(self.shadow),
            downgrades=dict(self.downgrades),
            retries=dict(self.retries),
            config_sha256=config[0], config_loaded=config[1], reloads=dict(self.reloads),
        )


def _opt_int(v: object) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


# ------------------------------------------------------------------ exchange


def _hist_json(h: HistogramData) -> list[Any]:
    return [list(h.bounds), list(h.counts), h.sum_us]


def _hist_of(v: list[Any]) -> HistogramData:
    return HistogramData(tuple(float(b) for b in v[0]), tuple(int(n) for n in v[1]), int(v[2]))


def snapshot_to_json(s: WorkerSnapshot) -> bytes:
    """A snapshot as JSON, for another worker to read (`snapshot_from_json`)."""
    return orjson.dumps({
        "pid": s.pid, "time": s.time, "ready": s.ready,
        "pools": [[p.model, p.upstream, p.priority, p.queue_capacity, p.stats, p.flows,
                   list(p.replicas)] for p in s.pools],
        "requests": [[*k, n] for k, n in s.requests.items()],
        "sheds": [[*k, n] for k, n in s.sheds.items()],
        "upstream_errors": [[*k, n] for k, n in s.upstream_errors.items()],
        "histograms": [[*k, _hist_json(h)] for k, h in s.histograms.items()],
        "costs": [[*k, n] for k, n in s.costs.items()],
        "ledger": [s.ledger_pending, s.ledger_rows, s.ledger_errors, s.ledger_spool,
                   s.ledger_spooling],
        "ledger_lag": None if s.ledger_lag is None else _hist_json(s.ledger_lag),
        "series": [[*k, *v] for k, v in s.series.items()],
        "limits": {model: [list(p) for p in points] for model, points in s.limits.items()},
        "cluster": s.cluster,
        "fairness_ignored": s.fairness_ignored,
        "shadow": s.shadow,
        "downgrades": [[*k, n] for k, n in s.downgrades.items()],
        "retries": [[*k, n] for k, n in s.retries.items()],
        "config": [s.config_sha256, s.config_loaded, s.reloads],
    })


def snapshot_from_json(data: bytes) -> WorkerSnapshot:
    d = orjson.loads(data)

    def counts(rows: list[list[Any]]) -> dict[tuple[str, str, str], int]:
        return {(r[0], r[1], r[2]): int(r[3]) for r in rows}

    return WorkerSnapshot(
        pid=int(d["pid"]), time=float(d["time"]), ready=bool(d["ready"]),
        pools=tuple(PoolSnapshot(p[0], p[1], bool(p[2]), int(p[3]), p[4],
                                 tuple((str(f[0]), int(f[1]), int(f[2]), float(f[3]), int(f[4]))
                                       for f in p[5]),
                                 tuple(p[6]) if len(p) > 6 else ())
                    for p in d["pools"]),
        requests=counts(d["requests"]), sheds=counts(d["sheds"]),
        upstream_errors=counts(d["upstream_errors"]),
        histograms={(h[0], h[1]): _hist_of(h[2]) for h in d["histograms"]},
        costs={(c[0], c[1]): int(c[2]) for c in d.get("costs", [])},
        ledger_pending=int(d["ledger"][0]), ledger_rows=int(d["ledger"][1]),
        ledger_errors=int(d["ledger"][2]),
        ledger_spool=_opt_int(d["ledger"][3]) if len(d["ledger"]) > 3 else None,
        ledger_spooling=bool(d["ledger"][4]) if len(d["ledger"]) > 4 else False,
        ledger_lag=None if d["ledger_lag"] is None else _hist_of(d["ledger_lag"]),
        series={(int(r[0]), r[1]): tuple(int(x) for x in r[2:]) for r in d["series"]},
        limits={model: tuple((int(p[0]), int(p[1])) for p in points)
                for model, points in d.get("limits", {}).items()},
        cluster=d.get("cluster"),
        fairness_ignored=int(d.get("fairness_ignored", 0)),
        shadow={str(k): int(n) for k, n in d.get("shadow", {}).items()},
        downgrades={(str(r[0]), str(r[1])): int(r[2]) for r in d.get("downgrades", [])},
        retries=counts(d.get("retries", [])),
        config_sha256=str(d.get("config", ["", 0.0, {}])[0]),
        config_loaded=float(d.get("config", ["", 0.0, {}])[1]),
        reloads={str(k): int(v) for k, v in d.get("config", ["", 0.0, {}])[2].items()},
    )


# ------------------------------------------------------------------ aggregation


def _sum_into(out: dict[Any, int], src: Mapping[Any, int]) -> None:
    for k, v in src.items():
        out[k] = out.get(k, 0) + v


def _pools(snapshots: Sequence[WorkerSnapshot], shared_admission: bool) -> list[PoolSnapshot]:
    """Pools across workers. With shared admission state every worker reads the
    same global numbers, so one worker's view is the answer; with per-process
    state the numbers add up."""
    if not snapshots:
        return []
    flows: dict[str, list[Sequence[FlowLine]]] = {}
    for snap in snapshots:
        for p in snap.pools:
            flows.setdefault(p.model, []).append(p.flows)
    if shared_admission:
        return [dataclasses.replace(p, flows=tuple(merge(flows[p.model])))
                for p in max(snapshots, key=lambda s: s.time).pools]
    merged: dict[str, PoolSnapshot] = {}
    for snap in snapshots:
        for p in snap.pools:
            have = merged.get(p.model)
            merged[p.model] = p if have is None else PoolSnapshot(
                p.model, p.upstream, p.priority, have.queue_capacity + p.queue_capacity,
                _add_stats(have.stats, p.stats), replicas=p.replicas or have.replicas)
    return [dataclasses.replace(p, flows=tuple(merge(flows[p.model])))
            for p in merged.values()]


def _add_stats(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in a.keys() | b.keys():
        x, y = a.get(k), b.get(k)
        if isinstance(x, Mapping) or isinstance(y, Mapping):
            out[k] = _add_stats(x or {}, y or {})
        elif isinstance(x, str) or isinstance(y, str):
            out[k] = x or y  # a mode or signal name: the same in every process
        else:
            out[k] = (x or 0) + (y or 0)
    return out


# ------------------------------------------------------------------ Prometheus


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in pairs) + "}" if pairs else ""


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v)) if v == v else "NaN"


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Sequence[tuple[str, str]], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def histogram(self, name: str, labels: Sequence[tuple[str, str]], h: HistogramData) -> None:
        cumulative = 0
        for bound, n in zip(h.bounds, h.counts):
            cumulative += n
            self.sample(name + "_bucket", [*labels, ("le", repr(float(bound)))], cumulative)
        cumulative += h.counts[-1]
        self.sample(name + "_bucket", [*labels, ("le", "+Inf")], cumulative)
        self.sample(name + "_sum", labels, h.sum_us / _US)
        self.sample(name + "_count", labels, cumulative)


#: One sample of a family: its labels and a value, or a whole histogram.
Sample = tuple[Sequence[tuple[str, str]], "float | HistogramData"]


@dataclass(frozen=True, slots=True)
class _Scrape:
    """What the families read, each made once per rendering: the snapshots,
    their pools and the sums over workers."""

    snapshots: Sequence[WorkerSnapshot]
    pools: list[PoolSnapshot]  # by model
    requests: dict[tuple[str, str, str], int]
    sheds: dict[tuple[str, str, str], int]
    errors: dict[tuple[str, str, str], int]
    hists: dict[tuple[str, str], HistogramData]
    spools: list[int]  # each worker's reading of the PostgreSQL ledger's spool depth
    cluster: Mapping[str, Any] | None
    lag: HistogramData | None
    costs: dict[tuple[str, str], int]  # (model, tier) -> femto-USD
    downgrades: dict[tuple[str, str], int]  # (model, reason) -> n
    retries: dict[tuple[str, str, str], int]  # (model, upstream, reason) -> n

    @classmethod
    def of(cls, snapshots: Sequence[WorkerSnapshot], shared_admission: bool) -> _Scrape:
        requests: dict[tuple[str, str, str], int] = {}
        sheds: dict[tuple[str, str, str], int] = {}
        errors: dict[tuple[str, str, str], int] = {}
        hists: dict[tuple[str, str], HistogramData] = {}
        costs: dict[tuple[str, str], int] = {}
        downgrades: dict[tuple[str, str], int] = {}
        retries: dict[tuple[str, str, str], int] = {}
        lag: HistogramData | None = None
        for s in snapshots:
            _sum_into(retries, s.retries)
            _sum_into(requests, s.requests)
            _sum_into(costs, s.costs)
            _sum_into(downgrades, s.downgrades)
            _sum_into(sheds, s.sheds)
            _sum_into(errors, s.upstream_errors)
            for k, h in s.histograms.items():
                hists[k] = hists[k] + h if k in hists else h
            if s.ledger_lag is not None:
                lag = s.ledger_lag if lag is None else lag + s.ledger_lag
        return cls(
            snapshots, sorted(_pools(snapshots, shared_admission), key=lambda p: p.model),
            requests, sheds, errors, hists,
            [s.ledger_spool for s in snapshots if s.ledger_spool is not None],
            _cluster(snapshots), lag, costs, downgrades, retries,
        )


@dataclass(frozen=True, slots=True)
class _Family:
    """One metric family: its HELP and TYPE, and where its samples come from."""

    name: str
    kind: str  # gauge | counter | histogram
    help: str
    samples: Callable[[_Scrape], Iterable[Sample]]
    # None: always rendered (HELP and TYPE even without a sample); else only when true.
    shown: Callable[[_Scrape], bool] | None = None


def _one(value: Callable[[_Scrape], float]) -> Callable[[_Scrape], Iterable[Sample]]:
    """A family of one unlabelled sample."""
    return lambda s: [([], value(s))]


def _per_pool(value: Callable[[PoolSnapshot], float]) -> Callable[[_Scrape], Iterable[Sample]]:
    """A family of one sample per pool, labelled by model."""
    return lambda s: [([("model", p.model)], value(p)) for p in s.pools]


def _per_lane(stat: str, label: str) -> Callable[[_Scrape], Iterable[Sample]]:
    """One sample per pool and lane of a per-lane stat (depth, admitted)."""
    return lambda s: [([("model", p.model), (label, lane)], int(p.stats.get(stat, {}).get(lane, 0)))
                      for p in s.pools for lane in TIERS]


def _counted(field_: Callable[[_Scrape], Mapping[tuple[str, str, str], int]],
             labels: tuple[str, str, str]) -> Callable[[_Scrape], Iterable[Sample]]:
    """One sample per key of a summed (a, b, c) -> n counter, in key order."""
    return lambda s: [(list(zip(labels, key)), n) for key, n in sorted(field_(s).items())]


def _served_histogram(name: str) -> Callable[[_Scrape], Iterable[Sample]]:
    return lambda s: [([("tier", tier)], h) for tier in TIERS
                      if (h := s.hists.get((name, tier))) is not None]


def _per_replica(key: str) -> Callable[[_Scrape], Iterable[Sample]]:
    """One sample per pool and replica of a replica line's number."""
    return lambda s: [([("model", p.model), ("replica", str(i))], int(r.get(key) or 0))
                      for p in s.pools for i, r in enumerate(p.replicas)]


def _upstream_replicas(s: _Scrape) -> list[tuple[str, int, Mapping[str, Any]]]:
    """Each upstream's replicas once (the pools of one upstream share its
    replicas' health and engines): (upstream, replica, line)."""
    seen: set[str] = set()
    out: list[tuple[str, int, Mapping[str, Any]]] = []
    for p in s.pools:
        if p.replicas and p.upstream not in seen:
            seen.add(p.upstream)
            out.extend((p.upstream, i, r) for i, r in enumerate(p.replicas))
    return out


def _replica_states(s: _Scrape) -> list[Sample]:
    return [([("upstream", up), ("replica", str(i)), ("state", state)], int(r.get("health") == state))
            for up, i, r in _upstream_replicas(s) for state in REPLICA_STATES]


def _has_replicas(s: _Scrape) -> bool:
    return any(p.replicas for p in s.pools)


def replica_line(endpoint: str, core: Mapping[str, Any], health: Mapping[str, Any],
                 prefix: tuple[int, int] | None) -> dict[str, Any]:
    """One replica as a pool's snapshot carries it: `core` its slots
    (core/replicas.rs stats: in_flight, limit, waiting, grants), `health` its
    tierq.health snapshot, `prefix` its engine's prefix-cache (queries, hits)
    counters in tokens when scraped (vLLM's vllm:prefix_cache_*_total)."""
    line = {"endpoint": endpoint, "in_flight": int(core.get("in_flight", 0)),
            "limit": int(core.get("limit", 0)), "waiting": int(core.get("waiting", 0)),
            "grants": int(core.get("grants", 0)), **health}
    queries, hits = prefix if prefix is not None else (None, None)
    line["prefix_cache_queries"] = queries
    line["prefix_cache_hits"] = hits
    line["prefix_hit_rate"] = round(hits / queries, 4) if queries and hits is not None else None
    return line


def _limit(p: PoolSnapshot) -> int:
    return int(p.stats.get("limit", 0))


def _ttft_level(which: str) -> Callable[[_Scrape], Iterable[Sample]]:
    return lambda s: [([("model", p.model)], float(ms) / 1000) for p in s.pools
                      if (ms := p.stats.get(f"limit_{which}_ms"))]


def _has_spool(s: _Scrape) -> bool:
    return bool(s.spools)


def _has_cluster(s: _Scrape) -> bool:
    return s.cluster is not None


def _cl(s: _Scrape) -> Mapping[str, Any]:
    assert s.cluster is not None
    return s.cluster


#: Every family /metrics shows, in the order shown; `render_prometheus` is one loop over it.
_FAMILIES: Final[tuple[_Family, ...]] = (
    _Family("tierq_ready", "gauge", "1 when every worker is ready to serve.",
            _one(lambda s: int(bool(s.snapshots) and all(w.ready for w in s.snapshots)))),
    _Family("tierq_workers", "gauge", "Worker processes reporting.",
            _one(lambda s: len(s.snapshots))),
    _Family("tierq_queue_depth", "gauge", "Requests waiting for a slot, per pool and lane.",
            _per_lane("depth", "lane")),
    _Family("tierq_queue_capacity", "gauge", "Waiters a pool's queue holds (queue_depth).",
            _per_pool(lambda p: p.queue_capacity)),
    _Family("tierq_in_flight", "gauge", "Requests holding a slot (sent upstream), per pool.",
            _per_pool(lambda p: int(p.stats.get("in_flight", 0)))),
    _Family("tierq_max_concurrency", "gauge",
            "Slots per pool: the concurrency limit in force (fixed, or learned).",
            _per_pool(_limit)),
    _Family("tierq_concurrency_limit", "gauge",
            "The pool's concurrency limit, labelled with its mode (fixed or adaptive) and the "
            "signal that moved it last (engine, latency, backoff, none).",
            lambda s: [([("model", p.model), ("mode", str(p.stats.get("limit_mode", "fixed"))),
                         ("signal", str(p.stats.get("limit_signal", "none")))], _limit(p))
                       for p in s.pools]),
    _Family("tierq_concurrency_limit_bounds", "gauge",
            "An adaptive pool's bounds (min_concurrency, max_concurrency_limit).",
            lambda s: [([("model", p.model), ("bound", bound)], int(p.stats.get(f"limit_{bound}", 0)))
                       for p in s.pools if p.stats.get("limit_mode") == "adaptive"
                       for bound in ("min", "max")]),
    _Family("tierq_concurrency_limit_changes_total", "counter", "Times the learned limit moved.",
            _per_pool(lambda p: int(p.stats.get("limit_changes", 0)))),
    *(_Family(f"tierq_upstream_ttft_{which}_seconds", "gauge",
              f"Adaptive pools learning from the upstream's time to first token: {help_}.",
              _ttft_level(which))
      for which, help_ in (("floor", "the floor it is held against"), ("recent", "its recent level"))),
    _Family("tierq_admitted_total", "counter", "Requests given a slot by the admission core.",
            _per_lane("admitted", "tier")),
    _Family("tierq_admission_shed_total", "counter",
            "Requests the admission core shed (429), per pool and code.",
            lambda s: [([("model", p.model), ("code", code)], int(n))
                       for p in s.pools for code, n in sorted(p.stats.get("shed", {}).items())]),
    _Family("tierq_admission_cancelled_total", "counter",
            "Waiters that left the queue because their client went away.",
            _per_pool(lambda p: int(p.stats.get("cancelled", 0)))),
    _Family("tierq_fair_flows_active", "gauge",
            "Flows (keys, or a trusted key's fairness ids) with requests waiting, per pool "
            "and lane.",
            _per_lane("fair_flows_active", "lane")),
    _Family("tierq_deadline_refused_total", "counter",
            "Requests refused on arrival because their predicted wait was over their "
            "x-tierq-max-queue-ms.",
            _per_pool(lambda p: int(p.stats.get("deadline_refused", 0)))),
    _Family("tierq_requests_total", "counter",
            "Request decisions (one ledger row each), per model, applied tier and status.",
            _counted(lambda s: s.requests, ("model", "tier", "status"))),
    _Family("tierq_shed_total", "counter",
            "429s per model, applied tier and code (admission and per-key limits).",
            _counted(lambda s: s.sheds, ("model", "tier", "code"))),
    _Family("tierq_cost_usd_total", "counter",
            "USD billed per model and applied tier (the ledger rows' cost, summed).",
            lambda s: [([("model", model), ("tier", tier)], femto / _FEMTO)
                       for (model, tier), femto in sorted(s.costs.items())]),
    _Family("tierq_downgrades_total", "counter",
            "Priority requests served default by their key's ramp rule or daily priority budget "
            "(echoed, billed and recorded as default, header x-tierq-service-tier-reason), per "
            "model and reason (ramp, budget). Shadow mode's are in tierq_shadow_decisions_total.",
            lambda s: [([("model", model), ("reason", reason)], n)
                       for (model, reason), n in sorted(s.downgrades.items())]),
    _Family("tierq_replica_in_flight", "gauge",
            "Requests holding a slot on each replica of a pool (upstream endpoints).",
            _per_replica("in_flight"), _has_replicas),
    _Family("tierq_replica_limit", "gauge",
            "Each replica's concurrency limit in force (learned or fixed; ramped in slow start).",
            _per_replica("limit"), _has_replicas),
    _Family("tierq_replica_grants_total", "counter", "Slots granted on each replica.",
            _per_replica("grants"), _has_replicas),
    _Family("tierq_replica_health", "gauge",
            "1 for each replica's health state (healthy, slow_start, ejected; tierq.health), "
            "as the worker answering sees it.",
            _replica_states, _has_replicas),
    _Family("tierq_replica_ejections_total", "counter",
            "Times each replica was ejected after consecutive failures.",
            lambda s: [([("upstream", up), ("replica", str(i))], int(r.get("ejections", 0)))
                       for up, i, r in _upstream_replicas(s)], _has_replicas),
    _Family("tierq_replica_prefix_cache_hit_ratio", "gauge",
            "Each replica's prefix-cache hits over queries (tokens, its engine's "
            "vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total since it started).",
            lambda s: [([("upstream", up), ("replica", str(i))], float(r["prefix_hit_rate"]))
                       for up, i, r in _upstream_replicas(s) if r.get("prefix_hit_rate") is not None],
            _has_replicas),
    _Family("tierq_upstream_retries_total", "counter",
            "Requests sent again on another replica after one failed before any byte reached "
            "the client, per model, upstream and reason (failed: a 5xx; unreachable: refused, "
            "reset or closed before an answer). Billed once, as one request.",
            _counted(lambda s: s.retries, ("model", "upstream", "reason"))),
    _Family("tierq_upstream_errors_total", "counter",
            "Requests failed by the upstream (connect, timeout, 5xx, broken stream).",
            _counted(lambda s: s.errors, ("model", "upstream", "code"))),
    _Family("tierq_time_to_first_token_seconds", "histogram",
            "Served requests: arrival to first token (streams) or to the whole answer (JSON).",
            _served_histogram("ttft")),
    _Family("tierq_request_duration_seconds", "histogram",
            "Served requests: arrival to the last byte, queueing included.",
            _served_histogram("latency")),
    _Family("tierq_queue_wait_seconds", "histogram", "Served requests: time waiting for a slot.",
            _served_histogram("queue_wait")),
    _Family("tierq_queue_wait_prediction_error_seconds", "histogram",
            "Admitted requests with a predicted wait: |realized - predicted| wait in line, "
            "direction under (waited longer than predicted) or over.",
            lambda s: [([("tier", tier), ("direction", direction)], h)
                       for tier in TIERS for direction, name in _PREDICTION.items()
                       if (h := s.hists.get((name, tier))) is not None]),
    _Family("tierq_fairness_id_ignored_total", "counter",
            "x-tierq-fairness-id headers ignored because the key sending them is not trusted.",
            _one(lambda s: sum(w.fairness_ignored for w in s.snapshots))),
    _Family("tierq_shadow_decisions_total", "counter",
            "Decisions of limits in shadow mode (enforce = false), computed and counted, not "
            "applied: rate_limited (the pool's rate), key_rpm, key_tpm (the key's per-minute "
            "limits), downgrade_ramp, downgrade_budget. Each is a request enforcing would have "
            "refused (or downgraded).",
            lambda s: [([("decision", d)], sum(w.shadow.get(d, 0) for w in s.snapshots))
                       for d in SHADOW_DECISIONS]),
    # Every worker of a host reloads on each SIGHUP: the host's count is the
    # most any worker counted, not their sum.
    _Family("tierq_config_reload_total", "counter",
            "Config reloads (SIGHUP, tierq reload) by result: applied, or error (refused: the "
            "running config stays).",
            lambda s: [([("result", r)], max(w.reloads.get(r, 0) for w in s.snapshots))
                       for r in RELOAD_RESULTS if s.snapshots]),
    _Family("tierq_ledger_pending_rows", "gauge",
            "Ledger rows queued for the writer, not yet taken into a batch.",
            _one(lambda s: sum(w.ledger_pending for w in s.snapshots))),
    _Family("tierq_ledger_rows_total", "counter", "Ledger rows committed.",
            _one(lambda s: sum(w.ledger_rows for w in s.snapshots))),
    _Family("tierq_ledger_commit_errors_total", "counter", "Ledger batches that failed to commit.",
            _one(lambda s: sum(w.ledger_errors for w in s.snapshots))),
    # The workers of a host share one spool file, each reading its depth: the
    # largest reading is the freshest bound, a sum would count rows twice.
    _Family("tierq_ledger_spool_rows", "gauge",
            "Rows in the PostgreSQL ledger's local spool, waiting to be replayed.",
            _one(lambda s: max(s.spools)), _has_spool),
    _Family("tierq_ledger_spooling", "gauge",
            "1 while ledger rows go to the local spool (PostgreSQL unreachable or "
            "the spool being replayed), else 0.",
            _one(lambda s: int(any(w.ledger_spooling for w in s.snapshots))), _has_spool),
    _Family("tierq_cluster_redis_up", "gauge",
            "1 while this host reaches the cluster's Redis ([cluster]).",
            _one(lambda s: int(bool(_cl(s)["redis_up"]))), _has_cluster),
    _Family("tierq_cluster_hosts", "gauge", "Live gateway hosts this host last saw, itself included.",
            _one(lambda s: int(_cl(s)["hosts"])), _has_cluster),
    _Family("tierq_cluster_lease", "gauge",
            "Slots of each pool's cluster-wide limit leased to this host.",
            lambda s: [([("model", model)], int(lease["lease"]))
                       for model, lease in sorted(_cl(s)["leases"].items())], _has_cluster),
    _Family("tierq_cluster_redis_calls_total", "counter",
            "Round trips to Redis (lease syncs and key decisions).",
            _one(lambda s: int(_cl(s)["redis_calls"])), _has_cluster),
    _Family("tierq_cluster_redis_errors_total", "counter", "Redis calls that failed.",
            _one(lambda s: int(_cl(s)["redis_errors"])), _has_cluster),
    _Family("tierq_ledger_write_lag_seconds", "histogram",
            "Per committed batch: its oldest row's time from queued to committed.",
            lambda s: [] if s.lag is None else [([], s.lag)]),
)


#: The name of every family /metrics may show (the shipped dashboard and alerts use only these).
METRIC_NAMES: Final[tuple[str, ...]] = tuple(f.name for f in _FAMILIES)


def render_prometheus(snapshots: Sequence[WorkerSnapshot], *,
                      shared_admission: bool = False) -> str:
    """Prometheus text exposition (0.0.4) of one or many workers' snapshots.

    Counters and histograms are summed over workers. Pool gauges and the core's
    counters are summed too, unless `shared_admission` (all workers share one
    admission state in shared memory): then they are read once.
    """
    scrape = _Scrape.of(snapshots, shared_admission)
    o = _Out()
    for f in _FAMILIES:
        if f.shown is not None and not f.shown(scrape):
            continue
        o.family(f.name, f.kind, f.help)
        for labels, value in f.samples(scrape):
            if isinstance(value, HistogramData):
                o.histogram(f.name, labels, value)
            else:
                o.sample(f.name, labels, value)
    return "\n".join(o.lines) + "\n"


def _cluster(snapshots: Sequence[WorkerSnapshot]) -> Mapping[str, Any] | None:
    """The newest cluster status among the workers' snapshots: the lease
    agent's (worker 0 of a host with several workers) when it has reported."""
    found = [s for s in snapshots if s.cluster is not None]
    agents = [s for s in found if s.cluster is not None and s.cluster.get("agent", True)]
    pick = agents or found
    return max(pick, key=lambda s: s.time).cluster if pick else None


# ------------------------------------------------------------------ status page


def status_json(snapshots: Sequence[WorkerSnapshot], *,
                shared_admission: bool = False) -> dict[str, Any]:
    """What /status.json returns: pools, per-tier totals and the latency series."""
    now = time.time()
    pools: list[dict[str, Any]] = []
    limits: dict[str, tuple[tuple[int, int], ...]] = {}
    for s in sorted(snapshots, key=lambda s: s.time):
        limits.update(s.limits)  # one worker's history: the limit is host-wide
    for p in _pools(snapshots, shared_admission):
        st = p.stats
        limit = _limit(p)
        pools.append({
            "model": p.model, "upstream": p.upstream, "priority": p.priority,
            "in_flight": int(st.get("in_flight", 0)),
            # Slots out of use (a cluster lease, replicas out of rotation),
            # and those still busy that are withheld as they free.
            "withheld": int(st.get("withheld", 0)), "owed": int(st.get("owed", 0)),
            "max_concurrency": limit,
            "limit": {"value": limit, "mode": str(st.get("limit_mode", "fixed")),
                      "signal": str(st.get("limit_signal", "none")),
                      "min": int(st.get("limit_min", limit)),
                      "max": int(st.get("limit_max", limit)),
                      "series": [list(pt) for pt in limits.get(p.model, ())]},
            "queue_capacity": p.queue_capacity,
            "depth": {lane: int(st.get("depth", {}).get(lane, 0)) for lane in TIERS},
            "admitted": {lane: int(st.get("admitted", {}).get(lane, 0)) for lane in TIERS},
            "shed": {code: int(n) for code, n in st.get("shed", {}).items()},
            "cancelled": int(st.get("cancelled", 0)),
            "fairness": str(st.get("fairness", "off")),
            "deadline_refused": int(st.get("deadline_refused", 0)),
            # Per lane: the learned refusal margin, a share of the predicted wait.
            "deadline_margin": {lane: round(float(st.get("deadline_margin", {}).get(lane, 0.0)), 4)
                                for lane in TIERS},
            "enforce": bool(st.get("enforce", True)),
            "shadow_rate_limited": int(st.get("shadow_rate_limited", 0)),
            "flows": {"active": {lane: int(st.get("fair_flows_active", {}).get(lane, 0))
                                 for lane in TIERS}, **flows_json(p.flows)},
            **({"replicas": [dict(r) for r in p.replicas]} if p.replicas else {}),
        })
    # Busy pools first, then the ones that ever saw traffic, then by name.
    pools.sort(key=lambda p: (-(p["in_flight"] + sum(p["depth"].values())),
                              -(sum(p["admitted"].values()) + sum(p["shed"].values())),
                              p["model"]))
    totals = {tier: {"served": 0, "shed": 0, "failed": 0, "cancelled": 0} for tier in TIERS}
    series: dict[tuple[int, str], list[int]] = {}
    for s in snapshots:
        for (_, tier, status), n in s.requests.items():
            if tier in totals and status in totals[tier]:
                totals[tier][status] += n
        for k, v in s.series.items():
            acc = series.setdefault(k, [0] * 5)
            for i, x in enumerate(v):
                acc[i] += x
    last = int(now) // SERIES_STEP_S * SERIES_STEP_S
    points = []
    for start in range(last - (SERIES_WINDOWS - 1) * SERIES_STEP_S, last + 1, SERIES_STEP_S):
        point: dict[str, Any] = {"t": start}
        for tier in TIERS:
            w = series.get((start, tier), [0] * 5)
            point[tier] = {
                "served": w[_N], "shed": w[_SHED],
                "latency_ms": round(w[_LAT] / w[_N] / 1000, 3) if w[_N] else None,
                "ttft_ms": round(w[_TTFT] / w[_TTFT_N] / 1000, 3) if w[_TTFT_N] else None,
            }
        points.append(point)
    return {
        "time": now,
        "ready": bool(snapshots) and all(s.ready for s in snapshots),
        "workers": len(snapshots),
        "pools": pools,
        "totals": totals,
        "series": {"step_s": SERIES_STEP_S, "points": points},
        "cluster": _cluster(snapshots),
        "shadow": {d: sum(s.shadow.get(d, 0) for s in snapshots) for d in SHADOW_DECISIONS},
        "downgrades": _downgrades(snapshots),
        "config": _config(snapshots),
    }


def _downgrades(snapshots: Sequence[WorkerSnapshot]) -> dict[str, Any]:
    """The downgrades made (applied), per reason over every model, and per model."""
    by_model: dict[str, dict[str, int]] = {}
    for s in snapshots:
        for (model, reason), n in s.downgrades.items():
            counts = by_model.setdefault(model, dict.fromkeys(REASONS, 0))
            counts[reason] = counts.get(reason, 0) + n
    return {**{r: sum(m.get(r, 0) for m in by_model.values()) for r in REASONS},
            "models": {model: by_model[model] for model in sorted(by_model)}}


def _config(snapshots: Sequence[WorkerSnapshot]) -> dict[str, Any]:
    """The config in force: the newest one any worker loaded, and whether
    every worker runs it."""
    if not snapshots:
        return {"sha256": "", "loaded_at": None, "all_workers": True}
    newest = max(snapshots, key=lambda s: s.config_loaded)
    return {"sha256": newest.config_sha256, "loaded_at": newest.config_loaded,
            "all_workers": all(s.config_sha256 == newest.config_sha256 for s in snapshots)}
