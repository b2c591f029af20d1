"""Structured logs: request ids echoed or generated, JSON lines, no credentials."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from conftest import PRIORITY_MODEL, GatewayFactory, Running
from tierq.config import Config, KeysConfig, LedgerConfig, UpstreamConfig
from tierq.keys import KeyStore, parse_token
from tierq.logs import JsonFormatter, redact

CHAT = {"model": PRIORITY_MODEL, "service_tier": "priority", "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}]}


async def post(gw: Running, headers: dict[str, str], path: str = "/chat/completions"
               ) -> tuple[int, CIMultiDict[str]]:
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + path, data=orjson.dumps(CHAT),
            headers={"Content-Type": "application/json", **headers}) as r:
        await r.read()
        return r.status, r.headers.copy()


async def test_client_request_id_is_echoed_and_the_ledger_id_is_in_its_own_header(
    gateway: Running,
) -> None:
    status, h = await post(gateway, {"x-request-id": "trace-42:abc"})
    assert status == 200 and h["x-request-id"] == "trace-42:abc"
    row = await gateway.row(h["x-tierq-request-id"])
    assert row is not None and row.applied_tier == "priority"


async def test_request_id_is_generated_when_absent_or_unsafe(gateway: Running) -> None:
    status, h = await post(gateway, {})
    assert status == 200 and h["x-request-id"].startswith("req_")
    assert h["x-request-id"] == h["x-tierq-request-id"]
    _, h = await post(gateway, {"x-request-id": "x" * 200})
    assert h["x-request-id"].startswith("req_")
    _, h = await post(gateway, {"x-request-id": 'a"b'})
    assert h["x-request-id"].startswith("req_")
    # Errors before any ledger row carry one too.
    async with aiohttp.ClientSession() as s, s.get(gateway.root + "/nope",
                                                   headers={"x-request-id": "lost-1"}) as r:
        assert r.status == 404 and r.headers["x-request-id"] == "lost-1"


async def test_access_log_is_one_json_line_per_request_without_credentials(
    make_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with KeyStore(str(tmp_path / "keys.db")) as store:
        _, token = store.create("ops")
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    keys=KeysConfig(str(tmp_path / "keys.db")))
    gw = await make_gateway(config=config)
    byo = "Bearer sk-upstreamsecret0123456789"
    with caplog.at_level(logging.INFO, logger="tierq"):
        ok, h = await post(gw, {"Authorization": f"Bearer {token}", "x-upstream-authorization": byo,
                                "x-request-id": "trace-7"})
        bad, _ = await post(gw, {"Authorization": "Bearer tq-aaaaaaaaaaaa-" + "s" * 32})
    assert ok == 200 and bad == 401
    # The lines are made and written by the writer thread, not on the event loop.
    for _ in range(500):
        if len([r for r in caplog.records if r.name == "tierq.access"]) >= 2:
            break
        await asyncio.sleep(0.01)
    assert {r.threadName for r in caplog.records if r.name == "tierq.access"} == {"tierq-access-log"}
    fmt = JsonFormatter()
    lines = [fmt.format(r) for r in caplog.records]
    # Fixed positions, not split("-"): the urlsafe secret may contain "-" itself.
    public_id, secret = parse_token(token) or ("", "")
    assert len(secret) == 32
    for line in lines:
        assert secret not in line and "sk-upstreamsecret" not in line and "s" * 32 not in line
    access = [orjson.loads(line) for line in lines if '"logger":"tierq.access"' in line]
    served = next(a for a in access if a.get("client_request_id") == "trace-7")
    assert served["request_id"] == h["x-tierq-request-id"] and served["status"] == 200
    assert served["model"] == PRIORITY_MODEL and served["tier"] == "priority"
    assert served["outcome"] == "served" and served["key_id"] == public_id
    assert served["path"] == "/v1/chat/completions" and served["level"] == "info"
    assert served["ts"].endswith("Z") and float(served["cost"]) > 0
    assert any(a["status"] == 401 and "model" not in a for a in access)


def test_redact_masks_credential_shapes() -> None:
    text = ("key tq-abcdefghijkl-" + "Z" * 32 + " auth Bearer abc.def-ghi sk-live1234567890 "
            "url postgresql://user:hunter2@db/x?api_key=zzz&x=1")
    out = redact(text)
    assert "Z" * 32 not in out and "tq-abcdefghijkl-***" in out
    assert "abc.def-ghi" not in out and "sk-live1234567890" not in out
    assert "hunter2" not in out and "zzz" not in out and "x=1" in out
