"""Microbenchmarks of the request path in Python, each against a plain baseline in
the same run (bench/baselines.py): parsing and checking a request body, the tier
decision, pricing, rewriting one SSE event, the access line, a bad key's refusal
and the response headers. Every body checks its outcome, so the CI smoke run
fails when one breaks, never because it is slow."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator
from decimal import Decimal

import orjson
import pytest
from aiohttp import web
from baselines import (access_line_on_loop, cost_decimal, rewrite_event_json, shed_headers_updated,
                       stream_headers_merged)
from conftest import BASELINE, FLOOR, OURS, record

from tierq import logs
from tierq.keys import KeyStore
from tierq.logs import RequestInfo, access_log
from tierq.intake import estimate_prompt_tokens, validate  # the gateway's own checks
from tierq.ledger import Ledger, LedgerRow
from tierq.pricing import Prices, cost_femto, femto_decimal, rates, render_cost, render_femto
from tierq.sse import StreamRewriter
from tierq.tiers import resolve_tier

N = 2_000
PRICES = Prices(Decimal("0.27"), Decimal("0.85"))
REQUEST = orjson.dumps({
    "model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "service_tier": "priority",
    "max_tokens": 256, "stream": True, "temperature": 0.7,
    "messages": [{"role": "system", "content": "You are a helpful assistant." * 4},
                 {"role": "user", "content": "Summarise the priority tier in three sentences. " * 8}],
})
EVENT = orjson.dumps({
    "id": "chatcmpl-8f2b", "object": "chat.completion.chunk", "created": 1763776261,
    "model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "service_tier": "default",
    "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
})
READ = b"data: " + EVENT + b"\n\n"  # one upstream read carrying one event
READ8 = READ * 8  # a read that brings 8 events (the gateway fell behind the upstream)


@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_parse_and_check_request(benchmark, impl: str) -> None:  # type: ignore[no-untyped-def]
    loads = orjson.loads if impl == OURS else json.loads

    def body() -> int:
        est = 0
        for _ in range(N):
            req = loads(REQUEST)
            validate("chat/completions", req, 128)  # [server] max_n
            est = estimate_prompt_tokens("chat/completions", req)
        return est

    assert benchmark(body) == estimate_prompt_tokens("chat/completions", json.loads(REQUEST))
    record(benchmark, "parse + check a chat request (body 0.6 KB)", impl, N, "stdlib json")


@pytest.mark.parametrize("impl", [OURS, FLOOR], ids=["tierq", "baseline"])
def test_tier_decision(benchmark, impl: str) -> None:  # type: ignore[no-untyped-def]
    def floor(requested: object, model_priority: bool) -> str:
        return "default"

    decide = resolve_tier if impl == OURS else floor
    cases = [("priority", True), ("priority", False), (None, True), ("default", True)] * (N // 4)

    def body() -> list[str]:
        return [decide(r, p) for r, p in cases]

    got = benchmark(body)
    if impl == OURS:
        assert got[:4] == ["priority", "default", "default", "default"]
    record(benchmark, "tier decision (resolve_tier)", OURS if impl == OURS else BASELINE, N,
           "no-op function, same arguments")


@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_price_and_render(benchmark, impl: str) -> None:  # type: ignore[no-untyped-def]
    """Integer pricing (femto-USD per token, made once per model and tier) against
    the exact Decimal arithmetic it replaced; both render the same JSON number."""
    r = rates(PRICES, "priority")

    def ours() -> list[bytes]:
        return [orjson.dumps(render_femto(cost_femto(1000 + i, 200 + i, r))) for i in range(N)]

    def baseline() -> list[bytes]:
        return [orjson.dumps(render_cost(cost_decimal(1000 + i, 200 + i, PRICES, "priority")))
                for i in range(N)]

    got = benchmark(ours if impl == OURS else baseline)
    assert got == baseline()
    assert [Decimal(x.decode()) for x in got[:3]] == [
        femto_decimal(cost_femto(1000 + i, 200 + i, r)) for i in range(3)]
    record(benchmark, "price a request exactly + render it", impl, N,
           "Decimal, exact context (before)")


@pytest.mark.parametrize("events", [1, 8], ids=["1-event", "8-events"])
@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_sse_read_rewrite(benchmark, impl: str, events: int) -> None:  # type: ignore[no-untyped-def]
    """One upstream read in, the client's bytes out: tierq's one call into the core
    (split + byte-level splice of the tier) against parsing and re-dumping each
    event with the stdlib `json` (no split)."""
    read = READ if events == 1 else READ8
    r = rates(PRICES, "priority")
    rewriter = StreamRewriter("priority", False, lambda p, c: cost_femto(p, c, r))

    def ours() -> tuple[bytes, int]:
        data, tokens = b"", 0
        for _ in range(N):
            data, tokens, _done, _error = rewriter.feed(read)
        return data, tokens

    def baseline() -> tuple[bytes, int]:
        outs: list[bytes] = []
        tokens = 0
        for _ in range(N):
            outs.clear()
            tokens = 0
            for _ in range(events):
                out, n = rewrite_event_json(EVENT, "priority")
                outs.append(out)
                tokens += n
        return b"".join(outs), tokens

    data, tokens = benchmark(ours if impl == OURS else baseline)
    assert tokens == events
    got = [orjson.loads(line[6:]) for line in data.split(b"\n\n")[:-1]]
    assert got == [orjson.loads(rewrite_event_json(EVENT, "priority")[0][6:])] * events
    assert got[0]["service_tier"] == "priority"
    name = "SSE: split one read + rewrite its event" if events == 1 else "SSE: one read carrying 8 events"
    record(benchmark, name, impl, N, "stdlib json, no split")


@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_ledger_commit_round_trip(benchmark, loop, tmp_path, impl: str) -> None:  # type: ignore[no-untyped-def]
    """What a served response waits for before its last byte (DESIGN: the bill is
    committed first), one request at a time: push the row, the Rust writer
    commits it and sets the eventfd the loop watches, the loop settles the
    future. Baseline: the bare round trip to a thread and back
    (asyncio.to_thread of a no-op), the floor of any commit made off the event
    loop the way the Python writer did it."""
    ledger = Ledger(str(tmp_path / "ledger.db"))
    loop.run_until_complete(ledger.start())
    rows = 200
    made = iter(range(10**9))

    def row() -> LedgerRow:
        return LedgerRow(request_id=f"bench-{next(made)}", ts=0.0, key_id="k", model="m",
                         endpoint="chat.completions", requested_tier="priority",
                         applied_tier="priority", prompt_tokens=100, completion_tokens=20,
                         cost=Decimal("0.0000411"), status="served")

    async def ours() -> None:
        for _ in range(rows):
            await ledger.record(row())

    async def baseline() -> None:
        for _ in range(rows):
            row()
            await asyncio.to_thread(int)

    try:
        benchmark(lambda: loop.run_until_complete(ours() if impl == OURS else baseline()))
        if impl == OURS:
            assert len(ledger.rows()) % rows == 0 and ledger.rows()
    finally:
        loop.run_until_complete(ledger.close())
    record(benchmark, "ledger commit round trip, one request at a time", impl, rows,
           "thread round trip, no commit")


@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_ledger_batch_throughput(benchmark, loop, tmp_path, impl: str) -> None:  # type: ignore[no-untyped-def]
    """A flood: 2,000 rows queued at once (record_nowait), then one flush; the
    writer commits them in as few transactions as it can. Baseline: the same
    rows inserted from Python with sqlite3's executemany in one transaction on
    a connection with the ledger's pragmas, the SQLite work alone."""
    import sqlite3

    from tierq.ledger import connect

    ledger = Ledger(str(tmp_path / "ledger.db"))
    loop.run_until_complete(ledger.start())
    rows = 2000
    made = iter(range(10**9))
    sql = ("INSERT OR IGNORE INTO ledger (request_id, ts, key_id, model, endpoint, requested_tier,"
           " applied_tier, prompt_tokens, completion_tokens, cost, cost_micro, cost_femto, status,"
           " partial, code, queue_ms, latency_ms, upstream)"
           " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def row() -> LedgerRow:
        return LedgerRow(request_id=f"flood-{next(made)}", ts=0.0, key_id="k", model="m",
                         endpoint="chat.completions", requested_tier="priority",
                         applied_tier="priority", prompt_tokens=100, completion_tokens=20,
                         cost=Decimal("0.0000411"), status="served")

    async def ours() -> None:
        for r in [row() for _ in range(rows)]:
            ledger.record_nowait(r)
        await ledger.flush()

    conn: sqlite3.Connection = connect(str(tmp_path / "baseline.db"))

    async def baseline() -> None:
        params = [(r.request_id, r.ts, r.key_id, r.model, r.endpoint, r.requested_tier,
                   r.applied_tier, r.prompt_tokens, r.completion_tokens, "0.0000411", 41, 100_000_000,
                   r.status, 0, r.code, r.queue_ms, r.latency_ms, r.upstream)
                  for r in [row() for _ in range(rows)]]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, params)
        conn.execute("COMMIT")

    try:
        benchmark(lambda: loop.run_until_complete(ours() if impl == OURS else baseline()))
        if impl == OURS:
            assert ledger.count() % rows == 0 and ledger.count() > 0
        else:
            assert conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] % rows == 0
    finally:
        conn.close()
        loop.run_until_complete(ledger.close())
    record(benchmark, "ledger: 2,000 rows queued at once, then one flush", impl, rows,
           "sqlite3 executemany, one transaction")


