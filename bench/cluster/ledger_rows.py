"""Ledger rows per second: the PostgreSQL ledger against the SQLite one, same run.

Each backend gets the same load: `--writers` tasks, each recording one row and
awaiting it (what a served response does before its last byte), over and over
for `--seconds`. Reported per backend: rows per second, the latency of `record()`
(queued to durable: committed in PostgreSQL, or in SQLite), rows per commit; and
the ratio of each to SQLite with the default durability. PostgreSQL runs on this
machine (tests/pg_server.py: Debian's server, a temporary cluster, fsync on), so
the figure is a floor for a real database server reached over the network only
in CPU, not in round trips.

    python bench/cluster/ledger_rows.py [--seconds 5] [--writers 256] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from pg_server import PASSWORD, PASSWORD_ENV, PgServer  # noqa: E402

from tierq.ledger import LedgerRow  # noqa: E402
from tierq.stores import LedgerStore, open_ledger  # noqa: E402

RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "bench" / "results"))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


async def run(ledger: LedgerStore, seconds: float, writers: int, tag: str) -> dict[str, Any]:
    await ledger.start()
    lat: list[float] = []
    n = 0
    stop = time.monotonic() + seconds

    async def writer(w: int) -> None:
        nonlocal n
        i = 0
        while time.monotonic() < stop:
            row = LedgerRow(f"{tag}-{w}-{i}", time.time(), "benchkey", "bench-model",
                            "chat/completions", "priority", "priority", 120, 40,
                            Decimal("0.0000123"), "served", latency_ms=12.5, upstream="sim")
            t0 = time.perf_counter()
            await ledger.record(row)
            lat.append(time.perf_counter() - t0)
            n += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    wall = time.perf_counter() - t0
    batches = int(getattr(ledger, "batches", 0))
    await ledger.close()
    stored = ledger.count()
    assert stored == n, f"{tag}: {stored} rows stored, {n} recorded"
    return {"rows": n, "rows_per_s": n / wall, "p50_ms": pct(lat, 0.5) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "rows_per_commit": n / batches if batches else None}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    os.environ[PASSWORD_ENV] = PASSWORD
    work = Path(tempfile.mkdtemp(prefix="tierq-ledger-bench-"))
    server = PgServer()
    server.init()
    server.start()
    try:
        url = server.create_database("bench")
        backends: list[tuple[str, LedgerStore]] = [
            ("sqlite (process)", open_ledger(f"sqlite:///{work / 'a.db'}")),
            ("sqlite (power)", open_ledger(f"sqlite:///{work / 'b.db'}", "power")),
            ("postgresql", open_ledger(url, password_env=PASSWORD_ENV, spool=str(work / "s.db"))),
        ]
        out: dict[str, Any] = {"seconds": args.seconds, "writers": args.writers, "backends": {}}
        for name, ledger in backends:
            out["backends"][name] = await run(ledger, args.seconds, args.writers,
                                              name.split()[0] + str(len(out["backends"])))
        base = out["backends"]["sqlite (process)"]["rows_per_s"]
        for r in out["backends"].values():
            r["ratio"] = r["rows_per_s"] / base
        return out
    finally:
        server.remove()
        shutil.rmtree(work, ignore_errors=True)


def table(out: dict[str, Any]) -> str:
    lines = [f"Ledger rows per second ({out['writers']} writers each awaiting its row, "
             f"{out['seconds']:g} s per backend, same run):", "",
             "| backend | rows/s | vs sqlite (process) | record() p50 ms | p99 ms | rows/commit |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in out["backends"].items():
        per = f"{r['rows_per_commit']:.0f}" if r["rows_per_commit"] else "-"
        lines.append(f"| {name} | {r['rows_per_s']:.0f} | {r['ratio']:.2f}x | {r['p50_ms']:.2f} "
                     f"| {r['p99_ms']:.2f} | {per} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--writers", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="a short run that only checks it works")
    p.add_argument("--name", default="cluster-ledger")
    args = p.parse_args()
    if args.smoke:
        args.seconds, args.writers, args.name = 0.5, 16, "cluster-ledger-smoke"
    out = asyncio.run(main_async(args))
    text = table(out)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(text)
    assert all(r["rows"] > 0 for r in out["backends"].values()), out
    return 0


if __name__ == "__main__":
    sys.exit(main())
