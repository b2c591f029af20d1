"""A request's end in one core call (tierq._core.Finisher, issue #21 item 2).

One finished request must leave four things that agree: its ledger row, its
metrics counters, its key's per-minute buckets and its access line, all from
the one call `Exchange` makes. Each outcome here (served, shed by the pool,
failed by the upstream) is sent through real sockets with the openai client,
on both upstream clients, to a sim the gateway reaches over HTTP; then the row,
the counters, the key's budget and the line the core formatted are read and
checked against each other. The key's limiter runs on a manual clock, so
nothing refills while a test runs and every budget is exact.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running, json_access_log
from openai import AsyncOpenAI

from tierq import ManualClock
from tierq._core import Finisher, LedgerWriter
from tierq.config import AdmissionConfig, Config, KeysConfig, LedgerConfig, ModelConfig, UpstreamConfig
from tierq.keys import KeyInfo, KeyLimiter, KeyStore
from tierq.ledger import APPLIED_TIERS, STATUSES, TIER_REASONS, LedgerRow
from tierq.logs import flush_access_log
from tierq.sim import SimServer, start_sim

CLIENTS = ("aiohttp", "core")
RPM, TPM = 10, 1000
MAX_TOKENS = 8
MESSAGES: Any = [{"role": "user", "content": " ".join(["a"] * 12)}]
SLOW: Any = {"fault_delay_ms": 30_000.0}


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    with json_access_log() as out:
        yield out


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    """The engine, reached over HTTP (an "openai" upstream), so both clients send to it."""
    server = await start_sim("127.0.0.1", 0, slots=8, ttft_ms=1.0, tokens_per_s=0.0)
    yield server
    await server.close()


async def _keyed(make_gateway: GatewayFactory, tmp_path: Path, sim: SimServer, client: str,
                 **admission: Any) -> tuple[Running, KeyInfo, str, str]:
    keys_db = tmp_path / "keys.db"
    with KeyStore(str(keys_db)) as store:
        info, token = store.create("limited", rpm=RPM, tpm=TPM)
        _, other = store.create("unlimited")
    config = Config(
        ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
        upstreams=(UpstreamConfig("up", sim.url, "openai", client=client),),  # type: ignore[arg-type]
        models=(ModelConfig(PRIORITY_MODEL, "up", admission=AdmissionConfig(**admission)),),
        keys=KeysConfig(str(keys_db)))
    running = await make_gateway(config=config)
    running.gw.limiter = KeyLimiter(ManualClock())
    return running, info, token, other


async def _idle(gw: Running) -> None:
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    deadline = time.monotonic() + 20
    while adm.stats()["in_flight"] != 0:
        assert time.monotonic() < deadline, "slot not freed"
        await asyncio.sleep(0.005)


def _line_of(out: io.StringIO, request_id: str) -> dict[str, Any]:
    flush_access_log()
    found = [orjson.loads(x) for x in out.getvalue().splitlines() if request_id in x]
    assert len(found) == 1, out.getvalue()
    line: dict[str, Any] = found[0]
    return line


def _agree(row: LedgerRow, line: dict[str, Any]) -> None:
    """The access line says what the row says."""
    assert (line["request_id"], line["outcome"], line["code"], line["tier"], line["key_id"]) == (
        row.request_id, row.status, row.code, row.applied_tier, row.key_id)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (row.prompt_tokens,
                                                                  row.completion_tokens)
    assert line["cost"] == format(row.cost, "f")
    assert line["queue_ms"] == round(row.queue_ms, 3)


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_served_request_ends_in_its_row_counters_key_and_line_together(
        make_gateway: GatewayFactory, tmp_path: Path, lines: io.StringIO, sim: SimServer,
        client: str) -> None:
    gw, key, token, _ = await _keyed(make_gateway, tmp_path, sim, client)
    async with AsyncOpenAI(base_url=gw.url, api_key=token, max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, service_tier="priority")
    resp = raw.parse()
    rid = raw.headers["x-tierq-request-id"]
    await _idle(gw)
    row = await gw.row(rid)
    assert row is not None and row.status == "served" and row.cost > 0
    assert resp.usage is not None and row.prompt_tokens + row.completion_tokens == resp.usage.total_tokens
    # The key: charged its real usage, not the estimate.
    assert gw.gw.limiter is not None
    assert gw.gw.limiter.remaining(key) == (RPM - 1, TPM - resp.usage.total_tokens)
    # The counters: one served request at its tier, billed the row's cost.
    metrics = gw.gw.metrics
    assert metrics.requests == {(PRIORITY_MODEL, "priority", "served"): 1}
    assert metrics.costs[PRIORITY_MODEL, "priority"] == int(row.cost.scaleb(15))
    assert metrics.hist["latency", "priority"].data().count == 1
    _agree(row, _line_of(lines, rid))


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_shed_request_ends_in_its_row_counters_key_and_line_together(
        make_gateway: GatewayFactory, tmp_path: Path, lines: io.StringIO, sim: SimServer,
        client: str) -> None:
    gw, key, token, other = await _keyed(make_gateway, tmp_path, sim, client, max_concurrency=1,
                                         queue_depth=0)
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    async with AsyncOpenAI(base_url=gw.url, api_key=other, max_retries=0) as holder, \
            AsyncOpenAI(base_url=gw.url, api_key=token, max_retries=0) as c:
        held = asyncio.create_task(holder.chat.completions.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
            extra_body={"sim_fault": "slow-first-byte", **SLOW}))
        deadline = time.monotonic() + 20
        while adm.stats()["in_flight"] != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        with pytest.raises(openai.RateLimitError) as shed:
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                            max_tokens=MAX_TOKENS)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
    assert shed.value.code == "server_overloaded"
    rid = shed.value.response.headers["x-tierq-request-id"]
    await _idle(gw)
    row = await gw.row(rid)
    assert row is not None and (row.status, row.code, row.cost) == ("shed", "server_overloaded",
                                                                   Decimal(0))
    # The gateway's doing: the key gets its request and its estimate back.
    assert gw.gw.limiter is not None and gw.gw.limiter.remaining(key) == (RPM, TPM)
    assert gw.gw.metrics.sheds[PRIORITY_MODEL, "default", "server_overloaded"] == 1
    assert gw.gw.metrics.requests[PRIORITY_MODEL, "default", "shed"] == 1
    line = _line_of(lines, rid)
    assert line["status"] == 429
    _agree(row, line)


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_failed_request_ends_in_its_row_counters_key_and_line_together(
        make_gateway: GatewayFactory, tmp_path: Path, lines: io.StringIO, sim: SimServer,
        client: str) -> None:
    gw, key, token, _ = await _keyed(make_gateway, tmp_path, sim, client)
    async with AsyncOpenAI(base_url=gw.url, api_key=token, max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as failed:
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                            max_tokens=MAX_TOKENS, extra_body={"sim_fault": "500"})
    rid = failed.value.response.headers["x-tierq-request-id"]
    await _idle(gw)
    row = await gw.row(rid)
    assert row is not None and row.status == "failed" and row.cost == 0
    assert row.code is not None and row.code.startswith("upstream_")
    # The upstream failed it (the gateway's side): request and estimate given back.
    assert gw.gw.limiter is not None and gw.gw.limiter.remaining(key) == (RPM, TPM)
    assert gw.gw.metrics.upstream_errors[PRIORITY_MODEL, "up", row.code] == 1
    assert gw.gw.metrics.requests[PRIORITY_MODEL, "default", "failed"] == 1
    line = _line_of(lines, rid)
    assert line["status"] == failed.value.status_code
    _agree(row, line)


def test_a_row_the_ledger_would_refuse_changes_nothing(tmp_path: Path) -> None:
    """Checked as LedgerRow checks it, before anything moves: no row, no key move."""
    writer = LedgerWriter(str(tmp_path / "l.db"))
    try:
        fin = Finisher(writer, sorted(STATUSES), [t.value for t in APPLIED_TIERS], sorted(TIER_REASONS))
        limiter = KeyLimiter(ManualClock())
        key = KeyInfo("k1", "k", 0.0, None, rpm=RPM, tpm=TPM)
        assert limiter.decide(key, 40) is None
        settle = limiter.settlement(key, 40, None, request=True)
        good = ["req_1", 1.0, "k1", "m", "/v1/chat/completions", None, "default", 1, 2, 0,
                "shed", False, None, 0.0, 1.0, "up", None, None]
        for name, at, bad in (("status", 10, "lost"), ("tier", 6, "gold"), ("reason", 17, "whim"),
                              ("tokens", 7, -1), ("id", 0, "")):
            fields = list(good)
            fields[at] = bad
            with pytest.raises(ValueError):
                fin.finish(*fields, *settle, None)
            assert writer.last_pushed() == 0, name
            assert limiter.remaining(key) == (RPM - 1, TPM - 40), name
        seq, _, line = fin.finish(*good, *settle, None)
        assert (seq, line) == (1, None)
        assert limiter.remaining(key) == (RPM, TPM)
    finally:
        writer.close()
