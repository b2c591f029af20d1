"""Capacity the gateway is not told: `tierq sim` engines of 4, 16 and 64 slots behind
tierq, open-loop Poisson load at 0.5x, 2x and 4x of each engine's capacity, 10%
priority, streaming, through four gateways compared in the same run:

  adaptive  no max_concurrency: the limit is learned (the default)
  fixed64   max_concurrency = 64 (the old default)
  oracle    max_concurrency = the engine's slots (told the truth)
  engine    the tier passed down to an engine that schedules by priority itself,
            the gateway not limiting (max_concurrency far above the slots)

Backends: FCFS engines; the same engines scheduling by priority (the gateway passes
the tier down); an opaque backend with no /metrics (kind "openai"); one that answers
429 past its waiting queue; one that answers 429 past its slots at once (conn: nginx
limit_conn in front of a hosted provider, no waiting room). Plus a capacity change: the engine's slots halve, then
double, mid-run; a time series shows how long adaptive takes to be back within its
bounds. Writes bench/results/capacity.md, capacity.png and the raw results, capacity.json.gz.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

MODEL = "sim-chat"
PRIORITY_SHARE = 0.1
# A mode's gateway that does not limit: far above any engine's slots here.
UNLIMITED = 4096


@dataclass(frozen=True)
class Backend:
    """One engine the gateway is not told about, and how the gateway talks to it."""

    name: str  # "fcfs-16", "prio-16", "opaque-16", "429-16", "conn-6"
    slots: int
    scheduling: str  # the sim's waiting-queue order: "fcfs" or "priority"
    kind: str  # the gateway's upstream kind
    metrics: bool  # the sim serves vLLM-named /metrics
    max_waiting: int | None  # the sim answers 429 past this many waiting
    ttft_ms: float
    tokens_per_s: float
    batch_knee: float

    @property
    def priority_scheduling(self) -> bool:
        return self.scheduling == "priority"

    def sim_flags(self) -> list[str]:
        flags = ["--batch-knee", f"{self.batch_knee:g}", "--scheduling", self.scheduling]
        if not self.metrics:
            flags.append("--no-metrics")
        if self.max_waiting is not None:
            flags += ["--max-waiting", str(self.max_waiting)]
        return flags


KINDS = {
    # name: (scheduling, upstream kind, metrics, max_waiting per slot)
    "fcfs": ("fcfs", "vllm", True, None),
    "prio": ("priority", "vllm", True, None),
    "opaque": ("fcfs", "openai", False, None),
    "429": ("fcfs", "openai", False, 1.0),
    "conn": ("fcfs", "openai", False, 0.0),
}


def speed(slots: int, target_rps: float, mean_tokens: float) -> tuple[float, float, float]:
    """(ttft_ms, tokens_per_s, batch_knee) for an engine of `slots` whose capacity is
    about `target_rps` however many slots it has, so every scenario offers the same
    request rates (and the same number of priority samples): a request's service time
    at a full batch is slots / target_rps, a fifth of it prefill. The knee is the
    sim's own default, 2 x slots, written out so the step model is explicit."""
    service = slots / target_rps
    knee = 2.0 * slots
    # A decode step over a full batch of b takes (1 + (b-1)/knee) / tokens_per_s.
    slowdown = 1 + (slots - 1) / knee
    tps = (mean_tokens - 1) * slowdown / (0.8 * service)
    return round(0.2 * service * 1000, 1), round(tps, 2), knee


def backend(spec: str, target_rps: float, mean_tokens: float) -> Backend:
    kind, _, slots_s = spec.partition("-")
    if kind not in KINDS or not slots_s.isdigit():
        raise SystemExit(f"unknown backend {spec!r}: one of {sorted(KINDS)} with slots, e.g. fcfs-16")
    slots = int(slots_s)
    scheduling, up_kind, metrics, waiting_per_slot = KINDS[kind]
    ttft, tps, knee = speed(slots, target_rps, mean_tokens)
    waiting = (None if waiting_per_slot is None else 0 if waiting_per_slot == 0
               else max(1, int(waiting_per_slot * slots)))
    return Backend(spec, slots, scheduling, up_kind, metrics, waiting, ttft, tps, knee)


