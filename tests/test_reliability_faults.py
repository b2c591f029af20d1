"""Faults: every way an upstream or a client breaks a request, streaming and not.

For each case: the client gets an OpenAI-style error or a clean end, the slot is
freed, the ledger has exactly one row with the right status, a failure costs
nothing, and a stream the client cut short is billed for what was delivered and
marked partial. Upstream faults come from the sim (`sim_fault` body field).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running, model_config

from tierq.config import Config, LedgerConfig, ServerConfig, UpstreamConfig
from tierq.ledger import LedgerRow

pytestmark = pytest.mark.reliability

READ_TIMEOUT_S = 0.6


def body(stream: bool, fault: str | None = None, max_tokens: int = 8, **kw: Any) -> bytes:
    b: dict[str, Any] = {"model": PRIORITY_MODEL, "max_tokens": max_tokens, "stream": stream,
                         "messages": [{"role": "user", "content": "four words of prompt"}], **kw}
    if fault is not None:
        b["sim_fault"] = fault
    return orjson.dumps(b)


@dataclass
class Reply:
    status: int
    request_id: str
    raw: bytes
    events: list[Any]  # parsed SSE data payloads ("[DONE]" kept as the string)

    @property
    def error(self) -> dict[str, Any] | None:
        if self.events:
            last = self.events[-1]
            return last.get("error") if isinstance(last, dict) else None
        try:
            data = orjson.loads(self.raw)
        except orjson.JSONDecodeError:
            return None
        return data.get("error") if isinstance(data, dict) else None


async def send(gw: Running, payload: bytes, timeout: float = 10.0) -> Reply:
    async with aiohttp.ClientSession() as s, s.post(
        gw.url + "/chat/completions", data=payload, headers={"Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        raw = await r.read()
        events: list[Any] = []
        if r.headers.get("Content-Type", "").startswith("text/event-stream"):
            for block in raw.split(b"\n\n"):
                if block.startswith(b"data: "):
                    data = block[6:]
                    events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
        return Reply(r.status, r.headers.get("x-request-id", ""), raw, events)


def assert_openai_error(err: dict[str, Any] | None, code: str) -> None:
    assert err is not None, "no OpenAI-style error in the reply"
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code
    assert "Traceback" not in err["message"]


async def settled(gw: Running, timeout: float = 5.0) -> list[LedgerRow]:
    """Wait until no slot is held and nothing waits; the ledger's rows then."""
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    deadline = time.monotonic() + timeout
    while True:
        st = adm.stats()
        depth = st["depth"]
        assert isinstance(depth, dict)
        if st["in_flight"] == 0 and sum(depth.values()) == 0:
            break
        assert time.monotonic() < deadline, f"slot not freed: {st}"
        await asyncio.sleep(0.01)
    return await gw.rows()


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def fault_config(tmp_path: Path, read_timeout_s: float = READ_TIMEOUT_S, **server: Any) -> Config:
    return Config(
        server=replace(ServerConfig(), **server),
        ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
        upstreams=(UpstreamConfig("sim", "", "sim", priority_scheduling=True,
                                  read_timeout_s=read_timeout_s, connect_timeout_s=1.0),),
        models=(model_config(PRIORITY_MODEL, max_concurrency=2),),
    )


@pytest.fixture
async def faulty(make_gateway: GatewayFactory, tmp_path: Path) -> Running:
    gw = await make_gateway(config=fault_config(tmp_path), sim={"tokens_per_s": 200.0})
    gw.sim.state.fault_delay_s = 2.0  # slow-first-byte: well past the read timeout
    return gw


