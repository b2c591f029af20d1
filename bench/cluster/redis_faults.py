"""Fleet faults, measured: the scenarios tests/test_cluster_faults.py asserts on
every run, with their figures kept (real redis-server, redis-sentinel, `tierq
serve` and `tierq sim` processes on loopback ports, TCP relays in front of
Redis for the slow link and the split; tests/cluster_harness.py drives them).

- Slow Redis: host 0's Redis behind a relay that holds each call 50 ms
  (`--delay-ms`); requests one after another through host 0 with a key
  limited per minute (a key decision in Redis on every request), rounds
  alternating between the relay passing at once and delaying, in the same
  run: p50 and p99 of each and what the delay added.
- Sentinel failover: a primary, its replica and 3 sentinels (down after
  500 ms); two hosts finding the primary through the sentinels, limit 4,
  8 closed-loop clients; the primary killed -9: seconds until the replica is
  promoted and until both hosts lease from it, the sim's in-flight high-water
  mark across it and after, then the probes (every slot usable, 12 at once
  never over 4). `--failovers` times.
- Network split in "local" mode: host 0's relay turned into a black hole for
  1.5 s after the other hosts saw its lease run out, 12 closed-loop clients,
  limit L over H hosts: the sim's in-flight high-water mark before, while split
  and after, against the bound L + floor(L / H). Two setups (2 hosts, L 4;
  3 hosts, L 6), `--splits` times each.

    python bench/cluster/redis_faults.py [--delay-ms 50] [--rounds 5] [--failovers 3]
                                         [--splits 3] [--smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from cluster_harness import Cluster, Replicated, failover, slow_redis, split, start_cluster  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from tcp_relay import Relay  # noqa: E402

from tierq.keys import KeyStore  # noqa: E402


async def one_slow(tmp: Path, delay_ms: float, rounds: int, per_round: int) -> dict[str, Any]:
    folder = tmp / "slow"
    folder.mkdir()
    redis = RedisServer(folder / "redis")
    redis.start()
    relay = Relay("127.0.0.1", redis.port)
    relay.start()
    made: list[Cluster] = []
    try:
        db = folder / "keys.db"
        with KeyStore(str(db)) as store:
            _, token = store.create("limited", rpm=1_000_000)
        c = await start_cluster(folder, redis.url, hosts=2, limit=4, ttft_ms=5, made=made,
                                keys_db=db, redis_urls=[relay.url(), redis.url])
        got = await slow_redis(c, relay, delay_ms / 1000, rounds=rounds, per_round=per_round,
                               token=token)
        got["redis_up_after"] = bool((await c.status(0))["cluster"]["redis_up"])
        return got
    finally:
        for c in made:
            await c.close()
        relay.stop()
        redis.stop()


async def one_failover(tmp: Path, n: int) -> dict[str, Any]:
    folder = tmp / f"failover{n}"
    folder.mkdir()
    rep = Replicated(folder / "redis")
    made: list[Cluster] = []
    try:
        await rep.start()
        c = await start_cluster(folder, "redis://127.0.0.1:9/0", hosts=2, limit=4, ttft_ms=100,
                                made=made, cluster_extra=rep.extra)
        got = await failover(c, rep, limit=4, clients=8)
        got["rejoined_logged"] = all("rejoined" in p.log.read_text() for p in c.procs)
        return got
    finally:
        for c in made:
            await c.close()
        rep.stop()


async def one_split(tmp: Path, hosts: int, limit: int, n: int) -> dict[str, Any]:
    folder = tmp / f"split{hosts}-{n}"
    folder.mkdir()
    redis = RedisServer(folder / "redis")
    redis.start()
    relays = [Relay("127.0.0.1", redis.port) for _ in range(hosts)]
    for r in relays:
        r.start()
    made: list[Cluster] = []
    try:
        c = await start_cluster(folder, redis.url, hosts=hosts, limit=limit, ttft_ms=200, made=made,
                                redis_urls=[r.url() for r in relays])
        got = await split(c, relays, limit=limit, seconds=1.5, clients=12)
        got["rejoined_logged"] = "rejoined" in c.procs[0].log.read_text()
        return got
    finally:
        for c in made:
            await c.close()
        for r in relays:
            r.stop()
        redis.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--rounds", type=int, default=5, help="slow-Redis rounds of 20 requests each way")
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="1 round, 1 failover, 1 split of 2 hosts")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/cluster_redis_faults.json")
    a = ap.parse_args()
    setups = [(2, 4), (3, 6)]
    per_round = 20
    if a.smoke:
        a.rounds, a.failovers, a.splits, per_round, setups = 1, 1, 1, 5, [(2, 4)]
    with tempfile.TemporaryDirectory(prefix="tierq-faults-") as d:
        tmp = Path(d)
        slow = await one_slow(tmp, a.delay_ms, a.rounds, per_round)
        failovers = [await one_failover(tmp, n) for n in range(a.failovers)]
        splits = [await one_split(tmp, h, lim, n) for h, lim in setups for n in range(a.splits)]
    result = {"slow_redis": slow, "failovers": failovers, "splits": splits}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    b, s = slow["baseline"], slow["slowed"]
    print(f"Redis +{a.delay_ms:g} ms a call ({b['n']} requests each way, "
          f"{slow['redis_calls_per_request']} Redis calls a request): p50 {b['p50_ms']} -> {s['p50_ms']} ms, "
          f"p99 {b['p99_ms']} -> {s['p99_ms']} ms, added p50 {slow['added_p50_ms']} ms, "
          f"added p99 {slow['added_p99_ms']} ms")
    print("| failover | promoted (s) | both hosts follow (s) | max in flight across / after | statuses | probe |")
    print("|---:|---:|---:|---|---|---|")
    for n, f in enumerate(failovers):
        print(f"| {n + 1} | {f['promoted_s']} | {f['followed_s']} | {f['max_in_flight_failover']} / "
              f"{f['max_in_flight_after']} | {f['statuses']} | 12 at once: max {f['max_in_flight_burst']} |")
    print("| hosts | limit | bound L + floor(L/H) | max in flight before / split / after | over | lease expired (s) |")
    print("|---:|---:|---:|---|---:|---:|")
    for sp in splits:
        print(f"| {sp['hosts']} | {sp['limit']} | {sp['bound']} | {sp['max_in_flight_before']} / "
              f"{sp['max_in_flight_split']} / {sp['max_in_flight_after']} | {sp['over_admission']} "
              f"| {sp['lease_expired_s']} |")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except aiohttp.ClientError as e:
        sys.exit(f"redis_faults: {e}")
