"""tierq.health: outlier detection, ejection back-off, probes and slow start on a
manual clock (the request path and the probe loop are tested through real
sockets in tests/test_gateway_replicas_health.py)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest

from tierq.health import Health, HealthSettings, Outcome, ReplicaState
from tierq.probes import HealthLoop, target_of

from ports import free_port


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def fail(h: Health, i: int, n: int, outcome: Outcome = Outcome.FAILED) -> list[bool]:
    return [h.record(i, outcome) for _ in range(n)]


def test_five_consecutive_failures_eject_a_replica_and_four_do_not() -> None:
    clock = Clock()
    h = Health(4, clock=clock)
    assert fail(h, 1, 4) == [False] * 4
    assert h.healthy(1)
    assert h.record(1, Outcome.FAILED)
    assert h.state(1) is ReplicaState.EJECTED
    assert h.mask() == 0b1101


def test_a_success_between_failures_restarts_the_run() -> None:
    h = Health(3, clock=Clock())
    fail(h, 0, 4)
    h.record(0, Outcome.OK)
    assert fail(h, 0, 4) == [False] * 4
    assert h.healthy(0)


def test_a_5xx_ejection_lasts_its_back_off_then_the_replica_slow_starts() -> None:
    clock = Clock()
    h = Health(2, clock=clock)
    fail(h, 0, 5)
    assert h.ejected_for_s(0) == pytest.approx(30.0)
    clock.advance(29.9)
    assert not h.healthy(0)
    clock.advance(0.1)
    assert h.state(0) is ReplicaState.SLOW_START
    assert h.limit(0, 16) == 1
    clock.advance(5.0)
    assert h.limit(0, 16) == 8  # 1 + floor(15 x 0.5)
    assert h.share(0) == pytest.approx(0.5)
    clock.advance(5.0)
    assert h.state(0) is ReplicaState.HEALTHY
    assert h.limit(0, 16) == 16


def test_back_off_doubles_per_ejection_up_to_its_cap() -> None:
    clock = Clock()
    h = Health(2, HealthSettings(base_ejection_s=30.0, max_ejection_s=100.0, slow_start_s=0.0),
               clock=clock)
    seen = []
    for _ in range(4):
        fail(h, 0, 5)
        left = h.ejected_for_s(0)
        assert left is not None
        seen.append(left)
        clock.advance(left)
        assert h.healthy(0)
    assert seen == [30.0, 60.0, 100.0, 100.0]


def test_the_multiplier_is_forgiven_one_step_per_base_ejection_time_in_service() -> None:
    clock = Clock()
    h = Health(2, HealthSettings(slow_start_s=0.0), clock=clock)
    fail(h, 0, 5)
    clock.advance(30.0)
    fail(h, 0, 5)
    assert h.ejected_for_s(0) == 60.0  # second ejection: doubled
    clock.advance(60.0)
    clock.advance(65.0)  # two base times in service: both steps forgiven
    fail(h, 0, 5)
    assert h.ejected_for_s(0) == 30.0
    assert h.ejections(0) == 3


def test_at_most_half_the_replicas_are_ejected_at_once() -> None:
    h = Health(4, clock=Clock())
    assert h.max_ejected == 2
    assert fail(h, 0, 5)[-1]
    assert fail(h, 1, 5)[-1]
    assert fail(h, 2, 5) == [False] * 5  # two out already: the third stays in
    assert h.healthy(2)
    assert h.mask() == 0b1100


def test_the_only_replica_is_never_ejected_and_one_of_two_may_be() -> None:
    h1 = Health(1, clock=Clock())
    assert fail(h1, 0, 20) == [False] * 20
    assert h1.healthy(0)
    h2 = Health(2, HealthSettings(max_ejection_percent=10), clock=Clock())
    assert h2.max_ejected == 1  # Envoy's "at least one host"
    assert fail(h2, 0, 5)[-1]
    assert not any(fail(h2, 1, 5))


def test_max_ejection_percent_zero_turns_ejection_off() -> None:
    h = Health(4, HealthSettings(max_ejection_percent=0), clock=Clock())
    assert not any(fail(h, 0, 10))


def test_a_replica_that_refused_connections_waits_for_a_probe_not_its_back_off() -> None:
    clock = Clock()
    h = Health(3, clock=clock)
    fail(h, 2, 5, Outcome.UNREACHABLE)
    assert h.state(2) is ReplicaState.EJECTED
    left = h.ejected_for_s(2)
    assert left is not None and math.isinf(left)
    assert h.probe_due() == []  # first probe one probe interval after the ejection
    clock.advance(1.0)
    assert h.probe_due() == [2]
    assert h.probe_due() == []  # not again until the next interval
    h.probed(2, False)
    clock.advance(3600.0)  # far past any back-off: still out, it does not listen
    assert not h.healthy(2)
    assert h.probe_due() == [2]
    h.probed(2, True)
    assert h.state(2) is ReplicaState.SLOW_START
    assert h.limit(2, 8) == 1


def test_a_probe_does_not_end_a_5xx_ejection() -> None:
    clock = Clock()
    h = Health(2, clock=clock)
    fail(h, 0, 5, Outcome.FAILED)
    clock.advance(5.0)
    assert h.probe_due() == []
    h.probed(0, True)  # it listens; it answered 5xx all along
    assert not h.healthy(0)


def test_failures_on_an_ejected_replica_do_not_extend_its_ejection() -> None:
    clock = Clock()
    h = Health(2, clock=clock)
    fail(h, 0, 5)
    assert not any(fail(h, 0, 10))  # requests that were in flight when it was ejected
    assert h.ejected_for_s(0) == 30.0
    assert h.ejections(0) == 1


def test_the_ejecting_failure_decides_how_the_replica_comes_back() -> None:
    clock = Clock()
    h = Health(2, clock=clock)
    fail(h, 0, 4, Outcome.UNREACHABLE)
    h.record(0, Outcome.FAILED)  # it listens again, and answers 5xx
    assert h.ejected_for_s(0) == 30.0


def test_snapshot_says_what_status_shows() -> None:
    clock = Clock()
    h = Health(2, clock=clock)
    assert h.snapshot(0) == {"health": "healthy", "consecutive_failures": 0, "ejections": 0,
                             "ejected_for_s": None, "waiting_for_probe": False,
                             "slow_start_share": None}
    fail(h, 0, 5, Outcome.UNREACHABLE)
    snap = h.snapshot(0)
    assert snap["health"] == "ejected" and snap["waiting_for_probe"] and snap["ejected_for_s"] is None
    clock.advance(1.0)
    h.probe_due()
    h.probed(0, True)
    clock.advance(2.5)
    assert h.snapshot(0)["slow_start_share"] == 0.25


@pytest.mark.parametrize("bad", [
    {"consecutive_failures": 0}, {"base_ejection_s": 0.0}, {"max_ejection_s": 10.0},
    {"max_ejection_percent": 101}, {"slow_start_s": -1.0}, {"probe_interval_s": math.nan},
])
def test_settings_out_of_range_are_refused_naming_the_key(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        HealthSettings(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------ the probe loop


async def _until(cond: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.01)


async def _listen(port: int) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
    return await asyncio.start_server(answer, "127.0.0.1", port, reuse_address=True)


def test_a_probe_target_is_the_endpoints_host_and_port() -> None:
    assert target_of("http://10.0.0.1:8000/v1") == ("10.0.0.1", 8000)
    assert target_of("https://engine.example/v1") == ("engine.example", 443)
    assert target_of("http://[::1]:9000/v1") == ("::1", 9000)


async def test_a_replica_that_refused_connections_is_back_once_it_listens_again() -> None:
    clock = Clock()
    port = free_port()
    h = Health(2, HealthSettings(probe_interval_s=0.5), clock=clock)
    told: list[tuple[int, ReplicaState, float]] = []
    loop = HealthLoop("up", h, ["http://127.0.0.1:1/v1", f"http://127.0.0.1:{port}/v1"],
                      lambda i, st, share: told.append((i, st, share)))
    try:
        fail(h, 1, 5, Outcome.UNREACHABLE)
        loop.check()
        assert told == [(1, ReplicaState.EJECTED, 0.0)]
        clock.advance(0.5)
        loop.check()  # nothing listens on the port: the probe fails
        await _until(lambda: not loop._probes, "the probe ended")
        assert not h.healthy(1)
        server = await _listen(port)
        try:
            clock.advance(0.5)
            loop.check()
            await _until(lambda: h.healthy(1), "the probe connected")
        finally:
            server.close()
            await server.wait_closed()
        loop.check()
        assert told[-1] == (1, ReplicaState.SLOW_START, 0.0)
        clock.advance(5.0)
        loop.check()
        assert told[-1] == (1, ReplicaState.SLOW_START, 0.5)
        clock.advance(5.0)
        loop.check()
        assert told[-1] == (1, ReplicaState.HEALTHY, 1.0)
        assert all(i == 1 for i, _, _ in told)
    finally:
        await loop.stop()


async def test_the_loop_runs_the_checks_itself_until_stopped() -> None:
    h = Health(2, HealthSettings(base_ejection_s=0.2, slow_start_s=0.0))
    told: list[ReplicaState] = []
    loop = HealthLoop("up", h, ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"],
                      lambda i, st, share: told.append(st), tick_s=0.01)
    loop.start()
    try:
        fail(h, 0, 5)
        await _until(lambda: told[-1:] == [ReplicaState.HEALTHY], "back after its back-off")
        assert told == [ReplicaState.EJECTED, ReplicaState.HEALTHY]
    finally:
        await loop.stop()
