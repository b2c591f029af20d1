"""Microbenchmarks of the Python-facing admission path, each against the same
rules in pure Python (bench/pyref.py) in the same run. Every body also checks
its outcome, so the CI smoke run fails if a benchmark breaks, not just if it is slow."""

from __future__ import annotations

import asyncio
import pytest
from conftest import BASELINE, FLOOR, OURS, record
from pyref import RefAdmission, RefBucket

from tierq import Admission, TokenBucket

ACQUIRES = 2_000
TAKES = 10_000
CONTENDED_TASKS = 256
CONTENDED_SLOTS = 4


def _admission(impl: str, **kwargs: object) -> Admission | RefAdmission:
    return Admission(**kwargs) if impl == OURS else RefAdmission(**kwargs)  # type: ignore[arg-type]


def _admitted(adm: Admission | RefAdmission) -> int:
    admitted = adm.stats()["admitted"]
    assert isinstance(admitted, dict)
    return sum(admitted.values())


@pytest.mark.parametrize("impl", [OURS, BASELINE])
def test_acquire_release_uncontended(benchmark, loop: asyncio.AbstractEventLoop, impl: str) -> None:  # type: ignore[no-untyped-def]
    adm = _admission(impl, max_concurrency=64)

    async def body() -> None:
        for _ in range(ACQUIRES):
            async with adm.acquire("default"):
                pass

    before = _admitted(adm)
    benchmark(lambda: loop.run_until_complete(body()))
    assert adm.stats()["in_flight"] == 0
    assert (_admitted(adm) - before) % ACQUIRES == 0 and _admitted(adm) > before
    record(benchmark, "acquire + release, uncontended (async with)", impl, ACQUIRES)


@pytest.mark.parametrize("impl", [OURS, BASELINE])
def test_admit_release_without_asyncio(benchmark, impl: str) -> None:  # type: ignore[no-untyped-def]
    # The decision alone, without the async-with protocol around it: the Rust
    # core's admit()+release() calls against pyref's synchronous fast path.
    if impl == OURS:
        core = Admission(max_concurrency=64)._core

        def body() -> None:
            admit, release = core.admit, core.release
            for _ in range(TAKES):
                admit(1, 1)
                release()

        benchmark(body)
        stats = core.stats()
    else:
        ref = RefAdmission(max_concurrency=64)

        def body() -> None:
            admit, release = ref.admit_now, ref._release
            for _ in range(TAKES):
                admit(1, 1)
                release()

        benchmark(body)
        stats = ref.stats()
    assert stats["in_flight"] == 0
    admitted = stats["admitted"]
    assert isinstance(admitted, dict) and admitted["default"] >= TAKES
    record(benchmark, "admit + release decision only (no asyncio)", impl, TAKES)


class _NoOp:
    """The cheapest possible async context manager: what any `acquire()` costs
    before it does any work. Shown beside the acquire rows to explain them."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def test_async_with_floor(benchmark, loop: asyncio.AbstractEventLoop) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        for _ in range(ACQUIRES):
            async with _NoOp():
                pass

    benchmark(lambda: loop.run_until_complete(body()))
    record(benchmark, "acquire + release, uncontended (async with)", FLOOR, ACQUIRES)


@pytest.mark.parametrize("impl", [OURS, BASELINE])
def test_bucket_decision(benchmark, impl: str) -> None:  # type: ignore[no-untyped-def]
    # 1e9 tokens/s with a 1e9 burst: every decision takes, so each call does
    # the whole GCRA update, never the early "refused" exit.
    bucket = TokenBucket(rate=1e9, burst=1e9) if impl == OURS else RefBucket(rate=1e9, burst=1e9)
    take = bucket.try_take

    def body() -> int:
        refused = 0
        for _ in range(TAKES):
            if take(1, "default") is not None:
                refused += 1
        return refused

    assert benchmark(body) == 0
    record(benchmark, "bucket decision (try_take)", impl, TAKES)


@pytest.mark.parametrize("impl", [OURS, BASELINE])
def test_acquire_release_contended(benchmark, loop: asyncio.AbstractEventLoop, impl: str) -> None:  # type: ignore[no-untyped-def]
    # More tasks than slots, both lanes: most requests queue and are handed a
    # slot by the release of the one before them.
    adm = _admission(impl, max_concurrency=CONTENDED_SLOTS, queue_depth=1024)

    async def one(tier: str) -> None:
        async with adm.acquire(tier):
            await asyncio.sleep(0)

    async def body() -> None:
        await asyncio.gather(*(one("priority" if i % 4 == 0 else "default") for i in range(CONTENDED_TASKS)))

    benchmark(lambda: loop.run_until_complete(body()))
    stats = adm.stats()
    assert stats["in_flight"] == 0
    assert not any(stats["depth"].values())  # pyref has the two lanes this bench sends to
    assert _admitted(adm) % CONTENDED_TASKS == 0
    record(benchmark, f"acquire + release, contended ({CONTENDED_TASKS} tasks, {CONTENDED_SLOTS} slots)", impl, CONTENDED_TASKS)


@pytest.mark.parametrize("share", [0.0, 0.25])
def test_pyref_grants_in_the_same_order_as_tierq(loop: asyncio.AbstractEventLoop, share: float) -> None:
    """The baseline is only fair if it does the same work: same grant order
    under contention, strict and with default_min_share."""

    def order_of(adm: Admission | RefAdmission) -> list[str]:
        order: list[str] = []

        async def one(name: str, tier: str) -> None:
            async with adm.acquire(tier):
                order.append(name)
                await asyncio.sleep(0)

        async def body() -> None:
            await asyncio.gather(*(one(f"{t[0]}{i}", t) for i, t in enumerate(["default", "priority", "default"] * 20)))

        loop.run_until_complete(body())
        return order

    ours = order_of(Admission(max_concurrency=2, default_min_share=share))
    base = order_of(RefAdmission(max_concurrency=2, default_min_share=share))
    assert ours == base
    assert ours[:2] == ["d0", "p1"]
