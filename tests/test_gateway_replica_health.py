"""Replica health through real sockets: one `tierq sim` process per replica (so
one can be killed with SIGKILL and started again on its port), a gateway in
front of them with `endpoints = [...]`, the official openai client. A killed
replica is routed around with no priority request lost and used again once it
listens; a replica that answers 500 has each request tried on another before
any byte reached the client, billed once; /status.json and /metrics show each
replica's limit, in flight and health."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import PRIORITY_MODEL, serve_app

from ports import free_port
from tierq.app import create_app
from tierq.config import load_config
from tierq.ledger import Ledger
from tierq.stores import open_ledger

pytestmark = pytest.mark.timeout(120)

MESSAGES: Any = [{"role": "user", "content": "hello there"}]


class Sim:
    """One `tierq sim` process on a fixed port, killed and started again at will."""

    def __init__(self, tmp: Path, i: int, args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"sim{i}.log"
        self.args = args
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "tierq", "sim", "--host", "127.0.0.1", "--port",
                 str(self.port), *self.args], stdout=subprocess.DEVNULL, stderr=err)

    def kill(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    async def stats(self, s: aiohttp.ClientSession) -> dict[str, Any]:
        async with s.get(self.url + "/sim/stats") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def ready(self, s: aiohttp.ClientSession, limit_s: float = 30.0) -> None:
        await until(lambda: self._answers(s), f"sim on {self.port} answers", limit_s)

    async def _answers(self, s: aiohttp.ClientSession) -> bool:
        try:
            await self.stats(s)
        except aiohttp.ClientError:
            return False
        return True


async def until(cond: Callable[[], Any], what: str, limit_s: float = 30.0) -> None:
    end = time.monotonic() + limit_s
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > end:
            raise AssertionError(f"not within {limit_s} s: {what}")
        await asyncio.sleep(0.05)


class Replicated:
    """A gateway over several sim processes."""

    def __init__(self, root: str, sims: list[Sim], ledger: Ledger, session: aiohttp.ClientSession) -> None:
        self.root, self.sims, self.ledger, self.session = root, sims, ledger, session

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.root + "/v1", api_key="unused", max_retries=0)

    async def status(self) -> dict[str, Any]:
        async with self.session.get(self.root + "/status.json") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def replicas(self) -> list[dict[str, Any]]:
        pool = next(p for p in (await self.status())["pools"] if p["model"] == PRIORITY_MODEL)
        replicas: list[dict[str, Any]] = pool["replicas"]
        return replicas

    async def metrics(self) -> str:
        async with self.session.get(self.root + "/metrics") as r:
            return await r.text()


@pytest.fixture
async def replicated(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Sim] = []
    cleanups: list[Any] = []
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def start(n: int, sim_args: list[list[str]] | None = None, health: str = "",
                    limit: int = 4, routing: str = "round_robin") -> Replicated:
        sims = [Sim(tmp_path, i, ["--slots", str(limit), "--ttft-ms", "20", "--tokens-per-s", "0",
                                  *(sim_args[i] if sim_args else [])]) for i in range(n)]
        made.extend(sims)
        for s in sims:
            s.start()
        for s in sims:
            await s.ready(session)
        cfg = tmp_path / "tierq.toml"
        endpoints = ", ".join(f'"{s.url}/v1"' for s in sims)
        cfg.write_text(f"""
