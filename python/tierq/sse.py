"""Server-sent events from an OpenAI-compatible upstream, rewritten for the client.

`StreamRewriter` turns each raw read of the upstream body into the bytes the
client gets, in one call into the core (core/sse.rs): the events split out,
the applied `service_tier` spliced into every one at the byte level, the
`"usage": null` the gateway's own include_usage adds dropped when the client
did not ask for usage. The few events the core hands back are parsed here: the
usage chunk (priced with `usage.estimated_cost` when the client asked for
usage, dropped when it did not: the gateway always asks the upstream for it,
to bill from real usage), the upstream's error event, and anything that is not
a JSON object (the stream is broken). Plain synchronous code, so the relay in
tierq.relay stays small and the per-read cost can be benchmarked alone
(bench/test_request_path.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple

import orjson

from tierq._core import SseRewriter
from tierq.pricing import render_femto
from tierq.tiers import Tier

__all__ = ["DONE_EVENT", "Rewritten", "StreamRewriter", "UpstreamStreamError",
           "delivered_tokens", "encode_event", "usage_tokens"]

DONE_EVENT: Final = b"data: [DONE]\n\n"  # the stream's last event as the client gets it
# The most one event (its lines so far) may hold before the stream counts as
# broken: an upstream that never ends a line or an event cannot grow memory.
MAX_EVENT_BYTES: Final = 8 * 1024 * 1024
_DONE, _TOO_LARGE = 1, 2  # the core's states after a read (0: more to come)


class UpstreamStreamError(Exception):
    """The upstream's stream is broken; `obj` is its own error event, if it sent one."""

    def __init__(self, obj: dict[str, Any] | None) -> None:
        super().__init__("upstream stream error")
        self.obj = obj


def encode_event(obj: dict[str, Any]) -> bytes:
    """One event for the client: a single `data:` line of JSON, then the blank line."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage_tokens(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI `usage` object, if it is one."""
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if isinstance(p, int) and isinstance(c, int) and p >= 0 and c >= 0:
        return p, c
    return None


def delivered_tokens(choices: Any) -> int:
    """Tokens a stream chunk delivers, counted one per non-empty choice delta."""
    if not isinstance(choices, list):
        return 0
    n = 0
    for c in choices:
        if not isinstance(c, dict):
            continue
        delta = c.get("delta")
        if isinstance(delta, dict):
            if delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"):
                n += 1
        elif c.get("text"):
            n += 1
    return n


class Rewritten(NamedTuple):
    """What one read of the upstream body gives the client."""

    data: bytes  # the events to write, in one write (b"" for none)
    tokens: int  # the tokens they deliver
    done: bool  # the upstream sent [DONE]; nothing after it was read
    error: UpstreamStreamError | None  # the stream broke after `data`


class StreamRewriter:
    """Rewrites one stream's events; remembers the usage the upstream reported."""

    __slots__ = ("_core", "client_wants_usage", "price", "tier", "usage")

    def __init__(self, tier: Tier, client_wants_usage: bool, price: Callable[[int, int], int],
                 max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.tier = tier  # the applied tier, echoed in every event
        self.client_wants_usage = client_wants_usage  # stream_options.include_usage
        self.price = price  # (prompt, completion) -> exact cost, femto-USD
        self.usage: tuple[int, int] | None = None  # the upstream's usage, once reported
        self._core = SseRewriter(tier, client_wants_usage, max_event_bytes)

    def feed(self, chunk: bytes) -> Rewritten:
        """The client's bytes for the events `chunk` (the next read) completes."""
        return self.rewritten(*self._core.feed(chunk))

    def close(self) -> Rewritten:
        """At the end of the body: a last event that never got its blank line."""
        return self.rewritten(*self._core.close())

    def rewritten(self, data: bytes, tokens: int, state: int,
                  handed: list[tuple[int, int, bytes]] | None) -> Rewritten:
        """One read as the core's rewrite left it (`SseRewriter.feed`'s tuple,
        here or in the core's upstream client), its handed-back events parsed."""
        if state == _TOO_LARGE:
            return Rewritten(b"", 0, False, UpstreamStreamError(None))
        if handed is None:
            return Rewritten(data, tokens, state == _DONE, None)
        # Events the core handed back go where they came in the stream; one
        # that breaks it ends the read there.
        parts: list[bytes] = []
        at = extra = 0
        for offset, before, payload in handed:
            parts.append(data[at:offset])
            at = offset
            try:
                out, n = self._parsed(payload)
            except UpstreamStreamError as e:
                return Rewritten(b"".join(parts), before + extra, False, e)
            parts.append(out)
            extra += n
        parts.append(data[at:])
        return Rewritten(b"".join(parts), tokens + extra, state == _DONE, None)

    def _parsed(self, payload: bytes) -> tuple[bytes, int]:
        """The client's bytes for one handed-back event (b"" to drop it) and the
        tokens it delivers. Raises UpstreamStreamError for a broken or error event."""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            # Every OpenAI stream event is a JSON object: anything else means the
            # upstream is broken, and a broken answer is not billed as served.
            raise UpstreamStreamError(None)
        obj["service_tier"] = self.tier
        if "error" in obj:
            raise UpstreamStreamError(obj)
        usage = obj.get("usage")
        tokens = usage_tokens(usage)
        if tokens is not None:
            self.usage = tokens
            if self.client_wants_usage:
                assert isinstance(usage, dict)
                usage["estimated_cost"] = render_femto(self.price(*tokens))
        if not self.client_wants_usage and "usage" in obj:
            if obj.get("choices") == [] and tokens is not None:
                return b"", 0  # the usage-only chunk the client did not ask for
            del obj["usage"]
        return encode_event(obj), delivered_tokens(obj.get("choices"))
