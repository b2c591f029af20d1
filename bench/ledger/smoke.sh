#!/usr/bin/env bash
# The ledger benchmark in smoke mode: one small round, fails only if it breaks.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
"${PY:-python3}" "$HERE/run.py" --smoke
