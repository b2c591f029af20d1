"""The steps a request's end replaced by one core call, timed in one process.

old: what `Exchange` did per request before the Finisher, on the loop thread
(the LedgerRow built and checked, its push to the writer, the key settled) and
on the access writer thread (the row's cost formatted, `access_json` reading
the row); new: `Finisher.finish` (the same row checked and pushed, the same key
delta, the line formatted from the same values) and the one tuple the access
writer then takes as it is. Interleaved, best and median of 9 x 20,000.

    python bench/finisher/micro.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from tierq import ManualClock
from tierq._core import Finisher, LedgerWriter, access_json
from tierq.keys import KeyInfo, KeyLimiter
from tierq.ledger import APPLIED_TIERS, STATUSES, TIER_REASONS
from tierq.outcome import _ledger_row

N, ROUNDS = 20_000, 9


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        writer = LedgerWriter(str(Path(d) / "l.db"))
        fin = Finisher(writer, sorted(STATUSES), [t.value for t in APPLIED_TIERS],
                       sorted(TIER_REASONS))
        limiter = KeyLimiter(ManualClock())
        key = KeyInfo("k1", "k", 0.0, None, rpm=1_000_000, tpm=1_000_000)
        push = writer.push
        seq = iter(range(10**9))

        def fields() -> tuple[object, ...]:
            return (f"req_{next(seq):020d}", 1_764_988_261.5, "k1", "meta-llama/Meta-Llama-3.1-8B-Instruct",
                    "/v1/chat/completions", "priority", "priority", 20, 20, 67_500_000_000, "served",
                    False, None, 0.123, 1.5, "sim", None, None)

        access = (1_764_988_261.6, "req_x", "POST", "/v1/chat/completions", 200, 0.0015,
                  "127.0.0.1", None, None)

        def old() -> None:
            f = fields()
            row = _ledger_row(f)
            push(*row._params())
            limiter.settle(key, 40, 40)
            c = (1_764_988_261.6, f[0], "req_x", "POST", "/v1/chat/completions", 200, 0.0015,
                 "127.0.0.1", row, (), None, None)
            access_json(c, format(row.cost, "f"), None)

        def new() -> None:
            f = fields()
            settle = limiter.settlement(key, 40, 40)
            _, _, line = fin.finish(*f, *settle, access)
            (1_764_988_261.6, f[0], "req_x", "POST", "/v1/chat/completions", 200, 0.0015,
             "127.0.0.1", partial(_ledger_row, f), (), None, line)

        def base() -> None:
            fields()

        runs: dict[str, list[float]] = {"old": [], "new": [], "base": []}
        for r in range(ROUNDS):
            for name, fn in (("old", old), ("new", new), ("base", base))[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                for _ in range(N):
                    fn()
                runs[name].append((time.perf_counter() - t0) / N * 1e6)
        writer.close()
    b = runs["base"]
    for name in ("old", "new"):
        v = [x - statistics.median(b) for x in runs[name]]
        print(f"{name}: best {min(v):.2f} us, median {statistics.median(v):.2f} us per request end "
              f"(the fields tuple's own cost, {statistics.median(b):.2f} us, taken off)")
    o, n = statistics.median(runs["old"]) - statistics.median(b), statistics.median(runs["new"]) - statistics.median(b)
    print(f"new / old: {n / o:.2f}x (median)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
