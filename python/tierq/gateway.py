"""The gateway's state: its pools, upstreams, ledger, keys, metrics and drain.

One `Gateway` per process, built by `tierq.app.create_app` and filled in at
start-up by `tierq.lifecycle`; handlers reach it through `GATEWAY`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from tierq.admission import Admission
from tierq.capacity import Capacity
from tierq.cluster import Cluster
from tierq.config import Config
from tierq.keys import KeyLimiter
from tierq.metrics import GatewayMetrics, PoolSnapshot, WorkerSnapshot
from tierq.served import Catalog, ModelEntry
from tierq.stores import KeyStoreLike, LedgerStore
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
    """One model's backend capacity: its admission state and upstream."""

    entry: ModelEntry
    admission: Admission
    upstream: UpstreamClient


@dataclass(slots=True)
class Gateway:
    config: Config
    catalog: Catalog
    pools: dict[str, Pool] = field(default_factory=dict)
    upstreams: dict[str, UpstreamClient] = field(default_factory=dict)
    ledger: LedgerStore | None = None
    keys: KeyStoreLike | None = None  # when [keys] is configured
    limiter: KeyLimiter | None = None
    cluster: Cluster | None = None  # [cluster]: slots and key limits shared through Redis
    allow_remote_without_keys: bool = False
    ready: bool = False
    models_body: bytes = b""
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    draining: bool = False
    waiting: set[asyncio.Task[Any]] = field(default_factory=set)  # queued in admission
    watchdog: WriteWatchdog = field(init=False)  # from config.server.write_timeout_s
    capacity: Capacity = field(default_factory=Capacity)  # what feeds the pools' limits

    def __post_init__(self) -> None:
        self.watchdog = WriteWatchdog(self.config.server.write_timeout_s)

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

    def bases(self) -> dict[str, str]:
        return {name: u.base_url for name, u in self.upstreams.items()}

    def snapshot(self) -> WorkerSnapshot:
        """This process's admission state and request metrics (tierq.metrics)."""
        pools = (PoolSnapshot(p.entry.id, p.entry.upstream, p.entry.priority,
                              p.entry.admission.settings.queue_depth, p.admission.stats())
                 for p in self.pools.values())
        return self.metrics.snapshot(pools, ready=self.ready, ledger=self.ledger,
                                     cluster=self.cluster.status() if self.cluster else None)


CONFIG: Final = web.AppKey("tierq.config", Config)
GATEWAY: Final = web.AppKey("tierq.gateway", Gateway)

