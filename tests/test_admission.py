"""`tierq.Admission` against the contract in DESIGN.md ("Admission semantics"):
one test per rule, on a real event loop, with a `ManualClock` wherever time
decides the outcome so that no test sleeps to prove timing."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

import pytest

from tierq import Admission, ManualClock, Shed, Slot
from tierq.retry_after import retry_after

# Long real-time waits for tests that drive a ManualClock: the per-waiter timers
# that call `expire_due` by themselves must not matter while the test runs.
LONG_WAITS = {"default": 600_000.0, "priority": 900_000.0}


async def settle() -> None:
    """Lets every runnable task run until it blocks (a few loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def hold(adm: Admission, tier: str = "default") -> Slot:
    """Takes a slot outside any `async with`, to be given back with `give_back`."""
    slot = adm.acquire(tier)
    return await slot.__aenter__()


async def give_back(slot: Slot) -> None:
    await slot.__aexit__(None, None, None)


def depth(adm: Admission) -> dict[str, int]:
    return adm.stats()["depth"]  # type: ignore[return-value]


def in_flight(adm: Admission) -> int:
    return adm.stats()["in_flight"]  # type: ignore[return-value]


def shed_counts(adm: Admission) -> dict[str, int]:
    return adm.stats()["shed"]  # type: ignore[return-value]


def recorder(adm: Admission, order: list[str]) -> Callable[[str, str], Awaitable[str]]:
    """A request that notes its name when admitted and releases straight away."""

    async def request(name: str, tier: str) -> str:
        async with adm.acquire(tier):
            order.append(name)
        return name

    return request


async def test_uncontended_acquire_is_admitted_at_once_and_released_on_exit() -> None:
    adm = Admission(max_concurrency=2, clock=ManualClock())
    async with adm.acquire("priority") as slot:
        assert slot.tier == "priority"
        assert slot.queue_ms == 0.0
        assert in_flight(adm) == 1
    assert in_flight(adm) == 0
    assert adm.stats()["admitted"] == {"priority": 1, "default": 0, "flex": 0}


async def test_strict_priority_order_under_contention() -> None:
    # Slots full, defaults queued first; priorities arriving later are granted
    # first, and each lane is FIFO.
    adm = Admission(max_concurrency=1, queue_depth=16, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    tasks = [asyncio.create_task(request(f"d{i}", "default")) for i in range(3)]
    await settle()
    tasks += [asyncio.create_task(request(f"p{i}", "priority")) for i in range(3)]
    await settle()
    assert depth(adm) == {"priority": 3, "default": 3, "flex": 0}
    assert order == []
    await give_back(holder)
    await asyncio.gather(*tasks)
    assert order == ["p0", "p1", "p2", "d0", "d1", "d2"]
    assert in_flight(adm) == 0


async def test_waiter_records_its_queue_time_on_the_pool_clock() -> None:
    clock = ManualClock()
    adm = Admission(max_concurrency=1, max_wait_ms=LONG_WAITS, clock=clock)
    holder = await hold(adm)
    queued_ms: list[float] = []

    async def request() -> None:
        async with adm.acquire() as slot:
            queued_ms.append(slot.queue_ms)

    task = asyncio.create_task(request())
    await settle()
    clock.advance(0.125)
    await give_back(holder)
    await task
    assert queued_ms == [125.0]


async def test_priority_request_evicts_newest_default_waiter_when_full() -> None:
    adm = Admission(max_concurrency=1, queue_depth=3, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    defaults = [asyncio.create_task(request(f"d{i}", "default")) for i in range(3)]
    await settle()
    assert depth(adm) == {"priority": 0, "default": 3, "flex": 0}

    p0 = asyncio.create_task(request("p0", "priority"))
    await settle()
    # The newest default (d2) is shed and p0 takes its place.
    assert defaults[2].done()
    err = defaults[2].exception()
    assert isinstance(err, Shed) and err.code == "server_overloaded" and err.lane == "default"
    assert not defaults[0].done() and not defaults[1].done()
    assert depth(adm) == {"priority": 1, "default": 2, "flex": 0}
    assert shed_counts(adm)["server_overloaded"] == 1

    await give_back(holder)
    await asyncio.gather(p0, defaults[0], defaults[1])
    assert order == ["p0", "d0", "d1"]
    assert in_flight(adm) == 0


async def test_priority_request_is_shed_when_no_default_waiter_is_left() -> None:
    adm = Admission(max_concurrency=1, queue_depth=2, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    d0 = asyncio.create_task(request("d0", "default"))
    d1 = asyncio.create_task(request("d1", "default"))
    await settle()
    p0 = asyncio.create_task(request("p0", "priority"))
    p1 = asyncio.create_task(request("p1", "priority"))
    await settle()
    assert depth(adm) == {"priority": 2, "default": 0, "flex": 0}
    assert [type(t.exception()) for t in (d0, d1)] == [Shed, Shed]

    # Queue full of priority waiters: a third priority request is shed itself.
    with pytest.raises(Shed) as shed:
        async with adm.acquire("priority"):
            pytest.fail("admitted past a full queue")
    assert shed.value.code == "server_overloaded"
    assert shed.value.lane == "priority"
    assert depth(adm) == {"priority": 2, "default": 0, "flex": 0}
    assert shed_counts(adm)["server_overloaded"] == 3

    await give_back(holder)
    await asyncio.gather(p0, p1)
    assert order == ["p0", "p1"]


async def test_default_request_is_shed_at_once_when_queue_is_full() -> None:
    adm = Admission(max_concurrency=1, queue_depth=2, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    waiting = [
        asyncio.create_task(request("d0", "default")),
        asyncio.create_task(request("p0", "priority")),
    ]
    await settle()
    late = adm.acquire("default")
    # "At once": the shed is raised by the first step of __aenter__, before any await.
    coro = late.__aenter__()
    with pytest.raises(Shed) as shed:
        coro.send(None)
    assert shed.value.code == "server_overloaded"
    assert shed.value.retry_after_s > 0
    # A default arrival never evicts anyone.
    assert depth(adm) == {"priority": 1, "default": 1, "flex": 0}
    assert not any(t.done() for t in waiting)
    await give_back(holder)
    await asyncio.gather(*waiting)
    assert order == ["p0", "d0"]


async def test_each_lane_sheds_waiters_past_its_own_max_wait() -> None:
    clock = ManualClock()
    adm = Admission(
        max_concurrency=1,
        max_wait_ms={"default": 1000.0, "priority": 3000.0},
        clock=clock,
    )
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    d0 = asyncio.create_task(request("d0", "default"))
    p0 = asyncio.create_task(request("p0", "priority"))
    await settle()

    clock.advance_ns(1_000_000_000 - 1)
    assert adm.expire_due() == 0, "one nanosecond before the default max wait"
    clock.advance_ns(1)
    assert adm.expire_due() == 1
    await settle()
    err = d0.exception()
    assert isinstance(err, Shed) and err.code == "queue_timeout" and err.lane == "default"
    assert depth(adm) == {"priority": 1, "default": 0, "flex": 0}
    assert not p0.done(), "the priority lane has a longer max wait"

    clock.advance(1.999)
    assert adm.expire_due() == 0
    clock.advance(0.001)
    assert adm.expire_due() == 1
    await settle()
    err = p0.exception()
    assert isinstance(err, Shed) and err.code == "queue_timeout" and err.lane == "priority"
    assert depth(adm) == {"priority": 0, "default": 0, "flex": 0}
    assert shed_counts(adm)["queue_timeout"] == 2
    assert order == []
    await give_back(holder)
    assert in_flight(adm) == 0


async def test_waiter_past_max_wait_is_shed_by_its_own_timer() -> None:
    # Real clock: nobody calls expire_due; the waiter's timer must fire by
    # itself. Bounded loosely on both sides (the core never sheds early).
    adm = Admission(max_concurrency=1, max_wait_ms={"default": 20.0, "priority": 60.0})
    holder = await hold(adm)

    async def timed(tier: str) -> tuple[str, float]:
        t0 = time.monotonic()
        try:
            async with adm.acquire(tier):
                return ("admitted", time.monotonic() - t0)
        except Shed as e:
            return (e.code, time.monotonic() - t0)

    default, priority = await asyncio.wait_for(asyncio.gather(timed("default"), timed("priority")), timeout=10)
    assert default[0] == "queue_timeout"
    assert priority[0] == "queue_timeout"
    assert 0.020 <= default[1] < 5.0
    assert 0.060 <= priority[1] < 5.0
    await give_back(holder)
    assert adm.stats()["in_flight"] == 0


async def test_token_bucket_default_lane_stops_at_the_reserve_and_priority_drains_to_zero() -> None:
    clock = ManualClock()
    adm = Admission(rate=10.0, burst=10, priority_reserve=0.2, clock=clock)
    for _ in range(8):
        async with adm.acquire("default"):
            pass
    with pytest.raises(Shed) as shed:
        async with adm.acquire("default"):
            pass
    assert shed.value.code == "rate_limit_exceeded"
    assert shed.value.retry_after_s == 0.1
    for _ in range(2):
        async with adm.acquire("priority"):
            pass
    with pytest.raises(Shed) as shed:
        async with adm.acquire("priority"):
            pass
    assert shed.value.code == "rate_limit_exceeded"
    assert shed.value.lane == "priority"
    assert shed.value.retry_after_s == 0.1
    assert shed_counts(adm)["rate_limit_exceeded"] == 2

    clock.advance(0.1)
    async with adm.acquire("priority"):
        pass
    assert adm.stats()["admitted"] == {"priority": 3, "default": 8, "flex": 0}


async def test_rate_limit_retry_after_is_exact_on_the_manual_clock() -> None:
    clock = ManualClock()
    adm = Admission(rate=3.0, burst=2, priority_reserve=0.0, clock=clock)
    for _ in range(2):
        async with adm.acquire():
            pass
    with pytest.raises(Shed) as shed:
        async with adm.acquire():
            pass
    # One interval is round(1e9 / 3) = 333_333_333 ns, returned to the nanosecond.
    assert shed.value.retry_after_s == 333_333_333 / 1e9
    assert shed.value.retry_after_ms == 334
    assert shed.value.retry_after_header == 1
    clock.advance_ns(333_333_332)
    with pytest.raises(Shed) as shed:
        async with adm.acquire():
            pass
    assert shed.value.retry_after_s == 1e-9
    assert shed.value.retry_after_ms == 1
    clock.advance_ns(1)
    async with adm.acquire():
        pass


@pytest.mark.parametrize(
    ("seconds", "ms", "header"),
    [
        (-1.0, 1, 1),
        (0.0, 1, 1),
        (1e-9, 1, 1),
        (0.001, 1, 1),
        (0.0010001, 2, 1),
        (0.999, 999, 1),
        (1.0, 1000, 1),
        (1.000000001, 1001, 2),
        (2.5, 2500, 3),
        (119.2, 119200, 120),
        (120.0, 120000, 120),
        (500.0, 500000, 120),
        (math.inf, 120000, 120),
        (math.nan, 120000, 120),
    ],
)
def test_shed_retry_after_rounds_up_and_header_is_whole_seconds_between_1_and_120(
    seconds: float, ms: int, header: int
) -> None:
    # One rule for every refusal (tierq.retry_after): what Shed reports is what
    # the gateway sends, at least 1 ms (the openai SDK reads 0 as "no hint").
    shed = Shed("rate_limit_exceeded", seconds, "default")
    assert shed.retry_after_ms == ms
    assert shed.retry_after_header == header
    headers = {"x-request-id": "r"}
    retry_after(seconds).add_to(headers)
    assert headers == {"x-request-id": "r", "retry-after-ms": str(ms), "Retry-After": str(header)}


async def test_default_min_share_gives_defaults_that_share_of_dispatches_while_both_wait() -> None:
    adm = Admission(max_concurrency=1, queue_depth=128, default_min_share=0.25, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    tasks = [asyncio.create_task(request("d", "default")) for _ in range(40)]
    tasks += [asyncio.create_task(request("p", "priority")) for _ in range(40)]
    await settle()
    await give_back(holder)
    await asyncio.gather(*tasks)
    first_40 = order[:40]
    assert first_40.count("d") == 10
    # Spread out, not bunched: never more than 3 priorities in a row before a default.
    assert "pppp" not in "".join(first_40)
    assert len(order) == 80 and in_flight(adm) == 0


async def test_default_min_share_zero_is_strict_priority() -> None:
    adm = Admission(max_concurrency=1, queue_depth=128, default_min_share=0.0, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    tasks = [asyncio.create_task(request("d", "default")) for _ in range(20)]
    tasks += [asyncio.create_task(request("p", "priority")) for _ in range(20)]
    await settle()
    await give_back(holder)
    await asyncio.gather(*tasks)
    assert "".join(order) == "p" * 20 + "d" * 20


async def test_cancelled_waiting_task_leaves_the_queue_at_once_and_takes_no_slot() -> None:
    adm = Admission(max_concurrency=1, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    leaver = asyncio.create_task(request("leaver", "default"))
    stayer = asyncio.create_task(request("stayer", "default"))
    await settle()
    assert depth(adm) == {"priority": 0, "default": 2, "flex": 0}
    leaver.cancel()
    # One loop turn delivers the cancellation; by then the task is out of line.
    await asyncio.sleep(0)
    assert leaver.cancelled()
    assert depth(adm) == {"priority": 0, "default": 1, "flex": 0}
    assert adm.stats()["cancelled"] == 1
    assert in_flight(adm) == 1
    await give_back(holder)
    await stayer
    assert order == ["stayer"]
    assert in_flight(adm) == 0


async def test_slot_is_released_when_the_block_raises() -> None:
    adm = Admission(max_concurrency=1, max_wait_ms=LONG_WAITS, clock=ManualClock())
    order: list[str] = []
    request = recorder(adm, order)

    async def failing() -> None:
        async with adm.acquire("priority"):
            await settle()
            raise RuntimeError("upstream failed")

    first = asyncio.create_task(failing())
    await asyncio.sleep(0)
    queued = asyncio.create_task(request("next", "default"))
    with pytest.raises(RuntimeError, match="upstream failed"):
        await first
    await queued
    assert order == ["next"]
    assert in_flight(adm) == 0


async def test_task_cancelled_right_after_grant_passes_the_slot_on() -> None:
    adm = Admission(max_concurrency=1, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    order: list[str] = []
    request = recorder(adm, order)
    granted = asyncio.create_task(request("granted", "priority"))
    behind = asyncio.create_task(request("behind", "default"))
    await settle()
    # The release hands the slot to `granted` (its future resolves), and the
    # task is cancelled before it ever runs again.
    await give_back(holder)
    granted.cancel()
    await asyncio.gather(granted, behind, return_exceptions=True)
    assert granted.cancelled()
    assert order == ["behind"]
    assert in_flight(adm) == 0
    assert depth(adm) == {"priority": 0, "default": 0, "flex": 0}


async def test_task_cancelled_right_after_grant_with_nobody_behind_frees_the_slot() -> None:
    adm = Admission(max_concurrency=1, max_wait_ms=LONG_WAITS, clock=ManualClock())
    holder = await hold(adm)
    granted = asyncio.create_task(recorder(adm, [])("granted", "default"))
    await settle()
    await give_back(holder)
    granted.cancel()
    await asyncio.gather(granted, return_exceptions=True)
    assert in_flight(adm) == 0
    async with adm.acquire():
        assert in_flight(adm) == 1


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"rate": -1.0}, "rate"),
        ({"rate": 0.0}, "rate"),
        ({"rate": 10.0, "burst": 0.0}, "burst"),
        ({"burst": 5.0}, "burst"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": -3}, "max_concurrency"),
        ({"queue_depth": -1}, "queue_depth"),
        ({"max_wait_ms": -1.0}, "max_wait_ms"),
        ({"max_wait_ms": {"urgent": 5.0}}, "max_wait_ms"),
        ({"max_wait_ms": {"priority": math.nan}}, "max_wait_ms.priority"),
        ({"priority_reserve": 1.0}, "priority_reserve"),
        ({"default_min_share": 1.5}, "default_min_share"),
    ],
)
def test_bad_admission_settings_raise_value_error_naming_the_argument(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=f"^{argument}"):
        Admission(**kwargs)  # type: ignore[arg-type]


async def test_unknown_tier_raises_value_error_naming_tier() -> None:
    adm = Admission()
    with pytest.raises(ValueError, match="^tier:"):
        adm.acquire("gold")
    with pytest.raises(ValueError, match="^tier:"):
        adm.acquire(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("cost", [-1, -(2**40)])
async def test_a_negative_cost_raises_value_error_naming_cost_and_holds_nothing(cost: int) -> None:
    adm = Admission(rate=10.0)
    with pytest.raises(ValueError, match="^cost:"):
        async with adm.acquire(cost=cost):
            pytest.fail("admitted with a bad cost")
    stats = adm.stats()
    assert stats["in_flight"] == 0
    assert stats["admitted"] == {"priority": 0, "default": 0, "flex": 0}


async def test_cost_zero_takes_nothing_from_the_bucket_and_is_never_refused_by_it() -> None:
    # What a request refused by a limit in shadow mode before the pool costs it.
    clock = ManualClock()
    adm = Admission(rate=1.0, burst=1, priority_reserve=0.0, clock=clock)
    for _ in range(3):
        async with adm.acquire(cost=0):
            pass
    async with adm.acquire():
        pass
    with pytest.raises(Shed, match="^rate_limit_exceeded"):
        async with adm.acquire():
            pass
    async with adm.acquire(cost=0):
        pass
    assert adm.stats()["shed"]["rate_limit_exceeded"] == 1


def test_stats_shape() -> None:
    stats = Admission(max_concurrency=8).stats()
    assert stats == {
        "depth": {"priority": 0, "default": 0, "flex": 0},
        "in_flight": 0,
        "withheld": 0,
        "owed": 0,
        "flex_kept": 3,  # the flex reserve (2) and the flex headroom (one slot)
        "limit": 8,
        "limit_mode": "fixed",
        "limit_signal": "none",
        "limit_min": 8,
        "limit_max": 8,
        "limit_changes": 0,
        "limit_floor_ms": 0.0,
        "limit_recent_ms": 0.0,
        "admitted": {"priority": 0, "default": 0, "flex": 0},
        "shed": {"server_overloaded": 0, "queue_timeout": 0, "rate_limit_exceeded": 0},
        "cancelled": 0,
        "fairness": "tokens",
        "fair_flows_active": {"priority": 0, "default": 0, "flex": 0},
        "deadline_refused": 0,
        "deadline_margin": {"priority": 341 / 1024, "default": 341 / 1024, "flex": 341 / 1024},
        "shadow_rate_limited": 0,
        "enforce": True,
    }


@pytest.mark.parametrize("ms", [2007, 2011, 4035, 119_999])
def test_regression_retry_after_ms_of_an_exact_millisecond_wait_is_not_rounded_up_past_it(ms: int) -> None:
    # Bug: ceil(seconds * 1000) on the float made a 2007 ms wait report 2008.
    shed = Shed("rate_limit_exceeded", ms * 1_000_000 / 1e9, "default")
    assert shed.retry_after_ms == ms
    nudged = Shed("rate_limit_exceeded", (ms * 1_000_000 + 1) / 1e9, "default")
    assert nudged.retry_after_ms == ms + 1


async def test_regression_default_requests_are_admitted_with_rate_1_and_default_burst_and_reserve() -> None:
    # Bug: `rate=1` (burst defaults to 1, priority_reserve to 0.2) shed every
    # default request forever with a ~292-year retry-after.
    clock = ManualClock()
    adm = Admission(rate=1.0, clock=clock)
    async with adm.acquire("default"):
        pass
    with pytest.raises(Shed) as shed:
        async with adm.acquire("default"):
            pass
    assert shed.value.code == "rate_limit_exceeded"
    assert shed.value.retry_after_s == 1.0
    clock.advance(1.0)
    async with adm.acquire("default"):
        pass


async def test_regression_cost_that_can_never_fit_the_bucket_sheds_with_infinite_retry_after() -> None:
    # Bug: the core's "never" wait reached Shed as 9223372036.85 s, so the
    # retry-after-ms header said 9223372036855 instead of the 120 s cap.
    adm = Admission(rate=10.0, burst=5, clock=ManualClock())
    with pytest.raises(Shed) as shed:
        async with adm.acquire("priority", cost=6):
            pass
    assert shed.value.code == "rate_limit_exceeded"
    assert shed.value.retry_after_s == math.inf
    assert shed.value.retry_after_ms == 120_000
    assert shed.value.retry_after_header == 120


async def test_withheld_slots_keep_requests_out_until_restored_to_the_waiter() -> None:
    adm = Admission(max_concurrency=2)
    busy = adm.acquire("default")
    await busy.__aenter__()
    # One slot free, one busy: withholding both takes the free one now and owes the other.
    assert adm.withhold(2) == 1
    assert (adm.stats()["withheld"], adm.stats()["owed"]) == (1, 1)
    waiter = asyncio.ensure_future(adm.acquire("priority").__aenter__())
    await asyncio.sleep(0)
    assert not waiter.done()
    await busy.__aexit__(None, None, None)  # pays the debt: the waiter still waits
    await asyncio.sleep(0)
    assert not waiter.done()
    assert (adm.stats()["in_flight"], adm.stats()["withheld"], adm.stats()["owed"]) == (0, 2, 0)
    assert adm.restore(1) == 1
    slot = await asyncio.wait_for(waiter, 1)
    assert adm.stats()["in_flight"] == 1
    await slot.__aexit__(None, None, None)
    assert adm.restore(5) == 1
    assert (adm.stats()["in_flight"], adm.stats()["withheld"]) == (0, 0)
