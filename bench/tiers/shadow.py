"""Shadow mode against enforcing, over the same seeded load (#19, target "Shadow").

One seeded open-loop schedule (arrival times, key, tier, max_tokens of every
request) is sent to `tierq serve` twice per round: once with its limits
enforcing and once with the same limits in shadow mode (`enforce = false` on
the pool's rate limit, `tierq keys ... --shadow` on the keys). The limits: the
pool's token bucket, two keys limited by rpm, two by tpm, two unlimited. Each
run starts a fresh gateway (fresh buckets) on a fresh key file; the sim behind
it has room for everything (no queue forms, so the queue's own bounds, which
shadow mode never lifts, shed nothing).

Enforcing, the sheds are read from the answers: a 429 `rate_limit_exceeded`
whose message names the model is the pool's rate, one naming the key is its
key's (rpm or tpm by which key sent it), and cross-checked with the core's
`tierq_admission_shed_total`. In shadow mode every request must be served, and
the decisions are `tierq_shadow_decisions_total{decision}`. Target: each
shadow count within 1% of the sheds enforcing makes (judged over all rounds and
round by round). The decisions hang on when the gateway's clock reads each
arrival, so a run on a real clock strays from the next run of the same schedule
in the same mode too: `spread_within_mode` measures that floor.

    python bench/tiers/shadow.py                      # 5 rounds of 30 s
    python bench/tiers/shadow.py --rounds 1 --duration 3 --name smoke
    python bench/tiers/shadow.py --clock manual --rounds 1 --name manual
Writes RESULTS/tiers-<name>.json (the default name: shadow).

`--clock manual`: the same schedule and limits, the gateway in this process
(create_app, real sockets, an in-process sim) with the pool's bucket and the key
limiter on one ManualClock that the driver moves to each request's arrival time,
the requests one after another. Time is then the schedule's alone, so shadow
mode's counts must equal enforcing's sheds exactly: the rule measured without
the real clock's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import harness as h  # noqa: E402

from tierq.keys import KeyStore  # noqa: E402

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
# Another pool on the same upstream, without limits: the warm-up goes there, so
# the upstream's connections, the ledger writer and the loop are warm when the
# measured load starts, alike in both modes (without it the shadow run, which
# sends three times the requests upstream, decided its first second late and
# bunched, 2-4% more rate refusals than enforcing).
WARM_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"
# The keys: name -> (rpm, tpm). Each sends a sixth of the load.
KEYS: dict[str, tuple[int | None, int | None]] = {
    "rpm-a": (60, None), "rpm-b": (48, None),
    "tpm-a": (None, 1800), "tpm-b": (None, 1500),
    "free-a": (None, None), "free-b": (None, None),
}
DECISIONS = ("rate_limited", "key_rpm", "key_tpm")
KEY_MESSAGE = "API key"  # in a key limit's 429 message, not in the pool's


def schedule(seed: int, rps: float, duration_s: float) -> list[tuple[float, str, str, int]]:
    """(offset s, key, tier, max_tokens) of every request: Poisson arrivals."""
    rng = random.Random(seed)
    out, t, names = [], 0.0, sorted(KEYS)
    while True:
        t += rng.expovariate(rps)
        if t >= duration_s:
            return out
        out.append((t, rng.choice(names), "priority" if rng.random() < 0.3 else "default",
                    rng.randint(10, 50)))


def config(name: str, sim_url: str, keys_db: Path, enforce: bool, rate: float, burst: int) -> Path:
    cfg = h.TMP / f"{name}.toml"
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
id = "{WARM_MODEL}"
upstream = "engine"

[models.admission]
max_concurrency = 512
queue_depth = 4096

[[models]]
id = "{MODEL}"
upstream = "engine"
priority = true

[models.admission]
max_concurrency = 512
queue_depth = 4096
rate = {rate}
burst = {burst}
{"" if enforce else "enforce = false"}
""")
    return cfg


async def send(root: str, tokens: dict[str, str], plan: list[tuple[float, str, str, int]],
               model: str = MODEL) -> list[tuple[int, str, str]]:
    """Sends the plan open-loop to `model`; per request (status, code, message)."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one(at: float, key: str, tier: str, max_tokens: int) -> tuple[int, str, str]:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            body = {"model": model, "service_tier": tier, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": "how many tokens is this?"}]}
            async with s.post(root + "/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {tokens[key]}"}) as r:
                data = await r.json(content_type=None)
                err = (data.get("error") or {}) if isinstance(data, dict) else {}
                return r.status, str(err.get("code") or ""), str(err.get("message") or "")

        t0 = time.monotonic()
        return await asyncio.gather(*(one(*p) for p in plan))


def metric(text: str, name: str) -> dict[str, float]:
    """The samples of family `name`: its labels' values joined by ',' -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[",".join(part.split('"')[1] for part in labels[len(name) + 1:-1].split('",')
                         if '"' in part)] = float(value)
    return out


