#!/usr/bin/env bash
# LiteLLM proxy in its own venv (its pins would clash with tierq's): $LITELLM_VENV,
# default bench/overhead/.venv-litellm. Pinned so a rerun measures the same proxy.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${LITELLM_VENV:-$HERE/.venv-litellm}
if [ ! -x "$VENV/bin/litellm" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "litellm[proxy]==1.106.2" >&2
fi
echo "$VENV"
