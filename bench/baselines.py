"""The request path done the plain way, for bench/test_request_path.py to compare
tierq's own functions against in the same run: the stdlib `json` module instead
of orjson. Same inputs, same outputs (the benchmarks check that), only the means
differ.

Also the request path as it was before each step of the "cheaper per-request
Python" work, kept here so each step is measured against its predecessor in the
same run: exact pricing in Decimal (rendered from the Decimal), the access line
formatted and written on the event loop, and the response headers built in two
dicts and merged."""

from __future__ import annotations

import decimal
import json
import logging
from decimal import Decimal
from typing import Any

from aiohttp import web

from tierq.ledger import LedgerRow
from tierq.logs import RequestInfo, access_log
from tierq.pricing import DEFAULT_PRIORITY_MULTIPLIER, Prices, multiplier_for
from tierq.sse import delivered_tokens, usage_tokens

_EXACT = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation])


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



def cost_decimal(prompt_tokens: int, completion_tokens: int, prices: Prices, tier: str,
                 priority_multiplier: Decimal = DEFAULT_PRIORITY_MULTIPLIER) -> Decimal:
    """tierq.pricing.cost before integer pricing: the exact context's own methods."""
    c = _EXACT
    raw = c.add(c.multiply(prompt_tokens, prices.input_per_m),
                c.multiply(completion_tokens, prices.output_per_m))
    return c.multiply(c.scaleb(raw, -6), multiplier_for(tier, priority_multiplier))


def access_line_on_loop(request: web.Request, info: RequestInfo, status: int, duration_s: float,
                        row: LedgerRow) -> None:
    """tierq.logs.access_line before the writer thread: the fields, the record, the
    formatting and the write, all on the caller's (the event loop's) thread."""
    info.logged = True
    fields: dict[str, Any] = {
        "request_id": info.id, "method": request.method, "path": request.rel_url.path,
        "status": status, "duration_ms": round(duration_s * 1000, 3),
        "remote": request.remote,
    }
    if info.echo != info.id:
        fields["client_request_id"] = info.echo
    fields.update({
        "model": row.model, "key_id": row.key_id, "requested_tier": row.requested_tier,
        "tier": row.applied_tier, "outcome": row.status, "code": row.code,
        "queue_ms": round(row.queue_ms, 3), "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens, "cost": format(row.cost, "f")})
    access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, "", 0, "request", (),
                                            None, extra={"fields": fields}))


def stream_headers_merged(tier: str, queue_ms: float, echo: str, rid: str) -> dict[str, str]:
    """relay_stream's headers before: the exchange's dict merged into a second one."""
    mine = {"x-tierq-service-tier": tier, "x-tierq-queue-ms": f"{queue_ms:.3f}",
            "x-request-id": echo, "x-tierq-request-id": rid}
    return {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", **mine}


def shed_headers_updated(tier: str, queue_ms: float, echo: str, rid: str, wait_s: float) -> dict[str, str]:
    """A shed's headers before: the exchange's dict, updated from the retry pair's own dict."""
    from tierq.retry_after import retry_after

    h = {"x-tierq-service-tier": tier, "x-tierq-queue-ms": f"{queue_ms:.3f}",
         "x-request-id": echo, "x-tierq-request-id": rid}
    ra = retry_after(wait_s)
    h.update({"retry-after-ms": str(ra.ms), "Retry-After": str(ra.s)})
    return h
