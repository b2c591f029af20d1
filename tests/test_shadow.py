"""Shadow mode (`enforce = false`): a limit tried before it is applied sheds
nothing and counts what it would have, in /metrics, the access line and /status.

Through real sockets with the official openai client. The buckets run on a
manual clock, so nothing refills while a test runs and every count is exact:
each is compared with what the same limit enforcing sheds over the same
requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running
from openai import AsyncOpenAI

from tierq import Admission, ManualClock
from tierq.logs import JsonFormatter

MESSAGES: Any = [{"role": "user", "content": "hi"}]
N = 12  # requests sent in each run, none refilling the bucket (burst 4)


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Polls state (never a fixed sleep): a loaded machine only makes it slower."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def shadow_metric(gw: Running) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(gw.root + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("tierq_shadow_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('"')[1]] = float(value)
    return out


async def status(gw: Running) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(gw.root + "/status.json") as r:
        data: dict[str, Any] = await r.json()
        return data


async def send(gw: Running, n: int, tier: str = "default") -> list[int]:
    """`n` requests one after another; the HTTP status of each."""
    statuses = []
    async with AsyncOpenAI(base_url=gw.url, api_key="x", max_retries=0) as c:
        for _ in range(n):
            try:
                await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                                max_tokens=1, service_tier=tier)  # type: ignore[arg-type]
                statuses.append(200)
            except openai.RateLimitError as e:
                assert e.code == "rate_limit_exceeded"
                statuses.append(429)
    return statuses


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fmt = JsonFormatter()
    return [orjson.loads(fmt.format(r)) for r in caplog.records if r.name == "tierq.access"]


async def test_pool_rate_limit_in_shadow_mode_sheds_nothing_and_counts_what_it_would_have(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway()
    clock = ManualClock()
    pool = gw.gw.pools[PRIORITY_MODEL]
    # Enforcing first, over the same requests: what shadow mode must count.
    pool.admission = Admission(rate=0.5, burst=4, priority_reserve=0.0, clock=clock)
    enforced = await send(gw, N)
    shed = enforced.count(429)
    assert shed == N - 4 and pool.admission.stats()["shed"] == {
        "server_overloaded": 0, "queue_timeout": 0, "rate_limit_exceeded": shed}
    assert await shadow_metric(gw) == {"rate_limited": 0, "key_rpm": 0, "key_tpm": 0,
                                       "downgrade_ramp": 0, "downgrade_budget": 0}

    pool.admission = Admission(rate=0.5, burst=4, priority_reserve=0.0, enforce=False,
                               clock=clock)
    with caplog.at_level(logging.INFO, logger="tierq"):
        tried = await send(gw, N)
        await wait_for(lambda: len(access_lines(caplog)) >= N)
    assert tried == [200] * N  # sheds nothing
    stats = pool.admission.stats()
    assert stats["shadow_rate_limited"] == shed and stats["enforce"] is False
    assert stats["shed"] == {"server_overloaded": 0, "queue_timeout": 0, "rate_limit_exceeded": 0}
    metric = await shadow_metric(gw)
    assert metric["rate_limited"] == shed
    assert sum(metric.values()) == shed
    # The access line names the decision on exactly the requests enforcing shed,
    # in the same places (the bucket advanced as if they had been shed).
    lines = access_lines(caplog)[-N:]
    flagged = [line.get("shadow") for line in lines]
    assert flagged == [None if s == 200 else "rate_limited" for s in enforced]
    assert all(line["outcome"] == "served" for line in lines)
    page = await status(gw)
    assert page["shadow"]["rate_limited"] == shed
    me = next(p for p in page["pools"] if p["model"] == PRIORITY_MODEL)
    assert me["enforce"] is False and me["shadow_rate_limited"] == shed
    # Every served request was billed: shadow mode changes no bill.
    rows = [r for r in await gw.rows() if r.status == "served"]
    assert len(rows) == (N - shed) + N and all(r.cost > 0 for r in rows)


async def test_the_queues_own_bounds_still_apply_in_shadow_mode(make_gateway: GatewayFactory) -> None:
    # One slot, no queue: shadow mode lets the over-rate request on, but a
    # full queue cannot be "not applied": it is shed server_overloaded.
    gw = await make_gateway(sim={"ttft_ms": 300_000.0})
    clock = ManualClock()
    pool = gw.gw.pools[PRIORITY_MODEL]
    pool.admission = Admission(max_concurrency=1, queue_depth=0, rate=0.5, burst=1,
                               priority_reserve=0.0, enforce=False, clock=clock)
    async with AsyncOpenAI(base_url=gw.url, api_key="x", max_retries=0) as c:
        held = asyncio.create_task(c.chat.completions.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1))
        await wait_for(lambda: pool.admission.stats()["in_flight"] == 1)
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)
        held.cancel()
    assert info.value.code == "server_overloaded"
    stats = pool.admission.stats()
    assert stats["shadow_rate_limited"] == 1 and stats["shed"]["server_overloaded"] == 1
    assert (await shadow_metric(gw))["rate_limited"] == 1
