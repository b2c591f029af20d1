"""OpenTelemetry traces ([tracing]): the real OTLP/HTTP protobuf a collector
receives, decoded with opentelemetry-proto, for requests made through real
sockets with the official openai client; the client's traceparent continued
and passed upstream (the sim records what it got)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openai import AsyncOpenAI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from conftest import PLAIN_MODEL, PRIORITY_MODEL, GatewayFactory, Running, model_config, serve_app
from tierq.config import (Config, ConfigError, KeysConfig, LedgerConfig, TracingConfig, UpstreamConfig,
                          load_config)
from tierq.tracing import Tracer, parse_traceparent, response_model, traces_url

MESSAGES = [{"role": "user", "content": "hello there gateway"}]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver on a loopback port: every span it decoded."""

    url: str = ""
    spans: list[Any] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)

    def named(self, prefix: str) -> list[Any]:
        return [s for s in self.spans if s.name.startswith(prefix)]

    def requests(self) -> list[Any]:
        """The requests' own spans (SERVER; their upstream calls are CLIENT)."""
        return [s for s in self.spans if s.kind == 2]


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which)
    return out


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    got = Collector()

    async def traces(request: web.Request) -> web.Response:
        got.content_types.append(request.content_type)
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        for rs in req.resource_spans:
            got.resources.append(attrs(rs.resource.attributes))
            for ss in rs.scope_spans:
                got.spans.extend(ss.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    root, runner = await serve_app(app)
    got.url = root
    yield got
    await runner.cleanup()


def traced_config(tmp_path: Path, endpoint: str, ratio: float = 1.0, **model: Any) -> Config:
    return Config(
        ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
        upstreams=(UpstreamConfig("sim", "", "sim", priority_scheduling=True),),
        models=(model_config(PRIORITY_MODEL, **model), model_config(PLAIN_MODEL)),
        tracing=TracingConfig(endpoint, ratio, "tierq-test"),
    )


def client(gw: Running, **headers: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=gw.url, api_key="unused-on-loopback", default_headers=headers)


async def flushed(gw: Running) -> None:
    tracer = gw.gw.tracer
    assert tracer is not None
    assert await asyncio.to_thread(tracer.flush)


async def test_json_request_continues_the_clients_trace_and_passes_it_upstream(
    collector: Collector, make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    gw = await make_gateway(config=traced_config(tmp_path, collector.url))
    async with client(gw, traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                      tracestate="vendor=abc") as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=5, service_tier="priority")
    resp = raw.parse()
    await flushed(gw)
    row = await gw.row(raw.headers["x-tierq-request-id"])
    assert row is not None and row.status == "served"
    assert collector.content_types == ["application/x-protobuf"]
    assert collector.resources[0]["service.name"] == "tierq-test"
    assert len(collector.spans) == 3
    assert {s.trace_id.hex() for s in collector.spans} == {CLIENT_TRACE}
    [req] = collector.requests()
    assert req.name == f"chat {PRIORITY_MODEL}"
    assert req.parent_span_id.hex() == CLIENT_SPAN and req.kind == 2  # SERVER
    a = attrs(req.attributes)
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "sim"
    assert a["gen_ai.request.model"] == PRIORITY_MODEL
    assert a["gen_ai.response.model"] == resp.model
    assert a["openai.request.service_tier"] == "priority"
    assert a["openai.response.service_tier"] == "priority" == a["tierq.lane"]
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
        row.prompt_tokens, row.completion_tokens) == (3, 5)
    assert Decimal(a["tierq.cost_usd"]) == row.cost == Decimal("0.00000051")  # exact, a string
    assert a["tierq.queue_ms"] == pytest.approx(row.queue_ms)
    assert a["tierq.pool.limit"] == gw.gw.pools[PRIORITY_MODEL].admission.limit
    assert a["tierq.request_id"] == row.request_id
    assert "error.type" not in a and "tierq.shed_code" not in a
    assert "tierq.downgrade_reason" not in a  # not downgraded
    assert "gen_ai.response.time_to_first_chunk" not in a  # JSON: no chunks
    [wait] = collector.named("wait ")
    [up] = [s for s in collector.spans if s.kind == 3]  # CLIENT
    assert wait.parent_span_id == req.span_id == up.parent_span_id
    assert req.start_time_unix_nano <= wait.start_time_unix_nano <= wait.end_time_unix_nano
    assert wait.end_time_unix_nano <= up.start_time_unix_nano <= up.end_time_unix_nano
    assert up.end_time_unix_nano <= req.end_time_unix_nano
    ua = attrs(up.attributes)
    assert ua["server.address"] == "127.0.0.1" and ua["tierq.upstream"] == "sim"
    # The upstream was told the gateway's upstream-call span as its parent.
    sent = (await gw.sim_stats())["last_requests"][-1]
    assert sent["traceparent"] == f"00-{CLIENT_TRACE}-{up.span_id.hex()}-01"
    assert sent["tracestate"] == "vendor=abc"


