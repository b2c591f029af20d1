"""Flows at the edge, through real sockets and the official openai client: a key
is a flow, a trusted key (or loopback without keys) splits it with
x-tierq-fairness-id, an untrusted key's header is ignored and counted, malformed
headers are one clear 400 and never billed, and /status and /metrics show it."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running, model_config

from tierq.cli import usage_main
from tierq.config import Config, KeysConfig, LedgerConfig, UpstreamConfig
from tierq.keys import KeyStore
from tierq.ledger import Ledger
from tierq.logs import JsonFormatter

MESSAGES: Any = [{"role": "user", "content": "a b c d"}]
FAIRNESS = "x-tierq-fairness-id"
MAX_QUEUE = "x-tierq-max-queue-ms"


async def keyed_gateway(make_gateway: GatewayFactory, tmp_path: Path,
                        **admission: Any) -> tuple[Running, dict[str, str], KeyStore]:
    """A gateway with keys: one trusted ("gw"), one untrusted ("app", weight 2)."""
    store = KeyStore(str(tmp_path / "keys.db"))
    tokens = {"gw": store.create("gw", trusted=True)[1],
              "app": store.create("app", weight=2.0)[1]}
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL, **admission),),
                    keys=KeysConfig(str(tmp_path / "keys.db")))
    return await make_gateway(config=config), tokens, store


def client(gw: Running, token: str = "unused-on-loopback") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url, api_key=token, max_retries=0)


async def status(gw: Running) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(gw.root + "/status.json") as r:
        data: dict[str, Any] = await r.json()
        return data


async def metrics(gw: Running) -> str:
    async with aiohttp.ClientSession() as s, s.get(gw.root + "/metrics") as r:
        return await r.text()


def pool_flows(data: dict[str, Any], model: str = PRIORITY_MODEL) -> dict[str, Any]:
    flows: dict[str, Any] = next(p for p in data["pools"] if p["model"] == model)["flows"]
    return flows


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


@pytest.mark.parametrize("header,value", [
    (MAX_QUEUE, "abc"), (MAX_QUEUE, "0"), (MAX_QUEUE, "-5"), (MAX_QUEUE, "1.5"),
    (MAX_QUEUE, "1e3"), (MAX_QUEUE, "+10"), (MAX_QUEUE, "1234567890"), (MAX_QUEUE, "0x10"),
    (MAX_QUEUE, "9" * 4000), (MAX_QUEUE, ""), (FAIRNESS, "x" * 129), (FAIRNESS, "tab\there"),
    (FAIRNESS, ""),
])
async def test_a_malformed_header_is_one_400_naming_it_with_no_row_and_no_bill(
        make_gateway: GatewayFactory, header: str, value: str) -> None:
    gw = await make_gateway()
    async with client(gw) as c:
        with pytest.raises(openai.BadRequestError) as err:
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                            extra_headers={header: value})
    body: Any = err.value.body
    assert err.value.status_code == 400
    assert body["param"] == header and body["code"] == "invalid_header"
    assert body["type"] == "invalid_request_error" and header in body["message"]
    assert await gw.rows() == [], "refused before any row: nothing billed"
    assert (await gw.sim_stats())["requests"] == 0


async def test_a_header_sent_twice_is_refused_and_non_ascii_is_named(
        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}]}' % (
        PRIORITY_MODEL.encode())
    async with aiohttp.ClientSession() as s:
        for headers in ([(MAX_QUEUE, "100"), (MAX_QUEUE, "200")],
                        [(FAIRNESS, "a"), (FAIRNESS, "b")]):
            async with s.post(gw.url + "/chat/completions", data=body, headers=[
                    ("Content-Type", "application/json"), *headers]) as r:
                err = (await r.json())["error"]
                assert r.status == 400 and err["param"] == headers[0][0]
                assert "sent 2 times" in err["message"]
        raw = "caf\u00e9".encode("utf-8").decode("latin-1")  # the bytes as sent on the wire
        async with s.post(gw.url + "/chat/completions", data=body, headers={
                "Content-Type": "application/json", FAIRNESS: raw}) as r:
            err = (await r.json())["error"]
            assert r.status == 400 and err["param"] == FAIRNESS and "non-ASCII" in err["message"]
    assert await gw.rows() == []


async def test_valid_headers_at_their_bounds_are_served(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    async with client(gw) as c:
        for headers in ({MAX_QUEUE: "1"}, {MAX_QUEUE: "999999999"}, {FAIRNESS: "~" * 128},
                        {FAIRNESS: "customer 42 / eu-west"}, {FAIRNESS: "a"}):
            resp = await c.chat.completions.with_raw_response.create(
                model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=2, extra_headers=headers)
            assert resp.http_response.status_code == 200, headers
    assert [r.status for r in await gw.rows()] == ["served"] * 5


async def test_untrusted_keys_fairness_id_is_ignored_and_counted_trusted_keys_is_its_flow(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw, tokens, _ = await keyed_gateway(make_gateway, tmp_path)
    async with client(gw, tokens["app"]) as app, client(gw, tokens["gw"]) as trusted:
        # From an untrusted key the header is ignored whatever it holds: even malformed.
        for fid in ("tenant-1", "x" * 500):
            resp = await app.chat.completions.create(
                model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=3,
                extra_headers={FAIRNESS: fid})
            assert resp.usage is not None
        await trusted.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                              max_tokens=3, extra_headers={FAIRNESS: "tenant-1"})
        await trusted.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                              max_tokens=3, extra_headers={FAIRNESS: "tenant-2"})
        await trusted.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                              max_tokens=3)
        with pytest.raises(openai.BadRequestError) as err:
            await trusted.chat.completions.create(
                model=PRIORITY_MODEL, messages=MESSAGES, extra_headers={FAIRNESS: "x" * 129})
        assert err.value.body["param"] == FAIRNESS  # type: ignore[index]
    assert metric(await metrics(gw), "tierq_fairness_id_ignored_total") == 2
    rows = await gw.rows()
    assert len(rows) == 5 and {r.status for r in rows} == {"served"}
    flows = pool_flows(await status(gw))
    app_id, gw_id = (tokens[k].split("-")[1] for k in ("app", "gw"))
    served = {f["flow"]: f["tokens"] for f in flows["top_served"]}
    assert set(served) == {app_id, f"{gw_id}/tenant-1", f"{gw_id}/tenant-2", gw_id}
    app_tokens = sum(r.prompt_tokens + r.completion_tokens for r in rows if r.key_id == app_id)
    assert served[app_id] == app_tokens, "the untrusted key's requests are all its one flow"


async def test_loopback_without_keys_honours_the_fairness_id(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    async with client(gw) as c:
        await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=2,
                                        extra_headers={FAIRNESS: "team-a"})
        await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=2)
    flows = pool_flows(await status(gw))
    assert {f["flow"] for f in flows["top_served"]} == {"local/team-a", "local"}
    assert {f["flow"] for f in flows["top_queued"]} == {"local/team-a", "local"}
    assert metric(await metrics(gw), "tierq_fairness_id_ignored_total") == 0


async def test_status_shows_jains_index_of_the_flows_that_waited(
        make_gateway: GatewayFactory) -> None:
    # One slot and a slow stream: every request after the first waits in line.
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=1)],
                            sim={"ttft_ms": 20.0, "tokens_per_s": 500.0})
    async with client(gw) as c:
        async def one(fid: str) -> None:
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                            max_tokens=4, extra_headers={FAIRNESS: fid})

        await asyncio.gather(*(one(fid) for fid in ("a", "b", "c", "d") for _ in range(3)))
    flows = pool_flows(await status(gw))
    assert flows["backlogged"] >= 3 and flows["window_s"] == 60
    assert 0.25 <= flows["jain_index"] <= 1.0
    assert flows["active"] == {"priority": 0, "default": 0, "flex": 0}, "nobody waits now"
    text = await metrics(gw)
    for name in ("tierq_fair_flows_active", "tierq_deadline_refused_total",
                 "tierq_fairness_id_ignored_total"):
        assert f"# TYPE {name} " in text


async def test_the_ledger_records_an_honoured_fairness_id_and_usage_reports_by_it(
        make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gw, tokens, _ = await keyed_gateway(make_gateway, tmp_path)
    async with client(gw, tokens["app"]) as app, client(gw, tokens["gw"]) as trusted:
        for fid in ("tenant-1", "tenant-1", "tenant-2", None):
            await trusted.chat.completions.create(
                model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=3,
                extra_headers={FAIRNESS: fid} if fid else {})
        await app.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=3,
                                          extra_headers={FAIRNESS: "tenant-1"})
    rows = await gw.rows()
    app_id, gw_id = (tokens[k].split("-")[1] for k in ("app", "gw"))
    assert sorted((r.key_id, r.fairness_id or "") for r in rows) == sorted(
        [(gw_id, "tenant-1"), (gw_id, "tenant-1"), (gw_id, "tenant-2"), (gw_id, ""), (app_id, "")])
    assert [r.fairness_id for r in rows if r.key_id == app_id] == [None], "ignored: not recorded"

    lines = gw.ledger.usage(by_fairness_id=True)
    by = {(line.key_id, line.fairness_id): line for line in lines}
    assert set(by) == {(gw_id, "tenant-1"), (gw_id, "tenant-2"), (gw_id, ""), (app_id, "")}
    assert by[gw_id, "tenant-1"].served == 2
    assert sum((line.cost for line in lines), start=Decimal(0)) == sum(
        (r.cost for r in rows), start=Decimal(0)), "the same money, split finer"
    db = str(gw.ledger.path)
    assert usage_main(["--db", db, "--by", "fairness-id"]) == 0
    table = capsys.readouterr().out
    assert "FAIRNESS_ID" in table and "tenant-1" in table and "tenant-2" in table
    assert usage_main(["--db", db, "--by", "fairness-id", "--json", "--key", gw_id]) == 0
    data = orjson.loads(capsys.readouterr().out)
    assert {line["fairness_id"] for line in data["lines"]} == {"tenant-1", "tenant-2", ""}
    assert usage_main(["--db", db, "--csv"]) == 0  # by key: the columns as before
    assert capsys.readouterr().out.splitlines()[0].startswith("key_id,model,applied_tier,")
    assert usage_main(["--db", db, "--by", "fairness-id", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("key_id,fairness_id,model,")


def test_usage_reads_a_ledger_file_made_before_the_fairness_id_column(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "CREATE TABLE ledger (request_id TEXT PRIMARY KEY, ts REAL NOT NULL, key_id TEXT NOT"
            " NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, requested_tier TEXT, applied_tier"
            " TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,"
            " cost TEXT NOT NULL, cost_micro INTEGER NOT NULL, cost_femto INTEGER NOT NULL,"
            " status TEXT NOT NULL, partial INTEGER NOT NULL, code TEXT, queue_ms REAL NOT NULL,"
            " latency_ms REAL NOT NULL, upstream TEXT);"
            " INSERT INTO ledger VALUES ('r1', 1.0, 'k', 'm', 'chat.completions', NULL, 'default',"
            " 3, 4, '0.25', 250000, 0, 'served', 0, NULL, 0.0, 1.0, 'sim');")
    conn.close()
    assert usage_main(["--db", str(db), "--by", "fairness-id", "--json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    assert [(line["key_id"], line["fairness_id"], line["cost"]) for line in data["lines"]] == [
        ("k", "", "0.25")]
    row = Ledger(str(db)).get("r1")
    assert row is not None and row.fairness_id is None and row.cost == Decimal("0.25")


async def _hold(gw: Running, n: int) -> list[asyncio.Task[Any]]:
    """`n` long streams holding the pool's slots (and its line past them), until cancelled."""
    async def one() -> None:
        async with client(gw) as c:
            stream = await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                                     max_tokens=100_000, stream=True)
            async for _ in stream:
                pass

    return [asyncio.create_task(one()) for _ in range(n)]


