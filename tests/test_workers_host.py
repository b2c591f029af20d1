"""`tierq serve --workers 2` behaves as one gateway per host: a key's rpm limit
holds across workers, any worker's /metrics shows the host's totals, and every
served request has exactly one ledger row (several writers on one SQLite
file). Also the pieces in-process: snapshot exchange and the board."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tierq.keys import KeyStore
from tierq.metrics import GatewayMetrics, PoolSnapshot, snapshot_from_json, snapshot_to_json
from tierq import PoolSettings
from tierq.workers import SharedPools
from ports import free_port

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"


def test_snapshot_survives_the_json_exchange_unchanged() -> None:
    m = GatewayMetrics()
    m.observe(MODEL, "sim", "priority", "served", None, 0.001, 0.2, 0.05, 510_000_000)
    m.observe(MODEL, "sim", "default", "shed", "rate_limit_exceeded", 0, 0, None)
    m.observe(MODEL, "sim", "default", "failed", "upstream_502", 0, 0.1, None)
    stats = {"depth": {"priority": 0, "default": 1, "flex": 0}, "in_flight": 2, "shed": {"queue_timeout": 1}}
    snap = m.snapshot([PoolSnapshot(MODEL, "sim", True, 8, stats)], ready=True)
    assert snap.costs == {(MODEL, "priority"): 510_000_000}
    assert snapshot_from_json(snapshot_to_json(snap)) == snap


def test_board_shows_each_worker_the_others_latest_snapshot() -> None:
    sp = SharedPools({"m": PoolSettings(max_concurrency=1)}, 2)
    try:
        a, b = sp.attach(0), sp.attach(1)
        assert a.board is not None and b.board is not None
        assert a.board.others() == [], "nothing published yet"
        m = GatewayMetrics()
        m.observe("m", "up", "default", "served", None, 0, 0.01, None)
        first = m.snapshot([], ready=True)
        b.board.publish(first)
        m.observe("m", "up", "default", "served", None, 0, 0.01, None)
        b.board.publish(m.snapshot([], ready=True))
        [seen] = a.board.others()
        assert seen.requests == {("m", "default", "served"): 2}, "the latest replaces the previous"
        assert b.board.others() == []
        run_dir = sp.run_dir
        assert run_dir is not None and Path(run_dir).is_dir()
    finally:
        sp.close()
    assert not Path(run_dir).exists(), "close() removes the run directory"


# ---- real `tierq serve --workers 2` -------------------------------------


class Served:
    def __init__(self, url: str, db: Path, tokens: dict[str, str], workers: list[str]) -> None:
        self.url, self.db, self.tokens, self.workers = url, db, tokens, workers

    def at(self, i: int) -> str:
        """The whole gateway, or one worker's own port when the app has them."""
        return self.workers[i % len(self.workers)] if self.workers else self.url


APP = Path(__file__).with_name("_gateway_workers_app.py")


