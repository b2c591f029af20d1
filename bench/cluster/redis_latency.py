"""What Redis adds per request: p50/p99 latency through a `[cluster]` host
against the same gateway without `[cluster]`, in the same run (requests
interleaved one by one, so both see the same machine), and Redis round trips
per request from each host's `tierq_cluster_redis_calls_total`.

Variants, each its own `tierq serve` in front of one `tierq sim` (instant
answers), all with an API key limited to 10^6 rpm (so every request makes a
key decision):
- `alone`: no [cluster] (the key decision is the host's shared-memory bucket);
- `cluster`: [cluster] on a real redis-server: the key decision is one Lua
  script call; the lease is held while requests keep coming;
- `cluster_no_key_limit`: another [cluster] host, its requests from a key with
  no rpm/tpm: no key decision, so only the lease's own calls.
Then a contended phase: two cluster hosts sharing a limit of 8 under 32
clients, with the calls per request and the latency there.

    python bench/cluster/redis_latency.py [--requests 2000] [--smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_common import MODEL, RedisServer, Serve, percentile, start_sim, wait_ready  # noqa: E402

from tierq.keys import KeyStore  # noqa: E402

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def redis_calls(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(url + "/metrics") as r:
        m = re.search(r"^tierq_cluster_redis_calls_total (\d+)", await r.text(), re.M)
        return int(m.group(1)) if m else 0


async def one(s: aiohttp.ClientSession, url: str, token: str) -> float:
    t0 = time.perf_counter()
    async with s.post(url + "/v1/chat/completions", json=BODY,
                      headers={"Authorization": f"Bearer {token}"}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return (time.perf_counter() - t0) * 1000


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 3),
            "p99_ms": round(percentile(ms, 0.99), 3)}


async def run(requests: int, clients: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        redis = RedisServer(tmp / "redis")
        redis.start()
        sim, sim_url = start_sim(tmp)
        db = tmp / "keys.db"
        with KeyStore(str(db)) as store:
            _, token = store.create("bench", rpm=1_000_000, tpm=1_000_000_000)
            _, free = store.create("free")
        alone = Serve(tmp, "alone", sim_url, limit=64, keys_db=db)
        on = Serve(tmp, "cluster", sim_url, limit=64, redis_url=redis.url, keys_db=db)
        nokey = Serve(tmp, "nokey", sim_url, limit=64, redis_url=redis.url, keys_db=db)
        c1 = Serve(tmp, "c1", sim_url, limit=8, redis_url=redis.url, keys_db=db)
        c2 = Serve(tmp, "c2", sim_url, limit=8, redis_url=redis.url, keys_db=db)
        procs = [alone, on, nokey, c1, c2]
        try:
            await wait_ready([p.url for p in procs])
            async with aiohttp.ClientSession() as s:
                variants = [("alone", alone.url, token), ("cluster", on.url, token),
                            ("cluster_no_key_limit", nokey.url, free)]
                for _ in range(50):  # warm all: connections, caches, the lease
                    for _, url, tok in variants:
                        await one(s, url, tok)
                calls0 = {url: await redis_calls(s, url) for _, url, _ in variants[1:]}
                lat: dict[str, list[float]] = {name: [] for name, _, _ in variants}
                for i in range(requests):
                    # Rotate the order so no variant always runs first.
                    k = i % len(variants)
                    for name, url, tok in variants[k:] + variants[:k]:
                        lat[name].append(await one(s, url, tok))
                sequential: dict[str, Any] = {name: summary(ms) for name, ms in lat.items()}
                for name, url, _ in variants[1:]:
                    v = sequential[name]
                    v["added_p50_ms"] = round(v["p50_ms"] - sequential["alone"]["p50_ms"], 3)
                    v["added_p99_ms"] = round(v["p99_ms"] - sequential["alone"]["p99_ms"], 3)
                    v["redis_calls_per_request"] = round(
                        (await redis_calls(s, url) - calls0[url]) / requests, 3)

                # Contended: two hosts, one limit of 8, more clients than slots.
                base = [await redis_calls(s, u) for u in (c1.url, c2.url)]
                ms: list[float] = []
                stop = time.monotonic() + seconds

                async def client(i: int) -> None:
                    url = (c1.url, c2.url)[i % 2]
                    while time.monotonic() < stop:
                        ms.append(await one(s, url, token))

                await asyncio.gather(*(client(i) for i in range(clients)))
                used = sum([await redis_calls(s, u) for u in (c1.url, c2.url)]) - sum(base)
                contended = {**summary(ms), "clients": clients, "limit": 8, "hosts": 2,
                             "rps": round(len(ms) / seconds, 1),
                             "redis_calls_per_request": round(used / max(1, len(ms)), 3)}
            return {"sequential": sequential, "contended": contended}
        finally:
            for p in procs:
                p.stop()
            sim.terminate()
            sim.wait()
            redis.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="per variant, sequential")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0, help="contended phase")
    ap.add_argument("--smoke", action="store_true", help="tiny run: checks it works, not timing")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    a = ap.parse_args()
    if a.smoke:
        a.requests, a.seconds, a.clients = 40, 1.0, 8
    result = asyncio.run(run(a.requests, a.clients, a.seconds))
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