def run_once(tag: str, sim: h.Proc, enforce: bool, plan: list[tuple[float, str, str, int]],
             args: argparse.Namespace) -> dict[str, Any]:
    keys_db = h.TMP / f"{tag}-keys.db"
    with KeyStore(str(keys_db)) as store:
        tokens = {k: store.create(k, rpm=rpm, tpm=tpm, enforce=enforce)[1]
                  for k, (rpm, tpm) in KEYS.items()}
    gw = h.start_gateway(tag, config(tag, f"http://127.0.0.1:{sim.port}/v1", keys_db, enforce,
                                     args.rate, args.burst))
    try:
        root = f"http://127.0.0.1:{gw.port}"
        warm = [(t, "free-a", tier, n) for t, _, tier, n in plan if t < args.warmup]
        asyncio.run(send(root, tokens, warm, WARM_MODEL))
        t0 = time.monotonic()
        answers = asyncio.run(send(root, tokens, plan))
        wall = time.monotonic() - t0
        with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        gw.stop()
    return summarize(enforce, plan, answers, text, wall)


def summarize(enforce: bool, plan: list[tuple[float, str, str, int]],
              answers: list[tuple[int, str, str]], text: str, wall: float) -> dict[str, Any]:
    """A run's record: its answers counted, its decisions (from the answers when
    enforcing, from the shadow metric in shadow mode) and the core's sheds."""
    statuses: dict[str, int] = {}
    for status, code, _ in answers:
        k = f"{status} {code}".strip()
        statuses[k] = statuses.get(k, 0) + 1
    decided = dict.fromkeys(DECISIONS, 0)
    if enforce:
        for (status, code, message), (_, key, _, _) in zip(answers, plan):
            if status == 429 and code == "rate_limit_exceeded":
                if KEY_MESSAGE in message:
                    decided["key_rpm" if KEYS[key][0] is not None else "key_tpm"] += 1
                else:
                    decided["rate_limited"] += 1
    else:
        shadow = metric(text, "tierq_shadow_decisions_total")
        decided = {d: int(shadow.get(d, 0)) for d in DECISIONS}
    core_shed = metric(text, "tierq_admission_shed_total")
    return {"mode": "enforce" if enforce else "shadow", "requests": len(plan),
            "wall_s": round(wall, 3), "statuses": statuses, "decisions": decided,
            "core_rate_shed": int(core_shed.get(f"{MODEL},rate_limit_exceeded", 0)),
            "core_shed": {k.split(",", 1)[1]: int(v) for k, v in core_shed.items()}}


def _spread(values: list[int]) -> float | None:
    """The largest |v / mean - 1| of a mode's runs (None under two runs or no decision)."""
    if len(values) < 2 or not sum(values):
        return None
    mean = sum(values) / len(values)
    return max(abs(v / mean - 1) for v in values)