# (fault, stream) -> (HTTP status, error code or None for success, ledger status)
UPSTREAM_CASES: dict[tuple[str, bool], tuple[int, str | None, str]] = {
    ("slow-first-byte", False): (504, "upstream_timeout", "failed"),
    ("slow-first-byte", True): (504, "upstream_timeout", "failed"),
    ("stall", False): (504, "upstream_timeout", "failed"),
    ("stall", True): (200, "upstream_stream_error", "failed"),
    ("reset", False): (502, "upstream_unavailable", "failed"),
    ("reset", True): (200, "upstream_stream_error", "failed"),
    ("500", False): (502, "upstream_error", "failed"),
    ("500", True): (502, "upstream_error", "failed"),
    ("bad-json", False): (502, "upstream_bad_response", "failed"),
    ("bad-json", True): (200, "upstream_stream_error", "failed"),
    ("bad-sse", False): (502, "upstream_bad_response", "failed"),
    ("bad-sse", True): (200, "upstream_stream_error", "failed"),
    ("redirect", False): (502, "upstream_error", "failed"),
    ("redirect", True): (502, "upstream_error", "failed"),
    ("long-line", True): (200, None, "served"),
    ("ignore-cancel", False): (200, None, "served"),
    ("ignore-cancel", True): (200, None, "served"),
}


@pytest.mark.parametrize(("fault", "stream"), list(UPSTREAM_CASES),
                         ids=[f"{f}-{'stream' if s else 'json'}" for f, s in UPSTREAM_CASES])
async def test_upstream_fault_gives_clear_error_one_row_no_charge_and_frees_slot(
    faulty: Running, fault: str, stream: bool
) -> None:
    status, code, row_status = UPSTREAM_CASES[fault, stream]
    reply = await send(faulty, body(stream, fault))
    assert reply.status == status
    rows = await settled(faulty)
    assert len(rows) == 1 and rows[0].request_id == reply.request_id
    row = rows[0]
    assert row.status == row_status
    if code is None:
        assert reply.error is None
        if stream:
            assert reply.events[-1] == "[DONE]"
        assert row.cost > 0 and not row.partial
    else:
        assert_openai_error(reply.error, code)
        assert row.cost == 0
        if stream and status == 200:
            assert "[DONE]" not in reply.events  # the client can tell it is broken
    assert faulty.sim.state.faults.get(fault) == 1


