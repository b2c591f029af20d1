"""/metrics in Prometheus text format, /status.json, and snapshot aggregation."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from conftest import PLAIN_MODEL, PRIORITY_MODEL, GatewayFactory, Running, model_config
from tierq.config import Config, LedgerConfig, UpstreamConfig
from tierq.metrics import (
    LATENCY_BUCKETS_S,
    GatewayMetrics,
    Histogram,
    PoolSnapshot,
    WorkerSnapshot,
    render_prometheus,
    status_json,
)

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$')


def parse(text: str) -> dict[str, float]:
    """Strictly parse Prometheus text 0.0.4: every sample under its declared family."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"family {name} declared twice"
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        family = next((f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in types),
                      None)
        assert family is not None, f"{name} has no # TYPE"
        if types[family] == "counter":
            assert name.endswith("_total"), name
        key = name + (m.group(2) or "")
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(m.group(3))
    return samples


async def scrape(gw: Running) -> tuple[str, dict[str, float]]:
    async with aiohttp.ClientSession() as s, s.get(gw.root + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await r.text()
    return text, parse(text)


async def chat(gw: Running, model: str, tier: str = "default", stream: bool = False,
               max_tokens: int = 4) -> int:
    body = {"model": model, "service_tier": tier, "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}]}
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + "/chat/completions", data=orjson.dumps(body),
            headers={"Content-Type": "application/json"}) as r:
        await r.read()
        return r.status


def check_histogram(samples: dict[str, float], name: str, labels: str) -> float:
    """Buckets are cumulative and end at +Inf == _count; returns the count."""
    inner = labels + "," if labels else ""
    counts = [samples[f'{name}_bucket{{{inner}le="{float(b)!r}"}}'] for b in LATENCY_BUCKETS_S
              if f'{name}_bucket{{{inner}le="{float(b)!r}"}}' in samples]
    inf = samples[f'{name}_bucket{{{inner}le="+Inf"}}']
    assert counts == sorted(counts) and (not counts or counts[-1] <= inf)
    assert samples[f"{name}_count{{{labels}}}" if labels else f"{name}_count"] == inf
    return inf


async def test_metrics_count_served_shed_and_time_per_tier_in_prometheus_format(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(
        models=[model_config(PRIORITY_MODEL, max_concurrency=1, queue_depth=0),
                model_config(PLAIN_MODEL)],
        sim={"ttft_ms": 30.0, "tokens_per_s": 100.0})
    # One streamed priority request holds the only slot; a default one is shed meanwhile.
    held = asyncio.create_task(chat(gw, PRIORITY_MODEL, "priority", stream=True, max_tokens=8))
    for _ in range(200):
        if gw.gw.pools[PRIORITY_MODEL].admission.stats()["in_flight"] == 1:
            break
        await asyncio.sleep(0.005)
    assert await chat(gw, PRIORITY_MODEL, "default") == 429
    _, live = await scrape(gw)
    assert live[f'tierq_in_flight{{model="{PRIORITY_MODEL}"}}'] == 1
    assert live[f'tierq_max_concurrency{{model="{PRIORITY_MODEL}"}}'] == 1
    assert await held == 200
    assert await chat(gw, PLAIN_MODEL, "priority") == 200  # not priority-enabled: default
    await gw.ledger.flush()

    _, m = await scrape(gw)
    p = f'model="{PRIORITY_MODEL}"'
    assert m["tierq_ready"] == 1 and m["tierq_workers"] == 1
    assert m[f'tierq_in_flight{{{p}}}'] == 0
    assert m[f'tierq_queue_depth{{{p},lane="priority"}}'] == 0
    assert m[f'tierq_queue_depth{{{p},lane="default"}}'] == 0
    assert m[f'tierq_admitted_total{{{p},tier="priority"}}'] == 1
    assert m[f'tierq_admission_shed_total{{{p},code="server_overloaded"}}'] == 1
    assert m[f'tierq_requests_total{{{p},tier="priority",status="served"}}'] == 1
    assert m[f'tierq_requests_total{{{p},tier="default",status="shed"}}'] == 1
    assert m[f'tierq_shed_total{{{p},tier="default",code="server_overloaded"}}'] == 1
    assert m[f'tierq_requests_total{{model="{PLAIN_MODEL}",tier="default",status="served"}}'] == 1
    assert check_histogram(m, "tierq_time_to_first_token_seconds", 'tier="priority"') == 1
    assert check_histogram(m, "tierq_request_duration_seconds", 'tier="priority"') == 1
    assert check_histogram(m, "tierq_request_duration_seconds", 'tier="default"') == 1
    check_histogram(m, "tierq_queue_wait_seconds", 'tier="default"')
    # The stream's first token came after the sim's 30 ms and before its end. (Not
    # "8 tokens at 100/s after it": a loaded machine may deliver them in a burst.)
    ttft = m['tierq_time_to_first_token_seconds_sum{tier="priority"}']
    total = m['tierq_request_duration_seconds_sum{tier="priority"}']
    assert 0.03 <= ttft < total
    # The ledger: three rows committed, none pending, lag observed per batch.
    assert m["tierq_ledger_rows_total"] == 3 and m["tierq_ledger_pending_rows"] == 0
    assert m["tierq_ledger_commit_errors_total"] == 0
    assert check_histogram(m, "tierq_ledger_write_lag_seconds", "") >= 1
    # Cost per model and applied tier: the ledger rows' costs summed, the shed one free.
    billed: dict[tuple[str, str], Decimal] = {}
    for row in await gw.rows():
        if row.cost:
            billed[row.model, row.applied_tier] = billed.get((row.model, row.applied_tier), Decimal(0)) + row.cost
    assert set(billed) == {(PRIORITY_MODEL, "priority"), (PLAIN_MODEL, "default")}
    for (model, tier), usd in billed.items():
        assert m[f'tierq_cost_usd_total{{model="{model}",tier="{tier}"}}'] == float(usd)
    assert len([k for k in m if k.startswith("tierq_cost_usd_total")]) == 2, "nothing for the shed"


async def test_upstream_errors_are_counted_per_model_upstream_and_code(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("dead", "http://127.0.0.1:9/v1", "vllm",
                                              connect_timeout_s=2.0),),
                    models=(replace(model_config(PRIORITY_MODEL), upstream="dead"),))
    gw = await make_gateway(config=config)
    assert await chat(gw, PRIORITY_MODEL, "priority") == 502
    _, m = await scrape(gw)
    key = (f'tierq_upstream_errors_total{{model="{PRIORITY_MODEL}",upstream="dead",'
           f'code="upstream_unavailable"}}')
    assert m[key] == 1
    assert m[f'tierq_requests_total{{model="{PRIORITY_MODEL}",tier="priority",status="failed"}}'] == 1


async def test_status_json_lists_pools_busy_first_with_lanes_totals_and_series(
    gateway: Running,
) -> None:
    assert await chat(gateway, PRIORITY_MODEL, "priority") == 200
    assert await chat(gateway, PRIORITY_MODEL, "default") == 200
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.root + "/status.json") as r:
            data: dict[str, Any] = await r.json()
        async with s.get(gateway.root + "/status") as r:
            page = await r.text()
            assert r.content_type == "text/html"
            assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
    # Self-contained: nothing loaded from anywhere else.
    assert "status.json" in page and not re.search(r'(src|href)="(https?:)?//', page)
    assert data["ready"] is True and data["workers"] == 1
    first = data["pools"][0]
    assert first["model"] == PRIORITY_MODEL and first["priority"] is True
    assert first["admitted"] == {"priority": 1, "default": 1, "flex": 0}
    assert first["depth"] == {"priority": 0, "default": 0, "flex": 0} and first["in_flight"] == 0
    assert data["totals"]["priority"]["served"] == 1 and data["totals"]["default"]["served"] == 1
    points = data["series"]["points"]
    assert all(b["t"] - a["t"] == data["series"]["step_s"] for a, b in zip(points, points[1:]))
    served = [p for p in points if p["priority"]["served"]]
    assert served and served[-1]["priority"]["latency_ms"] > 0