def closed_form_capacity(b: Backend, mean_tokens: float) -> float:
    """Requests/s of a saturated engine from the sim's step model: a full batch, each
    request prefilling for ttft then decoding mean_tokens - 1 steps. Prefilling
    sequences are not in the decode batch, so this slightly under-states the batch
    (the measured value is the one used)."""
    step = (1 + (b.slots - 1) / b.batch_knee) / b.tokens_per_s
    return b.slots / (b.ttft_ms / 1000 + (mean_tokens - 1) * step)


def modes_for(b: Backend) -> list[str]:
    modes = ["adaptive"]
    if b.slots != 64:  # fixed 64 is the oracle itself for a 64-slot engine
        modes.append("fixed64")
    modes.append("oracle")
    if b.priority_scheduling:
        modes.append("engine")
    return modes


def admission_limit(mode: str, slots: int) -> int | None:
    """The pool's max_concurrency in this mode; None: not set (adaptive)."""
    return {"adaptive": None, "fixed64": 64, "oracle": slots, "engine": UNLIMITED}[mode]


def gateway_config(name: str, b: Backend, sim_url: str, limit: int | None,
                   args: argparse.Namespace) -> Path:
    cfg = h.TMP / f"{name}.toml"
    conc = "" if limit is None else f"max_concurrency = {limit}\n"
    conns = f"max_connections = {UNLIMITED}\n" if limit == UNLIMITED else ""
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{h.TMP}/{name}-ledger.db"

[[upstreams]]
name = "engine"
base_url = "{sim_url}"
kind = "{b.kind}"
priority_scheduling = {str(b.priority_scheduling).lower()}
{conns}
[[models]]
id = "{MODEL}"
upstream = "engine"
priority = true
input_per_m = "0.10"
output_per_m = "0.20"

[models.admission]
{conc}max_wait_ms = {{ default = {args.wait_default_ms}, priority = {args.wait_priority_ms} }}
""")
    return cfg


# ------------------------------------------------------------------ sampling


def sim_probe(root: str) -> Any:
    def probe() -> tuple[int, int, int, int]:
        s = h.get_json(root + "/sim/stats", timeout=2)
        return h.sim_running(s), int(s["waiting"]), int(s["slots"]), int(s.get("rejected", 0))
    return probe


def gateway_probe(root: str) -> Any:
    """The pool's limit (adaptive's current value, else its max_concurrency), in flight
    and queued, from /status.json."""
    def probe() -> tuple[float, int, int, str] | None:
        s = h.get_json(root + "/status.json", timeout=2)
        for p in s["pools"]:
            if p["model"] == MODEL:
                lim = p.get("limit")
                if isinstance(lim, dict):
                    return (float(lim["value"]), int(p["in_flight"]), int(sum(p["depth"].values())),
                            f"{lim.get('mode', '?')}/{lim.get('signal', '?')}")
                return float(p["max_concurrency"]), int(p["in_flight"]), int(sum(p["depth"].values())), "fixed"
        return None
    return probe


def window(samples: list[tuple[float, Any]], t_from: float, t_to: float) -> list[Any]:
    return [v for t, v in samples if t_from <= t <= t_to]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


# ------------------------------------------------------------------ one run


def goodput(recs: list[dict[str, Any]], t_from: float, t_to: float) -> float:
    """Requests/s that completed successfully within [t_from, t_to] (by completion
    time, whenever they arrived)."""
    n = sum(1 for r in recs if r["a"]["status"] == 200 and "err" not in r["a"]
            and t_from <= r["t"] + r["a"]["total"] / 1000 <= t_to)
    return n / (t_to - t_from)


def tier_stats(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Requests that arrived in the measured window: TTFT of those served, sheds."""
    first = [r["a"] for r in recs]
    ok = [a for a in first if a["status"] == 200 and "err" not in a]
    shed: dict[str, int] = {}
    for a in first:
        if a["status"] == 429:
            shed[a.get("code", "?")] = shed.get(a.get("code", "?"), 0) + 1
    ttft = [a["ttft"] for a in ok if "ttft" in a]
    return {
        "n": len(first), "ok": len(ok),
        "ttft_p50": h.pct(ttft, 50), "ttft_p90": h.pct(ttft, 90), "ttft_p99": h.pct(ttft, 99),
        "queue_p99": h.pct([a["qms"] for a in ok if "qms" in a], 99),
        "shed": shed, "shed_n": sum(shed.values()),
        "other_errors": sum(1 for a in first if a["status"] not in (200, 429) or "err" in a),
        "other_statuses": sorted({a["status"] for a in first if a["status"] not in (200, 429)}),
    }


