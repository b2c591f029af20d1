"""The ramp rule (#19): a key that doubles its priority rate inside the window
has the excess served as default within one window step, and what is billed
equals what is echoed for every request.

A gateway (create_app, real sockets) over an instant in-process sim; the
downgrades read a manual clock, so thirty minutes of traffic take seconds and
every step is exact. Two keys send the same load, sequentially, through
aiohttp: `ramped` has OpenAI's rule (ramp_max_growth 0.5 over ramp_window_s
900, ramp_min_tpm at its steady rate), `baseline` has none (the same run's
baseline). Each sends --base requests a minute for --steady minutes, then twice
as many for --doubled minutes. Per request: the echoed tier (body), the
x-tierq-service-tier header and reason, usage.estimated_cost, and the ledger
row (its tier, reason and cost, recomputed from its tokens at its tier's
rates). Writes RESULTS/<name>.json and prints the summary bench/README.md
"Tiers" quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tierq._core import ManualClock
from tierq.app import GATEWAY, create_app, runner_kwargs
from tierq.config import Config, KeysConfig, LedgerConfig, ModelConfig, UpstreamConfig
from tierq.downgrades import STEP_S, Downgrades
from tierq.pricing import cost_femto, femto_decimal
from tierq.sim import start_sim
from tierq.stores import open_ledger
from tierq.tiers import Tier

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
T0 = 1_796_601_600.0  # 2026-12-07T00:00:00Z
RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).resolve().parents[1] / "results"))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tierq-ramp-"))
    sim = await start_sim("127.0.0.1", 0, slots=64, ttft_ms=0.0, tokens_per_s=0.0)
    ledger = open_ledger(f"sqlite:///{tmp / 'ledger.db'}")
    await ledger.start()
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp / 'unused.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(ModelConfig(MODEL, "sim"),), keys=KeysConfig(path=str(tmp / "k.db")))
    app = create_app(config, ledger=ledger, sim=sim)
    runner = web.AppRunner(app, **runner_kwargs())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    gw = app[GATEWAY]
    clock = ManualClock(0)
    gw.downgrades = Downgrades(clock=lambda: T0 + clock.now_ns() / 1e9)
    assert gw.keys is not None
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 40}],
            "max_tokens": args.max_tokens, "service_tier": "priority"}
    _, baseline = gw.keys.create("baseline")
    # One request first, to size the floor: the steady rate plus one request
    # (what an estimate at admission holds above its settled usage).
    async with aiohttp.ClientSession() as s, s.post(
            url, json=body, headers={"Authorization": f"Bearer {baseline}"}) as r:
        warm = ledger.get(r.headers["x-tierq-request-id"])
    assert warm is not None
    per_request = warm.prompt_tokens + warm.completion_tokens
    floor = (args.base + 1) * per_request
    _, ramped = gw.keys.create("ramped", ramp_min_tpm=floor, ramp_max_growth=0.5,
                               ramp_window_s=900)
    rates = gw.pools[MODEL].entry.rates
    minutes: list[dict[str, Any]] = []
    mismatches = 0
    requests = 0
    async with aiohttp.ClientSession() as s:
        for minute in range(args.steady + args.doubled):
            n = args.base if minute < args.steady else 2 * args.base
            line: dict[str, Any] = {"minute": minute, "sent_per_key": n}
            for name, token in (("ramped", ramped), ("baseline", baseline)):
                counts = {"priority": 0, "default": 0, "ramp": 0, "priority_tokens": 0}
                for _ in range(n):
                    async with s.post(url, json=body,
                                      headers={"Authorization": f"Bearer {token}"}) as r:
                        assert r.status == 200, await r.text()
                        data = json.loads(await r.text(), parse_float=Decimal)
                        tier, reason = r.headers["x-tierq-service-tier"], r.headers.get(
                            "x-tierq-service-tier-reason")
                        rid = r.headers["x-tierq-request-id"]
                    row = ledger.get(rid)
                    requests += 1
                    assert row is not None
                    priced = femto_decimal(cost_femto(row.prompt_tokens, row.completion_tokens,
                                                      rates[Tier(tier)]))
                    ok = (data["service_tier"] == tier == row.applied_tier
                          and row.tier_reason == reason and row.cost == priced
                          and Decimal(str(data["usage"]["estimated_cost"])) == row.cost)
                    mismatches += not ok
                    counts[tier] += 1
                    if reason == "ramp":
                        counts["ramp"] += 1
                    if tier == "priority":
                        counts["priority_tokens"] += row.prompt_tokens + row.completion_tokens
                line[name] = counts
            minutes.append(line)
            clock.advance(STEP_S)
    await runner.cleanup()
    await ledger.close()
    await sim.close()
    first = minutes[args.steady]
    regained = next((m["minute"] - args.steady for m in minutes[args.steady:]
                     if m["ramped"]["default"] == 0), None)
    summary = {
        "requests": requests, "billed_ne_echoed": mismatches,
        "tokens_per_request": per_request, "ramp_min_tpm": floor,
        "steady_default_ramped": sum(m["ramped"]["default"] for m in minutes[:args.steady]),
        "first_doubled_step": {"ramped_priority": first["ramped"]["priority"],
                               "ramped_default_ramp": first["ramped"]["ramp"],
                               "baseline_priority": first["baseline"]["priority"],
                               "sent": first["sent_per_key"]},
        "excess_served_default_within_one_step": first["ramped"]["ramp"] > 0,
        "baseline_all_priority": all(m["baseline"]["default"] == 0 for m in minutes),
        "growth_per_step": 1.5 ** (60 / 900),
        "minutes_to_regain_all": regained,
        "regain_predicted_minutes": math.log(2) / math.log(1.5 ** (60 / 900)),
        "ramped_priority_tokens_by_minute": [m["ramped"]["priority_tokens"] for m in minutes],
    }
    return {"args": vars(args), "summary": summary, "minutes": minutes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=int, default=100, help="requests a minute before the doubling")
    p.add_argument("--steady", type=int, default=5, help="minutes at the base rate")
    p.add_argument("--doubled", type=int, default=35, help="minutes at twice the base rate")
    p.add_argument("--max-tokens", type=int, default=1000, help="each request's completion")
    p.add_argument("--name", default="tiers-ramp")
    args = p.parse_args()
    out = asyncio.run(run(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    sm = out["summary"]
    print(json.dumps(sm, indent=1, default=str))
    if sm["billed_ne_echoed"] or not sm["excess_served_default_within_one_step"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
