#!/usr/bin/env bash
# Full routing scenario (about 10 minutes on 2 cores): bench/results/routing.{md,json}.
# Extra arguments go to run.py (see --help), e.g. --loads 0.8 --name routing-0.8.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
ulimit -n 65536 2>/dev/null || true
PY=$PY exec "$PY" "$HERE/run.py" "$@"