async def _wait_for(pred: Any, what: str) -> None:
    for _ in range(1000):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_deadline_the_prediction_cannot_meet_is_refused_on_arrival_and_one_it_can_is_kept(
        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=1,
                                                 max_wait_ms={"default": 30000})],
                            sim={"ttft_ms": 5.0, "tokens_per_s": 2000.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    async with client(gw) as c:
        # Some traffic through the one slot, so the lane has a measured drain rate.
        await asyncio.gather(*(c.chat.completions.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=20) for _ in range(8)))
        # Kept: a deadline well over what it will wait.
        kept = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=2,
            extra_headers={MAX_QUEUE: "20000"})
        assert kept.http_response.status_code == 200
        assert float(kept.headers["x-tierq-queue-ms"]) < 20000
        # One stream holds the slot and two wait behind it: the line is long now.
        holders = await _hold(gw, 3)
        try:
            await _wait_for(lambda: adm.stats()["in_flight"] == 1
                            and adm.stats()["depth"]["default"] == 2, "the line to form")  # type: ignore[index]
            with pytest.raises(openai.RateLimitError) as err:
                await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                                max_tokens=2, extra_headers={MAX_QUEUE: "1"})
            # Refused at join, by the core's prediction: nobody ahead was served
            # meanwhile (the slot's holder still streams, the two still wait).
            st = adm.stats()
            assert st["in_flight"] == 1 and st["depth"]["default"] == 2  # type: ignore[index]
            assert st["deadline_refused"] == 1
        finally:
            for t in holders:
                t.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
    body: Any = err.value.body
    assert body["code"] == "queue_timeout" and "x-tierq-max-queue-ms (1 ms)" in body["message"]
    assert "predicted wait" in body["message"]
    assert int(err.value.response.headers["retry-after-ms"]) >= 1
    assert metric(await metrics(gw), "tierq_deadline_refused_total") == 1
    rows = await gw.rows()
    refused = [r for r in rows if r.code == "queue_timeout"]
    assert len(refused) == 1 and refused[0].status == "shed" and refused[0].cost == 0
    assert "tierq_queue_wait_prediction_error_seconds_count" in await metrics(gw)
    # /status shows each lane's learned refusal margin, the core's own number.
    margin = next(p for p in (await status(gw))["pools"] if p["model"] == PRIORITY_MODEL)["deadline_margin"]
    core_margin = adm.stats()["deadline_margin"]
    assert margin == {lane: round(core_margin[lane], 4) for lane in ("priority", "default", "flex")}  # type: ignore[index]
    assert 0.0 <= margin["default"] <= 1.0


