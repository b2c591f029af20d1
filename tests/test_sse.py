"""tierq.sse: splitting an upstream's SSE body into events and rewriting each one."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierq.pricing import cost, Prices
from tierq.sse import DONE, EventSplitter, StreamRewriter, UpstreamStreamError

PRICES = Prices(Decimal("0.10"), Decimal("0.20"))


def _price(p: int, c: int) -> Decimal:
    return cost(p, c, PRICES, "priority")


def _chunk(content: str | None = "hi", usage: dict[str, int] | None = None,
           choices: bool = True) -> bytes:
    obj: dict[str, object] = {"id": "c1", "object": "chat.completion.chunk",
                              "choices": [{"index": 0, "delta": {"content": content}}] if choices else []}
    if usage is not None:
        obj["usage"] = usage
    return orjson.dumps(obj)


def test_events_split_on_blank_lines_with_lf_or_crlf_and_fields_dropped() -> None:
    body = (b"data: one\n\n"
            b": a comment\r\nevent: message\r\nid: 7\r\ndata: two\r\n\r\n"
            b"data:three\n\n"
            b"data: first line\ndata: second line\n\n"
            b"retry: 10\n\n"  # no data: not an event
            b"data: [DONE]\n\n")
    assert EventSplitter().feed(body) == [b"one", b"two", b"three", b"first line\nsecond line", DONE]


def test_an_event_split_across_reads_comes_out_once_complete() -> None:
    s = EventSplitter()
    assert s.feed(b"da") == []
    assert s.feed(b"ta: {\"a\"") == []
    assert s.feed(b": 1}\r") == []
    assert s.feed(b"\n") == []
    assert s.feed(b"\r\ndata: x\n") == [b'{"a": 1}']
    assert s.feed(b"\n") == [b"x"]
    assert s.close() is None


def test_close_returns_a_last_event_without_its_blank_line() -> None:
    s = EventSplitter()
    assert s.feed(b"data: a\n\ndata: b") == [b"a"]
    assert s.close() == b"b"
    s = EventSplitter()
    assert s.feed(b"data: c\n") == []
    assert s.close() == b"c"


SSE_LINES = st.lists(st.sampled_from([b"data: x", b"data: {\"k\": 1}", b"data:", b": note",
                                      b"event: e", b""]), max_size=30)


@given(lines=SSE_LINES, crlf=st.booleans(), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_any_split_into_reads_gives_the_events_of_the_whole_body(
        lines: list[bytes], crlf: bool, cuts: list[int]) -> None:
    eol = b"\r\n" if crlf else b"\n"
    body = b"".join(line + eol for line in lines)
    whole = EventSplitter()
    expected = whole.feed(body)
    expected_last = whole.close()
    pieces, at = [], 0
    for cut in sorted(c for c in cuts if c <= len(body)):
        pieces.append(body[at:cut])
        at = cut
    pieces.append(body[at:])
    split = EventSplitter()
    got = [e for p in pieces for e in split.feed(p)]
    assert got == expected and split.close() == expected_last


def test_every_event_gets_the_applied_tier_and_counts_its_tokens() -> None:
    r = StreamRewriter("priority", False, _price)
    out, n = r.event(_chunk("hello"))
    assert out.startswith(b"data: ") and out.endswith(b"\n\n")
    obj = orjson.loads(out[6:])
    assert obj["service_tier"] == "priority" and n == 1
    assert r.event(_chunk(""))[1] == 0  # an empty delta delivers nothing
    assert r.usage is None


def test_usage_chunk_is_dropped_unless_asked_for_and_priced_when_it_is() -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
    quiet = StreamRewriter("default", False, _price)
    assert quiet.event(_chunk(usage=usage, choices=False)) == (b"", 0)
    assert quiet.usage == (10, 4)
    # usage riding on a content chunk: the chunk stays, its usage goes
    out, n = quiet.event(_chunk("x", usage=usage))
    assert "usage" not in orjson.loads(out[6:]) and n == 1

    asked = StreamRewriter("priority", True, _price)
    out, _ = asked.event(_chunk(usage=usage, choices=False))
    got = orjson.loads(out[6:])["usage"]
    assert got["prompt_tokens"] == 10 and Decimal(str(got["estimated_cost"])) == _price(10, 4)


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b"\"text\"", b""])
def test_an_event_that_is_not_a_json_object_breaks_the_stream(payload: bytes) -> None:
    with pytest.raises(UpstreamStreamError) as e:
        StreamRewriter("default", False, _price).event(payload)
    assert e.value.obj is None


def test_an_upstream_error_event_is_handed_on_with_the_tier() -> None:
    with pytest.raises(UpstreamStreamError) as e:
        StreamRewriter("priority", False, _price).event(b'{"error": {"message": "boom"}}')
    assert e.value.obj == {"error": {"message": "boom"}, "service_tier": "priority"}


@pytest.mark.parametrize("body", [b"data: " + b"x" * 5000,  # a line that never ends
                                  (b"data: " + b"x" * 100 + b"\n") * 100],  # an event that never ends
                         ids=["endless line", "endless event"])
def test_an_event_that_outgrows_the_limit_breaks_the_stream(body: bytes) -> None:
    s = EventSplitter(max_event_bytes=4096)
    with pytest.raises(UpstreamStreamError):
        for i in range(0, len(body), 512):
            s.feed(body[i:i + 512])
    # Under the limit the same shapes are fine.
    ok = EventSplitter(max_event_bytes=4096)
    assert ok.feed(b"data: " + b"x" * 3000 + b"\n\n") == [b"x" * 3000]
