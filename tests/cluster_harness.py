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
                        made: list[Cluster] | None = None, flex: bool = False,
                        redis_urls: list[str] | None = None, cluster_extra: str = "") -> Cluster:
    """A sim and `hosts` hosts, ready and seeing each other. `made` gets the
    cluster before it is ready, so a caller can stop one that never was.
    `redis_urls`: each host's own (a relay in front of Redis, say) instead of
    `redis_url`; `cluster_extra`: more lines in each host's [cluster]."""
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
redis_url = "{redis_urls[i] if redis_urls else redis_url}"
host_id = "host-{i}"
lease_ttl_ms = {TTL_MS}
on_redis_down = "{down}"
{cluster_extra}
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


async def load(c: Cluster, stop: asyncio.Event, out: list[int], tier: str | None = None,
               host: int | None = None) -> None:
    """One closed-loop client: alternating hosts, or always `host`."""
    i = 0
    while not stop.is_set():
        i += 1
        try:
            status, _, _ = await c.chat(i % len(c.hosts) if host is None else host, tier=tier,
                                        timeout_s=30)
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


# ------------------------------------------------------------ faults (tests/test_cluster_faults.py, bench/cluster/redis_faults.py)


def percentile(ms: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..1) of `ms`."""
    s = sorted(ms)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 3),
            "p99_ms": round(percentile(ms, 0.99), 3), "min_ms": round(min(ms), 3)}


async def sim_reset(c: Cluster) -> None:
    """The sim's counters from now on (its max_in_flight_seen restarts at the current level)."""
    async with c.session.post(c.sim_url + "/sim/reset") as r:
        assert r.status == 200


def worker_pid(c: Cluster, host: int, index: int) -> int | None:
    """The pid of worker `index` of host `host` (a `--workers N` host), from the
    snapshot it publishes in its supervisor's run directory."""
    import glob

    import orjson

    sup = c.procs[host].p.pid
    for path in glob.glob(f"/dev/shm/tierq-run-{sup}-*/worker-{index}.json"):
        try:
            return int(orjson.loads(Path(path).read_bytes())["pid"])
        except (OSError, ValueError, KeyError):
            return None
    return None


