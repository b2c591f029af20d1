"""The gateway through the official openai SDK: every endpoint, the tier echo, billing."""

from __future__ import annotations

from decimal import Decimal

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from conftest import PLAIN_MODEL, PRIORITY_MODEL, Running, exact_json

MESSAGES = [{"role": "user", "content": "hello there gateway"}]


def client(gw: Running, prefix: str = "/v1", **kw: object) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.root + prefix, api_key="unused-on-loopback", **kw)  # type: ignore[arg-type]


async def test_chat_priority_on_priority_model_is_echoed_and_billed_at_1_5x(gateway: Running) -> None:
    async with client(gateway) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=5, service_tier="priority")
    resp = raw.parse()
    assert resp.service_tier == "priority"
    assert raw.headers["x-tierq-service-tier"] == "priority"
    assert 0 <= float(raw.headers["x-tierq-queue-ms"]) < 5000
    body = exact_json(raw.http_response.content)
    row = await gateway.row(raw.headers["x-request-id"])
    assert row is not None and row.status == "served" and row.applied_tier == "priority"
    assert row.requested_tier == "priority"
    assert (row.prompt_tokens, row.completion_tokens) == (resp.usage.prompt_tokens, 5)  # type: ignore[union-attr]
    # 3 prompt tokens at $0.03 and 5 completion tokens at $0.05 per 1M, times 1.5:
    # (0.09 + 0.25) / 1e6 x 1.5, written out as test_pricing.py does.
    assert row.prompt_tokens == 3
    assert row.cost == body["usage"]["estimated_cost"] == Decimal("0.00000051")
    assert row.cost == Decimal("1.5") * Decimal("0.00000034")  # 1.5x the default price


async def test_priority_on_non_priority_model_is_served_as_default_and_billed_1x(gateway: Running) -> None:
    async with client(gateway) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PLAIN_MODEL, messages=MESSAGES, max_tokens=3, service_tier="priority")
    assert raw.parse().service_tier == "default"
    assert raw.headers["x-tierq-service-tier"] == "default"
    row = await gateway.row(raw.headers["x-request-id"])
    assert row is not None and row.applied_tier == "default" and row.requested_tier == "priority"
    # 3 + 3 tokens at the plain model's $0.02 / $0.03 per 1M, 1x: (0.06 + 0.09) / 1e6.
    assert (row.prompt_tokens, row.completion_tokens) == (3, 3)
    assert row.cost == Decimal("0.00000015")


@pytest.mark.parametrize(("requested", "applied"), [
    (None, "default"), ("auto", "default"), ("default", "default"), ("flex", "default"),
    ("fast", "priority")])
async def test_tier_table_through_the_sdk(gateway: Running, requested: str | None, applied: str) -> None:
    extra = {} if requested is None else {"service_tier": requested}
    async with client(gateway) as c:
        resp = await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                               max_tokens=1, extra_body=extra)
    assert resp.service_tier == applied


async def test_streaming_chat_echoes_tier_in_every_chunk_and_usage_cost_matches_ledger(
    gateway: Running,
) -> None:
    async with client(gateway) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=6, stream=True,
            service_tier="priority", stream_options={"include_usage": True})
        chunks = [chunk async for chunk in raw.parse()]
    assert raw.headers["x-tierq-service-tier"] == "priority"
    assert len(chunks) >= 8  # role + 6 tokens + finish + usage
    assert all(ch.service_tier == "priority" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    row = await gateway.row(raw.headers["x-request-id"])
    assert row is not None and row.status == "served" and not row.partial
    assert row.completion_tokens == 6
    # The SDK parses the number as a float; the exact digits equal the ledger's Decimal.
    echoed = usage.model_extra["estimated_cost"]  # type: ignore[index]
    assert Decimal(repr(echoed)) == row.cost


async def test_stream_without_include_usage_gets_no_usage_chunk_but_is_billed_from_real_usage(
    gateway: Running,
) -> None:
    async with client(gateway) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=4, stream=True)
        chunks = [chunk async for chunk in raw.parse()]
    assert all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks)  # the usage-only chunk was stripped
    assert all(ch.service_tier == "default" for ch in chunks)
    stats = await gateway.sim_stats()
    sent = stats["last_requests"][-1]
    assert sent["stream"] is True
    row = await gateway.row(raw.headers["x-request-id"])
    assert row is not None and row.completion_tokens == 4 and row.code is None


