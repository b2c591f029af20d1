"""Fleet faults with real servers (issue #22): worker 0 of a two-worker host
killed, the Redis primary killed under load with sentinels failing over to its
replica, Redis slowed by 50 ms a call, and a network split between one host
and Redis in "local" mode. Real `tierq serve` and `tierq sim` processes, real
redis-server and redis-sentinel, a TCP relay the test owns
(tests/tcp_relay.py) for the slow link and the split. No timing asserted
beyond what the delay itself guarantees and generous bounds;
bench/cluster/redis_faults.py measures the figures docs/operations.md gives."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tierq.config import ConfigError, load_config
from tierq.keys import KeyStore
from redis_server import RedisServer, redis_server  # noqa: F401  (the fixture)
from cluster_harness import (TTL_MS, Cluster, Replicated, failover, load, redis_leases, sim_reset,
                             slow_redis, split, start_cluster, wait_for, worker_pid)
from tcp_relay import Relay

MakeCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def made(tmp_path: Path) -> AsyncIterator[list[Cluster]]:
    out: list[Cluster] = []
    yield out
    for c in out:
        await c.close()


@pytest.fixture
def relays() -> Any:
    out: list[Relay] = []
    yield out
    for r in out:
        r.stop()


async def _idle(c: Cluster) -> None:
    async def idle() -> bool:
        return all([(await c.status(i))["pools"][0]["in_flight"] == 0 for i in range(len(c.hosts))])

    await wait_for(idle, 20, "nothing in flight")


async def _host_runs_all(c: Cluster, host: int, limit: int) -> None:
    """`limit` requests sent to host `host` at once are all in flight together
    (the host leases every slot of the cluster), then all answered 200."""
    await _idle(c)
    reqs = [asyncio.ensure_future(c.chat(host, timeout_s=60)) for _ in range(limit)]

    async def all_in() -> bool:
        return bool((await c.status(host))["pools"][0]["in_flight"] == limit)

    await wait_for(all_in, 20, f"host {host} runs {limit} at once: {c.logs()}")
    assert [r[0] for r in await asyncio.gather(*reqs)] == [200] * limit


async def test_worker_0_killed_its_replacement_takes_the_leases_up_and_no_slot_is_lost(
        tmp_path: Path, redis_server: RedisServer, made: list[Cluster]) -> None:  # noqa: F811
    c = await start_cluster(tmp_path, redis_server.url, hosts=2, limit=4, ttft_ms=300, workers=2,
                            made=made)
    stop = asyncio.Event()
    statuses: list[int] = []
    loads = [asyncio.ensure_future(load(c, stop, statuses)) for _ in range(8)]
    await asyncio.sleep(1.0)
    first = worker_pid(c, 0, 0)
    assert first is not None
    await sim_reset(c)
    _, _, kill_ms = await redis_leases(redis_server.url)
    os.kill(first, signal.SIGKILL)
    killed = time.monotonic()

    async def replaced() -> bool:
        pid = worker_pid(c, 0, 0)
        return pid is not None and pid != first

    await wait_for(replaced, 20, "the supervisor forks a new worker 0")

    async def agent_back() -> bool:
        _, seen, _ = await redis_leases(redis_server.url)
        # Only the agent writes the deadline (worker 1 just reads): one a full
        # TTL after the kill is the new agent's.
        return seen.get("host-0", 0) >= kill_ms + TTL_MS and (await c.status(0))["cluster"]["agent"]

    await wait_for(agent_back, 20, "host 0's lease renewed by the new worker 0")
    took = time.monotonic() - killed
    await asyncio.sleep(1.0)  # the load goes on across the takeover
    stop.set()
    await asyncio.gather(*loads)
    log = c.procs[0].log.read_text()
    assert f"worker 0 (pid {first}) exited with -9; reclaimed" in log, log[-3000:]
    # Requests worker 0 held died with it (their connections reset: -1); every
    # other request was served; the limit held across the takeover.
    assert set(statuses) <= {200, -1} and statuses.count(200) > 0, statuses
    assert (await c.sim_stats())["max_in_flight_seen"] <= 4
    await _idle(c)
    lease, seen, now = await redis_leases(redis_server.url)
    assert set(lease) == {"host-0", "host-1"} and sum(lease.values()) <= 4, lease
    # No slot lost: host 0 (its new agent) leases all four again, then host 1.
    await _host_runs_all(c, 0, 4)
    await _host_runs_all(c, 1, 4)
    assert (await c.sim_stats())["max_in_flight_seen"] <= 4
    print(f"worker 0 replaced, lease renewed {took:.2f} s after the kill; statuses "
          f"{statuses.count(200)} x 200, {statuses.count(-1)} reset")


async def test_primary_killed_under_load_hosts_follow_the_sentinel_failover_and_the_limit_holds(
        tmp_path: Path, made: list[Cluster]) -> None:
    rep = Replicated(tmp_path / "redis")
    try:
        await rep.start()
        # redis_url's host is never reached (nothing listens on port 9): the
        # primary's address comes from the sentinels.
        c = await start_cluster(tmp_path, "redis://127.0.0.1:9/0", hosts=2, limit=4, ttft_ms=100,
                                made=made, cluster_extra=rep.extra)
        assert "sentinel master tierq via 127.0.0.1:" in c.procs[0].log.read_text()
        got = await failover(c, rep, limit=4, clients=8)
        # Under load across the failover: every request answered (in "local"
        # mode the hosts serve their shares while no primary answers), and
        # never more than the limit at the sim, then or after.
        assert set(got["statuses"]) == {"200"}, got
        assert got["max_in_flight_failover"] <= 4 and got["max_in_flight_after"] <= 4, got
        # Once idle: every slot usable again, and 12 at once never run more than 4.
        assert got["probe_statuses"] == [200] * 4 and got["probe_reached"] == 4, got
        assert got["burst_statuses"] == {"200": 12} and got["max_in_flight_burst"] <= 4, got
        assert sum(got["leases_after"].values()) <= 4, got
        for p in c.procs:
            assert "rejoined" in p.log.read_text(), c.logs()
        print(f"failover: {got}")
    finally:
        rep.stop()


async def test_redis_slowed_50_ms_a_call_admission_still_answers_and_the_added_p99_is_reported(
        tmp_path: Path, redis_server: RedisServer, made: list[Cluster],  # noqa: F811
        relays: list[Relay]) -> None:
    db = tmp_path / "keys.db"
    with KeyStore(str(db)) as store:
        _, token = store.create("limited", rpm=1_000_000)  # a key decision in Redis each request
    relay = Relay("127.0.0.1", redis_server.port)
    relay.start()
    relays.append(relay)
    c = await start_cluster(tmp_path, redis_server.url, hosts=2, limit=4, ttft_ms=5, made=made,
                            keys_db=db, redis_urls=[relay.url(), redis_server.url])
    got = await slow_redis(c, relay, 0.050, rounds=3, per_round=10, token=token)
    # Each request's key decision is a Redis round trip: none can be quicker
    # than the delay (a lower bound the relay guarantees, not a timing guess).
    assert got["slowed"]["min_ms"] >= 50, got
    assert got["added_p50_ms"] >= 40, got
    # Contended while slow: 16 requests at once over both hosts, all served,
    # the limit held (host 0 leases through the slow link).
    relay.delay_s = 0.050
    await sim_reset(c)
    results = await asyncio.gather(*(c.chat(i % 2, token=token) for i in range(16)))
    assert [r[0] for r in results] == [200] * 16, c.logs()
    assert (await c.sim_stats())["max_in_flight_seen"] <= 4
    assert (await c.status(0))["cluster"]["redis_up"], "a 50 ms call is within the socket timeout"
    print(f"Redis +50 ms a call: p50 {got['baseline']['p50_ms']} -> {got['slowed']['p50_ms']} ms, "
          f"p99 {got['baseline']['p99_ms']} -> {got['slowed']['p99_ms']} ms "
          f"(added p99 {got['added_p99_ms']} ms)")


async def test_a_network_split_in_local_mode_over_admits_at_most_the_split_hosts_share(
        tmp_path: Path, redis_server: RedisServer, made: list[Cluster],  # noqa: F811
        relays: list[Relay]) -> None:
    for _ in range(2):
        relay = Relay("127.0.0.1", redis_server.port)
        relay.start()
        relays.append(relay)
    c = await start_cluster(tmp_path, redis_server.url, hosts=2, limit=4, ttft_ms=200, made=made,
                            redis_urls=[r.url() for r in relays])
    got = await split(c, relays, limit=4, seconds=1.5, clients=12)
    # Before: the limit. Split: host 0 keeps its share (4 / 2 hosts) while
    # host 1, once host 0's lease ran out, leases all 4: at most 4 + 2.
    # After the rejoin: the limit again.
    assert got["max_in_flight_before"] <= 4, got
    assert got["split_host_share"] == 2, got
    assert got["max_in_flight_split"] <= got["bound"] == 6, got
    assert got["max_in_flight_after"] <= 4, got
    assert set(got["statuses"]) == {"200"}, got
    assert "rejoined" in c.procs[0].log.read_text()
    await _host_runs_all(c, 1, 4)
    print(f"split: {got}")


def test_sentinel_keys_and_their_one_line_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text('[cluster]\nredis_url = "redis://:secret@h:6379/2"\n'
                   'sentinels = ["s1:26379", "[::1]:26380"]\nsentinel_master = "tierq"\n')
    cl = load_config(cfg).cluster
    assert cl is not None and cl.sentinels == (("s1", 26379), ("::1", 26380))
    assert cl.sentinel_master == "tierq"
    for body, key in [('sentinels = ["s1:26379"]', "cluster.sentinel_master"),
                      ('sentinel_master = "tierq"', "cluster.sentinels"),
                      ('sentinels = "s1:26379"\nsentinel_master = "m"', "cluster.sentinels"),
                      ('sentinels = []\nsentinel_master = "m"', "cluster.sentinels"),
                      ('sentinels = ["s1"]\nsentinel_master = "m"', "cluster.sentinels"),
                      ('sentinels = ["s1:0"]\nsentinel_master = "m"', "cluster.sentinels"),
                      ('sentinels = [26379]\nsentinel_master = "m"', "cluster.sentinels")]:
        cfg.write_text('[cluster]\nredis_url = "redis://:secret@h"\n' + body + "\n")
        with pytest.raises(ConfigError) as e:
            load_config(cfg)
        assert key in str(e.value) and "secret" not in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
