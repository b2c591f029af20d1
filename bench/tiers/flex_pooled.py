"""The pooled view of a bench/tiers/flex.py run (bench/README.md, "Tiers"):
per scenario and class, requests, the share that waited in tierq's lane
(x-tierq-queue-ms > 1), the wait's and TTFT's p99 over every round's requests
together, TTFT's p99 per round, and TTFT - wait (the part outside the lane).

    python bench/tiers/flex_pooled.py tiers-flex-reserve
reads RESULTS/<name>.json and RESULTS/<name>-records.json.gz.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))
import harness as h  # noqa: E402


def main() -> int:
    name = sys.argv[1]
    meta = json.loads((h.RESULTS / f"{name}.json").read_text())
    warmup, duration = meta["args"]["warmup"], meta["args"]["duration"]
    raw: list[dict[str, Any]] = h.load_raw(f"{name}-records")
    labels = list(dict.fromkeys(r["scenario"] for r in raw))
    busy = {lab: [r["summary"]["busy"] for r in meta["runs"] if r["scenario"] == lab] for lab in labels}
    pooled_base: dict[str, float] = {}
    rows = []
    for lab in labels:
        for cls in ("priority", "default"):
            per_round, ttft, wait, outside = [], [], [], []
            n = 0
            for run in (r for r in raw if r["scenario"] == lab):
                ok = [x for x in run["records"] if x["cls"] == cls and warmup <= x["t"] <= warmup + duration
                      and x["status"] == 200 and "ttft" in x]
                n += len(ok)
                per_round.append(h.pct([x["ttft"] for x in ok], 99) * 1000)
                ttft += [x["ttft"] * 1000 for x in ok]
                wait += [x["queue_ms"] for x in ok]
                outside += [x["ttft"] * 1000 - x["queue_ms"] for x in ok]
            p99 = h.pct(ttft, 99)
            if lab == "base":
                pooled_base[cls] = p99
            rows.append((lab, cls, str(n), f"{sum(1 for w in wait if w > 1) / max(1, len(wait)):.1%}",
                         h.fmt(h.pct(wait, 99), 0), h.fmt(p99, 0), f"{p99 / pooled_base[cls]:.2f}x",
                         ", ".join(h.fmt(v, 0) for v in per_round), h.fmt(h.pct(outside, 99), 0),
                         ", ".join(f"{b:.3f}" for b in busy[lab])))
    print(h.md_table(["scenario", "cls", "n", "waited >1 ms", "wait p99 ms pooled", "TTFT p99 ms pooled",
                      "over base pooled", "TTFT p99 per round", "TTFT-wait p99 ms pooled",
                      "engine busy per round"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
