"""Priority under overload: `tierq sim` with fixed slots behind the gateway, open-loop
Poisson load at 0.5x..4x of the sim's capacity, 10% and 50% priority, JSON and SSE.

Baselines in the same run: the same load through tierq with tiers ignored (no
request sends service_tier: one FIFO lane) and straight to the sim. Writes
bench/results/overload.md, overload.json and overload.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

MODEL = "sim-chat"


def gateway_config(sim_url: str, slots: int, queue_depth: int, wait_default: int,
                   wait_priority: int, priority_headroom: int = 0) -> Path:
    cfg = h.TMP / f"overload-headroom{priority_headroom}.toml"
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{h.TMP}/overload-ledger-headroom{priority_headroom}.db"

[[upstreams]]
name = "sim"
base_url = "{sim_url}"
kind = "openai"
max_connections = {slots}

[[models]]
id = "{MODEL}"
upstream = "sim"
priority = true
input_per_m = "0.10"
output_per_m = "0.20"

[models.admission]
max_concurrency = {slots}
queue_depth = {queue_depth}
max_wait_ms = {{ default = {wait_default}, priority = {wait_priority} }}
priority_headroom = {priority_headroom}
""")
    return cfg


class Probe:
    """What the overload sampler reads every 0.1 s: slots generating and requests
    waiting inside the sim, and the gateway's queue depth (with its /metrics round
    trip, the gateway's responsiveness)."""

    def __init__(self, sim_root: str, gw_root: str | None) -> None:
        self.sim_root, self.gw_root = sim_root, gw_root
        self.gw_probe_ms: list[float] = []

    def _gw_waiting(self) -> int:
        if self.gw_root is None:
            return 0
        import urllib.request
        with urllib.request.urlopen(self.gw_root + "/metrics", timeout=2) as r:
            text = r.read().decode()
        n = 0
        for line in text.splitlines():
            # tierq_queue_depth{model="…",lane="…"} N, one sample per pool and lane.
            if line.startswith("tierq_queue_depth{"):
                n += int(float(line.rsplit(" ", 1)[1]))
        return n

    def __call__(self) -> tuple[int, int, int]:
        s = h.get_json(self.sim_root + "/sim/stats", timeout=2)
        t = time.monotonic()
        gw = self._gw_waiting()
        if self.gw_root is not None:
            self.gw_probe_ms.append((time.monotonic() - t) * 1000)
        return h.sim_running(s), s["waiting"], gw


def busy_while_waiting(samples: list[tuple[float, int, int, int]], slots: int,
                       t_from: float, t_to: float) -> dict[str, Any]:
    waiting = [s for s in samples if t_from <= s[0] <= t_to and (s[2] + s[3]) > 0]
    if not waiting:
        return {"samples_waiting": 0, "busy_mean": None, "all_slots_busy": None}
    return {
        "samples_waiting": len(waiting),
        "busy_mean": sum(min(s[1], slots) / slots for s in waiting) / len(waiting),
        "all_slots_busy": sum(1 for s in waiting if s[1] >= slots) / len(waiting),
    }


