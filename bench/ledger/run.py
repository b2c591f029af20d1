"""The ledger on its own, one or more builds of tierq interleaved in rounds
(each `--python` is an interpreter with its own tierq installed; the first is
the reference of the ratios). Per build and round, in a fresh process:

- c1: one awaited `record()` at a time (2,000 rows): wall, process CPU (loop
  and writer threads) and loop-thread CPU per row;
- c64: 64 tasks each awaiting records in a loop (12,800 rows): the same three;
- flood: 20,000 `record_nowait()` then one `flush()`: rows per second;
- busy loop: 1,000 awaited `record()`s one at a time while the same event loop runs
  other work (a task doing 0.5 ms of pure Python between yields, as other
  requests would): the commit round trip's p50 and p99. A writer that needs the
  GIL waits for the busy loop to hand it over; one that does not waits only for
  the loop to reach its wake-up. p50, p99 and max.

Rows are built before each timed part. Medians over rounds; writes
bench/results/<name>.md and .json.

    python bench/ledger/run.py [--python A --python B] [--rounds 4] [--name ledger]
    python bench/ledger/run.py --smoke      # one small round, checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"

CHILD = r'''
import asyncio, json, sys, tempfile, time
from decimal import Decimal
from pathlib import Path
from tierq.ledger import Ledger, LedgerRow

SCALE = float(sys.argv[1])
made = iter(range(10**9))

def row():
    return LedgerRow(request_id=f"b-{next(made)}", ts=0.0, key_id="k", model="m",
                     endpoint="chat.completions", requested_tier="priority",
                     applied_tier="priority", prompt_tokens=100, completion_tokens=20,
                     cost=Decimal("0.0000411"), status="served")

def clocks():
    return time.perf_counter(), time.process_time(), time.thread_time()

def per_row(n, a, b):
    return [(y - x) / n * 1e6 for x, y in zip(a, b)]

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]

async def main():
    ledger = Ledger(str(Path(tempfile.mkdtemp()) / "ledger.db"))
    await ledger.start()
    out = {}
    total = 0
    for r in [row() for _ in range(int(300 * SCALE))]:  # warm
        await ledger.record(r)
        total += 1
    n = int(2000 * SCALE)
    rows = [row() for _ in range(n)]
    a = clocks()
    for r in rows:
        await ledger.record(r)
    out["c1"] = per_row(n, a, clocks())
    total += n
    tasks, each = 64, int(200 * SCALE)
    work = [[row() for _ in range(each)] for _ in range(tasks)]
    async def worker(rs):
        for r in rs:
            await ledger.record(r)
    a = clocks()
    await asyncio.gather(*(worker(rs) for rs in work))
    out["c64"] = per_row(tasks * each, a, clocks())
    total += tasks * each
    n = int(20000 * SCALE)
    rows = [row() for _ in range(n)]
    t0 = time.perf_counter()
    for r in rows:
        ledger.record_nowait(r)
    await ledger.flush()
    out["flood_rows_per_s"] = n / (time.perf_counter() - t0)
    total += n
    stop = False
    async def busy():
        while not stop:
            t_end = time.perf_counter() + 0.0005
            while time.perf_counter() < t_end:
                pass
            await asyncio.sleep(0)
    b = asyncio.create_task(busy())
    lat = []
    n = int(1000 * SCALE)
    for r in [row() for _ in range(n)]:
        t0 = time.perf_counter()
        await ledger.record(r)
        lat.append((time.perf_counter() - t0) * 1e3)
    stop = True
    await b
    total += n
    out["busy_p50_ms"], out["busy_p99_ms"], out["busy_max_ms"] = pct(lat, 0.5), pct(lat, 0.99), max(lat)
    await ledger.close()
    assert ledger.count() == total, (ledger.count(), total)
    print(json.dumps(out))

asyncio.run(main())
'''

FIGURES = [  # (label, key, index into a [wall, cpu, loop cpu] triple or None, unit)
    ("one at a time: wall per row", "c1", 0, "us"),
    ("one at a time: process CPU per row", "c1", 1, "us"),
    ("one at a time: loop-thread CPU per row", "c1", 2, "us"),
    ("64 concurrent: wall per row", "c64", 0, "us"),
    ("64 concurrent: process CPU per row", "c64", 1, "us"),
    ("64 concurrent: loop-thread CPU per row", "c64", 2, "us"),
    ("flood: rows per second", "flood_rows_per_s", None, "rows/s"),
    ("busy loop: round trip p50", "busy_p50_ms", None, "ms"),
    ("busy loop: round trip p99", "busy_p99_ms", None, "ms"),
    ("busy loop: round trip max", "busy_max_ms", None, "ms"),
]


def value(res: dict[str, object], key: str, idx: int | None) -> float:
    v = res[key]
    return float(v[idx]) if idx is not None else float(v)  # type: ignore[index, arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", action="append", help="an interpreter with tierq installed (repeat to compare)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--name", default="ledger")
    ap.add_argument("--smoke", action="store_true", help="one small round, no files written")
    args = ap.parse_args()
    pythons = args.python or [sys.executable]
    scale, rounds = (0.05, 1) if args.smoke else (1.0, args.rounds)
    runs: dict[str, list[dict[str, object]]] = {py: [] for py in pythons}
    for r in range(rounds):
        order = pythons if r % 2 == 0 else pythons[::-1]
        for py in order:
            out = subprocess.run([py, "-c", CHILD, str(scale)], capture_output=True, text=True,
                                 timeout=600, check=True)
            runs[py].append(json.loads(out.stdout))
            print(f"round {r + 1} {py}: {out.stdout.strip()}", file=sys.stderr)
    if args.smoke:
        return 0
    header = ["figure", *(f"build {i + 1}" for i in range(len(pythons))),
              *(f"build {i + 1} / build 1" for i in range(1, len(pythons)))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, key, idx, unit in FIGURES:
        meds = [statistics.median(value(x, key, idx) for x in runs[py]) for py in pythons]
        spread = [(min(value(x, key, idx) for x in runs[py]), max(value(x, key, idx) for x in runs[py]))
                  for py in pythons]
        cells = [f"{m:,.1f} {unit} ({lo:,.1f} to {hi:,.1f})" if unit != "rows/s"
                 else f"{m:,.0f} ({lo:,.0f} to {hi:,.0f})" for m, (lo, hi) in zip(meds, spread)]
        ratios = [f"{m / meds[0]:.2f}x" for m in meds[1:]]
        lines.append("| " + " | ".join([label, *cells, *ratios]) + " |")
    builds = "\n".join(f"- build {i + 1}: `{py}`" for i, py in enumerate(pythons))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    md = (f"# The ledger on its own\n\n{os.cpu_count()} cores, load average {load} at the end, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{builds}\n\n"
          f"Median of {rounds} interleaved rounds "
          "(min to max in brackets), each build in a fresh process per round.\n\n"
          + "\n".join(lines) + "\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(md)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"pythons": pythons, "runs": runs}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
