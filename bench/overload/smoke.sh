#!/usr/bin/env bash
# Smoke mode (a few seconds of tiny load): proves the scenario runs end to end and
# produces numbers (with a priority headroom, so the FIFO baseline runs on its own
# gateway too). Asserts nothing about timing. Writes into a temporary directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/run.py" --slots 4 --ttft-ms 10 --tokens-per-s 500 \
    --max-tokens 4 --loads 0.5,2 --shares 0.5 --streams 0,1 --duration 1.5 --warmup 0.2 \
    --grace 4 --queue-depth 8 --wait-default-ms 300 --wait-priority-ms 1000 --priority-headroom 1 --name smoke
"$PY" - "$OUT" <<'PYEOF'
import json, math, sys, pathlib
out = pathlib.Path(sys.argv[1])
r = json.loads((out / "smoke.json").read_text())
assert (out / "smoke.md").stat().st_size > 0 and (out / "smoke.png").stat().st_size > 0
modes = {c["mode"] for c in r["cells"]}
assert modes == {"tierq", "fifo", "direct"}, modes
for c in r["cells"]:
    assert c["all"]["n"] > 0, c
    if c["load"] < 1:
        assert c["all"]["ok"] > 0 and not math.isnan(c["all"]["ttft_p50"]), c
print(f"overload smoke ok: {len(r['cells'])} runs, 1 passed, 0 failed")
PYEOF
