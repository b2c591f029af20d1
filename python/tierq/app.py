"""The HTTP gateway: OpenAI routes, tier echo, metering, admission, relaying.

`create_app(config)` builds the aiohttp application. A request goes: parse
(size- and time-bounded, orjson) -> auth -> model -> tier -> per-key limits ->
admission (Rust core) -> upstream (streamed) -> rewrite `service_tier` and
`usage.estimated_cost` -> ledger commit -> the response's last bytes.
Serve it with handler cancellation on (see `runner_kwargs`).
"""


from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from tierq._core import SharedKeyBuckets
from tierq.admin import add_admin_routes
from tierq.admission import Admission, Shed
from tierq.capacity import OVERLOAD_STATUSES, overload_backoff_s
from tierq.cluster import CLOSED_RETRY_AFTER_S, ClusterUnavailable
from tierq.config import Config, UpstreamConfig
from tierq.errors import JSON_TYPE, ApiError, api_errors, invalid_type
from tierq.gateway import CLUSTER_CLOSED, CONFIG, DRAIN, GATEWAY, Gateway
from tierq.health import Outcome
from tierq.intake import (ANONYMOUS_KEY, ENDPOINT_PATHS, authenticate, estimate_completion_cap,
                          estimate_prompt_tokens, flow_of, max_queue_ms, read_json, validate)
from tierq.lifecycle import StartSims, lifecycle
from tierq.logs import ServerLog, request_info, request_log
from tierq.metrics import WorkerSnapshot
from tierq.outcome import (Exchange, Refused, cancelled, cluster_refused, drained, failed,
                           deadline_refused, key_refused, pool_shed, upstream_overloaded)
from tierq.pricing import DEFAULT_FLEX_MULTIPLIER, render_cost
from tierq.relay import relay_json, relay_stream, upstream_error
from tierq.routing import Route
from tierq.served import Catalog
from tierq.sse import MAX_EVENT_BYTES
from tierq.stores import LedgerStore
from tierq.status import MetricsSource, add_routes
from tierq.tiers import InvalidTier, resolve_tier
from tierq.tracing import TRACEPARENT, TRACESTATE
from tierq.upstream import BYO_HEADER, UpstreamClient, malformed_answer, match_forward_target, rewrite_request

__all__ = [
    "CONFIG",
    "GATEWAY",
    "Gateway",
    "StartSims",
    "create_app",
    "models_payload",
    "runner_kwargs",
]


def runner_kwargs() -> dict[str, Any]:
    """How a tierq app must be served (web.AppRunner / web.run_app keywords).

    Handler cancellation is what lets a client that hangs up leave the queue,
    cancel its upstream request and free its slot; aiohttp has it off by default.
    """
    # A malformed request is one rate-limited warning line, not an error
    # with a traceback (tierq.logs.ServerLog).
    return {"handler_cancellation": True, "access_log": None, "shutdown_timeout": 5.0,
            "logger": ServerLog()}



def create_app(
    config: Config,
    *,
    ledger: LedgerStore | None = None,
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
    gw = Gateway.from_config(config, ledger=ledger, pools=pools,
                             allow_remote_without_keys=allow_remote_without_keys)
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[request_log, api_errors],
        handler_args={"keepalive_timeout": config.server.keepalive_timeout_s},
    )
    app[CONFIG] = config
    app[GATEWAY] = gw
    gw.models_body = _models_body(gw)
    shared_worker = getattr(pools, "index", 0) if pools is not None else None
    # How many workers share the pools (their snapshot board knows).
    workers = int(getattr(getattr(pools, "board", None), "workers", 1))
    app.cleanup_ctx.append(lifecycle(gw, sim, start_sims, own_ledger=ledger is None,
                                     shared_worker=shared_worker, key_buckets=key_buckets,
                                     workers=workers))
    for prefix in ("/v1", "/v1/openai"):
        for endpoint in ENDPOINT_PATHS:
            app.router.add_post(f"{prefix}/{endpoint}", _endpoint_handler(endpoint))
        app.router.add_get(f"{prefix}/models", _models)
    app.router.add_post("/v1/forward", _forward)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    add_routes(app, MetricsSource(_local_snapshots(gw)))
    add_admin_routes(app, config.admin)
    return app


