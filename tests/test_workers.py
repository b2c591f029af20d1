"""Shared admission across worker processes: the in-process mechanics
(mailbox + eventfd delivery between two workers' handles), then real worker
processes under `tierq.workers.Supervisor` in front of the simulated backend:
capacity never exceeded, strict priority across workers, kill -9 leaks no
slot, nothing lost or answered twice, SIGTERM stops everything with 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tierq import Shed
from tierq.sim import SimServer, start_sim
from tierq import PoolSettings
from tierq.workers import ReloadBarrier, SharedPools
from ports import free_port

APP = Path(__file__).with_name("_workers_app.py")


@pytest.fixture
def shared() -> Iterator[SharedPools]:
    sp = SharedPools({"m": PoolSettings(max_concurrency=1, queue_depth=4, max_wait_ms=2000)}, 2)
    yield sp
    sp.close()


async def test_grant_decided_by_one_worker_wakes_the_owner_through_its_eventfd(shared: SharedPools) -> None:
    a, b = shared.attach(0), shared.attach(1)
    a.start()
    b.start()
    try:
        order: list[str] = []
        held = a["m"].acquire("default")
        await held.__aenter__()

        async def wait_in_b() -> None:
            async with b["m"].acquire("default"):
                order.append("b granted")

        task = asyncio.create_task(wait_in_b())
        await asyncio.sleep(0.01)
        assert shared.stats()["m"]["depth"] == {"priority": 0, "default": 1, "flex": 0}
        assert shared.held("m") == [1, 0]
        await held.__aexit__(None, None, None)  # a's release grants b's waiter
        assert shared.held("m") == [0, 1]
        await asyncio.wait_for(task, 1)
        assert order == ["b granted"]
        assert shared.stats()["m"]["in_flight"] == 0
    finally:
        a.stop()
        b.stop()


async def test_priority_headroom_holds_across_workers_of_a_shared_pool() -> None:
    sp = SharedPools({"m": PoolSettings(max_concurrency=2, queue_depth=4, max_wait_ms=2000,
                                        priority_headroom=1)}, 2)
    a, b = sp.attach(0), sp.attach(1)
    a.start()
    b.start()
    try:
        held = a["m"].acquire("default")
        await held.__aenter__()
        # The second slot is the headroom: a default in the other worker waits for it...
        task = asyncio.create_task(b["m"].acquire("default").__aenter__())
        await asyncio.sleep(0.01)
        assert sp.stats()["m"]["depth"] == {"priority": 0, "default": 1, "flex": 0}
        assert sp.stats()["m"]["in_flight"] == 1
        # ...and a priority request in that worker takes it at once.
        prio = b["m"].acquire("priority")
        await asyncio.wait_for(prio.__aenter__(), 0.5)
        assert prio.queue_ns == 0
        assert sp.held("m") == [1, 1]
        await prio.__aexit__(None, None, None)
        assert not task.done()
        await held.__aexit__(None, None, None)  # now below the default limit: b's waiter gets it
        slot = await asyncio.wait_for(task, 1)
        assert sp.held("m") == [0, 1]
        await slot.__aexit__(None, None, None)
        assert sp.stats()["m"]["in_flight"] == 0
    finally:
        a.stop()
        b.stop()
        sp.close()


async def test_expiry_decided_elsewhere_sheds_the_owners_waiter(shared: SharedPools) -> None:
    sp = SharedPools({"m": PoolSettings(max_concurrency=1, queue_depth=4, max_wait_ms=30)}, 2)
    a, b = sp.attach(0), sp.attach(1)
    a.start()
    b.start()
    try:
        async with a["m"].acquire("default"):
            with pytest.raises(Shed) as e:
                async with b["m"].acquire("default"):
                    pass
        assert e.value.code == "queue_timeout"
    finally:
        a.stop()
        b.stop()
        sp.close()


async def test_reclaim_of_a_dead_worker_hands_its_slot_to_a_survivor(shared: SharedPools) -> None:
    a, b = shared.attach(0), shared.attach(1)
    b.start()
    try:
        await a["m"].acquire("default").__aenter__()  # worker 0 "dies" holding it
        waiting = asyncio.create_task(b["m"].acquire("priority").__aenter__())
        await asyncio.sleep(0.01)
        assert shared.reclaim(0) == (1, 0)
        slot = await asyncio.wait_for(waiting, 1)
        assert shared.held("m") == [0, 1]
        await slot.__aexit__(None, None, None)
        assert shared.stats()["m"]["in_flight"] == 0
    finally:
        b.stop()


# ---- real worker processes ------------------------------------------------


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, debug: list[int], workers: int) -> None:
        self.proc, self.port, self.debug, self.workers = proc, port, debug, workers

    def url(self, worker: int | None = None) -> str:
        return f"http://127.0.0.1:{self.port if worker is None else self.debug[worker]}"


async def _start(sim: SimServer, workers: int, max_conc: int) -> Gateway:
    port, debug = free_port(), [free_port() for _ in range(workers)]
    proc = subprocess.Popen(
        [sys.executable, str(APP), str(port), ",".join(map(str, debug)), f"http://127.0.0.1:{sim.port}", str(workers), str(max_conc)],
        stdout=subprocess.DEVNULL,
    )
    gw = Gateway(proc, port, debug, workers)
    async with aiohttp.ClientSession() as s:
        for w in range(workers):
            for _ in range(200):
                try:
                    async with s.get(gw.url(w) + "/admission") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"worker {w} never came up")
    return gw


def _stop(gw: Gateway) -> int:
    gw.proc.send_signal(signal.SIGTERM)
    return gw.proc.wait(15)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = await start_sim(slots=64, ttft_ms=20, tokens_per_s=0)
    yield server
    await server.close()


async def _chat(s: aiohttp.ClientSession, url: str, i: int, tier: str = "default",
                fault: str | None = None) -> tuple[int, str, str]:
    body = {"model": "m", "messages": [{"role": "user", "content": f"req {i}"}], "max_tokens": 2,
            "service_tier": tier}
    if fault is not None:
        body["sim_fault"] = fault
    async with s.post(url + "/v1/chat/completions", json=body) as r:
        text = await r.text()
        return r.status, r.headers.get("x-worker", "-"), text


async def _sim_stats(s: aiohttp.ClientSession, sim: SimServer) -> dict[str, int]:
    async with s.get(f"http://127.0.0.1:{sim.port}/sim/stats") as r:
        return dict(await r.json())


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [2, 4])
async def test_workers_never_exceed_max_concurrency_and_answer_each_request_once(sim: SimServer, workers: int) -> None:
    gw = await _start(sim, workers, max_conc=3)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
            results = await asyncio.gather(*(_chat(s, gw.url(i % workers), i) for i in range(120)))
            stats = await _sim_stats(s, sim)
        assert all(status == 200 for status, _, _ in results), [r for r in results if r[0] != 200][:3]
        assert {w for _, w, _ in results} == {str(i) for i in range(workers)}
        assert stats["requests"] == 120, "every request reached the backend exactly once"
        assert stats["max_in_flight_seen"] == 3
        assert stats["in_flight"] == 0
    finally:
        assert _stop(gw) == 0


@pytest.mark.timeout(60)
async def test_priority_in_one_worker_goes_ahead_of_defaults_queued_in_another(sim: SimServer) -> None:
    gw = await _start(sim, 2, max_conc=1)
    try:
        done: list[str] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

            async def one(name: str, worker: int, tier: str, fault: str | None = None) -> None:
                status, _, _ = await _chat(s, gw.url(worker), 0, tier, fault)
                assert status == 200
                done.append(name)

            async def admission(worker: int) -> dict[str, Any]:
                async with s.get(gw.url(worker) + "/admission") as r:
                    return dict(await r.json())

            async def until(worker: int, ok: Callable[[dict[str, Any]], bool], what: str) -> None:
                for _ in range(2000):  # state polled: a loaded host only makes it slower
                    if ok(await admission(worker)):
                        return
                    await asyncio.sleep(0.005)
                raise AssertionError(what)

            # d0 holds the one slot (its upstream is 2 s slow to answer) while
            # the others queue, so the order below is decided by admission alone.
            tasks = [asyncio.create_task(one("d0", 1, "default", "slow-first-byte"))]
            await until(1, lambda a: a["in_flight"] == 1, "d0 never took the slot")
            tasks += [asyncio.create_task(one(f"d{i}", 1, "default")) for i in range(1, 4)]
            await until(1, lambda a: a["depth"]["default"] == 3, "worker 1's defaults never all queued")
            tasks.append(asyncio.create_task(one("p", 0, "priority")))
            await until(0, lambda a: a["depth"]["priority"] == 1, "p never queued")
            assert done == [], "d0 answered before p queued: the order below would prove nothing"
            await asyncio.gather(*tasks)
        assert done.index("p") == 1, done
    finally:
        assert _stop(gw) == 0


@pytest.mark.timeout(90)
async def test_kill_9_of_a_worker_under_load_leaks_no_slot(sim: SimServer) -> None:
    gw = await _start(sim, 2, max_conc=2)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
            async with s.get(gw.url(0) + "/admission") as r:
                victim = (await r.json())["pid"]
            load = [asyncio.create_task(_chat(s, gw.url(i % 2), i)) for i in range(40)]
            await asyncio.sleep(0.15)
            os.kill(victim, signal.SIGKILL)
            results = await asyncio.gather(*load, return_exceptions=True)
            # Requests on the dead worker fail at the connection; the rest are served.
            served = [r for r in results if isinstance(r, tuple) and r[0] == 200]
            assert len(served) >= 20
            # The supervisor restarts worker 0; afterwards the pool serves at full width.
            for _ in range(200):
                try:
                    async with s.get(gw.url(0) + "/admission") as r:
                        if (await r.json())["pid"] != victim:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            async with s.get(gw.url(1) + "/admission") as r:
                st = await r.json()
            assert st["in_flight"] == 0 and st["depth"] == {"priority": 0, "default": 0, "flex": 0}, st
            again = await asyncio.gather(*(_chat(s, gw.url(i % 2), i) for i in range(20)))
            assert all(status == 200 for status, _, _ in again)
            stats = await _sim_stats(s, sim)
            assert stats["max_in_flight_seen"] <= 2
            for _ in range(100):
                if (await _sim_stats(s, sim))["in_flight"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await _sim_stats(s, sim))["in_flight"] == 0
    finally:
        assert _stop(gw) == 0


def _commits(barrier: ReloadBarrier, index: int) -> int:
    try:
        return os.eventfd_read(barrier.commit_fds[index])
    except BlockingIOError:
        return 0


def test_a_reload_round_commits_only_when_every_live_worker_has_swapped() -> None:
    barrier = ReloadBarrier(2)
    try:
        gen = barrier.open({0, 1})
        assert (barrier.signalled, barrier.committed) == (gen, 0)
        barrier.report(0, gen, True)
        barrier.read_reports()
        assert barrier.committed == 0 and _commits(barrier, 0) == _commits(barrier, 1) == 0, \
            "worker 1 has not swapped: nothing retuned"
        barrier.report(0, gen, True)  # worker 0 again (a second SIGHUP): still waiting for 1
        barrier.read_reports()
        assert barrier.committed == 0
        barrier.report(1, gen, True)
        barrier.read_reports()
        assert barrier.committed == gen
        assert _commits(barrier, 0) == _commits(barrier, 1) == 1, "each worker told once"
    finally:
        barrier.close()


def test_a_worker_that_fails_to_load_leaves_every_pool_unretuned() -> None:
    barrier = ReloadBarrier(2)
    try:
        gen = barrier.open({0, 1})
        barrier.report(1, gen, False)
        barrier.report(0, gen, True)
        barrier.read_reports()
        assert barrier.committed == 0 and _commits(barrier, 0) == 0
        # The round is over: a late report (a replacement applying its bytes) commits nothing.
        barrier.report(1, gen, True)
        barrier.read_reports()
        assert barrier.committed == 0
        # The next reload is a round of its own.
        gen2 = barrier.open({0, 1})
        barrier.report(0, gen, True)  # the old round's: not counted
        barrier.report(1, gen2, True)
        barrier.read_reports()
        assert barrier.committed == 0
        barrier.report(0, gen2, True)
        barrier.read_reports()
        assert barrier.committed == gen2
    finally:
        barrier.close()