class _Transport:
    """What web.Request reads of a connection: its peer."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50123) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


def _request() -> web.Request:
    from aiohttp.test_utils import make_mocked_request

    return make_mocked_request("POST", "/v1/chat/completions", transport=_Transport())


ROW = LedgerRow(request_id="req_0001", ts=0.0, key_id="abcdefghijkl", model="m",
                endpoint="chat.completions", requested_tier="priority", applied_tier="priority",
                prompt_tokens=100, completion_tokens=20, cost=Decimal("0.0000411"), status="served",
                queue_ms=0.25, latency_ms=3.5, upstream="u")


@pytest.fixture
def access_sink() -> Iterator[list[logging.Handler]]:
    """The access logger writing JSON lines to /dev/null, as `tierq serve` sets it
    up, for the duration of one benchmark; the writer thread made to wait, so the
    loop's share is what is timed."""
    sink = open(os.devnull, "w")  # noqa: SIM115
    handlers: list[logging.Handler] = [logs.BatchStreamHandler(sink), logging.StreamHandler(sink)]
    for h in handlers:
        h.setFormatter(logs.JsonFormatter())
    saved = (access_log.propagate, access_log.level, logs._writer.gather_s)
    access_log.propagate = False
    access_log.setLevel(logging.INFO)
    logs._writer.gather_s = 3600.0
    try:
        yield handlers
    finally:
        logs.flush_access_log()
        for h in list(access_log.handlers):
            access_log.removeHandler(h)
        access_log.propagate, _, logs._writer.gather_s = saved
        access_log.setLevel(saved[1])
        sink.close()


