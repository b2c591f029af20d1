"""The line forms where the tier applies: the gateway learns its backend's capacity.

Through real sockets with the official openai client, against the sim as a
continuous-batching engine (its own FCFS waiting queue, vLLM-named /metrics).
Timings are only ever compared with each other in the same run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from tierq.app import GATEWAY, create_app, runner_kwargs
from tierq.config import LedgerConfig, default_config
from tierq.embedded import start_sims

PRIORITY_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[str, web.Application]]:
    """`tierq serve` with no config: the whole built-in catalog on an in-process sim."""
    config = dataclasses.replace(default_config(),
                                 ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'tierq.db'}"))
    app = create_app(config, start_sims=start_sims)
    runner = web.AppRunner(app, **runner_kwargs())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


async def _ttft(client: AsyncOpenAI, tier: str) -> float:
    t0 = time.monotonic()
    first: float | None = None
    stream = await client.chat.completions.create(
        model=PRIORITY_MODEL, messages=[{"role": "user", "content": "hello there"}],
        max_tokens=8, stream=True, service_tier=tier)  # type: ignore[arg-type]
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - t0
    assert first is not None
    return first


@pytest.mark.timeout(120)
async def test_embedded_default_gives_priority_the_lead_under_48_streaming_clients(
        embedded: tuple[str, web.Application]) -> None:
    root, app = embedded
    ttfts: dict[str, list[float]] = {"priority": [], "default": []}
    stop_at = time.monotonic() + 8.0

    async def client_loop(c: AsyncOpenAI, tier: str) -> None:
        while time.monotonic() < stop_at:
            ttfts[tier].append(await _ttft(c, tier))

    async with AsyncOpenAI(base_url=root + "/v1", api_key="unused-on-loopback",
                           max_retries=0, timeout=60) as c:
        # 48 clients, 1 in 8 priority: the "as a new user would" load.
        await asyncio.gather(*(client_loop(c, "priority" if i % 8 == 0 else "default")
                               for i in range(48)))
    p, d = statistics.median(ttfts["priority"]), statistics.median(ttfts["default"])
    assert len(ttfts["priority"]) >= 6 and len(ttfts["default"]) >= 40
    assert p < d / 2, (p, d)
    pool = app[GATEWAY].pools[PRIORITY_MODEL].admission
    stats = pool.stats()
    # The line formed in tierq's lanes: the limit came down to the sim's 8 slots.
    assert stats["limit_mode"] == "adaptive" and stats["limit_signal"] == "engine"
    assert pool.limit <= 10, stats
    async with aiohttp.ClientSession() as s, s.get(root + "/status.json") as r:
        card = next(x for x in (await r.json())["pools"] if x["model"] == PRIORITY_MODEL)
    assert card["limit"]["mode"] == "adaptive" and card["limit"]["value"] == pool.limit
