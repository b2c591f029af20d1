"""Crash and drain: `tierq serve` in a child process, killed with SIGKILL or SIGTERM.

kill -9 under mixed load: every response a client received complete has its
ledger row, none is duplicated, the ledger opens cleanly after a restart.
SIGTERM: stop accepting, finish admitted requests, shed the queue with 503 and
Retry-After, commit the ledger, exit 0.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import PRIORITY_MODEL

from tierq.sim import SimServer, start_sim
from ports import free_port

pytestmark = pytest.mark.reliability


class Serve:
    """`python -m tierq serve --config ...` on a free loopback port."""

    def __init__(self, tmp: Path, sim: SimServer, *, max_concurrency: int = 4,
                 drain_timeout_s: float = 10.0, workers: int = 1,
                 access_log_gather_s: float | None = None) -> None:
        self.port = free_port()
        self.db = tmp / "ledger.db"
        self.config = tmp / "tierq.toml"
        self.log = tmp / "serve.log"
        self.config.write_text(f"""
[server]
host = "127.0.0.1"
port = {self.port}
drain_timeout_s = {drain_timeout_s}
workers = {workers}

[ledger]
url = "sqlite:///{self.db}"

[[upstreams]]
name = "sim"
base_url = "{sim.url}"
kind = "vllm"

[[models]]
id = "{PRIORITY_MODEL}"
upstream = "sim"
priority = true

