"""The HTTP gateway: OpenAI routes, tier echo, metering, admission, relaying.

`create_app(config)` builds the aiohttp application. A request goes: parse
(size- and time-bounded, orjson) -> auth -> model -> tier -> per-key limits ->
admission (Rust core) -> upstream (streamed) -> rewrite `service_tier` and
`usage.estimated_cost` -> ledger commit -> the response's last bytes.
Serve it with handler cancellation on (see `runner_kwargs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from tierq.admission import Admission, Shed
from tierq._core import SharedKeyBuckets
from tierq.served import Catalog, ModelEntry
from tierq.config import Config, UpstreamConfig
from tierq.keys import KeyInfo, KeyLimiter, KeyStore
from tierq.ledger import Ledger, LedgerRow, open_ledger
from tierq.logs import RequestInfo, request_info, request_log
from tierq.metrics import GatewayMetrics, PoolSnapshot, WorkerSnapshot
from tierq.status import MetricsSource, add_routes
from tierq.pricing import cost as price_cost
from tierq.pricing import render_cost
from tierq.tiers import InvalidTier, resolve_tier
from tierq.upstream import BYO_HEADER, UpstreamClient, match_forward_target, rewrite_request
from tierq.sse import (DONE, DONE_EVENT, EventSplitter, StreamRewriter, UpstreamStreamError,
                       encode_event, usage_tokens)
from tierq.watchdog import ClientWriteTimeout, WriteWatchdog

__all__ = [
    "CONFIG",
    "GATEWAY",
    "Gateway",
    "StartSims",
    "create_app",
    "models_payload",
    "runner_kwargs",
]

log = logging.getLogger("tierq.app")

# Ledger key_id of requests served without API keys (loopback-only mode).
ANONYMOUS_KEY: Final = "local"
TIER_HEADER: Final = "x-tierq-service-tier"
QUEUE_HEADER: Final = "x-tierq-queue-ms"
JSON_TYPE: Final = "application/json"
ENDPOINT_PATHS: Final = {
    "chat/completions": "chat.completions",
    "completions": "completions",
    "embeddings": "embeddings",
}
# Retry-After is whole seconds, rounded up, clamped to what clients honour
# (the openai SDK ignores values over 120 s and stops retrying).
RETRY_AFTER_MAX_S: Final = 120
# The cancel message that tells a queued request it is shed by a drain (SIGTERM),
# not abandoned by its client.
_DRAIN: Final = "tierq-drain"
DRAIN_RETRY_AFTER_S: Final = 1
# A JSON answer up to this size is sent in one write after its bill is committed
# (see _relay_json); half the transport's 64 KiB high-water mark.
_ONE_WRITE_MAX: Final = 32 * 1024


def runner_kwargs() -> dict[str, Any]:
    """How a tierq app must be served (web.AppRunner / web.run_app keywords).

    Handler cancellation is what lets a client that hangs up leave the queue,
    cancel its upstream request and free its slot; aiohttp has it off by default.
    """
    return {"handler_cancellation": True, "access_log": None, "shutdown_timeout": 5.0}


# ------------------------------------------------------------------ errors


class ApiError(Exception):
    """An OpenAI-shaped error response, raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}
        return web.Response(status=self.status, body=orjson.dumps(body),
                            content_type=JSON_TYPE, headers=self.headers)


_STATUS_TYPES: Final = {401: "invalid_request_error", 403: "invalid_request_error",
                        404: "invalid_request_error", 405: "invalid_request_error",
                        413: "invalid_request_error", 429: "rate_limit_error"}


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as OpenAI-shaped JSON; nothing leaks a traceback."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"Unknown request URL: {request.method} {request.path}."
            code: str | None = "unknown_url"
        elif e.status == 405:
            message = f"Method {request.method} is not allowed for {request.path}."
            code = "method_not_allowed"
        elif e.status == 413:
            message = "Request body too large."
            code = "request_too_large"
        else:
            message, code = e.reason, None
        err = ApiError(e.status, message, _STATUS_TYPES.get(e.status, "invalid_request_error"),
                       None, code)
        return err.response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return ApiError(500, "The gateway hit an unexpected error.", "server_error",
                        None, "internal_error").response()


# ------------------------------------------------------------------ state


@dataclass(slots=True)
class Pool:
    """One model's backend capacity: its admission state and upstream."""

    entry: ModelEntry
    admission: Admission
    upstream: UpstreamClient