async def test_a_downgraded_request_carries_its_reason(
    collector: Collector, make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    config = dataclasses.replace(traced_config(tmp_path, collector.url),
                                 keys=KeysConfig(path=str(tmp_path / "keys.db")))
    gw = await make_gateway(config=config)
    assert gw.gw.keys is not None
    _, token = gw.gw.keys.create("spent", priority_budget_usd=0)
    async with AsyncOpenAI(base_url=gw.url, api_key=token) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=5, service_tier="priority")
    assert raw.headers["x-tierq-service-tier-reason"] == "budget"
    await flushed(gw)
    [req] = collector.requests()
    a = attrs(req.attributes)
    assert a["tierq.downgrade_reason"] == "budget"
    assert a["openai.request.service_tier"] == "priority"
    assert a["openai.response.service_tier"] == "default" == a["tierq.lane"]


async def test_stream_is_a_new_trace_with_time_to_first_chunk(
    collector: Collector, make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    gw = await make_gateway(config=traced_config(tmp_path, collector.url))
    async with client(gw) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=PLAIN_MODEL, messages=MESSAGES, max_tokens=6, stream=True)
        chunks = [ch async for ch in raw.parse()]
    await flushed(gw)
    row = await gw.row(raw.headers["x-tierq-request-id"])
    assert row is not None and row.status == "served" and row.completion_tokens == 6
    [req] = collector.requests()
    assert req.parent_span_id == b"" and len(req.trace_id) == 16 and any(req.trace_id)
    a = attrs(req.attributes)
    assert a["gen_ai.response.model"] == chunks[0].model
    assert "openai.request.service_tier" not in a  # none asked
    assert a["openai.response.service_tier"] == "default"
    assert a["gen_ai.usage.output_tokens"] == 6
    ttft = a["gen_ai.response.time_to_first_chunk"]
    assert 0 < ttft <= (req.end_time_unix_nano - req.start_time_unix_nano) / 1e9
    sent = (await gw.sim_stats())["last_requests"][-1]
    [up] = [s for s in collector.spans if s.kind == 3]
    assert sent["traceparent"] == f"00-{req.trace_id.hex()}-{up.span_id.hex()}-01"