def _local_snapshots(gw: Gateway) -> Callable[[], Awaitable[list[WorkerSnapshot]]]:
    async def collect() -> list[WorkerSnapshot]:
        return [gw.snapshot()]

    return collect


# ------------------------------------------------------------------ one request


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


async def _inference(
    request: web.Request, endpoint: str, forced: UpstreamClient | None
) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    t0 = time.monotonic()
    ts = time.time()
    key = authenticate(gw, request)
    flow = flow_of(request, key)
    deadline_ms = max_queue_ms(request)
    body = await read_json(gw, request)
    model_id = body.get("model")
    if model_id is not None and not isinstance(model_id, str):
        raise invalid_type("model", "a string")
    pool = gw.pools.get(model_id) if model_id else None
    if pool is None or (forced is not None and pool.upstream is not forced):
        message = ("You must provide a model parameter." if not model_id else
                   f"The model `{model_id}` does not exist or you do not have access to it.")
        raise ApiError(404, message, param="model", code="model_not_found")
    validate(endpoint, body, gw.config.server.max_n)
    requested = body.get("service_tier")
    try:
        tier = resolve_tier(requested, pool.entry.priority, pool.entry.flex)
    except InvalidTier as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
    est_prompt = estimate_prompt_tokens(endpoint, body)
    est_total = est_prompt + (0 if endpoint == "embeddings" else estimate_completion_cap(body))
    ex = Exchange(gw, request, request_info(request), key,
                  key.public_id if key is not None else ANONYMOUS_KEY, pool, endpoint,
                  requested if isinstance(requested, str) else None, tier, t0, ts,
                  est_prompt, est_total, flow, deadline_ms)
    if gw.tracer is not None:
        ex.trace = gw.tracer.begin(request.headers.get(TRACEPARENT), request.headers.get(TRACESTATE))
    if flow.ignored:
        gw.metrics.fairness_ignored += 1
    # The one way out: a refusal is finished here; the relays finish what ends
    # once the response has begun; anything else still leaves one row.
    try:
        return await _admitted(request, ex, body)
    except Refused as r:
        raise ex.refuse(r) from None
    except BaseException as e:
        if not ex.done:
            # The client went away while queued or before anything was
            # delivered; or a bug, not a decision: still one row, the key made whole.
            ex.finish(cancelled("client_disconnected") if isinstance(e, asyncio.CancelledError)
                      else failed("internal_error", 500))
        raise


async def _admitted(request: web.Request, ex: Exchange, body: dict[str, Any]) -> web.StreamResponse:
    """The key's limits, the pool's admission, then the upstream."""
    gw = ex.gw
    try:
        wait_s = await ex.admit_key_shared() if gw.cluster is not None else ex.admit_key()
        if gw.cluster is not None:
            gw.cluster.check_open()
    except ClusterUnavailable as e:
        raise cluster_refused(e.retry_after_s) from None
    if wait_s is not None:
        raise key_refused(wait_s)
    if gw.cluster is not None:
        try:
            await ex.downgrade_shared()
        except ClusterUnavailable as e:
            raise cluster_refused(e.retry_after_s) from None
    else:
        ex.downgrade()
    if gw.draining:
        raise drained()
    task = asyncio.current_task()
    assert task is not None
    if gw.cluster is not None:
        gw.cluster.wake()  # the agent checks whether the lease still covers the queue
    traced = ex.trace is not None and ex.trace.sampled
    if traced:
        ex.queued_at = time.monotonic()
    # A request its key's limits refused in shadow mode takes nothing from the
    # pool's bucket: enforcing, it never reached it, and the bucket must stand
    # where enforcing leaves it.
    ex.slot = slot = ex.pool.admission.acquire(ex.tier, 0 if ex.key_shadow_refused else 1,
                                               flow=ex.flow.name,
                                               weight=ex.flow.weight, charge=ex.charge,
                                               max_wait_ms=ex.deadline_ms)
    router = ex.pool.upstream.router if ex.pool.replicas is not None else None
    route = router.route(ex.endpoint, body) if router is not None else None
    if route is not None:
        slot.home = route.homes
    gw.waiting.add(task)
    ex.pool.flows.queued(ex.flow.name, ex.est_total)
    try:
        async with slot:
            gw.waiting.discard(task)
            ex.rate_shadowed()
            current = gw.pools.get(ex.pool.entry.id)
            if current is not None and current is not ex.pool and current.admission is ex.pool.admission:
                # Reloaded while it waited: the prices and upstream in force at
                # admission apply (docs/operations.md, Reloading the config).
                ex.pool = current
            request_info(request).config = gw.config_sha256
            if traced:
                ex.admitted_at = time.monotonic()
            if slot.queue_ns:
                ex.pool.flows.waited(ex.flow.name)
            if slot.predicted_wait_s is not None:
                gw.metrics.observe_prediction(ex.tier, slot.predicted_wait_s, slot.queue_ms / 1000)
            replicas = ex.pool.replicas
            if replicas is None:
                return await _call_upstream(request, ex, body)
            # The pool's slot is held: take a replica by the request's order
            # (tierq.routing), and give it back before the pool's slot.
            if route is None or ex.pool.upstream.router is not router:  # reloaded while it waited
                router = ex.pool.upstream.router
                route = router.route(ex.endpoint, body)
            ex.replica = replicas.pick(route.order, route.rule)
            try:
                return await _call_upstream(request, ex, body)
            finally:
                replicas.release(ex.replica)
                slot.ran_on = ex.replica + 1
    except Shed as e:
        if e.deadline_refused:
            raise deadline_refused(e.predicted_wait_s, ex.max_queue_ms, e.retry_after_s, ex.tier) from None
        raise pool_shed(e.code, e.retry_after_s, ex.tier) from None
    except asyncio.CancelledError as e:
        if ex.done or e.args not in ((DRAIN,), (CLUSTER_CLOSED,)):
            raise
        task.uncancel()
        raise (drained() if e.args == (DRAIN,) else cluster_refused(CLOSED_RETRY_AFTER_S)) from None
    finally:
        gw.waiting.discard(task)