def run_load(args: argparse.Namespace, url: str, sim: h.Proc, gw: h.Proc, rate: float,
             duration: float, changes: list[tuple[float, int]] = ()) -> dict[str, Any]:
    """One open-loop run; `changes` are (seconds after start, slots) for the sim."""
    sim_root = f"http://127.0.0.1:{sim.port}"
    h.post(sim_root + "/sim/reset")
    spec = {
        "url": url, "model": MODEL, "mode": "open", "rate": rate,
        "duration_s": duration, "grace_s": args.grace, "seed": args.seed,
        "priority_share": PRIORITY_SHARE, "send_tier": True, "stream": True,
        "max_tokens": args.max_tokens, "max_tokens_min": args.max_tokens_min, "retry": False,
        "timeout_s": duration + args.grace, "max_requests": int(rate * duration * 3 + 100),
    }
    done: list[tuple[float, int]] = []
    timers = []
    simsamp = h.Sampler(sim_probe(sim_root), every=0.1)
    gwsamp = h.Sampler(gateway_probe(f"http://127.0.0.1:{gw.port}"), every=0.25)
    with simsamp, gwsamp:
        t0 = simsamp.t0
        for at, slots in changes:
            def change(slots: int = slots) -> None:
                h.post(sim_root + "/sim/capacity", {"slots": slots})
                done.append((time.monotonic() - t0, slots))
            tm = threading.Timer(max(0.0, t0 + at - time.monotonic()), change)
            tm.start()
            timers.append(tm)
        recs, summary = h.loadgen(spec)
        for tm in timers:
            tm.cancel()
    stats = h.get_json(sim_root + "/sim/stats")
    h.drain_sim(sim_root)
    return {"recs": recs, "sim": simsamp.samples, "gw": gwsamp.samples, "changes": done,
            "elapsed_s": summary["elapsed_s"], "sim_stats": stats,
            "sender_late_p99_ms": h.pct([r["late"] for r in recs], 99)}


