"""The gateway's state: its pools, upstreams, ledger, keys, metrics and drain.

One `Gateway` per process, built whole by `Gateway.from_config` (what is always
there: pools, upstreams, ledger, metrics) when `tierq.app.create_app` makes the
app, and started by `tierq.lifecycle`, which adds what the config may leave out
(keys, their limiter, the cluster); handlers reach it through `GATEWAY`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from tierq._core import Replicas
from tierq.admission import Admission, ReplicaPool
from tierq.capacity import Capacity
from tierq.cluster import Cluster, cluster_settings
from tierq.config import AdmissionConfig, Config
from tierq.fairness import FlowBoard
from tierq.downgrades import Downgrades
from tierq.keys import KeyLimiter
from tierq.metrics import GatewayMetrics, PoolSnapshot, WorkerSnapshot, replica_line
from tierq.probes import HealthLoop
from tierq.served import Catalog, ModelEntry
from tierq.tracing import Tracer
from tierq.stores import KeyStoreLike, LedgerStore, ledger_from_config
from tierq.upstream import UpstreamClient
from tierq.watchdog import WriteWatchdog

__all__ = ["CLUSTER_CLOSED", "CONFIG", "DRAIN", "GATEWAY", "Gateway", "Pool"]

# The cancel message that tells a queued request it is shed by a drain (SIGTERM),
# not abandoned by its client.
DRAIN: Final = "tierq-drain"
# The cancel message that tells a queued request the cluster's Redis is gone
# and `on_redis_down = "closed"`.
CLUSTER_CLOSED: Final = "tierq-cluster-closed"


@dataclass(slots=True)
class Pool:
    """One model's backend capacity: its admission state and upstream, and who
    got its service over the last minute (/status)."""

    entry: ModelEntry
    admission: Admission
    upstream: UpstreamClient
    flows: FlowBoard = field(default_factory=FlowBoard)
    # Its upstream's endpoints' slots and limits, with more than one endpoint.
    replicas: ReplicaPool | None = None

    @classmethod
    def new(cls, entry: ModelEntry, admission: Admission, upstream: UpstreamClient,
            flows: FlowBoard | None = None, replica_core: Replicas | None = None) -> Pool:
        """A pool, with its replicas when its upstream has several endpoints
        (`replica_core`: this worker's handle on their shared region)."""
        replicas = None
        if entry.replica is not None:
            replicas = ReplicaPool(admission, entry.replicas, entry.replica.settings, core=replica_core)
        return cls(entry, admission, upstream, flows or FlowBoard(), replicas)


@dataclass(slots=True)
class Gateway:
    config: Config
    catalog: Catalog
    pools: dict[str, Pool]
    upstreams: dict[str, UpstreamClient]
    ledger: LedgerStore
    keys: KeyStoreLike | None = None  # when [keys] is configured (set at start)
    limiter: KeyLimiter | None = None
    downgrades: Downgrades | None = None  # with keys: their ramp rules and priority budgets
    cluster: Cluster | None = None  # [cluster]: slots and key limits shared through Redis
    allow_remote_without_keys: bool = False
    ready: bool = False
    models_body: bytes = b""
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    draining: bool = False
    waiting: set[asyncio.Task[Any]] = field(default_factory=set)  # queued in admission
    watchdog: WriteWatchdog = field(init=False)  # from config.server.write_timeout_s
    capacity: Capacity = field(default_factory=Capacity)  # what feeds the pools' limits
    tracer: Tracer | None = None  # [tracing]: None without it (nothing traced, nothing imported)
    # Called after a key changed here (the admin API): tells this host's other
    # workers to drop their cached keys (`tierq serve --workers N`).
    keys_changed: Callable[[], None] = field(default=lambda: None)
    # The config in force (/status.json): its file's sha256 ("": the embedded
    # default) and when it was loaded; a reload (tierq.lifecycle) sets both.
    config_sha256: str = ""
    config_loaded: float = field(default_factory=time.time)
    # Upstream clients a reload replaced: requests in flight still use them;
    # closed at exit.
    retired: list[UpstreamClient] = field(default_factory=list)
    # One per upstream with several endpoints: its probes, and its replicas'
    # health carried to its pools' cores (tierq.lifecycle).
    health_loops: list[HealthLoop] = field(default_factory=list)
    # Settings a reload cannot change in place (`tierq serve --workers N`
    # shares each pool's block; [cluster] leases): `tierq.lifecycle.reload`.
    shared_pools: bool = False
    # A reload's admission settings swapped in but not yet applied to the
    # pools, by model: with --workers N they wait until every worker holds the
    # new config (`tierq.lifecycle.reload`, `retune`).
    retunes: dict[str, AdmissionConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.watchdog = WriteWatchdog(self.config.server.write_timeout_s)
        if self.config.source is not None and not self.config_sha256:
            self.config_sha256 = config_sha256(self.config.source)

    @classmethod
    def from_config(cls, config: Config, *, ledger: LedgerStore | None = None,
                    pools: Mapping[str, Admission] | None = None,
                    allow_remote_without_keys: bool = False) -> Gateway:
        """The gateway `config` describes, whole and not yet started: an upstream
        client per upstream (its pool sized from the admission limits of the
        models it serves), a pool per model (`pools`: admission made by the
        caller, as `tierq serve --workers N` does, its `replicas` the shared
        replica regions by model; else each model's own), the ledger
        (`ledger`, else the one `config.ledger` names)."""
        catalog = Catalog.from_config(config)
        pool_sizes = connection_bounds(catalog)
        upstreams = {u.name: UpstreamClient(u, u.base_url, u.max_connections
                                            or min(pool_sizes.get(u.name, 1), 4096))
                     for u in config.upstreams}
        replica_cores: Mapping[str, Replicas] = getattr(pools, "replicas", None) or {}
        admissions = {}
        for m in catalog.values():
            if pools is not None:
                admissions[m.id] = pools[m.id]
            else:
                settings = m.admission.settings
                if config.cluster is not None:
                    settings = cluster_settings(m.admission)
                admissions[m.id] = Admission(settings)
        return cls(config, catalog,
                   {m.id: Pool.new(m, admissions[m.id], upstreams[m.upstream],
                                   replica_core=replica_cores.get(m.id))
                    for m in catalog.values()},
                   upstreams, ledger if ledger is not None else ledger_from_config(config.ledger),
                   allow_remote_without_keys=allow_remote_without_keys,
                   shared_pools=pools is not None or config.cluster is not None,
                   tracer=Tracer(config.tracing) if config.tracing is not None else None)

    def begin_drain(self) -> int:
        """Stop taking work: not ready, new requests and every queued one get 503.

        Requests already holding a slot (streams included) run on; the server's
        shutdown timeout is their deadline. Returns how many waiters were shed.
        """
        self.ready = False
        self.draining = True
        return sum(1 for task in list(self.waiting) if task.cancel(DRAIN))

    def shed_waiting(self, why: str) -> int:
        """Cancels every queued request with message `why`; returns how many."""
        return sum(1 for task in list(self.waiting) if task.cancel(why))

    def bases(self) -> dict[str, tuple[str, ...]]:
        """Each upstream's endpoints (/v1/forward's targets)."""
        return {name: u.endpoints for name, u in self.upstreams.items()}

    def snapshot(self) -> WorkerSnapshot:
        """This process's admission state and request metrics (tierq.metrics)."""
        pools = (PoolSnapshot(p.entry.id, p.entry.upstream, p.entry.priority,
                              p.entry.admission.settings.queue_depth, p.admission.stats(),
                              tuple(p.flows.data()), self._replica_lines(p))
                 for p in self.pools.values())
        return self.metrics.snapshot(pools, ready=self.ready, ledger=self.ledger,
                                     cluster=self.cluster.status() if self.cluster else None,
                                     config=(self.config_sha256, self.config_loaded))

    def _replica_lines(self, p: Pool) -> tuple[dict[str, Any], ...]:
        """A pool's replicas as /status and /metrics show them (tierq.metrics)."""
        if p.replicas is None:
            return ()
        health = p.upstream.health
        scrapers = self.capacity.replica_scrapers.get(p.entry.upstream, [])
        lines = []
        for i, core in enumerate(p.replicas.stats()):
            view = health.snapshot(i) if health is not None and i < health.replicas else {
                "health": "ejected" if core.get("down") else "healthy", "ejections": 0}
            prefix = scrapers[i].prefix_cache if i < len(scrapers) else None
            endpoint = p.upstream.endpoints[i] if i < len(p.upstream.endpoints) else ""
            lines.append(replica_line(endpoint, core, view, prefix))
        return tuple(lines)


def connection_bounds(catalog: Catalog) -> dict[str, int]:
    """Each upstream's connections per endpoint: the sum of its models' most
    slots on one replica (a fixed limit, or an adaptive one's bound)."""
    sizes: dict[str, int] = {}
    for m in catalog.values():
        per = (m.replica or m.admission).settings.limit_max
        sizes[m.upstream] = sizes.get(m.upstream, 0) + per
    return sizes


def config_sha256(path: str) -> str:
    """The sha256 (hex) of a config file's bytes, as /status.json shows it;
    "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


CONFIG: Final = web.AppKey("tierq.config", Config)
GATEWAY: Final = web.AppKey("tierq.gateway", Gateway)

