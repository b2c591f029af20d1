"""The simulated backend speaks OpenAI's wire format and behaves like a slot-bound engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from tierq.sim import SimServer, start_sim


@pytest.fixture
async def books_sim() -> AsyncIterator[SimServer]:
    sim = await start_sim("127.0.0.1", 0, slots=4, ttft_ms=0.0, tokens_per_s=0.0)
    try:
        yield sim
    finally:
        await sim.close()


def _client(sim: SimServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0)


async def _stats(sim: SimServer) -> dict[str, object]:
    async with aiohttp.ClientSession() as s:
        async with s.get(sim.root + "/sim/stats") as r:
            assert r.status == 200
            data: dict[str, object] = await r.json()
            return data


async def test_chat_completion_has_openai_shape_and_upstream_tier(books_sim: SimServer) -> None:
    async with _client(books_sim) as client:
        r = await client.chat.completions.create(
            model="any/model-name",
            messages=[{"role": "user", "content": "hello there sim"}],
            max_tokens=5,
            extra_body={"priority": 3},
        )
    assert r.object == "chat.completion"
    assert r.model == "any/model-name"
    assert r.service_tier == "default"
    assert r.system_fingerprint
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content is not None
    assert len(r.choices[0].message.content.split()) == 5
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)
    last = (await _stats(books_sim))["last_requests"]
    assert isinstance(last, list)
    assert last[-1]["priority"] == 3
    assert last[-1]["model"] == "any/model-name"


async def test_chat_output_is_deterministic_and_defaults_to_16_tokens(books_sim: SimServer) -> None:
    async with _client(books_sim) as client:
        a = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
        b = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage is not None and a.usage.completion_tokens == 16
    assert a.choices[0].finish_reason == "stop"


async def test_streaming_chat_with_include_usage_ends_with_usage_chunk(
    books_sim: SimServer,
) -> None:
    async with _client(books_sim) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            max_completion_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            service_tier="priority",
        )
        chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.service_tier == "default" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 4
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert len(text.split()) == 4
    assert chunks[-2].choices[0].finish_reason == "length"
    last = (await _stats(books_sim))["last_requests"]
    assert isinstance(last, list)
    assert last[-1]["service_tier"] == "priority"
    assert last[-1]["stream_options"] == {"include_usage": True}


async def test_raw_stream_is_sse_terminated_by_done_and_has_no_usage_unless_asked(
    books_sim: SimServer,
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2,
            "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(books_sim.url + "/chat/completions", json=body) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = (await r.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert '"usage"' not in raw


async def test_completions_json_and_stream(books_sim: SimServer) -> None:
    async with _client(books_sim) as client:
        r = await client.completions.create(model="m", prompt="one two three four", max_tokens=3)
        assert r.object == "text_completion"
        assert r.usage is not None and r.usage.prompt_tokens == 4
        assert len(r.choices[0].text.split()) == 3
        stream = await client.completions.create(
            model="m", prompt=["a", "b c"], max_tokens=3, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


async def test_embeddings_float_and_base64_agree(books_sim: SimServer) -> None:
    async with _client(books_sim) as client:
        # The openai client asks for base64 unless told otherwise.
        b64 = await client.embeddings.create(model="e", input=["alpha beta", "gamma"])
        flt = await client.embeddings.create(
            model="e", input=["alpha beta", "gamma"], encoding_format="float"
        )
        tok = await client.embeddings.create(model="e", input=[[1, 2, 3]], encoding_format="float")
    assert [d.embedding for d in b64.data] == [d.embedding for d in flt.data]
    assert len(flt.data) == 2 and len(flt.data[0].embedding) == 8
    assert flt.data[0].embedding != flt.data[1].embedding
    assert flt.usage.prompt_tokens == 3 and flt.usage.total_tokens == 3
    assert tok.usage.prompt_tokens == 3


async def test_models_lists_something(books_sim: SimServer) -> None:
    async with _client(books_sim) as client:
        models = [m.id async for m in client.models.list()]
    assert models


async def test_bad_json_is_openai_style_400(books_sim: SimServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(books_sim.url + "/chat/completions", data=b"{not json") as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert err["type"] == "invalid_request_error"


async def test_slots_bound_generation_and_waiters_count_in_flight() -> None:
    slots = 3
    async with await start_sim(slots=slots, ttft_ms=30.0, tokens_per_s=200.0) as sim:
        async with _client(sim) as client:
            async def one(i: int) -> int:
                r = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"req {i}"}], max_tokens=4
                )
                assert r.usage is not None
                return r.usage.completion_tokens

            done = await asyncio.gather(*(one(i) for i in range(3 * slots)))
        stats = await _stats(sim)
    assert done == [4] * (3 * slots)
    # Contention really happened: all nine were inside at once, only three generating.
    assert stats["max_generating_seen"] == slots
    assert stats["max_in_flight_seen"] == 3 * slots
    assert stats["in_flight"] == 0 and stats["generating"] == 0
    assert stats["requests"] == 3 * slots


async def test_client_disconnect_mid_stream_frees_slot_and_in_flight() -> None:
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=20.0) as sim:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1000, "stream": True}
        async with aiohttp.ClientSession() as s:
            r = await s.post(sim.url + "/chat/completions", json=body)
            await r.content.readline()  # the stream has started
            assert (await _stats(sim))["generating"] == 1
            r.close()  # hang up mid-stream
        for _ in range(100):
            stats = await _stats(sim)
            if stats["in_flight"] == 0:
                break
            await asyncio.sleep(0.02)
        assert stats["in_flight"] == 0
        assert stats["generating"] == 0
        assert stats["cancelled"] == 1
        # The only slot is free again: a new request is served promptly.
        async with _client(sim) as client:
            r2 = await asyncio.wait_for(
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
                ),
                timeout=2.0,
            )
        assert r2.usage is not None and r2.usage.completion_tokens == 1


async def test_ttft_and_decode_rate_are_never_beaten_and_decode_takes_one_step_a_token() -> None:
    # Timed from below only: the sim must never answer faster than its settings
    # (a loaded machine can only make it later). That it is not slower is the
    # engine's bookkeeping: one prefill token, then one decode step per token.
    async with await start_sim(slots=1, ttft_ms=100.0, tokens_per_s=50.0) as sim:
        async with _client(sim) as client:
            t0 = time.monotonic()
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], max_tokens=6, stream=True
            )
            first: float | None = None
            tokens = 0
            async for c in stream:
                if c.choices and c.choices[0].delta.content:
                    tokens += 1
                    if first is None:
                        first = time.monotonic() - t0
            total = time.monotonic() - t0
        stats = await _stats(sim)
    assert first is not None and tokens == 6
    assert first >= 0.1 - 0.002  # the loop's timers may fire a clock tick early
    # ttft + 5 steps of 20 ms, each step's deadline chained on the one before.
    assert total >= 0.2 - 0.002
    assert stats["steps"] == 5 and stats["tokens_generated"] == 6


async def test_reset_zeroes_counters(books_sim: SimServer) -> None:
    async with _client(books_sim) as client:
        await client.completions.create(model="m", prompt="x", max_tokens=1)
    async with aiohttp.ClientSession() as s:
        async with s.post(books_sim.root + "/sim/reset") as r:
            assert r.status == 200
    stats = await _stats(books_sim)
    assert stats["requests"] == 0 and stats["max_in_flight_seen"] == 0
    assert stats["last_requests"] == []


async def test_client_hanging_up_while_waiting_for_first_token_is_cancelled_at_once() -> None:
    # A long TTFT means nothing is written for seconds: only handler cancellation
    # (not a failed write) can notice the hang-up in time.
    async with await start_sim(slots=1, ttft_ms=5000.0, tokens_per_s=0.0) as sim:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(s.post(sim.url + "/chat/completions", json=body))
            task2 = asyncio.create_task(s.post(sim.url + "/chat/completions", json=body))
            for _ in range(100):
                if (await _stats(sim))["in_flight"] == 2:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            task2.cancel()
            await asyncio.gather(task, task2, return_exceptions=True)
        t0 = time.monotonic()
        while (await _stats(sim))["in_flight"] and time.monotonic() - t0 < 2.0:
            await asyncio.sleep(0.02)
        stats = await _stats(sim)
    assert stats["in_flight"] == 0
    assert stats["generating"] == 0
    assert stats["cancelled"] == 2
