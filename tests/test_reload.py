"""A config reload without a restart (SIGHUP, `tierq reload`), through a real
`tierq serve` process and the official openai client: a stream in flight
across it finishes untouched at the price it was admitted under, a waiter
queued across a limit change is served, later requests get the new prices, a
bad config is refused and counted, and with --workers 2 both workers apply it
while a shared-block setting is named in one line as needing a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

MODEL = "reload-test-model"
MESSAGES = [{"role": "user", "content": "hi"}]


def _config(tmp: Path, *, input_per_m: str, output_per_m: str, limit: int,
            queue_depth: int = 8) -> str:
    return f"""
[ledger]
url = "sqlite:///{tmp / 'tierq.db'}"
[[upstreams]]
name = "sim"
kind = "sim"
[upstreams.sim]
slots = 16
ttft_ms = 5
tokens_per_s = 10
[[models]]
id = "{MODEL}"
input_per_m = "{input_per_m}"
output_per_m = "{output_per_m}"
[models.admission]
max_concurrency = {limit}
queue_depth = {queue_depth}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    cfg: Path
    log: Path
    tmp: Path
    workers: int

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def access(self, client_id: str) -> dict[str, Any]:
        """The access line of the request sent with x-request-id `client_id`
        (written by a thread, in batches: polled)."""
        for _ in range(200):
            for ln in self.log_lines():
                if ln.get("client_request_id") == client_id:
                    return ln
            time.sleep(0.05)
        raise AssertionError(f"no access line for {client_id}\n{self.log.read_text()}")

    async def status(self, s: aiohttp.ClientSession) -> dict[str, Any]:
        async with s.get(self.url + "/status.json") as r:
            body: dict[str, Any] = await r.json()
            return body

    async def metric(self, s: aiohttp.ClientSession, sample: str) -> float:
        async with s.get(self.url + "/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        return 0.0

    async def until(self, s: aiohttp.ClientSession, what: str, ok: Any) -> dict[str, Any]:
        for _ in range(400):
            st = await self.status(s)
            if ok(st):
                return st
            assert self.proc.poll() is None, self.log.read_text()
            await asyncio.sleep(0.05)
        raise AssertionError(f"never: {what}\n{self.log.read_text()}")


async def _start(tmp: Path, workers: int, server: str = "") -> Server:
    cfg = tmp / "tierq.toml"
    cfg.write_text(server + _config(tmp, input_per_m="1", output_per_m="2", limit=1))
    port = _free_port()
    log = tmp / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierq", "serve", "--config", str(cfg), "--port", str(port),
             "--workers", str(workers)],
            stdout=subprocess.DEVNULL, stderr=err, cwd=tmp)
    srv = Server(proc, f"http://127.0.0.1:{port}", cfg, log, tmp, workers)
    async with aiohttp.ClientSession() as s:
        for _ in range(400):
            try:
                st = await srv.status(s)
                if st["ready"] and st["workers"] == workers:
                    return srv
            except aiohttp.ClientError:
                pass
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.05)
    raise RuntimeError("tierq serve never came up")


@pytest.fixture(params=[1, 2], ids=["one process", "--workers 2"])
async def server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    srv = await _start(tmp_path, request.param)
    try:
        yield srv
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.log.read_text()
    assert not (tmp_path / "tierq.pid").exists(), "the pid file is removed at exit"


def _cost(usage: Any, input_per_m: int, output_per_m: int) -> Decimal:
    return (Decimal(usage.prompt_tokens * input_per_m + usage.completion_tokens * output_per_m)
            / 1_000_000)


