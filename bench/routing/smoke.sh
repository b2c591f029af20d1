#!/usr/bin/env bash
# Smoke mode (under a minute): every kind of run of bench/routing (the saturating
# runs, each routing at 0.8x, the oracle, the mark, a replica killed and restarted)
# end to end on short runs, and the report written. Asserts that runs produced
# numbers, nothing about timing. Writes into a temporary directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/run.py" --smoke --name smoke
"$PY" - "$OUT" <<'PYEOF'
import json, math, sys, pathlib
out = pathlib.Path(sys.argv[1])
r = json.loads((out / "smoke.json").read_text())
assert r["complete"] and (out / "smoke.md").stat().st_size > 0
assert set(r["saturation"]) == {"round_robin", "least_loaded", "prefix"}, r["saturation"]
assert all(v > 0 for v in r["saturation"].values()), r["saturation"]
got = {(c["routing"], c["oracle"]) for c in r["cells"]}
assert got == {("round_robin", False), ("least_loaded", False), ("prefix", False),
               ("prefix", True)}, got
for c in r["cells"]:
    assert c["default"]["ok"] > 0 and not math.isnan(c["default"]["ttft_p50"]), c
    assert 0 <= c["hit_rate"] <= 1, c
    if c["oracle"]:  # each replica's limit set to its slots: never above it
        assert all(m is not None and m <= r["replica"]["slots"] for m in c["max_in_flight_seen"]), c
assert 0 < r["mark"]["hit_rate"] <= 1, r["mark"]
k = r["kill"]
assert "kill" in k["events"] and "ready" in k["events"], k["events"]
assert k["priority_n"] > 0 and k["series"], k
print(f"routing smoke ok: {len(r['cells'])} runs, saturation, the mark and a kill, 1 passed, 0 failed")
PYEOF
