"""The adaptive concurrency limit through `tierq.Admission`: the three signals
fed from Python move the limit the core keeps, waiters get the slots a raised
limit opens, a lowered one preempts nothing, and the settings object behind it
(`PoolSettings`) takes the same three forms as the config. A `ManualClock`
decides every window, so nothing sleeps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tierq import Admission, ManualClock, PoolSettings, SettingsError, Shed, Slot
from tierq.config import ConfigError, load_config
from tierq.workers import SharedPools

LONG_WAITS = {"default": 600_000.0, "priority": 900_000.0}


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def hold(adm: Admission, tier: str = "default") -> Slot:
    return await adm.acquire(tier).__aenter__()


def stat(adm: Admission, key: str) -> object:
    return adm.stats()[key]


def test_the_default_is_adaptive_and_a_number_is_fixed() -> None:
    adm = Admission()
    assert (adm.limit, stat(adm, "limit_mode"), stat(adm, "limit_min"), stat(adm, "limit_max")) == (4, "adaptive", 2, 1024)
    assert Admission(max_concurrency="auto").stats()["limit_mode"] == "adaptive"
    fixed = Admission(max_concurrency=8)
    assert (fixed.limit, stat(fixed, "limit_mode"), stat(fixed, "limit")) == (8, "fixed", 8)
    assert "max_concurrency" not in fixed.stats(), "one name for the limit in force: limit"
    s = PoolSettings(min_concurrency=4, max_concurrency_limit=64, initial_concurrency=8, max_wait_ms=500)
    assert (s.limit_mode, s.limit_min, s.limit_max, s.limit_initial) == ("adaptive", 4, 64, 8)
    assert s.max_wait_ms == {"default": 500.0, "priority": 500.0, "flex": 500.0}
    assert Admission(s).limit == 8


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_concurrency": "lots"}, "max_concurrency"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 4, "min_concurrency": 2}, "min_concurrency"),
        ({"min_concurrency": 0}, "min_concurrency"),
        ({"min_concurrency": 8, "max_concurrency_limit": 4}, "max_concurrency_limit"),
        ({"initial_concurrency": 4096}, "initial_concurrency"),
        ({"priority_headroom": 2}, "priority_headroom"),
        ({"queue_depth": (1 << 24) + 1}, "queue_depth"),
        ({"max_wait_ms": {"urgent": 5}}, "max_wait_ms"),
        ({"max_wait_ms": {"default": "soon"}}, "max_wait_ms.default"),
        ({"engine_interval_ms": 0}, "engine_interval_ms"),
    ],
)
def test_bad_settings_raise_settings_error_naming_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(SettingsError) as info:
        PoolSettings(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key
    assert str(info.value) == f"{key}: {info.value.reason}"
    assert isinstance(info.value, ValueError)


async def test_a_rising_limit_grants_waiters_and_a_falling_one_preempts_nothing() -> None:
    clock = ManualClock()
    adm = Admission(initial_concurrency=4, max_wait_ms=LONG_WAITS, clock=clock)
    held = [await hold(adm) for _ in range(4)]
    waiting = [asyncio.create_task(hold(adm)) for _ in range(6)]
    await settle()
    assert stat(adm, "depth") == {"priority": 0, "default": 6, "flex": 0}
    # The engine queues 2 of our 4: cut to 2. Nobody holding a slot loses it.
    assert adm.observe_engine(running=2, waiting=2) == 0
    assert (adm.limit, stat(adm, "in_flight"), stat(adm, "limit_signal")) == (2, 4, "engine")
    # Releases free slots without handing them on while over the limit...
    for slot in held[:2]:
        await slot.__aexit__(None, None, None)
    await settle()
    assert stat(adm, "in_flight") == 2
    assert not any(t.done() for t in waiting)
    # ...and hand them on once at it.
    await held[2].__aexit__(None, None, None)
    await settle()
    assert stat(adm, "in_flight") == 2
    assert sum(t.done() for t in waiting) == 1
    # Held for three samples after the cut, then a saturated pool with an
    # empty engine queue grows by one, and the new slot goes to a waiter.
    granted = []
    for _ in range(4):
        clock.advance(0.1)
        granted.append(adm.observe_engine(running=2, waiting=0, kv_usage=0.5))
    await settle()
    assert granted == [0, 0, 0, 1]
    assert adm.limit == 3
    assert sum(t.done() for t in waiting) == 2
    # The limit is raised well past the load: every waiter gets in.
    for _ in range(40):
        clock.advance(0.1)
        adm.observe_engine(running=adm.limit, waiting=0)
    await settle()
    assert all(t.done() for t in waiting)
    assert stat(adm, "depth") == {"priority": 0, "default": 0, "flex": 0}
    for t in waiting:
        await t.result().__aexit__(None, None, None)
    await held[3].__aexit__(None, None, None)
    assert stat(adm, "in_flight") == 0


async def test_latency_above_its_floor_lowers_the_limit_and_stats_show_both() -> None:
    clock = ManualClock()
    adm = Admission(initial_concurrency=16, max_wait_ms=LONG_WAITS, clock=clock)
    held = [await hold(adm) for _ in range(16)]
    for _ in range(20):
        adm.observe_latency(0.1)
        clock.advance(0.02)
    assert stat(adm, "limit_floor_ms") == 100.0
    start = adm.limit
    for _ in range(40):
        adm.observe_latency(0.5)
        clock.advance(0.02)
    assert adm.limit < start
    assert stat(adm, "limit_recent_ms") == 500.0
    assert stat(adm, "limit_signal") == "latency"
    with pytest.raises(ValueError, match="^seconds"):
        adm.observe_latency(-1.0)
    for slot in held:
        await slot.__aexit__(None, None, None)


def test_a_burst_of_overloads_backs_off_once() -> None:
    clock = ManualClock()
    adm = Admission(initial_concurrency=20, clock=clock)
    for _ in range(30):
        adm.observe_overload()
    assert (adm.limit, stat(adm, "limit_signal"), stat(adm, "limit_changes")) == (18, "backoff", 1)
    clock.advance(0.1)
    adm.observe_overload()
    assert adm.limit == 16


def test_a_fixed_limit_ignores_every_signal() -> None:
    adm = Admission(max_concurrency=3)
    adm.observe_engine(1, 10)
    adm.observe_latency(100.0)
    adm.observe_overload()
    assert (adm.limit, stat(adm, "limit_changes")) == (3, 0)


async def test_a_shared_pool_has_one_limit_for_every_worker() -> None:
    sp = SharedPools({"m": PoolSettings(initial_concurrency=8, queue_depth=8)}, 2)
    try:
        a, b = sp.attach(0), sp.attach(1)
        a["m"].observe_overload()
        assert a["m"].limit == b["m"].limit == 7
        assert sp.stats()["m"]["limit"] == 7
        # Let b hold 7 and queue 1; a raises the limit, b's waiter gets the slot
        # through its mailbox.
        b.start()
        held = [await hold(b["m"]) for _ in range(7)]
        task = asyncio.create_task(hold(b["m"]))
        await settle()
        assert not task.done()
        assert a["m"].observe_engine(7, 0) == 0  # b's waiter, not a's
        for _ in range(20):
            await settle()
            if task.done():
                break
            await asyncio.sleep(0.01)
        # The back-off ended slow start: one slot more.
        assert task.done() and b["m"].limit == 8
        for slot in [*held, task.result()]:
            await slot.__aexit__(None, None, None)
        b.stop()
    finally:
        sp.close()


def write(tmp_path: Path, admission: str) -> Path:
    p = tmp_path / "tierq.toml"
    p.write_text('[[models]]\nid = "zai-org/GLM-5.2"\n[models.admission]\n' + admission)
    return p


@pytest.mark.parametrize(
    ("admission", "mode", "bounds"),
    [
        ("", "adaptive", (2, 1024)),
        ('max_concurrency = "auto"\nmin_concurrency = 4\nmax_concurrency_limit = 32\n', "adaptive", (4, 32)),
        ("max_concurrency = 12\n", "fixed", (12, 12)),
    ],
)
def test_config_takes_the_three_forms_of_max_concurrency(tmp_path: Path, admission: str, mode: str,
                                                          bounds: tuple[int, int]) -> None:
    s = load_config(write(tmp_path, admission)).models[0].admission.settings
    assert (s.limit_mode, (s.limit_min, s.limit_max)) == (mode, bounds)


@pytest.mark.parametrize(
    ("admission", "expected"),
    [
        ('max_concurrency = "many"\n', 'max_concurrency: expected an integer or "auto", got "many"'),
        ("max_concurrency = 8\nmin_concurrency = 2\n",
         'min_concurrency: only for an adaptive limit (max_concurrency absent or "auto")'),
        ('min_concurrency = "2"\n', 'min_concurrency: expected an integer, got "2"'),
        ("min_concurrency = 0\n", "min_concurrency: must be between 1 and 1000000, got 0"),
        ("min_concurrency = 8\nmax_concurrency_limit = 4\n",
         "max_concurrency_limit: must be at least min_concurrency (8), got 4"),
        ("priority_headroom = 2\n",
         "priority_headroom: must be at least 0 and below min_concurrency (2): defaults need a slot, got 2"),
        # One range for queue_depth, the core's.
        ("queue_depth = 20000000\n", "queue_depth: must be between 0 and 2097151, got 20000000"),
    ],
)
def test_config_errors_of_the_limit_keys_name_the_key(tmp_path: Path, admission: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, admission))
    assert str(info.value) == f"{tmp_path / 'tierq.toml'}: models[0].admission.{expected}"


async def test_a_shed_waiter_is_not_granted_by_a_later_rise() -> None:
    clock = ManualClock()
    adm = Admission(initial_concurrency=2, max_wait_ms={"default": 10.0, "priority": 10.0}, clock=clock)
    held = [await hold(adm) for _ in range(2)]
    task = asyncio.create_task(hold(adm))
    await settle()
    clock.advance(0.02)
    assert adm.expire_due() == 1
    with pytest.raises(Shed):
        await task
    # The next sample raises the limit (saturated, slow start: half again):
    # nobody is left to grant.
    assert adm.observe_engine(2, 0) == 0
    assert (adm.limit, stat(adm, "in_flight")) == (3, 2)
    for slot in held:
        await slot.__aexit__(None, None, None)
