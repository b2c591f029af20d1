#!/usr/bin/env bash
# Installs what the load scenarios need and builds the load generator. Idempotent.
#   nginx, wrk          Debian packages (apt-get), only when missing
#   tierq + matplotlib  into $PY's environment (default: ./.venv, created if absent)
#   py-spy              for profiling tierq (bench/overhead --profile)
#   bench/common/loadgen  the Rust load generator (cargo build --release)
# Prints the python to use on its last line.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
if [ ! -x "$PY" ]; then
    python3 -m venv "$ROOT/.venv"
    PY=$ROOT/.venv/bin/python
fi
"$PY" -c "import tierq._core" 2>/dev/null || "$PY" -m pip install -q -e "$ROOT[test]" >&2
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install -q "matplotlib==3.10.*" >&2
[ -x "$(dirname "$PY")/py-spy" ] || "$PY" -m pip install -q "py-spy==0.4.*" >&2 || echo "py-spy not installed (profiling off)" >&2
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi
(cd "$ROOT/bench/common/loadgen" && cargo build --release --quiet >&2)
echo "$PY"
