"""Shared fixtures: a simulated backend and a gateway, each on a free loopback port.

Everything goes through real sockets: the sim is tierq.sim on 127.0.0.1:0, the
gateway is create_app served by an AppRunner with handler cancellation on, and
the ledger is a SQLite file in the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tierq.app import GATEWAY, Gateway, create_app, runner_kwargs
from tierq.config import (
    AdmissionConfig,
    Config,
    LedgerConfig,
    ModelConfig,
    UpstreamConfig,
)
from tierq.ledger import Ledger, LedgerRow
from tierq.logs import BatchStreamHandler, JsonFormatter, access_log, flush_access_log
from tierq.stores import open_ledger
from tierq.sim import SimServer, start_sim

# A built-in, priority-enabled model and a built-in one without priority.
PRIORITY_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
PLAIN_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"


@dataclass
class Running:
    """A gateway under test: its URLs, ledger, sim and internals."""

    root: str  # http://127.0.0.1:PORT
    url: str  # root + /v1 (an OpenAI base_url)
    ledger: Ledger
    sim: SimServer
    app: web.Application

    @property
    def gw(self) -> Gateway:
        return self.app[GATEWAY]

    async def row(self, request_id: str) -> LedgerRow | None:
        await self.ledger.flush()
        return self.ledger.get(request_id)

    async def rows(self) -> list[LedgerRow]:
        await self.ledger.flush()
        return self.ledger.rows()

    async def sim_stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.sim.root + "/sim/stats") as r:
            data: dict[str, Any] = await r.json()
            return data


def model_config(model_id: str, priority: bool | None = None, flex: bool = False,
                 **admission: Any) -> ModelConfig:
    return ModelConfig(model_id, "sim", priority=priority, admission=AdmissionConfig(**admission),
                       flex=flex)


GatewayFactory = Callable[..., Awaitable[Running]]


async def serve_app(app: web.Application) -> tuple[str, web.AppRunner]:
    """Serves `app` as `tierq serve` does (handler cancellation on) on a free
    loopback port; returns its root URL and the runner (clean it up when done)."""
    runner = web.AppRunner(app, **runner_kwargs())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return f"http://127.0.0.1:{port}", runner


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start sim + gateway: `await make_gateway(models=[...], sim={...}, ...)`."""
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def start(
        *,
        models: list[ModelConfig] | None = None,
        sim: dict[str, Any] | None = None,
        priority_scheduling: bool = True,
        config: Config | None = None,
    ) -> Running:
        server = await start_sim("127.0.0.1", 0, **{"slots": 8, "ttft_ms": 1.0,
                                                    "tokens_per_s": 0.0, **(sim or {})})
        cleanups.append(server.close)
        ledger = open_ledger(f"sqlite:///{tmp_path / f'ledger{len(cleanups)}.db'}")
        await ledger.start()
        cleanups.append(ledger.close)
        if config is None:
            config = Config(
                ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'unused.db'}"),
                upstreams=(UpstreamConfig("sim", "", "sim", priority_scheduling=priority_scheduling),),
                models=tuple(models if models is not None else
                             [model_config(PRIORITY_MODEL), model_config(PLAIN_MODEL)]),
            )
        app = create_app(config, ledger=ledger, sim=server)
        root, runner = await serve_app(app)
        cleanups.append(runner.cleanup)
        return Running(root, root + "/v1", ledger, server, app)

    yield start
    for cleanup in reversed(cleanups):
        await cleanup()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Running:
    """The default gateway: a priority-enabled and a plain model on an instant sim."""
    return await make_gateway()


def exact_json(raw: bytes | str) -> Any:
    """Parse JSON keeping numbers exact (Decimal), to compare echoed costs to the ledger."""
    return json.loads(raw, parse_float=Decimal)


@contextlib.contextmanager
def json_access_log() -> Iterator[io.StringIO]:
    """The access logger writing to its own JSON BatchStreamHandler only, as
    `tierq serve` writes it (so the writer takes each line the core formatted
    as it is), with pytest's capture handlers on the root logger out of its
    way; what is queued is flushed into it before it is taken off."""
    out = io.StringIO()
    handler = BatchStreamHandler(out)
    handler.setFormatter(JsonFormatter())
    level, propagate = access_log.level, access_log.propagate
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    try:
        yield out
    finally:
        flush_access_log()
        access_log.removeHandler(handler)
        access_log.setLevel(level)
        access_log.propagate = propagate