async def test_completions_json_and_stream_echo_tier(gateway: Running) -> None:
    async with client(gateway) as c:
        resp = await c.completions.create(model=PRIORITY_MODEL, prompt="once upon", max_tokens=3,
                                          extra_body={"service_tier": "priority"})
        assert resp.model_extra["service_tier"] == "priority"  # type: ignore[index]
        assert resp.usage is not None and resp.usage.completion_tokens == 3
        stream = await c.completions.create(model=PRIORITY_MODEL, prompt="once upon",
                                            max_tokens=3, stream=True,
                                            extra_body={"service_tier": "priority"})
        chunks = [ch async for ch in stream]
    assert chunks and all(ch.model_extra["service_tier"] == "priority" for ch in chunks)  # type: ignore[index]


async def test_embeddings_are_echoed_and_billed_at_input_price_times_tier(gateway: Running) -> None:
    async with client(gateway) as c:
        raw = await c.embeddings.with_raw_response.create(
            model=PRIORITY_MODEL, input=["one two three", "four"],
            extra_body={"service_tier": "priority"})
    resp = raw.parse()
    assert len(resp.data) == 2
    assert resp.model_extra["service_tier"] == "priority"  # type: ignore[index]
    row = await gateway.row(raw.headers["x-request-id"])
    assert row is not None and row.endpoint == "embeddings" and row.completion_tokens == 0
    # 4 input tokens at $0.03 per 1M, times 1.5: 0.12 / 1e6 x 1.5.
    assert resp.usage.prompt_tokens == row.prompt_tokens == 4
    assert row.cost == Decimal("0.00000018")
    assert row.cost == exact_json(raw.http_response.content)["usage"]["estimated_cost"]


async def test_invalid_tier_is_a_bad_request_naming_service_tier_and_bills_nothing(
    gateway: Running,
) -> None:
    async with client(gateway, max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                            extra_body={"service_tier": "turbo"})
    assert info.value.param == "service_tier"
    assert info.value.code == "invalid_value"
    assert "turbo" in info.value.message
    assert await gateway.rows() == []


async def test_unknown_model_is_404_model_not_found(gateway: Running) -> None:
    async with client(gateway, max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as info:
            await c.chat.completions.create(model="no/such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"


async def test_openai_prefixed_routes_answer_like_v1(gateway: Running) -> None:
    async with client(gateway, prefix="/v1/openai") as c:
        resp = await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                               max_tokens=2, service_tier="priority")
        emb = await c.embeddings.create(model=PRIORITY_MODEL, input="x")
        models = await c.models.list()
    assert resp.service_tier == "priority"
    assert emb.model_extra["service_tier"] == "default"  # type: ignore[index]
    assert {m.id for m in models.data} == {PRIORITY_MODEL, PLAIN_MODEL}


async def test_models_list_prices_and_priority_flag(gateway: Running) -> None:
    async with aiohttp.ClientSession() as s, s.get(gateway.url + "/models") as r:
        body = exact_json(await r.read())
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id[PRIORITY_MODEL]["priority"] is True
    assert by_id[PLAIN_MODEL]["priority"] is False
    assert by_id[PRIORITY_MODEL]["pricing"]["input"] == Decimal("0.03")
    assert by_id[PRIORITY_MODEL]["pricing"]["priority_output"] == Decimal("0.075")
    assert "priority_input" not in by_id[PLAIN_MODEL]["pricing"]


async def test_engine_priority_is_passed_down_in_vllm_terms_and_service_tier_is_not(
    gateway: Running,
) -> None:
    async with client(gateway) as c:
        await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1,
                                        service_tier="priority")
        await c.chat.completions.create(model=PLAIN_MODEL, messages=MESSAGES, max_tokens=1,
                                        service_tier="priority", extra_body={"priority": -999})
    sent = (await gateway.sim_stats())["last_requests"]
    assert [r["priority"] for r in sent[-2:]] == [-10, 0]
    assert all(r.get("service_tier") is None for r in sent[-2:])