@dataclass(slots=True)
class Gateway:
    config: Config
    catalog: Catalog
    pools: dict[str, Pool] = field(default_factory=dict)
    upstreams: dict[str, UpstreamClient] = field(default_factory=dict)
    ledger: Ledger | None = None
    keys: KeyStore | None = None  # when [keys] is configured
    limiter: KeyLimiter | None = None
    allow_remote_without_keys: bool = False
    ready: bool = False
    models_body: bytes = b""
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    draining: bool = False
    waiting: set[asyncio.Task[Any]] = field(default_factory=set)  # queued in admission
    watchdog: WriteWatchdog = field(init=False)  # from config.server.write_timeout_s

    def __post_init__(self) -> None:
        self.watchdog = WriteWatchdog(self.config.server.write_timeout_s)

    def begin_drain(self) -> int:
        """Stop taking work: not ready, new requests and every queued one get 503.

        Requests already holding a slot (streams included) run on; the server's
        shutdown timeout is their deadline. Returns how many waiters were shed.
        """
        self.ready = False
        self.draining = True
        return sum(1 for task in list(self.waiting) if task.cancel(_DRAIN))

    def bases(self) -> dict[str, str]:
        return {name: u.base_url for name, u in self.upstreams.items()}

    def snapshot(self) -> WorkerSnapshot:
        """This process's admission state and request metrics (tierq.metrics)."""
        pools = (PoolSnapshot(p.entry.id, p.entry.upstream, p.entry.priority,
                              p.entry.admission.queue_depth, p.admission.stats())
                 for p in self.pools.values())
        return self.metrics.snapshot(pools, ready=self.ready, ledger=self.ledger)


CONFIG: Final = web.AppKey("tierq.config", Config)
GATEWAY: Final = web.AppKey("tierq.gateway", Gateway)

#: Starts the backends of the given kind="sim" upstreams inside the app's event
#: loop, yields each one's base URL by upstream name, and stops them on exit
#: (`tierq.embedded.start_sims`, which the CLI passes).
StartSims = Callable[[Sequence[UpstreamConfig]], contextlib.AbstractAsyncContextManager[Mapping[str, str]]]


def create_app(
    config: Config,
    *,
    ledger: Ledger | None = None,
    sim: Any = None,
    start_sims: StartSims | None = None,
    allow_remote_without_keys: bool = False,
    pools: Mapping[str, Admission] | None = None,
    key_buckets: SharedKeyBuckets | None = None,
) -> web.Application:
    """The gateway app for `config`.

    ledger: an already started Ledger to record into (the caller closes it);
      by default the app opens `config.ledger.url` at start-up and closes it.
    sim: a running tierq.sim.SimServer that every upstream of kind "sim" uses.
    start_sims: else, what starts those upstreams' backends inside the app's
      event loop at start-up and stops them at shutdown (`tierq serve` passes
      `tierq.embedded.start_sims`: one in-process sim per such upstream, on a
      free loopback port). An upstream of kind "sim" needs one or the other.
    allow_remote_without_keys: serve non-loopback clients with no API keys
      configured (`tierq serve --insecure-no-auth`).
    pools: admission per model id, made by the caller (`tierq serve --workers
      N` passes this worker's handles on the shared pools); by default each
      model gets its own one-process `Admission`.
    key_buckets: the host's per-key limit table (`tierq serve --workers N`);
      by default per-key buckets are this process's own.
    """
    if sim is None and start_sims is None:
        for u in config.upstreams:
            if u.kind == "sim":
                raise ValueError(f"upstream {u.name!r} is of kind \"sim\": pass create_app a "
                                 "running sim (sim=) or what starts it (start_sims=)")
    catalog = Catalog.from_config(config)
    gw = Gateway(config, catalog, ledger=ledger,
                 allow_remote_without_keys=allow_remote_without_keys)
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[request_log, _errors],
        handler_args={"keepalive_timeout": config.server.keepalive_timeout_s},
    )
    app[CONFIG] = config
    app[GATEWAY] = gw
    app.cleanup_ctx.append(_lifecycle(gw, sim, start_sims, own_ledger=ledger is None,
                                      pools=pools, key_buckets=key_buckets))
    for prefix in ("/v1", "/v1/openai"):
        for endpoint in ENDPOINT_PATHS:
            app.router.add_post(f"{prefix}/{endpoint}", _endpoint_handler(endpoint))
        app.router.add_get(f"{prefix}/models", _models)
    app.router.add_post("/v1/forward", _forward)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    add_routes(app, MetricsSource(_local_snapshots(gw)))
    return app