@pytest.mark.parametrize("part", ["loop", "total"])
@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_access_line(benchmark, access_sink, impl: str, part: str) -> None:  # type: ignore[no-untyped-def]
    """An access line with its outcome's fields: what the event loop spends on it
    (tierq: capture + queue; the writer thread does the rest), and everything
    (tierq: capture, then the batch made, formatted and written in one write).
    Baseline: the line made, formatted and written on the loop, one write each."""
    batch, single = access_sink
    access_log.addHandler(batch if impl == OURS else single)
    request = _request()
    info = RequestInfo("req_0001", "trace-7")
    written = logs._writer.written

    def ours() -> int:
        for _ in range(N):
            logs.access_line(request, info, 200, 0.0035, ROW)
        if part == "total":
            logs.flush_access_log()
        return N

    def baseline() -> int:
        for _ in range(N):
            access_line_on_loop(request, info, 200, 0.0035, ROW)
        return N

    assert benchmark(ours if impl == OURS else baseline) == N
    logs.flush_access_log()
    if impl == OURS:
        assert logs._writer.written - written >= N and not logs._writer._queue
    name = ("access line: the event loop's share" if part == "loop"
            else "access line: all of it (made, formatted, written)")
    record(benchmark, name, impl, N, "formatted + written on the loop (before)")


@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_bad_key_refused(benchmark, tmp_path, impl: str) -> None:  # type: ignore[no-untyped-def]
    """A well-formed token that is not a key, sent again and again: refused from the
    denied cache, against the SQLite read every time (the cache's TTL set to 0)."""
    store = KeyStore(str(tmp_path / "keys.db"), denied_ttl_s=60.0 if impl == OURS else 0.0)
    store.create("real")
    bad = "tq-zzzzzzzzzzzz-" + "s" * 32

    def body() -> int:
        refused = 0
        for _ in range(N):
            refused += store.authenticate(bad) is None
        return refused

    try:
        assert benchmark(body) == N
        assert (store.lookups == 1) if impl == OURS else store.lookups >= N
    finally:
        store.close()
    record(benchmark, "refuse a bad (well-formed) API key", impl, N, "SQLite read each time (before)")


@pytest.mark.parametrize("kind", ["stream", "shed"])
@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_response_headers(benchmark, impl: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    """A response's headers up to aiohttp's own copy: one dict built and filled in
    place (tierq) against two dicts merged (before)."""
    from types import SimpleNamespace

    from tierq.outcome import Exchange
    from tierq.relay import SSE_TYPE
    from tierq.retry_after import retry_after

    ex = SimpleNamespace(tier="priority", reason=None, queue_ms=0.25, info=RequestInfo("req_0001", "trace-7"))

    def ours() -> web.StreamResponse:
        resp = web.StreamResponse()
        for _ in range(N):
            h = Exchange.headers(ex, SSE_TYPE) if kind == "stream" else Exchange.headers(ex)  # type: ignore[arg-type]
            if kind == "stream":
                h["Cache-Control"] = "no-cache"
                h["X-Accel-Buffering"] = "no"
            else:
                retry_after(1.5).add_to(h)
            resp = web.StreamResponse(status=200, headers=h)
        return resp

    def baseline() -> web.StreamResponse:
        resp = web.StreamResponse()
        for _ in range(N):
            h = (stream_headers_merged("priority", 0.25, "trace-7", "req_0001") if kind == "stream"
                 else shed_headers_updated("priority", 0.25, "trace-7", "req_0001", 1.5))
            resp = web.StreamResponse(status=200, headers=h)
        return resp

    got = benchmark(ours if impl == OURS else baseline)
    want = baseline().headers
    assert {k: got.headers[k] for k in want} == dict(want)
    record(benchmark, f"response headers, {kind} (to aiohttp's copy)", impl, N,
           "two dicts merged (before)")
