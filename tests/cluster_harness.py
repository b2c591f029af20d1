"""Several `tierq serve` hosts sharing one Redis ([cluster]) in front of one
`tierq sim`, as real processes on free loopback ports: what tests/test_cluster.py
and bench/cluster/redis_outage.py share (start the hosts, load them, stop Redis
under load and start it again)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tierq.config import load_config
from ports import free_port

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
TTL_MS = 1500


class Proc:
    def __init__(self, cmd: list[str], log: Path) -> None:
        with log.open("wb") as err:
            self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        self.log = log

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Cluster:
    """One sim and the hosts in front of it."""

    def __init__(self, tmp: Path, sim_url: str, sim: Proc) -> None:
        self.tmp, self.sim_url, self.sim = tmp, sim_url, sim
        self.hosts: list[str] = []
        self.procs: list[Proc] = []
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        # The last answer seen per status (its headers and body), for the codes.
        self.last: dict[int, tuple[dict[str, str], bytes]] = {}

    async def sim_stats(self) -> dict[str, Any]:
        async with self.session.get(self.sim_url + "/sim/stats") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def status(self, i: int) -> dict[str, Any]:
        async with self.session.get(self.hosts[i] + "/status.json") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def metrics(self, i: int) -> str:
        async with self.session.get(self.hosts[i] + "/metrics") as r:
            return await r.text()

    async def chat(self, i: int, tier: str | None = None, token: str | None = None,
                   timeout_s: float = 60) -> tuple[int, dict[str, str], float]:
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 4}
        if tier:
            body["service_tier"] = tier
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.post(self.hosts[i] + "/v1/chat/completions", json=body,
                                     headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            self.last[r.status] = (dict(r.headers), await r.read())
            return r.status, dict(r.headers), time.monotonic()


    async def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.sim.stop()
        await self.session.close()

    def logs(self) -> str:
        return "\n".join(p.log.read_text()[-3000:] for p in self.procs)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Polls `check` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - t0
        except (aiohttp.ClientError, OSError, KeyError, TypeError):
            pass
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def start_cluster(tmp_path: Path, redis_url: str, hosts: int = 2, limit: int = 4,
                        ttft_ms: float = 200, down: str = "local", keys_db: Path | None = None,
                        max_wait_ms: int = 30000, headroom: int = 0, workers: int = 1,
                        made: list[Cluster] | None = None, flex: bool = False) -> Cluster:
    """A sim and `hosts` hosts, ready and seeing each other. `made` gets the
    cluster before it is ready, so a caller can stop one that never was."""
    sim_port = free_port()
    sim = Proc([sys.executable, "-m", "tierq", "sim", "--host", "127.0.0.1", "--port",
                str(sim_port), "--slots", "64", "--ttft-ms", str(ttft_ms),
                "--tokens-per-s", "0"], tmp_path / "sim.log")
    c = Cluster(tmp_path, f"http://127.0.0.1:{sim_port}", sim)
    if made is not None:
        made.append(c)
    keys = f'[keys]\npath = "{keys_db}"\n' if keys_db else ""
    for i in range(hosts):
        port = free_port()
        cfg = tmp_path / f"host{i}.toml"
        cfg.write_text(f"""
[ledger]
url = "sqlite:///{tmp_path / f'host{i}.db'}"
{keys}
[cluster]
redis_url = "{redis_url}"
host_id = "host-{i}"
lease_ttl_ms = {TTL_MS}
on_redis_down = "{down}"
[[upstreams]]
name = "sim"
kind = "openai"
base_url = "{c.sim_url}/v1"
[[models]]
id = "{MODEL}"
upstream = "sim"
flex = {str(flex).lower()}
[models.admission]
max_concurrency = {limit}
queue_depth = 256
max_wait_ms = {max_wait_ms}
priority_headroom = {headroom}
""")
        load_config(cfg)  # a bad file fails here, with its one line
        c.procs.append(Proc([sys.executable, "-m", "tierq", "serve", "--config", str(cfg),
                             "--port", str(port), "--no-access-log", "--workers", str(workers)],
                            tmp_path / f"host{i}.log"))
        c.hosts.append(f"http://127.0.0.1:{port}")

    async def sim_up() -> bool:
        await c.sim_stats()
        return True

    await wait_for(sim_up, 30, "sim up")
    for i in range(hosts):
        async def ready(i: int = i) -> bool:
            st = await c.status(i)
            return bool(st["ready"]) and st["cluster"]["redis_up"]

        await wait_for(ready, 30, f"host {i} ready: {(tmp_path / f'host{i}.log').read_text()}")

    async def all_seen() -> bool:
        return all([(await c.status(i))["cluster"]["hosts"] == hosts for i in range(hosts)])

    await wait_for(all_seen, 30, "every host sees the others")
    return c


async def load(c: Cluster, stop: asyncio.Event, out: list[int], tier: str | None = None) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        try:
            status, _, _ = await c.chat(i % len(c.hosts), tier=tier, timeout_s=30)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = -1
        out.append(status)


async def outage(c: Cluster, redis_server: Any, seconds: float
                 ) -> tuple[list[int], list[int], list[dict[str, Any]]]:
    """Load on every host; Redis stopped for `seconds`, then started.
    Returns (statuses before+after, statuses during, host statuses mid-outage)."""
    stop = asyncio.Event()
    before: list[int] = []
    workers = [asyncio.ensure_future(load(c, stop, before)) for _ in range(6)]
    await asyncio.sleep(1.0)
    redis_server.stop()

    async def all_down() -> bool:
        return all([not (await c.status(i))["cluster"]["redis_up"] for i in range(len(c.hosts))])

    await wait_for(all_down, 10, "every host notices Redis is gone")
    during: list[int] = []  # requests sent once every host knows
    workers[0:0] = [asyncio.ensure_future(load(c, stop, during)) for _ in range(2)]
    mid = [await c.status(i) for i in range(len(c.hosts))]
    await asyncio.sleep(seconds)
    redis_server.start()

    async def all_up() -> bool:
        return all([(await c.status(i))["cluster"]["redis_up"] for i in range(len(c.hosts))])

    await wait_for(all_up, 20, "every host rejoins")
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*workers)
    return before, during, mid


async def all_at_once(c: Cluster, limit: int) -> tuple[list[int], int]:
    """Once nothing is in flight, `limit` requests at once (spread over the
    hosts): their statuses, and how many of them reached the sim. Every slot
    is usable again when all are 200 and all reached it."""
    async def idle() -> bool:
        return all([(await c.status(i))["pools"][0]["in_flight"] == 0 for i in range(len(c.hosts))])

    await wait_for(idle, 20, "nothing in flight after the load")
    t0 = (await c.sim_stats())["requests"]
    results = await asyncio.gather(*(c.chat(i % len(c.hosts)) for i in range(limit)))
    return [r[0] for r in results], (await c.sim_stats())["requests"] - t0
