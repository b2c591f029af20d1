"""Flex fills what is idle (#19): `tierq sim` behind `tierq serve`, open-loop
default traffic at about 0.6x of the engine (plus a priority share), and a
closed-loop backlog of batch clients.

Three scenarios on the same gateway config, interleaved in rounds, so every
figure has its baseline in the same run:
  base     default + priority only (no backlog);
  flex     the same, plus the backlog sent as service_tier="flex";
  default  the same, plus the same backlog sent as default;
each flex scenario once per --flex-headrooms value and per --reserves value
(or once per --cells pair)
(flex_priority_reserve: slots a default may not take while flex waits; 0 is
the rule before it), and with --priority-headroom N a base and a flex
scenario more with that priority_headroom (the flex one judged against its
own base).
Measured: engine busy (the sim's running sequences over its slots, sampled
every 0.1 s), default and priority TTFT (first content chunk of a stream, at
the client) of the open-loop requests, and every flex refusal's ledger row
(its cost must be 0). Writes RESULTS/<name>.json (raw samples and per-request
records) and prints the summary table that bench/README.md "Tiers" quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

MODEL = "sim-chat"


def gateway_config(name: str, sim_url: str, slots: int, flex_headroom: float,
                   wait_flex_ms: int, priority_headroom: int = 0, reserve: int = 1) -> Path:
    cfg = h.TMP / f"{name}.toml"
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{h.TMP}/{name}.db"

[[upstreams]]
name = "sim"
base_url = "{sim_url}"
kind = "openai"
max_connections = {slots * 4}

[[models]]
id = "{MODEL}"
upstream = "sim"
priority = true
flex = true
input_per_m = "0.10"
output_per_m = "0.20"

[models.admission]
max_concurrency = {slots}
queue_depth = 2048
max_wait_ms = {{ default = 60000, priority = 60000, flex = {wait_flex_ms} }}
flex_headroom = {flex_headroom}
priority_headroom = {priority_headroom}
flex_priority_reserve = {reserve}
""")
    return cfg


