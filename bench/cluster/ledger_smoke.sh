#!/usr/bin/env bash
# Smoke mode of the ledger benchmark (a few seconds): PostgreSQL and SQLite each
# take rows for half a second; asserts rows landed, nothing about timing.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$HERE/../../.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
BENCH_RESULTS=$OUT "$PY" "$HERE/ledger_rows.py" --smoke
test -s "$OUT/cluster-ledger-smoke.json"
