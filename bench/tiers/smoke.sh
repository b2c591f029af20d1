#!/usr/bin/env bash
# Smoke mode (a few seconds a scenario): proves bench/tiers/flex.py runs end to
# end, writes its files and finds flex served and every flex refusal unbilled;
# bench/tiers/flex_rules.py's model runs every kind of rule for 20 model seconds.
# Asserts nothing about timing. Writes into a temporary directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/flex.py" --duration 2 --warmup 0.5 --rounds 1 \
    --slots 8 --backlog 12 --wait-flex-ms 500 --name smoke > /dev/null
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/flex_rules.py" --duration 20 --seeds 1 \
    --rules "none; static 2; peak 2 1; ewma 2 0.5 2; holdoff 2 0.02; afterwait 2 0.2; target 2" \
    --name smoke-rules > /dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
r = json.loads((out / "smoke.json").read_text())
assert (out / "smoke.md").stat().st_size > 0 and (out / "smoke-records.json.gz").stat().st_size > 0
assert [x["scenario"] for x in r["runs"]] == ["base", "flex@0.1/r1", "default"], r["runs"]
rules = json.loads((out / "smoke-rules.json").read_text())["rules"]
assert [x["rule"] for x in rules][:2] == ["none", "static 2"] and all(x["runs"][0]["n"] > 0 for x in rules), rules
flex = r["result"]["flex@0.1/r1"]
assert flex["flex_served"] > 0 and flex["flex_served_at_half_price"], flex
assert flex["flex_refused_billed"] == 0, flex
print(f"tiers/flex smoke ok: {flex['flex_served']} flex served, {flex['flex_refused']} refused unbilled")
PYEOF

# Shadow mode (about 15 s): one round of 3 s of bench/tiers/shadow.py, enforcing and in
# shadow mode: both runs produced numbers, shadow mode served every request and counted
# pool-rate decisions. Nothing about the 1% target (3 s is too short for the keys'
# per-minute buckets to empty; tests/test_shadow.py judges exactness on a manual clock).
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/shadow.py" --rounds 1 --duration 3 --name smoke 2>/dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
r = json.loads((pathlib.Path(sys.argv[1]) / "tiers-smoke.json").read_text())
modes = sorted(x["mode"] for x in r["runs"])
assert modes == ["enforce", "shadow"], modes
(round0,) = r["rounds"]
assert round0["shadow_served_all"], r["runs"]
assert round0["enforce"]["rate_limited"] > 0 and round0["shadow"]["rate_limited"] > 0, round0
print(f"tiers/shadow smoke ok: {r['params']['requests_per_run']} requests a run, "
      f"rate_limited enforce {round0['enforce']['rate_limited']} shadow {round0['shadow']['rate_limited']}")
PYEOF
# The same on a manual clock (the gateway in process, about 2 s): there the counts are exact.
BENCH_RESULTS=$OUT PY=$PY "$PY" "$HERE/shadow.py" --clock manual --rounds 1 --duration 3 --name smoke-manual 2>/dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
r = json.loads((pathlib.Path(sys.argv[1]) / "tiers-smoke-manual.json").read_text())
(round0,) = r["rounds"]
assert round0["shadow_served_all"] and round0["enforce"] == round0["shadow"], round0
assert round0["enforce"]["rate_limited"] > 0, round0
print(f"tiers/shadow manual-clock smoke ok: {round0['shadow']} counted, as enforcing shed")
PYEOF
# The ramp rule (a second): a doubling's excess served default within one step, billed == echoed.
BENCH_RESULTS=$OUT "$PY" "$HERE/ramp.py" --base 20 --steady 2 --doubled 3 --name smoke-ramp > /dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys, pathlib
s = json.loads((pathlib.Path(sys.argv[1]) / "smoke-ramp.json").read_text())["summary"]
assert s["billed_ne_echoed"] == 0 and s["excess_served_default_within_one_step"], s
assert s["baseline_all_priority"] and s["steady_default_ramped"] == 0, s
print(f"tiers/ramp smoke ok: {s['first_doubled_step']['ramped_default_ramp']} served default at the doubling, {s['requests']} billed == echoed")
PYEOF
