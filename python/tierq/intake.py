"""Request intake: who is calling (auth), which fair-queuing flow it is and its
deadline (the tierq headers), the body (size- and time-bounded, orjson), the
shape checks the gateway needs to route and bill, and the token estimates that
per-key limits and cut-short bills are taken from.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import re
from typing import Any, Final, NamedTuple

import orjson
from aiohttp import web

from tierq.errors import JSON_TYPE, ApiError, invalid_type
from tierq.gateway import Gateway
from tierq.keys import KeyInfo

__all__ = [
    "ANONYMOUS_FLOW",
    "ANONYMOUS_KEY",
    "ENDPOINT_PATHS",
    "FAIRNESS_HEADER",
    "FLOW_SEP",
    "MAX_QUEUE_HEADER",
    "Flow",
    "authenticate",
    "estimate_completion_cap",
    "estimate_output_tokens",
    "estimate_prompt_tokens",
    "flow_of",
    "is_loopback",
    "max_queue_ms",
    "read_json",
    "text_len",
    "validate",
]

# Ledger key_id of requests served without API keys (loopback-only mode).
ANONYMOUS_KEY: Final = "local"
# The endpoints served, by path after /v1, and their ledger names.
ENDPOINT_PATHS: Final = {
    "chat/completions": "chat.completions",
    "completions": "completions",
    "embeddings": "embeddings",
}
# A trusted key (or a loopback client without keys) splits its traffic into
# flows of their own with this header: one per end customer of a gateway in front.
FAIRNESS_HEADER: Final = "x-tierq-fairness-id"
# 1 to 128 printable ASCII characters (space to tilde).
_FAIRNESS_ID: Final = re.compile(r"[\x20-\x7e]{1,128}")
# Between a key's id and its fairness id in a flow's name: a character neither
# a key id nor a fairness id may hold, so two flows never share a name.
FLOW_SEP: Final = "\x1f"
# This request's own deadline for its wait in line, in milliseconds: shortens
# the lane's max wait, never extends it.
MAX_QUEUE_HEADER: Final = "x-tierq-max-queue-ms"
# A positive integer of at most 9 digits (11.6 days: far past any lane's max wait).
_MAX_QUEUE: Final = re.compile(r"[0-9]{1,9}")


class Flow(NamedTuple):
    """Whom a request is fair against: its flow's name and weight (the core's
    `acquire(flow=, weight=)`), the fairness id it honoured (the ledger's
    column), and whether it ignored one (an untrusted key sent the header).
    A tuple: made on every request, at a third of a frozen dataclass's cost."""

    name: str
    weight: float = 1.0
    fairness_id: str | None = None
    ignored: bool = False


ANONYMOUS_FLOW: Final = Flow("")


@functools.lru_cache(maxsize=1024)
def is_loopback(remote: str | None) -> bool:
    # Cached: parsing the peer address was ~2% of a request's CPU in profiles,
    # and a gateway sees the same few peers again and again.
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def authenticate(gw: Gateway, request: web.Request) -> KeyInfo | None:
    """The caller's KeyInfo, or None in loopback-only mode (no keys configured)."""
    if gw.keys is None:
        if not gw.allow_remote_without_keys and not is_loopback(request.remote):
            raise ApiError(403, "This tierq gateway has no API keys configured and serves "
                           "loopback clients only.", code="unauthenticated_remote")
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key. Pass it as "
                       "'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key")
    info = gw.keys.authenticate(token.strip())
    if info is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return info


def _one_header(request: web.Request, name: str) -> str | None:
    value = request.headers.get(name)
    if value is None:  # the usual case: one lookup
        return None
    values = request.headers.getall(name)
    if len(values) > 1:
        raise ApiError(400, f"The header '{name}' was sent {len(values)} times: send it once.",
                       param=name, code="invalid_header")
    return value


def flow_of(request: web.Request, key: KeyInfo | None) -> Flow:
    """The request's flow: its key, split by the fairness id header when the key
    is trusted or there are no keys (loopback). From an untrusted key the header
    is ignored (`Flow.ignored`), whatever it holds. A malformed fairness id from
    a caller who may send one is a 400 naming the header."""
    fid = _one_header(request, FAIRNESS_HEADER)
    if key is not None and not key.trusted:
        return Flow(key.public_id, key.weight, ignored=fid is not None)
    if fid is None:
        return ANONYMOUS_FLOW if key is None else Flow(key.public_id, key.weight)
    if _FAIRNESS_ID.fullmatch(fid) is None:
        raise ApiError(400, f"Invalid '{FAIRNESS_HEADER}' header: expected 1 to 128 printable "
                       f"ASCII characters, got {min(len(fid), 1000)} characters"
                       + ("" if fid.isascii() else " with non-ASCII ones") + ".",
                       param=FAIRNESS_HEADER, code="invalid_header")
    if key is None:
        return Flow(FLOW_SEP + fid, 1.0, fid)
    return Flow(key.public_id + FLOW_SEP + fid, key.weight, fid)