async def timed_chats(c: Cluster, host: int, n: int, token: str | None) -> list[float]:
    """`n` requests one after another through host `host`: each one's ms (all must be 200)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _, _ = await c.chat(host, token=token, timeout_s=30)
        assert status == 200, (status, c.last.get(status))
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def slow_redis(c: Cluster, relay: Any, delay_s: float, rounds: int, per_round: int,
                     token: str | None) -> dict[str, Any]:
    """Requests one after another through host 0, whose Redis is behind
    `relay`: rounds alternate between the relay passing at once and holding
    each call `delay_s` (the same run, the same machine for both). Returns the
    latency of each and what the delay added."""
    base: list[float] = []
    slow: list[float] = []
    calls0 = (await c.status(0))["cluster"]["redis_calls"]
    conns = {"baseline": 0, "slowed": 0}  # connections host 0 opened to Redis in each
    for _ in range(rounds):
        relay.delay_s = 0.0
        n0 = relay.connections
        base += await timed_chats(c, 0, per_round, token)
        relay.delay_s = delay_s
        n1 = relay.connections
        slow += await timed_chats(c, 0, per_round, token)
        conns["baseline"] += n1 - n0
        conns["slowed"] += relay.connections - n1
    relay.delay_s = 0.0
    calls = (await c.status(0))["cluster"]["redis_calls"] - calls0
    b, s = summary(base), summary(slow)
    return {"delay_ms": delay_s * 1000, "baseline": b, "slowed": s,
            "new_redis_connections": conns,
            "baseline_ms": [round(x, 3) for x in base], "slowed_ms": [round(x, 3) for x in slow],
            "added_p50_ms": round(s["p50_ms"] - b["p50_ms"], 3),
            "added_p99_ms": round(s["p99_ms"] - b["p99_ms"], 3),
            "p99_ratio": round(s["p99_ms"] / b["p99_ms"], 3),
            "redis_calls_per_request": round(calls / (len(base) + len(slow)), 3)}


async def split(c: Cluster, relays: list[Any], limit: int, seconds: float,
                clients: int) -> dict[str, Any]:
    """The network split in "local" mode: closed-loop load on every host
    (`clients` spread evenly, each sticking to its host, so one waiting on the
    cut host's queue does not starve the others' demand), then host 0's link to Redis is cut (its relay a
    black hole) for `seconds` after the others saw its lease run out, then
    healed. The sim's in-flight high-water mark before, during and after
    (from 1 s after every host rejoined), and how long the excess took to
    drain once host 0 was back."""
    stop = asyncio.Event()
    statuses: list[int] = []
    loads = [asyncio.ensure_future(load(c, stop, statuses, host=i % len(c.hosts)))
             for i in range(clients)]
    try:
        await asyncio.sleep(1.0)
        await sim_reset(c)
        await asyncio.sleep(1.0)
        before = (await c.sim_stats())["max_in_flight_seen"]
        await sim_reset(c)
        cut_at = time.monotonic()
        relays[0].cut()

        async def host0_alone() -> bool:
            return not (await c.status(0))["cluster"]["redis_up"]

        noticed = await wait_for(host0_alone, 20, "host 0 notices it lost Redis")

        async def others_alone() -> bool:
            return all([(await c.status(i))["cluster"]["hosts"] == len(c.hosts) - 1
                        for i in range(1, len(c.hosts))])

        await wait_for(others_alone, 20, "the other hosts see host 0's lease run out")
        expired = time.monotonic() - cut_at
        share = (await c.status(0))["cluster"]["leases"][MODEL]["lease"]
        await asyncio.sleep(seconds)
        during = (await c.sim_stats())["max_in_flight_seen"]
        relays[0].heal()
        healed_at = time.monotonic()

        async def rejoined() -> bool:
            return all([(await c.status(i))["cluster"]["redis_up"]
                        and (await c.status(i))["cluster"]["hosts"] == len(c.hosts)
                        for i in range(len(c.hosts))])

        await wait_for(rejoined, 20, "host 0 rejoins")
        rejoin_s = time.monotonic() - healed_at

        async def drained() -> bool:
            return bool((await c.sim_stats())["in_flight"] <= limit)

        drain_s = await wait_for(drained, 20, "the excess drains")
        await asyncio.sleep(1.0)
        await sim_reset(c)
        await asyncio.sleep(2.0)
        after = (await c.sim_stats())["max_in_flight_seen"]
    finally:
        stop.set()
        await asyncio.gather(*loads)
    n = len(c.hosts)
    return {"hosts": n, "limit": limit, "clients": clients, "split_s": seconds, "ttl_ms": TTL_MS,
            "max_in_flight_before": before, "max_in_flight_split": during,
            "max_in_flight_after": after, "bound": limit + limit // n,
            "over_admission": during - limit, "split_host_share": share,
            "noticed_s": round(noticed, 3), "lease_expired_s": round(expired, 3),
            "rejoin_s": round(rejoin_s, 3), "drain_after_rejoin_s": round(drain_s, 3),
            "statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))}}


class Replicated:
    """A primary, its replica and `n` sentinels (quorum n // 2 + 1) watching
    it as `master`, each a real process on a loopback port in its own folder
    under `folder`. `extra` is the [cluster] lines a host needs to find the
    primary through them."""

    def __init__(self, folder: Path, master: str = "tierq", n: int = 3) -> None:
        from redis_server import RedisServer

        self.master, self.n, self.folder = master, n, folder
        self.primary = RedisServer(folder / "primary")
        self.replica: Any = None
        self.sentinels: list[Any] = []

    async def start(self) -> None:
        from redis_server import RedisSentinel, RedisServer

        self.primary.start()
        self.replica = RedisServer(self.folder / "replica",
                                   ("--replicaof", f"127.0.0.1 {self.primary.port}"))
        self.replica.start()

        async def linked() -> bool:
            info = await self._call(self.replica.port, "INFO", "replication")
            return bool(info.get("master_link_status") == "up")

        await wait_for(linked, 20, "the replica follows the primary")
        self.sentinels = [RedisSentinel(self.folder / f"sentinel{i}", self.master, self.primary.port,
                                        quorum=self.n // 2 + 1) for i in range(self.n)]
        for s in self.sentinels:
            s.start()

        async def watching() -> bool:
            # redis-py answers SENTINEL MASTER as a dict (its reply callback).
            d = await self._call(self.sentinels[0].port, "SENTINEL", "MASTER", self.master)
            return int(d[b"num-slaves"]) == 1 and int(d[b"num-other-sentinels"]) == self.n - 1

        await wait_for(watching, 30, "the sentinels see the replica and each other")

    @property
    def extra(self) -> str:
        return ("sentinels = [" + ", ".join(f'"127.0.0.1:{s.port}"' for s in self.sentinels) + "]\n"
                f'sentinel_master = "{self.master}"')

    async def master_port(self) -> int:
        addr = await self._call(self.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                self.master)
        return int(addr[1])

    @staticmethod
    async def _call(port: int, *args: str) -> Any:
        import redis.asyncio as aioredis

        r = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            return await r.execute_command(*args)
        finally:
            await r.aclose()

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        if self.replica is not None:
            self.replica.stop()
        self.primary.stop()


async def redis_leases(url: str) -> tuple[dict[str, int], dict[str, int], int]:
    """(host -> slots leased, host -> lease deadline ms, Redis's now in ms), as
    the lease script keeps them for MODEL's pool."""
    import redis.asyncio as aioredis

    tag = f"{{tierq:pool:{MODEL}}}"
    r = aioredis.from_url(url)
    try:
        lease = {k.decode(): int(v) for k, v in (await r.hgetall(f"{tag}:lease")).items()}
        seen = {k.decode(): int(v) for k, v in (await r.hgetall(f"{tag}:seen")).items()}
        s, us = await r.time()
        return lease, seen, s * 1000 + us // 1000
    finally:
        await r.aclose()


async def failover(c: Cluster, rep: Replicated, limit: int, clients: int) -> dict[str, Any]:
    """The primary killed (SIGKILL) under closed-loop load on every host:
    how long until the sentinels promote the replica and until every host
    leases from it (each host's lease deadline there in the future and its
    link up), the sim's in-flight high-water mark from the kill until then
    and over 1.5 s of load after, then two probes once idle: `limit`
    requests at once (every slot usable: all 200, all reach the sim) and
    3 x `limit` at once (the limit holds: never more than `limit` at the sim)."""
    stop = asyncio.Event()
    statuses: list[int] = []
    loads = [asyncio.ensure_future(load(c, stop, statuses)) for _ in range(clients)]
    try:
        await asyncio.sleep(1.0)
        await sim_reset(c)
        rep.primary.kill()
        killed = time.monotonic()

        async def promoted() -> bool:
            return await rep.master_port() == rep.replica.port

        promoted_s = await wait_for(promoted, 30, "the sentinels promote the replica")

        async def followed() -> bool:
            _, seen, now = await redis_leases(rep.replica.url)
            return all(seen.get(f"host-{i}", 0) > now for i in range(len(c.hosts))) and all(
                [(await c.status(i))["cluster"]["redis_up"] for i in range(len(c.hosts))])

        await wait_for(followed, 30, f"every host leases from the new primary: {c.logs()}")
        followed_s = time.monotonic() - killed
        during = (await c.sim_stats())["max_in_flight_seen"]
        await sim_reset(c)
        await asyncio.sleep(1.5)
        after = (await c.sim_stats())["max_in_flight_seen"]
    finally:
        stop.set()
        await asyncio.gather(*loads)
    probe, reached = await all_at_once(c, limit)
    await sim_reset(c)
    burst = await asyncio.gather(*(c.chat(i % len(c.hosts)) for i in range(3 * limit)))
    lease, _, _ = await redis_leases(rep.replica.url)
    return {"hosts": len(c.hosts), "limit": limit, "clients": clients, "ttl_ms": TTL_MS,
            "sentinels": rep.n, "down_after_ms": rep.sentinels[0].down_after_ms,
            "promoted_s": round(promoted_s, 3), "followed_s": round(followed_s, 3),
            "max_in_flight_failover": during, "max_in_flight_after": after,
            "probe_statuses": probe, "probe_reached": reached,
            "burst_statuses": {str(k): [r[0] for r in burst].count(k)
                               for k in sorted({r[0] for r in burst})},
            "max_in_flight_burst": (await c.sim_stats())["max_in_flight_seen"],
            "leases_after": lease,
            "statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))}}