async def one(s: aiohttp.ClientSession, url: str, tier: str | None, max_tokens: int,
              cls: str, out: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """One streamed chat request; its record: class, status, TTFT, code, id."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "a b c"}],
                            "max_tokens": max_tokens, "stream": True}
    if tier is not None:
        body["service_tier"] = tier
    start = time.monotonic()
    rec: dict[str, Any] = {"cls": cls, "t": start - t0, "status": 0}
    try:
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            rec["status"] = r.status
            rec["id"] = r.headers.get("x-tierq-request-id")
            rec["tier"] = r.headers.get("x-tierq-service-tier")
            rec["queue_ms"] = float(r.headers.get("x-tierq-queue-ms", "nan"))
            if r.status != 200:
                data = await r.json(content_type=None)
                rec["code"] = (data.get("error") or {}).get("code")
                rec["retry_after"] = r.headers.get("retry-after")
            else:
                async for line in r.content:
                    if line.startswith(b"data: {") and b'"content"' in line and "ttft" not in rec:
                        rec["ttft"] = time.monotonic() - start
                rec["total"] = time.monotonic() - start
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        rec["err"] = type(e).__name__
    out.append(rec)
    return rec


async def scenario(url: str, sim_root: str, backlog_tier: str | None, args: argparse.Namespace,
                   seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    recs: list[dict[str, Any]] = []
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    t0 = time.monotonic()
    end = t0 + args.warmup + args.duration
    timeout = aiohttp.ClientTimeout(total=args.wait_flex_ms / 1000 + 120)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
        async def sample() -> None:
            while not stop.is_set():
                try:
                    async with s.get(sim_root + "/sim/stats") as r:
                        st = await r.json()
                    samples.append((time.monotonic() - t0, h.sim_running(st)))
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

        async def open_loop() -> None:
            tasks = []
            while time.monotonic() < end:
                await asyncio.sleep(rng.expovariate(args.rate))
                prio = rng.random() < args.priority_share
                tasks.append(asyncio.ensure_future(one(
                    s, url, "priority" if prio else None, args.max_tokens,
                    "priority" if prio else "default", recs, t0)))
            await asyncio.gather(*tasks)

        async def batch_client() -> None:
            while time.monotonic() < end:
                rec = await one(s, url, backlog_tier, args.max_tokens, "backlog", recs, t0)
                if rec["status"] != 200:
                    await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        clients = [asyncio.ensure_future(batch_client()) for _ in range(args.backlog)] \
            if backlog_tier != "none" else []
        await open_loop()
        # The backlog stops with the load: its waiters left in line hang up.
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        stop.set()
        await sampler
    return {"records": recs, "samples": samples}


def summarize(run: dict[str, Any], slots: int, warmup: float, duration: float) -> dict[str, Any]:
    win = [r for r in run["records"] if warmup <= r["t"] <= warmup + duration]
    busy = [n for t, n in run["samples"] if warmup <= t <= warmup + duration]

    def ttfts(cls: str) -> list[float]:
        return [r["ttft"] for r in win if r["cls"] == cls and r["status"] == 200 and "ttft" in r]

    out: dict[str, Any] = {"ttfts": {c: ttfts(c) for c in ("default", "priority")},
                           "busy": sum(min(n, slots) for n in busy) / slots / max(1, len(busy)),
                           "samples": len(busy)}
    for cls in ("default", "priority", "backlog"):
        t = ttfts(cls)
        q = [r["queue_ms"] for r in win if r["cls"] == cls and r["status"] == 200 and "ttft" in r]
        out[cls] = {"n": sum(1 for r in win if r["cls"] == cls), "ok": len(t),
                    "ttft_p50_ms": h.pct(t, 50) * 1000, "ttft_p99_ms": h.pct(t, 99) * 1000,
                    "queue_p50_ms": h.pct(q, 50), "queue_p99_ms": h.pct(q, 99),
                    "refused": sum(1 for r in win if r["cls"] == cls and r["status"] == 429)}
    return out


def ledger_check(db: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every flex request the gateway refused: its row's status, code and cost."""
    from tierq.stores import open_ledger

    rows = {r.request_id: r for r in open_ledger(f"sqlite:///{db}").rows()}
    refused = [r for r in records if r.get("tier") == "flex" and r["status"] == 429]
    billed = [rows[r["id"]] for r in refused if r["id"] in rows and rows[r["id"]].cost != Decimal(0)]
    codes: dict[str, int] = {}
    for r in refused:
        codes[str(r.get("code"))] = codes.get(str(r.get("code")), 0) + 1
    served_flex = [row for row in rows.values() if row.applied_tier == "flex" and row.status == "served"]
    return {"flex_refused": len(refused), "refused_with_a_row": sum(1 for r in refused if r["id"] in rows),
            "refused_billed": len(billed), "codes": codes,
            "refused_rows_shed_zero": all(rows[r["id"]].status == "shed" and rows[r["id"]].cost == 0
                                          for r in refused if r["id"] in rows),
            "flex_served": len(served_flex),
            "flex_served_cost_half": all(
                row.cost * 2 == (Decimal(row.prompt_tokens) * Decimal("0.10")
                                 + Decimal(row.completion_tokens) * Decimal("0.20")) / Decimal(10**6)
                for row in served_flex)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=20)
    ap.add_argument("--ttft-ms", type=float, default=50.0)
    ap.add_argument("--tokens-per-s", type=float, default=40.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="open-loop requests/s (default: --load x the engine's estimated capacity)")
    ap.add_argument("--load", type=float, default=0.6)
    ap.add_argument("--priority-share", type=float, default=0.1)
    ap.add_argument("--backlog", type=int, default=30, help="closed-loop batch clients")
    ap.add_argument("--flex-headrooms", default="0.1",
                    help="comma-separated flex_headroom values, each a flex scenario of every round")
    ap.add_argument("--reserves", default="1",
                    help="comma-separated flex_priority_reserve values, each a flex scenario per flex_headroom")
    ap.add_argument("--cells", default="",
                    help="comma-separated flex_headroom/flex_priority_reserve pairs (e.g. 0.1/1,0.199/2), "
                         "each a flex scenario; overrides the --flex-headrooms x --reserves product")
    ap.add_argument("--priority-headroom", type=int, default=0,
                    help="if > 0, one more pair of scenarios with this priority_headroom: "
                         "base and flex at the first flex_headroom")
    ap.add_argument("--wait-flex-ms", type=int, default=3000)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default="tiers-flex")
    args = ap.parse_args()
    headrooms = [float(x) for x in args.flex_headrooms.split(",")]
    reserves = [int(x) for x in args.reserves.split(",")]
    cells = [(float(c.split("/")[0]), int(c.split("/")[1])) for c in args.cells.split(",")] if args.cells \
        else [(fh, r) for fh in headrooms for r in reserves]
    headrooms, reserves = [cells[0][0]], [cells[0][1]]
    if args.rate <= 0:
        # The sim's service time at the target batch (its batch knee is 2 x slots):
        # prefill, then max_tokens steps each (1 + (b - 1) / knee) / tokens_per_s.
        b = args.load * args.slots
        step = (1 + (b - 1) / (2 * args.slots)) / args.tokens_per_s
        args.rate = b / (args.ttft_ms / 1000 + args.max_tokens * step)
    machine = h.machine_line()
    h.log(f"open-loop rate {args.rate:.1f}/s, {args.backlog} batch clients, {machine}")
    sim = h.start_sim("flex-sim", args.slots, args.ttft_ms, args.tokens_per_s)
    sim_root = f"http://127.0.0.1:{sim.port}"
    # (label, backlog tier, flex_headroom, priority_headroom, flex_priority_reserve)
    scenarios: list[tuple[str, str | None, float, int, int]] = [("base", "none", headrooms[0], 0, reserves[0])]
    scenarios += [(f"flex@{fh:g}/r{r}", "flex", fh, 0, r) for fh, r in cells]
    scenarios.append(("default", None, headrooms[0], 0, reserves[0]))
    ph = args.priority_headroom
    if ph > 0:
        scenarios += [(f"base+ph{ph}", "none", headrooms[0], ph, reserves[0]),
                      (f"flex@{headrooms[0]:g}/r{reserves[0]}+ph{ph}", "flex", headrooms[0], ph, reserves[0])]
    runs: list[dict[str, Any]] = []
    procs = [sim]
    try:
        for rnd in range(args.rounds):
            for label, tier, fh, ph_run, res in scenarios:
                name = f"flex-{label.replace('@', '-').replace('+', '-').replace('/', '-')}-{rnd}"
                cfg = gateway_config(name, sim_root + "/v1", args.slots, fh, args.wait_flex_ms, ph_run, res)
                gw = h.start_gateway(name, cfg)
                procs.append(gw)
                try:
                    run = asyncio.run(scenario(f"http://127.0.0.1:{gw.port}", sim_root, tier, args,
                                               seed=1000 + rnd))
                finally:
                    gw.stop()
                h.drain_sim(sim_root)
                s = summarize(run, args.slots, args.warmup, args.duration)
                s["ledger"] = ledger_check(h.TMP / f"{name}.db", run["records"]) if tier == "flex" else None
                h.log(f"round {rnd} {label}: busy {s['busy']:.3f}, default p99 "
                      f"{s['default']['ttft_p99_ms']:.0f} ms (queue {s['default']['queue_p99_ms']:.0f}), "
                      f"priority p99 {s['priority']['ttft_p99_ms']:.0f} ms "
                      f"(queue {s['priority']['queue_p99_ms']:.0f})")
                runs.append({"round": rnd, "scenario": label, "flex_headroom": fh, "priority_headroom": ph_run,
                             "flex_priority_reserve": res, "summary": s, **run})
    finally:
        h.stop_all(procs)
    table, result = report(runs, args, cells)
    print(table)
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    # The summary, every run's summary and the engine samples stay readable;
    # the per-request records (a few MB) are gzipped beside them.
    (h.RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"args": vars(args), "machine": machine, "result": result,
         "runs": [{k: r[k] for k in ("round", "scenario", "flex_headroom", "priority_headroom",
                                     "flex_priority_reserve", "summary", "samples")}
                  for r in runs]}, indent=1, default=str) + "\n")
    h.save_raw(f"{args.name}-records", [{k: r[k] for k in ("round", "scenario", "records")} for r in runs])
    (h.RESULTS / f"{args.name}.md").write_text(
        f"# Flex fills what is idle\n\n`python bench/tiers/flex.py {' '.join(sys.argv[1:])}`; {machine}; "
        f"open-loop {args.rate:.1f} requests/s ({args.priority_share:.0%} priority), {args.backlog} "
        f"closed-loop batch clients, sim {args.slots} slots, {args.ttft_ms:g} ms prefill, "
        f"{args.tokens_per_s:g} tokens/s, {args.max_tokens} tokens a request; {args.rounds} rounds of "
        f"{args.duration:g} s (+{args.warmup:g} s warm-up) per scenario, interleaved.\n\n{table}")
    return 0


