"""The request path done the plain way, for bench/test_request_path.py to compare
tierq's own functions against in the same run: the stdlib `json` module instead
of orjson, and exact pricing in a `decimal.localcontext` block (how tierq.pricing
did it before it called the context's methods). Same inputs, same outputs (the
benchmarks check that), only the means differ."""

from __future__ import annotations

import decimal
import json
from decimal import Decimal
from typing import Any

from tierq.pricing import DEFAULT_PRIORITY_MULTIPLIER, Prices, multiplier_for
from tierq.sse import delivered_tokens, usage_tokens

_EXACT = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation])


def cost_localcontext(prompt_tokens: int, completion_tokens: int, prices: Prices, tier: str,
                      priority_multiplier: Decimal = DEFAULT_PRIORITY_MULTIPLIER) -> Decimal:
    with decimal.localcontext(_EXACT):
        raw = prompt_tokens * prices.input_per_m + completion_tokens * prices.output_per_m
        return raw.scaleb(-6) * multiplier_for(tier, priority_multiplier)


def rewrite_event_json(payload: bytes, tier: str) -> tuple[bytes, int]:
    """tierq.sse.StreamRewriter.event for a client that did not ask for usage, with `json`."""
    obj: Any = json.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    obj["service_tier"] = tier
    if "usage" in obj:
        if obj.get("choices") == [] and usage_tokens(obj["usage"]) is not None:
            return b"", 0
        del obj["usage"]
    out = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    return b"data: " + out + b"\n\n", delivered_tokens(obj.get("choices"))