def tier_stats(recs: list[dict[str, Any]], warmup: float, duration: float) -> dict[str, Any]:
    recs = [r for r in recs if r["t"] >= warmup]
    first = [r["a"] for r in recs]
    ok = [a for a in first if a["status"] == 200 and "err" not in a]
    shed = [a for a in first if a["status"] == 429]
    codes: dict[str, int] = {}
    for a in shed:
        codes[a.get("code", "?")] = codes.get(a.get("code", "?"), 0) + 1
    other = sum(1 for a in first if a["status"] not in (200, 429) or "err" in a)
    retried = [r for r in recs if r["a"]["status"] == 429 and "r" in r]
    got_in = [r for r in retried if r["r"]["status"] == 200 and "err" not in r["r"]]
    # Retry-After honesty: the wait that followed a 429 = the advertised wait the
    # client slept + the queue time of its retry (x-tierq-queue-ms), for retries
    # that got in. A retry shed again waited longer than we can measure.
    ratios = []
    ratios_s = []
    # Came back too early: the retry was shed again (a 429 on the retry).
    again = [r for r in retried if r["r"]["status"] == 429]
    again_codes: dict[str, int] = {}
    for r in again:
        c = r["r"].get("code", "?")
        again_codes[c] = again_codes.get(c, 0) + 1
    for r in got_in:
        actual = r["r"]["waited"] + (r["r"].get("qms") or 0.0)
        ra_ms = r["a"].get("ra_ms")
        if ra_ms:
            ratios.append(actual / ra_ms)
        if r["a"].get("ra_s"):
            ratios_s.append(actual / (r["a"]["ra_s"] * 1000.0))
    # The same, only for retries sent while the load was still on: one that comes back
    # after the last arrival finds a queue that is draining, which flatters any hint.
    during = [r for r in retried if r["t"] + (r["a"]["total"] + r["r"]["waited"]) / 1000 <= duration]
    ratios_on = [(r["r"]["waited"] + (r["r"].get("qms") or 0.0)) / r["a"]["ra_ms"] for r in during
                 if r["r"]["status"] == 200 and "err" not in r["r"] and r["a"].get("ra_ms")]
    n = len(first)
    ttft = [a["ttft"] for a in ok if "ttft" in a]
    total = [a["total"] for a in ok]
    return {
        "n": n,
        "ok": len(ok),
        "success": len(ok) / n if n else math.nan,
        "success_after_retry": (len(ok) + len(got_in)) / n if n else math.nan,
        "ttft_p50": h.pct(ttft, 50), "ttft_p99": h.pct(ttft, 99),
        # Time spent in the gateway's admission queue (x-tierq-queue-ms), served requests.
        "queue_p50": h.pct([a["qms"] for a in ok if "qms" in a], 50),
        "queue_p99": h.pct([a["qms"] for a in ok if "qms" in a], 99),
        # TTFT minus the gateway's own queue time: backend TTFT + everything else the
        # request met on the way (proxying, event-loop lag), served requests.
        "ttft_less_queue_p50": h.pct([a["ttft"] - a["qms"] for a in ok if "ttft" in a and "qms" in a], 50),
        "ttft_less_queue_p99": h.pct([a["ttft"] - a["qms"] for a in ok if "ttft" in a and "qms" in a], 99),
        "total_p50": h.pct(total, 50), "total_p99": h.pct(total, 99),
        "shed": codes, "other_errors": other,
        "retried": len(retried), "retry_got_in": len(got_in),
        "ra_missing": sum(1 for a in shed if not a.get("ra_ms") or not a.get("ra_s")),
        "ra_ratio_p50": h.pct(ratios, 50), "ra_ratio_p90": h.pct(ratios, 90),
        "ra_ratio_max": max(ratios) if ratios else math.nan,
        "retry_shed_again": len(again), "retry_shed_again_codes": again_codes,
        "load_retried": len(during), "load_retry_got_in": len(ratios_on),
        "load_retry_shed_again": sum(1 for r in during if r["r"]["status"] == 429),
        "load_ra_ratio_p50": h.pct(ratios_on, 50), "load_ra_ratio_p90": h.pct(ratios_on, 90),
        "load_ra_within_2x": (sum(1 for x in ratios_on if 0.5 <= x <= 2.0) / len(ratios_on)) if ratios_on else math.nan,
        "ra_within_2x": (sum(1 for x in ratios if 0.5 <= x <= 2.0) / len(ratios)) if ratios else math.nan,
        "ra_s_within_2x": (sum(1 for x in ratios_s if 0.5 <= x <= 2.0) / len(ratios_s)) if ratios_s else math.nan,
    }


