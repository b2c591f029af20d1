"""The admin API (/admin/v1) through real sockets: the whole key CRUD, the key it
makes used with the official openai client (streaming too), its limits changed
and the key revoked; the usage report equal to `tierq usage --json`; hostile
bodies answered 400 naming the field, nothing created; the token checks (the
same 401 for a missing and a wrong token, 403 for a peer off loopback); the
OpenAPI description against the routes; `[admin] listen` with `tierq serve
--workers 2`; a revocation seen by both workers of a host at once; and the
PostgreSQL key store shared by two hosts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import PRIORITY_MODEL, GatewayFactory, Running, model_config, serve_app
from pg_fixtures import pg_password, pg_session, pg_url  # noqa: F401
from pg_server import PASSWORD_ENV

from tierq.admin import PREFIX
from tierq.app import create_app
from tierq.config import (AdminConfig, Config, ConfigError, KeysConfig, LedgerConfig, ServerConfig,
                          UpstreamConfig, default_config, load_config)
from tierq.keys import KeyStore
from tierq.sim import start_sim
from tierq.stores import open_ledger
from ports import free_port

TOKEN = "admin-" + "x" * 40
SHA = hashlib.sha256(TOKEN.encode()).hexdigest()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = Path(__file__).with_name("_gateway_workers_app.py")


def _config(tmp_path: Path, *, keys: str | None = None, admin: bool = True, **keys_kw: Any) -> Config:
    return Config(
        server=ServerConfig(max_body_bytes=64 * 1024),
        ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
        upstreams=(UpstreamConfig("sim", "", "sim"),),
        models=(model_config(PRIORITY_MODEL),),
        keys=KeysConfig(path=keys if keys is not None else str(tmp_path / "keys.db"), **keys_kw),
        admin=AdminConfig(token_sha256=SHA if admin else None),
    )


@pytest.fixture
async def admin_gw(make_gateway: GatewayFactory, tmp_path: Path) -> Running:
    return await make_gateway(config=_config(tmp_path))


async def _call(method: str, url: str, body: Any = None, *, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(
            method, url, headers=AUTH if headers is None else headers,
            data=raw if raw is not None else (None if body is None else json.dumps(body)),
    ) as r:
        return r.status, await r.json(content_type=None)


def _client(root: str, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=root + "/v1", api_key=token, max_retries=0)


async def _chat(root: str, token: str) -> str | None:
    async with _client(root, token) as c:
        resp = await c.chat.completions.create(
            model=PRIORITY_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            service_tier="priority")
        return resp.service_tier


async def _status(root: str, token: str) -> int:
    try:
        await _chat(root, token)
        return 200
    except openai.APIStatusError as e:
        return e.status_code


# ------------------------------------------------------------------ CRUD


async def test_a_key_made_over_http_serves_the_openai_client_then_changes_and_is_revoked(
        admin_gw: Running) -> None:
    base = admin_gw.root + PREFIX
    status, made = await _call("POST", base + "/keys", {"name": "ci", "rpm": 100, "tpm": 50_000,
                                                         "weight": 2, "trusted": True})
    assert status == 201, made
    token, public_id = made.pop("secret"), made["id"]
    assert token.startswith(f"tq-{public_id}-")
    assert made == {"id": public_id, "object": "api_key", "name": "ci", "created": made["created"],
                    "revoked": False, "revoked_at": None, "rpm": 100, "tpm": 50_000,
                    "weight": 2.0, "trusted": True, "priority_budget_usd": None,
                    "ramp_min_tpm": 0, "ramp_max_growth": None, "ramp_window_s": 900,
                    "enforce": True}
    # The secret is shown once: never again in a read or the list.
    status, listed = await _call("GET", base + "/keys")
    assert status == 200 and listed == {"object": "list", "data": [made]}
    assert await _call("GET", base + f"/keys/{public_id}") == (200, made)
    assert await _call("GET", base + f"/keys/tq-{public_id}") == (200, made)
    assert token not in json.dumps(listed)

    assert await _chat(admin_gw.root, token) == "priority"
    async with _client(admin_gw.root, token) as c:
        stream = await c.chat.completions.create(
            model=PRIORITY_MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=3, service_tier="priority",
            stream=True)
        tiers = {chunk.service_tier async for chunk in stream}
    assert tiers == {"priority"}

    # Limits, weight and trust change; the gateway applies them to the next request.
    status, changed = await _call("PATCH", base + f"/keys/{public_id}",
                                  {"rpm": 1, "weight": 0.5, "trusted": False, "tpm": None})
    assert status == 200, changed
    assert (changed["rpm"], changed["tpm"], changed["weight"], changed["trusted"]) == (1, None, 0.5, False)
    assert await _status(admin_gw.root, token) == 200
    assert await _status(admin_gw.root, token) == 429  # rpm 1: the second within the minute
    assert admin_gw.gw.keys is not None
    stored = admin_gw.gw.keys.get(public_id)
    assert stored is not None and (stored.rpm, stored.tpm, stored.weight) == (1, None, 0.5)
    # The downgrades too: a budget as a number or exact text, answered as text.
    status, changed = await _call("PATCH", base + f"/keys/{public_id}",
                                  {"priority_budget_usd": 2.5, "ramp_max_growth": 0.5,
                                   "ramp_min_tpm": 1000, "ramp_window_s": 600})
    assert status == 200 and changed["priority_budget_usd"] == "2.5", changed
    assert (changed["ramp_max_growth"], changed["ramp_min_tpm"], changed["ramp_window_s"]) == (
        0.5, 1000, 600)
    status, changed = await _call("PATCH", base + f"/keys/{public_id}",
                                  {"priority_budget_usd": "0.000000001"})
    assert status == 200 and changed["priority_budget_usd"] == "0.000000001", changed

    status, gone = await _call("DELETE", base + f"/keys/{public_id}")
    assert status == 200 and gone["revoked"] is True and gone["revoked_at"] is not None
    assert await _status(admin_gw.root, token) == 401
    # Revoked: read still, no longer changed; revoking again says so, unknown is 404.
    assert (await _call("GET", base + f"/keys/{public_id}"))[1]["revoked"] is True
    status, err = await _call("PATCH", base + f"/keys/{public_id}", {"rpm": 5})
    assert status == 404 and err["error"]["code"] == "key_not_found"
    assert (await _call("DELETE", base + f"/keys/{public_id}"))[0] == 200
    for missing in ("zzzzzzzzzzzz", "not-an-id", "tq-" + "a" * 13):
        status, err = await _call("GET", base + f"/keys/{missing}")
        assert status == 404 and err["error"]["param"] == "id", missing
        assert (await _call("DELETE", base + f"/keys/{missing}"))[0] == 404


async def test_without_a_token_configured_there_is_no_admin_api(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    g = await make_gateway(config=_config(tmp_path, admin=False))
    status, err = await _call("GET", g.root + PREFIX + "/keys")
    assert status == 404 and err["error"]["code"] == "unknown_url"


# ------------------------------------------------------------------ usage


async def test_usage_over_http_is_tierq_usage_json(admin_gw: Running) -> None:
    base = admin_gw.root + PREFIX
    tokens = [(await _call("POST", base + "/keys", {"name": n}))[1]["secret"] for n in ("a", "b")]
    for i, token in enumerate(tokens):
        for _ in range(i + 1):
            assert await _chat(admin_gw.root, token) == "priority"
    await admin_gw.ledger.flush()
    db = admin_gw.ledger.path  # type: ignore[attr-defined]

    def cli(*args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "tierq", "usage", "--db", db, "--json", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    status, report = await _call("GET", base + "/usage")
    assert status == 200 and report == cli()
    assert sorted(line["requests"] for line in report["lines"]) == [1, 2]
    assert report["total"]["requests"] == 3 and report["total"]["cost"] != "0"
    key_b = tokens[1].split("-")[1]
    assert await _call("GET", base + f"/usage?key={key_b}&since=1h") == (200, cli("--key", key_b, "--since", "1h"))
    assert await _call("GET", base + "/usage?by=fairness-id") == (200, cli("--by", "fairness-id"))
    for query, param in (("since=yesterday", "since"), ("by=tier", "by"), ("limit=3", "limit")):
        status, err = await _call("GET", base + "/usage?" + query)
        assert status == 400 and err["error"]["param"] == param, query


# ------------------------------------------------------------------ hostile input


HOSTILE: list[tuple[str, Any, str | None]] = [
    ("not JSON", b"{name: 1", None),
    ("an array", [{"name": "x"}], None),
    ("a string", "name", None),
    ("no name", {"rpm": 5}, "name"),
    ("an unknown field", {"name": "x", "budget": 5}, "budget"),
    ("a hostile field name", {"name": "x", "\u0000" * 500: 1}, "\\x00" * 64),
    ("an empty name", {"name": ""}, "name"),
    ("a long name", {"name": "n" * 201}, "name"),
    ("a number for a name", {"name": 7}, "name"),
    ("rpm as text", {"name": "x", "rpm": "10"}, "rpm"),
    ("rpm zero", {"name": "x", "rpm": 0}, "rpm"),
    ("rpm true", {"name": "x", "rpm": True}, "rpm"),
    ("rpm a float", {"name": "x", "rpm": 1.5}, "rpm"),
    ("tpm past the maximum", {"name": "x", "tpm": 10**13}, "tpm"),
    ("tpm negative", {"name": "x", "tpm": -1}, "tpm"),
    ("weight too big", {"name": "x", "weight": 1000}, "weight"),
    ("weight as text", {"name": "x", "weight": "2"}, "weight"),
    ("weight false", {"name": "x", "weight": False}, "weight"),
    ("trusted as text", {"name": "x", "trusted": "yes"}, "trusted"),
    ("trusted as 1", {"name": "x", "trusted": 1}, "trusted"),
    ("ramp growth zero", {"name": "x", "ramp_max_growth": 0}, "ramp_max_growth"),
    ("ramp growth negative", {"name": "x", "ramp_max_growth": -0.5}, "ramp_max_growth"),
    ("ramp growth as text", {"name": "x", "ramp_max_growth": "0.5"}, "ramp_max_growth"),
    ("ramp window too short", {"name": "x", "ramp_window_s": 10}, "ramp_window_s"),
    ("ramp floor negative", {"name": "x", "ramp_min_tpm": -1}, "ramp_min_tpm"),
    ("budget negative", {"name": "x", "priority_budget_usd": -1}, "priority_budget_usd"),
    ("budget as words", {"name": "x", "priority_budget_usd": "ten"}, "priority_budget_usd"),
    ("budget finer than nano-USD", {"name": "x", "priority_budget_usd": "0.0000000001"},
     "priority_budget_usd"),
    ("budget true", {"name": "x", "priority_budget_usd": True}, "priority_budget_usd"),
]


@pytest.mark.parametrize(("what", "body", "param"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_a_bad_body_is_a_400_naming_the_field_and_makes_nothing(
        admin_gw: Running, what: str, body: Any, param: str | None) -> None:
    base = admin_gw.root + PREFIX
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, err = await _call("POST", base + "/keys", raw=raw)
    assert status == 400, (what, err)
    assert err["error"]["param"] == param, (what, err)
    assert err["error"]["type"] == "invalid_request_error"
    assert (await _call("GET", base + "/keys"))[1]["data"] == [], "nothing was created"
    # The same body refused as an update, the key left as it was.
    status, made = await _call("POST", base + "/keys", {"name": "kept", "rpm": 7})
    assert status == 201
    if what != "no name":  # a body without a name is a good update
        status, err = await _call("PATCH", base + f"/keys/{made['id']}", raw=raw)
        assert status == 400 and err["error"]["param"] == param, (what, err)
    kept = (await _call("GET", base + f"/keys/{made['id']}"))[1]
    assert (kept["name"], kept["rpm"], kept["weight"], kept["trusted"]) == ("kept", 7, 1.0, False)


async def test_an_empty_update_and_a_body_too_large_are_refused(admin_gw: Running) -> None:
    base = admin_gw.root + PREFIX
    _, made = await _call("POST", base + "/keys", {"name": "k"})
    status, err = await _call("PATCH", base + f"/keys/{made['id']}", {})
    assert status == 400 and err["error"]["code"] == "missing_required_parameter"
    huge = json.dumps({"name": "x" * (admin_gw.gw.config.server.max_body_bytes + 10)}).encode()
    status, err = await _call("POST", base + "/keys", raw=huge)
    assert status == 413 and err["error"]["code"] == "request_too_large"
    assert len((await _call("GET", base + "/keys"))[1]["data"]) == 1


# ------------------------------------------------------------------ the token


async def test_a_missing_or_wrong_token_gets_the_same_401(admin_gw: Running) -> None:
    url = admin_gw.root + PREFIX + "/keys"
    answers = []
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {SHA}"}, {"Authorization": "Bearer " + "é" * 2000},
                    {"Authorization": TOKEN}):
        for method in ("GET", "POST"):
            status, body = await _call(method, url, {"name": "x"}, headers=headers)
            answers.append((status, json.dumps(body)))
    assert {a[0] for a in answers} == {401}
    assert len({a[1] for a in answers}) == 1, "one body for every bad token: it leaks nothing"
    assert TOKEN not in answers[0][1] and SHA not in answers[0][1]
    assert (await _call("GET", url, headers={"Authorization": f"bearer  {TOKEN} "}))[0] == 200
    assert (await _call("GET", url))[1]["data"] == [], "no refused call created a key"


def _own_address() -> str | None:
    """An address of this machine that is not loopback (for a peer off loopback)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: it picks the route's source
            addr: str = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


