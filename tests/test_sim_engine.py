"""The sim behaves like a continuous-batching engine: slots, its own waiting queue,
a step-time model with a knee, vLLM's /metrics, overload answers, live capacity."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import pytest

from tierq.capacity import EngineLoad, parse_engine_load
from tierq.cli import main
from tierq.sim import METRICS_MODEL_NAME, SIM_STATE, SimServer, create_sim_app, start_sim
from ports import free_port

Stats = dict[str, Any]


async def _stats(sim: SimServer | str) -> Stats:
    root = sim if isinstance(sim, str) else sim.root
    async with aiohttp.ClientSession() as s, s.get(root + "/sim/stats") as r:
        assert r.status == 200
        data: Stats = await r.json()
        return data


async def _until(sim: SimServer | str, ok: Callable[[Stats], bool], what: str,
                 timeout: float = 10.0) -> Stats:
    """Poll /sim/stats until `ok` holds (the bound only stops a hung test)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await _stats(sim)
        if ok(stats):
            return stats
        assert time.monotonic() < deadline, f"never saw {what}: {stats}"
        await asyncio.sleep(0.01)


def _body(model: str, max_tokens: int, *, stream: bool = True,
          priority: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": max_tokens, "stream": stream}
    if priority is not None:
        body["priority"] = priority
    return body


@asynccontextmanager
async def _holding(sim: SimServer, session: aiohttp.ClientSession,
                   n: int = 1) -> AsyncIterator[list[aiohttp.ClientResponse]]:
    """`n` long streams that hold the sim's slots until the block exits (they hang up)."""
    resps = []
    for i in range(n):
        r = await session.post(sim.url + "/chat/completions", json=_body(f"hold{i}", 100_000))
        await r.content.readline()  # it left the queue and streams
        resps.append(r)
    try:
        yield resps
    finally:
        for r in resps:
            r.close()


async def _queue_in_order(sim: SimServer, session: aiohttp.ClientSession,
                          bodies: list[dict[str, Any]]) -> list[asyncio.Task[int]]:
    """Send each body only once the previous one waits in the sim's queue."""
    async def send(body: dict[str, Any]) -> int:
        async with session.post(sim.url + "/chat/completions", json=body) as r:
            await r.read()
            return r.status

    before = (await _stats(sim))["waiting"]
    tasks = []
    for i, body in enumerate(bodies):
        tasks.append(asyncio.create_task(send(body)))
        await _until(sim, lambda s, k=before + i + 1: s["waiting"] == k, f"{i + 1} waiting")
    return tasks


async def test_requests_beyond_slots_wait_in_the_sims_queue_and_count_in_flight() -> None:
    slots, clients = 2, 6
    async with await start_sim(slots=slots, ttft_ms=5.0, tokens_per_s=100.0) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client:
            async def one(i: int) -> int:
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"req {i}"}],
                    max_tokens=10, stream=True)
                return len([c async for c in stream if c.choices and c.choices[0].delta.content])

            tasks = [asyncio.create_task(one(i)) for i in range(clients)]
            live = await _until(sim, lambda s: s["waiting"] > 0, "a waiting queue")
            done = await asyncio.gather(*tasks)
        stats = await _stats(sim)
    assert done == [10] * clients
    # A request is in flight from its first byte to its answer's last, so its
    # sequence (running, then waiting) is one part of that span.
    assert live["running"] == slots and live["in_flight"] >= live["running"] + live["waiting"]
    assert stats["max_running_seen"] == slots
    assert stats["max_waiting_seen"] == clients - slots
    # in_flight keeps its meaning: every request inside, generating or waiting.
    assert stats["max_in_flight_seen"] == clients
    assert stats["requests"] == clients and stats["slots"] == slots
    assert (stats["in_flight"], stats["running"], stats["waiting"]) == (0, 0, 0)
    assert [s["order"] for s in stats["last_started"]] == list(range(1, clients + 1))
    assert stats["finished"]["length"] == clients
    assert stats["tokens_generated"] == stats["tokens_sent"] == 10 * clients


