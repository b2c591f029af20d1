"""The stream rewrite as tierq did it in Python before core/sse.rs: every event
split out by line and parsed with orjson. Kept only as the oracle that
tests/test_sse.py holds the core against; the gateway never runs it."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson

from tierq.pricing import render_cost
from tierq.sse import UpstreamStreamError, delivered_tokens, encode_event, usage_tokens

DONE = b"[DONE]"


def _data_value(line: bytes) -> bytes:
    return line[6:] if line[5:6] == b" " else line[5:]


class EventSplitter:
    """Raw reads in, complete event payloads out (LF or CRLF lines, blank line
    ends an event, data lines joined with LF, other fields dropped)."""

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self._rest = b""
        self._data: list[bytes] = []
        self._pending = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = (self._rest + chunk if self._rest else chunk).split(b"\n")
        self._rest = lines.pop()
        events: list[bytes] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b"data:"):
                value = _data_value(line)
                self._data.append(value)
                self._pending += len(value)
            elif not line and self._data:
                events.append(b"\n".join(self._data))
                self._data.clear()
                self._pending = 0
        if self._pending + len(self._rest) > self.max_event_bytes:
            raise UpstreamStreamError(None)
        return events

    def close(self) -> bytes | None:
        line = self._rest.rstrip(b"\r")
        self._rest = b""
        if line.startswith(b"data:"):
            self._data.append(_data_value(line))
        if not self._data:
            return None
        payload = b"\n".join(self._data)
        self._data.clear()
        return payload


class ReferenceRewriter:
    """Same interface as tierq.sse.StreamRewriter (feed, close, usage)."""

    def __init__(self, tier: str, client_wants_usage: bool, price: Callable[[int, int], Decimal],
                 max_event_bytes: int = 8 * 1024 * 1024) -> None:
        self.tier = tier
        self.client_wants_usage = client_wants_usage
        self.price = price
        self.usage: tuple[int, int] | None = None
        self.splitter = EventSplitter(max_event_bytes)

    def event(self, payload: bytes) -> tuple[bytes, int]:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
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
                return b"", 0
            del obj["usage"]
        return encode_event(obj), delivered_tokens(obj.get("choices"))

    def _relay(self, payloads: list[bytes]) -> tuple[bytes, int, bool, UpstreamStreamError | None]:
        out: list[bytes] = []
        tokens = 0
        for payload in payloads:
            if payload == DONE:
                return b"".join(out), tokens, True, None
            try:
                data, n = self.event(payload)
            except UpstreamStreamError as e:
                return b"".join(out), tokens, False, e
            out.append(data)
            tokens += n
        return b"".join(out), tokens, False, None

    def feed(self, chunk: bytes) -> tuple[bytes, int, bool, UpstreamStreamError | None]:
        try:
            payloads = self.splitter.feed(chunk)
        except UpstreamStreamError as e:
            return b"", 0, False, e
        return self._relay(payloads)

    def close(self) -> tuple[bytes, int, bool, UpstreamStreamError | None]:
        last = self.splitter.close()
        return self._relay([] if last is None else [last])


def client_events(data: bytes) -> list[Any]:
    """What an SSE client reads from `data` (complete events only), each parsed."""
    events: list[Any] = []
    lines: list[bytes] = []
    for line in data.split(b"\n")[:-1]:
        assert b"\r" not in line, "a raw CR would end the client's line"
        if not line:
            if lines:
                events.append(orjson.loads(b"\n".join(lines)))
            lines = []
        else:
            assert line.startswith(b"data: ")
            lines.append(line[6:])
    assert not lines
    return events
