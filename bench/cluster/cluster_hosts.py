"""Two `[cluster]` hosts against one on the same machine, in the same run
(phases alternate one, two, one, two): throughput and requests per gateway
CPU-second (utime + stime of the serve processes, from /proc). Both setups
share one pool limit through the same redis-server in front of one `tierq
sim` with instant answers, so the gateway is what is measured. On a machine
with few cores the load generator competes with the hosts: read the ratio,
not the absolute numbers.

    python bench/cluster/cluster_hosts.py [--seconds 5] [--clients 64] [--smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_common import MODEL, RedisServer, Serve, cpu_s, percentile, start_sim, wait_ready  # noqa: E402

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def load(urls: list[str], seconds: float, clients: int) -> tuple[int, list[float], int]:
    done, errors = 0, 0
    ms: list[float] = []
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def client(i: int) -> None:
            nonlocal done, errors
            url = urls[i % len(urls)] + "/v1/chat/completions"
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                async with s.post(url, json=BODY) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1
                        ms.append((time.perf_counter() - t0) * 1000)
                    else:
                        errors += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    return done, ms, errors


async def run(seconds: float, clients: int, rounds: int, limit: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        redis = RedisServer(tmp / "redis")
        redis.start()
        sim, sim_url = start_sim(tmp, slots=4 * limit)
        try:
            results: dict[str, list[dict[str, float]]] = {"one": [], "two": []}
            for r in range(rounds):
                for setup in ("one", "two"):
                    hosts = [Serve(tmp, f"{setup}{r}h{i}", sim_url, limit=limit,
                                   redis_url=redis.url.replace("/0", f"/{1 + r % 8}"))
                             for i in range(1 if setup == "one" else 2)]
                    try:
                        await wait_ready([h.url for h in hosts])
                        await load([h.url for h in hosts], min(1.0, seconds), clients)  # warm
                        cpu0 = sum(cpu_s(h.proc.pid) for h in hosts)
                        n, ms, errors = await load([h.url for h in hosts], seconds, clients)
                        cpu = sum(cpu_s(h.proc.pid) for h in hosts) - cpu0
                    finally:
                        for h in hosts:
                            h.stop()
                    results[setup].append({
                        "rps": n / seconds, "req_per_cpu_s": n / cpu if cpu else float("nan"),
                        "p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99),
                        "errors": errors})
            out: dict[str, Any] = {"clients": clients, "limit": limit, "seconds": seconds,
                                   "rounds": rounds}
            for setup, runs in results.items():
                out[setup] = {k: round(sum(x[k] for x in runs) / len(runs), 2) for k in runs[0]}
            out["two_over_one_rps"] = round(out["two"]["rps"] / out["one"]["rps"], 3)
            out["two_over_one_req_per_cpu_s"] = round(
                out["two"]["req_per_cpu_s"] / out["one"]["req_per_cpu_s"], 3)
            return out
        finally:
            sim.terminate()
            sim.wait()
            redis.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=64, help="the pool's cluster-wide max_concurrency")
    ap.add_argument("--smoke", action="store_true", help="tiny run: checks it works, not timing")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.smoke:
        a.seconds, a.clients, a.rounds = 0.5, 8, 1
    result = asyncio.run(run(a.seconds, a.clients, a.rounds, a.limit))
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