async def _call_upstream(request: web.Request, ex: Exchange, body: dict[str, Any]) -> web.StreamResponse:
    pool = ex.pool
    up_cfg: UpstreamConfig = pool.upstream.config
    info = rewrite_request(body, kind=up_cfg.kind, priority_scheduling=up_cfg.priority_scheduling,
                           applied_tier=ex.tier, endpoint=ex.endpoint,
                           upstream_model=pool.entry.upstream_model)
    payload = orjson.dumps(body)
    trace = ex.trace.upstream_headers() if ex.trace is not None else None
    # The core client rewrites a stream's events as they arrive (tierq.upstream_core).
    stream = (ex.tier, info.client_wants_usage, MAX_EVENT_BYTES) if info.stream else None
    overloads = 0
    moves = _Moves(ex, body)
    try:
        while True:
            ex.sent_at = time.monotonic()
            if not ex.upstream_at:
                ex.upstream_at = ex.sent_at
            try:
                async with pool.upstream.post(ex.endpoint, payload, request.headers.get(BYO_HEADER),
                                              trace, ex.replica, stream=stream) as up:
                    if up.status in OVERLOAD_STATUSES:
                        # Nothing reached the client yet: the limit backs off on
                        # each such answer, and the request keeps its slot (no
                        # waiter takes it) and is sent again after a back-off, as
                        # often as what is left of its max wait allows.
                        ex.gw.capacity.overloaded(pool.entry.id, ex.replica)
                        await up.read()
                        overloads += 1
                        wait = overload_backoff_s(up.headers, overloads, _wait_left_s(ex))
                        if wait is None:
                            raise upstream_overloaded(pool.admission.retry_after_s(ex.tier))
                    elif up.status >= 500:
                        # A server error before any byte reached the client: sent
                        # again at once on another replica when there is one.
                        await up.read()
                        if moves.another(Outcome.FAILED):
                            continue
                        return await upstream_error(ex, up)
                    else:
                        moves.answered()
                        if not 200 <= up.status < 300:
                            return await upstream_error(ex, up)
                        if info.stream and up.content_type == "text/event-stream":
                            return await relay_stream(request, ex, up, info.client_wants_usage)
                        return await relay_json(request, ex, up)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
                # Refused, reset, closed or timed out before the response began
                # (a JSON body is read whole first; a stream's first read comes
                # before its headers go out): nothing reached the client.
                if ex.replied or ex.done or not moves.another(Outcome.UNREACHABLE):
                    raise
                continue
            # A drain ends the back-off: the request is the drain's 503, as a
            # queued one is, rather than held until the shutdown cuts it.
            if not ex.gw.draining:
                await asyncio.sleep(wait)
            if ex.gw.draining:
                raise drained()
    except (aiohttp.ClientError, TimeoutError) as e:
        if ex.done:
            raise
        code = ("upstream_timeout" if isinstance(e, TimeoutError)
                else "upstream_error" if malformed_answer(e) else "upstream_unavailable")
        status = 504 if code == "upstream_timeout" else 502
        raise Refused(failed(code, status), ApiError(
            status, f"The upstream serving this model failed: {type(e).__name__}.",
            "server_error", None, code)) from None