def _local_snapshots(gw: Gateway) -> Callable[[], Awaitable[list[WorkerSnapshot]]]:
    async def collect() -> list[WorkerSnapshot]:
        return [gw.snapshot()]

    return collect


def _lifecycle(
    gw: Gateway, sim: Any, start_sims: StartSims | None, *, own_ledger: bool,
    pools: Mapping[str, Admission] | None = None, key_buckets: SharedKeyBuckets | None = None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # The sims are entered first and exited last: every upstream client is
        # closed before its backend goes.
        async with contextlib.AsyncExitStack() as sims:
            try:
                embedded = [u for u in gw.config.upstreams if u.kind == "sim"]
                sim_urls: Mapping[str, str] = {}
                if sim is not None:
                    sim_urls = {u.name: sim.url for u in embedded}
                elif embedded and start_sims is not None:
                    sim_urls = await sims.enter_async_context(start_sims(embedded))
                base_urls = {u.name: sim_urls[u.name] if u.kind == "sim" else u.base_url
                             for u in gw.config.upstreams}
                pool_sizes: dict[str, int] = {}
                for m in gw.catalog.values():
                    pool_sizes[m.upstream] = pool_sizes.get(m.upstream, 0) + m.admission.max_concurrency
                for u in gw.config.upstreams:
                    size = u.max_connections or min(pool_sizes.get(u.name, 1), 4096)
                    client = UpstreamClient(u, base_urls[u.name], size)
                    await client.start()
                    gw.upstreams[u.name] = client
                for m in gw.catalog.values():
                    adm = pools[m.id] if pools is not None else Admission(**m.admission.admission_kwargs())
                    gw.pools[m.id] = Pool(m, adm, gw.upstreams[m.upstream])
                gw.models_body = _models_body(gw)
                if gw.ledger is None:
                    gw.ledger = open_ledger(gw.config.ledger.url, gw.config.ledger.durability)
                    await gw.ledger.start()
                if gw.config.keys.path is not None:
                    gw.keys = KeyStore(gw.config.keys.path)
                    gw.limiter = KeyLimiter(shared=key_buckets)
                gw.watchdog.start()
                gw.ready = True
                yield
            finally:
                gw.ready = False
                await gw.watchdog.stop()
                for client in gw.upstreams.values():
                    await client.close()
                if gw.keys is not None:
                    gw.keys.close()
                if own_ledger and gw.ledger is not None:
                    await gw.ledger.close()

    return ctx


# ------------------------------------------------------------------ request intake


@functools.lru_cache(maxsize=1024)
def _is_loopback(remote: str | None) -> bool:
    # Cached: parsing the peer address was ~2% of a request's CPU in profiles,
    # and a gateway sees the same few peers again and again.
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _authenticate(gw: Gateway, request: web.Request) -> KeyInfo | None:
    """The caller's KeyInfo, or None in loopback-only mode (no keys configured)."""
    if gw.keys is None:
        if not gw.allow_remote_without_keys and not _is_loopback(request.remote):
            raise ApiError(403, "This tierq gateway has no API keys configured and serves "
                           "loopback clients only.", code="unauthenticated_remote")
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key. Pass it as "
                       "'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key")
    info = gw.keys.authenticate(token.strip())
    if info is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return info


async def _read_json(gw: Gateway, request: web.Request) -> dict[str, Any]:
    ctype = request.content_type
    if ctype != JSON_TYPE:
        raise ApiError(415, f"Unsupported Content-Type {ctype or '(none)'!r}: send the body "
                       "as application/json.", code="unsupported_media_type")
    limit = gw.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"Request body too large: {request.content_length} bytes, "
                       f"the limit is {limit}.", code="request_too_large")
    try:
        if request.content.is_eof():
            # The whole body came with the headers (the usual case for a small
            # request): reading it cannot wait, so no timer is armed.
            raw = await request.read()
        else:
            async with asyncio.timeout(gw.config.server.body_timeout_s):
                raw = await request.read()
    except TimeoutError:
        raise ApiError(408, "Timed out reading the request body.",
                       code="request_timeout") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"Request body too large: the limit is {limit} bytes.",
                       code="request_too_large") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "We could not parse the JSON body of your request. "
                       "(HINT: This likely means you aren't using your HTTP library "
                       "correctly.)", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _invalid_type(param: str, expected: str) -> ApiError:
    return ApiError(400, f"Invalid type for '{param}': expected {expected}.",
                    param=param, code="invalid_type")


