"""The access line formatted in the core (core/access.rs) is the JSON formatter's
line, byte for byte, and the access writer uses it only where it is."""

from __future__ import annotations

import io
from collections.abc import Iterator
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import json_access_log

from tierq._core import access_json
from tierq.ledger import STATUSES, LedgerRow
from tierq.logs import AccessWriter, JsonFormatter, _Captured, _record
from tierq.tiers import Tier, TierReason

FMT = JsonFormatter()

# Plain ids and paths, control characters, quotes, a few secret-shaped pieces and
# non-ASCII letters (Unicode lowercasing: the Kelvin sign lowers to "k").
_PIECES = st.sampled_from(["req_", "/v1/chat", "POST", "127.0.0.1", '"', "\\", "\n", "\x01", "\x7f",
                           "token=abc", "Bearer x.y", "sk-12345678abcd", "tq-", "://u:p@h", "é",
                           "to\u212aen=1", "API-KEY", "basic", "a", "-", " "])
TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=5).map("".join)
PLAIN = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=12)
# Durations in seconds; some land on a half of the last millisecond decimal (the
# rounding's ties), some past the range the core rounds (1e9 ms).
SECONDS = st.one_of(st.floats(0, 20, allow_nan=False), st.floats(0, 1e7), st.just(0.0),
                    st.integers(0, 10**8).map(lambda n: n / 2_000_000),
                    st.sampled_from([0.0005, 0.0015, 0.0125, 1e-7, 2.5e-4, 1e6 - 1e-7]))


def rows() -> st.SearchStrategy[LedgerRow]:
    return st.builds(
        LedgerRow, request_id=st.just("req_1"), ts=st.just(1.0), key_id=st.one_of(PLAIN, TEXT),
        model=st.one_of(PLAIN, TEXT), endpoint=st.just("/v1/chat/completions"),
        requested_tier=st.one_of(st.none(), PLAIN), applied_tier=st.sampled_from(list(Tier)),
        prompt_tokens=st.integers(0, 2**40), completion_tokens=st.integers(0, 2**40),
        cost=st.one_of(st.integers(0, 10**18).map(lambda f: Decimal(f).scaleb(-15)),
                       st.sampled_from([Decimal(0), Decimal("1.50"), Decimal("1E-7")])),
        status=st.sampled_from(sorted(STATUSES)), code=st.one_of(st.none(), PLAIN),
        queue_ms=st.one_of(SECONDS.map(lambda s: s * 1000), st.integers(0, 10**8).map(lambda n: n / 2000),
                           st.integers(0, 5)),
        fairness_id=st.one_of(st.none(), PLAIN), tier_reason=st.one_of(st.none(), st.sampled_from(list(TierReason))))


def captured() -> st.SearchStrategy[_Captured]:
    return st.tuples(
        st.one_of(st.floats(0, 4e9), st.just(1764988261.9999)), st.one_of(PLAIN, TEXT),
        st.one_of(PLAIN, TEXT), st.sampled_from(["POST", "GET"]), st.one_of(PLAIN, TEXT),
        st.integers(100, 599), SECONDS, st.one_of(st.none(), PLAIN), st.one_of(st.none(), rows()),
        st.one_of(st.just(()), st.lists(st.sampled_from(["rpm", "tpm", "rate"]), min_size=1,
                                        max_size=3).map(tuple)),
        st.one_of(st.none(), st.just(""), st.just("ab" * 32)),
    ).map(lambda t: (t[0], t[1], t[1] if t[2] == "" else t[2], *t[3:]))


def core_line(c: _Captured) -> str | None:
    row, shadow = c[8], c[9]
    return access_json(c, None if row is None else format(row.cost, "f"),
                       ",".join(shadow) if shadow else None)


@settings(max_examples=3000, deadline=None)
@given(captured())
def test_a_line_the_core_formats_is_the_json_formatters_byte_for_byte(c: _Captured) -> None:
    line = core_line(c)
    if line is not None:
        assert line == FMT.format(_record(c))


def test_plain_lines_are_formatted_in_the_core_and_suspect_ones_are_not() -> None:
    row = LedgerRow("req_1", 1.0, "abcdefabcdef", "chat", "/v1/chat/completions", "priority",
                    Tier.PRIORITY, 6, 14, Decimal("0.0000675"), "served", queue_ms=0.25)
    plain: _Captured = (1764988261.5, "req_1", "trace-7", "POST", "/v1/chat/completions", 200,
                        0.0123456, "127.0.0.1", row, (), "ab" * 32)
    assert core_line(plain) == FMT.format(_record(plain))
    for suspect in ("/v1/x?api_key=s", "/v1/é", "/v1/\u212a"):
        assert core_line((*plain[:4], suspect, *plain[5:])) is None
    assert core_line((*plain[:6], 12, *plain[7:])) is None  # an int


@pytest.fixture
def json_stream() -> Iterator[io.StringIO]:
    with json_access_log() as out:
        yield out


def test_the_writer_writes_the_json_formatters_lines_through_the_core(
    json_stream: io.StringIO,
) -> None:
    row = LedgerRow("req_2", 1.0, "abcdefabcdef", "chat", "/v1/chat/completions", None,
                    Tier.DEFAULT, 6, 14, Decimal("1.50"), "served", code="usage_estimated")
    lines: list[_Captured] = [
        (1764988261.5, "req_1", "req_1", "GET", "/v1/models", 200, 0.001, None, None, (), None),
        (1764988262.25, "req_2", "c-9", "POST", "/v1/chat/completions", 200, 1.5, "10.0.0.1", row,
         ("rpm",), "0123456789abcdef"),
        # The redaction's: Python formats it.
        (1764988263.0, "req_3", "req_3", "GET", "/v1/x?token=secret", 401, 0.0, None, None, (), None),
    ]
    writer = AccessWriter()
    for c in lines:
        writer.put(c)
    writer.flush()
    assert json_stream.getvalue() == "".join(FMT.format(_record(c)) + "\n" for c in lines)
    assert "secret" not in json_stream.getvalue() and writer.written == 3
