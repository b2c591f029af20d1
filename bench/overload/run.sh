#!/usr/bin/env bash
# Full overload scenario (about 15 minutes on 2 cores): bench/results/overload.{md,png,json}.
# Extra arguments go to run.py (see --help), e.g. --slots 8 --name overload-8slots.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
ulimit -n 65536 2>/dev/null || true
PY=$PY exec "$PY" "$HERE/run.py" "$@"
