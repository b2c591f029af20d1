"""Lease traffic with a lease per replica (#20 item 5), measured: two
`[cluster]` hosts (lease TTL 1.5 s, so a heartbeat each 0.5 s) in front of 1
and of 4 `tierq sim` replicas (limit 2 each, 150 ms to first token), in one
run. Per setting, an idle window and a loaded one (8 closed-loop clients per
host): the hosts' Redis round trips a second (`redis_calls`, one pipelined
call per lease sync) and the script calls Redis ran a second (INFO
commandstats `evalsha`: one per replica per sync, plus the fair counters'),
and the ratio of 4 replicas to 1.

    python bench/cluster/replica_leases.py [--window-s 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from redis_server import RedisServer  # noqa: E402
from test_cluster_replicas import Hosts, Proc, start_hosts  # noqa: E402


async def counters(h: Hosts, r: Any) -> tuple[int, int]:
    calls = sum([int((await h.status(i))["cluster"]["redis_calls"]) for i in range(len(h.roots))])
    info = await r.info("commandstats")
    return calls, int(info.get("cmdstat_evalsha", {}).get("calls", 0))


async def window(h: Hosts, r: Any, seconds: float, clients: int) -> dict[str, float]:
    stop = time.monotonic() + seconds
    served = 0

    async def loop(host: int, k: int) -> None:
        nonlocal served
        i = 0
        while time.monotonic() < stop:
            await h.request(host, 1000 * k + i)
            served += 1
            i += 1

    c0, e0 = await counters(h, r)
    t0 = time.monotonic()
    if clients:
        await asyncio.gather(*(loop(k % 2, k) for k in range(clients)))
    else:
        await asyncio.sleep(seconds)
    dt = time.monotonic() - t0
    c1, e1 = await counters(h, r)
    return {"seconds": round(dt, 2), "round_trips_per_s": round((c1 - c0) / dt, 1),
            "script_calls_per_s": round((e1 - e0) / dt, 1), "served_per_s": round(served / dt, 1)}


async def one(tmp: Path, replicas: int, seconds: float) -> dict[str, Any]:
    redis = RedisServer(tmp / "redis")
    redis.start()
    sims: list[Proc] = []
    made: list[Hosts] = []
    try:
        h = await start_hosts(tmp, redis.url, sims, made, hosts=2, replicas=replicas)
        r = aioredis.from_url(redis.url)
        try:
            await asyncio.sleep(2.0)  # past the start-up syncs
            idle = await window(h, r, seconds, 0)
            loaded = await window(h, r, seconds, 16)
        finally:
            await r.aclose()
        stats = await h.sim_stats()
        cluster = [(await h.status(i))["cluster"] for i in range(2)]
        errors = [int(c["redis_errors"]) for c in cluster]
        return {"replicas": replicas, "idle": idle, "loaded": loaded,
                "max_in_flight_seen": [s["max_in_flight_seen"] for s in stats],
                # per host: the longest Redis heard nothing from it (its
                # leases lapse past the TTL), and picks that found no replica
                # within its cap (replicated pools only)
                "lease_gap_max_s": [c["lease_gap_max_s"] for c in cluster],
                "over": [max([int(v.get("over", 0)) for v in c["leases"].values()] or [0])
                         for c in cluster],
                "redis_errors": errors,
                "redis_unreachable": ["unreachable" in p.log.read_text() for p in h.procs]}
    finally:
        for x in made:
            await x.close()
        for s in sims:
            s.stop()
        redis.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = []
    for n in (1, 4):
        with tempfile.TemporaryDirectory() as d:
            runs.append(await one(Path(d), n, args.window_s))
    out: dict[str, Any] = {"load_average": os.getloadavg(), "runs": runs, "ratio_4_to_1": {
        phase: {k: round(runs[1][phase][k] / runs[0][phase][k], 2) if runs[0][phase][k] else None
                for k in ("round_trips_per_s", "script_calls_per_s")}
        for phase in ("idle", "loaded")}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
