"""The PostgreSQL ledger against a real PostgreSQL (tests/pg_server.py): exact rows,
migrations, the spool while PostgreSQL is unreachable and its replay, and the
ledger behind a real gateway answering the official openai client."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from decimal import Decimal
from pathlib import Path

import asyncpg
import openai
import pytest
from conftest import PRIORITY_MODEL, exact_json, model_config, serve_app
from pg_fixtures import own_pg, pg_password, pg_session, pg_url  # noqa: F401
from pg_server import PASSWORD_ENV, PgServer

from tierq.app import create_app
from tierq.config import Config, LedgerConfig, UpstreamConfig
from tierq.ledger import Ledger, LedgerRow
from tierq.postgres import MIGRATIONS, PostgresLedger, migrate, pg_connect, schema_version
from tierq.sim import start_sim
from tierq.stores import open_ledger


def row(i: int, cost: str = "0.0000012345", tier: str = "priority", **kw: object) -> LedgerRow:
    fields: dict[str, object] = dict(
        request_id=f"req-{i}", ts=1_700_000_000.0 + i, key_id=f"key{i % 3}", model="m",
        endpoint="chat/completions", requested_tier=tier, applied_tier=tier, prompt_tokens=10 + i,
        completion_tokens=i, cost=Decimal(cost), status="served")
    fields.update(kw)
    return LedgerRow(**fields)  # type: ignore[arg-type]


async def wait_for(pred: object, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_rows_land_in_postgresql_exactly_as_the_sqlite_ledger_keeps_them(
        pg_url: str, tmp_path: Path) -> None:
    costs = ["0.0000012345", "0.000000000000001", "123456.789012345678901", "0", "1.5"]
    rows = [row(i, costs[i % len(costs)], "priority" if i % 2 else "default",
                status="served" if i % 4 else "shed", partial=i % 5 == 0,
                code=None if i % 4 else "queue_timeout", upstream="sim" if i % 3 else None,
                fairness_id=None if i % 3 else f"tenant {i % 2}",
                tier_reason=None if i % 4 != 2 else "ramp" if i % 8 == 2 else "budget")
            for i in range(40)]
    pg = open_ledger(pg_url, password_env=PASSWORD_ENV, spool=str(tmp_path / "spool.db"))
    lite = open_ledger(f"sqlite:///{tmp_path / 'lite.db'}")
    assert isinstance(pg, PostgresLedger) and isinstance(lite, Ledger)
    async with pg, lite:
        assert pg.mode == "postgresql"
        await asyncio.gather(*(pg.record(r) for r in rows), *(lite.record(r) for r in rows))
        pg.record_nowait(row(99))
        lite.record_nowait(row(99))
        await pg.flush()
        await lite.flush()
        await pg.record(row(3, "999"))  # a repeated request_id is one row: the first
        assert pg.batches < len(rows), "rows were committed in batches"
    assert pg.get("req-3") == rows[3] and pg.get("req-4") == rows[4]
    big = pg.get("req-2")
    assert big is not None and big.cost == Decimal("123456.789012345678901") and big.partial is False
    assert pg.count() == 41 and pg.rows() == lite.rows() == [*rows, row(99)]
    assert pg.usage() == lite.usage(), "the same sums, lines and order as SQLite"
    by_fid = pg.usage(by_fairness_id=True)
    assert by_fid == lite.usage(by_fairness_id=True) and len(by_fid) > len(pg.usage())
    assert {line.fairness_id for line in by_fid} == {"", "tenant 0", "tenant 1"}
    assert pg.usage(since=1_700_000_030.0, key_id="key1") == lite.usage(since=1_700_000_030.0, key_id="key1")
    assert pg.spool_rows == 0 and pg.spooled == 0 and _spool_count(tmp_path / "spool.db") == 0


def _spool_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])


async def test_migrations_from_empty_then_again_are_idempotent_even_from_three_hosts_at_once(
        pg_url: str) -> None:
    conns = [await pg_connect(pg_url, PASSWORD_ENV) for _ in range(3)]
    try:
        assert await schema_version(conns[0]) == 0
        latest = MIGRATIONS[-1][0]
        assert await asyncio.gather(*(migrate(c) for c in conns)) == [latest] * 3
        assert await migrate(conns[0]) == latest
        versions = await conns[0].fetch("SELECT version FROM tierq_schema_version ORDER BY version")
        assert [v[0] for v in versions] == [m[0] for m in MIGRATIONS], "each applied once"
        cols = await conns[0].fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'ledger' ORDER BY ordinal_position")
        assert [c[0] for c in cols][:10] == ["request_id", "ts", "key_id", "model", "endpoint",
                                             "requested_tier", "applied_tier", "prompt_tokens",
                                             "completion_tokens", "cost"]
        assert dict((c[0], c[1]) for c in cols)["cost"] == "numeric"
    finally:
        for c in conns:
            await c.close()


async def test_a_wrong_password_stops_start_up_instead_of_spooling_forever(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    ledger = PostgresLedger(pg_url, password_env=PASSWORD_ENV, spool=str(tmp_path / "s.db"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await ledger.start()
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(ValueError, match="is not set"):
        await PostgresLedger(pg_url, password_env=PASSWORD_ENV, spool=str(tmp_path / "s.db")).start()


@pytest.mark.timeout(120)
async def test_unreachable_at_start_spools_then_replays_in_order_each_row_once(
        own_pg: PgServer, tmp_path: Path) -> None:
    own_pg.stop()
    spool = tmp_path / "spool.db"
    ledger = PostgresLedger(own_pg.url("tierq"), password_env=PASSWORD_ENV, spool=str(spool),
                            retry_s=0.1)
    ledger.replay_chunk = 7
    await ledger.start()
    try:
        assert ledger.mode == "spool"
        rows = [row(i, tier_reason="budget" if i % 5 == 1 else None) for i in range(50)]
        await asyncio.gather(*(ledger.record(r) for r in rows[:30]))
        assert _spool_count(spool) == 30, "record() returned once the row was in the spool"
        assert ledger.spool_rows == 30
        own_pg.start()
        await asyncio.gather(*(ledger.record(r) for r in rows[30:]))  # spool or PostgreSQL
        await wait_for(lambda: ledger.mode == "postgresql", what="the replay")
        await ledger.record(row(50))
    finally:
        await ledger.close()
    assert ledger.spool_rows == 0 and _spool_count(spool) == 0
    assert ledger.count() == 51 and ledger.rows() == [*rows, row(50)]
    # In order: the replay's transactions follow the order rows were recorded.
    conn = await pg_connect(own_pg.url("tierq"), PASSWORD_ENV)
    try:
        xmins = [r[1] for r in await conn.fetch(
            "SELECT request_id, xmin::text::bigint FROM ledger ORDER BY ts")]
    finally:
        await conn.close()
    assert xmins == sorted(xmins) and len(set(xmins)) >= 50 // 7


@pytest.mark.timeout(120)
async def test_postgresql_stopped_mid_run_loses_and_doubles_nothing(
        own_pg: PgServer, tmp_path: Path) -> None:
    ledger = PostgresLedger(own_pg.url("tierq"), password_env=PASSWORD_ENV,
                            spool=str(tmp_path / "spool.db"), retry_s=0.1)
    await ledger.start()
    written: list[LedgerRow] = []
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        i = 0
        while not stop.is_set():
            r = row(w * 100_000 + i)
            await ledger.record(r)  # returns once durable: PostgreSQL or the spool
            written.append(r)
            i += 1
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(writer(w)) for w in range(4)]
    try:
        await wait_for(lambda: len(written) > 100, what="rows before the outage")
        await asyncio.to_thread(own_pg.stop, "fast")
        before = len(written)
        await wait_for(lambda: ledger.mode == "spool" and len(written) > before + 100,
                       what="rows while PostgreSQL is down")
        spooled = ledger.spool_rows
        await asyncio.to_thread(own_pg.start)
        await wait_for(lambda: ledger.mode == "postgresql", what="the replay")
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await ledger.close()
    assert spooled > 0 and ledger.spool_rows == 0 and ledger.switches == 2
    ids = [r.request_id for r in written]
    stored = ledger.rows()
    assert sorted(r.request_id for r in stored) == sorted(ids), "every row once"
    assert {r.request_id: r for r in stored} == {r.request_id: r for r in written}


async def test_gateway_on_postgresql_bills_what_it_echoes_to_the_openai_client(
        pg_url: str, tmp_path: Path) -> None:
    sim = await start_sim("127.0.0.1", 0, slots=8, ttft_ms=1.0, tokens_per_s=0.0)
    config = Config(
        ledger=LedgerConfig(url=pg_url, password_env=PASSWORD_ENV, spool=str(tmp_path / "s.db")),
        upstreams=(UpstreamConfig("sim", "", "sim", priority_scheduling=True),),
        models=(model_config(PRIORITY_MODEL, priority=True),),
    )
    root, runner = await serve_app(create_app(config, sim=sim))
    echoed: dict[str, tuple[str, Decimal]] = {}
    try:
        client = openai.AsyncOpenAI(base_url=f"{root}/v1", api_key="unused")
        for i, tier in enumerate(["priority", "default", None, "fast"] * 3):
            extra = {} if tier is None else {"service_tier": tier}
            if i % 2:
                raw = await client.chat.completions.with_raw_response.create(
                    model=PRIORITY_MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                    max_tokens=5 + i, **extra)  # type: ignore[arg-type]
                body = exact_json(raw.http_response.content)
                echoed[raw.headers["x-request-id"]] = (body["service_tier"],
                                                       body["usage"]["estimated_cost"])
            else:
                stream = await client.chat.completions.with_raw_response.create(
                    model=PRIORITY_MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                    max_tokens=5 + i, stream=True, stream_options={"include_usage": True},
                    **extra)  # type: ignore[arg-type]
                rid = stream.headers["x-request-id"]
                async for chunk in stream.parse():
                    if chunk.usage is not None:
                        cost = Decimal(str((chunk.usage.model_extra or {})["estimated_cost"]))
                        echoed[rid] = (str(chunk.service_tier), cost)
        await client.close()
    finally:
        await runner.cleanup()
        await sim.close()
    ledger = PostgresLedger(pg_url, password_env=PASSWORD_ENV)
    rows = {r.request_id: r for r in ledger.rows()}
    assert set(rows) == set(echoed) and len(rows) == 12
    for rid, (tier, cost) in echoed.items():
        assert (rows[rid].applied_tier, rows[rid].cost) == (tier, cost), rid
    assert {r.applied_tier for r in rows.values()} == {"priority", "default"}


def test_usage_and_keys_cli_say_in_one_line_when_postgresql_is_unreachable(
        capsys: pytest.CaptureFixture[str]) -> None:
    from pg_server import free_port

    from tierq.cli import main

    url = f"postgresql://tierq:hunter2@127.0.0.1:{free_port()}/tierq"
    assert main(["usage", "--db", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tierq usage: cannot read postgresql://tierq:***@127.0.0.1:")
    assert err.count("\n") == 1 and "hunter2" not in err
    assert main(["keys", "list", "--db", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tierq keys: cannot use postgresql://tierq:***@") and "hunter2" not in err


async def test_metrics_show_the_spool_depth_and_the_switch(own_pg: PgServer, tmp_path: Path) -> None:
    from tierq.metrics import GatewayMetrics, render_prometheus

    own_pg.stop()
    ledger = PostgresLedger(own_pg.url("tierq"), password_env=PASSWORD_ENV,
                            spool=str(tmp_path / "spool.db"), retry_s=0.1)
    async with ledger:
        await asyncio.gather(*(ledger.record(row(i)) for i in range(7)))
        text = render_prometheus([GatewayMetrics().snapshot([], ready=True, ledger=ledger)])
        assert "tierq_ledger_spool_rows 7" in text.splitlines()
        assert "tierq_ledger_spooling 1" in text.splitlines()
        own_pg.start()
        await wait_for(lambda: ledger.mode == "postgresql", what="the replay")
        text = render_prometheus([GatewayMetrics().snapshot([], ready=True, ledger=ledger)])
        assert "tierq_ledger_spool_rows 0" in text.splitlines()
        assert "tierq_ledger_spooling 0" in text.splitlines()
    assert ledger.count() == 7


async def test_regression_idle_connection_closed_by_a_restart_does_not_strand_rows_in_the_spool(
        own_pg: PgServer, tmp_path: Path) -> None:
    # The reconnector used to drop a connection the server had closed without
    # switching to the spool's mode: the next rows went to the spool and, the
    # ledger still believing it wrote to PostgreSQL, were never replayed.
    ledger = PostgresLedger(own_pg.url("tierq"), password_env=PASSWORD_ENV,
                            spool=str(tmp_path / "spool.db"), retry_s=0.05)
    async with ledger:
        await ledger.record(row(0))
        await asyncio.to_thread(own_pg.stop, "fast")  # while the ledger is idle
        await wait_for(lambda: ledger.mode == "spool", what="the closed connection seen")
        await ledger.record(row(1))
        await asyncio.to_thread(own_pg.start)
        await wait_for(lambda: ledger.mode == "postgresql", what="the replay")
        await ledger.record(row(2))
        assert ledger.spool_rows == 0
    assert [r.request_id for r in ledger.rows()] == ["req-0", "req-1", "req-2"]


def _pause(server: PgServer, sig: int) -> None:
    """SIGSTOP / SIGCONT the server and all its processes: a server that accepts
    connections but answers nothing, as behind a network partition."""
    import os

    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(d))
    for pid in pids:
        os.kill(pid, sig)


@pytest.mark.timeout(120)
async def test_a_server_that_stops_answering_mid_run_sends_rows_to_the_spool_after_the_commit_deadline(
        own_pg: PgServer, tmp_path: Path) -> None:
    import signal

    ledger = PostgresLedger(own_pg.url("tierq"), password_env=PASSWORD_ENV,
                            spool=str(tmp_path / "spool.db"), retry_s=0.1,
                            commit_timeout_s=1.0, connect_timeout_s=0.5)
    async with ledger:
        await asyncio.gather(*(ledger.record(row(i)) for i in range(20)))
        _pause(own_pg, signal.SIGSTOP)
        try:
            # Each returns once durable: here, in the spool, after the deadline.
            await asyncio.gather(*(ledger.record(row(i)) for i in range(20, 30)))
            assert ledger.mode == "spool" and ledger.spool_rows == 10
        finally:
            _pause(own_pg, signal.SIGCONT)
        await wait_for(lambda: ledger.mode == "postgresql", what="the replay")
    assert [r.request_id for r in ledger.rows()] == [f"req-{i}" for i in range(30)]
