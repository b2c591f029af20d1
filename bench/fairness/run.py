"""Fair inside each lane (issue #18): API keys sharing one `tierq sim` engine behind
`tierq serve`, each cell run through a FIFO gateway (`fairness = "off"`) and a fair
one (`fairness = "tokens"`) in the same run, with the engine's capacity known
(`max_concurrency` = the sim's slots) and learned (adaptive). Each key is its own
load generator process (bench/common/loadgen) with its own bearer token, so every
request goes through real sockets as a client's would.

Cells:
  greedy-default   nine polite keys (about 0.4x capacity in all, Poisson) beside one
                   greedy key holding 40 streams, all in the default lane
  greedy-priority  the same, all in the priority lane
  mark             the nine strictly ahead: they in the priority lane, the greedy key
                   in the default lane (the best a scheduler inside a lane can do)
  greedy-mixed     a greedy priority key beside five polite priority keys and four
                   polite default keys
  weights          six backlogged keys of weights 1, 1, 2, 2, 4, 4 (shares by tokens)
  lone             one key alone, backlogged (work conservation)
  deadline-priority  backlogged priority keys; a third of the requests carry
                   x-tierq-max-queue-ms between 0.2x and 2x the lane's typical wait
  deadline-default the same in the default lane, under priority traffic
And the gateway's CPU per request, fairness on against off, over interleaved rounds
on a fast engine. Writes bench/results/NAME.md and NAME.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

MODEL = "sim-chat"
GREEDY_STREAMS = 40
POLITE_KEYS = 9
# An SSE response of n tokens is n + 2 events here (the role chunk and [DONE]).
EVENT_OVERHEAD = 2
FAIRNESS = ("off", "tokens")
LIMITS = ("known", "learned")


@dataclass
class Group:
    """One load generator: one key, one lane, open (Poisson at `rate`) or closed
    (`streams` clients back to back), optionally a deadline header."""

    name: str
    key: str  # the key's name (its token is looked up)
    lane: str  # "priority" | "default"
    rate: float = 0.0
    streams: int = 0
    deadline_ms: int | None = None
    role: str = ""  # "polite", "greedy", "backlog", "deadline", "cross"


@dataclass
class Keys:
    """The bench's API keys in one SQLite key store: name -> (public id, token)."""

    db: Path
    ids: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    def create(self, name: str, weight: float | None = None) -> None:
        """A key made through the store's own call; its weight set with the CLI
        (`tierq keys update`), as an operator would."""
        from tierq.keys import KeyStore  # the bench runs under the PY it drives

        with KeyStore(str(self.db)) as store:
            info, token = store.create(name)
        self.ids[name], self.tokens[name] = info.public_id, token
        if weight is not None and weight != 1:
            subprocess.run([h.PY, "-m", "tierq", "keys", "update", info.public_id, "--weight",
                            f"{weight:g}", "--db", str(self.db)],
                           capture_output=True, text=True, check=True, cwd=h.TMP)


def shared_queues(keys: Keys, names: list[str]) -> list[list[Any]]:
    """Which of `names` (key names) share a flow queue of their hands of two (the
    core's own hash, `fair_queues` = 64 as the gateways run): their service is
    counted in one queue's counter, so their shares are off by it. Key ids are
    random, so which keys share differs from run to run. [[queue, [names]], ...]"""
    from tierq import Admission  # the bench runs under the PY it drives

    core = Admission(max_concurrency=1)._core
    holders: dict[int, list[str]] = {}
    for n in names:
        a, b, _, _ = core.ask(keys.ids[n])
        for q in {a, b}:
            holders.setdefault(q, []).append(n)
    return [[q, ns] for q, ns in sorted(holders.items()) if len(ns) > 1]


def has_fairness() -> bool:
    """Does this build take `[models.admission] fairness`? (A FIFO-only build runs the
    FIFO gateways alone, and the report says so.)"""
    r = subprocess.run([h.PY, "-c", "import tierq; tierq.PoolSettings(fairness='off')"],
                       capture_output=True, text=True)
    return r.returncode == 0


# ------------------------------------------------------------------ servers


def gateway_config(name: str, sim_url: str, limit: int | None, fairness: str | None,
                   keys_db: Path, args: argparse.Namespace) -> Path:
    cfg = h.TMP / f"{name}.toml"
    conc = "" if limit is None else f"max_concurrency = {limit}\n"
    fair = "" if fairness is None else f'fairness = "{fairness}"\n'
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{h.TMP}/{name}-ledger.db"

