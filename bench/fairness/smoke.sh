#!/usr/bin/env bash
# Smoke mode (about 35 s): four of the cells (greedy beside polite, the mark, weights,
# a deadline mix) through the FIFO and the fair gateway with the limit known, a
# CPU round each, and the report written. Asserts that every run produced numbers
# and that the report names each cell, nothing about timing or fairness itself
# (tests/test_fairness.py judges that by order of service). Writes into a temporary directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/run.py" --limits known \
    --cells greedy-default,mark,weights,deadline-priority --greedy-streams 16 \
    --duration 1.2 --warmup 0.3 --grace 4 --capacity-s 1.5 --typical-s 1 \
    --cpu-rounds 1 --cpu-round-s 1 --name smoke
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
r = json.loads((out / "smoke.json").read_text())
md = (out / "smoke.md").read_text()
assert r["capacity_rps"] > 0, r["capacity_rps"]
fairs = {"off", "tokens"} if r["fair_build"] else {"off"}
got = {(c["cell"], c["fairness"]) for c in r["cells"]}
want = {(c, f) for c in ("greedy-default", "mark", "weights", "deadline-priority") for f in fairs}
assert got == want, sorted(got ^ want)
for c in r["cells"]:
    assert c["total_rps"] and c["total_rps"] > 0, c["cell"]
    for name, g in c["groups"].items():
        assert g["other"] == 0, (c["cell"], name, g)
    if c["cell"] in ("greedy-default", "mark"):
        assert c["greedy_default"]["ok"] > 0, c
    if c["cell"] == "weights":
        assert len(c["windows"]["shares"]) == 6, c["windows"]
    if c["cell"] == "deadline-priority":
        assert c["deadline"]["n"] > 0, c["deadline"]
assert all(c["cpu"]["rounds"][f][0]["requests"] > 0 for f in fairs for c in [r]), r["cpu"]
for title in ("greedy key", "Work conservation", "Weights", "Deadlines", "CPU per request"):
    assert title in md, title
print(f"fairness smoke ok: {len(r['cells'])} runs and the CPU rounds, 1 passed, 0 failed")
PYEOF
