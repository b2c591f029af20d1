"""`Cluster`: this host's side of the cluster, the one object the gateway holds.

It puts together the connection to Redis and its down modes
(tierq.cluster.link), the lease agent (tierq.cluster.leases), the key limits
(tierq.cluster.keys) and the keys' downgrades (tierq.cluster.downgrades), and
answers for them: start and stop, `wake` on a
request, `check_open`, the key calls, `status()` for /metrics and /status.json.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tierq.admission import Admission, ReplicaPool
from tierq.cluster.downgrades import ClusterDowngrades
from tierq.cluster.keys import ClusterKeys
from tierq.cluster.leases import LeaseAgent
from tierq.cluster.link import RedisLink
from tierq.config import AdmissionConfig, ClusterConfig
from tierq.keys import KeyInfo, KeyRefusal

__all__ = ["Cluster", "default_host_id"]


def default_host_id(port: int) -> str:
    """`hostname:port`, the host id when `[cluster] host_id` is not set."""
    return f"{socket.gethostname()}:{port}"


class Cluster:
    """This host's side of the cluster: the lease agent and the key limits."""

    def __init__(self, config: ClusterConfig, host_id: str,
                 pools: Mapping[str, tuple[Admission, AdmissionConfig]],
                 on_closed: Callable[[], object] | None = None,
                 worker: int | None = None, workers: int = 1,
                 replicas: Mapping[str, tuple[ReplicaPool, AdmissionConfig, Sequence[str]]]
                 | None = None) -> None:
        """`on_closed`: called when Redis goes down in "closed" mode, to answer
        the requests queued on this host 503 (the gateway's waiting tasks).
        `worker`: this process's index when the host runs several workers on
        shared pools (None: one process). Worker 0 runs the host's lease agent
        on the shared pools (whose slots the supervisor withheld before
        forking); every other worker only makes key decisions and watches
        Redis for its own requests. `workers`: how many there are (1: one
        process). `replicas`: the pools over several endpoints, each replica
        leased on its own (tierq.cluster.leases.ReplicaSlots)."""
        self.config = config
        self.host_id = host_id
        self.link = RedisLink(config, host_id, on_closed)
        self.agent = (LeaseAgent(self.link, pools, shared=worker is not None, replicas=replicas)
                      if worker is None or worker == 0 else None)
        self.keys = ClusterKeys(self.link)
        self.downgrades = ClusterDowngrades(self.link, workers=workers)
        self._models = list(pools)
        self._watch: asyncio.Task[None] | None = None
        self._watch_wake = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        if self.agent is not None:
            await self.agent.start()
            return
        await self.link.watch_once(self._models)
        self._watch = asyncio.create_task(
            self.link.watch(self._models, self._watch_wake, lambda: self._stopping),
            name="tierq-cluster-watch")

    async def stop(self) -> None:
        """Stops the agent and hands this host's leases back (best effort)."""
        self._stopping = True
        self._watch_wake.set()
        if self._watch is not None:
            await self._watch
        if self.agent is not None:
            await self.agent.stop()
        await self.settled()
        if self.agent is not None:
            await self.agent.leave()
        await self.link.close()

    def wake(self) -> None:
        """A request arrived: the agent looks whether the lease still covers it."""
        if self.agent is not None:
            self.agent.wake()

    @property
    def closed(self) -> bool:
        return self.link.closed

    def check_open(self) -> None:
        """Raises ClusterUnavailable when Redis is down in "closed" mode."""
        self.link.check_open()

    async def check_key(self, key: KeyInfo, est_tokens: int) -> float | None:
        """None if admitted (and charged) cluster-wide; else seconds until it
        would be. Raises ClusterUnavailable when Redis is down in "closed" mode."""
        return await self.keys.check_key(key, est_tokens)

    async def decide_key(self, key: KeyInfo, est_tokens: int) -> KeyRefusal | None:
        """`check_key` with which limit refused (`KeyLimiter.decide`)."""
        return await self.keys.decide_key(key, est_tokens)

    def settle_key(self, key: KeyInfo, est_tokens: int, real_tokens: int) -> None:
        """Corrects the token charge of `check_key` to the real usage."""
        self.keys.settle_key(key, est_tokens, real_tokens)

    def refund_key(self, key: KeyInfo, est_tokens: int, request: bool) -> None:
        """Gives back what `check_key` charged for a request the gateway did not serve."""
        self.keys.refund_key(key, est_tokens, request)

    async def settled(self) -> None:
        """Waits for the key settlements and refunds sent so far (limits and downgrades)."""
        await self.keys.settled()
        await self.downgrades.settled()

    @property
    def redis_calls(self) -> int:
        return self.link.calls

    def status(self) -> dict[str, Any]:
        """For /metrics and /status.json."""
        link = self.link
        return {
            "host_id": self.host_id,
            "agent": self.agent is not None,
            "redis_up": link.up,
            "on_redis_down": self.config.on_redis_down,
            "hosts": link.hosts,
            "redis_calls": link.calls,
            "redis_errors": link.errors,
            # time spent in lease round trips
            "lease_sync_s": round(self.agent.sync_s if self.agent is not None else 0.0, 6),
            # the longest Redis heard nothing from this host's agent (see LeaseAgent)
            "lease_gap_max_s": round(self.agent.gap_max_s if self.agent is not None else 0.0, 3),
            "down_for_s": link.down_for(),
            "leases": self.agent.status() if self.agent is not None else {},
        }
