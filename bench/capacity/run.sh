#!/usr/bin/env bash
# Full capacity scenario (about 20 minutes on 2 cores): bench/results/capacity.{md,png,json}.
# Extra arguments go to run.py (see --help), e.g. --backends fcfs-16 --name capacity-16.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
ulimit -n 65536 2>/dev/null || true
PY=$PY exec "$PY" "$HERE/run.py" "$@"
