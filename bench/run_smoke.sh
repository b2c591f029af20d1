#!/usr/bin/env bash
# Every benchmark in smoke mode: a broken benchmark fails CI, timing never does.
# Called by .ci/run with PY set to the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

echo "--- python microbenchmarks (smoke)"
"$PY" -m pytest bench -q -p no:cacheprovider --benchmark-enable --benchmark-min-rounds=3 \
    --benchmark-max-time=0.05 --micro-md=

echo "--- rust criterion benches (smoke)"
cargo bench --locked --bench core -- --warm-up-time 0.1 --measurement-time 0.2 --sample-size 10

for smoke in bench/*/smoke.sh; do
    [ -f "$smoke" ] || continue
    echo "--- $smoke"
    PY="$PY" bash "$smoke"
done