# ------------------------------------------------------------------ units


def test_histogram_puts_a_value_equal_to_a_bound_in_that_bucket() -> None:
    h = Histogram((0.01, 0.1))
    for v in (0.0, 0.01, 0.010001, 0.1, 5.0):
        h.observe(v)
    assert h.counts == [2, 2, 1] and h.sum_us == 10000 + 10001 + 100000 + 5000000


def _snapshot(in_flight: int, served: int, pid: int) -> WorkerSnapshot:
    m = GatewayMetrics()
    for _ in range(served):
        m.observe("m", "up", "priority", "served", None, 0.0, 0.2, 0.05)
    m.observe("m", "up", "default", "shed", "queue_timeout", 0.5, 0.5, None)
    stats = {"depth": {"priority": 1, "default": 2, "flex": 0}, "in_flight": in_flight, "limit": 4,
             "admitted": {"priority": served, "default": 0, "flex": 0},
             "shed": {"server_overloaded": 0, "queue_timeout": 1, "rate_limit_exceeded": 0},
             "cancelled": 0}
    snap = m.snapshot([PoolSnapshot("m", "up", True, 8, stats)], ready=True)
    return replace(snap, pid=pid)


def test_many_worker_snapshots_sum_counters_and_histograms() -> None:
    snaps = [_snapshot(1, 2, 101), _snapshot(3, 5, 102)]
    m = parse(render_prometheus(snaps))
    assert m["tierq_workers"] == 2
    assert m['tierq_requests_total{model="m",tier="priority",status="served"}'] == 7
    assert m['tierq_shed_total{model="m",tier="default",code="queue_timeout"}'] == 2
    assert m['tierq_request_duration_seconds_count{tier="priority"}'] == 7
    assert abs(m['tierq_request_duration_seconds_sum{tier="priority"}'] - 1.4) < 1e-9
    assert m['tierq_request_duration_seconds_bucket{tier="priority",le="0.25"}'] == 7
    assert m['tierq_request_duration_seconds_bucket{tier="priority",le="0.1"}'] == 0
    # Per-process admission state: pool numbers add up.
    assert m['tierq_in_flight{model="m"}'] == 4
    assert m['tierq_queue_depth{model="m",lane="default"}'] == 4
    assert m['tierq_admitted_total{model="m",tier="priority"}'] == 7
    # Shared admission state: every worker sees the same pool, so it is read once.
    shared = parse(render_prometheus(snaps, shared_admission=True))
    assert shared['tierq_requests_total{model="m",tier="priority",status="served"}'] == 7
    assert shared['tierq_queue_depth{model="m",lane="default"}'] == 2
    assert shared['tierq_max_concurrency{model="m"}'] == 4
    status = status_json(snaps, shared_admission=True)
    assert status["workers"] == 2 and status["totals"]["priority"]["served"] == 7
    assert status["pools"][0]["depth"] == {"priority": 1, "default": 2, "flex": 0}
    last = [p for p in status["series"]["points"] if p["priority"]["served"]][-1]
    assert last["priority"]["served"] == 7 and last["priority"]["latency_ms"] == 200.0
    assert last["priority"]["ttft_ms"] == 50.0 and last["default"]["shed"] == 2


