"""Flex dispatch rules compared on a model of bench/tiers/flex.py's engine (#19).

Not the gateway: an event-driven model of `tierq sim` (slots, prefill, one
shared decode step whose time grows with the batch: sim_engine.py's step
model) fed by the same open-loop Poisson default+priority arrivals and an
endless flex backlog, with the dispatch rule as the only variable. Non-flex
waiters always go first; a rule only decides whether a free slot may go to
flex, at the moments the core decides it (a release, a non-flex arrival).
Every rule runs on the same seeds' arrivals (steady, or with --swing a rate that
alternates between two levels). Measured: engine busy (running
over slots, time-weighted), the non-flex wait for a slot (p99, and how many
wait at all) and the TTFT that makes (wait + prefill) over the no-flex run's.

Rules (H: the flex reserve in slots, ceil(flex_headroom x slots)):
  static H        today's core: flex while in flight < slots - H
  peak H W        flex while flex in flight < slots - H - (max non-flex in flight over the last W s)
  ewma H T K      flex while flex in flight < slots - H - (m + K sqrt(m)), m the EWMA (time constant T)
                  of non-flex in flight
  holdoff H T     static H, and no flex within T s of a non-flex arrival
  afterwait H T   static H, and no flex within T s of a non-flex request having had to wait
  target H        static with a reserve of at least H that a controller moves: up by (1 - eps) x gain for
                  each non-flex request that had to wait, down by eps x gain for each that did not, so
                  that about eps of them wait (--target eps, --gain)

Writes RESULTS/<name>.json and prints the table bench/README.md "Tiers" quotes.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402

Rule = Callable[["Model", float], bool]


class Model:
    """One run: the engine, the non-flex queue and the rule's inputs."""

    def __init__(self, args: argparse.Namespace, rule: Rule | None, seed: int) -> None:
        self.a, self.rule, self.rng = args, rule, random.Random(seed)
        self.slots = args.slots
        self.prefilling = 0
        self.decoding: dict[int, list[Any]] = {}  # id -> [kind, tokens left]
        self.nonflex = self.flex = 0
        self.queue: deque[float] = deque()
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.step_pending = False
        self.waits: list[float] = []
        self.busy_area = 0.0
        self.last_t = 0.0
        # The rules' inputs.
        self.hist: deque[tuple[float, int]] = deque([(0.0, 0)])
        self.ewma = 0.0
        self.last_arrival = -1e9
        self.last_wait = -1e9
        self.reserve = 2.0  # the "target" rule's reserve, in slots

    def push(self, t: float, kind: str, data: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def running(self) -> int:
        return self.nonflex + self.flex

    def advance(self, t: float) -> None:
        dt = t - self.last_t
        if t > self.a.warmup:
            self.busy_area += self.running() * (t - max(self.last_t, self.a.warmup))
        if dt > 0:
            self.ewma += (self.nonflex - self.ewma) * (1 - math.exp(-dt / self.a.ewma_tau))
        self.last_t = t

    def peak(self, t: float, window: float) -> int:
        while len(self.hist) > 1 and self.hist[1][0] <= t - window:
            self.hist.popleft()
        return max(n for _, n in self.hist)

    def start(self, t: float, kind: str) -> None:
        if kind == "f":
            self.flex += 1
        else:
            self.nonflex += 1
            self.hist.append((t, self.nonflex))
        self.prefilling += 1
        self.push(t + self.a.ttft_ms / 1000, "prefilled", kind)

    def end(self, t: float, kind: str) -> None:
        if kind == "f":
            self.flex -= 1
        else:
            self.nonflex -= 1
            self.hist.append((t, self.nonflex))

    def dispatch(self, t: float) -> None:
        while self.queue and self.running() < self.slots:
            arrived = self.queue.popleft()
            if self.a.target:
                # Stochastic approximation: up by 1 - eps a non-flex request that
                # waited, down by eps one that did not; at equilibrium eps of them wait.
                eps = self.a.target
                self.reserve = min(self.slots, max(0.0, self.reserve + self.a.gain * (
                    (1 - eps) if t > arrived else -eps)))
            if arrived >= self.a.warmup:
                self.waits.append(t - arrived)
            self.start(t, "d")
        if self.queue:
            self.last_wait = t
        if self.rule is None or self.queue:
            return
        while self.running() < self.slots and self.rule(self, t):
            self.start(t, "f")

    def step_time(self, b: int) -> float:
        return float((1 + (max(b, 1) - 1) / (2 * self.slots)) / self.a.tokens_per_s)

    def kick(self, t: float) -> None:
        if not self.step_pending and self.decoding:
            self.step_pending = True
            self.push(t + self.step_time(len(self.decoding)), "step")

    def next_arrival(self, t: float) -> float:
        """Poisson at --rate, or with --swing alternating --rate and --rate x
        --swing every --period / 2 s (memoryless: past a change it redraws)."""
        while True:
            half = self.a.period / 2
            rate = self.a.rate if self.a.swing == 1 or (t // half) % 2 == 0 else self.a.rate * self.a.swing
            nxt = t + self.rng.expovariate(rate)
            change = (t // half + 1) * half
            if self.a.swing == 1 or nxt < change:
                return nxt
            t = change

    def run(self) -> dict[str, Any]:
        end = self.a.warmup + self.a.duration
        self.push(self.next_arrival(0.0), "arrival")
        self.dispatch(0.0)
        while self.events:
            t, _, kind, data = heapq.heappop(self.events)
            if t > end:
                break
            self.advance(t)
            if kind == "arrival":
                self.last_arrival = t
                self.queue.append(t)
                self.push(self.next_arrival(t), "arrival")
                self.dispatch(t)
            elif kind == "prefilled":
                self.prefilling -= 1
                self.seq += 1
                self.decoding[self.seq] = [data, self.a.max_tokens - 1]
                self.kick(t)
            else:
                self.step_pending = False
                done = []
                for k, v in self.decoding.items():
                    v[1] -= 1
                    if v[1] <= 0:
                        done.append(k)
                for k in done:
                    self.end(t, self.decoding.pop(k)[0])
                self.kick(t)
                if done:
                    self.dispatch(t)
        self.advance(end)
        w = sorted(self.waits)
        return {"busy": self.busy_area / self.a.duration / self.slots, "n": len(w),
                "wait_p99_ms": w[int(0.99 * (len(w) - 1))] * 1000 if w else 0.0,
                "waited_share": sum(1 for x in w if x > 1e-9) / max(1, len(w))}


def make_rule(spec: str, slots: int) -> tuple[Rule | None, str]:
    name, *p = spec.split()
    v = [float(x) for x in p]
    H = int(v[0]) if v else 0
    if name == "none":
        return None, "no flex"
    if name == "target":
        return (lambda m, t: m.running() < slots - max(H, math.ceil(m.reserve))), \
            f"target: reserve raised by each non-flex wait, lowered by each non-wait, at least {H}"
    if name == "static":
        return (lambda m, t: m.running() < slots - H), f"static: flex while in flight < {slots} - {H}"
    if name == "peak":
        return (lambda m, t: m.flex < slots - H - m.peak(t, v[1])), \
            f"peak: flex below {slots} - {H} - max non-flex over {v[1]:g} s"
    if name == "ewma":
        return (lambda m, t: m.flex < slots - H - (m.ewma + v[2] * math.sqrt(max(m.ewma, 1.0)))), \
            f"ewma: flex below {slots} - {H} - (m + {v[2]:g} sqrt m), tau {v[1]:g} s"
    if name == "holdoff":
        return (lambda m, t: m.running() < slots - H and t - m.last_arrival > v[1]), \
            f"holdoff: static {H}, none within {v[1] * 1000:g} ms of a non-flex arrival"
    if name == "afterwait":
        return (lambda m, t: m.running() < slots - H and t - m.last_wait > v[1]), \
            f"afterwait: static {H}, none within {v[1] * 1000:g} ms of a non-flex wait"
    raise SystemExit(f"unknown rule {spec!r}")


DEFAULT_RULES = ("none; static 2; static 4; static 6; static 8; static 10; static 12; "
                 "peak 2 0.5; peak 2 1; peak 0 0.5; peak 0 1; ewma 2 0.5 1; ewma 2 0.5 2; ewma 0 0.5 2; "
                 "holdoff 2 0.02; holdoff 2 0.05; afterwait 2 0.2; afterwait 4 0.5; target 2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=20)
    ap.add_argument("--ttft-ms", type=float, default=50.0)
    ap.add_argument("--tokens-per-s", type=float, default=40.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rate", type=float, default=21.4, help="non-flex arrivals/s (flex.py's open loop)")
    ap.add_argument("--swing", type=float, default=1.0,
                    help="< 1: the rate alternates between --rate and --rate x this every --period / 2 s")
    ap.add_argument("--period", type=float, default=120.0)
    ap.add_argument("--duration", type=float, default=400.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ewma-tau", type=float, default=0.5)
    ap.add_argument("--target", type=float, default=0.01, help="the target rule's share of non-flex that wait")
    ap.add_argument("--gain", type=float, default=0.5, help="the target rule's step, in slots")
    ap.add_argument("--rules", default=DEFAULT_RULES, help="';'-separated rules (see the module doc)")
    ap.add_argument("--name", default="tiers-flex-rules")
    args = ap.parse_args()
    rows, out = [], []
    base_ttft = None
    for spec in [s.strip() for s in args.rules.split(";")]:
        rule, desc = make_rule(spec, args.slots)
        runs = [Model(args, rule, seed).run() for seed in range(args.seeds)]
        busy = sum(r["busy"] for r in runs) / len(runs)
        p99 = max(r["wait_p99_ms"] for r in runs)
        waited = sum(r["waited_share"] for r in runs) / len(runs)
        ttft = args.ttft_ms + p99
        if rule is None:
            base_ttft = ttft
        ratio = ttft / base_ttft if base_ttft else float("nan")
        out.append({"rule": spec, "desc": desc, "busy": busy, "wait_p99_ms": p99, "waited_share": waited,
                    "ttft_p99_over_no_flex": ratio, "runs": runs})
        rows.append((spec, f"{busy:.3f}", f"{p99:.0f}", f"{waited:.1%}", f"{ratio:.2f}x"))
        h.log(f"{spec}: busy {busy:.3f}, wait p99 {p99:.0f} ms, waited {waited:.1%}, ttft {ratio:.2f}x")
    table = h.md_table(["rule", "engine busy", "non-flex wait p99 ms (worst seed)", "non-flex that wait",
                        "TTFT p99 / no flex (wait + prefill)"], rows)
    print(table)
    h.RESULTS.mkdir(parents=True, exist_ok=True)
    (h.RESULTS / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rules": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
