#!/usr/bin/env bash
# Smoke mode (a few seconds of tiny load on each path): proves the scenario runs and
# produces numbers; no timing asserted. LiteLLM is left out unless SMOKE_LITELLM=1
# (its install is large); everything else is as in the full run.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
TARGETS=direct,tierq,tierq-core,forwarder,nginx
if [ "${SMOKE_LITELLM:-0}" = 1 ]; then
    export LITELLM_VENV=$(bash "$HERE/setup-litellm.sh" | tail -n1)
    TARGETS=$TARGETS,litellm
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ulimit -n 65536 2>/dev/null || true
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/run.py" --targets "$TARGETS" --rounds 1 --sat-conns 8 \
    --sat-s 1 --lat-s 1 --rate 20 --streams 8 --stream-tokens 5 --stream-tokens-per-s 50 \
    --stream-s 0.5 --name smoke
"$PY" - "$OUT" "$TARGETS" <<'PYEOF'
import json, sys, pathlib
out, targets = pathlib.Path(sys.argv[1]), sys.argv[2].split(",")
r = json.loads((out / "smoke.json").read_text())
assert (out / "smoke.md").stat().st_size > 0 and (out / "smoke.png").stat().st_size > 0
for t in targets:
    assert r["sat_rps"][t] and r["sat_rps"][t][0] > 0, (t, r["sat_rps"])
    assert r["c1"][t]["n"] > 0 and r["rate"][t]["ok"] > 0, t
    assert r["streams"][t]["ok"] > 0, (t, r["streams"][t])
print(f"overhead smoke ok: {len(targets)} paths, 1 passed, 0 failed")
PYEOF
# What each feature costs (bench/overhead/ablate.py): every variant serves and is measured.
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/ablate.py" --rounds 1 --secs 0.5 --conns 4 --lat-s 0.3 --name ablate-smoke >/dev/null
"$PY" - "$OUT" <<'PYEOF'
import gzip, json, sys, pathlib
r = json.loads(gzip.decompress((pathlib.Path(sys.argv[1]) / "ablate-smoke.json.gz").read_bytes()))["results"]
assert len(r) >= 7 and all(v["rps"] and v["rps"][0] > 0 and v["cpu_us"][0] > 0 for v in r.values()), r
print(f"overhead ablation smoke ok: {len(r)} paths, 1 passed, 0 failed")
PYEOF
# What tracing costs (bench/overhead/tracing.py): every variant serves, the spans arrive.
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/tracing.py" --rounds 1 --secs 0.5 --conns 4 --name tracing-smoke >/dev/null
"$PY" - "$OUT" <<'PYEOF'
import gzip, json, sys, pathlib
r = json.loads(gzip.decompress((pathlib.Path(sys.argv[1]) / "tracing-smoke.json.gz").read_bytes()))
assert all(v["rps"] and v["rps"][0] > 0 for v in r["results"].values()), r["results"]
assert r["sink"]["bench-2"]["requests"] == r["answered"]["tracing on, sample_ratio 1.0"], r
print("tracing bench smoke ok: 3 paths, 1 passed, 0 failed")
PYEOF
