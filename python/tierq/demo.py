"""`tierq demo`: the gateway and a simulated backend under a mixed overload.

It starts a sim with a few slots the gateway is not told about, a gateway in
front of it (the pool learns the limit from the sim's /metrics), and clients
that stream with a share of them asking for the priority tier and a share
(`FLEX_SHARE`) for flex; then prints, per tier, requests, served, shed, time to
first token and cost.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from tierq.config import AdmissionConfig, Config, LedgerConfig, ModelConfig, SimSettings, UpstreamConfig
from tierq.pricing import decimal_text
from tierq.tiers import Tier

__all__ = ["DEMO_MODEL", "run_demo"]

DEMO_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
# The share of requests asking for flex: served from what the others leave idle.
FLEX_SHARE = 0.2


def run_demo(duration: float, clients: int, priority_share: float, replicas: int = 1) -> int:
    """`tierq demo`: the run, then its table on stdout; 2 for arguments out of range.
    `replicas`: that many sims behind the one pool (`[upstreams.sim] replicas`)."""
    import uvloop

    if duration <= 0 or clients < 1 or not 0 <= priority_share <= 1 or not 1 <= replicas <= 16:
        print("tierq demo: --duration > 0, --clients >= 1, 0 <= --priority-share <= 1, "
              "1 <= --replicas <= 16", file=sys.stderr)
        return 2
    results = uvloop.run(_demo_run(duration, clients, priority_share, replicas))
    _demo_table(results)
    return 0


async def _demo_run(duration: float, clients: int, priority_share: float,
                    replicas: int = 1) -> list[dict[str, Any]]:
    import aiohttp
    import orjson
    from aiohttp import web

    from tierq.app import GATEWAY, create_app, runner_kwargs
    from tierq.embedded import start_sims

    slots = 4
    tmp = tempfile.TemporaryDirectory(prefix="tierq-demo-")
    config = Config(
        ledger=LedgerConfig(url=f"sqlite:///{Path(tmp.name) / 'demo.db'}"),
        upstreams=(UpstreamConfig("sim", "", "sim", priority_scheduling=True,
                                  sim=SimSettings(slots, 40.0, 200.0, replicas)),),
        # No max_concurrency: the pool learns the sim's slots from its /metrics,
        # as it would a vLLM engine's, so the line forms in tierq's lanes.
        models=(ModelConfig(DEMO_MODEL, "sim", priority=True, flex=True, admission=AdmissionConfig(
            queue_depth=8 * slots,
            max_wait_ms={Tier.DEFAULT: 1500, Tier.PRIORITY: 10000, Tier.FLEX: 3000})),),
    )
    # The sims start with the app (one per replica) and stop with it.
    app = create_app(config, start_sims=start_sims)
    runner = web.AppRunner(app, **runner_kwargs())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + duration
    rng = random.Random(7)

    async def one(session: aiohttp.ClientSession) -> None:
        draw = rng.random()
        tier = (Tier.PRIORITY if draw < priority_share else
                Tier.FLEX if draw < priority_share + FLEX_SHARE * (1 - priority_share) else Tier.DEFAULT)
        body = {"model": DEMO_MODEL, "stream": True, "max_tokens": 16, "service_tier": tier,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "say something"}]}
        t0 = time.monotonic()
        r: dict[str, Any] = {"tier": tier, "status": "failed", "ttft_ms": None,
                             "cost": Decimal(0)}
        async with session.post(url, data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as resp:
            if resp.status == 429:
                r["status"] = "shed"
                await resp.read()
                retry = float(resp.headers.get("retry-after-ms", "100")) / 1000
                results.append(r)
                await asyncio.sleep(min(retry, 0.5))
                return
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = orjson.loads(line[6:])
                choices = chunk.get("choices") or []
                if r["ttft_ms"] is None and any(c.get("delta", {}).get("content") for c in choices):
                    r["ttft_ms"] = (time.monotonic() - t0) * 1000
                usage = chunk.get("usage")
                if usage:
                    # Decimal from the exact digits the gateway rendered.
                    raw = line[line.index(b'"estimated_cost":') + 17:]
                    r["cost"] = Decimal(raw.split(b"}")[0].split(b",")[0].decode())
            r["status"] = "served" if resp.status == 200 else "failed"
        results.append(r)

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            try:
                await one(session)
            except aiohttp.ClientError:
                results.append({"tier": Tier.DEFAULT, "status": "failed", "ttft_ms": None,
                                "cost": Decimal(0)})

    async def progress() -> None:
        start = time.monotonic()
        while True:
            done = min(1.0, (time.monotonic() - start) / duration)
            bar = "#" * int(done * 30)
            served = sum(1 for r in results if r["status"] == "served")
            shed = sum(1 for r in results if r["status"] == "shed")
            sys.stderr.write(f"\r[{bar:<30}] {done * 100:5.1f}%  served {served:5d}  "
                             f"shed {shed:5d}")
            sys.stderr.flush()
            if done >= 1.0:
                break
            await asyncio.sleep(0.2)

    try:
        print(f"tierq demo: {clients} clients, {priority_share:.0%} priority, "
              f"{FLEX_SHARE * (1 - priority_share):.0%} flex, against "
              f"{'a sim' if replicas == 1 else f'{replicas} sims'} "
              f"with {slots} slots (40 ms TTFT, 200 tok/s) the gateway is not told about, "
              f"for {duration:g}s", file=sys.stderr)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as s:
            bar = asyncio.create_task(progress())
            await asyncio.gather(*(client(s) for _ in range(clients)))
            await bar
        sys.stderr.write("\n")
        pool = app[GATEWAY].pools[DEMO_MODEL]
        limit = pool.admission.stats()
        if pool.replicas is None:
            print(f"the pool learned a concurrency limit of {limit['limit']} from the sim's "
                  f"/metrics (signal: {limit['limit_signal']}; the sim has {slots} slots)",
                  file=sys.stderr)
        else:
            each = pool.replicas.stats()
            print(f"the pool learned a concurrency limit of {limit['limit']}: "
                  f"{' + '.join(str(r['limit']) for r in each)} from each sim's /metrics "
                  f"(each has {slots} slots); requests per sim "
                  f"{' / '.join(str(r['grants']) for r in each)}", file=sys.stderr)
    finally:
        await runner.cleanup()
        tmp.cleanup()
    return results


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.0f}"


def _demo_table(results: list[dict[str, Any]]) -> None:
    rows = [("TIER", "REQUESTS", "SERVED", "SHED", "TTFT p50 ms", "TTFT p99 ms", "COST USD")]
    for tier in Tier:
        rs = [r for r in results if r["tier"] == tier]
        ttft = [r["ttft_ms"] for r in rs if r["ttft_ms"] is not None]
        rows.append((tier, str(len(rs)), str(sum(r["status"] == "served" for r in rs)),
                     str(sum(r["status"] == "shed" for r in rs)), _pct(ttft, 0.5),
                     _pct(ttft, 0.99), decimal_text(sum((r["cost"] for r in rs), Decimal(0)))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths))))