[models.admission]
max_concurrency = {max_concurrency}
queue_depth = 64
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.root = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "tierq"]
        if access_log_gather_s is not None:
            # The access-log writer thread made to hold its lines that long: only
            # the flush at shutdown writes them.
            self.argv = [sys.executable, "-c", "import sys, tierq.logs, tierq.cli; "
                         f"tierq.logs._writer.gather_s = {access_log_gather_s}; "
                         "sys.exit(tierq.cli.main(sys.argv[1:]))"]

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.argv, "serve", "--config", str(self.config)],
                stdout=log, stderr=log, cwd=self.config.parent)
        deadline = time.monotonic() + 20.0
        async with aiohttp.ClientSession() as s:
            while True:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    async with s.get(self.root + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "gateway did not become ready"
                await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:
            assert time.monotonic() < deadline, "gateway did not exit in time"
            await asyncio.sleep(0.02)
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = await start_sim("127.0.0.1", 0, slots=16, ttft_ms=5.0, tokens_per_s=100.0)
    yield server
    await server.close()


def chat(stream: bool, max_tokens: int) -> bytes:
    return orjson.dumps({"model": PRIORITY_MODEL, "stream": stream, "max_tokens": max_tokens,
                         "messages": [{"role": "user", "content": "crash test prompt"}],
                         "service_tier": random.choice(["priority", "default", None])})


async def one(s: aiohttp.ClientSession, root: str, rng: random.Random) -> tuple[str, str]:
    """One request: (request id, "complete" | "incomplete")."""
    stream = rng.random() < 0.5
    hang_up = rng.random() < 0.15
    try:
        async with s.post(root + "/v1/chat/completions", data=chat(stream, rng.randint(1, 12)),
                          headers={"Content-Type": "application/json"}) as r:
            rid = r.headers.get("x-request-id", "")
            if hang_up:
                await r.content.readany()
                return rid, "incomplete"
            raw = await r.read()
            if r.status != 200:
                return rid, "incomplete"
            if stream:
                return rid, "complete" if raw.rstrip().endswith(b"data: [DONE]") else "incomplete"
            data = orjson.loads(raw)
            return rid, "complete" if data.get("usage") else "incomplete"
    except (aiohttp.ClientError, orjson.JSONDecodeError, asyncio.TimeoutError):
        return "", "incomplete"


async def load(root: str, seconds: float, clients: int = 24) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    stop = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(i)
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < stop:
                out.append(await one(s, root, rng))
                if out[-1][0] == "":
                    return  # the gateway is gone

    await asyncio.gather(*(client(i) for i in range(clients)))
    return out


def ledger_rows(db: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return conn.execute("SELECT request_id, status FROM ledger").fetchall()
    finally:
        conn.close()


async def test_kill_9_under_mixed_load_loses_no_completed_response_and_duplicates_none(
    sim: SimServer, tmp_path: Path
) -> None:
    serve = Serve(tmp_path, sim)
    try:
        await serve.start()
        killer = asyncio.get_running_loop().call_later(1.5, serve.signal, signal.SIGKILL)
        results = await load(serve.root, seconds=4.0)
        killer.cancel()
        assert await serve.wait(5.0) == -signal.SIGKILL
        complete = {rid for rid, how in results if how == "complete"}
        assert len(complete) > 20, "too little load reached the gateway before the kill"
        await serve.start()  # restart on the same ledger file
        rows = ledger_rows(serve.db)
        ids = [r[0] for r in rows]
        assert len(ids) == len(set(ids))
        status = dict(rows)
        missing = [rid for rid in complete if rid not in status]
        assert missing == [], f"{len(missing)} completed responses have no ledger row"
        assert all(status[rid] == "served" for rid in complete)
        # The restarted gateway serves and bills.
        after = await load(serve.root, seconds=0.5, clients=2)
        assert any(how == "complete" for _, how in after)
        serve.signal(signal.SIGTERM)
        assert await serve.wait(15.0) == 0
        final = dict(ledger_rows(serve.db))
        assert all(final.get(rid) == "served" for rid, how in after if how == "complete")
    finally:
        serve.stop()


async def test_sigterm_drains_finishes_streams_sheds_queue_with_503_and_exits_0(
    tmp_path: Path,
) -> None:
    sim = await start_sim("127.0.0.1", 0, slots=8, ttft_ms=5.0, tokens_per_s=20.0)
    serve = Serve(tmp_path, sim, max_concurrency=2, drain_timeout_s=10.0)
    try:
        await serve.start()
        async with aiohttp.ClientSession() as s:
            async def request(stream: bool) -> tuple[int, dict[str, str], bytes]:
                async with s.post(serve.root + "/v1/chat/completions", data=chat(stream, 60 if stream else 20),
                                  headers={"Content-Type": "application/json"}) as r:
                    return r.status, dict(r.headers), await r.read()

            async def queued_now() -> int:
                async with s.get(serve.root + "/metrics") as r:
                    text = await r.text()
                return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                           if line.startswith("tierq_queue_depth{"))

            running = [asyncio.create_task(request(True)) for _ in range(2)]
            while sim.state.generating < 2:
                await asyncio.sleep(0.01)
            queued = [asyncio.create_task(request(False)) for _ in range(3)]
            while await queued_now() < 3:  # the three are queued behind the two streams
                await asyncio.sleep(0.01)
            serve.signal(signal.SIGTERM)
            shed = await asyncio.gather(*queued)
            # Shed at once, not after the streams: both are still being generated.
            assert not any(t.done() for t in running) and sim.state.generating == 2
            for status, headers, raw in shed:
                assert status == 503
                assert headers["Retry-After"] == "1"
                assert orjson.loads(raw)["error"]["code"] == "server_shutting_down"
            with pytest.raises(aiohttp.ClientConnectionError):  # no longer listening
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(serve.root + "/healthz")
            done = await asyncio.gather(*running)
            for status, _, raw in done:
                assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
        assert await serve.wait(10.0) == 0
        rows = ledger_rows(serve.db)
        assert sorted(st for _, st in rows) == ["served", "served", "shed", "shed", "shed"]
        assert "drained; ledger closed" in serve.log.read_text()
    finally:
        serve.stop()
        await sim.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_loses_no_access_line(tmp_path: Path, sim: SimServer, workers: int) -> None:
    """Access lines are written by a thread in batches: every request answered
    before SIGTERM still has its line when the gateway (each worker) exits."""
    serve = Serve(tmp_path, sim, max_concurrency=16, workers=workers, access_log_gather_s=3600.0)
    try:
        await serve.start()
        async with aiohttp.ClientSession() as s:
            async def request() -> str:
                async with s.post(serve.root + "/v1/chat/completions", data=chat(False, 1),
                                  headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status in (200, 429)  # served or shed by the queue: a line each
                    return r.headers["x-tierq-request-id"]

            ids = set(await asyncio.gather(*(request() for _ in range(300))))
        assert '"logger":"tierq.access"' not in serve.log.read_text()  # all still queued
        serve.signal(signal.SIGTERM)
        assert await serve.wait(15.0) == 0
        logged = [orjson.loads(line) for line in serve.log.read_text().splitlines()
                  if '"logger":"tierq.access"' in line]
        assert ids <= {a["request_id"] for a in logged}
        assert len(logged) == len({a["request_id"] for a in logged})  # none twice
    finally:
        serve.stop()