[ledger]
url = "sqlite:///{tmp_path / 'ledger.db'}"
[[upstreams]]
name = "sims"
kind = "vllm"
endpoints = [{endpoints}]
routing = "{routing}"
connect_timeout_s = 2.0
[upstreams.health]
probe_interval_s = 0.2
slow_start_s = 1.0
{health}
[[models]]
id = "{PRIORITY_MODEL}"
upstream = "sims"
priority = true
[models.admission]
max_concurrency = {limit}
""")
        config = load_config(cfg)
        ledger = open_ledger(config.ledger.url)
        await ledger.start()
        cleanups.append(ledger.close)
        app = create_app(config, ledger=ledger)
        root, runner = await serve_app(app)
        cleanups.append(runner.cleanup)
        return Replicated(root, sims, ledger, session)

    yield start
    for cleanup in reversed(cleanups):
        await cleanup()
    await session.close()
    for s in made:
        s.stop()


async def _ask(c: openai.AsyncOpenAI, stream: bool = False, tier: str = "priority") -> str:
    if stream:
        got = await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=4,
                                              stream=True, service_tier=tier)  # type: ignore[arg-type]
        tiers = [chunk.service_tier async for chunk in got]
        assert tiers and all(t == tier for t in tiers)
        return tier
    r = await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=4,
                                        service_tier=tier)  # type: ignore[arg-type]
    assert r.service_tier == tier
    return r.id


async def test_a_killed_replica_is_routed_around_with_no_priority_request_lost_and_used_again(
        replicated: Callable[..., Any]) -> None:
    g: Replicated = await replicated(3)
    asked = 0
    async with g.client() as c:
        await asyncio.gather(*(_ask(c) for _ in range(12)))
        asked += 12
        before = [int((await s.stats(g.session))["requests"]) for s in g.sims]
        assert all(n > 0 for n in before), before  # round robin: every replica used
        g.sims[1].kill()
        # Priority requests while it is down: every one served (tried on another
        # replica when it met the dead one), none lost.
        results = await asyncio.gather(*(_ask(c, stream=i % 2 == 1) for i in range(40)),
                                       return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        asked += 40
        replicas = await g.replicas()
        assert replicas[1]["health"] == "ejected", replicas
        assert [r["health"] for r in replicas[::2]] == ["healthy", "healthy"]
        assert 'tierq_replica_health{upstream="sims",replica="1",state="ejected"} 1' in await g.metrics()
        # Back on the same port: in rotation again within 10 s of listening.
        g.sims[1].start()
        await g.sims[1].ready(g.session)
        back = time.monotonic()
        await until(lambda: _health(g, 1, ("slow_start", "healthy")), "replica 1 back", 10.0)

        async def used() -> bool:
            nonlocal asked
            await asyncio.gather(*(_ask(c) for _ in range(6)))
            asked += 6
            return int((await g.sims[1].stats(g.session))["requests"]) > 0

        await until(used, "replica 1 sent requests again", 10.0)
        assert time.monotonic() - back < 10.0
    # Every request one row, served, billed once: the tries on the dead replica
    # left no row of their own.
    rows = await _rows(g)
    assert len(rows) == asked and len({r.request_id for r in rows}) == asked
    assert all(r.status == "served" and r.cost > 0 for r in rows), {r.status for r in rows}
    retried = metric_sum(await g.metrics(), "tierq_upstream_retries_total")
    assert retried >= 1


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def _health(g: Replicated, i: int, states: tuple[str, ...]) -> bool:
    return bool((await g.replicas())[i]["health"] in states)


async def _rows(g: Replicated) -> list[Any]:
    await g.ledger.flush()
    return g.ledger.rows()


async def test_a_replica_answering_500_has_each_request_tried_on_another_and_billed_once(
        replicated: Callable[..., Any]) -> None:
    g: Replicated = await replicated(2, sim_args=[[], ["--fault", "500"]])
    async with g.client() as c:
        ids = [await _ask(c, stream=i % 3 == 2) for i in range(20)]
    bad = int((await g.sims[1].stats(g.session))["requests"])
    # One at a time in turn: replica 1 gets every other first try until five in a
    # row failed, then is ejected (30 s) and gets none.
    assert bad == 5, bad
    replicas = await g.replicas()
    assert replicas[1]["health"] == "ejected" and replicas[1]["ejections"] == 1, replicas
    rows = await _rows(g)
    assert len(rows) == 20 and all(r.status == "served" for r in rows), [r.status for r in rows]
    assert all(r.cost > 0 for r in rows)
    assert len({r.request_id for r in rows}) == 20 and len(ids) == 20
    text = await g.metrics()
    assert 'tierq_upstream_retries_total{model="%s",upstream="sims",reason="failed"} 5' % PRIORITY_MODEL \
        in text, [line for line in text.splitlines() if "retries" in line]
    assert 'tierq_replica_ejections_total{upstream="sims",replica="1"} 1' in text


async def test_status_shows_each_replicas_limit_in_flight_and_health(
        replicated: Callable[..., Any]) -> None:
    g: Replicated = await replicated(2)
    async with g.client() as c:
        await asyncio.gather(*(_ask(c) for _ in range(4)))
    replicas = await g.replicas()
    assert [r["endpoint"] for r in replicas] == [s.url + "/v1" for s in g.sims]
    for r in replicas:
        assert r["limit"] == 4 and r["in_flight"] == 0 and r["health"] == "healthy", r
        assert r["grants"] >= 1
    text = await g.metrics()
    for i in range(2):
        assert f'tierq_replica_limit{{model="{PRIORITY_MODEL}",replica="{i}"}} 4' in text
        assert f'tierq_replica_in_flight{{model="{PRIORITY_MODEL}",replica="{i}"}} 0' in text


async def test_streams_waiting_for_their_first_token_on_a_killed_replica_are_served_by_another(
        replicated: Callable[..., Any]) -> None:
    # 1.5 s to first token: the replica is killed while its streams wait for it.
    g: Replicated = await replicated(3, sim_args=[["--ttft-ms", "1500"]] * 3)
    async with g.client() as c:
        tasks = [asyncio.create_task(_ask(c, stream=i % 2 == 0)) for i in range(6)]
        await until(lambda: _in_flight(g, 1), "replica 1 holds requests", 10.0)
        g.sims[1].kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    rows = await _rows(g)
    assert len(rows) == 6 and all(r.status == "served" and not r.partial for r in rows), rows
    text = await g.metrics()
    assert metric_sum(text, "tierq_upstream_retries_total") >= 1


async def _in_flight(g: Replicated, i: int) -> bool:
    return int((await g.sims[i].stats(g.session))["in_flight"]) > 0


async def test_the_status_page_shows_each_replica_and_an_ejected_one(
        replicated: Callable[..., Any], tmp_path: Path) -> None:
    import html
    import re

    from test_status_page import CHROMIUM, _browser
    if CHROMIUM is None:
        pytest.skip("no chromium binary")
    g: Replicated = await replicated(2, sim_args=[[], ["--fault", "500"]])
    async with g.client() as c:
        for _ in range(12):
            await _ask(c)
    dom = html.unescape(await _browser(g.root + "/status", tmp_path, "--dump-dom"))
    rows = re.findall(r'<tr data-replica="(\d)" data-health="(\w+)" data-in-flight="(\d+)" '
                      r'data-limit="(\d+)">', dom)
    assert rows == [("0", "healthy", "0", "4"), ("1", "ejected", "0", "4")], rows
    assert g.sims[1].url + "/v1" in dom


async def test_an_ejected_replica_takes_its_slots_out_of_a_fixed_limit_pool(
        replicated: Callable[..., Any]) -> None:
    # A fixed limit (2 per replica, the pool's 4) ignores the pool's set_limit:
    # the ejected replica's 2 slots must be withheld, or the pool keeps
    # admitting 4 on the survivor's 2 (the extra two wait in its connection
    # pool, first come first served, out of the lanes' order).
    g: Replicated = await replicated(2, sim_args=[["--ttft-ms", "300"]] * 2, limit=2)
    async with g.client() as c:
        g.sims[1].kill()

        async def ejected() -> bool:
            await asyncio.gather(*(_ask(c) for _ in range(2)))  # tried on 1, moved to 0
            return bool((await g.replicas())[1]["health"] == "ejected")

        await until(ejected, "replica 1 ejected")

        async def pool() -> dict[str, Any]:
            p: dict[str, Any] = (await g.status())["pools"][0]
            return p

        seen = await _peak([_ask(c, stream=i % 2 == 1) for i in range(12)], pool)
        assert seen == 2, seen
        assert (await g.sims[0].stats(g.session))["max_in_flight_seen"] == 2
        assert (await pool())["withheld"] == 2
        # Back: its slots with it, once its slow start is over.
        g.sims[1].start()
        await g.sims[1].ready(g.session)
        await until(lambda: _withheld(pool, 0), "replica 1's slots back")
        assert (await g.replicas())[1]["limit"] == 2
        assert await _peak([_ask(c) for _ in range(12)], pool) == 4


async def _withheld(pool: Callable[[], Any], n: int) -> bool:
    p = await pool()
    return bool(p["withheld"] + p["owed"] == n)


async def _peak(asks: list[Any], pool: Callable[[], Any]) -> int:
    """Runs the requests `asks` at once; the pool's most in flight seen while
    they ran (polled), after every one was served."""
    burst = asyncio.gather(*asks)
    seen = 0
    while not burst.done():
        seen = max(seen, int((await pool())["in_flight"]))
        await asyncio.sleep(0.02)
    await burst
    return seen


@pytest.mark.timeout(180)
async def test_two_workers_withhold_an_ejected_replicas_slots_once_and_give_them_back(
        tmp_path: Path) -> None:
    """`tierq serve --workers 2` over two `tierq sim` at a fixed 2 slots each,
    every worker ejecting on its own (one failure ejects): replica 1 killed,
    the pool's host-wide in flight peaks at 2 (each worker skipping the
    withholding let 4 in; two workers' deltas withheld 4 and let none); started
    again, its two slots come back and the pool runs 4."""
    sims = [Sim(tmp_path, i, ["--slots", "4", "--ttft-ms", "300", "--tokens-per-s", "0"])
            for i in range(2)]
    for s in sims:
        s.start()
    cfg = tmp_path / "tierq.toml"
    endpoints = ", ".join(f'"{s.url}/v1"' for s in sims)
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{tmp_path / 'ledger.db'}"
[[upstreams]]
name = "sims"
kind = "vllm"
endpoints = [{endpoints}]
routing = "round_robin"
connect_timeout_s = 2.0
[upstreams.health]
consecutive_failures = 1
probe_interval_s = 0.2
slow_start_s = 1.0
[[models]]
id = "{PRIORITY_MODEL}"
upstream = "sims"
priority = true
[models.admission]
max_concurrency = 2
queue_depth = 64
""")
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        serve = subprocess.Popen([sys.executable, "-m", "tierq", "serve", "--config", str(cfg),
                                  "--port", str(port), "--workers", "2", "--no-access-log"],
                                 stdout=subprocess.DEVNULL, stderr=err)
    # Several clients, so both workers take connections.
    clients = [openai.AsyncOpenAI(base_url=root + "/v1", api_key="unused", max_retries=0, timeout=60)
               for _ in range(8)]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            for s in sims:
                await s.ready(session)

            async def pool() -> dict[str, Any]:
                async with session.get(root + "/status.json") as r:
                    data: dict[str, Any] = await r.json()
                p: dict[str, Any] = data["pools"][0]
                return p

            async def ready() -> bool:
                assert serve.poll() is None, log.read_text()[-2000:]
                try:
                    async with session.get(root + "/status.json") as r:
                        return r.status == 200 and bool((await r.json())["ready"])
                except aiohttp.ClientError:
                    return False

            await until(ready, "the gateway ready", 60.0)
            assert await _peak([_ask(clients[i % 8]) for i in range(16)], pool) == 4
            sims[1].kill()

            async def withheld(n: int) -> bool:
                # Tried on replica 1 by turns (moved to 0), until a worker ejects it.
                await asyncio.gather(*(_ask(c) for c in clients))
                p = await pool()
                return bool(p["withheld"] + p["owed"] == n)

            await until(lambda: withheld(2), "replica 1's slots withheld")
            # Both workers' detectors had it fail by now (8 clients by turns).
            assert await _peak([_ask(clients[i % 8], stream=i % 2 == 1) for i in range(16)], pool) == 2
            p = await pool()
            assert p["withheld"] == 2 and p["owed"] == 0, p
            assert (await sims[0].stats(session))["max_in_flight_seen"] == 2
            sims[1].start()
            await sims[1].ready(session)
            await until(lambda: withheld(0), "replica 1's slots given back")
            assert await _peak([_ask(clients[i % 8]) for i in range(16)], pool) == 4
            assert int((await sims[1].stats(session))["requests"]) > 0
    finally:
        for c in clients:
            await c.close()
        serve.terminate()
        serve.wait(30)
        for s in sims:
            s.stop()