async def test_an_admitted_request_is_shed_when_its_own_deadline_passes_not_the_lanes(
        make_gateway: GatewayFactory) -> None:
    # No drain measured yet: no prediction, so the request joins the line, and its
    # deadline (200 ms) is what sheds it, long before the lane's 30 s.
    gw = await make_gateway(models=[model_config(PRIORITY_MODEL, max_concurrency=1,
                                                 max_wait_ms={"default": 30000})],
                            sim={"ttft_ms": 5.0, "tokens_per_s": 50.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    holders = await _hold(gw, 1)
    try:
        await _wait_for(lambda: adm.stats()["in_flight"] == 1, "the slot to be held")
        async with client(gw) as c:
            with pytest.raises(openai.RateLimitError) as err:
                await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                                max_tokens=2, extra_headers={MAX_QUEUE: "200"})
        st = adm.stats()
        assert st["in_flight"] == 1, "shed while the slot was still held"
        assert st["deadline_refused"] == 0, "it joined the line: no prediction refused it"
        assert st["shed"]["queue_timeout"] == 1  # type: ignore[index]
    finally:
        for t in holders:
            t.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    assert err.value.body["code"] == "queue_timeout"  # type: ignore[index]


async def test_the_access_line_names_an_honoured_fairness_id_only(
        make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway()
    with caplog.at_level(logging.INFO, logger="tierq"):
        async with client(gw) as c:
            for headers in ({FAIRNESS: "team-a", "x-request-id": "with-id"},
                            {"x-request-id": "without-id"}):
                await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                                max_tokens=2, extra_headers=headers)
        await _wait_for(lambda: len([r for r in caplog.records if r.name == "tierq.access"]) >= 2,
                        "two access lines")
    lines = {a["client_request_id"]: a for a in (
        orjson.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "tierq.access")}
    assert lines["with-id"]["fairness_id"] == "team-a"
    assert "fairness_id" not in lines["without-id"]
