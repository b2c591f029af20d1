"""One outcome per request, and what it leaves of the key's per-minute budget.

Served or partial: the key is charged its real usage. Shed, failed or cancelled:
its token estimate comes back, and its request too when the gateway caused it
(pool sheds, upstream failures, drain), not the client (its own rate limit, a
hang-up, a request the engine refused). Every test reads the key's budget after
the fact, through real sockets and the openai client, for per-process buckets
and the host's shared key table alike; the limiter runs on a manual clock, so
nothing refills while a test runs and every figure is exact.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running, model_config
from openai import AsyncOpenAI

from tierq import ManualClock
from tierq._core import SharedKeyBuckets
from tierq.config import Config, KeysConfig, LedgerConfig, UpstreamConfig
from tierq.keys import KeyInfo, KeyLimiter, KeyStore
from tierq.ledger import LedgerRow

# 79 characters the gateway estimates at 20 prompt tokens (4 characters each);
# the sim counts 40 (one per word), so real usage is not the estimate.
MESSAGES: Any = [{"role": "user", "content": " ".join(["a"] * 40)}]
HI: Any = [{"role": "user", "content": "hi"}]  # one token, estimated and real
MAX_TOKENS = 20
EST = 20 + MAX_TOKENS
RPM, TPM = 10, 1000


@dataclass
class Keyed:
    """A gateway with API keys: `key` is limited (RPM/TPM), `other` is not."""

    gw: Running
    key: KeyInfo
    token: str
    other: str  # an unlimited key, for requests that only hold the pool

    def budget(self) -> tuple[float | None, float | None]:
        limiter = self.gw.gw.limiter
        assert limiter is not None
        return limiter.remaining(self.key)

    def client(self, token: str | None = None) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=self.gw.url, api_key=token or self.token, max_retries=0)

    async def last_row(self, key_id: str | None = None) -> LedgerRow:
        rows = [r for r in await self.gw.rows() if r.key_id == (key_id or self.key.public_id)]
        assert rows, "no ledger row for the key"
        return rows[-1]


@pytest.fixture(params=["per-process", "shared-table"])
def make_limiter(request: pytest.FixtureRequest) -> Iterator[Callable[[], KeyLimiter]]:
    clock = ManualClock()
    if request.param == "per-process":
        yield lambda: KeyLimiter(clock)
        return
    # The named table `tierq serve --workers N` maps, attached as a worker does.
    name = f"/tierq-test-settle-{os.getpid()}-{id(clock)}"
    SharedKeyBuckets.create(name, 64, clock=clock)
    try:
        yield lambda: KeyLimiter(clock, shared=SharedKeyBuckets.attach(name, clock=clock))
    finally:
        SharedKeyBuckets.unlink(name)


@pytest.fixture
def keyed(make_gateway: GatewayFactory, make_limiter: Callable[[], KeyLimiter],
          tmp_path: Path) -> Callable[..., Any]:
    async def start(*, rpm: int | None = RPM, tpm: int | None = TPM, sim: dict[str, Any] | None = None,
                    upstream: UpstreamConfig | None = None, **admission: Any) -> Keyed:
        keys_db = tmp_path / "keys.db"
        with KeyStore(str(keys_db)) as store:
            info, token = store.create("limited", rpm=rpm, tpm=tpm)
            _, other = store.create("unlimited")
        up = upstream or UpstreamConfig("sim", "", "sim")
        config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
                        upstreams=(up,),
                        models=(replace(model_config(PRIORITY_MODEL, **admission), upstream=up.name),),
                        keys=KeysConfig(str(keys_db)))
        gw = await make_gateway(config=config, sim=sim)
        gw.gw.limiter = make_limiter()
        return Keyed(gw, info, token, other)

    return start


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Polls state (never a fixed sleep): a loaded machine only makes it slower."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def chat(c: AsyncOpenAI, **kw: Any) -> Any:
    return await c.chat.completions.create(model=PRIORITY_MODEL,
                                           messages=kw.pop("messages", MESSAGES),
                                           max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


async def blocker(k: Keyed) -> asyncio.Task[Any]:
    """Holds the pool's one slot (the unlimited key, an upstream slow to answer)."""
    adm = k.gw.gw.pools[PRIORITY_MODEL].admission
    task = asyncio.create_task(chat(k.client(k.other), extra_body={"sim_fault": "slow-first-byte"}))
    await wait_for(lambda: adm.stats()["in_flight"] == 1)
    return task


async def release(task: asyncio.Task[Any]) -> None:
    task.cancel()  # its client hangs up: the slot frees at once
    with pytest.raises(asyncio.CancelledError):
        await task


ONE_SLOT: Any = {"max_concurrency": 1, "queue_depth": 1}
SLOW: Any = {"fault_delay_ms": 30_000.0}  # a blocker answers only when released


