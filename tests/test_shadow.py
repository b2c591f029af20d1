"""Shadow mode (`enforce = false`): a limit tried before it is applied sheds
nothing and counts what it would have, in /metrics, the access line and /status.

Through real sockets with the official openai client. The buckets run on a
manual clock, so nothing refills while a test runs and every count is exact:
each is compared with what the same limit enforcing sheds over the same
requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running, model_config
from openai import AsyncOpenAI
from pg_fixtures import pg_password, pg_session, pg_url  # noqa: F401
from pg_server import PASSWORD_ENV
from redis_server import RedisServer, redis_server  # noqa: F401  (the fixture)

from tierq import Admission, ManualClock
from tierq.cli import keys_main
from tierq.config import AdminConfig, Config, KeysConfig, LedgerConfig, UpstreamConfig
from tierq.keys import KeyInfo, KeyLimiter, KeyStore, hash_secret
from tierq.logs import JsonFormatter
from tierq.postgres import PostgresKeyStore

MESSAGES: Any = [{"role": "user", "content": "hi"}]
N = 12  # requests sent in each run, none refilling the bucket (burst 4)


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Polls state (never a fixed sleep): a loaded machine only makes it slower."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def shadow_metric(gw: Running) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(gw.root + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("tierq_shadow_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('"')[1]] = float(value)
    return out


async def status(gw: Running) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(gw.root + "/status.json") as r:
        data: dict[str, Any] = await r.json()
        return data


async def send(gw: Running, n: int, tier: str = "default", *, key: str = "x",
               max_tokens: int = 1) -> list[int]:
    """`n` requests one after another; the HTTP status of each."""
    statuses = []
    async with AsyncOpenAI(base_url=gw.url, api_key=key, max_retries=0) as c:
        for _ in range(n):
            try:
                await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                                max_tokens=max_tokens, service_tier=tier)  # type: ignore[arg-type]
                statuses.append(200)
            except openai.RateLimitError as e:
                assert e.code == "rate_limit_exceeded"
                statuses.append(429)
    return statuses


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fmt = JsonFormatter()
    return [orjson.loads(fmt.format(r)) for r in caplog.records if r.name == "tierq.access"]


async def test_pool_rate_limit_in_shadow_mode_sheds_nothing_and_counts_what_it_would_have(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway()
    clock = ManualClock()
    pool = gw.gw.pools[PRIORITY_MODEL]
    # Enforcing first, over the same requests: what shadow mode must count.
    pool.admission = Admission(rate=0.5, burst=4, priority_reserve=0.0, clock=clock)
    enforced = await send(gw, N)
    shed = enforced.count(429)
    assert shed == N - 4 and pool.admission.stats()["shed"] == {
        "server_overloaded": 0, "queue_timeout": 0, "rate_limit_exceeded": shed}
    assert await shadow_metric(gw) == {"rate_limited": 0, "key_rpm": 0, "key_tpm": 0,
                                       "downgrade_ramp": 0, "downgrade_budget": 0}

    pool.admission = Admission(rate=0.5, burst=4, priority_reserve=0.0, enforce=False,
                               clock=clock)
    with caplog.at_level(logging.INFO, logger="tierq"):
        tried = await send(gw, N)
        await wait_for(lambda: len(access_lines(caplog)) >= N)
    assert tried == [200] * N  # sheds nothing
    stats = pool.admission.stats()
    assert stats["shadow_rate_limited"] == shed and stats["enforce"] is False
    assert stats["shed"] == {"server_overloaded": 0, "queue_timeout": 0, "rate_limit_exceeded": 0}
    metric = await shadow_metric(gw)
    assert metric["rate_limited"] == shed
    assert sum(metric.values()) == shed
    # The access line names the decision on exactly the requests enforcing shed,
    # in the same places (the bucket advanced as if they had been shed).
    lines = access_lines(caplog)[-N:]
    flagged = [line.get("shadow") for line in lines]
    assert flagged == [None if s == 200 else "rate_limited" for s in enforced]
    assert all(line["outcome"] == "served" for line in lines)
    page = await status(gw)
    assert page["shadow"]["rate_limited"] == shed
    me = next(p for p in page["pools"] if p["model"] == PRIORITY_MODEL)
    assert me["enforce"] is False and me["shadow_rate_limited"] == shed
    # Every served request was billed: shadow mode changes no bill.
    rows = [r for r in await gw.rows() if r.status == "served"]
    assert len(rows) == (N - shed) + N and all(r.cost > 0 for r in rows)


async def test_the_queues_own_bounds_still_apply_in_shadow_mode(make_gateway: GatewayFactory) -> None:
    # One slot, no queue: shadow mode lets the over-rate request on, but a
    # full queue cannot be "not applied": it is shed server_overloaded.
    gw = await make_gateway(sim={"ttft_ms": 300_000.0})
    clock = ManualClock()
    pool = gw.gw.pools[PRIORITY_MODEL]
    pool.admission = Admission(max_concurrency=1, queue_depth=0, rate=0.5, burst=1,
                               priority_reserve=0.0, enforce=False, clock=clock)
    async with AsyncOpenAI(base_url=gw.url, api_key="x", max_retries=0) as c:
        held = asyncio.create_task(c.chat.completions.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1))
        await wait_for(lambda: pool.admission.stats()["in_flight"] == 1)
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)
        held.cancel()
    assert info.value.code == "server_overloaded"
    stats = pool.admission.stats()
    assert stats["shadow_rate_limited"] == 1 and stats["shed"]["server_overloaded"] == 1
    assert (await shadow_metric(gw))["rate_limited"] == 1


ADMIN = "admin-" + "y" * 40
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def admin(gw: Running, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(
            method, gw.root + "/admin/v1" + path, headers=ADMIN_AUTH,
            data=None if body is None else json.dumps(body)) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize(("limit", "decision", "max_tokens"),
                         [({"rpm": 3}, "key_rpm", 1), ({"tpm": 50}, "key_tpm", 20)])
async def test_key_limits_in_shadow_mode_shed_nothing_and_count_what_enforcing_sheds(
    make_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    limit: dict[str, int], decision: str, max_tokens: int,
) -> None:
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),),
                    keys=KeysConfig(str(tmp_path / "keys.db")),
                    admin=AdminConfig(token_sha256=hashlib.sha256(ADMIN.encode()).hexdigest()))
    gw = await make_gateway(config=config)
    gw.gw.limiter = KeyLimiter(ManualClock())  # nothing refills while the test runs
    status, made = await admin(gw, "POST", "/keys", {"name": "on", **limit})
    assert status == 201 and made["enforce"] is True
    enforced = await send(gw, 8, key=made["secret"], max_tokens=max_tokens)
    shed = enforced.count(429)
    assert 0 < shed < 8
    # The same limit tried in shadow mode on a second key, over the same requests.
    status, tried_key = await admin(gw, "POST", "/keys", {"name": "tried", **limit})
    status, patched = await admin(gw, "PATCH", f"/keys/{tried_key['id']}", {"enforce": False})
    assert status == 200 and patched["enforce"] is False
    with caplog.at_level(logging.INFO, logger="tierq"):
        tried = await send(gw, 8, key=tried_key["secret"], max_tokens=max_tokens)
        await wait_for(lambda: sum(1 for a in access_lines(caplog)
                                   if a.get("key_id") == tried_key["id"]) == 8)
    assert tried == [200] * 8
    metric = await shadow_metric(gw)
    assert metric[decision] == shed and sum(metric.values()) == shed
    lines = [a for a in access_lines(caplog) if a.get("key_id") == tried_key["id"]]
    assert [a.get("shadow") for a in lines] == [None if s == 200 else decision for s in enforced]
    assert (await status_json_shadow(gw))[decision] == shed
    rows = [r for r in await gw.rows() if r.key_id == tried_key["id"]]
    assert [r.status for r in rows] == ["served"] * 8 and all(r.cost > 0 for r in rows)
    # Enforcing again: the bucket stood where enforcing would have left it (the
    # shadowed requests took nothing), so the next request is refused at once.
    await admin(gw, "PATCH", f"/keys/{tried_key['id']}", {"enforce": True})
    assert await send(gw, 1, key=tried_key["secret"], max_tokens=max_tokens) == [429]


async def status_json_shadow(gw: Running) -> dict[str, int]:
    shadow: dict[str, int] = (await status(gw))["shadow"]
    return shadow


# The keys table as tierq made it before shadow mode (main 303e3ae).
_PREVIOUS_SCHEMA = """
CREATE TABLE keys (
    public_id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
    created REAL NOT NULL, revoked REAL, rpm INTEGER, tpm INTEGER,
    weight REAL NOT NULL DEFAULT 1.0, trusted INTEGER NOT NULL DEFAULT 0,
    priority_budget_usd TEXT, ramp_min_tpm INTEGER NOT NULL DEFAULT 0, ramp_max_growth REAL,
    ramp_window_s INTEGER NOT NULL DEFAULT 900
)
"""


def test_a_key_file_of_the_previous_schema_gains_enforce_and_its_keys_stay_enforced(
        tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_PREVIOUS_SCHEMA)
        conn.execute("INSERT INTO keys (public_id, name, secret_sha256, created, rpm)"
                     " VALUES ('oldkey000003', 'legacy', ?, 1.0, 30)", (hash_secret("s" * 32),))
    conn.close()
    with KeyStore(str(db)) as store:
        info = store.authenticate("tq-oldkey000003-" + "s" * 32)
        assert info is not None and info.enforce is True and info.rpm == 30
        new = store.update("oldkey000003", enforce=False)
        assert new is not None and new.enforce is False
        with pytest.raises(ValueError, match="^enforce must be true or false"):
            store.update("oldkey000003", enforce="no")
    with KeyStore(str(db)) as again:
        assert again.get("oldkey000003") == new
    columns = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(keys)")]
    assert columns.count("enforce") == 1


def test_cli_creates_a_key_in_shadow_mode_and_updates_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "keys.db")
    assert keys_main(["create", "trial", "--rpm", "10", "--shadow", "--db", db]) == 0
    out = capsys.readouterr()
    public_id = out.out.strip().split("-")[1]
    assert "limits in shadow mode" in out.err
    assert keys_main(["list", "--db", db]) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert line.split()[header.split().index("LIMITS")] == "shadow"
    assert keys_main(["update", public_id, "--enforce", "--db", db]) == 0
    assert "shadow" not in capsys.readouterr().out
    assert keys_main(["update", public_id, "--no-enforce", "--db", db]) == 0
    assert "limits in shadow mode" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # argparse: the two flags exclude each other
        keys_main(["update", public_id, "--shadow", "--enforce", "--db", db])
    assert refused.value.code == 2
    with KeyStore(db) as store:
        key = store.get(public_id)
        assert key is not None and key.enforce is False and key.rpm == 10


async def test_postgresql_keeps_a_keys_shadow_mode_for_every_host(pg_url: str) -> None:
    store = PostgresKeyStore(pg_url, password_env=PASSWORD_ENV, refresh_s=0.05)
    await store.start()
    try:
        made, token = await asyncio.to_thread(store.create, "pg-shadow", rpm=5, enforce=False)
        assert made.enforce is False and store.authenticate(token) == made
        other = PostgresKeyStore(pg_url, password_env=PASSWORD_ENV, refresh_s=0.05)
        await other.start()
        try:
            assert other.authenticate(token) == made, "every host reads it"
            new = await asyncio.to_thread(store.update, made.public_id, enforce=True)
            assert new is not None and new.enforce is True
            assert await asyncio.to_thread(other.get, made.public_id) == new
        finally:
            await other.aclose()
    finally:
        await store.aclose()


@pytest.mark.parametrize(("sequence", "expected"), [
    # A's rpm (2) refuses its 3rd and 4th; the pool's bucket (3) sheds B's 2nd.
    ("ABAABA", {"key_rpm": 2, "rate_limited": 1}),
    # The pool's bucket sheds A's 2nd to 4th, each given back to A's rpm, which
    # so never refuses.
    ("ABBAAA", {"key_rpm": 0, "rate_limited": 3}),
])
async def test_a_key_limit_and_the_pools_rate_in_shadow_together_count_what_both_enforcing_shed(
    make_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    sequence: str, expected: dict[str, int],
) -> None:
    """A request its key refuses takes nothing from the pool's bucket, and one the
    pool's rate refuses gives its key back its request, as enforcing: so each
    limit counts in shadow exactly the sheds it makes enforcing, request for request."""
    keys_db = tmp_path / "keys.db"
    with KeyStore(str(keys_db)) as store:
        tokens = {(name, enforce): store.create(f"{name}-{enforce}", rpm=2 if name == "A" else None,
                                                enforce=enforce)[1]
                  for name in "AB" for enforce in (True, False)}
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),), keys=KeysConfig(str(keys_db)))
    gw = await make_gateway(config=config)
    pool = gw.gw.pools[PRIORITY_MODEL]
    decided: dict[bool, list[str | None]] = {}
    for enforce in (True, False):
        clock = ManualClock()  # nothing refills while a run lasts
        gw.gw.limiter = KeyLimiter(clock)
        pool.admission = Admission(rate=0.01, burst=3, priority_reserve=0.0, enforce=enforce,
                                   clock=clock)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tierq"):
            statuses = [(await send(gw, 1, key=tokens[name, enforce]))[0] for name in sequence]
            await wait_for(lambda: len(access_lines(caplog)) == len(sequence))
        if enforce:
            # Which limit shed each: the pool's count says how many were its own.
            assert pool.admission.stats()["shed"]["rate_limit_exceeded"] == expected["rate_limited"]
            assert statuses.count(429) == sum(expected.values())
            decided[True] = [s == 429 for s in statuses]
        else:
            assert statuses == [200] * len(sequence)  # sheds nothing
            flags = [line.get("shadow") for line in access_lines(caplog)]
            assert {d: flags.count(d) for d in expected} == expected
            decided[False] = [f is not None for f in flags]
    metric = await shadow_metric(gw)
    assert {d: int(metric[d]) for d in expected} == expected
    assert decided[False] == decided[True], "the same requests, not only as many"


async def test_the_clusters_key_limits_in_redis_name_the_limit_that_refused(
        redis_server: RedisServer) -> None:  # noqa: F811
    """[cluster]: the Redis script says which limit refused, as the local limiter does,
    so a key in shadow mode counts key_rpm or key_tpm across hosts too."""
    from tierq.cluster import Cluster as HostCluster
    from tierq.config import ClusterConfig

    host = HostCluster(ClusterConfig(redis_server.url, host_id="solo"), "solo", {})
    await host.start()
    try:
        by_rpm = KeyInfo("shadowrpm001", "r", 0.0, None, 2, 1000, enforce=False)
        assert [await host.decide_key(by_rpm, 10) for _ in range(2)] == [None, None]
        refused = await host.decide_key(by_rpm, 10)
        assert refused is not None and refused.decision == "key_rpm" and refused.wait_s > 0
        by_tpm = KeyInfo("shadowtpm001", "t", 0.0, None, 100, 30, enforce=False)
        assert await host.decide_key(by_tpm, 20) is None
        refused = await host.decide_key(by_tpm, 20)
        assert refused is not None and refused.decision == "key_tpm"
    finally:
        await host.stop()


@pytest.mark.parametrize(("rule", "decision"), [
    ({"priority_budget_usd": "0.000001"}, "downgrade_budget"),
    ({"ramp_min_tpm": 60, "ramp_max_growth": 0.5, "ramp_window_s": 60}, "downgrade_ramp"),
])
async def test_a_keys_downgrades_in_shadow_mode_serve_priority_and_count_what_enforcing_downgrades(
        make_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        rule: dict[str, Any], decision: str) -> None:
    from test_gateway_downgrades import _ask, _config, _manual

    running = await make_gateway(config=_config(tmp_path))
    _manual(running)  # the step and the day stand still while the test runs
    keys = running.gw.keys
    assert keys is not None
    tiers: dict[bool, list[tuple[str, str | None]]] = {}
    with caplog.at_level(logging.INFO, logger="tierq"):
        for enforce in (True, False):
            info, token = keys.create(f"rule-{enforce}", enforce=enforce, **rule)
            tiers[enforce] = [await _ask(running, token) for _ in range(12)]
            assert info.enforce is enforce
        await wait_for(lambda: len(access_lines(caplog)) == 24)
    downgraded = [reason is not None for _, reason in tiers[True]]
    assert 0 < sum(downgraded) < 12
    # Shadow: every request served, echoed and billed priority (no reason header);
    # the downgrades enforcing made counted, on the same requests.
    assert tiers[False] == [("priority", None)] * 12
    flags = [line.get("shadow") for line in access_lines(caplog)[12:]]
    assert flags == [decision if d else None for d in downgraded]
    metric = await shadow_metric(gw=running)
    assert metric[decision] == sum(downgraded) and sum(metric.values()) == sum(downgraded)
