#!/usr/bin/env bash
# Smoke mode (about a minute): every kind of run (capacity measurement, each gateway
# mode, the capacity change) end to end on small engines and tiny loads, and the
# report written. Asserts that runs produced numbers, nothing about timing.
# Writes into a temporary directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/run.py" --backends fcfs-4,prio-4 --three-x "" \
    --modes adaptive,oracle,engine --loads 0.5,2 --duration 1.5 --warmup 0.3 --grace 4 \
    --capacity-s 2 --change-backend fcfs-4 --change-phase 1.5 --change-modes adaptive,oracle \
    --hold 0.5 --name smoke
"$PY" - "$OUT" <<'PYEOF'
import gzip, json, math, sys, pathlib
out = pathlib.Path(sys.argv[1])
r = json.loads(gzip.decompress((out / "smoke.json.gz").read_bytes()))
assert (out / "smoke.md").stat().st_size > 0 and (out / "smoke.png").stat().st_size > 0
assert all(c["measured_rps"] > 0 for c in r["capacities"].values()), r["capacities"]
got = {(c["backend"], c["mode"], c["load"]) for c in r["cells"]}
want = {("fcfs-4", m, l) for m in ("adaptive", "oracle") for l in (0.5, 2.0)}
want |= {("prio-4", m, l) for m in ("adaptive", "oracle", "engine") for l in (0.5, 2.0)}
assert got == want, sorted(got ^ want)
for c in r["cells"]:
    assert c["priority"]["n"] + c["default"]["n"] > 0, c
    assert not math.isnan(c["busy"]) and not math.isnan(c["limit_mean"]), c
    if c["load"] < 1:
        assert c["default"]["ok"] > 0 and not math.isnan(c["default"]["ttft_p50"]), c
ch = r["change"]
run = ch["runs"]["adaptive"]
assert [s for _, s in run["changes"]] == [2, 4], run["changes"]
assert {p["slots"] for p in run["series"]} >= {2, 4}, run["series"]
print(f"capacity smoke ok: {len(r['cells'])} runs and a capacity change, 1 passed, 0 failed")
PYEOF