def max_queue_ms(request: web.Request) -> int | None:
    """The request's `x-tierq-max-queue-ms` (a positive integer), or None without
    one. Anything else is a 400 naming the header."""
    text = _one_header(request, MAX_QUEUE_HEADER)
    if text is None:
        return None
    if _MAX_QUEUE.fullmatch(text) is None or int(text) == 0:
        shown = repr(text) if len(text) <= 32 else f"{text[:32]!r}..."
        raise ApiError(400, f"Invalid '{MAX_QUEUE_HEADER}' header {shown}: expected a positive "
                       "whole number of milliseconds (1 to 999999999).",
                       param=MAX_QUEUE_HEADER, code="invalid_header")
    return int(text)


async def read_json(gw: Gateway, request: web.Request) -> dict[str, Any]:
    ctype = request.content_type
    if ctype != JSON_TYPE:
        raise ApiError(415, f"Unsupported Content-Type {ctype or '(none)'!r}: send the body "
                       "as application/json.", code="unsupported_media_type")
    limit = gw.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"Request body too large: {request.content_length} bytes, "
                       f"the limit is {limit}.", code="request_too_large")
    try:
        if request.content.is_eof():
            # The whole body came with the headers (the usual case for a small
            # request): reading it cannot wait, so no timer is armed.
            raw = await request.read()
        else:
            async with asyncio.timeout(gw.config.server.body_timeout_s):
                raw = await request.read()
    except TimeoutError:
        raise ApiError(408, "Timed out reading the request body.",
                       code="request_timeout") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"Request body too large: the limit is {limit} bytes.",
                       code="request_too_large") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "We could not parse the JSON body of your request. "
                       "(HINT: This likely means you aren't using your HTTP library "
                       "correctly.)", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def validate(endpoint: str, body: dict[str, Any], max_n: int) -> None:
    """Shape checks the gateway needs to route and bill; engines check the rest.
    `max_n` is `[server] max_n`: each of the n choices can take max_tokens."""
    if endpoint == "chat/completions":
        messages = body.get("messages")
        if messages is None:
            raise ApiError(400, "Missing required parameter: 'messages'.", param="messages",
                           code="missing_required_parameter")
        if not isinstance(messages, list):
            raise invalid_type("messages", "an array of messages")
    elif endpoint == "completions":
        if "prompt" not in body:
            raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt",
                           code="missing_required_parameter")
    elif "input" not in body:
        raise ApiError(400, "Missing required parameter: 'input'.", param="input",
                       code="missing_required_parameter")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_type("stream", "a boolean")
    if endpoint == "embeddings" and stream:
        raise ApiError(400, "Embeddings cannot be streamed.", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid_type("stream_options", "an object")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise invalid_type(name, "a non-negative integer")
    n = body.get("n")
    if n is not None and endpoint != "embeddings":
        if isinstance(n, bool) or not isinstance(n, int):
            raise invalid_type("n", "an integer")
        if n < 1:
            raise ApiError(400, f"Invalid 'n': integer below minimum value. Expected a value "
                           f">= 1, but got {n} instead.", param="n", code="integer_below_min_value")
        if n > max_n:
            raise ApiError(400, f"Invalid 'n': integer above maximum value. Expected a value "
                           f"<= {max_n}, but got {n} instead.", param="n",
                           code="integer_above_max_value")


def text_len(value: Any) -> int:
    """Characters of text in a prompt-like value (messages, strings, lists)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_len(v) for v in value)
    if isinstance(value, dict):
        return sum(text_len(v) for k, v in value.items() if k in ("content", "text"))
    return 1 if isinstance(value, int) else 0  # token ids count one each


def estimate_prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    field_name = {"chat/completions": "messages", "completions": "prompt"}.get(endpoint, "input")
    # About four characters per token: only an estimate, for per-key token limits
    # and for billing a stream cut short before the upstream reported usage.
    return max(1, math.ceil(text_len(body.get(field_name)) / 4))


def estimate_completion_cap(body: dict[str, Any]) -> int:
    """The most output tokens a validated body can ask for: `n` choices of
    max_tokens each (256 each when the body sets no cap)."""
    v = body.get("max_completion_tokens", body.get("max_tokens"))
    cap = v if isinstance(v, int) and not isinstance(v, bool) else 256
    n = body.get("n")
    return cap * (n if isinstance(n, int) and not isinstance(n, bool) else 1)


def estimate_output_tokens(data: dict[str, Any]) -> int:
    choices = data.get("choices")
    if not isinstance(choices, list):
        return 0
    chars = sum(text_len(c.get("message") or c.get("text") or "") for c in choices
                if isinstance(c, dict))
    return math.ceil(chars / 4)
