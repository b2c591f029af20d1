"""Microbenchmarks of the request path in Python, each against a plain baseline in
the same run (bench/baselines.py): parsing and checking a request body, the tier
decision, pricing, and rewriting one SSE event. Every body checks its outcome, so
the CI smoke run fails when one breaks, never because it is slow."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import orjson
import pytest
from baselines import cost_localcontext, rewrite_event_json
from conftest import BASELINE, FLOOR, OURS, record

from tierq.intake import estimate_prompt_tokens, validate  # the gateway's own checks
from tierq.ledger import Ledger, LedgerRow
from tierq.pricing import Prices, cost, render_cost
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
            validate("chat/completions", req)
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
    price = cost if impl == OURS else cost_localcontext

    def body() -> Decimal:
        total = Decimal(0)
        for i in range(N):
            amount = price(1000 + i, 200 + i, PRICES, "priority")
            render_cost(amount)
            total += amount
        return total

    expected = sum((cost_localcontext(1000 + i, 200 + i, PRICES, "priority") for i in range(N)), Decimal(0))
    assert benchmark(body) == expected
    record(benchmark, "price a request exactly + render it", impl, N, "decimal.localcontext")


@pytest.mark.parametrize("events", [1, 8], ids=["1-event", "8-events"])
@pytest.mark.parametrize("impl", [OURS, BASELINE], ids=["tierq", "baseline"])
def test_sse_read_rewrite(benchmark, impl: str, events: int) -> None:  # type: ignore[no-untyped-def]
    """One upstream read in, the client's bytes out: tierq's one call into the core
    (split + byte-level splice of the tier) against parsing and re-dumping each
    event with the stdlib `json` (no split)."""
    read = READ if events == 1 else READ8
    rewriter = StreamRewriter("priority", False, lambda p, c: cost(p, c, PRICES, "priority"))

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
