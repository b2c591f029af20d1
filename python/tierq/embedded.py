"""The embedded default: an in-process sim for each upstream of kind "sim".

`tierq serve` (and each of its workers) hands `start_sims` to `create_app`,
which enters it at start-up inside the app's own event loop: one sim per such
upstream on a free loopback port, with that upstream's `[upstreams.sim]`
settings, all stopped at shutdown. Only the wiring (this module and the CLI)
imports tierq.sim; the gateway knows a sim upstream by its base URL alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

from tierq.config import UpstreamConfig
from tierq.sim import start_sim

__all__ = ["start_sims"]


@contextlib.asynccontextmanager
async def start_sims(upstreams: Sequence[UpstreamConfig]) -> AsyncIterator[Mapping[str, tuple[str, ...]]]:
    """Starts `[upstreams.sim] replicas` sims per upstream (each of kind "sim"),
    each its own engine and endpoint; yields their base URLs by upstream name."""
    async with contextlib.AsyncExitStack() as running:
        urls: dict[str, tuple[str, ...]] = {}
        for u in upstreams:
            settings = u.sim
            if settings is None:  # load_config gives every sim upstream its settings
                raise ValueError(f"upstream {u.name!r} is not of kind \"sim\"")
            mine = []
            for _ in range(settings.replicas):
                sim = await start_sim("127.0.0.1", 0, slots=settings.slots, ttft_ms=settings.ttft_ms,
                                      tokens_per_s=settings.tokens_per_s)
                running.push_async_callback(sim.close)
                mine.append(sim.url)
            urls[u.name] = tuple(mine)
        yield urls
