"""Hostile input: oversized and compressed bodies, slow clients, huge headers,
the /v1/forward SSRF corpus, auth abuse, and no secret in logs or the ledger.

Only loopback is ever connected to. "No upstream connection made" is proven by
the sim's request counter and by listeners counting every accept.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp.http_exceptions import BadHttpMessage
from conftest import PRIORITY_MODEL, GatewayFactory, Running, model_config

from tierq.config import Config, KeysConfig, LedgerConfig, UpstreamConfig
from tierq.keys import KeyStore
from tierq.logs import ServerLog

pytestmark = pytest.mark.reliability

CHAT = {"model": PRIORITY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


async def raw_call(gw: Running, path: str, data: bytes, headers: dict[str, str] | None = None,
                   ) -> tuple[int, bytes]:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as s, s.post(gw.root + path, data=data,
                                                    headers=hdrs) as r:
        return r.status, await r.read()


def assert_clean_error(status: int, raw: bytes, expected: int) -> None:
    assert status == expected
    assert b"Traceback" not in raw and b'File "' not in raw
    if raw.startswith(b"{"):
        err = orjson.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"}


def small_body_config(tmp_path: Path, **server: Any) -> Config:
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),))
    return replace(config, server=replace(config.server, max_body_bytes=64 * 1024, **server))


# ------------------------------------------------------------------ bodies and headers


async def test_chunked_body_over_the_limit_is_413(make_gateway: GatewayFactory,
                                                   tmp_path: Path) -> None:
    gw = await make_gateway(config=small_body_config(tmp_path))

    async def chunks() -> Any:
        for _ in range(200):
            yield b"x" * 1024

    async with aiohttp.ClientSession() as s, s.post(
            gw.url + "/chat/completions", data=chunks(),
            headers={"Content-Type": "application/json"}) as r:
        assert_clean_error(r.status, await r.read(), 413)
    assert await gw.rows() == [] and (await gw.sim_stats())["requests"] == 0


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bomb_is_413_with_bounded_memory(make_gateway: GatewayFactory,
                                                          tmp_path: Path, encoding: str) -> None:
    gw = await make_gateway(config=small_body_config(tmp_path))
    wbits = 31 if encoding == "gzip" else 15
    comp = zlib.compressobj(1, zlib.DEFLATED, wbits)
    zeros = b"0" * (1 << 20)
    bomb = b"".join(comp.compress(zeros) for _ in range(128)) + comp.flush()  # 128 MiB inflated
    assert len(bomb) < 1 << 20
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = _vm_hwm_kb()
    status, raw = await raw_call(gw, "/v1/chat/completions", bomb,
                                 {"Content-Encoding": encoding})
    assert_clean_error(status, raw, 413)
    assert _vm_hwm_kb() - before < 64 * 1024, "inflating the bomb took over 64 MiB"
    assert await gw.rows() == [] and (await gw.sim_stats())["requests"] == 0


async def test_compressed_body_within_the_limit_is_served(make_gateway: GatewayFactory,
                                                         tmp_path: Path) -> None:
    gw = await make_gateway(config=small_body_config(tmp_path))
    status, raw = await raw_call(gw, "/v1/chat/completions", zlib.compress(orjson.dumps(CHAT)),
                                 {"Content-Encoding": "deflate"})
    assert status == 200 and orjson.loads(raw)["usage"]


@pytest.mark.parametrize(("name", "head"), [
    ("one 64 KiB header", b"X-Big: " + b"a" * 65536 + b"\r\n"),
    ("a 64 KiB request line", None),
    ("1000 headers", b"".join(b"X-H%d: v\r\n" % i for i in range(1000))),
    ("a header with a NUL", b"X-Bad: a\x00b\r\n"),
    ("a bad Content-Length", b"Content-Length: -1\r\n"),
    ("two Content-Lengths", b"Content-Length: 2\r\nContent-Length: 3\r\n"),
    ("Transfer-Encoding and Content-Length", b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
])
async def test_malformed_or_oversized_headers_get_a_4xx_never_a_500(
    gateway: Running, name: str, head: bytes | None
) -> None:
    port = int(gateway.root.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line = (b"POST /v1/chat/completions?" + b"q" * 65536 if head is None
            else b"POST /v1/chat/completions")
    writer.write(line + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + (head or b"") + b"\r\n{}")
    await writer.drain()
    got = await asyncio.wait_for(reader.read(), timeout=5.0)
    writer.close()
    # aiohttp's parser answers these itself (plain text, HTTP/1.0 when it could not
    # parse the version): a 4xx, never a 500, never a traceback.
    assert got[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ") and got[9:10] == b"4", got[:200]
    assert b"Traceback" not in got
    assert (await gateway.sim_stats())["requests"] == 0


# The five malformed requests of issue 17, each a whole request on its own connection.
MALFORMED: Final = {
    "a header line over 8 KB": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000
                                + b"\r\n\r\n"),
    "Content-Length with Transfer-Encoding": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "a bad chunk size": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"zz\r\nhello\r\n0\r\n\r\n"),
    "200 headers": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                    + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"),
    "a NUL in the path": b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: x\r\n\r\n",
}


async def _send_raw(gw: Running, raw: bytes) -> bytes:
    port = int(gw.root.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    got = await asyncio.wait_for(reader.read(), timeout=5.0)
    writer.close()
    return got


async def test_each_malformed_request_is_one_warning_line_without_a_traceback(
    gateway: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name, raw in MALFORMED.items():
        got = await _send_raw(gateway, raw)
        assert got.startswith(b"HTTP/1.0 400 "), (name, got[:100])
    lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.levelno for r in lines] == [logging.WARNING] * len(MALFORMED), caplog.text
    for r in lines:
        text = r.getMessage()
        assert r.exc_info is None and "\n" not in text and "Traceback" not in caplog.text
        assert text.startswith("bad HTTP request from 127.0.0.1: 400 ")
        assert "aaaa" not in text and "\\x00" not in text  # none of the client's bytes
    assert "Too many headers" in lines[3].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_bad_request_lines_are_rate_limited_and_say_how_many_were_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "tierq-test-server")
    now = [100.0]
    log = ServerLog(logging.getLogger("tierq-test-server"), per_s=3, clock=lambda: now[0])
    bad = BadHttpMessage("Invalid character in chunk size:\n\n    b'zz'\n      ^")
    for _ in range(50):  # one client, one second, 50 bad requests
        log.exception("Error handling request from %s", "10.0.0.9", exc_info=bad)
    assert len(caplog.records) == 3 and log.dropped == 47
    now[0] += 1.0
    log.exception("Error handling request from %s", "10.0.0.9", exc_info=bad)
    assert caplog.records[-1].getMessage() == ("bad HTTP request from 10.0.0.9: 400 Invalid "
                                               "character in chunk size (47 more not logged)")
    assert log.dropped == 0
    # Anything but a malformed request keeps aiohttp's error line and its traceback.
    try:
        raise RuntimeError("a bug")
    except RuntimeError as e:
        log.exception("Unhandled exception", exc_info=e)
    assert caplog.records[-1].levelno == logging.ERROR and caplog.records[-1].exc_info


async def test_slowloris_connections_do_not_block_other_clients(make_gateway: GatewayFactory,
                                                                tmp_path: Path) -> None:
    gw = await make_gateway(config=small_body_config(tmp_path, keepalive_timeout_s=1.0,
                                                     body_timeout_s=1.0))
    port = int(gw.root.rsplit(":", 1)[1])
    conns = []
    for i in range(100):  # half trickle headers, half trickle a body
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 1000\r\n\r\n{")
        conns.append((r, w))
    status, _ = await raw_call(gw, "/v1/chat/completions", orjson.dumps(CHAT))
    assert status == 200
    # Each is answered (408) or closed once its timer fires, about 1 s later.
    closed = await asyncio.wait_for(asyncio.gather(*(r.read(64) for r, _ in conns)), timeout=10.0)
    assert all(c == b"" or c.startswith(b"HTTP/1.1 408") for c in closed)
    for _, w in conns:
        w.close()


WRONG_TYPES: list[Any] = [None, True, 0, -1, 1.5, "x", [], {}, [None], {"a": []}, "\u0000",
                          2**64, -(2**63), "9" * 5000]


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions", "embeddings"])
async def test_every_field_with_every_wrong_type_is_a_4xx_or_served_never_a_500(
    gateway: Running, endpoint: str
) -> None:
    base: dict[str, Any] = {"model": PRIORITY_MODEL, "max_tokens": 1}
    base.update({"chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
                 "completions": {"prompt": "hi"}, "embeddings": {"input": "hi"}}[endpoint])
    fields = [*base, "stream", "stream_options", "service_tier", "max_completion_tokens",
              "priority", "n", "user"]
    seen: set[int] = set()
    async with aiohttp.ClientSession() as s:
        for f in fields:
            for value in WRONG_TYPES:
                data = orjson.dumps({**base, f: value}, option=orjson.OPT_PASSTHROUGH_SUBCLASS) \
                    if not isinstance(value, int) or abs(value) < 2**63 else \
                    orjson.dumps({**base, f: 0})[:-2] + str(value).encode() + b"}"
                async with s.post(gateway.url + "/" + endpoint, data=data,
                                  headers={"Content-Type": "application/json"}) as r:
                    raw = await r.read()
                    seen.add(r.status)
                    assert r.status < 500 or r.status == 502, (f, value, r.status, raw[:200])
                    assert b"Traceback" not in raw
    assert 200 in seen and 400 in seen


# ------------------------------------------------------------------ SSRF


def ssrf_corpus(port: int) -> list[str]:
    p = port
    tail = "/v1/chat/completions"
    hosts = [
        # loopback and wildcard in every spelling (the configured upstream is 127.0.0.1:p)
        "localhost", "LOCALHOST", "localhost.", "0.0.0.0", "0", "[::]", "[::1]",
        "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "2130706433",
        "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "017700000001", "127.1", "127.0.1",
        "127.0.0.01", "127.0.0.1.", "127.000.000.001", "127.0.0.2", "[127.0.0.1]",
        "%31%32%37.0.0.1", "127%2e0%2e0%2e1",
        # a name that resolves to loopback, without any external lookup
        "sim.localhost", "127.0.0.1.nip.io",
        # link-local and metadata
        "169.254.169.254", "[fe80::1]", "[fe80::1%25lo]", "metadata.google.internal",
        "[fd00:ec2::254]", "2852039166",
        # private ranges
        "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.0.1", "[fc00::1]", "[fd12:3456::1]",
        "100.64.0.1",
    ]
    out = [f"http://{h}:{p}{tail}" for h in hosts]
    out += [f"http://{h}{tail}" for h in ("169.254.169.254", "10.0.0.1", "localhost")]
    out += [
        # userinfo and bracket tricks
        f"http://127.0.0.1:{p}@169.254.169.254{tail}",
        f"http://evil@127.0.0.1:{p}{tail}",
        f"http://127.0.0.1:{p}:@evil.example{tail}",
        f"http://127.0.0.1:{p}#@169.254.169.254{tail}",
        f"http://127.0.0.1:{p}\\@169.254.169.254{tail}",
        f"http://[127.0.0.1:{p}]{tail}",
        f"http://[::1]:{p}]{tail}",
        f"http://127.0.0.1:{p}%40169.254.169.254{tail}",
        f"http://127.0.0.1:{p}/v1/chat/completions/../../../latest/meta-data",
        f"http://127.0.0.1:{p}/v1/%2e%2e/admin/chat/completions",
        f"http://127.0.0.1:{p}/v1//chat/completions",
        f"http://127.0.0.1:{p}/v1/chat/completions\r\nHost: 169.254.169.254",
        f"http://127.0.0.1:{p}/v1/chat/completions%00",
        f" http://127.0.0.1:{p}{tail}",
        f"http://127.0.0.1:{p + 1 if p < 65535 else p - 1}{tail}",
        f"http://127.0.0.1:0{p}{tail}x",
        # non-http schemes and scheme tricks
        f"https://127.0.0.1:{p}{tail}", "file:///etc/passwd", f"gopher://127.0.0.1:{p}/_POST",
        f"ftp://127.0.0.1:{p}{tail}", f"dict://127.0.0.1:{p}/", f"ws://127.0.0.1:{p}{tail}",
        f"//127.0.0.1:{p}{tail}", f"http:/127.0.0.1:{p}{tail}", f"http:127.0.0.1:{p}{tail}",
        f"javascript://127.0.0.1:{p}{tail}", f"data:text/plain,{tail}",
    ]
    return out


async def test_ssrf_corpus_is_all_403_and_no_connection_is_made(gateway: Running) -> None:
    port = gateway.sim.port
    counters: list[asyncio.Server] = []
    accepted = 0

    def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        w.close()

    # Loopback listeners that any mis-forward to these ports would reach.
    for host in ("127.0.0.2", "::1"):
        try:
            counters.append(await asyncio.start_server(on_connect, host, port))
        except OSError:
            pass
    # The neighbouring port, for off-by-one port tricks. Either neighbour may
    # already be taken (often by the gateway itself, allocated right after the
    # sim): take whichever is free.
    for neighbour in (port + 1, port - 1):
        try:
            counters.append(await asyncio.start_server(on_connect, "127.0.0.1", neighbour))
            break
        except OSError:
            pass
    assert counters, "no counting listener could be bound"
    corpus = ssrf_corpus(port)
    try:
        async with aiohttp.ClientSession() as s:
            for target in corpus:
                async with s.post(gateway.root + "/v1/forward?u=" + quote(target, safe=""),
                                  data=orjson.dumps(CHAT),
                                  headers={"Content-Type": "application/json"}) as r:
                    raw = await r.read()
                    assert r.status == 403, (target, r.status, raw[:200])
                    assert orjson.loads(raw)["error"]["code"] == "forward_target_not_allowed"
        await asyncio.sleep(0.05)
        assert (await gateway.sim_stats())["requests"] == 0
        assert accepted == 0
        assert await gateway.rows() == []
    finally:
        for c in counters:
            c.close()
            await c.wait_closed()
    assert len(corpus) >= 65


async def test_forward_to_the_upstream_that_redirects_to_metadata_is_not_followed(
    gateway: Running,
) -> None:
    accepted = 0

    def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        w.close()

    trap = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    trap_port = trap.sockets[0].getsockname()[1]
    gateway.sim.state.redirect_to = f"http://127.0.0.1:{trap_port}/latest/meta-data/"
    try:
        target = gateway.sim.url + "/chat/completions"
        status, raw = await raw_call(gateway, "/v1/forward?u=" + quote(target, safe=""),
                                     orjson.dumps({**CHAT, "sim_fault": "redirect"}))
        assert_clean_error(status, raw, 502)
        await asyncio.sleep(0.05)
        assert accepted == 0
    finally:
        trap.close()
        await trap.wait_closed()


# ------------------------------------------------------------------ auth


async def test_auth_abuse_is_401_and_no_secret_reaches_logs_or_ledger(
    make_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys_db = tmp_path / "keys.db"
    ledger_db = tmp_path / "x.db"
    with KeyStore(str(keys_db)) as store:
        info, token = store.create("good")
        revoked_info, revoked = store.create("gone")
        store.revoke(revoked_info.public_id)
    config = Config(ledger=LedgerConfig(url=f"sqlite:///{ledger_db}"),
                    upstreams=(UpstreamConfig("sim", "", "sim"),),
                    models=(model_config(PRIORITY_MODEL),), keys=KeysConfig(str(keys_db)))
    gw = await make_gateway(config=config)
    public, secret = token.split("-", 2)[1:]
    wrong = f"tq-{public}-{'A' * len(secret)}"
    sqli = "tq-" + public + "-' OR '1'='1' --" + "x" * (len(secret) - 16)
    bad_headers: list[dict[str, str]] = [
        {}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
        {"Authorization": f"Basic {token}"}, {"Authorization": token},
        {"Authorization": f"Bearer {wrong}"}, {"Authorization": f"Bearer {revoked}"},
        {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f'Bearer "{token}"'}, {"Authorization": f"Bearer '{token}'"},
        {"Authorization": f"Bearer {sqli}"}, {"Authorization": "Bearer ' OR 1=1; DROP TABLE keys;--"},
        {"Authorization": f"Bearer tq-{public}-{secret[:-1]}\u00e9"},
        {"Authorization": "Bearer " + "tq-" * 2000},
        {"Authorization": f"Bearer {token}", "X-Forwarded-For": "127.0.0.1"} | {"Authorization": "Bearer nope"},
    ]
    paths = ["/v1/chat/completions", "/v1/openai/chat/completions", "/v1/models"]
    async with aiohttp.ClientSession() as s:
        for h in bad_headers:
            for path in paths:
                method = s.get if path.endswith("models") else s.post
                async with method(gw.root + path, data=orjson.dumps(CHAT),
                                  headers={"Content-Type": "application/json", **h}) as r:
                    raw = await r.read()
                    assert r.status == 401, (h, path, r.status)
                    assert orjson.loads(raw)["error"]["code"] == "invalid_api_key"
        # Host-header and path tricks reach no handler without a key.
        for path, host in [("/v1/chat/completions", "127.0.0.1"), ("/v1/chat/completions", "evil"),
                           ("//v1/chat/completions", "x"), ("/v1/./chat/completions", "x"),
                           ("/healthz/../v1/chat/completions", "x"),
                           ("/v1/chat/completions/", "x"), ("/V1/chat/completions", "x"),
                           ("/v1/chat%2Fcompletions", "x"), ("/metrics/../v1/models", "x")]:
            async with s.post(gw.root + path, data=orjson.dumps(CHAT),
                              headers={"Content-Type": "application/json", "Host": host}) as r:
                assert r.status in (401, 404, 405), (path, r.status)
        # The good key works, with an upstream credential of the client's own.
        async with s.post(gw.url + "/chat/completions", data=orjson.dumps(CHAT), headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {token}",
                "x-upstream-authorization": "Bearer sk-upstream-SECRET-123"}) as r:
            assert r.status == 200
    assert (await gw.sim_stats())["requests"] == 1
    rows = await gw.rows()
    assert [r.key_id for r in rows] == [info.public_id]
    await gw.ledger.flush()
    secrets_ = [secret, token, wrong.split("-", 2)[2], revoked.split("-", 2)[2],
                "sk-upstream-SECRET-123", "OR '1'='1"]
    blobs = [caplog.text.encode()]
    blobs += [p.read_bytes() for p in tmp_path.glob("ledger*.db*")]
    blobs += [p.read_bytes() for p in tmp_path.glob("keys.db*")]
    for blob in blobs:
        for sec in secrets_:
            assert sec.encode() not in blob
    # The keys table holds the secret's hash only; the key table survived the SQL.
    with KeyStore(str(keys_db)) as store:
        assert store.authenticate(token) is not None


def test_x_forwarded_for_cannot_make_a_remote_client_loopback() -> None:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from tierq.errors import ApiError
    from tierq.gateway import Gateway
    from tierq.intake import authenticate

    config = Config(upstreams=(UpstreamConfig("sim", "", "sim"),))
    gw = Gateway.from_config(config)
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda k, d=None: ("203.0.113.9", 4444) \
        if k == "peername" else d
    for h in ({"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"},
              {"X-Real-IP": "127.0.0.1"}, {"Host": "127.0.0.1"}):
        req = make_mocked_request("POST", "/v1/chat/completions", headers=h, transport=transport)
        with pytest.raises(ApiError) as e:
            authenticate(gw, req)
        assert e.value.status == 403