@pytest.mark.parametrize("how", ["SIGHUP", "tierq reload"])
@pytest.mark.timeout(120)
async def test_reload_keeps_a_stream_and_a_waiter_and_applies_prices_and_limit_to_what_follows(
    server: Server, how: str,
) -> None:
    srv = server
    pid = int((srv.tmp / "tierq.pid").read_text())
    assert pid == srv.proc.pid, "the pid file names the server (the supervisor with workers)"
    async with aiohttp.ClientSession() as s, \
            AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as c:
        before = (await srv.status(s))["config"]
        assert before["sha256"] == hashlib.sha256(srv.cfg.read_bytes()).hexdigest()

        async def stream() -> Any:
            chunks = [ch async for ch in await c.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=60, stream=True,
                stream_options={"include_usage": True}, extra_headers={"x-request-id": "stream"})]
            return chunks

        in_flight = asyncio.create_task(stream())
        await srv.until(s, "the stream holds the one slot",
                        lambda st: st["pools"][0]["in_flight"] == 1)
        waiter = asyncio.create_task(c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=1, extra_headers={"x-request-id": "waiter"}))
        await srv.until(s, "a waiter queued behind it",
                        lambda st: st["pools"][0]["depth"]["default"] == 1)

        old_sha = before["sha256"]
        srv.cfg.write_text(_config(srv.tmp, input_per_m="10", output_per_m="20", limit=2))
        new_sha = hashlib.sha256(srv.cfg.read_bytes()).hexdigest()
        prices = {old_sha[:12]: (1, 2), new_sha[:12]: (10, 20)}
        if how == "SIGHUP":
            srv.proc.send_signal(signal.SIGHUP)
        else:
            out = subprocess.run([sys.executable, "-m", "tierq", "reload", "--config", str(srv.cfg)],
                                 capture_output=True, text=True, cwd=srv.tmp, check=True)
            assert f"sent SIGHUP to pid {srv.proc.pid}" in out.stdout
        after = await srv.until(s, "every worker on the new config, the limit raised",
                                lambda st: st["config"]["sha256"] == new_sha
                                and st["config"]["all_workers"]
                                and st["pools"][0]["limit"]["value"] == 2)
        assert after["config"]["loaded_at"] > before["loaded_at"]
        # The waiter got the slot the raised limit made.
        served = await asyncio.wait_for(waiter, 30)
        assert served.choices[0].finish_reason is not None
        # The price is the one of the config the serving worker held when it
        # admitted the request. One process swaps its config and retunes its
        # pools with nothing in between; with --workers 2 every worker swaps
        # first and the limits are raised once both have: whichever worker the
        # waiter queued on (the stream's or the other), it pays the new prices
        # and goes out through its worker's new upstream client, sized for the
        # new limit: served beside the stream, not after it.
        assert served.usage is not None
        line = srv.access("waiter")
        assert line["config"] == new_sha[:12], line
        assert not in_flight.done(), "served beside the stream, not after it"
        cost = Decimal(repr(served.usage.model_extra["estimated_cost"]))  # type: ignore[index]
        assert cost == _cost(served.usage, *prices[line["config"]]) == Decimal(line["cost"])

        chunks = await asyncio.wait_for(in_flight, 60)
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 60, "the stream finished untouched"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text
        # Admitted before the reload: billed at the prices it was admitted under.
        assert Decimal(repr(usage.model_extra["estimated_cost"])) == _cost(usage, 1, 2)  # type: ignore[index]
        assert srv.access("stream")["config"] == old_sha[:12]

        # Admitted once every worker reloaded: the new prices, whichever worker.
        for i in range(4):
            late = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                                   extra_headers={"x-request-id": f"late{i}"})
            assert late.usage is not None
            assert Decimal(repr(late.usage.model_extra["estimated_cost"])) == _cost(late.usage, 10, 20)  # type: ignore[index]
            assert srv.access(f"late{i}")["config"] == new_sha[:12]
        models = await c.models.list()
        assert [m.model_extra["pricing"]["input"] for m in models.data] == [10]  # type: ignore[index]
        assert await srv.metric(s, 'tierq_config_reload_total{result="applied"}') == 1
    applied = [ln for ln in srv.log_lines() if "config reloaded" in ln.get("msg", "")]
    assert applied and not any("restart" in ln["msg"] for ln in applied)
    if srv.workers == 2:
        # The supervisor committed the round once both workers had swapped.
        assert [ln["msg"] for ln in srv.log_lines() if "pools retuned" in ln.get("msg", "")] \
            == ["reload 1: every worker holds the new config; pools retuned"]


@pytest.mark.timeout(120)
async def test_a_bad_config_is_refused_counted_and_the_running_one_stays(server: Server) -> None:
    srv = server
    good = srv.cfg.read_bytes()
    async with aiohttp.ClientSession() as s, \
            AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as c:
        srv.cfg.write_text(_config(srv.tmp, input_per_m="10", output_per_m="20", limit=2)
                           .replace("max_concurrency = 2", "max_concurrency = -3"))
        srv.proc.send_signal(signal.SIGHUP)
        for _ in range(400):
            if await srv.metric(s, 'tierq_config_reload_total{result="error"}') == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(srv.log.read_text())
        assert await srv.metric(s, 'tierq_config_reload_total{result="applied"}') == 0
        st = await srv.status(s)
        assert st["config"]["sha256"] == hashlib.sha256(good).hexdigest()
        resp = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        assert resp.usage is not None
        assert Decimal(repr(resp.usage.model_extra["estimated_cost"])) == _cost(resp.usage, 1, 2)  # type: ignore[index]
    refused = [ln["msg"] for ln in srv.log_lines() if "config reload refused" in ln.get("msg", "")]
    assert refused and all("\n" not in m and "max_concurrency" in m for m in refused), refused


