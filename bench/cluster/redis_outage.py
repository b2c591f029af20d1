"""Redis outages and a killed host, measured: the scenario tests/test_cluster.py
asserts on every run, with its figures kept. Two `[cluster]` hosts, limit 4, a
sim answering in 100 ms, 6 closed-loop clients; once both hosts see Redis gone,
2 more clients start; Redis stays stopped `--down-s` seconds, then starts; the
load runs 1 s after both hosts rejoin. Then, per mode, `limit` requests at
once must all run (no slot leaked). Last, `kill -9` of a host holding every
slot (lease TTL 1.5 s), `--kills` times: how long until the other host holds
them all.

    python bench/cluster/redis_outage.py [--down-s 5] [--kills 3] [--smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from cluster_harness import MODEL, TTL_MS, Cluster, all_at_once, outage, start_cluster, wait_for  # noqa: E402
from redis_server import RedisServer  # noqa: E402

LIMIT = 4


def counts(statuses: list[int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(statuses).items())}


async def no_leak(c: Cluster) -> bool:
    """Every slot usable again: `LIMIT` requests at once all answered 200
    and all reached the sim."""
    statuses, reached = await all_at_once(c, LIMIT)
    return statuses == [200] * LIMIT and reached == LIMIT


async def one_mode(tmp: Path, down: str, down_s: float) -> dict[str, Any]:
    folder = tmp / down
    folder.mkdir()
    redis = RedisServer(folder / "redis")
    redis.start()
    made: list[Cluster] = []
    try:
        c = await start_cluster(folder, redis.url, hosts=2, limit=LIMIT, ttft_ms=100, down=down,
                                made=made)
        before, during, mid = await outage(c, redis, down_s)
        logs = [p.log.read_text() for p in c.procs]
        return {
            "on_redis_down": down,
            "down_s": down_s,
            "during": counts(during),
            "whole_run": counts(before + during),
            "max_in_flight_seen": (await c.sim_stats())["max_in_flight_seen"],
            "leases_while_down": [st["cluster"]["leases"][MODEL]["lease"] for st in mid],
            "rejoined_logged": all("rejoined" in log for log in logs),
            "no_slot_leaked": await no_leak(c),
        }
    finally:
        for c in made:
            await c.close()
        redis.stop()


async def one_kill(tmp: Path, n: int) -> float:
    """Seconds from `kill -9` of the host holding every slot until the
    other holds them all."""
    folder = tmp / f"kill{n}"
    folder.mkdir()
    redis = RedisServer(folder / "redis")
    redis.start()
    made: list[Cluster] = []
    try:
        c = await start_cluster(folder, redis.url, hosts=2, limit=LIMIT, ttft_ms=60_000, made=made)
        held = [asyncio.ensure_future(c.chat(0, timeout_s=120)) for _ in range(LIMIT)]

        async def holds_all(i: int) -> bool:
            return bool((await c.status(i))["pools"][0]["in_flight"] == LIMIT)

        await wait_for(lambda: holds_all(0), 20, "host 0 holds every slot")
        c.procs[0].p.send_signal(signal.SIGKILL)
        c.procs[0].p.wait()
        killed = time.monotonic()
        await asyncio.gather(*held, return_exceptions=True)
        waiting = [asyncio.ensure_future(c.chat(1, timeout_s=120)) for _ in range(LIMIT)]
        await wait_for(lambda: holds_all(1), TTL_MS / 1000 + 30, "host 1 takes the slots")
        took = time.monotonic() - killed
        for f in waiting:
            f.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        return took
    finally:
        for c in made:
            await c.close()
        redis.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--down-s", type=float, default=5.0)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="Redis down 1 s, one kill")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/cluster_redis_outage.json")
    a = ap.parse_args()
    if a.smoke:
        a.down_s, a.kills = 1.0, 1
    with tempfile.TemporaryDirectory(prefix="tierq-outage-") as d:
        tmp = Path(d)
        modes = [await one_mode(tmp, down, a.down_s) for down in ("local", "closed")]
        kills = [round(await one_kill(tmp, n), 3) for n in range(a.kills)]
    result = {"limit": LIMIT, "lease_ttl_ms": TTL_MS, "sim_ttft_ms": 100, "clients": [6, 2],
              "modes": modes, "kill9_takeover_s": kills}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| `on_redis_down` | while down | whole run | sim `max_in_flight_seen` | leases while down | no slot leaked |")
    print("|---|---|---|---:|---|---|")
    for m in modes:
        print(f"| `\"{m['on_redis_down']}\"` | {m['during']} | {m['whole_run']} | {m['max_in_flight_seen']} "
              f"| {m['leases_while_down']} | {m['no_slot_leaked']} |")
    print(f"kill -9 takeover (TTL {TTL_MS / 1000} s): {kills} s")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except aiohttp.ClientError as e:
        sys.exit(f"redis_outage: {e}")
