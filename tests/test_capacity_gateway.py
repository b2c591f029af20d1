"""The line forms where the tier applies: the gateway learns its backend's capacity.

Through real sockets with the official openai client, against the sim as a
continuous-batching engine (its own FCFS waiting queue, vLLM-named /metrics).
Timings are only ever compared with each other in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from tierq import PoolSettings
from conftest import serve_app
from tierq.app import GATEWAY, create_app
from tierq.config import AdmissionConfig, Config, LedgerConfig, ModelConfig, UpstreamConfig, default_config
from tierq.embedded import start_sims
from tierq.sim import SimServer, start_sim

PRIORITY_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[str, web.Application]]:
    """`tierq serve` with no config: the whole built-in catalog on an in-process sim."""
    config = dataclasses.replace(default_config(),
                                 ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'tierq.db'}"))
    app = create_app(config, start_sims=start_sims)
    root, runner = await serve_app(app)
    try:
        yield root, app
    finally:
        await runner.cleanup()


async def _ttft(client: AsyncOpenAI, tier: str, max_tokens: int = 8) -> float:
    t0 = time.monotonic()
    first: float | None = None
    stream = await client.chat.completions.create(
        model=PRIORITY_MODEL, messages=[{"role": "user", "content": "hello there"}],
        max_tokens=max_tokens, stream=True, service_tier=tier)  # type: ignore[arg-type]
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - t0
    assert first is not None
    return first


@pytest.mark.timeout(120)
async def test_embedded_default_gives_priority_the_lead_under_48_streaming_clients(
        embedded: tuple[str, web.Application], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tierq.capacity")
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
    async with aiohttp.ClientSession() as s, s.get(root + "/metrics") as r:
        text = await r.text()
    assert (f'tierq_concurrency_limit{{model="{PRIORITY_MODEL}",mode="adaptive",signal="engine"}} '
            f'{pool.limit}\n') in text
    # The move from the initial limit up to the sim's 8 slots was big enough to be told.
    assert any(f"pool {PRIORITY_MODEL}: concurrency limit {PoolSettings().limit_initial} -> " in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.fixture
async def behind(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[str, web.Application, SimServer]]]]:
    """A gateway in front of a sim it is told nothing about: `await behind(kind, admission, **sim)`."""
    stack = contextlib.AsyncExitStack()

    async def start(kind: str, admission: AdmissionConfig,
                    **sim: Any) -> tuple[str, web.Application, SimServer]:
        server = await start_sim("127.0.0.1", 0, **sim)
        stack.push_async_callback(server.close)
        config = Config(
            ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'tierq.db'}"),
            upstreams=(UpstreamConfig("engine", server.url, kind),),  # type: ignore[arg-type]
            models=(ModelConfig(PRIORITY_MODEL, "engine", priority=True, admission=admission),),
        )
        app = create_app(config)
        root, runner = await serve_app(app)
        stack.push_async_callback(runner.cleanup)
        return root, app, server

    async with stack:
        yield start


async def _load(root: str, clients: int, seconds: float, *, priority_every: int = 8,
                max_tokens: int = 8) -> dict[str, list[float]]:
    """Closed-loop streaming clients, 1 in `priority_every` priority: TTFTs by tier."""
    ttfts: dict[str, list[float]] = {"priority": [], "default": []}
    stop_at = time.monotonic() + seconds

    async def loop(c: AsyncOpenAI, tier: str) -> None:
        while time.monotonic() < stop_at:
            ttfts[tier].append(await _ttft(c, tier, max_tokens))

    async with AsyncOpenAI(base_url=root + "/v1", api_key="unused-on-loopback",
                           max_retries=0, timeout=60) as c:
        await asyncio.gather(*(loop(c, "priority" if i % priority_every == 0 else "default")
                               for i in range(clients)))
    return ttfts


@pytest.mark.timeout(120)
async def test_an_opaque_upstream_is_learned_from_time_to_first_token(behind: Any) -> None:
    # A hosted provider: no metrics (the sim's /metrics is 404), kind "openai".
    root, app, sim = await behind("openai", AdmissionConfig(), slots=6, ttft_ms=40.0,
                                  tokens_per_s=100.0, metrics=False)
    ttfts = await _load(root, clients=36, seconds=10.0, priority_every=6)
    pool = app[GATEWAY].pools[PRIORITY_MODEL].admission
    stats = pool.stats()
    assert stats["limit_signal"] == "latency", stats
    p, d = statistics.median(ttfts["priority"]), statistics.median(ttfts["default"])
    assert p < d / 2, (p, d, stats)
    # The engine's own FCFS queue stayed short: the line formed in tierq's lanes.
    st = sim.state.snapshot()
    assert st["max_running_seen"] == 6
    assert pool.limit < 16, stats


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": PRIORITY_MODEL, "messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.timeout(60)
async def test_an_upstream_429_many_times_keeps_the_slot_and_is_served_once_the_upstream_frees(
        behind: Any) -> None:
    # The engine's one slot is held by a long stream and it keeps no waiting
    # room: every other request gets its 429 (Retry-After: 1). A priority
    # request keeps its tierq slot and is sent again after each hint, as often
    # as its max wait allows, and is served once the holder goes.
    root, app, sim = await behind("openai", AdmissionConfig(max_wait_ms={"default": 30000,
                                                                         "priority": 30000}),
                                  slots=1, ttft_ms=0.0, tokens_per_s=10.0, max_waiting=0,
                                  metrics=False)
    async with aiohttp.ClientSession() as s, AsyncOpenAI(
            base_url=root + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=30) as c:
        hold = await s.post(root + "/v1/chat/completions",
                            json=_chat("x", max_tokens=300, stream=True))
        await _until(lambda: sim.state.snapshot()["running"] == 1)
        asked = asyncio.create_task(c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            service_tier="priority"))
        await _until(lambda: sim.state.snapshot()["rejected"] >= 3, timeout_s=20.0)
        assert not asked.done()  # three 429s, none passed on
        hold.close()  # the holder hangs up: the engine's slot frees
        answer = await asked
    assert answer.http_response.status_code == 200
    assert answer.parse().service_tier == "priority"
    st = sim.state.snapshot()
    # Every attempt but the last was refused: the holder, then rejected + 1 tries.
    assert st["rejected"] >= 3 and st["requests"] == st["rejected"] + 2, st
    gw = app[GATEWAY]
    await gw.ledger.flush()
    row = gw.ledger.get(answer.headers["x-tierq-request-id"])
    assert row is not None and row.status == "served" and row.cost > 0
    # The learned limit backed off on those answers (the last signal it took).
    assert gw.pools[PRIORITY_MODEL].admission.stats()["limit_signal"] == "backoff"


@pytest.mark.timeout(60)
async def test_an_upstream_still_overloaded_gets_tierqs_own_honest_429_within_the_wait_and_no_charge(
        tmp_path: Path) -> None:
    # A provider that always says 503 with no hint (a proxy in front of it
    # that sets no Retry-After): sent again after each jittered back-off (0.1 s
    # doubling, times [0.5, 1)) until the 1 s max wait is spent, then shed by
    # tierq as server_overloaded.
    attempts = 0

    async def overloaded(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        await request.read()
        return web.json_response({"error": {"message": "overloaded", "type": "server_error",
                                            "param": None, "code": None}}, status=503)

    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", overloaded)
    provider_root, provider_runner = await serve_app(provider)
    config = Config(
        ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'tierq.db'}"),
        upstreams=(UpstreamConfig("provider", provider_root + "/v1", "openai", metrics=False),),
        models=(ModelConfig(PRIORITY_MODEL, "provider", priority=True,
                            admission=AdmissionConfig(max_concurrency=4, max_wait_ms=1000)),))
    app = create_app(config)
    root, runner = await serve_app(app)
    try:
        async with aiohttp.ClientSession() as s, \
                s.post(root + "/v1/chat/completions", json=_chat("y", max_tokens=4)) as r:
            body = await r.json()
            assert r.status == 429, body
            assert body["error"]["code"] == "server_overloaded"
            assert int(r.headers["Retry-After"]) >= 1 and int(r.headers["retry-after-ms"]) >= 1
            request_id = r.headers["x-tierq-request-id"]
        gw = app[GATEWAY]
        await gw.ledger.flush()
        row = gw.ledger.get(request_id)
        assert row is not None and row.status == "shed" and row.code == "upstream_overloaded"
        assert row.cost == 0
        # More than the one retry of before, and no more than 1 s of back-offs
        # holds: waits of at least 0.05, 0.1, 0.2, 0.4 s, then what is left, then none.
        assert 3 <= attempts <= 6, attempts
        assert gw.pools[PRIORITY_MODEL].admission.stats()["in_flight"] == 0
    finally:
        await runner.cleanup()
        await provider_runner.cleanup()


@pytest.mark.timeout(60)
async def test_a_request_in_overload_back_off_when_the_drain_starts_gets_the_drains_503(
        tmp_path: Path) -> None:
    # A provider that always says 503 with no hint; the request's max wait is
    # 30 s, so it would be sent again for 30 s. A drain (SIGTERM) ends that:
    # 503 server_shutting_down after the back-off it was in, no further try.
    attempts = 0

    async def overloaded(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        await request.read()
        return web.json_response({"error": {"message": "overloaded"}}, status=503)

    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", overloaded)
    provider_root, provider_runner = await serve_app(provider)
    config = Config(
        ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'tierq.db'}"),
        upstreams=(UpstreamConfig("provider", provider_root + "/v1", "openai", metrics=False),),
        models=(ModelConfig(PRIORITY_MODEL, "provider", priority=True,
                            admission=AdmissionConfig(max_concurrency=4, max_wait_ms=30000)),))
    app = create_app(config)
    root, runner = await serve_app(app)
    try:
        async with aiohttp.ClientSession() as s:
            asked = asyncio.create_task(s.post(root + "/v1/chat/completions",
                                               json=_chat("y", max_tokens=4)))
            await _until(lambda: attempts >= 2)
            gw = app[GATEWAY]
            gw.begin_drain()
            r = await asked
            body = await r.json()
            assert r.status == 503 and body["error"]["code"] == "server_shutting_down", body
            assert r.headers["Retry-After"] == "1"
            request_id = r.headers["x-tierq-request-id"]
            r.close()
        tried = attempts
        await gw.ledger.flush()
        row = gw.ledger.get(request_id)
        assert row is not None and row.status == "shed" and row.code == "server_shutting_down"
        assert row.cost == 0
        assert gw.pools[PRIORITY_MODEL].admission.stats()["in_flight"] == 0
        assert attempts == tried  # nothing sent after the drain's answer
    finally:
        await runner.cleanup()
        await provider_runner.cleanup()


@pytest.mark.timeout(60)
async def test_an_upstream_hint_past_the_wait_left_is_shed_at_once(behind: Any) -> None:
    # The engine says Retry-After: 1; a default request may wait 0.5 s in all
    # (its lane's max wait), a priority one too (its own x-tierq-max-queue-ms),
    # so sending either again is of no use: shed at once (one upstream attempt
    # each), unbilled, with tierq's own Retry-After.
    root, app, sim = await behind("openai", AdmissionConfig(max_concurrency=4, max_wait_ms={
                                      "default": 500, "priority": 30000}),
                                  slots=1, ttft_ms=0.0, tokens_per_s=10.0, max_waiting=0,
                                  metrics=False)
    async with aiohttp.ClientSession() as s:
        hold = await s.post(root + "/v1/chat/completions",
                            json=_chat("x", max_tokens=300, stream=True))
        await _until(lambda: sim.state.snapshot()["running"] == 1)
        async with s.post(root + "/v1/chat/completions", json=_chat("y", max_tokens=4)) as r:
            body = await r.json()
            assert r.status == 429 and body["error"]["code"] == "server_overloaded", body
            request_id = r.headers["x-tierq-request-id"]
        # A priority request may wait 30 s, but its own deadline says 0.5 s: the same.
        async with s.post(root + "/v1/chat/completions", headers={"x-tierq-max-queue-ms": "500"},
                          json=_chat("z", max_tokens=4, service_tier="priority")) as r:
            body = await r.json()
            assert r.status == 429 and body["error"]["code"] == "server_overloaded", body
            assert r.headers["x-tierq-service-tier"] == "priority"
            priority_id = r.headers["x-tierq-request-id"]
        hold.close()
    assert sim.state.snapshot()["rejected"] == 2
    gw = app[GATEWAY]
    await gw.ledger.flush()
    for rid in (request_id, priority_id):
        row = gw.ledger.get(rid)
        assert row is not None and row.code == "upstream_overloaded" and row.cost == 0


async def _until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