def cell(args: argparse.Namespace, b: Backend, mode: str, load: float, capacity: float,
         run: dict[str, Any]) -> dict[str, Any]:
    t_from, t_to = args.warmup, args.duration
    recs = [r for r in run["recs"] if t_from <= r["t"] <= t_to]
    sim = window(run["sim"], t_from, t_to)
    gw = window(run["gw"], t_from, t_to)
    pri = tier_stats([r for r in recs if r["p"]])
    dfl = tier_stats([r for r in recs if not r["p"]])
    pri["goodput_rps"] = goodput([r for r in run["recs"] if r["p"]], t_from, t_to)
    dfl["goodput_rps"] = goodput([r for r in run["recs"] if not r["p"]], t_from, t_to)
    return {
        "backend": b.name, "mode": mode, "load": load, "rate": load * capacity,
        "capacity_rps": capacity, "slots": b.slots,
        "priority": pri, "default": dfl,
        "default_goodput_share": dfl["goodput_rps"] / capacity,
        "served_share": (pri["goodput_rps"] + dfl["goodput_rps"]) / capacity,
        "busy": mean([min(r, s) / s for r, _, s, _ in sim]),
        "engine_waiting_mean": mean([float(w) for _, w, _, _ in sim]),
        "engine_rejected": run["sim_stats"].get("rejected", 0),
        "limit_mean": mean([g[0] for g in gw]),
        "limit_min": min((g[0] for g in gw), default=math.nan),
        "limit_max": max((g[0] for g in gw), default=math.nan),
        # mode/signal as /status.json names them, e.g. "adaptive/engine", "fixed/none"
        "limit_kind": sorted({g[3] for g in gw}),
        "max_running_seen": run["sim_stats"].get("max_running_seen",
                                                 run["sim_stats"].get("max_generating_seen")),
        "elapsed_s": run["elapsed_s"], "sender_late_p99_ms": run["sender_late_p99_ms"],
        # For reading a cell afterwards: the gateway's limit every 0.25 s, and the
        # engine's running and waiting every 0.5 s, over the whole run.
        "limit_series": [[round(t, 2), g[0]] for t, g in run["gw"]],
        "engine_series": [[round(t, 2), v[0], v[1]] for t, v in run["sim"][::5]],
    }


# ------------------------------------------------------------------ capacity


def measure_capacity(args: argparse.Namespace, b: Backend) -> dict[str, Any]:
    """Saturate an FCFS engine of the same speed straight (closed loop, 3 x slots
    clients) and count completions per second after a warm-up."""
    sim = h.start_sim(f"cap-{b.slots}-{b.tokens_per_s:g}", b.slots, b.ttft_ms, b.tokens_per_s,
                      "--batch-knee", f"{b.batch_knee:g}")
    try:
        spec = {
            "url": f"http://127.0.0.1:{sim.port}/v1/chat/completions", "model": MODEL,
            "mode": "closed", "concurrency": 3 * b.slots, "duration_s": args.capacity_s,
            "grace_s": args.grace, "seed": args.seed, "stream": True,
            "max_tokens": args.max_tokens, "max_tokens_min": args.max_tokens_min,
            "timeout_s": args.capacity_s + args.grace, "ramp_s": 0.0,
        }
        recs, _ = h.loadgen(spec)
    finally:
        sim.stop()
    warm = args.capacity_s / 4
    ends = [r["t"] + r["a"]["total"] / 1000 for r in recs
            if r["a"]["status"] == 200 and "err" not in r["a"]]
    n = sum(1 for e in ends if warm <= e <= args.capacity_s)
    return {"measured_rps": n / (args.capacity_s - warm),
            "closed_form_rps": closed_form_capacity(b, mean_tokens(args))}


def mean_tokens(args: argparse.Namespace) -> float:
    return (min(args.max_tokens_min, args.max_tokens) + args.max_tokens) / 2


# ------------------------------------------------------------------ capacity change


def series(run: dict[str, Any], step: float, ttft_window: float, busy_window: float,
           end: float) -> list[dict[str, Any]]:
    """Every `step` s: priority p99 TTFT over requests that arrived in the last
    `ttft_window` s, the engine's busy share (running / its current slots) over the
    last `busy_window` s, the gateway's limit and the engine's waiting queue."""
    pri = [(r["t"], r["a"]) for r in run["recs"] if r["p"]]
    out = []
    t = step
    while t <= end + 1e-9:
        ttft = [a["ttft"] for at, a in pri if t - ttft_window < at <= t
                and a["status"] == 200 and "err" not in a and "ttft" in a]
        shed = sum(1 for at, a in pri if t - ttft_window < at <= t and a["status"] == 429)
        sim = [v for st, v in run["sim"] if t - busy_window < st <= t]
        gw = [v for st, v in run["gw"] if t - busy_window < st <= t]
        out.append({
            "t": round(t, 3),
            "priority_ttft_p99": h.pct(ttft, 99), "priority_n": len(ttft), "priority_shed": shed,
            "busy": mean([min(r, s) / s for r, _, s, _ in sim]),
            "slots": sim[-1][2] if sim else None,
            "engine_waiting": mean([float(w) for _, w, _, _ in sim]),
            "limit": gw[-1][0] if gw else None,
        })
        t += step
    return out


