"""tierq.sse: an upstream's SSE body, read by read, rewritten for the client by the
core (core/sse.rs), held against the Python reference (tests/_sse_reference.py)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson
import pytest
from _sse_reference import ReferenceRewriter, client_events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierq.pricing import Prices, cost, cost_femto, rates
from tierq.sse import StreamRewriter

PRICES = Prices(Decimal("0.10"), Decimal("0.20"))
PROPS = settings(derandomize=True, database=None, deadline=None, max_examples=400,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _price(p: int, c: int) -> int:
    return cost_femto(p, c, rates(PRICES, "priority"))


def _price_decimal(p: int, c: int) -> Decimal:
    # The reference prices in Decimal: the two must render the same digits.
    return cost(p, c, PRICES, "priority")


def _chunk(content: str | None = "hi", usage: dict[str, int] | None = None,
           choices: bool = True) -> bytes:
    obj: dict[str, object] = {"id": "c1", "object": "chat.completion.chunk",
                              "choices": [{"index": 0, "delta": {"content": content}}] if choices else []}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _events(data: bytes) -> list[Any]:
    return client_events(data)


def test_events_split_on_blank_lines_with_lf_or_crlf_and_fields_dropped() -> None:
    body = (b'data: {"n": 1}\n\n'
            b': a comment\r\nevent: message\r\nid: 7\r\ndata: {"n": 2}\r\n\r\n'
            b'data:{"n":3}\n\n'
            b'data: {"n":\ndata: 4}\n\n'
            b"retry: 10\n\n"  # no data: not an event
            b"data: [DONE]\n\n"
            b'data: {"n": 5}\n\n')  # after [DONE]: never read
    got = StreamRewriter("default", False, _price).feed(body)
    assert _events(got.data) == [{"n": n, "service_tier": "default"} for n in (1, 2, 3, 4)]
    assert got.done and got.error is None


def test_an_event_split_across_reads_comes_out_once_complete() -> None:
    r = StreamRewriter("priority", False, _price)
    for part in (b"da", b'ta: {"a"', b": 1}\r", b"\n", b"\r"):
        assert r.feed(part).data == b""
    assert _events(r.feed(b"\ndata: {}\n").data) == [{"a": 1, "service_tier": "priority"}]
    assert _events(r.feed(b"\n").data) == [{"service_tier": "priority"}]
    assert r.close().data == b""


def test_close_rewrites_a_last_event_without_its_blank_line() -> None:
    r = StreamRewriter("default", False, _price)
    assert _events(r.feed(b"data: {}\n\ndata: {\"b\": 1}").data) == [{"service_tier": "default"}]
    last = r.close()
    assert _events(last.data) == [{"b": 1, "service_tier": "default"}] and not last.done
    r = StreamRewriter("default", False, _price)
    assert r.feed(b"data: [DONE]").data == b"" and r.close().done


def test_every_event_gets_the_applied_tier_and_counts_its_tokens() -> None:
    r = StreamRewriter("priority", False, _price)
    got = r.feed(_chunk("hello") + _chunk("") + _chunk(None) + _chunk("x"))
    assert [e["service_tier"] for e in _events(got.data)] == ["priority"] * 4
    assert got.tokens == 2  # an empty or null delta delivers nothing
    assert r.usage is None


def test_only_the_top_level_service_tier_is_replaced() -> None:
    payload = (b'{"service_tier": "default", "choices": [{"delta": {"content": "}{\\"service_tier\\":1"},'
               b' "service_tier": "flex"}], "x": {"service_tier": null}}')
    got = StreamRewriter("priority", False, _price).feed(b"data: " + payload + b"\n\n")
    want = orjson.loads(payload) | {"service_tier": "priority"}
    assert _events(got.data) == [want] and got.tokens == 1


def test_usage_chunk_is_dropped_unless_asked_for_and_priced_when_it_is() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    quiet = StreamRewriter("default", False, _price)
    got = quiet.feed(_chunk(usage=usage, choices=False))
    assert (got.data, got.tokens) == (b"", 0)
    assert quiet.usage == (10, 4)
    # usage riding on a content chunk: the chunk stays, its usage goes; so does a null one
    got = quiet.feed(_chunk("x", usage=usage) + b'data: {"choices": [], "usage": null}\n\n')
    assert [("usage" in e) for e in _events(got.data)] == [False, False] and got.tokens == 1

    asked = StreamRewriter("priority", True, _price)
    got = asked.feed(_chunk("y") + _chunk(usage=usage, choices=False) + b'data: {"usage": null}\n\n')
    first, priced, null = _events(got.data)
    assert "usage" not in first and null == {"usage": None, "service_tier": "priority"}
    assert priced["usage"]["prompt_tokens"] == 10
    assert Decimal(str(priced["usage"]["estimated_cost"])) == _price_decimal(10, 4) == Decimal("0.0000027")
    assert got.tokens == 1 and asked.usage == (10, 4)


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b"\"text\"", b"", b'{"a": 1,}',
                                     b'{"a": 1e400}', b'{"a": "\\ud800"}', b'{"a": "\xff"}'])
def test_an_event_that_is_not_a_json_object_breaks_the_stream(payload: bytes) -> None:
    got = StreamRewriter("default", False, _price).feed(_chunk("a") + b"data: " + payload + b"\n\n"
                                                       + _chunk("b"))
    assert got.error is not None and got.error.obj is None
    assert [e["choices"][0]["delta"]["content"] for e in _events(got.data)] == ["a"]
    assert got.tokens == 1  # what came before the broken event is delivered


def test_an_upstream_error_event_is_handed_on_with_the_tier() -> None:
    got = StreamRewriter("priority", False, _price).feed(b'data: {"error": {"message": "boom"}}\n\n')
    assert got.error is not None and got.data == b""
    assert got.error.obj == {"error": {"message": "boom"}, "service_tier": "priority"}


@pytest.mark.parametrize("body", [b"data: " + b"x" * 5000,  # a line that never ends
                                  (b"data: " + b"x" * 100 + b"\n") * 100],  # an event that never ends
                         ids=["endless line", "endless event"])
def test_an_event_that_outgrows_the_limit_breaks_the_stream(body: bytes) -> None:
    r = StreamRewriter("default", False, _price, max_event_bytes=4096)
    errors = [r.feed(body[i:i + 512]).error for i in range(0, len(body), 512)]
    assert any(e is not None for e in errors)
    # Under the limit the same shapes are fine.
    ok = StreamRewriter("default", False, _price, max_event_bytes=4096)
    got = ok.feed(b'data: "' + b"x" * 3000 + b'"\n\n')
    assert got.error is not None and got.error.obj is None  # a string, not an object: broken
    got = StreamRewriter("default", False, _price, max_event_bytes=4096).feed(
        b'data: {"x": "' + b"x" * 3000 + b'"}\n\n')
    assert _events(got.data) == [{"x": "x" * 3000, "service_tier": "default"}]


# ------------------------------------------------------------------ the core against the reference

TRICKY = st.text(st.sampled_from('ab{}[]":,\\/ \t\u00e9\u2028\U0001f600\x00\x1f') | st.characters(codec="utf-8"),
                 max_size=10)
KEYS = st.sampled_from(["service_tier", "usage", "error", "choices", "delta", "content", "text",
                        "tool_calls", "reasoning_content"]) | TRICKY
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False) | TRICKY)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(KEYS, kids, max_size=4), max_leaves=10)
deltas = st.fixed_dictionaries({}, optional={
    "content": st.none() | st.sampled_from(["", "tok", "}{"]) | json_values,
    "tool_calls": st.sampled_from([[], [{"id": "t"}]]), "reasoning_content": st.sampled_from(["", "r"]),
    "service_tier": json_values, "role": st.just("assistant")})
choices = st.lists(st.fixed_dictionaries({"index": st.integers(0, 3)}, optional={
    "delta": deltas | json_values, "text": st.sampled_from(["", "t"]) | json_values,
    "finish_reason": st.none() | st.just("stop"), "service_tier": json_values}) | json_values, max_size=3)
usages = (st.none() | st.fixed_dictionaries({"prompt_tokens": st.integers(0, 99),
                                             "completion_tokens": st.integers(0, 99)}) | json_values)
events = st.fixed_dictionaries({}, optional={
    "id": st.just("chatcmpl-1"), "service_tier": json_values, "choices": choices | json_values,
    "usage": usages, "x": json_values, "model": TRICKY}) | st.dictionaries(KEYS, json_values, max_size=5)


def _encode(obj: Any, how: int) -> bytes:
    """`obj` as JSON, in one of the spellings an upstream might use."""
    if how == 0:
        return orjson.dumps(obj)
    if how == 1:
        return json.dumps(obj, ensure_ascii=True).encode()  # \\uXXXX escapes, surrogate pairs
    if how == 2:
        return json.dumps(obj, indent=1, ensure_ascii=False).encode()  # several data: lines
    if how == 3:
        return json.dumps(obj, separators=(" , ", " : "), ensure_ascii=False).encode()
    return orjson.dumps(obj).replace(b'"service_tier"', b'"service\\u005ftier"')  # an escaped key


encoded = st.tuples(events, st.integers(0, 4)).map(lambda e: _encode(*e))
payloads = (encoded | encoded | encoded | encoded  # mostly events the core rewrites itself
            | st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
            | st.sampled_from([b'{"error": {"message": "boom"}}', b"[DONE]", b"[1]", b"{}",
                               b'{"a": 1e999}', b'{"a": "\\udc00"}', b"\xc3\x28"]))
NOISE = [b": keep-alive", b"event: message", b"id: 42", b"retry: 100"]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    lines: list[bytes] = []
    for payload in draw(st.lists(payloads, max_size=6)):
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(NOISE)))
        lines += [b"data: " + part for part in payload.split(b"\n")]
        lines.append(b"")
    if draw(st.booleans()):
        lines += [b"data: [DONE]", b""]
    body = eol.join(lines) + (eol if lines and draw(st.booleans()) else b"")
    return body


def _cut(body: bytes, cuts: list[int]) -> list[bytes]:
    pieces, at = [], 0
    for c in sorted({min(c, len(body)) for c in cuts}):
        pieces.append(body[at:c])
        at = c
    return pieces + [body[at:]]


@PROPS
@given(body=bodies(), cuts=st.lists(st.integers(0, 2000), max_size=10), tier=st.sampled_from(
    ["priority", "default"]), wants_usage=st.booleans())
def test_the_core_rewrites_any_stream_as_the_reference_does(
        body: bytes, cuts: list[int], tier: str, wants_usage: bool) -> None:
    ours = StreamRewriter(tier, wants_usage, _price)
    ref = ReferenceRewriter(tier, wants_usage, _price_decimal)
    reads = _cut(body, cuts)
    for i, read in enumerate(reads + [b""]):
        got = ours.feed(read) if i < len(reads) else ours.close()
        data, tokens, done, error = ref.feed(read) if i < len(reads) else ref.close()
        assert _events(got.data) == _events(data), (read, got.data, data)
        assert got.tokens == tokens and got.done == done and ours.usage == ref.usage
        assert (got.error is None) == (error is None)
        if got.error is not None and error is not None:
            assert got.error.obj == error.obj
        if done or error is not None:
            break