@pytest.mark.parametrize(("scheduling", "expected"), [
    ("fcfs", ["r0", "r1", "r2", "r3", "r4"]),
    # lower priority value first; r1 and r3 tie and keep their arrival order
    ("priority", ["r4", "r1", "r3", "r2", "r0"]),
])
async def test_waiting_queue_order_is_fcfs_or_by_priority(scheduling: str,
                                                          expected: list[str]) -> None:
    priorities = [5, 1, 3, 1, -2]
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=50.0,
                               scheduling=scheduling) as sim:
        async with aiohttp.ClientSession() as s:
            async with _holding(sim, s):
                tasks = await _queue_in_order(sim, s, [
                    _body(f"r{i}", 2, priority=p) for i, p in enumerate(priorities)])
            assert await asyncio.gather(*tasks) == [200] * len(priorities)
        stats = await _stats(sim)
    started = [e["model"] for e in stats["last_started"]]
    assert started == ["hold0", *expected]
    assert stats["max_running_seen"] == 1 and stats["max_waiting_seen"] == len(priorities)


async def test_a_waiter_that_hangs_up_leaves_the_queue_and_never_starts() -> None:
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=50.0) as sim:
        async with aiohttp.ClientSession() as s:
            async with _holding(sim, s):
                tasks = await _queue_in_order(sim, s, [_body("gone", 1), _body("kept", 1)])
                tasks[0].cancel()
                await _until(sim, lambda st: st["waiting"] == 1, "the hung-up waiter gone")
            assert await tasks[1] == 200
            with pytest.raises(asyncio.CancelledError):
                await tasks[0]
        stats = await _until(sim, lambda st: st["in_flight"] == 0, "everything finished")
    assert [e["model"] for e in stats["last_started"]] == ["hold0", "kept"]
    assert stats["waiting"] == 0 and stats["running"] == 0
    assert stats["finished"]["abort"] == 2  # the holder and the waiter


async def test_past_max_waiting_a_request_gets_an_openai_shaped_429() -> None:
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=50.0, max_waiting=2) as sim:
        async with aiohttp.ClientSession() as s:
            async with _holding(sim, s):
                tasks = await _queue_in_order(sim, s, [_body("w0", 1), _body("w1", 1)])
                async with s.post(sim.url + "/chat/completions", json=_body("over", 1)) as r:
                    status, retry_after = r.status, r.headers.get("Retry-After")
                    err = await r.json()
                async with openai.AsyncOpenAI(base_url=sim.url, api_key="x",
                                              max_retries=0) as client:
                    with pytest.raises(openai.RateLimitError) as raised:
                        await client.embeddings.create(model="e", input="x")
                stats = await _stats(sim)
            assert await asyncio.gather(*tasks) == [200, 200]
    assert status == 429 and retry_after == "1"
    assert err["error"]["type"] == "rate_limit_error"
    assert err["error"]["code"] == "rate_limit_exceeded"
    assert "waiting" in err["error"]["message"]
    assert raised.value.status_code == 429
    assert stats["rejected"] == 2 and stats["waiting"] == 2
    assert stats["max_waiting_seen"] == 2  # a refused request never queues
    assert "over" not in [e["model"] for e in stats["last_started"]]


async def test_overload_status_503_answers_a_server_error_instead() -> None:
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=50.0, max_waiting=0,
                               overload_status=503) as sim:
        async with aiohttp.ClientSession() as s, _holding(sim, s):
            async with s.post(sim.url + "/chat/completions", json=_body("over", 1)) as r:
                status, err = r.status, await r.json()
            stats = await _stats(sim)
    assert status == 503
    assert err["error"]["type"] == "server_error" and err["error"]["code"]
    assert stats["rejected"] == 1 and stats["max_waiting_seen"] == 0