def time_back(points: list[dict[str, Any]], t_change: float, t_end: float, ref: dict[int, Any],
              hold: float) -> float | None:
    """Seconds from `t_change` until the series is within bounds (priority p99 TTFT
    within 1.2x of the oracle's at the current slots, busy >= 95% of the oracle's)
    and stays within them for `hold` s (or until `t_end`); None if never."""
    inside = []
    for p in points:
        if not (t_change < p["t"] <= t_end) or p["slots"] is None:
            continue
        r = ref[p["slots"]]
        ok = (not math.isnan(p["priority_ttft_p99"]) and p["priority_ttft_p99"] <= 1.2 * r["ttft_p99"]
              and not math.isnan(p["busy"]) and p["busy"] >= 0.95 * r["busy"])
        inside.append((p["t"], ok))
    for i, (t, ok) in enumerate(inside):
        if ok and all(o for tt, o in inside[i:] if tt <= min(t + hold, t_end)):
            return round(t - t_change, 2)
    return None


def change_scenario(args: argparse.Namespace, b: Backend, cap_full: float, cap_half: float,
                    procs: list[h.Proc]) -> dict[str, Any]:
    """The engine's slots halve at t1 and double back at t2, under a constant rate of
    `change_load` x the full engine's capacity. Oracle references: the same rate on
    an engine held at each slot count, with max_concurrency = those slots."""
    phase = args.change_phase
    t1, t2, end = phase, 2 * phase, 3 * phase
    half = b.slots // 2
    rate = args.change_load * cap_full
    out: dict[str, Any] = {"backend": b.name, "slots": b.slots, "half": half, "rate": rate,
                           "capacity_rps": {str(b.slots): cap_full, str(half): cap_half},
                           "t_changes": [t1, t2], "end": end}
    ref: dict[int, Any] = {}
    for slots in (b.slots, half):
        sim = h.start_sim(f"change-oracle-sim-{slots}", slots, b.ttft_ms, b.tokens_per_s,
                          *b.sim_flags())
        procs.append(sim)
        gw = h.start_gateway(f"change-oracle-{slots}", gateway_config(
            f"change-oracle-{slots}", b, f"http://127.0.0.1:{sim.port}/v1", slots, args))
        procs.append(gw)
        h.log(f"capacity change: oracle reference, {slots} slots, {rate:.1f} req/s")
        try:
            run = run_load(args, f"http://127.0.0.1:{gw.port}/v1/chat/completions", sim, gw,
                           rate, args.duration)
        finally:
            gw.stop()
            sim.stop()
        c = cell(args, b, "oracle", rate / (cap_full if slots == b.slots else cap_half),
                 cap_full if slots == b.slots else cap_half, run)
        ref[slots] = {"ttft_p99": c["priority"]["ttft_p99"], "busy": c["busy"],
                      "priority_shed": c["priority"]["shed_n"]}
        h.log(f"   pri ttft p99 {c['priority']['ttft_p99']:.0f} ms, busy {c['busy']:.3f}")
    out["oracle"] = {str(k): v for k, v in ref.items()}
    out["runs"] = {}
    for mode in args.change_modes.split(","):
        sim = h.start_sim(f"change-sim-{mode}", b.slots, b.ttft_ms, b.tokens_per_s, *b.sim_flags())
        procs.append(sim)
        gw = h.start_gateway(f"change-{mode}", gateway_config(
            f"change-{mode}", b, f"http://127.0.0.1:{sim.port}/v1",
            admission_limit(mode, b.slots), args))
        procs.append(gw)
        h.log(f"capacity change: {mode}, {b.slots} -> {half} at {t1:g} s -> {b.slots} at {t2:g} s")
        try:
            run = run_load(args, f"http://127.0.0.1:{gw.port}/v1/chat/completions", sim, gw,
                           rate, end, [(t1, half), (t2, b.slots)])
        finally:
            gw.stop()
            sim.stop()
        pts = series(run, args.series_step, args.series_ttft_window, args.series_busy_window, end)
        # The change's actual instants (the POST's answer), not the planned ones.
        actual = [t for t, _ in run["changes"]] or [t1, t2]
        backs = [time_back(pts, actual[0], actual[1] if len(actual) > 1 else t2, ref, args.hold),
                 time_back(pts, actual[1] if len(actual) > 1 else t2, end, ref, args.hold)]
        pri_shed = sum(1 for r in run["recs"] if r["p"] and r["a"]["status"] == 429)
        out["runs"][mode] = {"series": pts, "changes": run["changes"], "back_s": backs,
                             "priority_shed": pri_shed}
        h.log(f"   back within bounds after halving {backs[0]} s, after doubling {backs[1]} s; "
              f"priority sheds {pri_shed}")
    return out


