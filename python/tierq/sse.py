"""Server-sent events from an OpenAI-compatible upstream, rewritten for the client.

`EventSplitter` turns raw reads of the upstream body into the payloads of its
`data:` events; `StreamRewriter` turns one payload into the bytes the client
gets: the applied `service_tier` in every event, `usage.estimated_cost` in the
usage chunk when the client asked for usage, and that chunk dropped when it did
not (the gateway always asks the upstream for it, to bill from real usage).
Both are plain synchronous code, so the relay in tierq.relay stays small and the
per-event cost can be benchmarked alone (bench/test_request_path.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import orjson

from tierq.pricing import render_cost

__all__ = ["DONE", "DONE_EVENT", "EventSplitter", "StreamRewriter", "UpstreamStreamError",
           "delivered_tokens", "encode_event", "usage_tokens"]

DONE: Final = b"[DONE]"  # the payload of the stream's last event
DONE_EVENT: Final = b"data: [DONE]\n\n"  # that event as the client gets it
# The most one event (its lines so far) may hold before the stream counts as
# broken: an upstream that never ends a line or an event cannot grow memory.
MAX_EVENT_BYTES: Final = 8 * 1024 * 1024


class UpstreamStreamError(Exception):
    """The upstream's stream is broken; `obj` is its own error event, if it sent one."""

    def __init__(self, obj: dict[str, Any] | None) -> None:
        super().__init__("upstream stream error")
        self.obj = obj


def encode_event(obj: dict[str, Any]) -> bytes:
    """One event for the client: a single `data:` line of JSON, then the blank line."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _data_value(line: bytes) -> bytes:
    """The value of a `data:` line (one optional space after the colon is not part of it)."""
    return line[6:] if line[5:6] == b" " else line[5:]


class EventSplitter:
    """Raw reads in, complete event payloads out.

    Lines end in LF or CRLF; an event ends at a blank line; the lines of one
    event's `data:` fields are joined with LF. `event:`, `id:`, `retry:` and
    comment lines carry nothing an OpenAI client reads and are dropped.
    """

    __slots__ = ("_data", "_pending", "_rest", "max_event_bytes")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self._rest = b""  # an incomplete last line, waiting for the rest of it
        self._data: list[bytes] = []  # the data lines of the event being read
        self._pending = 0  # bytes in _data

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events completed by `chunk`, in order.
        Raises UpstreamStreamError when one event outgrows `max_event_bytes`."""
        lines = (self._rest + chunk if self._rest else chunk).split(b"\n")
        self._rest = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b"data:"):
                value = _data_value(line)
                data.append(value)
                self._pending += len(value)
            elif not line and data:
                events.append(data[0] if len(data) == 1 else b"\n".join(data))
                data.clear()
                self._pending = 0
        if self._pending + len(self._rest) > self.max_event_bytes:
            raise UpstreamStreamError(None)
        return events

    def close(self) -> bytes | None:
        """At the end of the body: a last event that never got its blank line."""
        line = self._rest.rstrip(b"\r")
        self._rest = b""
        if line.startswith(b"data:"):
            self._data.append(_data_value(line))
        if not self._data:
            return None
        payload = b"\n".join(self._data)
        self._data.clear()
        self._pending = 0
        return payload


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


@dataclass(slots=True)
class StreamRewriter:
    """Rewrites one stream's events; remembers the usage the upstream reported."""

    tier: str  # the applied tier, echoed in every event
    client_wants_usage: bool  # the client asked for stream_options.include_usage
    price: Callable[[int, int], Decimal]  # (prompt, completion) -> exact cost
    usage: tuple[int, int] | None = None  # the upstream's usage, once reported

    def event(self, payload: bytes) -> tuple[bytes, int]:
        """The client's bytes for one upstream event (b"" to drop it) and the
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
                usage["estimated_cost"] = render_cost(self.price(*tokens))
        if not self.client_wants_usage and "usage" in obj:
            if obj.get("choices") == [] and tokens is not None:
                return b"", 0  # the usage-only chunk the client did not ask for
            del obj["usage"]
        return encode_event(obj), delivered_tokens(obj.get("choices"))
