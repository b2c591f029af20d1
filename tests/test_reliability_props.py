"""Property tests (hypothesis): request parsing, the tier rule, the SSE rewriter.

The SSE rewriter runs end to end: a fake upstream answers with the bytes under
test, split into random chunks, and the gateway's reply and ledger row are
checked. tests/corpus/sse/ is the seed corpus, run on every CI build; hypothesis
runs derandomized so CI is repeatable.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import PRIORITY_MODEL, exact_json, model_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierq.app import create_app, runner_kwargs
from tierq.config import Config, LedgerConfig, ServerConfig, UpstreamConfig
from tierq.errors import ApiError
from tierq.intake import estimate_prompt_tokens, validate
from tierq.stores import open_ledger
from tierq.tiers import InvalidTier, resolve_tier
from tierq.upstream import rewrite_request

pytestmark = pytest.mark.reliability
CORPUS = Path(__file__).parent / "corpus" / "sse"
PROPS = settings(derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False,
                                                                          allow_infinity=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
FIELDS = ["model", "messages", "prompt", "input", "stream", "stream_options", "service_tier",
          "max_tokens", "max_completion_tokens", "priority", "n", "temperature"]


# ------------------------------------------------------------------ the tier rule


@PROPS
@given(requested=json_values | st.sampled_from(["priority", "fast", "default", "auto", "flex",
                                                "scale", "Priority", ""]),
       enabled=st.booleans())
def test_tier_rule_matches_the_design_table(requested: Any, enabled: bool) -> None:
    try:
        tier = resolve_tier(requested, enabled)
    except InvalidTier:
        assert requested not in (None, "auto", "default", "priority", "fast", "flex", "scale")
        return
    if requested in ("priority", "fast"):
        assert tier == ("priority" if enabled else "default")
    else:
        assert requested in (None, "auto", "default", "flex", "scale")
        assert tier == "default"


# ------------------------------------------------------------------ request parsing


@PROPS
@given(endpoint=st.sampled_from(["chat/completions", "completions", "embeddings"]),
       body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values,
                            max_size=8),
       kind=st.sampled_from(["openai", "vllm", "sglang", "trtllm", "sim"]),
       tier=st.sampled_from(["priority", "default"]))
def test_request_parsing_is_a_400_or_a_clean_upstream_body(
    endpoint: str, body: dict[str, Any], kind: str, tier: str
) -> None:
    try:
        validate(endpoint, body, ServerConfig().max_n)
    except ApiError as e:
        assert e.status == 400 and e.message and e.code
        return
    assert estimate_prompt_tokens(endpoint, body) >= 1
    info = rewrite_request(body, kind=kind, priority_scheduling=True, applied_tier=tier,
                           endpoint=endpoint, upstream_model="m")
    assert body["model"] == "m"
    assert body.get("service_tier") in (None, "priority")
    if body.get("service_tier") == "priority":
        assert kind == "openai" and tier == "priority"
    if info.stream:
        assert body["stream_options"]["include_usage"] is True
    orjson.dumps(body)  # what goes upstream always serializes


# ------------------------------------------------------------------ the SSE rewriter


class Harness:
    """Fake upstream + gateway on a background loop; `run(chunks)` is synchronous."""

    def __init__(self, tmp: Path) -> None:
        self.chunks: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.tmp = tmp
        self.ports = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _upstream(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for c in self.chunks:
            await resp.write(c)
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async def _start(self) -> tuple[int, int]:
        up = web.Application()
        up.router.add_post("/v1/chat/completions", self._upstream)
        self.up_runner = web.AppRunner(up, access_log=None)
        await self.up_runner.setup()
        site = web.TCPSite(self.up_runner, "127.0.0.1", 0)
        await site.start()
        up_port = self.up_runner.addresses[0][1]
        self.ledger = open_ledger(f"sqlite:///{self.tmp / 'props.db'}")
        await self.ledger.start()
        config = Config(ledger=LedgerConfig(url=f"sqlite:///{self.tmp / 'unused.db'}"),
                        upstreams=(UpstreamConfig("fake", f"http://127.0.0.1:{up_port}/v1",
                                                  "openai", read_timeout_s=5.0),),
                        models=(model_config(PRIORITY_MODEL),))
        from dataclasses import replace

        config = replace(config, models=(replace(config.models[0], upstream="fake"),))
        self.runner = web.AppRunner(create_app(config, ledger=self.ledger), **runner_kwargs())
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return up_port, self.runner.addresses[0][1]

    def run(self, chunks: list[bytes]) -> tuple[int, bytes, Any]:
        self.chunks = chunks
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[1], timeout=20)
        body = orjson.dumps({"model": PRIORITY_MODEL, "stream": True, "service_tier": "priority",
                             "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        rid = r.getheader("x-request-id")
        conn.close()
        asyncio.run_coroutine_threadsafe(self.ledger.flush(), self.loop).result(10)
        return r.status, raw, self.ledger.rows(rid)

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            await self.up_runner.cleanup()
            await self.ledger.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("props"))
    yield h
    h.close()


def check_rewritten(status: int, raw: bytes, rows: list[Any]) -> None:
    """The invariants of any relayed stream, whatever the upstream sent."""
    assert status == 200
    assert b"Traceback" not in raw
    assert len(rows) == 1, "exactly one ledger row"
    row = rows[0]
    events = [block[5:].strip() for block in raw.split(b"\n\n") if block.startswith(b"data:")]
    assert events, "the client always gets a last event"
    for e in events:
        if e != b"[DONE]":
            obj = exact_json(e)
            assert isinstance(obj, dict) and obj["service_tier"] == "priority"
            assert "usage" not in obj or obj.get("error")  # the client did not ask for usage
    if events[-1] == b"[DONE]":
        assert row.status == "served" and not row.partial
        assert row.cost > 0 or row.prompt_tokens + row.completion_tokens == 0
    else:
        err = exact_json(events[-1])["error"]
        assert isinstance(err, dict)
        assert row.status == "failed" and row.cost == Decimal(0)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.sse")), ids=lambda p: p.stem)
def test_sse_seed_corpus_is_rewritten_or_failed_cleanly(harness: Harness, path: Path) -> None:
    data = path.read_bytes()
    for size in (1, 7, len(data) or 1):  # the same stream in several chunkings
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        check_rewritten(*harness.run(chunks))


EVENT = st.one_of(
    st.builds(lambda t: b'data: {"id":"x","choices":[{"index":0,"delta":{"content":%s}}]}\n\n'
              % orjson.dumps(t), st.text(max_size=10)),
    st.builds(lambda p, c: b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":%d,'
              b'"completion_tokens":%d}}\n\n' % (p, c), st.integers(0, 500), st.integers(0, 500)),
    st.just(b"data: [DONE]\n\n"), st.just(b": ping\n\n"), st.just(b"event: x\n"),
    st.just(b"data: {\"error\":{\"message\":\"boom\"}}\n\n"), st.just(b"\r\n"),
    st.binary(max_size=12),
)


@settings(PROPS, max_examples=40,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(events=st.lists(EVENT, max_size=8), cut=st.integers(1, 64))
def test_sse_rewriter_on_random_streams(harness: Harness, events: list[bytes], cut: int) -> None:
    data = b"".join(events)
    chunks = [data[i:i + cut] for i in range(0, len(data), cut)]
    check_rewritten(*harness.run(chunks))