async def test_upstream_connection_refused_is_502_failed_no_charge(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = fault_config(tmp_path)
    config = replace(config, upstreams=(UpstreamConfig("dead", f"http://127.0.0.1:{port}/v1",
                                                       "vllm", connect_timeout_s=1.0),),
                     models=(replace(config.models[0], upstream="dead"),))
    gw = await make_gateway(config=config)
    for stream in (False, True):
        reply = await send(gw, body(stream))
        assert reply.status == 502
        assert_openai_error(reply.error, "upstream_unavailable")
    rows = await settled(gw)
    assert [(r.status, r.cost) for r in rows] == [("failed", 0), ("failed", 0)]


async def test_redirect_is_not_followed_and_its_target_gets_no_connection(faulty: Running) -> None:
    accepted = 0

    def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        w.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    faulty.sim.state.redirect_to = f"http://127.0.0.1:{port}/latest/meta-data/"
    try:
        for stream in (False, True):
            reply = await send(faulty, body(stream, "redirect"))
            assert reply.status == 502
        # Order of events, not a sleep: a connection of our own, made after both
        # answers, is accepted after any the gateway had made; once it is in,
        # it is the only one.
        _, probe = await asyncio.open_connection("127.0.0.1", port)
        await wait_for(lambda: accepted >= 1)
        probe.close()
        assert accepted == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_first_byte_under_the_read_timeout_is_served(faulty: Running) -> None:
    faulty.sim.state.fault_delay_s = READ_TIMEOUT_S / 3
    for stream in (False, True):
        reply = await send(faulty, body(stream, "slow-first-byte"))
        assert reply.status == 200 and reply.error is None
    rows = await settled(faulty)
    assert [r.status for r in rows] == ["served", "served"]


# ------------------------------------------------------------------ client faults


async def _hang_up_after(gw: Running, payload: bytes, when: Any) -> str:
    """Send `payload`, wait until `when()` holds, then drop the connection."""
    session = aiohttp.ClientSession()
    try:
        task = asyncio.create_task(session.post(gw.url + "/chat/completions", data=payload,
                                                headers={"Content-Type": "application/json"}))
        await wait_for(when)
        task.cancel()
        try:
            resp = await task
            rid = resp.headers.get("x-request-id", "")
            resp.close()
            return rid
        except asyncio.CancelledError:
            return ""
    finally:
        await session.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_client_disconnect_while_queued_leaves_queue_with_one_cancelled_row(
    make_gateway: GatewayFactory, tmp_path: Path, stream: bool
) -> None:
    config = fault_config(tmp_path)
    config = replace(config, models=(model_config(PRIORITY_MODEL, max_concurrency=1),))
    gw = await make_gateway(config=config, sim={"ttft_ms": 300.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    first = asyncio.create_task(send(gw, body(False)))
    await wait_for(lambda: adm.stats()["in_flight"] == 1)
    depth = lambda: sum(adm.stats()["depth"].values())  # type: ignore[union-attr]  # noqa: E731
    await _hang_up_after(gw, body(stream), lambda: depth() == 1)
    await wait_for(lambda: depth() == 0, timeout=2.0)
    assert (await first).status == 200
    rows = await settled(gw)
    assert sorted((r.status, r.code) for r in rows) == [
        ("cancelled", "client_disconnected"), ("served", None)]
    assert [r.cost for r in rows if r.status == "cancelled"] == [0]
    assert gw.sim.state.requests == 1  # the one that left never reached the upstream


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_client_disconnect_while_waiting_first_byte_cancels_upstream_and_costs_nothing(
    make_gateway: GatewayFactory, tmp_path: Path, stream: bool
) -> None:
    gw = await make_gateway(config=fault_config(tmp_path), sim={"ttft_ms": 3000.0})
    await _hang_up_after(gw, body(stream), lambda: gw.sim.state.generating == 1)
    rows = await settled(gw)
    await wait_for(lambda: gw.sim.state.in_flight == 0, timeout=2.0)
    assert gw.sim.state.cancelled == 1  # the upstream request was cancelled too
    assert [(r.status, r.cost, r.partial) for r in rows] == [("cancelled", 0, False)]


async def test_client_disconnect_mid_stream_with_upstream_ignoring_cancel_frees_gateway_slot(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await make_gateway(config=fault_config(tmp_path), sim={"tokens_per_s": 20.0})
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.url + "/chat/completions",
                            data=body(True, "ignore-cancel", max_tokens=40),
                            headers={"Content-Type": "application/json"})
        got = 0
        async for line in resp.content:
            if line.startswith(b"data: {"):
                got += 1
                if got == 4:
                    break
        resp.close()
    rows = await settled(gw)  # the gateway's slot is free at once...
    assert gw.sim.state.zombies == 1  # ...while the upstream still generates
    assert len(rows) == 1
    row = rows[0]
    assert row.status == "cancelled" and row.partial and row.cost > 0
    assert 3 <= row.completion_tokens <= 10


async def test_client_that_stops_reading_stalls_the_upstream_and_hanging_up_bills_delivered(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Backpressure: the gateway reads the upstream only as fast as the client reads."""
    import socket

    gw = await make_gateway(config=fault_config(tmp_path), sim={"tokens_per_s": 0.0})
    n = 60_000  # ~15 MB of SSE: more than loopback socket buffers hold
    sock = socket.socket()
    # Set before connecting: shrinking the window of a live connection stalls TCP
    # in zero-window probes, a test artefact rather than backpressure.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(gw.root.rsplit(":", 1)[1])))
    reader, writer = await asyncio.open_connection(sock=sock)
    payload = body(True, max_tokens=n)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
                 + payload)
    await writer.drain()
    await wait_for(lambda: gw.sim.state.tokens_sent > 0)
    # Reading nothing: once the buffers on the way are full the upstream stops,
    # well short of the whole answer. Polled until it is still for 0.3 s (a fixed
    # sleep flaked on a loaded machine, where filling the buffers took longer).
    sent, deadline = -1, time.monotonic() + 20.0
    while gw.sim.state.tokens_sent != sent:
        assert time.monotonic() < deadline, "the upstream never stalled"
        sent = gw.sim.state.tokens_sent
        await asyncio.sleep(0.3)
    assert sent < n, "the upstream ran ahead of a client that reads nothing"
    writer.transport.abort()
    rows = await settled(gw)
    assert len(rows) == 1
    row = rows[0]
    assert row.status == "cancelled" and row.partial and row.code == "client_disconnected"
    assert 0 < row.completion_tokens <= sent  # billed what was delivered at most


async def _request_and_never_read(gw: Running, payload: bytes,
                                  path: bytes = b"/v1/chat/completions") -> asyncio.StreamWriter:
    """A raw client with a 4 KiB receive window that sends a request and reads nothing."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: see above
    sock.connect(("127.0.0.1", int(gw.root.rsplit(":", 1)[1])))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
                 + payload)
    await writer.drain()
    return writer


WRITE_TIMEOUT_S = 0.5


# JSON: a chat answer is capped by the sim's max tokens (~1 MB, which loopback
# buffers absorb), so the JSON case asks for embeddings: 150 x 4096 floats,
# ~12 MB in one body, more than the socket buffers on the way hold.
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_client_that_stops_reading_is_cut_off_after_the_write_timeout_and_frees_its_slot(
    make_gateway: GatewayFactory, tmp_path: Path, stream: bool
) -> None:
    """A client that keeps its connection open but reads nothing no longer holds
    its slot until it hangs up: past `write_timeout_s` the gateway gives up."""
    # The in-process sim builds the ~12 MB embeddings answer on this test's
    # loop before its first byte: longer than the faults' 0.6 s read timeout
    # under load, which the core client's timer (on its own thread) then keeps
    # while aiohttp's (on the blocked loop) cannot fire. This test is about
    # the client's side, so its upstream gets a read timeout that does not race.
    gw = await make_gateway(config=fault_config(tmp_path, read_timeout_s=30.0,
                                                write_timeout_s=WRITE_TIMEOUT_S),
                            sim={"tokens_per_s": 0.0})
    n = 60_000  # ~15 MB of SSE: more than loopback socket buffers hold
    t0 = time.monotonic()
    if stream:
        writer = await _request_and_never_read(gw, body(True, max_tokens=n))
    else:
        embeddings = orjson.dumps({"model": PRIORITY_MODEL, "input": ["x"] * 150,
                                   "dimensions": 4096})
        writer = await _request_and_never_read(gw, embeddings, b"/v1/embeddings")
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    await wait_for(lambda: adm.stats()["in_flight"] == 1)
    try:
        rows = await settled(gw, timeout=10.0)  # the slot is freed while the client stays
        freed_s = time.monotonic() - t0
        assert not writer.transport.is_closing()
    finally:
        writer.transport.abort()
    # Not before the client had write_timeout_s to read (and, by `settled`, within 10 s).
    assert freed_s >= WRITE_TIMEOUT_S
    assert len(rows) == 1
    row = rows[0]
    assert row.status == "cancelled" and row.code == "client_write_timeout"
    if stream:
        assert row.partial and 0 < row.completion_tokens < n and row.cost > 0
        assert gw.sim.state.tokens_sent < n  # the upstream generation was cancelled
    else:
        # A JSON body cut short is no use to the client: nothing is billed.
        assert not row.partial and row.cost == 0
    # The gateway still serves.
    reply = await send(gw, body(stream))
    assert reply.status == 200


async def test_slow_reader_gets_the_whole_stream_billed_in_full(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await make_gateway(config=fault_config(tmp_path), sim={"tokens_per_s": 0.0})
    n = 3000
    raw = b""
    async with aiohttp.ClientSession(read_bufsize=1024) as s, s.post(
        gw.url + "/chat/completions", data=body(True, max_tokens=n),
        headers={"Content-Type": "application/json"},
    ) as r:
        while chunk := await r.content.read(2048):
            raw += chunk
            await asyncio.sleep(0.001)
    assert raw.rstrip().endswith(b"data: [DONE]")
    rows = await settled(gw)
    assert [(r.status, r.completion_tokens, r.partial) for r in rows] == [("served", n, False)]
