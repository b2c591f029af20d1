"""Bad input, auth, the forward proxy and upstream failures: OpenAI-shaped errors, never a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running, model_config

from tierq.config import Config, KeysConfig, LedgerConfig, UpstreamConfig
from tierq.keys import KeyStore
from tierq.upstream import match_forward_target

CHAT = {"model": PRIORITY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


async def call(
    gw: Running, path: str, data: bytes | None = None, *, method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as s, s.request(method, gw.root + path, data=data,
                                                       headers=hdrs) as r:
        raw = await r.read()
        return r.status, r.headers, orjson.loads(raw) if raw else None


def assert_openai_error(body: Any, code: str | None = None, param: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize(
    ("path", "data", "status", "code", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json", None),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "model": "nope/nope"}), 404,
         "model_not_found", "model"),
        ("/v1/chat/completions", orjson.dumps({k: v for k, v in CHAT.items() if k != "model"}),
         404, "model_not_found", "model"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "model": 7}), 400, "invalid_type", "model"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "messages": "hi"}), 400, "invalid_type",
         "messages"),
        ("/v1/chat/completions", orjson.dumps({"model": PRIORITY_MODEL}), 400,
         "missing_required_parameter", "messages"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "stream": "yes"}), 400, "invalid_type",
         "stream"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "max_tokens": -1}), 400, "invalid_type",
         "max_tokens"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "service_tier": 1}), 400, "invalid_value",
         "service_tier"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "service_tier": {"a": 1}}), 400,
         "invalid_value", "service_tier"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "n": 1000}), 400,
         "integer_above_max_value", "n"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "n": 129}), 400,
         "integer_above_max_value", "n"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "n": 0}), 400,
         "integer_below_min_value", "n"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "n": "2"}), 400, "invalid_type", "n"),
        ("/v1/chat/completions", orjson.dumps({**CHAT, "n": True}), 400, "invalid_type", "n"),
        ("/v1/completions", orjson.dumps({"model": PRIORITY_MODEL, "prompt": "hi", "n": 1000}),
         400, "integer_above_max_value", "n"),
        ("/v1/completions", orjson.dumps({"model": PRIORITY_MODEL}), 400,
         "missing_required_parameter", "prompt"),
        ("/v1/embeddings", orjson.dumps({"model": PRIORITY_MODEL}), 400,
         "missing_required_parameter", "input"),
        ("/v1/nope", b"{}", 404, "unknown_url", None),
        ("/v1/forward?u=" + quote("https://evil.example/v1/chat/completions", safe=""),
         orjson.dumps(CHAT), 403, "forward_target_not_allowed", "u"),
        ("/v1/forward", orjson.dumps(CHAT), 400, "missing_required_parameter", "u"),
    ],
)
async def test_bad_input_gets_openai_error_and_no_ledger_row(
    gateway: Running, path: str, data: bytes, status: int, code: str, param: str | None
) -> None:
    got, _, body = await call(gateway, path, data)
    assert got == status
    assert_openai_error(body, code, param)
    assert await gateway.rows() == []
    assert (await gateway.sim_stats())["requests"] == 0


async def test_n_is_bounded_by_server_max_n(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    from dataclasses import replace

    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),))
    gw = await make_gateway(config=replace(config, server=replace(config.server, max_n=2)))
    status, _, body = await call(gw, "/v1/chat/completions", orjson.dumps({**CHAT, "n": 3}))
    assert status == 400
    assert_openai_error(body, "integer_above_max_value", "n")
    assert "<= 2" in body["error"]["message"]
    assert await gw.rows() == []  # never billed
    status, _, body = await call(gw, "/v1/chat/completions", orjson.dumps({**CHAT, "n": 2}))
    assert status == 200
    assert [r.status for r in await gw.rows()] == ["served"]


async def test_wrong_content_type_is_415(gateway: Running) -> None:
    status, _, body = await call(gateway, "/v1/chat/completions", orjson.dumps(CHAT),
                                 headers={"Content-Type": "text/plain"})
    assert status == 415
    assert_openai_error(body, "unsupported_media_type")


async def test_wrong_method_is_405_openai_shaped(gateway: Running) -> None:
    status, _, body = await call(gateway, "/v1/chat/completions", method="GET")
    assert status == 405
    assert_openai_error(body, "method_not_allowed")


async def test_body_over_limit_is_413_and_never_reaches_upstream(make_gateway: GatewayFactory,
                                                                 tmp_path: Path) -> None:
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),))
    from dataclasses import replace

    config = replace(config, server=replace(config.server, max_body_bytes=2048))
    gw = await make_gateway(config=config)
    big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]})
    status, _, body = await call(gw, "/v1/chat/completions", big)
    assert status == 413
    assert_openai_error(body, "request_too_large")
    assert await gw.rows() == []


async def test_health_and_readiness(gateway: Running) -> None:
    assert (await call(gateway, "/healthz", method="GET"))[0] == 200
    status, _, body = await call(gateway, "/readyz", method="GET")
    assert status == 200 and body == {"status": "ready"}


async def test_metrics_expose_admission_counters(gateway: Running) -> None:
    await call(gateway, "/v1/chat/completions", orjson.dumps(CHAT))
    async with aiohttp.ClientSession() as s, s.get(gateway.root + "/metrics") as r:
        text = await r.text()
    assert f'tierq_admitted_total{{model="{PRIORITY_MODEL}",tier="default"}} 1' in text


async def test_forward_to_configured_upstream_is_admitted_echoed_and_metered(gateway: Running) -> None:
    target = gateway.sim.url + "/chat/completions"
    status, headers, body = await call(
        gateway, "/v1/forward?u=" + quote(target, safe=""),
        orjson.dumps({**CHAT, "service_tier": "priority"}))
    assert status == 200
    assert body["service_tier"] == "priority" and headers["x-tierq-service-tier"] == "priority"
    row = await gateway.row(headers["x-request-id"])
    assert row is not None and row.status == "served" and row.applied_tier == "priority"


@pytest.mark.parametrize("suffix", [
    "/chat/completions/../../admin", "/../v1/chat/completions", "/chat%2Fcompletions",
    "/chat/completions?x=1", "/models", "/chat/completionsX", "/chat/completions#frag",
    "X/chat/completions"])
async def test_forward_denies_anything_outside_the_base_url_before_connecting(
    gateway: Running, suffix: str
) -> None:
    status, _, body = await call(gateway, "/v1/forward?u=" + quote(gateway.sim.url + suffix, safe=""),
                                 orjson.dumps(CHAT))
    assert status == 403
    assert_openai_error(body, "forward_target_not_allowed")
    assert (await gateway.sim_stats())["requests"] == 0


@pytest.mark.parametrize(("target", "allowed"), [
    ("https://api.deepinfra.com/v1/openai/chat/completions", True),
    ("https://api.deepinfra.com:443/v1/openai/embeddings", True),
    ("https://API.deepinfra.com/v1/openai/completions", True),
    ("http://api.deepinfra.com/v1/openai/chat/completions", False),  # scheme
    ("https://api.deepinfra.com:8443/v1/openai/chat/completions", False),  # port
    ("https://api.deepinfra.com.evil.io/v1/openai/chat/completions", False),  # host
    ("https://user@api.deepinfra.com/v1/openai/chat/completions", False),  # userinfo
    ("https://api.deepinfra.com/v1/openaiX/chat/completions", False),  # segment boundary
    ("https://api.deepinfra.com/v1/openai/./chat/completions", False),
    ("https://api.deepinfra.com/v1/openai/chat\\completions", False),
    ("https://10.0.0.1/v1/openai/chat/completions", False),
    ("/v1/openai/chat/completions", False),
    ("", False),
])
def test_forward_target_rules(target: str, allowed: bool) -> None:
    bases = {"deepinfra": "https://api.deepinfra.com/v1/openai"}
    assert (match_forward_target(target, bases) is not None) is allowed


async def test_upstream_down_is_502_failed_row_cost_zero(make_gateway: GatewayFactory,
                                                         tmp_path: Path) -> None:
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("dead", "http://127.0.0.1:9/v1", "vllm",
                                              connect_timeout_s=2.0),),
                    models=(model_config(PRIORITY_MODEL),))
    from dataclasses import replace

    config = replace(config, models=(replace(config.models[0], upstream="dead"),))
    gw = await make_gateway(config=config)
    status, headers, body = await call(gw, "/v1/chat/completions", orjson.dumps(CHAT))
    assert status == 502
    assert_openai_error(body, "upstream_unavailable")
    row = await gw.row(headers["x-request-id"])
    assert row is not None and row.status == "failed" and row.cost == 0


async def test_api_keys_are_required_when_configured_and_key_id_is_billed(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    keys_db = tmp_path / "keys.db"
    with KeyStore(str(keys_db)) as store:
        info, token = store.create("ci", rpm=2)
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),), keys=KeysConfig(str(keys_db)))
    gw = await make_gateway(config=config)
    status, _, body = await call(gw, "/v1/chat/completions", orjson.dumps(CHAT))
    assert status == 401
    assert_openai_error(body, "invalid_api_key")
    status, _, _ = await call(gw, "/v1/chat/completions", orjson.dumps(CHAT),
                              headers={"Authorization": "Bearer tq-nope-nope"})
    assert status == 401
    auth = {"Authorization": f"Bearer {token}"}
    status, headers, _ = await call(gw, "/v1/chat/completions", orjson.dumps(CHAT), headers=auth)
    assert status == 200
    row = await gw.row(headers["x-request-id"])
    assert row is not None and row.key_id == info.public_id
    # rpm=2: the third request within the minute is shed by the per-key limit.
    assert (await call(gw, "/v1/chat/completions", orjson.dumps(CHAT), headers=auth))[0] == 200
    status, headers, body = await call(gw, "/v1/chat/completions", orjson.dumps(CHAT), headers=auth)
    assert status == 429
    assert_openai_error(body, "rate_limit_exceeded")
    assert 1 <= int(headers["Retry-After"]) <= 60
    # The tierq key is never forwarded upstream.
    assert all(r["authorization_sha256"] is None for r in (await gw.sim_stats())["last_requests"])


async def test_a_bad_key_retried_is_refused_from_memory_not_sqlite(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    import openai

    keys_db = tmp_path / "keys.db"
    with KeyStore(str(keys_db)) as store:
        info, token = store.create("ci")
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),), keys=KeysConfig(str(keys_db)))
    gw = await make_gateway(config=config)
    keys = gw.gw.keys
    assert isinstance(keys, KeyStore)
    bad = openai.AsyncOpenAI(base_url=gw.url, api_key=token[:-1] + ("x" if token[-1] != "x" else "y"),
                             max_retries=0)
    for _ in range(20):
        with pytest.raises(openai.AuthenticationError) as e:
            await bad.chat.completions.create(model=PRIORITY_MODEL, messages=[{"role": "user", "content": "hi"}])
        assert e.value.code == "invalid_api_key"
    assert keys.lookups == 1
    good = openai.AsyncOpenAI(base_url=gw.url, api_key=token, max_retries=0)
    for _ in range(3):
        r = await good.chat.completions.create(model=PRIORITY_MODEL, max_tokens=2,
                                               messages=[{"role": "user", "content": "hi"}])
        assert r.choices
    assert keys.lookups == 2  # the good key once, then from its own cache
    await bad.close()
    await good.close()


async def _slow_gateway(make_gateway: GatewayFactory, tmp_path: Path) -> Running:
    from dataclasses import replace

    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),))
    config = replace(config, server=replace(config.server, body_timeout_s=0.5,
                                            keepalive_timeout_s=0.5))
    return await make_gateway(config=config)


async def test_headers_trickled_too_slowly_get_the_connection_closed(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    import asyncio
    import time

    gw = await _slow_gateway(make_gateway, tmp_path)
    port = int(gw.root.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
    await writer.drain()
    t0 = time.monotonic()
    # Closed by the gateway (within the 5 s wait), and not before its 0.5 s limit
    # came near: a lower bound only, as a loaded host can only make it later.
    assert await asyncio.wait_for(reader.read(), timeout=5.0) == b""
    assert time.monotonic() - t0 > 0.2
    writer.close()


async def test_body_trickled_too_slowly_is_408(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    import asyncio

    gw = await _slow_gateway(make_gateway, tmp_path)
    port = int(gw.root.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), timeout=5.0)
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in head
    writer.close()
    assert await gw.rows() == []
