#!/usr/bin/env bash
# Smoke mode of the Redis cluster benchmarks (bench/cluster/smoke.sh runs it): end to end on tiny loads (a real
# redis-server, sim and serve processes); asserts that runs produced numbers,
# nothing about timing.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$PY" "$HERE/redis_latency.py" --smoke --out "$OUT/latency.json" >/dev/null
"$PY" "$HERE/cluster_hosts.py" --smoke --out "$OUT/hosts.json" >/dev/null
"$PY" "$HERE/redis_outage.py" --smoke --out "$OUT/outage.json" >/dev/null
"$PY" "$HERE/redis_faults.py" --smoke --out "$OUT/faults.json" >/dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, math, pathlib, sys
out = pathlib.Path(sys.argv[1])
lat = json.loads((out / "latency.json").read_text())
for name in ("alone", "cluster", "cluster_no_key_limit"):
    assert lat["sequential"][name]["n"] > 0 and not math.isnan(lat["sequential"][name]["p99_ms"]), lat
assert lat["sequential"]["cluster"]["redis_calls_per_request"] > 0, lat
assert lat["contended"]["n"] > 0 and lat["contended"]["redis_calls_per_request"] > 0, lat
hosts = json.loads((out / "hosts.json").read_text())
for setup in ("one", "two"):
    assert hosts[setup]["rps"] > 0 and hosts[setup]["errors"] == 0, hosts
outage = json.loads((out / "outage.json").read_text())
for m in outage["modes"]:
    assert m["no_slot_leaked"] and m["rejoined_logged"] and m["max_in_flight_seen"] <= 4, m
    assert "500" not in m["whole_run"] and "-1" not in m["whole_run"], m
assert len(outage["kill9_takeover_s"]) == 1, outage
faults = json.loads((out / "faults.json").read_text())
slow = faults["slow_redis"]
assert slow["baseline"]["n"] > 0 and slow["slowed"]["n"] > 0 and slow["redis_up_after"], slow
for f in faults["failovers"]:
    assert f["followed_s"] > 0 and f["probe_reached"] == f["limit"] and f["rejoined_logged"], f
    assert f["max_in_flight_burst"] <= f["limit"], f
for sp in faults["splits"]:
    assert sp["max_in_flight_split"] <= sp["bound"] and sp["rejoined_logged"], sp
print("cluster smoke ok: redis latency, two hosts against one, a Redis outage, fleet faults, 4 passed, 0 failed")
PYEOF