async def test_off_loopback_the_admin_api_is_refused_even_with_the_token(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    addr = _own_address()
    if addr is None:
        pytest.skip("this machine has no address but loopback")
    sim = await start_sim("127.0.0.1", 0, slots=4, ttft_ms=1.0, tokens_per_s=0.0)
    ledger = open_ledger(f"sqlite:///{tmp_path / 'l.db'}")
    await ledger.start()
    from aiohttp import web

    from tierq.app import runner_kwargs

    runner = web.AppRunner(create_app(_config(tmp_path), ledger=ledger, sim=sim), **runner_kwargs())
    await runner.setup()
    try:
        site = web.TCPSite(runner, addr, 0)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        status, err = await _call("GET", f"http://{addr}:{port}{PREFIX}/keys")
        assert status == 403 and err["error"]["code"] == "admin_loopback_only"
        status, err = await _call("GET", f"http://{addr}:{port}{PREFIX}/keys", headers={})
        assert status == 403, "off loopback, the token is not even looked at"
    finally:
        await runner.cleanup()
        await ledger.close()
        await sim.close()


# ------------------------------------------------------------------ OpenAPI


async def test_the_openapi_description_names_every_admin_route_and_no_other(admin_gw: Running) -> None:
    status, spec = await _call("GET", admin_gw.root + PREFIX + "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    described = {(method.upper(), path) for path, ops in spec["paths"].items()
                 for method in ops if method != "parameters"}
    served = {(r.method, r.resource.canonical) for r in admin_gw.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith(PREFIX)
              and r.method != "HEAD"}
    assert described == served
    assert len(served) == 7
    assert (await _call("GET", admin_gw.root + PREFIX + "/openapi.json", headers={}))[0] == 401


# ------------------------------------------------------------------ real processes


async def _up(url: str, proc: subprocess.Popen[bytes], log: Path, workers: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(600):
            try:
                async with s.get(url + "/status.json") as r:
                    body = await r.json()
                    if r.status == 200 and body["workers"] == workers and body["ready"]:
                        return
            except aiohttp.ClientError:
                pass
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.05)
    raise RuntimeError("gateway never came up: " + log.read_text())


def _toml(tmp_path: Path, extra: str, keys: str | None = None) -> Path:
    """A host's config; its keys in SQLite, each worker keeping a checked key for
    an hour (or `keys`, another [keys] table)."""
    cfg = tmp_path / "tierq.toml"
    keys = keys or f'path = "{tmp_path / "tierq.db"}"\ncache_ttl_s = 3600'
    cfg.write_text(f"""
[ledger]
url = "sqlite:///{tmp_path / 'tierq.db'}"
[keys]
{keys}
[admin]
token_sha256 = "{SHA}"
{extra}
[[upstreams]]
name = "sim"
kind = "sim"
[upstreams.sim]
slots = 16
ttft_ms = 2
tokens_per_s = 0
[[models]]
id = "{PRIORITY_MODEL}"
""")
    return cfg


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0


@pytest.fixture(params=["sqlite", "postgresql"])
async def two_workers(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[list[str], str]]:
    """A `--workers 2` host (tierq.cli.worker_app per worker) with a port per worker;
    its keys in SQLite, or in PostgreSQL re-read only every hour (refresh_s)."""
    keys = None
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        keys = f'url = "{url}"\npassword_env = "{PASSWORD_ENV}"\nrefresh_s = 3600'
    cfg = _toml(tmp_path, "", keys)
    ports = [free_port(), free_port()]
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, str(APP), str(cfg), str(free_port()),
                                 ",".join(map(str, ports))], stdout=subprocess.DEVNULL, stderr=err)
    roots = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for root in roots:
            await _up(root, proc, log, 2)
        yield roots, request.param
    finally:
        await _stop(proc)