async def test_served_request_charges_the_key_its_real_usage(keyed: Callable[..., Any]) -> None:
    k = await keyed()
    async with k.client() as c:
        resp = await chat(c)
    row = await k.last_row()
    assert row.status == "served" and resp.usage is not None
    real = row.prompt_tokens + row.completion_tokens
    assert real == resp.usage.total_tokens == EST + 20  # settled to it, not the estimate
    assert k.budget() == (RPM - 1, TPM - real)


async def test_a_request_for_n_choices_takes_n_times_max_tokens_from_the_keys_tpm(
    keyed: Callable[..., Any],
) -> None:
    k = await keyed(sim=SLOW, **ONE_SLOT)
    held = await blocker(k)
    try:
        async with k.client() as c:
            queued = asyncio.create_task(chat(c, messages=HI, n=3))
            await wait_for(lambda: k.budget() != (RPM, TPM))
            # Taken when it is let in: one prompt token and 3 choices of max_tokens.
            assert k.budget() == (RPM - 1, TPM - (1 + 3 * MAX_TOKENS))
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
    finally:
        await release(held)


async def test_partial_stream_cut_by_its_client_charges_what_was_delivered(
    keyed: Callable[..., Any],
) -> None:
    k = await keyed(sim={"tokens_per_s": 20.0})
    async with k.client() as c:
        stream = await chat(c, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # one token in hand, then the client hangs up
        await stream.close()
    await wait_for(lambda: k.gw.gw.pools[PRIORITY_MODEL].admission.stats()["in_flight"] == 0)
    row = await k.last_row()
    assert (row.status, row.partial, row.code) == ("cancelled", True, "client_disconnected")
    assert 1 <= row.completion_tokens < MAX_TOKENS and row.cost > 0
    # The client's own doing: its request stays counted, its tokens are what it got.
    assert k.budget() == (RPM - 1, TPM - row.prompt_tokens - row.completion_tokens)


@pytest.mark.parametrize("code", ["server_overloaded", "queue_timeout"])
async def test_request_shed_by_the_pool_leaves_the_key_untouched(
    keyed: Callable[..., Any], code: str,
) -> None:
    if code == "server_overloaded":
        k = await keyed(sim=SLOW, max_concurrency=1, queue_depth=0)
    else:
        k = await keyed(sim=SLOW, max_concurrency=1, max_wait_ms={"default": 50})
    held = await blocker(k)
    try:
        async with k.client() as c:
            with pytest.raises(openai.RateLimitError) as shed:
                await chat(c)
    finally:
        await release(held)
    assert shed.value.code == code
    assert (await k.last_row()).status == "shed"
    assert k.budget() == (RPM, TPM)


async def test_request_shed_by_the_pools_own_rate_gives_back_the_request_too(
    keyed: Callable[..., Any],
) -> None:
    k = await keyed(rate=0.001, burst=1, priority_reserve=0.0)
    async with k.client() as c:
        await chat(c)
        served = TPM - (k.budget()[1] or 0)
        with pytest.raises(openai.RateLimitError) as shed:
            await chat(c)
    assert shed.value.code == "rate_limit_exceeded"
    assert (await k.last_row()).code == "rate_limit_exceeded"
    assert k.budget() == (RPM - 1, TPM - served)  # only the served one counts


async def test_requests_over_the_keys_own_limit_cost_nothing_more(
    keyed: Callable[..., Any],
) -> None:
    k = await keyed(rpm=2)
    async with k.client() as c:
        for _ in range(2):
            await chat(c)
        spent = k.budget()
        for _ in range(3):
            with pytest.raises(openai.RateLimitError) as limited:
                await chat(c)
            assert limited.value.code == "rate_limit_exceeded"
    assert spent[0] == 0
    assert k.budget() == spent  # refused before anything was taken, nothing given back
    rows = await k.gw.rows()
    assert [r.status for r in rows] == ["served", "served", "shed", "shed", "shed"]


@pytest.mark.parametrize(("fault", "stream", "code"), [
    ("500", False, "upstream_500"),
    ("bad-json", False, "upstream_bad_response"),
    ("reset", True, "upstream_stream_error"),
])
async def test_upstream_failure_gives_back_the_tokens_and_the_request(
    keyed: Callable[..., Any], fault: str, stream: bool, code: str,
) -> None:
    k = await keyed()
    async with k.client() as c:
        with pytest.raises(openai.APIError):
            resp = await chat(c, stream=stream, extra_body={"sim_fault": fault})
            async for _ in resp:
                pass
    row = await k.last_row()
    assert (row.status, row.code, row.cost) == ("failed", code, 0)
    assert row.partial == stream  # the broken stream had delivered some tokens
    assert k.budget() == (RPM, TPM)


async def test_upstream_unreachable_gives_back_the_tokens_and_the_request(
    keyed: Callable[..., Any],
) -> None:
    # Nothing listens on port 9 (discard): connection refused.
    k = await keyed(upstream=UpstreamConfig("dead", "http://127.0.0.1:9/v1", "vllm",
                                            connect_timeout_s=2.0))
    async with k.client() as c:
        with pytest.raises(openai.APIError):
            await chat(c)
    assert (await k.last_row()).code == "upstream_unavailable"
    assert k.budget() == (RPM, TPM)


async def test_request_the_engine_refuses_gives_back_the_tokens_not_the_request(
    keyed: Callable[..., Any],
) -> None:
    k = await keyed()
    async with k.client() as c:
        # An engine's own 400 (here the sim refusing a fault it does not know):
        # the request was at fault, so it still counts against the key.
        with pytest.raises(openai.BadRequestError):
            await chat(c, extra_body={"sim_fault": "no-such-fault"})
    row = await k.last_row()
    assert (row.status, row.code) == ("failed", "upstream_400")
    assert k.budget() == (RPM - 1, TPM)


async def test_client_that_hangs_up_while_queued_gets_its_tokens_back_not_the_request(
    keyed: Callable[..., Any],
) -> None:
    k = await keyed(sim=SLOW, **ONE_SLOT)
    adm = k.gw.gw.pools[PRIORITY_MODEL].admission
    held = await blocker(k)
    try:
        async with k.client() as c:
            waiting = asyncio.create_task(chat(c))
            await wait_for(lambda: adm.stats()["depth"]["default"] == 1)  # type: ignore[index]
            waiting.cancel()  # the client hangs up while queued
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await wait_for(lambda: adm.stats()["depth"]["default"] == 0)  # type: ignore[index]
    finally:
        await release(held)
    row = await k.last_row()
    assert (row.status, row.code) == ("cancelled", "client_disconnected")
    assert k.budget() == (RPM - 1, TPM)


async def test_requests_shed_by_a_drain_give_back_the_tokens_and_the_request(
    keyed: Callable[..., Any],
) -> None:
    k = await keyed(sim=SLOW, **ONE_SLOT)
    adm = k.gw.gw.pools[PRIORITY_MODEL].admission
    held = await blocker(k)
    try:
        async with k.client() as c:
            queued = asyncio.create_task(chat(c))
            await wait_for(lambda: adm.stats()["depth"]["default"] == 1)  # type: ignore[index]
            assert k.gw.gw.begin_drain() == 1
            with pytest.raises(openai.InternalServerError) as drained:
                await queued
            with pytest.raises(openai.InternalServerError) as late:  # arrives after the drain
                await chat(c)
    finally:
        await release(held)
    assert drained.value.code == late.value.code == "server_shutting_down"
    assert drained.value.response.headers["Retry-After"] == "1"
    assert drained.value.response.headers["retry-after-ms"] == "1000"
    rows = [r for r in await k.gw.rows() if r.key_id == k.key.public_id]
    assert [(r.status, r.code) for r in rows] == [("shed", "server_shutting_down")] * 2
    assert k.budget() == (RPM, TPM)


async def test_regression_a_burst_the_pool_sheds_does_not_burn_the_keys_tpm(
    keyed: Callable[..., Any],
) -> None:
    # Bug: a key with 2,000 TPM sent a burst of 12 and the pool shed 10; 5 of
    # the next 6 requests then got rate_limit_exceeded, though only 302 tokens
    # had really been used: the sheds had kept their token estimates.
    k = await keyed(rpm=100, tpm=2000, sim={"fault_delay_ms": 1500.0}, **ONE_SLOT)
    adm = k.gw.gw.pools[PRIORITY_MODEL].admission
    max_tokens = 150  # estimate 151 each: the burst of 12 (1,812) fits the 2,000
    async with k.client() as c:
        first = asyncio.create_task(chat(c, messages=HI, max_tokens=max_tokens,
                                         extra_body={"sim_fault": "slow-first-byte"}))
        await wait_for(lambda: adm.stats()["in_flight"] == 1)
        second = asyncio.create_task(chat(c, messages=HI, max_tokens=max_tokens))
        await wait_for(lambda: adm.stats()["depth"]["default"] == 1)  # type: ignore[index]
        burst = await asyncio.gather(*(chat(c, messages=HI, max_tokens=max_tokens)
                                       for _ in range(10)), return_exceptions=True)
        assert adm.stats()["in_flight"] == 1, "the first request must still hold the slot"
        assert all(isinstance(e, openai.RateLimitError) and e.code == "server_overloaded"
                   for e in burst), burst
        served = await asyncio.gather(first, second)
        used = sum(r.usage.total_tokens for r in served)
        assert used == 302
        assert k.budget() == (100 - 2, 2000 - used)
        # The next six, one after another (the pool has one slot): all served.
        for _ in range(6):
            await chat(c, messages=HI, max_tokens=max_tokens)
    assert k.budget() == (100 - 8, 2000 - 8 * 151)