async def test_raising_capacity_starts_waiters_at_once_and_lowering_preempts_nothing() -> None:
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=20.0) as sim:
        async with aiohttp.ClientSession() as s, _holding(sim, s):
            long = [_body(f"w{i}", 100_000) for i in range(3)]
            tasks = await _queue_in_order(sim, s, long)
            async with s.post(sim.root + "/sim/capacity", json={"slots": 4}) as r:
                assert r.status == 200
                assert (await r.json())["slots"] == 4
            # The holder still streams: only the new slots can have started them.
            stats = await _until(sim, lambda st: st["running"] == 4, "waiters started")
            assert stats["waiting"] == 0 and stats["slots"] == 4
            assert sim.set_capacity(slots=2)["slots"] == 2
            stats = await _stats(sim)
            assert stats["running"] == 4  # no preemption: they finish in their own time
            late = await _queue_in_order(sim, s, [_body("late", 1)])
            assert (await _stats(sim))["running"] == 4
            async with s.post(sim.root + "/sim/capacity", json={"slots": 0}) as r:
                assert r.status == 400
                assert "slots" in (await r.json())["error"]["message"]
            async with s.post(sim.root + "/sim/capacity", json={"gpus": 2}) as r:
                assert r.status == 400
            for t in [*tasks, *late]:
                t.cancel()
            await asyncio.gather(*tasks, *late, return_exceptions=True)
        stats = await _until(sim, lambda st: st["in_flight"] == 0, "all hung up")
    assert [e["model"] for e in stats["last_started"]][:4] == ["hold0", "w0", "w1", "w2"]
    assert stats["slots"] == 2 and stats["running"] == 0


async def test_capacity_can_change_decode_speed_and_prefill_while_running() -> None:
    async with await start_sim(slots=2, ttft_ms=10_000.0, tokens_per_s=1.0) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client:
            task = asyncio.create_task(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], max_tokens=50))
            await _until(sim, lambda st: st["running"] == 1, "a prefilling sequence")
            # A new ttft applies to sequences that start from now on; decode goes instant.
            cap = sim.set_capacity(ttft_ms=0.0, tokens_per_s=0.0)
            assert cap["ttft_ms"] == 0.0 and cap["tokens_per_s"] == 0.0
            fast = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], max_tokens=50)
            assert fast.usage is not None and fast.usage.completion_tokens == 50
            assert not task.done()  # still in its 10 s prefill
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def _parse_prometheus(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]],
                                                                float]]:
    """A small parser of Prometheus text format 0.0.4: TYPE lines and samples."""
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            else:
                assert parts[1] == "HELP", line
            continue
        m = sample.match(line)
        assert m is not None, f"not a sample line: {line!r}"
        labels = m.group(2) or ""
        pairs = label.findall(labels)
        assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels, f"bad labels: {line!r}"
        key = (m.group(1), frozenset(pairs))
        assert key not in samples, f"duplicate series: {line!r}"
        samples[key] = float(m.group(3))
    return types, samples


async def test_metrics_use_vllms_names_in_prometheus_text_and_match_stats() -> None:
    async with await start_sim(slots=2, ttft_ms=0.0, tokens_per_s=50.0) as sim:
        async with aiohttp.ClientSession() as s:
            async with openai.AsyncOpenAI(base_url=sim.url, api_key="x",
                                          max_retries=0) as client:
                await client.completions.create(model="m", prompt="a b c", max_tokens=3)
                await client.completions.create(model="m", prompt="a", extra_body={})
            async with _holding(sim, s, n=2):
                tasks = await _queue_in_order(sim, s, [_body("w", 1)])
                before = await _stats(sim)
                async with s.get(sim.root + "/metrics") as r:
                    assert r.status == 200
                    content_type = r.headers["Content-Type"]
                    text = await r.text()
                stats = await _stats(sim)
                tasks[0].cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    types, samples = _parse_prometheus(text)
    engine = frozenset({("model_name", METRICS_MODEL_NAME), ("engine", "0")})

    def value(name: str, **extra: str) -> float:
        return samples[(name, engine | frozenset(extra.items()))]

    assert types["vllm:num_requests_running"] == "gauge"
    assert types["vllm:num_requests_waiting"] == "gauge"
    assert types["vllm:kv_cache_usage_perc"] == "gauge"
    assert types["vllm:request_success_total"] == "counter"
    assert types["vllm:generation_tokens_total"] == "counter"
    assert value("vllm:num_requests_running") == stats["running"] == 2
    assert value("vllm:num_requests_waiting") == stats["waiting"] == 1
    assert value("vllm:kv_cache_usage_perc") == 1.0
    assert value("vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:request_success_total", finished_reason="stop") == 1
    assert value("vllm:request_success_total", finished_reason="abort") == 0
    assert value("vllm:prompt_tokens_total") == 3 + 1 + 1 + 1  # two prompts and the holders
    # The holders decode on between the reads: bound the counter by the two.
    generated = value("vllm:generation_tokens_total")
    assert before["tokens_generated"] <= generated <= stats["tokens_generated"]
    assert generated >= 3 + 16 + 2
    # The gateway's own scrape code reads the sim as it reads vLLM.
    assert parse_engine_load(text) == EngineLoad(running=2, waiting=1, kv_usage=1.0)