async def test_unsampled_parent_is_not_exported_but_still_passed_upstream(
    collector: Collector, make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    gw = await make_gateway(config=traced_config(tmp_path, collector.url, ratio=1.0))
    async with client(gw, traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00") as c:
        await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)
    await flushed(gw)
    assert collector.spans == []  # parent-based: the client's flag decides over sample_ratio 1.0
    sent = (await gw.sim_stats())["last_requests"][-1]
    version, trace, parent, flags = sent["traceparent"].split("-")
    assert (version, trace, flags) == ("00", CLIENT_TRACE, "00") and parent != CLIENT_SPAN


async def test_sample_ratio_applies_only_without_a_traceparent(
    collector: Collector, make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    gw = await make_gateway(config=traced_config(tmp_path, collector.url, ratio=0.0))
    async with client(gw) as c:
        for _ in range(5):
            await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)
    async with client(gw, traceparent=f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01") as c:
        await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES, max_tokens=1)
    await flushed(gw)
    assert len(collector.requests()) == 1
    assert {s.trace_id.hex() for s in collector.spans} == {CLIENT_TRACE}


async def test_shed_and_failed_requests_carry_error_type(
    collector: Collector, make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    gw = await make_gateway(config=traced_config(tmp_path, collector.url, max_concurrency=1,
                                                 queue_depth=1),
                            sim={"slots": 1, "ttft_ms": 300.0})
    adm = gw.gw.pools[PRIORITY_MODEL].admission
    body = {"model": PRIORITY_MODEL, "messages": MESSAGES, "max_tokens": 1}
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(s.post(gw.url + "/chat/completions", json=body))
        await poll(lambda: adm.stats()["in_flight"] == 1)
        queued = asyncio.create_task(s.post(gw.url + "/chat/completions", json=body))
        await poll(lambda: adm.stats()["depth"]["default"] == 1)  # type: ignore[index]
        shed = await s.post(gw.url + "/chat/completions", json=body)
        done = [await first, await queued]
        broken = await s.post(gw.url + "/chat/completions", json={**body, "sim_fault": "500"})
        for r in (*done, shed, broken):
            r.release()
    assert shed.status == 429 and broken.status == 502
    await flushed(gw)
    rows = {r.request_id: r for r in await gw.rows()}
    by_id = {attrs(s.attributes)["tierq.request_id"]: s for s in collector.requests()}
    assert by_id.keys() == rows.keys()
    shed_row = rows[shed.headers["x-tierq-request-id"]]
    a = attrs(by_id[shed_row.request_id].attributes)
    assert shed_row.status == "shed"
    assert a["error.type"] == a["tierq.shed_code"] == shed_row.code
    assert "gen_ai.usage.input_tokens" not in a and "tierq.cost_usd" not in a
    failed = by_id[broken.headers["x-tierq-request-id"]]
    fa = attrs(failed.attributes)
    assert fa["error.type"] == "upstream_500" and "tierq.shed_code" not in fa
    assert failed.status.code == 2  # ERROR
    # The queued request's wait is its own child span, as long as its queue time.
    waited = by_id[done[1].headers["x-tierq-request-id"]]
    [wait] = [s for s in collector.named("wait ") if s.parent_span_id == waited.span_id]
    queue_ms = attrs(waited.attributes)["tierq.queue_ms"]
    assert queue_ms > 0
    assert (wait.end_time_unix_nano - wait.start_time_unix_nano) / 1e6 >= queue_ms * 0.9


async def test_a_collector_that_is_down_costs_spans_not_requests(
    make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    # A loopback port nobody listens on (bound, then closed).
    probe = web.Application()
    root, runner = await serve_app(probe)
    await runner.cleanup()
    gw = await make_gateway(config=traced_config(tmp_path, root))
    async with client(gw) as c:
        resp = await c.chat.completions.create(model=PRIORITY_MODEL, messages=MESSAGES,
                                               max_tokens=1)
    assert resp.service_tier == "default"
    await flushed(gw)
    tracer = gw.gw.tracer
    assert tracer is not None and tracer.dropped == 1 and tracer.export_errors == 1
    assert tracer.exported == 0


async def poll(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_traceparent_parsing_follows_w3c() -> None:
    assert parse_traceparent(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01") == (
        int(CLIENT_TRACE, 16), int(CLIENT_SPAN, 16), True)
    assert parse_traceparent(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00") == (
        int(CLIENT_TRACE, 16), int(CLIENT_SPAN, 16), False)
    # A later version may add fields; version 00 may not; ff is invalid.
    assert parse_traceparent(f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra") is not None
    for bad in (None, "", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra",
                f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01", f"00-{'0' * 32}-{CLIENT_SPAN}-01",
                f"00-{CLIENT_TRACE}-{'0' * 16}-01", f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",
                f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-1"):
        assert parse_traceparent(bad) is None, bad


def test_invalid_traceparent_starts_a_new_trace() -> None:
    tracer = Tracer(TracingConfig("http://127.0.0.1:4318", 1.0))
    ctx = tracer.begin("00-nothex-00f067aa0ba902b7-01", "vendor=abc")
    assert ctx.parent_id == 0 and ctx.sampled and ctx.tracestate is None
    assert ctx.upstream_headers()["traceparent"].endswith("-01")


def test_sample_ratio_samples_that_share_of_new_traces() -> None:
    tracer = Tracer(TracingConfig("http://127.0.0.1:4318", 0.25))
    sampled = sum(tracer.begin(None, None).sampled for _ in range(20000))
    assert 4500 < sampled < 5500


def test_traces_url_adds_the_otlp_path_only_to_a_bare_endpoint() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("https://otel.example/ingest/traces") == "https://otel.example/ingest/traces"


def test_response_model_is_read_from_the_first_event() -> None:
    assert response_model(b'data: {"id":"x","model":"m-1","choices":[]}\n\n') == "m-1"
    assert response_model(b'data: {"id":"x"}\n\n') is None


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "tierq.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_tracing_config_is_read_and_checked(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, """
        [tracing]
        otlp_endpoint = "http://127.0.0.1:4318"
        sample_ratio = 0.5
        service_name = "edge-1"
    """))
    assert c.tracing == TracingConfig("http://127.0.0.1:4318", 0.5, "edge-1")
    c = load_config(write(tmp_path, '[tracing]\notlp_endpoint = "http://127.0.0.1:4318"\n'))
    assert c.tracing is not None and c.tracing.sample_ratio == 0.01 and c.tracing.service_name == "tierq"
    assert load_config(write(tmp_path, "[tracing]\nsample_ratio = 1.0\n")).tracing is None
    assert load_config(write(tmp_path, "[server]\n")).tracing is None
    for text, key in (('otlp_endpoint = "http://h:4318"\nsample_ratio = 1.5', "tracing.sample_ratio"),
                      ('otlp_endpoint = "collector:4318"', "tracing.otlp_endpoint"),
                      ('otlp_endpoint = "http://h:4318"\nservice_name = ""', "tracing.service_name"),
                      ('otlp_endpoint = "http://h:4318"\nratio = 1', "tracing.ratio")):
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, "[tracing]\n" + text + "\n"))
        assert key in str(e.value) and "\n" not in str(e.value)


def test_the_embedded_default_serves_without_importing_opentelemetry(tmp_path: Path) -> None:
    # In a fresh interpreter: the embedded default built, started and asked once,
    # and not one OpenTelemetry or protobuf module loaded.
    script = textwrap.dedent(f"""
        import asyncio, sys
        import aiohttp
        from aiohttp import web
        from tierq.app import create_app, runner_kwargs
        from tierq.config import default_config, LedgerConfig
        from tierq.embedded import start_sims
        import dataclasses

        async def main():
            config = dataclasses.replace(default_config(),
                                         ledger=LedgerConfig(url="sqlite:///{tmp_path}/t.db"))
            assert config.tracing is None
            app = create_app(config, start_sims=start_sims)
            runner = web.AppRunner(app, **runner_kwargs())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{{port}}/v1/chat/completions",
                                  json={{"model": "{PRIORITY_MODEL}", "max_tokens": 1,
                                        "messages": [{{"role": "user", "content": "hi"}}]}},
                                  headers={{"traceparent": "00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}}) as r:
                    assert r.status == 200, r.status
            await runner.cleanup()
            loaded = sorted(m for m in sys.modules
                            if m.startswith(("opentelemetry", "google.protobuf")))
            assert not loaded, loaded
            print("ok")

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
