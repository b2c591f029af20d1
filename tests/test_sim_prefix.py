"""The sim's prefix cache: prompts sharing leading blocks prefill only the rest,
an LRU of blocks per engine, vLLM's prefix-cache counters on /metrics.

Checked by counters and by the prefill times the engine schedules (its
last_started records), never by a stopwatch."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import openai
import pytest

from tierq.cli import main
from tierq.sim import SimServer, rendered_prompt, start_sim
from tierq.sim_engine import BLOCK_CHARS, prefix_blocks
from ports import free_port

Stats = dict[str, Any]


def _words(tag: str, chars: int) -> str:
    """Text of about `chars` characters, one sim token per word."""
    out: list[str] = []
    n = 0
    while n < chars:
        w = f"{tag}{len(out):04d}"
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def _messages(system: str, user: str) -> Any:  # the openai client's message params
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _render(system: str, user: str) -> str:
    # docs/sim.md: each message as role, newline, text, blank line.
    return f"system\n{system}\n\nuser\n{user}\n\n"


def _expected_hit(first: str, second: str, tokens: int) -> int:
    """The second prompt's cached tokens after the first ran, by the stated rule."""
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    blocks = common // BLOCK_CHARS
    return min(tokens * blocks * BLOCK_CHARS // len(second), tokens - 1)


async def _stats(sim: SimServer | str) -> Stats:
    root = sim if isinstance(sim, str) else sim.root
    async with aiohttp.ClientSession() as s, s.get(root + "/sim/stats") as r:
        assert r.status == 200
        data: Stats = await r.json()
        return data


async def _metric(sim: SimServer, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(sim.root + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def _ask(client: openai.AsyncOpenAI, system: str, user: str) -> int:
    r = await client.chat.completions.create(model="m", messages=_messages(system, user),
                                             max_tokens=2)
    assert r.usage is not None
    return r.usage.prompt_tokens


def test_a_block_key_chains_on_the_key_before_it() -> None:
    text = _words("a", 700)
    blocks = prefix_blocks(text, 70)
    first = hashlib.blake2b(text[:256].encode(), digest_size=8).digest()
    second = hashlib.blake2b(first + text[256:512].encode(), digest_size=8).digest()
    assert [k for k, _ in blocks] == [first, second]
    # 70 tokens over 700 characters: 256 characters hold 25, 512 hold 51.
    assert [t for _, t in blocks] == [25, 26]
    assert prefix_blocks(text[:255], 10) == ()  # no full block, nothing cached
    # The same second block after a different first one is another key.
    other = "b" + text[1:]
    assert {k for k, _ in prefix_blocks(other, 70)}.isdisjoint({k for k, _ in blocks})


def test_rendered_prompt_is_role_newline_text_blank_line_per_message() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                      {"type": "text", "text": "there"}]}]}
    assert rendered_prompt(body, chat=True) == "system\nbe brief\n\nuser\nhi there\n\n"
    assert rendered_prompt({"prompt": "once upon"}, chat=False) == "once upon"
    assert rendered_prompt({"prompt": ["a", "b"]}, chat=False) == "a\nb"
    assert rendered_prompt({"prompt": [1, 2, 3]}, chat=False) == ""  # token ids: not cached


async def test_a_shared_prefix_is_prefilled_once_and_counted_as_vllm_counts_it() -> None:
    system = _words("sys", 3000)
    speed = 1000.0
    async with await start_sim(slots=2, ttft_ms=0.0, tokens_per_s=0.0,
                               prefill_tokens_per_s=speed, prefix_cache_tokens=10_000) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client:
            t1 = await _ask(client, system, "first question here")
            t2 = await _ask(client, system, "second question")
        stats = await _stats(sim)
        queries = await _metric(sim, "vllm:prefix_cache_queries_total")
        hits = await _metric(sim, "vllm:prefix_cache_hits_total")
    first, second = stats["last_started"]
    hit = _expected_hit(_render(system, "first question here"),
                        _render(system, "second question"), t2)
    assert hit > 0.9 * t2
    assert (first["cached_tokens"], second["cached_tokens"]) == (0, hit)
    # Prefill time is proportional to the tokens not already cached.
    assert first["prefill_s"] == pytest.approx(t1 / speed)
    assert second["prefill_s"] == pytest.approx((t2 - hit) / speed)
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (t1 + t2, hit)
    assert (queries, hits) == (t1 + t2, hit)
    # The second prompt's blocks all lie before the user turns differ: no new block.
    assert stats["prefix_cache_blocks"] == len(_render(system, "first question here")) // 256


async def test_a_block_hits_only_if_every_block_before_it_does() -> None:
    system = _words("sys", 2000)
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=0.0,
                               prefix_cache_tokens=10_000) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client:
            await _ask(client, system, "q")
            # The same text but its first character: every later block's key differs.
            await _ask(client, "X" + system[1:], "q")
        stats = await _stats(sim)
    assert [s["cached_tokens"] for s in stats["last_started"]] == [0, 0]
    assert stats["prefix_cache_hits"] == 0