# ------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # The opaque and 429 engines and the 3x rows do not have 4 slots: the adaptive limit
    # starts at initial_concurrency = 4, the answer there. 6 is the example.
    ap.add_argument("--backends", default="fcfs-4,fcfs-16,fcfs-64,prio-4,prio-16,prio-64,"
                                          "opaque-6,429-6",
                    help="kind-slots: fcfs (kind vllm, metrics), prio (the same, engine "
                         "priority scheduling), opaque (kind openai, no metrics), 429 (kind "
                         "openai, no metrics, 429 past slots waiting), conn (the same, 429 "
                         "past slots at once)")
    ap.add_argument("--loads", default="0.5,2,4", help="x the engine's measured capacity")
    ap.add_argument("--three-x", default="fcfs-16,opaque-6",
                    help="backends that also run at 3x (the issue's done-when: kind vllm and kind openai)")
    ap.add_argument("--modes", default="adaptive,fixed64,oracle,engine",
                    help="subset of the modes (engine runs only on prio backends)")
    ap.add_argument("--target-rps", type=float, default=24.0,
                    help="each engine's speed is set so its capacity is about this")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-tokens-min", type=int, default=8)
    ap.add_argument("--duration", type=float, default=11.0, help="seconds of arrivals per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="first seconds left out of the stats")
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("--capacity-s", type=float, default=6.0, help="saturating run per engine")
    ap.add_argument("--wait-default-ms", type=int, default=2000)
    ap.add_argument("--wait-priority-ms", type=int, default=10000)
    ap.add_argument("--change-backend", default="fcfs-16", help="'' for no capacity change")
    ap.add_argument("--change-load", type=float, default=2.0)
    ap.add_argument("--change-phase", type=float, default=12.0,
                    help="seconds before the halving, between it and the doubling, and after")
    ap.add_argument("--change-modes", default="adaptive,oracle",
                    help="oracle here: fixed at the slots before the change (told once, not told again)")
    ap.add_argument("--series-step", type=float, default=0.5)
    ap.add_argument("--series-ttft-window", type=float, default=2.0)
    ap.add_argument("--series-busy-window", type=float, default=1.0)
    ap.add_argument("--hold", type=float, default=2.0,
                    help="seconds a return within bounds must hold to count")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--name", default="capacity", help="results file stem")
    args = ap.parse_args()

    h.build_loadgen()
    loads = [float(x) for x in args.loads.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    three = {x for x in args.three_x.split(",") if x}
    mt = mean_tokens(args)
    backends = [backend(x, args.target_rps, mt) for x in args.backends.split(",") if x]
    change_b = backend(args.change_backend, args.target_rps, mt) if args.change_backend else None
    machine = h.machine_line()
    t_start = time.monotonic()

    # Capacity per engine speed (slots, ttft, tokens/s, knee): one saturating run each.
    caps: dict[str, dict[str, Any]] = {}
    todo = list(backends)
    if change_b is not None:
        todo += [change_b, Backend(f"{change_b.name}-half", change_b.slots // 2, "fcfs", "vllm",
                                   True, None, change_b.ttft_ms, change_b.tokens_per_s,
                                   change_b.batch_knee)]
    for b in todo:
        key = f"{b.slots}/{b.ttft_ms:g}/{b.tokens_per_s:g}/{b.batch_knee:g}"
        if key not in caps:
            caps[key] = measure_capacity(args, b)
            h.log(f"capacity of {b.slots} slots (ttft {b.ttft_ms:g} ms, {b.tokens_per_s:g} tok/s, "
                  f"knee {b.batch_knee:g}): {caps[key]['measured_rps']:.1f} req/s measured, "
                  f"{caps[key]['closed_form_rps']:.1f} closed form")

    def cap(b: Backend) -> float:
        return float(caps[f"{b.slots}/{b.ttft_ms:g}/{b.tokens_per_s:g}/{b.batch_knee:g}"]["measured_rps"])

    procs: list[h.Proc] = []
    cells: list[dict[str, Any]] = []
    change: dict[str, Any] | None = None
    h.RESULTS.mkdir(exist_ok=True)

    def save(complete: bool) -> dict[str, Any]:
        """The results so far (written after every run, so a run that breaks late
        still leaves its numbers; `complete` says whether it got to the end)."""
        result = {"args": vars(args), "machine": machine, "complete": complete,
                  "wall_s": round(time.monotonic() - t_start, 1),
                  "backends": [{**asdict(b), "capacity_rps": cap(b),
                                "closed_form_rps": closed_form_capacity(b, mt)} for b in backends],
                  "capacities": caps, "cells": cells, "change": change}
        h.save_raw(args.name, result)
        return result

    try:
        plan = [(b, m) for b in backends for m in modes_for(b) if m in modes]
        for i, (b, mode) in enumerate(plan):
            sim = h.start_sim(f"{b.name}-{mode}-sim", b.slots, b.ttft_ms, b.tokens_per_s,
                              *b.sim_flags())
            procs.append(sim)
            gw = h.start_gateway(f"{b.name}-{mode}", gateway_config(
                f"{b.name}-{mode}", b, f"http://127.0.0.1:{sim.port}/v1",
                admission_limit(mode, b.slots), args))
            procs.append(gw)
            b_loads = sorted(set(loads) | ({3.0} if b.name in three else set()))
            try:
                for load in b_loads:
                    h.log(f"[{i+1}/{len(plan)}] {b.name} {mode} load {load:g}x "
                          f"({load * cap(b):.1f} req/s)")
                    run = run_load(args, f"http://127.0.0.1:{gw.port}/v1/chat/completions",
                                   sim, gw, load * cap(b), args.duration)
                    c = cell(args, b, mode, load, cap(b), run)
                    cells.append(c)
                    save(False)
                    p = c["priority"]
                    h.log(f"   pri ttft p99 {p['ttft_p99']:.0f} ms shed {p['shed_n']} | def "
                          f"goodput {c['default_goodput_share']:.2f} of capacity | busy "
                          f"{c['busy']:.3f} | limit {c['limit_mean']:.1f} | engine waiting "
                          f"{c['engine_waiting_mean']:.1f}")
            finally:
                gw.stop()
                sim.stop()
        if change_b is not None:
            half = Backend("", change_b.slots // 2, "fcfs", "vllm", True, None, change_b.ttft_ms,
                           change_b.tokens_per_s, change_b.batch_knee)
            change = change_scenario(args, change_b, cap(change_b), cap(half), procs)
    finally:
        h.stop_all(reversed(procs))

    result = save(True)
    from report import write_report  # noqa: E402  (matplotlib only when reporting)
    write_report(result, args.name)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
