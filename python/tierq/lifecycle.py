"""Start-up and clean-up of a gateway built whole (an aiohttp cleanup context):
the sims of upstreams of kind "sim" (from the caller), upstream clients, what
feeds the pools' limits (tierq.capacity), the ledger, the key store and limiter,
the cluster agent, the write watchdog, the trace exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from tierq._core import SharedKeyBuckets
from tierq.cluster import Cluster
from tierq.config import UpstreamConfig
from tierq.gateway import CLUSTER_CLOSED, Gateway
from tierq.downgrades import Downgrades
from tierq.keys import KeyLimiter
from tierq.tiers import Tier
from tierq.stores import close_key_store, start_key_store

__all__ = ["StartSims", "lifecycle"]

#: Starts the backends of the given kind="sim" upstreams inside the app's event
#: loop, yields each one's base URL by upstream name, and stops them on exit
#: (`tierq.embedded.start_sims`, which the CLI passes).
StartSims = Callable[[Sequence[UpstreamConfig]], contextlib.AbstractAsyncContextManager[Mapping[str, str]]]


def lifecycle(
    gw: Gateway, sim: Any, start_sims: StartSims | None, *, own_ledger: bool,
    shared_worker: int | None = None, key_buckets: SharedKeyBuckets | None = None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Starts `gw` (built whole by `Gateway.from_config`) and stops it.
    `shared_worker`: this worker's index when its pools are shared (`tierq serve
    --workers N`); `own_ledger`: the ledger is the gateway's to start and close."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # The sims are entered first and exited last: every upstream client is
        # closed before its backend goes.
        async with contextlib.AsyncExitStack() as sims:
            try:
                embedded = [u for u in gw.config.upstreams if u.kind == "sim"]
                sim_urls: Mapping[str, str] = {}
                if sim is not None:
                    sim_urls = {u.name: sim.url for u in embedded}
                elif embedded and start_sims is not None:
                    sim_urls = await sims.enter_async_context(start_sims(embedded))
                for name, client in gw.upstreams.items():
                    await client.start(sim_urls.get(name))
                for u in gw.config.upstreams:
                    gw.capacity.add_upstream(u.name, u.kind, gw.upstreams[u.name].base_url,
                                             u.metrics, u.metrics_url, u.metrics_interval_ms / 1000.0)
                for p in gw.pools.values():
                    gw.capacity.add_pool(p.entry.id, p.entry.upstream_model, p.entry.upstream,
                                         p.admission)
                gw.capacity.start(record=gw.metrics.record_limits)
                if own_ledger:
                    await gw.ledger.start()
                gw.keys = await start_key_store(gw.config.keys)
                if gw.keys is not None:
                    gw.limiter = KeyLimiter(shared=key_buckets)
                    gw.downgrades = downgrades = Downgrades(shared=key_buckets)
                    # Today's priority spend as the ledger has it: a restart
                    # keeps each key's budget where it was.
                    lines = await asyncio.to_thread(gw.ledger.usage, downgrades.day_start())
                    downgrades.rebuild((line.key_id, line.cost) for line in lines
                                       if line.applied_tier == Tier.PRIORITY)
                cluster = gw.config.cluster
                if cluster is not None:
                    # With several workers the pools are shared: worker 0 runs
                    # the host's lease agent (the supervisor withheld every slot
                    # before forking), the others only make key decisions.
                    gw.cluster = Cluster(cluster, cluster.host_id or "tierq",
                                         {mid: (p.admission, p.entry.admission)
                                          for mid, p in gw.pools.items()},
                                         on_closed=lambda: gw.shed_waiting(CLUSTER_CLOSED),
                                         worker=shared_worker)
                    await gw.cluster.start()
                gw.watchdog.start()
                if gw.tracer is not None:
                    gw.tracer.start()
                gw.ready = True
                yield
            finally:
                gw.ready = False
                await gw.capacity.stop()
                await gw.watchdog.stop()
                if gw.cluster is not None:
                    await gw.cluster.stop()
                for client in gw.upstreams.values():
                    await client.close()
                if gw.keys is not None:
                    await close_key_store(gw.keys)
                if own_ledger:
                    await gw.ledger.close()
                if gw.tracer is not None:
                    # Last: the spans of requests the drain ended are sent too.
                    await asyncio.to_thread(gw.tracer.stop)

    return ctx
