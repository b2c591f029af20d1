"""Several `tierq serve` processes as hosts (distinct ports) in front of one sim,
sharing one real PostgreSQL for the ledger and the API keys: reports add up, an
outage of PostgreSQL under load loses and doubles nothing, a host killed while
spooling replays its spool on restart, and a key revoked on one host is refused
by every host."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import PRIORITY_MODEL, exact_json
from pg_fixtures import own_pg, pg_password, pg_session, pg_url  # noqa: F401
from pg_server import PASSWORD, PASSWORD_ENV, PgServer, free_port

from tierq.postgres import PostgresLedger
from tierq.sim import SimServer, start_sim

pytestmark = [pytest.mark.timeout(180), pytest.mark.reliability]


@dataclass
class Host:
    name: str
    port: int
    config: Path
    log: Path
    workers: int = 1
    proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierq", "serve", "--config", str(self.config),
                 "--port", str(self.port), "--workers", str(self.workers), "--no-access-log",
                 "--log-level", "info"],
                stdout=subprocess.DEVNULL, stderr=err)

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
                try:
                    async with s.get(self.root + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"{self.name} never became ready: {self.log.read_text()}")

    async def metric(self, name: str) -> float | None:
        async with aiohttp.ClientSession() as s, s.get(self.root + "/metrics") as r:
            text = await r.text()
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0, self.log.read_text()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no drain, no close
        self.proc.wait(30)


def write_config(path: Path, sim: SimServer, ledger_url: str, spool: Path,
                 keys_url: str | None = None) -> Path:
    keys = (f'[keys]\nurl = "{keys_url}"\npassword_env = "{PASSWORD_ENV}"\nrefresh_s = 0.5\n'
            if keys_url else "")
    path.write_text(f"""
