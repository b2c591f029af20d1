"""Routing among replicas (issue #20 item 6): four `tierq sim` processes behind one
tierq pool (`endpoints`), a shared-prefix workload, and round robin, least loaded
and prefix routing compared in the same run.

- Replicas: 4 sims, each one process (so one can be killed and restarted alone),
  fixed parameters (REPLICA below): 8 slots, 20 ms to first token, a prefill unit
  of 10,000 tokens/s for the prompt tokens not in its prefix cache, a prefix
  cache of 16,000 tokens (about 8 of the 32 system prompts), 50 tokens/s decode.
- Workload (bench/common/loadgen `prefixes`): 32 system prompts of 8,000
  characters (about 2,000 sim tokens each), drawn Zipf-like (s = 1), then a
  short user turn of the request's own; 8-24 output tokens, streamed, a fifth
  of requests priority.
- First a saturating closed-loop run through round robin: the 4 replicas'
  combined capacity C. Then each routing at 0.5x, 0.8x and 1.2x C (open loop,
  Poisson), the caches emptied before each run. TTFT p50/p99 per tier,
  throughput, prefix hit rate (the sims' vllm:prefix_cache_{hits,queries}_total
  after the warm-up). Each routing also saturated (closed loop) for its own
  throughput.
- The mark: one engine holding the four replicas' whole cache (64,000 tokens,
  4x the slots and prefill speed) under the same arrivals at 0.8x, straight.
- The oracle: prefix routing with each replica's true capacity set by hand
  (max_concurrency = its slots), beside the learned limits, at 0.8x.
- A replica killed (SIGKILL) mid-run at 0.8x under prefix routing, restarted
  on its port a few seconds later: priority requests lost, how soon its share
  went to the others, how soon it was back in rotation.

Writes bench/results/<name>.md and <name>.json (every run's figures, the kill's
series of new requests per replica every 0.1 s).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH / "common"))
sys.path.insert(0, str(BENCH.parent / "tests"))
import harness as h  # noqa: E402
from ports import free_port  # noqa: E402

MODEL = "sim-chat"
ROUTINGS = ("round_robin", "least_loaded", "prefix")
REPLICAS = 4
# One replica, stated once: every sim of the bench runs these.
REPLICA = {"slots": 8, "ttft_ms": 20.0, "tokens_per_s": 50.0, "prefill_tokens_per_s": 10_000.0,
           "prefix_cache_tokens": 16_000}
WORKLOAD = {"prefixes": 32, "prefix_chars": 8_000, "zipf_s": 1.0, "max_tokens": 24,
            "max_tokens_min": 8, "priority_share": 0.2}


# ------------------------------------------------------------------ replicas


def sim_argv(port: int, scale: int = 1) -> list[str]:
    """`tierq sim` with REPLICA's parameters; `scale` x the slots, prefill speed and
    cache (the mark's one engine as big as all the replicas)."""
    r = REPLICA
    return [h.PY, "-m", "tierq", "sim", "--host", "127.0.0.1", "--port", str(port),
            "--slots", str(r["slots"] * scale), "--ttft-ms", f"{r['ttft_ms']:g}",
            "--tokens-per-s", f"{r['tokens_per_s']:g}",  # the knee: the sim's 2 x slots
            "--prefill-tokens-per-s", f"{r['prefill_tokens_per_s'] * scale:g}",
            "--prefix-cache-tokens", str(int(r["prefix_cache_tokens"]) * scale)]


def start_sim(name: str, port: int | None = None, scale: int = 1) -> h.Proc:
    port = free_port() if port is None else port
    p = h.Proc(name, sim_argv(port, scale), port, cwd=h.TMP, health="/sim/stats")
    p.wait_ready()
    return p


def root(p: h.Proc) -> str:
    return f"http://127.0.0.1:{p.port}"


def reset(sims: list[h.Proc]) -> None:
    """Counters zeroed and caches emptied: every run starts cold, alike."""
    for s in sims:
        h.drain_sim(root(s), timeout=30)
        h.post(root(s) + "/sim/reset")
        h.post(root(s) + "/reset_prefix_cache")


def counters(sims: list[h.Proc]) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for s in sims:
        try:
            st = h.get_json(root(s) + "/sim/stats", timeout=2)
        except OSError:
            out.append(None)  # down
            continue
        out.append({k: st[k] for k in ("requests", "prefix_cache_queries", "prefix_cache_hits",
                                       "max_in_flight_seen", "max_running_seen", "completed")})
    return out


def hit_rate(before: list[dict[str, Any] | None], after: list[dict[str, Any] | None]) -> float:
    q = hits = 0
    for b, a in zip(before, after):
        if a is None:
            continue
        b = b or {"prefix_cache_queries": 0, "prefix_cache_hits": 0}
        q += a["prefix_cache_queries"] - b["prefix_cache_queries"]
        hits += a["prefix_cache_hits"] - b["prefix_cache_hits"]
    return hits / q if q else math.nan


# ------------------------------------------------------------------ gateway


def gateway_config(name: str, sims: list[h.Proc], routing: str, oracle: bool,
                   args: argparse.Namespace) -> Path:
    cfg = h.TMP / f"{name}.toml"
    endpoints = ", ".join(f'"{root(s)}/v1"' for s in sims)
    # Limits under [models.admission] are per endpoint: the oracle's is each
    # replica's true slots; without one each replica's limit is learned.
    limit = f"max_concurrency = {REPLICA['slots']}\n" if oracle else ""
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{h.TMP}/{name}-ledger.db"

[[upstreams]]
name = "replicas"
kind = "vllm"
endpoints = [{endpoints}]
routing = "{routing}"

[[models]]
id = "{MODEL}"
upstream = "replicas"
priority = true
input_per_m = "0.10"
output_per_m = "0.20"

[models.admission]
{limit}queue_depth = 4096
max_wait_ms = {{ default = {args.wait_default_ms}, priority = {args.wait_priority_ms} }}
""")
    return cfg


def start_gateway(name: str, sims: list[h.Proc], routing: str, oracle: bool,
                  args: argparse.Namespace) -> h.Proc:
    return h.start_gateway(name, gateway_config(name, sims, routing, oracle, args))


# ------------------------------------------------------------------ load


def spec(url: str, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    return {"url": url + "/v1/chat/completions", "model": MODEL, "stream": True,
            "seed": args.seed, "send_tier": True, "retry": False, "grace_s": args.grace,
            **WORKLOAD, **kw}


def open_run(url: str, rate: float, duration: float, sims: list[h.Proc],
             args: argparse.Namespace,
             events: list[tuple[float, Any]] = ()) -> dict[str, Any]:
    """An open-loop run at `rate`; the sims' counters at the warm-up's end and at
    the end; `events` are (seconds after start, callable) run on timers."""
    marks: dict[str, Any] = {}
    timers = []
    sampler = h.Sampler(lambda: counters(sims), every=0.1)
    with sampler:
        t0 = sampler.t0
        at_warm = threading.Timer(args.warmup, lambda: marks.__setitem__("warm", counters(sims)))
        at_warm.start()
        timers.append(at_warm)
        for at, fn in events:
            tm = threading.Timer(max(0.0, t0 + at - time.monotonic()), fn)
            tm.start()
            timers.append(tm)
        recs, summary = h.loadgen(spec(url, args, mode="open", rate=rate, duration_s=duration,
                                       timeout_s=duration + args.grace,
                                       max_requests=int(rate * duration * 3 + 100)))
        for tm in timers:
            tm.cancel()
            if tm.is_alive():
                tm.join()
    end = counters(sims)
    return {"recs": recs, "elapsed_s": summary["elapsed_s"], "warm": marks.get("warm"),
            "end": end, "samples": sampler.samples, "t0": t0}


def tier(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r["a"] for r in recs if r["a"]["status"] == 200 and "err" not in r["a"]]
    ttft = [a["ttft"] for a in ok if "ttft" in a]
    return {"n": len(recs), "ok": len(ok), "ttft_p50": h.pct(ttft, 50), "ttft_p99": h.pct(ttft, 99),
            "shed": sum(1 for r in recs if r["a"]["status"] == 429),
            "failed": sum(1 for r in recs if r["a"]["status"] not in (200, 429) or "err" in r["a"])}


def throughput(recs: list[dict[str, Any]], t_from: float, t_to: float) -> float:
    """Requests/s served whole that completed within [t_from, t_to]."""
    n = sum(1 for r in recs if r["a"]["status"] == 200 and "err" not in r["a"]
            and t_from <= r["t"] + r["a"]["total"] / 1000 <= t_to)
    return n / (t_to - t_from)


def summarize(run: dict[str, Any], args: argparse.Namespace, duration: float) -> dict[str, Any]:
    recs = [r for r in run["recs"] if args.warmup <= r["t"] <= duration]
    warm = run["warm"] or [None] * len(run["end"])
    share = [((a or {}).get("requests", 0) - (b or {}).get("requests", 0)) for b, a in
             zip(warm, run["end"])]
    total = sum(share) or 1
    return {"priority": tier([r for r in recs if r["p"]]),
            "default": tier([r for r in recs if not r["p"]]),
            "throughput_rps": throughput(run["recs"], args.warmup, duration),
            "hit_rate": hit_rate(warm, run["end"]),
            "replica_share": [round(s / total, 3) for s in share],
            "max_in_flight_seen": [(c or {}).get("max_in_flight_seen") for c in run["end"]],
            "elapsed_s": run["elapsed_s"],
            "sender_late_p99_ms": h.pct([r["late"] for r in run["recs"]], 99)}


def saturate(url: str, args: argparse.Namespace) -> float:
    """Requests/s completed by a closed loop of 3 x the slots of all replicas, after a
    quarter of the run."""
    s = args.capacity_s
    recs, _ = h.loadgen(spec(url, args, mode="closed",
                             concurrency=3 * REPLICA["slots"] * REPLICAS, duration_s=s,
                             timeout_s=s + args.grace, ramp_s=0.0))
    return throughput(recs, s / 4, s)


# ------------------------------------------------------------------ kill


def kill_run(sims: list[h.Proc], rate: float, args: argparse.Namespace,
             procs: list[h.Proc]) -> dict[str, Any]:
    """Prefix routing at `rate`; replica `victim` killed at a third of the run and
    started again on its port `--down` s later."""
    d = args.kill_duration
    t_kill, t_back = d / 3, d / 3 + args.down
    victim = 1
    happened: dict[str, float] = {}
    t0_box: dict[str, float] = {}

    def kill() -> None:
        happened["kill"] = time.monotonic() - t0_box["t0"]
        sims[victim].p.kill()  # SIGKILL: no drain, connections reset
        sims[victim].p.wait(5)

    def restart() -> None:
        happened["restart_call"] = time.monotonic() - t0_box["t0"]
        p = start_sim(f"replica-{victim}-back", sims[victim].port)
        procs.append(p)
        sims[victim] = p
        happened["ready"] = time.monotonic() - t0_box["t0"]

    reset(sims)
    gw = start_gateway("kill-prefix", sims, "prefix", False, args)
    procs.append(gw)
    try:
        t0_box["t0"] = time.monotonic()
        run = open_run(root(gw), rate, d, sims, args, [(t_kill, kill), (t_back, restart)])
    finally:
        gw.stop()
    # The sampler's t0 is a moment after ours; put the events on its clock.
    shift = run["t0"] - t0_box["t0"]
    ev = {k: v - shift for k, v in happened.items()}
    recs = run["recs"]
    pri = [r for r in recs if r["p"]]
    lost_pri = [r for r in pri if r["a"]["status"] != 200 or "err" in r["a"]]
    lost_all = [r for r in recs if r["a"]["status"] != 200 or "err" in r["a"]]
    # Per 0.5 s window: the victim's and the others' new requests (sims' counters).
    series = []
    prev: list[int | None] | None = None
    for t, c in run["samples"]:
        now = [x["requests"] if x is not None else None for x in c]
        if prev is not None:
            series.append((round(t, 2), [(n - p) if n is not None and p is not None and n >= p
                                         else (n if n is not None and p is None else None)
                                         for n, p in zip(now, prev)]))
        prev = now
    kill_t = ev.get("kill", t_kill)
    ready_t = ev.get("ready", t_back)
    failed_after = [r["t"] for r in lost_all if r["t"] >= kill_t - 1.0]
    moved_s = (max(failed_after) - kill_t) if failed_after else 0.0

    def window_share(t_from: float, t_to: float) -> float:
        got = [d for t, d in series if t_from < t <= t_to]
        mine = sum(x[victim] or 0 for x in got)
        total = sum(sum(v or 0 for v in x) for x in got)
        return mine / total if total else math.nan

    back_s = None
    t = ready_t
    while t + 1.0 <= d:
        if window_share(t, t + 1.0) >= 0.5 / REPLICAS:
            back_s = round(t + 1.0 - ready_t, 2)
            break
        t += 0.1
    return {"rate": rate, "victim": victim, "events": ev, "planned": [t_kill, t_back],
            "priority_n": len(pri), "priority_lost": len(lost_pri),
            "lost": len(lost_all), "lost_statuses": sorted({r["a"]["status"] for r in lost_all}),
            "last_failed_arrival_after_kill_s": round(moved_s, 3),
            "victim_share_before": window_share(args.warmup, kill_t),
            "victim_share_down": window_share(kill_t + 1.0, ready_t),
            "victim_share_after": window_share(ready_t + (back_s or 0.0), d),
            "back_in_rotation_s": back_s,
            "series": series, "priority": tier(pri), "default": tier([r for r in recs
                                                                       if not r["p"]])}


# ------------------------------------------------------------------ report


def write_md(result: dict[str, Any], name: str) -> Path:
    f = h.fmt
    lines = [f"# bench/routing: {name}\n\n", f"{result['machine']}; wall {result['wall_s']} s.\n\n",
             f"Replica (x{REPLICAS}, one `tierq sim` process each): {REPLICA}. "
             f"Workload: {WORKLOAD}. Arrivals {result['args']['duration']} s a run, the first "
             f"{result['args']['warmup']} s left out.\n\n",
             f"Combined capacity C (round robin, saturating closed loop): "
             f"**{f(result['capacity_rps'])} req/s**.\n\n"]
    sat = result.get("saturation", {})
    if sat:
        rr = sat.get("round_robin") or math.nan
        lines.append("## Saturation throughput (closed loop, 96 clients)\n\n")
        lines.append(h.md_table(["routing", "req/s", "/ round robin"],
                                [[k, f(v), f(v / rr, 2)] for k, v in sat.items()]))
        lines.append("\n")
    lines.append("## Open loop\n\n")
    rows = []
    base = {(c["load"]): c for c in result["cells"] if c["routing"] == "round_robin"}
    for c in result["cells"]:
        b = base.get(c["load"])
        rows.append([c["routing"] + (" (oracle)" if c.get("oracle") else ""), f"{c['load']:g}x",
                     f(c["rate"]), f(c["priority"]["ttft_p50"], 0), f(c["priority"]["ttft_p99"], 0),
                     f(c["default"]["ttft_p50"], 0), f(c["default"]["ttft_p99"], 0),
                     f(c["default"]["ttft_p50"] / b["default"]["ttft_p50"], 2) if b else "–",
                     f(c["throughput_rps"]), f(100 * c["hit_rate"], 1),
                     c["priority"]["shed"] + c["default"]["shed"],
                     c["priority"]["failed"] + c["default"]["failed"],
                     " / ".join(f"{x:.2f}" for x in c["replica_share"])])
    lines.append(h.md_table(["routing", "load", "req/s", "pri p50", "pri p99", "def p50",
                             "def p99", "def p50 / rr", "served/s", "hit %", "shed", "failed",
                             "replica shares"], rows))
    mark = result.get("mark")
    if mark:
        lines.append(f"\nMark: one engine with the whole cache at 0.8x: hit rate "
                     f"**{f(100 * mark['hit_rate'], 1)}%**.\n")
    k = result.get("kill")
    if k:
        lines.append(f"\n## One replica killed\n\nPrefix routing at {f(k['rate'])} req/s; replica "
                     f"{k['victim']} SIGKILLed at {f(k['events'].get('kill', math.nan), 2)} s, "
                     f"ready again at {f(k['events'].get('ready', math.nan), 2)} s. Priority lost "
                     f"**{k['priority_lost']} of {k['priority_n']}**; all lost {k['lost']} "
                     f"(statuses {k['lost_statuses']}); last failed arrival "
                     f"{k['last_failed_arrival_after_kill_s']} s after the kill; its share "
                     f"before {f(k['victim_share_before'], 3)}, while down "
                     f"{f(k['victim_share_down'], 3)}, after {f(k['victim_share_after'], 3)}; back "
                     f"in rotation (1 s at half its share) {k['back_in_rotation_s']} s after it "
                     f"was ready.\n")
    t = result.get("targets")
    if t:
        lines.append("\n## Targets\n\n")
        lines.append(h.md_table(["target", "measured", ""], t))
    path = h.RESULTS / f"{name}.md"
    path.write_text("".join(lines))
    return path


def targets(result: dict[str, Any]) -> list[list[str]]:
    f = h.fmt
    cells = {(c["routing"], c["load"], bool(c.get("oracle"))): c for c in result["cells"]}
    out = []

    def row(name: str, value: float, ok: bool, text: str) -> None:
        out.append([name, text if not math.isnan(value) else "–",
                    "met" if ok and not math.isnan(value) else "missed"])

    p8, r8 = cells.get(("prefix", 0.8, False)), cells.get(("round_robin", 0.8, False))
    if p8 and r8:
        ratio = p8["default"]["ttft_p50"] / r8["default"]["ttft_p50"]
        row("0.8x: prefix TTFT p50 <= 0.3x round robin's", ratio, ratio <= 0.3,
            f"{f(ratio, 2)}x ({f(p8['default']['ttft_p50'], 0)} / "
            f"{f(r8['default']['ttft_p50'], 0)} ms, default tier)")
    sat = result.get("saturation", {})
    if "prefix" in sat and "round_robin" in sat:
        ratio = sat["prefix"] / sat["round_robin"]
        row("saturation: prefix throughput >= 1.5x round robin's", ratio, ratio >= 1.5,
            f"{f(ratio, 2)}x ({f(sat['prefix'])} / {f(sat['round_robin'])} req/s)")
    mark = result.get("mark")
    if mark and p8:
        gap = 100 * (mark["hit_rate"] - p8["hit_rate"])
        row("0.8x: prefix hit rate within 10 points of one engine with the whole cache", gap,
            gap <= 10, f"{f(100 * p8['hit_rate'], 1)}% vs {f(100 * mark['hit_rate'], 1)}% "
            f"({f(gap, 1)} points)")
    k = result.get("kill")
    if k:
        row("killed replica: no priority request lost", k["priority_lost"], k["priority_lost"] == 0,
            f"{k['priority_lost']} of {k['priority_n']}")
        moved = k["last_failed_arrival_after_kill_s"]
        row("killed replica: share moved within 1 s", moved, moved <= 1.0,
            f"last failed arrival {moved} s after the kill")
        back = k["back_in_rotation_s"]
        row("returned replica back in rotation within 10 s", math.nan if back is None else back,
            back is not None and back <= 10.0, f"{back} s")
    o8 = cells.get(("prefix", 0.8, True))
    if o8 and p8:
        ratio = p8["priority"]["ttft_p99"] / o8["priority"]["ttft_p99"]
        row("priority p99 TTFT (learned limits) <= 1.2x the oracle's", ratio, ratio <= 1.2,
            f"{f(ratio, 2)}x ({f(p8['priority']['ttft_p99'], 0)} / "
            f"{f(o8['priority']['ttft_p99'], 0)} ms, prefix routing 0.8x)")
    return out


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", default="0.5,0.8,1.2", help="x the combined capacity C")
    ap.add_argument("--routings", default=",".join(ROUTINGS))
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    ap.add_argument("--warmup", type=float, default=6.0, help="first seconds left out")
    ap.add_argument("--grace", type=float, default=15.0)
    ap.add_argument("--capacity-s", type=float, default=20.0, help="each saturating run")
    ap.add_argument("--kill-duration", type=float, default=30.0)
    ap.add_argument("--down", type=float, default=5.0, help="seconds the killed replica is down")
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--wait-default-ms", type=int, default=5000)
    ap.add_argument("--wait-priority-ms", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--name", default="routing", help="results file stem")
    ap.add_argument("--smoke", action="store_true",
                    help="every kind of run, short (CI): 0.8x only, 3 s runs")
    args = ap.parse_args()
    if args.smoke:
        args.loads, args.duration, args.warmup, args.grace = "0.8", 3.0, 1.0, 8.0
        args.capacity_s, args.kill_duration, args.down = 2.5, 6.0, 1.5
    loads = [float(x) for x in args.loads.split(",") if x]
    routings = [r for r in args.routings.split(",") if r]
    h.build_loadgen()
    machine = h.machine_line()
    t_start = time.monotonic()
    procs: list[h.Proc] = []
    result: dict[str, Any] = {"args": vars(args), "machine": machine, "replica": REPLICA,
                              "replicas": REPLICAS, "workload": WORKLOAD, "cells": [],
                              "saturation": {}, "complete": False}

    def save() -> None:
        result["wall_s"] = round(time.monotonic() - t_start, 1)
        result["targets"] = targets(result)
        h.RESULTS.mkdir(parents=True, exist_ok=True)
        (h.RESULTS / f"{args.name}.json").write_text(json.dumps(result, default=str))
        write_md(result, args.name)

    try:
        sims = [start_sim(f"replica-{i}") for i in range(REPLICAS)]
        procs += sims
        for routing in ["round_robin", *[r for r in routings if r != "round_robin"]]:
            reset(sims)
            gw = start_gateway(f"sat-{routing}", sims, routing, False, args)
            procs.append(gw)
            try:
                result["saturation"][routing] = saturate(root(gw), args)
            finally:
                gw.stop()
            h.log(f"saturation {routing}: {result['saturation'][routing]:.1f} req/s")
        cap = result["capacity_rps"] = result["saturation"]["round_robin"]
        plan = [(r, load, False) for load in loads for r in routings]
        if not args.no_oracle and "prefix" in routings and 0.8 in loads:
            plan.append(("prefix", 0.8, True))
        for routing, load, oracle in plan:
            reset(sims)
            name = f"{routing}-{load:g}" + ("-oracle" if oracle else "")
            gw = start_gateway(name, sims, routing, oracle, args)
            procs.append(gw)
            h.log(f"{name}: {load * cap:.1f} req/s")
            try:
                run = open_run(root(gw), load * cap, args.duration, sims, args)
            finally:
                gw.stop()
            c = {"routing": routing, "load": load, "oracle": oracle, "rate": load * cap,
                 **summarize(run, args, args.duration)}
            result["cells"].append(c)
            h.log(f"   pri p50/p99 {c['priority']['ttft_p50']:.0f}/{c['priority']['ttft_p99']:.0f} "
                  f"ms def p50/p99 {c['default']['ttft_p50']:.0f}/{c['default']['ttft_p99']:.0f} "
                  f"ms, {c['throughput_rps']:.1f} req/s, hit {100 * c['hit_rate']:.1f}%, "
                  f"shares {c['replica_share']}")
            save()
        if 0.8 in loads:
            mark = start_sim("mark", scale=REPLICAS)
            procs.append(mark)
            run = open_run(root(mark), 0.8 * cap, args.duration, [mark], args)
            mark.stop()
            result["mark"] = {"hit_rate": hit_rate(run["warm"], run["end"]), "rate": 0.8 * cap}
            h.log(f"mark (one engine, whole cache): hit {100 * result['mark']['hit_rate']:.1f}%")
            save()
        if not args.no_kill:
            result["kill"] = kill_run(sims, 0.8 * cap, args, procs)
            k = result["kill"]
            h.log(f"kill: priority lost {k['priority_lost']} of {k['priority_n']}, last failed "
                  f"arrival +{k['last_failed_arrival_after_kill_s']} s, back in "
                  f"{k['back_in_rotation_s']} s")
        result["complete"] = True
        save()
    finally:
        h.stop_all(reversed(procs))
    print(f"bench/routing: {h.RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
