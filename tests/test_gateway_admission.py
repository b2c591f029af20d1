"""Admission through the gateway: sheds as 429s, priority under contention, disconnects."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict
from conftest import PRIORITY_MODEL, GatewayFactory, Running, exact_json, model_config
from openai import AsyncOpenAI

from tierq import Admission, ManualClock

MESSAGES = [{"role": "user", "content": "hi"}]


def chat_body(tier: str | None = None, **kw: object) -> bytes:
    body: dict[str, object] = {"model": PRIORITY_MODEL, "messages": MESSAGES, "max_tokens": 1, **kw}
    if tier is not None:
        body["service_tier"] = tier
    return orjson.dumps(body)


async def post(
    s: aiohttp.ClientSession, gw: Running, body: bytes
) -> tuple[int, CIMultiDict[str], bytes]:
    async with s.post(gw.url + "/chat/completions", data=body,
                      headers={"Content-Type": "application/json"}) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def test_rate_limited_request_is_429_with_exact_retry_after_and_no_charge(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, rate=0.5, burst=1,
                                                 priority_reserve=0.0)])
    async with aiohttp.ClientSession() as s:
        assert (await post(s, gw, chat_body()))[0] == 200
        status, headers, raw = await post(s, gw, chat_body())
    assert status == 429, headers
    err = orjson.loads(raw)["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert err["param"] is None and err["message"]
    # One token every 2 s: the wait is just under 2 s, in ms exactly, and 2 whole seconds.
    assert 1000 < int(headers["retry-after-ms"]) <= 2000
    assert headers["Retry-After"] == "2"
    assert headers["x-tierq-service-tier"] == "default"
    row = await gw.row(headers["x-request-id"])
    assert row is not None and row.status == "shed" and row.cost == 0
    assert row.code == "rate_limit_exceeded"


async def test_sdk_raises_rate_limit_error_and_its_retry_waits_the_retry_after_given(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL)])
    # The pool's bucket on a manual clock: the test decides when it refills, so
    # neither a fixed sleep nor a loaded machine's pace changes what it sees.
    clock = ManualClock()
    adm = Admission(rate=0.5, burst=1, priority_reserve=0.0, clock=clock)
    gw.gw.pools[PRIORITY_MODEL].admission = adm

    def sheds() -> int:
        shed = adm.stats()["shed"]
        assert isinstance(shed, dict)
        return int(shed["rate_limit_exceeded"])

    async with AsyncOpenAI(base_url=gw.url, api_key="x", max_retries=0) as c:
        await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after-ms"] == "2000"  # one token per 2 s, exact
    clock.advance(2.0)
    # With one retry allowed the SDK sleeps retry-after-ms (2 s; its own backoff
    # would be ~0.5 s) and then succeeds: the clock moves on once the 429 is out.
    async with AsyncOpenAI(base_url=gw.url, api_key="x", max_retries=1) as c:
        await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]

        async def refill_after_the_shed() -> None:
            await wait_for(lambda: sheds() == 2, timeout=30.0)
            clock.advance(2.0)

        refill = asyncio.create_task(refill_after_the_shed())
        t0 = time.monotonic()
        resp = await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]
        elapsed = time.monotonic() - t0
        await refill
    assert resp.service_tier == "default"
    assert sheds() == 2  # the retry got in at once: it came after the hint, not before
    # A lower bound only (a loaded machine can only make it longer): the SDK
    # waited the 2 s given, not its own backoff.
    assert elapsed >= 2.0


async def test_priority_request_is_dispatched_before_every_waiting_default(
    make_gateway: GatewayFactory,
) -> None:
    # Two slots, held by slow requests; four defaults queue; then one priority arrives.
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=2)],
                            sim={"slots": 2, "ttft_ms": 300.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    async with aiohttp.ClientSession() as s:
        # The sim records each body's max_tokens: it tags who reached the engine when.
        blockers = [asyncio.create_task(post(s, gw, chat_body(max_tokens=1))) for _ in range(2)]
        await wait_for(lambda: adm.stats()["in_flight"] == 2)
        defaults = []
        for i in range(4):
            defaults.append(asyncio.create_task(post(s, gw, chat_body("default", max_tokens=2 + i))))
            await wait_for(lambda: adm.stats()["depth"]["default"] == i + 1)  # type: ignore[index]
        prio = asyncio.create_task(post(s, gw, chat_body("priority", max_tokens=9)))
        await wait_for(lambda: adm.stats()["depth"]["priority"] == 1)  # type: ignore[index]
        results = await asyncio.gather(*blockers, *defaults, prio)
    assert all(r[0] == 200 for r in results)
    p_headers = results[-1][1]
    assert p_headers["x-tierq-service-tier"] == "priority"
    arrivals = [r["max_tokens"] for r in (await gw.sim_stats())["last_requests"]]
    assert arrivals[:2] == [1, 1]
    assert arrivals[2] == 9, arrivals  # ahead of the four defaults, though it came last
    assert arrivals[3:] == [2, 3, 4, 5]
    stats = await gw.sim_stats()
    assert stats["max_in_flight_seen"] <= 2
    # The priority request waited (for a blocker), the last default longer (for
    # three): compared with each other, not with a wall clock a loaded host stretches.
    p_queue = float(p_headers["x-tierq-queue-ms"])
    d_last_queue = float(results[5][1]["x-tierq-queue-ms"])
    assert 0 < p_queue < d_last_queue


async def test_priority_request_takes_a_headroom_slot_while_defaults_wait(
    make_gateway: GatewayFactory,
) -> None:
    # Three slots, one kept for priority: two slow defaults fill the rest.
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=3, priority_headroom=1)],
                            sim={"slots": 3, "ttft_ms": 400.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    async with aiohttp.ClientSession() as s:
        blockers = [asyncio.create_task(post(s, gw, chat_body(max_tokens=1))) for _ in range(2)]
        await wait_for(lambda: adm.stats()["in_flight"] == 2)
        # A third default waits although a slot is free: it is the headroom.
        waiting = asyncio.create_task(post(s, gw, chat_body("default", max_tokens=2)))
        await wait_for(lambda: adm.stats()["depth"]["default"] == 1)  # type: ignore[index]
        assert adm.stats()["in_flight"] == 2
        # Priority does not wait for a running request to end: it takes the free slot.
        status, headers, _ = await post(s, gw, chat_body("priority", max_tokens=9))
        assert status == 200 and headers["x-tierq-service-tier"] == "priority"
        assert float(headers["x-tierq-queue-ms"]) == 0
        assert not waiting.done()
        results = await asyncio.gather(*blockers, waiting)
    assert all(r[0] == 200 for r in results)
    # The default got in only once a blocker ended (about one service time of 400 ms).
    assert float(results[2][1]["x-tierq-queue-ms"]) > 100
    stats = await gw.sim_stats()
    assert stats["max_in_flight_seen"] <= 3
    arrivals = [r["max_tokens"] for r in stats["last_requests"]]
    assert arrivals.index(9) < arrivals.index(2), arrivals


async def test_gateway_never_sends_more_than_max_concurrency_upstream(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=3)],
                            sim={"slots": 8, "ttft_ms": 20.0})
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(post(s, gw, chat_body("priority" if i % 3 else None))
                                         for i in range(30)))
    assert {r[0] for r in results} == {200}
    stats = await gw.sim_stats()
    assert stats["requests"] == 30
    assert stats["max_in_flight_seen"] == 3


async def test_full_queue_sheds_default_with_server_overloaded(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=1, queue_depth=1)],
                            sim={"slots": 1, "ttft_ms": 300.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(post(s, gw, chat_body()))
        await wait_for(lambda: adm.stats()["in_flight"] == 1)
        queued = asyncio.create_task(post(s, gw, chat_body()))
        await wait_for(lambda: adm.stats()["depth"]["default"] == 1)  # type: ignore[index]
        status, headers, raw = await post(s, gw, chat_body())
        # A priority request evicts the queued default and is served.
        prio = await post(s, gw, chat_body("priority"))
        results = [await first, await queued]
    assert status == 429 and orjson.loads(raw)["error"]["code"] == "server_overloaded"
    assert 1 <= int(headers["Retry-After"]) <= 120 and int(headers["retry-after-ms"]) >= 1
    assert prio[0] == 200
    assert results[0][0] == 200 and results[1][0] == 429
    rows = await gw.rows()
    assert sorted(r.status for r in rows) == ["served", "served", "shed", "shed"]
    assert all(r.cost == 0 for r in rows if r.status == "shed")


async def test_client_disconnect_mid_stream_cancels_upstream_frees_slot_and_bills_partial(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=1)],
                            sim={"slots": 1, "tokens_per_s": 20.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    body = chat_body("priority", stream=True, max_tokens=200)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.url + "/chat/completions", data=body,
                            headers={"Content-Type": "application/json"})
        request_id = resp.headers["x-request-id"]
        got = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                assert orjson.loads(line[6:])["service_tier"] == "priority"
                got += 1
                if got == 4:
                    break
        resp.close()  # hang up mid-stream (200 tokens at 20/s would take 10 s)
    await wait_for(lambda: adm.stats()["in_flight"] == 0, timeout=10.0)
    await wait_for(lambda: gw.sim.state.in_flight == 0, timeout=10.0)
    assert gw.sim.state.cancelled == 1
    row = await gw.row(request_id)
    assert row is not None and row.status == "cancelled" and row.partial
    assert 3 <= row.completion_tokens < 50  # what was delivered, not the 200 asked for
    from tierq.catalog import builtin_prices
    from tierq.pricing import cost

    assert row.cost == cost(row.prompt_tokens, row.completion_tokens,
                            builtin_prices()[PRIORITY_MODEL], "priority") > 0
    # The freed slot serves the next request at once: admitted without queueing.
    async with aiohttp.ClientSession() as s:
        status, headers, raw = await post(s, gw, chat_body(max_tokens=1))
    assert status == 200 and headers["x-tierq-queue-ms"] == "0.000"
    assert exact_json(raw)["service_tier"] == "default"


async def test_client_leaving_the_queue_frees_its_place_and_is_recorded_cancelled(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=1)],
                            sim={"slots": 1, "ttft_ms": 400.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(post(s, gw, chat_body()))
        await wait_for(lambda: adm.stats()["in_flight"] == 1)
        waiter = asyncio.create_task(post(s, gw, chat_body()))
        await wait_for(lambda: adm.stats()["depth"]["default"] == 1)  # type: ignore[index]
        waiter.cancel()
        await wait_for(lambda: adm.stats()["depth"]["default"] == 0, timeout=2.0)  # type: ignore[index]
        assert (await first)[0] == 200
    rows = await gw.rows()
    assert sorted(r.status for r in rows) == ["cancelled", "served"]
    assert [r.cost for r in rows if r.status == "cancelled"] == [0]
    assert gw.sim.state.requests == 1