def report(runs: list[dict[str, Any]], args: argparse.Namespace,
           cells: list[tuple[float, int]]) -> tuple[str, dict[str, Any]]:
    ph = args.priority_headroom
    # Each flex scenario against the base with the same priority_headroom.
    flexes = [(f"flex@{fh:g}/r{r}", "base", fh) for fh, r in cells]
    if ph > 0:
        flexes.append((f"flex@{cells[0][0]:g}/r{cells[0][1]}+ph{ph}", f"base+ph{ph}", cells[0][0]))
    labels = ["base"] + [f for f, _, _ in flexes] + ["default"] + ([f"base+ph{ph}"] if ph > 0 else [])
    by = {label: [r["summary"] for r in runs if r["scenario"] == label] for label in labels}

    def worst(label: str, cls: str) -> float:
        return max(s[cls]["ttft_p99_ms"] for s in by[label])

    def pooled(label: str, cls: str) -> float:
        # The p99 over every round's requests together: with 10% priority a
        # round holds about 80 of them, so one round's p99 is its worst one.
        return h.pct([t for s in by[label] for t in s["ttfts"][cls]], 99) * 1000

    # The floor: how far one no-flex round's p99 is from another's.
    noise = {c: max(s[c]["ttft_p99_ms"] for s in by["base"]) / min(s[c]["ttft_p99_ms"] for s in by["base"])
             for c in ("default", "priority")}

    def busy(label: str) -> tuple[float, float]:
        return min(s["busy"] for s in by[label]), max(s["busy"] for s in by[label])

    def waits(label: str) -> str:
        # The admission's part of TTFT (x-tierq-queue-ms): what the rest adds is
        # the gateway, the sim and the client on a shared machine.
        return "/".join(h.fmt(max(s[c]["queue_p99_ms"] for s in by[label]), 0) for c in ("default", "priority"))

    base_d, base_p, as_default = worst("base", "default"), worst("base", "priority"), worst("default", "default")
    base_pd, base_pp = pooled("base", "default"), pooled("base", "priority")
    result: dict[str, Any] = {"open_loop_rate": args.rate, "base": {"busy": busy("base"),
                              "default_p99_ms": base_d, "priority_p99_ms": base_p,
                              "default_pooled_p99_ms": base_pd, "priority_pooled_p99_ms": base_pp,
                              "round_to_round_p99_ratio": noise},
                              "backlog_as_default": {"busy": busy("default"), "default_p99_ms": as_default,
                                                     "priority_p99_ms": worst("default", "priority")}}
    rows = [("base: no backlog", f"{busy('base')[0]:.3f}-{busy('base')[1]:.3f}", "",
             f"{h.fmt(base_d, 0)} (pooled {h.fmt(base_pd, 0)})", f"round/round {noise['default']:.2f}x",
             f"{h.fmt(base_p, 0)} (pooled {h.fmt(base_pp, 0)})", f"round/round {noise['priority']:.2f}x",
             waits("base"), "")]
    if ph > 0:
        b = f"base+ph{ph}"
        result[b] = {"busy": busy(b), "default_p99_ms": worst(b, "default"), "priority_p99_ms": worst(b, "priority")}
        rows.append((f"base, priority_headroom {ph}", f"{busy(b)[0]:.3f}-{busy(b)[1]:.3f}", "",
                     h.fmt(worst(b, "default"), 0), f"{worst(b, 'default') / base_d:.2f}x base",
                     h.fmt(worst(b, "priority"), 0), f"{worst(b, 'priority') / base_p:.2f}x base", waits(b), ""))
    for label, base_label, fh in flexes:
        lo, hi = busy(label)
        d, p = worst(label, "default"), worst(label, "priority")
        own_d = worst(base_label, "default")
        led = [s["ledger"] for s in by[label]]
        refused, billed = sum(x["flex_refused"] for x in led), sum(x["refused_billed"] for x in led)
        target = 1 - fh
        met = lambda ok: "met" if ok else "missed"  # noqa: E731
        result[label] = {"busy": (lo, hi), "busy_target": target, "default_p99_ms": d,
                         "base": base_label, "default_over_base": d / own_d,
                         "default_over_no_headroom_base": d / base_d,
                         "default_over_as_default": d / as_default,
                         "default_wait_p99_ms": max(s["default"]["queue_p99_ms"] for s in by[label]),
                         "priority_wait_p99_ms": max(s["priority"]["queue_p99_ms"] for s in by[label]),
                         "priority_p99_ms": p, "priority_over_base": p / base_p,
                         "priority_pooled_p99_ms": pooled(label, "priority"),
                         "priority_pooled_over_base": pooled(label, "priority") / base_pp,
                         "default_pooled_over_base": pooled(label, "default") / base_pd,
                         "flex_served": sum(x["flex_served"] for x in led),
                         "flex_served_at_half_price": all(x["flex_served_cost_half"] for x in led),
                         "flex_refused": refused, "flex_refused_billed": billed,
                         "refusal_codes": [x["codes"] for x in led]}
        res = label.split("/r")[1].split("+")[0]
        name = f"+ backlog as flex, flex_headroom {fh:g}, flex_priority_reserve {res}"
        if base_label != "base":
            name += f", priority_headroom {ph}"
        rows.append((name, f"{lo:.3f}-{hi:.3f}",
                     f"{target:g} +/- 0.05: {met(abs(lo - target) <= 0.05 and abs(hi - target) <= 0.05)}",
                     h.fmt(d, 0), f"{d / own_d:.2f}x its base ({met(d <= 1.25 * own_d)}), "
                     f"{d / as_default:.3f}x as-default",
                     f"{h.fmt(p, 0)} (pooled {h.fmt(pooled(label, 'priority'), 0)})",
                     f"{p / base_p:.2f}x base; pooled {pooled(label, 'priority') / base_pp:.2f}x "
                     f"({met(pooled(label, 'priority') <= 1.1 * base_pp)})", waits(label),
                     f"{refused} refused, {billed} billed ({met(billed == 0)})"))
    rows.append(("+ backlog as default", f"{busy('default')[0]:.3f}-{busy('default')[1]:.3f}", "",
                 h.fmt(as_default, 0), "", h.fmt(worst("default", "priority"), 0), "", waits("default"), ""))
    table = h.md_table(["scenario", "engine busy (per round)", "target", "default p99 TTFT ms (worst round)",
                        "default target", "priority p99 TTFT ms", "priority",
                        "default/priority p99 wait in tierq ms", "flex refusals"], rows)
    return table, result


if __name__ == "__main__":
    sys.exit(main())
