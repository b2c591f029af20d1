"""Operator routes: /metrics (Prometheus), /status (live page), /status.json.

They read `WorkerSnapshot`s from a `MetricsSource`. A single process collects
its own; a multi-worker supervisor can put in a source that gathers one
snapshot per worker and says whether admission state is shared (then pool
numbers are read once, not summed). The routes need no API key, like /healthz:
expose them only to the operators' network.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Final

import orjson
from aiohttp import web

from tierq.metrics import WorkerSnapshot, render_prometheus, status_json

__all__ = ["METRICS_SOURCE", "PROMETHEUS_TYPE", "MetricsSource", "add_routes"]

PROMETHEUS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class MetricsSource:
    """Where /metrics and /status.json get their numbers."""

    collect: Callable[[], Awaitable[list[WorkerSnapshot]]]
    # True when every worker reads the same admission state (shared memory).
    shared_admission: bool = False


METRICS_SOURCE: Final = web.AppKey("tierq.metrics_source", MetricsSource)


def add_routes(app: web.Application, source: MetricsSource) -> None:
    app[METRICS_SOURCE] = source
    page = files("tierq").joinpath("data/status.html").read_bytes()

    async def status_page(request: web.Request) -> web.StreamResponse:
        # Self-contained page: no external assets, so it may be locked down hard.
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; connect-src 'self'",
        })

    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/status", status_page)
    app.router.add_get("/status.json", _status_json)


async def _metrics(request: web.Request) -> web.StreamResponse:
    src = request.app[METRICS_SOURCE]
    text = render_prometheus(await src.collect(), shared_admission=src.shared_admission)
    return web.Response(body=text.encode(), headers={"Content-Type": PROMETHEUS_TYPE})


async def _status_json(request: web.Request) -> web.StreamResponse:
    src = request.app[METRICS_SOURCE]
    body = status_json(await src.collect(), shared_admission=src.shared_admission)
    return web.Response(body=orjson.dumps(body), content_type="application/json",
                        headers={"Cache-Control": "no-cache"})