[keys]
path = "{keys_db}"

[[upstreams]]
name = "engine"
base_url = "{sim_url}"
kind = "vllm"

[[models]]
id = "{MODEL}"
upstream = "engine"
priority = true
input_per_m = "0.10"
output_per_m = "0.20"

[models.admission]
{conc}{fair}queue_depth = 1024
max_wait_ms = {{ default = {args.wait_default_ms}, priority = {args.wait_priority_ms} }}
""")
    return cfg


@dataclass
class Gw:
    limit: str  # "known" | "learned"
    fairness: str  # "off" | "tokens"
    sim: h.Proc
    gw: h.Proc

    @property
    def label(self) -> str:
        return f"{self.limit}/{self.fairness}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gw.port}/v1/chat/completions"


def start_pair(name: str, limit: int | None, fairness: str | None, keys: Keys,
               args: argparse.Namespace, slots: int, ttft_ms: float, tps: float,
               procs: list[h.Proc]) -> tuple[h.Proc, h.Proc]:
    sim = h.start_sim(f"{name}-sim", slots, ttft_ms, tps)
    procs.append(sim)
    gw = h.start_gateway(name, gateway_config(name, f"http://127.0.0.1:{sim.port}/v1", limit,
                                              fairness, keys.db, args))
    procs.append(gw)
    return sim, gw


def measure_capacity(args: argparse.Namespace) -> float:
    """Requests/s of the engine saturated straight (closed loop, 3 x slots clients),
    completions counted after a quarter of the run."""
    sim = h.start_sim("capacity-sim", args.slots, args.ttft_ms, args.tokens_per_s)
    try:
        recs, _ = h.loadgen({
            "url": f"http://127.0.0.1:{sim.port}/v1/chat/completions", "model": MODEL,
            "mode": "closed", "concurrency": 3 * args.slots, "duration_s": args.capacity_s,
            "grace_s": args.grace, "seed": args.seed, "stream": True,
            "max_tokens": args.max_tokens, "max_tokens_min": args.max_tokens_min,
            "timeout_s": args.capacity_s + args.grace})
    finally:
        sim.stop()
    warm = args.capacity_s / 4
    n = sum(1 for r in recs if ok(r["a"]) and warm <= r["t"] + r["a"]["total"] / 1000 <= args.capacity_s)
    return n / (args.capacity_s - warm)


# ------------------------------------------------------------------ one cell


def ok(a: dict[str, Any]) -> bool:
    return bool(a["status"] == 200 and "err" not in a)


def tokens_of(a: dict[str, Any]) -> int:
    return max(0, int(a.get("events", 0)) - EVENT_OVERHEAD) if ok(a) else 0


def run_groups(g: Gw, groups: list[Group], keys: Keys, args: argparse.Namespace,
               duration: float, seed: int) -> dict[str, Any]:
    """Every group's load generator at once; records tagged with their group, `t`
    (arrival) shifted to the cell's own start."""
    h.post(f"http://127.0.0.1:{g.sim.port}/sim/reset")
    out: dict[str, list[dict[str, Any]]] = {}
    errors: list[BaseException] = []
    t0 = time.monotonic()

    def one(i: int, gr: Group) -> None:
        headers = [["authorization", f"Bearer {keys.tokens[gr.key]}"]]
        if gr.deadline_ms is not None:
            headers.append(["x-tierq-max-queue-ms", str(gr.deadline_ms)])
        spec: dict[str, Any] = {
            "url": g.url, "model": MODEL, "duration_s": duration, "grace_s": args.grace,
            "seed": seed * 1000 + i, "priority_share": 1.0 if gr.lane == "priority" else 0.0,
            "send_tier": True, "stream": True, "max_tokens": args.max_tokens,
            "max_tokens_min": args.max_tokens_min, "retry": False, "headers": headers,
            "timeout_s": duration + args.grace,
        }
        if gr.streams:
            spec.update(mode="closed", concurrency=gr.streams, ramp_s=0.0)
        else:
            spec.update(mode="open", rate=gr.rate, max_requests=int(gr.rate * duration * 3 + 50))
        start = time.monotonic() - t0
        try:
            recs, _ = h.loadgen(spec)
        except BaseException as e:  # noqa: BLE001 - reported once the others finish
            errors.append(e)
            return
        for r in recs:
            r["t"] = round(r["t"] + start, 3)
        out[gr.name] = recs

    gwsamp = h.Sampler(gateway_probe(f"http://127.0.0.1:{g.gw.port}"), every=0.5)
    with gwsamp:
        threads = [threading.Thread(target=one, args=(i, gr)) for i, gr in enumerate(groups)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError(f"{g.label}: {errors[0]}")
    h.drain_sim(f"http://127.0.0.1:{g.sim.port}")
    return {"recs": out, "limit": [v for _, v in gwsamp.samples]}


def deadline_margin(root: str, lane: str) -> float:
    """`lane`'s learned deadline refusal margin now (/status.json), a share of
    the predicted wait (nan if unreadable)."""
    try:
        s = h.get_json(root + "/status.json", timeout=2)
        return float(next(p for p in s["pools"] if p["model"] == MODEL)["deadline_margin"][lane])
    except Exception:  # noqa: BLE001 - a gateway without the field, or gone
        return math.nan


def gateway_probe(root: str) -> Any:
    def probe() -> float | None:
        s = h.get_json(root + "/status.json", timeout=2)
        for p in s["pools"]:
            if p["model"] == MODEL:
                lim = p.get("limit")
                return float(lim["value"]) if isinstance(lim, dict) else float(p["max_concurrency"])
        return None
    return probe


def group_stats(recs: list[dict[str, Any]], t_from: float, t_to: float) -> dict[str, Any]:
    """Requests that arrived in [t_from, t_to]: TTFT of those served, sheds by code;
    tokens served by completion time in the window."""
    arr = [r["a"] for r in recs if t_from <= r["t"] <= t_to]
    served = [a for a in arr if ok(a)]
    ttft = [a["ttft"] for a in served if "ttft" in a]
    shed: dict[str, int] = {}
    for a in arr:
        if a["status"] == 429:
            shed[a.get("code", "?")] = shed.get(a.get("code", "?"), 0) + 1
    done = [r for r in recs if ok(r["a"]) and t_from <= r["t"] + r["a"]["total"] / 1000 <= t_to]
    return {
        "n": len(arr), "ok": len(served), "shed": shed,
        "other": sum(1 for a in arr if not ok(a) and a["status"] != 429),
        "ttft_p50": h.pct(ttft, 50), "ttft_p99": h.pct(ttft, 99),
        "queue_p50": h.pct([a["qms"] for a in served if "qms" in a], 50),
        "done_rps": len(done) / (t_to - t_from),
        "tokens_per_s": sum(tokens_of(r["a"]) for r in done) / (t_to - t_from),
    }


def pooled(run: dict[str, Any], groups: list[Group], pick: Any, t_from: float,
           t_to: float) -> dict[str, Any]:
    recs = [r for gr in groups if pick(gr) for r in run["recs"][gr.name]]
    return group_stats(recs, t_from, t_to)


def jain(xs: list[float]) -> float:
    if not xs or not any(xs):
        return math.nan
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def window_service(recs: list[dict[str, Any]], t_from: float, t_to: float) -> float:
    return float(sum(tokens_of(r["a"]) for r in recs
                     if ok(r["a"]) and t_from <= r["t"] + r["a"]["total"] / 1000 < t_to))


def summarize(cell: str, run: dict[str, Any], groups: list[Group], args: argparse.Namespace,
              extra: dict[str, Any]) -> dict[str, Any]:
    t_from, t_to = args.warmup, args.duration
    by_group = {gr.name: group_stats(run["recs"][gr.name], t_from, t_to) for gr in groups}
    total = pooled(run, groups, lambda gr: True, t_from, t_to)
    out: dict[str, Any] = {
        "groups": by_group, "total_rps": total["done_rps"], "total_tokens_per_s": total["tokens_per_s"],
        "limit_mean": sum(run["limit"]) / len(run["limit"]) if run["limit"] else math.nan,
        **extra,
    }
    for role in sorted({gr.role for gr in groups}):
        for lane in ("priority", "default"):
            sel = [gr for gr in groups if gr.role == role and gr.lane == lane]
            if sel:
                out[f"{role}_{lane}"] = pooled(run, sel, lambda gr, s=sel: gr in s, t_from, t_to)
    if cell == "weights":
        out["windows"] = fairness_windows(run, groups, args)
    return out


def fairness_windows(run: dict[str, Any], groups: list[Group], args: argparse.Namespace) -> dict[str, Any]:
    """Per `args.window` s window: each backlogged key's tokens served, Jain's index
    among the keys of equal weight (per weight), and of service / weight over all."""
    back = [gr for gr in groups if gr.role in ("backlog", "greedy")]
    weights = {gr.name: float(gr.key.split("-w")[-1]) if "-w" in gr.key else 1.0 for gr in back}
    wins = []
    t = args.warmup
    while t + args.window <= args.duration + 1e-9:
        svc = {gr.name: window_service(run["recs"][gr.name], t, t + args.window) for gr in back}
        classes: dict[float, list[float]] = {}
        for name, s in svc.items():
            classes.setdefault(weights[name], []).append(s)
        wins.append({"t": round(t, 1), "service": svc,
                     "jain_equal": {f"{w:g}": jain(v) for w, v in classes.items() if len(v) > 1},
                     "jain_weighted": jain([svc[n] / weights[n] for n in svc])})
        t += args.window
    total = {gr.name: window_service(run["recs"][gr.name], args.warmup, args.duration) for gr in back}
    all_s = sum(total.values())
    wsum = sum(weights.values())
    shares = {n: {"weight": weights[n], "share": s / all_s if all_s else math.nan,
                  "fair_share": weights[n] / wsum,
                  "ratio": (s / all_s) / (weights[n] / wsum) if all_s else math.nan}
              for n, s in total.items()}
    return {"windows": wins, "shares": shares}


# ------------------------------------------------------------------ cells


def polite_groups(lane: str, total_rate: float, keys: int = POLITE_KEYS, prefix: str = "polite") -> list[Group]:
    return [Group(f"{prefix}-{lane}-{i}", f"polite-{i}", lane, rate=total_rate / keys, role="polite")
            for i in range(keys)]


def cell_groups(cell: str, cap: float, args: argparse.Namespace, wait_ms: dict[str, float]) -> list[Group]:
    polite_rate = args.polite_load * cap
    greedy = args.greedy_streams
    if cell == "greedy-default":
        return [*polite_groups("default", polite_rate), Group("greedy", "greedy", "default", streams=greedy, role="greedy")]
    if cell == "greedy-priority":
        return [*polite_groups("priority", polite_rate), Group("greedy", "greedy", "priority", streams=greedy, role="greedy")]
    if cell == "mark":
        return [*polite_groups("priority", polite_rate), Group("greedy", "greedy", "default", streams=greedy, role="greedy")]
    if cell == "greedy-mixed":
        pri = [Group(f"polite-priority-{i}", f"polite-{i}", "priority", rate=polite_rate / POLITE_KEYS,
                     role="polite") for i in range(5)]
        dfl = [Group(f"polite-default-{i}", f"polite-{i}", "default", rate=polite_rate / POLITE_KEYS,
                     role="polite") for i in range(5, POLITE_KEYS)]
        return [*pri, *dfl, Group("greedy", "greedy", "priority", streams=greedy, role="greedy")]
    if cell == "weights":
        return [Group(f"w{w}-{j}", f"back-{j}-w{w}", "default", streams=args.backlog_streams, role="backlog")
                for w in (1, 2, 4) for j in "ab"]
    if cell == "lone":
        return [Group("lone", "lone", "default", streams=args.backlog_streams * 2, role="greedy")]
    if cell in ("deadline-priority", "deadline-default"):
        lane = cell.split("-")[1]
        typical = wait_ms[lane]
        back = [Group(f"back-{i}", f"polite-{i}", lane, streams=args.deadline_streams, role="backlog")
                for i in range(4)]
        # A third of the requests: the backlog serves about the engine's capacity, so
        # deadline arrivals at half of it make a third of what is offered.
        factors = [0.2, 0.5, 0.8, 1.2, 1.6, 2.0]
        rate = 0.5 * cap / len(factors)
        dls = [Group(f"deadline-{f:g}x", f"polite-{i % 4}", lane, rate=rate,
                     deadline_ms=max(1, round(f * typical)), role="deadline")
               for i, f in enumerate(factors)]
        cross = []
        if lane == "default":
            cross = [Group(f"cross-priority-{i}", f"polite-{5 + i}", "priority",
                           rate=args.cross_load * cap / 2, role="cross") for i in range(2)]
        return [*back, *dls, *cross]
    raise SystemExit(f"unknown cell {cell!r}")


def deadline_stats(run: dict[str, Any], groups: list[Group], args: argparse.Namespace) -> dict[str, Any]:
    """Of the requests with a deadline: refused at once (a 429 within `args.refuse_ms`
    of sending), shed later (admitted, the deadline passed), served within it,
    served past it (queued longer than the deadline)."""
    t_from, t_to = args.warmup, args.duration
    rows = []
    tot = {"n": 0, "refused_fast": 0, "refused_slow": 0, "served": 0, "served_late": 0,
           "other": 0}
    refuse_ms: list[float] = []
    for gr in groups:
        if gr.deadline_ms is None:
            continue
        c = {"n": 0, "refused_fast": 0, "refused_slow": 0, "served": 0, "served_late": 0, "other": 0}
        for r in run["recs"][gr.name]:
            if not t_from <= r["t"] <= t_to:
                continue
            a = r["a"]
            c["n"] += 1
            if a["status"] == 429:
                refuse_ms.append(a["total"])
                c["refused_fast" if a["total"] <= args.refuse_ms else "refused_slow"] += 1
            elif ok(a):
                c["served"] += 1
                if a.get("qms", 0.0) > gr.deadline_ms:
                    c["served_late"] += 1
            else:
                c["other"] += 1
        rows.append({"group": gr.name, "deadline_ms": gr.deadline_ms, **c})
        for k in tot:
            tot[k] += c[k]
    admitted = tot["served"] + tot["refused_slow"]
    missed = tot["served_late"] + tot["refused_slow"]
    fast = [ms for ms in refuse_ms if ms <= args.refuse_ms]
    return {"rows": rows, **tot, "admitted": admitted,
            "missed_share": missed / admitted if admitted else math.nan,
            "refusal_ms_p50": h.pct(refuse_ms, 50), "refusal_ms_p99": h.pct(refuse_ms, 99),
            "refused_fast_ms_p99": h.pct(fast, 99), "refused_fast_ms_max": max(fast, default=math.nan)}


PRED_METRIC = "tierq_queue_wait_prediction_error_seconds"


def prediction_error(root: str, tier: str) -> dict[str, float]:
    """The gateway's histogram of the wait prediction's error (|realized -
    predicted|, s, both directions summed), read from /metrics (cumulative since
    start: the caller takes differences), for one tier."""
    try:
        with __import__("urllib.request").request.urlopen(root + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(PRED_METRIC + "_bucket") and f'tier="{tier}"' in line:
            m = re.search(r'le="([^"]+)"\}\s+(\S+)', line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def counter(root: str, name: str) -> float:
    """A counter's sum over its labels from /metrics (nan if unreadable)."""
    try:
        with __import__("urllib.request").request.urlopen(root + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return math.nan
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def hist_p50(before: dict[str, float], after: dict[str, float]) -> float:
    diff = sorted(((math.inf if k == "+Inf" else float(k), after[k] - before.get(k, 0.0)) for k in after))
    if not diff or diff[-1][1] <= 0:
        return math.nan
    half = diff[-1][1] / 2
    return next(le for le, c in diff if c >= half)


def hist_p50_interpolated(before: dict[str, float], after: dict[str, float]) -> float:
    """The p50 estimated as Prometheus' histogram_quantile does: linear inside the
    bucket the median falls in (from its lower edge, 0 for the first). The buckets
    here are 100 and 250 ms apart where the waits are, so the upper edge alone
    (`hist_p50`) can be 2.5x the median it bounds."""
    diff = sorted(((math.inf if k == "+Inf" else float(k), after[k] - before.get(k, 0.0)) for k in after))
    if not diff or diff[-1][1] <= 0:
        return math.nan
    half = diff[-1][1] / 2
    lo, below = 0.0, 0.0
    for le, c in diff:
        if c >= half:
            if math.isinf(le):
                return lo
            return lo + (le - lo) * (half - below) / (c - below) if c > below else le
        lo, below = le, c
    return math.nan


def typical_wait(g: Gw, cell: str, keys: Keys, args: argparse.Namespace, cap: float) -> float:
    """The lane's p50 queue time (ms) under the cell's own load with no deadline
    sent, through the FIFO gateway: the "typical wait" the deadlines are drawn
    against."""
    lane = cell.split("-")[1]
    groups = [dataclasses.replace(gr, deadline_ms=None) for gr in cell_groups(cell, cap, args, {lane: 1.0})]
    run = run_groups(g, groups, keys, args, args.typical_s, args.seed + 7)
    q = [r["a"]["qms"] for gr in groups if gr.lane == lane for r in run["recs"][gr.name]
         if ok(r["a"]) and "qms" in r["a"] and r["t"] >= args.typical_s / 4]
    return h.pct(q, 50)


def together(fn: Any, items: list[Any]) -> list[Any]:
    """fn(item) for every item on its own thread, at once; results in order."""
    out: list[Any] = [None] * len(items)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = fn(items[i])
        except BaseException as e:  # noqa: BLE001 - re-raised below, once all ended
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def one_cell(g: Gw, cell: str, ci: int, cap: float, keys: Keys, args: argparse.Namespace,
             waits: dict[str, dict[str, float]]) -> dict[str, Any]:
    groups = cell_groups(cell, cap, args, waits.get(g.limit, {}))
    root = f"http://127.0.0.1:{g.gw.port}"
    lane = cell.split("-")[1] if cell.startswith("deadline") else "default"
    before = prediction_error(root, lane)
    refused_before = counter(root, "tierq_deadline_refused_total")
    run = run_groups(g, groups, keys, args, args.duration, args.seed + ci)
    extra: dict[str, Any] = {}
    if cell.startswith("deadline"):
        extra["deadline"] = deadline_stats(run, groups, args)
        # The whole cell (not only the measured window): refused at join by the
        # gateway's own count, against the 429s the clients had within refuse_ms.
        d = extra["deadline"]
        d["join_refused_counted"] = counter(root, "tierq_deadline_refused_total") - refused_before
        all_429 = [r["a"]["total"] for gr in groups if gr.deadline_ms is not None
                   for r in run["recs"][gr.name] if r["a"]["status"] == 429]
        d["all_429"] = len(all_429)
        d["all_429_fast"] = sum(1 for t in all_429 if t <= args.refuse_ms)
        extra["typical_wait_ms"] = waits[g.limit][cell.split("-")[1]]
        extra["deadline_margin"] = deadline_margin(root, lane)
        after = prediction_error(root, lane)
        extra["prediction_error_p50_ms"] = 1000 * hist_p50(before, after)
        extra["prediction_error_p50_interpolated_ms"] = 1000 * hist_p50_interpolated(before, after)
        q = [r["a"]["qms"] for gr in groups if gr.lane == lane for r in run["recs"][gr.name]
             if ok(r["a"]) and "qms" in r["a"] and args.warmup <= r["t"] <= args.duration]
        extra["queue_p50_ms"] = h.pct(q, 50)
        extra["prediction_error_p50"] = extra["prediction_error_p50_ms"] / extra["queue_p50_ms"] \
            if extra["queue_p50_ms"] else math.nan
        extra["prediction_error_p50_interpolated"] = \
            extra["prediction_error_p50_interpolated_ms"] / extra["queue_p50_ms"] if extra["queue_p50_ms"] else math.nan
    return {"cell": cell, "limit": g.limit, "fairness": g.fairness,
            **summarize(cell, run, groups, args, extra)}


# ------------------------------------------------------------------ CPU per request


def cpu_rounds(args: argparse.Namespace, keys: Keys, fairs: list[str], procs: list[h.Proc]) -> dict[str, Any]:
    """Gateway CPU per request, fairness on against off: two gateways in front of two
    fast engines (fixed limit, so requests queue), loaded in turn by ten keys closed
    loop, `args.cpu_rounds` rounds each, interleaved."""
    gws = {}
    for fair in fairs:
        sim, gw = start_pair(f"cpu-{fair}", args.cpu_slots, fair if len(fairs) > 1 else None, keys,
                             args, args.cpu_slots, 2.0, 2000.0, procs)
        gws[fair] = Gw("known", fair, sim, gw)
    groups = [Group(f"k{i}", f"polite-{i}", "default", streams=args.cpu_streams, role="backlog")
              for i in range(POLITE_KEYS)] + [Group("greedy", "greedy", "default",
                                                    streams=args.cpu_streams * 4, role="greedy")]
    rounds: dict[str, list[dict[str, float]]] = {f: [] for f in fairs}
    small = argparse.Namespace(**{**vars(args), "max_tokens": 8, "max_tokens_min": 8, "grace": 5.0})
    for i in range(args.cpu_rounds):
        order = fairs if i % 2 == 0 else fairs[::-1]
        for fair in order:
            g = gws[fair]
            c0 = h.cpu_seconds(g.gw.pid)
            run = run_groups(g, groups, keys, small, args.cpu_round_s, args.seed + 100 + i)
            c1 = h.cpu_seconds(g.gw.pid)
            n = sum(1 for gr in groups for r in run["recs"][gr.name] if ok(r["a"]))
            rounds[fair].append({"requests": n, "cpu_s": c1 - c0,
                                 "us_per_request": 1e6 * (c1 - c0) / n if n else math.nan})
            h.log(f"cpu round {i} {fair}: {n} requests, {1e6 * (c1 - c0) / max(n, 1):.0f} us/request")
    for g in gws.values():
        g.gw.stop()
        g.sim.stop()
    out: dict[str, Any] = {"rounds": rounds}
    for fair in fairs:
        per = sorted(r["us_per_request"] for r in rounds[fair])
        out[f"{fair}_median_us"] = per[len(per) // 2]
        out[f"{fair}_pooled_us"] = (1e6 * sum(r["cpu_s"] for r in rounds[fair])
                                    / max(1, sum(r["requests"] for r in rounds[fair])))
    if len(fairs) > 1:
        out["ratio_pooled"] = out["tokens_pooled_us"] / out["off_pooled_us"]
        out["ratio_median"] = out["tokens_median_us"] / out["off_median_us"]
    return out


# ------------------------------------------------------------------ main


CELLS = ("greedy-default", "greedy-priority", "mark", "greedy-mixed", "weights", "lone",
         "deadline-priority", "deadline-default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--limits", default=",".join(LIMITS), help="known (max_concurrency = slots), learned")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--tokens-per-s", type=float, default=200.0)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-tokens-min", type=int, default=16)
    ap.add_argument("--polite-load", type=float, default=0.4, help="the nine polite keys in all, x capacity")
    ap.add_argument("--greedy-streams", type=int, default=GREEDY_STREAMS)
    ap.add_argument("--backlog-streams", type=int, default=8, help="streams of each weights-cell key")
    ap.add_argument("--deadline-streams", type=int, default=6, help="streams of each backlogged deadline-cell key")
    ap.add_argument("--cross-load", type=float, default=0.3, help="priority traffic in deadline-default, x capacity")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per cell")
    ap.add_argument("--warmup", type=float, default=5.0, help="first seconds left out of the stats")
    ap.add_argument("--window", type=float, default=10.0, help="Jain's index window, s")
    ap.add_argument("--grace", type=float, default=20.0)
    ap.add_argument("--capacity-s", type=float, default=8.0)
    ap.add_argument("--typical-s", type=float, default=10.0,
                    help="the run that measures a deadline cell's typical wait (its load, no deadlines)")
    ap.add_argument("--refuse-ms", type=float, default=50.0, help="a refusal within this is 'at once'")
    ap.add_argument("--wait-default-ms", type=int, default=30000)
    ap.add_argument("--wait-priority-ms", type=int, default=60000)
    ap.add_argument("--cpu-rounds", type=int, default=6, help="0: no CPU rounds")
    ap.add_argument("--cpu-round-s", type=float, default=6.0)
    ap.add_argument("--cpu-slots", type=int, default=8)
    ap.add_argument("--cpu-streams", type=int, default=2)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--name", default="fairness", help="results file stem")
    args = ap.parse_args()

    h.build_loadgen()
    cells = [c for c in args.cells.split(",") if c]
    limits = [x for x in args.limits.split(",") if x]
    fair_build = has_fairness()
    fairs = list(FAIRNESS) if fair_build else ["off"]
    if not fair_build:
        h.log("this build has no [models.admission] fairness: FIFO only")
    machine = h.machine_line()
    t_start = time.monotonic()

    keys = Keys(h.TMP / "keys.db")
    for i in range(POLITE_KEYS):
        keys.create(f"polite-{i}")
    keys.create("greedy")
    keys.create("lone")
    for w in (1, 2, 4):
        for j in "ab":
            keys.create(f"back-{j}-w{w}", weight=w if fair_build else None)

    cap = measure_capacity(args)
    h.log(f"engine capacity: {cap:.1f} req/s ({args.slots} slots, ttft {args.ttft_ms:g} ms, "
          f"{args.tokens_per_s:g} tok/s, {args.max_tokens_min}-{args.max_tokens} tokens)")

    procs: list[h.Proc] = []
    results: list[dict[str, Any]] = []
    waits: dict[str, dict[str, float]] = {}
    cpu: dict[str, Any] | None = None
    try:
        gws: list[Gw] = []
        for limit in limits:
            for fair in fairs:
                sim, gw = start_pair(f"{limit}-{fair}", args.slots if limit == "known" else None,
                                     fair if fair_build else None, keys, args, args.slots,
                                     args.ttft_ms, args.tokens_per_s, procs)
                gws.append(Gw(limit, fair, sim, gw))
        if any(c.startswith("deadline") for c in cells):
            dcells = [c for c in cells if c.startswith("deadline")]
            fifos = [next(g for g in gws if g.limit == limit and g.fairness == "off") for limit in limits]
            measured = together(lambda g: {c.split("-")[1]: typical_wait(g, c, keys, args, cap) for c in dcells},
                                fifos)
            waits = {g.limit: w for g, w in zip(fifos, measured)}
            h.log(f"typical wait (FIFO, the cell's load without deadlines): {waits}")
        for ci, cell in enumerate(cells):
            h.log(f"{cell}: {', '.join(g.label for g in gws)} at once, {args.duration:g} s")
            # Every gateway at once, on the same arrivals (same seeds): each shares
            # the machine's load with the others, so the comparison sees the same noise.
            results += together(lambda g, cell=cell, ci=ci: one_cell(g, cell, ci, cap, keys, args, waits),
                                gws)
            for r in results[-len(gws):]:
                h.log(f"   {r['limit']}/{r['fairness']}: " + brief(r))
        for g in gws:
            g.gw.stop()
            g.sim.stop()
        if args.cpu_rounds:
            cpu = cpu_rounds(args, keys, fairs, procs)
    finally:
        h.stop_all(procs)

    report = {"name": args.name, "machine": machine, "load_end": list(__import__("os").getloadavg()),
              "elapsed_s": round(time.monotonic() - t_start, 1), "fair_build": fair_build,
              "capacity_rps": cap, "typical_wait_ms": waits, "args": vars(args),
              "cells": results, "cpu": cpu,
              "shared_queues": {"weights": shared_queues(keys, [f"back-{j}-w{w}" for w in (1, 2, 4) for j in "ab"]),
                                "greedy": shared_queues(keys, ["greedy"] + [f"polite-{i}" for i in range(POLITE_KEYS)])}
              if fair_build else None}
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    (h.RESULTS / f"{args.name}.json").write_text(json.dumps(compact(report), separators=(",", ":")) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import report as rep  # noqa: E402
    (h.RESULTS / f"{args.name}.md").write_text(rep.render(report))
    h.log(f"wrote {h.RESULTS / args.name}.md and .json")


def brief(c: dict[str, Any]) -> str:
    parts = [f"total {c['total_rps']:.1f} req/s"]
    for k in ("polite_priority", "polite_default", "greedy_priority", "greedy_default"):
        if k in c:
            parts.append(f"{k} p99 {h.fmt(c[k]['ttft_p99'], 0)} ms (n {c[k]['n']}, shed {sum(c[k]['shed'].values())})")
    if "windows" in c:
        parts.append("shares " + ", ".join(f"{n} {v['share']:.3f}" for n, v in c["windows"]["shares"].items()))
    if "deadline" in c:
        d = c["deadline"]
        parts.append(f"deadline n {d['n']} fast-refused {d['refused_fast']} slow {d['refused_slow']} "
                     f"late {d['served_late']}")
    return "; ".join(parts)


def compact(x: Any) -> Any:
    """Floats rounded to 4 significant digits, NaN as null: a small JSON."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: compact(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [compact(v) for v in x]
    return x


if __name__ == "__main__":
    main()