def _validate(endpoint: str, body: dict[str, Any]) -> None:
    """Shape checks the gateway needs to route and bill; engines check the rest."""
    if endpoint == "chat/completions":
        messages = body.get("messages")
        if messages is None:
            raise ApiError(400, "Missing required parameter: 'messages'.", param="messages",
                           code="missing_required_parameter")
        if not isinstance(messages, list):
            raise _invalid_type("messages", "an array of messages")
    elif endpoint == "completions":
        if "prompt" not in body:
            raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt",
                           code="missing_required_parameter")
    elif "input" not in body:
        raise ApiError(400, "Missing required parameter: 'input'.", param="input",
                       code="missing_required_parameter")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean")
    if endpoint == "embeddings" and stream:
        raise ApiError(400, "Embeddings cannot be streamed.", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _invalid_type("stream_options", "an object")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise _invalid_type(name, "a non-negative integer")


def _text_len(value: Any) -> int:
    """Characters of text in a prompt-like value (messages, strings, lists)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_len(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_len(v) for k, v in value.items() if k in ("content", "text"))
    return 1 if isinstance(value, int) else 0  # token ids count one each


def _estimate_prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    field_name = {"chat/completions": "messages", "completions": "prompt"}.get(endpoint, "input")
    # About four characters per token: only an estimate, for per-key token limits
    # and for billing a stream cut short before the upstream reported usage.
    return max(1, math.ceil(_text_len(body.get(field_name)) / 4))


def _estimate_completion_cap(body: dict[str, Any]) -> int:
    v = body.get("max_completion_tokens", body.get("max_tokens"))
    return v if isinstance(v, int) and not isinstance(v, bool) else 256


# ------------------------------------------------------------------ one request


@dataclass(slots=True)
class _Ctx:
    """What the ledger row of one request is made from."""

    gw: Gateway
    request_id: str
    key: KeyInfo | None
    key_id: str
    pool: Pool
    endpoint: str
    requested_tier: str | None
    tier: str
    t0: float
    ts: float
    est_prompt: int
    est_total: int
    info: RequestInfo
    queue_ms: float = 0.0
    recorded: bool = False
    ttft_s: float | None = None  # first token delivered (streams), from t0

    def cost(self, prompt: int, completion: int) -> Decimal:
        return price_cost(prompt, completion, self.pool.entry.prices, self.tier,
                          self.gw.config.pricing.priority_multiplier)

    def row(self, status: str, prompt: int = 0, completion: int = 0, cost: Decimal | None = None,
            *, partial: bool = False, code: str | None = None) -> LedgerRow:
        # Marked before the write is even queued: a cancellation arriving while
        # `record` is awaited must not add a second row for the same request.
        self.recorded = True
        latency_s = time.monotonic() - self.t0
        row = LedgerRow(
            request_id=self.request_id, ts=self.ts, key_id=self.key_id,
            model=self.pool.entry.id, endpoint=ENDPOINT_PATHS[self.endpoint],
            requested_tier=self.requested_tier, applied_tier=self.tier,
            prompt_tokens=prompt, completion_tokens=completion,
            cost=cost if cost is not None else Decimal(0), status=status, partial=partial,
            code=code, queue_ms=self.queue_ms,
            latency_ms=latency_s * 1000.0, upstream=self.pool.upstream.name,
        )
        # The same decision feeds /metrics and the access log line.
        self.info.row = row
        self.gw.metrics.observe(row.model, self.pool.upstream.name, self.tier, status, code,
                                self.queue_ms / 1000.0, latency_s,
                                self.ttft_s if self.ttft_s is not None else latency_s)
        return row

    def record_nowait(self, row: LedgerRow) -> None:
        assert self.gw.ledger is not None
        self.gw.ledger.record_nowait(row)

    async def record(self, row: LedgerRow) -> None:
        assert self.gw.ledger is not None
        await self.gw.ledger.record(row)

    def headers(self) -> dict[str, str]:
        # x-request-id echoes the client's id when it sent one; the gateway's own
        # (the ledger's request_id) is always in x-tierq-request-id.
        return {TIER_HEADER: self.tier, QUEUE_HEADER: f"{self.queue_ms:.3f}",
                "x-request-id": self.info.echo, "x-tierq-request-id": self.request_id}

    def settle(self, real_total: int) -> None:
        if self.gw.limiter is not None and self.key is not None:
            self.gw.limiter.settle(self.key, self.est_total, real_total)


def _endpoint_handler(endpoint: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _inference(request, endpoint, None)

    handler.__name__ = "handle_" + endpoint.replace("/", "_")
    return handler


async def _forward(request: web.Request) -> web.StreamResponse:
    """POST /v1/forward?u=<url-encoded upstream URL>: same path, pinned upstream."""
    gw = request.app[GATEWAY]
    target = request.query.get("u")
    if not target:
        raise ApiError(400, "Missing required query parameter 'u' (the url-encoded "
                       "upstream URL).", param="u", code="missing_required_parameter")
    # Decided on the string alone, before any connection is made.
    match = match_forward_target(target, gw.bases())
    if match is None:
        raise ApiError(403, "Forward target is not allowed: it must start with a configured "
                       "upstream's base_url and name a supported endpoint.", param="u",
                       code="forward_target_not_allowed")
    name, endpoint = match
    return await _inference(request, endpoint, gw.upstreams[name])


def _shed_response(ctx: _Ctx, code: str, retry_after_s: float, retry_after_ms: int,
                   message: str) -> ApiError:
    if not math.isfinite(retry_after_s):  # no honest estimate: the longest wait
        retry_after_s, retry_after_ms = RETRY_AFTER_MAX_S, RETRY_AFTER_MAX_S * 1000
    # At least 1 ms: the openai SDK treats 0 as "no hint" and backs off on its own.
    ms = max(1, retry_after_ms)
    secs = min(RETRY_AFTER_MAX_S, max(1, math.ceil(retry_after_s)))
    headers = ctx.headers()
    headers["retry-after-ms"] = str(ms)
    headers["Retry-After"] = str(secs)
    return ApiError(429, message, "rate_limit_error", None, code, headers)


_SHED_MESSAGES: Final = {
    "server_overloaded": "The model is overloaded and its queue is full. Retry after the "
                         "time given, or send service_tier=\"priority\" on a priority-enabled model.",
    "queue_timeout": "The request waited in the queue longer than allowed and was shed.",
    "rate_limit_exceeded": "Rate limit reached for this model.",
}


async def _inference(
    request: web.Request, endpoint: str, forced: UpstreamClient | None
) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    t0 = time.monotonic()
    ts = time.time()
    key = _authenticate(gw, request)
    body = await _read_json(gw, request)
    model_id = body.get("model")
    if model_id is not None and not isinstance(model_id, str):
        raise _invalid_type("model", "a string")
    pool = gw.pools.get(model_id) if model_id else None
    if pool is None or (forced is not None and pool.upstream is not forced):
        message = ("You must provide a model parameter." if not model_id else
                   f"The model `{model_id}` does not exist or you do not have access to it.")
        raise ApiError(404, message, param="model", code="model_not_found")
    _validate(endpoint, body)
    requested = body.get("service_tier")
    try:
        tier = resolve_tier(requested, pool.entry.priority)
    except InvalidTier as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
    est_prompt = _estimate_prompt_tokens(endpoint, body)
    est_total = est_prompt + (0 if endpoint == "embeddings" else _estimate_completion_cap(body))
    info = request_info(request)
    ctx = _Ctx(gw, info.id, key, key.public_id if key is not None else ANONYMOUS_KEY,
               pool, endpoint, requested if isinstance(requested, str) else None, tier,
               t0, ts, est_prompt, est_total, info)
    if gw.limiter is not None and key is not None:
        wait_s = gw.limiter.check(key, est_total)
        if wait_s is not None:
            ctx.record_nowait(ctx.row("shed", code="rate_limit_exceeded"))
            raise _shed_response(ctx, "rate_limit_exceeded", wait_s, math.ceil(wait_s * 1000),
                                 "Rate limit reached for this API key (requests or tokens "
                                 "per minute).")
    task = asyncio.current_task()
    assert task is not None
    if gw.draining:
        raise _drain_response(ctx)
    gw.waiting.add(task)
    try:
        async with pool.admission.acquire(tier) as slot:
            gw.waiting.discard(task)
            ctx.queue_ms = float(slot.queue_ms)
            return await _call_upstream(request, ctx, body)
    except Shed as e:
        ctx.queue_ms = (time.monotonic() - t0) * 1000.0
        ctx.record_nowait(ctx.row("shed", code=e.code))
        raise _shed_response(ctx, e.code, e.retry_after_s, e.retry_after_ms,
                             _SHED_MESSAGES.get(e.code, "Request shed.")) from None
    except asyncio.CancelledError as e:
        if e.args == (_DRAIN,) and not ctx.recorded:
            task.uncancel()
            raise _drain_response(ctx) from None
        # The client went away while queued or before anything was delivered.
        if not ctx.recorded:
            ctx.record_nowait(ctx.row("cancelled", code="client_disconnected"))
        raise
    finally:
        gw.waiting.discard(task)


def _drain_response(ctx: _Ctx) -> ApiError:
    ctx.queue_ms = (time.monotonic() - ctx.t0) * 1000.0
    ctx.record_nowait(ctx.row("shed", code="server_shutting_down"))
    headers = ctx.headers()
    headers["retry-after-ms"] = str(DRAIN_RETRY_AFTER_S * 1000)
    headers["Retry-After"] = str(DRAIN_RETRY_AFTER_S)
    return ApiError(503, "The gateway is shutting down; retry the request.", "server_error",
                    None, "server_shutting_down", headers)


async def _call_upstream(request: web.Request, ctx: _Ctx, body: dict[str, Any]) -> web.StreamResponse:
    pool = ctx.pool
    up_cfg: UpstreamConfig = pool.upstream.config
    info = rewrite_request(body, kind=up_cfg.kind, priority_scheduling=up_cfg.priority_scheduling,
                           applied_tier=ctx.tier, endpoint=ctx.endpoint,
                           upstream_model=pool.entry.upstream_model)
    payload = orjson.dumps(body)
    try:
        async with pool.upstream.post(ctx.endpoint, payload, request.headers.get(BYO_HEADER)) as up:
            if not 200 <= up.status < 300:
                return await _upstream_error(ctx, up)
            if info.stream and up.content_type == "text/event-stream":
                return await _relay_stream(request, ctx, up, info.client_wants_usage, body)
            return await _relay_json(request, ctx, up, body)
    except (aiohttp.ClientError, TimeoutError) as e:
        if ctx.recorded:
            raise
        code = "upstream_timeout" if isinstance(e, TimeoutError) else "upstream_unavailable"
        ctx.record_nowait(ctx.row("failed", code=code))
        status = 504 if code == "upstream_timeout" else 502
        raise ApiError(status, f"The upstream serving this model failed: {type(e).__name__}.",
                       "server_error", None, code, ctx.headers()) from None


async def _upstream_error(ctx: _Ctx, up: aiohttp.ClientResponse) -> web.StreamResponse:
    raw = await up.read()
    ctx.record_nowait(ctx.row("failed", code=f"upstream_{up.status}"))
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    headers = ctx.headers()
    if up.status < 500 and isinstance(data, dict) and isinstance(data.get("error"), dict):
        # The engine's own 4xx (bad parameter, context too long): the client's to fix.
        return web.Response(status=up.status, body=orjson.dumps(data), content_type=JSON_TYPE,
                            headers=headers)
    raise ApiError(502, f"The upstream serving this model answered HTTP {up.status}.",
                   "server_error", None, "upstream_error", headers)


def _estimate_output_tokens(data: dict[str, Any]) -> int:
    choices = data.get("choices")
    if not isinstance(choices, list):
        return 0
    chars = sum(_text_len(c.get("message") or c.get("text") or "") for c in choices
                if isinstance(c, dict))
    return math.ceil(chars / 4)


async def _write(request: web.Request, resp: web.StreamResponse, data: bytes, *,
                 last: bool = False) -> None:
    """Send `data` (and end the response if `last`), waiting for the client to
    read (aiohttp's drain is the backpressure) at most `write_timeout_s`
    (tierq.watchdog); past it the connection is cut and ClientWriteTimeout raised."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("Cannot write to closing transport")
    watchdog = request.app[GATEWAY].watchdog
    watchdog.begin(transport)
    try:
        await (resp.write_eof(data) if last else resp.write(data))
    except BaseException as e:
        if not watchdog.end(transport):
            raise
        if isinstance(e, asyncio.CancelledError):
            # The cancel came from aiohttp seeing the aborted connection, not
            # from anyone who wants this task to stop: it is the timeout.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        raise ClientWriteTimeout() from None
    if watchdog.end(transport):
        raise ClientWriteTimeout()


async def _relay_json(request: web.Request, ctx: _Ctx, up: aiohttp.ClientResponse,
                      body: dict[str, Any]) -> web.StreamResponse:
    raw = await up.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        ctx.record_nowait(ctx.row("failed", code="upstream_bad_response"))
        raise ApiError(502, "The upstream answered with something that is not a JSON object.",
                       "server_error", None, "upstream_bad_response", ctx.headers())
    usage = data.get("usage")
    tokens = usage_tokens(usage)
    code = None
    if tokens is None:
        # An upstream that reports no usage is billed on an estimate, and the
        # estimate is what the response says, so billed still equals echoed.
        tokens = (ctx.est_prompt, _estimate_output_tokens(data))
        usage = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1],
                 "total_tokens": tokens[0] + tokens[1]}
        data["usage"] = usage
        code = "usage_estimated"
    amount = ctx.cost(*tokens)
    data["service_tier"] = ctx.tier
    assert isinstance(usage, dict)
    usage["estimated_cost"] = render_cost(amount)
    out = orjson.dumps(data)
    transport = request.transport
    if transport is None or transport.is_closing():
        # The client left while the upstream answered: nothing was delivered.
        ctx.record_nowait(ctx.row("cancelled", code="client_disconnected"))
        ctx.settle(0)
        return web.Response(status=499)  # nginx's "client closed request"; nobody reads it
    if len(out) <= _ONE_WRITE_MAX and transport.get_write_buffer_size() == 0:
        # The usual case. A body this small goes into the socket without
        # waiting on the client (nothing is queued ahead of it and it is below
        # the transport's high-water mark), so no write timeout is needed: the
        # bill is committed, then aiohttp sends headers and body in one write.
        await ctx.record(ctx.row("served", tokens[0], tokens[1], amount, code=code))
        ctx.settle(tokens[0] + tokens[1])
        return web.Response(body=out, headers=ctx.headers(), content_type=JSON_TYPE)
    # A large body may have to wait for the client to read: it is written here,
    # under the write timeout, as all but the last byte, then the bill
    # (committed before the client can see a complete response), then the last byte.
    resp = web.StreamResponse(headers=ctx.headers())
    resp.content_type = JSON_TYPE
    resp.content_length = len(out)
    await resp.prepare(request)
    try:
        await _write(request, resp, out[:-1])
    except (ClientWriteTimeout, ConnectionResetError) as e:
        # A JSON body cut short is of no use to the client: nothing is billed.
        code = "client_write_timeout" if isinstance(e, ClientWriteTimeout) else "client_disconnected"
        ctx.record_nowait(ctx.row("cancelled", code=code))
        ctx.settle(0)
        return resp
    await ctx.record(ctx.row("served", tokens[0], tokens[1], amount, code=code))
    ctx.settle(tokens[0] + tokens[1])
    try:
        await _write(request, resp, out[-1:], last=True)
    except (ClientWriteTimeout, ConnectionResetError):
        pass  # billed already: all but one byte was delivered
    return resp