[ledger]
url = "{ledger_url}"
password_env = "{PASSWORD_ENV}"
spool = "{spool}"
{keys}
[[upstreams]]
name = "sim"
kind = "openai"
base_url = "{sim.url}"
[[models]]
id = "{PRIORITY_MODEL}"
priority = true
[models.admission]
max_concurrency = 32
""")
    return path


@dataclass
class Cluster:
    sim: SimServer
    hosts: list[Host]
    ledger_url: str
    tmp: Path
    served: dict[str, tuple[str, Decimal]] = field(default_factory=dict)  # id -> echoed
    failures: list[str] = field(default_factory=list)


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Cluster] = []

    async def make(ledger_url: str, n: int, keys_url: str | None = None,
                   workers: tuple[int, ...] = ()) -> Cluster:
        sim = await start_sim("127.0.0.1", 0, slots=64, ttft_ms=2.0, tokens_per_s=0.0)
        hosts = []
        for i in range(n):
            cfg = write_config(tmp_path / f"host{i}.toml", sim, ledger_url,
                               tmp_path / f"spool{i}.db", keys_url)
            hosts.append(Host(f"host{i}", free_port(), cfg, tmp_path / f"host{i}.log",
                              workers[i] if i < len(workers) else 1))
        c = Cluster(sim, hosts, ledger_url, tmp_path)
        made.append(c)
        for h in hosts:
            h.start()
        for h in hosts:
            await h.ready()
        return c

    yield make
    for c in made:
        for h in c.hosts:
            h.stop()
        await c.sim.close()


async def one_request(c: Cluster, host: Host, i: int, key: str = "unused") -> None:
    """A chat completion through the openai client: streamed every other time."""
    client = openai.AsyncOpenAI(base_url=host.root + "/v1", api_key=key, max_retries=0)
    tier = ["priority", "default", None][i % 3]
    extra = {} if tier is None else {"service_tier": tier}
    try:
        if i % 2:
            raw = await client.chat.completions.with_raw_response.create(
                model=PRIORITY_MODEL, messages=[{"role": "user", "content": f"hello {i}"}],
                max_tokens=3 + i % 7, **extra)  # type: ignore[arg-type]
            body = exact_json(raw.http_response.content)
            c.served[raw.headers["x-request-id"]] = (body["service_tier"],
                                                     body["usage"]["estimated_cost"])
        else:
            raw_stream = await client.chat.completions.with_raw_response.create(
                model=PRIORITY_MODEL, messages=[{"role": "user", "content": f"hello {i}"}],
                max_tokens=3 + i % 7, stream=True, stream_options={"include_usage": True},
                **extra)  # type: ignore[arg-type]
            rid = raw_stream.headers["x-request-id"]
            got: tuple[str, Decimal] | None = None
            async for chunk in raw_stream.parse():
                if chunk.usage is not None:
                    got = (str(chunk.service_tier),
                           Decimal(str((chunk.usage.model_extra or {})["estimated_cost"])))
            assert got is not None, "the stream ended with its usage chunk"
            c.served[rid] = got  # only once the stream reached [DONE]
    except openai.APIError as e:
        c.failures.append(f"{host.name} #{i}: {e}")
    finally:
        await client.close()


def pg_rows(url: str) -> dict[str, Any]:
    return {r.request_id: r for r in PostgresLedger(url, password_env=PASSWORD_ENV).rows()}


def assert_billed_is_echoed(c: Cluster, rows: dict[str, Any]) -> None:
    assert not c.failures, c.failures[:5]
    assert set(rows) == set(c.served), (
        f"{len(set(c.served) - set(rows))} served without a row, "
        f"{len(set(rows) - set(c.served))} rows without a served response")
    for rid, (tier, cost) in c.served.items():
        assert (rows[rid].applied_tier, rows[rid].cost, rows[rid].status) == (tier, cost, "served")


def usage_cli(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "tierq", "usage", *args, "--json"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PGPASSWORD": PASSWORD})
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = orjson.loads(out.stdout)
    return data


async def test_three_hosts_write_one_ledger_whose_usage_report_adds_up(
        pg_url: str, cluster_factory: Any) -> None:
    # The last host runs two workers: each its own connection, one spool file.
    c: Cluster = await cluster_factory(pg_url, 3, workers=(1, 1, 2))
    await asyncio.gather(*(one_request(c, c.hosts[i % 3], i) for i in range(60)))
    rows = pg_rows(pg_url)
    assert_billed_is_echoed(c, rows)
    total = usage_cli("--db", pg_url)["total"]
    assert (total["requests"], total["served"]) == (60, 60)
    assert Decimal(total["cost"]) == sum(cost for _, cost in c.served.values())
    assert usage_cli("--config", str(c.hosts[1].config))["total"] == total, "--config reads it too"
    # Every host wrote some of them, into the one table.
    for h in c.hosts:
        assert (await h.metric("tierq_ledger_rows_total") or 0) >= 20
        assert await h.metric("tierq_ledger_spool_rows") == 0


async def _load(c: Cluster, stop: asyncio.Event, clients: int) -> int:
    sent = 0

    async def client(k: int) -> None:
        nonlocal sent
        i = k
        while not stop.is_set():
            await one_request(c, c.hosts[i % len(c.hosts)], i)
            sent += 1
            i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    return sent


async def test_postgresql_stopped_for_5_s_under_load_then_every_response_has_one_row(
        own_pg: PgServer, cluster_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = own_pg.url("tierq")
    c: Cluster = await cluster_factory(url, 2)
    stop = asyncio.Event()
    load = asyncio.create_task(_load(c, stop, 6))
    while len(c.served) < 100:
        await asyncio.sleep(0.05)
    before = len(c.served)
    await asyncio.to_thread(own_pg.stop, "fast")
    t_down = time.monotonic()
    depth = 0.0
    while time.monotonic() - t_down < 5.0:  # the outage: PostgreSQL is gone
        for h in c.hosts:
            depth = max(depth, await h.metric("tierq_ledger_spool_rows") or 0)
        await asyncio.sleep(0.25)
    during = len(c.served) - before
    await asyncio.to_thread(own_pg.start)
    await asyncio.sleep(1.0)
    stop.set()
    sent = await load
    for _ in range(600):  # the spools drain into PostgreSQL by themselves
        spools = [await h.metric("tierq_ledger_spool_rows") for h in c.hosts]
        spooling = [await h.metric("tierq_ledger_spooling") for h in c.hosts]
        if spools == [0, 0] and spooling == [0, 0]:
            break
        await asyncio.sleep(0.1)
    assert spools == [0, 0] and spooling == [0, 0], (
        "spools drained to zero: " + " | ".join(h.log.read_text()[-3000:] for h in c.hosts))
    rows = pg_rows(url)
    assert_billed_is_echoed(c, rows)
    assert during > 0 and depth > 0, "responses completed on the spool while PostgreSQL was down"
    for h in c.hosts:
        text = h.log.read_text()
        assert "rows go to the spool" in text and "rows go to PostgreSQL again" in text
    with capsys.disabled():
        print(f"\n[pg outage] requests sent {sent}, served {len(c.served)} "
              f"({before} before the stop, {during} during the 5 s outage); rows in PostgreSQL "
              f"{len(rows)}, each once; max spool depth {depth:.0f}; spools after: {spools}")


async def test_a_host_killed_while_spooling_replays_its_spool_when_restarted(
        own_pg: PgServer, cluster_factory: Any) -> None:
    own_pg.stop()
    url = own_pg.url("tierq")
    c: Cluster = await cluster_factory(url, 1)
    h = c.hosts[0]
    await asyncio.gather(*(one_request(c, h, i) for i in range(20)))
    assert len(c.served) == 20 and not c.failures
    spool = c.tmp / "spool0.db"
    with sqlite3.connect(spool) as conn:
        assert conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 20
    h.kill()
    own_pg.start()
    h.start()
    await h.ready()
    for _ in range(600):
        if await h.metric("tierq_ledger_spool_rows") == 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.gather(*(one_request(c, h, i) for i in range(20, 25)))
    await asyncio.sleep(0.2)
    assert_billed_is_echoed(c, pg_rows(url))
    with sqlite3.connect(spool) as conn:
        assert conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 0
    assert "from an earlier run: replaying" in h.log.read_text()


def keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tierq", "keys", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PGPASSWORD": PASSWORD})


async def _status(host: Host, token: str) -> int:
    body = {"model": PRIORITY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with aiohttp.ClientSession() as s, s.post(
            host.root + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status


async def test_keys_in_postgresql_are_known_and_revoked_on_every_host(
        pg_url: str, cluster_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    made = keys_cli("create", "shared", "--db", pg_url)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    c: Cluster = await cluster_factory(pg_url, 2, keys_url=pg_url)
    assert [await _status(h, token) for h in c.hosts] == [200, 200]
    wrong = token[:-1] + ("y" if token.endswith("x") else "x")  # never the token itself
    assert [await _status(h, wrong) for h in c.hosts] == [401, 401]
    listed = keys_cli("list", "--config", str(c.hosts[0].config))
    assert listed.returncode == 0 and "shared" in listed.stdout and "active" in listed.stdout
    late = keys_cli("create", "late", "--db", pg_url).stdout.strip()
    public_id = token.split("-")[1]
    revoked = keys_cli("revoke", public_id, "--db", pg_url)
    assert revoked.returncode == 0, revoked.stderr
    t0 = time.monotonic()
    statuses: list[int] = []
    for _ in range(300):  # every host re-reads the table each refresh_s (0.5 s here)
        statuses = [await _status(h, token) for h in c.hosts]
        if statuses == [401, 401]:
            break
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    assert statuses == [401, 401], "revoked on every host"
    # The bound is refresh_s (0.5 s) plus one query; 5 s more for a loaded
    # machine's queries and requests, so only a host that stopped refreshing at
    # its period (or never did) fails here, not a slow one.
    assert took <= 0.5 + 5.0, f"revoked everywhere only after {took:.2f} s"
    assert [await _status(h, late) for h in c.hosts] == [200, 200], "a new key reached every host"
    with capsys.disabled():
        print(f"\n[pg keys] revocation refused on both hosts after {took:.2f} s (refresh_s 0.5)")