def runqueue_wait_s(pid: int) -> float:
    """Time the process's main thread spent runnable but waiting for a CPU (schedstat), s:
    what other processes on the machine took from it."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return math.nan


def cpu_times() -> list[int]:
    """The machine's CPU time by kind (/proc/stat: user nice system idle iowait irq softirq steal)."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def run_cell(args: argparse.Namespace, mode: str, url: str, sim: h.Proc, gw: h.Proc | None,
             rate: float, share: float, stream: bool, profile: str | None = None) -> dict[str, Any]:
    gw_root = f"http://127.0.0.1:{gw.port}" if gw is not None else None
    h.post(f"http://127.0.0.1:{sim.port}/sim/reset")
    spec = {
        "url": url, "model": MODEL, "mode": "open", "rate": rate,
        "duration_s": args.duration, "grace_s": args.grace, "seed": args.seed,
        "priority_share": share, "send_tier": mode == "tierq", "stream": stream,
        "max_tokens": args.max_tokens, "max_tokens_min": args.max_tokens_min, "retry": True, "timeout_s": args.duration + args.grace,
        "max_requests": int(rate * args.duration * 3 + 100),
    }
    cpu0 = {n: h.cpu_seconds(p.pid) for n, p in (("sim", sim), ("gateway", gw)) if p is not None}
    spy = raw = None
    if profile and gw is not None:
        raw = h.TMP / "overload-pyspy.raw"
        spy = h.pyspy_start(gw.pid, int(args.duration), raw)
    rq0 = runqueue_wait_s(gw.pid) if gw is not None else math.nan
    m0 = cpu_times()
    t0 = time.monotonic()
    probe = Probe(f"http://127.0.0.1:{sim.port}", gw_root)
    with h.Sampler(probe, every=0.1) as sampler:
        recs, summary = h.loadgen(spec)
    # (seconds, sim generating, sim waiting, gateway waiting)
    samples = [(t, *v) for t, v in sampler.samples]
    wall = time.monotonic() - t0
    rq = (runqueue_wait_s(gw.pid) - rq0) if gw is not None else math.nan
    dm = [b - a for a, b in zip(m0, cpu_times())]
    # CPU each server used, in cores (1.0 = one core busy for the whole run).
    cores = {n: (h.cpu_seconds(p.pid) - cpu0[n]) / wall
             for n, p in (("sim", sim), ("gateway", gw)) if p is not None}
    prof = None
    if spy is not None and raw is not None:
        spy.wait(60)
        prof = h.pyspy_summary(raw, f"tierq during overload {rate:.0f} req/s, share {share}, "
                               f"{'SSE' if stream else 'JSON'}", h.RESULTS / profile)
    if args.keep_records:
        keep = Path(args.keep_records)
        keep.mkdir(parents=True, exist_ok=True)
        stem = f"{mode}-{rate:.0f}rps-share{share:g}-{'sse' if stream else 'json'}"
        (keep / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        # (seconds, sim generating, sim waiting, gateway waiting) every 0.1 s
        (keep / f"{stem}.samples.json").write_text(json.dumps(samples))
    stats = h.get_json(f"http://127.0.0.1:{sim.port}/sim/stats")
    late = [r["late"] for r in recs]
    out = {
        "mode": mode, "rate": rate, "share": share, "stream": stream,
        "requests": len(recs), "elapsed_s": summary["elapsed_s"],
        "sender_late_p99_ms": h.pct(late, 99),
        "sim_max_in_flight": stats["max_in_flight_seen"],
        "sim_max_generating": stats["max_generating_seen"],
        "cpu_cores": cores, "profile": prof,
        # Share of the run the gateway's event loop was runnable but not on a CPU.
        "gw_runqueue_wait_share": rq / wall,
        # The machine over the run: share of all CPU time busy (any process) and stolen
        # by the hypervisor.
        "machine_busy_share": 1 - (dm[3] + dm[4]) / max(1, sum(dm)),
        "machine_steal_share": dm[7] / max(1, sum(dm)),
        "gw_probe_p50_ms": h.pct(probe.gw_probe_ms, 50), "gw_probe_p99_ms": h.pct(probe.gw_probe_ms, 99),
        "busy": busy_while_waiting(samples, args.slots, args.warmup, args.duration),
        "priority": tier_stats([r for r in recs if r["p"]], args.warmup, args.duration),
        "default": tier_stats([r for r in recs if not r["p"]], args.warmup, args.duration),
        "all": tier_stats(recs, args.warmup, args.duration),
    }
    # Let whatever the sim still holds finish before the next cell.
    h.drain_sim(f"http://127.0.0.1:{sim.port}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--ttft-ms", type=float, default=200.0)
    ap.add_argument("--tokens-per-s", type=float, default=25.0)
    ap.add_argument("--max-tokens", type=int, default=36)
    ap.add_argument("--max-tokens-min", type=int, default=4,
                    help="each request asks for a length drawn uniformly in [min, max]; "
                         "set equal to --max-tokens for one fixed length")
    ap.add_argument("--loads", default="0.5,1,2,4")
    ap.add_argument("--shares", default="0.1,0.5")
    ap.add_argument("--streams", default="0,1")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--grace", type=float, default=15.0)
    ap.add_argument("--queue-depth", type=int, default=256)
    ap.add_argument("--wait-default-ms", type=int, default=3000)
    ap.add_argument("--wait-priority-ms", type=int, default=10000)
    ap.add_argument("--priority-headroom", type=int, default=2,
                    help="the gateway's priority_headroom: slots a default request may not take "
                         "(tierq's own default is 0; 2 of 64 is what the 1.2x TTFT target needs at 2x, "
                         "see bench/README.md)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=1, help="gateway worker processes (tierq serve --workers)")
    ap.add_argument("--baselines", default="fifo,direct")
    ap.add_argument("--name", default="overload", help="results file stem")
    ap.add_argument("--keep-records", default="", metavar="DIR",
                    help="also write every run's per-request records (JSON lines) into DIR")
    ap.add_argument("--profile", action="store_true", help="py-spy the gateway in the heaviest 10%% JSON run")
    args = ap.parse_args()

    h.build_loadgen()
    loads = [float(x) for x in args.loads.split(",")]
    shares = [float(x) for x in args.shares.split(",")]
    streams = [bool(int(x)) for x in args.streams.split(",")]
    baselines = [b for b in args.baselines.split(",") if b]
    # Service time of one request in the sim: first token at ttft, then one token
    # per interval; capacity = slots / service time.
    mean_tokens = (min(args.max_tokens_min, args.max_tokens) + args.max_tokens) / 2
    service_s = args.ttft_ms / 1000 + max(0.0, mean_tokens - 1) / args.tokens_per_s
    capacity = args.slots / service_s
    h.log(f"sim: {args.slots} slots, service time {service_s*1000:.0f} ms, capacity {capacity:.1f} req/s")
    machine = h.machine_line()

    procs: list[h.Proc] = []
    cells: list[dict[str, Any]] = []
    try:
        sim = h.start_sim("overload-sim", args.slots, args.ttft_ms, args.tokens_per_s)
        procs.append(sim)
        cfg = gateway_config(f"http://127.0.0.1:{sim.port}/v1", args.slots, args.queue_depth,
                             args.wait_default_ms, args.wait_priority_ms, args.priority_headroom)
        def start_gateway(name: str, cfg: Path) -> h.Proc:
            p = h.start_gateway(name, cfg, args.workers)
            procs.append(p)
            return p

        gw = start_gateway("overload-tierq", cfg)
        gw_root = f"http://127.0.0.1:{gw.port}"
        # The FIFO baseline is the gateway without tiers: every request is default, so
        # with a priority headroom it would lose those slots. It gets its own gateway
        # with the same settings and no headroom.
        fifo_gw = gw
        if args.priority_headroom and "fifo" in baselines:
            fifo_gw = start_gateway("overload-tierq-fifo", gateway_config(
                f"http://127.0.0.1:{sim.port}/v1", args.slots, args.queue_depth,
                args.wait_default_ms, args.wait_priority_ms, 0))
        gws = {"tierq": gw, "fifo": fifo_gw}
        targets = {
            "tierq": (gw_root + "/v1/chat/completions", True),
            "fifo": (f"http://127.0.0.1:{fifo_gw.port}/v1/chat/completions", True),
            "direct": (f"http://127.0.0.1:{sim.port}/v1/chat/completions", False),
        }
        plan = []
        for stream in streams:
            for load in loads:
                for share in shares:
                    plan.append(("tierq", load, share, stream))
                # Baselines ignore tiers: one share is enough (the tag is only a label).
                for b in baselines:
                    plan.append((b, load, shares[-1], stream))
        for i, (mode, load, share, stream) in enumerate(plan):
            url, via_gw = targets[mode]
            prof = (f"{args.name}-tierq-pyspy.txt" if args.profile and mode == "tierq" and load == max(loads)
                    and share == min(shares) and not stream else None)
            h.log(f"[{i+1}/{len(plan)}] {mode} load {load}x share {share} stream {stream}")
            cell = run_cell(args, mode, url, sim, gws[mode] if via_gw else None, load * capacity, share,
                            stream, prof)
            cell["load"] = load
            cells.append(cell)
            p, d = cell["priority"], cell["default"]
            h.log(f"   pri ok {p['success']:.2f} ttft p99 {p['ttft_p99']:.0f} | def ok "
                  f"{d['success']:.2f} ttft p99 {d['ttft_p99']:.0f} | busy {cell['busy']['busy_mean']} | cores {cell['cpu_cores']}")
    finally:
        h.stop_all(reversed(procs))

    result = {"args": vars(args), "service_s": service_s, "capacity_rps": capacity,
              "machine": machine, "cells": cells}
    h.RESULTS.mkdir(exist_ok=True)
    (h.RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    from report import write_report  # noqa: E402  (matplotlib only when reporting)
    write_report(result, args.name)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