@pytest.mark.timeout(120)
async def test_with_workers_a_shared_block_setting_is_named_in_one_line_and_the_rest_applied(
    tmp_path: Path,
) -> None:
    srv = await _start(tmp_path, 2)
    try:
        async with aiohttp.ClientSession() as s:
            srv.cfg.write_text(_config(tmp_path, input_per_m="10", output_per_m="20", limit=2,
                                       queue_depth=16))
            srv.proc.send_signal(signal.SIGHUP)
            new_sha = hashlib.sha256(srv.cfg.read_bytes()).hexdigest()
            st = await srv.until(s, "both workers on the new config",
                                 lambda st: st["config"]["sha256"] == new_sha
                                 and st["config"]["all_workers"])
            assert st["pools"][0]["limit"]["value"] == 2, "the limit applied"
            assert st["pools"][0]["queue_capacity"] == 8, "the queue depth kept until a restart"
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
    lines = [ln["msg"] for ln in srv.log_lines() if "config reloaded" in ln.get("msg", "")]
    assert len(lines) == 2, "one line a worker"
    assert all(m.endswith(f"needs a restart to take effect: models.{MODEL}.admission.queue_depth")
               for m in lines), lines


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.timeout(120)
async def test_a_worker_started_after_a_reload_attaches_and_serves_the_reloaded_config(
    tmp_path: Path,
) -> None:
    srv = await _start(tmp_path, 2)
    try:
        async with aiohttp.ClientSession() as s, \
                AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as c:
            # New prices and a new limit: settings a reload changes, which once
            # rewrote the shared block's fingerprint so a new worker could not attach.
            srv.cfg.write_text(_config(tmp_path, input_per_m="10", output_per_m="20", limit=3))
            new_sha = hashlib.sha256(srv.cfg.read_bytes()).hexdigest()
            srv.proc.send_signal(signal.SIGHUP)
            await srv.until(s, "both workers on the new config",
                            lambda st: st["config"]["sha256"] == new_sha and st["config"]["all_workers"]
                            and st["pools"][0]["limit"]["value"] == 3)
            # An edit not signalled yet: the replacement applies what the
            # others applied at the SIGHUP, not this.
            srv.cfg.write_text(_config(tmp_path, input_per_m="100", output_per_m="200", limit=3))
            workers = _children(srv.proc.pid)
            assert len(workers) == 2, workers
            os.kill(workers[0], signal.SIGKILL)
            for _ in range(400):
                now = _children(srv.proc.pid)
                if len(now) == 2 and workers[0] not in now:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(srv.log.read_text())
            replacement = (set(now) - set(workers)).pop()
            st = await srv.until(s, "the replacement reports, on the new config",
                                 lambda st: st["workers"] == 2 and st["config"]["sha256"] == new_sha
                                 and st["config"]["all_workers"])
            assert st["pools"][0]["limit"]["value"] == 3
            # Enough requests at once that the listening socket hands some to
            # each worker: every one served, at the new prices.
            ids = [f"after-kill-{i}" for i in range(8)]
            done = await asyncio.gather(*(c.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=1, extra_headers={"x-request-id": i})
                for i in ids))
            for resp, i in zip(done, ids, strict=True):
                assert resp.usage is not None
                assert Decimal(repr(resp.usage.model_extra["estimated_cost"])) == _cost(resp.usage, 10, 20)  # type: ignore[index]
                assert srv.access(i)["config"] == new_sha[:12]
            assert replacement in _children(srv.proc.pid), "the replacement kept running"
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.log.read_text()
    text = srv.log.read_text()
    assert "cannot attach" not in text and "different admission settings" not in text, text
    lines = [ln["msg"] for ln in srv.log_lines() if "config reloaded" in ln.get("msg", "")]
    assert len(lines) == 3, "each worker, and the replacement before it served"


@pytest.mark.timeout(60)
async def test_a_pid_file_that_cannot_be_written_is_one_warning_and_the_server_serves(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-dir" / "tierq.pid"
    srv = await _start(tmp_path, 1, f'[server]\npid_file = "{missing}"\n')
    try:
        async with AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as c:
            resp = await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
            assert resp.choices[0].finish_reason is not None
        out = subprocess.run([sys.executable, "-m", "tierq", "reload", "--config", str(srv.cfg)],
                             capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 1 and str(missing) in out.stderr, out
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.log.read_text()
    lines = [ln["msg"] for ln in srv.log_lines() if "pid file" in ln.get("msg", "")]
    assert len(lines) == 1 and str(missing) in lines[0] and f"kill -HUP {srv.proc.pid}" in lines[0], lines