def test_label_values_are_escaped() -> None:
    m = GatewayMetrics()
    m.observe('we"ird\\model\nx', "up", "default", "served", None, 0.0, 0.1, 0.1)
    text = render_prometheus([m.snapshot([], ready=False)])
    assert 'model="we\\"ird\\\\model\\nx"' in text
    assert parse(text)["tierq_ready"] == 0


def test_downgrades_are_counted_per_model_and_reason_and_summed_over_workers() -> None:
    from tierq.metrics import snapshot_from_json, snapshot_to_json

    workers = []
    for pid, budget in ((201, 2), (202, 3)):
        m = GatewayMetrics()
        for _ in range(budget):
            m.observe_downgrade("m", "budget")
        m.observe_downgrade("n", "ramp")
        # Exchanged between workers as JSON, as tierq.workers.SnapshotBoard does.
        workers.append(snapshot_from_json(snapshot_to_json(replace(m.snapshot([], ready=True),
                                                                    pid=pid))))
    text = render_prometheus(workers)
    samples = parse(text)
    assert "# TYPE tierq_downgrades_total counter" in text
    assert samples['tierq_downgrades_total{model="m",reason="budget"}'] == 5
    assert samples['tierq_downgrades_total{model="n",reason="ramp"}'] == 2
    assert 'tierq_downgrades_total{model="m",reason="ramp"}' not in samples
    assert status_json(workers)["downgrades"] == {
        "ramp": 2, "budget": 5,
        "models": {"m": {"ramp": 0, "budget": 5}, "n": {"ramp": 2, "budget": 0}}}
    # None made: the family is still declared, with no sample.
    empty = render_prometheus([GatewayMetrics().snapshot([], ready=True)])
    assert "# TYPE tierq_downgrades_total counter" in empty
    assert status_json([GatewayMetrics().snapshot([], ready=True)])["downgrades"] == {
        "ramp": 0, "budget": 0, "models": {}}