async def test_the_cache_evicts_the_least_recently_used_prefix_tail_first() -> None:
    a, b = _words("aa", 2000), _words("bb", 2000)
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=0.0,
                               prefix_cache_tokens=300) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client:
            ta = await _ask(client, a, "q")  # 287 tokens, 255 in full blocks: all fit
            await _ask(client, a, "q2")
            await _ask(client, b, "q")  # b's blocks push a's out, its tail first
            await _ask(client, a, "q3")  # a partly evicted: its head still hits
            full = _words("cc", 6000)  # bigger than the cache: its head is kept
            tf = await _ask(client, full, "q")
            await _ask(client, full, "q")
        stats = await _stats(sim)
    cached = [s["cached_tokens"] for s in stats["last_started"]]
    assert cached[0] == 0 and cached[1] == _expected_hit(_render(a, "q"), _render(a, "q2"), ta)
    assert cached[2] == 0
    assert 0 < cached[3] < cached[1]
    assert cached[4] == 0 and 0 < cached[5] <= 300 < tf
    assert stats["prefix_cache_used_tokens"] <= 300


async def test_one_prefill_unit_is_shared_first_come_first_served() -> None:
    # Two sequences start at once with nothing cached: the second's first token
    # waits for the first's prefill as well as its own (scheduled, not timed).
    async with await start_sim(slots=2, ttft_ms=0.0, tokens_per_s=0.0,
                               prefill_tokens_per_s=10.0, prefix_cache_tokens=10_000) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client:
            tasks = [asyncio.create_task(_ask(client, _words(t, 1000), "q")) for t in "xy"]
            deadline = time.monotonic() + 10.0
            while len((stats := await _stats(sim))["last_started"]) < 2:
                assert time.monotonic() < deadline, stats
                await asyncio.sleep(0.01)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    one, two = stats["last_started"]
    assert one["prefill_s"] > 5.0 and two["prefill_s"] > 5.0  # ~100 tokens at 10 per s
    assert one["first_token_in_s"] == pytest.approx(one["prefill_s"])
    # The second started at most a few ms after the first.
    assert two["first_token_in_s"] > one["prefill_s"] + two["prefill_s"] - 1.0


async def test_no_prefix_cache_by_default_and_prefill_is_ttft_alone() -> None:
    system = _words("sys", 2000)
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=0.0) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client:
            await _ask(client, system, "q")
            await _ask(client, system, "q")
        stats = await _stats(sim)
        assert await _metric(sim, "vllm:prefix_cache_queries_total") == 0
    assert [s["cached_tokens"] for s in stats["last_started"]] == [0, 0]
    assert [s["prefill_s"] for s in stats["last_started"]] == [0.0, 0.0]
    assert (stats["prefix_cache_tokens"], stats["prefix_cache_blocks"]) == (0, 0)
    assert stats["prefill_tokens_per_s"] == 0.0


async def test_reset_prefix_cache_forgets_blocks_and_sim_reset_zeroes_the_counters() -> None:
    system = _words("sys", 2000)
    async with await start_sim(slots=1, ttft_ms=0.0, tokens_per_s=0.0,
                               prefix_cache_tokens=10_000) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="x", max_retries=0) as client, \
                aiohttp.ClientSession() as s:
            await _ask(client, system, "q")
            async with s.post(sim.root + "/reset_prefix_cache") as r:
                assert r.status == 200
            assert (await _stats(sim))["prefix_cache_blocks"] == 0
            await _ask(client, system, "q")
            async with s.post(sim.root + "/sim/reset") as r:
                assert r.status == 200
            after_reset = await _stats(sim)
            await _ask(client, system, "q")
            async with s.post(sim.root + "/sim/capacity",
                              json={"prefill_tokens_per_s": 500}) as r:
                assert (await r.json())["prefill_tokens_per_s"] == 500.0
        stats = await _stats(sim)
    assert [s["cached_tokens"] for s in stats["last_started"]][-1] > 0
    assert (after_reset["prefix_cache_queries"], after_reset["prefix_cache_hits"]) == (0, 0)
    assert after_reset["prefix_cache_blocks"] > 0  # the cache is the engine's, not a counter


@pytest.mark.parametrize(("flags", "message"), [
    (["--prefix-cache-tokens", "-1"], "prefix_cache_tokens must be an integer >= 0"),
    (["--prefill-tokens-per-s", "-5"], "prefill_tokens_per_s must be a number >= 0"),
])
def test_tierq_sim_refuses_a_bad_prefix_setting_with_one_line(
        flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tierq sim: ") and message in err and "Traceback" not in err


async def test_tierq_sim_prefix_flags_reach_the_engine() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tierq", "sim", "--port", str(port),
                             "--prefill-tokens-per-s", "4000", "--prefix-cache-tokens", "5000"],
                            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20.0
        while True:
            try:
                stats = await _stats(root)
                break
            except aiohttp.ClientError:
                assert proc.poll() is None, "tierq sim exited"
                assert time.monotonic() < deadline, "tierq sim never listened"
                await asyncio.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (stats["prefill_tokens_per_s"], stats["prefix_cache_tokens"]) == (4000.0, 5000)
