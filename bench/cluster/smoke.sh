#!/usr/bin/env bash
# Every cluster benchmark in smoke mode (bench/run_smoke.sh runs this): each
# bench/cluster/*_smoke.sh in turn.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
for smoke in "$HERE"/*_smoke.sh; do
    [ -f "$smoke" ] || continue
    echo "--- $smoke"
    PY="${PY:-}" bash "$smoke"
done