async def _relay_stream(
    request: web.Request, ctx: _Ctx, up: aiohttp.ClientResponse, client_wants_usage: bool,
    body: dict[str, Any],
) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no", **ctx.headers()})
    await resp.prepare(request)
    splitter = EventSplitter()
    rewriter = StreamRewriter(ctx.tier, client_wants_usage, ctx.cost)
    delivered = 0  # tokens written to the client

    async def send(events: list[bytes], tokens: int) -> None:
        nonlocal delivered
        await _write(request, resp, b"".join(events))
        delivered += tokens
        if delivered and ctx.ttft_s is None:
            ctx.ttft_s = time.monotonic() - ctx.t0

    async def relay(payloads: list[bytes]) -> bool:
        """Rewrite and send what one read completed, in one write; True at [DONE]."""
        events: list[bytes] = []
        tokens = 0
        try:
            for payload in payloads:
                if payload == DONE:
                    return True
                out, n = rewriter.event(payload)
                if out:
                    events.append(out)
                    tokens += n
            return False
        finally:
            if events:  # sent even when a later event is [DONE] or broken
                await send(events, tokens)

    def bill_cut_short(code: str | None = None) -> None:
        # The client went away (or stopped reading) mid-stream: bill what was
        # delivered, mark it partial. Leaving `up`'s context closes the upstream
        # connection, which cancels the generation there; leaving the admission
        # context frees the slot.
        if ctx.recorded:
            return
        if code is None:
            code = "server_shutting_down" if ctx.gw.draining else "client_disconnected"
        if delivered == 0:
            # Nothing the client could use was delivered: nothing is billed.
            ctx.record_nowait(ctx.row("cancelled", code=code))
            ctx.settle(0)
            return
        usage = rewriter.usage
        prompt = usage[0] if usage else ctx.est_prompt
        completion = min(delivered, usage[1]) if usage else delivered
        ctx.record_nowait(ctx.row("cancelled", prompt, completion, ctx.cost(prompt, completion),
                                  partial=True, code=code))
        ctx.settle(prompt + completion)

    try:
        try:
            # Everything one read brings is rewritten and sent in one write: one
            # event per write while the client keeps up, fewer writes (and system
            # calls) per event when the gateway is behind.
            complete = False
            async for chunk in up.content.iter_any():
                if await relay(splitter.feed(chunk)):
                    complete = True
                    break
            if not complete:
                last = splitter.close()
                complete = last is not None and await relay([last])
            if not complete:
                raise UpstreamStreamError(None)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError,
                UpstreamStreamError) as e:
            if isinstance(e, ConnectionResetError):
                raise  # our write to the client failed: handled below as a disconnect
            # The upstream broke the stream: nothing is billed for a broken answer.
            if not ctx.recorded:
                ctx.record_nowait(ctx.row("failed", ctx.est_prompt, delivered,
                                          partial=delivered > 0, code="upstream_stream_error"))
            err = e.obj if isinstance(e, UpstreamStreamError) and e.obj is not None else {
                "error": {"message": "The upstream stream ended before it was complete.",
                          "type": "server_error", "param": None, "code": "upstream_stream_error"},
                "service_tier": ctx.tier}
            await _write(request, resp, encode_event(err), last=True)
        else:
            # [DONE]: the bill is committed before the client sees the end.
            prompt, completion = rewriter.usage or (ctx.est_prompt, delivered)
            await ctx.record(ctx.row("served", prompt, completion, ctx.cost(prompt, completion),
                                     code=None if rewriter.usage else "usage_estimated"))
            ctx.settle(prompt + completion)
            await _write(request, resp, DONE_EVENT, last=True)
    except asyncio.CancelledError:
        bill_cut_short()
        raise
    except ConnectionResetError:
        bill_cut_short()
    except ClientWriteTimeout:
        bill_cut_short("client_write_timeout")  # a no-op once the row is in
    return resp