# Replicas a request is sent to after its first, at most: a failure that is the
# request's own (a prompt every engine fails on) costs three tries, not one per
# replica, and counts against at most three replicas' health.
MAX_MOVES: Final = 2


class _Moves:
    """The one rule for sending a request again on another replica (DESIGN.md:
    a failure before any byte reached the client; docs/gateway.md, Replica
    health). Each try's outcome is its replica's health (tierq.health); a
    failed one moves the request's replica slot to another replica in
    rotation it has not failed on, at once, while what is left of its max
    wait (the budget the overload back-offs share) lasts, at most MAX_MOVES
    times. The request keeps its pool slot throughout: billed once, one row."""

    __slots__ = ("_ex", "_body", "_tried", "_route", "moves")

    def __init__(self, ex: Exchange, body: dict[str, Any]) -> None:
        self._ex = ex
        self._body = body
        self._tried = 0  # bit i: failed on replica i
        self._route: Route | None = None
        self.moves = 0

    def answered(self) -> None:
        health = self._ex.pool.upstream.health
        if health is not None and self._ex.pool.replicas is not None:
            health.record(self._ex.replica, Outcome.OK)

    def another(self, outcome: Outcome) -> bool:
        """Records a failed try; True when the request moved to another replica."""
        ex = self._ex
        pool = ex.pool
        health, replicas = pool.upstream.health, pool.replicas
        if health is None or replicas is None:
            return False
        failed_on = ex.replica
        health.record(failed_on, outcome)
        self._tried |= 1 << failed_on
        if self.moves >= MAX_MOVES or _wait_left_s(ex) <= 0 or ex.gw.draining:
            return False
        if not any(health.healthy(i) for i in range(health.replicas) if not self._tried >> i & 1):
            return False
        router = pool.upstream.router
        if self._route is None:
            self._route = router.route(ex.endpoint, self._body, count=False)
        replicas.release(failed_on)
        ex.replica = replicas.pick(self._route.order, self._route.rule, self._tried)
        self.moves += 1
        ex.gw.metrics.observe_retry(pool.entry.id, pool.entry.upstream, outcome.value)
        return True


def _wait_left_s(ex: Exchange) -> float:
    """What is left of the request's max wait (`Exchange.max_wait_s`: its lane's,
    or its own x-tierq-max-queue-ms when shorter), counted from its arrival: one
    budget for its time in the lane and its overload back-offs."""
    return ex.max_wait_s - (time.monotonic() - ex.t0)


# ------------------------------------------------------------------ other routes


def _models_body(gw: Gateway) -> bytes:
    return orjson.dumps(models_payload(gw.catalog, gw.config.pricing.priority_multiplier,
                                       gw.config.pricing.flex_multiplier))


def models_payload(catalog: Catalog, mult: Decimal,
                   flex_mult: Decimal = DEFAULT_FLEX_MULTIPLIER) -> dict[str, Any]:
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
        if m.flex:
            pricing["flex_input"] = render_cost(m.prices.input_per_m * flex_mult)
            pricing["flex_output"] = render_cost(m.prices.output_per_m * flex_mult)
        data.append({"id": m.id, "object": "model", "created": 0, "owned_by": m.upstream,
                     "priority": m.priority, "flex": m.flex, "pricing": pricing})
    return {"object": "list", "data": data}


async def _models(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    authenticate(gw, request)
    return web.Response(body=gw.models_body, content_type=JSON_TYPE)


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(body=b'{"status":"ok"}', content_type=JSON_TYPE)


async def _readyz(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    if not gw.ready:
        raise ApiError(503, "Not ready.", "server_error", None, "not_ready")
    return web.Response(body=b'{"status":"ready"}', content_type=JSON_TYPE)