async def test_a_key_revoked_on_one_worker_is_refused_by_the_other_at_once(
        two_workers: tuple[list[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    (w0, w1), store = two_workers
    status, made = await _call("POST", w0 + PREFIX + "/keys", {"name": "both"})
    assert status == 201
    token = made["secret"]
    # Both workers check the key and cache it for an hour (cache_ttl_s = 3600):
    # only the word from the revoking worker can make the other drop it.
    assert [await _status(w, token) for w in (w0, w1, w0, w1)] == [200] * 4
    t0 = time.monotonic()
    status, _ = await _call("DELETE", w1 + PREFIX + f"/keys/{made['id']}")
    assert status == 200
    assert await _status(w1, token) == 401, "the worker that revoked it refuses it at once"
    seen = []
    for _ in range(600):  # 30 s: generous for a loaded machine, far below the cache's hour
        seen.append(await _status(w0, token))
        if seen[-1] == 401:
            break
        await asyncio.sleep(0.05)
    assert seen[-1] == 401, f"worker 0 still serves the revoked key: {seen[-5:]}"
    with capsys.disabled():
        print(f"\n[admin, keys in {store}] revoked on worker 1, refused by worker 0 after {len(seen)} "
              f"request(s), {time.monotonic() - t0:.3f} s from the DELETE")
    # A key created on one worker is good on the other at once too (its refusal
    # of the token a moment before is dropped with the rest).
    other = "tq-" + "a" * 12 + "-" + "b" * 32
    assert await _status(w1, other) == 401
    _, fresh = await _call("POST", w0 + PREFIX + "/keys", {"name": "fresh"})
    seen = []
    for _ in range(600):
        seen.append(await _status(w1, fresh["secret"]))
        if seen[-1] == 200:
            break
        await asyncio.sleep(0.05)
    assert seen[-1] == 200


async def test_admin_listen_serves_the_api_on_its_own_port_with_workers(tmp_path: Path) -> None:
    admin_port, port = free_port(), free_port()
    cfg = _toml(tmp_path, f'listen = "127.0.0.1:{admin_port}"')
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tierq", "serve", "--config", str(cfg),
                                 "--port", str(port), "--workers", "2", "--log-level", "info"],
                                stdout=subprocess.DEVNULL, stderr=err)
    main, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        await _up(main, proc, log, 2)
        status, err_body = await _call("GET", main + PREFIX + "/keys")
        assert status == 404, "with [admin] listen the main port has no admin API"
        status, made = await _call("POST", admin + PREFIX + "/keys", {"name": "via-admin", "rpm": 9})
        assert status == 201, made
        assert await _status(main, made["secret"]) == 200
        assert (await _call("GET", admin + PREFIX + "/keys", headers={}))[0] == 401
        assert (await _call("DELETE", admin + PREFIX + f"/keys/{made['id']}"))[0] == 200
    finally:
        await _stop(proc)
    text = log.read_text()
    assert f"admin API on http://127.0.0.1:{admin_port}/admin/v1" in text
    # Every call is in the log, and neither the token nor the key's secret is.
    lines = [json.loads(line) for line in text.splitlines() if '"tierq.admin"' in line]
    messages = [line["msg"] for line in lines]
    assert any(f"POST /admin/v1/keys -> 201: created key {made['id']}" in m for m in messages), messages
    assert any("GET /admin/v1/keys -> 404" in m for m in messages), messages
    assert any("GET /admin/v1/keys -> 401: invalid_admin_token" in m for m in messages), messages
    assert any(f"DELETE /admin/v1/keys/{made['id']} -> 200: revoked" in m for m in messages), messages
    secret = made["secret"].split("-", 2)[2]
    assert secret not in text and TOKEN not in text


# ------------------------------------------------------------------ PostgreSQL


async def test_postgresql_keys_made_on_one_host_are_revoked_on_every_host(
        pg_url: str, tmp_path: Path) -> None:
    sim = await start_sim("127.0.0.1", 0, slots=8, ttft_ms=1.0, tokens_per_s=0.0)
    base = _config(tmp_path, keys=pg_url, password_env=PASSWORD_ENV, refresh_s=0.3)
    hosts, cleanups = [], []
    try:
        for i in range(2):
            ledger = open_ledger(f"sqlite:///{tmp_path / f'ledger{i}.db'}")
            await ledger.start()
            cleanups.append(ledger.close)
            root, runner = await serve_app(create_app(base, ledger=ledger, sim=sim))
            cleanups.append(runner.cleanup)
            hosts.append(root)
        a, b = hosts
        status, made = await _call("POST", a + PREFIX + "/keys", {"name": "pg", "tpm": 10_000})
        assert status == 201, made
        token = made["secret"]
        assert await _status(a, token) == 200, "known at once on the host that made it"
        seen = []
        for _ in range(600):  # the other host re-reads the table every refresh_s (0.3 s)
            seen.append(await _status(b, token))
            if seen[-1] == 200:
                break
            await asyncio.sleep(0.05)
        assert seen[-1] == 200
        assert (await _call("GET", b + PREFIX + "/keys"))[1]["data"][0]["tpm"] == 10_000
        status, changed = await _call("PATCH", b + PREFIX + f"/keys/{made['id']}", {"rpm": 3})
        assert status == 200 and changed["rpm"] == 3 and changed["tpm"] == 10_000
        assert (await _call("DELETE", a + PREFIX + f"/keys/{made['id']}"))[0] == 200
        assert await _status(a, token) == 401
        seen = []
        for _ in range(600):
            seen.append(await _status(b, token))
            if seen[-1] == 401:
                break
            await asyncio.sleep(0.05)
        assert seen[-1] == 401, "revoked on every host"
        assert (await _call("GET", b + PREFIX + f"/keys/{made['id']}"))[1]["revoked"] is True
    finally:
        for cleanup in reversed(cleanups):
            await cleanup()
        await sim.close()


async def test_the_api_and_tierq_keys_share_one_store(admin_gw: Running, tmp_path: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "tierq", "keys", "create", "from-cli", "--rpm", "4",
                           "--db", str(tmp_path / "keys.db")], capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    public_id = made.stdout.strip().split("-")[1]
    status, listed = await _call("GET", admin_gw.root + PREFIX + "/keys")
    assert status == 200 and [(k["id"], k["rpm"]) for k in listed["data"]] == [(public_id, 4)]
    assert (await _call("DELETE", admin_gw.root + PREFIX + f"/keys/{public_id}"))[0] == 200
    with KeyStore(str(tmp_path / "keys.db")) as store:
        info = store.get(public_id)
        assert info is not None and info.revoked


# ------------------------------------------------------------------ the config


@pytest.mark.parametrize(("admin", "problem"), [
    (f'token_sha256 = "{TOKEN}"', "expected 64 lower-case hex digits"),
    (f'token_sha256 = "{SHA.upper()}"', "expected 64 lower-case hex digits"),
    ('listen = "127.0.0.1:9090"', "needs token_sha256"),
    (f'token_sha256 = "{SHA}"\nlisten = "127.0.0.1"', 'expected "host:port"'),
    (f'token_sha256 = "{SHA}"\nlisten = ":9090"', 'expected "host:port"'),
    (f'token_sha256 = "{SHA}"\nlisten = "h:70000"', 'expected "host:port"'),
    (f'token_sha256 = "{SHA}"\ntoken = "x"', "token"),
])
def test_a_bad_admin_table_is_one_line_that_never_shows_the_token(
        tmp_path: Path, admin: str, problem: str) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f"[admin]\n{admin}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    text = str(e.value)
    assert problem in text and "\n" not in text and TOKEN not in text


def test_the_admin_table_as_read(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[admin]\ntoken_sha256 = "{SHA}"\nlisten = "[::1]:9090"\n[keys]\ncache_ttl_s = 0\n')
    config = load_config(cfg)
    assert config.admin == AdminConfig(SHA, ("::1", 9090))
    assert config.keys.cache_ttl_s == 0.0
    assert default_config().admin == AdminConfig(None, None)