def test_replicas_and_retries_reach_metrics_and_status_through_the_worker_exchange() -> None:
    from tierq.health import ReplicaState
    from tierq.metrics import REPLICA_STATES, replica_line, snapshot_from_json, snapshot_to_json

    assert set(REPLICA_STATES) == {s.value for s in ReplicaState}
    lines = (
        replica_line("http://a:8000/v1", {"in_flight": 3, "limit": 4, "waiting": 1, "grants": 10},
                     {"health": "healthy", "ejections": 0}, (1000, 250)),
        replica_line("http://b:8000/v1", {"in_flight": 0, "limit": 1, "waiting": 0, "grants": 2},
                     {"health": "slow_start", "ejections": 2}, None),
    )
    m = GatewayMetrics()
    m.observe_retry("m", "up", "unreachable")
    m.observe_retry("m", "up", "unreachable")
    m.observe_retry("m", "up", "failed")
    pools = [PoolSnapshot("m", "up", True, 8, {"limit": 5}, replicas=lines),
             PoolSnapshot("n", "up", True, 8, {"limit": 5}, replicas=lines)]
    snap = snapshot_from_json(snapshot_to_json(m.snapshot(pools, ready=True)))
    text = render_prometheus([snap])
    samples = parse(text)
    assert samples['tierq_replica_in_flight{model="m",replica="0"}'] == 3
    assert samples['tierq_replica_limit{model="n",replica="1"}'] == 1
    assert samples['tierq_replica_grants_total{model="m",replica="0"}'] == 10
    # Health is the upstream's: once per upstream, however many pools it serves.
    assert samples['tierq_replica_health{upstream="up",replica="1",state="slow_start"}'] == 1
    assert samples['tierq_replica_health{upstream="up",replica="1",state="ejected"}'] == 0
    assert text.count('tierq_replica_health{upstream="up",replica="0",state="healthy"}') == 1
    assert samples['tierq_replica_ejections_total{upstream="up",replica="1"}'] == 2
    assert samples['tierq_replica_prefix_cache_hit_ratio{upstream="up",replica="0"}'] == 0.25
    assert 'tierq_replica_prefix_cache_hit_ratio{upstream="up",replica="1"}' not in samples
    assert samples['tierq_upstream_retries_total{model="m",upstream="up",reason="unreachable"}'] == 2
    assert samples['tierq_upstream_retries_total{model="m",upstream="up",reason="failed"}'] == 1
    pool = next(p for p in status_json([snap])["pools"] if p["model"] == "m")
    assert [r["endpoint"] for r in pool["replicas"]] == ["http://a:8000/v1", "http://b:8000/v1"]
    assert pool["replicas"][0]["prefix_hit_rate"] == 0.25 and pool["replicas"][1]["health"] == "slow_start"
    # A pool of one endpoint shows no replica families and no "replicas" key.
    plain = m.snapshot([PoolSnapshot("m", "up", True, 8, {"limit": 5})], ready=True)
    assert "tierq_replica_limit" not in render_prometheus([plain])
    assert "replicas" not in status_json([plain])["pools"][0]


def test_the_board_leaves_out_a_worker_whose_process_is_gone(tmp_path: Path) -> None:
    # A killed worker's file stays until its replacement publishes: read as
    # live it made /status.json count the dead worker and report its config.
    import subprocess

    from tierq.workers import SnapshotBoard

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = GatewayMetrics().snapshot([], ready=True)
    SnapshotBoard(str(tmp_path), 1, 3).publish(replace(live, pid=os.getpid()))
    SnapshotBoard(str(tmp_path), 2, 3).publish(replace(live, pid=dead.pid))
    assert [s.pid for s in SnapshotBoard(str(tmp_path), 0, 3).others()] == [os.getpid()]
