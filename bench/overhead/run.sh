#!/usr/bin/env bash
# Full overhead scenario (about 10 minutes on 2 cores): bench/results/overhead.{md,png,json}
# and overhead-tierq-pyspy.txt. Installs nginx, wrk, the load generator and LiteLLM.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$(bash "$HERE/../common/setup.sh" | tail -n1)
LITELLM_VENV=$(bash "$HERE/setup-litellm.sh" | tail -n1)
ulimit -n 65536 2>/dev/null || true
PY=$PY LITELLM_VENV=$LITELLM_VENV exec "$PY" "$HERE/run.py" --wrk --profile "$@"