# ------------------------------------------------------------------ other routes


def _models_body(gw: Gateway) -> bytes:
    return orjson.dumps(models_payload(gw.catalog, gw.config.pricing.priority_multiplier))


def models_payload(catalog: Catalog, mult: Decimal) -> dict[str, Any]:
    """The body of GET /v1/models (also `tierq models --json`)."""
    data = []
    for m in catalog.values():
        pricing: dict[str, Any] = {
            "currency": "USD", "unit": "1M tokens",
            "input": render_cost(m.prices.input_per_m),
            "output": render_cost(m.prices.output_per_m),
        }
        if m.priority:
            pricing["priority_input"] = render_cost(m.prices.input_per_m * mult)
            pricing["priority_output"] = render_cost(m.prices.output_per_m * mult)
        data.append({"id": m.id, "object": "model", "created": 0, "owned_by": m.upstream,
                     "priority": m.priority, "pricing": pricing})
    return {"object": "list", "data": data}


async def _models(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    _authenticate(gw, request)
    return web.Response(body=gw.models_body, content_type=JSON_TYPE)


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON_TYPE)


async def _readyz(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    if not gw.ready:
        raise ApiError(503, "Not ready.", "server_error", None, "not_ready")
    return web.Response(body=b'{"status":"ready"}', content_type=JSON_TYPE)
