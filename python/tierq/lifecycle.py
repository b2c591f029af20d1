"""Start-up and clean-up of a gateway (an aiohttp cleanup context): the sims of
upstreams of kind "sim" (from the caller), upstream clients, admission pools and
what feeds their limits (tierq.capacity), the ledger, the key store and limiter,
the cluster agent, the write watchdog.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from tierq._core import SharedKeyBuckets
from tierq.admission import Admission
from tierq.cluster import Cluster, cluster_settings
from tierq.config import UpstreamConfig
from tierq.gateway import CLUSTER_CLOSED, Gateway, Pool
from tierq.keys import KeyLimiter
from tierq.stores import close_key_store, ledger_from_config, start_key_store
from tierq.upstream import UpstreamClient

__all__ = ["StartSims", "lifecycle"]

#: Starts the backends of the given kind="sim" upstreams inside the app's event
#: loop, yields each one's base URL by upstream name, and stops them on exit
#: (`tierq.embedded.start_sims`, which the CLI passes).
StartSims = Callable[[Sequence[UpstreamConfig]], contextlib.AbstractAsyncContextManager[Mapping[str, str]]]


def lifecycle(
    gw: Gateway, sim: Any, start_sims: StartSims | None, *, own_ledger: bool,
    pools: Mapping[str, Admission] | None = None, key_buckets: SharedKeyBuckets | None = None,
) -> Callable[[web.Application], AsyncIterator[None]]:
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
                base_urls = {u.name: sim_urls[u.name] if u.kind == "sim" else u.base_url
                             for u in gw.config.upstreams}
                pool_sizes: dict[str, int] = {}
                for m in gw.catalog.values():
                    pool_sizes[m.upstream] = pool_sizes.get(m.upstream, 0) + m.admission.settings.limit_max
                for u in gw.config.upstreams:
                    size = u.max_connections or min(pool_sizes.get(u.name, 1), 4096)
                    client = UpstreamClient(u, base_urls[u.name], size)
                    await client.start()
                    gw.upstreams[u.name] = client
                cluster = gw.config.cluster
                for m in gw.catalog.values():
                    settings = m.admission.settings
                    if cluster is not None:
                        settings = cluster_settings(m.admission)
                    adm = pools[m.id] if pools is not None else Admission(settings)
                    gw.pools[m.id] = Pool(m, adm, gw.upstreams[m.upstream])
                for u in gw.config.upstreams:
                    gw.capacity.add_upstream(u.name, u.kind, base_urls[u.name], u.metrics,
                                             u.metrics_url, u.metrics_interval_ms / 1000.0)
                for p in gw.pools.values():
                    gw.capacity.add_pool(p.entry.id, p.entry.upstream_model, p.entry.upstream,
                                         p.admission)
                gw.capacity.start(record=gw.metrics.record_limits)
                if gw.ledger is None:
                    gw.ledger = ledger_from_config(gw.config.ledger)
                    await gw.ledger.start()
                gw.keys = await start_key_store(gw.config.keys)
                if gw.keys is not None:
                    gw.limiter = KeyLimiter(shared=key_buckets)
                if cluster is not None:
                    # With several workers the pools are shared: worker 0 runs
                    # the host's lease agent (the supervisor withheld every slot
                    # before forking), the others only make key decisions.
                    index = getattr(pools, "index", 0) if pools is not None else None
                    gw.cluster = Cluster(cluster, cluster.host_id or "tierq",
                                         {mid: (p.admission, p.entry.admission)
                                          for mid, p in gw.pools.items()},
                                         on_closed=lambda: gw.shed_waiting(CLUSTER_CLOSED),
                                         worker=index)
                    await gw.cluster.start()
                gw.watchdog.start()
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
                if own_ledger and gw.ledger is not None:
                    await gw.ledger.close()

    return ctx