async def test_no_metrics_makes_metrics_404_like_an_opaque_backend() -> None:
    async with await start_sim(metrics=False) as sim, aiohttp.ClientSession() as s:
        async with s.get(sim.root + "/metrics") as r:
            assert r.status == 404
        async with s.get(sim.root + "/sim/stats") as r:
            assert r.status == 200


async def test_throughput_rises_with_the_batch_while_each_sequence_slows() -> None:
    tokens = 40

    async def run(client: openai.AsyncOpenAI, batch: int) -> tuple[float, float]:
        async def one() -> float:
            t0 = time.monotonic()
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], max_tokens=tokens,
                stream=True)
            n = len([c async for c in stream if c.choices and c.choices[0].delta.content])
            assert n == tokens
            return time.monotonic() - t0

        t0 = time.monotonic()
        each = await asyncio.gather(*(one() for _ in range(batch)))
        total = batch * tokens / (time.monotonic() - t0)
        return total, tokens / max(each)  # total tokens/s, the slowest sequence's speed

    async with await start_sim(slots=8, ttft_ms=0.0, tokens_per_s=200.0, batch_knee=4.0) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client:
            await run(client, 1)  # warm up the connection pool
            total1, speed1 = await run(client, 1)
            total8, speed8 = await run(client, 8)
        stats = await _stats(sim)
    assert stats["max_running_seen"] == 8
    # step(8) = 2.75 step(1): each sequence ~2.75x slower, the batch ~2.9x faster in all.
    assert speed8 < speed1
    assert total8 > total1


def test_default_knee_slows_a_full_batch_but_still_raises_throughput() -> None:
    for slots in (1, 4, 8, 64):
        state = create_sim_app(slots=slots, tokens_per_s=50.0)[SIM_STATE]
        full, alone = state.step_s(slots), state.step_s(1)
        assert alone == pytest.approx(1 / 50.0)  # a lone sequence keeps --tokens-per-s
        if slots > 1:
            assert full > alone  # each sequence is slower in a full batch
            assert slots / full > 1 / alone  # but the batch produces more in all
            assert full / alone < 1.5  # default knee 2 x slots: above 2/3 of the speed
    flat = create_sim_app(slots=8, tokens_per_s=50.0, batch_knee=float("inf"))[SIM_STATE]
    assert flat.step_s(8) == flat.step_s(1)


async def _start_cli_sim(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tierq", "sim", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20.0
    while True:
        try:
            await _stats(root)
            return proc, root
        except aiohttp.ClientError:
            assert proc.poll() is None, "tierq sim exited"
            assert time.monotonic() < deadline, "tierq sim never listened"
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(("flags", "message"), [
    (["--slots", "0"], "slots must be an integer >= 1"),
    (["--batch-knee", "0"], "batch_knee must be > 0"),
    (["--max-waiting", "-1"], "max_waiting must be an integer >= 0"),
    (["--tokens-per-s", "nan"], "tokens_per_s must be a number >= 0"),
])
def test_tierq_sim_refuses_a_bad_setting_with_one_line(flags: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierq sim: ") and message in err and "Traceback" not in err


async def test_tierq_sim_flags_reach_the_engine() -> None:
    proc, root = await _start_cli_sim("--slots", "3", "--scheduling", "priority",
                                      "--max-waiting", "5", "--overload-status", "503",
                                      "--batch-knee", "12", "--no-metrics")
    try:
        stats = await _stats(root)
        async with aiohttp.ClientSession() as s, s.get(root + "/metrics") as r:
            metrics_status = r.status
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (stats["slots"], stats["scheduling"], stats["max_waiting"]) == (3, "priority", 5)
    assert (stats["batch_knee"], stats["overload_status"]) == (12.0, 503)
    assert metrics_status == 404

