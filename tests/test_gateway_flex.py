"""The flex tier through real sockets and the official openai client: served
from idle capacity at the flex price, refused unbilled (429
resource_unavailable) when none comes up in time, and served as default on a
model without flex."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import openai
import pytest
from openai import AsyncOpenAI

from conftest import PLAIN_MODEL, PRIORITY_MODEL, GatewayFactory, Running, exact_json, model_config

MESSAGES = [{"role": "user", "content": "hello there gateway"}]


def client(gw: Running) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url, api_key="unused-on-loopback", max_retries=0)


async def until(pred: object, what: str) -> None:
    for _ in range(2000):
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError(what)


async def test_flex_on_an_idle_flex_model_is_served_echoed_and_billed_at_half_price(
        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, flex=True, max_concurrency=4)])
    async with client(gw) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=5, service_tier="flex")
        stream = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=4, service_tier="flex", stream=True,
            stream_options={"include_usage": True})
        chunks = [ch async for ch in stream.parse()]
    assert raw.parse().service_tier == "flex" and raw.headers["x-tierq-service-tier"] == "flex"
    body = exact_json(raw.http_response.content)
    row = await gw.row(raw.headers["x-request-id"])
    assert row is not None and row.status == "served" and row.applied_tier == "flex"
    assert row.requested_tier == "flex" and (row.prompt_tokens, row.completion_tokens) == (3, 5)
    # 3 prompt tokens at $0.03 and 5 completion tokens at $0.05 per 1M, times 0.5.
    assert row.cost == body["usage"]["estimated_cost"] == Decimal("0.00000017")
    assert row.cost == Decimal("0.5") * Decimal("0.00000034")
    assert chunks and all(ch.service_tier == "flex" for ch in chunks)
    srow = await gw.row(stream.headers["x-request-id"])
    assert srow is not None and srow.applied_tier == "flex" and srow.completion_tokens == 4
    assert chunks[-1].usage is not None
    assert exact_json(chunks[-1].usage.model_dump_json())["estimated_cost"] == srow.cost


async def test_flex_is_refused_unbilled_while_the_idle_capacity_is_taken_and_waits_behind_default(
        make_gateway: GatewayFactory) -> None:
    # Limit 4, flex headroom 0.1 -> one slot, on top of the reserve of 2 (the default on a
    # priority model): flex runs only while none is busy.
    gw = await make_gateway(
        models=[model_config(PRIORITY_MODEL, flex=True, max_concurrency=4,
                             max_wait_ms={"flex": 300, "default": 30000})],
        sim={"slots": 8, "ttft_ms": 1.0, "tokens_per_s": 20.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    async with client(gw) as c:
        busy = [asyncio.ensure_future(c.chat.completions.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=20)) for _ in range(3)]
        await until(lambda: adm.stats()["in_flight"] == 3, "three defaults never held their slots")
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.with_raw_response.create(
                model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=2, service_tier="flex")
        # A default arrival still finds the slot flex left free.
        fourth = await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)
        await asyncio.gather(*busy)
    assert fourth.service_tier == "default"
    err = info.value
    assert err.status_code == 429 and err.code == "resource_unavailable"
    assert int(err.response.headers["retry-after"]) >= 1
    row = await gw.row(err.response.headers["x-request-id"])
    assert row is not None and row.status == "shed" and row.code == "resource_unavailable"
    assert row.applied_tier == "flex" and row.cost == 0 and row.completion_tokens == 0
    assert 250 <= row.queue_ms < 5000, "it waited its flex max wait for idle capacity"


async def test_flex_on_a_model_without_flex_is_served_echoed_and_billed_as_default(gateway: Running) -> None:
    async with client(gateway) as c:
        for model in (PRIORITY_MODEL, PLAIN_MODEL):
            raw = await c.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES, max_tokens=3, service_tier="flex")
            assert raw.parse().service_tier == "default"
            assert raw.headers["x-tierq-service-tier"] == "default"
            row = await gateway.row(raw.headers["x-request-id"])
            assert row is not None and row.applied_tier == "default" and row.requested_tier == "flex"
            body = exact_json(raw.http_response.content)
            assert row.cost == body["usage"]["estimated_cost"]
    # The plain model's 3 + 3 tokens at $0.02 / $0.03 per 1M, 1x.
    assert row.cost == Decimal("0.00000015")


async def test_models_lists_the_flex_tag_and_price(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, flex=True), model_config(PLAIN_MODEL)])
    async with client(gw) as c:
        raw = await c.models.with_raw_response.list()
    data = {m["id"]: m for m in exact_json(raw.http_response.content)["data"]}
    assert data[PRIORITY_MODEL]["flex"] is True and data[PLAIN_MODEL]["flex"] is False
    pricing = data[PRIORITY_MODEL]["pricing"]
    assert (pricing["flex_input"], pricing["flex_output"]) == (Decimal("0.015"), Decimal("0.025"))
    assert "flex_input" not in data[PLAIN_MODEL]["pricing"]


async def test_a_default_arrival_at_a_full_queue_evicts_the_waiting_flex_request_unbilled(
        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(
        models=[model_config(PRIORITY_MODEL, flex=True, max_concurrency=4, queue_depth=1)],
        sim={"slots": 8, "ttft_ms": 1.0, "tokens_per_s": 20.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    async with client(gw) as c:
        busy = [asyncio.ensure_future(c.chat.completions.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=20)) for _ in range(4)]
        await until(lambda: adm.stats()["in_flight"] == 4, "four defaults never held every slot")
        flex = asyncio.ensure_future(c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=2, service_tier="flex"))
        await until(lambda: adm.stats()["depth"]["flex"] == 1, "the flex request never queued")
        default = asyncio.ensure_future(c.chat.completions.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1))
        with pytest.raises(openai.RateLimitError) as info:
            await flex
        assert (await default).service_tier == "default"
        await asyncio.gather(*busy)
    assert info.value.code == "resource_unavailable"
    row = await gw.row(info.value.response.headers["x-request-id"])
    assert row is not None and row.status == "shed" and row.applied_tier == "flex" and row.cost == 0


async def test_while_flex_waits_the_reserve_is_kept_for_priority_and_defaults_use_it_otherwise(
        make_gateway: GatewayFactory) -> None:
    # Limit 6, flex_headroom 0.1 -> one slot, flex_priority_reserve 2 (the
    # default on a priority model): flex runs below 6 - 2 - 1 = 3; while a
    # flex request waits the 4th slot (the flex headroom) is a default's and
    # the 5th and 6th (the reserve) priority's.
    gw = await make_gateway(
        models=[model_config(PRIORITY_MODEL, flex=True, max_concurrency=6,
                             max_wait_ms={"flex": 60000, "default": 30000})],
        sim={"slots": 8, "ttft_ms": 1.0, "tokens_per_s": 20.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    assert adm.stats()["in_flight"] == 0
    async with client(gw) as c:
        def chat(tier: str | None, max_tokens: int) -> asyncio.Future[object]:
            extra = {"service_tier": tier} if tier else {}
            return asyncio.ensure_future(c.chat.completions.with_raw_response.create(
                model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=max_tokens, **extra))  # type: ignore[call-overload]

        # No flex waiting: defaults take every slot, the last ones included.
        first = [chat(None, 60) for _ in range(6)]
        await until(lambda: adm.stats()["in_flight"] == 6, "six defaults never held every slot")
        assert adm.stats()["depth"]["default"] == 0
        await asyncio.gather(*first)
        # Two defaults and a flex request running (3 = the flex limit), a second flex request waits.
        running = [chat(None, 60) for _ in range(2)]
        await until(lambda: adm.stats()["in_flight"] == 2, "two defaults never held their slots")
        running.append(chat("flex", 60))
        await until(lambda: adm.stats()["in_flight"] == 3, "the first flex request was not served")
        waiting_flex = chat("flex", 1)
        await until(lambda: adm.stats()["depth"]["flex"] == 1, "the second flex request never queued")
        # A default arrival takes the flex headroom's slot, which flex may not.
        running.append(chat(None, 60))
        await until(lambda: adm.stats()["in_flight"] == 4, "the default arrival did not get the 4th slot")
        # The next waits although two slots are free: they are priority's while flex waits.
        waiting_default = chat(None, 1)
        await until(lambda: adm.stats()["depth"]["default"] == 1, "the default arrival was not kept waiting")
        assert adm.stats()["in_flight"] == 4
        # Two priority requests at once find both free.
        prios = await asyncio.gather(*(c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1, service_tier="priority") for _ in range(2)))
        assert [p.headers["x-tierq-service-tier"] for p in prios] == ["priority", "priority"]
        # No running request ended meanwhile, so neither waited for a release.
        assert not any(r.done() for r in running)
        assert not waiting_default.done() and not waiting_flex.done()
        assert adm.stats()["depth"] == {"priority": 0, "default": 1, "flex": 1}
        # Both are served once running requests end.
        d = await waiting_default
        f = await waiting_flex
        await asyncio.gather(*running)
    drow, frow = await gw.row(d.headers["x-request-id"]), await gw.row(f.headers["x-request-id"])  # type: ignore[attr-defined]
    assert drow is not None and frow is not None
    assert drow.applied_tier == "default" and frow.applied_tier == "flex" and frow.status == "served"