@pytest.fixture(params=["tierq serve", "worker ports"])
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    db = tmp_path / "tierq.db"
    with KeyStore(str(db)) as store:
        tokens = {"limited": store.create("limited", rpm=5)[1], "free": store.create("free")[1]}
    cfg = tmp_path / "tierq.toml"
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{db}"
[keys]
path = "{db}"
[[upstreams]]
name = "sim"
kind = "sim"
[upstreams.sim]
slots = 64
ttft_ms = 2
tokens_per_s = 0
[[models]]
id = "{MODEL}"
""")
    port = free_port()
    log = tmp_path / "serve.log"
    debug = [free_port(), free_port()] if request.param == "worker ports" else []
    cmd = ([sys.executable, str(APP), str(cfg), str(port), ",".join(map(str, debug))] if debug else
           [sys.executable, "-m", "tierq", "serve", "--config", str(cfg), "--port", str(port), "--workers", "2",
            "--no-access-log", "--log-level", "warning"])
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    workers = [f"http://127.0.0.1:{p}" for p in debug]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            for _ in range(300):
                try:
                    async with s.get((workers[-1] if workers else url) + "/status.json") as r:
                        body = await r.json()
                        if r.status == 200 and body["workers"] == 2 and body["ready"]:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None, log.read_text()
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("gateway workers never came up")
        yield Served(url, db, tokens, workers)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


async def _chat(s: aiohttp.ClientSession, g: Served, key: str, i: int,
                **headers: str) -> tuple[int, str, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 2}
    async with s.post(g.at(i) + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {g.tokens[key]}", **headers}) as r:
        data = await r.json()
        code = data["error"]["code"] if r.status != 200 else ""
        return r.status, code, r.headers.get("x-tierq-request-id", "")


def _metric_sum(text: str, name: str) -> int:
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith(name + "{"))


@pytest.mark.timeout(120)
async def test_two_workers_act_as_one_gateway_for_key_limits_metrics_and_the_ledger(served: Served) -> None:
    g = served
    # With worker ports, requests alternate between the workers; through the
    # one shared socket the kernel decides (often all to one worker).
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        limited = await asyncio.gather(*(_chat(s, g, "limited", i) for i in range(12)))
        assert sorted(st for st, _, _ in limited) == [200] * 5 + [429] * 7, "5 a minute for the host"
        assert {c for st, c, _ in limited if st == 429} == {"rate_limit_exceeded"}

        # Half of them name a fairness id, which an untrusted key's requests ignore.
        load = await asyncio.gather(*(
            _chat(s, g, "free", i, **({"x-tierq-fairness-id": f"t{i}"} if i % 2 else {}))
            for i in range(80)))
        assert all(st == 200 for st, _, _ in load)
        total = len(limited) + len(load)

        # Any worker's scrape shows the host: its own numbers now, the other's
        # as of its last publish (at most 250 ms ago).
        for _ in range(40):
            async with s.get(g.at(_) + "/metrics") as r:
                text = await r.text()
            if _metric_sum(text, "tierq_requests_total") == total:
                break
            await asyncio.sleep(0.1)
        assert "tierq_workers 2" in text.splitlines()
        assert _metric_sum(text, "tierq_requests_total") == total
        assert _metric_sum(text, "tierq_shed_total") == 7
        ignored = [line for line in text.splitlines()
                   if line.startswith("tierq_fairness_id_ignored_total ")]
        assert ignored == ["tierq_fairness_id_ignored_total 40"], "counted on both workers"
        async with s.get(g.at(1) + "/status.json") as r:
            status = await r.json()
        assert status["workers"] == 2
        assert sum(sum(t.values()) for t in status["totals"].values()) == total
        # Each key is one flow, its served tokens summed over both workers (4 a request).
        served_by_flow = {f["flow"]: f["tokens"] for f in status["pools"][0]["flows"]["top_served"]}
        ids = {k: t.split("-")[1] for k, t in g.tokens.items()}
        assert served_by_flow == {ids["free"]: 320, ids["limited"]: 20}

    served_ids = [rid for st, _, rid in [*limited, *load] if st == 200]
    assert len(served_ids) == 85 and len(set(served_ids)) == 85
    with sqlite3.connect(g.db) as conn:
        rows = dict(conn.execute("SELECT request_id, COUNT(*) FROM ledger GROUP BY request_id").fetchall())
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM ledger GROUP BY status").fetchall())
    assert all(rows.get(rid) == 1 for rid in served_ids), "every served request has exactly one row"
    assert statuses == {"served": 85, "shed": 7}
    usage = subprocess.run([sys.executable, "-m", "tierq", "usage", "--db", str(g.db), "--json"],
                           capture_output=True, text=True, check=True)
    assert orjson.loads(usage.stdout)["total"] | {"cost": None} == {
        "requests": 92, "served": 85, "shed": 7, "failed": 0, "cancelled": 0,
        "prompt_tokens": 170, "completion_tokens": 170, "cost": None}, "tierq usage: each row once"
