"""A flow charged once across `[cluster]` hosts: each host's fair counters go to
Redis and the others' come back (tierq.cluster.flows, the script the lease agent
runs in its round), against a real redis-server. Judged by the order of service
on each host's own `Admission`, with a ManualClock: never by time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from redis_server import RedisServer, redis_server  # noqa: F401  (the fixture)
from test_admission_fair import apart, settle
from tierq import Admission, ManualClock
from tierq.cluster.flows import FAIR_SCRIPT, FlowCounters

WAITS = {"default": 600_000.0, "priority": 900_000.0}


def host() -> Admission:
    return Admission(max_concurrency=1, queue_depth=64, max_wait_ms=WAITS, clock=ManualClock())


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def sync(r: aioredis.Redis, fc: FlowCounters, host_id: str) -> int:
    """One lease round's fair call, as the lease agent makes it."""
    reply = await r.eval(FAIR_SCRIPT.text, 2, *fc.keys("m", host_id), *fc.args(60_000))
    return fc.incoming(reply)


async def serve_backlog(adm: Admission, flow: str, n: int) -> None:
    """`n` requests of `flow` queued at once behind a held slot, then served: a
    backlog spreads over the flow's two queues, as a busy host's would."""
    holder = await adm.acquire().__aenter__()

    async def one() -> None:
        async with adm.acquire(flow=flow, charge=10):
            pass

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await settle()
    await holder.__aexit__(None, None, None)
    await asyncio.gather(*tasks)


async def order_on(adm: Admission, first: str, then: str, n: int,
                   meanwhile: Callable[[], Awaitable[object]]) -> list[str]:
    """With the slot held, `n` requests of `first` queue, then `n` of `then`;
    `meanwhile` runs while they wait; returns the order the slot serves them in."""
    holder = await adm.acquire().__aenter__()
    order: list[str] = []

    async def one(flow: str) -> None:
        async with adm.acquire(flow=flow, charge=10):
            order.append(flow)

    tasks = [asyncio.create_task(one(first)) for _ in range(n)]
    await settle()
    tasks += [asyncio.create_task(one(then)) for _ in range(n)]
    await settle()
    await meanwhile()
    await holder.__aexit__(None, None, None)
    await asyncio.gather(*tasks)
    return order


async def test_a_key_served_on_another_host_meanwhile_waits_behind_one_that_was_not(
        redis_client: aioredis.Redis) -> None:
    a, b = host(), host()
    fa, fb = FlowCounters(a), FlowCounters(b)
    assert await sync(redis_client, fa, "a") == 0 and await sync(redis_client, fb, "b") == 0
    greedy, polite = apart(a, 2)

    async def b_serves_greedy() -> None:
        await serve_backlog(b, greedy, 20)
        assert await sync(redis_client, fb, "b") == 0, "b takes in nothing of its own"
        # Charge 10 at weight 1 is 1000 service units; the holder (no flow, charge 1) 100.
        assert await sync(redis_client, fa, "a") == 20 * 1000 + 100, "a takes in b's service"

    # On host a the greedy key queued first; while both wait there, host b
    # serves it: it has had its share, and the polite key goes first on a.
    order = await order_on(a, greedy, polite, 3, b_serves_greedy)
    assert order == [polite] * 3 + [greedy] * 3, order


async def test_without_the_counters_each_host_is_fair_only_among_its_own_flows() -> None:
    a, b = host(), host()
    greedy, polite = apart(a, 2)

    async def b_serves_greedy() -> None:
        await serve_backlog(b, greedy, 20)

    order = await order_on(a, greedy, polite, 3, b_serves_greedy)
    # The greedy key's two queues and the polite key's one take turns.
    assert order[:3].count(polite) == 1 and sorted(order) == sorted([greedy] * 3 + [polite] * 3), order


async def test_service_is_shared_once_and_the_history_before_joining_is_not_charged(
        redis_client: aioredis.Redis) -> None:
    a, b, c = host(), host(), host()
    fa, fb, fc = FlowCounters(a), FlowCounters(b), FlowCounters(c)
    await sync(redis_client, fa, "a")
    await sync(redis_client, fb, "b")
    flow = apart(a, 1)[0]
    async with a.acquire(flow=flow, charge=7):
        pass
    assert await sync(redis_client, fa, "a") == 0
    assert await sync(redis_client, fb, "b") == 700
    assert await sync(redis_client, fb, "b") == 0, "taken in once"
    assert await sync(redis_client, fc, "c") == 0, "a host joining later starts from the totals"
    async with c.acquire(flow=flow, charge=3):
        pass
    assert await sync(redis_client, fc, "c") == 0
    assert await sync(redis_client, fa, "a") == 300 and await sync(redis_client, fb, "b") == 300
    # Redis loses its state (a restart without persistence): nothing is taken
    # back, and what is served afterwards travels again.
    await redis_client.flushall()
    assert await sync(redis_client, fa, "a") == 0 and await sync(redis_client, fb, "b") == 0
    async with b.acquire(flow=flow, charge=2):
        pass
    assert await sync(redis_client, fb, "b") == 0
    assert await sync(redis_client, fa, "a") == 200