async def run_manual(tag: str, enforce: bool, plan: list[tuple[float, str, str, int]],
                     args: argparse.Namespace) -> dict[str, Any]:
    """`run_once` on a manual clock, the gateway in this process."""
    from tierq import Admission, ManualClock
    from tierq.app import GATEWAY, create_app, runner_kwargs
    from tierq.config import (AdmissionConfig, Config, KeysConfig, LedgerConfig, ModelConfig,
                              UpstreamConfig)
    from tierq.keys import KeyLimiter
    from tierq.sim import start_sim
    from tierq.stores import open_ledger
    from aiohttp import web

    keys_db = h.TMP / f"{tag}-keys.db"
    with KeyStore(str(keys_db)) as store:
        tokens = {k: store.create(k, rpm=rpm, tpm=tpm, enforce=enforce)[1]
                  for k, (rpm, tpm) in KEYS.items()}
    clock = ManualClock()
    admission = AdmissionConfig(max_concurrency=512, queue_depth=4096, rate=args.rate,
                                burst=args.burst, enforce=enforce)
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{h.TMP / (tag + '-unused.db')}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(ModelConfig(MODEL, "sim", priority=True, admission=admission),),
                    keys=KeysConfig(str(keys_db)))
    sim = await start_sim("127.0.0.1", 0, slots=1024, ttft_ms=0.0, tokens_per_s=0.0)
    ledger = open_ledger(f"sqlite:///{h.TMP / (tag + '-ledger.db')}")
    await ledger.start()
    app = create_app(config, ledger=ledger, sim=sim,
                     pools={MODEL: Admission(admission.settings, clock=clock)})
    runner = web.AppRunner(app, **runner_kwargs())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    app[GATEWAY].limiter = KeyLimiter(clock)
    root = f"http://127.0.0.1:{port}"
    answers = []
    t0 = time.monotonic()
    try:
        async with aiohttp.ClientSession() as s:
            at_ns = 0
            for at, key, tier, max_tokens in plan:
                clock.advance_ns(int(at * 1e9) - at_ns)
                at_ns = int(at * 1e9)
                body = {"model": MODEL, "service_tier": tier, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": "how many tokens is this?"}]}
                async with s.post(root + "/v1/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {tokens[key]}"}) as r:
                    data = await r.json(content_type=None)
                    err = (data.get("error") or {}) if isinstance(data, dict) else {}
                    answers.append((r.status, str(err.get("code") or ""),
                                    str(err.get("message") or "")))
            async with s.get(root + "/metrics") as r:
                text = await r.text()
    finally:
        await runner.cleanup()
        await ledger.close()
        await sim.close()
    return summarize(enforce, plan, answers, text, time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds of the same load sent first to an unlimited pool")
    ap.add_argument("--rps", type=float, default=200.0)
    ap.add_argument("--rate", type=float, default=50.0, help="the pool's rate (admissions/s)")
    ap.add_argument("--burst", type=int, default=20)
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--name", default="shadow")
    ap.add_argument("--clock", choices=("real", "manual"), default="real",
                    help="manual: the gateway in this process on a manual clock (see above)")
    args = ap.parse_args()
    plan = schedule(args.seed, args.rps, args.duration)
    h.log(f"{len(plan)} requests over {args.duration} s, seed {args.seed}")
    sim = h.start_sim("sim", 1024, 2.0, 0.0) if args.clock == "real" else None
    runs = []
    try:
        for r in range(args.rounds):
            # Alternate which goes first, so a drift of the machine's load over
            # the session falls on both modes alike.
            for enforce in ((True, False) if r % 2 == 0 else (False, True)):
                tag = f"r{r}-{'enforce' if enforce else 'shadow'}"
                run = (run_once(tag, sim, enforce, plan, args) if sim is not None
                       else asyncio.run(run_manual(tag, enforce, plan, args)))
                run["round"] = r
                h.log(f"{tag}: {run['statuses']} decisions {run['decisions']}")
                runs.append(run)
    finally:
        if sim is not None:
            sim.stop()
    rounds = []
    for r in range(args.rounds):
        e = next(x for x in runs if x["round"] == r and x["mode"] == "enforce")
        s = next(x for x in runs if x["round"] == r and x["mode"] == "shadow")
        ratios = {d: (s["decisions"][d] / e["decisions"][d] if e["decisions"][d] else None)
                  for d in DECISIONS}
        rounds.append({"round": r, "enforce": e["decisions"], "shadow": s["decisions"],
                       "ratio": ratios,
                       "shadow_served_all": s["statuses"] == {"200": s["requests"]},
                       "within_1pct": all(v is not None and abs(v - 1) <= 0.01
                                          for v in ratios.values())})
    total = {m: {d: sum(x["decisions"][d] for x in runs if x["mode"] == m) for d in DECISIONS}
             for m in ("enforce", "shadow")}
    # The real clock's own noise: how far each mode's runs of the same schedule
    # stray from that mode's mean (enforcing against enforcing, shadow against shadow).
    spread = {m: {d: _spread([x["decisions"][d] for x in runs if x["mode"] == m])
                  for d in DECISIONS} for m in ("enforce", "shadow")}
    result = {
        "bench": "tiers/shadow", "machine": h.machine_line(),
        "params": {"rounds": args.rounds, "duration_s": args.duration, "rps": args.rps,
                   "pool_rate": args.rate, "pool_burst": args.burst, "seed": args.seed,
                   "warmup_s": args.warmup if args.clock == "real" else 0, "clock": args.clock,
                   "keys": {k: {"rpm": v[0], "tpm": v[1]} for k, v in KEYS.items()},
                   "requests_per_run": len(plan)},
        "runs": runs, "rounds": rounds, "total": total,
        "total_ratio": {d: (total["shadow"][d] / total["enforce"][d]
                            if total["enforce"][d] else None) for d in DECISIONS},
        "spread_within_mode": spread,
        # The target (+-1%) on the counts over every round, and round by round.
        "target_met_total": all(r is not None and abs(r - 1) <= 0.01 for r in (
            total["shadow"][d] / total["enforce"][d] if total["enforce"][d] else None
            for d in DECISIONS)) and all(x["shadow_served_all"] for x in rounds),
        "target_met_every_round": all(x["within_1pct"] and x["shadow_served_all"] for x in rounds),
    }
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    out = h.RESULTS / f"tiers-{args.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for x in rounds:
        h.log(f"round {x['round']}: enforce {x['enforce']} shadow {x['shadow']} "
              f"ratio {x['ratio']} served all in shadow: {x['shadow_served_all']}")
    h.log(f"total ratio {result['total_ratio']}; spread within a mode {spread}; "
          f"target met over all rounds: {result['target_met_total']}, every round: "
          f"{result['target_met_every_round']}; wrote {out}")


if __name__ == "__main__":
    main()
